"""Measurements of the claims that need training runs (2, 3, 5-9; 11 is lab.claim_comparison): runs -> numbers
per seed.

Every function reads finished runs only (summary.json, data.npz, event files) through the helpers of
lab.claim_measures; a run that did not complete gives NaN where it could not be measured. The study
file decides which runs exist; each function documents the runs it expects and finds them by their
config values, so the same function works at any number of seeds.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from lab.claim_measures import (
    NAN,
    Measurement,
    completed,
    dataset,
    final,
    fitted,
    largest,
    line,
    measure,
    missing_run,
    pick,
    ratio,
    read_scalars,
    seeds,
    setting,
    steps_to_converge,
    table,
)


def _per_seed(runs, fn) -> dict[str, list[float]]:
    """Collect fn(seed) -> {metric: value} over the study's seeds into {metric: [value per seed]}."""
    out: dict[str, list[float]] = {}
    for s in seeds(runs):
        for k, v in fn(s).items():
            out.setdefault(k, []).append(float(v))
    return out


def _quantile_runs(runs, seed):
    return sorted((r for r in runs if setting(r, "loss.name") == "quantile" and r.config.seed == seed),
                  key=lambda r: r.config.loss.tau)


# ---------------------------------------------------------------------------------------------------
# 2: the optimum of each loss is a statistic of the targets


@measure("optimum_statistics", {
    "mse_vs_mean": "|MSE fit - mean| / sd",
    "rmse_vs_mse": "|RMSE fit - MSE fit| / sd",
    "mae_vs_median": "|MAE fit - median| / sd",
    "mae_rank_error": "MAE fit: |share of y below - 0.5|",
    "quantile_rank_error": "quantile fits: max |share of y below - tau|",
    "quantile_vs_sample": "quantile fits: max |fit - numpy quantile| / sd",
    "mean_median_gap": "|mean - median| / sd",
    "mse_vs_median": "|MSE fit - median| / sd",
})
def optimum_statistics(runs, params) -> Measurement:
    """Constant model on one sample: the fitted constant of each loss against the sample's own statistics.

    Expects per seed one run each of mse, rmse, mae and any number of quantile runs (one tau each).
    """
    def one(s):
        mse, rmse, mae = (pick(runs, loss__name=n, seed=s) for n in ("mse", "rmse", "mae"))
        y = dataset(mse).y.double().numpy() if mse is not None else np.array([NAN])
        sd, mean, median = y.std(), y.mean(), np.median(y)
        c = {n: fitted(r, "value") for n, r in (("mse", mse), ("rmse", rmse), ("mae", mae))}
        qs = [(r.config.loss.tau, fitted(r, "value")) for r in _quantile_runs(runs, s)]
        return {"mse_vs_mean": abs(c["mse"] - mean) / sd, "rmse_vs_mse": abs(c["rmse"] - c["mse"]) / sd,
                "mae_vs_median": abs(c["mae"] - median) / sd, "mae_rank_error": _rank_error(y, c["mae"], 0.5),
                "quantile_rank_error": largest(_rank_error(y, v, t) for t, v in qs),
                "quantile_vs_sample": largest(abs(v - np.quantile(y, t)) / sd for t, v in qs),
                "mean_median_gap": abs(mean - median) / sd, "mse_vs_median": abs(c["mse"] - median) / sd}

    first = seeds(runs)[0]
    mse = pick(runs, loss__name="mse", seed=first)
    y = dataset(mse).y.double().numpy()
    rows = [["MSE", "mean", float(y.mean()), fitted(mse, "value"), fitted(mse, "value", exact=True)]]
    for name in ("rmse", "mae"):
        r = pick(runs, loss__name=name, seed=first)
        rows.append([name.upper(), "mean" if name == "rmse" else "median", float(y.mean() if name == "rmse"
                     else np.median(y)), fitted(r, "value"), fitted(r, "value", exact=True)])
    fits = {"MSE": rows[0][3], "RMSE": rows[1][3], "MAE": rows[2][3]}
    stats = {"mean": float(y.mean()), "median": float(np.median(y))}
    for r in _quantile_runs(runs, first):
        tau = r.config.loss.tau
        rows.append([f"quantile {tau:g}", f"{tau:g}-quantile", float(np.quantile(y, tau)), fitted(r, "value"),
                     fitted(r, "value", exact=True)])
        fits[f"quantile {tau:g}"], stats[f"{tau:g}-quantile"] = rows[-1][3], rows[-1][2]
    return Measurement(
        values=_per_seed(runs, one),
        details=f"seed {first}, n = {y.size}:\n\n" + table(
            ["loss", "statistic", "sample value", "trained constant", "exact optimum"], rows),
        plots={"optimum_statistics": {"kind": "statistics", "y": y, "stats": stats, "fits": fits}})


def _rank_error(y: np.ndarray, c: float, tau: float) -> float:
    """|F_n(c) - tau|, F_n the sample CDF: how far c is from a tau-quantile, in shares of the sample."""
    return NAN if math.isnan(c) else abs(float((y <= c).mean()) - tau)


# ---------------------------------------------------------------------------------------------------
# 3: one outlier


@measure("outlier_shift", {
    "shift_mse": "MSE slope shift", "shift_mae": "MAE slope shift", "shift_huber": "Huber slope shift",
    "mse_over_mae": "slope shift MSE / MAE", "mse_over_huber": "slope shift MSE / Huber",
}, defaults={"floor": 1e-6})
def outlier_shift(runs, params) -> Measurement:
    """Fitted slope with and without the outlier, per loss. Expects data.outlier_fraction swept: the smallest
    value is 'without' (0 draws the same points, undisplaced), the largest 'with'."""
    fractions = sorted({setting(r, "data.outlier_fraction") for r in runs})
    lo, hi = fractions[0], fractions[-1]

    def shift(name, s, exact=False):
        a, b = (pick(runs, loss__name=name, data__outlier_fraction=f, seed=s) for f in (hi, lo))
        return abs(fitted(a, "slope", exact) - fitted(b, "slope", exact))

    def one(s):
        m = {f"shift_{n}": shift(n, s) for n in ("mse", "mae", "huber")}
        return {**m, "mse_over_mae": ratio(m["shift_mse"], m["shift_mae"], params["floor"]),
                "mse_over_huber": ratio(m["shift_mse"], m["shift_huber"], params["floor"])}

    first = seeds(runs)[0]
    with_outlier = dataset(pick(runs, loss__name="mse", data__outlier_fraction=hi, seed=first))
    without = dataset(pick(runs, loss__name="mse", data__outlier_fraction=lo, seed=first))
    lines, rows = {}, []
    for name in ("mse", "mae", "huber"):
        pair = [pick(runs, loss__name=name, data__outlier_fraction=f, seed=first) for f in (lo, hi)]
        lines[name] = {"without": line(pair[0]), "with": line(pair[1])}
        rows.append([name, fitted(pair[0], "slope"), fitted(pair[1], "slope"), shift(name, first),
                     shift(name, first, exact=True)])
    moved = with_outlier.outlier.numpy()
    return Measurement(
        values=_per_seed(runs, one),
        details=f"seed {first}, n = {with_outlier.n}:\n\n" + table(
            ["loss", "slope without", "slope with", "|shift| trained", "|shift| exact optimum"], rows),
        plots={"outlier_sensitivity": {
            "kind": "outliers", "x": with_outlier.x[:, 0].numpy(), "y": with_outlier.y.numpy(), "outlier": moved,
            "x_before": without.x[:, 0].numpy()[moved], "y_before": without.y.numpy()[moved], "lines": lines,
            "truth": (with_outlier.truth.slope, with_outlier.truth.intercept)}})


# ---------------------------------------------------------------------------------------------------
# 5 and 6: oscillation near the optimum, convergence speed on clean data


@measure("oscillation", {
    "amp_mae_constant": "MAE amplitude, constant lr", "amp_mae_decay": "MAE amplitude, decaying lr",
    "amp_huber": "Huber amplitude", "amp_mse": "MSE amplitude",
    "decay_ratio": "MAE amplitude constant / decaying lr", "huber_ratio": "amplitude MAE / Huber",
    "decay_closer": "MAE distance to optimum constant / decaying lr",
    "dist_mae_constant": "MAE distance to optimum, constant lr", "dist_mae_decay": "MAE distance, decaying lr",
    "dist_huber": "Huber distance to optimum", "flip_mae_constant": "MAE update sign-flip rate, constant lr",
}, defaults={"floor": 1e-7, "close_up": 100})
def oscillation(runs, params) -> Measurement:
    """oscillation/param_amplitude (largest max - min of a parameter over the last train.window steps) and
    convergence/ref_param_error (distance to the exact optimum) at the end: a rate that merely froze the
    parameters would shrink the first, not the second. Expects mae with optim.schedule constant and one
    decaying schedule, huber and mse at a constant rate."""
    def run(name, s, decaying=False):
        found = [r for r in runs if setting(r, "loss.name") == name and r.config.seed == s
                 and (setting(r, "optim.schedule") != "constant") == decaying]
        if not found:
            schedule = "a decaying optim.schedule" if decaying else "optim.schedule='constant'"
            raise missing_run(runs, f"loss.name={name!r}, seed={s!r}, {schedule}",
                              ("loss.name", "seed", "optim.schedule"))
        return found[0]

    def one(s):
        which = (("mae_constant", "mae", False), ("mae_decay", "mae", True), ("huber", "huber", False),
                 ("mse", "mse", False))
        amp = {k: final(run(n, s, d), "oscillation/param_amplitude") for k, n, d in which}
        dist = {k: final(run(n, s, d), "convergence/ref_param_error") for k, n, d in which}
        return {**{f"amp_{k}": v for k, v in amp.items()},
                "decay_ratio": ratio(amp["mae_constant"], amp["mae_decay"], params["floor"]),
                "decay_closer": ratio(dist["mae_constant"], dist["mae_decay"], params["floor"]),
                "huber_ratio": ratio(amp["mae_constant"], amp["huber"], params["floor"]),
                **{f"dist_{k}": dist[k] for k in ("mae_constant", "mae_decay", "huber")},
                "flip_mae_constant": final(run("mae", s), "oscillation/flip_rate")}

    first, traces = seeds(runs)[0], {}
    for label, name, decaying in (("MAE, constant rate", "mae", False), ("MAE, decaying rate", "mae", True),
                                  ("Huber, constant rate", "huber", False)):
        r = run(name, first, decaying)
        if not completed(r):
            continue
        sc = read_scalars(r.dir, ("param/slope", "param/intercept"))
        steps, slope = sc["param/slope"]
        if steps.size == 0:  # train.log_every = 0 logs no curve (the numbers come from the summary's final row)
            continue
        keep = steps >= steps.max() - params["close_up"]
        traces[label] = {"steps": steps[keep], "slope": slope[keep] - fitted(r, "slope", exact=True),
                         "intercept": sc["param/intercept"][1][keep] - fitted(r, "intercept", exact=True)}
    return Measurement(values=_per_seed(runs, one),
                       plots={"oscillation": {"kind": "oscillation", "traces": traces, "seed": first}})


@measure("convergence_speed", {
    "steps_mse": "MSE steps to converge", "steps_mae": "MAE steps to converge",
    "steps_huber": "Huber steps to converge", "mae_over_mse": "steps MAE / MSE",
})
def convergence_speed(runs, params) -> Measurement:
    """Steps until the gap to each run's exact optimum stays below train.converge_tol * |optimal loss|
    (a run that never gets there counts as steps + 1). Expects mse, mae and huber at one learning rate."""
    def one(s):
        st = {n: steps_to_converge(pick(runs, loss__name=n, seed=s)) for n in ("mse", "mae", "huber")}
        return {**{f"steps_{n}": v for n, v in st.items()}, "mae_over_mse": ratio(st["mae"], st["mse"])}

    first = seeds(runs)[0]
    curves, paths, optima, rows = {}, {}, {}, []
    for name in ("mse", "mae", "huber"):
        r = pick(runs, loss__name=name, seed=first)
        if not completed(r):
            continue
        sc = read_scalars(r.dir, ("loss/train", "convergence/gap", "param/slope", "param/intercept"))
        ref = r.summary["reference"]["loss"]
        curves[name] = {"steps": sc["loss/train"][0], "loss": sc["loss/train"][1],
                        "relative_gap": sc["convergence/gap"][1] / abs(ref), "optimum": ref}
        paths[name] = np.stack([sc["param/slope"][1], sc["param/intercept"][1]], 1)
        optima[name] = line(r, exact=True)
        rows.append([name, steps_to_converge(r), final(r, "convergence/gap") / abs(ref)])
    mse = pick(runs, loss__name="mse", seed=first)
    ds = dataset(mse)
    return Measurement(
        values=_per_seed(runs, one),
        details=f"seed {first}, lr {mse.config.optim.lr:g}, tolerance {mse.config.train.converge_tol:g} x optimal "
                f"loss:\n\n" + table(["loss", "steps to converge", "final gap / optimal loss"], rows),
        plots={"loss_curves": {"kind": "loss_curves", "curves": curves, "tol": mse.config.train.converge_tol},
               "loss_surface": {"kind": "surface", "x": ds.x[:, 0].double().numpy(), "y": ds.y.double().numpy(),
                                "paths": paths, "optima": optima}})


# ---------------------------------------------------------------------------------------------------
# 7: targets in the thousands


def _rel_rmse(run) -> float:
    """RMS distance of the fit from the true signal (validation x) / data.target_scale; inf if diverged."""
    status = (run.summary or {}).get("status") if run is not None else None
    if status == "diverged":
        return math.inf
    return math.sqrt(final(run, "loss/val_mse")) / run.config.data.target_scale if completed(run) else NAN


def _diverged(run) -> float:
    status = (run.summary or {}).get("status") if run is not None else None
    return {"diverged": 1.0, "completed": 0.0}.get(status, NAN)


# The four runs per seed of scale_sensitivity, as the study's config values make them.
SCALE_KINDS = {"unit": "data.target_scale=1 (neither normalised nor clipped)",
               "raw": "data.target_scale != 1 (neither normalised nor clipped)",
               "normalized": "train.normalize_targets=true", "clipped": "optim.clip_grad_norm > 0"}


@measure("scale_sensitivity", {
    "unit_rel_rmse": "fit error, targets ~1", "raw_diverged": "diverged (1 = yes), scaled targets",
    "raw_rel_rmse": "fit error, scaled targets", "normalized_rel_rmse": "fit error, scaled + normalised",
    "clipped_diverged": "diverged (1 = yes), scaled + clipped", "clipped_rel_rmse": "fit error, scaled + clipped",
})
def scale_sensitivity(runs, params) -> Measurement:
    """MSE at one learning rate: targets at scale 1; scaled up (raw); scaled up + train.normalize_targets;
    scaled up + optim.clip_grad_norm. Fit error = RMS distance to the true signal / target_scale."""
    def kind(r):
        c = r.config
        if c.train.normalize_targets:
            return "normalized"
        if c.optim.clip_grad_norm > 0:
            return "clipped"
        return "unit" if c.data.target_scale == 1 else "raw"

    def one(s):
        by = {kind(r): r for r in runs if r.config.seed == s}
        for k, wanted in SCALE_KINDS.items():
            if k not in by:
                raise missing_run(runs, f"seed={s!r}, {wanted}", ("seed", "data.target_scale",
                                  "train.normalize_targets", "optim.clip_grad_norm"))
        return {"unit_rel_rmse": _rel_rmse(by["unit"]), "raw_diverged": _diverged(by["raw"]),
                "raw_rel_rmse": _rel_rmse(by["raw"]), "normalized_rel_rmse": _rel_rmse(by["normalized"]),
                "clipped_diverged": _diverged(by["clipped"]), "clipped_rel_rmse": _rel_rmse(by["clipped"])}

    first, curves = seeds(runs)[0], {}
    for r in (r for r in runs if r.config.seed == first):
        steps, val = read_scalars(r.dir, ("loss/val_mse",))["loss/val_mse"]
        label = {"unit": "targets ~1", "raw": f"targets x{r.config.data.target_scale:g}",
                 "normalized": "x scale, normalised", "clipped": f"x scale, clip {r.config.optim.clip_grad_norm:g}"}
        with np.errstate(invalid="ignore", over="ignore"):
            curves[label[kind(r)]] = {"steps": steps, "rel_rmse": np.sqrt(val) / r.config.data.target_scale,
                                      "diverged_step": (r.summary or {}).get("diverged_step")}
    model = runs[0].config.model
    name = model.kind + (f" {list(model.hidden)}" if model.kind == "mlp" else "")
    return Measurement(values=_per_seed(runs, one), plots={
        f"scale_{model.kind}": {"kind": "scale", "curves": curves, "model": name, "lr": runs[0].config.optim.lr}})


# ---------------------------------------------------------------------------------------------------
# 8: heavy tails, 9: Huber's delta


@measure("heavy_tails", {
    "dist_mse": "MSE distance to true line", "dist_mae": "MAE distance to true line",
    "dist_huber": "Huber distance to true line",
    "mse_over_huber": "distance to true line MSE / Huber", "mse_over_mae": "distance to true line MSE / MAE",
    "top1_mse": "MSE gradient share of top 1% points", "top1_mae": "MAE gradient share of top 1% points",
})
def heavy_tails(runs, params) -> Measurement:
    """sqrt(loss/val_mse) (the fitted line against the noise-free line on validation x) and grad/top1_share
    at the end of training. Expects mse, mae and huber per seed."""
    def one(s):
        d = {n: math.sqrt(final(pick(runs, loss__name=n, seed=s), "loss/val_mse")) for n in ("mse", "mae", "huber")}
        return {**{f"dist_{n}": v for n, v in d.items()}, "mse_over_huber": ratio(d["mse"], d["huber"]),
                "mse_over_mae": ratio(d["mse"], d["mae"]),
                "top1_mse": final(pick(runs, loss__name="mse", seed=s), "grad/top1_share"),
                "top1_mae": final(pick(runs, loss__name="mae", seed=s), "grad/top1_share")}

    values = _per_seed(runs, one)
    top1 = {n: [final(pick(runs, loss__name=n, seed=s), "grad/top1_share") for s in seeds(runs)]
            for n in ("mse", "mae", "huber")}
    return Measurement(values=values, plots={"heavy_tails": {
        "kind": "heavy_tails", "distance": {n: values[f"dist_{n}"] for n in ("mse", "mae", "huber")}, "top1": top1}})


@measure("huber_interpolation", {
    "small_to_mae": "smallest delta: distance to MAE fit (rel.)",
    "large_to_mse": "largest delta: distance to MSE fit (rel.)",
    "max_backstep": "largest step back along MAE -> MSE",
    "separation": "|MSE fit - MAE fit| (slope, intercept)",
})
def huber_interpolation(runs, params) -> Measurement:
    """Fitted (slope, intercept) of Huber at each delta against the MSE and MAE fits of the same data.
    Position t = projection onto the segment MAE (0) -> MSE (1). Expects mse, mae and huber at several deltas."""
    deltas = sorted({r.config.loss.delta for r in runs if setting(r, "loss.name") == "huber"})
    if not deltas:
        raise missing_run(runs, "loss.name='huber'", ("loss.name",))

    def positions(s):
        mse, mae = line(pick(runs, loss__name="mse", seed=s)), line(pick(runs, loss__name="mae", seed=s))
        thetas = [line(pick(runs, loss__name="huber", loss__delta=d, seed=s)) for d in deltas]
        seg = mse - mae
        return mse, mae, thetas, [float(np.dot(t - mae, seg) / np.dot(seg, seg)) for t in thetas]

    def one(s):
        mse, mae, thetas, t = positions(s)
        d = float(np.linalg.norm(mse - mae))
        return {"small_to_mae": np.linalg.norm(thetas[0] - mae) / d, "large_to_mse": np.linalg.norm(thetas[-1] - mse) / d,
                "max_backstep": largest((a - b for a, b in itertools.pairwise(t)), default=0.0), "separation": d}

    curves = {s: positions(s)[3] for s in seeds(runs)}
    rows = [[f"{d:g}", *(curves[s][i] for s in curves)] for i, d in enumerate(deltas)]
    return Measurement(values=_per_seed(runs, one),
                       details="position t of the Huber fit on the segment MAE fit (t = 0) -> MSE fit (t = 1):\n\n"
                               + table(["delta", *(f"seed {s}" for s in curves)], rows),
                       plots={"huber_delta": {"kind": "interpolation", "deltas": deltas, "positions": curves}})
