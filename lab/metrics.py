"""Training-behaviour metrics, computed per run on the device over tensors with a leading run dimension.

Each function takes stacked tensors ([runs, ...], or [rows, runs, ...] for a history) and returns
one value per run ([runs]), so the trainer evaluates them for a whole population at once without a
host synchronisation. They are pure: the trainer owns the histories, these functions only read them.

`population_row` assembles every tag of every run of a lab.trainer population at one log step, block
by block (a block: runs that share a loss, few enough that their [runs, n] tensors stay in cache).

Cost matters here: a study logs every tag of every run every `log_every` steps, so a metric that
sorts (torch.quantile sorts each row, ~20 ns per element on a CPU) would cost more than the training
step it describes. The order statistics below use `topk` on the few largest values instead (one
topk serves both p99 |residual| and the top-1% gradient share where |psi| grows with |e|), sums
are taken per block and turned into shares and moments once per row, and c^4 is summed as a dot
product of c^2 with itself (a pow kernel and a [runs, n] temporary saved).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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


def flip_rate(history: torch.Tensor, rows: int) -> torch.Tensor:
    """Share of recent steps in which a parameter's update reversed direction, averaged over parameters.

    history: [m, runs, P], consecutive parameter vectors theta_t0 .. theta_s; the updates are
    u_t = theta_{t+1} - theta_t and a reversal at step t is u_t * u_{t-1} < 0 (strictly: a zero update
    reverses nothing, nor does an update no larger than 4 ulps of the parameter). rows: how many steps the rate averages over (the window, or fewer early on);
    reversals before the history's first pair count as 0 (the first update has no predecessor).
    Near 0: updates keep their direction (smooth descent). Near 1: every step undoes the last (oscillation).
    """
    if history.shape[0] < 3:
        return history.new_zeros(history.shape[1])
    u = history[1:] - history[:-1]  # [m-1, runs, P]
    # An update of rounding size (a converged run in float32) reverses at random: it is not oscillation.
    noise = 4 * torch.finfo(history.dtype).eps * history.abs().amax(0)  # [runs, P]
    big = u.abs() > noise
    flips = ((u[1:] * u[:-1] < 0) & big[1:] & big[:-1]).sum(-1).sum(0)  # reversals per run, over steps and params
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


# ---------------------------------------------------------------------------------------------------
# A population's log row: every tag above for every run of a lab.trainer population, on the device.


@dataclass
class Histories:
    """The recent per-step values a log row at `step` reads (ring buffers, oldest row overwritten)."""

    step: int
    window: int
    ring: int
    loss_ring: torch.Tensor  # [window, N]
    param_ring: torch.Tensor | None  # [ring, N, P]
    flip_ring: torch.Tensor | None  # [window, N] (models too large for param_ring)

    def params(self, count: int) -> torch.Tensor:
        """Parameters of the last `count` steps up to `step`, oldest first: [count, N, P]."""
        count = min(count, self.step + 1)
        steps = torch.arange(self.step - count + 1, self.step + 1, device=self.param_ring.device)
        return self.param_ring[steps % self.ring]  # ring rows in step order, indexed on the device


def population_row(pop, resids, psis, loss, chain, P, grads, gnorm, gap, lr, h: Histories) -> torch.Tensor:
    """Every scalar tag (SCALAR_TAGS, then param/<name>) for a whole population at one log step: [T, N].

    pop: the trainer's population (its blocks of runs, data and parameter views); resids and psis: each
    block's full-batch residuals e = pred - target and psi [B, n, k], in training units; loss, gap, lr [N] as logged;
    grads [N, P] (gnorm: their pre-clip norm when clipped); h: the recent per-step histories.
    """
    step, N = h.step, P.shape[0]
    dist = torch.cat([_block_sums(pop, blk, e, psi) for blk, e, psi in zip(pop.blocks, resids, psis)], 1)
    on_outliers, on_top, total, p99, sum_c2, sum_c4, ahead = dist.unbind(0)
    total = total.clamp_min(torch.finfo(total.dtype).tiny)
    outlier_share, top = on_outliers / total, on_top / total
    n = resids[0].shape[1]
    kurtosis = kurtosis_from_sums(sum_c2, sum_c4, n)
    cover = ahead / n
    if chain is not None:  # an rmse run at zero loss has no gradient at all: shares of nothing are 0
        has_grad = (chain != 0).to(P.dtype)
        outlier_share, top = outlier_share * has_grad, top * has_grad
    train_loss = _loss_in_original_units(pop, resids) if pop.any_norm else loss
    val_pred = pop.forward(pop.named, pop.x_val)
    val_pred = val_pred.mean(-1) if pop.k > 1 else val_pred[..., 0]  # [N, n_val]
    if pop.any_norm:
        val_pred = val_pred * pop.sd + pop.mu
    val_err = val_pred - pop.signal_val
    named_now = _named_now(P, pop)
    loss_window = h.loss_ring[:min(step + 1, h.window)]  # the rows of the last `window` steps, in ring order
    if h.param_ring is not None:
        flip = flip_rate(h.params(h.window + 2), min(step, h.window))
        amplitude = param_amplitude(h.params(h.window))
    else:
        flip = h.flip_ring.sum(0) / max(min(step, h.window), 1)
        amplitude = torch.full((N,), float("nan"), dtype=P.dtype, device=P.device)
    rows = [
        train_loss,
        torch.linalg.vecdot(val_err, val_err) / val_err.shape[1],
        val_err.abs().sum(-1) / val_err.shape[1],
        lr,
        gap,
        torch.linalg.vector_norm(named_now - pop.true_params, dim=-1),
        torch.linalg.vector_norm(named_now - pop.ref_params, dim=-1),
        flip,
        relative_amplitude(loss_window),
        amplitude,
        torch.linalg.vector_norm(grads, dim=-1) if gnorm is None else gnorm,
        grads.abs().amax(-1),
        outlier_share,
        top,
        p99,
        kurtosis,
        cover,
        *named_now.unbind(1),
    ]
    return torch.stack(rows)


def _residuals(pop, blk, e: torch.Tensor) -> torch.Tensor:
    """Residuals in original units [B, n], averaged over outputs, from training-unit residuals e [B, n, k]:
    pred - y = sd e (normalised targets: y_train = (y - mu) / sd)."""
    e = e.mean(-1) if pop.k > 1 else e[..., 0]
    return e * pop.sd[blk.runs] if pop.any_norm else e


def _block_sums(pop, blk, e, psi) -> torch.Tensor:
    """Per-run sums over a block's points, [8, B] (per block, so its [B, n] tensors stay in cache):
    sum |psi| on outliers, sum of the top-1% |psi|, sum |psi|, p99 |resid|, then for the kurtosis the
    sums of c^2 and c^4 (c = resid - its mean) and for the coverage the count of resid >= 0."""
    n = e.shape[1]
    resid = _residuals(pop, blk, e)
    per_sample = psi.abs().sum(-1) if pop.k > 1 else psi[..., 0].abs()  # |dl_i/dy_hat| up to the run's chain
    # One topk serves p99 |resid| and, where |psi| grows with |e|, the top-1% gradient share: the largest
    # |psi| sit at the largest |e| (normalising scales e by sd > 0, which keeps the order).
    below, count = quantile_rank(n, 0.99)[0], top_count(n, 0.01)
    top_resid, where = largest(resid.abs(), max(n - below, count))
    if blk.by_abs_resid:
        top_psi = per_sample.gather(1, where[:, :count])
    else:
        top_psi, _ = largest(per_sample, count)
    c = resid - resid.mean(-1, keepdim=True)
    c2 = c * c
    ahead = resid if pop.k == 1 else e[..., 0]  # the first output's residual (sd > 0 keeps its sign)
    return torch.stack([
        torch.linalg.vecdot(per_sample, pop.outlier_f[blk.runs]),
        top_psi.sum(-1),
        per_sample.sum(-1),
        quantile_from_top(top_resid, n, 0.99),
        c2.sum(-1),
        torch.linalg.vecdot(c2, c2),  # sum of c^4 without a [B, n] tensor of it
        (ahead.sign() + 1).clamp_(max=1).sum(-1),  # count of ahead >= 0 (see coverage_of_residuals)
    ])


def _named_now(P, pop) -> torch.Tensor:
    """Named parameters of every run in original units, [N, len(named_keys)]."""
    N, k, named = P.shape[0], pop.k, pop.named
    if pop.model.kind == "linear":
        w, b = named["weight"].reshape(N, k), named["bias"].reshape(N, k)
        if not pop.any_norm:
            return torch.stack([w, b], -1).reshape(N, 2 * k)
        sd, mu = pop.sd, pop.mu
        return torch.stack([w * sd, b * sd + mu], -1).reshape(N, 2 * k)
    if pop.model.kind == "constant":
        value = named["value"].reshape(N, k)
        return value * pop.sd + pop.mu if pop.any_norm else value.clone()
    return P.new_zeros(N, 0)


def _loss_in_original_units(pop, resids):
    """The configured loss of the original-unit residuals sd e (equals the training loss without normalisation)."""
    vals = []
    for blk, e in zip(pop.blocks, resids):
        _, value_sum = blk.terms(e * pop.sd[blk.runs, :, None], **blk.params)
        vals.append(value_sum / (e.shape[1] * e.shape[2]))
    m = _cat(vals)
    return m if pop.root is None else torch.where(pop.root, m.clamp_min(0).sqrt(), m)


def population_histograms(pop, step, resids, psis, chain, on_hist, inverse):
    """Histograms of residuals and per-sample gradient magnitudes (full batch), computed on the device."""
    resid = _cat([_residuals(pop, blk, e) for blk, e in zip(pop.blocks, resids)])
    per_sample = _cat([psi.abs().sum(-1) for psi in psis])
    if chain is not None:
        per_sample = per_sample * chain.abs()[:, None]
    values_of = {"grad/per_sample_abs": per_sample, "residual/values": resid}
    for tag in HIST_TAGS:
        counts, lo, hi = histogram(values_of[tag])
        on_hist(step, tag, counts.cpu().numpy()[inverse], lo.cpu().numpy()[inverse], hi.cpu().numpy()[inverse])


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)
