"""Hymba parallel attention + SSM heads in one layer (`h`), Dong et al. 2024 (arXiv 2411.13676).

Section 2.1 of the paper: one input projection feeds attention heads and SSM heads side by side;
each branch's output is normalised and scaled per channel (beta1, beta2), and one output
projection mixes them. The exact form here is that of NVIDIA's released Hymba-1.5B code
(`HymbaBlock` in modeling_hymba.py; the paper's own text was not at hand when this was written):
    Y = out_proj((beta1 * rmsnorm(attn(X)) + beta2 * rmsnorm(ssm(X))) / 2)
with beta1/beta2 the weights of two RMSNorms (`pre_avg_layernorm1/2` there). As there, the attention
branch has no o_proj and its value heads are d_inner / num_heads wide, so both branches are d_inner wide.

Where this differs from Hymba-1.5B, and why:
- The SSM heads are Mamba2 (SSD) heads sized by `model.mamba2` (Hymba-1.5B uses Mamba1 selective
  scan heads): this reuses `mamba2.py`'s scan and state. beta2 is the weight of Mamba2's gated
  norm rmsnorm(y * silu(z)), which is what Hymba-1.5B computes as well (its scan gates by silu(z),
  then pre_avg_layernorm2), except that the norm runs per group of d_inner / num_groups channels.
- Meta tokens and cross-layer KV sharing are model-level features and not part of this layer.
- One window for every `h` layer (`model.hymba.attention_window`); Hymba-1.5B keeps global
  attention in its first, middle and last layers.

Parameters: in_proj rows [q (Hq*D) | k (Hkv*D) | v (Hkv*Dv) | z | x | B | C | dt] (the part after v is
Mamba2's in_proj layout), conv1d, dt_bias, A_log, D, norm (beta2, as Mamba2), attn_norm (beta1),
optional q_norm/k_norm, out_proj. Attention sizes come from `model.attention` (q/k heads, RoPE,
QK-norm, softmax scale), SSM sizes from `model.mamba2`.
State: Mamba2's {"conv", "ssm"} plus attention's KV cache {"k", "v"} and, with a window, "pos"
(the same contract as `mixers/attention.py`).
"""

from __future__ import annotations

from typing import Optional

import torch

from megahybrid.config import fail
from megahybrid.mixers.attention import Attention, attend_heads, mean_keys
from megahybrid.mixers.base import State
from megahybrid.mixers.common import RMSNorm, linear
from megahybrid.mixers.mamba2 import SSDHeads, check_ssd, ssd_sizes


def attention_sizes(config) -> tuple[int, int, int, int]:
    """(Hq, Hkv, D, Dv): query/kv heads, q/k head width, value head width (= d_inner / Hq)."""
    a = config.attention
    d_inner = ssd_sizes(config)[0]
    return a.num_heads, a.num_kv_heads or a.num_heads, a.head_dim or config.hidden_size // a.num_heads, \
        d_inner // a.num_heads


class Hymba(SSDHeads):
    """Hymba layer: attention heads and Mamba2 SSM heads on one projection, normed, averaged, projected."""

    def __init__(self, config, index: int = 0, shared: Optional[dict] = None):
        self.check(config)
        super().__init__(config)  # the SSM heads' parameters (conv1d, dt_bias, A_log, D, norm)
        a = config.attention
        self.num_heads, self.num_kv_heads, self.qk_dim, self.v_dim = attention_sizes(config)
        self.window = config.hymba.attention_window
        self.rope_theta, self.rotary_fraction = a.rope_theta, a.rotary_fraction
        self.scale = a.softmax_scale if a.softmax_scale is not None else self.qk_dim ** -0.5
        self.attn_widths = [self.num_heads * self.qk_dim, self.num_kv_heads * self.qk_dim,
                            self.num_kv_heads * self.v_dim]
        bias, std = config.mamba2.use_bias, config.init_std
        self.in_proj = linear(config.hidden_size, sum(self.attn_widths) + self.ssd_width, std, bias=bias)
        self.attn_norm = RMSNorm(self.d_inner, eps=config.norm_eps)  # beta1
        if a.qk_norm:
            self.q_norm = RMSNorm(self.qk_dim, config.norm_eps, config.zero_centered_norm)
            self.k_norm = RMSNorm(self.qk_dim, config.norm_eps, config.zero_centered_norm)
        else:
            self.q_norm = self.k_norm = None
        self.out_proj = linear(self.d_inner, config.hidden_size, std, bias=bias)

    def forward_segment(self, x: torch.Tensor, state: State = None):
        B, T, _ = x.shape
        q, k, v, zxbcdt = self.in_proj(x).split([*self.attn_widths, self.ssd_width], dim=-1)
        q = q.view(B, T, self.num_heads, self.qk_dim)
        k = k.view(B, T, self.num_kv_heads, self.qk_dim)
        v = v.view(B, T, self.num_kv_heads, self.v_dim)
        o, kv_state = attend_heads(q, k, v, state, q_norm=self.q_norm, k_norm=self.k_norm, rope_theta=self.rope_theta,
                                   rotary_fraction=self.rotary_fraction, window=self.window, scale=self.scale)
        y, ssm_state = self.ssd_branch(zxbcdt, state)
        out = self.out_proj((self.attn_norm(o.reshape(B, T, self.d_inner)) + y) / 2)
        return out, {**ssm_state, **kv_state}

    @classmethod
    def check(cls, config) -> None:
        config = getattr(config, "model", config)
        check_ssd(config)
        Attention.check(config)
        a = config.attention
        d_inner = ssd_sizes(config)[0]
        if d_inner % a.num_heads:
            fail("model.attention.num_heads", a.num_heads,
                 f"must divide Hymba's d_inner {d_inner} (= mamba2.expand*hidden_size): value heads are "
                 "d_inner/num_heads wide so both branches have the same width")
        if not config.mamba2.gated_norm:
            fail("model.mamba2.gated_norm", False, "Hymba's SSM branch is normed (its beta2 is the norm weight); "
                 "set it to true")
        if a.output_gate:
            fail("model.attention.output_gate", True, "Hymba's attention heads have no output gate; set it to false")
        w = config.hymba.attention_window
        if w is not None and w < 1:
            fail("model.hymba.attention_window", w, "must be >= 1 (or null for global attention)")

    @classmethod
    def flops_per_token(cls, config, seq_len: int, causal: bool = True) -> float:
        """Megatron conventions, as `Mamba2` and `Attention`: in_proj 2*H*(attention + SSM rows),
        SSM scan 7*d_inner*N, attention 2*Hq*(D + Dv) per key attended (QK^T and AV), out_proj 2*d_inner*H."""
        d_inner, nh, G, N, _ = ssd_sizes(config)
        Hq, Hkv, D, Dv = attention_sizes(config)
        H = config.hidden_size
        rows = Hq * D + Hkv * D + Hkv * Dv + 2 * d_inner + 2 * G * N + nh
        keys = mean_keys(seq_len, config.hymba.attention_window, causal)
        return float(2 * H * rows + 7 * d_inner * N + 2 * Hq * (D + Dv) * keys + 2 * d_inner * H)
