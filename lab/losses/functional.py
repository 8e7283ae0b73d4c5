"""The formulas: each loss per element (``fn``), its closed-form derivative ``psi = d fn / d input``,
and the reduction. No validation here: these run inside the training loop (lab.fused, lab.population);
the modules (lab.losses.modules) validate. Conventions: lab/losses/__init__.py."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import Tensor

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
    e, d = input - target, _param(delta, input)
    # psi (e - psi/2) with psi = clamp(e, -delta, delta) (lab.fused computes it so too): e^2/2 inside, delta
    # (|e| - delta/2) outside. Its autograd gradient is exactly psi: (e - psi/2) dpsi + psi (1 - dpsi/2) is
    # e/2 + e/2 inside and psi outside, and psi at |e| = delta whatever share of the tie autograd gives the
    # clamp (optax: "avoids potentially doubling gradient"). The form 0.5 m^2 + delta (|e| - m), m = min(|e|,
    # delta), has the same value, but its gradient sums delta and m - delta: 1.013e-6 at e = 1e-6 in float32.
    psi = torch.clamp(e, min=-d, max=d) if isinstance(d, Tensor) else e.clamp(-d, d)
    return psi * (e - 0.5 * psi)


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
    e, b = input - target, _param(beta, input)
    # Huber's psi form divided by beta (its gradient is exactly psi / beta: see huber), and |e| at beta = 0.
    # Dividing by beta only where beta > 0 keeps every term finite at beta = 0 (then psi = 0): a NaN in an
    # unselected branch would still poison the gradient.
    # Outside, |e| - beta/2 itself: psi (e - psi/2) / beta would pass through subnormals for a tiny beta.
    psi = torch.clamp(e, min=-b, max=b) if isinstance(b, Tensor) else e.clamp(-b, b)
    b_safe = torch.where(b > 0, b, 1.0) if isinstance(b, Tensor) else (b if b > 0 else 1.0)
    return torch.where(e.abs() < b, psi * (e - 0.5 * psi) / b_safe, e.abs() - 0.5 * b)


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
    # |e| (|e| / (1 + hypot(1, e/delta))): hypot and the second factor (< delta) stay finite for any finite
    # e, where e^2 or (e/delta)^2 overflow float32 from |e| ~ 1.8e19 on.
    a = e.abs()
    return a * (a / (1 + torch.hypot(torch.ones_like(e), e / d)))


@_float32_for_half
def pseudo_huber_psi(input: Tensor, target: Tensor, delta=1.0) -> Tensor:
    """``e / sqrt(1 + (e/delta)^2)``."""
    e, d = input - target, _param(delta, input)
    u = e / d
    # (no (e/delta)^2 to overflow); where e/delta does (e = inf among others), the limit: delta sign(e)
    return torch.where(torch.isinf(u), d * torch.sign(u), e / torch.hypot(torch.ones_like(e), u))


@_float32_for_half
def cauchy(input: Tensor, target: Tensor, scale=1.0) -> Tensor:
    """Cauchy (Lorentzian): ``(scale^2 / 2) log(1 + (e/scale)^2)``; e^2/2 near 0, grows like log |e|.

    scale > 0. Barron's alpha = 0 in this scale: cauchy(scale=s) == (s^2/2) * general(alpha=0, scale=s/sqrt 2).
    """
    e, c = input - target, _param(scale, input)
    # Near (|e| <= scale): (scale^2/2) log1p(z), z = (e/scale)^2; where scale^2 overflows the dtype (scale past
    # ~1.8e19 in float32) the same value as e^2/2 * log1p(z)/z, by its series (z is then tiny) or the
    # quotient. Beyond: scale^2/2 (2 log|e/scale| + log1p(1/z)), with no z to overflow (|e| 1e20 at scale 1
    # is 46, not inf). Each branch sees harmless values where it is not selected: its gradient stays finite
    # (but at a scale past sqrt(float32 max), autograd of log1p(z)/z overflows for |e| > 0.03 scale: use psi).
    u = (e / c).abs()
    near = u <= 1
    z = torch.where(near, u, 1.0).square()
    c2 = c * c
    huge = torch.isinf(c2) if isinstance(c2, Tensor) else torch.tensor(c2 > torch.finfo(e.dtype).max)
    small = z < 1e-3  # 1 - z/2 + z^2/3 - z^3/4 + z^4/5 is log1p(z)/z to z^5/6 < float64's eps there
    ratio = torch.where(small, 1 - z * (0.5 - z * (1 / 3 - z * (0.25 - z / 5))), torch.log1p(z) / torch.where(small, 1.0, z))
    c2_safe = torch.where(huge, 1.0, c2) if isinstance(c2, Tensor) else (1.0 if c2 > torch.finfo(e.dtype).max else c2)
    e_near = torch.where(near, e, 0.0)  # (e^2 of an unselected huge e would overflow, and its gradient too)
    near_value = torch.where(huge, e_near * (0.5 * e_near) * ratio, 0.5 * c2_safe * torch.log1p(z))
    u_far = torch.where(near, 2.0, u)
    far = 0.5 * c2 * (2 * torch.log(u_far) + torch.log1p(u_far.reciprocal().square()))  # inf: rightly, past c2
    return torch.where(near, near_value, far)


@_float32_for_half
def cauchy_psi(input: Tensor, target: Tensor, scale=1.0) -> Tensor:
    """``e / (1 + (e/scale)^2)``: redescending, largest at |e| = scale."""
    e, c = input - target, _param(scale, input)
    # e / (1 + u^2), u = e/scale, near; scale / (u + 1/u) beyond |u| = 1, where u^2 could overflow
    u = e / c
    near = u.abs() <= 1
    u_far = torch.where(near, 2.0, u)
    return torch.where(near, e / (1 + torch.where(near, u, 0.0).square()), c / (u_far + u_far.reciprocal()))


@_float32_for_half
def tukey(input: Tensor, target: Tensor, c=4.685) -> Tensor:
    """Tukey's biweight: ``c^2/6 (1 - (1 - (e/c)^2)^3) if |e| <= c else c^2/6``.

    c > 0; 4.685 gives 95% efficiency at the normal. Non-convex: residuals beyond c get zero gradient.
    """
    e, k = input - target, _param(c, input)
    # With m = clamp(e, -c, c) and s = (m/c)^2 (the clamp makes the loss flat, zero gradient, beyond |e| = c),
    # c^2/6 (1 - (1 - s)^3) = m^2/6 (3 - 3s + s^2): expanded, as the unexpanded form cancels to 0 for small e
    # in float32, and without c^2, which overflows float32 from c ~ 1.8e19 on.
    m = torch.clamp(e, min=-k, max=k) if isinstance(k, Tensor) else e.clamp(-k, k)
    s = (m / k).square()
    return m * (m / 6) * (3 - 3 * s + s.square())  # m (m/6): m^2 alone overflows float32 from |m| ~ 1.8e19


@_float32_for_half
def tukey_psi(input: Tensor, target: Tensor, c=4.685) -> Tensor:
    """``e (1 - (e/c)^2)^2 if |e| <= c else 0``."""
    e, k = input - target, _param(c, input)
    # clamped first, so that beyond c it is (+-c) * 0, not e * 0 (NaN at e = +-inf); the same bits within c
    m = torch.clamp(e, min=-k, max=k) if isinstance(k, Tensor) else e.clamp(-k, k)
    return m * (1 - (m / k).square()).square()


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
    u = x / c
    z = u.square()
    # Where (x/c)^2 overflows (|x/c| past ~1.8e19 in float32, or x = +-inf), the same terms from log|x/c|:
    # log1p(z/b) = 2 log|u| - log b + log1p(b/z), the last 0 there (`far`). Finite |u| gives finite losses
    # for a < 2 (a = 0: 2 log|u| + log 1/2; a < 0: the limit |a-2|/|a|).
    far = torch.isinf(z)
    log_u = torch.where(far, u, 1.0).abs().log()
    z = torch.where(far, 1.0, z)
    # Each where-branch must stay finite, with a finite gradient, where it is not selected (0 * inf = NaN).
    # The regular branch therefore sees a harmless a = 1 at the singular alphas, and |a|, |a - 2| >= eps.
    eps = torch.finfo(x.dtype).eps
    a_ = torch.where((a == 2) | (a == 0) | (a == -math.inf), 1.0, a)
    a_ = torch.copysign(a_.abs().clamp_min(eps), a_)
    b = (a_ - 2).abs().clamp_min(eps)
    # expm1(a/2 log1p(z/b)) == (z/b + 1)^(a/2) - 1, without the cancellation of pow(...) - 1 near a = 0.
    log1p_zb = torch.where(far, 2 * log_u - torch.log(b), torch.log1p(z / b))
    regular = b / a_ * torch.expm1(0.5 * a_ * log1p_zb)
    cauchy_like = torch.where(far, 2 * log_u + math.log(0.5), torch.log1p(0.5 * z))
    return torch.where(
        a == 2,
        torch.where(far, math.inf, 0.5 * z),  # (0.5 (x/c)^2: past the dtype's range there)
        torch.where(a == 0, cauchy_like, torch.where(a == -math.inf, torch.where(far, 1.0, -torch.expm1(-0.5 * z)),
                                                     regular)),
    )


@_float32_for_half
def general_psi(input: Tensor, target: Tensor, alpha=1.0, scale=1.0) -> Tensor:
    """``x / c^2 * ((x/c)^2 / |a-2| + 1)^(a/2 - 1)``; the factor is 1 at a = 2 and exp(-(x/c)^2 / 2) at -inf."""
    x = input - target
    a, c = _tensor(alpha, x), _param(scale, x)
    u = x / c
    z = u.square()
    a_ = torch.where((a == 2) | (a == -math.inf), 1.0, a)  # as in general(): finite where unselected
    b = (a_ - 2).abs().clamp_min(torch.finfo(x.dtype).eps)
    p = 0.5 * a_ - 1
    regular = torch.exp(p * torch.log1p(z / b))
    factor = torch.where(a == 2, 1.0, torch.where(a == -math.inf, torch.exp(-0.5 * z), regular))
    near = x / (c * c) * factor
    # Where (x/c)^2 overflows (or x = +-inf): x/c^2 (z/b)^p = sign(u)/c exp((a - 1) log|u| - p log b), log|u|
    # capped so that x = +-inf gives the limits (0 for a < 1, sign/c at a = 1, inf beyond; 0 at a = -inf).
    log_u = torch.where(torch.isinf(z), u, 1.0).abs().log().clamp(max=1e5)
    far = torch.sign(u) / c * torch.exp((a_ - 1) * log_u - p * torch.log(b))
    far = torch.where(a == 2, u / c, torch.where(a == -math.inf, 0.0, far))
    return torch.where(torch.isinf(z), far, near)


# ---------------------------------------------------------------------------------------------------------
# Reduction


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

