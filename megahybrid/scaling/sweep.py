"""`megahybrid sweep SWEEP.yaml --out DIR`: train a grid of runs for scaling-law fits.

A sweep file names a base config, the patterns and sizes to compare and one or more grids of
runs; every run is `base + overrides + pattern + size + lr + length`:

    base: null                        # like `megahybrid train --config`: preset, YAML path (relative
                                      # to this file) or pattern; null = the embedded default
    overrides:                        # dotted key: value, applied to every run
      model.vocab_size: 512
      train.seq_len: 128
    patterns:                         # label -> layout (the label is the fit's "pattern")
      transformer: "(*-)x{num_layers}"          # a string is model.pattern; {num_layers} comes from the size
      hybrid: {backbone: mamba2, ratio: [2, 1], mlp_after_mixer: mlp}   # a mapping of layout fields
    sizes:                            # label -> model fields (dotted or nested)
      s: {hidden_size: 64, num_layers: 2, attention.num_heads: 4}
    grid:                             # one mapping or a list; each is the product of its axes
      - pattern: [transformer, hybrid]          # default: every pattern
        size: [s]                               # default: every size
        lr: [1e-3, 3e-3]                        # default: the base's train.lr (min_lr keeps its ratio to lr)
        budget: [1e12]                          # exactly one of budget / tokens / steps

`budget` is an IsoFLOP budget C in training FLOPs: steps = round(C / (3 F tokens_per_step)),
F = forward FLOPs/token (`megahybrid.flops`); `tokens` and `steps` fix the length directly.
Without `patterns` every run keeps the base's layout, labelled with the base's name (a preset
name) or "base"; without `sizes` it keeps the base's widths. Run names then leave that part out.

Each run trains in DIR/<name>/ (name = pattern-size-lrLR-{cC | dD | sS}), in this process, its
console output going to DIR/<name>/train.log. When it finishes, DIR/<name>/summary.json is
written (the format `megahybrid fit` reads, `scaling/cli.py`); a run with a summary.json is
skipped next time, and an interrupted one resumes from its checkpoint. The embedded corpus is
tokenized once per sweep into DIR/.data/ so every run sees the same tokenizer and batches.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import difflib
import fcntl
import itertools
import json
import math
import os
import re
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from megahybrid.config import Config, ConfigError, ModelConfig, load_config
from megahybrid.flops import TRAIN_FACTOR, model_flops_per_token

TOP_KEYS = ("name", "base", "overrides", "patterns", "sizes", "grid")
GRID_AXES = ("pattern", "size", "lr", "budget", "tokens", "steps")
LENGTH_AXES = ("budget", "tokens", "steps")
LAYOUT_FIELDS = ("pattern", "layers", "backbone", "num_layers", "attention_every", "attention_layers",
                 "ratio", "mlp_after_mixer")
"""ModelConfig fields that say which layers there are; a sweep pattern replaces all of them."""
LABEL = re.compile(r"^[A-Za-z0-9_.+]+$")
MIN_STEPS = 10
"""Fewest optimizer steps a run may have: below this, warmup and the first logged losses are
most of the run and its final loss says little about the size."""


class SweepError(ValueError):
    """A bad sweep file or sweep directory; the one-line message names the key and the fix."""


@dataclass
class Run:
    """One run of a sweep: its name, axes and resolved config."""

    index: int
    name: str
    pattern: str
    size: str
    lr: float
    config: Config
    budget: float | None = None
    """Nominal IsoFLOP budget (training FLOPs) when the run's length came from `budget`."""
    forward_flops_per_token: float = 0.0

    @property
    def tokens_per_step(self) -> int:
        return self.config.train.global_batch_size * self.config.train.seq_len

    @property
    def tokens(self) -> int:
        return self.config.train.steps * self.tokens_per_step

    @property
    def flops(self) -> float:
        return TRAIN_FACTOR * self.forward_flops_per_token * self.tokens


@dataclass
class Sweep:
    path: Path
    name: str
    runs: list[Run] = field(default_factory=list)


# ------------------------------------------------------------------------- reading the file


def _did_you_mean(key: str, valid) -> str:
    close = difflib.get_close_matches(str(key), list(valid), n=1, cutoff=0.5)
    return f"did you mean {close[0]}?" if close else f"valid keys: {', '.join(valid)}"


def _number(where: str, value: Any) -> float:
    """A YAML number (YAML 1.1 reads 1e-3 as a string, so strings are parsed too)."""
    try:
        if isinstance(value, bool):
            raise TypeError
        x = float(value)
    except (TypeError, ValueError):
        raise SweepError(f"{where}={value!r}: must be a number, e.g. 1e-3") from None
    if not math.isfinite(x) or x <= 0:
        raise SweepError(f"{where}={value!r}: must be a finite number > 0")
    return x


def _as_list(where: str, value: Any) -> list:
    if isinstance(value, (list, tuple)):
        if not value:
            raise SweepError(f"{where}: empty list; give at least one value or remove the key")
        return list(value)
    if isinstance(value, dict):
        raise SweepError(f"{where}: must be a value or a list of values, not a mapping")
    return [value]


def _nested(where: str, fields: dict) -> dict:
    """{"attention.num_heads": 4, "mlp": {...}} -> nested dict (dotted keys expanded)."""
    out: dict = {}
    for key, value in fields.items():
        if not isinstance(key, str) or not key:
            raise SweepError(f"{where}: key {key!r} must be a non-empty string")
        target = out
        *parents, last = key.split(".")
        for part in parents:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise SweepError(f"{where}.{key}: conflicts with another key setting {part!r}")
        if isinstance(value, dict):
            value = _nested(f"{where}.{key}", value)
            if isinstance(target.get(last), dict):
                value = _merge(target[last], value)
        target[last] = value
    return out


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _check_model_keys(where: str, fields: dict) -> None:
    names = [f.name for f in dataclasses.fields(ModelConfig)]
    for key in fields:
        if key not in names:
            raise SweepError(f"{where}.{key}: not a model field; {_did_you_mean(key, names)}")


def _label(where: str, label: Any) -> str:
    if not isinstance(label, str) or not LABEL.match(label):
        raise SweepError(f"{where}: label {label!r} must be letters, digits, '_', '.' or '+' "
                         "(it becomes part of the run directory names)")
    return label


def _fmt_value(x: float) -> str:
    """1e12 -> '1e12', 0.003 -> '0.003', 300 -> '300' (run names)."""
    return f"{x:.3g}".replace("e+", "e").replace("e0", "e").replace("e-0", "e-")


def _resolve_base(base: Any, sweep_dir: Path) -> Any:
    """A YAML path is read relative to the sweep file first, then to the working directory."""
    if base is None or not isinstance(base, str):
        return base
    if base.endswith((".yaml", ".yml")) and not Path(base).is_absolute() and (sweep_dir / base).is_file():
        return str(sweep_dir / base)
    return base


def load_sweep(path) -> Sweep:
    """Read and check a sweep file; every run's config is resolved (and validated) here, so a
    bad sweep fails before the first run trains."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"{path}: no such sweep file; give a YAML file (examples in configs/sweeps/)")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise SweepError(f"{where}: not valid YAML ({getattr(err, 'problem', None) or err}); "
                         "quote patterns that start with '*' or contain ': '") from None
    if not isinstance(doc, dict):
        raise SweepError(f"{path}: holds a {type(doc).__name__}; a sweep file is a mapping with keys "
                         f"{', '.join(TOP_KEYS)}")
    for key in doc:
        if key not in TOP_KEYS:
            raise SweepError(f"{path}: {key}: unknown key; {_did_you_mean(key, TOP_KEYS)}")
    if "grid" not in doc:
        raise SweepError(f"{path}: grid: missing; add e.g. grid: {{size: [s, m], budget: [1e12]}}")

    base_source = _resolve_base(doc.get("base"), path.parent)
    try:
        base = load_config(base_source).to_dict()
    except ConfigError as err:
        raise SweepError(f"{path}: base: {err}") from None

    overrides = doc.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise SweepError(f"{path}: overrides: must be a mapping of dotted key: value, e.g. {{train.seq_len: 128}}")
    top = [f.name for f in dataclasses.fields(Config)]
    model_names = {f.name for f in dataclasses.fields(ModelConfig)}
    # Like `megahybrid train` overrides, a bare model field (hidden_size) means model.hidden_size.
    overrides = {(f"model.{k}" if isinstance(k, str) and k.split(".")[0] not in top
                  and k.split(".")[0] in model_names else k): v for k, v in overrides.items()}
    overrides = _nested("overrides", overrides)
    try:  # checked (and its numbers parsed) once here, so a bad override is named as such
        base = load_config(_merge(base, overrides)).to_dict()
    except ConfigError as err:
        raise SweepError(f"{path}: overrides: {err}") from None

    default = base_source if isinstance(base_source, str) and LABEL.match(base_source) else "base"
    patterns = _read_labelled(path, doc, "patterns", default)
    sizes = _read_labelled(path, doc, "sizes", "base")
    for label, fields in sizes.items():
        if fields is None and "sizes" not in doc:
            continue  # no sizes: one entry keeping the base's widths
        if not isinstance(fields, dict):
            raise SweepError(f"{path}: sizes.{label}: must be a mapping of model fields, "
                             "e.g. {hidden_size: 64, num_layers: 2}")
        sizes[label] = _nested(f"sizes.{label}", fields)
        _check_model_keys(f"{path}: sizes.{label}", sizes[label])
    for label, layout in patterns.items():
        if layout is None and "patterns" not in doc:
            continue  # no patterns: one entry keeping the base's layout
        if isinstance(layout, dict):
            patterns[label] = _nested(f"patterns.{label}", layout)
            _check_model_keys(f"{path}: patterns.{label}", patterns[label])
        elif not isinstance(layout, str):
            raise SweepError(f"{path}: patterns.{label}={layout!r}: must be a pattern string, e.g. "
                             "'(*-)x{num_layers}', or a mapping of layout fields, e.g. {backbone: mamba2, ratio: [3, 1]}")

    grids = doc["grid"]
    grids = grids if isinstance(grids, list) else [grids]
    if not grids:
        raise SweepError(f"{path}: grid: empty list; give at least one grid mapping")
    sweep = Sweep(path=path, name=str(doc.get("name") or path.stem))
    seen: dict[str, str] = {}
    for g, grid in enumerate(grids):
        where = f"{path}: grid" + (f"[{g}]" if isinstance(doc["grid"], list) else "")
        for run in _expand(where, grid, patterns, sizes, base, ("patterns" in doc, "sizes" in doc)):
            if run.name in seen:
                raise SweepError(f"{where}: run {run.name} is also in {seen[run.name]}; each run must appear once")
            seen[run.name] = where.split(": ", 1)[1]
            run.index = len(sweep.runs)
            sweep.runs.append(run)
    return sweep


def _read_labelled(path: Path, doc: dict, key: str, default: str) -> dict:
    value = doc.get(key)
    if value is None:
        return {default: None}  # one entry keeping the base's layout / widths
    if not isinstance(value, dict) or not value:
        raise SweepError(f"{path}: {key}: must be a non-empty mapping label -> "
                         + ("layout, e.g. {transformer: '(*-)x{num_layers}'}" if key == "patterns"
                            else "model fields, e.g. {s: {hidden_size: 64, num_layers: 2}}"))
    return {_label(f"{path}: {key}", label): v for label, v in value.items()}


def _expand(where: str, grid: Any, patterns: dict, sizes: dict, base: dict, named: tuple[bool, bool]) -> list[Run]:
    """One grid mapping -> its runs (the product of its axes), each config resolved."""
    if not isinstance(grid, dict):
        raise SweepError(f"{where}: must be a mapping of axes ({', '.join(GRID_AXES)}), not {type(grid).__name__}")
    for key in grid:
        if key not in GRID_AXES:
            raise SweepError(f"{where}.{key}: unknown axis; {_did_you_mean(key, GRID_AXES)}")
    lengths = [k for k in LENGTH_AXES if k in grid]
    if len(lengths) != 1:
        raise SweepError(f"{where}: " + ("no run length; add one of budget (training FLOPs), tokens or steps, "
                                         "e.g. budget: [1e12]" if not lengths else
                                         f"{' and '.join(lengths)} both set; keep exactly one run length"))
    length_key = lengths[0]
    axis_patterns = [str(p) for p in _as_list(f"{where}.pattern", grid.get("pattern", list(patterns)))]
    axis_sizes = [str(s) for s in _as_list(f"{where}.size", grid.get("size", list(sizes)))]
    for axis, labels, known in (("pattern", axis_patterns, patterns), ("size", axis_sizes, sizes)):
        for label in labels:
            if label not in known:
                defined = f"the {axis}s defined: {', '.join(known)}" if named[axis == "size"] else \
                    f"no {axis}s are defined; add a top-level {axis}s: mapping"
                raise SweepError(f"{where}.{axis}: {label!r} is not defined; {defined}")
    lrs = [_number(f"{where}.lr", v) for v in _as_list(f"{where}.lr", grid.get("lr", base["train"]["lr"]))]
    values = [_number(f"{where}.{length_key}", v) for v in _as_list(f"{where}.{length_key}", grid[length_key])]
    if length_key == "steps" and any(v != int(v) for v in values):
        raise SweepError(f"{where}.steps={grid['steps']!r}: steps must be whole numbers")
    runs = []
    for pattern, size, lr, value in itertools.product(axis_patterns, axis_sizes, lrs, values):
        tag = {"budget": "c", "tokens": "d", "steps": "s"}[length_key]
        parts = [pattern] * named[0] + [size] * named[1] + [f"lr{_fmt_value(lr)}", f"{tag}{_fmt_value(value)}"]
        name = "-".join(parts)
        runs.append(_make_run(f"{where}: run {name}", name, pattern, size, lr, length_key, value,
                              patterns[pattern], sizes[size], base))
    return runs


def _make_run(where: str, name: str, pattern: str, size: str, lr: float, length_key: str, value: float,
              layout: Any, size_fields: dict | None, base: dict) -> Run:
    data = copy.deepcopy(base)
    size_fields = dict(size_fields or {})
    if layout is not None:
        reset = {k: None for k in LAYOUT_FIELDS}
        if isinstance(layout, str):
            num_layers = size_fields.pop("num_layers", None)
            try:
                text = layout.format(num_layers=num_layers) if "{" in layout else layout
            except (KeyError, IndexError, ValueError) as err:
                raise SweepError(f"{where}: patterns.{pattern}={layout!r}: bad placeholder {err}; the only one is "
                                 "{num_layers}, filled from the size") from None
            if "{num_layers}" in layout and num_layers is None:
                raise SweepError(f"{where}: patterns.{pattern} uses {{num_layers}} but sizes.{size} has no "
                                 "num_layers; add num_layers to the size")
            data["model"] = _merge(data["model"], {**reset, "pattern": text})
        else:
            data["model"] = _merge(data["model"], {**reset, **layout})
    data["model"] = _merge(data["model"], size_fields)
    # min_lr keeps the base's ratio to lr, so every lr of an lr sweep decays by the same factor.
    min_lr = lr * base["train"]["min_lr"] / base["train"]["lr"]
    data["train"] = {**data["train"], "lr": lr, "min_lr": min_lr,
                     "steps": max(1, int(value)) if length_key == "steps" else 1}
    data["name"] = name
    try:
        config = load_config(data)
    except ConfigError as err:
        raise SweepError(f"{where}: {err}") from None
    t = config.train
    forward = model_flops_per_token(config, t.seq_len)
    tokens_per_step = t.global_batch_size * t.seq_len
    if length_key == "budget":
        steps = round(value / (TRAIN_FACTOR * forward * tokens_per_step))
        fix = "raise the budget, drop this size or shrink train.global_batch_size x train.seq_len"
    elif length_key == "tokens":
        steps = round(value / tokens_per_step)
        fix = "raise tokens or shrink train.global_batch_size x train.seq_len"
    else:
        steps, fix = int(value), "raise steps"
    if steps < max(MIN_STEPS, t.warmup_steps + 1):
        raise SweepError(f"{where}: {length_key}={value:.3g} gives {steps} steps of {tokens_per_step} tokens, "
                         f"fewer than max({MIN_STEPS}, train.warmup_steps + 1 = {t.warmup_steps + 1}); {fix}")
    # The final validation loss is what the fits use: evaluate at least at the last step.
    eval_every = t.eval_every if t.eval_every > 0 else steps
    config = dataclasses.replace(config, train=dataclasses.replace(t, steps=steps, eval_every=eval_every))
    return Run(index=-1, name=name, pattern=pattern, size=size, lr=lr, config=config,
               budget=value if length_key == "budget" else None, forward_flops_per_token=forward)


# ----------------------------------------------------------------------------- running


def shared_data(run: Run, out_dir: Path) -> Run:
    """Point a run that trains on the embedded corpus at the sweep's one tokenized copy
    (DIR/.data/), preparing it on first use. A file lock makes Slurm array tasks that start
    together prepare it once."""
    from megahybrid.data import corpus, indexed
    from megahybrid.data.prepare import prepare

    d, vocab = run.config.data, run.config.model.vocab_size
    if d.paths is not None or d.tokenizer is not None:
        return run
    data_dir = out_dir / ".data"
    data_dir.mkdir(parents=True, exist_ok=True)
    prefix = data_dir / f"{corpus.NAME}-{d.corpus_bytes or 'all'}-v{vocab}"
    tokenizer = Path(f"{prefix}.tokenizer.json")
    with open(data_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (indexed.exists(prefix) and tokenizer.is_file()):
            start = time.time()
            prepare([], str(prefix), None, vocab, corpus_bytes=d.corpus_bytes)
            print(f"tokenized the {corpus.NAME} corpus for the sweep -> {prefix}.bin "
                  f"({time.time() - start:.1f}s)", flush=True)
    data = dataclasses.replace(d, paths=[str(prefix)], tokenizer=str(tokenizer))
    return dataclasses.replace(run, config=dataclasses.replace(run.config, data=data))


def train_run(run: Run, out_dir: Path) -> tuple[str, str]:
    """Train one run in DIR/<name>/ (resuming if it was interrupted) and write its summary.json.
    Returns (status, detail): ("done", loss), ("stopped", why) after a preemption signal, or
    ("failed", reason)."""
    from megahybrid.train.run import train_from_cli

    run_dir = out_dir / run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    run = shared_data(run, out_dir)
    try:
        with open(run_dir / "train.log", "a") as log, contextlib.redirect_stdout(log), \
                contextlib.redirect_stderr(log):
            code = train_from_cli(run.config, str(run_dir), [])
    except Exception as err:  # one failed run must not end a sweep of many; the log has the traceback
        with open(run_dir / "train.log", "a") as log:
            traceback.print_exc(file=log)
        return "failed", f"{type(err).__name__}: {err}".splitlines()[0]
    if code != 0:
        return "failed", f"exit code {code}; see {run_dir / 'train.log'}"
    if _trained_steps(run_dir) < run.config.train.steps:  # SIGTERM/SIGUSR1: checkpointed, exited 0
        return "stopped", f"preempted at step {_trained_steps(run_dir)}; re-run to resume"
    if os.environ.get("RANK", "0") != "0":  # under torchrun every rank trains; rank 0 writes the summary
        return "done", "(not rank 0)"
    try:
        summary = write_summary(run, run_dir)
    except SweepError as err:
        return "failed", str(err)
    return "done", f"{summary['final_loss']:.4f}"


def _trained_steps(run_dir: Path) -> int:
    from megahybrid.train import checkpoint

    found = checkpoint.find_latest(run_dir / "checkpoints", warn=lambda msg: None)
    return found[1]["step"] if found else 0


def summarize(run: Run, run_dir: Path) -> dict:
    """summary.json of a finished run: the fields `megahybrid fit` reads (scaling/cli.py) plus
    the run's axes and where its numbers came from."""
    from megahybrid.describe import describe

    info = describe(run.config)
    embedding = info["embedding_params"] + info["head_params"]  # input embedding and LM head (untied)
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    steps = run.config.train.steps
    last = rows[-1] if rows else {}
    if last.get("step") != steps or last.get("valid_loss") is None:
        raise SweepError(f"{path}: no validation loss at the final step {steps} (last line: step "
                         f"{last.get('step')}); raise data.valid_fraction so the run has a validation split")
    return {
        "name": run.name,
        "pattern": run.pattern,
        "params": info["total_params"] - embedding,
        "flops_per_token": TRAIN_FACTOR * run.forward_flops_per_token,
        "tokens": last["tokens"],
        "final_loss": last["valid_loss"],
        "budget": run.budget,
        "layout": info["pattern"],
        "size": run.size,
        "lr": run.lr,
        "steps": steps,
        "total_params": info["total_params"],
        "embedding_params": embedding,
        "forward_flops_per_token": run.forward_flops_per_token,
        "final_train_loss": next((r["loss"] for r in reversed(rows) if r.get("loss") is not None), None),
        "train_seconds": last.get("elapsed"),
        "notes": "params: non-embedding (total - input embedding - LM head); flops_per_token: training "
                 "FLOPs = 3 x forward (megahybrid.flops, causal attention); final_loss: validation loss "
                 "at the last step",
    }


def write_summary(run: Run, run_dir: Path) -> dict:
    summary = summarize(run, run_dir)
    tmp = run_dir / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(run_dir / "summary.json")  # atomic: a summary.json is always a whole one
    return summary


def read_summary(run_dir: Path) -> dict | None:
    path = run_dir / "summary.json"
    try:
        return json.loads(path.read_text()) if path.exists() else None
    except json.JSONDecodeError:
        return None  # torn by hand or a full disk: the run is redone


def stale_keys(run: Run, run_dir: Path) -> list[str]:
    """Config keys that differ between the run's saved config.yaml and the sweep's run now."""
    from megahybrid.train.checkpoint import config_yaml

    saved_path = run_dir / "config.yaml"
    if not saved_path.exists():
        return []
    saved, now = yaml.safe_load(saved_path.read_text()), yaml.safe_load(config_yaml(run.config))

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    a, b = flat(saved), flat(now)
    shared = ("data.paths", "data.tokenizer")  # set to the sweep's DIR/.data/ copy when the run starts
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k) and k not in shared)


# ---------------------------------------------------------------------------- progress


def _si(x: float | None) -> str:
    if x is None:
        return "-"
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def _params(run: Run) -> int:
    from megahybrid.describe import describe

    info = describe(run.config)
    return info["total_params"] - info["embedding_params"] - info["head_params"]


def progress_table(runs: list[Run], status: dict[str, tuple[str, str]], params: dict[str, int]) -> str:
    """One line per run: name, params, steps, tokens, FLOPs, status, validation loss."""
    width = max(len(r.name) for r in runs)
    lines = [f"{'#':>3}  {'run':<{width}}  {'params':>7}  {'steps':>6}  {'tokens':>7}  {'FLOPs':>8}  "
             f"{'status':<8}  loss / note"]
    for r in runs:
        state, detail = status.get(r.name, ("pending", ""))
        lines.append(f"{r.index:>3}  {r.name:<{width}}  {_si(params[r.name]):>7}  {r.config.train.steps:>6}  "
                     f"{_si(r.tokens):>7}  {r.flops:>8.2e}  {state:<8}  {detail}")
    return "\n".join(lines)


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def run_sweep(sweep: Sweep, out_dir: Path, say=print) -> int:
    """Train every run of `sweep` without a summary.json, one after another, printing the
    progress table after each. Returns 0, or 1 if any run failed (the others still ran)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    params = {r.name: _params(r) for r in sweep.runs}
    status: dict[str, tuple[str, str]] = {}
    for r in sweep.runs:
        summary = read_summary(out_dir / r.name)
        if summary is not None:
            status[r.name] = ("skipped", f"{summary['final_loss']:.4f} (finished before)")
    todo = [r for r in sweep.runs if r.name not in status]
    say(f"sweep {sweep.name}: {len(sweep.runs)} runs, {len(status)} finished before, {len(todo)} to train now "
        f"in {out_dir}", flush=True)
    stale = {r.name: keys for r in sweep.runs if r.name in status and (keys := stale_keys(r, out_dir / r.name))}
    if stale:
        keys = sorted({k for ks in stale.values() for k in ks})
        say(f"note: {len(stale)} finished run(s) trained with another config than the sweep file gives now "
            f"({', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''}; e.g. {next(iter(stale))}); kept; "
            "delete a run's directory to retrain it")
    # ETA from steps, not FLOPs: small models are overhead-bound, so time follows the step count.
    start, steps_done = time.time(), 0
    for i, r in enumerate(todo, 1):
        say(f"\n[{i}/{len(todo)}] {r.name}: {r.config.train.steps} steps; log: {out_dir / r.name / 'train.log'}",
            flush=True)
        status[r.name] = train_run(r, out_dir)
        if status[r.name][0] == "stopped":  # preempted: stop the sweep too, like `megahybrid train`
            say(progress_table(sweep.runs, status, params), flush=True)
            say(f"megahybrid sweep: stopped during {r.name} ({status[r.name][1]}); re-run the same "
                "command to continue (finished runs are skipped)", flush=True)
            return 0
        steps_done += r.config.train.steps
        elapsed = time.time() - start
        rest = sum(q.config.train.steps for q in todo[i:])
        eta = f", about {_clock(elapsed / steps_done * rest)} to go" if rest else ""
        say(progress_table(sweep.runs, status, params), flush=True)
        say(f"{i}/{len(todo)} trained in {_clock(elapsed)}{eta}", flush=True)
    failed = [name for name, (state, _) in status.items() if state == "failed"]
    if failed:
        say(f"megahybrid sweep: {len(failed)} run(s) failed: {', '.join(failed)}; their train.log says why; "
            "fix and re-run the same command (finished runs are skipped)", flush=True)
        return 1
    if not todo:
        say(progress_table(sweep.runs, status, params), flush=True)
    say(f"all runs finished; fit them: megahybrid fit {out_dir} --out {out_dir / 'fits'}", flush=True)
    return 0


# --------------------------------------------------------------------------------- Slurm


def submit_array(sweep: Sweep, out_dir: Path, pending: list[int], launch_args: list[str]) -> int:
    """Render (and, without --dry-run, submit) a Slurm job array through `megahybrid launch`:
    array task I runs `megahybrid sweep SWEEP.yaml --out DIR --task I` under launch/torchrun.sh,
    so a preempted task checkpoints, prints "preempted:" and is requeued like any `launch` job."""
    from megahybrid.launch import slurm_array

    command = ["megahybrid", "sweep", str(sweep.path.resolve()), "--out", str(out_dir.resolve()),
               "--task", "$SLURM_ARRAY_TASK_ID"]
    try:
        return slurm_array(command, pending, launch_args)
    except ConfigError as err:  # LaunchError: a bad Slurm option
        raise SweepError(f"--slurm: {err}") from None


# ----------------------------------------------------------------------------------- CLI


def sweep_from_cli(args: argparse.Namespace) -> int:
    """`megahybrid sweep SWEEP.yaml --out DIR [--dry-run | --task I | --slurm ...]`."""
    out_dir = Path(args.out)
    try:
        sweep = load_sweep(args.sweep)
        if args.dry_run:
            params = {r.name: _params(r) for r in sweep.runs}
            status = {r.name: ("done", f"{s['final_loss']:.4f}") for r in sweep.runs
                      if (s := read_summary(out_dir / r.name)) is not None}
            print(progress_table(sweep.runs, status, params))
            total = sum(r.flops for r in sweep.runs if r.name not in status)
            print(f"{len(sweep.runs)} runs, {len(sweep.runs) - len(status)} to train, {total:.3g} training FLOPs")
            _warn_isoflop(sweep)
            return 0
        _warn_isoflop(sweep)
        if args.task is not None:
            if not 0 <= args.task < len(sweep.runs):
                raise SweepError(f"--task={args.task}: the sweep has runs 0..{len(sweep.runs) - 1}")
            return run_task(sweep, out_dir, args.task)
        if args.slurm is not None:
            pending = [r.index for r in sweep.runs if read_summary(out_dir / r.name) is None]
            if not pending:
                print("megahybrid sweep: every run has a summary.json; nothing to submit")
                return 0
            if "--dry-run" not in args.slurm:  # tokenize once, before the tasks start
                for i in pending:
                    shared_data(sweep.runs[i], out_dir)
            return submit_array(sweep, out_dir, pending, args.slurm)
        return run_sweep(sweep, out_dir)
    except SweepError as err:
        print(f"megahybrid sweep: {err}", file=sys.stderr)
        return 2


def run_task(sweep: Sweep, out_dir: Path, index: int) -> int:
    """One Slurm array element: train run `index` unless it already has a summary.json."""
    run = sweep.runs[index]
    if read_summary(out_dir / run.name) is not None:
        print(f"{run.name}: finished before (summary.json exists); nothing to do")
        return 0
    state, detail = train_run(run, out_dir)
    if state == "stopped":  # slurm.sbatch requeues a job whose log has a line starting "preempted:"
        print(f"preempted: {run.name}: {detail}", flush=True)
    else:
        print(f"{run.name}: {state} {detail}", flush=True)
    return 0 if state in ("done", "stopped") else 1


def _warn_isoflop(sweep: Sweep) -> None:
    """Approach 2 needs >= 3 sizes per (pattern, budget); say so before anything trains."""
    groups: dict[tuple[str, float], set[str]] = {}
    for r in sweep.runs:
        if r.budget is not None:
            groups.setdefault((r.pattern, r.budget), set()).add(r.size)
    thin = [f"{p} at C={c:.3g} ({len(s)})" for (p, c), s in sorted(groups.items()) if len(s) < 3]
    if thin:
        print(f"note: approach 2 (IsoFLOP) needs >= 3 sizes per pattern and budget; fewer for "
              f"{', '.join(thin)}: fit with approaches 1 and 3 or add sizes", file=sys.stderr)
