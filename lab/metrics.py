"""Training-behaviour metrics, computed per run on the device over tensors with a leading run dimension.

Each function takes stacked tensors ([runs, ...], or [rows, runs, ...] for a history) and returns
one value per run ([runs]), so the trainer evaluates them for a whole population at once without a
host synchronisation. They are pure: the trainer owns the histories, these functions only read them.

lab.log_row assembles every tag of every run of a lab.trainer population at one log step from these.

Cost matters here: a study logs every tag of every run every `log_every` steps, so a metric that
sorts (torch.quantile sorts each row, ~20 ns per element on a CPU) would cost more than the training
step it describes. The order statistics below use `topk` on the few largest values instead (one
topk serves both p99 |residual| and the top-1% gradient share where |psi| grows with |e|), sums
are taken per block and turned into shares and moments once per row, and c^4 is summed as a dot
product of c^2 with itself (a pow kernel and a [runs, n] temporary saved).
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
HIST_BINS = 30  # equal-width buckets per run and histogram, between the run's own min and max


def flip_rate(history: torch.Tensor, rows: int) -> torch.Tensor:
    """Share of recent steps in which a parameter's update reversed direction, averaged over parameters.

    history: [m, runs, P], consecutive parameter vectors theta_t0 .. theta_s; the updates are
    u_t = theta_{t+1} - theta_t and a reversal at step t is u_t * u_{t-1} < 0, where each update counts
    only when it is larger than 4 ulps of the parameter it starts from (`update_directions`).
    rows: how many steps the rate averages over (the window, or fewer early on); reversals before the
    history's first pair count as 0 (the first update has no predecessor).
    Near 0: updates keep their direction (smooth descent). Near 1: every step undoes the last (oscillation).
    """
    return reversal_counts(history).sum(0) / (max(rows, 1) * history.shape[-1])


def update_directions(theta: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """sign(u) where |u| > 4 eps |theta|, else 0, elementwise: the direction of an update u from theta.

    An update of rounding size (a converged run in float32) reverses at random: it is not oscillation.
    Float arithmetic throughout: comparisons, & and sums of bool tensors are several times slower on CPUs.
    """
    noise = theta.abs().mul_(4 * torch.finfo(theta.dtype).eps)
    return update.sign().mul_((update.abs() - noise).sign_().clamp_(min=0))


def reversals(direction: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """1 where two consecutive update directions (from `update_directions`) are opposite, else 0."""
    return (direction * previous).neg_().clamp_(min=0)


def reversal_counts(history: torch.Tensor) -> torch.Tensor:
    """Reversals of the pair (u_{t-1}, u_t) per run, summed over parameters, for the t whose pair lies in
    history [m, runs, P] (theta_t0 .. theta_s): [m - 2, runs], row j for t = t0 + 1 + j."""
    u = history[1:] - history[:-1]  # [m-1, runs, P]
    direction = update_directions(history[:-1], u)
    return reversals(direction[1:], direction[:-1]).sum(-1)


def relative_amplitude(window: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """(max - min) / |mean| over the rows of a [rows, runs] history (the loss amplitude); dim: the rows' dim."""
    return amplitude_ratio(window.amax(dim), window.amin(dim), window.mean(dim))


def amplitude_ratio(high: torch.Tensor, low: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """(high - low) / |mean|, |mean| kept >= 1e-12: `relative_amplitude` from a window's max, min and mean."""
    return (high - low) / mean.abs().clamp_min(1e-12)


def param_amplitude(window: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Largest (max - min) of any parameter over the rows of a [rows, runs, P] history; dim: the rows'
    dim (-1 for [runs, P, rows])."""
    return (window.amax(dim) - window.amin(dim)).amax(-1)


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


def largest(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest entries of each row of values [runs, n], descending: (values [runs, k], indices)."""
    top = values.topk(k, dim=-1)
    return top.values, top.indices


def top_share(weights: torch.Tensor, fraction: float = 0.01) -> torch.Tensor:
    """Share of sum(weights) held by the largest ceil(fraction * n) entries of each run ([runs, n]).

    For per-sample gradient magnitudes this is `grad/top1_share`: with MSE on heavy-tailed noise a
    handful of points supply most of the gradient; with MAE every point supplies the same 1/n.
    """
    top, _ = largest(weights, top_count(weights.shape[-1], fraction))
    return share_of_top(top, weights.sum(-1))


def share_of_top(top: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """sum(top) / total per run: top [runs, k] the largest weights, total [runs] the sum of all."""
    return top.sum(-1) / total.clamp_min(torch.finfo(top.dtype).tiny)


def quantile_rank(n: int, q: float) -> tuple[int, int, float]:
    """Where the q-quantile of n sorted values sits (linear interpolation, torch.quantile's default):
    between ascending positions `below` and `above`, at fraction `weight` from below."""
    pos = q * (n - 1)
    below = math.floor(pos)
    return below, min(below + 1, n - 1), pos - below


def quantile_from_top(top: torch.Tensor, n: int, q: float) -> torch.Tensor:
    """The q-quantile of n values per run from their largest entries top [runs, m], descending, where
    m >= n - floor(q (n - 1)) (ascending position j is top[..., n - 1 - j])."""
    below, above, weight = quantile_rank(n, q)
    return torch.lerp(top[..., n - 1 - below], top[..., n - 1 - above], weight)


def abs_quantile(r: torch.Tensor, q: float = 0.99) -> torch.Tensor:
    """q-quantile of |r| per run ([runs, n] -> [runs]), linear interpolation as torch.quantile's default.

    For q >= 0.5 only the n - floor(q (n - 1)) largest entries matter, so `topk` on those replaces a
    full sort (the same two order statistics and the same lerp as torch.quantile).
    """
    n = r.shape[-1]
    if not 0.5 <= q <= 1:
        return torch.quantile(r.abs(), q, dim=-1)
    top, _ = largest(r.abs(), n - quantile_rank(n, q)[0])
    return quantile_from_top(top, n, q)


def excess_kurtosis(r: torch.Tensor) -> torch.Tensor:
    """m4 / m2^2 - 3 of each run's residuals r [runs, n] (0 for Gaussian, large for heavy tails)."""
    c = r - r.mean(-1, keepdim=True)
    c2 = c * c
    return kurtosis_from_sums(c2.sum(-1), torch.linalg.vecdot(c2, c2), r.shape[-1])


def kurtosis_from_sums(sum_c2: torch.Tensor, sum_c4: torch.Tensor, n: int) -> torch.Tensor:
    """Excess kurtosis m4 / m2^2 - 3 from the sums of c^2 and c^4 (c: centred residuals) over n points."""
    m2, m4 = sum_c2 / n, sum_c4 / n
    return m4 / (m2 * m2).clamp_min(torch.finfo(m2.dtype).tiny) - 3


def coverage(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Share of targets at or below the prediction, per run: for a tau-quantile fit it should be ~tau."""
    return coverage_of_residuals(pred - target)


def coverage_of_residuals(e: torch.Tensor) -> torch.Tensor:
    """`coverage` from residuals e = pred - target [runs, n]: the share with e >= 0.

    target <= pred exactly when e >= 0: IEEE subtraction keeps the sign of the exact difference and
    gives 0 only for equal operands. Counted as sign(e) + 1 clamped to 1 (0 for e < 0, 1 otherwise):
    float arithmetic, several times faster than summing a bool tensor on a CPU, and exact below 2^24.
    """
    return (e.sign() + 1).clamp_(max=1).sum(-1) / e.shape[-1]


def histogram(values: torch.Tensor, bins: int = HIST_BINS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
