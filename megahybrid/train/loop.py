"""The step loop: AdamW, warmup + cosine/WSD, clipping, accumulation, validation, checkpoints,
NaN skipping and preemption. Everything a step does is in `train_step`; `train` is the schedule
around it (log, evaluate, save, stop).

Resume is exact: batches are a function of the step (data/loader.py), the learning rate is a
function of the step, and a checkpoint holds everything else (weights, optimizer moments, RNG,
NaN-skip streak), so a run killed at any point and re-run continues bit for bit.
"""

from __future__ import annotations

import math
import signal
import threading
from pathlib import Path

import torch
import torch.nn.functional as F

from megahybrid import flops
from megahybrid.parallel.model import cp_lm_loss
from megahybrid.train import checkpoint
from megahybrid.train.dist import Dist, unwrap
from megahybrid.train.metrics import Metrics


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. a streak of non-finite losses); the message says what to do."""


class Preemption:
    """SIGTERM / SIGUSR1 (Slurm's warning signals) only set a flag: the loop finishes the step,
    checkpoints, prints "preempted" and exits 0, so a requeued job resumes where it stopped."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.requested, self._previous = False, {}

    def _handle(self, signum, frame):
        self.requested = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def lr_at(step: int, t) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup to train.lr, then cosine
    to train.min_lr, WSD (constant, then linear decay over the last decay_fraction of steps;
    Hu et al. 2024, MiniCPM), or constant."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.schedule == "constant":
        return t.lr
    if t.schedule == "wsd":
        decay_steps = max(1, round(t.decay_fraction * t.steps))
        into_decay = step - (t.steps - decay_steps)
        return t.lr if into_decay < 0 else t.lr + (t.min_lr - t.lr) * min(1.0, (into_decay + 1) / decay_steps)
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, t) -> torch.optim.AdamW:
    """AdamW; matrices decay, while vectors (norm gains, biases, SSM A/D/dt) do not."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in params if p.ndim >= 2 and not n.endswith(".bias")]
    no_decay = [p for n, p in params if not (p.ndim >= 2 and not n.endswith(".bias"))]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps)


def _loss(model, batch, dist: Dist) -> torch.Tensor:
    if dist.cp is not None:  # this rank's CP slots of every sequence; its share of the loss (dist.py)
        tokens, labels, seq_idx = (None if t is None else dist.cp.shard(t)
                                   for t in (batch.tokens, batch.labels, batch.seq_idx))
        with dist.autocast():
            logits = model(tokens, seq_idx=seq_idx)
        return cp_lm_loss(logits, labels, dist.cp) * dist.loss_scale
    with dist.autocast():
        logits = model(batch.tokens, seq_idx=batch.seq_idx)
    return F.cross_entropy(logits.float().flatten(0, 1), batch.labels.flatten())


def train_step(model, optimizer, data, step: int, lr: float, t, dist: Dist):
    """One optimizer step over global_batch_size sequences: returns (loss, aux_loss, grad_norm),
    or a reason string when the step was skipped (non-finite loss or gradient)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    accum = t.global_batch_size // (t.micro_batch_size * dist.dp_world)
    sums = torch.zeros(2, device=dist.device)
    for micro in range(accum):
        batch = data.train_batch(step, micro, dist.dp_rank, dist.dp_world).to(dist.device)
        if micro == 0 and hasattr(unwrap(model), "set_is_first_microbatch"):
            unwrap(model).set_is_first_microbatch()  # Megatron/TE FP8: re-cast the updated weights once per step
        with dist.no_sync(model, sync=micro == accum - 1):
            loss = _loss(model, batch, dist)
            aux = unwrap(model).aux_loss().float() * dist.loss_scale
            ((loss + aux) / accum).backward()
        sums += torch.stack([loss.detach(), aux.detach()])
    loss, aux = (dist.mean(sums) / accum).tolist()
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip if t.grad_clip > 0 else math.inf))
    if not all(math.isfinite(x) for x in (loss, aux, grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        return f"non-finite loss={loss} aux_loss={aux} grad_norm={grad_norm}"
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, aux, grad_norm


@torch.no_grad()
def evaluate(model, data, t, dist: Dist) -> float:
    """Mean loss over the same eval_batches validation micro-batches every time."""
    model.eval()
    total = torch.zeros((), device=dist.device)
    for i in range(t.eval_batches):
        total += _loss(model, data.valid_batch(i, dist.dp_rank, dist.dp_world).to(dist.device), dist)
    model.train()
    return float(dist.mean(total / t.eval_batches))


def train(config, model: torch.nn.Module, data, run_dir: Path, dist: Dist) -> int:
    """Train `model` (already on dist.device) to config.train.steps, resuming from the newest
    valid checkpoint in RUN/checkpoints. Returns the exit code (0: finished or preempted)."""
    t = config.train
    say = print if dist.is_main else (lambda *a, **k: None)
    optimizer = build_optimizer(model, t)
    ckpt_root = run_dir / "checkpoints"
    found = checkpoint.find_latest(ckpt_root, warn=None if dist.is_main else (lambda msg: None))
    meta = {"step": 0, "elapsed": 0.0, "bad_steps": 0}
    if found:
        path, meta = found
        checkpoint.restore(path, model, optimizer, dist.device)
        changed = checkpoint.config_changes(path, config)
        say(f"resumed from {path} (step {meta['step']})"
            + (f"; config changed since: {', '.join(changed)}" if changed else ""), flush=True)
    start, bad = meta["step"], meta["bad_steps"]
    if start >= t.steps:
        say(f"already trained {start}/{t.steps} steps; nothing to do")
        return 0
    tokens_per_step = t.global_batch_size * t.seq_len
    peak = flops.peak_flops(torch.cuda.get_device_name(dist.device)) if dist.device.type == "cuda" else None
    metrics = Metrics(run_dir, start, t.steps, tokens_per_step, meta["elapsed"],
                      flops.model_flops_per_token(config, t.seq_len), peak and peak * dist.world, dist.is_main)
    ddp = dist.wrap(model)

    def save(step: int) -> None:
        if dist.is_main:
            bad_params = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
            if bad_params:  # never write a checkpoint that would poison every resume
                raise TrainingError(f"parameters {bad_params[:3]} are not finite at step {step}; not saving. "
                                    f"Resume from an earlier checkpoint in {ckpt_root} with a lower train.lr")
            checkpoint.save(ckpt_root, step, model, optimizer, config,
                            {"tokens": step * tokens_per_step, "elapsed": metrics.elapsed(), "bad_steps": bad},
                            t.keep_last)
        dist.barrier()

    try:
        with Preemption() as preempt:
            for step in range(start, t.steps):
                done = step + 1
                lr = lr_at(step, t)
                result = train_step(ddp, optimizer, data, step, lr, t, dist)
                if isinstance(result, str):
                    bad += 1
                    metrics.skipped(done, result, bad, t.max_bad_steps)
                    if bad >= max(1, t.max_bad_steps):
                        raise TrainingError(f"{bad} steps in a row had a non-finite loss (last: step {done}, "
                                            f"{result}); lower train.lr or check the data. The last good "
                                            f"checkpoint is in {ckpt_root}")
                else:
                    bad = 0
                    evaluate_now = data.valid is not None and t.eval_every > 0 and (
                        done % t.eval_every == 0 or done == t.steps)
                    if evaluate_now or done % max(1, t.log_every) == 0 or done == t.steps:
                        valid = evaluate(unwrap(ddp), data, t, dist) if evaluate_now else None
                        metrics.log(done, result[0], lr, result[2], result[1], valid)
                stop = dist.any(preempt.requested)
                if stop or done == t.steps or (t.save_every > 0 and done % t.save_every == 0):
                    save(done)
                if stop:
                    say(f"preempted: checkpoint at step {done} in {ckpt_root}; re-run the same command to resume",
                        flush=True)
                    return 0
    finally:
        metrics.close()
    say(f"done: {t.steps} steps in {metrics.elapsed():.0f}s; checkpoint in {ckpt_root}")
    return 0
