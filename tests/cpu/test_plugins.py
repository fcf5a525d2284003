"""Plug-in mixers (megahybrid/plugins.py): a module outside the package (tests/plugin_example/
megahybrid_ema) registers the symbol `Q`; a config naming it in `model.plugins` builds, trains a few
steps on CPU, describes and reloads from its checkpoint; an installed entry point works the same way;
a missing module and a clashing symbol give one-line errors naming the field, the path and both
layer types. The plug-in's EMA recurrence is checked against the closed form
h_t = sum_s (1 - a) a^(t - s) u_s (float64), and its state against the contract checks.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import megahybrid
from megahybrid import plugins
from megahybrid.pattern import resolve_layers
from megahybrid.cli import main
from megahybrid.config import ConfigError, load_config
from megahybrid.mixers import REGISTRY
from megahybrid.train.run import train_from_cli
from tests.helpers import assert_close
from tests.mixer_checks import check_packing, check_pieces

EXAMPLE = Path(__file__).resolve().parents[1] / "plugin_example"
MODULE = "megahybrid_ema"
TINY = {"pattern": "Q-*-Q-", "plugins": [MODULE], "hidden_size": 32, "vocab_size": 300,
        "attention": {"num_heads": 4}, "mlp": {"ffn_hidden_size": 64}}


@pytest.fixture
def example(monkeypatch):
    """The example folder on sys.path (as PYTHONPATH would put it); afterwards the plug-in's symbol and
    modules are removed, so the rest of the suite sees the built-in registry only."""
    monkeypatch.syspath_prepend(str(EXAMPLE))
    before = dict(REGISTRY)
    yield
    for key in set(REGISTRY) - set(before):
        del REGISTRY[key]
    for name in [n for n in sys.modules if n == MODULE or n.startswith(MODULE + ".")]:
        del sys.modules[name]


def test_the_plugin_is_not_there_without_the_config_field(example):
    with pytest.raises(ConfigError, match="unknown layer symbol 'Q'"):
        load_config({"model": {**TINY, "plugins": []}})


def test_a_config_naming_the_plugin_builds_describes_and_trains(example, tmp_path, capsys):
    config = load_config({"model": TINY})
    assert REGISTRY["Q"].name == "ema_example"
    model = megahybrid.build_model(config)
    assert type(model.layers[0].mixer).__name__ == "EMAMixer"

    assert main(["describe", "--json", "Q-*-Q-",
                 "model.plugins=[megahybrid_ema]", "model.hidden_size=32", "model.attention.num_heads=4"]) == 0
    info = json.loads(capsys.readouterr().out)
    rows = [r for r in info["layers"] if r["symbol"] == "Q"]
    assert [r["name"] for r in rows] == ["ema_example", "ema_example"]
    assert rows[0]["flops_per_token"] == 4.0 * 32 ** 2 + 3.0 * 32
    assert rows[0]["params"] == 2 * 32 * 32 + 32 + 32  # in/out projections, decay, the block's norm

    assert main(["describe", "Q-*-Q-", "model.plugins=[megahybrid_ema]"]) == 0
    assert "ema_example" in capsys.readouterr().out

    overrides = [f"model.{k}={json.dumps(v)}" for k, v in TINY.items()]
    overrides += ["data.corpus_bytes=200000", "train.steps=4", "train.seq_len=32", "train.micro_batch_size=2",
                  "train.global_batch_size=2", "train.warmup_steps=1", "train.log_every=1", "train.eval_every=0",
                  "train.save_every=4", "train.threads=1", "data.valid_fraction=0.1"]
    assert train_from_cli(None, str(tmp_path), overrides) == 0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    reloaded, saved = megahybrid.load_checkpoint(tmp_path)  # the saved config names the plug-in again
    assert saved.model.plugins == [MODULE] and type(reloaded.layers[0].mixer).__name__ == "EMAMixer"


def test_the_plugin_mixer_meets_the_contract(example):
    """EMA == its closed form in float64; pieces == whole; packed == separate."""
    config = load_config({"model": TINY})
    mixer = REGISTRY["Q"].cls()(config.model).double()
    torch.manual_seed(0)
    x = torch.randn(2, 13, 32, dtype=torch.float64)
    y, state = mixer(x)
    a = torch.sigmoid(mixer.decay_logit)
    u = mixer.in_proj(x)
    t = torch.arange(13, dtype=torch.float64)
    lag = (t[:, None] - t[None, :])[..., None]  # [t, s, 1]
    weights = torch.where(lag >= 0, (1 - a) * a ** lag.clamp(min=0), 0.0)
    h = torch.einsum("tsc,bsc->btc", weights, u)  # h_t = sum_{s <= t} (1 - a) a^(t-s) u_s
    assert_close("ema y", mixer.out_proj(h), y, 1e-12)
    assert_close("ema state", h[:, -1], state["h"], 1e-12)
    check_pieces(mixer, x, [1, 6], 1e-12)
    check_packing(mixer, x, [[4, 9], [13]], 1e-12)


def test_entry_point_plugins_load_without_the_config_field(example, tmp_path, monkeypatch):
    """An installed distribution (a dist-info with entry_points.txt on sys.path) in the group
    `megahybrid.mixers` registers its symbol when a pattern is first resolved."""
    dist = tmp_path / "megahybrid_ema-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: megahybrid-ema\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[{plugins.ENTRY_POINT_GROUP}]\nema = {MODULE}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(plugins, "_entry_points_loaded", False)
    config = load_config({"model": {**TINY, "plugins": []}})
    assert [s.symbol for s in resolve_layers(config)] == list("Q-*-Q-")


def test_a_missing_module_names_the_field_and_the_path(example, capsys):
    with pytest.raises(ConfigError) as err:
        load_config({"model": {**TINY, "plugins": ["no_such_pkg.mixer"]}})
    message = str(err.value)
    assert message.startswith("model.plugins[0]='no_such_pkg.mixer': cannot import it") and "\n" not in message
    assert main(["describe", "M*", "model.plugins=[no_such_pkg.mixer]"]) == 2
    assert "model.plugins[0]='no_such_pkg.mixer'" in capsys.readouterr().err


def test_a_clashing_symbol_names_both_layer_types(example):
    with pytest.raises(ConfigError) as err:
        load_config({"model": {**TINY, "pattern": "M*", "plugins": [f"{MODULE}.clash"]}})
    message = str(err.value)
    assert "model.plugins[0]='megahybrid_ema.clash'" in message
    assert "'my_deltanet' ('d')" in message and "'deltanet' ('d')" in message
    assert REGISTRY["d"].name == "deltanet"
