"""Hymba: the layer == a from-scratch reference written here (per-query softmax loop, complex RoPE,
padded conv, the token-by-token SSD recurrence, hand norms) in float64, outputs and every gradient;
pieces with the KV/SSM state carried == whole (global and windowed); packed == separate; config errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megahybrid.config import AttentionConfig, ConfigError, HymbaConfig, Mamba2Config, ModelConfig
from megahybrid.mixers.hymba import Hymba
from megahybrid.mixers.mamba2 import naive_recurrent_ssd
from tests.helpers import assert_close
from tests.mixer_checks import check_grads, check_packing, check_pieces

F64 = torch.float64
HIDDEN = 16


def make_config(window=None, attention=None, **mamba2) -> ModelConfig:
    attention = {"num_heads": 4, "num_kv_heads": 2, "qk_norm": True, "rope_theta": 100.0, **(attention or {})}
    mamba2 = {"state_size": 6, "head_dim": 4, "num_groups": 2, "expand": 2, "chunk_size": 8, **mamba2}
    return ModelConfig(hidden_size=HIDDEN, init_std=0.3, norm_eps=1e-6, attention=AttentionConfig(**attention),
                       mamba2=Mamba2Config(**mamba2), hymba=HymbaConfig(attention_window=window))


def build(config, seed: int = 0) -> Hymba:
    """The layer in float64 with every parameter random (norm weights around 1)."""
    torch.manual_seed(seed)
    m = Hymba(config).double()
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "norm" in name else 0.0))
    return m


# ------------------------------------------------------------------ hand-written reference


def rms(x, weight, eps, groups=1):
    g = x.reshape(*x.shape[:-1], groups, -1)
    return (g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps)).reshape(x.shape) * weight


def rope(x, theta):
    """Full rotary as complex multiplication of the pairs (x_i, x_{i+D/2}) by e^{i t theta^(-2i/D)}."""
    T, half = x.shape[1], x.shape[-1] // 2
    angle = torch.arange(T, dtype=F64)[:, None] * theta ** (-torch.arange(half, dtype=F64) * 2 / (2 * half))
    z = torch.complex(x[..., :half], x[..., half:]) * torch.polar(torch.ones_like(angle), angle)[None, :, None]
    return torch.cat([z.real, z.imag], dim=-1)


def reference(m: Hymba, x: torch.Tensor) -> torch.Tensor:
    B, T, _ = x.shape
    Hq, Hkv, D, Dv = m.num_heads, m.num_kv_heads, m.qk_dim, m.v_dim
    d, G, N, nh, P = m.d_inner, m.ngroups, m.state_size, m.nheads, m.head_dim
    q, k, v, z, xs, Bm, Cm, dt = F.linear(x, m.in_proj.weight).split(
        [Hq * D, Hkv * D, Hkv * Dv, d, d, G * N, G * N, nh], dim=-1)
    # Attention heads: each query's softmax over the keys it may see, one at a time.
    q = rope(rms(q.view(B, T, Hq, D), m.q_norm.weight, m.q_norm.eps), m.rope_theta)
    k = rope(rms(k.view(B, T, Hkv, D), m.k_norm.weight, m.k_norm.eps), m.rope_theta)
    v = v.view(B, T, Hkv, Dv)
    o = torch.zeros(B, T, Hq, Dv, dtype=F64)
    for t in range(T):
        lo = 0 if m.window is None else max(0, t - m.window + 1)
        for h in range(Hq):
            kv = h // (Hq // Hkv)
            p = torch.softmax(torch.einsum("bd,bsd->bs", q[:, t, h], k[:, lo:t + 1, kv]) * m.scale, dim=-1)
            o[:, t, h] = torch.einsum("bs,bsd->bd", p, v[:, lo:t + 1, kv])
    attn = rms(o.reshape(B, T, d), m.attn_norm.weight, m.attn_norm.eps)
    # SSM heads: zero-padded conv, the recurrence, then norm(y * silu(z)) over groups.
    xBC = torch.cat([xs, Bm, Cm], -1).transpose(1, 2)
    K = m.conv1d.weight.shape[-1]
    xBC = F.silu(F.conv1d(F.pad(xBC, (K - 1, 0)), m.conv1d.weight, m.conv1d.bias, groups=xBC.shape[1])).transpose(1, 2)
    xs, Bm, Cm = xBC.split([d, G * N, G * N], dim=-1)
    y, _ = naive_recurrent_ssd(xs.view(B, T, nh, P), F.softplus(dt + m.dt_bias), -torch.exp(m.A_log),
                               Bm.view(B, T, G, N), Cm.view(B, T, G, N), m.D)
    ssm = rms(y.reshape(B, T, d) * F.silu(z), m.norm.weight, m.norm.eps, groups=G)
    return F.linear((attn + ssm) / 2, m.out_proj.weight)


@pytest.mark.parametrize("window", [None, 5])
def test_matches_reference_outputs_and_gradients(window):
    m = build(make_config(window))
    x = torch.randn(2, 21, HIDDEN, dtype=F64, requires_grad=True)
    y_ref = reference(m, x)
    y = m(x)[0]
    assert_close("y", y_ref, y, 1e-10)
    check_grads(y_ref, y, {"x": x, **dict(m.named_parameters())}, 1e-10)


@pytest.mark.parametrize("window", [None, 5])
def test_pieces_with_state_equal_whole(window):
    check_pieces(build(make_config(window)), torch.randn(2, 30, HIDDEN, dtype=F64), cuts=(9, 11, 12), rtol=1e-10)


def test_packed_equals_separate():
    check_packing(build(make_config(window=7)), torch.randn(2, 31, HIDDEN, dtype=F64), [[5, 17, 9], [9, 22]],
                  rtol=1e-10)


@pytest.mark.parametrize("kwargs, field", [
    ({"attention": {"num_heads": 3, "num_kv_heads": 1, "head_dim": 4}}, "model.attention.num_heads"),
    ({"attention": {"output_gate": True}}, "model.attention.output_gate"),
    ({"window": 0}, "model.hymba.attention_window"),
    ({"num_groups": 3}, "model.mamba2.num_groups"),
])
def test_config_errors_are_one_line(kwargs, field):
    with pytest.raises(ConfigError) as err:
        Hymba(make_config(**kwargs))
    msg = str(err.value)
    assert msg.startswith(field + "=") and "\n" not in msg, msg
