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

Zamba2's hybrid layer (HF `Zamba2HybridLayer`) is `sM` with every option below on:
    u = input_norm(concat(x, e))            concat_embeddings: e = the embedding layer's output, 2*hidden wide;
                                            the reference Block skips its own pre-norm for this mixer
    a = attention(u) + LoRA on q, k, v      q/k/v (and adapters) read 2*hidden
    t = mlp(mlp_norm(a)) + LoRA on [gate|up]  mlp, mlp_adapter_rank: no residual around either half
    t = output_proj(t)                      output_projection: per use (Zamba2's `linear`)
    x_next = x + Mamba2(norm(x + t))        output_to="next_input": t feeds the next layer's input only
input_norm, attention, mlp_norm and mlp are shared like the attention (one per block); the adapters and
output_proj belong to each use. The Block reads `reads_embeddings` / `feeds_next_input` off the mixer
(reference/model.py); every other mixer keeps the plain contract.

State: the block's KV cache (see `megahybrid.mixers.attention`); each use keeps its own.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from megahybrid.config import fail
from megahybrid.mixers.attention import Attention, _model_config
from megahybrid.mixers.base import Mixer, State
from megahybrid.mixers.common import linear, make_norm
from megahybrid.mixers.mlp import MLP, activate, ffn_flops_per_token, is_gated, mlp_width

USES_KEY = "shared_attention.uses"
"""Key in the `shared` dict counting the `s` layers built so far (picks the round-robin block)."""


def _adapter(hidden: int, rank: int, out: int, std: float) -> nn.Sequential:
    """LoRA pair: down (N(0, std)) then up (zeros), as `.0` / `.1` like Zamba2's adapter lists."""
    up = linear(rank, out, std)
    nn.init.zeros_(up.weight)
    return nn.Sequential(linear(hidden, rank, std), up)


class SharedAttention(Mixer):
    """One use of a shared attention block, with its own LoRA adapters on q, k, v (and, with the
    Zamba2 options, the block's shared MLP, an adapter on it and a per-use output projection)."""

    def __init__(self, config, index: int = 0, shared: dict | None = None):
        super().__init__()
        self.check(config)
        sa, hidden, std = config.shared_attention, config.hidden_size, config.init_std
        shared = {} if shared is None else shared  # built alone: the layer owns a private block
        self.use = shared.get(USES_KEY, 0)
        shared[USES_KEY] = self.use + 1
        self.block_id = self.use % sa.num_shared_blocks
        self.reads_embeddings = sa.concat_embeddings
        self.feeds_next_input = sa.output_to == "next_input"
        width = 2 * hidden if sa.concat_embeddings else hidden
        key = f"shared_attention.{self.block_id}"
        if key not in shared:
            shared.update(self._shared_parts(config, index, key, width))
        self.block: Attention = shared[key]
        self.input_norm = shared.get(f"{key}.input_norm")
        self.mlp_norm = shared.get(f"{key}.mlp_norm")
        self.mlp: Optional[MLP] = shared.get(f"{key}.mlp")
        self.q_adapter: Optional[nn.Sequential] = None
        self.k_adapter: Optional[nn.Sequential] = None
        self.v_adapter: Optional[nn.Sequential] = None
        if sa.adapter_rank > 0:
            b = self.block
            q_width, kv_width = b.num_heads * b.head_dim, b.num_kv_heads * b.head_dim
            self.q_adapter = _adapter(width, sa.adapter_rank, q_width, std)
            self.k_adapter = _adapter(width, sa.adapter_rank, kv_width, std)
            self.v_adapter = _adapter(width, sa.adapter_rank, kv_width, std)
        self.mlp_adapter: Optional[nn.Sequential] = None
        if sa.mlp_adapter_rank > 0:
            rows = mlp_width(config) * (2 if is_gated(config.mlp.activation) else 1)  # [gate | up]
            self.mlp_adapter = _adapter(hidden, sa.mlp_adapter_rank, rows, std)
        self.output_proj = linear(hidden, hidden, std) if sa.output_projection else None

    @staticmethod
    def _shared_parts(config, index: int, key: str, width: int) -> dict:
        """The modules every use of block `key` shares (the first use builds and owns them)."""
        sa = config.shared_attention
        parts = {key: Attention(config, index, input_size=width)}
        if sa.concat_embeddings:
            parts[f"{key}.input_norm"] = make_norm(config, width)
        if sa.mlp:
            parts[f"{key}.mlp_norm"] = make_norm(config)
            parts[f"{key}.mlp"] = MLP(config)
        return parts

    def forward_segment(self, x: torch.Tensor, state: State = None):
        if self.input_norm is not None:
            x = self.input_norm(x)
        q, gate, k, v = self.block.project(x)
        if self.q_adapter is not None:
            q = q + self.q_adapter(x).view_as(q)
            k = k + self.k_adapter(x).view_as(k)
            v = v + self.v_adapter(x).view_as(v)
        y, state = self.block.attend(q, gate, k, v, state)
        if self.mlp is not None:
            y = self._mlp(self.mlp_norm(y))
        if self.output_proj is not None:
            y = self.output_proj(y)
        return y, state

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        """The shared MLP with this use's adapter added to its [gate | up] rows (Zamba2's gate_up_proj)."""
        mlp = self.mlp
        up = mlp.up_proj(x)
        gate = None if mlp.gate_proj is None else mlp.gate_proj(x)
        if self.mlp_adapter is not None:
            delta = self.mlp_adapter(x)
            if gate is None:
                up = up + delta
            else:
                delta_gate, delta_up = delta.chunk(2, dim=-1)
                gate, up = gate + delta_gate, up + delta_up
        return mlp.down_proj(activate(mlp.activation, up, gate))

    @classmethod
    def check(cls, config) -> None:
        Attention.check(config)
        sa = _model_config(config).shared_attention
        if sa.adapter_rank < 0:
            fail("model.shared_attention.adapter_rank", sa.adapter_rank, "must be >= 0 (0 = no adapters)")
        if sa.num_shared_blocks < 1:
            fail("model.shared_attention.num_shared_blocks", sa.num_shared_blocks, "must be >= 1")
        if sa.mlp_adapter_rank < 0 or (sa.mlp_adapter_rank and not sa.mlp):
            fail("model.shared_attention.mlp_adapter_rank", sa.mlp_adapter_rank,
                 "must be >= 0, and 0 unless shared_attention.mlp is true (the adapter sits on that MLP)")
        if sa.mlp:
            MLP.check(config)

    @classmethod
    def flops_per_token(cls, config, seq_len: int, causal: bool = True) -> float:
        """Attention's FLOPs plus the adapters: 2 * r * (in + out) per adapter, out = H*D for q and
        Hkv*D for k and v; in = 2*hidden with concat_embeddings (which also widens q/k/v), else hidden.
        With the Zamba2 options: the shared MLP, its adapter and the output projection. Sharing saves
        parameters, not FLOPs; norms are not counted."""
        m = _model_config(config)
        a, sa, hidden = m.attention, m.shared_attention, m.hidden_size
        d = a.head_dim or hidden // a.num_heads
        q_rows = a.num_heads * d * (2 if a.output_gate else 1)
        outs = (a.num_heads * d, (a.num_kv_heads or a.num_heads) * d, (a.num_kv_heads or a.num_heads) * d)
        width = 2 * hidden if sa.concat_embeddings else hidden
        flops = Attention.flops_per_token(m, seq_len, causal) + 2.0 * (width - hidden) * (q_rows + outs[1] + outs[2])
        flops += sum(2.0 * sa.adapter_rank * (width + o) for o in outs)
        if sa.mlp:
            ffn = mlp_width(m)
            flops += ffn_flops_per_token(hidden, ffn, m.mlp.activation)
            flops += 2.0 * sa.mlp_adapter_rank * (hidden + ffn * (2 if is_gated(m.mlp.activation) else 1))
        if sa.output_projection:
            flops += 2.0 * hidden * hidden
        return flops
