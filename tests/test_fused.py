"""Tests for lab.fused: the trainer's one-pass psi and loss sum equal lab.losses' own psi and fn.

Expected values: `spec.psi(e, 0)` (itself checked against autograd and PyTorch in test_losses.py) and
the float64 sum of `spec.fn(e, 0)` evaluated on the float64 copy of the same residuals.
"""

import math

import pytest
import torch

import lab.losses as L
from lab import fused

F32, F64 = torch.float32, torch.float64
CASES = [
    ("mse", {}), ("rmse", {}), ("mae", {}), ("huber", {"delta": 0.7}), ("quantile", {"tau": 0.2}),
    ("quantile", {"tau": 0.5}), ("expectile", {"tau": 0.8}), ("log_cosh", {}),
    ("cauchy", {"scale": 1.5}), ("smooth_l1", {"beta": 0.5}),  # no fused form: the fallback
]


def residuals(dtype, runs=3, n=400, seed=0):
    """[runs, n, 1] residuals: Gaussian at three scales, exact zeros, the kinks (+-0.7 Huber, +-1 where
    log-cosh switches forms, the float32 denormal range of exp(-2|e|)) and outlier-sized values."""
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(runs, n, generator=g, dtype=F64) * torch.tensor([0.01, 1.0, 30.0], dtype=F64)[:runs, None]
    special = torch.tensor([0.0, -0.0, 0.7, -0.7, 1.0, -1.0, 1 - 1e-7, 1 + 1e-7, 19.9, 20.0, 44.0, -60.0,
                            1e4, -1e6, 1e-20, -3e-8], dtype=F64)
    e[:, :special.numel()] = special
    return e.to(dtype)[..., None]


def ids(case):
    return case[0] + "".join(f"-{k}={v}" for k, v in case[1].items())


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
@pytest.mark.parametrize("case", CASES, ids=ids)
def test_psi_and_sum_match_the_loss(case, dtype):
    name, params = case
    spec = L.spec(name)
    e = residuals(dtype)
    psi, total = fused.residual_terms(spec)(e, **params)
    zero = torch.zeros((), dtype=dtype)
    if name == "log_cosh":  # tanh from exp or from sinh(e/2): a few ulps from torch.tanh
        torch.testing.assert_close(psi, spec.psi(e, zero, **params), rtol=4 * torch.finfo(dtype).eps, atol=0)
    else:
        torch.testing.assert_close(psi, spec.psi(e, zero, **params), rtol=0, atol=0)
    exact = spec.fn(e.double(), zero.double(), **params).sum((1, 2))
    # a float32 sum of n terms: rounding of each term (a few ulps) plus the summation's, relative to the
    # sum of |terms|; float64 to its own precision
    rtol = 2e-6 if dtype == F32 else 1e-13
    torch.testing.assert_close(total.double(), exact, rtol=rtol, atol=0)
    assert total.dtype == dtype and psi.shape == e.shape


@pytest.mark.parametrize("case", CASES + [("quantile", {"tau": torch.tensor([0.1, 0.9], dtype=F64)}),
                                  ("huber", {"delta": torch.tensor([0.5, 1.0, 2.0], dtype=F64).view(3, 1, 1)})],
                         ids=lambda c: c[0] + ("-tensor" if any(isinstance(v, torch.Tensor) for v in c[1].values()) else ""))
def test_psi_written_into_a_given_buffer_is_the_same_psi(case):
    # A row step hands each block a slice of its row buffer (lab.population): psi goes there in place,
    # bit for bit the psi returned without one, and the loss sum does not change.
    name, params = case
    e = residuals(F64)
    if name == "quantile" and isinstance(params.get("tau"), torch.Tensor):
        e = e.expand(-1, -1, 2).contiguous()  # two quantile levels: two outputs
    terms = fused.residual_terms(L.spec(name))
    psi, total = terms(e, **params)
    buffer = torch.full((5, *e.shape[1:]), float("nan"), dtype=F64)
    out = buffer[1:4]  # a view inside a larger buffer, as a block's slice of the row buffer
    psi_out, total_out = terms(e, out=out, **params)
    assert psi_out.data_ptr() == out.data_ptr()
    assert torch.equal(out, psi) and torch.equal(total_out, total)
    assert buffer[0].isnan().all() and buffer[4].isnan().all()  # nothing written outside the slice


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
def test_log_cosh_keeps_relative_accuracy_for_tiny_residuals(dtype):
    """Near 0, log cosh e = e^2/2 - e^4/12 + e^6/45 - 17 e^8/2520 + O(e^10) (its Taylor series): the sum of
    tiny values must not be rounding noise of log 2."""
    e = torch.tensor([1e-4, -3e-3, 2e-2, 1e-19], dtype=dtype).reshape(1, 4, 1)
    _, total = fused.residual_terms(L.spec("log_cosh"))(e)
    exact = sum(v * v / 2 - v**4 / 12 + v**6 / 45 - 17 * v**8 / 2520 for v in e.double().flatten().tolist())
    assert total.item() == pytest.approx(exact, rel=4 * torch.finfo(dtype).eps)


def test_log_cosh_psi_is_tanh_and_value_is_exact_at_float64():
    """tanh from one exp: equal to torch.tanh within 2 ulps; the value to float64 log(cosh(e))."""
    e = torch.linspace(-12, 12, 2401, dtype=F64).reshape(1, -1, 1)
    psi, total = fused.residual_terms(L.spec("log_cosh"))(e)
    torch.testing.assert_close(psi, torch.tanh(e), rtol=4e-16, atol=4e-16)
    assert total.item() == pytest.approx(torch.log(torch.cosh(e)).sum().item(), rel=1e-14)


@pytest.mark.parametrize("name,key,values", [("huber", "delta", [0.3, 1.0, 5.0]), ("quantile", "tau", [0.1, 0.5, 0.9]),
                                             ("expectile", "tau", [0.2, 0.5, 0.7])])
def test_per_run_parameters(name, key, values):
    """Parameters as [G, 1, 1] tensors (one value per run, as the trainer stacks them) == run by run."""
    spec = L.spec(name)
    e = residuals(F64)
    psi, total = fused.residual_terms(spec)(e, **{key: torch.tensor(values, dtype=F64).view(3, 1, 1)})
    for r, v in enumerate(values):
        psi_r, total_r = fused.residual_terms(spec)(e[r:r + 1], **{key: v})
        torch.testing.assert_close(psi[r:r + 1], psi_r, rtol=0, atol=0)
        torch.testing.assert_close(total[r:r + 1], total_r, rtol=1e-15, atol=0)


def test_quantile_levels_as_outputs():
    """tau a [k] tensor against e [B, n, k]: per output the single-tau loss, summed over outputs."""
    taus = [0.1, 0.5, 0.9]
    e = residuals(F64)[..., 0:1].expand(-1, -1, 3).contiguous() + torch.tensor([0.0, 0.5, -0.5], dtype=F64)
    psi, total = fused.residual_terms(L.spec("quantile"))(e, tau=torch.tensor(taus, dtype=F64))
    expected = sum(L.quantile(torch.zeros(()), -e[..., j], tau=t).sum((1,)) for j, t in enumerate(taus))
    torch.testing.assert_close(total, expected, rtol=1e-14, atol=0)
    for j, t in enumerate(taus):
        torch.testing.assert_close(psi[..., j], L.quantile_psi(e[..., j], torch.zeros(()), tau=t), rtol=0, atol=0)


def test_mae_and_quantile_values_are_psi_times_e():
    """The identities the fused forms rest on, exactly: |e| = sign(e) e; pinball = (sign(e)/2 + 1/2 - tau) e."""
    e = residuals(F64)
    assert torch.equal(e.sign() * e, L.mae(e, torch.zeros(())))
    tau = 0.3
    lhs = (0.5 * e.sign() + 0.5 - tau) * e
    torch.testing.assert_close(lhs, L.quantile(e, torch.zeros(()), tau=tau), rtol=1e-15, atol=1e-300)
    assert math.isclose(fused._LOG2, math.log(2))


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
def test_log_cosh_psi_keeps_relative_accuracy_near_zero(dtype):
    """psi = tanh(e) to a few ulps relative, also where 1 - exp(-2|e|) would cancel (|e| << 1); expected:
    float64 tanh of the same values (float64 itself checked against float64 tanh)."""
    e = torch.tensor([1e-30, 1e-8, -1e-7, 3e-6, 1e-3, -0.2, 0.5, 0.999, 1.0, -1.5, 9.0], dtype=dtype).view(1, -1, 1)
    psi, _ = fused.residual_terms(L.spec("log_cosh"))(e)
    exact = torch.tanh(e.double())
    rel = ((psi.double() - exact).abs() / exact.abs()).max().item()
    assert rel <= 4 * torch.finfo(dtype).eps
