"""Scaling-law fits (Chinchilla approaches 1-3, one fit per layer pattern) and their report.

    from megahybrid.scaling import compute_optimal, fit_scaling_laws, write_report
    fits = fit_scaling_laws(records)            # {pattern: PatternFit}
    compute_optimal(fits, 1e21)                 # {pattern: {approach: {"N", "D"}}}
    write_report(fits, "out/", budget=1e21)     # fits.json, fits.md, PNG plots

Record format: `fit.py`; sweep-directory format (summary.json): `cli.py`; the sweep file and
the runner that writes such a directory (`megahybrid sweep`): `sweep.py`.
"""

from megahybrid.scaling.fit import FitError, PatternFit, compute_optimal, fit_scaling_laws, read_records
from megahybrid.scaling.report import write_report

__all__ = ["FitError", "PatternFit", "compute_optimal", "fit_scaling_laws", "read_records", "write_report"]
