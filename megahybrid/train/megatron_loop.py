"""`megahybrid train train.backend=megatron` under model parallelism: tensor (+ sequence), pipeline
(+ virtual), expert parallelism, the distributed optimizer or activation recompute.

The step is Megatron's own (`megatron/step.py`: DDP, its pipeline schedules, finalize_model_grads, its
optimizer with clipping); the schedule around it is the reference loop's, so the two backends train
the same way: the same learning-rate function `lr_at`, the same batches (a batch is a function of
(step, micro-batch, data-parallel rank), data-parallel rank and size being Megatron's), the same
metrics file and log line, SIGTERM/SIGUSR1 preemption, skipping a step whose loss is not finite.

Checkpoints `RUN/checkpoints/step_00000100/` are Megatron distributed checkpoints (model and
optimizer; every rank writes its shard; the model part loads at another layout, e.g. through
`megahybrid convert`), plus `config.yaml` and `meta.json`. Rank 0 writes meta.json into a temporary
directory after every rank has finished, then renames the directory into place, so a directory with
meta.json is complete. The model has no dropout and batches depend only on the step, so no RNG state
is saved. Only the newest `train.keep_last` are kept.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Optional

import torch

from megahybrid import flops
from megahybrid.train.checkpoint import config_yaml
from megahybrid.train.loop import Preemption, TrainingError, lr_at
from megahybrid.train.metrics import Metrics

META = "meta.json"


def uses_megatron_loop(config) -> bool:
    """True when `megahybrid train` must run this loop rather than the reference loop."""
    p = config.parallel
    return config.train.backend == "megatron" and bool(
        p.tp > 1 or p.pp > 1 or p.ep > 1 or p.vpp or p.sequence_parallel or p.distributed_optimizer
        or p.recompute != "none")


def _micro_batches(data, step: int, accum: int, dp_rank: int, dp: int, device, valid: bool = False):
    out = []
    for i in range(accum):
        b = (data.valid_batch(i, dp_rank, dp) if valid else data.train_batch(step, i, dp_rank, dp)).to(device)
        out.append((b.tokens, b.labels, b.seq_idx))
    return out


def _dp_mean(value: torch.Tensor) -> torch.Tensor:
    """`value` averaged over this rank's data-parallel group (in place)."""
    from megatron.core import parallel_state as ps

    if ps.get_data_parallel_world_size() > 1:
        torch.distributed.all_reduce(value, group=ps.get_data_parallel_group())
        value /= ps.get_data_parallel_world_size()
    return value


def _on_every_rank(loss: Optional[torch.Tensor], device) -> float:
    """The last pipeline stage's loss, averaged over data parallelism, on every rank."""
    from megatron.core import parallel_state as ps

    value = torch.zeros((), device=device) if loss is None else _dp_mean(loss.detach().float().clone())
    if ps.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.broadcast(value, src=ps.get_pipeline_model_parallel_last_rank(),
                                    group=ps.get_pipeline_model_parallel_group())
    return float(value)


def _aux_loss(trainer, device) -> float:
    """MoE aux losses of the last micro-batch, summed over pipeline stages, averaged over DP."""
    from megatron.core import parallel_state as ps

    value = sum((chunk.aux_loss() for chunk in trainer.chunks), torch.zeros((), device=device)).float()
    if ps.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.all_reduce(value, group=ps.get_pipeline_model_parallel_group())
    return float(_dp_mean(value))


# -------------------------------------------------------------------------------- checkpoints


def find_latest(root: Path) -> Optional[tuple[Path, dict]]:
    """The newest complete checkpoint (one with meta.json) and its meta."""
    done = sorted(p for p in root.glob("step_*") if (p / META).is_file()) if root.is_dir() else []
    return (done[-1], json.loads((done[-1] / META).read_text())) if done else None


def _state(trainer, loading: bool) -> dict:
    model = trainer.sharded_state_dict()
    return {"model": model, "optimizer": trainer.optimizer.sharded_state_dict(model, is_loading=loading)}


def save(root: Path, step: int, trainer, config, meta: dict, keep_last: int, is_main: bool) -> Path:
    from megatron.core import dist_checkpointing

    path, tmp = root / f"step_{step:08d}", root / f".tmp_step_{step:08d}"
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    torch.distributed.barrier()
    dist_checkpointing.save(_state(trainer, loading=False), str(tmp))
    torch.distributed.barrier()
    if is_main:
        (tmp / "config.yaml").write_text(config_yaml(config))
        (tmp / META).write_text(json.dumps({"step": step, **meta}, indent=1))
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
        for old in sorted(p for p in root.glob("step_*") if (p / META).is_file())[:-max(1, keep_last)]:
            shutil.rmtree(old, ignore_errors=True)
    torch.distributed.barrier()
    return path


def restore(path: Path, trainer) -> None:
    from megatron.core import dist_checkpointing

    loaded = dist_checkpointing.load(_state(trainer, loading=True), str(path))
    for i, chunk in enumerate(trainer.chunks):
        chunk.load_state_dict(loaded["model"][f"model{i}"], strict=True)
    trainer.optimizer.load_state_dict(loaded["optimizer"])


# ----------------------------------------------------------------------------------- the loop


def train(config, data, run_dir: Path, dist) -> int:
    """Train to config.train.steps under config.parallel, resuming from the newest checkpoint."""
    from megatron.core import parallel_state as ps

    from megahybrid.megatron.step import MegatronTrainer
    from megahybrid.megatron.transformer_config import Precision

    t = config.train
    say = print if dist.is_main else (lambda *a, **k: None)
    trainer = MegatronTrainer(config, Precision(dist.dtype))
    dp_rank, dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    accum = t.global_batch_size // (t.micro_batch_size * dp)
    params = sum(p.numel() for chunk in trainer.chunks for p in chunk.parameters())
    say(f"model (megatron): {params / 1e6:.2f}M parameters on rank 0 of tp {ps.get_tensor_model_parallel_world_size()}"
        f" x pp {ps.get_pipeline_model_parallel_world_size()} x dp {dp} (ep {ps.get_expert_model_parallel_world_size()})"
        f"; {accum} micro-batches per step", flush=True)
    root = run_dir / "checkpoints"
    meta = {"elapsed": 0.0, "bad_steps": 0}
    start = 0
    found = find_latest(root)
    if found:
        restore(found[0], trainer)
        start, meta = found[1]["step"], found[1]
        say(f"resumed from {found[0]} (step {start})", flush=True)
    if start >= t.steps:
        say(f"already trained {start}/{t.steps} steps; nothing to do")
        return 0
    tokens_per_step = t.global_batch_size * t.seq_len
    peak = flops.peak_flops(torch.cuda.get_device_name(dist.device))
    metrics = Metrics(run_dir, start, t.steps, tokens_per_step, meta["elapsed"],
                      flops.model_flops_per_token(config, t.seq_len), peak and peak * dist.world, dist.is_main)
    bad = meta["bad_steps"]

    def checkpoint(step: int) -> None:
        save(root, step, trainer, config, {"tokens": step * tokens_per_step, "elapsed": metrics.elapsed(),
                                           "bad_steps": bad}, t.keep_last, dist.is_main)

    def evaluate() -> float:
        for chunk in trainer.model:
            chunk.eval()
        with torch.no_grad():
            loss = trainer.forward_backward(_micro_batches(data, 0, t.eval_batches, dp_rank, dp, dist.device, True),
                                            forward_only=True)
        for chunk in trainer.model:
            chunk.train()
        return _on_every_rank(loss, dist.device)

    try:
        with Preemption() as preempt:
            for step in range(start, t.steps):
                done, lr = step + 1, lr_at(step, t)
                loss = _on_every_rank(trainer.forward_backward(
                    _micro_batches(data, step, accum, dp_rank, dp, dist.device)), dist.device)
                if not math.isfinite(loss):
                    bad += 1
                    metrics.skipped(done, f"non-finite loss={loss}", bad, t.max_bad_steps)
                    if bad >= max(1, t.max_bad_steps):
                        raise TrainingError(f"{bad} steps in a row had a non-finite loss (last: step {done}); "
                                            f"lower train.lr or check the data. The last good checkpoint is in {root}")
                else:
                    bad = 0
                    _, grad_norm = trainer.optimizer_step(lr)
                    if not math.isfinite(grad_norm):  # Megatron's optimizer has stepped already
                        raise TrainingError(f"step {done}: gradient norm {grad_norm} with a finite loss; the weights "
                                            f"are no longer usable. Resume from {root} with a lower train.lr")
                    evaluate_now = data.valid is not None and t.eval_every > 0 and (
                        done % t.eval_every == 0 or done == t.steps)
                    if evaluate_now or done % max(1, t.log_every) == 0 or done == t.steps:
                        metrics.log(done, loss, lr, grad_norm, _aux_loss(trainer, dist.device),
                                    evaluate() if evaluate_now else None)
                stop = dist.any(preempt.requested)
                if stop or done == t.steps or (t.save_every > 0 and done % t.save_every == 0):
                    checkpoint(done)
                if stop:
                    say(f"preempted: checkpoint at step {done} in {root}; re-run the same command to resume", flush=True)
                    return 0
    finally:
        metrics.close()
    say(f"done: {t.steps} steps in {metrics.elapsed():.0f}s; checkpoint in {root}")
    return 0
