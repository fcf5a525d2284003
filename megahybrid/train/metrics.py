"""Training metrics: a console line per log step, `RUN/metrics.jsonl` and TensorBoard events.

metrics.jsonl holds one JSON object per logged step: step, loss, lr, grad_norm, aux_loss, tokens,
tokens_per_s, elapsed (seconds of training, summed over restarts), mfu (only where the device's
peak FLOP/s is known), and valid_loss / valid_ppl on evaluation steps. A step skipped for a
non-finite loss gets its own line with "skipped" (the reason) and loss null. On resume the file
is cut back to the checkpoint's step, so it ends up equal to an uninterrupted run's; TensorBoard's
`purge_step` does the same for the event files.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional

from torch.utils.tensorboard import SummaryWriter


def truncate(path: Path, step: int) -> None:
    """Keep only the lines of metrics.jsonl with step <= `step` (drops a torn last line too)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            break
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept))
    tmp.replace(path)


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Metrics:
    """Written by rank 0 only; other ranks get a Metrics whose methods do nothing."""

    def __init__(self, run_dir: Path, start_step: int, total_steps: int, tokens_per_step: int,
                 elapsed: float, flops_per_token: Optional[float], peak_flops: Optional[float], enabled: bool):
        self.enabled, self.total_steps, self.tokens_per_step = enabled, total_steps, tokens_per_step
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.base_elapsed, self.start = elapsed, time.perf_counter()
        self.last_step, self.last_time = start_step, self.start
        if not enabled:
            return
        self.path = run_dir / "metrics.jsonl"
        truncate(self.path, start_step)
        self.file = open(self.path, "a")
        self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1)

    def elapsed(self) -> float:
        return self.base_elapsed + time.perf_counter() - self.start

    def _write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def log(self, step: int, loss: float, lr: float, grad_norm: float, aux_loss: float,
            valid_loss: Optional[float] = None) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        tokens_per_s = (step - self.last_step) * self.tokens_per_step / max(now - self.last_time, 1e-9)
        self.last_step, self.last_time = step, now
        record = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "aux_loss": aux_loss,
                  "tokens": step * self.tokens_per_step, "tokens_per_s": round(tokens_per_s, 1),
                  "elapsed": round(self.elapsed(), 3)}
        if self.flops_per_token and self.peak_flops:
            record["mfu"] = round(3 * self.flops_per_token * tokens_per_s / self.peak_flops, 5)
        if valid_loss is not None:
            record["valid_loss"] = valid_loss
            record["valid_ppl"] = math.exp(min(valid_loss, 700.0))
        self._write(record)
        for key, value in record.items():
            if key != "step":
                self.tb.add_scalar(f"train/{key}" if not key.startswith("valid") else f"valid/{key[6:]}", value, step)
        eta = (self.total_steps - step) * self.tokens_per_step / max(tokens_per_s, 1e-9)
        line = (f"step {step:>{len(str(self.total_steps))}}/{self.total_steps}  loss {loss:.4f}  "
                f"lr {lr:.2e}  gnorm {grad_norm:.3f}  {tokens_per_s / 1e3:.1f}k tok/s")
        if aux_loss:
            line += f"  aux {aux_loss:.4f}"
        if "mfu" in record:
            line += f"  mfu {100 * record['mfu']:.1f}%"
        if valid_loss is not None:
            line += f"  valid {valid_loss:.4f} (ppl {record['valid_ppl']:.1f})"
        print(f"{line}  elapsed {_clock(self.elapsed())}  eta {_clock(eta)}", flush=True)

    def skipped(self, step: int, reason: str, in_a_row: int, limit: int) -> None:
        if not self.enabled:
            return
        self._write({"step": step, "loss": None, "skipped": reason, "tokens": step * self.tokens_per_step,
                     "tokens_per_s": 0.0, "elapsed": round(self.elapsed(), 3)})
        print(f"step {step}: skipped ({reason}); {in_a_row} in a row, abort at {limit}", flush=True)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.tb.close()
