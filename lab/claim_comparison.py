"""Claim 11: the guide's comparison table (outlier robustness, smoothness, convergence, behaviour near
zero, for MSE, MAE, Huber, log-cosh and quantile), each column turned into a measurement and rated.

Two columns are measured on training runs (outlier shift, final gap), two on the loss functions through
autograd (gradient jumps, gradient near zero); the ratings use thresholds from the study file and are
compared with the guide's own ratings, also from the study file.
"""

from __future__ import annotations

import math

import numpy as np

from lab import config
from lab.claim_measures import (
    NAN,
    Measurement,
    error_grid,
    final,
    fmt,
    gradients,
    largest_jump,
    line,
    measure,
    pick,
    ratio,
    seeds,
    setting,
    table,
)


def _mean(values) -> float:
    v = np.asarray(values, float)
    return float(v[np.isfinite(v)].mean()) if np.isfinite(v).any() else NAN


COLUMNS = ("robustness", "smoothness", "convergence", "near_zero")
RATINGS = ("excellent", "moderate", "poor")


@measure("comparison_table", {
    "agreement": "share of cells matching the guide",
    "mismatches": "cells differing from the guide",
}, defaults={"losses": ["mse", "mae", "huber", "log_cosh", "quantile"], "thresholds": {}, "guide": {},
             "grid_max": 3.0, "grid_step": 1e-3, "near": 0.01})
def comparison_table(runs, params) -> Measurement:
    """One number per (loss, column), rated by [claim.params.thresholds] (value <= first: excellent, <= second:
    moderate, else poor) and compared with [claim.params.guide]:

    robustness   RMS shift of the fitted line over x_range when the outliers are added, / MSE's shift (training)
    smoothness   largest jump of autograd dl/dy_hat between neighbours of a grid_step grid on [-grid_max, grid_max]
    convergence  |final gap| / optimal loss after the budget at a constant rate, clean data (training)
    near_zero    max |dl/dy_hat| for |e| <= near over max |dl/dy_hat| at |e| = 1 (autograd): does it vanish?

    Expects data.outlier_fraction swept (smallest = clean) and each loss of `losses` once per fraction and seed.
    """
    names, thr, guide = params["losses"], params["thresholds"], params["guide"]
    missing = [c for c in COLUMNS if c not in thr] + [n for n in names if n not in guide]
    if missing:
        raise ValueError(f"comparison_table: [claim.params] lacks thresholds/guide ratings for {', '.join(missing)}")
    fractions = sorted({setting(r, "data.outlier_fraction") for r in runs})
    lo, hi = fractions[0], fractions[-1]
    shape = {n: _loss_shape(pick(runs, loss__name=n, data__outlier_fraction=lo, seed=seeds(runs)[0]), params)
             for n in names}

    def cells(s) -> dict[str, dict[str, float]]:
        shifts, out = {}, {}
        for n in names:
            clean, dirty = (pick(runs, loss__name=n, data__outlier_fraction=f, seed=s) for f in (lo, hi))
            shifts[n] = _line_shift(clean, dirty)
            gap = final(clean, "convergence/gap")
            ref = (clean.summary or {}).get("reference") or {}
            out[n] = {"convergence": abs(gap) / abs(ref["loss"]) if ref else NAN, **shape[n]}
        for n in names:
            out[n]["robustness"] = ratio(shifts[n], shifts.get("mse", NAN))
        return out

    per_seed = {s: cells(s) for s in seeds(runs)}
    rated = {s: {n: {c: _rate(v[c], thr[c]) for c in COLUMNS} for n, v in cs.items()} for s, cs in per_seed.items()}
    values = {"agreement": [], "mismatches": []}
    for s in per_seed:
        if any(rated[s][n][c] == "n/a" for n in names for c in COLUMNS):
            # A cell that could not be measured (a run failed or diverged) is missing data, not a mismatch:
            # the seed counts for neither side (see lab.claim_measures).
            values["agreement"].append(NAN)
            values["mismatches"].append(NAN)
            continue
        same = [rated[s][n][c] == guide[n][i] for n in names for i, c in enumerate(COLUMNS)]
        values["agreement"].append(float(np.mean(same)))
        values["mismatches"].append(float(len(same) - sum(same)))
    mean = {n: {c: _mean([per_seed[s][n][c] for s in per_seed]) for c in COLUMNS} for n in names}
    rating = {n: {c: _rate(mean[n][c], thr[c]) for c in COLUMNS} for n in names}
    def cell(n, i, c):
        same = sum(rated[s][n][c] == rating[n][c] for s in rated)
        seeds_note = "" if same == len(rated) else f" ({same}/{len(rated)} seeds)"
        differs = "" if rating[n][c] == guide[n][i] else f"; guide: **{guide[n][i]}**"
        return f"{fmt(mean[n][c])} {rating[n][c]}{seeds_note}{differs}"

    rows = [[n, *(cell(n, i, c) for i, c in enumerate(COLUMNS))] for n in names]
    return Measurement(
        values=values,
        details="measured value (mean over seeds), its rating (how many seeds rate it so, if not all) and the "
                "guide's rating where it differs:\n\n"
                + table(["loss", *COLUMNS], rows),
        plots={"comparison_table": {"kind": "comparison", "losses": names, "columns": list(COLUMNS),
                                    "values": [[mean[n][c] for c in COLUMNS] for n in names],
                                    "ratings": [[rating[n][c] for c in COLUMNS] for n in names],
                                    "guide": [list(guide[n]) for n in names], "thresholds": thr}})


def _loss_shape(run, params) -> dict[str, float]:
    """smoothness and near_zero of the run's loss (its own parameters), through autograd."""
    name, loss_params = run.config.loss.name, config.loss_params(run.config)
    e = error_grid(params["grid_max"], params["grid_step"])
    signed = gradients(name, e, **loss_params)
    g, near = np.abs(signed), np.abs(e) <= params["near"]
    return {"smoothness": largest_jump(signed),
            "near_zero": float(g[near].max() / g[np.isclose(np.abs(e), 1.0)].max())}


def _line_shift(clean, dirty) -> float:
    """RMS over x_range (101 points) of the difference between two fitted lines."""
    a, b = line(clean), line(dirty)
    lo, hi = clean.config.data.x_range
    x = np.linspace(lo, hi, 101)
    return float(np.sqrt(np.mean(((b[0] - a[0]) * x + (b[1] - a[1])) ** 2)))


def _rate(value: float, limits) -> str:
    if math.isnan(value):
        return "n/a"
    return RATINGS[0] if value <= limits[0] else RATINGS[1] if value <= limits[1] else RATINGS[2]
