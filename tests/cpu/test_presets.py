"""Every preset: tiny size builds and behaves like a causal LM; describe's totals are the real count."""

import pytest
import torch
from pathlib import Path

from megahybrid import build_model, load_config, presets
from megahybrid.describe import describe
from tests.helpers import assert_close

NAMES = presets.names()
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", params=NAMES)
def tiny(request):
    torch.manual_seed(0)
    config = load_config(f"{request.param}:tiny")
    model = build_model(config).double().eval()
    return request.param, config, model


def test_tiny_logits_finite_and_describe_matches(tiny):
    name, config, model = tiny
    ids = torch.randint(0, config.model.vocab_size, (2, 21))
    logits = model(ids)
    assert logits.shape == (2, 21, config.model.vocab_size)
    assert torch.isfinite(logits).all(), name
    info = describe(config)
    assert info["total_params"] == sum(p.numel() for p in model.parameters()), name
    assert len(info["layers"]) == len(model.layers)


def test_tiny_is_causal_and_rows_independent(tiny):
    name, config, model = tiny
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.model.vocab_size, (2, 19), generator=g)
    base = model(ids)
    t = 9
    changed = ids.clone()
    changed[0, t + 1] = (changed[0, t + 1] + 1) % config.model.vocab_size
    out = model(changed)
    # float64; MoE re-sorts tokens when one changes, so allow last-bit differences (not real leaks).
    assert_close(f"{name}: logits before the changed token", base[0, : t + 1], out[0, : t + 1], 1e-12)
    assert (out[0, t + 1] - base[0, t + 1]).abs().max() > 1e-6, f"{name}: the changed token had no effect"
    assert_close(f"{name}: the other batch row", base[1], out[1], 1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_full_size_describes(name):
    info = describe(load_config(name))
    assert info["total_params"] > 0 and info["flops_per_token"] > 0
    assert sum(r["params"] for r in info["layers"]) + info["embedding_params"] + info["head_params"] \
        + info["final_norm_params"] == info["total_params"]


def test_exp7_188m_has_the_published_size():
    """exp7's 12 x 768 DeltaNet hybrid with vocab 49152 is reported as 188.98M; FLA-style DeltaNet
    layers with a 4x SwiGLU MLP and untied embeddings give 188.93M (within 0.03%: the source's
    remaining ~50K parameters are not described; see the preset's docstring)."""
    total = describe(load_config("exp7_deltanet_188m"))["total_params"]
    assert abs(total - 188.98e6) / 188.98e6 < 5e-4, total


@pytest.mark.parametrize("name", NAMES)
def test_yaml_mirrors_preset(name):
    """configs/models/<name>.yaml loads to the same config as the preset (tools/write_presets.py)."""
    path = ROOT / "configs" / "models" / f"{name}.yaml"
    assert path.is_file(), f"missing {path}; run python tools/write_presets.py"
    assert load_config(str(path)).to_dict() | {"name": name} == load_config(name).to_dict()
