"""CP groups: which tokens a rank holds, and the one collective state passing needs.

A sequence of T tokens is cut into `num_slots` equal *slots* in time order (the chain); a rank
holds `slots_per_rank` of them. Contiguous: rank r holds slot r. Zigzag (Transformer Engine's
load-balanced attention layout, FLA's `layout='zigzag'`): rank r holds slots r and 2R-1-r, stored
one after the other along the sequence dim, so slot order on a rank is (front, back).

Inside a mixer a rank's slots become separate batch rows ("rows": `[slots_per_rank * B, T/num_slots,
...]`, slot-major), so a recurrence runs each slot from its own incoming state. Two implementations
of the same three primitives let the state-passing code run unchanged:

- `all_gather(t)`: every rank's rows -> `[num_slots, B, ...]` in chain order (autograd-aware);
- `own(t)`: `[num_slots, B, ...]` in chain order -> this rank's rows;
- `all_reduce_sum_(t)`: a sum over ranks, without autograd (token counts for the loss).

`SimulatedCP(size)` keeps every rank in one process: the local batch is every rank's batch stacked
(rank-major), the all-gather a reshape. `DistributedCP(group)` is one rank of a real process group
(gloo on CPU, NCCL on GPU); its all-gather (`AllGather`) has a backward that sums each rank's
gradient for a gathered tensor back onto the rank that sent it (reduce-scatter on NCCL, all-reduce
on gloo). No module-level process-group state: the group object is passed explicitly (style.md).
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.distributed as dist

from megahybrid.config import ConfigError

Layout = Literal["contiguous", "zigzag"]


def check_cp_length(seq_len: int, cp: int, layout: Layout = "contiguous", min_slot: int = 1) -> None:
    """Raise `ConfigError` unless `seq_len` tokens split into equal CP slots of >= `min_slot` tokens
    (`min_slot` = conv_kernel - 1: a rank's conv halo comes from the one slot before it)."""
    parts = cp * (2 if layout == "zigzag" else 1)
    what = f"parallel.cp={cp}" + (" x 2 zigzag halves" if layout == "zigzag" else "")
    if seq_len % parts:
        up = -(-seq_len // parts) * parts
        raise ConfigError(
            f"sequence length={seq_len}: must be divisible by {parts} ({what}; every CP slot holds an "
            f"equal contiguous piece); pad the batch to {up} tokens or set train.seq_len to a multiple of "
            f"{parts}, or change parallel.cp")
    if seq_len // parts < min_slot:
        raise ConfigError(
            f"sequence length={seq_len}: {what} leaves {seq_len // parts} tokens per CP slot, fewer than "
            f"the short conv's halo of conv_kernel-1={min_slot}; lower parallel.cp or lengthen the sequence")


class CPGroup:
    """Slot bookkeeping shared by both implementations; see the module docstring."""

    size: int
    layout: Layout
    row_factor: int
    """Rows this process holds per sequence of the batch: slots_per_rank (times size when simulated)."""

    def _init_layout(self, size: int, layout: Layout) -> None:
        if layout not in ("contiguous", "zigzag"):
            raise ConfigError(f"cp layout={layout!r}: expected 'contiguous' or 'zigzag'")
        if size < 1:
            raise ConfigError(f"parallel.cp={size}: must be >= 1")
        self.size, self.layout = size, layout
        self.slots_per_rank = 2 if layout == "zigzag" else 1
        self.num_slots = size * self.slots_per_rank
        # rank_order[i] = chain slot of the i-th (rank, local slot) pair, ranks outermost.
        self.rank_order = torch.tensor([self.chain_slot(r, j) for r in range(size)
                                        for j in range(self.slots_per_rank)])
        self.chain_order = torch.argsort(self.rank_order)

    def chain_slot(self, rank: int, j: int) -> int:
        """Position in time of the `j`-th slot held by `rank`."""
        return rank if j == 0 else 2 * self.size - 1 - rank

    @property
    def last_slot_rank(self) -> int:
        """The rank holding the sequence's last tokens (its returned state is the final one)."""
        return self.size - 1 if self.layout == "contiguous" else 0

    # ------------------------------------------------------------------ layout <-> rows

    def to_rows(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's tokens `[B, n*S, ...]` (its slots one after another) -> rows `[n*B, S, ...]`."""
        return x.unflatten(1, (self.slots_per_rank, -1)).movedim(1, 0).flatten(0, 1)

    def from_rows(self, y: torch.Tensor) -> torch.Tensor:
        """Inverse of `to_rows`."""
        return y.unflatten(0, (self.slots_per_rank, -1)).movedim(0, 1).flatten(1, 2)

    def latest(self, t: torch.Tensor) -> torch.Tensor:
        """Rows -> the rows of this rank's latest slot (the state a rank returns)."""
        return t.unflatten(0, (self.slots_per_rank, -1))[-1]

    # ------------------------------------------------------------------ collectives

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's rows `[n*B, ...]` -> every slot's rows in chain order `[num_slots, B, ...]`."""
        by_rank = self._gather_ranks(t.contiguous())  # [size, n, B, ...]
        return by_rank.flatten(0, 1)[self.chain_order.to(t.device)]

    def own(self, t: torch.Tensor) -> torch.Tensor:
        """`[num_slots, B, ...]` in chain order -> this rank's rows `[n*B, ...]`."""
        by_rank = t[self.rank_order.to(t.device)].unflatten(0, (self.size, self.slots_per_rank))
        return self._own_rows(by_rank)

    def first_slot(self, t: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        """This process's rows of: `t` (`[B, ...]`, the whole sequence's incoming value) on the chain's
        first slot, zeros on every other slot. `t=None` means zeros; `like` (rows) gives shape and dtype.
        Only the first slot's holder reads `t`, so other ranks may pass None."""
        zero = like.new_zeros(like.shape[0] // self.row_factor, *like.shape[1:])
        t = zero if t is None else t.to(like.dtype)
        return self.own(torch.stack([t] + [zero] * (self.num_slots - 1)))

    def is_first_slot(self, rows: int, device=None) -> torch.Tensor:
        """Bool `[rows]`: which of this rank's rows hold the chain's first slot."""
        like = torch.zeros(rows, device=device)
        return self.first_slot(torch.ones(rows // self.row_factor, device=device), like=like) > 0

    # ------------------------------------------------------------------ whole sequence <-> shards

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """A whole batch `[B, T, ...]` -> this process's tokens `[B, n*T/num_slots, ...]` (simulated:
        every rank's, stacked rank-major on the batch, `[size*B, ...]`). Differentiable."""
        check_cp_length(x.shape[1], self.size, self.layout)
        slots = x.unflatten(1, (self.num_slots, -1))[:, self.rank_order.to(x.device)]  # rank order
        by_rank = slots.unflatten(1, (self.size, self.slots_per_rank)).movedim(1, 0)  # [size, B, n, S, ...]
        return self._own_batch(by_rank).flatten(1, 2)

    def unshard(self, y: torch.Tensor) -> torch.Tensor:
        """Inverse of `shard` on every rank (no autograd; for tests and evaluation)."""
        by_rank = self._all_ranks_nograd(y).unflatten(2, (self.slots_per_rank, -1))  # [size, B, n, S, ...]
        slots = by_rank.movedim(0, 1).flatten(1, 2)  # [B, size*n, S, ...] in rank order
        return slots[:, self.chain_order.to(y.device)].flatten(1, 2)

    # implementation hooks
    def _gather_ranks(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _own_rows(self, by_rank: torch.Tensor) -> torch.Tensor:
        """`[size, n, B, ...]` -> this process's rows."""
        raise NotImplementedError

    def _own_batch(self, by_rank: torch.Tensor) -> torch.Tensor:
        """`[size, B, ...]` -> this process's batch."""
        raise NotImplementedError

    def _all_ranks_nograd(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def all_reduce_sum_(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class SimulatedCP(CPGroup):
    """Every rank of a CP group in one process. Local tensors hold all ranks: batch rows are
    rank-major (`shard` gives `[size*B, ...]`; rows inside a mixer are `[n, size, B]`-major), and the
    all-gather is a reshape, so the same state-passing code runs as on real ranks."""

    def __init__(self, size: int, layout: Layout = "contiguous"):
        self._init_layout(size, layout)
        self.row_factor = size * self.slots_per_rank

    def _gather_ranks(self, t):
        return t.unflatten(0, (self.slots_per_rank, self.size, -1)).transpose(0, 1)

    def _own_rows(self, by_rank):
        return by_rank.transpose(0, 1).flatten(0, 2)

    def _own_batch(self, by_rank):
        return by_rank.flatten(0, 1)

    def _all_ranks_nograd(self, t):
        return t.unflatten(0, (self.size, -1))

    def all_reduce_sum_(self, t):
        return t  # a local tensor already sums over every rank's rows


class DistributedCP(CPGroup):
    """One rank of a real CP process group (`group=None`: the default group)."""

    def __init__(self, group: Optional[dist.ProcessGroup] = None, layout: Layout = "contiguous"):
        self.group = group
        self.rank = dist.get_rank(group)
        self._init_layout(dist.get_world_size(group), layout)
        self.row_factor = self.slots_per_rank

    def _gather_ranks(self, t):
        return AllGather.apply(t, self.group).unflatten(1, (self.slots_per_rank, -1))

    def _own_rows(self, by_rank):
        return by_rank[self.rank].flatten(0, 1)

    def _own_batch(self, by_rank):
        return by_rank[self.rank]

    def _all_ranks_nograd(self, t):
        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t.detach().contiguous(), group=self.group)
        return torch.stack(parts)

    def all_reduce_sum_(self, t):
        dist.all_reduce(t, group=self.group)
        return t


class AllGather(torch.autograd.Function):
    """`t` of every rank of `group`, stacked `[size, ...]`; backward: the sum over ranks of the gradient of
    this rank's part. Not `torch.distributed.nn.functional.all_gather`: its gloo backward emulates
    all-to-all with `dist.scatter(src=<group rank>)`, which torch (2.11) reads as a global rank, so it
    fails ("Global rank 2 is not part of group") on any group not made of ranks 0..size-1, e.g. the
    second CP group of a CP x DP layout. Gloo has no reduce-scatter; an all-reduce of the gathered
    gradient moves size times more than needed, fine for CPU tests."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, group: Optional[dist.ProcessGroup]):
        ctx.group = group
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, t.contiguous(), group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone(memory_format=torch.contiguous_format)
        rank = dist.get_rank(ctx.group)
        if dist.get_backend(ctx.group) == dist.Backend.NCCL:
            out = torch.empty_like(grad[rank])
            dist.reduce_scatter_tensor(out, grad, group=ctx.group)
            return out, None
        dist.all_reduce(grad, group=ctx.group)
        return grad[rank], None
