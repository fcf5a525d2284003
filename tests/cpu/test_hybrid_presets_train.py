"""The Edifice `Hybrid` presets, GoldFinch and RWKV-7: each tiny size trains a few steps on CPU (loss finite and
falling) and `megahybrid describe` shows its layout. The layouts are checked against Edifice's rule
(lib/edifice/ssm/hybrid.ex: layer i, 1-based, is attention iff i % attention_every == 0, the FFN only in
attention blocks) written out here, not against pattern.py's own expansion."""

from __future__ import annotations

import json

import pytest

from megahybrid.cli import main
from megahybrid.config import ConfigError, load_config
from megahybrid.data.prepare import prepare
from megahybrid.mixers import by_name
from megahybrid.pattern import resolve_layers
from megahybrid.train.run import train_from_cli

EDIFICE = {"edifice_gru": "gru", "edifice_rwkv": "rwkv7", "edifice_deltanet": "deltanet", "edifice_gdn": "gdn",
           "edifice_griffin": "rglru", "edifice_mamba": "mamba1"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    prefix, tok = prepare([], str(tmp_path_factory.mktemp("data") / "corpus"), None, 512, corpus_bytes=200_000)
    return [f"data.paths=[{prefix}]", f"data.tokenizer={tok}"]


@pytest.mark.parametrize("name", [*EDIFICE, "goldfinch", "rwkv7"])
def test_tiny_preset_trains_and_describes(name, dataset, tmp_path, capsys):
    args = ["model.vocab_size=512", "train.steps=10", "train.seq_len=32", "train.micro_batch_size=4",
            "train.global_batch_size=4", "train.warmup_steps=2", "train.log_every=1", "train.eval_every=0",
            "train.save_every=10", "train.threads=1", "data.valid_fraction=0.1", *dataset]
    assert train_from_cli(f"{name}:tiny", str(tmp_path), args) == 0
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 10 and min(losses[-3:]) < losses[0] - 0.3, losses
    capsys.readouterr()
    assert main(["describe", "--json", name]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["total_params"] > 0 and info["flops_per_token"] > 0


@pytest.mark.parametrize("name", EDIFICE)
def test_edifice_layout_follows_its_attention_every_rule(name):
    m = load_config(name).model
    backbone = by_name(EDIFICE[name]).symbol
    expected = ""
    for i in range(1, 7):  # Edifice defaults: num_layers 6, attention_every 3
        expected += "w-" if i % 3 == 0 else backbone
    assert "".join(s.symbol for s in resolve_layers(load_config(name))) == expected
    a = m.attention
    assert (a.window, a.qk_norm, m.hidden_size, a.num_heads, a.head_dim, m.norm) == (60, True, 256, 4, 64, "layernorm")



def test_attention_symbol_and_mlp_after_attention_errors_are_one_line():
    with pytest.raises(ConfigError, match=r"^model.attention_symbol='mlp': must name a sequence mixer"):
        load_config({"model": {"backbone": "gdn", "num_layers": 3, "attention_every": 3, "attention_symbol": "mlp"}})
    with pytest.raises(ConfigError, match=r"^model.mlp_after_attention='-': only applies with model.backbone"):
        load_config({"model": {"pattern": "M*", "mlp_after_attention": "-"}})
    with pytest.raises(ConfigError, match=r"^model.mlp_after_attention='swa': must be a channel layer: '-' \(mlp\), 'E' \(moe\)"):
        load_config({"model": {"backbone": "gdn", "num_layers": 3, "attention_every": 3, "mlp_after_attention": "swa"}})
