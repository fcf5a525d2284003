"""The one place that knows about devices, precision and torch.distributed.

One process: rank 0 of world 1, nothing initialised. Under `torchrun` (RANK / WORLD_SIZE /
LOCAL_RANK in the environment): a process group (NCCL on GPU, gloo on CPU), one GPU per local
rank, the model wrapped in DistributedDataParallel, batches sharded by rank (`Data.train_batch`).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from torch.nn.parallel import DistributedDataParallel

from megahybrid.config import ConfigError


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    dtype: torch.dtype
    """Autocast dtype of the forward (float32 = no autocast)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
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
    return model.module if isinstance(model, DistributedDataParallel) else model


def setup(train) -> Dist:
    """Device, dtype and process group from `config.train` and the torchrun environment."""
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
    if world > 1:
        torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
        per_step = train.micro_batch_size * world
        if train.global_batch_size % per_step:
            raise ConfigError(f"train.global_batch_size={train.global_batch_size}: must be a multiple of "
                              f"train.micro_batch_size * data-parallel size = {per_step}")
    return Dist(rank, world, local_rank, device, dtype)
