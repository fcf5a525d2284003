"""The one place that knows about devices, precision and torch.distributed.

One process: rank 0 of world 1, nothing initialised. Under `torchrun` (RANK / WORLD_SIZE /
LOCAL_RANK in the environment): a process group (NCCL on GPU, gloo on CPU), one GPU per local
rank, the model wrapped in DistributedDataParallel, batches sharded by rank (`Data.train_batch`).

Context parallelism (`parallel.cp` > 1, reference backend): consecutive ranks form a CP group
(ranks dp*cp .. dp*cp+cp-1, Megatron's order with tp = 1), all ranks of a group read the same
sequences (data-parallel rank = rank // cp) and each runs its CP slots of them (`ContextParallelLM`,
megahybrid/parallel/model.py). DDP still all-reduces gradients over the whole world: a rank's loss is
its share of its group's loss times cp (`loss_scale`), so DDP's mean over dp*cp ranks is the mean over
the dp groups, as at cp = 1.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as torch_dist
from torch.nn.parallel import DistributedDataParallel

from megahybrid.config import ConfigError
from megahybrid.parallel import ContextParallelLM, CPGroup, DistributedCP


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    dtype: torch.dtype
    """Autocast dtype of the forward (float32 = no autocast)."""
    cp: Optional[CPGroup] = None
    """This rank's context-parallel group (None: parallel.cp = 1)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def cp_size(self) -> int:
        return 1 if self.cp is None else self.cp.size

    @property
    def dp_rank(self) -> int:
        """Which sequences this rank reads: every rank of a CP group reads the same."""
        return self.rank // self.cp_size

    @property
    def dp_world(self) -> int:
        return self.world // self.cp_size

    @property
    def loss_scale(self) -> float:
        """A CP rank's loss share times cp: DDP and `mean` average over all dp*cp ranks, and the shares
        of one CP group sum to its loss."""
        return float(self.cp_size)

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.cp is not None:
            model = ContextParallelLM(model, self.cp)
        if self.world == 1:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def no_sync(self, model, sync: bool):
        """Skip the gradient all-reduce on all but the last micro-batch of a step."""
        if self.world == 1 or sync:
            return contextlib.nullcontext()
        return model.no_sync()

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """Average of `x` over ranks (a copy; `x` itself is unchanged)."""
        x = x.detach().clone()
        if self.world > 1:
            torch_dist.all_reduce(x, op=torch_dist.ReduceOp.SUM)
            x /= self.world
        return x

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any rank."""
        if self.world == 1:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
        return bool(t.item())

    def broadcast(self, obj):
        """Rank 0's `obj` (any picklable value made by this program), on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        torch_dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            torch_dist.barrier()

    def close(self) -> None:
        if self.world > 1 and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module DDP wraps (under CP: the `ContextParallelLM`, whose `.model` is the model)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def setup(train, parallel=None) -> Dist:
    """Device, dtype, process group and CP group from `config.train`, `config.parallel` and the torchrun
    environment."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if train.threads:
        torch.set_num_threads(train.threads)
    name = train.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device={train.device!r}: no CUDA device is visible; use train.device=cpu")
        device = torch.device("cuda", local_rank if name == "cuda" else torch.device(name).index)
        torch.cuda.set_device(device)
    else:
        device = torch.device(name)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(train.dtype)
    if dtype is None:  # auto
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cp = 1 if parallel is None else parallel.cp
    if world % cp:
        raise ConfigError(f"parallel.cp={cp}: must divide the number of processes ({world}); launch a multiple "
                          f"of {cp} processes (torchrun --nproc-per-node) or change parallel.cp")
    model_parallel = cp if parallel is None else cp * parallel.tp * parallel.pp  # EP lives inside DP
    if world % model_parallel:
        raise ConfigError(f"parallel: tp x pp x cp = {model_parallel} must divide the number of processes ({world}); "
                          f"launch a multiple of {model_parallel} processes or change the layout")
    cp_group = None
    if world > 1:
        torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
        per_step = train.micro_batch_size * (world // model_parallel)
        if train.global_batch_size % per_step:
            raise ConfigError(f"train.global_batch_size={train.global_batch_size}: must be a multiple of "
                              f"train.micro_batch_size * data-parallel size = {per_step}")
        if cp > 1:
            for first in range(0, world, cp):  # every rank takes part in creating every group
                group = torch_dist.new_group(list(range(first, first + cp)))
                if first <= rank < first + cp:
                    cp_group = DistributedCP(group, parallel.cp_layout)
    return Dist(rank, world, local_rank, device, dtype, cp_group)
