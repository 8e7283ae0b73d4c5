"""What the benchmark (lab.bench) compares the lab's study with, each measured in its own function.

- `run_baseline`: the usual loop (lab.usual_loop.run) on a subset of the study's runs, and
  `compare_params`: whether it ends at the lab's final parameters (float32), so the speedup compares
  the same work.
- `single_runs`: one run as a population of one against the hand-written minimal loop, per loss.
- `compiled_population`: the population step eager and through torch.compile, in this process.
- `second_core`: the population trained alone and beside a process computing log rows on the other
  core (what a busy lab.row_worker costs the training process on this machine).

The timings are wall times of whole trainings; lab.bench times the study itself in fresh processes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import statistics
import sys
import time
from pathlib import Path

# ---------------------------------------------------------------------------------------------------
# The baseline: the usual loop, one run at a time.


def baseline_subset(runs: list, count: int) -> list:
    """`count` runs spread over every loss and dataset: loss i mod L, dataset i mod D and seeds in turn, each
    in the order the runs first show it (the study's: 5 losses, 4 datasets)."""
    by_key = {(r.config.loss.name, r.config.data.kind, r.config.seed): r for r in runs}
    losses = list(dict.fromkeys(r.config.loss.name for r in runs))
    kinds = list(dict.fromkeys(r.config.data.kind for r in runs))
    seeds = sorted({r.config.seed for r in runs})
    return [by_key[(losses[i % len(losses)], kinds[i % len(kinds)], seeds[i % len(seeds)])] for i in range(count)]


def run_baseline(runs: list, count: int, out_dir: Path) -> dict:
    """The usual loop (lab.usual_loop.run) on `count` of the runs, after one untimed warm-up run."""
    from lab import config, data, usual_loop

    subset = baseline_subset(runs, count)
    warm = subset[0].config  # one untimed run first: SummaryWriter's imports and first calls are not charged
    usual_loop.run(warm, data.make(warm.data.kind, seed=warm.seed, **config.data_params(warm.data)),
                   out_dir / "warm-up")
    results = []
    for r in subset:
        t0 = time.perf_counter()
        ds = data.make(r.config.data.kind, seed=r.config.seed, **config.data_params(r.config.data))
        res = usual_loop.run(r.config, ds, out_dir / r.name)
        res["wall_s"] += time.perf_counter() - t0 - res["wall_s"]  # the dataset's draw counts too
        res["name"] = r.name
        results.append(res)
    per_run = sum(x["wall_s"] for x in results) / len(results)
    return {"runs": len(results), "per_run_s": per_run, "results": results}


# Losses whose psi jumps (sign(e)): one point's residual changing sign moves a step by 2 lr |x_i| / n.
_SIGN_LOSSES = ("mae", "quantile")


def compare_params(baseline: dict, runs: list, runs_dir: Path) -> dict:
    """Do the baseline's final parameters equal the lab's (the same runs)?

    Both train in float32 and their gradients round differently in the last bits (explicit psi vs
    autograd). For smooth losses that stays at rounding level: |diff| <= 1e-5 max(1, |theta|). For
    sign-based losses a point whose residual is within rounding of 0 can take the other sign in one
    of them, which moves that step by 2 lr |x_i| / n: |diff| <= 2 lr max|x| / n (2e-4 here).
    """
    by_name = {r.name: r.config for r in runs}
    worst, worst_rel, same = 0.0, 0.0, True
    for res in baseline["results"]:
        cfg = by_name[res["name"]]
        lab_params = json.loads((runs_dir / res["name"] / "summary.json").read_text())["params"]
        for key, v in res["params"].items():
            diff = abs(v - lab_params[key])
            worst, worst_rel = max(worst, diff), max(worst_rel, diff / max(abs(v), 1.0))
            if cfg.loss.name in _SIGN_LOSSES:
                bound = 2 * cfg.optim.lr * max(abs(b) for b in cfg.data.x_range) / cfg.data.n
            else:
                bound = 1e-5 * max(abs(v), 1.0)
            same = same and diff <= bound
    return {"max_abs_diff": worst, "max_rel_diff": worst_rel, "same": same}


# ---------------------------------------------------------------------------------------------------
# A single run: population of one against the minimal hand-written loop.


def single_runs(flat: dict, losses, repeats: int = 3) -> dict:
    """Per loss: best of `repeats` for the minimal loop and for the lab (logging off and default), one run
    of the config `flat` (dotted keys) on outlier data."""
    from lab import config, data, trainer, usual_loop

    out = {}
    for loss in losses:
        cfg = config.from_flat({**flat, "loss.name": loss, "data.kind": "outliers", "seed": 0})
        off = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, log_every=0))
        ds = data.make(cfg.data.kind, seed=cfg.seed, **config.data_params(cfg.data))
        trainer.train([cfg], [ds])  # warm-up: lazy imports, first-call allocations
        times = {"minimal": [], "lab_off": [], "lab_logged": []}
        for _ in range(repeats):
            times["minimal"].append(usual_loop.minimal(cfg, ds)[0])
            times["lab_off"].append(_timed(lambda c=off, d=ds: trainer.train([c], [d])))
            times["lab_logged"].append(_timed(lambda c=cfg, d=ds: trainer.train([c], [d], on_log=lambda b: None)))
        out[loss] = {k: min(v) for k, v in times.items()}
    total = {k: sum(v[k] for v in out.values()) for k in ("minimal", "lab_off", "lab_logged")}
    return {"per_loss": out, "ratio_off": total["lab_off"] / total["minimal"],
            "ratio_logged": total["lab_logged"] / total["minimal"]}


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def compiled_population(cfgs: list) -> dict:
    """The population of `cfgs` trained eagerly and with torch.compile (in this process, no writing)."""
    from lab import config, data, trainer

    datasets = [data.make(c.data.kind, seed=c.seed, **config.data_params(c.data)) for c in cfgs]
    eager = _timed(lambda: trainer.train(cfgs, datasets, on_log=lambda b: None))
    first = _timed(lambda: trainer.train(cfgs, datasets, on_log=lambda b: None, compile=True))
    second = _timed(lambda: trainer.train(cfgs, datasets, on_log=lambda b: None, compile=True))
    return {"eager_s": eager, "compiled_first_s": first, "compiled_s": second}


def second_core(cfgs: list, pairs: int = 3) -> dict | None:
    """How much slower the population of `cfgs` trains (with logging off, in this process) while another
    process computes log rows on the second core, as a row worker busy at every step does
    (lab.row_worker): what using the second core costs the first on this machine. Cores that share
    nothing cost nothing; virtual cores that share one physical core, or a clock that drops when both
    run, cost the training that much however the work is split. None without a second core or fork."""
    import warnings

    import torch

    from lab import config, data, population, row_worker, trainer

    if row_worker._cores() < 2 or not hasattr(os, "fork") or cfgs[0].device != "cpu":
        return None
    datasets = [data.make(c.data.kind, seed=c.seed, **config.data_params(c.data)) for c in cfgs]
    by_loss = sorted(range(len(cfgs)), key=lambda i: cfgs[i].loss.name)  # the layout lab.trainer uses
    pop, P, *_ = population.build([cfgs[i] for i in by_loss], [datasets[i] for i in by_loss],
                                  torch.device("cpu"), torch.float32)
    pop.terms(keep=True)  # a row step's e and psi, for the rows of the busy process

    def train() -> float:
        return _timed(lambda: trainer.train(cfgs, datasets))

    train()  # warm-up
    alone, beside, busy_cpu = [], [], []
    for _ in range(pairs):
        alone.append(train())
        pid, parent = None, os.getpid()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # fork beside torch's threads: the child uses none
                pid = os.fork()
            if pid == 0:
                _busy_rows(pop, P, parent)  # never returns
            time.sleep(0.05)
            beside.append(train())
        finally:
            if pid:  # (0 only in the child, which never gets here)
                os.kill(pid, signal.SIGKILL)
                _, status, usage = os.wait4(pid, 0)
                if not (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL):
                    raise RuntimeError(f"the busy process ended by itself (wait status {status}): 'beside' was alone")
                busy_cpu.append(usage.ru_utime)
    return {"alone_s": alone, "beside_s": beside, "busy_cpu_s": busy_cpu,
            "slowdown": statistics.median(b / a for a, b in zip(alone, beside)) - 1}


def _busy_rows(pop, P, parent: int) -> None:
    """The busy process of `second_core`: log rows one after another, as a row worker busy at every step
    (and set up as one: one thread, the inherited free heap given back), until killed, or until its parent
    is gone (never a process left spinning)."""
    import torch

    from lab import row_worker

    status = 1
    try:
        torch.set_num_threads(1)
        row_worker._release_free_memory()
        row_worker.derive_in_reader(pop)  # what a worker derives: a line's e from P, the cheap losses' psi
        e_rows, psi_rows = torch.empty_like(pop.row_e), torch.empty_like(pop.row_psi)
        while os.getppid() == parent:
            row_worker._compute(pop, pop.row_e, pop.row_psi, P, False, None, psi_rows, e_rows)
        status = 0
    except BaseException as exc:  # noqa: BLE001 (the parent sees the exit status and fails the measurement)
        print(f"second core: busy process: {type(exc).__name__}: {exc}", file=sys.stderr)
    finally:
        os._exit(status)


# ---------------------------------------------------------------------------------------------------
# Report
