"""Least squares and damped Newton on R problems at once: ``lab.reference``'s "lstsq", "newton",
"newton-local" and "newton+bfgs" solvers, with the weighted sums over a block of runs that they share.

Each problem minimises, over theta = (value,) or (slope, intercept at the centred x),

    F(theta) = sum_i w_i fn(f_theta(x_i), y_i),      g = sum_i w_i psi_i a_i,      a_i = (xc_i, 1) or (1,)

for a smooth loss (``spec.fn``, ``spec.psi`` from ``lab.losses``). Least squares is closed form
(``_lstsq``); every other smooth loss is solved by damped Newton from a start the caller picks (``_newton``:
the least-squares fit, and for the non-convex losses also a Huber fit), and the runs Newton does not finish
within ``_MAX_ITER`` steps by scipy BFGS (``_bfgs``). Kept apart from ``lab.reference`` as the L1 /
quantile solvers are in ``lab.quantile_fit``: ``lab.reference`` checks inputs, picks a solver per
loss and assembles the ``Reference``; this module holds the iterations and their stopping rules.

Arguments follow ``lab.reference``: float64 CPU tensors [R, n] holding R problems of n points, x centred
(xc, None for the constant model), weights normalised (wn: a float 1/n when uniform, else [R, n] summing
to 1), and theta [R, k] returned as (value,) or (slope, intercept at the centred x) per run.
"""

from __future__ import annotations

import numpy as np
import torch

_RTOL = 1e-12  # |g_j| <= _RTOL * sqrt(E[psi^2] E[a_j^2]): Newton's stopping rule (see _newton)
_FLOOR_RTOL = 1e-8  # a run that cannot decrease the loss any more is converged if it got this far
_MAX_ITER = 500  # Huber with delta << the residuals crosses one kink per step: ~200 at 1e-6
_EPS = float(np.finfo(np.float64).eps)


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
