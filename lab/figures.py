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
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

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
    vals = [np.nan if v is None else max(v, 1e-16) for v in vals]
    ax.bar(range(len(rows)), vals, color=[LOSS_COLORS.get(loss, "tab:blue") for _, loss, _ in rows])
    ax.set_yscale("log")
    ax.set_xticks(range(len(rows)), names, rotation=90, fontsize=7)
    ax.set(title="final gap to the exact optimum, per run", ylabel="train loss - optimal loss")
    (sweep_dir / "figures").mkdir(parents=True, exist_ok=True)
    (sweep_dir / "figures" / "final_gap.png").write_bytes(png(fig))
    (sweep_dir / "figures" / "index.json").write_text(json.dumps({"runs": names}))
