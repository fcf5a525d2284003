"""`megahybrid` command line: one small function per subcommand."""

from __future__ import annotations

import argparse
import json
import sys

from megahybrid.config import ConfigError


def cmd_describe(args) -> int:
    from megahybrid.config import load_config
    from megahybrid.describe import describe, describe_parallel, format_parallel, format_table, parse_parallel_spec

    if args.parallel is None:
        config = load_config(args.source, args.overrides)
        info = describe(config, seq_len=args.seq_len)
        print(json.dumps(info, indent=2) if args.json else format_table(info))
        return 0
    spec, dp = parse_parallel_spec(args.parallel)
    batch = [f"train.{k}={v}" for k, v in (("micro_batch_size", args.micro_batch),
                                         ("global_batch_size", args.global_batch), ("seq_len", args.seq_len))
             if v is not None]
    config = load_config(args.source, [*args.overrides, *batch, *spec])
    info = describe_parallel(config, dp=dp or args.dp)
    print(json.dumps(info, indent=2) if args.json else format_table(info) + "\n\n" + format_parallel(info["parallel"]))
    return 0


def cmd_train(args) -> int:
    from megahybrid.train.run import train_from_cli

    return train_from_cli(args.config, args.out, args.overrides)


def cmd_data(args) -> int:
    from megahybrid.data.prepare import prepare_from_cli

    return prepare_from_cli(args)


def cmd_fit(args) -> int:
    from megahybrid.scaling.cli import fit_from_cli

    return fit_from_cli(args.source, args.out, args.budget)


def cmd_sweep(args) -> int:
    from megahybrid.scaling.sweep import sweep_from_cli

    return sweep_from_cli(args)


def cmd_convert(args) -> int:
    from megahybrid.convert import ARCHITECTURES, ConversionError, convert, load_all

    if args.list:
        load_all()
        for name, arch in sorted(ARCHITECTURES.items()):
            print(f"{name:18s} {arch.hf_class}" + (f"  ({arch.note})" if arch.note else ""))
        return 0
    if args.src is None or args.dst is None or args.to is None:
        print("megahybrid convert: SRC, DST and --to are required (or --list)", file=sys.stderr)
        return 2
    try:
        out = convert(args.src, args.dst, to=args.to, arch=args.arch, tp=args.tp, pp=args.pp, ep=args.ep)
    except ConversionError as err:
        print(f"megahybrid convert: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.to} checkpoint to {out}")
    return 0


def cmd_launch(args) -> int:
    from megahybrid import launch

    try:
        return launch.main(args)
    except launch.LaunchError as err:
        print(f"megahybrid launch: {err}", file=sys.stderr)
        return 2


def add_launch_parser(sub) -> None:
    from megahybrid.launch import add_slurm_options

    launch = sub.add_parser("launch", help="train with torchrun on this machine, or submit to Slurm")
    kinds = launch.add_subparsers(dest="launcher", required=True, metavar="LAUNCHER")
    t = kinds.add_parser("torchrun", help="run torchrun here (launch/torchrun.sh)")
    t.add_argument("--nproc-per-node", type=int, required=True, help="trainer processes on this machine")
    t.add_argument("--nnodes", type=int, default=1, help="machines; run the same command on each")
    t.add_argument("--rdzv-endpoint", default=None, help="HOST:PORT of the first machine (when --nnodes > 1)")
    t.add_argument("--dry-run", action="store_true", help="print the torchrun command instead of running it")
    s = kinds.add_parser("slurm", help="render launch/slurm.sbatch and submit it with sbatch")
    add_slurm_options(s)
    for k in (t, s):
        k.add_argument("--out", default="runs/default", help="run directory (a requeued job resumes from it)")
        k.add_argument("config", help="YAML path, preset name or pattern")
        k.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    launch.set_defaults(fn=cmd_launch)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megahybrid", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("describe", help="print the resolved layer table of a config, preset or pattern")
    d.add_argument("source", help="YAML path, preset name (e.g. jamba or jamba:tiny) or pattern string")
    d.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    d.add_argument("--json", action="store_true", help="machine-readable output")
    d.add_argument("--seq-len", type=int, default=None, help="sequence length for FLOPs (default: train.seq_len)")
    d.add_argument("--parallel", nargs="?", const="", default=None, metavar="SPEC",
                   help="per-rank memory/FLOPs of a layout, e.g. tp=2,pp=4,ep=8,cp=2,dp=16,sp,distopt,"
                        "recompute=selective,pp_balance=flops (keys set parallel.*; parallel.* overrides work too)")
    d.add_argument("--dp", type=int, default=1, help="data-parallel size for --parallel (or dp= in SPEC)")
    d.add_argument("--micro-batch", type=int, default=None, help="with --parallel: train.micro_batch_size")
    d.add_argument("--global-batch", type=int, default=None,
                   help="with --parallel: train.global_batch_size (a multiple of micro-batch x dp)")
    d.set_defaults(fn=cmd_describe)

    t = sub.add_parser("train", help="train a model (no arguments: the embedded default on CPU)")
    t.add_argument("--config", default=None, help="YAML path, preset name or pattern (default: embedded default)")
    t.add_argument("--out", default="runs/default", help="run directory (re-running resumes from it)")
    t.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    t.set_defaults(fn=cmd_train)

    data = sub.add_parser("data", help="prepare datasets (tokenizer + Megatron indexed .bin/.idx)")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    prep = data_sub.add_parser("prepare", help="tokenize text/jsonl files (or the embedded corpus)")
    prep.add_argument("inputs", nargs="*", help=".txt or .jsonl files (default: the embedded corpus)")
    prep.add_argument("--out", required=True, help="output prefix (writes PREFIX.bin/.idx)")
    prep.add_argument("--tokenizer", default=None, help="existing tokenizer.json (default: train a BPE)")
    prep.add_argument("--vocab-size", type=int, default=8192)
    prep.add_argument("--json-key", default="text", help="field holding the text in .jsonl files")
    prep.set_defaults(fn=cmd_data)
    f = sub.add_parser("fit", help="fit scaling laws (Chinchilla approaches 1-3) to a sweep's runs")
    f.add_argument("source", help="a sweep directory (runs with summary.json) or a .json/.jsonl of records")
    f.add_argument("--out", default="fits", help="where fits.json, fits.md and the PNG plots go")
    f.add_argument("--budget", type=float, default=None, help="FLOP budget to give compute-optimal N and D for")
    f.set_defaults(fn=cmd_fit)

    sw = sub.add_parser("sweep", help="train a grid of runs for scaling-law fits (resumable; see configs/sweeps/)")
    sw.add_argument("sweep", help="sweep YAML (format: megahybrid/scaling/sweep.py)")
    sw.add_argument("--out", required=True, help="sweep directory: one run directory per run; re-running skips finished runs")
    sw.add_argument("--dry-run", action="store_true", help="print the runs (params, steps, tokens, FLOPs) and exit")
    sw.add_argument("--task", type=int, default=None, help="train only run TASK (a Slurm array element's index)")
    sw.add_argument("--slurm", nargs=argparse.REMAINDER, default=None, metavar="LAUNCH_ARGS",
                    help="submit the unfinished runs as a Slurm job array via `megahybrid launch slurm`; "
                         "the rest of the line goes to it")
    sw.set_defaults(fn=cmd_sweep)
    c = sub.add_parser("convert", help="convert checkpoints: Hugging Face <-> megahybrid <-> Megatron dist")
    c.add_argument("src", nargs="?", help="HF model dir, megahybrid checkpoint/run dir or Megatron dist checkpoint")
    c.add_argument("dst", nargs="?", help="output directory")
    c.add_argument("--to", choices=["hf", "megahybrid", "megatron"], help="output format")
    c.add_argument("--arch", default=None, help="HF model_type to write (default: the one the source came from)")
    c.add_argument("--tp", type=int, default=1, help="Megatron tensor-parallel size to write")
    c.add_argument("--pp", type=int, default=1, help="Megatron pipeline-parallel size to write")
    c.add_argument("--ep", type=int, default=1, help="Megatron expert-parallel size to write")
    c.add_argument("--list", action="store_true", help="list the supported Hugging Face architectures")
    c.set_defaults(fn=cmd_convert)
    # listed for `megahybrid --help` only: main() hands `bench ...` to bench.py's own parser
    sub.add_parser("bench", add_help=False,
                   help="Megatron backend throughput vs stock HybridModel on this GPU (--help for its options)")
    add_launch_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its own parser (megahybrid/megatron/bench.py): options pass through whole
        from megahybrid.megatron.bench import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args) or 0
    except ConfigError as err:
        print(f"megahybrid: config error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
