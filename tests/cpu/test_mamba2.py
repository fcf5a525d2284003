"""Mamba2: chunked SSD == token-by-token recurrence (outputs, final state, every gradient) in float64;
the module in pieces == whole, packed == separate; the module == transformers' `Mamba2Mixer` torch path
with the state dict copied key for key; one-line config errors; Megatron's FLOPs count."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megahybrid.config import ConfigError, Mamba2Config, ModelConfig
from megahybrid.mixers.mamba2 import Mamba2, chunked_ssd, naive_recurrent_ssd
from tests.helpers import assert_close
from tests.mixer_checks import check_grads, check_packing, check_pieces

F64 = torch.float64


def make_config(hidden: int = 16, **mamba2) -> ModelConfig:
    m = {"state_size": 6, "head_dim": 4, "num_groups": 2, "expand": 2, "conv_kernel": 4, "chunk_size": 8, **mamba2}
    return ModelConfig(hidden_size=hidden, init_std=0.3, norm_eps=1e-6, mamba2=Mamba2Config(**m))


def build(config, dtype=F64, seed: int = 0) -> Mamba2:
    """The layer with every parameter random (conv bias, D, norm weight included)."""
    torch.manual_seed(seed)
    m = Mamba2(config).to(dtype)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if name == "norm.weight" else 0.0))
    return m


def ssd_inputs(b=2, T=75, h=4, p=3, g=2, n=5, seed=0):
    """Leaf tensors (x, dt_raw, A_log, B, C, D, S0); dt = softplus(dt_raw), A = -exp(A_log)."""
    torch.manual_seed(seed)
    return [torch.randn(*s, dtype=F64, requires_grad=True)
            for s in [(b, T, h, p), (b, T, h), (h,), (b, T, g, n), (b, T, g, n), (h,), (b, h, p, n)]]


def run_ssd(fn, x, dt_raw, A_log, B, C, D, S0, **kw):
    return fn(x, F.softplus(dt_raw), -torch.exp(A_log), B, C, D, S0, **kw)


@pytest.mark.parametrize("T", [63, 75])
@pytest.mark.parametrize("chunk", [8, 16, 64])
def test_chunked_matches_recurrence(T, chunk):
    inputs = ssd_inputs(T=T)
    y_ref, s_ref = run_ssd(naive_recurrent_ssd, *inputs)
    y, s = run_ssd(chunked_ssd, *inputs, chunk_size=chunk)
    assert_close("y", y_ref, y, 1e-10)
    assert_close("final_state", s_ref, s, 1e-10)


def test_chunked_gradients_match_recurrence():
    inputs = ssd_inputs(T=37)
    torch.manual_seed(1)
    ref = run_ssd(naive_recurrent_ssd, *inputs)
    out = run_ssd(chunked_ssd, *inputs, chunk_size=8)
    check_grads(ref, out, dict(zip(["x", "dt", "A_log", "B", "C", "D", "initial_state"], inputs)), 1e-10)


def test_pieces_with_state_equal_whole():
    """Cuts at 13 and 15: the 2-token piece is shorter than the conv window."""
    check_pieces(build(make_config()), torch.randn(2, 50, 16, dtype=F64), cuts=(13, 15), rtol=1e-10)


def test_packed_equals_separate():
    check_packing(build(make_config()), torch.randn(2, 31, 16, dtype=F64), [[5, 17, 9], [9, 22]], rtol=1e-10)


def test_matches_transformers_mamba2_mixer():
    """Independent reference: HF's torch path (its own conv, chunk scan and gated norm), fed our
    state dict with strict key/shape matching, so the parameter layout is checked too."""
    from transformers.models.mamba2.configuration_mamba2 import Mamba2Config as HFConfig
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

    config = make_config(hidden=32, state_size=16, head_dim=8, chunk_size=16)
    ours = build(config, dtype=torch.float32)
    c = config.mamba2
    hf_config = HFConfig(hidden_size=32, num_heads=8, head_dim=8, expand=2, n_groups=2, state_size=16,
                         conv_kernel=4, chunk_size=16, layer_norm_epsilon=config.norm_eps,
                         use_bias=c.use_bias, use_conv_bias=c.use_conv_bias, num_hidden_layers=1)
    hf = Mamba2Mixer(hf_config, layer_idx=0).eval()
    hf.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 37, 32)
    with torch.no_grad():
        assert_close("y vs HF Mamba2Mixer", hf(x), ours(x)[0], 2e-5)


@pytest.mark.parametrize("gated_norm", [False, True])
def test_d_inner_and_no_gated_norm_match_transformers_falcon_h1_mixer(gated_norm):
    """`d_inner` apart from expand*hidden and `gated_norm=false` (y * silu(z), no norm.weight) against
    HF's FalconH1Mixer torch path (mamba_d_ssm, mamba_rms_norm), strict key/shape matching."""
    from transformers.models.falcon_h1.configuration_falcon_h1 import FalconH1Config
    from transformers.models.falcon_h1.modeling_falcon_h1 import FalconH1Mixer

    config = make_config(hidden=32, state_size=16, head_dim=8, num_groups=1, chunk_size=16, d_inner=40, gated_norm=gated_norm,
                         norm_before_gate=True)
    ours = build(config, dtype=torch.float32)
    assert ours.d_inner == 40 and ours.nheads == 5 and ("norm.weight" in ours.state_dict()) == gated_norm
    hf_config = FalconH1Config(hidden_size=32, mamba_d_ssm=40, mamba_n_heads=5, mamba_n_groups=1, mamba_d_state=16,
                               mamba_chunk_size=16, mamba_rms_norm=gated_norm, mamba_norm_before_gate=True,
                               rms_norm_eps=config.norm_eps, num_hidden_layers=1, num_attention_heads=4)
    hf = FalconH1Mixer(hf_config, layer_idx=0).eval()
    hf.register_buffer("mup_vector", torch.ones(1, 1, hf.in_proj.out_features), persistent=False)  # µP off
    hf.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 37, 32)
    with torch.no_grad():
        assert_close("y vs HF FalconH1Mixer", hf(x), ours(x)[0], 2e-5)


def test_bfloat16_runs_close_to_float32():
    m = build(make_config(), dtype=torch.float32)
    x = torch.randn(2, 20, 16)
    with torch.no_grad():
        y32 = m(x)[0]
        y16 = m.to(torch.bfloat16)(x.bfloat16())[0]
    assert y16.dtype == torch.bfloat16
    assert_close("bf16 y", y32, y16.float(), 5e-2)


@pytest.mark.parametrize("overrides, field", [
    ({"num_groups": 3}, "model.mamba2.num_groups"),  # 8 heads
    ({"head_dim": 5}, "model.mamba2.head_dim"),  # d_inner 32
    ({"state_size": 0}, "model.mamba2.state_size"),
    ({"dt_limit": (0.5, 0.1)}, "model.mamba2.dt_limit"),
    ({"dt_min": 0.5, "dt_max": 0.1}, "model.mamba2.dt_min"),
    ({"d_inner": 0}, "model.mamba2.d_inner"),
    ({"d_inner": 30}, "model.mamba2.head_dim"),  # 30 channels, heads of 4
])
def test_config_errors_are_one_line(overrides, field):
    with pytest.raises(ConfigError) as err:
        Mamba2(make_config(**overrides))
    msg = str(err.value)
    assert msg.startswith(field + "=") and "\n" not in msg, msg


def test_flops_match_megatron_formula():
    """Megatron `mamba_layer_flops` by hand for H=256, d_inner=512, N=128, G=1, 8 heads:
    2*256*(1024+256+8) + 7*512*128 + 2*512*256."""
    config = ModelConfig(hidden_size=256)
    assert Mamba2.flops_per_token(config, 4096) == 659456 + 458752 + 262144
