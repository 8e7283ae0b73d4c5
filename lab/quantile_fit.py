"""Exact float64 L1 and quantile fits of the constant and linear models: ``lab.reference``'s "sort",
"pivot" and "lp-highs" solvers.

The objective is the weighted pinball (check) loss of the residuals r_i = y_i - f_theta(x_i),

    F(theta) = sum_i w_i rho_tau(r_i),      rho_tau(r) = r (tau - [r < 0]),

which at tau = 1/2 is mae and smooth_l1 with beta = 0 up to a factor (|r| = 2 rho_1/2(r): the same
minimiser). F is convex and piecewise linear in theta, the objective of a linear programme, so each model
has an exact, finite algorithm rather than an iteration that stops within a tolerance:

    constant  F(c) has right derivative sum_{y_i <= c} w_i - tau W: its minimiser is the weighted
              tau-quantile of y, one sort (``constant``).
    linear    F(b, c) has a minimiser on a line through two data points (a vertex of the LP). Rotating a
              line about one data point p turns F into a weighted pinball loss in the slope alone, so the
              best line through p is again a weighted quantile, one sort, and it passes through p and a
              second point q. The descent (``pivot_descent``, Wesolowsky's for tau = 1/2) rotates about q
              next, and so on, F falling at each pivot, until the line is already the best through its
              pivot. A stopped descent is then certified by the LP's optimality (KKT) conditions
              (``_pivot_certificate``), because with three or more points on the line a rotation about
              a third might still descend. The runs it refuses, and those that do not stop within
              ``_PIVOT_MAX_ITER`` pivots, are left to HiGHS on Koenker's dual LP (``lp``).

Arguments follow ``lab.reference``: float64 CPU tensors [R, n] holding R problems of n points, x centred
(xc), weights normalised (wn: a float 1/n when uniform, else [R, n] summing to 1), and theta returned as
(value,) or (slope, intercept at the centred x) per run. Cost on the 2-core development machine, R = 1,000
problems of n = 1,000: the sort ~0.1 s, the descent with its certificate ~0.3 s, HiGHS ~4 ms a problem.
"""

from __future__ import annotations

import numpy as np
import torch

_EPS = float(np.finfo(np.float64).eps)
_PIVOT_MAX_ITER = 100  # rotations per run before HiGHS takes over; n = 1000 needs ~4, at most ~12


def constant(y, w, tau: float) -> torch.Tensor:
    """Constant minimiser of sum_i w_i rho_tau(y_i - c): the smallest y_(k) with W_(<=k) >= tau * W.

    Its right derivative W_(<=k) - tau W is >= 0 and its left one W_(<k) - tau W is < 0, so it is a
    minimiser; with unit weights this is np.quantile(y, tau, method="inverted_cdf"). y [R, n] is not
    centred, so that the answer is exactly one of the y_i; w is [R, n] (any positive sum) or None for unit
    weights. Returns theta [R, 1].
    """
    ys, order = torch.sort(y, dim=1)
    cw = torch.ones_like(y).cumsum(1) if w is None else w.gather(1, order).cumsum(1)  # integers if unit
    k = torch.searchsorted(cw, tau * cw[:, -1:]).clamp_max(y.shape[1] - 1)
    return ys.gather(1, k)


def pivot_descent(xc, y, wn, tau: float, slope0) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear quantile regression, exactly: a descent over the lines through two data points.

    F(b, c) = sum_i w_i rho_tau(y_i - b x_i - c) has a minimiser through two data points (a vertex of
    the LP). Rotating the line about one point p, with u_i = x_i - x_p and d_i = y_i - y_p,

        F_p(b) = sum_i w_i rho_tau(d_i - b u_i) = sum_{u_i != 0} v_i rho_{tau_i}(s_i - b) + const,
        s_i = d_i / u_i,   v_i = w_i |u_i|,   tau_i = tau if u_i > 0 else 1 - tau,

    is a weighted pinball loss in b with right derivative sum_{s_i <= b} v_i - T, T = sum_i v_i tau_i.
    Its minimiser is the smallest s_(k) whose cumulative weight reaches T -- one sort -- and that line
    passes through p and the point q behind s_(k). Then rotate about q, and so on (Wesolowsky 1981, "A
    new descent algorithm for the least absolute value regression problem", there for tau = 1/2). F
    falls at every pivot; the descent stops when the line through p and the previous pivot is already
    the best through p: sum_{s_i < b} v_i <= T <= sum_{s_i <= b} v_i. It starts from the best line with
    slope slope0 [R] (least squares), which passes through the point at the weighted tau-quantile of
    y_i - slope0 x_i. At n = 1000 it takes ~4 pivots (at most ~12), one [R, n] argsort each.

    Where no other point is on the line, being best through p and through q is optimality; with three or
    more points on it, a rotation about a third might still descend. So a stopped descent is not trusted:
    each run is certified by the LP's optimality conditions (``_pivot_certificate``), and the runs that
    fail them, or do not stop within ``_PIVOT_MAX_ITER`` pivots, are left to the caller for ``lp``
    (~0.4% of runs on small integer grids, none on continuous data). Runs with one distinct x (xc all
    zero, slope pinned to 0) get the weighted tau-quantile of y.

    Returns theta [R, 2] (slope, intercept at the centred x) and certified [R] (bool).
    """
    R, n = y.shape
    x, y = xc.numpy(), y.numpy()
    w = np.full((R, n), wn) if isinstance(wn, float) else wn.numpy()
    slope, intercept = np.zeros(R), np.zeros(R)
    certified = np.zeros(R, dtype=bool)

    flat = ~(x != 0).any(1)  # one distinct x: the line is the constant fit, certified like "sort"
    if flat.any():
        yf, wf = y[flat], w[flat]
        k = _weighted_quantile_index(yf, wf, tau * wf.sum(1))
        intercept[flat] = yf[np.arange(len(k)), k]
        certified[flat] = True

    runs = np.flatnonzero(~flat)
    xa, ya, wa = x[runs], y[runs], w[runs]  # the runs still descending, compressed as they stop
    b0 = slope0.numpy()[runs]
    pivot = _weighted_quantile_index(ya - b0[:, None] * xa, wa, tau * wa.sum(1))
    s, v, T = _rotation(xa, ya, wa, tau, pivot)
    prev, pivot = pivot, _weighted_quantile_index(s, v, T)
    b = s[np.arange(len(pivot)), pivot]
    descending = np.arange(len(runs))  # each descending run's position in runs
    found_slope, found_p, found_q = np.zeros(len(runs)), np.zeros(len(runs), int), np.zeros(len(runs), int)
    stopped = np.zeros(len(runs), dtype=bool)
    for _ in range(_PIVOT_MAX_ITER):
        if descending.size == 0:
            break
        s, v, T = _rotation(xa, ya, wa, tau, pivot)
        below, upto = (v * (s < b[:, None])).sum(1), (v * (s <= b[:, None])).sum(1)
        stop = (below <= T) & (T <= upto)
        go = np.flatnonzero(~stop)
        best = _weighted_quantile_index(s[go], v[go], T[go])
        b_best = s[go, best]
        # The sort can land on the current slope where rounding in the sums above said otherwise: the
        # line does not change, so that is a stop too (and it still passes through pivot and best).
        stop[go[b_best == b[go]]] = True
        prev[go], pivot[go], b[go] = pivot[go], best, b_best
        done = descending[stop]
        found_slope[done], found_p[done], found_q[done] = b[stop], prev[stop], pivot[stop]
        stopped[done] = True
        keep = ~stop
        xa, ya, wa, b, prev, pivot = xa[keep], ya[keep], wa[keep], b[keep], prev[keep], pivot[keep]
        descending = descending[keep]

    ok = np.flatnonzero(stopped)
    if ok.size:
        rows, k = runs[ok], np.arange(len(ok))
        xs, ys, ws, p, q = x[rows], y[rows], w[rows], found_p[ok], found_q[ok]
        slope[rows] = found_slope[ok]
        intercept[rows] = ys[k, p] - slope[rows] * xs[k, p]  # the line through p (and q)
        certified[rows] = _pivot_certificate(xs, ys, ws, tau, slope[rows], intercept[rows], p, q)
    return torch.from_numpy(np.stack([slope, intercept], 1)), torch.from_numpy(certified)


def _rotation(x, y, w, tau: float, p):
    """The lines through each run's pivot p (arrays [R, n], p [R]): their slopes s_i = (y_i - y_p) /
    (x_i - x_p), weights v_i = w_i |x_i - x_p| and T = sum_i v_i tau_i (see ``pivot_descent``).
    A point with x_i = x_p gets v_i = 0 (and s_i = 0): rotating about p does not move its residual."""
    rows = np.arange(len(p))
    u = x - x[rows, p][:, None]
    d = y - y[rows, p][:, None]
    moves = u != 0
    s = np.where(moves, d / np.where(moves, u, 1.0), 0.0)
    v = w * np.abs(u)
    T = (v * np.where(u > 0, tau, 1 - tau)).sum(1)
    return s, v, T


def _weighted_quantile_index(values, weight, level):
    """Per row of values [R, n], the index of the smallest value whose cumulative weight, in increasing
    order of value, reaches level [R]: a minimiser of sum_i weight_i rho(values_i - t) as in
    ``constant``. Never a zero-weight point while level > 0: its cumulative weight equals the one
    before it. numpy, not torch: its argsort of 1000 x 1000 float64 is ~5x faster here."""
    order = np.argsort(values, axis=1)
    cum = np.cumsum(np.take_along_axis(weight, order, axis=1), axis=1)
    k = np.minimum((cum < level[:, None]).sum(1), values.shape[1] - 1)  # the first cum >= level
    return order[np.arange(len(k)), k]


def _pivot_certificate(x, y, w, tau: float, slope, intercept, p, q):
    """Is each line (slope, intercept) through points p, q a minimiser of sum_i w_i rho_tau(r_i)? [R]

    The objective is convex in (b, c), so it is iff 0 is a subgradient: there are g_i with

        sum_i w_i g_i (x_i, 1) = 0,   g_i = tau (r_i > 0),  tau - 1 (r_i < 0),  in [tau - 1, tau] (r_i = 0).

    On the line (set Z) are p, q and every point whose residual is 0 to rounding: a duplicate, a third
    collinear point, every point of a noise-free line. The others fix S = sum_{i not in Z} w_i g_i (x_i, 1),
    and the question is whether z_i = w_i g_i = (tau - 1) w_i + f_i, f_i in [0, w_i], can give

        sum_Z z_i = -S_1   <=>   sum_Z f_i = D = -S_1 - (tau - 1) W_Z  in [0, W_Z],
        sum_Z z_i x_i = -S_x,

    where, for that total D, sum_Z f_i x_i ranges from putting D on the smallest x_i first to putting it on
    the largest first (a fractional knapsack). For Z = {p, q} this is the reduced-cost test of the LP basis
    {p, q}. Both tests allow for the rounding of S, about n eps sum_i w_i (|x_i| + 1); counting a point
    within rounding of the line as on it can move the objective by only its own w_i |r_i|.
    """
    R, n = x.shape
    rows = np.arange(R)
    r = y - slope[:, None] * x - intercept[:, None]
    on = np.abs(r) <= 8 * _EPS * (np.abs(y) + np.abs(slope[:, None] * x) + np.abs(intercept[:, None]))
    on[rows, p] = on[rows, q] = True
    wg = np.where(on, 0.0, w * np.where(r < 0, tau - 1, tau))
    s_1, s_x = wg.sum(1), (wg * x).sum(1)
    err = 4 * n * _EPS * (w * (np.abs(x) + 1)).sum(1)
    # The points of Z packed to the left of [R, m] arrays (m = the largest Z), the rest capacity 0.
    m = int(on.sum(1).max())
    i, j = np.nonzero(on)
    slot = (np.cumsum(on, 1) - 1)[i, j]
    xz, cap = np.zeros((R, m)), np.zeros((R, m))
    xz[i, slot], cap[i, slot] = x[i, j], w[i, j]
    order = np.argsort(xz, axis=1)
    xz, cap = np.take_along_axis(xz, order, 1), np.take_along_axis(cap, order, 1)
    w_z = cap.sum(1)
    total = np.clip(-s_1 - (tau - 1) * w_z, 0.0, w_z)  # D, its rounding allowed for below
    fixed = (tau - 1) * (cap * xz).sum(1)
    upto = np.cumsum(cap, 1)
    lowest = fixed + (np.clip(total[:, None] - (upto - cap), 0.0, cap) * xz).sum(1)  # smallest x first
    highest = fixed + (np.clip(total[:, None] - (w_z[:, None] - upto), 0.0, cap) * xz).sum(1)  # largest first
    room = err * (1 + np.abs(xz).max(1))
    return ((tau - 1) * w_z - err <= -s_1) & (-s_1 <= tau * w_z + err) \
        & (lowest - room <= -s_x) & (-s_x <= highest + room)


def lp(xc, y, wn, tau: float) -> torch.Tensor:
    """Linear quantile regression as Koenker's dual LP, one HiGHS call per run (~4 ms at n = 1000): the
    fallback for the runs ``pivot_descent`` cannot certify.

    The primal min sum_i w_i (tau p_i + (1 - tau) m_i) s.t. A theta + p - m = y, p, m >= 0 has
    2n + 2 variables and n rows; its dual

        max_a  (W y)^T a   s.t.  A^T W a = (1 - tau) A^T W 1,   0 <= a <= 1      (W = diag w)

    has n bounded variables and 2 rows (7x faster at n=1000). theta is the dual of those 2 rows:
    for an a_i strictly inside (0, 1) the reduced cost -w_i y_i - w_i a_i^T nu = 0, so a_i^T (-nu) = y_i
    -- the fitted line passes through those points, the vertex property of L1 fits.
    """
    from scipy.optimize import linprog  # here: scipy.optimize costs ~0.1 s to import, and is rarely needed
    R, n = y.shape
    out = torch.empty(R, 2, dtype=torch.float64)
    for r in range(R):
        w = np.full(n, wn) if isinstance(wn, float) else wn[r].numpy()
        keep = w > 0
        A = np.stack([w * xc[r].numpy(), w])[:, keep]  # [2, m]
        res = linprog(-(w * y[r].numpy())[keep], A_eq=A, b_eq=(1 - tau) * A.sum(1), bounds=(0, 1),
                      method="highs")
        if res.status != 0:
            raise RuntimeError(f"HiGHS failed on the quantile LP (run {r}): {res.message}")
        out[r] = torch.from_numpy(-res.eqlin.marginals)
    return out
