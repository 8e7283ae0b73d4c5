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
``lab.quantile_fit``):

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
Newton run that misses its tolerance in ``_MAX_ITER`` steps is finished by scipy BFGS ("newton+bfgs").
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

MODELS = ("constant", "linear")
_LSTSQ = ("mse", "rmse")
_CONVEX = ("huber", "smooth_l1", "log_cosh", "pseudo_huber", "expectile", "general")
_NONCONVEX = ("cauchy", "tukey")  # and general with alpha < 1

_RTOL = 1e-12  # |g_j| <= _RTOL * sqrt(E[psi^2] E[a_j^2]): Newton's stopping rule (see _newton)
_FLOOR_RTOL = 1e-8  # a run that cannot decrease the loss any more is converged if it got this far
_MAX_ITER = 500  # Huber with delta << the residuals crosses one kink per step: ~200 at 1e-6
_CHUNK = 1 << 21  # elements per [runs, n] block: a few 16 MB tensors, small enough to stay in cache
_EPS = float(np.finfo(np.float64).eps)


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


def _wsum(v: torch.Tensor, wn) -> torch.Tensor:
    """sum_i w_i v_i per run, w summing to 1 (a float 1/n when uniform). [R]"""
    return v.sum(1) * wn if isinstance(wn, float) else (wn * v).sum(1)


def _rows(idx, xc, y, wn):
    """The problems idx of a block (idx None: all of them, without a copy)."""
    if idx is None:
        return xc, y, wn
    return (None if xc is None else xc[idx]), y[idx], (wn if isinstance(wn, float) else wn[idx])


def _predict(theta: torch.Tensor, xc: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
    """Model output [R, n]; theta is (value,) or (slope, centred intercept) per run."""
    if xc is None:
        return theta[:, :1].expand_as(y)
    return theta[:, :1] * xc + theta[:, 1:]


def _objective(spec, params, theta, xc, y, wn) -> torch.Tensor:
    """L(theta) per run before any root: sum_i w_i fn(f_theta(x_i), y_i). [R]"""
    return _wsum(spec.fn(_predict(theta, xc, y), y, **params), wn)


def _moments(v: torch.Tensor, wn, xc: torch.Tensor | None) -> torch.Tensor:
    """sum_i w_i v_i a_i with a_i = (xc_i, 1) or (1,): [R, k]."""
    if xc is None:
        return _wsum(v, wn)[:, None]
    return torch.stack([_wsum(v * xc, wn), _wsum(v, wn)], 1)


def _second(v: torch.Tensor, wn, xc: torch.Tensor | None) -> torch.Tensor:
    """sum_i w_i v_i a_i a_i^T: [R, k, k]."""
    if xc is None:
        return _wsum(v, wn).view(-1, 1, 1)
    vx = v * xc
    a, b, c = _wsum(vx * xc, wn), _wsum(vx, wn), _wsum(v, wn)
    return torch.stack([torch.stack([a, b], 1), torch.stack([b, c], 1)], 1)


def _lstsq(xc, y, wn) -> torch.Tensor:
    """Weighted least squares: slope = Sxy / Sxx on centred x, intercept at the mean = ybar."""
    ybar = _wsum(y, wn)
    if xc is None:
        return ybar[:, None]
    sxx = _wsum(xc * xc, wn)
    sxy = _wsum(xc * (y - ybar[:, None]), wn)
    slope = torch.where(sxx > 0, sxy / torch.where(sxx > 0, sxx, 1.0), 0.0)
    return torch.stack([slope, ybar], 1)


def _psi_and_derivative(spec, params, pred, y) -> tuple[torch.Tensor, torch.Tensor]:
    """psi(pred, y) and d psi / d pred, elementwise. The second comes from autograd through the
    closed-form psi (exact, and right at Huber's kinks); a central difference if psi is not traceable."""
    with torch.enable_grad():
        p_in = pred.detach().requires_grad_(True)
        p = spec.psi(p_in, y, **params)
        if p.requires_grad:
            # psi is elementwise, so d(sum psi)/d pred is d psi/d pred. Not grad(p, p_in, ones_like(p)):
            # a tensor grad_outputs makes torch import its symbolic-shape machinery and sympy (~0.4 s).
            (dp,) = torch.autograd.grad(p.sum(), p_in)
            return p.detach(), dp
    h = 1e-5 * (1.0 + pred.abs())
    return p.detach(), (spec.psi(pred + h, y, **params) - spec.psi(pred - h, y, **params)) / (2 * h)


def _pd(H: torch.Tensor) -> torch.Tensor:
    """Is each [k, k] symmetric H (k <= 2) positive definite, with some room for rounding?"""
    if H.shape[1] == 1:
        return H[:, 0, 0] > 0
    a, b, c = H[:, 0, 0], H[:, 0, 1], H[:, 1, 1]
    return (a > 0) & (c > 0) & (a * c - b * b > 1e-12 * a * c)


def _minimise(spec, params, xc, y, wn, theta0):
    """Newton from theta0, and scipy BFGS for the runs Newton did not finish."""
    theta, conv, fallback = _newton(spec, params, xc, y, wn, theta0)
    if fallback.any():
        theta[fallback], conv[fallback] = _bfgs(spec, params, xc, y, wn, theta, fallback)
    return theta, conv, fallback


def _newton(spec, params, xc, y, wn, theta0):
    """Damped Newton on all R problems at once; each run stops on its own.

    Direction: -H^{-1} g, g = sum_i w_i psi_i a_i, with the exact Hessian H = sum_i w_i psi'_i a_i a_i^T
    where H is positive definite; elsewhere (a flat Huber piece, the concave part of a redescending
    loss) the IRLS matrix sum_i w_i (psi_i / e_i) a_i a_i^T, positive semi-definite for every loss here
    (psi(e)/e >= 0) with g in its range, so the step still descends. Step: Armijo backtracking that
    allows for the rounding noise of f, so the last tiny steps near the optimum are not refused.

    Stop when |g_j| <= _RTOL * sqrt(E[psi^2] E[a_j^2]) (Cauchy-Schwarz: that bounds |g_j|, so this is
    a relative gradient in [0, 1]), or below the rounding floor of g: e_i carries an error of about
    eps (|pred_i| + |y_i|), which moves g_j by up to eps max|pred, y| sum_i w_i |psi'_i a_ij|.

    Returns theta [R, k], converged [R], and the runs to hand to the fallback [R].
    """
    R, k = theta0.shape
    theta = theta0.clone()
    f = _objective(spec, params, theta, xc, y, wn)  # [R], kept current as steps are accepted
    conv = torch.zeros(R, dtype=torch.bool)
    fallback = torch.zeros(R, dtype=torch.bool)
    ymax = y.abs().amax(1)
    if xc is None:
        a2 = torch.ones(R, 1, dtype=y.dtype)
    else:
        a2 = torch.stack([_wsum(xc * xc, wn), torch.ones(R, dtype=y.dtype)], 1)  # E[a_j^2]
        xmax = xc.abs().amax(1)
        pinned = (xc == 0).all(1)  # one distinct x: g_0 is exactly 0, keep H invertible
    active = torch.arange(R)
    for _ in range(_MAX_ITER):
        if active.numel() == 0:
            break
        xa, ya, wa = _rows(None if active.numel() == R else active, xc, y, wn)
        th, fa = theta[active], f[active]
        pred = _predict(th, xa, ya)
        p, dp = _psi_and_derivative(spec, params, pred, ya)
        g = _moments(p, wa, xa)  # [A, k]
        H = _second(dp, wa, xa)  # [A, k, k]
        scale = (_wsum(p * p, wa)[:, None] * a2[active]).sqrt()
        size = ymax[active] + th[:, -1].abs() + (0 if xa is None else th[:, 0].abs() * xmax[active])
        hd = H.diagonal(dim1=1, dim2=2).abs()
        noise = 8 * _EPS * size[:, None] * (hd * hd[:, -1:]).sqrt()  # Cauchy-Schwarz on sum |psi'| |a_j|
        rel = torch.where(scale > 0, g.abs() / scale, 0.0).amax(1)
        done = (g.abs() <= _RTOL * scale + noise).all(1)
        if xa is not None:
            H[:, 0, 0] += pinned[active].to(H.dtype)
        bad = ~_pd(H)
        if bad.any():
            e = pred[bad] - ya[bad]
            irls = torch.where(e != 0, p[bad] / torch.where(e != 0, e, 1.0), dp[bad])
            Hb = _second(irls, wa if isinstance(wa, float) else wa[bad], None if xa is None else xa[bad])
            ridge = 1e-12 * Hb.diagonal(dim1=1, dim2=2).sum(1) + 1e-300
            H[bad] = Hb + ridge.view(-1, 1, 1) * torch.eye(k, dtype=H.dtype)
        d = -torch.linalg.solve(H, g.unsqueeze(-1)).squeeze(-1)
        gd = (g * d).sum(1)
        slack = 16 * _EPS * fa.abs()
        # Backtracking on the runs still moving; t halves until Armijo holds (or gives up at 2^-60).
        t = torch.ones_like(fa)
        ok = done.clone()
        pend = (~done).nonzero().squeeze(1)
        for _ in range(60):
            if pend.numel() == 0:
                break
            xp, yp, wp = _rows(None if pend.numel() == len(active) else pend, xa, ya, wa)
            f_new = _objective(spec, params, th[pend] + t[pend, None] * d[pend], xp, yp, wp)
            acc = f_new <= fa[pend] + 1e-4 * t[pend] * gd[pend] + slack[pend]
            ok[pend[acc]] = True
            fa[pend[acc]] = f_new[acc]
            pend = pend[~acc]
            t[pend] *= 0.5
        step = t[:, None] * d
        moved = ok & ~done
        theta[active[moved]] = th[moved] + step[moved]
        f[active] = fa
        # Rounding floor: the full Newton step no longer changes theta, or no step lowers f.
        tiny = (step.abs() <= 4 * _EPS * th.abs()).all(1) & (t == 1)
        floor = (tiny | ~ok) & ~done & (rel <= _FLOOR_RTOL)
        stuck = ~ok & ~done & ~floor
        conv[active[done | floor]] = True
        fallback[active[stuck]] = True
        active = active[~(done | floor | stuck)]
    fallback[active] = True
    return theta, conv, fallback


def _bfgs(spec, params, xc, y, wn, theta, which):
    """scipy BFGS from the Newton iterate for the runs Newton did not finish, one by one."""
    from scipy.optimize import minimize  # here: scipy.optimize costs ~0.1 s to import, and is rarely needed
    rows = which.nonzero().squeeze(1)
    out = theta[rows].clone()
    conv = torch.zeros(rows.numel(), dtype=torch.bool)
    for j, r in enumerate(rows.tolist()):
        xa, ya, wa = _rows(slice(r, r + 1), xc, y, wn)

        def fg(v, xa=xa, ya=ya, wa=wa):
            th = torch.from_numpy(v).view(1, -1)
            pred = _predict(th, xa, ya)
            return float(_wsum(spec.fn(pred, ya, **params), wa)[0]), _moments(spec.psi(pred, ya, **params), wa, xa)[0].numpy()

        res = minimize(fg, out[j].numpy(), jac=True, method="BFGS", options={"gtol": 1e-14, "maxiter": 2000})
        out[j] = torch.from_numpy(res.x)
        p = spec.psi(_predict(out[j:j + 1], xa, ya), ya, **params)
        g = _moments(p, wa, xa).abs()
        scale = _moments(p.abs(), wa, None if xa is None else xa.abs())
        conv[j] = bool((torch.where(scale > 0, g / scale, 0.0) <= _FLOOR_RTOL).all())
    return out, conv
