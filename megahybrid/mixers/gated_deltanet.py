"""Gated DeltaNet mixer (`G`), Yang, Kautz & Hatamizadeh 2024 (arXiv 2412.06464), as in FLA's
`GatedDeltaNet`, Qwen3-Next / Qwen3.5 and Megatron-Core's `GatedDeltaNet`:

    q, k, v = silu(short_conv(W_{q,k,v} x));  q, k L2-normalised per head, scale dk^-0.5
    beta = sigmoid(W_b x);  g = -exp(A_log) * softplus(W_a x + dt_bias)  (log-decay per v head)
    o = gated_delta_rule(q, k, v, beta, g);  y = W_o (RMSNorm(o) * silu(W_g x))

Grouped value heads: q/k have `num_qk_heads`, v has `num_v_heads` (a multiple); q/k head i serves
v heads [i*r, (i+1)*r), r = num_v_heads / num_qk_heads (`repeat_interleave`, as HF and FLA's GVA).
The output norm is per v head over dv, plain weight, applied before the gate (HF
`Qwen3_5RMSNormGated`, FLA `FusedRMSNormGated`). Parameter names are FLA's = OlmoHybrid's on disk
(`q_proj, k_proj, v_proj, a_proj, b_proj, g_proj, o_proj, q_conv1d, k_conv1d, v_conv1d, o_norm,
A_log, dt_bias`; conv weights [C, 1, K]). For Qwen3.5,
in_proj_qkv = cat(q, k, v), in_proj_z = g_proj, in_proj_{a,b} = {a,b}_proj, conv1d = cat of the
three convs, norm = o_norm, out_proj = o_proj (tests/cpu/test_delta_rule.py `to_qwen3_5`).
State: {"conv_q", "conv_k", "conv_v": [B, K-1, C], "recurrent": [B, num_v_heads, dk, dv]}
(key-major, HF's layout; FLA 0.6's layer keeps [dv, dk], `state_v_first=True`).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megahybrid.config import fail
from megahybrid.mixers.base import Mixer, State
from megahybrid.mixers.common import GatedRMSNorm, ShortConv, init_dt_bias, linear
from megahybrid.mixers.delta_rule import delta_rule_heads, short_conv_qkv, split_heads

A_INIT_RANGE = (1.0, 16.0)
"""A ~ U(1, 16) per v head (mamba_ssm's range). FLA and Megatron draw U(0, 16), where log(A) can
reach -inf; HF Qwen3.5 moved its lower bound to 0.01 for that reason."""
DT_INIT = (0.001, 0.1, 1e-4)
"""(dt_min, dt_max, floor) of the dt_bias init, as FLA's GatedDeltaNet and Mamba."""


def gdn_sizes(config) -> tuple[int, int, int, int]:
    """(num_qk_heads, num_v_heads, dk, dv) from `config.gdn`, without checking them."""
    c = config.gdn
    dk = c.qk_head_dim or config.hidden_size // c.num_qk_heads
    return c.num_qk_heads, c.num_v_heads or c.num_qk_heads, dk, c.v_head_dim or dk


class GatedDeltaNet(Mixer):
    """Gated DeltaNet layer; see the module docstring."""

    def __init__(self, config, index: int = 0, shared: Optional[dict] = None):
        super().__init__()
        self.check(config)
        c, hidden, std = config.gdn, config.hidden_size, config.init_std
        self.num_qk_heads, self.num_v_heads, self.head_k_dim, self.head_v_dim = Hk, Hv, dk, dv = gdn_sizes(config)
        self.chunk_size = c.chunk_size
        self.allow_neg_eigval = c.allow_neg_eigval
        self.q_proj = linear(hidden, Hk * dk, std)
        self.k_proj = linear(hidden, Hk * dk, std)
        self.v_proj = linear(hidden, Hv * dv, std)
        self.a_proj = linear(hidden, Hv, std)
        self.b_proj = linear(hidden, Hv, std)
        self.g_proj = linear(hidden, Hv * dv, std)
        # No conv bias: FLA's default, and Qwen3.5's conv1d has none.
        self.q_conv1d = ShortConv(Hk * dk, c.conv_kernel, bias=False)
        self.k_conv1d = ShortConv(Hk * dk, c.conv_kernel, bias=False)
        self.v_conv1d = ShortConv(Hv * dv, c.conv_kernel, bias=False)
        self.A_log = nn.Parameter(torch.empty(Hv).uniform_(*A_INIT_RANGE).log())
        self.dt_bias = nn.Parameter(init_dt_bias(Hv, *DT_INIT))
        for p in (self.A_log, self.dt_bias):
            p._no_weight_decay = True  # FLA / Megatron exclude these from weight decay
        eps = config.norm_eps if c.norm_eps is None else c.norm_eps
        self.o_norm = GatedRMSNorm(dv, eps=eps, norm_before_gate=True)
        self.o_proj = linear(Hv * dv, hidden, std)

    def log_decay(self, x: torch.Tensor) -> torch.Tensor:
        """g = -exp(A_log) * softplus(W_a x + dt_bias) [B, T, Hv], in float32 at least (HF computes
        it in float32: in half precision exp(A_log) can overflow)."""
        a = self.a_proj(x)
        work = torch.promote_types(a.dtype, torch.float32)
        return -self.A_log.to(work).exp() * F.softplus(a.to(work) + self.dt_bias.to(work))

    def forward_segment(self, x: torch.Tensor, state: State = None, qkv=short_conv_qkv, rule=delta_rule_heads):
        """`qkv` and `rule` as in `DeltaNet.forward_segment` (context parallelism swaps them)."""
        q, k, v, conv_state = qkv(self, x, state)
        r = self.num_v_heads // self.num_qk_heads
        q = split_heads(q, self.head_k_dim).repeat_interleave(r, dim=2)
        k = split_heads(k, self.head_k_dim).repeat_interleave(r, dim=2)
        beta = self.b_proj(x).sigmoid() * (2.0 if self.allow_neg_eigval else 1.0)
        o, recurrent = rule(q, k, split_heads(v, self.head_v_dim), beta, self.log_decay(x),
                                        state, self.chunk_size)
        o = self.o_norm(o, split_heads(self.g_proj(x), self.head_v_dim))
        return self.o_proj(o.flatten(-2).to(x.dtype)), {**conv_state, "recurrent": recurrent}

    @classmethod
    def check(cls, config) -> None:
        c = config.gdn
        if c.num_qk_heads < 1:
            fail("model.gdn.num_qk_heads", c.num_qk_heads, "must be >= 1")
        if c.num_v_heads is not None and (c.num_v_heads < 1 or c.num_v_heads % c.num_qk_heads):
            fail("model.gdn.num_v_heads", c.num_v_heads,
                 f"must be a positive multiple of model.gdn.num_qk_heads={c.num_qk_heads} "
                 "(each q/k head serves num_v_heads/num_qk_heads value heads)")
        if c.qk_head_dim is None and config.hidden_size % c.num_qk_heads:
            fail("model.gdn.num_qk_heads", c.num_qk_heads,
                 f"must divide model.hidden_size={config.hidden_size}, or set model.gdn.qk_head_dim")
        for name in ("qk_head_dim", "v_head_dim"):
            if getattr(c, name) is not None and getattr(c, name) < 1:
                fail(f"model.gdn.{name}", getattr(c, name), "must be >= 1 (or null for the default)")
        if c.conv_kernel < 1:
            fail("model.gdn.conv_kernel", c.conv_kernel,
                 "must be >= 1 (GDN always has the short conv; 4 is usual)")
        if c.chunk_size < 1:
            fail("model.gdn.chunk_size", c.chunk_size, "must be >= 1 (64 is FLA's)")
        if c.norm_eps is not None and c.norm_eps <= 0:
            fail("model.gdn.norm_eps", c.norm_eps, "must be > 0 (or null for model.norm_eps)")

    @classmethod
    def flops_per_token(cls, config, seq_len: int, causal: bool = True) -> float:
        """Megatron's `gdn_layer_flops` per token (2 FLOPs per multiply-add):
            2 * (hidden * (2 Hk dk + 2 Hv dv + 2 Hv)     in_proj: q, k, v, z (g_proj), a, b
                 + K * (2 Hk dk + Hv dv)                  depthwise conv over q, k, v
                 + 4 * Hv * dk * dv                       delta-rule core (Megatron writes Hv*dv^2*4)
                 + Hv dv * hidden)                        out_proj
        Megatron's core term assumes dk == dv; dk*dv is the same count without that assumption.
        Linear in sequence length, so `seq_len` and `causal` do not enter."""
        Hk, Hv, dk, dv = gdn_sizes(config)
        hidden = config.hidden_size
        in_proj = hidden * (2 * Hk * dk + 2 * Hv * dv + 2 * Hv)
        conv = config.gdn.conv_kernel * (2 * Hk * dk + Hv * dv)
        return 2.0 * (in_proj + conv + 4 * Hv * dk * dv + Hv * dv * hidden)
