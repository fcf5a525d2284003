"""Softmax attention (`*`) and sliding-window attention (`w`) under context parallelism, reference path.

Each rank keeps the queries of its own CP slots and all-gathers the keys and values of every slot
(autograd-aware: the backward collective returns each rank's dK, dV contributions to the rank that
owns those tokens). Positions are global: a row of slot c holds tokens c*S .. c*S+S-1 of the
sequence, so RoPE, the causal mask and the window are those of the unsplit sequence, in either
layout (`contiguous` or `zigzag`, `megahybrid/parallel/group.py`). With packed documents (`seq_idx`)
a query sees only keys of its own document and RoPE counts from the document's start, as the
single-process reference does (it runs every document from position 0, `mixers/base.py`).

Why all-gather: it is simple and exact, and O(T) keys per rank is fine for a float64 oracle on CPU.
The fast path is Transformer Engine's attention CP on the same CP group (ring p2p, which overlaps
the K/V exchange with compute and keeps O(T/R) keys per rank, or all-to-all over heads), used by the
megatron backend; this file is what those layouts are checked against.

`attention_core` (`mixers/attention.py`) takes one causal offset for the whole batch; CP rows sit at
different offsets (zigzag: two per rank) and packing needs a per-row document mask, so the core here
takes an explicit `[rows, Tq, Tk]` mask; the math (GQA grouping, scale, float32 softmax for 16-bit
inputs) is the same.
"""

from __future__ import annotations

from typing import Optional

import torch

from megahybrid.mixers.attention import Attention
from megahybrid.mixers.base import State
from megahybrid.mixers.common import positions_in_documents, rotary
from megahybrid.parallel.group import CPGroup


def attention_cp(attn: Attention, x: torch.Tensor, comm: CPGroup, seq_idx: Optional[torch.Tensor] = None,
                 state: State = None):
    """This rank's part of `attn(x_whole, seq_idx=seq_idx_whole)` (y, None); x `[B, T_local, hidden]` and
    seq_idx `[B, T_local]` as `comm.shard` lays them out. No KV cache: training and prefill only."""
    if state is not None:
        raise NotImplementedError(f"{type(attn).__name__}: a KV-cache state cannot be passed under context "
                                  "parallelism (training/prefill only); run generation with parallel.cp=1")
    rows = comm.to_rows(x)  # [R, S, hidden], one CP slot per row
    R, S = rows.shape[:2]
    q, gate, k, v = attn.project(rows)
    if attn.q_norm is not None:
        if attn.qk_norm_all_heads:
            q, k = attn.q_norm(q.flatten(-2)).view_as(q), attn.k_norm(k.flatten(-2)).view_as(k)
        else:
            q, k = attn.q_norm(q), attn.k_norm(k)

    B = R // comm.row_factor  # sequences in the batch
    T = S * comm.num_slots
    slot_of_row = comm.own(torch.arange(comm.num_slots, device=x.device)[:, None].expand(-1, B))  # [R]
    seq_of_row = comm.own(torch.arange(B, device=x.device)[None].expand(comm.num_slots, -1))  # [R]
    docs = (torch.zeros(B, T, dtype=torch.long, device=x.device) if seq_idx is None
            else comm.unshard(seq_idx).long())  # [B, T], whole sequences (no autograd needed)
    pos_in_doc = positions_in_documents(docs)  # [B, T]
    q_pos = slot_of_row[:, None] * S + torch.arange(S, device=x.device)  # [R, S] global positions
    rope_pos = pos_in_doc[seq_of_row[:, None], q_pos]
    q = rotary(q, rope_pos, attn.rope_theta, attn.rotary_fraction)
    k = rotary(k, rope_pos, attn.rope_theta, attn.rotary_fraction)

    # Every slot's keys and values in time order, then each row's sequence: [R, T, Hkv, D].
    k_all, v_all = (comm.all_gather(t).movedim(0, 1).flatten(1, 2)[seq_of_row] for t in (k, v))
    distance = q_pos[:, :, None] - torch.arange(T, device=x.device)  # [R, S, T]
    visible = distance >= 0
    if attn.window is not None:
        visible &= distance < attn.window
    if seq_idx is not None:
        row_docs = docs[seq_of_row]  # [R, T]
        visible &= row_docs.gather(1, q_pos)[:, :, None] == row_docs[:, None, :]
    o = masked_attention(q, k_all, v_all, visible, attn.scale)
    if gate is not None:
        o = o * torch.sigmoid(gate)
    return comm.from_rows(attn.o_proj(o.reshape(R, S, -1))), None


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """softmax(scale q k^T, masked) v with GQA. q `[B, Tq, Hq, D]`, k `[B, Tk, Hkv, D]`, v `[B, Tk, Hkv, Dv]`,
    visible `[B, Tq, Tk]` (every query must see >= 1 key) -> `[B, Tq, Hq, Dv]`."""
    B, Tq, Hq, D = q.shape
    Hkv = k.shape[2]
    compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    qg = q.to(compute).transpose(1, 2).reshape(B, Hkv, Hq // Hkv, Tq, D)
    scores = (qg @ k.to(compute).permute(0, 2, 3, 1)[:, :, None]) * scale  # [B, Hkv, groups, Tq, Tk]
    scores = scores.masked_fill(~visible[:, None, None], float("-inf"))
    o = torch.softmax(scores, dim=-1) @ v.to(compute).transpose(1, 2)[:, :, None]
    return o.reshape(B, Hq, Tq, -1).transpose(1, 2).to(q.dtype)
