"""Zamba-style shared attention (`s`), Glorioso et al. 2024 (Zamba2, arXiv 2411.15242).

Every `s` position runs one of `num_shared_blocks` attention blocks whose weights are shared by all
positions (used round-robin: the u-th `s` layer built uses block u % num_shared_blocks), plus its own
LoRA adapters (Hu et al. 2021) on q, k and v, so each use can specialise at a small cost:
    q = q_proj(x) + q_adapter(x),  q_adapter = Linear(hidden, r) then Linear(r, H*D)   (same for k, v)
The up-projection starts at zero, so at init every use of a block computes the same function.
With `output_gate`, the adapter acts on the query half only, not on the gate.

Sharing: the model passes one `shared` dict to every layer's constructor. The first `s` layer to
use block b creates the `Attention` under `shared["shared_attention.b"]` and owns the weights (so
`named_parameters()` names them under that layer); later uses register the same module object.
`nn.Module.parameters()` yields a parameter once even if several submodules hold it (it dedups by
identity), so the optimizer and parameter counts see one copy and gradients from every use add up
in it. `state_dict()` does NOT dedup: it lists the weights under every use's prefix (same storage);
`torch.save` stores them once, loading writes the same values twice. Pipeline stages that split
the uses of one block must tie them across stages (not handled here).

Left for HF conversion: Zamba2 feeds the shared block concat(hidden, original embeddings) (width
2*hidden) and pairs it with a shared MLP and a per-use output linear; here the block reads the
residual stream only and the MLP is its own pattern symbol.

State: the block's KV cache (see `megahybrid.mixers.attention`); each use keeps its own.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from megahybrid.config import fail
from megahybrid.mixers.attention import Attention, _model_config
from megahybrid.mixers.base import Mixer, State
from megahybrid.mixers.common import linear

USES_KEY = "shared_attention.uses"
"""Key in the `shared` dict counting the `s` layers built so far (picks the round-robin block)."""


def _adapter(hidden: int, rank: int, out: int, std: float) -> nn.Sequential:
    """LoRA pair: down (N(0, std)) then up (zeros), as `.0` / `.1` like Zamba2's adapter lists."""
    up = linear(rank, out, std)
    nn.init.zeros_(up.weight)
    return nn.Sequential(linear(hidden, rank, std), up)


class SharedAttention(Mixer):
    """One use of a shared attention block, with its own LoRA adapters on q, k, v."""

    def __init__(self, config, index: int = 0, shared: dict | None = None):
        super().__init__()
        self.check(config)
        sa = config.shared_attention
        shared = {} if shared is None else shared  # built alone: the layer owns a private block
        self.use = shared.get(USES_KEY, 0)
        shared[USES_KEY] = self.use + 1
        self.block_id = self.use % sa.num_shared_blocks
        key = f"shared_attention.{self.block_id}"
        if key not in shared:
            shared[key] = Attention(config, index)
        self.block: Attention = shared[key]
        self.q_adapter: Optional[nn.Sequential] = None
        self.k_adapter: Optional[nn.Sequential] = None
        self.v_adapter: Optional[nn.Sequential] = None
        if sa.adapter_rank > 0:
            b, hidden, std = self.block, config.hidden_size, config.init_std
            self.q_adapter = _adapter(hidden, sa.adapter_rank, b.num_heads * b.head_dim, std)
            self.k_adapter = _adapter(hidden, sa.adapter_rank, b.num_kv_heads * b.head_dim, std)
            self.v_adapter = _adapter(hidden, sa.adapter_rank, b.num_kv_heads * b.head_dim, std)

    def forward_segment(self, x: torch.Tensor, state: State = None):
        q, gate, k, v = self.block.project(x)
        if self.q_adapter is not None:
            q = q + self.q_adapter(x).view_as(q)
            k = k + self.k_adapter(x).view_as(k)
            v = v + self.v_adapter(x).view_as(v)
        return self.block.attend(q, gate, k, v, state)

    @classmethod
    def check(cls, config) -> None:
        Attention.check(config)
        sa = _model_config(config).shared_attention
        if sa.adapter_rank < 0:
            fail("model.shared_attention.adapter_rank", sa.adapter_rank, "must be >= 0 (0 = no adapters)")
        if sa.num_shared_blocks < 1:
            fail("model.shared_attention.num_shared_blocks", sa.num_shared_blocks, "must be >= 1")

    @classmethod
    def flops_per_token(cls, config, seq_len: int, causal: bool = True) -> float:
        """Attention's FLOPs plus the adapters: 2 * r * (hidden + out) per adapter, out = H*D for q and
        Hkv*D for k and v. Sharing saves parameters, not FLOPs."""
        m = _model_config(config)
        a, r = m.attention, m.shared_attention.adapter_rank
        d = a.head_dim or m.hidden_size // a.num_heads
        outs = (a.num_heads * d, (a.num_kv_heads or a.num_heads) * d, (a.num_kv_heads or a.num_heads) * d)
        return Attention.flops_per_token(m, seq_len, causal) + sum(2.0 * r * (m.hidden_size + o) for o in outs)
