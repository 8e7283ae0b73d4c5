"""The usual PyTorch loop, one run at a time: what `lab` is measured against.

`run` is a run as most people write it: `nn.Linear`, the lab's loss module, `torch.optim.SGD`,
autograd, `loss.item()` every step for the convergence and oscillation windows, every tag computed
with `.item()` and written with `torch.utils.tensorboard.SummaryWriter` at the lab's log steps. It is
the benchmark's baseline (lab.bench) and the reference every tag of the population trainer is tested
against (tests/test_trainer.py). `minimal` is the least a loop can do (no logging): the single-run
benchmark's yardstick.
"""

from __future__ import annotations

import time
from collections import deque
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter

from lab import config, losses, metrics, models, reference, trainer


def run(cfg, ds, logdir: Path) -> dict:
    """One run written the usual way, logging every tag at the lab's steps with SummaryWriter; returns its
    final parameters, tags and steps to converge, and its wall time (reference solve included)."""
    t0 = time.perf_counter()
    device = trainer.resolve_device(cfg.device)
    x, y = ds.x.to(device), ds.y.to(device)  # [n, 1], [n]
    x_val, signal_val = ds.x_val.to(device), ds.truth.signal(ds.x_val).reshape(-1).to(device)
    outlier = ds.outlier.to(device)
    ref = reference.solve(cfg.loss.name, config.loss_params(cfg), "linear", ds.x, ds.y)
    dtype = x.dtype
    true = torch.tensor([ds.truth.slope, ds.truth.intercept], dtype=dtype, device=device)
    ref_theta = torch.tensor([ref.params["slope"], ref.params["intercept"]], dtype=dtype, device=device)
    init = models.make("linear").init(trainer.init_seed(cfg.seed), dtype=dtype)
    model = torch.nn.Linear(1, 1, device=device, dtype=dtype)
    with torch.no_grad():
        model.weight.copy_(init["weight"])
        model.bias.copy_(init["bias"])
    opt = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr)
    loss_fn = losses.build(cfg.loss.name, **config.loss_params(cfg))
    writer = SummaryWriter(str(logdir))
    scalars = {}
    steps, log_every, hist_every, window = cfg.train.steps, cfg.train.log_every, cfg.train.hist_every, cfg.train.window
    tol = cfg.train.converge_tol * abs(ref.loss) + 1e-12
    recent_loss, recent_params, recent_flips = deque(maxlen=window), deque(maxlen=window), deque(maxlen=window)
    prev_update, last_above = None, -1
    for step in range(steps + 1):
        pred = model(x)[:, 0]
        pred.retain_grad()  # dL/dpred_i: the per-sample gradient magnitudes
        loss = loss_fn(pred, y)
        opt.zero_grad()
        loss.backward()
        value = loss.item()  # the usual per-step sync, for the convergence and loss windows
        if not value - ref.loss <= tol:
            last_above = step
        theta = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])
        recent_loss.append(value)
        recent_params.append(theta.clone())
        if step % log_every == 0 or step == steps:
            with torch.no_grad():
                resid = (pred - y).detach()
                grad = torch.cat([model.weight.grad.reshape(-1), model.bias.grad])
                per_sample = pred.grad.abs()
                val_err = model(x_val)[:, 0] - signal_val
                window_params = torch.stack(list(recent_params))
                scalars = {
                    "loss/train": value, "loss/val_mse": (val_err**2).mean().item(),
                    "loss/val_mae": val_err.abs().mean().item(), "lr": opt.param_groups[0]["lr"],
                    "convergence/gap": value - ref.loss,
                    "convergence/param_error": (theta - true).norm().item(),
                    "convergence/ref_param_error": (theta - ref_theta).norm().item(),
                    "oscillation/flip_rate": sum(recent_flips) / max(len(recent_flips), 1),
                    "oscillation/loss_amplitude": (max(recent_loss) - min(recent_loss))
                    / max(abs(sum(recent_loss) / len(recent_loss)), 1e-12),
                    "oscillation/param_amplitude": (window_params.amax(0) - window_params.amin(0)).max().item(),
                    "grad/norm": grad.norm().item(), "grad/max_abs": grad.abs().max().item(),
                    "grad/outlier_share": (per_sample[outlier].sum() / per_sample.sum().clamp_min(1e-30)).item(),
                    "grad/top1_share": metrics.top_share(per_sample[None])[0].item(),
                    "residual/p99_abs": torch.quantile(resid.abs(), 0.99).item(),
                    "residual/kurtosis": metrics.excess_kurtosis(resid[None])[0].item(),
                    "quantile/coverage": (y <= pred).to(dtype).mean().item(),
                    "param/slope": theta[0].item(), "param/intercept": theta[1].item(),
                }
                for tag, v in scalars.items():
                    writer.add_scalar(tag, v, step)
                if hist_every and step % hist_every == 0:
                    writer.add_histogram("residual/values", resid, step)
                    writer.add_histogram("grad/per_sample_abs", per_sample, step)
        if step == steps:
            break
        before = theta.clone()
        opt.step()
        update = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()]) - before
        recent_flips.append(0.0 if prev_update is None else ((update * prev_update) < 0).float().mean().item())
        prev_update = update
    writer.close()
    final = {"slope": model.weight.item(), "intercept": model.bias.item()}
    converged = metrics.steps_to_converge(last_above, scalars["convergence/gap"], tol)
    return {"params": final, "wall_s": time.perf_counter() - t0, "steps_to_converge": converged, "final": scalars}


def minimal(cfg, ds) -> tuple[float, dict]:
    """The hand-written minimal loop (nn.Linear, loss, backward, SGD step; no logging) in float32; returns its
    seconds and its final parameters."""
    t0 = time.perf_counter()
    device = trainer.resolve_device(cfg.device)
    x, y = ds.x.to(device), ds.y.to(device)
    init = models.make("linear").init(trainer.init_seed(cfg.seed), dtype=torch.float32)
    model = torch.nn.Linear(1, 1, device=device)
    with torch.no_grad():
        model.weight.copy_(init["weight"])
        model.bias.copy_(init["bias"])
    opt = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr)
    loss_fn = losses.build(cfg.loss.name, **config.loss_params(cfg))
    for _ in range(cfg.train.steps):
        opt.zero_grad()
        loss_fn(model(x)[:, 0], y).backward()
        opt.step()
    model.weight.item()  # wait for the device
    seconds = time.perf_counter() - t0
    return seconds, {"slope": model.weight.item(), "intercept": model.bias.item()}
