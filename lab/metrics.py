"""Training-behaviour metrics, computed per run on the device over tensors with a leading run dimension.

Each function takes stacked tensors ([runs, ...], or [rows, runs, ...] for a history) and returns
one value per run ([runs]), so the trainer evaluates them for a whole population at once without a
host synchronisation. They are pure: the trainer owns the histories, these functions only read them.

Cost matters here: a study logs every tag of every run every `log_every` steps, so a metric that
sorts (torch.quantile sorts each row, ~20 ns per element on a CPU) would cost more than the training
step it describes. The order statistics below use `topk` on the few largest values instead, and
powers are written as products (x**4 is a slow pow kernel; (x*x)*(x*x) is two multiplies).
"""

from __future__ import annotations

import math

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
# topk over this many runs at a time: one [rows, n] block stays in cache (measured ~4x faster per
# element than one topk over [10 000, 1000] on a 2-core EPYC).
_TOPK_ROWS = 64


def flip_rate(history: torch.Tensor, rows: int) -> torch.Tensor:
    """Share of recent steps in which a parameter's update reversed direction, averaged over parameters.

    history: [m, runs, P], consecutive parameter vectors theta_t0 .. theta_s; the updates are
    u_t = theta_{t+1} - theta_t and a reversal at step t is u_t * u_{t-1} < 0 (strictly: a zero update
    reverses nothing). rows: how many steps the rate averages over (the window, or fewer early on);
    reversals before the history's first pair count as 0 (the first update has no predecessor).
    Near 0: updates keep their direction (smooth descent). Near 1: every step undoes the last (oscillation).
    """
    if history.shape[0] < 3:
        return history.new_zeros(history.shape[1])
    u = history[1:] - history[:-1]  # [m-1, runs, P]
    flips = (u[1:] * u[:-1] < 0).sum(-1).sum(0)  # reversals per run, summed over steps and parameters
    return flips.to(history.dtype) / (max(rows, 1) * history.shape[-1])


def relative_amplitude(window: torch.Tensor) -> torch.Tensor:
    """(max - min) / |mean| over the rows of a [rows, runs] history (the loss amplitude)."""
    return (window.amax(0) - window.amin(0)) / window.mean(0).abs().clamp_min(1e-12)


def param_amplitude(window: torch.Tensor) -> torch.Tensor:
    """Largest (max - min) of any parameter over the rows of a [rows, runs, P] history."""
    return (window.amax(0) - window.amin(0)).amax(-1)


def share_of(weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum(weights * mask) / sum(weights) per run; weights [runs, n] >= 0, mask [runs, n] (bool or 0/1).

    With weights = |dL/dy_hat| and mask = the dataset's outliers this is `grad/outlier_share`: the
    share of the whole gradient signal that the outliers supply (their share of the points is the
    fraction, so a share far above the fraction means the outliers steer training).
    """
    total = weights.sum(-1)
    masked = torch.linalg.vecdot(weights, mask.to(weights.dtype))  # one pass, no [runs, n] product
    return masked / total.clamp_min(torch.finfo(weights.dtype).tiny)


def top_count(n: int, fraction: float) -> int:
    """How many of n entries are the top `fraction`: ceil(fraction * n), at least 1."""
    return max(1, math.ceil(fraction * n - 1e-9))


def largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest entries of each row of values [runs, n], descending ([runs, k]); topk in row blocks."""
    if values.shape[0] <= _TOPK_ROWS:
        return values.topk(k, dim=-1).values
    return torch.cat([block.topk(k, dim=-1).values for block in values.split(_TOPK_ROWS)])


def top_share(weights: torch.Tensor, fraction: float = 0.01) -> torch.Tensor:
    """Share of sum(weights) held by the largest ceil(fraction * n) entries of each run ([runs, n]).

    For per-sample gradient magnitudes this is `grad/top1_share`: with MSE on heavy-tailed noise a
    handful of points supply most of the gradient; with MAE every point supplies the same 1/n.
    """
    top = largest(weights, top_count(weights.shape[-1], fraction)).sum(-1)
    return top / weights.sum(-1).clamp_min(torch.finfo(weights.dtype).tiny)


def abs_quantile(r: torch.Tensor, q: float = 0.99) -> torch.Tensor:
    """q-quantile of |r| per run ([runs, n] -> [runs]), linear interpolation as torch.quantile's default.

    The q-quantile sits at sorted position q (n - 1); for q >= 0.5 only the largest
    n - floor(q (n - 1)) entries are needed, so `topk` on those replaces a full sort (the same two
    order statistics, the same lerp: equal to torch.quantile up to its rounding of the position).
    """
    n = r.shape[-1]
    if not 0.5 <= q <= 1:
        return torch.quantile(r.abs(), q, dim=-1)
    pos = q * (n - 1)
    below = math.floor(pos)
    above = min(below + 1, n - 1)
    top = largest(r.abs(), n - below)  # descending: sorted position j is top[..., n - 1 - j]
    lo, hi = top[..., n - 1 - below], top[..., n - 1 - above]
    return torch.lerp(lo, hi, pos - below)


def excess_kurtosis(r: torch.Tensor) -> torch.Tensor:
    """m4 / m2^2 - 3 of each run's residuals r [runs, n] (0 for Gaussian, large for heavy tails)."""
    c = r - r.mean(-1, keepdim=True)
    c2 = c * c
    m2 = c2.mean(-1)
    m4 = (c2 * c2).mean(-1)
    return m4 / (m2 * m2).clamp_min(torch.finfo(r.dtype).tiny) - 3


def coverage(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Share of targets at or below the prediction, per run: for a tau-quantile fit it should be ~tau."""
    return (target <= pred).sum(-1).to(pred.dtype) / pred.shape[-1]


def coverage_of_residuals(e: torch.Tensor) -> torch.Tensor:
    """`coverage` from residuals e = pred - target [runs, n]: target <= pred exactly when e >= 0
    (IEEE subtraction keeps the sign of the exact difference and is 0 only for equal operands)."""
    return (e >= 0).sum(-1).to(e.dtype) / e.shape[-1]


def histogram(values: torch.Tensor, bins: int = 30) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-run histogram on the device: values [runs, n] -> (counts [runs, bins], lo [runs], hi [runs]).

    Each run gets `bins` equal-width buckets between its own min and max, counted with one
    scatter_add for the whole population (no per-run Python loop, no host sync).
    """
    runs = values.shape[0]
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
