"""Training-behaviour metrics, computed per run on the device over tensors with a leading run dimension.

Each function takes stacked tensors ([runs, ...]) and returns one value per run ([runs]), so the
trainer can evaluate them for a whole population at once without a host synchronisation. They are
pure: the trainer owns the sliding windows, these functions only read them.
"""

from __future__ import annotations

import torch

# Tags logged for every run, in this order. Namespaces follow the lab's TensorBoard layout.
SCALAR_TAGS = (
    "loss/train",
    "loss/val_mse",
    "loss/val_mae",
    "lr",
    "convergence/gap",
    "convergence/param_error",
    "convergence/ref_param_error",
    "oscillation/flip_rate",
    "oscillation/loss_amplitude",
    "oscillation/param_amplitude",
    "grad/norm",
    "grad/max_abs",
    "grad/outlier_share",
    "grad/top1_share",
    "residual/p99_abs",
    "residual/kurtosis",
    "quantile/coverage",
)
HIST_TAGS = ("grad/per_sample_abs", "residual/values")


def flip_rate(flip_window: torch.Tensor, filled: int) -> torch.Tensor:
    """Share of recent steps in which a parameter's update reversed direction, averaged over parameters.

    flip_window: [window, runs], each row the per-run share of parameters whose update changed sign at
    that step (sign(u_t) * sign(u_{t-1}) < 0). filled: how many rows hold data so far.
    Near 0: updates keep their direction (smooth descent). Near 1: every step undoes the last (oscillation).
    """
    rows = max(min(filled, flip_window.shape[0]), 1)
    return flip_window.sum(0) / rows


def relative_amplitude(window: torch.Tensor, filled: int) -> torch.Tensor:
    """(max - min) / |mean| over the filled rows of a [window, runs] history (loss amplitude)."""
    w = window[: max(min(filled, window.shape[0]), 1)]
    return (w.amax(0) - w.amin(0)) / w.mean(0).abs().clamp_min(1e-12)


def param_amplitude(window: torch.Tensor, filled: int) -> torch.Tensor:
    """Largest (max - min) of any parameter over the filled rows of a [window, runs, P] history."""
    w = window[: max(min(filled, window.shape[0]), 1)]
    return (w.amax(0) - w.amin(0)).amax(-1)


def share_of(weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum(weights * mask) / sum(weights) per run; weights [runs, n] >= 0, mask [runs, n] bool.

    With weights = |dL/dy_hat| and mask = the dataset's outliers this is `grad/outlier_share`: the
    share of the whole gradient signal that the outliers supply (their share of the points is the
    fraction, so a share far above the fraction means the outliers steer training).
    """
    total = weights.sum(-1)
    return (weights * mask).sum(-1) / total.clamp_min(torch.finfo(weights.dtype).tiny)


def top_share(weights: torch.Tensor, fraction: float = 0.01) -> torch.Tensor:
    """Share of sum(weights) held by the largest ceil(fraction * n) entries of each run ([runs, n]).

    For per-sample gradient magnitudes this is `grad/top1_share`: with MSE on heavy-tailed noise a
    handful of points supply most of the gradient; with MAE every point supplies the same 1/n.
    """
    k = max(1, int(-(-fraction * weights.shape[-1] // 1)))
    top = weights.topk(k, dim=-1).values.sum(-1)
    return top / weights.sum(-1).clamp_min(torch.finfo(weights.dtype).tiny)


def excess_kurtosis(r: torch.Tensor) -> torch.Tensor:
    """m4 / m2^2 - 3 of each run's residuals r [runs, n] (0 for Gaussian, large for heavy tails)."""
    c = r - r.mean(-1, keepdim=True)
    m2 = (c * c).mean(-1)
    m4 = (c**4).mean(-1)
    return m4 / (m2 * m2).clamp_min(torch.finfo(r.dtype).tiny) - 3


def abs_quantile(r: torch.Tensor, q: float = 0.99) -> torch.Tensor:
    """q-quantile of |r| per run (linear interpolation, as torch.quantile / numpy's default)."""
    return torch.quantile(r.abs(), q, dim=-1)


def coverage(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Share of targets at or below the prediction, per run: for a tau-quantile fit it should be ~tau."""
    return (target <= pred).to(pred.dtype).mean(-1)


def histogram(values: torch.Tensor, bins: int = 30) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-run histogram on the device: values [runs, n] -> (counts [runs, bins], lo [runs], hi [runs]).

    Each run gets `bins` equal-width buckets between its own min and max, counted with one
    scatter_add for the whole population (no per-run Python loop, no host sync).
    """
    runs, n = values.shape
    v = torch.nan_to_num(values, nan=0.0, posinf=torch.finfo(values.dtype).max, neginf=torch.finfo(values.dtype).min)
    lo, hi = v.amin(-1), v.amax(-1)
    width = (hi - lo).clamp_min(torch.finfo(v.dtype).tiny)
    idx = ((v - lo[:, None]) / width[:, None] * bins).long().clamp_(0, bins - 1)
    flat = idx + torch.arange(runs, device=v.device)[:, None] * bins
    counts = torch.zeros(runs * bins, dtype=v.dtype, device=v.device)
    counts.scatter_add_(0, flat.reshape(-1), torch.ones_like(v).reshape(-1))
    return counts.view(runs, bins), lo, hi


def steps_to_converge(last_above: int, final_gap: float, tol: float) -> int | None:
    """First step after which the gap stays below tol: last step it was above, plus one.

    None when the run ends above the tolerance (it never converged).
    """
    if not final_gap <= tol:
        return None
    return last_above + 1
