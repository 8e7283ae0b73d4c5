"""A loss's gradient signal and its value in one pass over the residuals: the trainer's hot path.

Every step of lab.trainer needs, per run, psi(e) for the gradient and the mean loss for the
convergence gap. Evaluated as `spec.psi` plus `spec.fn` they repeat work: both form e = pred - target,
and `fn` then spends its own kernels (for log-cosh an exp, two logs and a tanh for psi). Here each
loss reads the residuals e once and shares what the two have in common, and most losses get their
value as a dot product with psi, which sums without a [runs, n] tensor of values:

    mse       psi = 2e                      l = e^2              = e . e
    mae       psi = sign(e)                 l = |e|              = psi . e
    quantile  psi = sign(e)/2 + 1/2 - tau   l = psi e             (= (tau - 1/2) u + |u|/2, u = -e)
    huber     psi = clamp(e, -d, d)         l = psi (e - psi/2)  (e^2/2 inside, d |e| - d^2/2 outside)
    expectile psi = 2 w e                   l = w e^2 = psi e / 2, w = tau + (1 - 2 tau) [e > 0]
    log_cosh  psi = tanh(e) from t = exp(-2|e|) (the exp the value needs anyway), or from sinh(|e|/2) below 1

Other losses fall back to `spec.psi` and `spec.fn`. `residual_terms(spec)` returns the function;
tests/test_fused.py checks every one against `spec.psi` and the float64 sum of `spec.fn`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from lab import losses
from lab.losses.functional import _SINH_SERIES, _param

_LOG2 = math.log(2.0)


def _flat(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1)


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """sum(a * b) per run over points and outputs ([B, n, k] -> [B]), without a [B, n, k] product."""
    return torch.linalg.vecdot(_flat(a), _flat(b))


def _mse(e: Tensor, out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    return torch.add(e, e, out=out), _dot(e, e)


def _mae(e: Tensor, out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    psi = torch.sign(e, out=out)
    return psi, _dot(psi, e)


def _quantile(e: Tensor, tau=0.5, out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    if isinstance(tau, Tensor):  # [k] levels, or [B, 1, k] per run
        psi = torch.add(0.5 - tau.to(e.dtype), e.sign(), alpha=0.5, out=out)
    else:
        psi = torch.sign(e, out=out).mul_(0.5).add_(0.5 - tau)
    return psi, _dot(psi, e)


def _huber(e: Tensor, delta=1.0, out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    d = _param(delta, e)
    psi = torch.clamp(e, min=-d, max=d, out=out) if isinstance(d, Tensor) else torch.clamp(e, -d, d, out=out)
    return psi, _dot(psi, torch.add(e, psi, alpha=-0.5))


def _expectile(e: Tensor, tau=0.5, out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    t = _param(tau, e)
    w2 = (e > 0).to(e.dtype).mul_(2 - 4 * t).add_(2 * t)  # 2 w
    psi = w2.mul_(e) if out is None else torch.mul(w2, e, out=out)
    return psi, 0.5 * _dot(psi, e)


def _log_cosh(e: Tensor, out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """psi = tanh(e) and log cosh(e) from one exp and one log (float32 tanh and log1p are scalar
    loops on CPUs). The value is `losses.log_cosh`'s two forms, log1p(2 sinh(|e|/2)^2) below |e| = 1
    and |e| + log1p(exp(-2|e|)) - log 2 above, merged into a single log1p of the selected argument."""
    a = e.abs()
    # exp(-2|e|) below ~1e-38 (|e| > 43 in float32) is a denormal, ~5x slower per element; from |e| = 20 on
    # t < 5e-18 no longer changes psi = (1 - t)/(1 + t) or |e| + log1p(t) in float32 or float64.
    t = torch.exp(a.clamp(max=20.0).mul_(-2.0))
    h = a.clamp(max=1.0).mul_(0.5)
    h2 = h * h
    terms = _SINH_SERIES[:4] if e.dtype == torch.float32 else _SINH_SERIES
    series = torch.full_like(h, terms[-1])
    for c in reversed(terms[:-1]):
        series.mul_(h2).add_(c)
    s = series.mul_(h)  # sinh(h)
    two_s2 = s * s * 2.0  # cosh(|e|) - 1 = 2 sinh(|e|/2)^2
    # Select the form per element with an exact 0/1 weight (1 where |e| >= 1): lerp with weight 0 or 1
    # returns one end exactly (both ends are finite), and float ops beat bool masks and where on CPUs.
    large = a.floor().clamp_(max=1.0)
    # tanh|e| = (1 - t) / (1 + t) cancels for small |e| (1 - t loses the digits of 2|e|); below |e| = 1 it is
    # 2 s sqrt(1 + s^2) / (1 + 2 s^2) from s = sinh(|e|/2), accurate to a few ulps down to denormals.
    small_tanh = (s * (s * s + 1.0).sqrt_()).mul_(2.0).div_(two_s2 + 1.0)
    psi = torch.copysign(torch.lerp(small_tanh, (1.0 - t).div_(t + 1.0), large), e, out=out)
    w = torch.lerp(two_s2, t, large)
    v = w + 1.0
    # log1p(w) = log(v) - ((v - 1) - w) / v: the second term undoes the rounding of v = 1 + w
    log1p = torch.log(v).sub_(((v - 1.0).sub_(w)).div_(v))
    return psi, torch.linalg.vecdot(_flat(large), _flat(a - _LOG2)).add_(_flat(log1p).sum(1))


# Losses whose psi is a few cheap elementwise ops of e (no exp or log): cheaper for a log row's worker to
# derive again from e than for the step to write to memory the other core reads (lab.row_worker).
CHEAP_PSI = frozenset({"mse", "rmse", "mae", "quantile", "huber", "expectile"})

_FUSED: dict[str, Callable] = {"mse": _mse, "rmse": _mse, "mae": _mae, "quantile": _quantile, "huber": _huber,
                               "expectile": _expectile, "log_cosh": _log_cosh}


def residual_terms(spec: losses.LossSpec) -> Callable[..., tuple[Tensor, Tensor]]:
    """f(e, out=None, **params) -> (psi [B, n, k], per-run sum of the loss over points and outputs [B]),
    e = pred - target; psi is written into `out` where one is given (a row step's buffer: no copy after).

    The loss's own fused form where there is one, else spec.psi and spec.fn evaluated at (e, 0).
    """
    fused = _FUSED.get(spec.name)
    if fused is not None:
        return fused

    def terms(e: Tensor, out: Tensor | None = None, **params) -> tuple[Tensor, Tensor]:
        zero = torch.zeros((), dtype=e.dtype, device=e.device)
        psi = spec.psi(e, zero, **params)
        return psi if out is None else out.copy_(psi), _flat(spec.fn(e, zero, **params)).sum(1)

    return terms
