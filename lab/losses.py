"""Regression losses: per-element formulas, their closed-form derivatives, thin modules and a registry.

Conventions used by every loss here:

- Residual ``e = input - target`` (prediction minus truth). The quantile and expectile losses are written,
  as in the guide, in ``u = target - input = -e``: ``tau*u if u >= 0 else (tau-1)*u``.
- ``fn(input, target, **params)`` returns per-element values (no reduction) and broadcasts like any
  elementwise op; ``psi(input, target, **params)`` returns ``d fn / d input`` per element (the influence
  function) in closed form, so a trainer can form gradients without autograd.
- A parameter is a Python float or a tensor broadcastable against the input (per-run values, e.g. delta
  of shape [G, 1, 1] against input [G, n, 1]). Nothing here calls ``.item()`` or branches in Python on a
  tensor's value, so a population of runs trains without host-device syncs.
- float16/bfloat16 inputs are computed in float32 and returned in the input dtype: squares such as
  ``(e/delta)^2`` overflow float16 (max 65504) long before the loss itself does.
- The modules validate (shape mismatch -> ValueError, non-floating dtype -> TypeError, bad parameter ->
  ValueError); ``fn`` and ``psi`` do not, because they run inside the training loop.
- The smooth robust losses (huber, log_cosh, pseudo_huber, cauchy, tukey; general at scale 1) are all
  ``e^2/2 + O(e^4)`` near zero, whatever their parameter: half of MSE there, so their learning rates compare.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

REDUCTIONS = ("mean", "sum", "none")
_HALF = (torch.float16, torch.bfloat16)
_LOG2 = math.log(2.0)


# ---------------------------------------------------------------------------------------------------------
# Helpers


def _float32_for_half(f: Callable) -> Callable:
    """Evaluate ``f`` in float32 for float16/bfloat16 inputs and return the input's dtype."""

    @functools.wraps(f)
    def wrapped(input: Tensor, target: Tensor, *args, **kwargs) -> Tensor:
        if input.dtype not in _HALF:
            return f(input, target, *args, **kwargs)
        return f(input.float(), target.float(), *args, **kwargs).to(input.dtype)

    return wrapped


def _param(v, x: Tensor):
    """A parameter in x's dtype and device if it is a tensor (per-run values), else a Python float."""
    return v.to(device=x.device, dtype=x.dtype) if isinstance(v, Tensor) else float(v)


def _tensor(v, x: Tensor) -> Tensor:
    """A parameter as a tensor on x's device; a float becomes a fill kernel, not a host-to-device copy."""
    return _param(v, x) if isinstance(v, Tensor) else torch.full((), float(v), dtype=x.dtype, device=x.device)


def _taus(tau, x: Tensor):
    """Quantile levels: a list becomes a [k] tensor (a host copy: hot loops should pass a tensor)."""
    return torch.tensor(tau, dtype=x.dtype, device=x.device) if isinstance(tau, (list, tuple)) else _param(tau, x)


def _last_dim(input: Tensor, target: Tensor) -> Tensor:
    """A target [...] against k outputs [..., k] is broadcast along the last dim."""
    return target.unsqueeze(-1) if target.dim() == input.dim() - 1 else target


def safe_sqrt(m: Tensor) -> Tensor:
    """sqrt(m) with value 0 and gradient 0 (a subgradient) at m = 0, where the true derivative is +inf.

    The clamp keeps the unselected branch finite: torch.where sends it a zero gradient, and 0 * inf = NaN.
    """
    return torch.where(m > 0, m.clamp_min(torch.finfo(m.dtype).tiny).sqrt(), 0.0)


# ---------------------------------------------------------------------------------------------------------
# Formulas: fn(input, target, **params) per element, and psi = d fn / d input per element.


@_float32_for_half
def mse(input: Tensor, target: Tensor) -> Tensor:
    """Squared error ``e^2``, e = input - target. Minimiser of its mean: the mean."""
    return (input - target).square()


@_float32_for_half
def mse_psi(input: Tensor, target: Tensor) -> Tensor:
    """``2 e``."""
    return 2 * (input - target)


@_float32_for_half
def mae(input: Tensor, target: Tensor) -> Tensor:
    """Absolute error ``|e|``. Minimiser of its mean: the median. Subgradient at e = 0 is 0 (torch.abs)."""
    return (input - target).abs()


@_float32_for_half
def mae_psi(input: Tensor, target: Tensor) -> Tensor:
    """``sign(e)``, with the subgradient 0 at e = 0 (what autograd gives for torch.abs)."""
    return (input - target).sign()


# rmse is mse per element; LossSpec.root and RMSELoss take sqrt after the reduction.
rmse, rmse_psi = mse, mse_psi


@_float32_for_half
def huber(input: Tensor, target: Tensor, delta=1.0) -> Tensor:
    """Huber loss: ``0.5 e^2 if |e| <= delta else delta (|e| - delta/2)`` (torch.nn.HuberLoss).

    delta > 0: the transition point. delta -> inf is 0.5*MSE; huber(delta) / delta -> MAE as delta -> 0;
    huber(delta=d) == d * smooth_l1(beta=d).
    """
    a, d = (input - target).abs(), _param(delta, input)
    # With m = min(|e|, delta) as a clamp, d/de[0.5 m^2 + delta (|e| - m)] = m dm + delta (sign e - dm), which
    # is delta*sign(e) at |e| = delta whatever share of the tie autograd gives the clamp (a tensor delta
    # splits it 1/2-1/2): the gradient is exactly clamp(e, -delta, delta), as in torch.nn.HuberLoss
    # (optax: "avoids potentially doubling gradient").
    m = a.clamp(max=d)
    return 0.5 * m.square() + d * (a - m)


@_float32_for_half
def huber_psi(input: Tensor, target: Tensor, delta=1.0) -> Tensor:
    """``clamp(e, -delta, delta)``."""
    d = _param(delta, input)
    return (input - target).clamp(min=-d, max=d)


@_float32_for_half
def smooth_l1(input: Tensor, target: Tensor, beta=1.0) -> Tensor:
    """Smooth L1: ``0.5 e^2 / beta if |e| < beta else |e| - beta/2`` (torch.nn.SmoothL1Loss).

    beta >= 0. beta = 0 is exactly MAE, with finite gradients. smooth_l1(beta) == huber(delta=beta) / beta.
    """
    a, b = (input - target).abs(), _param(beta, input)
    # Same clamp form as huber. Dividing by beta only where beta > 0 keeps every term finite at beta = 0
    # (then m = 0): a NaN in an unselected branch would still poison the gradient.
    m = a.clamp(max=b)
    b_safe = torch.where(b > 0, b, 1.0) if isinstance(b, Tensor) else (b if b > 0 else 1.0)
    return 0.5 * m.square() / b_safe + (a - m)


@_float32_for_half
def smooth_l1_psi(input: Tensor, target: Tensor, beta=1.0) -> Tensor:
    """``e / beta if |e| < beta else sign(e)``; sign(e) everywhere at beta = 0."""
    e, b = input - target, _param(beta, input)
    b_safe = torch.where(b > 0, b, 1.0) if isinstance(b, Tensor) else (b if b > 0 else 1.0)
    return torch.where(e.abs() < b, e / b_safe, e.sign())


def _log1p(w: Tensor) -> Tensor:
    """log(1 + w) for w >= 0, to a few ulps, from log alone: the first-order term ((u - 1) - w) / u undoes
    the rounding of u = 1 + w. (torch.log1p computes the same, but its float32 CPU kernel on AVX-512 is a
    scalar loop, ~15x slower than log.)"""
    u = 1 + w
    return torch.log(u) - ((u - 1) - w) / u


# sinh(h) / h = sum_j h^(2j) / (2j + 1)!: for |h| <= 1/2 the terms up to h^6 reach float32 precision
# (the next is 1e-8 of the sum), those up to h^14 float64's.
_SINH_SERIES = tuple(1.0 / math.factorial(2 * j + 1) for j in range(8))


@_float32_for_half
def log_cosh(input: Tensor, target: Tensor) -> Tensor:
    """``log(cosh(e))``: e^2/2 near 0, |e| - log 2 for large |e|.

    Two exact forms, each used where it is accurate (both finite, with finite gradients, everywhere):
    ``log1p(2 sinh(e/2)^2)`` keeps relative accuracy near 0 (cosh e = 1 + 2 sinh(e/2)^2), and
    ``|e| + log1p(exp(-2|e|)) - log 2`` cannot overflow (cosh(e) overflows float32 at |e| > 89).
    Only exp, log and arithmetic: sinh(|e|/2) < sinh(1/2) is its Taylor series, and log1p is `_log1p`
    (float32 sinh and log1p are scalar loops on CPUs; this form is ~15x faster there, as accurate).
    """
    a = (input - target).abs()
    h = 0.5 * a.clamp(max=1.0)  # clamp: the unselected branch stays finite
    h2 = h * h
    terms = _SINH_SERIES[:4] if a.dtype == torch.float32 else _SINH_SERIES
    series = torch.full_like(h, terms[-1])
    for c in reversed(terms[:-1]):
        series = series * h2 + c
    s = h * series  # sinh(h)
    small = _log1p(2 * s * s)
    large = a + _log1p(torch.exp(-2 * a)) - _LOG2
    return torch.where(a < 1, small, large)


@_float32_for_half
def log_cosh_psi(input: Tensor, target: Tensor) -> Tensor:
    """``tanh(e)``."""
    return torch.tanh(input - target)


@_float32_for_half
def quantile(input: Tensor, target: Tensor, tau=0.5) -> Tensor:
    """Quantile (pinball) loss: ``max(tau u, (tau - 1) u)``, u = target - input.

    tau in (0, 1): the quantile level; the minimiser of the mean is the tau-quantile of the target.
    tau = 0.5 is HALF of MAE (some libraries scale by 2 so that it equals MAE; this one does not).
    k levels: tau a list or [k] tensor, input [..., k], target [...] or [..., 1] -> result [..., k].
    Written as ``(tau - 1/2) u + |u|/2``, whose gradient at u = 0 is the midpoint subgradient: in input,
    ``1/2 - tau``, which is 0 at tau = 0.5 like MAE's.
    """
    u, t = _last_dim(input, target) - input, _taus(tau, input)
    return (t - 0.5) * u + 0.5 * u.abs()


@_float32_for_half
def quantile_psi(input: Tensor, target: Tensor, tau=0.5) -> Tensor:
    """``1 - tau`` for over-prediction (e > 0), ``-tau`` for under-prediction, ``1/2 - tau`` at e = 0."""
    e, t = input - _last_dim(input, target), _taus(tau, input)
    return 0.5 * e.sign() + (0.5 - t)


@_float32_for_half
def expectile(input: Tensor, target: Tensor, tau=0.5) -> Tensor:
    """Expectile loss: ``|tau - 1[u < 0]| u^2``, u = target - input.

    tau in (0, 1); the minimiser of the mean is the tau-expectile of the target. tau = 0.5 is 0.5*MSE.
    """
    u, t = target - input, _param(tau, input)
    return (t + (1 - 2 * t) * (u < 0).to(u.dtype)) * u.square()


@_float32_for_half
def expectile_psi(input: Tensor, target: Tensor, tau=0.5) -> Tensor:
    """``-2 |tau - 1[u < 0]| u``."""
    u, t = target - input, _param(tau, input)
    return -2 * (t + (1 - 2 * t) * (u < 0).to(u.dtype)) * u


@_float32_for_half
def pseudo_huber(input: Tensor, target: Tensor, delta=1.0) -> Tensor:
    """Pseudo-Huber: ``delta^2 (sqrt(1 + (e/delta)^2) - 1)``, a smooth Huber; e^2/2 near 0, ~delta |e| far.

    delta > 0. Equals delta^2 * general(alpha=1, scale=delta). Computed as the algebraically equal
    ``e^2 / (1 + sqrt(1 + (e/delta)^2))``, which does not cancel to 0 for small e.
    """
    e, d = input - target, _param(delta, input)
    return e.square() / (1 + torch.sqrt(1 + (e / d).square()))


@_float32_for_half
def pseudo_huber_psi(input: Tensor, target: Tensor, delta=1.0) -> Tensor:
    """``e / sqrt(1 + (e/delta)^2)``."""
    e, d = input - target, _param(delta, input)
    return e * torch.rsqrt(1 + (e / d).square())


@_float32_for_half
def cauchy(input: Tensor, target: Tensor, scale=1.0) -> Tensor:
    """Cauchy (Lorentzian): ``(scale^2 / 2) log(1 + (e/scale)^2)``; e^2/2 near 0, grows like log |e|.

    scale > 0. Barron's alpha = 0 in this scale: cauchy(scale=s) == (s^2/2) * general(alpha=0, scale=s/sqrt 2).
    """
    e, c = input - target, _param(scale, input)
    return 0.5 * c * c * torch.log1p((e / c).square())


@_float32_for_half
def cauchy_psi(input: Tensor, target: Tensor, scale=1.0) -> Tensor:
    """``e / (1 + (e/scale)^2)``: redescending, largest at |e| = scale."""
    e, c = input - target, _param(scale, input)
    return e / (1 + (e / c).square())


@_float32_for_half
def tukey(input: Tensor, target: Tensor, c=4.685) -> Tensor:
    """Tukey's biweight: ``c^2/6 (1 - (1 - (e/c)^2)^3) if |e| <= c else c^2/6``.

    c > 0; 4.685 gives 95% efficiency at the normal. Non-convex: residuals beyond c get zero gradient.
    """
    e, k = input - target, _param(c, input)
    s = (e / k).clamp(-1.0, 1.0).square()  # the clamp makes the loss flat (zero gradient) beyond |e| = c
    # 1 - (1 - s)^3 expanded as s (3 - 3s + s^2): the unexpanded form cancels to 0 for small e in float32.
    return k * k / 6 * s * (3 - 3 * s + s.square())


@_float32_for_half
def tukey_psi(input: Tensor, target: Tensor, c=4.685) -> Tensor:
    """``e (1 - (e/c)^2)^2 if |e| <= c else 0``."""
    e, k = input - target, _param(c, input)
    return e * (1 - (e / k).clamp(-1.0, 1.0).square()).square()


@_float32_for_half
def general(input: Tensor, target: Tensor, alpha=1.0, scale=1.0) -> Tensor:
    """Barron's general robust loss (CVPR 2019, "A General and Adaptive Robust Loss Function").

    ``rho(x, a, c) = |a-2|/a * (((x/c)^2 / |a-2| + 1)^(a/2) - 1)``, x = e, shape a (any real or -inf), c > 0.
    Its limits are computed exactly: a = 2 -> 0.5 (x/c)^2 (0.5*MSE for c = 1); a = 0 -> log(0.5 (x/c)^2 + 1)
    (Cauchy); a = -inf -> 1 - exp(-0.5 (x/c)^2) (Welsch). Regular special cases: a = 1 ->
    sqrt((x/c)^2 + 1) - 1 (pseudo-Huber / Charbonnier); a = -2 -> 2 (x/c)^2 / ((x/c)^2 + 4) (Geman-McClure).
    At the singular a (2, 0, -inf) the gradient in alpha is 0 (a where-branch without alpha).
    """
    x = input - target
    a, c = _tensor(alpha, x), _param(scale, x)
    z = (x / c).square()
    # Each where-branch must stay finite, with a finite gradient, where it is not selected (0 * inf = NaN).
    # The regular branch therefore sees a harmless a = 1 at the singular alphas, and |a|, |a - 2| >= eps.
    eps = torch.finfo(x.dtype).eps
    a_ = torch.where((a == 2) | (a == 0) | (a == -math.inf), 1.0, a)
    a_ = torch.copysign(a_.abs().clamp_min(eps), a_)
    b = (a_ - 2).abs().clamp_min(eps)
    # expm1(a/2 log1p(z/b)) == (z/b + 1)^(a/2) - 1, without the cancellation of pow(...) - 1 near a = 0.
    regular = b / a_ * torch.expm1(0.5 * a_ * torch.log1p(z / b))
    return torch.where(
        a == 2,
        0.5 * z,
        torch.where(a == 0, torch.log1p(0.5 * z), torch.where(a == -math.inf, -torch.expm1(-0.5 * z), regular)),
    )


@_float32_for_half
def general_psi(input: Tensor, target: Tensor, alpha=1.0, scale=1.0) -> Tensor:
    """``x / c^2 * ((x/c)^2 / |a-2| + 1)^(a/2 - 1)``; the factor is 1 at a = 2 and exp(-(x/c)^2 / 2) at -inf."""
    x = input - target
    a, c = _tensor(alpha, x), _param(scale, x)
    z = (x / c).square()
    a_ = torch.where((a == 2) | (a == -math.inf), 1.0, a)  # as in general(): finite where unselected
    b = (a_ - 2).abs().clamp_min(torch.finfo(x.dtype).eps)
    regular = torch.exp((0.5 * a_ - 1) * torch.log1p(z / b))
    factor = torch.where(a == 2, 1.0, torch.where(a == -math.inf, torch.exp(-0.5 * z), regular))
    return x / (c * c) * factor


# ---------------------------------------------------------------------------------------------------------
# Reduction and the thin modules


def reduce_loss(loss: Tensor, weight: Tensor | None = None, reduction: str = "mean", root: bool = False) -> Tensor:
    """Reduce per-element losses, optionally weighted, optionally followed by sqrt (``root``, for rmse).

    weight: broadcastable to ``loss`` without enlarging it (per-sample weights [n, 1] against [n, k]).
    'none' -> ``w * l``; 'sum' -> ``sum(w * l)``; 'mean' -> ``sum(w * l) / sum(w)``, with w broadcast to
    the loss's shape (a weighted average; all-ones weights give the plain mean). Weights are not checked
    for sign (that would sync); zero total weight gives NaN. With root, 'mean' and 'sum' return
    ``safe_sqrt`` of the reduced value ('sum' -> the L2 norm of e) and 'none' returns the elements unrooted.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if weight is not None:
        try:
            ok = torch.broadcast_shapes(weight.shape, loss.shape) == loss.shape
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"weight shape {tuple(weight.shape)} does not broadcast to loss shape {tuple(loss.shape)}")
        weight = weight.to(loss.dtype)
    if reduction == "none":
        return loss if weight is None else weight * loss
    if weight is None:
        total = loss.mean() if reduction == "mean" else loss.sum()
    else:
        total = (weight * loss).sum()
        if reduction == "mean":
            total = total / weight.expand_as(loss).sum()
    return safe_sqrt(total) if root else total


def _check_dtypes(name: str, input: Tensor, target: Tensor) -> None:
    for what, t in (("input", input), ("target", target)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: {what} must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name}: {what} must have a floating dtype, got {t.dtype}")


class _Loss(nn.Module):
    """Holds hyperparameters and ``reduction``; validates inputs; computes half precision in float32."""

    name: str = ""
    root = False

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"{self.name}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction

    def _check_shapes(self, input: Tensor, target: Tensor, weight: Tensor | None) -> Tensor | None:
        # PyTorch's own losses only warn and broadcast [n] against [n, 1] into [n, n].
        if input.shape != target.shape:
            raise ValueError(
                f"{self.name}: input shape {tuple(input.shape)} != target shape {tuple(target.shape)}"
            )
        return weight

    def _loss(self, fn: Callable, input: Tensor, target: Tensor, weight: Tensor | None, **params) -> Tensor:
        _check_dtypes(self.name, input, target)
        weight = self._check_shapes(input, target, weight)
        # float32 for half inputs also for the reduction: a float16 sum overflows at 65504.
        x = input.float() if input.dtype in _HALF else input
        loss = reduce_loss(fn(x, target.to(x.dtype), **params), weight, self.reduction, self.root)
        return loss.to(input.dtype)

    def extra_repr(self) -> str:
        params = [f"{k}={getattr(self, k)!r}" for k in _REGISTRY[self.name].params]
        return ", ".join([*params, f"reduction={self.reduction!r}"])


class MSELoss(_Loss):
    name = "mse"

    def forward(self, input: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
        return self._loss(mse, input, target, weight)


class MAELoss(_Loss):
    name = "mae"

    def forward(self, input: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
        return self._loss(mae, input, target, weight)


class RMSELoss(_Loss):
    """sqrt of the reduced squared error: 'mean' -> sqrt(mean e^2), 'sum' -> sqrt(sum e^2) (the L2 norm),
    'none' -> e^2 unrooted. At zero error the value is 0 with gradient 0 (see ``safe_sqrt``)."""

    name = "rmse"
    root = True

    def forward(self, input: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
        return self._loss(rmse, input, target, weight)


class HuberLoss(_Loss):
    name = "huber"

    def __init__(self, delta: float = 1.0, reduction: str = "mean"):
        super().__init__(reduction)
        self.delta = check_params(self.name, {"delta": delta})["delta"]

    def forward(self, input: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
        return self._loss(huber, input, target, weight, delta=self.delta)


class SmoothL1Loss(_Loss):
    name = "smooth_l1"

    def __init__(self, beta: float = 1.0, reduction: str = "mean"):
        super().__init__(reduction)
        self.beta = check_params(self.name, {"beta": beta})["beta"]

    def forward(self, input: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
        return self._loss(smooth_l1, input, target, weight, beta=self.beta)


class LogCoshLoss(_Loss):
    name = "log_cosh"

    def forward(self, input: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
        return self._loss(log_cosh, input, target, weight)


class QuantileLoss(_Loss):
    """One level tau (input and target of equal shape) or k levels (input [..., k], target [...] or
    [..., 1]; a weight shaped like [...] is applied per sample). k levels live in a float64 buffer, so
    they follow ``.to(device)`` without a copy per call."""

    name = "quantile"

    def __init__(self, tau: float | list[float] = 0.5, reduction: str = "mean"):
        super().__init__(reduction)
        tau = check_params(self.name, {"tau": tau})["tau"]
        if isinstance(tau, Tensor):  # a module holds floats: a tensor would not follow .to(device)
            tau = tuple(tau.tolist()) if tau.dim() > 0 else tau.item()
        self.k = len(tau) if isinstance(tau, tuple) else None
        if self.k is None:
            self.tau = tau
        else:
            self.register_buffer("tau", torch.tensor(tau, dtype=torch.float64), persistent=False)

    def _check_shapes(self, input: Tensor, target: Tensor, weight: Tensor | None) -> Tensor | None:
        if self.k is None:
            return super()._check_shapes(input, target, weight)
        batch = input.shape[:-1]
        if input.dim() == 0 or input.shape[-1] != self.k or target.shape not in (batch, (*batch, 1)):
            raise ValueError(
                f"{self.name}: with {self.k} levels input must be [..., {self.k}] and target [...] or "
                f"[..., 1]; got input {tuple(input.shape)}, target {tuple(target.shape)}"
            )
        return weight.unsqueeze(-1) if weight is not None and weight.shape == batch else weight

    def forward(self, input: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
        return self._loss(quantile, input, target, weight, tau=self.tau)


class ExpectileLoss(_Loss):
    name = "expectile"

    def __init__(self, tau: float = 0.5, reduction: str = "mean"):
        super().__init__(reduction)
        self.tau = check_params(self.name, {"tau": tau})["tau"]

    def forward(self, input: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
        return self._loss(expectile, input, target, weight, tau=self.tau)


class PseudoHuberLoss(_Loss):
    name = "pseudo_huber"

    def __init__(self, delta: float = 1.0, reduction: str = "mean"):
        super().__init__(reduction)
        self.delta = check_params(self.name, {"delta": delta})["delta"]

    def forward(self, input: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
        return self._loss(pseudo_huber, input, target, weight, delta=self.delta)


class CauchyLoss(_Loss):
    name = "cauchy"

    def __init__(self, scale: float = 1.0, reduction: str = "mean"):
        super().__init__(reduction)
        self.scale = check_params(self.name, {"scale": scale})["scale"]

    def forward(self, input: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
        return self._loss(cauchy, input, target, weight, scale=self.scale)


class TukeyLoss(_Loss):
    name = "tukey"

    def __init__(self, c: float = 4.685, reduction: str = "mean"):
        super().__init__(reduction)
        self.c = check_params(self.name, {"c": c})["c"]

    def forward(self, input: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
        return self._loss(tukey, input, target, weight, c=self.c)


class GeneralRobustLoss(_Loss):
    """Barron's general loss with fixed floats, or with ``learnable=True`` scalar alpha and scale fitted
    by the optimiser, as in Barron's AdaptiveLossFunction:
    ``alpha = alpha_lo + (alpha_hi - alpha_lo) sigmoid(alpha_latent)``, ``scale = scale_lo +
    softplus(scale_latent)``; the latents are the nn.Parameters, initialised so that alpha and scale
    start at the given values (which must lie strictly inside the bounds)."""

    name = "general"

    def __init__(
        self,
        alpha: float = 1.0,
        scale: float = 1.0,
        reduction: str = "mean",
        learnable: bool = False,
        alpha_lo: float = 0.001,
        alpha_hi: float = 1.999,
        scale_lo: float = 1e-5,
    ):
        super().__init__(reduction)
        p = check_params(self.name, {"alpha": alpha, "scale": scale})
        self.learnable = bool(learnable)
        if not self.learnable:
            self._alpha, self._scale = p["alpha"], p["scale"]
            return
        alpha, scale = float(p["alpha"]), float(p["scale"])
        if not (-math.inf < alpha_lo < alpha < alpha_hi < math.inf):
            raise ValueError(f"general: learnable alpha needs alpha_lo < alpha < alpha_hi, all finite; "
                             f"got alpha_lo={alpha_lo}, alpha={alpha}, alpha_hi={alpha_hi}")
        if not (0 < scale_lo < scale):
            raise ValueError(f"general: learnable scale needs 0 < scale_lo < scale; got scale_lo={scale_lo}, "
                             f"scale={scale}")
        self.alpha_lo, self.alpha_hi, self.scale_lo = float(alpha_lo), float(alpha_hi), float(scale_lo)
        q, v = (alpha - alpha_lo) / (alpha_hi - alpha_lo), scale - scale_lo
        self.alpha_latent = nn.Parameter(torch.tensor(math.log(q / (1 - q))))  # inverse sigmoid
        self.scale_latent = nn.Parameter(torch.tensor(v + math.log(-math.expm1(-v))))  # inverse softplus

    @property
    def alpha(self):
        if not self.learnable:
            return self._alpha
        return self.alpha_lo + (self.alpha_hi - self.alpha_lo) * torch.sigmoid(self.alpha_latent)

    @property
    def scale(self):
        if not self.learnable:
            return self._scale
        return self.scale_lo + nn.functional.softplus(self.scale_latent)

    def forward(self, input: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
        return self._loss(general, input, target, weight, alpha=self.alpha, scale=self.scale)


# ---------------------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class ParamSpec:
    """A loss parameter: its default, the allowed range in words, and an elementwise check on a tensor."""

    default: Any
    allowed: str
    ok: Callable[[Tensor], Tensor]
    many: bool = False  # a list of values is accepted (the quantile loss's k levels)


@dataclass(frozen=True)
class LossSpec:
    name: str  # canonical registry name
    module: type[nn.Module]
    fn: Callable  # fn(input, target, **params) -> per-element values
    psi: Callable | None  # psi(input, target, **params) -> d fn / d input per element
    params: dict[str, ParamSpec]
    formula: str  # one line, for `lab losses`
    aliases: tuple[str, ...] = ()
    root: bool = False  # True for rmse: the reduced value is sqrt(mean of fn)


def _positive(default: float) -> ParamSpec:
    return ParamSpec(default, "> 0", lambda v: v > 0)


def _level(default: float, many: bool = False) -> ParamSpec:
    return ParamSpec(default, "in (0, 1)", lambda v: (v > 0) & (v < 1), many)


_SPECS = (
    LossSpec("mse", MSELoss, mse, mse_psi, {}, "e^2", ("l2",)),
    LossSpec("mae", MAELoss, mae, mae_psi, {}, "|e|  (subgradient 0 at e = 0)", ("l1",)),
    LossSpec("rmse", RMSELoss, rmse, rmse_psi, {}, "sqrt(mean e^2)  (elementwise e^2, root after reduction)",
             root=True),
    LossSpec("huber", HuberLoss, huber, huber_psi, {"delta": _positive(1.0)},
             "0.5 e^2 if |e| <= delta else delta (|e| - delta/2)"),
    LossSpec("smooth_l1", SmoothL1Loss, smooth_l1, smooth_l1_psi, {"beta": ParamSpec(1.0, ">= 0", lambda v: v >= 0)},
             "0.5 e^2 / beta if |e| < beta else |e| - beta/2  (beta = 0: |e|)"),
    LossSpec("log_cosh", LogCoshLoss, log_cosh, log_cosh_psi, {}, "log(cosh(e))"),
    LossSpec("quantile", QuantileLoss, quantile, quantile_psi, {"tau": _level(0.5, many=True)},
             "max(tau u, (tau - 1) u), u = target - input  (tau = 0.5: MAE / 2; tau may be a list)",
             ("pinball",)),
    LossSpec("expectile", ExpectileLoss, expectile, expectile_psi, {"tau": _level(0.5)},
             "|tau - 1[u < 0]| u^2, u = target - input  (tau = 0.5: MSE / 2)"),
    LossSpec("pseudo_huber", PseudoHuberLoss, pseudo_huber, pseudo_huber_psi, {"delta": _positive(1.0)},
             "delta^2 (sqrt(1 + (e/delta)^2) - 1)"),
    LossSpec("cauchy", CauchyLoss, cauchy, cauchy_psi, {"scale": _positive(1.0)},
             "(scale^2 / 2) log(1 + (e/scale)^2)"),
    LossSpec("tukey", TukeyLoss, tukey, tukey_psi, {"c": _positive(4.685)},
             "c^2/6 (1 - (1 - (e/c)^2)^3) if |e| <= c else c^2/6"),
    LossSpec("general", GeneralRobustLoss, general, general_psi,
             {"alpha": ParamSpec(1.0, "real or -inf", lambda v: v < math.inf),
              "scale": _positive(1.0)},
             "|a-2|/a (((e/c)^2/|a-2| + 1)^(a/2) - 1), a = alpha, c = scale  (Barron 2019)"),
)
_REGISTRY = {s.name: s for s in _SPECS}
_ALIASES = {alias: s.name for s in _SPECS for alias in s.aliases}


def available() -> list[str]:
    """Canonical loss names, in table order."""
    return [s.name for s in _SPECS]


def spec(name: str) -> LossSpec:
    """The LossSpec for a canonical name or an alias; unknown names raise ValueError listing the choices."""
    key = _ALIASES.get(name, name)
    if key not in _REGISTRY:
        raise ValueError(f"unknown loss {name!r}; available: {', '.join(available())} "
                         f"(aliases: {', '.join(f'{a}={n}' for a, n in _ALIASES.items())})")
    return _REGISTRY[key]


def _check_value(loss: str, pname: str, p: ParamSpec, value):
    """One parameter value as a float (or tuple of floats, or the tensor itself), checked elementwise.
    Checking a tensor syncs with its device: this runs once at setup, not in the training loop."""
    many = p.many and isinstance(value, (list, tuple))
    if isinstance(value, Tensor):
        t = value.detach().double()
    else:
        try:
            if isinstance(value, bool) or (many and any(isinstance(v, bool) for v in value)):
                raise TypeError
            t = torch.tensor([float(v) for v in value] if many else float(value), dtype=torch.float64)
        except (TypeError, ValueError):
            raise ValueError(f"{loss}: {pname} must be a number{' or a list of numbers' if p.many else ''}, "
                             f"got {value!r}") from None
    if many and t.numel() == 0:
        raise ValueError(f"{loss}: {pname} must be a non-empty list, got {value!r}")
    bad = ~p.ok(t)
    if bad.any():
        shown = t.item() if t.dim() == 0 and not isinstance(value, Tensor) else t[bad].tolist()
        raise ValueError(f"{loss}: {pname} must be {p.allowed}, got {shown}")
    if isinstance(value, Tensor):
        return value
    return tuple(t.tolist()) if many else t.item()


def check_params(name: str, params: dict) -> dict:
    """Fill in defaults and validate; returns {parameter: float, tuple of floats, or the given tensor}.

    An unknown parameter or an out-of-range value raises ValueError naming the loss, the parameter, the
    value and the allowed range, e.g. "huber: delta must be > 0, got -1.0". Tensors are checked elementwise.
    """
    s = spec(name)
    unknown = sorted(set(params) - set(s.params))
    if unknown:
        allowed = ", ".join(s.params) or "none"
        raise ValueError(f"{s.name}: unknown parameter {unknown[0]!r} (given {params[unknown[0]]!r}); "
                         f"parameters: {allowed}")
    return {k: _check_value(s.name, k, p, params.get(k, p.default)) for k, p in s.params.items()}


def build(name: str, reduction: str = "mean", **params) -> nn.Module:
    """The loss module for ``name`` (or an alias) with validated parameters.

    ``general`` also takes its module options learnable, alpha_lo, alpha_hi, scale_lo.
    """
    s = spec(name)
    options = {k: params.pop(k) for k in ("learnable", "alpha_lo", "alpha_hi", "scale_lo")
               if s.module is GeneralRobustLoss and k in params}
    return s.module(**check_params(s.name, params), reduction=reduction, **options)


def describe() -> str:
    """A text table of every loss: name, aliases, formula, parameters with defaults and ranges."""
    rows = [("name", "aliases", "parameters", "per-element formula")]
    for s in _SPECS:
        ps = "; ".join(f"{k}={p.default} ({p.allowed}{', or a list' if p.many else ''})" for k, p in s.params.items())
        rows.append((s.name, ",".join(s.aliases) or "-", ps or "-", s.formula))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3] for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    notes = [
        "",
        "e = input - target; u = target - input. Reductions: mean | sum | none; weighted mean = sum(w l) / sum(w).",
        "rmse reduces to sqrt(mean e^2) ('sum': sqrt(sum e^2)).",
        "general also takes learnable=True (alpha in (alpha_lo, alpha_hi), scale > scale_lo).",
    ]
    return "\n".join(lines + notes)
