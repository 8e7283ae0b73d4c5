"""Measurements behind `lab claims`: finished runs (or the loss modules alone) -> numbers per seed.

Each measurement turns the runs of one study into `Measurement.values`: metric -> one number per
replicate (a seed; a loss-only measurement has a single replicate). `lab.claims` compares those
numbers with the thresholds written in the study file; nothing here decides a verdict.

Two kinds of measurement:
- about the loss functions themselves (claims 1, 4, 10 and two columns of 11): the lab's loss modules
  evaluated on a grid of residuals e = y_hat - y (target 0), derivatives through autograd;
- about training (the rest): read from each run's summary (final scalars, fitted and exact-optimum
  parameters, steps to converge, status), its data.npz, and, for curves, its TensorBoard event file.
A run that did not complete gives NaN for what it could not measure, so its seed counts as neither a
pass nor a failure (see lab.claim_studies.judge). The rule holds through every step: a number computed
from several inputs of one seed (a max over quantile fits, the largest step back along a path, the share
of table cells that match) is NaN as soon as any input is (`largest`, never Python's max, which keeps or
drops a NaN depending on its position). Missing data thus ends as 'inconclusive', never as a verdict.
A run the study's grid does not hold at all is a mistake in the study file, not missing data: looking it
up raises MissingRun, whose message names the config values asked for (also inconclusive, with that
message as the claim's error).

This module holds the registry, the helpers and the loss-only measurements (claims 1, 4, 10);
lab.claim_training holds the measurements of training runs.
"""

from __future__ import annotations

import functools
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lab import config, data, losses, rundir

NAN = float("nan")


@dataclass
class Measurement:
    """values: metric -> one number per replicate; details: Markdown for the report; plots: figure name ->
    payload for lab.figures.claim_figure (a dict with 'kind' and plain arrays)."""

    values: dict[str, list[float]]
    details: str = ""
    plots: dict[str, dict] = field(default_factory=dict)


@dataclass(frozen=True)
class Measure:
    """A registered measurement: fn(runs, params) -> Measurement; labels name every metric it returns
    (str.format'ed with the params); defaults list every parameter a study file may set."""

    fn: Callable[[list, dict], Measurement]
    labels: dict[str, str]
    defaults: dict
    needs_runs: bool = True

    def label(self, metric: str, params: dict) -> str:
        return self.labels[metric].format(**{**self.defaults, **params})


MEASURES: dict[str, Measure] = {}


def measure(name: str, labels: dict[str, str], defaults: dict | None = None, needs_runs: bool = True):
    """Register fn under `name`; fn receives the study's runs and its [claim.params] merged over defaults."""
    def register(fn):
        spec = Measure(fn, labels, dict(defaults or {}), needs_runs)
        MEASURES[name] = spec
        return fn
    return register


# ---------------------------------------------------------------------------------------------------
# Loss functions on a grid (float64, through the lab's modules and autograd)


def penalties(name: str, errors, **params) -> np.ndarray:
    """Per-element value of the lab's loss module at residuals e (prediction e, target 0)."""
    e = torch.as_tensor(np.asarray(errors, dtype=np.float64))
    return losses.build(name, reduction="none", **params)(e, torch.zeros_like(e)).detach().numpy()


def gradients(name: str, errors, **params) -> np.ndarray:
    """dl/dy_hat of each element through autograd: the module's 'sum' reduction, backward, y_hat.grad."""
    y_hat = torch.tensor(np.asarray(errors, dtype=np.float64), requires_grad=True)
    losses.build(name, reduction="sum", **params)(y_hat, torch.zeros_like(y_hat)).backward()
    return y_hat.grad.numpy()


def power_law_exponent(x, y) -> float:
    """Least-squares slope of log y on log x over x, y > 0: 2 for y = c x^2, 1 for linear, 0 for constant."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    keep = (x > 0) & (y > 0)
    if keep.sum() < 2:
        return NAN
    return float(np.polyfit(np.log(x[keep]), np.log(y[keep]), 1)[0])


def plateau_start(errors, grad_abs, rel: float = 1e-6) -> float:
    """Smallest |e| at which |g| reaches its maximum (within rel): where Huber's gradient stops growing."""
    a, g = np.abs(np.asarray(errors, float)), np.asarray(grad_abs, float)
    return float(a[g >= g.max() * (1 - rel)].min())


def largest_jump(values) -> float:
    """max |v[i+1] - v[i]| along a grid: shrinks with the spacing for a continuous v, not across a kink."""
    return float(np.abs(np.diff(np.asarray(values, float))).max())


def largest(values, default: float = NAN) -> float:
    """max of values; NaN when any value is NaN (a missing input), `default` when there are none."""
    values = [float(v) for v in values]
    if any(math.isnan(v) for v in values):
        return NAN
    return max(values, default=default)


def ratio(a: float, b: float, floor: float = 0.0) -> float:
    """a / max(b, floor); NaN if either is NaN, inf when the denominator is 0."""
    if math.isnan(a) or math.isnan(b):
        return NAN
    den = max(b, floor)
    return a / den if den > 0 else (math.inf if a > 0 else NAN)


# ---------------------------------------------------------------------------------------------------
# Runs: selection by config values, numbers from summaries, curves from event files


def setting(run, key: str):
    """The value of a dotted config key of a run (None if unset)."""
    return _flat(run.config).get(key)


@functools.lru_cache(maxsize=4096)
def _flat(cfg) -> dict:  # configs are frozen (hashable); studies look the same ones up many times
    return config.to_flat(cfg)


class MissingRun(LookupError):
    """A measurement needs a run that the study's grid does not hold.

    That is a mistake in the study file, not missing data: a run that trained and failed is still among
    the study's runs (its status says so) and measures as NaN. Raised before any number is computed
    from it, so the claim is inconclusive with this message instead of "'NoneType' object has no
    attribute 'dir'".
    """


def pick(runs, **match):
    """The one run whose config has every key=value (keys with '__' for '.', e.g. loss__name='mse').

    Raises MissingRun when no run matches (naming the values asked for and those the runs have), and
    ValueError when several do.
    """
    want = {k.replace("__", "."): v for k, v in match.items()}
    found = [r for r in runs if all(_same(setting(r, k), v) for k, v in want.items())]
    if len(found) > 1:
        raise ValueError(f"{len(found)} runs match {want}; the study must make it unique")
    if not found:
        raise missing_run(runs, ", ".join(f"{k}={v!r}" for k, v in want.items()), want)
    return found[0]


def missing_run(runs, wanted: str, keys) -> MissingRun:
    """The error for a run the study lacks: what was wanted, and the values of `keys` its runs do have."""
    have = "; ".join(f"{k} " + ", ".join(map(repr, dict.fromkeys(setting(r, k) for r in runs))) for k in keys)
    return MissingRun(f"the study has no run with {wanted} ("
                      + (f"its {len(runs)} runs have {have}" if runs and have else f"it has {len(runs)} runs")
                      + "); add it to the study's [sweep]")


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=1e-15)
    return a == b


def seeds(runs) -> list[int]:
    return sorted({r.config.seed for r in runs})


def completed(run) -> bool:
    return run is not None and (run.summary or {}).get("status") == "completed"


def final(run, tag: str) -> float:
    """Last logged value of a scalar tag; NaN unless the run completed."""
    if not completed(run):
        return NAN
    v = (run.summary.get("final") or {}).get(tag)
    return NAN if v is None else float(v)


def fitted(run, key: str, exact: bool = False) -> float:
    """A fitted parameter in original units (exact=True: the float64 optimum of the run's own loss)."""
    if not completed(run):
        return NAN
    params = (run.summary.get("reference") or {}).get("params", {}) if exact else run.summary.get("params", {})
    v = params.get(key)
    return NAN if v is None else float(v)


def line(run, exact: bool = False) -> np.ndarray:
    return np.array([fitted(run, "slope", exact), fitted(run, "intercept", exact)])


def steps_to_converge(run) -> float:
    """Steps until the gap to the exact optimum stays within tolerance; steps + 1 if it never did (censored)."""
    if not completed(run):
        return NAN
    s = run.summary.get("steps_to_converge")
    return float(run.summary["steps"] + 1 if s is None else s)


def dataset(run) -> data.Dataset:
    return data.load(Path(run.dir) / "data.npz")


def read_scalars(run_dir, tags) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(steps, values) of each scalar tag in the run's event files (TFRecord framing, Event protos)."""
    from tensorboard.compat.proto import event_pb2

    found = {t: ([], []) for t in tags}
    for path in sorted(Path(run_dir).glob("events.out.tfevents.*")):
        raw, pos = path.read_bytes(), 0
        while pos + 12 <= len(raw):
            (length,) = struct.unpack_from("<Q", raw, pos)
            event = event_pb2.Event.FromString(raw[pos + 12:pos + 12 + length])
            pos += 12 + length + 4  # header (length + its crc), data, data crc
            for v in event.summary.value:
                if v.tag in found and v.WhichOneof("value") == "simple_value":
                    found[v.tag][0].append(event.step)
                    found[v.tag][1].append(v.simple_value)
    return {t: (np.array(s, dtype=np.int64), np.array(v, dtype=np.float64)) for t, (s, v) in found.items()}


def table(header: list[str], rows: list[list]) -> str:
    """A Markdown table (a '|' inside a cell is escaped)."""
    def cell(c):
        return (fmt(c) if isinstance(c, float) else str(c)).replace("|", "\\|")
    out = ["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(map(cell, row)) + " |" for row in rows]
    return "\n".join(out)


def fmt(x) -> str:
    """The claims report's numbers: lab.rundir.fmt with 3 significant digits and NaN as 'n/a'."""
    return rundir.fmt(x, digits=3, missing="n/a")



# ---------------------------------------------------------------------------------------------------
# Claims about the loss functions themselves (no training)


def error_grid(max_error: float, step: float) -> np.ndarray:
    """Residuals -max..max in `step`s, rounded so that 0, 1 and the ends are hit exactly."""
    count = round(max_error / step)
    return np.round(np.arange(-count, count + 1) * step, 12)


@measure("penalty_table", {
    "mse_at": "MSE penalty of miss {at:g}",
    "mae_at": "MAE penalty of miss {at:g}",
    "mse_exponent": "MSE growth exponent p (penalty ~ miss^p)",
    "mae_exponent": "MAE growth exponent p",
}, defaults={"misses": [1, 2, 3, 4, 5, 6], "at": 4}, needs_runs=False)
def penalty_table(runs, params) -> Measurement:
    """Claim 1: the penalty of misses 1..k under the lab's MSELoss and MAELoss (per element, target 0)."""
    misses = np.asarray(params["misses"], dtype=np.float64)
    if params["at"] not in params["misses"]:
        raise ValueError(f"penalty_table: at={params['at']} is not one of the misses {params['misses']}")
    mse, mae = penalties("mse", misses), penalties("mae", misses)
    i = list(misses).index(params["at"])
    rows = [[f"{m:g}", float(a), float(b), float(a / b)] for m, a, b in zip(misses, mse, mae)]
    return Measurement(
        values={"mse_at": [float(mse[i])], "mae_at": [float(mae[i])],
                "mse_exponent": [power_law_exponent(misses, mse)], "mae_exponent": [power_law_exponent(misses, mae)]},
        details=table(["miss (rings)", "MSE penalty", "MAE penalty", "MSE / MAE"], rows),
        plots={"target_practice": {"kind": "penalties", "misses": misses, "mse": mse, "mae": mae}})


@measure("gradient_flow", {
    "mse_exponent": "MSE gradient exponent p (|g| ~ |e|^p)",
    "mae_spread": "MAE gradient spread (max-min)/mean",
    "huber_exponent_below": "Huber gradient exponent below delta",
    "huber_spread_above": "Huber gradient spread above delta",
    "huber_switch": "Huber switch point (delta = {delta:g})",
    "huber_switch_error": "Huber |switch point - delta|",
    "mse_over_mae_at_4": "MSE/MAE gradient at |e| = 4",
}, defaults={"max_error": 4.0, "step": 0.01, "delta": 1.5, "tau": 0.9}, needs_runs=False)
def gradient_flow(runs, params) -> Measurement:
    """Claim 4: |dl/dy_hat| against the error, through autograd on the lab's modules (not by formula)."""
    e = error_grid(params["max_error"], params["step"])
    delta, pos = params["delta"], e > 0
    g = {"MSE": gradients("mse", e), "MAE": gradients("mae", e),
         f"Huber (delta={delta:g})": gradients("huber", e, delta=delta), "log-cosh": gradients("log_cosh", e),
         f"quantile (tau={params['tau']:g})": gradients("quantile", e, tau=params["tau"])}
    mse, mae, huber = (np.abs(g[k]) for k in list(g)[:3])
    below, above = pos & (e < delta), pos & (e > delta)
    switch = plateau_start(e[pos], huber[pos])
    at4 = np.isclose(np.abs(e), 4.0)
    return Measurement(
        values={"mse_exponent": [power_law_exponent(e[pos], mse[pos])],
                "mae_spread": [_spread(mae[e != 0])],
                "huber_exponent_below": [power_law_exponent(e[below], huber[below])],
                "huber_spread_above": [_spread(huber[above])],
                "huber_switch": [switch], "huber_switch_error": [abs(switch - delta)],
                "mse_over_mae_at_4": [float(mse[at4].mean() / mae[at4].mean()) if at4.any() else NAN]},
        details=table(["error e", *g], [[f"{a:g}", *(float(abs(v[np.isclose(e, a)][0])) for v in g.values())]
                                    for a in (0.01, 0.5, 1.0, delta, 2.0, 4.0) if np.isclose(e, a).any()]),
        plots={"gradient_flow": {"kind": "gradients", "errors": e, "curves": {k: np.abs(v) for k, v in g.items()},
                                 "delta": delta}})


def _spread(v) -> float:
    v = np.asarray(v, float)
    return float((v.max() - v.min()) / abs(v.mean())) if v.size and v.mean() != 0 else NAN


@measure("log_cosh_limits", {
    "small_rel_error": "relative gap to MSE/2 (|e| <= {small:g})",
    "large_abs_error": "gap to MAE - log 2 (|e| >= {large:g})",
    "small_grad_rel_error": "relative gradient gap to MSE/2 (|e| <= {small:g})",
    "large_grad_error": "gradient gap to MAE (|e| >= {large:g})",
}, defaults={"small": 0.1, "large": 5.0, "max_error": 10.0, "step": 0.001}, needs_runs=False)
def log_cosh_limits(runs, params) -> Measurement:
    """Claim 10: log-cosh against MSE/2 near 0 and MAE - log 2 far out (lab modules; gradients by autograd)."""
    e = error_grid(params["max_error"], params["step"])
    small, large = (e != 0) & (np.abs(e) <= params["small"]), np.abs(e) >= params["large"]
    lc, half_mse = penalties("log_cosh", e), penalties("mse", e) / 2
    mae_shift = penalties("mae", e) - math.log(2)
    g_lc, g_half, g_mae = gradients("log_cosh", e), gradients("mse", e) / 2, gradients("mae", e)
    rows = [[f"{a:g}", float(lc[i]), float(half_mse[i]), float(mae_shift[i])]
            for a in (0.01, 0.1, 0.5, 1, 2, 5, 10) for i in np.flatnonzero(np.isclose(e, a))[:1]]
    return Measurement(
        values={"small_rel_error": [float((np.abs(lc - half_mse)[small] / half_mse[small]).max())],
                "large_abs_error": [float(np.abs(lc - mae_shift)[large].max())],
                "small_grad_rel_error": [float((np.abs(g_lc - g_half)[small] / np.abs(g_half[small])).max())],
                "large_grad_error": [float(np.abs(g_lc - g_mae)[large].max())]},
        details=table(["e", "log cosh(e)", "e^2 / 2 (MSE/2)", "abs(e) - log 2 (MAE - log 2)"], rows),
        plots={"log_cosh": {"kind": "log_cosh", "errors": e, "log_cosh": lc, "half_mse": half_mse,
                            "mae_minus_log2": mae_shift, "small": params["small"], "large": params["large"]}})
