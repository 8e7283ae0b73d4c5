"""Tests for lab.quantile_fit, the exact L1 / quantile solvers behind lab.reference: the pivot descent, its
KKT certificate and the HiGHS fallback, driven through lab.reference's public solve / solve_many.

Expected values come from independent computations: HiGHS on the dual LP (``quantile_fit.lp``, the linear
quantile solver before the pivot descent and now its fallback), the minimum over every line through two
data points (an L1 / pinball fit has one among them), and properties that hold at a minimum (an LP vertex:
a line through two data points, the attained objective equal to the reported loss).
"""

from __future__ import annotations

import numpy as np
import pytest
from reference_helpers import data, objective, theta_of

from lab import quantile_fit
from lab.reference import solve, solve_many


def quantile_problems(n, seed):
    """One linear quantile problem of each awkward kind, all of n points: x, y, weights [K, n] and names."""
    rng = np.random.default_rng(seed)
    out = {}
    for kind in ("gaussian", "outliers", "cauchy", "tied_x", "duplicates", "one_x", "weights_int",
                 "weights_real", "grid", "noise_free", "offset"):
        x = rng.uniform(-1, 1, n)
        y = 2 * x + 1 + rng.normal(size=n)
        w = np.ones(n)
        if kind == "outliers":
            y[rng.random(n) < 0.05] += 50
        elif kind == "cauchy":
            y = 2 * x + 1 + rng.standard_cauchy(n)
        elif kind == "tied_x":
            x = rng.integers(0, 5, n).astype(float)
            y = x + rng.normal(size=n)
        elif kind == "duplicates":  # every point repeated about 3 times
            pick = rng.integers(0, max(1, n // 3), n)
            x, y = x[pick], y[pick]
        elif kind == "one_x":
            x = np.full(n, 0.3)
        elif kind == "weights_int":
            w = rng.integers(0, 4, n).astype(float)
            w[0] = 1.0
        elif kind == "weights_real":
            w = rng.exponential(size=n) * (rng.random(n) < 0.8)
            w[0] = 1.0
        elif kind == "grid":  # integers: many exact ties and three or more points on one line
            x = rng.integers(-3, 4, n).astype(float)
            y = x + rng.integers(-3, 4, n)
        elif kind == "noise_free":
            y = 2 * x + 1
        elif kind == "offset":
            x, y = x + 1e4, y + 1e6
        out[kind] = (x, y, w)
    names = list(out)
    x, y, w = (np.stack(a) for a in zip(*out.values()))
    return x, y, w, names


@pytest.mark.parametrize("tau", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("n", [2, 3, 5, 10, 31, 200, 2000])
def test_pivot_descent_equals_the_highs_lp(n, tau, monkeypatch):
    """The expected minimum is HiGHS's on the dual LP, the solver before the descent: the same public
    solve_many with the descent switched off (_PIVOT_MAX_ITER = 0 leaves every run to the fallback)."""
    x, y, w, names = quantile_problems(n, seed=1000 * n + int(100 * tau))
    pivot = solve_many("quantile", {"tau": tau}, "linear", x, y, w)
    monkeypatch.setattr(quantile_fit, "_PIVOT_MAX_ITER", 0)
    highs = solve_many("quantile", {"tau": tau}, "linear", x, y, w)
    for r, kind in enumerate(names):
        one_x = np.ptp(x[r][w[r] > 0]) == 0  # the slope is pinned to 0 and the sort answers, both ways
        assert highs[r].method == ("pivot" if one_x else "lp-highs")
        # Only the integer grid has vertices where the descent may stop short (then HiGHS finishes it).
        assert pivot[r].method == "pivot" or kind == "grid", kind
        assert pivot[r].exact
        # abs: a noise-free line has minimum 0, which HiGHS reports as ~1e-16. rel: HiGHS stops within
        # its tolerances (1e-7 on dual feasibility): 5e-11 above the minimum on one of 1,000 benchmark
        # problems (n = 1000, 5% outliers). The descent's certified vertex is never above HiGHS's.
        assert pivot[r].loss == pytest.approx(highs[r].loss, rel=1e-10, abs=1e-14), kind
        assert pivot[r].loss <= highs[r].loss * (1 + 1e-13) + 1e-15, kind
        if kind == "offset":
            continue  # (slope, intercept) in units of 1e6 cannot reproduce a loss of ~1 to 1e-12
        theta = theta_of(pivot[r], "linear")
        attained = objective("quantile", {"tau": tau}, "linear", x[r], y[r], theta, w[r])
        assert attained == pytest.approx(pivot[r].loss, rel=1e-12, abs=1e-14), kind
        on_line = np.abs(y[r] - theta[0] * x[r] - theta[1]) <= 1e-12 * np.abs(y[r]).max()
        assert (on_line & (w[r] > 0)).sum() >= (1 if one_x else 2), kind  # a vertex of the LP


@pytest.mark.parametrize("tau", [0.1, 0.5, 0.9])
def test_certificate_accepts_exactly_the_optimal_lines(tau):
    """Brute force: some line through two data points is optimal (the LP has a vertex solution), so the
    minimum over all such lines is the exact minimum. Among all of them, the KKT test must accept the
    optimal ones and no other -- also with duplicates, zero weights and three points on one line."""
    x_all, y_all, w_all, names = quantile_problems(9, seed=int(100 * tau))
    for x, y, w, kind in zip(x_all, y_all, w_all, names):
        if kind in ("one_x", "offset"):
            continue
        p, q = (a.ravel() for a in np.meshgrid(np.arange(9), np.arange(9)))
        pair = (x[p] != x[q]) & (w[p] > 0) & (w[q] > 0)
        p, q = p[pair], q[pair]
        slope = (y[q] - y[p]) / (x[q] - x[p])
        intercept = y[p] - slope * x[p]
        value = np.array([objective("quantile", {"tau": tau}, "linear", x, y, t, w)
                          for t in zip(slope, intercept)])
        best = value.min()
        rows = len(p)
        certified = quantile_fit._pivot_certificate(np.tile(x, (rows, 1)), np.tile(y, (rows, 1)),
                                                    np.tile(w / w.sum(), (rows, 1)), tau, slope, intercept, p, q)
        optimal = value <= best + 1e-13 * max(best, 1.0)
        np.testing.assert_array_equal(certified, optimal, err_msg=kind)
        ref = solve("quantile", {"tau": tau}, "linear", x, y, weight=w)
        assert ref.loss == pytest.approx(best, rel=1e-12, abs=1e-15), kind


def test_uncertified_runs_fall_back_to_highs(monkeypatch):
    """A run whose certificate fails is solved by HiGHS, and says so; the others keep the descent."""
    x, y, w, names = quantile_problems(50, seed=3)
    expected = solve_many("quantile", {"tau": 0.3}, "linear", x, y, w)
    certify = quantile_fit._pivot_certificate
    monkeypatch.setattr(quantile_fit, "_pivot_certificate",
                        lambda *a: certify(*a) & (np.arange(len(a[0])) % 2 == 0))  # refuse every other run
    mixed = solve_many("quantile", {"tau": 0.3}, "linear", x, y, w)
    refused = [r for r in range(len(names)) if names[r] != "one_x"][1::2]  # one_x never reaches the test
    for r in range(len(names)):
        assert mixed[r].method == ("lp-highs" if r in refused else "pivot"), names[r]
        assert mixed[r].loss == pytest.approx(expected[r].loss, rel=1e-10, abs=1e-14)


def test_quantile_levels_report_each_method_once(monkeypatch):
    """k levels are k solves; where they used different methods, the run's method names both."""
    x, y = data(n=80, seed=21)
    assert solve("quantile", {"tau": [0.2, 0.9]}, "linear", x, y).method == "pivot"
    certify = quantile_fit._pivot_certificate
    monkeypatch.setattr(quantile_fit, "_pivot_certificate",
                        lambda x, y, w, tau, *a: certify(x, y, w, tau, *a) & (tau != 0.9))  # refuse one level
    assert solve("quantile", {"tau": [0.2, 0.9, 0.5]}, "linear", x, y).method == "pivot+lp-highs"
