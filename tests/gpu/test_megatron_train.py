"""`megahybrid train train.backend=megatron` under model-parallel layouts (GPU, marker `gpu`; each case
skips below its GPU count; `bash tests/gpu/run_megatron.sh train`).

A tiny attention + MoE model (no Triton mixers, so a fresh machine compiles nothing but TE's own
kernels) trains on the embedded corpus through `megatron_loop`: the loss falls, metrics.jsonl is
written, and a second run of the same command with more steps resumes from the Megatron distributed
checkpoint (model + optimizer) and continues. The same run under TP2 + SP and under PP2 logs the same
first loss as one GPU (same weights from the same seed are not guaranteed across layouts - Megatron
initialises each shard from its own RNG stream - so only the one-GPU first loss of an untrained model,
~ln(vocab), is compared, loosely).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu

ARGS = ["model.pattern=*E*E", "model.hidden_size=64", "model.attention.num_heads=4", "model.attention.num_kv_heads=2",
        "model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.ffn_hidden_size=64", "model.vocab_size=512",
        "model.max_seq_len=128", "train.backend=megatron", "train.seq_len=64", "train.micro_batch_size=2",
        "train.global_batch_size=8", "train.lr=3e-3", "train.warmup_steps=2", "train.log_every=2",
        "train.eval_every=0", "train.save_every=8", "data.corpus_bytes=400000"]
CASES = {  # name: (GPUs, overrides)
    "recompute_1gpu": (1, ["parallel.recompute=full"]),
    "tp2_sp": (2, ["parallel.tp=2", "parallel.sequence_parallel=true"]),
    "pp2": (2, ["parallel.pp=2"]),
    "ep2_distopt": (2, ["parallel.ep=2", "parallel.distributed_optimizer=true"]),
}


def _train(run: Path, gpus: int, overrides: list[str], steps: int) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={gpus}", "--standalone",
           "-m", "megahybrid", "train", "--out", str(run), *ARGS, *overrides, f"train.steps={steps}"]
    env = {**os.environ, "PYTHONPATH": f"{Path(__file__).parents[2]}:{os.environ.get('PYTHONPATH', '')}"}
    log = run.parent / f"{run.name}.log"
    with open(log, "a") as f:
        code = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=300).returncode
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / f"train_{run.name}.log").write_text(log.read_text())
    assert code == 0, log.read_text()[-4000:]
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", list(CASES))
def test_megatron_loop_trains_and_resumes(tmp_path, name):
    gpus, overrides = CASES[name]
    if torch.cuda.device_count() < gpus:
        pytest.skip(f"{name} needs {gpus} GPUs; this machine has {torch.cuda.device_count()}")
    run = tmp_path / name
    first = _train(run, gpus, overrides, 16)
    losses = [r["loss"] for r in first if r.get("loss") is not None]
    print(f"megatron loop {name}: loss {losses[0]:.3f} -> {losses[-1]:.3f} over 16 steps")
    assert abs(losses[0] - math.log(512)) < 1.0  # an untrained model's loss
    assert losses[-1] < losses[0] - 0.5
    assert (run / "checkpoints" / "step_00000016" / "meta.json").is_file()
    resumed = _train(run, gpus, overrides, 20)
    steps = [r["step"] for r in resumed]
    assert steps == sorted(steps) and steps[-1] == 20 and 16 in steps  # the first 16 kept, continued to 20
    assert "resumed from" in (tmp_path / f"{name}.log").read_text()
    assert resumed[-1]["loss"] < losses[0] - 0.5
