"""DeltaNet mixer (`d`), Yang et al. 2024 (arXiv 2406.06484), with FLA's `DeltaNet` layer semantics:

    q, k, v = silu(short_conv(W_{q,k,v} x));  q, k L2-normalised per head;  beta = sigmoid(W_b x) (1 without use_beta)
    o = delta_rule(q, k, v, beta)  (scale dk^-0.5);  y = W_o RMSNorm(o) [* silu(W_g x) if output_gate]

beta is doubled with `allow_neg_eigval` (Grazzi et al. 2024, arXiv 2411.12537): the transition
I - beta k k^T can then have eigenvalue down to -1. Parameter names and shapes are FLA's
(`q_proj, k_proj, v_proj, b_proj, g_proj, o_proj, {q,k,v}_conv1d.weight [C, 1, K], o_norm`).
State: {"conv_q", "conv_k", "conv_v": [B, K-1, C] (absent when conv_kernel = 0),
"recurrent": [B, H, dk, dv]}.
"""

from __future__ import annotations

from typing import Optional

import torch

from megahybrid.config import fail
from megahybrid.mixers.base import Mixer, State
from megahybrid.mixers.common import GatedRMSNorm, RMSNorm, ShortConv, linear
from megahybrid.mixers.delta_rule import delta_rule_heads, short_conv_qkv, split_heads


def deltanet_sizes(config) -> tuple[int, int, int]:
    """(heads, dk, dv) from `config.deltanet`, without checking them."""
    c = config.deltanet
    dk = c.head_dim or config.hidden_size // c.num_heads
    return c.num_heads, dk, int(round(c.expand_v * dk))


class DeltaNet(Mixer):
    """DeltaNet layer; see the module docstring."""

    def __init__(self, config, index: int = 0, shared: Optional[dict] = None):
        super().__init__()
        self.check(config)
        c, hidden, std = config.deltanet, config.hidden_size, config.init_std
        self.num_heads, self.head_k_dim, self.head_v_dim = H, dk, dv = deltanet_sizes(config)
        self.chunk_size = c.chunk_size
        self.allow_neg_eigval = c.allow_neg_eigval
        self.output_gate = c.output_gate
        self.q_proj = linear(hidden, H * dk, std)
        self.k_proj = linear(hidden, H * dk, std)
        self.v_proj = linear(hidden, H * dv, std)
        self.b_proj = linear(hidden, H, std) if c.use_beta else None
        if c.conv_kernel:
            # No conv bias: FLA's default (`conv_bias=False`).
            self.q_conv1d = ShortConv(H * dk, c.conv_kernel, bias=False)
            self.k_conv1d = ShortConv(H * dk, c.conv_kernel, bias=False)
            self.v_conv1d = ShortConv(H * dv, c.conv_kernel, bias=False)
        if c.output_gate:
            self.g_proj = linear(hidden, H * dv, std)
            self.o_norm = GatedRMSNorm(dv, eps=config.norm_eps, norm_before_gate=True)
        else:
            self.o_norm = RMSNorm(dv, eps=config.norm_eps)
        self.o_proj = linear(H * dv, hidden, std)

    def forward_segment(self, x: torch.Tensor, state: State = None, qkv=short_conv_qkv, rule=delta_rule_heads):
        """`qkv` and `rule` are the conv and core steps; context parallelism passes its own
        (megahybrid/parallel/mixers.py), everything else uses the defaults."""
        q, k, v, conv_state = qkv(self, x, state)
        # use_beta=False: beta = 1, as FLA's `use_beta=False` (then doubled with allow_neg_eigval too).
        beta = q.new_ones(*q.shape[:-1], q.shape[-1] // self.head_k_dim) if self.b_proj is None else self.b_proj(x).sigmoid()
        beta = beta * (2.0 if self.allow_neg_eigval else 1.0)
        o, recurrent = rule(split_heads(q, self.head_k_dim), split_heads(k, self.head_k_dim),
                                        split_heads(v, self.head_v_dim), beta, None, state, self.chunk_size)
        if self.output_gate:
            o = self.o_norm(o, split_heads(self.g_proj(x), self.head_v_dim))
        else:
            o = self.o_norm(o)
        return self.o_proj(o.flatten(-2).to(x.dtype)), {**conv_state, "recurrent": recurrent}

    @classmethod
    def check(cls, config) -> None:
        c = config.deltanet
        if c.num_heads < 1:
            fail("model.deltanet.num_heads", c.num_heads, "must be >= 1")
        if c.head_dim is None and config.hidden_size % c.num_heads:
            fail("model.deltanet.num_heads", c.num_heads,
                 f"must divide model.hidden_size={config.hidden_size}, or set model.deltanet.head_dim")
        if c.head_dim is not None and c.head_dim < 1:
            fail("model.deltanet.head_dim", c.head_dim, "must be >= 1 (or null for hidden_size / num_heads)")
        dk = c.head_dim or config.hidden_size // c.num_heads
        if c.expand_v <= 0 or abs(c.expand_v * dk - round(c.expand_v * dk)) > 1e-6:
            fail("model.deltanet.expand_v", c.expand_v,
                 f"expand_v * head_dim ({dk}) must be a positive whole number (the value head width)")
        if c.conv_kernel < 0:
            fail("model.deltanet.conv_kernel", c.conv_kernel, "must be >= 0 (0 disables the short conv)")
        if c.chunk_size < 1:
            fail("model.deltanet.chunk_size", c.chunk_size, "must be >= 1 (64 is FLA's)")

    @classmethod
    def flops_per_token(cls, config, seq_len: int, causal: bool = True) -> float:
        """2 * (in_proj + conv + core + out_proj) MACs per token, Megatron's `gdn_layer_flops` terms
        with DeltaNet's projections (no a_proj; g_proj only with output_gate):
            hidden * (2 H dk + H dv + H + [H dv]) + K (2 H dk + H dv) + 4 H dk dv + H dv * hidden.
        Linear in sequence length, so `seq_len` and `causal` do not enter."""
        c = config.deltanet
        H, dk, dv = deltanet_sizes(config)
        hidden = config.hidden_size
        in_proj = hidden * (2 * H * dk + H * dv + (H if c.use_beta else 0) + (H * dv if c.output_gate else 0))
        conv = c.conv_kernel * (2 * H * dk + H * dv)
        core = 4 * H * dk * dv
        return 2.0 * (in_proj + conv + core + H * dv * hidden)
