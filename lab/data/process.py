"""The data-generating process of every kind: the signal, the noise and its draw, and the noise's
quantiles and mean in closed form (what lab.data.Truth answers with)."""

from __future__ import annotations

import numpy as np
import scipy.special
import torch
from torch import Tensor

from lab.data.kinds import KINDS, _noise_form

# ---------------------------------------------------------------------------------------------------
# The process, in float64: signal, noise draws, noise quantiles.


def _signal(kind: str, params: dict, x: Tensor) -> Tensor:
    """f(x) before target_scale: slope*x + intercept, or intercept + slope*sin(2x) for ``nonlinear``."""
    if KINDS[kind].signal == "linear":
        return params["slope"] * x + params["intercept"]
    return params["intercept"] + params["slope"] * torch.sin(2.0 * x)


def _noise_sd(params: dict, x: Tensor) -> Tensor:
    """Heteroscedastic sd(x) = noise + noise_slope*(x - x_lo), clamped at 0 left of the range."""
    return (params["noise"] + params["noise_slope"] * (x - params["x_range"][0])).clamp(min=0.0)


def _draw(kind: str, params: dict, n: int, generator: torch.Generator, contaminate: bool):
    """One set of n points in float64 on the CPU: x [n], y [n], outlier mask [n]."""
    f64 = {"generator": generator, "dtype": torch.float64}
    lo, hi = params["x_range"]
    sigma = params["noise"]
    x = lo + (hi - lo) * torch.rand(n, **f64)
    form = _noise_form(kind, params)
    if form == "student_t":
        # Inverse CDF keeps the draw on the one generator (torch's gamma sampler takes none).
        # u = 0 would map to -inf: nudge it to the smallest positive half-step.
        u = torch.rand(n, **f64).clamp_(min=2.0**-54)
        eps = sigma * torch.from_numpy(scipy.special.stdtrit(params["df"], u.numpy()))
    elif form == "skewed":
        exponential = torch.empty(n, dtype=torch.float64).exponential_(generator=generator)
        eps = sigma * params["skew"] * (exponential - 1)
    elif form == "heteroscedastic":
        eps = _noise_sd(params, x) * torch.randn(n, **f64)
    else:  # gaussian, and the inliers of outliers
        eps = sigma * torch.randn(n, **f64)
    outlier = torch.zeros(n, dtype=torch.bool)
    if form == "outliers" and contaminate:
        count = round(params["outlier_fraction"] * n)  # exact count; Python's round: half to even
        index = torch.randperm(n, generator=generator)[:count]
        sign = torch.where(torch.rand(count, **f64) < 0.5, -1.0, 1.0)
        if params["outlier_sign"] == "positive":
            sign = torch.ones_like(sign)
        outlier[index] = True
        eps[index] += params["outlier_scale"] * sign
        if params["leverage"]:
            x[index] = hi + (hi - lo)  # one range width beyond the right end: far from every inlier
    y = params["target_scale"] * (_signal(kind, params, x) + eps)
    return x, y, outlier


def _normal_cdf(t: Tensor, sigma: float) -> Tensor:
    return torch.special.ndtr(t / sigma) if sigma > 0 else (t >= 0).to(t.dtype)


def _outlier_mixture_quantile(params: dict, tau: Tensor) -> Tensor:
    """tau-quantile of eps = sigma*Z + D, with D = 0 w.p. 1-p and +-outlier_scale w.p. p.

    F(t) = (1-p) Phi(t/sigma) + p * mean_s Phi((t - s)/sigma) over the displacements s; there is no closed
    form for its inverse, so we bisect: 200 halvings of the bracket reach float64 resolution.
    """
    sigma, p, a = params["noise"], params["outlier_fraction"], params["outlier_scale"]
    shifts = (a,) if params["outlier_sign"] == "positive" else (a, -a)

    def cdf(t):
        displaced = sum(_normal_cdf(t - s, sigma) for s in shifts) / len(shifts)
        return (1 - p) * _normal_cdf(t, sigma) + p * displaced

    reach = a + 40 * sigma + 1  # Phi(-40) underflows to 0, so F(-reach) = 0 < tau <= 1 = F(reach)
    lo, hi = torch.full_like(tau, -reach), torch.full_like(tau, reach)
    for _ in range(200):
        mid = (lo + hi) / 2
        below = cdf(mid) < tau
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return hi  # the smallest t with F(t) >= tau, to float64 resolution


def _noise_quantile(form: str, params: dict, x: Tensor, tau: Tensor) -> Tensor:
    """tau-quantile of eps given x (float64; x already shaped to broadcast against tau)."""
    sigma = params["noise"]
    if form == "student_t":
        # scipy's t quantile runs on the CPU; tau is a handful of numbers, so the round trip is cheap.
        quantile = np.asarray(scipy.special.stdtrit(params["df"], tau.cpu().numpy()))  # 0-d in -> scalar out
        return sigma * torch.from_numpy(quantile).to(tau.device)
    if form == "skewed":  # Exp(1) quantile is -log(1 - tau)
        return sigma * params["skew"] * (-torch.log1p(-tau) - 1)
    if form == "heteroscedastic":
        return _noise_sd(params, x) * torch.special.ndtri(tau)
    if form == "outliers" and not params["leverage"]:
        return _outlier_mixture_quantile(params, tau)
    return sigma * torch.special.ndtri(tau)  # gaussian, and the inliers of leverage outliers


def _noise_mean(form: str, params: dict) -> float:
    if form == "student_t" and params["df"] <= 1:
        raise NotImplementedError(
            f"the conditional mean does not exist for Student-t noise with df={params['df']:g} "
            "(it needs df > 1); "
            "use median() or quantile()"
        )
    if form == "skewed":
        return 0.0  # Exp(1) - 1 is centred: the skew shows in the median, not the mean
    if form == "outliers" and not params["leverage"] and params["outlier_sign"] == "positive":
        return params["outlier_fraction"] * params["outlier_scale"]
    return 0.0


