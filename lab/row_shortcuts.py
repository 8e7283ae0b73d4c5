"""What spares a log row its passes over every run's points (lab.log_row): the few largest |residuals|
from a proved list of candidates (`LargestResiduals`), and the residuals' kurtosis of a line from
moments of the data (`ResidualMoments`)."""

from __future__ import annotations

import torch

from lab.metrics import kurtosis_from_sums, largest, quantile_rank, top_count

# How many of a run's largest |residuals| LargestResiduals keeps as candidates. A hit costs a gather
# and a topk of this many; a refresh a topk of one more than this over all n points (measured, 40 runs
# x 1000 points: topk of 11 63 us, of 65 91 us, gather + topk 11 of 64 12 us).
CANDIDATES = 64


def order_count(n: int) -> int:
    """How many of a run's largest |residuals| a row needs: those behind p99 (linear interpolation) and
    the top 1% (11 of 1000 points, 65 of 6302)."""
    return max(n - quantile_rank(n, 0.99)[0], top_count(n, 0.01))


def candidate_count(n: int) -> int:
    """Candidates LargestResiduals keeps for n points: CANDIDATES, or 4x the order statistics a row
    needs where that is more; 0 (use a full topk) where they would be half the points or more."""
    m = max(CANDIDATES, 4 * order_count(n))
    return m if n > 2 * m else 0


def _mean_slope(named: dict, kind: str) -> torch.Tensor:
    """Each run's slope averaged over outputs, [B]: the residual averaged over outputs is
    mean_k(w_k) x + mean_k(b_k) - y. A constant model is a line of slope 0."""
    if kind == "linear":
        return named["weight"][..., 0].mean(-1)
    return named["value"].new_zeros(named["value"].shape[0])


class LargestResiduals:
    """The m largest |residuals| of each run of a population, from a list of candidates where that is exact.

    A linear or constant model's residual, averaged over its k outputs, is affine in the flat parameters
    theta = (w_1..w_k, b_1..b_k) (or the k values): r_i = sd (mean_j (w_j x_i + b_j) - y_i), sd the target
    scale. Between a snapshot theta0 and now no residual moves by more than

        delta = sd sum_j c_j |theta_j - theta0_j|,   c = max|x| / k for a slope, 1 / k for an intercept.

    At a snapshot the M largest |r_i| become the candidates, and T0 is the largest |r_i| among the
    others. Later, if the m-th largest candidate is >= T0 + delta (+ the rounding of both evaluations),
    no other point can be among the m largest, so the candidates' top m are exactly the top m. The runs
    where the proof fails (parameters moved far: early training, large steps) get a full topk and a new
    snapshot. The proof reads one bool from the device per row, so populations use this only on CPUs,
    where that costs nothing.
    """

    def __init__(self, x: torch.Tensor, y3: torch.Tensor, kind: str, k: int, candidates: int = CANDIDATES):
        self.candidates = candidates
        x_max = x.abs().amax((1, 2))  # [N]
        self.y_max = y3.abs().amax((1, 2))  # [N] training units
        ones = torch.full((len(x_max), k), 1.0 / k, dtype=x.dtype, device=x.device)
        # c per flat parameter (lab.population's flat order: weight [k x 1], then bias [k]; or the k values)
        self.coef = torch.cat([ones * x_max[:, None], ones], 1) if kind == "linear" else ones  # [N, P]
        self.eps = torch.finfo(x.dtype).eps
        # roundings allowed per evaluation, twice (snapshot and now): x w + b - y, then the mean over k outputs
        self.roundings = 8 + 2 * k
        N = len(x_max)
        self.index = torch.zeros(N, candidates, dtype=torch.long, device=x.device)  # [N, M] candidate points
        self.theta0 = torch.zeros_like(self.coef)  # each run's parameters at its snapshot
        self.threshold = torch.zeros_like(x_max)  # T0 + the snapshot's rounding allowance (original units)
        self.fresh = torch.ones(N, dtype=torch.bool, device=x.device)  # no snapshot yet
        self.hits = self.refreshes = 0  # calls answered from the candidates alone, runs refreshed

    def largest(self, resid: torch.Tensor, P: torch.Tensor, sd: torch.Tensor | None, m: int, runs: slice):
        """The m largest |resid| per run, descending, and their point indices ([R, m] each).

        resid [R, n] in original units for the population's runs `runs` (a slice); P [N, P] the
        population's flat parameters; sd [N] or None (no scaling).
        """
        theta, coef, index = P[runs], self.coef[runs], self.index[runs]
        moved = torch.linalg.vecdot((theta - self.theta0[runs]).abs_(), coef)
        # A computed residual carries ~3 roundings of |x w| + |b| + |y| (its "size", k more for the mean
        # over outputs), at the snapshot and now; size now <= size at the snapshot + moved, so
        # (8 + 2k) eps (size0 + moved) covers both evaluations.
        margin = moved * (1 + self.roundings * self.eps)
        if sd is not None:
            margin = margin * sd[runs]
        top, pos = resid.gather(1, index).abs_().topk(m, dim=1)
        where = index.gather(1, pos)
        failed = (top[:, -1] < self.threshold[runs] + margin) | self.fresh[runs]
        if not bool(failed.any()):
            self.hits += 1
            return top, where
        redo = failed.nonzero()[:, 0]
        full, full_index = largest(resid[redo].abs(), self.candidates + 1)
        at = redo + runs.start  # population rows
        size0 = torch.linalg.vecdot(theta[redo].abs(), coef[redo]) + self.y_max[at]
        allowance = self.roundings * self.eps * size0 * (1.0 if sd is None else sd[at])
        self.index[at], self.threshold[at] = full_index[:, :self.candidates], full[:, self.candidates] + allowance
        self.theta0[at] = theta[redo]
        self.fresh[at] = False
        self.refreshes += len(redo)
        top[redo], where[redo] = full[:, :m], full_index[:, :m]
        return top, where


class ResidualMoments:
    """Moments of each run's data, so that the residuals' kurtosis needs no pass over the points.

    With X = x - mean(x), Y = y - mean(y) (training units) and the least-squares slope w* = Sxy / Sxx, the
    centred residual of a line of slope w (averaged over outputs) is c_i = sd (d X_i - R_i), with
    d = w - w* and R = Y - w* X the least-squares residuals. So

        sum c^2 = sd^2 (d^2 Sxx - 2 d Sxr + Srr)
        sum c^4 = sd^4 (d^4 S40 - 4 d^3 S31 + 6 d^2 S22 - 4 d S13 + S04),   Sab = sum X^a R^b,

    and the kurtosis n sum c^4 / (sum c^2)^2 - 3 does not depend on sd. Expanding around w* rather than
    0 keeps the polynomial from cancelling: its terms are of the size of the residuals themselves
    whether the line is near the fit (small d) or far from it (d X dominates), where an expansion in w
    would cancel |w X|^4 down to |c|^4 (a fit with residuals 1e-4 of the targets' spread lost every
    digit). float64 throughout.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, max_elements: int = 1 << 22):
        chunk = max(1, max_elements // max(y.shape[1], 1))  # float64 temporaries of ~32 MB, whatever n
        slopes, parts = [], []
        for lo in range(0, y.shape[0], chunk):
            X = x[lo:lo + chunk, :, 0].double()
            Y = y[lo:lo + chunk].double()
            X = X - X.mean(1, keepdim=True)
            Y = Y - Y.mean(1, keepdim=True)
            X2 = X * X
            sxx = X2.sum(1)
            best = (X * Y).sum(1) / sxx.clamp_min(torch.finfo(torch.float64).tiny)  # 0 where x is constant
            R = Y - best[:, None] * X
            R2 = R * R
            slopes.append(best)
            parts.append(torch.stack([sxx, (X * R).sum(1), R2.sum(1), (X2 * X2).sum(1), (X2 * X * R).sum(1),
                                      (X2 * R2).sum(1), (X * R * R2).sum(1), (R2 * R2).sum(1)]))
        self.best = torch.cat(slopes)  # [N] least-squares slopes
        self.S = torch.cat(parts, 1)  # [8, N]

    def kurtosis(self, slope: torch.Tensor, n: int) -> torch.Tensor:
        """Excess kurtosis of each run's residuals for slopes [..., N] (any float dtype), in that dtype."""
        d = slope.double() - self.best
        sxx, sxr, srr, s40, s31, s22, s13, s04 = self.S
        d2 = d * d
        sum_c2 = d2 * sxx - 2 * d * sxr + srr
        sum_c4 = d2 * (d2 * s40 - 4 * d * s31 + 6 * s22) - 4 * d * s13 + s04
        return kurtosis_from_sums(sum_c2, sum_c4, n).to(slope.dtype)
