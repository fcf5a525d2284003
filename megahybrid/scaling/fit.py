"""Compute-optimal scaling fits: the three approaches of Chinchilla (Hoffmann et al. 2022,
arXiv 2203.15556, section 3), one fit per layer pattern.

Input is a list of run records (dicts), one per evaluated point:

    {"pattern": "MMM*", "name": "MMM*-n12M-c1e16", "params": 1.2e7, "tokens": 1.4e8,
     "flops": 1.0e16, "loss": 3.41, "budget": 1e16}

- ``pattern``  the layer pattern (or any label); one fit per pattern. Default "default".
- ``name``     the run the point belongs to. Points of one run (per-checkpoint losses) share
               it; a record without a name is a run of its own.
- ``params``   N, *non-embedding* parameters. Kaplan et al. 2020 (arXiv 2001.08361, fig. 6)
               show non-embedding N gives clean power laws down to small models, where the
               embedding table would otherwise dominate the count (CPU demo sizes). Chinchilla
               counts total parameters; be consistent within a comparison.
- ``tokens``   D, training tokens seen at this point.
- ``flops``    C, training FLOPs spent up to this point (forward + backward). Optional:
               default 6 N D (Kaplan et al. 2020, section 2.1).
- ``loss``     the loss at this point (validation loss preferably).
- ``budget``   optional nominal FLOP budget of an IsoFLOP run. Without it, final points whose
               FLOPs agree within `BUDGET_RTOL` are one budget.

Which points each approach uses:

1. Envelope (approach 1): every point. For each FLOP value, the run with the lowest loss
   there gives (N, D); N_opt = a0 C^a and D_opt = b0 C^b are fitted in log space on these
   envelope points. With training curves (runs with several points) the FLOP values are
   1500 log-spaced values, as in the paper, and losses are interpolated in log C (runs with
   a single point are then left out of approach 1). When every run has one point, the FLOP
   values are the budgets and N_opt can only be one of the sizes trained at each budget, so
   the exponent is coarse: approach 1 wants training curves.
2. IsoFLOP (approach 2): the final point of each run, grouped by budget. Per budget a
   parabola of loss against ln N; its vertex gives N_opt and D_opt = C / (k N_opt); then
   power laws in C as above.
3. Parametric (approach 3): the final points. L(N, D) = E + A/N^alpha + B/D^beta, fitted as
   in the paper's appendix D.2: Huber loss (delta 1e-3) on log L, L-BFGS from a grid of
   initialisations; bootstrap confidence intervals by resampling runs and refitting.

k is the FLOPs per parameter per token of the pattern, the median of C / (N D) over its
points: 6 when the records use C = 6 N D, larger when attention FLOPs are counted. With
k = 6 this is the paper's D_opt = C / (6 N_opt). When C / (N D) varies much across sizes
(tiny models, whose LM-head FLOPs are not in a non-embedding N), the report says so.

Final points that share pattern, params and tokens (a learning-rate sweep) are reduced to the
lowest loss: scaling laws are fitted to the best-tuned run of each size.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import scipy
from scipy.optimize import minimize

BUDGET_RTOL = 0.10
"""Final points within this relative FLOPs distance of a budget's smallest member are one
budget. Token counts rounded to whole batches move C by well under 10%, while IsoFLOP budgets
are usually >= 2x apart (Chinchilla: 9 budgets from 6e18 to 3e21)."""

ENVELOPE_GRID = 1500
"""Log-spaced FLOP values of the envelope with training curves (Chinchilla section 3.1)."""

HUBER_DELTA = 1e-3
"""Huber delta of approach 3 (Chinchilla appendix D.2)."""

INIT_GRID = {
    "alpha": np.arange(0.0, 2.01, 0.5),
    "beta": np.arange(0.0, 2.01, 0.5),
    "e": np.arange(-1.0, 1.01, 0.5),
    "a": np.arange(0.0, 25.01, 5.0),
    "b": np.arange(0.0, 25.01, 5.0),
}
"""Initialisation grid of approach 3 (Chinchilla appendix D.2), with A = exp(a), B = exp(b),
E = exp(e): 4500 starting points."""

N_STARTS = 16
"""L-BFGS runs of one approach-3 fit: from the N_STARTS grid points with the lowest objective.
The paper runs L-BFGS from all 4500. Measured on the synthetic laws of
tests/cpu/test_scaling_fit.py (noise 0.2-3%, 27-64 runs): about half of the best 64 grid
points reach the best optimum and the single best one always did, so 16 leaves a wide margin
at 1/280 of the cost."""

N_BOOT_STARTS = 1
"""L-BFGS runs per bootstrap refit: the full-data optimum, then the best N_BOOT_STARTS - 1
grid points of the full data. Adding the best grid point gave the same intervals to 4 digits
on the same synthetic sets at 2.5x the cost."""

PARAM_NAMES = ("E", "A", "B", "alpha", "beta")


class FitError(ValueError):
    """Input a fit cannot use; the one-line message names what is missing and the fix."""


# ------------------------------------------------------------------------------ records


@dataclass(frozen=True)
class Point:
    """One evaluated point of one run (see the module docstring for the fields)."""

    pattern: str
    name: str
    params: float
    tokens: float
    flops: float
    loss: float
    budget: float | None = None


def read_records(records: Iterable[Mapping[str, Any]]) -> list[Point]:
    """Validate run records (dicts) into Points; a bad record raises a one-line FitError."""
    points = []
    for i, rec in enumerate(records):
        where = f"record {i}" + (f" ({rec['name']!r})" if "name" in rec else "")
        for key in ("params", "tokens", "loss"):
            if key not in rec:
                raise FitError(f"{where}: missing {key!r}; every record needs params, tokens and loss")
        values = {}
        for key in ("params", "tokens", "flops", "loss", "budget"):
            if rec.get(key) is None:
                continue
            try:
                values[key] = float(rec[key])
            except (TypeError, ValueError):
                raise FitError(f"{where}: {key}={rec[key]!r} is not a number") from None
            if not (math.isfinite(values[key]) and values[key] > 0):
                raise FitError(f"{where}: {key}={rec[key]!r}; must be a finite number > 0")
        flops = values.get("flops", 6.0 * values["params"] * values["tokens"])
        points.append(Point(
            pattern=str(rec.get("pattern", "default")), name=str(rec.get("name", f"#{i}")),
            params=values["params"], tokens=values["tokens"], flops=flops,
            loss=values["loss"], budget=values.get("budget")))
    if not points:
        raise FitError("no run records; give at least one record per run")
    return points


def group_by_pattern(points: Sequence[Point]) -> dict[str, list[Point]]:
    groups: dict[str, list[Point]] = {}
    for p in points:
        groups.setdefault(p.pattern, []).append(p)
    return groups


def group_by_run(points: Sequence[Point]) -> dict[str, list[Point]]:
    """name -> the run's points sorted by tokens."""
    runs: dict[str, list[Point]] = {}
    for p in points:
        runs.setdefault(p.name, []).append(p)
    return {name: sorted(pts, key=lambda p: p.tokens) for name, pts in runs.items()}


def final_points(points: Sequence[Point]) -> list[Point]:
    """The last point of each run, reduced to the lowest loss per (pattern, params, tokens)."""
    best: dict[tuple, Point] = {}
    for pts in group_by_run(points).values():
        p = pts[-1]
        key = (p.pattern, p.params, p.tokens)
        if key not in best or p.loss < best[key].loss:
            best[key] = p
    return sorted(best.values(), key=lambda p: (p.flops, p.params))


def flops_per_param_token(points: Sequence[Point]) -> float:
    """k = median C / (N D): 6 for C = 6 N D."""
    return float(np.median([p.flops / (p.params * p.tokens) for p in points]))


def group_by_budget(points: Sequence[Point]) -> list[tuple[float, list[Point]]]:
    """[(budget C, points)], sorted by C. An explicit `budget` wins; otherwise points whose
    FLOPs lie within BUDGET_RTOL of the group's smallest are one budget, named by the
    geometric mean of their FLOPs."""
    explicit: dict[float, list[Point]] = {}
    rest = []
    for p in points:
        if p.budget is not None:
            explicit.setdefault(p.budget, []).append(p)
        else:
            rest.append(p)
    groups = list(explicit.items())
    current: list[Point] = []
    for p in sorted(rest, key=lambda p: p.flops):
        if current and p.flops > current[0].flops * (1 + BUDGET_RTOL):
            groups.append((_geomean([q.flops for q in current]), current))
            current = []
        current.append(p)
    if current:
        groups.append((_geomean([q.flops for q in current]), current))
    return sorted(groups, key=lambda g: g[0])


def _geomean(x) -> float:
    return float(np.exp(np.mean(np.log(x))))


# ------------------------------------------------------------------------------ power laws


@dataclass
class PowerLaw:
    """y = coefficient * C ** exponent, least squares on (ln C, ln y)."""

    coefficient: float
    exponent: float

    def __call__(self, flops):
        return self.coefficient * np.asarray(flops, dtype=float) ** self.exponent

    @classmethod
    def fit(cls, flops, y) -> "PowerLaw":
        slope, intercept = np.polyfit(np.log(flops), np.log(y), 1)
        return cls(coefficient=float(np.exp(intercept)), exponent=float(slope))

    def to_dict(self) -> dict:
        return {"coefficient": self.coefficient, "exponent": self.exponent}


# ------------------------------------------------------------------------------ approach 1


@dataclass
class EnvelopeFit:
    """Approach 1: envelope points (N, D, loss at FLOPs C) and N_opt, D_opt power laws."""

    flops: np.ndarray
    params: np.ndarray
    tokens: np.ndarray
    loss: np.ndarray
    n_opt: PowerLaw
    d_opt: PowerLaw

    def to_dict(self) -> dict:
        return {"n_opt": self.n_opt.to_dict(), "d_opt": self.d_opt.to_dict(),
                "envelope": {"flops": self.flops.tolist(), "params": self.params.tolist(),
                             "tokens": self.tokens.tolist(), "loss": self.loss.tolist()}}


def fit_envelope(points: Sequence[Point]) -> EnvelopeFit:
    """Approach 1 on the points of one pattern.

    An envelope point is kept only if its winner is neither the smallest nor the largest
    model among the runs that reach that FLOP value: at an edge the optimum may lie outside
    the sizes trained, and such points bias the exponent (e.g. the largest model always
    wins at the largest C)."""
    pattern = _one_pattern(points)
    runs = [pts for pts in group_by_run(points).values()]
    curves = [pts for pts in runs if len(pts) > 1]
    if curves:
        c_all = np.array([p.flops for pts in curves for p in pts])
        grid = np.geomspace(c_all.min(), c_all.max(), ENVELOPE_GRID)
        n = np.array([pts[0].params for pts in curves])
        loss = np.full((len(curves), grid.size), np.inf)
        tokens = np.full((len(curves), grid.size), np.nan)
        for i, pts in enumerate(curves):
            lc = np.log([p.flops for p in pts])
            inside = (np.log(grid) >= lc[0] - 1e-9) & (np.log(grid) <= lc[-1] + 1e-9)
            loss[i, inside] = np.interp(np.log(grid[inside]), lc, [p.loss for p in pts])
            tokens[i, inside] = np.exp(np.interp(np.log(grid[inside]), lc, np.log([p.tokens for p in pts])))
        covered = np.isfinite(loss)
    else:
        budgets = group_by_budget([pts[-1] for pts in runs])
        grid = np.array([c for c, _ in budgets])
        n = np.array(sorted({p.params for _, pts in budgets for p in pts}))
        loss = np.full((n.size, grid.size), np.inf)
        tokens = np.full((n.size, grid.size), np.nan)
        for j, (_, pts) in enumerate(budgets):
            for p in pts:
                i = int(np.searchsorted(n, p.params))
                if p.loss < loss[i, j]:
                    loss[i, j], tokens[i, j] = p.loss, p.tokens
        covered = np.isfinite(loss)
    win = np.argmin(loss, axis=0)
    cols = np.arange(grid.size)
    smallest = np.where(covered, n[:, None], np.inf).min(axis=0)
    largest = np.where(covered, n[:, None], -np.inf).max(axis=0)
    keep = covered[win, cols] & (n[win] > smallest) & (n[win] < largest)
    if len(set(n[win][keep])) < 2:
        raise FitError(f"approach 1, pattern {pattern!r}: {len(set(n[win][keep]))} model size(s) win "
                       "the loss envelope away from the smallest/largest size trained; needs >= 2 — "
                       "train sizes on both sides of the optimum over a wider FLOP range")
    c, nn, dd, ll = grid[keep], n[win][keep], tokens[win, cols][keep], loss[win, cols][keep]
    return EnvelopeFit(flops=c, params=nn, tokens=dd, loss=ll,
                       n_opt=PowerLaw.fit(c, nn), d_opt=PowerLaw.fit(c, dd))


# ------------------------------------------------------------------------------ approach 2


@dataclass
class IsoFlopSlice:
    """One budget of approach 2: loss = c2 x^2 + c1 x + c0 with x = ln N; vertex -> N_opt."""

    budget: float
    params: np.ndarray
    tokens: np.ndarray
    loss: np.ndarray
    coeffs: tuple[float, float, float]
    n_opt: float
    d_opt: float
    loss_opt: float
    bracketed: bool
    """N_opt lies inside the sizes of this budget (False: the vertex is extrapolated)."""

    def to_dict(self) -> dict:
        return {"budget": self.budget, "params": self.params.tolist(), "tokens": self.tokens.tolist(),
                "loss": self.loss.tolist(), "parabola_ln_n": list(self.coeffs), "n_opt": self.n_opt,
                "d_opt": self.d_opt, "loss_opt": self.loss_opt, "bracketed": self.bracketed}


@dataclass
class IsoFlopFit:
    """Approach 2: one parabola per budget, then N_opt and D_opt power laws over budgets."""

    slices: list[IsoFlopSlice]
    n_opt: PowerLaw
    d_opt: PowerLaw

    def to_dict(self) -> dict:
        return {"n_opt": self.n_opt.to_dict(), "d_opt": self.d_opt.to_dict(),
                "budgets": [s.to_dict() for s in self.slices]}


def fit_isoflop(points: Sequence[Point]) -> IsoFlopFit:
    """Approach 2 on the points of one pattern (uses each run's final point)."""
    pattern = _one_pattern(points)
    k = flops_per_param_token(points)
    budgets = group_by_budget(final_points(points))
    slices = []
    for budget, pts in budgets:
        sizes = sorted({p.params for p in pts})
        if len(sizes) < 3:
            raise FitError(
                f"approach 2, pattern {pattern!r}: budget C={budget:.3g} has {len(sizes)} size(s) "
                f"(N={', '.join(f'{s:.3g}' for s in sizes)}); an IsoFLOP parabola needs >= 3 — "
                "train more sizes at this budget, drop the budget, or fit without approach 2")
        x = np.log([p.params for p in pts])
        y = np.array([p.loss for p in pts])
        c2, c1, c0 = np.polyfit(x, y, 2)
        if not c2 > 0:
            raise FitError(
                f"approach 2, pattern {pattern!r}: budget C={budget:.3g}: loss against ln N curves "
                f"downward (x^2 coefficient {c2:.3g}), no minimum — add sizes on both sides of the best one")
        x_opt = -c1 / (2 * c2)
        n_opt = float(np.exp(x_opt))
        slices.append(IsoFlopSlice(
            budget=budget, params=np.exp(x), tokens=np.array([p.tokens for p in pts]), loss=y,
            coeffs=(float(c2), float(c1), float(c0)), n_opt=n_opt, d_opt=budget / (k * n_opt),
            loss_opt=float(c0 - c1**2 / (4 * c2)), bracketed=bool(x.min() <= x_opt <= x.max())))
    if len(slices) < 2:
        raise FitError(f"approach 2, pattern {pattern!r}: {len(slices)} FLOP budget(s); the power law "
                       "N_opt(C) needs >= 2 — add a budget")
    c = np.array([s.budget for s in slices])
    return IsoFlopFit(slices=slices, n_opt=PowerLaw.fit(c, [s.n_opt for s in slices]),
                      d_opt=PowerLaw.fit(c, [s.d_opt for s in slices]))


# ------------------------------------------------------------------------------ approach 3


def _huber(r: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Huber loss and its derivative."""
    small = np.abs(r) <= delta
    value = np.where(small, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta))
    grad = np.where(small, r, delta * np.sign(r))
    return value, grad


def _objective(theta: np.ndarray, ln_n: np.ndarray, ln_d: np.ndarray, ln_l: np.ndarray):
    """Sum of Huber(LSE(a - alpha ln N, b - beta ln D, e) - ln L) and its gradient;
    theta = (a, b, e, alpha, beta) with A = exp(a), B = exp(b), E = exp(e)."""
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * ln_n, b - beta * ln_d, np.full_like(ln_n, e)])
    top = terms.max(axis=0)
    w = np.exp(terms - top)
    total = w.sum(axis=0)
    value, dh = _huber(top + np.log(total) - ln_l, HUBER_DELTA)
    w = w / total * dh
    grad = np.array([w[0].sum(), w[1].sum(), w[2].sum(), -(w[0] * ln_n).sum(), -(w[1] * ln_d).sum()])
    return float(value.sum()), grad


def _grid_objective(grid: np.ndarray, ln_n, ln_d, ln_l) -> np.ndarray:
    """Objective at every row of grid [G, 5], vectorised (to rank starting points)."""
    a, b, e, alpha, beta = (grid[:, i : i + 1] for i in range(5))
    pred = np.logaddexp(np.logaddexp(a - alpha * ln_n, b - beta * ln_d), e)
    return _huber(pred - ln_l, HUBER_DELTA)[0].sum(axis=1)


def _init_grid() -> np.ndarray:
    g = INIT_GRID
    mesh = np.meshgrid(g["a"], g["b"], g["e"], g["alpha"], g["beta"], indexing="ij")
    return np.stack([m.ravel() for m in mesh], axis=1)


@contextlib.contextmanager
def _single_threaded_blas():
    """Run scipy's OpenBLAS on one thread inside the block.

    scipy's L-BFGS-B calls BLAS on 5-element vectors; with OpenBLAS threads on a loaded
    2-core machine 32 L-BFGS runs took 13.2 s, on one thread 1.9 s (measured while writing this,
    scipy 1.18.1 wheel). Without a scipy OpenBLAS wheel (e.g. conda builds) this does nothing."""
    libs = Path(scipy.__file__).parent.with_name("scipy.libs").glob("libscipy_openblas*.so")
    lib = next((ctypes.CDLL(str(p)) for p in libs), None)
    if lib is None or not hasattr(lib, "scipy_openblas_set_num_threads"):
        yield
        return
    before = lib.scipy_openblas_get_num_threads()
    lib.scipy_openblas_set_num_threads(1)
    try:
        yield
    finally:
        lib.scipy_openblas_set_num_threads(before)


def _lbfgs_best(starts: np.ndarray, ln_n, ln_d, ln_l) -> tuple[np.ndarray, float]:
    best, best_val = None, np.inf
    for x0 in starts:
        res = minimize(_objective, x0, args=(ln_n, ln_d, ln_l), jac=True, method="L-BFGS-B",
                       options={"maxiter": 2000, "ftol": 1e-15, "gtol": 1e-12})
        if np.all(np.isfinite(res.x)) and res.fun < best_val:
            best, best_val = res.x, float(res.fun)
    return best, best_val


def _to_params(theta: np.ndarray) -> np.ndarray:
    """(a, b, e, alpha, beta) -> (E, A, B, alpha, beta)."""
    a, b, e, alpha, beta = theta
    return np.array([np.exp(e), np.exp(a), np.exp(b), alpha, beta])


@dataclass
class ParametricFit:
    """Approach 3: L(N, D) = E + A / N^alpha + B / D^beta with bootstrap intervals."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float
    """Huber objective (sum over points) at the optimum."""
    n_points: int
    boot: np.ndarray = field(repr=False)
    """[n_boot, 5] refits on resampled runs, columns PARAM_NAMES."""
    ci_level: float = 0.95

    def loss(self, n, d):
        n, d = np.asarray(n, dtype=float), np.asarray(d, dtype=float)
        return self.E + self.A / n**self.alpha + self.B / d**self.beta

    @property
    def a(self) -> float:
        """Exponent of N_opt ∝ C^a: beta / (alpha + beta) (Chinchilla eq. 4)."""
        return self.beta / (self.alpha + self.beta)

    def optimum(self, flops, k: float = 6.0, params: np.ndarray | None = None):
        """(N_opt, D_opt) at FLOPs C under C = k N D (Chinchilla eq. 4 with 6 -> k):
        N_opt = G (C/k)^(beta/(alpha+beta)), G = (alpha A / (beta B))^(1/(alpha+beta))."""
        E, A, B, alpha, beta = self.values() if params is None else params
        g = (alpha * A / (beta * B)) ** (1 / (alpha + beta))
        n = g * (np.asarray(flops, dtype=float) / k) ** (beta / (alpha + beta))
        return n, np.asarray(flops, dtype=float) / (k * n)

    def values(self) -> np.ndarray:
        return np.array([self.E, self.A, self.B, self.alpha, self.beta])

    def ci(self) -> dict[str, tuple[float, float]]:
        """Percentile bootstrap interval of each parameter and of a = beta/(alpha+beta)."""
        if not len(self.boot):
            return {k: (math.nan, math.nan) for k in (*PARAM_NAMES, "a")}
        q = [50 * (1 - self.ci_level), 50 * (1 + self.ci_level)]
        cols = dict(zip(PARAM_NAMES, self.boot.T))
        cols["a"] = cols["beta"] / (cols["alpha"] + cols["beta"])
        return {k: tuple(float(v) for v in np.percentile(x, q)) for k, x in cols.items()}

    def to_dict(self) -> dict:
        return {"E": self.E, "A": self.A, "B": self.B, "alpha": self.alpha, "beta": self.beta,
                "a": self.a, "objective": self.objective, "n_points": self.n_points,
                "n_boot": len(self.boot), "ci_level": self.ci_level,
                "ci": {k: list(v) for k, v in self.ci().items()}}


def fit_parametric(points: Sequence[Point], n_boot: int = 200, seed: int = 0,
                   ci_level: float = 0.95) -> ParametricFit:
    """Approach 3 on the points of one pattern (uses each run's final point)."""
    pattern = _one_pattern(points)
    pts = final_points(points)
    if len(pts) < 5:
        raise FitError(f"approach 3, pattern {pattern!r}: {len(pts)} run(s); L(N, D) has 5 parameters, "
                       "needs >= 5 runs (in practice dozens) — add runs")
    ln_n = np.log([p.params for p in pts])
    ln_d = np.log([p.tokens for p in pts])
    ln_l = np.log([p.loss for p in pts])
    grid = _init_grid()
    starts = grid[np.argsort(_grid_objective(grid, ln_n, ln_d, ln_l))[:N_STARTS]]
    rng = np.random.default_rng(seed)
    with _single_threaded_blas():
        theta, value = _lbfgs_best(starts, ln_n, ln_d, ln_l)
        # Bootstrap over runs: resample the final points with replacement and refit, from
        # the full-data optimum (N_BOOT_STARTS); ranking the grid again per resample would
        # cost more than the refit itself.
        boot_starts = np.vstack([theta, starts[: N_BOOT_STARTS - 1]])
        boot = np.empty((n_boot, 5))
        for i in range(n_boot):
            idx = rng.integers(0, len(pts), len(pts))
            boot[i] = _to_params(_lbfgs_best(boot_starts, ln_n[idx], ln_d[idx], ln_l[idx])[0])
    E, A, B, alpha, beta = (float(v) for v in _to_params(theta))
    return ParametricFit(E=E, A=A, B=B, alpha=alpha, beta=beta, objective=value,
                         n_points=len(pts), boot=boot, ci_level=ci_level)


# ------------------------------------------------------------------------------ per pattern


@dataclass
class PatternFit:
    """The fits of one pattern; an approach left out is None."""

    pattern: str
    points: list[Point] = field(repr=False)
    k: float
    """FLOPs per parameter per token, median C / (N D)."""
    approach1: EnvelopeFit | None = None
    approach2: IsoFlopFit | None = None
    approach3: ParametricFit | None = None

    def k_range(self) -> tuple[float, float]:
        """Smallest and largest C / (N D) over the points. A wide range means FLOPs are not
        proportional to N (LM head, attention at small sizes) and C = k N D is approximate."""
        ratios = [p.flops / (p.params * p.tokens) for p in self.points]
        return min(ratios), max(ratios)

    def compute_optimal(self, flops: float) -> dict[str, dict]:
        """Compute-optimal N and D at budget C from each fitted approach; approach 3 also
        gives the bootstrap interval of N and D."""
        out = {}
        for name, fit in (("approach1", self.approach1), ("approach2", self.approach2)):
            if fit is not None:
                out[name] = {"N": float(fit.n_opt(flops)), "D": float(fit.d_opt(flops))}
        if self.approach3 is not None:
            fit = self.approach3
            n, d = fit.optimum(flops, self.k)
            out["approach3"] = {"N": float(n), "D": float(d), "loss": float(fit.loss(n, d))}
            if len(fit.boot):
                q = [50 * (1 - fit.ci_level), 50 * (1 + fit.ci_level)]
                nb, db = fit.optimum(flops, self.k, params=fit.boot.T)
                out["approach3"].update(N_ci=np.percentile(nb, q).tolist(), D_ci=np.percentile(db, q).tolist())
        return out

    def to_dict(self, budget: float | None = None) -> dict:
        out: dict[str, Any] = {"pattern": self.pattern, "n_points": len(self.points),
                               "n_runs": len(group_by_run(self.points)), "flops_per_param_token": self.k,
                               "flops_per_param_token_range": list(self.k_range())}
        for name in ("approach1", "approach2", "approach3"):
            fit = getattr(self, name)
            out[name] = None if fit is None else fit.to_dict()
        if budget is not None:
            out["compute_optimal"] = {"budget": budget, **self.compute_optimal(budget)}
        return out


def fit_scaling_laws(records: Iterable[Mapping[str, Any]] | Sequence[Point],
                     approaches: Sequence[int] = (1, 2, 3), n_boot: int = 200,
                     seed: int = 0) -> dict[str, PatternFit]:
    """Run records -> {pattern: PatternFit}; one fit per pattern, approaches as named."""
    records = list(records)
    points = records if records and isinstance(records[0], Point) else read_records(records)
    unknown = set(approaches) - {1, 2, 3}
    if unknown:
        raise FitError(f"approaches={tuple(approaches)!r}: unknown {sorted(unknown)}; choose from 1, 2, 3")
    fits = {}
    for pattern, pts in group_by_pattern(points).items():
        fits[pattern] = PatternFit(
            pattern=pattern, points=pts, k=flops_per_param_token(pts),
            approach1=fit_envelope(pts) if 1 in approaches else None,
            approach2=fit_isoflop(pts) if 2 in approaches else None,
            approach3=fit_parametric(pts, n_boot=n_boot, seed=seed) if 3 in approaches else None)
    return fits


def compute_optimal(fits: Mapping[str, PatternFit], flops: float) -> dict[str, dict[str, dict]]:
    """{pattern: {approach: {"N", "D", ...}}}: the compute-optimal N and D at budget `flops`
    from each fitted approach of each pattern (see PatternFit.compute_optimal)."""
    return {pattern: fit.compute_optimal(flops) for pattern, fit in fits.items()}


def _one_pattern(points: Sequence[Point]) -> str:
    patterns = {p.pattern for p in points}
    if len(patterns) != 1:
        raise FitError(f"{len(patterns)} patterns {sorted(patterns)} in one fit; fit each pattern "
                       "separately (fit_scaling_laws does)")
    return patterns.pop()
