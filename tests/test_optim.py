"""The population optimizers reproduce torch.optim trajectories; schedules match their closed forms."""

import math

import pytest
import torch

from lab.optim import Hyper, Optimizer, clip_by_norm, lr_at, lr_table


def hyper(runs=1, momentum=0.0, nesterov=False, betas=(0.9, 0.999), eps=1e-8, wd=0.0, clip=0.0):
    def col(v, dt=torch.float64):
        return torch.full((runs, 1), v, dtype=dt)

    return Hyper(col(momentum), col(nesterov, torch.bool), col(betas[0]), col(betas[1]), col(eps), col(wd), col(clip))


def quadratic_grad(p):
    """Gradient of a fixed non-isotropic function f(p) = sum(a * p^2) + sum(sin(p)), so steps differ per coordinate."""
    a = torch.arange(1, p.shape[-1] + 1, dtype=p.dtype)
    return 2 * a * p + torch.cos(p)


@pytest.mark.parametrize(
    "name,kwargs,torch_cls,torch_kwargs",
    [
        ("sgd", {}, torch.optim.SGD, {}),
        ("sgd", {"momentum": 0.9}, torch.optim.SGD, {"momentum": 0.9}),
        ("sgd", {"momentum": 0.8, "nesterov": True, "wd": 0.01}, torch.optim.SGD, {"momentum": 0.8, "nesterov": True, "weight_decay": 0.01}),
        ("adam", {}, torch.optim.Adam, {}),
        ("adam", {"wd": 0.05, "betas": (0.8, 0.99)}, torch.optim.Adam, {"weight_decay": 0.05, "betas": (0.8, 0.99)}),
        ("adamw", {"wd": 0.1}, torch.optim.AdamW, {"weight_decay": 0.1}),
    ],
)
def test_population_of_one_reproduces_torch_optim(name, kwargs, torch_cls, torch_kwargs):
    # Expected values: torch.optim's own trajectory on the same gradients, float64.
    lr = 0.01
    start = torch.tensor([[0.7, -1.3, 2.0]], dtype=torch.float64)
    ref = start[0].clone().requires_grad_(True)
    topt = torch_cls([ref], lr=lr, **torch_kwargs)
    p = start.clone()
    opt = Optimizer(name, p, hyper(**kwargs))
    for _ in range(50):
        topt.zero_grad()
        ref.grad = quadratic_grad(ref.detach())
        topt.step()
        p = opt.step(p, quadratic_grad(p), torch.full((1, 1), lr, dtype=torch.float64))
    assert torch.allclose(p[0], ref.detach(), rtol=0, atol=1e-12), (p[0], ref)
    assert not torch.equal(p, start)  # it moved


def test_population_rows_are_independent_runs():
    # Each row of a population, with its own lr and momentum, equals that run optimised alone.
    lrs, moms = [0.01, 0.05, 0.002], [0.0, 0.9, 0.5]
    start = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    h = Hyper(torch.tensor(moms, dtype=torch.float64)[:, None], torch.zeros(3, 1, dtype=torch.bool),
              *(torch.zeros(3, 1, dtype=torch.float64) for _ in range(5)))
    p, opt = start.clone(), Optimizer("sgd", start, h)
    alone = [start[i : i + 1].clone() for i in range(3)]
    opts = [Optimizer("sgd", alone[i], hyper(momentum=moms[i])) for i in range(3)]
    lr = torch.tensor(lrs, dtype=torch.float64)[:, None]
    for _ in range(30):
        p = opt.step(p, quadratic_grad(p), lr)
        for i in range(3):
            alone[i] = opts[i].step(alone[i], quadratic_grad(alone[i]), lr[i : i + 1])
    for i in range(3):
        assert torch.equal(p[i], alone[i][0])


def test_clip_matches_torch_clip_grad_norm():
    # Expected: torch.nn.utils.clip_grad_norm_ on the same gradient, per run; max_norm 0 means off.
    g = torch.tensor([[3.0, 4.0], [0.3, 0.4], [30.0, 40.0]], dtype=torch.float64)
    max_norm = torch.tensor([[1.0], [1.0], [0.0]], dtype=torch.float64)
    clipped, norm = clip_by_norm(g, max_norm)
    assert torch.allclose(norm, torch.tensor([5.0, 0.5, 50.0], dtype=torch.float64))
    for i in range(2):
        t = g[i].clone().requires_grad_(True)
        t.grad = g[i].clone()
        torch.nn.utils.clip_grad_norm_([t], 1.0)
        assert torch.allclose(clipped[i], t.grad, atol=1e-15)
    assert torch.equal(clipped[2], g[2])


def test_schedules_closed_forms():
    # Expected values from the formulas in lab.optim.lr_at's docstring, evaluated by hand.
    assert lr_at(5, 100, 0.1, "constant") == 0.1
    assert lr_at(34, 100, 1.0, "step", gamma=0.5) == 0.5  # step_size 0 -> 33 steps: 34 // 33 = 1
    assert lr_at(10, 100, 1.0, "step", gamma=0.1, step_size=5) == pytest.approx(0.01)
    assert lr_at(99, 100, 1.0, "exponential", gamma=0.01) == pytest.approx(0.01)
    assert lr_at(0, 100, 1.0, "exponential", gamma=0.01) == 1.0
    assert lr_at(99, 100, 2.0, "cosine", min_lr_ratio=0.1) == pytest.approx(0.2)
    assert lr_at(0, 100, 2.0, "cosine") == pytest.approx(2.0)
    assert lr_at(99 // 2, 100, 2.0, "cosine") == pytest.approx(1 + math.cos(math.pi * 49 / 99), rel=1e-12)
    assert lr_at(0, 100, 1.0, "constant", warmup_steps=4) == 0.25
    assert lr_at(3, 100, 1.0, "constant", warmup_steps=4) == 1.0
    with pytest.raises(ValueError, match="schedule"):
        lr_at(0, 10, 1.0, "linear")


def test_schedule_matches_torch_lr_scheduler():
    # torch.optim.lr_scheduler.StepLR / ExponentialLR give the same per-step rates.
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5)
    for s in range(30):
        assert opt.param_groups[0]["lr"] == pytest.approx(lr_at(s, 30, 0.3, "step", gamma=0.5, step_size=7))
        opt.step()
        sched.step()
    table = lr_table(10, [{"lr": 1.0, "schedule": "constant"}, {"lr": 1.0, "schedule": "exponential", "gamma": 0.5}])
    assert table.shape == (10, 2)
    assert table[9, 1].item() == pytest.approx(0.5)
