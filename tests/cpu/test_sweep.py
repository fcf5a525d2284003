"""`megahybrid sweep`: a micro sweep (2 patterns x 3 sizes x 2 IsoFLOP budgets) trains, is resumable
(a second invocation trains nothing), writes summary.json fields that match the model and the
FLOP counter computed here independently, and `megahybrid fit` reads it; bad sweep files give
one-line errors naming the key.

Runs use 1 thread, a 300 KB slice of the embedded corpus and 25-150 steps of 4 x 32 tokens.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

import megahybrid
from megahybrid import flops
from megahybrid.cli import main
from megahybrid.scaling.cli import fit_from_cli, load_records
from megahybrid.scaling.sweep import SweepError, load_sweep

ROOT = Path(__file__).resolve().parents[2]
BUDGETS = (1e9, 2e9)
"""Training FLOPs per run: 25-150 steps of 4 x 32 tokens for the sizes below."""

MICRO = f"""
name: micro
overrides:
  model.vocab_size: 512
  model.max_seq_len: 32
  model.attention: {{num_heads: 2, num_kv_heads: 2}}
  model.mamba2: {{state_size: 8, head_dim: 8, chunk_size: 16}}
  model.mlp.ffn_hidden_size: null
  train: {{seq_len: 32, micro_batch_size: 4, global_batch_size: 4, lr: 3e-3, min_lr: 3e-4,
          warmup_steps: 2, log_every: 5, eval_every: 5, eval_batches: 2, save_every: 0, threads: 1}}
  data: {{corpus_bytes: 300000, valid_fraction: 0.2}}
patterns:
  transformer: "(*-)x{{num_layers}}"
  hybrid: {{backbone: mamba2, ratio: [1, 1], mlp_after_mixer: mlp}}
sizes:
  a: {{hidden_size: 16, num_layers: 2}}
  b: {{hidden_size: 24, num_layers: 2}}
  c: {{hidden_size: 32, num_layers: 2}}
grid:
  budget: [{BUDGETS[0]}, {BUDGETS[1]}]
"""


@pytest.fixture(autouse=True)
def keep_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """The micro sweep, trained once: (sweep file, sweep dir, stdout of the first invocation)."""
    root = tmp_path_factory.mktemp("sweep")
    path = root / "micro.yaml"
    path.write_text(MICRO)
    out = root / "out"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["sweep", str(path), "--out", str(out)])
    assert code == 0, buf.getvalue()
    return path, out, buf.getvalue()


def test_micro_sweep_trains_every_run(micro):
    path, out, log = micro
    runs = load_sweep(path).runs
    assert [r.name for r in runs] == [f"{p}-{s}-lr0.003-{c}" for p in ("transformer", "hybrid") for s in "abc"
                                      for c in ("c1e9", "c2e9")]
    for r in runs:
        assert (out / r.name / "summary.json").is_file(), r.name
        assert (out / r.name / "train.log").read_text().count("done:") == 1
    # The progress table is printed after each run: 12 tables, the last with every run done.
    assert log.count("loss / note") == 12
    assert log.split("loss / note")[-1].count(" done ") == 12
    assert "12 to train now" in log


def test_summary_fields_match_model_and_flop_counter(micro):
    path, out, _ = micro
    for r in load_sweep(path).runs:
        summary = json.loads((out / r.name / "summary.json").read_text())
        config = megahybrid.load_config(str(out / r.name / "config.yaml"))
        model = megahybrid.build_model(config)
        non_embedding = sum(p.numel() for n, p in model.named_parameters()
                            if not n.startswith(("embedding.", "lm_head.")))
        t = config.train
        forward = flops.model_flops_per_token(config, t.seq_len)
        steps = round(r.budget / (3 * forward * t.global_batch_size * t.seq_len))
        rows = [json.loads(line) for line in (out / r.name / "metrics.jsonl").read_text().splitlines()]
        assert summary["name"] == r.name and summary["pattern"] == r.pattern
        assert summary["params"] == non_embedding
        assert summary["total_params"] == sum(p.numel() for p in model.parameters())
        assert summary["flops_per_token"] == pytest.approx(3 * forward, rel=1e-12)
        assert t.steps == steps == summary["steps"] and rows[-1]["step"] == steps
        assert summary["tokens"] == steps * t.global_batch_size * t.seq_len
        assert summary["final_loss"] == rows[-1]["valid_loss"]
        assert summary["budget"] == r.budget in BUDGETS
        assert summary["flops_per_token"] * summary["tokens"] == pytest.approx(r.budget, rel=0.1)
        # The layout the label stands for, and min_lr keeping the base's 0.1 ratio to lr.
        assert summary["layout"] == ("*-*-" if r.pattern == "transformer" else "M-*-")
        assert t.min_lr == pytest.approx(0.1 * t.lr)
    # Every run tokenized nothing itself: all point at the sweep's one copy of the corpus.
    assert len(list((out / ".data").glob("*.bin"))) == 1
    assert not any((out / r.name / "data").exists() for r in load_sweep(path).runs)


def test_second_invocation_trains_nothing(micro, monkeypatch, capsys):
    path, out, _ = micro
    calls = []
    import megahybrid.train.run as train_run

    real = train_run.train_from_cli
    monkeypatch.setattr(train_run, "train_from_cli", lambda *a, **k: calls.append(a) or real(*a, **k))
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*/summary.json")}
    assert len(mtimes) == 12
    assert main(["sweep", str(path), "--out", str(out)]) == 0
    assert calls == []
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/summary.json")} == mtimes
    text = capsys.readouterr().out
    assert "12 finished before, 0 to train now" in text and text.count(" skipped ") == 12


def test_changed_sweep_file_keeps_finished_runs_and_says_so(micro, tmp_path, capsys):
    _, out, _ = micro
    changed = tmp_path / "micro.yaml"
    changed.write_text(MICRO.replace("eval_batches: 2", "eval_batches: 3"))
    assert main(["sweep", str(changed), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "12 finished before, 0 to train now" in text
    assert "note: 12 finished run(s) trained with another config than the sweep file gives now " \
           "(train.eval_batches;" in text


def test_lost_summary_is_rewritten_without_retraining(micro, monkeypatch, capsys):
    """A run whose training finished but whose summary.json is gone (killed in between) is
    re-entered: the trainer finds the final checkpoint and does nothing; the summary comes back."""
    path, out, _ = micro
    run = out / "hybrid-b-lr0.003-c1e9"
    before = json.loads((run / "summary.json").read_text())
    checkpoints = sorted((run / "checkpoints").iterdir())
    (run / "summary.json").unlink()
    calls = []
    import megahybrid.train.run as train_run

    real = train_run.train_from_cli
    monkeypatch.setattr(train_run, "train_from_cli", lambda *a, **k: calls.append(a) or real(*a, **k))
    assert main(["sweep", str(path), "--out", str(out)]) == 0
    assert len(calls) == 1
    assert "nothing to do" in (run / "train.log").read_text()
    assert sorted((run / "checkpoints").iterdir()) == checkpoints
    assert json.loads((run / "summary.json").read_text()) == before


def test_fit_reads_the_sweep(micro, tmp_path, capsys):
    _, out, _ = micro
    records = load_records(out)
    finals = [r for r in records if r.get("budget") in BUDGETS]
    assert len(finals) == 12 and {r["pattern"] for r in finals} == {"transformer", "hybrid"}
    assert len(records) > 12  # validation losses every 5 steps in metrics.jsonl: curves for approach 1
    assert all(r["loss"] > 1 for r in records)
    # Three sizes at one budget: approach 3 fits. Approaches 1 and 2 need more FLOP range than a
    # micro sweep has (the demo sweep has it); `megahybrid fit` says what is missing.
    assert fit_from_cli(out, tmp_path / "fits", approaches=(3,), n_boot=5) == 0
    fits = json.loads((tmp_path / "fits" / "fits.json").read_text())
    assert set(fits["patterns"]) == {"transformer", "hybrid"}
    assert "skipped" not in capsys.readouterr().err  # .data/ is not taken for an unfinished run
    assert main(["fit", str(out), "--out", str(tmp_path / "fits2")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("megahybrid fit: approach ") and err.count("\n") == 1


def test_dry_run_plans_without_training(tmp_path, capsys):
    path = tmp_path / "micro.yaml"
    path.write_text(MICRO)
    assert main(["sweep", str(path), "--out", str(tmp_path / "out"), "--dry-run"]) == 0
    assert not (tmp_path / "out").exists()
    assert "12 runs, 12 to train" in capsys.readouterr().out


# ------------------------------------------------------------------------- shipped sweeps


def test_shipped_sweeps_resolve():
    demo = load_sweep(ROOT / "configs/sweeps/demo_cpu.yaml")
    groups: dict = {}
    for r in demo.runs:
        groups.setdefault((r.pattern, r.budget), set()).add(r.size)
    assert {p for p, _ in groups} == {"transformer", "hybrid"}
    assert len({c for _, c in groups}) >= 2 and all(len(s) >= 3 for s in groups.values())
    exp7 = load_sweep(ROOT / "configs/sweeps/exp7_lr.yaml")
    assert sorted(r.lr for r in exp7.runs) == [3e-4, 6e-4, 1e-3, 2e-3]
    from megahybrid.describe import describe

    info = describe(exp7.runs[0].config)
    assert info["pattern"] == "d-d-d-*-d-d-d-*-d-d-d-*-"  # the preset's layout and sizes, unchanged
    assert info["total_params"] == describe(megahybrid.load_config("exp7_deltanet_188m"))["total_params"]
    assert {r.pattern for r in exp7.runs} == {"exp7_deltanet_188m"}
    assert {(r.config.train.global_batch_size, r.config.train.seq_len) for r in exp7.runs} == {(32, 1024)}
    assert all(r.config.train.min_lr == pytest.approx(r.lr / 10) for r in exp7.runs)


# ------------------------------------------------------------------------------ bad input


BAD = {
    "unknown top-level key": ("grids:\n  steps: [10]\n", "grids: unknown key; did you mean grid?"),
    "no grid": ("patterns: {t: '(*-)x2'}\n", "grid: missing"),
    "no run length": ("grid: {lr: [1e-3]}\n", "no run length; add one of budget"),
    "two run lengths": ("grid: {steps: [30], tokens: [1e5]}\n", "tokens and steps both set"),
    "unknown axis": ("grid: {steps: [30], sizes: [a]}\n", "grid.sizes: unknown axis; did you mean size?"),
    "undefined size": ("sizes: {a: {hidden_size: 32}}\ngrid: {steps: [30], size: [a, b]}\n",
                       "grid.size: 'b' is not defined; the sizes defined: a"),
    "size without sizes": ("grid: {steps: [30], size: [a]}\n", "no sizes are defined"),
    "bad model field": ("sizes: {a: {hidden_sise: 32}}\ngrid: {steps: [30]}\n",
                        "sizes.a.hidden_sise: not a model field; did you mean hidden_size?"),
    "placeholder without num_layers": ("patterns: {t: '(*-)x{num_layers}'}\nsizes: {a: {hidden_size: 32}}\n"
                                       "grid: {steps: [30]}\n", "sizes.a has no num_layers"),
    "unknown placeholder": ("patterns: {t: '(*-)x{depth}'}\ngrid: {steps: [30]}\n", "bad placeholder 'depth'"),
    "bad override value": ("overrides: {train.lr: fast}\ngrid: {steps: [30]}\n",
                           "overrides: train.lr='fast': must be a number"),
    "bad config from size": ("sizes: {a: {hidden_size: -8}}\ngrid: {steps: [30]}\n",
                             "run a-lr0.003-s30: model.hidden_size=-8: must be positive"),
    "budget too small": ("grid: {budget: [1e6]}\n", "budget=1e+06 gives 0 steps"),
    "negative lr": ("grid: {steps: [30], lr: [-1e-3]}\n", "grid.lr='-1e-3': must be a finite number > 0"),
    "bad label": ("patterns: {'a/b': '*-'}\ngrid: {steps: [30]}\n", "label 'a/b' must be letters"),
    "bad pattern value": ("patterns: {t: 5}\ngrid: {steps: [30]}\n", "patterns.t=5: must be a pattern string"),
    "not yaml": ("grid: [\n", "not valid YAML"),
    "not a mapping": ("- 1\n- 2\n", "holds a list; a sweep file is a mapping"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_sweep_file_is_one_line_error(case, tmp_path, capsys):
    text, expected = BAD[case]
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SweepError) as err:
        load_sweep(path)
    assert expected in str(err.value)
    assert main(["sweep", str(path), "--out", str(tmp_path / "out")]) == 2
    stderr = capsys.readouterr().err.strip()
    assert stderr.startswith("megahybrid sweep: ") and expected in stderr and "\n" not in stderr
    assert not (tmp_path / "out").exists()


def test_missing_sweep_file(tmp_path, capsys):
    assert main(["sweep", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "out")]) == 2
    assert "no such sweep file" in capsys.readouterr().err


def test_run_names_do_not_collide_across_grids(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("grid:\n  - {steps: [30]}\n  - {steps: [30, 40]}\n")
    with pytest.raises(SweepError, match=r"grid\[1\]: run lr0.003-s30 is also in grid\[0\]"):
        load_sweep(path)


# ---------------------------------------------------------------------------- Slurm arrays


def test_slurm_array_covers_only_unfinished_runs(tmp_path, capsys):
    """`--slurm ... --dry-run` renders `megahybrid launch slurm`'s array script: one task per run
    without summary.json, each running `megahybrid sweep SWEEP --out DIR --task <id>`."""
    path = tmp_path / "micro.yaml"
    path.write_text(MICRO)
    out = tmp_path / "out"
    runs = load_sweep(path).runs
    for r in (runs[0], runs[3]):
        (out / r.name).mkdir(parents=True)
        (out / r.name / "summary.json").write_text(json.dumps({"final_loss": 5.0}))
    code = main(["sweep", str(path), "--out", str(out), "--slurm", "--nodes", "1", "--gpus-per-node", "0",
                 "--time", "1:00:00", "--dry-run"])
    script = capsys.readouterr().out
    assert code == 0
    pending = [r.index for r in runs if r.index not in (0, 3)]
    assert f"#SBATCH --array={','.join(map(str, pending))}\n" in script
    assert f"sweep {path.resolve()} --out {out.resolve()} --task '{{task}}'" in script
    assert not (out / ".data").exists()  # a dry run prepares nothing


def test_slurm_options_error_is_one_line(tmp_path, capsys):
    path = tmp_path / "micro.yaml"
    path.write_text(MICRO)
    assert main(["sweep", str(path), "--out", str(tmp_path / "out"), "--slurm", "--gpus-per-node", "1",
                 "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("megahybrid sweep: --slurm: ") and "--nodes" in err and "\n" not in err


def test_task_trains_one_run(tmp_path, capsys):
    """What one array task runs: only run TASK trains; a second call finds it finished."""
    path = tmp_path / "micro.yaml"
    path.write_text(MICRO)
    out = tmp_path / "out"
    run = load_sweep(path).runs[5]
    assert main(["sweep", str(path), "--out", str(out), "--task", "5"]) == 0
    assert [p.parent.name for p in out.glob("*/summary.json")] == [run.name]
    assert main(["sweep", str(path), "--out", str(out), "--task", "5"]) == 0
    assert "finished before" in capsys.readouterr().out
    assert main(["sweep", str(path), "--out", str(out), "--task", "12"]) == 2
    assert "--task=12: the sweep has runs 0..11" in capsys.readouterr().err
