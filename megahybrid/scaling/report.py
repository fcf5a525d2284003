"""Write the fits of `fit.fit_scaling_laws`: fits.json, fits.md and three PNG plots.

Plots (one colour per pattern): loss_vs_flops.png (each size's losses against FLOPs, the
approach-1 envelope and the approach-3 loss frontier), isoflop.png (approach-2 parabolas)
and frontier.png (N_opt and D_opt against C from all three approaches, approach 3 with its
bootstrap band). Figures are drawn on matplotlib's Agg canvas without pyplot, so writing a
report does not switch the backend of a notebook that imports this module.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from megahybrid.scaling.fit import PatternFit, group_by_run

K_SPREAD = 1.1
"""fits.md notes a pattern whose C / (N D) varies by more than this factor across its runs."""

APPROACH_STYLE = {"approach1": ":", "approach2": "--", "approach3": "-"}


def write_report(fits: dict[str, PatternFit], out_dir, budget: float | None = None) -> dict[str, Path]:
    """Write fits.json, fits.md, loss_vs_flops.png, isoflop.png, frontier.png into out_dir;
    returns {file name: path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in
             ("fits.json", "fits.md", "loss_vs_flops.png", "isoflop.png", "frontier.png")}
    doc = {"budget": budget, "patterns": {p: f.to_dict(budget) for p, f in fits.items()}}
    paths["fits.json"].write_text(json.dumps(_finite(doc), indent=2) + "\n")
    paths["fits.md"].write_text(format_table(fits, budget))
    colours = pattern_colours(fits)
    for name, draw in (("loss_vs_flops.png", plot_loss_vs_flops), ("isoflop.png", plot_isoflop),
                       ("frontier.png", plot_frontier)):
        fig = draw(fits, colours, budget)
        fig.savefig(paths[name], dpi=120)
    return paths


def pattern_colours(fits: dict[str, PatternFit]) -> dict[str, str]:
    """One tab10 colour per pattern, in sorted order (stable across reports)."""
    return {p: f"C{i % 10}" for i, p in enumerate(sorted(fits))}


# ------------------------------------------------------------------------------ table


def format_table(fits: dict[str, PatternFit], budget: float | None = None) -> str:
    """Markdown: exponents of N_opt ∝ C^a and D_opt ∝ C^b per approach, the approach-3
    parameters with bootstrap intervals, and the compute-optimal N, D at `budget`."""
    lines = ["# Scaling-law fits", "",
             "N_opt ∝ C^a, D_opt ∝ C^b (Chinchilla approaches 1-3); "
             "L(N, D) = E + A/N^α + B/D^β (approach 3) with bootstrap intervals.", "",
             "| pattern | runs | a (1) | b (1) | a (2) | b (2) | a (3) | E | A | B | α | β |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for pattern in sorted(fits):
        f = fits[pattern]
        row = [f"`{pattern}`", str(len(group_by_run(f.points)))]
        for fit in (f.approach1, f.approach2):
            row += ["–", "–"] if fit is None else [f"{fit.n_opt.exponent:.3f}", f"{fit.d_opt.exponent:.3f}"]
        p3 = f.approach3
        if p3 is None:
            row += ["–"] * 6
        else:
            ci = p3.ci()
            row += [_with_ci(p3.a, ci["a"], ".3f")] + [
                _with_ci(getattr(p3, k), ci[k], ".3g" if k in "EAB" else ".3f")
                for k in ("E", "A", "B", "alpha", "beta")]
        lines.append("| " + " | ".join(row) + " |")
    extrapolated = {p: [f"{s.budget:.3g}" for s in f.approach2.slices if not s.bracketed]
                    for p, f in sorted(fits.items()) if f.approach2 is not None}
    for pattern, budgets in extrapolated.items():
        if budgets:
            lines += ["", f"Approach 2, `{pattern}`: the parabola's minimum lies outside the sizes trained "
                      f"(extrapolated) at C = {', '.join(budgets)}; add sizes there to bracket the optimum."]
    for pattern in sorted(fits):
        lo, hi = fits[pattern].k_range()
        if hi > K_SPREAD * lo:
            lines += ["", f"`{pattern}`: C / (N D) ranges from {lo:.3g} to {hi:.3g} over the runs (FLOPs not "
                      f"proportional to N); D_opt = C / (k N_opt) uses the median k = {fits[pattern].k:.3g}."]
    if budget is not None:
        lines += ["", f"## Compute-optimal at C = {budget:.3g} FLOPs", "",
                  "| pattern | approach | N_opt | D_opt | D/N |", "|---|---|---|---|---|"]
        for pattern in sorted(fits):
            for approach, opt in fits[pattern].compute_optimal(budget).items():
                n = _fmt(opt["N"]) + (f" [{_fmt(opt['N_ci'][0])}, {_fmt(opt['N_ci'][1])}]" if "N_ci" in opt else "")
                d = _fmt(opt["D"]) + (f" [{_fmt(opt['D_ci'][0])}, {_fmt(opt['D_ci'][1])}]" if "D_ci" in opt else "")
                lines.append(f"| `{pattern}` | {approach[-1]} | {n} | {d} | {opt['D'] / opt['N']:.1f} |")
    return "\n".join(lines) + "\n"


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def _with_ci(value: float, ci: tuple[float, float], spec: str) -> str:
    return f"{value:{spec}} [{ci[0]:{spec}}, {ci[1]:{spec}}]"


def _finite(obj):
    """JSON has no NaN/Inf: write them as null."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


# ------------------------------------------------------------------------------ plots


def plot_loss_vs_flops(fits, colours, budget=None) -> Figure:
    """Loss against FLOPs: a line per run with several points (training curve), else a line
    through the final points of each size; approach-1 envelope as black-edged dots and the
    approach-3 frontier L(N_opt(C), D_opt(C)) dashed."""
    fig = Figure(figsize=(7, 5), layout="constrained")
    ax = fig.add_subplot()
    for pattern, f in fits.items():
        colour = colours[pattern]
        runs = group_by_run(f.points)
        single: dict[float, list] = {}
        for pts in runs.values():
            if len(pts) > 1:
                ax.plot([p.flops for p in pts], [p.loss for p in pts], color=colour, lw=0.8, alpha=0.6)
            else:
                single.setdefault(pts[0].params, []).append(pts[0])
        for pts in single.values():
            pts.sort(key=lambda p: p.flops)
            ax.plot([p.flops for p in pts], [p.loss for p in pts], "o-", color=colour, ms=3, lw=0.8, alpha=0.6)
        if f.approach1 is not None:
            ax.scatter(f.approach1.flops, f.approach1.loss, s=8, color=colour, edgecolors="none", zorder=3)
        if f.approach3 is not None:
            c = np.geomspace(min(p.flops for p in f.points), max(p.flops for p in f.points), 100)
            ax.plot(c, f.approach3.loss(*f.approach3.optimum(c, f.k)), "--", color=colour, lw=1.5)
    _budget_line(ax, budget)
    ax.set(xscale="log", xlabel="training FLOPs C", ylabel="loss",
           title="Loss vs FLOPs per size (dots: envelope, dashed: approach-3 frontier)")
    ax.legend(handles=_pattern_handles(colours), fontsize=8)
    return fig


def plot_isoflop(fits, colours, budget=None) -> Figure:
    """Approach 2: loss against N per budget with its parabola in ln N; stars at the vertices."""
    fig = Figure(figsize=(7, 5), layout="constrained")
    ax = fig.add_subplot()
    for pattern, f in fits.items():
        if f.approach2 is None:
            continue
        colour = colours[pattern]
        for s in f.approach2.slices:
            x = np.linspace(np.log(s.params.min()), np.log(s.params.max()), 100)
            ax.plot(s.params, s.loss, "o", color=colour, ms=3)
            ax.plot(np.exp(x), np.polyval(s.coeffs, x), color=colour, lw=1)
            ax.plot([s.n_opt], [s.loss_opt], "*", color=colour, ms=9, mec="k", mew=0.5)
            ax.annotate(f"{s.budget:.1g}", (s.n_opt, s.loss_opt), textcoords="offset points",
                        xytext=(0, -11), ha="center", fontsize=7, color=colour)
    ax.set(xscale="log", xlabel="parameters N", ylabel="final loss",
           title="IsoFLOP curves (labels: FLOP budget)")
    ax.legend(handles=_pattern_handles(colours), fontsize=8)
    return fig


def plot_frontier(fits, colours, budget=None) -> Figure:
    """N_opt(C) and D_opt(C): approach 1 dotted, approach 2 dashed with its per-budget
    optima, approach 3 solid with its bootstrap band."""
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    axes = fig.subplots(1, 2)
    for pattern, f in fits.items():
        colour = colours[pattern]
        c_all = [p.flops for p in f.points] + ([budget] if budget else [])
        c = np.geomspace(min(c_all), max(c_all), 100)
        for col, ax in enumerate(axes):
            for name in ("approach1", "approach2"):
                fit = getattr(f, name)
                if fit is not None:
                    law = fit.n_opt if col == 0 else fit.d_opt
                    ax.plot(c, law(c), APPROACH_STYLE[name], color=colour, lw=1.2)
            if f.approach2 is not None:
                ax.plot([s.budget for s in f.approach2.slices],
                        [s.n_opt if col == 0 else s.d_opt for s in f.approach2.slices], "o", color=colour, ms=4)
            p3 = f.approach3
            if p3 is not None:
                ax.plot(c, p3.optimum(c, f.k)[col], APPROACH_STYLE["approach3"], color=colour, lw=1.5)
                if len(p3.boot):
                    boot = p3.optimum(c[:, None], f.k, params=p3.boot.T)[col]
                    q = [50 * (1 - p3.ci_level), 50 * (1 + p3.ci_level)]
                    lo, hi = np.percentile(boot, q, axis=1)
                    ax.fill_between(c, lo, hi, color=colour, alpha=0.15, lw=0)
    for ax, what in zip(axes, ("N_opt (parameters)", "D_opt (tokens)")):
        _budget_line(ax, budget)
        ax.set(xscale="log", yscale="log", xlabel="training FLOPs C", ylabel=what)
    handles = _pattern_handles(colours) + [
        Line2D([], [], color="grey", ls=APPROACH_STYLE[n], label=f"approach {n[-1]}") for n in APPROACH_STYLE]
    axes[0].legend(handles=handles, fontsize=8)
    fig.suptitle("Compute-optimal frontier")
    return fig


def _pattern_handles(colours):
    return [Line2D([], [], color=c, lw=2, label=p) for p, c in colours.items()]


def _budget_line(ax, budget):
    if budget is not None:
        ax.axvline(budget, color="grey", lw=0.8, ls="-.")
