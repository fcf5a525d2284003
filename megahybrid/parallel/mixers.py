"""Context-parallel forward of the linear-recurrent mixers, built from their own submodules.

`forward_cp(mixer, x, comm, state)` is this rank's part of `mixer(x_whole, state)`: the projections,
norms and gates act per token and run as they are; the short convs take their halo and the
recurrence its incoming state through `state_passing`. DeltaNet, GDN and Mamba2 take their conv and
core steps as arguments of `forward_segment`, so their CP forward is that same method with the CP
steps passed in; the RG-LRU block's gates and scan are inlined below. Packed documents (`seq_idx`)
reach the conv halo and the recurrence as `SlotDocuments` (where documents start in each slot).
"""

from __future__ import annotations

from functools import partial

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from megahybrid.mixers.base import Mixer, State
from megahybrid.mixers.common import ShortConv
from megahybrid.mixers.deltanet import DeltaNet
from megahybrid.mixers.gated_deltanet import GatedDeltaNet
from megahybrid.mixers.mamba2 import Mamba2
from megahybrid.mixers.rglru import RGLRUBlock, block_diagonal_linear
from megahybrid.parallel.group import CPGroup, check_cp_length
from megahybrid.parallel.state_passing import (SlotDocuments, conv_with_halo, delta_rule_heads_cp, rglru_cp,
                                               slot_documents, ssd_cp)


def forward_cp(mixer: Mixer, x: torch.Tensor, comm: CPGroup, state: State = None,
               seq_idx: Optional[torch.Tensor] = None, forward: Optional[Callable] = None):
    """This rank's part of `mixer(x_whole, state, seq_idx_whole)` under context parallelism.

    x: this rank's tokens `[B, T_local, hidden]` as `comm.shard` lays them out (its slots one after
    another; the simulated group stacks every rank on the batch). state: the incoming state of the
    whole sequence, read on the rank that holds its first tokens (others may pass None); with packed
    documents it belongs to each row's first document. seq_idx: this rank's document ids `[B, T_local]`
    (`comm.shard(seq_idx_whole)`), None for one document per row; every rank must pass it or none.
    Returns (y like x, the state after this rank's latest token: on `comm.last_slot_rank`, the final
    state of the whole sequence, i.e. of its last document)."""
    if mixer.token_wise:
        return mixer(x, need_state=False)
    forward = forward or _cp_forward_of(mixer)  # `forward`: the mixer's CP steps (kernels.py passes its own)
    halo = _conv_halo(mixer)
    check_cp_length(x.shape[1] * comm.size, comm.size, comm.layout, min_slot=halo)
    docs = None
    if seq_idx is not None:
        if seq_idx.shape != x.shape[:2]:
            raise ValueError(f"seq_idx shape {tuple(seq_idx.shape)} must equal x's [batch, seq] {tuple(x.shape[:2])}")
        docs = slot_documents(comm, comm.to_rows(seq_idx), halo)
    y, new_state = forward(mixer, comm.to_rows(x), comm, state, docs)
    return comm.from_rows(y), {key: comm.latest(value) for key, value in new_state.items()}


def cp_token_loss(loss: torch.Tensor, mask: torch.Tensor, comm: CPGroup) -> torch.Tensor:
    """This rank's share of the masked token mean over the whole CP group: sum of its valid losses
    divided by the valid-token count of *all* ranks. Summed over ranks (as the data-parallel gradient
    all-reduce sums gradients) it is the global mean. A rank holding only padding contributes 0 with
    finite gradients, where a per-rank mean would be 0/0 = NaN (the Megatron failure issue 7 cites).
    Masked positions are selected out, not multiplied by 0, so a non-finite loss there cannot leak."""
    count = comm.all_reduce_sum_(mask.sum().to(loss.dtype).detach().clone())
    return torch.where(mask, loss, torch.zeros_like(loss)).sum() / count.clamp_min(1)


# ------------------------------------------------------------------------ one function per mixer


def _delta_qkv(mixer, x: torch.Tensor, comm: CPGroup, state: State, docs: Optional[SlotDocuments]):
    """`short_conv_qkv` with the three conv halos in one exchange."""
    projected = [getattr(mixer, f"{n}_proj")(x) for n in "qkv"]
    convs = [getattr(mixer, f"{n}_conv1d", None) for n in "qkv"]
    if convs[0] is None:
        return (*(F.silu(t) for t in projected), {})
    outs = conv_with_halo(comm, [(conv, t, None if state is None else state[f"conv_{n}"])
                                 for n, conv, t in zip("qkv", convs, projected)], docs)
    return (*(y for y, _ in outs), {f"conv_{n}": s for n, (_, s) in zip("qkv", outs)})


def _deltanet(m, x, comm, state, docs):
    """`DeltaNet` / `GatedDeltaNet.forward_segment` with the conv halo and the core under CP."""
    return m.forward_segment(x, state, qkv=lambda layer, t, s: _delta_qkv(layer, t, comm, s, docs),
                             rule=partial(delta_rule_heads_cp, comm, docs=docs))


def _mamba2(m: Mamba2, x, comm, state, docs):
    """`Mamba2.forward_segment` with the conv halo and the SSD scan under CP."""
    return m.forward_segment(x, state, conv=lambda conv, t, s: conv_with_halo(comm, [(conv, t, s)], docs)[0],
                             scan=partial(ssd_cp, comm, docs=docs))


def _rglru(m: RGLRUBlock, x, comm, state, docs):
    y = F.gelu(m.linear_y(x), approximate="tanh")
    [(xb, conv_state)] = conv_with_halo(comm, [(m.conv_1d, m.linear_x(x), None if state is None else state["conv"])],
                                        docs)
    lru = m.rg_lru  # `RGLRU.forward` with the scan under CP
    gate_x = block_diagonal_linear(xb, lru.input_gate_weight, lru.input_gate_bias)
    gate_a = block_diagonal_linear(xb, lru.recurrent_gate_weight, lru.recurrent_gate_bias)
    acc = torch.float64 if xb.dtype == torch.float64 else torch.float32
    xb, gate_x, gate_a, lam = (t.to(acc) for t in (xb, gate_x, gate_a, lru.recurrent_param))
    h, h_last = rglru_cp(comm, xb, gate_x, gate_a, lam, lru.c, None if state is None else state["rnn"].to(acc), docs)
    return m.linear_out(h.to(x.dtype) * y), {"conv": conv_state, "rnn": h_last}


CP_FORWARDS: dict[type, Callable] = {
    DeltaNet: _deltanet,
    GatedDeltaNet: _deltanet,
    Mamba2: _mamba2,
    RGLRUBlock: _rglru,
}
"""Mixer class -> its state-passing forward. Exact classes: a subclass (Hymba's SSD heads sit next
to attention) needs its own entry."""


def _cp_forward_of(mixer: Mixer) -> Callable:
    forward = CP_FORWARDS.get(type(mixer))
    if forward is None:
        supported = ", ".join(cls.__name__ for cls in CP_FORWARDS)
        raise NotImplementedError(
            f"{type(mixer).__name__}: no state-passing context parallelism (supported: {supported}); "
            "attention layers take Transformer Engine's CP in the megatron backend, or set parallel.cp=1")
    return forward


def _conv_halo(mixer: Mixer) -> int:
    """Tokens of halo the mixer's short convs need (kernel - 1; 0 without a conv)."""
    kernels = [mod.kernel for mod in mixer.modules() if isinstance(mod, ShortConv)]
    return max(kernels, default=1) - 1
