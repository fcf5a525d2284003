"""`megahybrid fit`: read run records, fit per pattern, write the report.

Input is either

- a JSON file holding a list of run records, or a JSONL file with one record per line
  (the record format is in `megahybrid/scaling/fit.py`'s docstring), or
- a sweep directory with one subdirectory per run. A run is read from its ``summary.json``,
  which the sweep writes when the run finishes:

      {"name": "hybrid-n4M-c1e15",   # run name, unique in the sweep
       "pattern": "MMM*",            # layer pattern (one fit per pattern)
       "params": 4.2e6,              # N: NON-EMBEDDING parameters
       "flops_per_token": 2.6e7,     # training FLOPs (forward + backward) per token
       "tokens": 3.8e7,              # D: tokens trained on in total
       "final_loss": 3.12,           # validation loss at the end (what the fits use)
       "budget": 1e15}               # optional: the nominal IsoFLOP budget of the run

  plus, if present, its ``metrics.jsonl`` (lines ``{"step", "loss", "tokens"}``, some with
  ``"valid_loss"``): every line before the final token count becomes a checkpoint point with
  C = flops_per_token * tokens, used by approach 1 (the loss envelope). When any line has a
  valid_loss, only those lines are used, with that loss: the final point is a validation loss,
  and training losses (one batch each, other text) would make each curve jump at its end.
  A run directory without summary.json (unfinished, or config.yaml only) is skipped with a
  note on stderr; a subdirectory with neither file is not a run (the sweep's .data/, a fits/
  output) and is passed over silently.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Sequence

from megahybrid.scaling.fit import FitError, fit_scaling_laws
from megahybrid.scaling.report import write_report

SUMMARY_KEYS = ("name", "pattern", "params", "flops_per_token", "tokens", "final_loss")


def fit_from_cli(run_dir_or_json, out_dir, budget: float | None = None,
                 approaches: Sequence[int] = (1, 2, 3), n_boot: int = 200) -> int:
    """Fit the runs in `run_dir_or_json`, write the report into `out_dir`, print the table.
    Returns 0, or 2 after a one-line error on stderr."""
    try:
        records = load_records(run_dir_or_json)
        fits = fit_scaling_laws(records, approaches=approaches, n_boot=n_boot)
        paths = write_report(fits, out_dir, budget)
    except (FitError, FileNotFoundError) as err:
        print(f"megahybrid fit: {err}", file=sys.stderr)
        return 2
    print(paths["fits.md"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def load_records(source) -> list[dict]:
    """A .json/.jsonl file of records or a sweep directory -> list of record dicts."""
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory; give a sweep directory or a .json/.jsonl file of run records")
    if path.is_dir():
        return read_sweep_dir(path)
    try:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        records = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise FitError(f"{path}: not valid JSON ({err}); expected a JSON list or JSONL of run records") from None
    if not isinstance(records, list):
        raise FitError(f"{path}: holds a {type(records).__name__}; expected a JSON list of run records")
    return records


def read_sweep_dir(sweep: Path) -> list[dict]:
    """Records of every finished run (subdirectory with summary.json) of a sweep."""
    records, skipped, seen = [], [], {}
    for run in sorted(p for p in sweep.iterdir() if p.is_dir()):
        if not (run / "summary.json").exists() and not (run / "config.yaml").exists():
            continue  # not a run directory
        if not (run / "summary.json").exists():
            skipped.append(run.name)
            continue
        run_records = read_run(run)
        name = run_records[0]["name"]
        if name in seen:  # points of one name are one training curve
            raise FitError(f"{run / 'summary.json'}: name={name!r} is also the name of {seen[name]}; "
                           "give every run of the sweep its own name")
        seen[name] = run
        records += run_records
    if skipped:
        print(f"megahybrid fit: skipped {len(skipped)} run(s) without summary.json (unfinished?): "
              + ", ".join(skipped), file=sys.stderr)
    if not records:
        raise FitError(f"{sweep}: no run subdirectory has a summary.json; run the sweep first "
                       f"(each run writes {{{', '.join(SUMMARY_KEYS)}}})")
    return records


def read_run(run: Path) -> list[dict]:
    """One run directory -> its checkpoint records (metrics.jsonl) and its final record."""
    summary = json.loads((run / "summary.json").read_text())
    missing = [k for k in SUMMARY_KEYS if k not in summary]
    if missing:
        raise FitError(f"{run / 'summary.json'}: missing {', '.join(missing)}; "
                       f"a summary needs {', '.join(SUMMARY_KEYS)}")
    base = {"name": summary["name"], "pattern": summary["pattern"], "params": summary["params"]}
    if summary.get("budget") is not None:
        base["budget"] = summary["budget"]
    fpt, total = float(summary["flops_per_token"]), float(summary["tokens"])
    records = []
    metrics = run / "metrics.jsonl"
    if metrics.exists():
        rows = []
        for lineno, line in enumerate(metrics.read_text().splitlines(), 1):
            try:
                rows.append(json.loads(line) if line.strip() else {})
            except json.JSONDecodeError:
                raise FitError(f"{metrics}:{lineno}: not a JSON line; each line is {{\"step\", \"loss\", \"tokens\"}}") from None
        key = "valid_loss" if any(row.get("valid_loss") is not None for row in rows) else "loss"
        for row in rows:
            if row.get(key) is not None and row.get("tokens") and 0 < float(row["tokens"]) < total:
                # Checkpoint points have no budget: they are not final points of an IsoFLOP run.
                records.append({**base, "budget": None, "tokens": float(row["tokens"]),
                                "flops": fpt * float(row["tokens"]), "loss": float(row[key])})
    records.append({**base, "tokens": total, "flops": fpt * total, "loss": summary["final_loss"]})
    return records
