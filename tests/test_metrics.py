"""The training-behaviour metrics: worked examples and the plain computations they replace."""

import math

import numpy as np
import pytest
import scipy.stats
import torch

from lab import metrics


def test_flip_rate_worked_example():
    # One parameter 0, 1, 0, 1, 2: updates +1, -1, +1, +1 reverse direction at the 2nd and 3rd update,
    # so over the 4 updates of the window the rate is 2 / 4. A second, steadily rising parameter never
    # reverses: averaged over both parameters, 2 / 8.
    theta = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 2.0], [1.0, 3.0], [2.0, 4.0]])[:, None, :]  # [5, 1, 2]
    assert metrics.flip_rate(theta[..., :1], 4).item() == 0.5
    assert metrics.flip_rate(theta, 4).item() == 0.25
    assert metrics.flip_rate(theta[:2], 1).item() == 0.0  # one update: nothing to reverse


def test_flip_rate_equals_the_per_step_ring_it_replaces():
    # The trainer used to keep flips_t = mean(u_t * u_{t-1} < 0) every step in a ring of `window` rows
    # (u_{-1} = 0) and average the filled rows; the history form must give the same rate at every step.
    gen = torch.Generator().manual_seed(0)
    window, steps, runs, params = 7, 30, 3, 4
    theta = torch.randn(steps + 1, runs, params, generator=gen, dtype=torch.float64).cumsum(0)
    prev = torch.zeros(runs, params, dtype=torch.float64)
    ring = torch.zeros(window, runs, dtype=torch.float64)
    for step in range(1, steps + 1):
        update = theta[step] - theta[step - 1]
        ring[(step - 1) % window] = ((update * prev) < 0).double().mean(1)
        prev = update
        expected = ring.sum(0) / min(step, window)
        history = theta[max(0, step - window - 1):step + 1]
        torch.testing.assert_close(metrics.flip_rate(history, min(step, window)), expected, rtol=1e-15, atol=0)


def test_amplitudes_worked_example():
    loss = torch.tensor([[1.0, 4.0], [3.0, 4.0], [2.0, 4.0]])  # [rows, runs]
    # run 0: (3 - 1) / mean 2 = 1; run 1: constant, amplitude 0
    assert metrics.relative_amplitude(loss).tolist() == [1.0, 0.0]
    theta = torch.tensor([[[0.0, 5.0]], [[0.5, 2.0]], [[0.2, 3.0]]])  # [rows, 1 run, 2 params]
    assert metrics.param_amplitude(theta).tolist() == [3.0]  # the second parameter moves 3


def test_share_of_and_top_share_worked_examples():
    w = torch.tensor([[1.0, 1.0, 2.0, 6.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[False, False, False, True], [True, False, False, False]])
    assert metrics.share_of(w, mask).tolist() == [0.6, 0.0]  # 6 of 10; no gradient at all: 0
    # top 25% of 4 points is 1 point: the 6 of 10
    assert metrics.top_share(w, 0.25).tolist() == [0.6, 0.0]
    # MAE-like equal weights: the top 1% of 1000 points holds 1% of the signal
    assert metrics.top_share(torch.ones(2, 1000), 0.01).tolist() == pytest.approx([0.01, 0.01], rel=1e-6)


def test_top_share_equals_a_full_sort():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(5, 999, generator=gen, dtype=torch.float64).abs() ** 3
    k = math.ceil(0.01 * 999)
    expected = w.sort(-1, descending=True).values[:, :k].sum(-1) / w.sum(-1)
    torch.testing.assert_close(metrics.top_share(w, 0.01), expected, rtol=1e-14, atol=0)


@pytest.mark.parametrize("n", [2, 3, 10, 101, 1000, 1001])
@pytest.mark.parametrize("q", [0.5, 0.9, 0.99, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_abs_quantile_equals_torch_quantile(n, q, dtype):
    # Reference: torch.quantile (a full sort, linear interpolation) on |r|.
    r = torch.randn(4, n, generator=torch.Generator().manual_seed(n), dtype=dtype)
    r[0, : n // 2] = 0.5  # ties
    expected = torch.quantile(r.abs(), q, dim=-1)
    tol = 1e-6 if dtype == torch.float32 else 1e-14
    torch.testing.assert_close(metrics.abs_quantile(r, q), expected, rtol=tol, atol=tol)


def test_abs_quantile_below_the_median_falls_back_to_torch():
    r = torch.randn(3, 50, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(metrics.abs_quantile(r, 0.1), torch.quantile(r.abs(), 0.1, dim=-1))


def test_quantile_rank_of_p99_among_1000():
    # q (n - 1) = 989.01: between ascending positions 989 and 990, 1% of the way
    below, above, weight = metrics.quantile_rank(1000, 0.99)
    assert (below, above) == (989, 990)
    assert weight == pytest.approx(0.01, abs=1e-9)


def test_excess_kurtosis_equals_scipy():
    # Reference: scipy.stats.kurtosis (Fisher, biased moments), the same m4 / m2^2 - 3.
    gen = torch.Generator().manual_seed(3)
    r = torch.randn(4, 500, generator=gen, dtype=torch.float64) ** 3  # heavy tails: kurtosis far from 0
    expected = scipy.stats.kurtosis(r.numpy(), axis=-1, fisher=True, bias=True)
    np.testing.assert_allclose(metrics.excess_kurtosis(r).numpy(), expected, rtol=1e-12)
    c = r - r.mean(-1, keepdim=True)
    from_sums = metrics.kurtosis_from_sums((c**2).sum(-1), (c**4).sum(-1), r.shape[-1])
    np.testing.assert_allclose(from_sums.numpy(), expected, rtol=1e-12)


def test_excess_kurtosis_of_a_gaussian_sample_is_near_zero():
    r = torch.randn(1, 200_000, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    assert abs(metrics.excess_kurtosis(r).item()) < 0.05  # sd of the estimate: sqrt(24 / n) = 0.011


def test_coverage_counts_ties_and_signed_zeros_like_a_comparison():
    pred = torch.tensor([[1.0, 2.0, -0.0, 0.0, 3.0]], dtype=torch.float64)
    target = torch.tensor([[1.0, 2.5, 0.0, -0.0, -1.0]], dtype=torch.float64)  # equal, below, +-0 twice, above
    expected = (target <= pred).double().mean(-1)  # 4 of 5
    assert metrics.coverage(pred, target).tolist() == expected.tolist() == [0.8]
    e = pred - target
    assert metrics.coverage_of_residuals(e).tolist() == [0.8]


def test_coverage_of_residuals_equals_a_comparison_on_random_data():
    gen = torch.Generator().manual_seed(5)
    pred = torch.randn(6, 1000, generator=gen).round(decimals=1)  # many exact ties
    target = torch.randn(6, 1000, generator=gen).round(decimals=1)
    expected = (target <= pred).float().mean(-1)
    assert torch.equal(metrics.coverage_of_residuals(pred - target), expected)


def test_histogram_counts_every_value_in_its_bucket():
    values = torch.tensor([[0.0, 0.1, 0.5, 0.9, 1.0], [2.0, 2.0, 2.0, 2.0, 2.0]])
    counts, lo, hi = metrics.histogram(values, bins=2)
    assert counts.tolist() == [[2.0, 3.0], [5.0, 0.0]]  # 0.5 opens the upper bucket; the max is kept in the last
    assert lo.tolist() == [0.0, 2.0] and hi.tolist() == [1.0, 2.0]


def test_steps_to_converge():
    assert metrics.steps_to_converge(last_above=41, final_gap=1e-6, tol=1e-3) == 42
    assert metrics.steps_to_converge(last_above=-1, final_gap=0.0, tol=1e-3) == 0  # below from the start
    assert metrics.steps_to_converge(last_above=99, final_gap=0.5, tol=1e-3) is None
    assert metrics.steps_to_converge(last_above=99, final_gap=float("nan"), tol=1e-3) is None
