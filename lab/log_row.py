"""One log row: every scalar tag of every run of a population (lab.population) at one log step, on the device.

The per-run definitions live in lab.metrics; this module evaluates them for a whole population at once,
in cache-sized chunks of whole blocks (a block: runs that share a loss), from the residuals
e = pred - target and psi the training step has just computed. A row has three parts: `row_sums` reads
the [runs, n] tensors (in the training loop, or on a second core: lab.row_worker); `raw_row` takes the
step's small tensors at its step; `tag_rows` derives the remaining tags (shares, kurtosis, parameter
errors) for all the rows of a flush at once, with the oscillation tags from lab.history.

With `log_every = 1` a row is computed as often as the step itself, so it is kept to few passes over
the [runs, n] data:

- p99 |residual| and the top-1% gradient share need the few largest |residuals| of each run. A topk
  over n points costs ~1.5 us per run (1000 points, CPU); `LargestResiduals` keeps a short list of
  candidates and proves, from how far the parameters moved, when the largest are still among them.
- The kurtosis of a linear or constant model's residuals is a polynomial in its slope with moments of
  the data as coefficients (`ResidualMoments`, float64, computed once): no pass over the points.
- The outlier share gathers |psi| at each run's outliers (padded index lists), not over all n points.
- The quantile loss's top-1% share follows from three counts (its |psi| takes three values).

`LargestResiduals` and `ResidualMoments` live in lab.row_shortcuts (tested in tests/test_log_row.py, beside
the row they serve).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from lab.metrics import (
    HIST_BINS,
    HIST_TAGS,
    histogram,
    kurtosis_from_sums,
    largest,
    quantile_from_top,
    top_count,
)
from lab.row_shortcuts import _mean_slope, order_count

# The row works on chunks of whole blocks of at most this many [run, point] values (1 MiB of float32):
# one chunk for a study of a few hundred runs, cache-sized pieces for thousands.
_ROW_ELEMENTS = 1 << 18
# Losses whose |psi(e)| is a non-decreasing function of |e|: their largest per-sample gradients sit at
# their largest residuals, so one search for the largest |e| serves p99 |e| and the top-1% share.
_BY_ABS_RESID = frozenset({"mse", "rmse", "mae", "huber", "smooth_l1", "log_cosh", "pseudo_huber"})


@dataclass
class RawRow:
    """A log row as taken at its step: the sums that read the step's [N, n] tensors (`row_sums`), the
    step's small tensors and a copy of the parameters; the remaining tags are derived at flush time."""

    sums: torch.Tensor | None  # [row_sums_size, N]; None until computed (lab.row_worker.Rows)
    loss: torch.Tensor  # [N] training loss (training units)
    gap: torch.Tensor  # [N]
    lr: torch.Tensor  # [N]
    P: torch.Tensor | None  # [N, P] parameters (a copy), line models only (the MLP logs none of them)
    grad: torch.Tensor | None  # [2, N]: the gradient's norm and largest |component|; None if `grads`
    grads: torch.Tensor | None  # [N, P] a copy of the gradient (line models): tag_rows takes both
    has_grad: torch.Tensor | None  # [N] 0/1, rmse populations only (a run at zero loss has no gradient)
    histograms: torch.Tensor | None = None  # row_histograms, at a histogram step (lab.row_worker.Rows adds them)
    wall_time: float = 0.0  # when the row's step was taken (time.time()): its events' wall time


def row_sums_size(pop) -> int:
    """Rows of `row_sums(pop, ...)`: the distribution's 5 (7 without ResidualMoments), 2 validation sums,
    and the loss in original units where a run normalises its targets."""
    return _distribution_size(pop) + 2 + int(pop.any_norm)


def _distribution_size(pop) -> int:
    """Rows of `_distribution`: 5, and the two central sums for the kurtosis without ResidualMoments."""
    return 5 if pop.moments is not None else 7


def row_sums(pop, e: torch.Tensor, psi: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """The part of a log row that reads the step's [N, n] tensors, reduced to [row_sums_size(pop), N].

    e, psi [N, n, k]: a row step's full-batch residuals e = pred - target and psi, in training units
    (the population's row buffers, `Population.terms(keep=True)`, or what a row worker recomputed of
    them: lab.row_worker._compute); P [N, P] the parameters at that step.
    It reads nothing else that changes during training, so it may run anywhere the population's data is:
    in the training loop, or in lab.row_worker's process on another core, on buffers the step wrote.
    """
    dist = _cat([_distribution(pop, runs, blocks, e[runs], psi[runs], P) for runs, blocks in _row_chunks(pop)], dim=1)
    val_pred = pop.forward(pop.shapes.named(P), pop.x_val)
    val_pred = val_pred.mean(-1) if pop.k > 1 else val_pred[..., 0]  # [N, n_val]
    if pop.any_norm:
        val_pred = val_pred * pop.sd + pop.mu
    val_err = val_pred - pop.signal_val
    parts = [dist, torch.linalg.vecdot(val_err, val_err)[None], val_err.abs().sum(-1)[None]]
    if pop.any_norm:
        parts.append(_loss_in_original_units(pop, e)[None])
    return torch.cat(parts)


def row_psi(pop, e: torch.Tensor, psi: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """psi [N, n, k] of a row step from its buffers: `psi` itself, unless the step left the psi of its
    cheap blocks out (`Population.psi_derived`); then those are derived from e with the block's own loss
    function (the step's, on the same e: the same numbers) and the others copied, into `out` (or a new tensor)."""
    if not pop.psi_derived:
        return psi
    out = torch.empty_like(e) if out is None else out
    for blk in pop.blocks:
        if blk.cheap_psi:
            blk.terms(e[blk.runs], out=out[blk.runs], **blk.params)
        else:
            out[blk.runs] = psi[blk.runs]
    return out


def raw_row(pop, loss, chain, P, gradient, gap, lr) -> RawRow:
    """A log row at its step, without its sums (lab.row_worker.Rows adds them): on the device, no host sync.

    loss, gap, lr [N] as logged; gradient [N, P] the loss's gradient, before any clipping (grad/norm and
    grad/max_abs describe it, both); P [N, P] the live parameters (copied here). Everything else is derived
    for many rows at once by `tag_rows`: a row is then a few dozen tensor ops at its step instead of ~140,
    most of which were launch overhead on [N]-sized tensors.
    """
    line = pop.model.kind in ("linear", "constant")
    if line:  # a copy of a few values per run: one op at the step instead of four
        grad, grads = None, gradient.clone()
    else:
        grad, grads = torch.stack([torch.linalg.vector_norm(gradient, dim=-1), gradient.abs().amax(-1)]), None
    return RawRow(sums=None, loss=loss, gap=gap, lr=lr, P=P.clone() if line else None, grad=grad, grads=grads,
                  has_grad=None if chain is None else (chain != 0).to(P.dtype), wall_time=time.time())


def tag_rows(pop, raws: list[RawRow], history: torch.Tensor) -> torch.Tensor:
    """Every scalar tag (SCALAR_TAGS, then param/<name>) of S raw rows: [S, T, N], computed for all
    rows at once (the shares, moments and parameter errors of a flush's rows in one go). history
    [3, S, N]: the rows' flip rate, loss amplitude and parameter amplitude (lab.history)."""
    S, N = len(raws), raws[0].loss.shape[0]
    n, n_val = pop.y3.shape[1], pop.x_val.shape[1]
    sums = torch.stack([r.sums for r in raws], 1)  # [row_sums_size, S, N]
    D = _distribution_size(pop)
    on_outliers, on_top, total, p99, ahead, *central = sums[:D].unbind(0)
    total = total.clamp_min(torch.finfo(total.dtype).tiny)
    outlier_share, top = on_outliers / total, on_top / total
    if raws[0].has_grad is not None:  # shares of no gradient at all are 0
        has_grad = torch.stack([r.has_grad for r in raws])
        outlier_share, top = outlier_share * has_grad, top * has_grad
    P = torch.stack([r.P for r in raws]) if raws[0].P is not None else None  # [S, N, P]
    if pop.moments is not None:
        named = pop.shapes.named(P.reshape(S * N, -1))
        slope = _mean_slope(named, pop.model.kind).reshape(S, N)
        kurtosis = pop.moments.kurtosis(slope, n)
    else:
        kurtosis = kurtosis_from_sums(*central, n)
    named_now = _named_now(P, pop) if P is not None else sums.new_zeros(S, N, 0)  # [S, N, K]
    val = sums[D:D + 2] / n_val  # [2, S, N]
    if raws[0].grads is not None:  # the rows' gradients [S, N, P]: their norm and largest |component|
        grads = torch.stack([r.grads for r in raws])
        grad = torch.stack([torch.linalg.vector_norm(grads, dim=-1), grads.abs().amax(-1)])  # [2, S, N]
    else:
        grad = torch.stack([r.grad for r in raws], 1)  # [2, S, N]
    flip, loss_amplitude, amplitude = history  # [S, N] each
    tags = [
        sums[D + 2] if pop.any_norm else torch.stack([r.loss for r in raws]),  # the loss in original units
        val[0],
        val[1],
        torch.stack([r.lr for r in raws]),
        torch.stack([r.gap for r in raws]),
        torch.linalg.vector_norm(named_now - pop.true_params, dim=-1),
        torch.linalg.vector_norm(named_now - pop.ref_params, dim=-1),
        flip,
        loss_amplitude,
        amplitude,
        grad[0],
        grad[1],
        outlier_share,
        top,
        p99,
        kurtosis,
        ahead / n,
        *named_now.unbind(-1),
    ]
    return torch.stack(tags, 1)


def _row_chunks(pop):
    """Consecutive whole blocks joined into chunks of at most _ROW_ELEMENTS values: (runs slice, blocks).
    Few chunks keep the row's op count low; bounded ones keep its tensors in cache. A chunk's e and psi
    are views of the row buffers, which the row step wrote block by block (`Population.terms(keep=True)`):
    no concatenation per row."""
    chunk, size = [], 0
    for blk in pop.blocks:
        numel = blk.y3.numel() * pop.k
        if chunk and size + numel > _ROW_ELEMENTS:
            yield _chunk(pop, chunk)
            chunk, size = [], 0
        chunk.append(blk)
        size += numel
    if chunk:
        yield _chunk(pop, chunk)


def _chunk(pop, blocks):
    return slice(blocks[0].runs.start, blocks[-1].runs.stop), blocks


def _distribution(pop, runs: slice, blocks, e, psi, P) -> torch.Tensor:
    """Per-run sums over the points of the runs `runs` ([5, R], or [7, R] without ResidualMoments): sum
    |psi| on outliers, sum of the top-1% |psi|, sum |psi|, p99 |resid|, the count of resid >= 0 (the
    coverage), and for the kurtosis the sums of c^2 and c^4 (c = resid - its mean)."""
    n = e.shape[1]
    resid = e.mean(-1) if pop.k > 1 else e[..., 0]
    if pop.any_norm:
        resid = resid * pop.sd[runs]  # original units: pred - y = sd e
    per_sample = psi.abs().sum(-1) if pop.k > 1 else psi[..., 0].abs()  # |dl_i/dy_hat| up to the run's chain
    # One search for the largest |resid| serves p99 |resid| and, where |psi| grows with |e|, the top-1%
    # gradient share: the largest |psi| sit at the largest |e| (sd > 0 keeps the order).
    count, m = top_count(n, 0.01), order_count(n)
    if pop.largest is not None:
        top_resid, where = pop.largest.largest(resid, P, pop.sd[:, 0] if pop.any_norm else None, m, runs)
    else:
        top_resid, where = largest(resid.abs(), m)
    ahead = resid if pop.k == 1 else e[..., 0]  # the first output's residual (sd > 0 keeps its sign)
    # minus the count of ahead < 0 (-1 where ahead < 0, 0 where ahead >= 0, -0.0 included): float ops,
    # in place after the first (see coverage_of_residuals; NaN stays NaN)
    negatives = ahead.clamp(max=0).sign_().sum(-1)
    on_top = per_sample.gather(1, where[:, :count]).sum(-1)
    for blk in blocks:
        local = slice(blk.runs.start - runs.start, blk.runs.stop - runs.start)
        if blk.spec.name == "quantile" and pop.k == 1:
            on_top[local] = _quantile_top(resid[local], -negatives[local], blk.quantile_classes, count)
        elif not (blk.spec.name in _BY_ABS_RESID and pop.k == 1):  # the largest |psi| may sit elsewhere
            on_top[local] = largest(per_sample[local], count)[0].sum(-1)
    sums = [
        torch.linalg.vecdot(per_sample.gather(1, pop.outlier_at[runs]), pop.outlier_w[runs]),
        on_top,
        per_sample.sum(-1),
        quantile_from_top(top_resid, n, 0.99),
        ahead.shape[-1] + negatives,  # coverage count: n minus the count of ahead < 0
    ]
    if pop.moments is None:
        c = resid - resid.mean(-1, keepdim=True)
        c2 = c * c
        sums += [c2.sum(-1), torch.linalg.vecdot(c2, c2)]  # sum of c^4 without a [R, n] tensor of it
    return torch.stack(sums)


def quantile_classes(tau, like: torch.Tensor, runs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The three values |psi| of a quantile block takes, largest first, and where each came from ([B, 3] each).

    psi = sign(e)/2 + (1/2 - tau) (lab.fused) is 1 - tau where e > 0, -tau where e < 0 and 1/2 - tau where
    e = 0, computed here as the step computes them, in the run dtype (`like`): 1/2 - tau rounded once to
    that dtype. tau: a float or [B, 1, 1]. Fixed for a run, so taken once per block (lab.population.build);
    `_quantile_top` counts the classes at each row."""
    if isinstance(tau, torch.Tensor):
        half_minus_tau = 0.5 - tau.reshape(-1).to(like.dtype)
    else:  # as lab.fused adds the Python float 0.5 - tau to a tensor of the run dtype
        half_minus_tau = like.new_tensor(0.5 - tau)
    values = torch.stack(torch.broadcast_tensors(half_minus_tau + 0.5, half_minus_tau - 0.5, half_minus_tau), -1)
    return values.abs().expand(runs, 3).sort(-1, descending=True)


def _quantile_top(resid: torch.Tensor, below: torch.Tensor, classes, count: int) -> torch.Tensor:
    """Sum of the `count` largest |psi| of each run of a quantile block without a topk over its points.

    With the count of points in each of |psi|'s three classes (`quantile_classes`), the top `count` are the
    largest values first: sum over values v, descending, of v times how many of the count are left for
    it. resid [B, n] (any positive scale of e); below [B] the count of e < 0."""
    values, order = classes
    n = resid.shape[1]
    above = resid.clamp(min=0).sign_().sum(-1)  # count of e > 0
    counts = torch.stack([above, below, n - above - below], -1).gather(-1, order)  # [B, 3], as values
    before = counts.cumsum(-1) - counts  # points in larger classes
    taken = torch.minimum((count - before).clamp_(min=0), counts)
    return torch.linalg.vecdot(values, taken)


def _named_now(P, pop) -> torch.Tensor:
    """Named parameters in original units, [S, N, len(named_keys)], from stacked parameters P [S, N, P]
    of a linear or constant model (an MLP names none: tag_rows logs no param/ tags for it)."""
    S, N, k = P.shape[0], P.shape[1], pop.k
    named = pop.shapes.named(P.reshape(S * N, -1))
    if pop.model.kind == "linear":
        w, b = named["weight"].reshape(S, N, k), named["bias"].reshape(S, N, k)
        if pop.any_norm:
            w, b = w * pop.sd, b * pop.sd + pop.mu
        return torch.stack([w, b], -1).reshape(S, N, 2 * k)
    value = named["value"].reshape(S, N, k)
    return value * pop.sd + pop.mu if pop.any_norm else value


def _loss_in_original_units(pop, e_all: torch.Tensor):
    """The configured loss of the original-unit residuals sd e (equals the training loss without normalisation)."""
    vals = []
    for blk in pop.blocks:
        e = e_all[blk.runs]
        _, value_sum = blk.terms(e * pop.sd[blk.runs, :, None], **blk.params)
        vals.append(value_sum / (e.shape[1] * e.shape[2]))
    m = _cat(vals)
    return m if pop.root is None else torch.where(pop.root, m.clamp_min(0).sqrt(), m)


def row_histograms(pop, e: torch.Tensor, psi: torch.Tensor, chain: torch.Tensor | None) -> torch.Tensor:
    """Histograms of a row step's full-batch residuals (original units, averaged over outputs) and
    per-sample gradient magnitudes |psi| (times |dL/dm| for rmse runs: `chain` [N], else None), from the
    row's e and psi [N, n, k] (psi whole: `row_psi`): [len(HIST_TAGS), N, HIST_BINS + 2], each tag's
    counts, then its lo and hi (metrics.histogram). Computed where the row's sums are (lab.row_worker)."""
    resid = e.mean(-1) if pop.k > 1 else e[..., 0]
    if pop.any_norm:
        resid = resid * pop.sd  # pred - y = sd e
    per_sample = psi.abs().sum(-1)
    if chain is not None:
        per_sample = per_sample * chain.abs()[:, None]
    values_of = {"grad/per_sample_abs": per_sample, "residual/values": resid}
    parts = []
    for tag in HIST_TAGS:
        counts, lo, hi = histogram(values_of[tag], HIST_BINS)
        parts.append(torch.cat([counts, lo[:, None], hi[:, None]], 1))
    return torch.stack(parts)


def row_histograms_shape(pop) -> tuple[int, int, int]:
    return len(HIST_TAGS), pop.y3.shape[0], HIST_BINS + 2


def emit_histograms(step: int, histograms: torch.Tensor, on_hist, inverse) -> None:
    """Hand a row's `row_histograms` to on_hist(step, tag, counts [N, bins], lo [N], hi [N]), runs in
    the caller's order (`inverse`): one host copy for both tags."""
    host = histograms.cpu().numpy()
    for tag, h in zip(HIST_TAGS, host):
        h = h[inverse]
        on_hist(step, tag, np.ascontiguousarray(h[:, :-2]), h[:, -2].copy(), h[:, -1].copy())


def _cat(parts: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)
