"""Mamba1: chunked selective scan == token-by-token recurrence (outputs, final state, every gradient)
in float64; the module in pieces == whole, packed == separate; the module == transformers'
`JambaMambaMixer` (inner layernorms) and `MambaMixer` (none) torch paths with the state dict copied
key for key; one-line config errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megahybrid.config import ConfigError, Mamba1Config, ModelConfig
from megahybrid.mixers.mamba1 import Mamba1, chunked_selective_scan, naive_recurrent_selective_scan
from tests.helpers import assert_close
from tests.mixer_checks import check_grads, check_packing, check_pieces

F64 = torch.float64


def make_config(hidden: int = 16, **mamba1) -> ModelConfig:
    m = {"state_size": 6, "expand": 2, "conv_kernel": 4, "dt_rank": 3, "inner_layernorms": True,
         "chunk_size": 8, **mamba1}
    return ModelConfig(hidden_size=hidden, init_std=0.3, norm_eps=1e-6, mamba1=Mamba1Config(**m))


def build(config, dtype=F64, seed: int = 0) -> Mamba1:
    """The layer with every parameter random (conv bias, D, norm weights included)."""
    torch.manual_seed(seed)
    m = Mamba1(config).to(dtype)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "layernorm" in name else 0.0))
    return m


def scan_inputs(b=2, T=75, d=6, n=5, seed=0):
    """Leaf tensors (x, dt_raw, A_log, B, C, D, S0); dt = softplus(dt_raw), A = -exp(A_log)."""
    torch.manual_seed(seed)
    return [torch.randn(*s, dtype=F64, requires_grad=True)
            for s in [(b, T, d), (b, T, d), (d, n), (b, T, n), (b, T, n), (d,), (b, d, n)]]


def run_scan(fn, x, dt_raw, A_log, B, C, D, S0, **kw):
    return fn(x, F.softplus(dt_raw), -torch.exp(A_log), B, C, D, S0, **kw)


@pytest.mark.parametrize("T", [63, 75])
@pytest.mark.parametrize("chunk", [8, 16, 64])
def test_chunked_matches_recurrence(T, chunk):
    inputs = scan_inputs(T=T)
    y_ref, s_ref = run_scan(naive_recurrent_selective_scan, *inputs)
    y, s = run_scan(chunked_selective_scan, *inputs, chunk_size=chunk)
    assert_close("y", y_ref, y, 1e-10)
    assert_close("final_state", s_ref, s, 1e-10)


def test_chunked_gradients_match_recurrence():
    inputs = scan_inputs(T=37)
    torch.manual_seed(1)
    ref = run_scan(naive_recurrent_selective_scan, *inputs)
    out = run_scan(chunked_selective_scan, *inputs, chunk_size=8)
    check_grads(ref, out, dict(zip(["x", "dt", "A_log", "B", "C", "D", "initial_state"], inputs)), 1e-10)


def test_pieces_with_state_equal_whole():
    """Cuts at 13 and 15: the 2-token piece is shorter than the conv window."""
    check_pieces(build(make_config()), torch.randn(2, 50, 16, dtype=F64), cuts=(13, 15), rtol=1e-10)


def test_packed_equals_separate():
    check_packing(build(make_config()), torch.randn(2, 31, 16, dtype=F64), [[5, 17, 9], [9, 22]], rtol=1e-10)


@pytest.mark.parametrize("inner_layernorms", [True, False])
def test_matches_transformers(inner_layernorms):
    """Independent reference: HF's per-token torch scan, fed our state dict with strict key/shape
    matching (Jamba has the dt/B/C norms, plain Mamba has none)."""
    config = make_config(hidden=32, state_size=8, dt_rank=4, inner_layernorms=inner_layernorms)
    ours = build(config, dtype=torch.float32)
    c = config.mamba1
    if inner_layernorms:
        from transformers.models.jamba.configuration_jamba import JambaConfig
        from transformers.models.jamba.modeling_jamba import JambaMambaMixer

        hf_config = JambaConfig(hidden_size=32, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=4,
                                mamba_conv_bias=c.use_conv_bias, mamba_proj_bias=c.use_bias,
                                rms_norm_eps=config.norm_eps, num_hidden_layers=1)
        hf = JambaMambaMixer(hf_config, layer_idx=0)
    else:
        from transformers.models.mamba.configuration_mamba import MambaConfig
        from transformers.models.mamba.modeling_mamba import MambaMixer

        hf_config = MambaConfig(hidden_size=32, state_size=8, conv_kernel=4, expand=2, time_step_rank=4,
                                use_conv_bias=c.use_conv_bias, use_bias=c.use_bias, num_hidden_layers=1)
        hf = MambaMixer(hf_config, layer_idx=0)
    hf.eval().load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 37, 32)
    with torch.no_grad():
        assert_close("y vs HF", hf(x), ours(x)[0], 2e-5)


@pytest.mark.parametrize("overrides, field", [
    ({"state_size": 0}, "model.mamba1.state_size"),
    ({"dt_rank": 0}, "model.mamba1.dt_rank"),
    ({"chunk_size": 0}, "model.mamba1.chunk_size"),
])
def test_config_errors_are_one_line(overrides, field):
    with pytest.raises(ConfigError) as err:
        Mamba1(make_config(**overrides))
    msg = str(err.value)
    assert msg.startswith(field + "=") and "\n" not in msg, msg
