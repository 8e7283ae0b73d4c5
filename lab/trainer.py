"""Train a population of runs in lockstep and measure how training behaves.

A population is N >= 1 runs that share a model shape, data size and step count; everything else
(loss, loss parameters, dataset kind, seed, learning rate, optimizer hyperparameters, schedule) may
differ per run. Parameters are stacked as one tensor [N, P]; data as [N, n, 1]. A single run is a
population of one, so there is exactly one code path.

Gradients are explicit: every loss supplies its closed-form derivative psi = dl/dy_hat (tested
against autograd in tests/test_losses.py) and every model its vector-Jacobian product, so one step
is a handful of fused tensor ops instead of an autograd graph. Runs with different losses are laid
out contiguously by loss, each group computes its own psi on a slice, and the slices are joined
before the single shared backward (vjp) and update.

Nothing in the loop forces a host-device sync: metrics are computed on the device into a buffer that
is copied out every `flush_every` log steps and handed to the `on_log` / `on_hist` callbacks.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from lab import losses, metrics, models, reference
from lab.config import Config, loss_params, n_outputs
from lab.data import Dataset
from lab.optim import Hyper, Optimizer, clip_by_norm, lr_table

STATUSES = ("completed", "diverged", "interrupted", "failed")


@dataclass
class RunResult:
    """What one run of a population produced (plain Python values, original units)."""

    status: str
    steps: int
    params: dict[str, float]
    reference: dict | None
    final: dict[str, float]
    steps_to_converge: int | None
    diverged_step: int | None = None
    last_finite: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0
    population_size: int = 1
    model_params: dict = field(default_factory=dict)  # this run's parameter tensors (CPU, training units)
    target_shift: tuple[float, float] = (0.0, 1.0)  # (mu, sd): original y = sd * y_train + mu

    def predict(self, cfg: Config, x: torch.Tensor) -> torch.Tensor:
        """Predictions in original units at x [n, 1] -> [n, k] (for figures and users)."""
        model = models.make(cfg.model.kind, in_features=1, n_outputs=n_outputs(cfg), hidden=cfg.model.hidden,
                            activation=cfg.model.activation)
        params = {k: v[None] for k, v in self.model_params.items()}
        dt = next(iter(self.model_params.values())).dtype
        out = model.forward(params, x.to(dt)[None])[0]
        return out * self.target_shift[1] + self.target_shift[0]


@dataclass
class LogBlock:
    """Scalars of S log steps for the whole population: values[s, t, run] for tags[t] at steps[s]."""

    steps: np.ndarray  # [S]
    tags: tuple[str, ...]
    values: np.ndarray  # [S, T, N]
    wall_time: float


def population_key(cfg: Config) -> tuple:
    """Runs with equal keys can be trained together in one population."""
    return (cfg.model.kind, tuple(cfg.model.hidden) if cfg.model.kind == "mlp" else (), cfg.model.activation
            if cfg.model.kind == "mlp" else "", n_outputs(cfg), cfg.data.n, cfg.data.n_val, cfg.train.steps,
            cfg.train.batch_size, cfg.train.log_every, cfg.train.hist_every, cfg.train.window, cfg.optim.name,
            cfg.dtype, resolve_device(cfg.device).type)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda requested but no CUDA GPU is available (use device=auto or cpu)")
    return torch.device(name)


def init_seed(seed: int) -> int:
    """Initialisation seed derived from the run seed, so data and init draw from different streams."""
    return (seed * 1_000_003 + 0x5EED) % (2**63)


def _stack_loss_params(cfgs: list[Config], name: str, dtype, device) -> dict:
    """Per-run loss parameters of one loss group as tensors [G, 1, 1] (or [G, 1, k] for tau lists)."""
    per_run = [loss_params(c) for c in cfgs]
    out = {}
    for key in per_run[0]:
        vals = [p[key] for p in per_run]
        if all(v == vals[0] for v in vals):
            v = vals[0]
            out[key] = torch.tensor(v, dtype=dtype, device=device) if isinstance(v, (list, tuple)) else v
        else:
            t = torch.tensor(vals, dtype=dtype, device=device)
            out[key] = t.view(len(cfgs), 1, -1)
    return out


class _Flat:
    """Views of a flat parameter tensor [N, P] as the model's named parameters."""

    def __init__(self, shapes: dict[str, tuple]):
        self.shapes = shapes
        self.sizes = [math.prod(s) for s in shapes.values()]

    def named(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = flat.split(self.sizes, dim=1)
        return {k: p.view(flat.shape[0], *s) for (k, s), p in zip(self.shapes.items(), parts)}

    def flat(self, named: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([named[k].reshape(named[k].shape[0], -1) for k in self.shapes], dim=1)


def train(cfgs: list[Config], datasets: list[Dataset], on_log: Callable[[LogBlock], None] | None = None,
          on_hist: Callable[[int, str, np.ndarray, np.ndarray, np.ndarray], None] | None = None,
          flush_every: int = 50, should_stop: Callable[[], bool] | None = None) -> list[RunResult]:
    """Train one population (all configs must share `population_key`); returns one result per run.

    on_log(block) receives scalars every `flush_every` log steps and at the end; on_hist(step, tag,
    counts [N, bins], lo [N], hi [N]) receives histograms. should_stop() is polled at flushes; when it
    says stop (or on KeyboardInterrupt) unfinished runs end with status 'interrupted' after a flush.
    Results and callback arrays are in the caller's run order.
    """
    t_start = time.perf_counter()
    keys = {population_key(c) for c in cfgs}
    if len(keys) != 1:
        raise ValueError(f"configs do not share one population: {sorted(map(str, keys))}")
    cfg0 = cfgs[0]
    # Lay runs out contiguously by loss, so each loss group is a slice (no scatter/gather per step).
    order = sorted(range(len(cfgs)), key=lambda i: cfgs[i].loss.name)
    inverse = np.argsort(order)
    cfgs = [cfgs[i] for i in order]
    datasets = [datasets[i] for i in order]
    N = len(cfgs)
    device, dtype = resolve_device(cfg0.device), getattr(torch, cfg0.dtype)
    steps, log_every, window = cfg0.train.steps, cfg0.train.log_every, cfg0.train.window
    hist_every = cfg0.train.hist_every

    # ---- data [N, n, 1], targets normalised per run if asked ------------------------------------------
    x = torch.stack([d.x for d in datasets]).to(device, dtype)  # [N, n, 1]
    y_orig = torch.stack([d.y for d in datasets]).to(device, dtype)  # [N, n]
    x_val = torch.stack([d.x_val for d in datasets]).to(device, dtype)  # [N, n_val, 1]
    signal_val = torch.stack([d.truth.signal(d.x_val).reshape(-1) for d in datasets]).to(device, dtype)
    outlier = torch.stack([d.outlier for d in datasets]).to(device)  # [N, n] bool
    norm = torch.tensor([c.train.normalize_targets for c in cfgs], device=device)
    mu = torch.where(norm, y_orig.mean(1), torch.zeros((), dtype=dtype, device=device))[:, None]  # [N, 1]
    sd = torch.where(norm, y_orig.std(1).clamp_min(1e-12), torch.ones((), dtype=dtype, device=device))[:, None]
    y = (y_orig - mu) / sd  # [N, n] training targets
    n, k = y.shape[1], n_outputs(cfg0)

    # ---- model and parameters [N, P] ----------------------------------------------------------------
    model = models.make(cfg0.model.kind, in_features=1, n_outputs=k, hidden=cfg0.model.hidden,
                        activation=cfg0.model.activation)
    shapes = _Flat(model.param_shapes())
    init = model.init_stack([init_seed(c.seed) for c in cfgs], dtype=dtype, device=device)
    P = shapes.flat(init)  # [N, P]
    n_params = P.shape[1]

    # ---- loss groups: contiguous slices with per-run parameters ------------------------------------
    groups = []  # (slice, spec, params)
    start = 0
    for name in dict.fromkeys(c.loss.name for c in cfgs):
        members = [c for c in cfgs if c.loss.name == name]
        sl = slice(start, start + len(members))
        start += len(members)
        groups.append((sl, losses.spec(name), _stack_loss_params(members, name, dtype, device)))
    root = torch.tensor([losses.spec(c.loss.name).root for c in cfgs], device=device)  # [N] rmse runs

    # ---- exact reference optimum of each run's own objective (float64, once) -----------------------
    refs = _references(cfgs, datasets, model.kind, mu, sd)
    nan = float("nan")
    ref_loss = torch.tensor([r.loss if r else nan for r in refs], dtype=dtype, device=device)  # training units
    tol = torch.tensor([c.train.converge_tol for c in cfgs], dtype=dtype, device=device) * ref_loss.abs() + 1e-12
    named_keys = _named_param_keys(model.kind, k)
    ref_params = torch.tensor([[_orig(r.params, c, mu[i], sd[i])[p] if r else nan for p in named_keys]
                               for i, (r, c) in enumerate(zip(refs, cfgs))], dtype=dtype, device=device)
    true_params = torch.tensor([[_true(d, p) for p in named_keys] for d in datasets], dtype=dtype, device=device)

    # ---- optimizer, per-run hyperparameters [N, 1] --------------------------------------------------
    def col(values, dt=dtype):
        return torch.tensor(values, dtype=dt, device=device)[:, None]

    hyper = Hyper(momentum=col([c.optim.momentum for c in cfgs]), nesterov=col([c.optim.nesterov for c in cfgs], torch.bool),
                  beta1=col([c.optim.betas[0] for c in cfgs]), beta2=col([c.optim.betas[1] for c in cfgs]),
                  eps=col([c.optim.eps for c in cfgs]), weight_decay=col([c.optim.weight_decay for c in cfgs]),
                  clip_grad_norm=col([c.optim.clip_grad_norm for c in cfgs]))
    opt = Optimizer(cfg0.optim.name, P, hyper)
    schedules = [dict(lr=c.optim.lr, schedule=c.optim.schedule, gamma=c.optim.gamma, step_size=c.optim.step_size,
                      min_lr_ratio=c.optim.min_lr_ratio, warmup_steps=c.optim.warmup_steps) for c in cfgs]
    distinct = list(dict.fromkeys(tuple(sorted(s.items())) for s in schedules))
    lr_tab = lr_table(steps + 1, [dict(s) for s in distinct]).to(device, dtype)  # [steps+1, U]
    lr_col = torch.tensor([distinct.index(tuple(sorted(s.items()))) for s in schedules], device=device)

    # ---- minibatches: per-run permutations from each run's own seed --------------------------------
    batch = cfg0.train.batch_size or n
    perm_gens = [torch.Generator().manual_seed(init_seed(c.seed) + 1) for c in cfgs] if batch < n else []
    batches_per_epoch = n // batch
    rows = torch.arange(N, device=device)[:, None]

    # ---- device-side state -------------------------------------------------------------------------
    active = torch.ones(N, dtype=torch.bool, device=device)
    diverged_at = torch.full((N,), -1, dtype=torch.long, device=device)
    last_above = torch.full((N,), -1, dtype=torch.long, device=device)
    flip_ring = torch.zeros(window, N, dtype=dtype, device=device)
    loss_ring = torch.zeros(window, N, dtype=dtype, device=device)
    track_params = n_params <= 64  # amplitude window of every parameter only for small models
    param_ring = torch.zeros(window, N, n_params if track_params else 1, dtype=dtype, device=device)
    prev_update = torch.zeros_like(P)
    last_gap = torch.full((N,), nan, dtype=dtype, device=device)

    pending, pending_steps = [], []
    last_row = {}  # the most recent logged row [T, N] (caller order), for the summary's `final`
    tags = metrics.SCALAR_TAGS + tuple(f"param/{p}" for p in named_keys)
    interrupted = False

    def flush():
        if pending:
            block = torch.stack(pending).cpu().numpy()[:, :, inverse]  # one host copy per flush
            last_row["values"], last_row["step"] = block[-1], pending_steps[-1]
            if on_log:
                on_log(LogBlock(np.array(pending_steps), tags, block, time.time()))
            pending.clear()
            pending_steps.clear()

    def objective(pred, target):
        """Per-run loss [N] and dL/dpred [N, n, k] of each run's own loss, in training units."""
        vals, grads = [], []
        for sl, spec, params in groups:
            vals.append(spec.fn(pred[sl], target[sl], **params))
            grads.append(spec.psi(pred[sl], target[sl], **params))
        val = torch.cat(vals) if len(vals) > 1 else vals[0]  # [N, b, k]
        psi = torch.cat(grads) if len(grads) > 1 else grads[0]
        m = val.mean((1, 2))
        # rmse: L = sqrt(m), dL/dm = 1 / (2 sqrt(m)); at m = 0 the subgradient 0 (no NaN).
        sq = m.clamp_min(torch.finfo(m.dtype).tiny).sqrt()
        loss = torch.where(root, torch.where(m > 0, sq, torch.zeros_like(m)), m)
        chain = torch.where(root, torch.where(m > 0, 0.5 / sq, torch.zeros_like(m)), torch.ones_like(m))
        return loss, psi, chain

    try:
        for step in range(steps + 1):
            # -- the batch of this step
            if batch < n:
                if step % batches_per_epoch == 0:
                    perm = torch.stack([torch.randperm(n, generator=g) for g in perm_gens]).to(device)  # [N, n]
                idx = perm[:, (step % batches_per_epoch) * batch:(step % batches_per_epoch + 1) * batch]
                xb, yb = x[rows, idx], y[rows, idx]
            else:
                xb, yb = x, y
            named = shapes.named(P)
            pred = model.forward(named, xb)  # [N, b, k]
            loss, psi, chain = objective(pred, yb[..., None])
            g_out = psi * (chain / (pred.shape[1] * k))[:, None, None]  # dL/dpred [N, b, k]
            grads = shapes.flat(model.vjp(named, xb, g_out))  # [N, P]
            grads, gnorm = clip_by_norm(grads, hyper.clip_grad_norm)
            gap = loss - ref_loss
            last_above = torch.where(active & ~(gap <= tol), step, last_above)
            last_gap = torch.where(active, gap, last_gap)
            loss_ring[step % window] = loss
            if track_params:
                param_ring[step % window] = P

            if step % log_every == 0 or step == steps:
                pending.append(_log_row(step, P, named, model, x, y, y_orig, x_val, signal_val, outlier, mu, sd, pred,
                                        loss, psi, chain, objective, xb is x, flip_ring, loss_ring, param_ring,
                                        gnorm, grads, gap, ref_params, true_params, named_keys, lr_tab[step, lr_col],
                                        groups, cfgs, k))
                pending_steps.append(step)
                if hist_every and on_hist and step % hist_every == 0:
                    _hists(step, on_hist, model, named, x, y_orig, mu, sd, psi if xb is x else None, chain, objective,
                           y, inverse)
                if len(pending) >= flush_every:
                    flush()
                    if should_stop and should_stop():
                        raise KeyboardInterrupt
            if step == steps:
                break

            # -- update, then stop runs that left the finite numbers (their parameters stay frozen)
            lr = lr_tab[step, lr_col][:, None]  # [N, 1]
            new_P = opt.step(P, grads, lr)
            finite = torch.isfinite(loss) & torch.isfinite(new_P).all(1) & torch.isfinite(grads).all(1)
            newly = active & ~finite
            diverged_at = torch.where(newly, step, diverged_at)
            active = active & finite
            update = new_P - P
            flips = ((update * prev_update) < 0).to(dtype).mean(1)
            flip_ring[step % window] = flips
            prev_update = update
            P = torch.where(active[:, None], new_P, P)
    except KeyboardInterrupt:
        interrupted = True
    flush()

    # ---- results (one host copy) ---------------------------------------------------------------------
    wall = time.perf_counter() - t_start
    P_cpu, active_cpu = P.cpu(), active.cpu()
    div_cpu, above_cpu, gap_cpu = diverged_at.cpu(), last_above.cpu(), last_gap.cpu()
    results = []
    last = last_row["values"][:, inverse.argsort()] if last_row else np.full((len(tags), N), np.nan)  # run order
    for i, c in enumerate(cfgs):
        one = {kk: v[i] for kk, v in shapes.named(P_cpu).items()}
        params = _orig(model.named_floats(one), c, mu[i].item(), sd[i].item())
        diverged = not bool(active_cpu[i])
        status = "diverged" if diverged else ("interrupted" if interrupted else "completed")
        r = refs[i]
        results.append(RunResult(
            status=status, steps=steps if status == "completed" else int(div_cpu[i]) if diverged else -1,
            params=params,
            reference=None if r is None else {"loss": r.loss, "params": _orig(r.params, c, mu[i].item(), sd[i].item()),
                                              "method": r.method, "exact": r.exact, "units": "training"},
            final={tag: float(last[t, i]) for t, tag in enumerate(tags)},
            steps_to_converge=None if r is None or diverged else metrics.steps_to_converge(
                int(above_cpu[i]), float(gap_cpu[i]), float(tol[i])),
            diverged_step=int(div_cpu[i]) if diverged else None,
            last_finite=params if diverged else {},
            wall_s=wall / N, population_size=N, model_params=one, target_shift=(mu[i].item(), sd[i].item())))
    return [results[j] for j in inverse]


def _named_param_keys(kind: str, k: int) -> list[str]:
    if kind == "linear":
        return ["slope", "intercept"] if k == 1 else [f"{p}_{j}" for j in range(k) for p in ("slope", "intercept")]
    if kind == "constant":
        return ["value"] if k == 1 else [f"value_{j}" for j in range(k)]
    return []


def _orig(named: dict[str, float], cfg: Config, mu, sd) -> dict[str, float]:
    """Map named parameters from normalised-target units back to original units."""
    mu, sd = float(mu), float(sd)
    out = {}
    for key, v in named.items():
        if key.startswith(("slope", "weight")):
            out[key] = v * sd
        elif key.startswith(("intercept", "value", "bias")):
            out[key] = v * sd + mu
        else:
            out[key] = v
    return out


def _true(ds: Dataset, key: str) -> float:
    t = ds.truth
    if key.startswith("slope") and t.slope is not None:
        return float(t.slope)
    if key.startswith("intercept") and t.intercept is not None:
        return float(t.intercept)
    return float("nan")


def _references(cfgs, datasets, model_kind, mu, sd) -> list:
    """Exact optimum of each run's training objective, grouped by loss for the batched solver."""
    if model_kind not in ("constant", "linear"):
        return [None] * len(cfgs)
    out = [None] * len(cfgs)
    by_problem: dict = {}
    for i, c in enumerate(cfgs):
        key = (c.loss.name, tuple(sorted((kk, tuple(v) if isinstance(v, list) else v)
                                         for kk, v in loss_params(c).items())))
        by_problem.setdefault(key, []).append(i)
    mu_c, sd_c = mu.double().cpu(), sd.double().cpu()
    for (name, params), idx in by_problem.items():
        xs = torch.stack([datasets[i].x.reshape(-1).double() for i in idx])
        ys = torch.stack([(datasets[i].y.double() - mu_c[i]) / sd_c[i] for i in idx])
        try:
            solved = reference.solve_many(name, {kk: list(v) if isinstance(v, tuple) else v for kk, v in params},
                                          model_kind, xs.numpy(), ys.numpy())
        except NotImplementedError:
            solved = [None] * len(idx)
        for i, r in zip(idx, solved):
            out[i] = r
    return out


def _log_row(step, P, named, model, x, y, y_orig, x_val, signal_val, outlier, mu, sd, pred, loss, psi, chain,
             objective, full_batch, flip_ring, loss_ring, param_ring, gnorm, grads, gap, ref_params, true_params,
             named_keys, lr, groups, cfgs, k) -> torch.Tensor:
    """Every scalar tag for the whole population at one log step: [T, N] on the device."""
    if not full_batch:  # minibatch step: measure on the full training set
        pred = model.forward(named, x)
        loss, psi, chain = objective(pred, y[..., None])
    pred_orig = pred * sd[:, :, None] + mu[:, :, None]  # [N, n, k]
    resid = (pred_orig - y_orig[..., None]).mean(-1)  # [N, n] (averaged over outputs)
    train_loss = _loss_in_original_units(pred_orig, y_orig, groups, loss, cfgs)
    val_pred = model.forward(named, x_val).mean(-1) * sd + mu  # [N, n_val]
    val_err = val_pred - signal_val
    per_sample = (psi * chain[:, None, None]).abs().sum(-1)  # |dl_i/dy_hat| [N, n]
    filled = step + 1
    w = flip_ring.shape[0]
    named_now = _named_now(P, named, model.kind, k, mu, sd)
    rows = [
        train_loss,
        (val_err**2).mean(-1),
        val_err.abs().mean(-1),
        lr,
        gap,
        torch.linalg.vector_norm(named_now - true_params, dim=-1),
        torch.linalg.vector_norm(named_now - ref_params, dim=-1),
        metrics.flip_rate(flip_ring, step) if step else torch.zeros_like(loss),
        metrics.relative_amplitude(loss_ring, min(filled, w)),
        metrics.param_amplitude(param_ring, min(filled, w)),
        gnorm,
        grads.abs().amax(-1),
        metrics.share_of(per_sample, outlier),
        metrics.top_share(per_sample, 0.01),
        metrics.abs_quantile(resid, 0.99),
        metrics.excess_kurtosis(resid),
        metrics.coverage(pred_orig[..., 0], y_orig),
    ]
    rows += [named_now[:, j] for j in range(named_now.shape[1])]
    return torch.stack([r.to(loss.dtype) for r in rows])


def _named_now(P, named, kind, k, mu, sd) -> torch.Tensor:
    """Named parameters of every run in original units, [N, len(named_keys)]."""
    if kind == "linear":
        w, b = named["weight"].reshape(P.shape[0], k), named["bias"].reshape(P.shape[0], k)
        cols = [torch.stack([w[:, j] * sd[:, 0], b[:, j] * sd[:, 0] + mu[:, 0]], -1) for j in range(k)]
        return torch.cat(cols, -1)
    if kind == "constant":
        return next(iter(named.values())).reshape(P.shape[0], k) * sd + mu
    return P.new_zeros(P.shape[0], 0)


def _loss_in_original_units(pred_orig, y_orig, groups, loss_train, cfgs):
    """The configured loss of the original-unit predictions (equals the training loss without normalisation)."""
    vals = [spec.fn(pred_orig[sl], y_orig[sl][..., None], **params) for sl, spec, params in groups]
    m = (torch.cat(vals) if len(vals) > 1 else vals[0]).mean((1, 2))
    root = torch.tensor([losses.spec(c.loss.name).root for c in cfgs], device=m.device)
    return torch.where(root, m.clamp_min(0).sqrt(), m)


def _hists(step, on_hist, model, named, x, y_orig, mu, sd, psi, chain, objective, y, inverse):
    """Histograms of residuals and per-sample gradient magnitudes, computed on the device."""
    pred = model.forward(named, x)
    if psi is None:
        _, psi, chain = objective(pred, y[..., None])
    resid = (pred * sd[:, :, None] + mu[:, :, None] - y_orig[..., None]).mean(-1)
    per_sample = (psi * chain[:, None, None]).abs().sum(-1)
    for tag, values in (("residual/values", resid), ("grad/per_sample_abs", per_sample)):
        counts, lo, hi = metrics.histogram(values)
        on_hist(step, tag, counts.cpu().numpy()[inverse], lo.cpu().numpy()[inverse], hi.cpu().numpy()[inverse])
