"""The mixer contract and the one place packed sequences are handled.

Every layer in a megahybrid model is a `Mixer`: `forward(x, state=None, seq_idx=None) -> (y, state)`.
- `x` is `[batch, seq, hidden]`; `y` has the same shape.
- `state` is None or a dict of tensors with the batch on dim 0 (KV cache, conv window, SSM state).
  Running a sequence in pieces with the state carried over equals running it whole; generation
  and context parallelism build on that.
- `seq_idx` (`[batch, seq]` integers, non-decreasing along each row) marks packed documents:
  nothing (attention, recurrent state, conv window) crosses from one document to the next.
  The incoming `state` belongs to the first document of each row; the returned state to the last.

Sequence mixers implement `forward_segment(x, state)` for one unpacked stretch of tokens; the base
class splits packed rows at document boundaries and runs each document from a fresh state. That
keeps packing out of every mixer's math: the reference is the oracle, so it favours obvious
correctness over speed (fast paths pass `cu_seqlens` to their kernels instead).
In training (`state=None`, `need_state=False`) every document of every row goes into one
right-padded batch and one `forward_segment` call: mixers are causal, so padding after a document
cannot reach its outputs; the states, which padding would disturb, are then not returned.
Channel mixers that act per token (MLP, MoE) set `token_wise = True` and ignore boundaries; RWKV-7's
channel mixing (`c`) also reads the previous token, so it keeps a state and the per-document split.
"""

from __future__ import annotations

from typing import ClassVar, Optional

import torch
from torch import nn

State = Optional[dict[str, torch.Tensor]]


class Mixer(nn.Module):
    """Base class of every layer type; see the module docstring for the contract."""

    token_wise: ClassVar[bool] = False
    """True for channel mixers (MLP, MoE): no state, no interaction between positions."""

    def forward(self, x: torch.Tensor, state: State = None, seq_idx: Optional[torch.Tensor] = None,
                need_state: bool = True):
        """`need_state=False` returns state None (and lets packed rows take the batched path)."""
        if seq_idx is None or self.token_wise:
            y, state = self.forward_segment(x, state)
            return y, (state if need_state else None)
        if state is None and not need_state:
            return run_documents_padded(self.forward_segment, x, seq_idx), None
        return run_per_document(self.forward_segment, x, state, seq_idx)

    def forward_segment(self, x: torch.Tensor, state: State = None):
        raise NotImplementedError

    @classmethod
    def check(cls, config) -> None:
        """Raise `ConfigError` (field, value, fix) if `config` cannot build this layer."""

    @classmethod
    def flops_per_token(cls, config, seq_len: int, causal: bool = True) -> float:
        """Forward FLOPs per token at sequence length `seq_len` (Megatron's convention:
        2 per multiply-add; causal attention counts half the score matrix)."""
        raise NotImplementedError


def document_bounds(row_seq_idx: torch.Tensor) -> list[int]:
    """[0, b1, b2, ..., T]: start offsets of each document in one row of `seq_idx`."""
    change = torch.nonzero(row_seq_idx[1:] != row_seq_idx[:-1]).flatten() + 1
    return [0, *change.tolist(), int(row_seq_idx.numel())]


def cu_seqlens_to_seq_idx(cu_seqlens: torch.Tensor, total: Optional[int] = None) -> torch.Tensor:
    """FLA/TE-style cumulative lengths `[0, l1, l1+l2, ...]` -> `seq_idx` of shape `[1, T]`."""
    total = int(cu_seqlens[-1]) if total is None else total
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.repeat_interleave(torch.arange(len(lengths), device=cu_seqlens.device), lengths)[None, :total]


def slice_state(state: State, rows: slice) -> State:
    return None if state is None else {k: v[rows] for k, v in state.items()}


def cat_states(states: list[State]) -> State:
    if all(s is None for s in states):
        return None
    if any(s is None for s in states):
        raise ValueError("cat_states: some rows returned a state and some did not")
    out = {}
    for key in states[0]:
        parts = [s[key] for s in states]
        if len({p.shape[1:] for p in parts}) > 1:
            raise ValueError(
                f"state {key!r} differs in shape between packed rows (e.g. KV caches of unequal "
                "last documents); run such rows separately to keep their states")
        out[key] = torch.cat(parts, dim=0)
    return out


def run_per_document(fn, x: torch.Tensor, state: State, seq_idx: torch.Tensor):
    """Run `fn(x_segment, state) -> (y, state)` once per packed document.

    Rows with the same boundaries are batched together; documents after the first in a row
    start from a fresh state (None)."""
    if seq_idx.shape != x.shape[:2]:
        raise ValueError(f"seq_idx shape {tuple(seq_idx.shape)} must equal x's [batch, seq] {tuple(x.shape[:2])}")
    bounds = [tuple(document_bounds(row)) for row in seq_idx]
    groups: dict[tuple, list[int]] = {}
    for row, b in enumerate(bounds):
        groups.setdefault(b, []).append(row)
    y = None  # allocated from the first output: a mixer may change the width (SharedAttention's 2*hidden input)
    row_states: list[State] = [None] * x.shape[0]
    for b, rows in groups.items():
        idx = torch.tensor(rows, device=x.device)
        s = None if state is None else {k: v[idx] for k, v in state.items()}
        for i, (start, end) in enumerate(zip(b[:-1], b[1:])):
            out, s = fn(x[idx, start:end], s if i == 0 else None)
            if y is None:
                y = out.new_empty(*x.shape[:-1], out.shape[-1])
            y[idx, start:end] = out
        for j, row in enumerate(rows):
            row_states[row] = slice_state(s, slice(j, j + 1))
    return y, cat_states(row_states)


def run_documents_padded(fn, x: torch.Tensor, seq_idx: torch.Tensor) -> torch.Tensor:
    """Outputs of `fn` run on every packed document from a fresh state, in one batched call:
    documents are gathered into a right-padded `[num_docs, longest, hidden]` batch."""
    B, T = seq_idx.shape
    new_doc = torch.ones_like(seq_idx, dtype=torch.bool)
    new_doc[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    flat_start = new_doc.flatten()
    doc = torch.cumsum(flat_start.long(), 0) - 1  # document number of every token, over all rows
    starts = torch.nonzero(flat_start).flatten()
    pos = torch.arange(B * T, device=x.device) - starts[doc]  # offset inside its document
    lengths = torch.bincount(doc)
    padded = x.new_zeros(len(lengths), int(lengths.max()), x.shape[-1])
    padded[doc, pos] = x.reshape(B * T, -1)
    out, _ = fn(padded, None)
    return out[doc, pos].reshape(*x.shape[:-1], out.shape[-1])
