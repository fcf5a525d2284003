"""The training loop: exact resume after SIGKILL, preemption, checkpoint fallback, NaN handling,
one-line errors for bad inputs, and the loss falling on the embedded corpus.

Runs use the tiny default preset (Mamba2 + GDN + attention + MoE, 0.17M parameters), 1 thread
per process and a 300 KB slice of the embedded corpus; subprocesses only where a process must die.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import megahybrid
from megahybrid.cli import main
from megahybrid.data.indexed import write as write_dataset
from megahybrid.data.loader import Data
from megahybrid.data.prepare import prepare
from megahybrid.train import checkpoint, loop
from megahybrid.train.dist import setup
from megahybrid.train.run import train_from_cli

ROOT = Path(__file__).resolve().parents[2]
TINY = ["model.vocab_size=512", "train.seq_len=32", "train.micro_batch_size=2", "train.global_batch_size=4",
        "train.threads=1", "train.log_every=1", "train.warmup_steps=2", "data.valid_fraction=0.2",
        "train.eval_batches=2"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    prefix, tok = prepare([], str(tmp_path_factory.mktemp("data") / "stdlib"), None, 512, corpus_bytes=300_000)
    return [f"data.paths=[{prefix}]", f"data.tokenizer={tok}"]


@pytest.fixture(autouse=True)
def keep_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def trajectory(run_dir: Path) -> list[tuple]:
    """Everything in metrics.jsonl that must not depend on interruptions (not the timings)."""
    return [(r["step"], r["loss"], r.get("lr"), r.get("grad_norm"), r.get("aux_loss"), r.get("valid_loss"))
            for r in records(run_dir)]


def spawn(run_dir: Path, args: list[str]) -> subprocess.Popen:
    log = open(f"{run_dir}.log", "a")
    return subprocess.Popen([sys.executable, "-m", "megahybrid", "train", "--config", "default:tiny",
                             "--out", str(run_dir), *args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not any(r["step"] >= step for r in records(run_dir)):
        assert proc.poll() is None, f"run exited early: {Path(f'{run_dir}.log').read_text()[-2000:]}"
        assert time.time() < deadline, f"no step {step} within {timeout}s"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory):
    """An uninterrupted 16-step run, started once and shared (it runs beside the other runs)."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    args = [*TINY, *dataset, "train.steps=16", "train.save_every=4", "train.eval_every=8"]
    proc = spawn(run_dir, args)

    def result():
        assert proc.wait(timeout=300) == 0, Path(f"{run_dir}.log").read_text()[-3000:]
        return trajectory(run_dir)

    yield args, result
    proc.kill()


def test_sigkill_at_a_random_step_then_rerun_equals_an_uninterrupted_run(reference, tmp_path):
    args, expected = reference
    run_dir = tmp_path / "run"
    kill_at = random.Random().randint(5, 14)  # after the first checkpoint (step 4), before the end
    proc = spawn(run_dir, args)
    wait_for_step(run_dir, kill_at, proc)
    proc.kill()
    proc.wait()
    assert spawn(run_dir, args).wait(timeout=300) == 0, Path(f"{run_dir}.log").read_text()[-3000:]
    got = trajectory(run_dir)
    assert [r[0] for r in got] == list(range(1, 17))
    assert got == expected(), f"killed after step {kill_at}: the resumed run diverged"
    assert any(r[5] is not None for r in got), "validation ran"
    assert not list((run_dir / "checkpoints").glob(".*")), "no temporary checkpoint dirs are left behind"


def test_sigterm_checkpoints_says_preempted_exits_0_and_resumes(reference, tmp_path):
    args, expected = reference
    run_dir = tmp_path / "run"
    proc = spawn(run_dir, args)
    wait_for_step(run_dir, 5, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    log = Path(f"{run_dir}.log").read_text()
    assert "preempted" in log and "Traceback" not in log
    stopped = records(run_dir)[-1]["step"]
    assert stopped < 16 and (run_dir / "checkpoints" / f"step_{stopped:08d}").is_dir()
    checkpoint.verify(run_dir / "checkpoints" / f"step_{stopped:08d}")
    assert spawn(run_dir, args).wait(timeout=300) == 0
    assert f"resumed from {run_dir}/checkpoints/step_{stopped:08d}" in Path(f"{run_dir}.log").read_text()
    assert trajectory(run_dir) == expected()


def test_corrupt_newest_checkpoint_warns_and_falls_back(dataset, tmp_path, capsys):
    # constant lr after warmup: extending train.steps then leaves the first 6 steps unchanged
    args = [*TINY, *dataset, "train.save_every=2", "train.eval_every=0", "train.schedule=constant"]
    assert train_from_cli("default:tiny", str(tmp_path), [*args, "train.steps=6"]) == 0
    first = trajectory(tmp_path)
    newest = tmp_path / "checkpoints" / "step_00000006"
    weights = newest / checkpoint.MODEL
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a torn write
    capsys.readouterr()
    assert train_from_cli("default:tiny", str(tmp_path), [*args, "train.steps=8"]) == 0
    out, err = capsys.readouterr()
    assert f"checkpoint {newest} is unusable" in err and "truncated" in err
    assert f"resumed from {tmp_path}/checkpoints/step_00000004" in out
    again = trajectory(tmp_path)
    assert [r[0] for r in again] == list(range(1, 9))
    assert again[:6] == first, "steps 5-6 recomputed from step 4 must match the first run"
    checkpoint.verify(newest)  # rewritten, valid again
    assert [p.name for p in checkpoint.checkpoints(tmp_path / "checkpoints")] == [
        "step_00000008", "step_00000006", "step_00000004"]  # keep_last=3


class Faulty(torch.nn.Module):
    """A real model whose forward returns NaN on chosen calls, or raises SIGUSR1 on one call."""

    def __init__(self, inner, nan_calls=(), signal_call=None):
        super().__init__()
        self.inner, self.nan_calls, self.signal_call, self.calls = inner, set(nan_calls), signal_call, 0

    def forward(self, tokens, seq_idx=None):
        self.calls += 1
        if self.calls == self.signal_call:
            os.kill(os.getpid(), signal.SIGUSR1)
        logits = self.inner(tokens, seq_idx=seq_idx)
        return logits * math.nan if self.calls in self.nan_calls else logits

    def aux_loss(self):
        return self.inner.aux_loss()


def run_loop(tmp_path, dataset, overrides, **faults) -> int:
    config = megahybrid.load_config("default:tiny", [*TINY, *dataset, "train.eval_every=0", *overrides])
    torch.manual_seed(config.train.seed)
    model = Faulty(megahybrid.build_model(config), **faults)
    return loop.train(config, model, Data(config, [config.data.paths[0]]), tmp_path, setup(config.train))


def test_nan_steps_are_skipped_then_training_goes_on(dataset, tmp_path):
    # 2 micro-batches a step: forward calls 5-8 are steps 3 and 4.
    assert run_loop(tmp_path, dataset, ["train.steps=6", "train.save_every=3", "train.max_bad_steps=3"],
                    nan_calls=range(5, 9)) == 0
    recs = records(tmp_path)
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] is None for r in recs] == [False, False, True, True, False, False]
    assert "non-finite" in recs[2]["skipped"]
    weights = load_file(tmp_path / "checkpoints" / "step_00000003" / checkpoint.MODEL)
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_a_streak_of_nan_steps_aborts_with_a_clear_message(dataset, tmp_path):
    with pytest.raises(loop.TrainingError) as err:
        run_loop(tmp_path, dataset, ["train.steps=10", "train.save_every=2", "train.max_bad_steps=3"],
                 nan_calls=range(5, 100))
    msg = str(err.value)
    assert "3 steps in a row had a non-finite loss (last: step 5" in msg and "train.lr" in msg and "\n" not in msg
    for path in checkpoint.checkpoints(tmp_path / "checkpoints"):
        assert all(torch.isfinite(w).all() for w in load_file(path / checkpoint.MODEL).values())


def test_sigusr1_finishes_the_step_and_checkpoints(dataset, tmp_path, capsys):
    assert run_loop(tmp_path, dataset, ["train.steps=10", "train.save_every=0"], signal_call=5) == 0
    assert "preempted: checkpoint at step 3" in capsys.readouterr().out
    assert [p.name for p in checkpoint.checkpoints(tmp_path / "checkpoints")] == ["step_00000003"]


@pytest.mark.parametrize("case", ["missing data", "empty data", "sequence longer than the data",
                                  "vocab mismatch", "missing tokenizer", "unwritable out dir"])
def test_bad_inputs_give_one_line_errors(case, dataset, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    write_dataset(tmp_path / "empty", [], 512)
    out, overrides = tmp_path / "run", [*TINY, *dataset]
    expect = {"missing data": ([f"data.paths=[{tmp_path}/nothing]"], "data.paths[0]="),
              "empty data": ([f"data.paths=[{tmp_path}/empty]"], "empty"),
              "sequence longer than the data": (["train.seq_len=200000"], "fewer than one sequence"),
              "vocab mismatch": (["model.vocab_size=300"], "model.vocab_size=300"),
              "missing tokenizer": ([f"data.tokenizer={tmp_path}/none.json"], "data.tokenizer="),
              "unwritable out dir": ([], "--out=")}[case]
    if case == "unwritable out dir":
        out = tmp_path / "file" / "run"  # a regular file as parent directory: fails even as root
    assert main(["train", "--config", "default:tiny", "--out", str(out), *overrides, *expect[0]]) == 2
    err = capsys.readouterr().err.strip()
    assert expect[1] in err and len(err.splitlines()) == 1, err


def test_lr_schedules():
    t = megahybrid.load_config("default:tiny", ["train.steps=100", "train.warmup_steps=10", "train.lr=1.0",
                                                "train.min_lr=0.1"]).train
    assert loop.lr_at(0, t) == pytest.approx(0.1) and loop.lr_at(9, t) == pytest.approx(1.0)
    assert loop.lr_at(99, t) == pytest.approx(0.1, abs=1e-3)
    cosine = [loop.lr_at(s, t) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(cosine, cosine[1:]))
    t.schedule, t.decay_fraction = "wsd", 0.2
    assert loop.lr_at(50, t) == 1.0 and loop.lr_at(79, t) == 1.0
    assert loop.lr_at(90, t) == pytest.approx(1.0 - 0.9 * 11 / 20) and loop.lr_at(99, t) == pytest.approx(0.1)


def test_norms_biases_and_vectors_get_no_weight_decay():
    config = megahybrid.load_config("default:tiny", ["model.vocab_size=512"])
    model = megahybrid.build_model(config)
    decay, no_decay = loop.build_optimizer(model, config.train).param_groups
    assert decay["weight_decay"] == config.train.weight_decay and no_decay["weight_decay"] == 0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_loss_falls_on_the_embedded_corpus_and_checkpoint_loads(tmp_path):
    args = ["model.vocab_size=512", "data.corpus_bytes=1000000", "train.steps=60", "train.seq_len=64",
            "train.micro_batch_size=8", "train.global_batch_size=8", "train.warmup_steps=10",
            "train.log_every=1", "train.eval_every=30", "train.threads=2", "data.valid_fraction=0.1"]
    assert train_from_cli("default:tiny", str(tmp_path), args) == 0
    recs = records(tmp_path)
    first, last = recs[0]["loss"], sum(r["loss"] for r in recs[-5:]) / 5
    assert first > 6.0 and last < first - 1.2, (first, last)  # from ~ln(512) = 6.24
    assert {"step", "loss", "lr", "grad_norm", "aux_loss", "tokens", "tokens_per_s", "elapsed"} <= set(recs[0])
    assert recs[-1]["tokens"] == 60 * 8 * 64 and recs[-1]["valid_loss"] < first
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "tokenizer.json").is_file()

    model, config = megahybrid.load_checkpoint(tmp_path)
    assert config.model.vocab_size == 512 and config.train.steps == 60
    saved = load_file(tmp_path / "checkpoints" / "step_00000060" / checkpoint.MODEL)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
