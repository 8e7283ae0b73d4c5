"""Tests for lab.reference: the exact float64 optimum of a loss on a run's training data (the pivot descent,
its certificate and the HiGHS fallback of lab.quantile_fit are tested in test_quantile_fit.py).

Expected values come from independent computations: np.polyfit and the normal equations (least squares),
np.median / np.quantile (constant L1 / pinball fits), the primal split-residual LP built here with
scipy.optimize.linprog (the solver itself uses the dual), scipy.optimize.minimize on the same
objective, and properties that hold at a minimum (zero gradient, no lower point nearby, an L1 line through
two data points, integer weights == repeated points, invariance to shifting x and y).
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from reference_helpers import data, objective, theta_of
from scipy.optimize import linprog, minimize

from lab import losses, newton_fit, reference
from lab.reference import solve, solve_many

CONVEX = [
    ("huber", {"delta": 1.0}),
    ("huber", {"delta": 0.05}),
    ("log_cosh", {}),
    ("pseudo_huber", {"delta": 0.5}),
    ("expectile", {"tau": 0.8}),
    ("smooth_l1", {"beta": 0.7}),
    ("general", {"alpha": 1.5, "scale": 0.8}),
]
NONCONVEX = [("cauchy", {"scale": 1.0}), ("tukey", {"c": 2.0}), ("general", {"alpha": -2.0, "scale": 1.0})]


def gradient(loss, params, model, x, y, theta):
    """mean_i psi_i * (x_i, 1): the gradient of the mean loss in (slope, intercept) or (value,)."""
    s = losses.spec(loss)
    xt, yt = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    pred = theta[0] * xt + theta[1] if model == "linear" else torch.full_like(yt, theta[0])
    psi = s.psi(pred, yt, **losses.check_params(s.name, params))
    return np.array([float((psi * xt).mean()), float(psi.mean())] if model == "linear" else [float(psi.mean())])


def primal_lp(x, y, tau, model):
    """Quantile regression as the split-residual LP of the brief: y - f(x) = p - m, p, m >= 0,
    minimise mean(tau p + (1 - tau) m). Returns the optimal value (the mean pinball loss)."""
    n = len(y)
    A = np.column_stack([x, np.ones(n)]) if model == "linear" else np.ones((n, 1))
    k = A.shape[1]
    c = np.concatenate([np.zeros(k), np.full(n, tau / n), np.full(n, (1 - tau) / n)])
    A_eq = sp.hstack([sp.csr_matrix(A), sp.eye(n), -sp.eye(n)]).tocsc()
    res = linprog(c, A_eq=A_eq, b_eq=y, bounds=[(None, None)] * k + [(0, None)] * (2 * n), method="highs")
    assert res.status == 0
    return res.fun


# ----------------------------------------------------------------------------------------------------
# Least squares


def test_mse_linear_matches_polyfit_and_normal_equations():
    x, y = data()
    ref = solve("mse", {}, "linear", x, y)
    slope, intercept = np.polyfit(x, y, 1)
    A = np.column_stack([x, np.ones_like(x)])
    normal = np.linalg.solve(A.T @ A, A.T @ y)
    np.testing.assert_allclose([ref.params["slope"], ref.params["intercept"]], [slope, intercept], rtol=1e-12)
    np.testing.assert_allclose([ref.params["slope"], ref.params["intercept"]], normal, rtol=1e-12)
    assert ref.loss == pytest.approx(np.mean((y - slope * x - intercept) ** 2), rel=1e-12)
    assert (ref.method, ref.exact) == ("lstsq", True)


def test_mse_constant_is_the_mean_and_weighted_mean():
    _, y = data(n=50)
    ref = solve("l2", None, "constant", None, y)  # alias, no params, no x
    assert ref.params["value"] == pytest.approx(y.mean(), rel=1e-13)
    assert ref.loss == pytest.approx(y.var(), rel=1e-12)  # mean squared deviation from the mean
    w = np.random.default_rng(1).uniform(0, 3, size=50)
    ref_w = solve("mse", {}, "constant", None, y, weight=w)
    assert ref_w.params["value"] == pytest.approx(np.average(y, weights=w), rel=1e-13)


def test_rmse_is_sqrt_of_mse_with_the_same_minimiser():
    x, y = data()
    mse, rmse = solve("mse", {}, "linear", x, y), solve("rmse", {}, "linear", x, y)
    assert rmse.loss == pytest.approx(np.sqrt(mse.loss), rel=1e-14)
    assert rmse.params == mse.params


# ----------------------------------------------------------------------------------------------------
# MAE and quantile: sorting (constant) and LP (linear)


def test_mae_constant_is_the_median_for_odd_n():
    _, y = data(n=101)
    ref = solve("mae", {}, "constant", None, y)
    assert ref.params["value"] == np.median(y)  # the middle data point itself
    assert ref.loss == pytest.approx(np.mean(np.abs(y - np.median(y))), rel=1e-14)
    assert (ref.method, ref.exact) == ("sort", True)


def test_mae_constant_even_n_attains_the_median_loss():
    _, y = data(n=100)
    ref = solve("l1", {}, "constant", None, y)
    lo, hi = np.sort(y)[49:51]  # every point of [lo, hi] is a minimiser; the loss is unique
    assert lo <= ref.params["value"] <= hi
    assert ref.loss == pytest.approx(np.mean(np.abs(y - np.median(y))), rel=1e-13)


@pytest.mark.parametrize("tau", [0.1, 0.25, 0.5, 0.9])
def test_quantile_constant_is_a_tau_quantile(tau):
    _, y = data(n=77)
    ref = solve("quantile", {"tau": tau}, "constant", None, y)
    q = np.quantile(y, tau, method="inverted_cdf")
    u = y - q
    assert ref.params["value"] == q
    assert ref.loss == pytest.approx(np.mean(np.maximum(tau * u, (tau - 1) * u)), rel=1e-13)
    assert ref.loss == pytest.approx(primal_lp(None, y, tau, "constant"), rel=1e-9)


@pytest.mark.parametrize("tau", [0.2, 0.5, 0.85])
def test_quantile_linear_matches_the_primal_lp(tau):
    x, y = data(n=150, seed=3)
    ref = solve("pinball", {"tau": tau}, "linear", x, y)
    assert (ref.method, ref.exact) == ("pivot", True)
    assert ref.loss == pytest.approx(primal_lp(x, y, tau, "linear"), rel=1e-9)


def test_mae_linear_is_a_minimum_and_passes_through_two_points():
    x, y = data(n=120, seed=4)
    ref = solve("mae", {}, "linear", x, y)
    theta = np.array(theta_of(ref, "linear"))
    assert ref.loss == pytest.approx(objective("mae", {}, "linear", x, y, theta), rel=1e-14)
    assert ref.loss == pytest.approx(2 * primal_lp(x, y, 0.5, "linear"), rel=1e-9)  # |e| = 2 pinball_0.5
    rng = np.random.default_rng(5)
    for scale in (1e-6, 1e-3, 1e-1):
        for d in rng.normal(scale=scale, size=(1000 // 3 + 1, 2)):
            assert objective("mae", {}, "linear", x, y, theta + d) >= ref.loss - 1e-14
    assert objective("mae", {}, "linear", x, y, np.polyfit(x, y, 1)) > ref.loss
    residuals = np.abs(y - theta[0] * x - theta[1])
    assert np.sum(residuals < 1e-12 * np.abs(y).max()) >= 2  # an LP vertex: the line through 2 points


def test_quantile_list_of_taus_solves_each_level():
    x, y = data(n=90)
    taus = [0.1, 0.5, 0.9]
    ref = solve("quantile", {"tau": taus}, "linear", x, y)
    single = [solve("quantile", {"tau": t}, "linear", x, y) for t in taus]
    assert ref.loss == pytest.approx(np.mean([s.loss for s in single]), rel=1e-14)
    for j, s in enumerate(single):
        assert ref.params[f"slope_{j}"] == s.params["slope"]
        assert ref.params[f"intercept_{j}"] == s.params["intercept"]
    assert ref.params["slope_0"] < ref.params["slope_2"] or ref.params["intercept_0"] < ref.params["intercept_2"]


def test_smooth_l1_with_beta_zero_is_mae():
    x, y = data(n=60)
    for model in ("constant", "linear"):
        a, b = solve("smooth_l1", {"beta": 0.0}, model, x, y), solve("mae", {}, model, x, y)
        assert a.loss == pytest.approx(b.loss, rel=1e-14)
        assert a.method == b.method


# ----------------------------------------------------------------------------------------------------
# Newton for the smooth convex losses


def test_huber_with_huge_delta_is_least_squares():
    x, y = data()
    ref = solve("huber", {"delta": 1e6}, "linear", x, y)
    np.testing.assert_allclose(theta_of(ref, "linear"), np.polyfit(x, y, 1), rtol=1e-11)
    assert ref.loss == pytest.approx(0.5 * solve("mse", {}, "linear", x, y).loss, rel=1e-12)  # 0.5 e^2


@pytest.mark.parametrize("model", ["constant", "linear"])
@pytest.mark.parametrize("loss,params", CONVEX)
def test_convex_smooth_losses_reach_the_minimum(loss, params, model):
    x, y = data(n=200, seed=7)
    ref = solve(loss, params, model, x, y)
    assert (ref.method, ref.exact) == ("newton", True)
    theta = np.array(theta_of(ref, model))
    assert ref.loss == pytest.approx(objective(loss, params, model, x, y, theta), rel=1e-13)
    # First-order condition, in the data's own units (x, y ~ 1).
    assert np.abs(gradient(loss, params, model, x, y, theta)).max() < 1e-10
    rng = np.random.default_rng(8)
    for d in rng.normal(scale=1e-3, size=(100, len(theta))):
        assert objective(loss, params, model, x, y, theta + d) >= ref.loss - 1e-15
    # An independent optimiser on the same objective, from the least-squares start.
    start = np.polyfit(x, y, 1) if model == "linear" else np.array([y.mean()])
    res = minimize(lambda t: objective(loss, params, model, x, y, t), start, method="Nelder-Mead",
                   options={"xatol": 1e-10, "fatol": 1e-15, "maxiter": 20000})
    np.testing.assert_allclose(res.x, theta, atol=1e-6)
    assert res.fun >= ref.loss - 1e-13


def test_newton_is_invariant_to_a_large_offset():
    """Shifting x by 1e4 and y by 1e6 moves only the intercept; the float64 answer must not degrade."""
    x, y = data(seed=9)
    ref = solve("huber", {"delta": 1.0}, "linear", x, y)
    shifted = solve("huber", {"delta": 1.0}, "linear", x + 1e4, y + 1e6)
    assert shifted.exact
    assert shifted.params["slope"] == pytest.approx(ref.params["slope"], rel=1e-8)
    expected = ref.params["intercept"] + 1e6 - 1e4 * ref.params["slope"]
    assert shifted.params["intercept"] == pytest.approx(expected, abs=1e-5)
    assert shifted.loss == pytest.approx(ref.loss, rel=1e-9)


@pytest.mark.parametrize("noise", [1e-9, 0.0])
def test_newton_converges_on_a_near_perfect_fit(noise):
    """Residuals ~1e-9 leave a relative gradient of ~1e-7 from rounding alone: Newton must stop on its
    rounding-floor test instead of running out of iterations (then it would report newton+bfgs)."""
    rng = np.random.default_rng(16)
    x = rng.normal(size=200)
    y = 2 * x + 1 + noise * rng.standard_t(2, size=200)
    for loss in ("huber", "log_cosh", "expectile"):
        ref = solve(loss, {}, "linear", x, y)
        assert (ref.method, ref.exact) == ("newton", True)
        assert np.abs(gradient(loss, {}, "linear", x, y, theta_of(ref, "linear"))).max() < 1e-15
        assert ref.loss <= 1e-17


def test_newton_does_not_import_sympy():
    """A tensor grad_outputs in torch.autograd.grad pulls in torch's symbolic-shape code and sympy, ~0.4 s
    in every lab process; lab.newton_fit._psi_and_derivative must not. Needs a fresh interpreter: pytest's
    own process may already hold sympy from another test."""
    code = ("import sys, numpy as np\n"
            "from lab import reference\n"
            "x = np.linspace(-1, 1, 50)\n"
            "ref = reference.solve('huber', {'delta': 0.3}, 'linear', x, 2 * x + np.sin(9 * x))\n"
            "print(ref.method, 'sympy' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["newton", "False"], out.stdout


def test_bfgs_fallback_agrees_with_newton(monkeypatch):
    x, y = data(seed=10)
    ref = solve("log_cosh", {}, "linear", x, y)
    monkeypatch.setattr(newton_fit, "_MAX_ITER", 1)
    fallback = solve("log_cosh", {}, "linear", x, y)
    assert fallback.method == "newton+bfgs" and fallback.exact
    np.testing.assert_allclose(theta_of(fallback, "linear"), theta_of(ref, "linear"), rtol=1e-7)
    assert fallback.loss == pytest.approx(ref.loss, rel=1e-12)


# ----------------------------------------------------------------------------------------------------
# Non-convex losses: a local minimum


@pytest.mark.parametrize("loss,params", NONCONVEX)
def test_nonconvex_losses_give_a_local_minimum(loss, params):
    x, y = data(n=200, seed=11)
    ref = solve(loss, params, "linear", x, y)
    assert (ref.method, ref.exact) == ("newton-local", False)
    theta = np.array(theta_of(ref, "linear"))
    assert np.abs(gradient(loss, params, "linear", x, y, theta)).max() < 1e-10
    rng = np.random.default_rng(12)
    for d in rng.normal(scale=1e-3, size=(100, 2)):
        assert objective(loss, params, "linear", x, y, theta + d) >= ref.loss - 1e-15


def test_tukey_escapes_the_least_squares_plateau():
    """10% of points at 100 drag the mean to ~10, where every residual exceeds c = 1: the least-squares
    start sits on Tukey's flat top (loss c^2/6, zero gradient). The Huber start finds the cluster at 0."""
    rng = np.random.default_rng(13)
    y = np.concatenate([rng.normal(scale=0.1, size=90), np.full(10, 100.0)])
    ref = solve("tukey", {"c": 1.0}, "constant", None, y)
    assert abs(ref.params["value"]) < 0.05
    assert ref.loss < 0.1 * 1.0 / 6 + 0.9 * 0.02  # outliers at c^2/6, the cluster near e^2/2
    assert objective("tukey", {"c": 1.0}, "constant", None, y, [y.mean()]) == pytest.approx(1 / 6)


# ----------------------------------------------------------------------------------------------------
# Batches, weights, input types


@pytest.mark.parametrize("loss,params,model", [
    ("mse", {}, "linear"), ("rmse", {}, "constant"), ("mae", {}, "linear"), ("quantile", {"tau": 0.3}, "constant"),
    ("huber", {"delta": 0.5}, "linear"), ("log_cosh", {}, "constant"), ("cauchy", {}, "linear"),
])
def test_solve_many_equals_solve_one_by_one(loss, params, model, monkeypatch):
    monkeypatch.setattr(reference, "_CHUNK", 2 * 64)  # blocks of 2 runs: exercise the chunking too
    xs, ys = zip(*(data(n=64, seed=s) for s in range(5)))
    xs, ys = np.stack(xs), np.stack(ys)
    ys[2] *= 100  # very different scales in one batch: runs must converge independently
    many = solve_many(loss, params, model, xs, ys)
    assert len(many) == 5
    for r in range(5):
        one = solve(loss, params, model, xs[r], ys[r])
        assert (many[r].method, many[r].exact) == (one.method, one.exact)
        assert many[r].loss == pytest.approx(one.loss, rel=1e-12)
        for k in one.params:
            assert many[r].params[k] == pytest.approx(one.params[k], rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("loss,model", [("mse", "linear"), ("mae", "constant"), ("mae", "linear"),
                                        ("huber", "linear"), ("expectile", "constant")])
def test_integer_weights_equal_repeated_points(loss, model):
    x, y = data(n=40, seed=14)
    w = np.random.default_rng(15).integers(0, 4, size=40)  # zeros drop points
    weighted = solve(loss, {}, model, x, y, weight=w)
    repeated = solve(loss, {}, model, np.repeat(x, w), np.repeat(y, w))
    assert weighted.loss == pytest.approx(repeated.loss, rel=1e-10)
    assert weighted.loss == pytest.approx(objective(loss, {}, model, x, y, theta_of(weighted, model), w), rel=1e-12)


def test_torch_inputs_any_dtype_and_shape_n_by_1():
    x, y = data(n=50)
    x32, y32 = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)
    ref = solve("huber", {"delta": torch.tensor(1.0)}, "linear", x32[:, None], y32[:, None].requires_grad_())
    same = solve("huber", {}, "linear", x32.double().numpy(), y32.double().numpy())
    assert ref == same


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_inputs_match_cpu():
    x, y = data(n=50)
    on_gpu = solve("log_cosh", {}, "linear", torch.tensor(x, device="cuda"), torch.tensor(y, device="cuda"))
    assert on_gpu == solve("log_cosh", {}, "linear", x, y)


@pytest.mark.parametrize("loss", ["mse", "mae", "huber", "cauchy"])
def test_single_distinct_x_gets_slope_zero(loss):
    """x = 0.7 everywhere: the slope is not identifiable, and mean(x) rounds to 0.7 + 1e-16, which must
    not leave a 1e-16 lever arm that sends the slope to 1e15."""
    _, y = data(n=31)
    x = np.full(31, 0.7)
    ref = solve(loss, {}, "linear", x, y)
    assert ref.params["slope"] == 0
    const = solve(loss, {}, "constant", None, y)
    assert ref.loss == pytest.approx(const.loss, rel=1e-12)
    assert ref.params["intercept"] == pytest.approx(const.params["value"], rel=1e-12)


# ----------------------------------------------------------------------------------------------------
# Bad inputs


@pytest.mark.parametrize("call,match", [
    (lambda: solve("mse", {}, "linear", np.zeros(5), np.zeros(6)), "shape"),
    (lambda: solve("mse", {}, "mlp", np.zeros(5), np.zeros(5)), "mlp.*no reference solver"),
    (lambda: solve("mse", {}, "constant", None, np.zeros(0)), "empty"),
    (lambda: solve("mse", {}, "linear", None, np.zeros(5)), "needs features"),
    (lambda: solve("mse", {}, "linear", np.zeros((5, 2)), np.zeros(5)), "shape"),
    (lambda: solve("mse", {}, "constant", None, np.array([1.0, np.nan])), "non-finite"),
    (lambda: solve("mse", {}, "constant", None, np.ones(3), weight=np.array([1.0, -1.0, 1.0])), "weights"),
    (lambda: solve("mse", {}, "constant", None, np.ones(3), weight=np.zeros(3)), "weights"),
    (lambda: solve("mse", {}, "constant", None, np.ones(3), weight=np.ones(4)), "shape"),
    (lambda: solve("huber", {"delta": -1.0}, "constant", None, np.ones(3)), "delta"),
    (lambda: solve("nope", {}, "constant", None, np.ones(3)), "unknown loss"),
    (lambda: solve_many("huber", {"delta": torch.ones(3)}, "constant", None, np.ones((3, 4))), "one value"),
    (lambda: solve_many("mse", {}, "linear", np.zeros((2, 5)), np.zeros((3, 5))), "shape"),
])
def test_bad_inputs_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_non_numeric_input_raises_type_error():
    with pytest.raises(TypeError, match="real numbers"):
        solve("mse", {}, "constant", None, np.array(["a", "b"]))


@pytest.mark.parametrize("loss", ["mse", "mae", "huber", "quantile"])
def test_only_the_ratios_of_weights_matter_at_any_scale(loss):
    # The objective is a weighted mean: weights scaled by 1e308 (whose sum overflowed to inf, making every
    # normalised weight 0 and the "exact" loss 0) or 1e-300 give the optimum of the same weights at scale 1.
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(40, generator=gen, dtype=torch.float64)
    y = 2 * x + 1 + torch.randn(40, generator=gen, dtype=torch.float64)
    w = torch.rand(40, generator=gen, dtype=torch.float64) + 0.5
    one = reference.solve(loss, None, "linear", x, y, weight=w)
    for scale in (1e308 / 1.5, 1e-300):
        r = reference.solve(loss, None, "linear", x, y, weight=w * scale)
        assert r.exact and r.loss == pytest.approx(one.loss, rel=1e-13)
        assert r.params["slope"] == pytest.approx(one.params["slope"], rel=1e-12)
    with pytest.raises(ValueError, match="weights contains non-finite values"):
        reference.solve(loss, None, "linear", x, y, weight=torch.full((40,), math.inf, dtype=torch.float64))
