"""One training step of the Megatron backend under any TP / SP / PP (+VPP) / EP / DP layout, with
Megatron-Core's own machinery rather than ours, so a layout behaves as it does in Megatron-LM:

    model chunks (build_megatron_chunks: this rank's pipeline stages)
      -> Megatron `DistributedDataParallel` (contiguous fp32 grad buffers; dense grads averaged over
         data parallel, expert grads over expert-data parallel, both scaled by 1 / dp)
      -> the schedule `get_forward_backward_func()` picks: no pipelining, 1F1B, or interleaved 1F1B
      -> `finalize_model_grads` (DP reduce, SP layer-norm grads over TP, tied embedding over the
         first and last stage)
      -> `get_megatron_optimizer` (Adam; the distributed optimizer shards its state over DP when
         parallel.distributed_optimizer).

The loss of one micro-batch is the mean token cross-entropy (MoE aux losses reach the gradients
through Megatron's MoEAuxLossAutoScaler); the schedule divides it by the number of micro-batches and
DDP averages over data parallel, so a step's gradient is that of the mean over all micro-batches of
the global batch - what the reference backend computes for the same micro-batches.

    trainer = MegatronTrainer(config, Precision(torch.bfloat16))
    loss = trainer.forward_backward(micro_batches)   # this DP rank's [(tokens, labels[, seq_idx]), ...]
    trainer.optimizer_step(lr)
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch

from megahybrid.config import Config, ConfigError
from megahybrid.megatron.model import build_megatron_chunks
from megahybrid.megatron.transformer_config import Precision


class MegatronTrainer:
    """This rank's model chunks wrapped for training (module docstring)."""

    def __init__(self, config: Config, precision: Optional[Precision] = None, optimizer: bool = True):
        from megatron.core import parallel_state
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads

        self.config = config
        p = config.parallel
        self.chunks = build_megatron_chunks(config, precision)
        self.tc = self.chunks[0].config
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                   use_distributed_optimizer=p.distributed_optimizer)
        self.model = [DistributedDataParallel(config=chunk.config, ddp_config=ddp_config, module=chunk,
                                              disable_bucketing=i > 0)  # as Megatron-LM's get_model
                      for i, chunk in enumerate(self.chunks)]
        for chunk in self.model:
            chunk.broadcast_params()  # data-parallel replicas start identical
        self.tc.finalize_model_grads_func = finalize_model_grads
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.is_last_stage = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        self.optimizer = self._optimizer() if optimizer else None

    def _optimizer(self):
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        t, p = self.config.train, self.config.parallel
        bf16 = self.tc.params_dtype == torch.bfloat16
        cfg = OptimizerConfig(optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay,
                              adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_eps=t.adam_eps,
                              clip_grad=t.grad_clip or 0.0, bf16=bf16, params_dtype=self.tc.params_dtype,
                              use_distributed_optimizer=p.distributed_optimizer)
        return get_megatron_optimizer(cfg, self.model)

    def zero_grad(self) -> None:
        for chunk in self.model:
            chunk.zero_grad_buffer()
        if self.optimizer is not None:
            self.optimizer.zero_grad()

    def forward_backward(self, micro_batches: list, forward_only: bool = False) -> Optional[torch.Tensor]:
        """Run this DP rank's micro-batches `[(tokens [b, T], labels [b, T][, seq_idx [b, T]]), ...]` (CUDA tensors)
        through the pipeline; gradients land in the DDP buffers (`param.main_grad`), finalised.
        Returns the mean loss over the micro-batches on the last pipeline stage (None elsewhere)."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        if not micro_batches:
            raise ConfigError("MegatronTrainer.forward_backward: no micro-batches")
        b, T = micro_batches[0][0].shape
        vpp = len(self.model)
        if vpp > 1 and len(micro_batches) % self.config.parallel.pp:
            raise ConfigError(f"parallel.vpp={vpp}: Megatron's interleaved schedule needs the number of "
                              f"micro-batches per step ({len(micro_batches)}) to be a multiple of parallel.pp="
                              f"{self.config.parallel.pp}; change train.global_batch_size")
        self.zero_grad()
        for chunk in self.chunks:
            chunk.set_is_first_microbatch()  # TE re-casts FP8 weights once per step
        iterators = [iter(micro_batches) for _ in range(vpp)]
        losses = get_forward_backward_func()(
            forward_step_func=_forward_step, data_iterator=iterators if vpp > 1 else iterators[0],
            model=self.model if vpp > 1 else self.model[0], num_microbatches=len(micro_batches),
            seq_length=T, micro_batch_size=b, forward_only=forward_only)
        if not self.is_last_stage:
            return None
        return torch.stack([x["lm loss"] for x in losses]).mean()

    def optimizer_step(self, lr: Optional[float] = None) -> tuple[bool, float]:
        """One optimizer step at `lr` (None: the configured train.lr). Returns (updated, grad norm)."""
        if lr is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        updated, grad_norm, _ = self.optimizer.step()
        return updated, float(grad_norm or 0.0)

    def sharded_state_dict(self) -> dict:
        """All chunks' Megatron `sharded_state_dict` in one dict (keys are global, so the chunks'
        entries do not collide)."""
        return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(self.chunks)}

    def load(self, checkpoint_dir) -> None:
        """Weights from a Megatron dist checkpoint of any layout (e.g. `megahybrid convert --to megatron`)."""
        from megatron.core import dist_checkpointing

        loaded = dist_checkpointing.load(self.sharded_state_dict(), str(checkpoint_dir))
        for i, chunk in enumerate(self.chunks):
            chunk.load_state_dict(loaded[f"model{i}"], strict=True)
        if self.optimizer is not None:  # fp32 main copies of bf16 weights follow the new weights
            self.optimizer.reload_model_params()


def _forward_step(data_iterator: Iterable, model):
    """Megatron's forward_step_func: one micro-batch `(tokens, labels[, seq_idx])` through this chunk;
    the loss on the last stage."""
    tokens, labels, *rest = next(data_iterator)
    output = model(tokens, seq_idx=rest[0] if rest else None, labels=labels)

    def loss_func(per_token: torch.Tensor):
        loss = per_token.float().mean()
        return loss, {"lm loss": loss.detach().clone()}  # the schedule divides `loss` in place

    return output, loss_func
