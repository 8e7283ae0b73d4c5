"""Train a population of runs in lockstep and measure how training behaves.

A population is N >= 1 runs that share a model shape, data size and step count; everything else
(loss, loss parameters, dataset kind, seed, learning rate, optimizer hyperparameters, schedule) may
differ per run. Parameters are stacked as one tensor [N, P]; data as [N, n, 1]. A single run is a
population of one, so there is exactly one code path.

Gradients are explicit: every loss supplies its closed-form derivative psi = dl/dy_hat (tested
against autograd in tests/test_losses.py) and every model its vector-Jacobian product, so one step
is a handful of fused tensor ops instead of an autograd graph. Runs with different losses are laid
out contiguously by loss; each group computes its loss, psi and its share of the gradient on its own
slice, and only the [N, P] gradients are joined before the one shared update.

What a step costs (a 200-run study on a 2-core CPU, see lab/bench.py): ~0.7 ms, was ~1.4 ms before
each loss computed psi and its value in one pass over the residuals (lab.fused: the value as a dot
product with psi where it is one, log-cosh from one exp and one log). The [runs, n] ops of the loss
blocks dominate, so everything else is kept off the per-step path: runs are processed in cache-sized
blocks (`_BLOCK_ELEMENTS`); the
linear model's forward and vjp are elementwise (x * w + b, sum(psi * x)) instead of batched matmuls
with 1x1 matrices (1.6 ms -> 0.04 ms for 200 runs); the parameters are updated in place (the views
stay valid); the oscillation metrics read a ring of parameters and losses written once per step (one
copy each), derived for all rows of a flush at once (lab.history) instead of being computed every step;
and the scalar tags are computed only at log steps (lab.log_row: raw_row at the step, tag_rows at each
flush).

Nothing in the loop forces a host-device sync: metrics are computed on the device into a buffer that
is copied out every `flush_every` log steps and handed to the `on_log` / `on_hist` callbacks.
`train.log_every = 0` turns logging off: no metric rows or histograms are computed during training
and the callbacks are never called; one row is still computed at the last step, for the results'
`final` values.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from lab import fused, log_row, losses, metrics, models, reference
from lab.config import Config, loss_params, n_outputs
from lab.data import Dataset
from lab.history import History
from lab.optim import Hyper, Optimizer, clip_by_norm, lr_table

STATUSES = ("completed", "diverged", "interrupted", "failed")
# Parameter histories (flip rate, parameter amplitude) are kept for models this small; bigger models
# keep a per-step flip-rate history instead and log no parameter amplitude (NaN).
_TRACK_PARAMS = 64
# The history ring (lab.history) holds at most this many values (16 MiB of float32), or window + 2 steps
# where that is more; a flush comes early when a pending row's window would be overwritten.
_HISTORY_ELEMENTS = 1 << 22
# Runs are processed in blocks of at most this many [run, point] values (512 KiB of float32): a block's
# tensors stay in cache through the ~30 elementwise ops of a step, where one op over a whole large
# population streams every tensor through main memory. Measured on 10 000 runs x 1000 points, 100
# steps (2-core EPYC, 1 MiB L2): 2^14 values 11.6 s, 2^16 7.6 s, 2^17 7.0 s, 2^19 8.9 s, no blocks 12.8 s.
_BLOCK_ELEMENTS = 1 << 17


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


@dataclass
class _Block:
    """Contiguous runs that share a loss, few enough that one [runs, n] tensor of theirs stays in cache.

    The views (data, parameters) are taken once: the parameters are updated in place, so they stay current.
    """

    runs: slice
    spec: losses.LossSpec
    terms: Callable  # lab.fused.residual_terms(spec): e -> (psi, per-run loss sum)
    params: dict  # loss parameters: floats, or [B, 1, 1] tensors where runs differ
    x: torch.Tensor  # [B, n, 1]
    y3: torch.Tensor  # [B, n, 1] training targets
    named: dict  # this block's parameter views {name: [B, ...]}


@dataclass
class _Population:
    """Everything about a population that does not change during training (device tensors, run order)."""

    model: models.Model
    named: dict  # views into the live parameters [N, P]
    blocks: list[_Block]
    x: torch.Tensor  # [N, n, 1]
    y3: torch.Tensor  # [N, n, 1] training targets
    y_orig: torch.Tensor  # [N, n]
    x_val: torch.Tensor  # [N, n_val, 1]
    signal_val: torch.Tensor  # [N, n_val]
    outlier: torch.Tensor  # [N, n] bool
    outlier_at: torch.Tensor  # [N, m] indices of each run's outliers, padded (m: the most any run has)
    outlier_w: torch.Tensor  # [N, m] 1 at a real outlier index, 0 at padding (training dtype)
    mu: torch.Tensor  # [N, 1]
    sd: torch.Tensor  # [N, 1]
    any_norm: bool
    root: torch.Tensor | None  # [N] bool, None when no run takes a root (rmse)
    ref_loss: torch.Tensor  # [N]
    ref_params: torch.Tensor  # [N, K]
    true_params: torch.Tensor  # [N, K]
    k: int
    shapes: _Flat
    moments: log_row.ResidualMoments | None  # the residual kurtosis without a pass (line models)
    largest: log_row.LargestResiduals | None  # candidates for the row's order statistics (CPU, line models)
    compiled: bool = False
    # A row step's residuals and psi [N, n, k] for all runs, written block by block by the step itself, so
    # that the log row reads chunks of whole blocks as views instead of concatenating them (lab.log_row).
    row_e: torch.Tensor | None = None
    row_psi: torch.Tensor | None = None
    row_cache: dict = field(default_factory=dict)  # what lab.log_row derives once per block

    def forward(self, named: dict, x: torch.Tensor) -> torch.Tensor:
        """Predictions [B, b, k] of the runs whose parameter views are `named`, at x [B, b, 1]."""
        if self.model.kind == "linear":  # in_features = 1: elementwise, not a batch of 1x1 matmuls
            return x * named["weight"].transpose(1, 2) + named["bias"][:, None, :]
        return self.model.forward(named, x)

    def terms(self, x: torch.Tensor | None = None, y3: torch.Tensor | None = None, keep: bool = False):
        """Each run's own loss and its gradient at the current parameters, block by block.

        x, y3: a minibatch [N, b, 1] (None: the full training set). Returns (mean loss m [N] in
        training units, dm/dtheta [N, P] times b * k, and per block its residuals e = pred - target
        and psi [B, b, k]). keep (full batch only): the residuals and psi go to `row_e` and `row_psi`,
        and the returned ones are views of them.
        """
        values, weight_grads, bias_grads, flats, resids, psis = [], [], [], [], [], []
        if keep and self.row_e is None:
            shape = (*self.y3.shape[:2], self.k)
            self.row_e, self.row_psi = self.y3.new_empty(shape), self.y3.new_empty(shape)
        for blk in self.blocks:
            xb = blk.x if x is None else x[blk.runs]
            target = blk.y3 if y3 is None else y3[blk.runs]
            e_out = self.row_e[blk.runs] if keep else None
            if self.model.kind in ("linear", "constant"):
                block_terms = _compiled(blk.spec, self.model.kind) if self.compiled else _block_terms
                value, weight_grad, bias_grad, e, psi = block_terms(blk.terms, self.model.kind, blk.named, xb,
                                                                    target, blk.params, e_out)
                if weight_grad is not None:
                    weight_grads.append(weight_grad)
                bias_grads.append(bias_grad)
            else:
                e = torch.sub(self.forward(blk.named, xb), target, out=e_out)
                psi, value = blk.terms(e, **blk.params)
                value = value / (e.shape[1] * e.shape[2])
                flats.append(self.shapes.flat(self.model.vjp(blk.named, xb, psi)))
            if keep:  # while the block is in cache
                if e.data_ptr() != e_out.data_ptr():  # (a compiled step returns its own tensors)
                    e = e_out.copy_(e)
                psi = self.row_psi[blk.runs].copy_(psi)
            values.append(value)
            resids.append(e)
            psis.append(psi)
        if self.model.kind == "linear":  # the flat order: weight [k x 1], then bias [k]
            flat = torch.cat([_join(weight_grads), _join(bias_grads)], dim=1)
        else:
            flat = _join(bias_grads if self.model.kind == "constant" else flats)
        return _join(values), flat, resids, psis

    def chain(self, m: torch.Tensor):
        """(loss L [N], dL/dm [N] or None): rmse runs report sqrt(m); dL/dm = 1/(2 sqrt m), 0 at m = 0."""
        if self.root is None:
            return m, None
        sq = m.clamp_min(torch.finfo(m.dtype).tiny).sqrt()
        positive = m > 0
        loss = torch.where(self.root, torch.where(positive, sq, 0.0), m)
        return loss, torch.where(self.root, torch.where(positive, 0.5 / sq, 0.0), 1.0)


def _block_terms(terms, kind: str, named: dict, x, target, params, e_out=None):
    """One block of a linear or constant model: (mean loss [B], d/dweight [B, k] or None, d/dbias [B, k],
    residuals e = pred - target and psi [B, b, k]); the gradients are sums over points (not yet divided
    by b * k). terms: the block loss's lab.fused.residual_terms; e_out: where to write e (or None)."""
    if kind == "linear":  # in_features = 1: elementwise, not a batch of 1x1 matmuls
        e = torch.mul(x, named["weight"].transpose(1, 2), out=e_out).add_(named["bias"][:, None, :]).sub_(target)
    else:  # [B, b, k]: the constant's value broadcast over points
        e = torch.sub(named["value"][:, None, :], target, out=e_out)
    psi, value_sum = terms(e, **params)
    # d/dw = sum_i psi_i x_i, d/db = sum_i psi_i (per output); the constant's value is a bias
    weight_grad = torch.linalg.vecdot(psi, x, dim=1) if kind == "linear" else None
    return value_sum / (e.shape[1] * e.shape[2]), weight_grad, psi.sum(1), e, psi


_COMPILED: dict = {}


def _compiled(spec, kind: str):
    """`_block_terms` through torch.compile, one compiled function per (loss, model kind).

    Measured by `scripts/bench --compile` on the 200-run benchmark population (2000 steps, in process):
    on 2 EPYC cores (one thread) eager 2.7 s, compiled 1.9 s plus 28 s compiling; on an H100 eager 2.6 s,
    compiled 1.9 s plus 13 s compiling. Compiling costs more than the whole training of such a study,
    so it is off by default; on a CPU it also needs a C++ compiler at run time.
    """
    key = (spec.name, kind)
    if key not in _COMPILED:
        def terms(terms_, kind_, named, x, target, params, e_out=None):  # e_out: copied by the caller
            return _block_terms(fused.residual_terms(spec), kind, named, x, target, params)

        _COMPILED[key] = torch.compile(terms, dynamic=True)
    return _COMPILED[key]


def _join(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def train(cfgs: list[Config], datasets: list[Dataset], on_log: Callable[[LogBlock], None] | None = None,
          on_hist: Callable[[int, str, np.ndarray, np.ndarray, np.ndarray], None] | None = None,
          flush_every: int = 50, should_stop: Callable[[], bool] | None = None,
          compile: bool = False) -> list[RunResult]:
    """Train one population (all configs must share `population_key`); returns one result per run.

    on_log(block) receives scalars every `flush_every` log steps and at the end; on_hist(step, tag,
    counts [N, bins], lo [N], hi [N]) receives histograms. should_stop() is polled at flushes; when it
    says stop (or on KeyboardInterrupt) unfinished runs end with status 'interrupted' after a flush.
    Results and callback arrays are in the caller's run order. compile: run each block's loss and
    gradient through torch.compile (linear and constant models; see `_compiled`): off by default,
    because compiling costs more than it saves on a study of a few hundred runs (lab/bench.py).

    On a CPU the population trains with one intra-op thread (restored afterwards): its ops are a few
    tens of microseconds each, so a second thread gains ~20% on two idle cores, while one competing
    process on the same cores made the 200-run study up to 25x slower (66 s instead of 2.7 s: the
    threads spin at every op's barrier waiting for a descheduled partner).
    """
    keys = {population_key(c) for c in cfgs}
    if len(keys) != 1:
        raise ValueError(f"configs do not share one population: {sorted(map(str, keys))}")
    threads = torch.get_num_threads()
    one_thread = resolve_device(cfgs[0].device).type == "cpu" and threads > 1
    if one_thread:
        torch.set_num_threads(1)
    try:
        return _train(cfgs, datasets, on_log, on_hist, flush_every, should_stop, compile)
    finally:
        if one_thread:
            torch.set_num_threads(threads)


def _train(cfgs, datasets, on_log, on_hist, flush_every, should_stop, compile) -> list[RunResult]:
    t_start = time.perf_counter()
    cfg0 = cfgs[0]
    # Lay runs out contiguously by loss, so each loss group is a slice (no scatter/gather per step).
    order = sorted(range(len(cfgs)), key=lambda i: cfgs[i].loss.name)
    inverse = np.argsort(order)
    cfgs = [cfgs[i] for i in order]
    datasets = [datasets[i] for i in order]
    N = len(cfgs)
    device, dtype = resolve_device(cfg0.device), getattr(torch, cfg0.dtype)
    steps, log_every, window = cfg0.train.steps, cfg0.train.log_every, cfg0.train.window
    hist_every = cfg0.train.hist_every if log_every else 0

    pop, P, refs, tol, named_keys, shapes = _setup(cfgs, datasets, device, dtype)
    pop.compiled = compile and pop.model.kind in ("linear", "constant")
    n, n_params = pop.y3.shape[1], P.shape[1]

    # ---- optimizer, per-run hyperparameters [N, 1] --------------------------------------------------
    def col(values, dt=dtype):
        return torch.tensor(values, dtype=dt, device=device)[:, None]

    hyper = Hyper(momentum=col([c.optim.momentum for c in cfgs]), nesterov=col([c.optim.nesterov for c in cfgs], torch.bool),
                  beta1=col([c.optim.betas[0] for c in cfgs]), beta2=col([c.optim.betas[1] for c in cfgs]),
                  eps=col([c.optim.eps for c in cfgs]), weight_decay=col([c.optim.weight_decay for c in cfgs]),
                  clip_grad_norm=col([c.optim.clip_grad_norm for c in cfgs]))
    clipping = any(c.optim.clip_grad_norm > 0 for c in cfgs)
    # Plain SGD (no momentum, no decay) is p - lr * g: the same value Optimizer computes, in 2 ops instead of 9.
    plain_sgd = cfg0.optim.name == "sgd" and all(c.optim.momentum == 0 and c.optim.weight_decay == 0 for c in cfgs)
    opt = Optimizer(cfg0.optim.name, P, hyper)
    schedules = [{"lr": c.optim.lr, "schedule": c.optim.schedule, "gamma": c.optim.gamma, "step_size": c.optim.step_size,
                  "min_lr_ratio": c.optim.min_lr_ratio, "warmup_steps": c.optim.warmup_steps} for c in cfgs]
    distinct = list(dict.fromkeys(tuple(sorted(s.items())) for s in schedules))
    lr_tab = lr_table(steps + 1, [dict(s) for s in distinct]).to(device, dtype)  # [steps+1, U]
    lr_col = torch.tensor([distinct.index(tuple(sorted(s.items()))) for s in schedules], device=device)
    constant_lr = all(s["schedule"] == "constant" and s["warmup_steps"] == 0 for s in schedules)
    lr_fixed = lr_tab[0, lr_col][:, None] if constant_lr else None  # [N, 1]

    # ---- minibatches: per-run permutations from each run's own seed --------------------------------
    batch = cfg0.train.batch_size or n
    perm_gens = [torch.Generator().manual_seed(init_seed(c.seed) + 1) for c in cfgs] if batch < n else []
    batches_per_epoch = n // batch
    rows = torch.arange(N, device=device)[:, None]

    # ---- which steps log a row, and which steps a row's histories reach back to ---------------------
    row_steps = set(range(0, steps + 1, log_every)) | {steps} if log_every else {steps}
    next_row = dict(zip(sorted(row_steps), sorted(row_steps)[1:]))  # row step -> the next one
    ring = window + 2  # a flip rate over `window` steps needs window + 2 parameter vectors
    needed = np.zeros(steps + 1, dtype=bool)
    for t in row_steps:
        needed[max(0, t - ring + 1):t + 1] = True

    # ---- device-side state -------------------------------------------------------------------------
    active = torch.ones(N, dtype=torch.bool, device=device)
    alive = torch.zeros(N, dtype=torch.long, device=device)  # steps survived: the diverged step, if any
    last_above = torch.full((N,), -1, dtype=torch.long, device=device)
    gap = torch.full((N,), float("nan"), dtype=dtype, device=device)
    track_params = n_params <= _TRACK_PARAMS
    # the ring covers the windows of a whole flush where that fits (log_every 10: 50 rows span 542 steps)
    span = ring + (flush_every - 1) * min(log_every or 1, ring)
    capacity = max(ring, min(span, steps + 1, _HISTORY_ELEMENTS // (N * (n_params + 1 if track_params else 2))))
    history = History(N, n_params, window, capacity, track_params, dtype, device)
    prev_direction = None if track_params else torch.zeros_like(P)

    pending, pending_steps = [], []
    last_row = {}  # the most recent row [T, N] (caller order), for the summary's `final`
    tags = metrics.SCALAR_TAGS + tuple(f"param/{p}" for p in named_keys)
    interrupted = False

    def flush():
        if pending:
            rows = log_row.tag_rows(pop, pending, history.tags(pending_steps))  # [S, T, N], all rows at once
            block = rows.cpu().numpy()[:, :, inverse]  # one host copy per flush
            last_row["values"], last_row["step"] = block[-1], pending_steps[-1]
            if on_log and log_every:
                on_log(LogBlock(np.array(pending_steps), tags, block, time.time()))
            pending.clear()
            pending_steps.clear()

    try:
        for step in range(steps + 1):
            # -- the batch of this step
            if batch < n:
                if step % batches_per_epoch == 0:
                    perm = torch.stack([torch.randperm(n, generator=g) for g in perm_gens]).to(device)  # [N, n]
                idx = perm[:, (step % batches_per_epoch) * batch:(step % batches_per_epoch + 1) * batch]
                xb, yb3 = pop.x[rows, idx], pop.y3[rows, idx]
            else:
                xb, yb3 = None, None  # the full training set
            m, flat, resids, psis = pop.terms(xb, yb3, keep=xb is None and step in row_steps)
            loss, chain = pop.chain(m)
            scale = 1.0 / (batch * pop.k)  # the mean over points and outputs
            grads = flat * scale if chain is None else flat * (chain * scale)[:, None]  # dL/dtheta [N, P]
            gnorm = None
            if clipping:
                grads, gnorm = clip_by_norm(grads, hyper.clip_grad_norm)
            gap = loss - pop.ref_loss
            if xb is None:  # full batch: the gap of every step; NaN gap (no reference) counts as above
                last_above = torch.where(gap <= tol, last_above, step)
            if needed[step]:
                history.record(step, loss, P)

            if step in row_steps:
                lr_now = lr_fixed[:, 0] if constant_lr else lr_tab[step, lr_col]
                if xb is not None:  # minibatch step: measure on the full training set
                    m_full, _, resids, psis = pop.terms(keep=True)
                    loss, chain = pop.chain(m_full)
                    gap = loss - pop.ref_loss
                    # A minibatch loss is noisy around the full-data optimum, so convergence is judged on
                    # the full training set at log steps only (resolution: log_every steps).
                    last_above = torch.where(gap <= tol, last_above, step)
                pending.append(log_row.raw_row(pop, loss, chain, P, grads, gnorm, gap, lr_now))
                pending_steps.append(step)
                if hist_every and on_hist and step % hist_every == 0:
                    log_row.population_histograms(pop, step, resids, psis, chain, on_hist, inverse)
                if len(pending) >= flush_every or history.must_flush(pending_steps[0], next_row.get(step)):
                    flush()
                    if should_stop and should_stop():
                        raise KeyboardInterrupt
            if step == steps:
                break

            # -- update, then stop runs that left the finite numbers (their parameters stay frozen)
            lr = lr_fixed if constant_lr else lr_tab[step, lr_col][:, None]  # [N, 1]
            new_P = P - lr * grads if plain_sgd else opt.step(P, grads, lr)
            # A run leaves the finite numbers when its loss or new parameters do (a non-finite gradient
            # makes new_P non-finite too). s - s == 0 exactly when s is finite: 4 ops where
            # isfinite(loss) & isfinite(new_P).all(1) takes 12 (a sum overflows only past ~1e38 in float32).
            total = new_P.sum(1) + loss
            active &= (total - total) == 0
            alive += active
            if not track_params:  # the share of parameters whose update reverses the last (metrics.flip_rate)
                direction = metrics.update_directions(P, new_P - P)
                history.record_flips(step, metrics.reversals(direction, prev_direction).mean(1))
                prev_direction = direction
            P.copy_(torch.where(active[:, None], new_P, P))  # in place: pop.named stays a view of P
    except KeyboardInterrupt:
        interrupted = True
    flush()
    return _results(cfgs, pop, P, active, alive, last_above, gap, tol, refs, shapes, tags, last_row, interrupted,
                    steps, time.perf_counter() - t_start, inverse)


def _setup(cfgs, datasets, device, dtype):
    """Device tensors of a population (runs already in loss order), its parameters and references."""
    cfg0 = cfgs[0]
    N = len(cfgs)
    x = torch.stack([d.x for d in datasets]).to(device, dtype)  # [N, n, 1]
    y_orig = torch.stack([d.y for d in datasets]).to(device, dtype)  # [N, n]
    x_val = torch.stack([d.x_val for d in datasets]).to(device, dtype)  # [N, n_val, 1]
    signal_val = torch.stack([d.truth.signal(d.x_val).reshape(-1) for d in datasets]).to(device, dtype)
    outlier = torch.stack([d.outlier for d in datasets]).to(device)  # [N, n] bool
    any_norm = any(c.train.normalize_targets for c in cfgs)
    if any_norm:
        norm = torch.tensor([c.train.normalize_targets for c in cfgs], device=device)
        mu = torch.where(norm, y_orig.mean(1), 0.0)[:, None]  # [N, 1]
        sd = torch.where(norm, y_orig.std(1).clamp_min(1e-12), 1.0)[:, None]
        y = (y_orig - mu) / sd  # [N, n] training targets
    else:  # no copy: training and original units coincide
        mu = torch.zeros(N, 1, dtype=dtype, device=device)
        sd = torch.ones(N, 1, dtype=dtype, device=device)
        y = y_orig
    k = n_outputs(cfg0)
    model = models.make(cfg0.model.kind, in_features=1, n_outputs=k, hidden=cfg0.model.hidden,
                        activation=cfg0.model.activation)
    shapes = _Flat(model.param_shapes())
    P = shapes.flat(model.init_stack([init_seed(c.seed) for c in cfgs], dtype=dtype, device=device))  # [N, P]

    named = shapes.named(P)
    y3 = y[..., None]
    # Blocks: contiguous runs of one loss, at most _BLOCK_ELEMENTS training values (x width for mlp) each.
    width = max(cfg0.model.hidden) if model.kind == "mlp" else 1
    per_block = max(1, _BLOCK_ELEMENTS // (x.shape[1] * width * k))
    blocks, start = [], 0
    line = model.kind in ("linear", "constant")
    # Candidate order statistics need one host read per row: free on a CPU, a sync on a GPU.
    candidates = log_row.candidate_count(x.shape[1]) if line and device.type == "cpu" else 0
    for name in dict.fromkeys(c.loss.name for c in cfgs):
        count = sum(c.loss.name == name for c in cfgs)
        spec = losses.spec(name)
        for lo in range(start, start + count, per_block):
            sl = slice(lo, min(lo + per_block, start + count))
            blocks.append(_Block(runs=sl, spec=spec, terms=fused.residual_terms(spec),
                                 params=_stack_loss_params(cfgs[sl], name, dtype, device), x=x[sl], y3=y3[sl],
                                 named={key: v[sl] for key, v in named.items()}))
        start += count
    roots = [losses.spec(c.loss.name).root for c in cfgs]
    root = torch.tensor(roots, device=device) if any(roots) else None

    # The outliers as padded index lists: the row sums |psi| over them with a gather of a few entries per
    # run instead of a pass over all n points (most runs have none).
    counts = outlier.sum(1)
    most = max(int(counts.max()), 1)  # the most outliers any run has (once, at setup: a host read)
    outlier_at = torch.argsort((~outlier).to(torch.int8), dim=1, stable=True)[:, :most].contiguous()  # outliers first
    outlier_w = (torch.arange(most, device=device) < counts[:, None]).to(dtype)

    # exact reference optimum of each run's own objective (float64, once)
    refs = _references(cfgs, datasets, model.kind, mu, sd)
    nan = float("nan")
    ref_loss = torch.tensor([r.loss if r else nan for r in refs], dtype=dtype, device=device)  # training units
    # Converged: gap <= converge_tol * |optimal loss|. For an (almost) exact fit the optimal loss is ~0, so
    # the scale floor is float rounding of the loss itself (eps * mean y^2), not a fixed number that would
    # swamp the relative rule for targets of scale 1e-6.
    floor = torch.finfo(dtype).eps * (y * y).mean(1)
    tol = torch.tensor([c.train.converge_tol for c in cfgs], dtype=dtype, device=device) * torch.maximum(
        ref_loss.abs(), floor)
    named_keys = _named_param_keys(model.kind, k)
    mu_h, sd_h = mu[:, 0].tolist(), sd[:, 0].tolist()  # one host copy
    ref_params = torch.tensor([[_orig(r.params, c, mu_h[i], sd_h[i])[p] if r else nan for p in named_keys]
                               for i, (r, c) in enumerate(zip(refs, cfgs))], dtype=dtype, device=device)
    true_params = torch.tensor([[_true(d, p) for p in named_keys] for d in datasets], dtype=dtype, device=device)
    pop = _Population(model=model, named=named, blocks=blocks, x=x, y3=y3, y_orig=y_orig, x_val=x_val,
                      signal_val=signal_val, outlier=outlier, outlier_at=outlier_at, outlier_w=outlier_w, mu=mu, sd=sd,
                      any_norm=any_norm, root=root, ref_loss=ref_loss, ref_params=ref_params,
                      true_params=true_params, k=k, shapes=shapes,
                      moments=log_row.ResidualMoments(x, y) if line else None,
                      largest=log_row.LargestResiduals(x, y3, model.kind, k, candidates) if candidates else None)
    return pop, P, refs, tol, named_keys, shapes


def _results(cfgs, pop, P, active, alive, last_above, gap, tol, refs, shapes, tags, last_row, interrupted, steps,
             wall, inverse) -> list[RunResult]:
    """One RunResult per run, in the caller's order (one host copy of every device tensor)."""
    N = len(cfgs)
    P_cpu, active_cpu = P.cpu(), active.cpu().tolist()
    alive_cpu, above_cpu, gap_cpu, tol_cpu = alive.tolist(), last_above.tolist(), gap.tolist(), tol.tolist()
    mu_h, sd_h = pop.mu[:, 0].tolist(), pop.sd[:, 0].tolist()
    named_all = shapes.named(P_cpu)
    last = last_row["values"][:, inverse.argsort()] if last_row else np.full((len(tags), N), np.nan)  # run order
    last = last.tolist()
    results = []
    for i, c in enumerate(cfgs):
        one = {kk: v[i].clone() for kk, v in named_all.items()}
        params = _orig(pop.model.named_floats(one), c, mu_h[i], sd_h[i])
        diverged = not active_cpu[i]
        status = "diverged" if diverged else ("interrupted" if interrupted else "completed")
        r = refs[i]
        results.append(RunResult(
            status=status, steps=steps if status == "completed" else alive_cpu[i] if diverged else -1,
            params=params,
            reference=None if r is None else {"loss": r.loss, "params": _orig(r.params, c, mu_h[i], sd_h[i]),
                                              "method": r.method, "exact": r.exact, "units": "training"},
            final={tag: float(last[t][i]) for t, tag in enumerate(tags)},
            steps_to_converge=None if r is None or diverged else metrics.steps_to_converge(
                above_cpu[i], gap_cpu[i], tol_cpu[i]),
            diverged_step=alive_cpu[i] if diverged else None,
            last_finite=params if diverged else {},
            wall_s=wall / N, population_size=N, model_params=one, target_shift=(mu_h[i], sd_h[i])))
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
