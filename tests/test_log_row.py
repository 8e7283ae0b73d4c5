"""Tests for lab.log_row's shortcuts: candidate order statistics and moment-based kurtosis.

Expected values come from the direct computations they replace: `topk` over all points of the residuals
x w + b - y, and lab.metrics.excess_kurtosis of those residuals (itself checked against scipy in
test_metrics.py).
"""

import numpy as np
import pytest
import torch

from lab import log_row, metrics, row_shortcuts


def line_data(runs=30, n=500, seed=0, dtype=torch.float32):
    """x [R, n, 1] in [-2, 3], y = 2x + 1 + noise with a few large outliers per run."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(runs, n, 1, generator=g, dtype=torch.float64) * 5 - 2
    y = 2 * x[..., 0] + 1 + torch.randn(runs, n, generator=g, dtype=torch.float64)
    y[:, :5] += 40 * torch.rand(runs, 5, generator=g, dtype=torch.float64)
    return x.to(dtype), y.to(dtype)


def residuals(x, y, w, b, sd=None):
    """The row's residuals in original units, averaged over outputs: sd (mean_k(w_k x + b_k) - y)."""
    e = (x * w[:, None, :] + b[:, None, :] - y[..., None]).mean(-1)
    return e if sd is None else e * sd[:, None]


@pytest.mark.parametrize("k,scaled", [(1, False), (3, True)])
def test_candidates_give_exactly_the_largest_residuals_along_a_trajectory(k, scaled):
    """Along a descent-like path (small moves), with one run jumping far at one step: the m largest
    |residuals| always equal a full topk's, and only the jumping run is refreshed then."""
    x, y = line_data()
    R, m = y.shape[0], 11
    g = torch.Generator().manual_seed(1)
    w = 2 + torch.randn(R, k, generator=g) * 0.3
    b = 1 + torch.randn(R, k, generator=g) * 0.3
    sd = (torch.rand(R, generator=g) + 0.5) if scaled else None
    cache = row_shortcuts.LargestResiduals(x, y[..., None], "linear", k)
    refreshed_at_jump = None
    for step in range(60):
        P = torch.cat([w, b], 1)  # the trainer's flat order: the k slopes, then the k intercepts
        resid = residuals(x, y, w, b, sd)
        before = cache.refreshes
        # the row asks chunk by chunk: two halves of the population
        halves = [slice(0, R // 2), slice(R // 2, R)]
        top, where = (torch.cat(t) for t in zip(*(cache.largest(resid[h], P, sd, m, h) for h in halves)))
        expected = resid.abs().topk(m, dim=1).values
        assert torch.equal(top, expected), step
        assert torch.equal(resid.abs().gather(1, where), top), step
        if step == 40:
            refreshed_at_jump = cache.refreshes - before
        # move towards the line (slope 2, intercept 1) by 5% a step; run 7 jumps at step 40
        w = w + 0.05 * (2 - w)
        b = b + 0.05 * (1 - b)
        if step == 39:
            w[7] += 3.0
    assert cache.hits > 30  # most rows were proved from the candidates alone
    assert cache.refreshes < 3 * R  # and few runs ever needed a full topk after the first
    assert refreshed_at_jump == 1  # only the run that jumped paid a full topk


def test_candidates_for_a_constant_model():
    x, y = line_data(runs=5, n=300)
    cache = row_shortcuts.LargestResiduals(x, y[..., None], "constant", 1)
    value = torch.zeros(5, 1)
    for _ in range(20):
        resid = (value - y)  # k = 1: the residual of a constant prediction
        top, _ = cache.largest(resid, value, None, 4, slice(0, 5))
        assert torch.equal(top, resid.abs().topk(4, dim=1).values)
        value = value + 0.02
    assert cache.hits > 10


@pytest.mark.parametrize("kind", ["linear", "constant"])
def test_kurtosis_from_moments_equals_the_direct_computation(kind):
    """float64 data: the polynomial in the slope equals excess_kurtosis of the residuals to 1e-10."""
    x, y = line_data(runs=8, n=400, dtype=torch.float64)
    moments = row_shortcuts.ResidualMoments(x, y, max_elements=3 * 400)  # chunks of 3 runs: smaller than the population
    slope = torch.linspace(-1, 4, 8, dtype=torch.float64) if kind == "linear" else torch.zeros(8, dtype=torch.float64)
    resid = slope[:, None] * x[..., 0] + 0.7 - y
    torch.testing.assert_close(moments.kurtosis(slope, 400), metrics.excess_kurtosis(resid), rtol=1e-10, atol=1e-10)


def test_kurtosis_from_moments_in_float32_matches_float64_residuals():
    """A float32 population: the moments are float64 of the float32 data, the result is float32 and
    matches the float64 residuals' kurtosis to float32 precision."""
    x, y = line_data(runs=4, n=1000)
    slope = torch.tensor([1.9, 2.0, 2.1, 0.0])
    got = row_shortcuts.ResidualMoments(x, y).kurtosis(slope, 1000)
    resid = slope.double()[:, None] * x[..., 0].double() - y.double()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), metrics.excess_kurtosis(resid), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("model", [{"model.kind": "linear"}, {"model.kind": "mlp", "model.hidden": [8]},
                                   {"model.kind": "constant", "loss.name": "rmse"}])
def test_rows_derived_together_equal_rows_derived_one_by_one(model):
    """tag_rows derives the small tags of a flush's rows at once (rows past the first window together,
    earlier ones singly); flushing after every row must give the same numbers (float64, 1e-13)."""
    from lab import config, data, trainer

    flats = [{"loss.name": loss, "seed": s, "data.kind": "outliers", "data.n": 60, "train.steps": 40,
              "train.log_every": 1, "train.window": 5, "dtype": "float64", **model}
             for s, loss in enumerate(["mse", "huber", "quantile"])]
    cfgs = [config.from_flat({**f, "loss.name": model.get("loss.name", f["loss.name"])}) for f in flats]
    datasets = [data.make(c.data.kind, seed=c.seed, **config.data_params(c.data)) for c in cfgs]
    together, alone = [], []
    trainer.train(cfgs, datasets, on_log=together.append, flush_every=50)
    trainer.train(cfgs, datasets, on_log=alone.append, flush_every=1)
    a = np.concatenate([b.values for b in together])
    b = np.concatenate([b.values for b in alone])
    assert a.shape == b.shape == (41, len(together[0].tags), 3)
    assert np.allclose(a, b, rtol=1e-13, atol=1e-15, equal_nan=True)
    flip = together[0].tags.index("oscillation/flip_rate")
    assert np.isfinite(a[:, flip]).all()


@pytest.mark.parametrize("flat", [
    {"train.normalize_targets": True, "data.target_scale": 50.0},
    {"loss.name": "quantile", "loss.tau": [0.1, 0.5, 0.9]},
    {"optim.lr": 0.3, "data.kind": "heavy_tailed"},  # large steps: the proof fails often, runs refresh
])
def test_candidates_and_moments_change_no_logged_number(flat, monkeypatch):
    """The trainer's shortcuts (candidate order statistics, kurtosis from moments) against the direct
    computations they replace (topk over all points, centred sums): every logged value equal (float64)."""
    from lab import config, data, trainer

    base = {"data.kind": "outliers", "data.n": 300, "train.steps": 60, "train.log_every": 1, "dtype": "float64",
            "train.hist_every": 0}
    cfgs = [config.from_flat({**base, "loss.name": loss, "seed": s, **flat})
            for s, loss in enumerate(["mse", "huber", "mae", "log_cosh"])]
    cfgs = [c if "loss.tau" not in flat else config.from_flat({**base, **flat, "seed": i}) for i, c in enumerate(cfgs)]
    datasets = [data.make(c.data.kind, seed=c.seed, **config.data_params(c.data)) for c in cfgs]
    fast, direct = [], []
    trainer.train(cfgs, datasets, on_log=fast.append)
    monkeypatch.setattr(row_shortcuts, "LargestResiduals", lambda *a, **k: None)
    monkeypatch.setattr(row_shortcuts, "ResidualMoments", lambda *a, **k: None)
    trainer.train(cfgs, datasets, on_log=direct.append)
    a = np.concatenate([b.values for b in fast])
    b = np.concatenate([b.values for b in direct])
    assert a.shape == b.shape and a.shape[0] == 61
    tags = fast[0].tags
    for t, tag in enumerate(tags):
        rtol = 1e-9 if tag == "residual/kurtosis" else 0  # moments vs centred sums: float64 rounding
        assert np.allclose(a[:, t], b[:, t], rtol=rtol, atol=0, equal_nan=True), tag


@pytest.mark.parametrize("noise,slopes", [(1e-5, [2.0, 2.0 + 3e-4, 0.0, -3.0]), (1e-2, [2.0, 2.5, 40.0, -1e3])])
def test_kurtosis_from_moments_for_near_exact_fits_and_far_slopes(noise, slopes):
    """A fit whose residuals are 1e-5 of the targets' spread, and slopes far from it: the expansion around
    the least-squares slope matches the direct float64 kurtosis (an expansion in w itself lost every digit:
    -460 for a true 0.0007)."""
    g = torch.Generator().manual_seed(3)
    x = torch.rand(4, 200, 1, generator=g, dtype=torch.float64) * 4 - 2
    y = 2 * x[..., 0] + 1 + noise * torch.randn(4, 200, generator=g, dtype=torch.float64)
    slope = torch.tensor(slopes, dtype=torch.float64)
    got = row_shortcuts.ResidualMoments(x, y).kurtosis(slope, 200)
    expected = metrics.excess_kurtosis(slope[:, None] * x[..., 0] - y)
    torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-9)


def test_many_points_need_more_candidates(monkeypatch):
    """n = 6500: a row needs the 66 largest |residuals| (p99 and the top 1%), more than the default 64
    candidates; the candidates grow with it and the logged values equal the full topk's."""
    from lab import config, data, trainer

    assert row_shortcuts.order_count(6500) == 66 and row_shortcuts.candidate_count(6500) == 264
    assert row_shortcuts.candidate_count(100) == 0  # too few points: a full topk
    cfgs = [config.from_flat({"data.kind": "outliers", "data.n": 6500, "train.steps": 6, "train.log_every": 1,
                              "train.hist_every": 0, "dtype": "float64", "seed": s}) for s in range(2)]
    datasets = [data.make(c.data.kind, seed=c.seed, **config.data_params(c.data)) for c in cfgs]
    fast, direct = [], []
    trainer.train(cfgs, datasets, on_log=fast.append)
    monkeypatch.setattr(row_shortcuts, "candidate_count", lambda n: 0)
    trainer.train(cfgs, datasets, on_log=direct.append)
    assert np.array_equal(fast[0].values, direct[0].values, equal_nan=True)


@pytest.mark.parametrize("tau", [0.1, 0.5, 0.9, "per_run"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_quantile_top_share_from_counts_equals_a_topk(tau, dtype):
    # Reference: the sum of the `count` largest |psi| by topk, psi from lab.fused (the step's own values).
    # Residuals with many exact zeros, and runs with few points on one side, so that the top `count` take
    # values from two or three of the classes.
    from lab import fused, losses

    g = torch.Generator().manual_seed(3)
    runs, n, count = 12, 400, 40
    e = torch.randn(runs, n, 1, generator=g, dtype=torch.float64).to(dtype)
    e[:4, :200] = 0.0
    e[4:8] = e[4:8].abs()
    e[4:8, :5] *= -1  # 5 points below
    e[8:, :30] = -e[8:, :30].abs()
    e[8:, 30:] = e[8:, 30:].abs()
    e[8:, 30:60] = 0.0
    if tau == "per_run":
        tau = torch.linspace(0.05, 0.95, runs, dtype=dtype)[:, None, None]
    psi, _ = fused.residual_terms(losses.spec("quantile"))(e, tau=tau)
    expected = psi[..., 0].abs().topk(count, dim=1).values.sum(-1)
    below = (e[..., 0] < 0).sum(-1).to(dtype)
    classes = log_row.quantile_classes(tau, e, runs)
    got = log_row._quantile_top(e[..., 0] * 3.0, below, classes, count)  # any positive scale of e
    rtol = 1e-6 if dtype == torch.float32 else 1e-14
    torch.testing.assert_close(got, expected, rtol=rtol, atol=0)
