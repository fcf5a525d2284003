"""Parallel mixers (`p`): attention ‖ Mamba2 == transformers' own Falcon-H1 attention + Mamba2 mixer
(independent code: HF RoPE, eager attention, its chunk scan and conv) fed our weights, summed; pieces
with the state carried == whole; packed == separate; one-line config errors; FLOPs = the branches'."""

from __future__ import annotations

import pytest
import torch

from megahybrid.config import (AttentionConfig, ConfigError, Mamba2Config, ModelConfig, ParallelMixersConfig)
from megahybrid.mixers.attention import Attention
from megahybrid.mixers.mamba2 import Mamba2
from megahybrid.mixers.parallel import ParallelMixers
from tests.convert_checks import transformers
from tests.helpers import assert_close
from tests.mixer_checks import check_packing, check_pieces

HIDDEN = 16


def make_config(mixers=("attention", "mamba2"), gated_norm=True) -> ModelConfig:
    return ModelConfig(hidden_size=HIDDEN, init_std=0.3, norm_eps=1e-6,
                       attention=AttentionConfig(num_heads=4, num_kv_heads=2, rope_theta=100.0),
                       mamba2=Mamba2Config(state_size=6, head_dim=4, num_groups=2, d_inner=24, chunk_size=8,
                                           gated_norm=gated_norm, norm_before_gate=True),
                       parallel_mixers=ParallelMixersConfig(mixers=list(mixers)))


def build(config, dtype=torch.float64, seed=0) -> ParallelMixers:
    torch.manual_seed(seed)
    m = ParallelMixers(config).to(dtype)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "norm" in name else 0.0))
    return m


@pytest.mark.parametrize("gated_norm", [False, True])
def test_matches_transformers_falcon_h1_branches(gated_norm):
    tf = transformers()
    from transformers.models.falcon_h1 import modeling_falcon_h1 as fh

    config = make_config(gated_norm=gated_norm)
    ours = build(config, torch.float32)
    hf_config = tf.FalconH1Config(hidden_size=HIDDEN, num_attention_heads=4, num_key_value_heads=2,
                                  rope_parameters={"rope_type": "default", "rope_theta": 100.0},
                                  mamba_d_ssm=24, mamba_n_heads=6, mamba_d_state=6, mamba_n_groups=2,
                                  mamba_chunk_size=8, mamba_rms_norm=gated_norm, mamba_norm_before_gate=True,
                                  rms_norm_eps=1e-6, num_hidden_layers=1)
    hf_config._attn_implementation = "eager"
    attn, mamba = fh.FalconH1Attention(hf_config, 0).eval(), fh.FalconH1Mixer(hf_config, 0).eval()
    mamba.register_buffer("mup_vector", torch.ones(1, 1, mamba.in_proj.out_features), persistent=False)
    attn.load_state_dict(ours.attention.state_dict(), strict=True)
    mamba.load_state_dict(ours.mamba2.state_dict(), strict=True)
    x = torch.randn(2, 21, HIDDEN)
    T = x.shape[1]
    positions = torch.arange(T)[None]
    cos_sin = fh.FalconH1RotaryEmbedding(hf_config)(x, positions)
    causal = torch.full((T, T), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        ref = mamba(x) + attn(x, cos_sin, causal)[0]
        assert_close("attention + mamba2 vs HF", ref, ours(x)[0], 2e-5)


def test_pieces_with_state_equal_whole():
    state = check_pieces(build(make_config()), torch.randn(2, 30, HIDDEN, dtype=torch.float64), cuts=(9, 11), rtol=1e-10)
    assert {"attention.k", "attention.v", "mamba2.conv", "mamba2.ssm"} <= set(state)


def test_packed_equals_separate():
    check_packing(build(make_config(gated_norm=False)), torch.randn(2, 31, HIDDEN, dtype=torch.float64),
                  [[5, 17, 9], [22, 9]], rtol=1e-10)  # equal last documents: equal KV caches


def test_flops_are_the_branches_sum():
    config = make_config()
    assert ParallelMixers.flops_per_token(config, 64) == (Attention.flops_per_token(config, 64)
                                                          + Mamba2.flops_per_token(config, 64))


@pytest.mark.parametrize("mixers, message", [
    ((), "at least one"),
    (("attention", "mlp"), "'mlp' is not a sequence mixer"),
    (("attention", "parallel"), "'parallel' is not a sequence mixer"),
    (("attention", "*"), "twice"),
])
def test_config_errors_are_one_line(mixers, message):
    with pytest.raises(ConfigError) as err:
        ParallelMixers(make_config(mixers))
    msg = str(err.value)
    assert msg.startswith("model.parallel_mixers.mixers=") and message in msg and "\n" not in msg, msg
