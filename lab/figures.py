"""Figures: per-run (fit over data, residual histogram) and per-sweep comparisons. PNG bytes out.

Drawing costs ~0.05 s a figure, more than a whole batched run, so single runs draw theirs and a
sweep draws its comparison figures once, from the summaries and event files it already wrote.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from lab import rundir

# One colour per loss, the same in every figure of the lab.
LOSS_COLORS = {"mse": "tab:blue", "mae": "tab:orange", "huber": "tab:green", "log_cosh": "tab:purple",
               "quantile": "tab:red", "rmse": "tab:cyan", "smooth_l1": "tab:olive", "expectile": "tab:pink",
               "pseudo_huber": "tab:brown", "cauchy": "tab:gray", "tukey": "black", "general": "gold"}


def png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def run_figures(cfg, ds, res) -> dict[str, bytes]:
    """fit: the data (outliers marked), the truth and the fitted prediction; residuals: their histogram."""
    x = ds.x.double()
    order = torch.argsort(x[:, 0])
    grid = torch.linspace(float(x.min()), float(x.max()), 200, dtype=torch.float64)[:, None]
    fig, ax = plt.subplots(figsize=(6, 4))
    out = ds.outlier.numpy()
    ax.scatter(x[~ds.outlier, 0], ds.y[~ds.outlier], s=8, alpha=0.5, label="data")
    if out.any():
        ax.scatter(x[ds.outlier, 0], ds.y[ds.outlier], s=18, color="red", marker="x", label="outliers")
    ax.plot(grid[:, 0], ds.truth.signal(grid).reshape(-1), "k--", lw=1, label="truth (noise-free)")
    pred = res.predict(cfg, grid).detach()
    for j in range(pred.shape[1]):
        ax.plot(grid[:, 0], pred[:, j], color=LOSS_COLORS.get(cfg.loss.name, "tab:blue"), lw=2,
                label=f"fit ({cfg.loss.name})" if j == 0 else None)
    ax.set(title=f"{cfg.data.kind} data, {cfg.loss.name} fit ({res.status})", xlabel="x", ylabel="y")
    ax.legend(fontsize=8)
    fit = png(fig)

    resid = (res.predict(cfg, x[order]).detach()[:, 0] - ds.y.double()[order]).numpy()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(resid[np.isfinite(resid)], bins=40, color=LOSS_COLORS.get(cfg.loss.name, "tab:blue"), alpha=0.8)
    ax.set(title=f"residuals y_hat - y ({cfg.loss.name})", xlabel="residual (target units)", ylabel="points")
    return {"fit": fit, "residuals": png(fig)}


def sweep_figures(runs, sweep_dir: Path) -> None:
    """Final training loss and steps to converge of every run of a sweep, one bar each, grouped by loss."""
    rows = [(r.name, r.config.loss.name, (r.summary or {}).get("final") or {}) for r in runs if r.summary]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(rows)), 4))
    names = [n for n, _, _ in rows]
    vals = [f.get("convergence/gap") for _, _, f in rows]
    # no bar for a run without a finite gap (diverged: inf, which a log axis cannot draw)
    vals = [np.nan if v is None or not np.isfinite(v) else max(v, 1e-16) for v in vals]
    ax.bar(range(len(rows)), vals, color=[LOSS_COLORS.get(loss, "tab:blue") for _, loss, _ in rows])
    ax.set_yscale("log")
    ax.set_xticks(range(len(rows)), names, rotation=90, fontsize=7)
    ax.set(title="final gap to the exact optimum, per run", ylabel="train loss - optimal loss")
    (sweep_dir / "figures").mkdir(parents=True, exist_ok=True)
    rundir.write_atomic(sweep_dir / "figures" / "final_gap.png", png(fig))
    rundir.write_atomic(sweep_dir / "figures" / "index.json", json.dumps({"runs": names}))


# ---------------------------------------------------------------------------------------------------------
# Claims figures (lab.claims): each takes a measurement's plain payload and stands on its own.

RATING_COLORS = {"excellent": "#8fd19e", "moderate": "#ffe08a", "poor": "#f4a6a6", "n/a": "#dddddd"}


def claim_figure(payload: dict) -> bytes:
    """PNG of one claims figure; payload['kind'] picks the drawing (see CLAIM_FIGURES)."""
    kind = payload.get("kind")
    if kind not in CLAIM_FIGURES:
        raise ValueError(f"unknown claims figure kind {kind!r}; known: {', '.join(CLAIM_FIGURES)}")
    return png(CLAIM_FIGURES[kind](payload))


def _penalties(p):
    fig, ax = plt.subplots(figsize=(7, 4.2))
    m = np.asarray(p["misses"])
    ax.bar(m - 0.2, p["mse"], 0.4, color=LOSS_COLORS["mse"], label="MSE: miss²")
    ax.bar(m + 0.2, p["mae"], 0.4, color=LOSS_COLORS["mae"], label="MAE: |miss|")
    for x, a, b in zip(m, p["mse"], p["mae"]):
        ax.annotate(f"{a / b:g}x", (x, a), ha="center", va="bottom", fontsize=8)
    ax.set(title="Target practice: the penalty of one miss (MSE/MAE ratio on top)",
           xlabel="miss (rings from the bullseye)", ylabel="penalty (points)", xticks=m)
    ax.legend()
    return fig


def _gradients(p):
    fig, ax = plt.subplots(figsize=(7, 4.2))
    colors = iter(["mse", "mae", "huber", "log_cosh", "quantile"])
    for label, g in p["curves"].items():
        ax.plot(p["errors"], g, lw=2, label=label, color=LOSS_COLORS[next(colors)])
    for s in (-1, 1):
        ax.axvline(s * p["delta"], color="gray", ls=":", lw=1)
    top = max(float(np.max(g)) for g in p["curves"].values())
    ax.annotate(f"Huber switches\nat ±delta = {p['delta']:g}", (p["delta"], 0.55 * top), xytext=(4, 0),
                textcoords="offset points", fontsize=8, color="gray")
    ax.set(title="Gradient flow: |dL/dŷ| of one point against its error (autograd)",
           xlabel="error e = ŷ - y (target units)", ylabel="|dL/dŷ| (loss per target unit)")
    ax.legend(fontsize=8)
    return fig


def _log_cosh(p):
    e = np.asarray(p["errors"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    for ax, keep, title in ((axes[0], np.abs(e) <= 1.0, "near zero: like MSE / 2"),
                            (axes[1], e >= 0, "far out: like MAE - log 2")):
        ax.plot(e[keep], p["log_cosh"][keep], color=LOSS_COLORS["log_cosh"], lw=3, label="log cosh(e)")
        ax.plot(e[keep], p["half_mse"][keep], "--", color=LOSS_COLORS["mse"], label="MSE / 2 = e²/2")
        ax.plot(e[keep], p["mae_minus_log2"][keep], ":", color=LOSS_COLORS["mae"], lw=2, label="MAE - log 2")
        ax.set(title=title, xlabel="error e = ŷ - y (target units)", ylabel="loss of one point")
    axes[0].set_ylim(-0.05, 0.55)
    axes[1].set_ylim(-1, 11)
    axes[0].legend(fontsize=8)
    fig.suptitle("Log-cosh between its two limits")
    return fig


def _statistics(p):
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    ax.hist(p["y"], bins=40, color="lightgray", edgecolor="white", label="targets y (one sample)")
    colors = {"MSE": LOSS_COLORS["mse"], "RMSE": LOSS_COLORS["rmse"], "MAE": LOSS_COLORS["mae"]}
    for name, v in p["stats"].items():
        ax.axvline(v, color="black", ls="--", lw=1)
        ax.annotate(f"sample {name}", (v, ax.get_ylim()[1] * 0.97), rotation=90, va="top", ha="right", fontsize=8)
    for i, (name, v) in enumerate(p["fits"].items()):
        ax.axvline(v, color=colors.get(name, LOSS_COLORS["quantile"]), lw=2.5, alpha=0.8,
                   ymax=0.85 - 0.08 * i, label=f"trained {name} constant = {v:.3f}")
    ax.set(title="Each loss converges to a statistic of the targets (constant model, skewed noise)",
           xlabel="y (target units)", ylabel="points")
    ax.legend(fontsize=7, loc="center right")
    return fig


def _outliers(p):
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    x, y, out = np.asarray(p["x"]), np.asarray(p["y"]), np.asarray(p["outlier"], bool)
    ax.scatter(x[~out], y[~out], s=20, color="gray", label="data")
    ax.scatter(x[out], y[out], s=80, color="red", marker="X", label="the outlier")
    ax.scatter(p["x_before"], p["y_before"], s=60, facecolors="none", edgecolors="red", label="its place without it")
    grid = np.linspace(min(x.min(), np.min(p["x_before"])) - 0.3, x.max() + 0.3, 50)
    for name, pair in p["lines"].items():
        c = LOSS_COLORS.get(name, "black")
        ax.plot(grid, pair["with"][0] * grid + pair["with"][1], color=c, lw=2,
                label=f"{name}: slope {pair['without'][0]:.2f} -> {pair['with'][0]:.2f}")
        ax.plot(grid, pair["without"][0] * grid + pair["without"][1], color=c, lw=1, ls="--")
    ax.set(title="One outlier: fitted lines with it (solid) and without it (dashed)", xlabel="x",
           ylabel="y (target units)")
    ax.legend(fontsize=8)
    return fig


def _loss_curves(p):
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    for name, c in p["curves"].items():
        color = LOSS_COLORS.get(name, "black")
        axes[0].plot(c["steps"], c["loss"], color=color, label=f"{name} (optimum {c['optimum']:.3g})")
        axes[1].plot(c["steps"], np.clip(c["relative_gap"], 1e-9, None), color=color, label=name)
    axes[1].axhline(p["tol"], color="gray", ls=":", label=f"tolerance {p['tol']:g}")
    axes[0].set(yscale="log", title="training loss (each in its own units)", xlabel="step",
                ylabel="loss (squared or plain target units)")
    axes[1].set(yscale="log", title="gap to the exact optimum / optimal loss", xlabel="step",
                ylabel="relative gap (floored at 1e-9)")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.suptitle("MSE, MAE and Huber trained on the same clean data, same learning rate")
    return fig


def _surface(p):
    from lab import losses

    x, y = torch.as_tensor(p["x"]), torch.as_tensor(p["y"])
    pts = np.concatenate([*p["paths"].values(), np.stack(list(p["optima"].values()))])
    lo, hi = pts.min(0), pts.max(0)
    pad = 0.15 * (hi - lo) + 0.1
    s = torch.linspace(lo[0] - pad[0], hi[0] + pad[0], 120, dtype=torch.float64)
    b = torch.linspace(lo[1] - pad[1], hi[1] + pad[1], 120, dtype=torch.float64)
    pred = s[:, None, None] * x + b[None, :, None]  # [slopes, intercepts, n]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), layout="constrained")
    for ax, name in zip(axes, ("mse", "mae")):
        z = losses.spec(name).fn(pred, y).mean(-1).T.numpy()
        levels = z.min() + (z.max() - z.min()) * np.geomspace(1e-3, 1, 14)
        cs = ax.contour(s, b, z, levels=levels, cmap="viridis", linewidths=0.8)
        ax.clabel(cs, fontsize=6, fmt="%.2g")
        for other, path in p["paths"].items():
            mine = other == name
            ax.plot(path[:, 0], path[:, 1], ".-", ms=3 if mine else 2, lw=1.5 if mine else 0.8,
                    alpha=1 if mine else 0.4, color=LOSS_COLORS[other], label=f"{other} training path")
        opt = p["optima"][name]
        ax.plot(*opt, "*", ms=16, color="red", markeredgecolor="black", label=f"exact {name} optimum")
        ax.set(title=f"{name.upper()} loss surface", xlabel="slope", ylabel="intercept (target units)")
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("Loss surfaces over (slope, intercept) with the actual training paths (every step)")
    return fig


def _oscillation(p):
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    colors = {"MAE, constant rate": LOSS_COLORS["mae"], "MAE, decaying rate": "saddlebrown",
              "Huber, constant rate": LOSS_COLORS["huber"]}
    for label, t in p["traces"].items():
        for ax, key in zip(axes, ("slope", "intercept")):
            ax.plot(t["steps"], t[key], ".-", ms=3, lw=1, color=colors.get(label), label=label)
    for ax, key in zip(axes, ("slope", "intercept (target units)")):
        ax.axhline(0, color="black", lw=0.8)
        ax.set(title=f"{key.split()[0]} minus its exact optimum", xlabel="step", ylabel=key)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=3, fontsize=9)
    fig.suptitle(f"Close-up near the optimum: the last steps, every step (seed {p['seed']})")
    return fig


def _scale(p):
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for label, c in p["curves"].items():
        line, = ax.plot(c["steps"], c["rel_rmse"], lw=2, label=label)
        if c.get("diverged_step") is not None:
            ax.axvline(c["diverged_step"], color=line.get_color(), ls=":", label=f"{label}: diverged")
    ax.set(yscale="log", title=f"MSE with targets in the thousands: {p['model']} model, SGD lr {p['lr']:g}",
           xlabel="step", ylabel="RMS distance to the truth / target scale")
    ax.legend(fontsize=8)
    return fig


def _strip(ax, groups: dict, title: str, ylabel: str):
    for i, (name, vals) in enumerate(groups.items()):
        v = np.asarray(vals, float)
        ax.scatter(i + np.linspace(-0.15, 0.15, v.size), v, color=LOSS_COLORS.get(name, "black"), s=18)
        ax.hlines(np.nanmedian(v), i - 0.25, i + 0.25, color="black")
    ax.set(xticks=range(len(groups)), xticklabels=list(groups), yscale="log", title=title, ylabel=ylabel)


def _heavy_tails(p):
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    _strip(axes[0], p["distance"], "fitted line vs the true line", "RMS distance (target units)")
    _strip(axes[1], p["top1"], "gradient share of the top 1% of points", "share of sum |dL/dŷ|")
    axes[1].axhline(0.01, color="gray", ls=":", label="fair share (1%)")
    axes[1].legend(fontsize=8)
    fig.suptitle("Student-t noise: one dot per seed, bar = median")
    return fig


def _interpolation(p):
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (seed, t) in enumerate(p["positions"].items()):
        ax.plot(p["deltas"], t, "o-", color=LOSS_COLORS["huber"], alpha=0.5, label="Huber fit, one line per seed"
                if i == 0 else None)
    ax.axhline(1, color=LOSS_COLORS["mse"], ls="--", label="MSE fit (t = 1)")
    ax.axhline(0, color=LOSS_COLORS["mae"], ls="--", label="MAE fit (t = 0)")
    ax.set(xscale="log", title="Huber's delta moves its fit from MAE's to MSE's",
           xlabel="delta (target units)", ylabel="position t between the MAE and MSE fits")
    ax.legend(fontsize=8)
    return fig


def _comparison(p):
    rows, cols = p["losses"], p["columns"]
    fig, ax = plt.subplots(figsize=(10, 0.75 * len(rows) + 1.6))
    ax.set(xlim=(0, len(cols)), ylim=(0, len(rows)), xticks=np.arange(len(cols)) + 0.5,
           yticks=np.arange(len(rows)) + 0.5)
    ax.set_xticklabels([c.replace("_", " ") for c in cols])
    ax.set_yticklabels(rows[::-1])
    ax.xaxis.tick_top()
    for i, name in enumerate(rows):
        for j in range(len(cols)):
            rating, guide, v = p["ratings"][i][j], p["guide"][i][j], p["values"][i][j]
            y = len(rows) - 1 - i
            same = rating == guide
            ax.add_patch(plt.Rectangle((j, y), 1, 1, facecolor=RATING_COLORS.get(rating, "white"),
                                       edgecolor="black" if same else "red", lw=0.5 if same else 2.5))
            text = f"{rating} ({v:.2g})\nguide: {guide}" + ("" if same else "  ≠")
            ax.text(j + 0.5, y + 0.5, text, ha="center", va="center", fontsize=8)
    ax.set_title("The guide's comparison table, measured (cell: measured rating (value); red frame: differs)",
                 fontsize=10, pad=24)
    return fig


CLAIM_FIGURES = {"penalties": _penalties, "gradients": _gradients, "log_cosh": _log_cosh, "statistics": _statistics,
                 "outliers": _outliers, "loss_curves": _loss_curves, "surface": _surface, "oscillation": _oscillation,
                 "scale": _scale, "heavy_tails": _heavy_tails, "interpolation": _interpolation,
                 "comparison": _comparison}
