"""Tests for lab.data: exact constructions, empirical agreement with the truth, determinism, errors.

Empirical checks use tolerances from the sample size: a share p estimated from n points has standard
error sqrt(p(1-p)/n), a sample mean sd/sqrt(n), a sample median sqrt(1/4n)/density(median); we allow
5 standard errors (a false failure about once in 1.7 million runs, and the seeds are fixed anyway).
"""

import math

import numpy as np
import pytest
import scipy.optimize
import scipy.special
import scipy.stats
import torch

from lab import data

KINDS = ["clean", "outliers", "heavy_tailed", "skewed", "heteroscedastic", "nonlinear"]
CUDA = pytest.param(
    "cuda",
    marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")],
)
# Every noise the truth knows, as (kind, params); outliers with a large fraction so the mixture matters.
PROCESSES = [
    ("clean", {}),
    ("heavy_tailed", {}),
    ("heavy_tailed", {"df": 1.0}),
    ("skewed", {"skew": 2.0}),
    ("heteroscedastic", {}),
    ("outliers", {"outlier_fraction": 0.3, "outlier_scale": 1.0}),
    ("outliers", {"outlier_fraction": 0.3, "outlier_scale": 1.0, "outlier_sign": "positive"}),
    ("nonlinear", {}),
    ("nonlinear", {"noise_kind": "student_t", "df": 3.0}),
    ("nonlinear", {"noise_kind": "skewed"}),
    ("nonlinear", {"noise_kind": "outliers", "outlier_sign": "positive", "outlier_scale": 2.0}),
]


def make64(kind, **params):
    return data.make(kind, dtype=torch.float64, **params)


def at(*xs):
    """Points as the truth takes them: [len(xs), 1] float64."""
    return torch.tensor(xs, dtype=torch.float64)[:, None]


def test_registry_lists_kinds_and_their_defaults():
    assert data.available() == KINDS
    assert data.defaults("outliers") == {
        "n": 200,
        "n_val": 200,
        "seed": 0,
        "slope": 2.0,
        "intercept": 1.0,
        "noise": 0.5,
        "x_range": (-2.0, 2.0),
        "target_scale": 1.0,
        "outlier_fraction": 0.1,
        "outlier_scale": 10.0,
        "outlier_sign": "both",
        "leverage": False,
    }
    assert data.defaults("heavy_tailed")["df"] == 2.0
    assert data.defaults("nonlinear")["noise_kind"] == "gaussian"
    for kind in KINDS:  # the defaults are a complete, valid configuration
        ds = data.make(kind, **data.defaults(kind))
        assert torch.equal(ds.y, data.make(kind).y)
        assert ds.params == {k: v for k, v in data.defaults(kind).items() if k != "seed"}


@pytest.mark.parametrize("kind", KINDS)
def test_shapes_dtypes_and_range(kind):
    ds = data.make(kind, n=50, n_val=30, x_range=[-1, 3])  # a TOML list is accepted for x_range
    assert (
        ds.x.shape == (50, 1)
        and ds.y.shape == (50,)
        and ds.x_val.shape == (30, 1)
        and ds.y_val.shape == (30,)
    )
    assert ds.x.dtype == ds.y.dtype == torch.float32 and ds.outlier.dtype == torch.bool
    assert ds.params["x_range"] == (-1.0, 3.0) and ds.n == 50
    assert torch.isfinite(ds.y).all()
    assert bool(((ds.x_val >= -1) & (ds.x_val < 3)).all())


@pytest.mark.parametrize(
    ("n", "fraction", "count"),
    [(1000, 0.05, 50), (1000, 0.0123, 12), (1000, 0.0, 0), (10, 0.25, 2), (10, 0.35, 4), (7, 0.99, 7)],
    # expected = Python's round(fraction * n), half to even: 2.5 -> 2, 3.5 -> 4, 6.93 -> 7
)
def test_outlier_count_is_exact(n, fraction, count):
    ds = data.make("outliers", n=n, outlier_fraction=fraction)
    assert int(ds.outlier.sum()) == count


@pytest.mark.parametrize("sign", ["both", "positive"])
def test_outlier_mask_marks_exactly_the_displaced_points(sign):
    # Same seed and parameters: outliers draws x and the noise exactly as clean does, then displaces
    # the masked points by +-outlier_scale (times target_scale), so the difference isolates the displacement.
    common = {"n": 1000, "seed": 3, "target_scale": 3.0}
    dirty = make64("outliers", outlier_scale=7.0, outlier_sign=sign, **common)
    clean = make64("clean", **common)
    shift = dirty.y - clean.y
    assert torch.equal(dirty.x, clean.x)
    assert torch.equal(shift[~dirty.outlier], torch.zeros(900, dtype=torch.float64))
    torch.testing.assert_close(shift[dirty.outlier].abs(), torch.full((100,), 21.0, dtype=torch.float64))
    positives = int((shift[dirty.outlier] > 0).sum())
    if sign == "positive":
        assert positives == 100
    else:  # Binomial(100, 1/2): mean 50, sd 5; 5 sd either side
        assert 25 <= positives <= 75
    # Seen from the truth line: inliers within 5 noise sd (max |z| of 1000 normals is ~3.3), outliers beyond.
    residual = (dirty.y - dirty.truth.signal(dirty.x)).abs() / 3.0
    assert residual[~dirty.outlier].max() < 5 * 0.5
    assert residual[dirty.outlier].min() > 7.0 - 5 * 0.5


def test_leverage_moves_outliers_one_range_width_beyond_the_right_end():
    ds = make64("outliers", n=400, leverage=True, outlier_sign="positive")
    clean = make64("clean", n=400)
    # x_range (-2, 2): x_far = 2 + (2 - -2) = 6
    assert torch.equal(ds.x[ds.outlier], torch.full((40, 1), 6.0, dtype=torch.float64))
    assert torch.equal(ds.x[~ds.outlier], clean.x[~ds.outlier])
    residual = ds.y - ds.truth.signal(ds.x)  # y is displaced from the truth line at the new x
    assert residual[ds.outlier].min() > 10.0 - 5 * 0.5
    # the truth describes the inliers here (documented): equal to clean's
    torch.testing.assert_close(ds.truth.quantile(at(0.5), 0.9), clean.truth.quantile(at(0.5), 0.9))


def test_validation_set_is_clean_and_does_not_depend_on_n():
    dirty = data.make("outliers", n=100, outlier_fraction=0.5)
    clean = data.make("clean", n=500)
    assert torch.equal(dirty.x_val, clean.x_val) and torch.equal(dirty.y_val, clean.y_val)
    for kind in KINDS:
        assert torch.equal(data.make(kind, n=10).y_val, data.make(kind, n=1000).y_val)


@pytest.mark.parametrize(("kind", "params"), PROCESSES)
def test_share_below_truth_quantile_is_tau(kind, params):
    n = 20_000
    ds = make64(kind, n=n, seed=11, **params)
    taus = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    below = (ds.y[:, None] <= ds.truth.quantile(ds.x, taus)).double().mean(dim=0)
    tolerance = 5 * torch.sqrt(taus * (1 - taus) / n)  # binomial standard error of a share
    assert bool(((below - taus).abs() < tolerance).all()), (below, taus)


def test_heteroscedastic_quantile_lines_fan_out():
    n = 40_000
    ds = make64("heteroscedastic", n=n, seed=5)
    # closed form: sd(x) = 0.5 + 0.5 * (x + 2); width of the 10-90 band = 2 * sd * Phi^-1(0.9)
    z90 = 1.2815515655446004
    width = ds.truth.quantile(at(-2.0, 2.0), 0.9) - ds.truth.quantile(at(-2.0, 2.0), 0.1)
    torch.testing.assert_close(width, torch.tensor([2 * 0.5 * z90, 2 * 2.5 * z90], dtype=torch.float64))
    # coverage holds on each half separately, so the fan has the right shape, not just the right average
    for half in (ds.x[:, 0] < 0, ds.x[:, 0] >= 0):
        for tau in (0.1, 0.5, 0.9):
            share = (ds.y[half] <= ds.truth.quantile(ds.x[half], tau)).double().mean().item()
            assert abs(share - tau) < 5 * math.sqrt(tau * (1 - tau) / int(half.sum()))


def test_skewed_mean_and_median_gap_matches_the_closed_form():
    n, sigma, skew = 200_000, 0.5, 1.0
    ds = make64("skewed", n=n, seed=2)
    residual = ds.y - ds.truth.signal(ds.x)
    # noise = sigma*skew*(E - 1), E ~ Exp(1): mean 0, median sigma*skew*(log 2 - 1), sd sigma*skew,
    # density at the median 1/(2*sigma*skew) -> median standard error sqrt(1/4n) * 2*sigma*skew
    se_mean = se_median = sigma * skew / math.sqrt(n)
    gap = (ds.truth.mean(at(0.0)) - ds.truth.median(at(0.0))).item()
    assert gap == pytest.approx(sigma * skew * (1 - math.log(2)), rel=1e-12)
    assert abs(residual.mean().item()) < 5 * se_mean
    assert abs(residual.median().item() - sigma * skew * (math.log(2) - 1)) < 5 * se_median
    assert abs((residual.mean() - residual.median()).item() - gap) < 5 * (se_mean + se_median)


@pytest.mark.parametrize(
    ("kind", "params", "shift"),
    [
        ("clean", {}, 0.0),
        ("skewed", {}, 0.0),
        ("heteroscedastic", {}, 0.0),
        ("outliers", {}, 0.0),  # +-10 equally likely: centred
        ("outliers", {"outlier_sign": "positive"}, 0.1 * 10.0),  # E[D] = fraction * outlier_scale
        ("nonlinear", {"noise_kind": "skewed"}, 0.0),
    ],
)
def test_truth_mean_matches_sample_mean(kind, params, shift):
    n = 100_000
    ds = make64(kind, n=n, seed=4, **params)
    torch.testing.assert_close(ds.truth.mean(ds.x) - ds.truth.signal(ds.x), torch.full((n,), shift).double())
    residual = ds.y - ds.truth.mean(ds.x)
    assert abs(residual.mean().item()) < 5 * residual.std().item() / math.sqrt(n)


def test_student_t_with_small_df_has_far_heavier_tails():
    n, sigma = 200_000, 0.5
    heavy = make64("heavy_tailed", n=n, df=1.5)
    clean = make64("clean", n=n)
    tail_heavy, tail_clean = (
        torch.quantile((ds.y - ds.truth.signal(ds.x)).abs(), 0.999).item() for ds in (heavy, clean)
    )
    # analytic 99.9th percentiles of |noise|: sigma * t_1.5^-1(0.9995) = 41.4, sigma * Phi^-1(0.9995) = 1.65
    assert tail_heavy / tail_clean > 10
    for df in (1.0, 1.5, 3.0):  # the share beyond the analytic 99.9% point of |noise| is 0.001
        ds = make64("heavy_tailed", n=n, df=df, seed=1)
        beyond = ((ds.y - ds.truth.signal(ds.x)).abs() > sigma * scipy.special.stdtrit(df, 0.9995)).double()
        assert abs(beyond.mean().item() - 0.001) < 5 * math.sqrt(0.001 * 0.999 / n)
    with pytest.raises(NotImplementedError, match="df"):  # Cauchy: no mean to converge to
        make64("heavy_tailed", df=1.0).truth.mean(at(0.0))


@pytest.mark.parametrize(("kind", "params"), PROCESSES)
def test_target_scale_multiplies_y_and_truth(kind, params):
    base, scaled = make64(kind, **params), make64(kind, target_scale=1000.0, **params)
    assert torch.equal(base.x, scaled.x)
    torch.testing.assert_close(scaled.y, 1000 * base.y, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(scaled.y_val, 1000 * base.y_val, rtol=1e-12, atol=1e-9)
    grid = torch.linspace(-2, 2, 9, dtype=torch.float64)[:, None]
    for fn in ("signal", "median"):
        torch.testing.assert_close(getattr(scaled.truth, fn)(grid), 1000 * getattr(base.truth, fn)(grid))
    torch.testing.assert_close(scaled.truth.quantile(grid, 0.8), 1000 * base.truth.quantile(grid, 0.8))
    if base.truth.slope is not None:
        assert (scaled.truth.slope, scaled.truth.intercept) == (2000.0, 1000.0)


def test_truth_worked_values():
    # Reference numbers: standard normal 97.5% point 1.959963984540054 and 90% point 1.2815515655446004;
    # Cauchy upper quartile tan(pi/4) = 1; t_2 quantile (2tau-1)/sqrt(2tau(1-tau));
    # Exp(1) quantile -log(1-tau).
    x0 = at(0.0)
    assert make64("clean").truth.quantile(x0, 0.975).item() == pytest.approx(1 + 0.5 * 1.959963984540054)
    assert make64("heavy_tailed", df=1.0).truth.quantile(x0, 0.75).item() == pytest.approx(1 + 0.5 * 1.0)
    t2 = (2 * 0.9 - 1) / math.sqrt(2 * 0.9 * 0.1)
    assert make64("heavy_tailed").truth.quantile(x0, 0.9).item() == pytest.approx(1 + 0.5 * t2)
    skewed = make64("skewed").truth
    assert skewed.median(x0).item() == pytest.approx(1 + 0.5 * (math.log(2) - 1))
    assert skewed.quantile(x0, 0.9).item() == pytest.approx(1 + 0.5 * (math.log(10) - 1))
    assert skewed.mean(x0).item() == pytest.approx(1.0)
    hetero = make64("heteroscedastic").truth.quantile(at(2.0), 0.9).item()
    assert hetero == pytest.approx(5 + (0.5 + 0.5 * 4) * 1.2815515655446004)
    # noise 0: y - f is 0 w.p. 0.8 and 10 w.p. 0.2; the quantile is the smallest t with F(t) >= tau
    discrete = make64("outliers", noise=0.0, outlier_fraction=0.2, outlier_sign="positive").truth
    taus = torch.tensor([0.5, 0.8, 0.9], dtype=torch.float64)  # float64: float32's 0.8 is above 0.8
    assert discrete.quantile(at(0.0), taus)[0].tolist() == pytest.approx([1, 1, 11])
    nonlinear = make64("nonlinear").truth
    assert nonlinear.slope is None and nonlinear.intercept is None
    assert nonlinear.signal(at(0.7)).item() == pytest.approx(1 + 2 * math.sin(1.4))


@pytest.mark.parametrize(
    ("sign", "tau"), [("positive", 0.5), ("positive", 0.95), ("both", 0.5), ("both", 0.97)]
)
def test_outlier_mixture_quantile_matches_a_root_finder(sign, tau):
    # Reference: scipy's brentq on the mixture CDF (1-p) Phi(t/s) + p * mean over shifts of Phi((t-d)/s).
    p, a, s = 0.1, 10.0, 0.5
    shifts = [a] if sign == "positive" else [a, -a]

    def cdf(t):
        return (1 - p) * scipy.stats.norm.cdf(t / s) + p * np.mean(
            [scipy.stats.norm.cdf((t - d) / s) for d in shifts]
        )

    expected = scipy.optimize.brentq(lambda t: cdf(t) - tau, -30, 30, xtol=1e-14)
    truth = make64("outliers", outlier_sign=sign).truth
    assert truth.quantile(at(0.0), tau).item() == pytest.approx(1 + expected, abs=1e-10)


def test_truth_shape_dtype_and_input_checks():
    truth = data.make("heteroscedastic").truth
    x = torch.linspace(-2, 2, 5)[:, None]  # float32 [5, 1]
    assert truth.signal(x).shape == (5,) and truth.signal(x).dtype == torch.float32
    assert truth.mean(x.expand(3, 5, 1)).shape == (3, 5)  # [runs, n, 1] -> [runs, n]
    assert truth.quantile(x, 0.3).shape == (5,)
    both = truth.quantile(x, torch.tensor([0.1, 0.9]))  # one column per tau, like a 2-output model
    assert both.shape == (5, 2)
    torch.testing.assert_close(both[:, 1], truth.quantile(x, 0.9))
    with pytest.raises(ValueError, match=r"\[\.\.\., 1\]"):
        truth.signal(torch.zeros(5))
    with pytest.raises(TypeError):
        truth.signal(torch.zeros(5, 1, dtype=torch.int64))
    for tau in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="tau"):
            truth.quantile(x, tau)


def test_truth_rebuilds_from_params():
    ds = data.make("outliers", outlier_sign="positive", x_range=[0, 1])
    rebuilt = data.Truth("outliers", ds.params)  # n, n_val and seed are dropped: the truth ignores them
    assert rebuilt == ds.truth and "n" not in rebuilt.params
    assert data.Truth("clean", {}).params["slope"] == 2.0
    with pytest.raises(ValueError, match="df"):
        data.Truth("clean", {"df": 3.0})


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_bits_other_seed_other_data(kind):
    a, b, c = data.make(kind, seed=7), data.make(kind, seed=7), data.make(kind, seed=8)
    for name in ("x", "y", "x_val", "y_val", "outlier"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert not torch.equal(a.y, c.y) and not torch.equal(a.y_val, c.y_val)


@pytest.mark.parametrize("device", [CUDA])
@pytest.mark.parametrize("kind", KINDS)
def test_device_gives_identical_bits(kind, device):
    cpu, gpu = data.make(kind, seed=3), data.make(kind, seed=3, device=device)
    for name in ("x", "y", "x_val", "y_val", "outlier"):
        assert getattr(gpu, name).device.type == "cuda"
        assert torch.equal(getattr(gpu, name).cpu(), getattr(cpu, name))
    x = cpu.x.double()
    for taus in (0.5, torch.tensor([0.1, 0.9])):
        q = gpu.truth.quantile(x.to(device), taus)
        assert q.device.type == "cuda"
        torch.testing.assert_close(q.cpu(), cpu.truth.quantile(x, taus), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("kind", "params"),
    [
        ("outliers", {"leverage": True, "x_range": [0, 3]}),
        ("nonlinear", {"noise_kind": "student_t", "df": 1.5}),
    ],
)
@pytest.mark.parametrize("name", ["ds.npz", "ds.data"])  # written at exactly that name, suffix or not
def test_save_load_round_trip(tmp_path, kind, params, name):
    ds = data.make(kind, n=30, seed=9, **params)
    path = tmp_path / name
    ds.save(path)
    assert path.exists()
    back = data.load(path)
    assert (back.kind, back.seed, back.params) == (ds.kind, ds.seed, ds.params)
    for field in ("x", "y", "x_val", "y_val", "outlier"):
        assert torch.equal(getattr(back, field), getattr(ds, field))
        assert getattr(back, field).dtype == getattr(ds, field).dtype
    assert back.truth == ds.truth
    grid = torch.linspace(-3, 3, 13, dtype=torch.float64)[:, None]
    torch.testing.assert_close(back.truth.quantile(grid, [0.2, 0.7]), ds.truth.quantile(grid, [0.2, 0.7]))
    # the rebuilt parameters draw the same data again
    assert torch.equal(data.make(back.kind, seed=back.seed, **back.params).y, ds.y)


def test_million_points():
    ds = data.make("outliers", n=1e6)  # a float count is accepted when it is a whole number
    assert ds.x.shape == (1_000_000, 1) and ds.y.shape == (1_000_000,)
    assert int(ds.outlier.sum()) == 100_000
    assert data.make("heavy_tailed", n=1_000_000).y.shape == (1_000_000,)


def test_dataset_to_casts_floats_and_keeps_the_mask_bool():
    ds = data.make("outliers")
    wide = ds.to(dtype=torch.float64)
    assert wide.y.dtype == torch.float64 and wide.outlier.dtype == torch.bool
    assert torch.equal(wide.y, ds.y.double()) and torch.equal(wide.outlier, ds.outlier)
    assert wide.truth == ds.truth and ds.y.dtype == torch.float32  # the original is untouched


@pytest.mark.parametrize(
    ("kind", "params", "mentions"),
    [
        ("outliers", {"outlier_fraction": 1.0}, ["outlier_fraction", "1.0", "[0, 1)"]),
        ("outliers", {"outlier_fraction": -0.1}, ["outlier_fraction", "-0.1"]),
        ("outliers", {"outlier_scale": 0.0}, ["outlier_scale"]),
        ("outliers", {"outlier_sign": "negative"}, ["outlier_sign", "'both'", "'positive'"]),
        ("outliers", {"leverage": "yes"}, ["leverage"]),
        ("heavy_tailed", {"df": 0.0}, ["df", "> 0"]),
        ("heavy_tailed", {"df": float("nan")}, ["df", "nan"]),
        ("clean", {"n": 1}, ["n=1", ">= 2"]),
        ("clean", {"n": 10.5}, ["n=10.5"]),
        ("clean", {"n_val": 0}, ["n_val"]),
        ("clean", {"seed": -1}, ["seed"]),
        ("clean", {"noise": -0.1}, ["noise", ">= 0"]),
        ("clean", {"noise": float("inf")}, ["noise", "inf"]),
        ("clean", {"slope": True}, ["slope"]),
        ("clean", {"target_scale": 0.0}, ["target_scale", "> 0"]),
        ("clean", {"x_range": [2, -2]}, ["x_range", "lo < hi"]),
        ("clean", {"x_range": [0, 1, 2]}, ["x_range"]),
        ("skewed", {"skew": 0.0}, ["skew"]),
        ("heteroscedastic", {"noise_slope": -1.0}, ["noise_slope"]),
        ("nonlinear", {"noise_kind": "laplace"}, ["noise_kind", "student_t"]),
        ("nonlinear", {"df": 3.0}, ["df", "noise_kind='gaussian'"]),  # ignored by gaussian noise: a mistake
        ("clean", {"slop": 1.0}, ["slop", "did you mean 'slope'", "x_range"]),  # lists the kind's parameters
        ("clean", {"df": 3.0}, ["df", "clean"]),
        ("cleen", {}, ["cleen", "heavy_tailed", "nonlinear"]),  # lists the available kinds
    ],
)
def test_bad_parameters_raise_value_error_naming_them(kind, params, mentions):
    with pytest.raises(ValueError) as error:
        data.make(kind, **params)
    for text in mentions:
        assert text in str(error.value)


def test_check_validates_without_drawing():
    # the config layer's entry point: same resolution and errors as make, no tensors
    resolved = data.check("outliers", n=50, x_range=[0, 1], outlier_sign="positive")
    assert resolved == {
        **data.defaults("outliers"),
        "n": 50,
        "x_range": (0.0, 1.0),
        "outlier_sign": "positive",
    }
    with pytest.raises(ValueError, match="outlier_fraction"):
        data.check("outliers", outlier_fraction=1.5)


def test_non_float_dtype_is_a_type_error():
    with pytest.raises(TypeError, match="dtype"):
        data.make("clean", dtype=torch.int64)


@pytest.mark.parametrize(
    ("kind", "params", "dtype", "mentions"),
    [
        # float32 holds at most 3.4e38: y = 1e300 * (2x + 1 + noise) overflows at every point
        ("clean", {"target_scale": 1e300}, torch.float32, ["targets are not finite in float32", "target_scale"]),
        ("clean", {"noise": 1e300}, torch.float32, ["targets are not finite", "noise"]),
        # t with df = 0.01 has tail P(|t| > x) ~ x^-0.01: beyond 3.4e38 for ~40% of the 50 points (21 at seed 0)
        ("heavy_tailed", {"df": 0.01}, torch.float32, ["targets are not finite in float32", "raise df"]),
        ("clean", {"x_range": [-1e300, 1e300]}, torch.float32, ["x are not finite", "x_range"]),
    ],
)
def test_a_draw_that_overflows_the_dtype_names_its_cause(kind, params, dtype, mentions):
    with pytest.raises(ValueError) as error:
        data.make(kind, n=50, dtype=dtype, **params)
    for text in mentions:
        assert text in str(error.value)


def test_an_overflowing_draw_is_a_data_range_error_that_suggests_float64_only_where_it_fits():
    # 1e38 * (2x + 1 + 0.5 z) is ~1e38 to 5e38: past float32's 3.4e38 for some points, far inside float64's.
    with pytest.raises(data.DataRangeError, match=r"or set dtype=float64$") as error:
        data.make("clean", n=50, target_scale=1e38)
    assert isinstance(error.value, ValueError)  # callers that catch ValueError still do
    assert torch.isfinite(data.make("clean", n=50, target_scale=1e38, dtype=torch.float64).y).all()
    # 1e300 * 1e10 z is ~1e310: past float64 too, so float64 is not offered.
    with pytest.raises(data.DataRangeError) as error:
        data.make("clean", n=50, target_scale=1e300, noise=1e10)
    assert "float64" not in str(error.value)
    with pytest.raises(data.DataRangeError, match="not finite in float64"):
        data.make("clean", n=50, target_scale=1e300, noise=1e10, dtype=torch.float64)


def test_large_but_representable_targets_are_fine():
    ds = data.make("clean", n=50, target_scale=1e30)  # |y| ~ 1e31 < float32's 3.4e38
    assert bool(torch.isfinite(ds.y).all()) and ds.y.abs().max() > 1e29


def test_save_is_atomic(tmp_path, monkeypatch):
    # A save that fails midway (disk full, killed) leaves the previous file whole and no temporary behind.
    path = tmp_path / "data.npz"
    old = data.make("clean", n=20, seed=1)
    old.save(path)
    real_savez = np.savez

    def half_then_fail(file, **arrays):
        real_savez(file, **arrays)
        file.seek(0)
        file.truncate(100)
        raise OSError("no space left on device")

    monkeypatch.setattr(np, "savez", half_then_fail)
    with pytest.raises(OSError, match="no space"):
        data.make("clean", n=20, seed=2).save(path)
    assert torch.equal(data.load(path).y, old.y)
    assert [p.name for p in tmp_path.iterdir()] == ["data.npz"]


def test_a_bfloat16_dataset_saves_and_loads_exactly(tmp_path):
    # numpy has no bfloat16: the file holds the values as float32 (exact) and names the dtype.
    ds = data.make("outliers", n=20, seed=3, dtype=torch.bfloat16)
    ds.save(tmp_path / "d.npz")
    back = data.load(tmp_path / "d.npz")
    assert back.y.dtype == torch.bfloat16 and torch.equal(back.y, ds.y) and torch.equal(back.x_val, ds.x_val)
    assert torch.equal(back.outlier, ds.outlier)


def test_a_file_that_is_not_a_saved_dataset_is_one_valueerror_naming_it(tmp_path):
    ds = data.make("outliers", n=10, seed=1)
    ds.save(tmp_path / "ok.npz")
    good = dict(np.load(tmp_path / "ok.npz"))
    (tmp_path / "text.npz").write_text("hello")
    np.save(tmp_path / "one.npy", np.zeros(3))
    np.savez(tmp_path / "foreign.npz", a=np.zeros(2))
    np.savez(tmp_path / "short.npz", **{**good, "x_train": good["x_train"][:3]})
    np.savez(tmp_path / "flat.npz", **{**good, "x_train": good["x_train"][:, 0]})
    np.savez(tmp_path / "seed.npz", **{**good, "seed": np.array(1.5)})
    np.savez(tmp_path / "mask.npz", **{**good, "outlier": good["outlier"].astype(float)})
    ints = {k: good[k].astype(np.int64) for k in ("x_train", "y_train", "x_val", "y_val")}
    np.savez(tmp_path / "ints.npz", **{**good, **ints})
    np.savez(tmp_path / "kind.npz", **{**good, "kind": np.array("clen")})
    cases = {"text.npz": "not an .npz archive", "one.npy": "one array, not an .npz archive",
             "foreign.npz": "no x_train, y_train", "short.npz": "x_train is torch.float32 (3, 1)",
             "flat.npz": "x_train is torch.float32 (10,)", "seed.npz": "its seed 1.5 is not an integer",
             "mask.npz": "outlier is torch.float64 (10,)", "missing.npz": "no such dataset file",
             "ints.npz": "y_train is torch.int64; a dataset holds floats", "kind.npz": "unknown dataset kind 'clen'"}
    for name, message in cases.items():
        with pytest.raises(ValueError) as err:
            data.load(tmp_path / name)
        assert str(err.value).startswith(str(tmp_path / name)) and message in str(err.value), name
        assert "\n" not in str(err.value)


def test_n_past_a_tensors_size_is_a_valueerror():
    with pytest.raises(ValueError, match="n=1000000000000000000000000000000 is not allowed"):
        data.make("clean", n=10**30)
