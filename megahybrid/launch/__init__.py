"""`megahybrid launch {torchrun,slurm}`: check a run's layout, then start it on this machine or
submit it to Slurm. The shell scripts beside this file do the work and are usable by hand:

- `torchrun.sh`: one node; torchrun starts the trainer processes; passes SIGUSR1 to them.
- `slurm.sbatch`: one srun task per node running torchrun.sh; USR1 -> checkpoint -> requeue.

`render_sbatch` fills the template's `#SBATCH` lines and settings; it never adds logic, so what
`--dry-run` prints is the template with values, and a job submitted by hand behaves the same.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from megahybrid.config import Config, ConfigError, load_config

HERE = Path(__file__).resolve().parent
TORCHRUN_SH = HERE / "torchrun.sh"
SLURM_SBATCH = HERE / "slurm.sbatch"
TASK = "{task}"
"""In any training argument of a job array, replaced by the array task id (slurm.sbatch does it)."""


class LaunchError(ConfigError):
    """Bad launcher input; the message is one line naming the option, the value and the fix."""


def train_args(args) -> list[str]:
    """The `megahybrid train` arguments every trainer process gets."""
    return ["--config", args.config, "--out", args.out, *args.overrides]


def check_config(source: str, overrides: list[str]) -> Config:
    """Load the config as the trainers will, so a bad one fails here rather than in the job."""
    from megahybrid import presets

    try:
        load_config(source)
    except ConfigError as err:
        first = str(err).splitlines()[0]  # (a pattern error goes on to draw a caret under the pattern)
        if Path(source).exists() or presets.is_preset(source) or source.endswith((".yaml", ".yml")):
            raise LaunchError(first) from None
        raise LaunchError(f"CONFIG {source!r}: not a file or preset name ({', '.join(presets.names())}), and "
                          f"as a layer pattern: {first}") from None
    try:
        return load_config(source, overrides)
    except ConfigError as err:
        raise LaunchError(str(err).splitlines()[0]) from None


def check_layout(config: Config, nodes: int, per_node: int, flags: str) -> None:
    """The processes (`nodes` x `per_node`) must split into whole model replicas (tp*pp*cp),
    tensor-parallel groups must stay inside a node, and the global batch must split over the
    data-parallel ranks (the trainer checks the same, but only after the job has started)."""
    p, t = config.parallel, config.train
    world, model_parallel = nodes * per_node, p.tp * p.pp * p.cp
    if world % model_parallel:
        raise LaunchError(f"{flags}: {world} processes do not split into model replicas of parallel.tp*pp*cp = "
                          f"{model_parallel}; use a multiple of {model_parallel} processes in all")
    if per_node % p.tp:
        raise LaunchError(f"{flags}: parallel.tp={p.tp} must divide the processes per node ({per_node}) so "
                          f"tensor-parallel groups stay inside a node; use a multiple of {p.tp} per node")
    # the reference backend trains tp = pp = 1 (train/run.py refuses more); a CP group shares its sequences
    data_parallel = world // model_parallel if t.backend == "megatron" else world // p.cp
    per_step = t.micro_batch_size * data_parallel
    if t.global_batch_size % per_step:
        fix = f"train.global_batch_size={per_step * max(1, round(t.global_batch_size / per_step))}"
        if t.global_batch_size % data_parallel == 0:
            fix += f" or train.micro_batch_size={t.global_batch_size // data_parallel}"
        raise LaunchError(f"{flags}: train.global_batch_size={t.global_batch_size} must be a multiple of "
                          f"train.micro_batch_size * data-parallel size = {t.micro_batch_size} * {data_parallel}; "
                          f"set {fix}")


def at_least(flag: str, value: int | None, low: int) -> None:
    if value is not None and value < low:
        raise LaunchError(f"{flag}={value}: must be >= {low}")


# ------------------------------------------------------------------------------------ torchrun


def torchrun(args) -> int:
    """Run torchrun.sh here (replacing this process, so signals reach it), or print its command."""
    at_least("--nproc-per-node", args.nproc_per_node, 1)
    at_least("--nnodes", args.nnodes, 1)
    endpoint = args.rdzv_endpoint
    if endpoint is not None and not re.fullmatch(r"[^\s:]+:\d+", endpoint):
        raise LaunchError(f"--rdzv-endpoint={endpoint!r}: expected HOST:PORT of the first node, e.g. node0:29500")
    if args.nnodes > 1 and endpoint is None:
        raise LaunchError(f"--nnodes={args.nnodes}: needs --rdzv-endpoint HOST:PORT of the first node "
                          "(run the same command on every node)")
    config = check_config(args.config, args.overrides)
    check_layout(config, args.nnodes, args.nproc_per_node,
                 f"--nnodes={args.nnodes} --nproc-per-node={args.nproc_per_node}")
    env = dict(os.environ, PYTHON=sys.executable, NPROC_PER_NODE=str(args.nproc_per_node), NNODES=str(args.nnodes))
    if endpoint:
        env["RDZV_ENDPOINT"] = endpoint
    command = ["bash", str(TORCHRUN_SH), "train", *train_args(args)]
    if args.dry_run:
        env["DRY_RUN"] = "1"
        print(subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout, end="")
        return 0
    sys.stdout.flush()
    os.execvpe("bash", command, env)


# ------------------------------------------------------------------------------------ slurm


def add_slurm_options(parser) -> None:
    """The options of `megahybrid launch slurm` (also parsed by `slurm_array`)."""
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, required=True,
                        help="one trainer process per GPU (0: a CPU job, one process per node)")
    parser.add_argument("--partition", default=None)
    parser.add_argument("--time", default=None, help="time limit, e.g. 24:00:00")
    parser.add_argument("--account", default=None)
    parser.add_argument("--array", default=None, help="job array for sweeps, e.g. 0-7; {task} in CONFIG, --out "
                        "or an override becomes the array task id")
    parser.add_argument("--grace-seconds", type=int, default=300,
                        help="USR1 this long before the time limit: checkpoint, then requeue (default 300)")
    parser.add_argument("--cpus-per-node", type=int, default=None,
                        help="share nodes: this many CPUs per node instead of whole nodes (--exclusive)")
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch script instead of submitting it")


def array_ids(spec: str) -> list[int]:
    """Task ids of a Slurm --array spec: `0-7`, `1,3,10-20:5`, `0-99%4` (at most 4 at once)."""
    item = r"\d+(?:-\d+(?::\d+)?)?"
    if not re.fullmatch(rf"{item}(?:,{item})*(?:%\d+)?", spec):
        raise LaunchError(f"--array={spec!r}: expected Slurm's form, e.g. 0-7, 1,3,5, 0-15:2 or 0-99%4")
    ids = []
    for part in spec.split("%")[0].split(","):
        first, _, rest = part.partition("-")
        last, _, step = rest.partition(":")
        ids += range(int(first), int(last or first) + 1, int(step or 1))
    return ids


def check_slurm_options(opts) -> None:
    at_least("--nodes", opts.nodes, 1)
    at_least("--gpus-per-node", opts.gpus_per_node, 0)
    at_least("--cpus-per-node", opts.cpus_per_node, 1)
    at_least("--grace-seconds", opts.grace_seconds, 1)
    for flag in ("partition", "account", "time", "array"):
        value = getattr(opts, flag)
        if value is not None and (not value or re.search(r"\s", value)):
            raise LaunchError(f"--{flag}={value!r}: must be one word, without spaces")
    if opts.array:
        array_ids(opts.array)


def _set(text: str, pattern: str, line: str | None) -> str:
    """Replace the template's one line matching `pattern` (or delete it when `line` is None)."""
    new, count = re.subn(rf"^{pattern}.*\n", lambda _: "" if line is None else line + "\n", text, flags=re.MULTILINE)
    assert count == 1, f"{SLURM_SBATCH}: expected one line matching {pattern!r}, found {count}"
    return new


def render_sbatch(opts, job_name: str, command: list[str]) -> str:
    """slurm.sbatch with this job's #SBATCH values and settings filled in; every trainer process
    runs `megahybrid COMMAND...` (e.g. `train --config ... --out ...`)."""
    text = SLURM_SBATCH.read_text()
    text = _set(text, "#SBATCH --job-name=", f"#SBATCH --job-name={job_name}")
    text = _set(text, "#SBATCH --nodes=", f"#SBATCH --nodes={opts.nodes}")
    text = _set(text, "#SBATCH --gpus-per-node=", f"#SBATCH --gpus-per-node={opts.gpus_per_node}"
                if opts.gpus_per_node else None)
    if opts.cpus_per_node:
        text = _set(text, "#SBATCH --exclusive", f"#SBATCH --cpus-per-task={opts.cpus_per_node}")
    text = _set(text, "#SBATCH --signal=", f"#SBATCH --signal=B:USR1@{opts.grace_seconds}")
    if opts.array:
        text = _set(text, "#SBATCH --output=", "#SBATCH --output=logs/%x-%A_%a.out")
    extra = [f"#SBATCH --{flag}={value}" for flag, value in (
        ("partition", opts.partition), ("account", opts.account), ("time", opts.time), ("array", opts.array),
        ("chdir", os.getcwd())) if value]
    last = list(re.finditer(r"^#SBATCH .*\n", text, flags=re.MULTILINE))[-1]
    text = text[:last.end()] + "".join(f"{line}\n" for line in extra) + text[last.end():]
    text = _set(text, "PYTHON=", f"PYTHON={shlex.quote(sys.executable)}")
    text = _set(text, "TORCHRUN_SH=", f"TORCHRUN_SH={shlex.quote(str(TORCHRUN_SH))}")
    text = _set(text, "NPROC_PER_NODE=", f"NPROC_PER_NODE={opts.gpus_per_node or 1}")
    return _set(text, "MEGAHYBRID_ARGS=", f"MEGAHYBRID_ARGS=({shlex.join(command)})")


def submit(opts, script: str) -> int:
    """Print the script (--dry-run), or submit it with sbatch and print the job id."""
    if opts.dry_run:
        print(script, end="")
        return 0
    if shutil.which("sbatch") is None:
        raise LaunchError("sbatch: not found on PATH; run this on a Slurm login node, or use --dry-run to print "
                          "the script")
    Path("logs").mkdir(exist_ok=True)  # Slurm does not create the directory of --output
    done = subprocess.run(["sbatch", "--parsable"], input=script, text=True, stdout=subprocess.PIPE)
    if done.returncode:
        return done.returncode  # sbatch has printed its own error (unknown partition, bad --time, ...)
    job = done.stdout.strip().split(";")[0]
    print(job)
    print(f"megahybrid launch: submitted job {job}; logs in logs/ (squeue -j {job}; scancel {job})", file=sys.stderr)
    return 0


def slurm(args) -> int:
    """`megahybrid launch slurm`: check options and config(s), render, submit."""
    check_slurm_options(args)
    ids = array_ids(args.array) if args.array else [0]
    if args.array and TASK not in args.out:
        raise LaunchError(f"--out={args.out!r}: every task of --array={args.array} would train into it; "
                          f"put {TASK} in it, e.g. --out {args.out.rstrip('/')}/{TASK}")
    configs = [check_config(args.config.replace(TASK, str(i)), [o.replace(TASK, str(i)) for o in args.overrides])
               for i in ids]
    for config in configs:
        check_layout(config, args.nodes, args.gpus_per_node or 1,
                     f"--nodes={args.nodes} --gpus-per-node={args.gpus_per_node}")
    job_name = re.sub(r"[^\w.-]", "_", configs[0].name)
    return submit(args, render_sbatch(args, job_name, ["train", *train_args(args)]))


class _OptionParser(argparse.ArgumentParser):
    def error(self, message):
        raise LaunchError(f"Slurm options: {message}; e.g. --nodes 1 --gpus-per-node 1 --partition gpu")


def slurm_array(command: list[str], indices: list[int], args: list[str]) -> int:
    """Submit `command` (a `megahybrid ...` argv in which "$SLURM_ARRAY_TASK_ID" stands for the task
    id) as a job array over `indices`; `args` are `megahybrid launch slurm` options (for sweeps)."""
    parser = _OptionParser(prog="megahybrid launch slurm", add_help=False)
    add_slurm_options(parser)
    opts = parser.parse_args(args)
    if opts.array:
        raise LaunchError(f"--array={opts.array}: the sweep sets the array itself; leave --array out")
    opts.array = ",".join(map(str, sorted(indices)))
    check_slurm_options(opts)
    if command[0] == "megahybrid":
        command = command[1:]
    command = [TASK if arg == "$SLURM_ARRAY_TASK_ID" else arg for arg in command]
    return submit(opts, render_sbatch(opts, f"megahybrid-{command[0]}", command))


def main(args) -> int:
    return torchrun(args) if args.launcher == "torchrun" else slurm(args)
