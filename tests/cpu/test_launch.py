"""`megahybrid launch`: a 2-process gloo run through torchrun equals one process; the Slurm script's
preemption path (USR1 -> checkpoint -> requeue -> resume) under fake srun/scontrol and under a real
one-node Slurm (tests/local_slurm.sh); dry-run output; one-line errors before anything is submitted.

Runs use the tiny default preset on a 300 KB slice of the embedded corpus, tokenized once per module.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megahybrid import launch
from megahybrid.cli import main
from megahybrid.data.prepare import prepare
from megahybrid.train.run import train_from_cli

ROOT = Path(__file__).resolve().parents[2]
TINY = ["model.vocab_size=512", "train.seq_len=32", "train.micro_batch_size=2", "train.global_batch_size=4",
        "train.threads=1", "train.log_every=1", "train.warmup_steps=2", "train.eval_every=0"]
PREEMPT_STEPS = 30  # long enough that a USR1 sent after step 3 lands mid-run (measured: stops by step 8)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    prefix, tok = prepare([], str(tmp_path_factory.mktemp("data") / "stdlib"), None, 512, corpus_bytes=300_000)
    return [f"data.paths=[{prefix}]", f"data.tokenizer={tok}"]


@pytest.fixture(scope="module")
def preempt_args(dataset):
    return [*TINY, *dataset, f"train.steps={PREEMPT_STEPS}", "train.save_every=0"]


@pytest.fixture(scope="module")
def uninterrupted(preempt_args, tmp_path_factory):
    """The trajectory of the preemption tests' run without interruption (one process, in this one)."""
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    assert train_from_cli("default:tiny", str(run_dir), preempt_args) == 0
    return trajectory(run_dir)


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def trajectory(run_dir: Path) -> list[tuple]:
    return [(r["step"], r["loss"], r["lr"], r["grad_norm"], r["aux_loss"]) for r in records(run_dir)]


def wait_until(what: str, ready, timeout: float = 180, alive=lambda: True) -> None:
    deadline = time.time() + timeout
    while not ready():
        assert alive(), f"stopped before {what}"
        assert time.time() < deadline, f"no {what} within {timeout}s"
        time.sleep(0.2)


def render(args: list[str], capsys) -> str:
    assert main(["launch", "slurm", "--dry-run", *args]) == 0, capsys.readouterr().err
    return capsys.readouterr().out


# ------------------------------------------------------------------------------------ torchrun


def test_two_gloo_processes_through_launch_torchrun_equal_one_process(dataset, tmp_path):
    # Bitwise, measured: with 2 ranks each gradient element is g0/2 + g1/2 in both runs (DDP scales by
    # 1/world, accumulation by 1/accum; halving is exact in floating point and a sum of two terms does
    # not depend on the order gloo adds them). With > 2 ranks the sum order could differ in the last bit.
    args = [*TINY, *dataset, "train.steps=6"]
    done = subprocess.run([sys.executable, "-m", "megahybrid", "launch", "torchrun", "--nproc-per-node", "2",
                           "--out", str(tmp_path / "ddp"), "default:tiny", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "world size 2" in done.stdout
    assert train_from_cli("default:tiny", str(tmp_path / "one"), args) == 0
    one, ddp = trajectory(tmp_path / "one"), trajectory(tmp_path / "ddp")
    assert [r[0] for r in ddp] == list(range(1, 7))
    assert ddp == one


def test_torchrun_dry_run_prints_the_command(capsys):
    assert main(["launch", "torchrun", "--nproc-per-node", "2", "--dry-run", "--out", "runs/x", "default:tiny",
                 "train.micro_batch_size=2"]) == 0
    line = capsys.readouterr().out.strip()
    assert line == (f"{sys.executable} -m torch.distributed.run --nnodes 1 --nproc-per-node 2 --standalone "
                    "-m megahybrid train --config default:tiny --out runs/x train.micro_batch_size=2")
    assert main(["launch", "torchrun", "--nproc-per-node", "4", "--nnodes", "2", "--rdzv-endpoint", "node0:29500",
                 "--dry-run", "default:tiny", "train.micro_batch_size=1"]) == 0
    assert ("--nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint node0:29500 --rdzv-id megahybrid "
            "-m megahybrid train --config default:tiny --out runs/default") in capsys.readouterr().out


# ------------------------------------------------------------------------------------ sbatch script


def test_sbatch_script_renders_and_passes_bash_n(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    script = render(["--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu", "--time", "12:00:00",
                     "--account", "lm", "--grace-seconds", "240", "jamba", "train.global_batch_size=256",
                     "train.micro_batch_size=8", "--out", "runs/jamba"], capsys)
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    directives = re.findall(r"^#SBATCH (.*)$", script, flags=re.MULTILINE)
    assert directives == ["--job-name=jamba", "--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8",
                          "--exclusive", "--requeue", "--signal=B:USR1@240", "--open-mode=append",
                          "--output=logs/%x-%j.out", "--partition=gpu", "--account=lm", "--time=12:00:00",
                          f"--chdir={tmp_path}"]
    assert f"PYTHON={sys.executable}\n" in script and f"TORCHRUN_SH={launch.TORCHRUN_SH}\n" in script
    assert "NPROC_PER_NODE=8\n" in script
    assert ("MEGAHYBRID_ARGS=(train --config jamba --out runs/jamba train.global_batch_size=256 "
            "train.micro_batch_size=8)") in script
    for line in ('HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
                 "export RDZV_ENDPOINT=$HEAD_NODE:", "trap on_usr1 USR1", 'kill -USR1 "$srun_pid"',
                 'scontrol requeue "$SLURM_JOB_ID"', "srun --ntasks-per-node=1"):
        assert line in script, line
    torchrun_sh = launch.TORCHRUN_SH.read_text()
    assert "export NCCL_NVLS_ENABLE=0" in torchrun_sh and "--rdzv-backend c10d" in torchrun_sh
    # The templates, as kept in launch/, are valid scripts on their own (usable by hand).
    for name in ("slurm.sbatch", "torchrun.sh"):
        assert (ROOT / "launch" / name).resolve() == launch.HERE / name
        assert subprocess.run(["bash", "-n", str(ROOT / "launch" / name)]).returncode == 0


def test_job_arrays_for_sweeps(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    script = render(["--nodes", "1", "--gpus-per-node", "1", "--array", "0-3%2", "--cpus-per-node", "8",
                     "--out", "runs/sweep/{task}", "default:tiny", "train.seed={task}"], capsys)
    assert "#SBATCH --array=0-3%2\n" in script and "#SBATCH --output=logs/%x-%A_%a.out\n" in script
    assert "#SBATCH --cpus-per-task=8\n" in script and "--exclusive" not in script
    assert "--out 'runs/sweep/{task}' 'train.seed={task}'" in script
    # The task id substitution, run by bash as in the job (task 2):
    subst = subprocess.run(["bash", "-c", 'SLURM_ARRAY_TASK_ID=2; MEGAHYBRID_ARGS=(--out "runs/sweep/{task}" '
                            '"train.seed={task}"); RUN_ARGS=("${MEGAHYBRID_ARGS[@]//\\{task\\}/'
                            '${SLURM_ARRAY_TASK_ID:-0}}"); printf "%s|" "${RUN_ARGS[@]}"'],
                           capture_output=True, text=True)
    assert subst.stdout == "--out|runs/sweep/2|train.seed=2|"
    assert "RUN_ARGS=(\"${MEGAHYBRID_ARGS[@]//\\{task\\}/${SLURM_ARRAY_TASK_ID:-0}}\")" in script
    # `megahybrid sweep --slurm ...` goes through slurm_array: any megahybrid command, one task per index.
    assert launch.slurm_array(["megahybrid", "sweep", "s.yaml", "--out", "d", "--task", "$SLURM_ARRAY_TASK_ID"],
                              [5, 1, 2], ["--nodes", "1", "--gpus-per-node", "1", "--dry-run"]) == 0
    script = capsys.readouterr().out
    assert "#SBATCH --array=1,2,5\n" in script and "MEGAHYBRID_ARGS=(sweep s.yaml --out d --task '{task}')" in script


# ------------------------------------------------------------------------------------ preemption


FAKE_SRUN = """#!/usr/bin/env bash
# Fake srun: one task, here; --output's %n/%t/%N expanded; exec, so a signal to srun reaches the task.
out=/dev/stdout
while [ $# -gt 0 ]; do
  case "$1" in --output=*) out=${1#--output=} ;; --*) ;; *) break ;; esac
  shift
done
out=${out//%n/0}; out=${out//%t/0}; out=${out//%N/$(hostname -s)}
echo "srun $*" >>"$FAKE_SLURM_LOG"
exec "$@" >>"$out" 2>&1
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
echo "scontrol $*" >>"$FAKE_SLURM_LOG"
case "$1 $2" in
  "show hostnames") echo localhost ;;
  requeue*) ;;
  *) echo "fake scontrol: unexpected $*" >&2; exit 1 ;;
esac
"""


def test_fake_srun_usr1_reaches_the_trainer_which_checkpoints_then_the_job_requeues_and_resumes(
        preempt_args, uninterrupted, tmp_path, monkeypatch, capsys):
    bin_dir, run_dir, calls = tmp_path / "bin", tmp_path / "run", tmp_path / "slurm-calls.log"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "job.sbatch").write_text(render(["--nodes", "1", "--gpus-per-node", "0", "--out", str(run_dir),
                                                 "default:tiny", *preempt_args], capsys))
    job = str(20000 + os.getpid() % 20000)  # the rendezvous port is derived from it: vary it per test run
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_SLURM_LOG=str(calls), SLURM_JOB_ID=job,
               SLURM_JOB_NAME="t", SLURM_JOB_NODELIST="localhost", SLURM_JOB_NUM_NODES="1", SLURM_CPUS_ON_NODE="2")
    log_dir = tmp_path / "logs" / f"t-{job}"

    batch = subprocess.Popen(["bash", "job.sbatch"], env=env, stdout=open(tmp_path / "batch.out", "w"),
                             stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until("step 3", lambda: len(records(run_dir)) >= 3, alive=lambda: batch.poll() is None)
        batch.send_signal(signal.SIGUSR1)  # what Slurm's --signal=B:USR1@GRACE does
        assert batch.wait(timeout=120) == 0, (tmp_path / "batch.out").read_text()
    finally:
        if batch.poll() is None:
            os.killpg(batch.pid, signal.SIGKILL)
    node_log = (log_dir / "attempt0-node0.log").read_text()
    assert re.search(r"^preempted: checkpoint at step \d+", node_log, flags=re.MULTILINE), node_log[-2000:]
    stopped = records(run_dir)[-1]["step"]
    assert 3 <= stopped < PREEMPT_STEPS and (run_dir / "checkpoints" / f"step_{stopped:08d}").is_dir()
    assert calls.read_text().splitlines()[-1] == f"scontrol requeue {job}"

    # The requeued job: the same script, SLURM_RESTART_COUNT=1. It resumes, finishes, does not requeue.
    calls.unlink()
    again = subprocess.run(["bash", "job.sbatch"], env=dict(env, SLURM_RESTART_COUNT="1"), capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"resumed from {run_dir}/checkpoints/step_{stopped:08d}" in (log_dir / "attempt1-node0.log").read_text()
    assert "requeue" not in calls.read_text()
    assert trajectory(run_dir) == uninterrupted


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A real one-node Slurm (slurmctld, slurmd, munged on localhost), installed if need be."""
    fixture = ROOT / "tests" / "local_slurm.sh"
    if shutil.which("slurmctld") is None or shutil.which("munged") is None:
        installed = subprocess.run(["bash", str(fixture), "install"], capture_output=True, text=True, timeout=600)
        if installed.returncode:
            pytest.skip(f"real Slurm: slurm-wlm/munge not installable here: {installed.stderr.strip()[-300:]}")
    if os.geteuid() != 0:
        pytest.skip("real Slurm: slurmd must run as root to start jobs (tests/local_slurm.sh)")
    state = tmp_path_factory.mktemp("slurm")
    started = subprocess.run(["bash", str(fixture), "start", str(state)], capture_output=True, text=True,
                             timeout=120)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield str(state / "slurm.conf")
    finally:
        subprocess.run(["bash", str(fixture), "stop", str(state)], timeout=60)


def job_state(job: str) -> tuple[str, int]:
    info = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    return re.search(r"JobState=(\w+)", info).group(1), int(re.search(r"Restarts=(\d+)", info).group(1))


def test_real_slurm_usr1_checkpoints_requeues_and_resumes_to_the_uninterrupted_loss(
        slurm, preempt_args, uninterrupted, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("SLURM_CONF", slurm)
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    # Unknown partitions are Slurm's to report: sbatch's own error, its exit code, nothing submitted.
    assert main(["launch", "slurm", "--nodes", "1", "--gpus-per-node", "0", "--partition", "nosuch",
                 "--out", str(run_dir), "default:tiny", *preempt_args]) != 0
    assert "invalid partition" in capfd.readouterr().err.lower()  # (sbatch writes to fd 2 itself)

    assert main(["launch", "slurm", "--nodes", "1", "--gpus-per-node", "0", "--out", str(run_dir),
                 "default:tiny", *preempt_args]) == 0
    job = capfd.readouterr().out.strip()
    assert job.isdigit(), job
    try:
        wait_until("step 3", lambda: len(records(run_dir)) >= 3, alive=lambda: job_state(job)[0] in (
            "PENDING", "RUNNING"))
        subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)  # = --signal=B:USR1@GRACE
        wait_until("requeue", lambda: job_state(job) == ("PENDING", 1), timeout=120)
        # A requeued job waits ~2 minutes (Reason=BeginTime); start it now, but not within the second
        # of the requeue: slurmd refuses credentials made in the second it revoked the old ones
        # ("Job credential revoked", measured), and the job would fail.
        time.sleep(2)
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
        wait_until("the end", lambda: job_state(job)[0] not in ("PENDING", "RUNNING", "REQUEUED"), timeout=300)
    finally:
        subprocess.run(["scancel", job])
    batch_log = next((tmp_path / "logs").glob(f"*-{job}.out")).read_text()
    assert job_state(job) == ("COMPLETED", 1), batch_log
    log_dir = next((tmp_path / "logs").glob(f"*-{job}"))
    first, second = (log_dir / "attempt0-node0.log").read_text(), (log_dir / "attempt1-node0.log").read_text()
    stopped = int(re.search(r"^preempted: checkpoint at step (\d+)", first, flags=re.MULTILINE).group(1))
    assert stopped < PREEMPT_STEPS and f"requeueing job {job}" in batch_log
    assert f"resumed from {run_dir}/checkpoints/step_{stopped:08d}" in second
    assert trajectory(run_dir) == uninterrupted


# ------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("argv, expect", [
    (["slurm", "--nodes", "0", "--gpus-per-node", "8", "default:tiny"], "--nodes=0: must be >= 1"),
    (["slurm", "--nodes", "1", "--gpus-per-node", "-1", "default:tiny"], "--gpus-per-node=-1: must be >= 0"),
    (["slurm", "--nodes", "1", "--gpus-per-node", "1", "--grace-seconds", "0", "default:tiny"],
     "--grace-seconds=0: must be >= 1"),
    (["slurm", "--nodes", "1", "--gpus-per-node", "6", "default:tiny", "parallel.tp=4"],
     "6 processes do not split into model replicas of parallel.tp*pp*cp = 4"),
    (["slurm", "--nodes", "2", "--gpus-per-node", "2", "default:tiny", "parallel.tp=4",
      "train.backend=megatron"], "parallel.tp=4 must divide the processes per node (2)"),
    (["slurm", "--nodes", "2", "--gpus-per-node", "8", "default:tiny"],
     "train.global_batch_size=8 must be a multiple of train.micro_batch_size * data-parallel size = 8 * 16"),
    (["slurm", "--nodes", "1", "--gpus-per-node", "1", "no_such"], "CONFIG 'no_such': not a file or preset name"),
    (["slurm", "--nodes", "1", "--gpus-per-node", "1", "nosuch.yaml"], "config 'nosuch.yaml': file not found"),
    (["slurm", "--nodes", "1", "--gpus-per-node", "1", "default:tiny", "train.nosuch=1"],
     "train.nosuch: unknown key"),
    (["slurm", "--nodes", "1", "--gpus-per-node", "1", "--array", "0-3", "default:tiny"],
     "--out='runs/default': every task of --array=0-3 would train into it; put {task} in it"),
    (["slurm", "--nodes", "1", "--gpus-per-node", "1", "--array", "0..3", "--out", "r/{task}", "default:tiny"],
     "--array='0..3': expected Slurm's form"),
    (["slurm", "--nodes", "1", "--gpus-per-node", "1", "--time", "1 day", "default:tiny"],
     "--time='1 day': must be one word"),
    (["slurm", "--nodes", "1", "--gpus-per-node", "1", "default:tiny"], "sbatch: not found on PATH"),
    (["torchrun", "--nproc-per-node", "0", "default:tiny"], "--nproc-per-node=0: must be >= 1"),
    (["torchrun", "--nproc-per-node", "2", "--nnodes", "2", "default:tiny", "train.micro_batch_size=1"],
     "--nnodes=2: needs --rdzv-endpoint HOST:PORT"),
    (["torchrun", "--nproc-per-node", "2", "--rdzv-endpoint", "node0", "default:tiny"],
     "--rdzv-endpoint='node0': expected HOST:PORT"),
    (["torchrun", "--nproc-per-node", "3", "default:tiny"], "set train.global_batch_size=24"),
])
def test_bad_input_is_one_line_naming_option_value_and_fix(argv, expect, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    assert main(["launch", *argv]) == 2
    out, err = capsys.readouterr()
    assert expect in err and len(err.strip().splitlines()) == 1 and not out, err
