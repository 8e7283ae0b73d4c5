"""Exact float64 optimum of a regression loss on a run's training data.

Convergence is measured against the true minimum of the objective a run trains,

    L(theta) = sum_i w_i * fn(f_theta(x_i), y_i) / sum_i w_i        (sqrt of that for rmse)

with w_i = 1 unless weights are given, so that ``gap = train loss - Reference.loss`` is >= 0 and
``ref_param_error`` is a distance to the loss's own optimum rather than to the data-generating line.
Two models have a reference:

    constant:  f(x) = value                     theta = (value,)
    linear:    f(x) = slope * x + intercept     theta = (slope, intercept)

Every formula (fn, psi = d fn / d input, root) comes from ``lab.losses``, so the reference and the
trainer cannot disagree about what the loss is. Solver per loss (the L1 / quantile ones in
``lab.quantile_fit``, least squares and Newton in ``lab.newton_fit``; this module checks the inputs,
picks the solver and assembles the Reference):

    mse, rmse                   weighted least squares, closed form                  "lstsq"
    mae, quantile,              constant: weighted tau-quantile by sorting           "sort"
      smooth_l1 (beta = 0)      linear:   descent over the lines through two data
                                          points, optimality certified (KKT)         "pivot"
                                          runs it cannot certify: linear programme
                                          (Koenker's dual), HiGHS                    "lp-highs"
    huber, smooth_l1, log_cosh, pseudo_huber, expectile, general (alpha >= 1)
                                Newton from least squares, line search               "newton"
    cauchy, tukey, general (alpha < 1)
                                the same Newton iteration from two starts, least squares and the
                                Huber fit with delta = the loss's scale; the lower local minimum,
                                exact=False                                          "newton-local"

rmse has the mse minimiser and loss sqrt(min mse). quantile with k levels (tau a list) trains k
independent outputs: one solve per level, params suffixed by the level's index (slope_0, ...), loss the
mean of the k minima, method the levels' methods joined by "+" where they differ ("pivot+lp-highs"). A
Newton run that misses its tolerance in ``lab.newton_fit._MAX_ITER`` steps is finished by scipy BFGS
("newton+bfgs").
The minimum value is unique for the convex losses; the minimiser need not be (an even-n median, a Huber
fit with every residual beyond delta): any optimal point is returned. A linear model whose x takes a
single value (among positive weights) gets slope 0.

Everything runs in float64 on the CPU; inputs of any dtype or device are copied there first. Cost on
the 2-core development machine, R = 1,000 problems of n = 1,000: least squares or sorting ~0.1 s,
Newton ~0.5-1 s (convex) or ~2-3x that (non-convex: three Newton solves), the pivot descent ~0.3 s
(the HiGHS LP it replaces took ~4 ms per problem, ~4 s).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lab import losses, quantile_fit
from lab.newton_fit import _lstsq, _minimise, _objective, _rows, _wsum

MODELS = ("constant", "linear")
_LSTSQ = ("mse", "rmse")
_CONVEX = ("huber", "smooth_l1", "log_cosh", "pseudo_huber", "expectile", "general")
_NONCONVEX = ("cauchy", "tukey")  # and general with alpha < 1

_CHUNK = 1 << 21  # elements per [runs, n] block: a few 16 MB tensors, small enough to stay in cache


@dataclass(frozen=True)
class Reference:
    """The minimum of one run's training objective.

    Attributes:
        loss: min_theta L(theta), float64 (for rmse the square root of the minimum mean squared error).
        params: {"value": ...} for the constant model, {"slope": ..., "intercept": ...} for linear.
        method: "lstsq", "sort", "pivot", "lp-highs", "newton", "newton-local" or "newton+bfgs".
        exact: True when ``loss`` is the global minimum to float64 accuracy; False for the local
            minima of non-convex losses and for a Newton run that missed its tolerance.
    """

    loss: float
    params: dict[str, float]
    method: str
    exact: bool


def solve(loss: str, loss_params: dict | None, model: str, x, y, weight=None) -> Reference:
    """Minimise the mean ``loss`` of ``model`` on one data set.

    Args:
        loss: a name or alias known to ``lab.losses.spec`` ("l1", "huber", ...).
        loss_params: the loss's hyperparameters; defaults are filled by ``lab.losses.check_params``.
        model: "constant" or "linear".
        x: features [n] or [n, 1] (numpy or torch, any dtype/device); may be None for "constant".
        y: targets [n] or [n, 1].
        weight: optional non-negative per-point weights [n]; the objective is their weighted mean.

    Returns:
        The Reference (minimum loss, minimiser, method, exact).
    """
    y = _column(y, "y")
    xs = None if x is None else _column(x, "x")[None]
    ws = None if weight is None else _column(weight, "weight")[None]
    return solve_many(loss, loss_params, model, xs, y[None], ws)[0]


def solve_many(loss: str, loss_params: dict | None, model: str, xs, ys, weights=None) -> list[Reference]:
    """``solve`` for R data sets of the same size at once: xs, ys (and weights) are [R, n].

    Least squares, quantiles by sorting, the pivot descent and Newton run vectorised across the R
    problems (in blocks of about 2M elements); the few linear quantile fits the descent cannot certify
    are solved one at a time by HiGHS (~4 ms at n=1000).
    """
    spec = losses.spec(loss)
    params = losses.check_params(spec.name, dict(loss_params or {}))
    if model not in MODELS:
        raise ValueError(
            f"model {model!r} has no reference solver; only {MODELS} have a closed parameter space "
            "(an mlp has no exact optimum to compare against)"
        )
    y = _runs(ys, "ys")
    R, n = y.shape
    if n == 0:
        raise ValueError("empty data: ys has 0 points per run")
    if model == "linear" and xs is None:
        raise ValueError("the linear model needs features xs, got None")
    x = None if xs is None else _runs(xs, "xs")
    if x is not None and x.shape != y.shape:
        raise ValueError(f"xs has shape {tuple(x.shape)} but ys has {tuple(y.shape)}")
    if model == "constant":
        x = None  # checked for shape, unused: the constant model has no slope
    w = None
    if weights is not None:
        w = _runs(weights, "weights")
        if w.shape != y.shape:
            raise ValueError(f"weights have shape {tuple(w.shape)} but ys has {tuple(y.shape)}")
        if (w < 0).any() or not (w.sum(1) > 0).all():  # (_runs refused non-finite ones)
            raise ValueError("weights must be >= 0 with a positive sum in every run")
        # Only ratios of weights matter (the objective is a weighted mean): scaled by each run's largest, by a
        # power of two (exact), so that their sum cannot overflow (weights of 1e308 summed to inf: all 0).
        w = torch.ldexp(w, -torch.frexp(w.amax(1, keepdim=True)).exponent)
    for k, v in params.items():
        if isinstance(v, torch.Tensor):
            if spec.name == "quantile" and v.dim() == 1:
                params[k] = tuple(float(t) for t in v)  # k levels
                continue
            if v.numel() != 1:
                raise ValueError(f"{spec.name}: {k} must be one value for all runs, got a tensor of shape "
                                 f"{tuple(v.shape)}; group runs by parameter value")
            params[k] = float(v)
    kind, tau = _kind(spec.name, params)
    if isinstance(tau, tuple):
        # k levels train k independent outputs, so the minimum of their mean is the mean of the k
        # minima: one solve per level, parameters suffixed by the level's index.
        per = [solve_many(spec.name, {"tau": t}, model, x, y, w) for t in tau]
        return [
            Reference(
                loss=float(np.mean([p[r].loss for p in per])),
                params={f"{name}_{j}": p[r].params[name] for j, p in enumerate(per) for name in p[r].params},
                method="+".join(dict.fromkeys(p[r].method for p in per)),  # in level order, once each
                exact=all(p[r].exact for p in per),
            )
            for r in range(R)
        ]
    step = max(1, _CHUNK // n)
    out: list[Reference] = []
    for lo in range(0, R, step):
        sl = slice(lo, lo + step)
        out += _solve_block(spec, params, kind, tau, x[sl] if x is not None else None, y[sl],
                            w[sl] if w is not None else None)
    return out


def _kind(name: str, params: dict) -> tuple[str, float | tuple[float, ...]]:
    """Which solver a loss needs: ("lstsq" | "quantile" | "newton" | "newton-local", tau or taus)."""
    if name in _LSTSQ:
        return "lstsq", 0.5
    if name == "mae" or (name == "smooth_l1" and params["beta"] == 0):
        return "quantile", 0.5  # |e| = 2 * pinball_0.5(e): same minimiser
    if name == "quantile":
        tau = params["tau"]
        return "quantile", tuple(float(t) for t in tau) if isinstance(tau, tuple) else float(tau)
    if name == "general" and params["alpha"] < 1:
        return "newton-local", 0.5
    if name in _CONVEX:
        return "newton", 0.5
    if name in _NONCONVEX:
        return "newton-local", 0.5
    raise ValueError(f"loss {name!r} has no reference solver")


def _array(a, name: str) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        if a.is_complex() or a.dtype == torch.bool:
            raise TypeError(f"{name} must be real numbers, got dtype {a.dtype}")
        a = a.detach().to("cpu", torch.float64).numpy()
    a = np.asarray(a)
    if a.dtype.kind not in "iuf":
        raise TypeError(f"{name} must be real numbers, got dtype {a.dtype}")
    return a.astype(np.float64, copy=False)


def _column(a, name: str) -> np.ndarray:
    """One data set's [n] vector from [n] or [n, 1]."""
    a = _array(a, name)
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 1:
        raise ValueError(f"{name} must be [n] or [n, 1], got shape {a.shape}")
    return a


def _runs(a, name: str) -> torch.Tensor:
    """[R, n] float64 CPU tensor from [R, n] or [R, n, 1] numpy/torch input, checked finite."""
    a = _array(a, name)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim != 2:
        raise ValueError(f"{name} must be [runs, n] (or [runs, n, 1]), got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains non-finite values")
    return torch.from_numpy(np.ascontiguousarray(a))


def _solve_block(spec, params, kind, tau, x, y, w) -> list[Reference]:
    R, n = y.shape
    # Normalised weights: a float 1/n when uniform (sums need no extra pass), else [R, n] summing to 1.
    wn = 1.0 / n if w is None else w / w.sum(1, keepdim=True)
    # Centre x and y: theta becomes (slope, fitted value at the mean minus ybar), the Hessian is nearly
    # diagonal, and e = slope*xc + c - yc loses no digits to a large offset (y ~ 1e6 would otherwise
    # leave rounding noise of 1e-10 in every residual). Every loss here depends on e only.
    # The sort keeps y as it is, so that its answer is exactly one of the y_i.
    ybar = torch.zeros(R, 1, dtype=y.dtype) if kind == "quantile" and x is None else _wsum(y, wn)[:, None]
    yc = y - ybar
    xc, xbar = None, None
    if x is not None:
        xbar = _wsum(x, wn)[:, None]
        xc = x - xbar
        big = torch.finfo(torch.float64).max
        used = torch.ones_like(x, dtype=torch.bool) if w is None else wn > 0
        span = torch.where(used, x, -big).amax(1) - torch.where(used, x, big).amin(1)
        xc[span == 0] = 0.0  # one distinct x: slope direction is flat, pin it (gradient is exactly 0)
    theta0 = _lstsq(xc, yc, wn)
    conv = torch.ones(R, dtype=torch.bool)
    fallback = torch.zeros(R, dtype=torch.bool)
    if kind == "lstsq":
        theta = theta0
    elif kind == "quantile" and xc is None:
        theta, kind = quantile_fit.constant(yc, w, tau), "sort"
    elif kind == "quantile":
        theta, certified = quantile_fit.pivot_descent(xc, yc, wn, tau, theta0[:, 0])
        fallback = ~certified
        if fallback.any():
            theta[fallback] = quantile_fit.lp(*_rows(fallback.nonzero().squeeze(1), xc, yc, wn), tau)
        kind = "pivot"
    elif kind == "newton":
        theta, conv, fallback = _minimise(spec, params, xc, yc, wn, theta0)
    else:
        # Non-convex: a local minimum. The least-squares start alone can land on a plateau (Tukey with
        # every residual beyond c has zero gradient), so also start from the Huber fit with delta at
        # the loss's own scale -- the usual robust start for redescending M-estimators -- and keep
        # whichever local minimum is lower.
        theta, conv, fallback = _minimise(spec, params, xc, yc, wn, theta0)
        delta = params["c"] if spec.name == "tukey" else params["scale"]
        start, _, _ = _minimise(losses.spec("huber"), {"delta": delta}, xc, yc, wn, theta0)
        theta2, conv2, fallback2 = _minimise(spec, params, xc, yc, wn, start)
        better = _objective(spec, params, theta2, xc, yc, wn) < _objective(spec, params, theta, xc, yc, wn)
        theta[better], conv[better], fallback[better] = theta2[better], conv2[better], fallback2[better]
    value = _objective(spec, params, theta, xc, yc, wn)
    if spec.root:
        value = value.sqrt()
    exact = conv & (kind != "newton-local")
    refs = []
    for r in range(R):
        c = float(theta[r, -1] + ybar[r, 0])
        p = {"value": c} if xc is None else {"slope": float(theta[r, 0]), "intercept": c - float(theta[r, 0] * xbar[r, 0])}
        m = ("lp-highs" if kind == "pivot" else "newton+bfgs") if bool(fallback[r]) else kind
        refs.append(Reference(loss=float(value[r]), params=p, method=m, exact=bool(exact[r])))
    return refs
