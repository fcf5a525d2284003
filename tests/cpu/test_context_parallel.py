"""State-passing context parallelism (issue 7): for DeltaNet, GDN, Mamba2 and the RG-LRU block (whole
modules, short-conv halos included), a sequence split over CP ranks == the same module on the whole
sequence, in float64 at rel err <= 1e-10, for the output, the final state and the gradients of the
input, the incoming state and every parameter:
- simulated CP (all ranks in one process), CP = 2 and 4, contiguous and zigzag layouts;
- real ranks over gloo: 4 spawned processes, CP over all 4 and over a 2-rank subgroup, both layouts
  (the all-gather's backward collective included);
- packed documents (`seq_idx`): the same comparisons against the unsplit module with the same
  `seq_idx` (the base class's packed path, itself == each document run on its own: checked here on
  these rows by `check_packing`), on rows whose documents cross slot boundaries, start exactly on
  one, share a slot, span whole slots and leave a conv halo that straddles a boundary
  (`test_packed_rows_cover_the_cases` checks the rows do that for every layout);
- a rank holding only padding gives a finite loss and finite gradients equal to the unsplit ones,
  where a per-rank mean would be NaN;
- one-line errors for lengths that do not divide into the CP slots."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megahybrid.config import (ConfigError, DeltaNetConfig, GatedDeltaNetConfig, Mamba2Config, ModelConfig,
                               RGLRUConfig, load_config)
from megahybrid.mixers.attention import Attention
from megahybrid.mixers.deltanet import DeltaNet
from megahybrid.mixers.gated_deltanet import GatedDeltaNet
from megahybrid.mixers.mamba2 import Mamba2
from megahybrid.mixers.rglru import RGLRUBlock
from megahybrid.parallel import DistributedCP, SimulatedCP, cp_token_loss, forward_cp
from tests.helpers import assert_close
from tests.mixer_checks import check_packing

F64 = torch.float64
HIDDEN, B, T = 16, 2, 48  # T / 8 = 6 tokens per zigzag slot at CP=4, >= the conv halo of 3
RTOL = 1e-10

CONFIGS = {
    # dk 8, dv 12, output gate and conv on
    "deltanet": lambda: DeltaNet(ModelConfig(hidden_size=HIDDEN, deltanet=DeltaNetConfig(
        num_heads=2, head_dim=8, expand_v=1.5, conv_kernel=4, chunk_size=8))),
    # grouped value heads (2 q/k heads, 4 v heads), dk 8 != dv 6
    "gdn": lambda: GatedDeltaNet(ModelConfig(hidden_size=HIDDEN, gdn=GatedDeltaNetConfig(
        num_qk_heads=2, num_v_heads=4, qk_head_dim=8, v_head_dim=6, conv_kernel=4, chunk_size=8))),
    # 8 heads of 4 channels, 2 B/C groups, N 6
    "mamba2": lambda: Mamba2(ModelConfig(hidden_size=HIDDEN, mamba2=Mamba2Config(
        state_size=6, head_dim=4, num_groups=2, expand=2, conv_kernel=4, chunk_size=8))),
    "rglru": lambda: RGLRUBlock(ModelConfig(hidden_size=HIDDEN, rglru=RGLRUConfig(width=24, num_heads=4))),
}
KEEP_INIT = ("A_log", "dt_bias", "recurrent_param")
"""Decay parameters keep their realistic init ranges; everything else is N(0, 0.3)."""


def build(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    module = CONFIGS[name]().double()
    with torch.no_grad():
        for pname, p in module.named_parameters():
            if pname.split(".")[-1] not in KEEP_INIT:
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "norm" in pname else 0.0))
    return module


def inputs(module, with_state: bool, seed: int = 1):
    """x [B, T, hidden], an incoming state (from a short warm-up run) or None, and random cotangents
    for the output and every final-state entry."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=gen, dtype=F64)  # noqa: E731
    x = rand(B, T, HIDDEN)
    with torch.no_grad():
        _, state = module(rand(B, 5, HIDDEN))
    dy = rand(B, T, HIDDEN)
    dstate = {k: rand(*v.shape) for k, v in state.items()}
    return x, (state if with_state else None), dy, dstate


PACKED_ROWS = (
    # on slot boundaries 12 and 24 (every layout here), 2 short documents just before 24, several
    # documents in the first slot, and [34, 48) spanning whole slots with a halo (33-35) that straddles 34
    (5, 2, 5, 1, 9, 1, 1, 10, 14),
    None,  # random lengths (seeded)
    # [0, 20) spans slots; [23, 48) crosses 24 with a halo (21-23) straddling 23 and spans [24, 48)
    (20, 3, 25),
)
"""Document lengths of each packed row (T tokens each)."""


def packed_rows() -> list[list[int]]:
    gen = torch.Generator().manual_seed(7)
    rows = []
    for lengths in PACKED_ROWS:
        if lengths is None:
            lengths, left = [], T
            while left:
                lengths.append(min(left, int(torch.randint(1, 16, (1,), generator=gen))))
                left -= lengths[-1]
        rows.append(list(lengths))
    return rows


def packed_seq_idx() -> torch.Tensor:
    """`[len(PACKED_ROWS), T]` document ids of `packed_rows()`."""
    return torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in packed_rows()])


def packed_inputs(module, with_state: bool, seed: int = 2):
    """`inputs` for the packed rows: x [rows, T, hidden], state, cotangents, seq_idx [rows, T]."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=gen, dtype=F64)  # noqa: E731
    rows = len(PACKED_ROWS)
    x = rand(rows, T, HIDDEN)
    with torch.no_grad():
        _, state = module(rand(rows, 5, HIDDEN))
    dy = rand(rows, T, HIDDEN)
    dstate = {k: rand(*v.shape) for k, v in state.items()}
    return x, (state if with_state else None), dy, dstate, packed_seq_idx()


def leaves(x, state):
    x = x.clone().requires_grad_()
    state = None if state is None else {k: v.clone().requires_grad_() for k, v in state.items()}
    return x, state


def grads_of(loss, module, x, state) -> dict:
    named = {"x": x, **{f"state[{k}]": v for k, v in (state or {}).items()},
             **{f"param {n}": p for n, p in module.named_parameters()}}
    found = torch.autograd.grad(loss, list(named.values()), allow_unused=True)
    return {n: torch.zeros_like(t) if g is None else g for (n, t), g in zip(named.items(), found)}


def reference(module, x, state, dy, dstate, seq_idx=None):
    """The whole sequence in one call: (y, final state, grads)."""
    x, state = leaves(x, state)
    y, final = module(x, state, seq_idx)
    loss = (y * dy).sum() + sum((final[k] * dstate[k]).sum() for k in final)
    return y.detach(), {k: v.detach() for k, v in final.items()}, grads_of(loss, module, x, state)


def cp_loss(y_local, final_local, comm, dy, dstate, last_rank: bool):
    """The reference's loss on this rank's share: its outputs, plus the final state where it lives."""
    loss = (y_local * comm.shard(dy)).sum()
    if last_rank:
        loss = loss + sum((final_local[k] * dstate[k]).sum() for k in dstate)
    return loss


# ---------------------------------------------------------------------- simulated ranks


def check_cp_equals_whole(name: str, cp: int, layout: str, with_state: bool, packed: bool = False,
                          forward=forward_cp, rtol: float = RTOL) -> dict:
    """`forward(mixer, x_local, comm, state, seq_idx_local)` under `SimulatedCP(cp, layout)` == the unsplit
    module (`packed`: rows of several documents): outputs, the final state (the last document's) and the
    gradients of the input, the incoming state and every parameter. Returns the module, its inputs and
    the reference results for further checks."""
    module = build(name)
    if packed:
        x, state, dy, dstate, seq_idx = packed_inputs(module, with_state)
    else:
        (x, state, dy, dstate), seq_idx = inputs(module, with_state), None
    y_ref, final_ref, grads_ref = reference(module, x, state, dy, dstate, seq_idx)

    comm = SimulatedCP(cp, layout)
    x, state = leaves(x, state)
    y_local, end_local = forward(module, comm.shard(x), comm, state, None if seq_idx is None else comm.shard(seq_idx))
    final = {k: v.unflatten(0, (cp, -1))[comm.last_slot_rank] for k, v in end_local.items()}
    grads = grads_of(cp_loss(y_local, final, comm, dy, dstate, last_rank=True), module, x, state)

    assert_close("y", y_ref, comm.unshard(y_local), rtol)
    assert final.keys() == final_ref.keys()
    for k in final_ref:
        assert_close(f"final state[{k}]", final_ref[k], final[k], rtol)
    for n in grads_ref:
        assert_close(f"d {n}", grads_ref[n], grads[n], rtol)
    return {"module": module, "x": x.detach(), "state": state, "y": y_ref, "final": final_ref}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("cp,layout,with_state", [
    (2, "contiguous", False), (4, "contiguous", False), (4, "contiguous", True),
    (2, "zigzag", True), (4, "zigzag", False),
], ids=lambda v: str(v))
def test_simulated_equals_whole(name, cp, layout, with_state):
    check_cp_equals_whole(name, cp, layout, with_state)


def test_slot_end_states_are_the_states_at_slot_boundaries():
    """Every rank's returned state == the state after running the prefix up to its slot's end."""
    module = build("gdn")
    x, _, _, _ = inputs(module, with_state=False)
    comm = SimulatedCP(4)
    with torch.no_grad():
        _, ends = forward_cp(module, comm.shard(x), comm)
        for r in range(4):
            _, prefix = module(x[:, :(r + 1) * T // 4])
            for k in prefix:
                assert_close(f"rank {r} state[{k}]", prefix[k], ends[k].unflatten(0, (4, B))[r], RTOL)


# ---------------------------------------------------------------------- packed documents


@pytest.mark.parametrize("cp,layout", [(2, "contiguous"), (4, "contiguous"), (2, "zigzag"), (4, "zigzag")])
def test_packed_rows_cover_the_cases(cp, layout):
    """The packed rows exercise every case at every slot size used: a document starting exactly on a
    slot boundary, one crossing a boundary, one spanning a whole slot, a slot holding several
    starts, and a conv halo (last 3 tokens of a slot) that holds a document start."""
    slot = T // SimulatedCP(cp, layout).num_slots
    starts = [set(torch.cumsum(torch.tensor([0] + r[:-1]), 0).tolist()) for r in packed_rows()]
    bounds = range(slot, T, slot)
    assert any(b in s for s in starts for b in bounds), "no document starts on a slot boundary"
    assert any(b not in s for s in starts for b in bounds), "no document crosses a slot boundary"
    assert any(not s & set(range(c, c + slot)) for s in starts for c in bounds), "no slot inside one document"
    assert any(len(s & set(range(c, c + slot))) > 1 for s in starts for c in range(0, T, slot)), \
        "no slot with several document starts"
    assert any(b not in s and s & {b - 2, b - 1} for s in starts for b in bounds), "no halo straddling a start"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_packed_reference_is_documents_run_alone(name):
    """The oracle of the packed CP tests on these rows: the unsplit module with `seq_idx` == each
    document on its own (from the row's incoming state for its first document, else from None)."""
    module = build(name)
    x, state, _, _, _ = packed_inputs(module, with_state=True)
    with torch.no_grad():
        check_packing(module, x, packed_rows(), RTOL, state)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("cp,layout,with_state", [
    (2, "contiguous", False), (4, "contiguous", True), (2, "zigzag", True), (4, "zigzag", False),
], ids=lambda v: str(v))
def test_packed_simulated_equals_whole(name, cp, layout, with_state):
    """Packed rows under CP == the unsplit module with the same `seq_idx`: outputs, final state (the
    last document's) and the gradients of the input, the incoming state and every parameter."""
    check_cp_equals_whole(name, cp, layout, with_state, packed=True)


@pytest.mark.parametrize("name", ["gdn", "rglru"])
def test_packed_slot_end_states(name):
    """Every rank's returned state == the unsplit packed module's state after its slot's last token
    (the state of the document that token is in)."""
    module = build(name)
    x, state, _, _, seq_idx = packed_inputs(module, with_state=True)
    comm = SimulatedCP(4)
    with torch.no_grad():
        _, ends = forward_cp(module, comm.shard(x), comm, state, seq_idx=comm.shard(seq_idx))
        for r in range(4):
            end = (r + 1) * T // 4
            _, prefix = module(x[:, :end], state, seq_idx[:, :end])
            for k in prefix:
                assert_close(f"rank {r} state[{k}]", prefix[k], ends[k].unflatten(0, (4, -1))[r], RTOL)


# ---------------------------------------------------------------------- padding-only rank


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("pad_rank", [0, 3])
def test_padding_only_rank_is_finite(name, pad_rank):
    """CP=4 with one rank's tokens all padding (zero embeddings, loss mask 0): the CP token-mean loss and
    its gradients are finite and equal the unsplit masked mean; a per-rank mean would be 0/0."""
    module = build(name)
    x, _, dy, _ = inputs(module, with_state=False)
    mask = torch.ones(B, T, dtype=torch.bool)
    pad = slice(pad_rank * T // 4, (pad_rank + 1) * T // 4)
    x[:, pad], mask[:, pad] = 0.0, False

    def token_loss(y, dy):
        return (y * dy).sum(-1)

    x_ref, _ = leaves(x, None)
    y, _ = module(x_ref)
    loss_ref = token_loss(y, dy)[mask].mean()
    grads_ref = grads_of(loss_ref, module, x_ref, None)

    comm = SimulatedCP(4)
    x_cp, _ = leaves(x, None)
    y_local, _ = forward_cp(module, comm.shard(x_cp), comm)
    per_token, mask_local = token_loss(y_local, comm.shard(dy)), comm.shard(mask)
    loss = cp_token_loss(per_token, mask_local, comm)
    grads = grads_of(loss, module, x_cp, None)

    assert torch.isfinite(loss)
    assert_close("loss", loss_ref, loss, RTOL)
    for n in grads_ref:
        assert_close(f"d {n}", grads_ref[n], grads[n], RTOL)
    per_rank_mean = [(l[m]).mean() for l, m in zip(per_token.unflatten(0, (4, B)), mask_local.unflatten(0, (4, B)))]
    assert torch.isnan(per_rank_mean[pad_rank]), "the hazard this loss avoids: a per-rank mean of no tokens"


# ---------------------------------------------------------------------- real ranks (gloo)


def _check_ranks(group, layouts: tuple[str, ...], checks: list) -> None:
    """This process as one rank of `group`: every mixer and layout, one document per row and packed
    rows, CP == the whole sequence computed
    locally. Parameter and incoming-state gradients are summed over the group's ranks (as the gradient
    all-reduce would); the comparisons are appended to `checks` and run after every collective."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    for layout, name, packed in [(lo, n, p) for lo in layouts for n in CONFIGS for p in (False, True)]:
        module = build(name)
        if packed:
            x, state, dy, dstate, seq_idx = packed_inputs(module, with_state=True)
        else:
            (x, state, dy, dstate), seq_idx = inputs(module, with_state=True), None
        y_ref, final_ref, grads_ref = reference(module, x, state, dy, dstate, seq_idx)
        comm = DistributedCP(group, layout=layout)
        x_local = comm.shard(x).requires_grad_()
        _, state = leaves(x, state)  # passed on every rank; only the first slot's holder reads it
        y_local, end = forward_cp(module, x_local, comm, state,
                                  seq_idx=None if seq_idx is None else comm.shard(seq_idx))
        last = rank == comm.last_slot_rank
        grads = grads_of(cp_loss(y_local, end, comm, dy, dstate, last), module, x_local, state)
        where = f"[{name} {layout}{' packed' if packed else ''} rank {rank}/{world}]"
        checks += [(f"{where} y", comm.shard(y_ref), y_local),
                   (f"{where} dx", comm.shard(grads_ref["x"]), grads["x"])]
        checks += [(f"{where} final state[{k}]", final_ref[k], end[k]) for k in final_ref if last]
        for n in grads_ref:
            if n != "x":
                dist.all_reduce(grads[n], group=group)
                checks.append((f"{where} d {n}", grads_ref[n], grads[n]))

    # the last rank holds only padding: finite loss and gradients, equal to the unsplit masked mean
    module = build("gdn")
    x, _, dy, _ = inputs(module, with_state=False)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[:, T - T // world:], x[:, T - T // world:] = False, 0.0
    x_ref, _ = leaves(x, None)
    y, _ = module(x_ref)
    loss_ref = (y * dy).sum(-1)[mask].mean()
    grads_ref = grads_of(loss_ref, module, x_ref, None)
    comm = DistributedCP(group)
    x_local = comm.shard(x).requires_grad_()
    y_local, _ = forward_cp(module, x_local, comm)
    loss = cp_token_loss((y_local * comm.shard(dy)).sum(-1), comm.shard(mask), comm)
    grads = grads_of(loss, module, x_local, None)
    total = loss.detach().clone()
    dist.all_reduce(total, group=group)
    where = f"[padding on the last rank, rank {rank}/{world}]"
    checks += [(f"{where} loss", loss_ref.detach(), total),
               (f"{where} dx", comm.shard(grads_ref["x"]), grads["x"])]
    for n in grads_ref:
        if n != "x":
            dist.all_reduce(grads[n], group=group)
            checks.append((f"{where} d {n}", grads_ref[n], grads[n]))


def _gloo_worker(rank: int, init_file: str) -> None:
    """4 processes: CP over all 4 (the default group), then over ranks {0, 1} (an explicit subgroup).
    Checks run only after every collective, so a mismatch on one rank fails with its own message
    instead of leaving the others waiting."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=4)
    checks = []  # (name, reference, result)
    try:
        _check_ranks(None, ("contiguous", "zigzag"), checks)
        pair = dist.new_group([0, 1])  # every process must take part in creating it
        if rank < 2:
            _check_ranks(pair, ("contiguous", "zigzag"), checks)
    finally:
        dist.destroy_process_group()
    for name, ref, out in checks:
        assert_close(name, ref, out, RTOL)  # also fails on NaN/Inf


def test_gloo_ranks_equal_whole():
    """CP over 4 and over 2 real processes (gloo) == one process, both layouts, one document per row
    and packed rows."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_gloo_worker, args=(os.path.join(tmp, "rendezvous"),), nprocs=4)


# ---------------------------------------------------------------------- errors


def test_length_errors():
    comm = SimulatedCP(4)
    with pytest.raises(ConfigError, match=r"sequence length=45: must be divisible by 4 .*parallel\.cp=4.*pad .* to 48"):
        comm.shard(torch.zeros(1, 45, HIDDEN))
    with pytest.raises(ConfigError, match=r"sequence length=44: must be divisible by 8 .*zigzag.*48"):
        SimulatedCP(4, "zigzag").shard(torch.zeros(1, 44, HIDDEN))
    with pytest.raises(ConfigError, match=r"2 tokens per CP slot, fewer than the short conv's halo of conv_kernel-1=3"):
        forward_cp(build("mamba2"), comm.shard(torch.zeros(1, 8, HIDDEN, dtype=F64)), comm)
    with pytest.raises(ConfigError, match=r"train\.seq_len=100: must be divisible by 8 \(parallel\.cp=4, "
                                          r"cp_layout='zigzag'.*use 104"):
        load_config(None, ["parallel.cp=4", "parallel.cp_layout=zigzag", "train.seq_len=100"])
    with pytest.raises(ValueError, match=r"seq_idx shape \(1, 6\) must equal x's \[batch, seq\] \(4, 12\)"):
        forward_cp(build("gdn"), comm.shard(torch.zeros(1, 48, HIDDEN, dtype=F64)), comm,
                   seq_idx=torch.zeros(1, 6, dtype=torch.long))
    attention = Attention(ModelConfig(hidden_size=HIDDEN))
    with pytest.raises(NotImplementedError, match="Attention: no state-passing context parallelism"):
        forward_cp(attention, comm.shard(torch.zeros(1, 8, HIDDEN)), comm)
