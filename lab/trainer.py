"""Train a population of runs in lockstep and measure how training behaves.

A population is N >= 1 runs that share a model shape, data size and step count; everything else
(loss, loss parameters, dataset kind, seed, learning rate, optimizer hyperparameters, schedule) may
differ per run. Parameters are stacked as one tensor [N, P]; data as [N, n, 1]. A single run is a
population of one, so there is exactly one code path.

Gradients are explicit: every loss supplies its closed-form derivative psi = dl/dy_hat (tested
against autograd in tests/test_losses.py) and every model its vector-Jacobian product, so one step
is a handful of fused tensor ops instead of an autograd graph. Runs with different losses are laid
out contiguously by loss; each group computes its loss, psi and its share of the gradient on its own
slice, and only the [N, P] gradients are joined before the one shared update (lab.population: the
layout, the blocks and the step's loss and gradient; this module: the loop, the update and the logs).

What a step costs (a 200-run study on a 2-core CPU, see lab/bench.py): ~0.7 ms, was ~1.4 ms before
each loss computed psi and its value in one pass over the residuals (lab.fused: the value as a dot
product with psi where it is one, log-cosh from one exp and one log). The [runs, n] ops of the loss
blocks dominate, so everything else is kept off the per-step path: runs are processed in cache-sized
blocks (`population.BLOCK_ELEMENTS`); the linear model's forward and vjp are elementwise (x * w + b,
sum(psi * x)) instead of batched matmuls with 1x1 matrices (1.6 ms -> 0.04 ms for 200 runs); the
parameters are updated in place (the views stay valid); the oscillation metrics read a ring of
parameters and losses written once per step (one copy each), derived for all rows of a flush at once
(lab.history) instead of being computed every step; and the scalar tags are computed only at log
steps (lab.log_row: the sums over the points from the residuals the step left in the population's row
buffers, on a second core where there is one (lab.row_worker), and tag_rows at each flush).

Nothing in the loop forces a host-device sync: metrics are computed on the device into a buffer that
is copied out every `flush_every` log steps and handed to the `on_log` / `on_hist` callbacks.
`train.log_every = 0` turns logging off: no metric rows or histograms are computed during training
and the callbacks are never called; one row is still computed at the last step, for the results'
`final` values.
"""

from __future__ import annotations

import contextlib
import gc
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from lab import log_row, metrics, models, population, row_worker
from lab.config import Config, n_outputs
from lab.data import Dataset
from lab.history import History
from lab.optim import Hyper, Optimizer, clip_by_norm, lr_table
from lab.population import init_seed
from lab.signal_gate import SignalGate

STATUSES = ("completed", "diverged", "interrupted", "failed")
# Parameter histories (flip rate, parameter amplitude) are kept for models this small; bigger models
# keep a per-step flip-rate history instead and log no parameter amplitude (NaN).
_TRACK_PARAMS = 64
# The history ring (lab.history) holds at most this many values (16 MiB of float32), or window + 2 steps
# where that is more; a flush comes early when a pending row's window would be overwritten.
_HISTORY_ELEMENTS = 1 << 22
# A flush's rows hold their histograms ([2, N, bins + 2] each) until it logs them: a flush comes early
# once they would pass this many bytes (10,000 runs logging histograms every step: ~12 rows, not 50).
_HISTOGRAM_BYTES = 32 << 20


@dataclass
class RunResult:
    """What one run of a population produced (plain Python values, original units).

    steps: the steps trained, train.steps for a completed run; for a diverged one the step it left the
    finite numbers (= diverged_step); for an interrupted one the updates done before the interruption.
    steps_to_converge: the first step from which the gap to the exact optimum stayed within tolerance
    through the last step trained (metrics.steps_to_converge); None when the run ended above it,
    diverged, or has no exact optimum. An interrupted run's value holds up to its interruption, not
    necessarily to train.steps. With minibatches convergence is judged on the full training set at log
    steps: the value is the first log step from which the gap stayed within tolerance; None with logging
    off (the last step is the only one measured) or once interrupted (the gap an interruption leaves may
    be one minibatch's).
    """

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
    wall_time: np.ndarray  # [S] seconds since the epoch: when each row's step was taken


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


def train(cfgs: list[Config], datasets: list[Dataset], on_log: Callable[[LogBlock], None] | None = None,
          on_hist: Callable[[int, str, np.ndarray, np.ndarray, np.ndarray], None] | None = None,
          flush_every: int = 50, should_stop: Callable[[], bool] | None = None,
          compile: bool = False, row_worker_process: bool | None = None) -> list[RunResult]:
    """Train one population (all configs must share `population_key`); returns one result per run.

    on_log(block) receives scalars every `flush_every` log steps and at the end; on_hist(step, tag,
    counts [N, bins], lo [N], hi [N]) receives histograms, at the same flushes, just before the scalars of
    the same rows (they are computed with the rows' sums: lab.row_worker). should_stop() is polled at flushes; when it
    says stop (or on KeyboardInterrupt) unfinished runs end with status 'interrupted' after a flush.
    Results and callback arrays are in the caller's run order. compile: run each block's loss and
    gradient through torch.compile (linear and constant models; see `population._compiled`): off by default,
    because compiling costs more than it saves on a study of a few hundred runs (lab/bench.py).
    row_worker_process: compute the log rows' sums in a process forked onto a second core (lab.row_worker);
    None: where that pays (`row_worker.worker_pays`: a CPU with a second core, Linux, a population of
    at least 2^15 values). The numbers are the same either way.

    On a CPU the population trains with one intra-op thread (restored afterwards): its ops are a few
    tens of microseconds each, so a second thread gains ~20% on two idle cores, while one competing
    process on the same cores made the 200-run study up to 25x slower (66 s instead of 2.7 s: the
    threads spin at every op's barrier waiting for a descheduled partner).
    """
    if len(datasets) != len(cfgs):
        raise ValueError(f"{len(cfgs)} configs and {len(datasets)} datasets: one dataset per run")
    for i, (c, d) in enumerate(zip(cfgs, datasets)):
        if (d.n, d.x_val.shape[0]) != (c.data.n, c.data.n_val):
            raise ValueError(f"run {i}: its dataset has n = {d.n}, n_val = {d.x_val.shape[0]}; its config says "
                             f"data.n = {c.data.n}, data.n_val = {c.data.n_val}")
    keys = {population_key(c) for c in cfgs}
    if len(keys) != 1:
        raise ValueError(f"configs do not share one population: {sorted(map(str, keys))}")
    threads = torch.get_num_threads()
    one_thread = resolve_device(cfgs[0].device).type == "cpu" and threads > 1
    if one_thread:
        torch.set_num_threads(1)
    try:
        with frozen_gc():
            return _train(cfgs, datasets, on_log, on_hist, flush_every, should_stop, compile, row_worker_process)
    finally:
        if one_thread:
            torch.set_num_threads(threads)


@contextlib.contextmanager
def frozen_gc():
    """Keep the objects alive on entry (modules, configs, datasets: ~200,000 in a study's process) out of the
    cyclic garbage collector's reach until exit (gc.freeze, then gc.unfreeze).

    A logged study allocates enough small objects to trigger about one full collection. It scanned all
    of them (~0.1 s), and after the row worker's fork it also wrote to every object's header, so that
    the pages they sit on were copied. Measured on a default-cadence 200-run study: 2.50 -> 2.26 s
    (median of four fresh-process pairs). Logging off triggered none and is unchanged. Objects made
    inside stay collectable as usual. Nested, and where the caller has frozen objects itself, this does
    nothing: gc.unfreeze would give back theirs too.
    """
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _train(cfgs, datasets, on_log, on_hist, flush_every, should_stop, compile, worker) -> list[RunResult]:
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
    next_histogram = 0  # the step from which the next row takes histograms

    pop, P, refs, tol, named_keys, shapes = population.build(cfgs, datasets, device, dtype)
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

    last_row = {}  # the most recent row [T, N] (caller order), for the summary's `final`
    tags = metrics.SCALAR_TAGS + tuple(f"param/{p}" for p in named_keys)
    interrupted = False

    if worker is None:
        worker = row_worker.worker_pays(device, pop.y3.shape[0] * n * pop.k, len(row_steps))
    histogram_rows = max(1, _HISTOGRAM_BYTES // (math.prod(log_row.row_histograms_shape(pop)) * P.element_size()))
    # A signal that lands inside an update waits for its end (see the update below); the row worker's
    # bookkeeping holds signals with the same gate.
    gate = SignalGate()
    try:
        log_rows = row_worker.Rows(pop, P, flush_every, worker=worker, gate=gate)
    except BaseException:
        gate.restore()
        raise

    def flush():
        raws, logged_steps = log_rows.collect()  # the rows since the last flush, with their sums
        # Logged and cleared with signals held: a Ctrl-C after the callbacks had the rows but before the
        # clear made the final flush log them again (every point of the flush twice in the event files).
        with gate.held():
            for raw, step in zip(raws, logged_steps):
                if raw.histograms is not None:
                    log_row.emit_histograms(step, raw.histograms, on_hist, inverse)
                    raw.histograms = None  # at most once
            if raws:
                rows = log_row.tag_rows(pop, raws, history.tags(logged_steps))  # [S, T, N], all rows at once
                block = rows.cpu().numpy()[:, :, inverse]  # one host copy per flush
                last_row["values"], last_row["step"] = block[-1], logged_steps[-1]
                if on_log and log_every:
                    on_log(LogBlock(np.array(logged_steps), tags, block, np.array([r.wall_time for r in raws])))
            log_rows.clear()

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
            m, flat, _, _ = pop.terms(xb, yb3, keep=xb is None and step in row_steps)  # a row reads pop.row_e
            loss, chain = pop.chain(m)
            scale = 1.0 / (batch * pop.k)  # the mean over points and outputs
            gradient = flat * scale if chain is None else flat * (chain * scale)[:, None]  # dL/dtheta [N, P]
            # the update's: clipped where asked (the logged grad/ tags describe `gradient`, the loss's own)
            grads = clip_by_norm(gradient, hyper.clip_grad_norm)[0] if clipping else gradient
            gap = loss - pop.ref_loss
            if xb is None:  # full batch: the gap of every step; NaN gap (no reference) counts as above
                last_above = torch.where(gap <= tol, last_above, step)
            if needed[step]:
                history.record(step, loss, P)

            if step in row_steps:
                lr_now = lr_fixed[:, 0] if constant_lr else lr_tab[step, lr_col]
                if xb is not None:  # minibatch step: measure on the full training set
                    m_full, _, _, _ = pop.terms(keep=True)
                    loss, chain = pop.chain(m_full)
                    gap = loss - pop.ref_loss
                    # A minibatch loss is noisy around the full-data optimum, so convergence is judged on
                    # the full training set at log steps only (resolution: log_every steps). Above the
                    # tolerance here, the gap is known within it from the next log step on, not the next step.
                    last_above = torch.where(gap <= tol, last_above, next_row.get(step, steps + 1) - 1)
                raw = log_row.raw_row(pop, loss, chain, P, gradient, gap, lr_now)
                # at the first row on or after each multiple of hist_every (rows come every log_every steps)
                histograms = bool(hist_every and on_hist and step >= next_histogram)
                if histograms:
                    next_histogram = (step // hist_every + 1) * hist_every
                log_rows.submit(raw, P, step, histograms, chain)  # its sums and histograms: now, or on the row worker
                if (len(log_rows) >= flush_every or log_rows.histogram_rows >= histogram_rows
                        or history.must_flush(log_rows.first_step, next_row.get(step))):
                    flush()
                    if should_stop and should_stop():
                        raise KeyboardInterrupt
            if step == steps:  # no update follows: the loss of the last parameters is checked here
                active &= (loss - loss) == 0
                break

            # -- update, then stop runs that left the finite numbers (their parameters stay frozen)
            lr = lr_fixed if constant_lr else lr_tab[step, lr_col][:, None]  # [N, 1]
            new_P = P - lr * grads if plain_sgd else opt.step(P, grads, lr)
            # Held: a Ctrl-C between counting the update (alive) and keeping it (P) made an interrupted
            # run's `steps` one more than the updates its parameters had (the optimizer's state, updated
            # in opt.step, may still be a step ahead of P: a run resumes from its config, not from it).
            with gate.held():
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
    except BaseException:
        gate.restore()  # first: a Ctrl-C while the worker is reaped must not leave the gate installed
        log_rows.close()  # the worker process ends with the training that failed
        raise
    try:
        flush()
    finally:
        gate.restore()
        log_rows.close()
    return _results(cfgs, pop, P, active, alive, last_above, gap, tol, refs, shapes, tags, last_row, interrupted,
                    steps, time.perf_counter() - t_start, inverse)


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
    # An interruption can land mid-step, where `gap` may still be a minibatch's (see RunResult); with
    # minibatches and logging off the full-set gap is measured at the last step only: nothing to date.
    minibatch = 0 < cfgs[0].train.batch_size < pop.y3.shape[1]
    minibatch_gap = minibatch and (interrupted or cfgs[0].train.log_every == 0)
    results = []
    for i, c in enumerate(cfgs):
        one = {kk: v[i].clone() for kk, v in named_all.items()}
        params = population.to_original_units(pop.model.named_floats(one), c, mu_h[i], sd_h[i])
        diverged = not active_cpu[i]
        status = "diverged" if diverged else ("interrupted" if interrupted else "completed")
        r = refs[i]
        results.append(RunResult(
            # alive counts the updates a run made while finite: its steps, unless it completed them all
            status=status, steps=steps if status == "completed" else alive_cpu[i],
            params=params,
            reference=None if r is None else {"loss": r.loss,
                                              "params": population.to_original_units(r.params, c, mu_h[i], sd_h[i]),
                                              "method": r.method, "exact": r.exact, "units": "training"},
            final={tag: float(last[t][i]) for t, tag in enumerate(tags)},
            steps_to_converge=None if r is None or diverged or minibatch_gap else metrics.steps_to_converge(
                above_cpu[i], gap_cpu[i], tol_cpu[i]),
            diverged_step=alive_cpu[i] if diverged else None,
            last_finite=params if diverged else {},
            wall_s=wall / N, population_size=N, model_params=one, target_shift=(mu_h[i], sd_h[i])))
    return [results[j] for j in inverse]


