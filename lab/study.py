"""Studies: train a sweep's runs in as few populations as possible, and write their run directories.

config (+ sweep grid) -> runs (lab.sweeps) -> populations (lab.trainer) -> run directories (lab.rundir, lab.events)

A failure never loses another run's results: each population is trained under its own guard; if one
raises, its runs are retried alone, so only the run that really fails is recorded as `failed`.
"""

from __future__ import annotations

import re
import signal
import sys
import time
import traceback
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from tensorboard.compat.proto import summary_pb2
from tensorboard.compat.proto.tensor_pb2 import TensorProto
from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.custom_scalar import metadata as custom_scalar_metadata

from lab import atomic, data, events, rundir, trainer
from lab import config as config_mod
from lab.config import Config
from lab.events import EventWriter
from lab.sweeps import Run, check_fits

# Keys always shown in the HParams dashboard (same key set for every run), besides the swept ones.
HPARAM_KEYS = ("data.kind", "loss.name", "model.kind", "optim.name", "optim.lr", "optim.schedule", "seed")
FINAL_METRICS = {"final/loss_train": "loss/train", "final/gap": "convergence/gap", "final/val_mse": "loss/val_mse",
                 "final/flip_rate": "oscillation/flip_rate", "final/grad_outlier_share": "grad/outlier_share"}


def draw_data(runs: list[Run]) -> None:
    """Draw each run's dataset now, before any directory is written; `execute` trains on it, never draws twice.

    Data the run's dtype cannot hold (target_scale = 1e38 in float32, Student-t noise with a tiny df)
    is bad input, not a failed run: the same draw overflows on every try. Raises data.DataRangeError
    that counts every such run and names the first five. Any other error of a draw is left to `execute`,
    which draws that run again and records it as failed, so it costs no other run its results.
    """
    bad = []
    for r in runs:
        if r.dataset is not None:
            continue
        try:
            r.dataset = _make_data(r.config)
        except data.DataRangeError as e:
            bad.append((r, e))
        except Exception:  # noqa: BLE001, S110 — execute meets it again and records it in this run's summary
            pass
    if not bad:
        return
    if len(runs) == 1:
        raise bad[0][1]
    shown = [", ".join(f"{k}={v}" for k, v in r.swept.items()) or r.name for r, _ in bad[:5]]
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    raise data.DataRangeError(f"{len(bad)} of {len(runs)} runs draw data their dtype cannot hold "
                              f"({'; '.join(shown)}{more}); the first: {bad[0][1]}")


def _make_data(cfg: Config) -> data.Dataset:
    # drawn in the run's dtype: a float64 run gets float64 noise, not float32 values widened
    return data.make(cfg.data.kind, seed=cfg.seed, dtype=getattr(torch, cfg.dtype), **config_mod.data_params(cfg.data))


class _Stop:
    """Ctrl-C and SIGTERM stop a study the same way: the first one interrupts the training (it finishes
    its flush, the runs are marked interrupted); any later one is ignored until the study has written
    every run's files. A second Ctrl-C used to land in that writing and lose a population's summaries
    and logs; the writing is bounded (files of runs already trained), and --resume needs it whole."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self.deferred = 0  # signals that came once stopping had begun (ignored; a caller may still report them)

    def __enter__(self):
        self.previous = {s: signal.getsignal(s) for s in self.SIGNALS}
        try:
            for s in self.SIGNALS:
                signal.signal(s, self._handle)
        except ValueError:  # not the main thread
            pass
        return self

    def _handle(self, signum, frame):
        if self.requested:  # already stopping: the files of the runs are being written
            self.deferred += 1
            return
        self.requested = True
        raise KeyboardInterrupt

    def __exit__(self, *exc):
        try:
            for s, handler in self.previous.items():
                signal.signal(s, handler)
        except ValueError:
            pass


def execute(runs: list[Run], runs_dir: Path, figures: bool = False, on_done: Callable[[Run], None] | None = None,
            flush_every: int = 50) -> tuple[list[Run], bool]:
    """Train every run (grouped into populations) and write its directory.

    Returns (runs, interrupted). Runs whose `dir` is already set are written there (resume);
    the others get a new directory made atomically below runs_dir. A run's `dataset`, if `draw_data`
    drew it, is trained on and then dropped; one that does not fit its dtype fails that run alone.
    """
    check_fits([r.config for r in runs])
    interrupted = False
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        groups.setdefault(trainer.population_key(r.config), []).append(r)
    hkeys = list(dict.fromkeys(list(HPARAM_KEYS) + [k for r in runs for k in r.swept]))
    # Files are synced in batches, not one fsync each: see _train_population for the order. The collector
    # leaves the objects of the study's start alone throughout (trainer.frozen_gc).
    with _Stop() as stop, atomic.deferred_sync(), trainer.frozen_gc():
        for population in groups.values():
            if interrupted:
                for r in population:
                    r.dataset = None
                    flat = _prepare(r, runs_dir)
                    _finish(r, None, "interrupted", hkeys, None, flat)
                    _notify(on_done, r)
                continue
            try:
                interrupted = _train_population(population, runs_dir, figures, hkeys, on_done, flush_every, stop)
            except KeyboardInterrupt:
                interrupted = True
            finally:
                for r in population:  # a 10,000-run sweep holds only the populations still to train
                    r.dataset = None
    return runs, interrupted


def _error_line(e: BaseException, limit: int = 400) -> str:
    """A run's error as summary.json's one line: its type and the first line of its message, cut at `limit`
    characters. Some messages run on for lines (a torch allocation failure carries its C++ stack), which broke
    the progress line and the report's table; the whole message stays in the summary's `traceback`."""
    first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    line = f"{e.__class__.__name__}: {first}" if first else e.__class__.__name__
    return line if len(line) <= limit else line[:limit - 3] + "..."


def _notify(on_done, run):
    if on_done:
        on_done(run)


def _prepare(run: Run, runs_dir: Path) -> dict:
    """Make the run's directory and write its config.toml; returns the flat config for later files."""
    if run.dir is None:
        run.dir = rundir.create(runs_dir, run.name)
    table = config_mod.to_dict(run.config)
    rundir.write_config(run.dir, table)
    return config_mod.flatten(table)  # = config_mod.to_flat(run.config), built once per run


def _train_population(population: list[Run], runs_dir, figures, hkeys, on_done, flush_every, stop) -> bool:
    """Train one population; on an exception retry its runs alone so one bad run fails alone.

    Durability (what an OS crash or power loss may take; a killed process loses nothing written):
    --resume skips a run whose summary.json says completed and keeps the files beside it, which
    lab.claim_measures reads (data.npz, the event file), so those must be on disk whenever such a
    summary is. The summary itself need not be: lost, empty or cut short, it reads as broken and
    --resume trains the run again, rewriting config.toml and data.npz. So nothing is fsynced per
    file: every file of the population is synced at once before its first summary is written, and
    once more after the summaries, so a finished population stays finished. Two sync(2) calls per
    population instead of three fsyncs per run, and the event files, never synced before, are now
    covered too. A failed or interrupted run needs no order: its status makes --resume retrain it.
    """
    datasets, writers = [], []
    flats = [_prepare(r, runs_dir) for r in population]
    try:
        for r in population:
            if r.dataset is None:  # kept on the run: a retry of this population alone does not draw it again
                r.dataset = _make_data(r.config)
            r.dataset.save(r.dir / "data.npz")
            datasets.append(r.dataset)
        writers = [EventWriter(r.dir) for r in population]
        for flat, w in zip(flats, writers):
            w.add_text("config", _config_markdown(flat))
        flusher = _Flusher(writers)  # one for both callbacks: scalars and histograms share the budget
        results = trainer.train([r.config for r in population], datasets, on_log=_log_writer(writers, flusher),
                                on_hist=_hist_writer(writers, flusher), flush_every=flush_every,
                                should_stop=lambda: stop.requested)
    except KeyboardInterrupt:
        for r, w, flat in zip(population, writers or [None] * len(population), flats):
            _finish(r, None, "interrupted", hkeys, w, flat)
        for r in population:  # (told after every summary is written: a callback that fails loses none)
            _notify(on_done, r)
        return True
    except Exception as e:  # noqa: BLE001 — recorded per run, never lost
        for w in writers:
            w.close()
        for r in population:  # the retry starts a fresh event file in the same directory
            for f in r.dir.glob("events.out.tfevents.*"):
                f.unlink()
        if len(population) > 1:
            interrupted = False
            for r in population:
                interrupted = _train_population([r], runs_dir, figures, hkeys, on_done, flush_every, stop) or interrupted
                if interrupted:
                    break
            return interrupted
        r = population[0]
        _finish(r, None, "failed", hkeys, None, flats[0], error=_error_line(e),
                trace=traceback.format_exc(limit=8))
        _notify(on_done, r)
        return False
    for r, w, ds, res, flat in zip(population, writers, datasets, results, flats):
        if figures:
            try:
                _figures(r, w, ds, res)
            except Exception as e:  # noqa: BLE001 — a figure never costs the results (this run's or the others')
                print(f"note: figures of {r.name} skipped: {e.__class__.__name__}: {e}", file=sys.stderr)
        _close_events(res, hkeys, w, flat)
    atomic.sync()  # every file a summary vouches for is on disk before any summary is
    for r, res, flat in zip(population, results, flats):
        _write_summary(r, res, res.status, flat)
    atomic.sync()
    for r in population:  # told once every summary is written: a callback that fails (a progress line to
        _notify(on_done, r)  # a closed pipe) cost the summaries after it
    return any(res.status == "interrupted" for res in results)


class _Flusher:
    """Flushes a population's event writers together, and rarely: a file open and write per run is
    the costly part of writing events, so records wait in memory until one of

      - `max_bytes` wait in all the writers together (memory stays bounded whatever the number of
        runs; checked after scalars and histograms alike),
      - at the end of a scalar block, `seconds` have passed since the last flush (a TensorBoard
        watching the study sees new points within that delay plus its reload interval), and at
        least `cost_ratio` times as long as the last flush took, so that flushing costs at most
        1 / cost_ratio of the study's time however many runs it holds.

    `seconds` is TensorBoard's own default reload interval (5 s): flushing more often shows nothing
    sooner, and a round costs a file open and write per run (~0.2 ms each on the 2-core machine, under
    cProfile); at 2 s a study of a few seconds paid a round in the middle of its training for nothing.

    A process that dies loses what waits; its runs have no completed summary, so --resume trains
    them again from a fresh event file anyway.
    """

    def __init__(self, writers: list[EventWriter], max_bytes: int = 64 << 20, seconds: float = 5.0,
                 cost_ratio: float = 20.0):
        self.writers, self.max_bytes, self.seconds, self.cost_ratio = writers, max_bytes, seconds, cost_ratio
        self.last, self.cost = time.monotonic(), 0.0

    def __call__(self, block_end: bool) -> None:
        start = time.monotonic()
        due = block_end and start - self.last >= max(self.seconds, self.cost_ratio * self.cost)
        if due or sum(w.pending_bytes for w in self.writers) >= self.max_bytes:
            for w in self.writers:
                w.flush()
            self.last = time.monotonic()
            self.cost = self.last - start


def _log_writer(writers, flusher: _Flusher | None = None):
    flusher = _Flusher(writers) if flusher is None else flusher

    def on_log(block: trainer.LogBlock):
        # One encoding pass for the whole population: every run logs the same tags at the same steps.
        events.add_scalar_blocks(writers, block.tags, block.steps, block.values, block.wall_time)
        flusher(block_end=True)
    return on_log


def _hist_writer(writers, flusher: _Flusher | None = None):
    flusher = _Flusher(writers) if flusher is None else flusher

    def on_hist(step, tag, counts, lo, hi):
        # counts [N, bins], lo and hi [N]: run i's bins are equal between lo[i] and hi[i]. A diverged
        # run's range overflows even float64 and gives inf and NaN edges and sums, as it always did.
        with np.errstate(over="ignore", invalid="ignore"):
            edges = _linspace_rows(lo, hi, counts.shape[1])  # [N, bins + 1] float64: float32 would overflow
            mids = (edges[:, :-1] + edges[:, 1:]) / 2
            sums, sum_squares = (counts * mids).sum(axis=1), (counts * mids**2).sum(axis=1)
        events.add_histograms_raw(writers, tag, step, min=lo, max=hi, num=np.trunc(counts.sum(axis=1)), sum=sums,
                                  sum_squares=sum_squares, bucket_limits=edges[:, 1:], bucket_counts=counts)
        flusher(block_end=False)
    return on_hist


def _linspace_rows(lo, hi, bins: int) -> np.ndarray:
    """np.linspace(lo[i], hi[i], bins + 1) in float64 for every row i at once, bit for bit ([N] -> [N, bins + 1]).

    np.linspace with array ends is not the same: it takes its tiny-step branch (numpy gh-5437, which
    divides before it multiplies) for every row as soon as one row's step is zero.
    """
    if bins < 1:
        raise ValueError(f"need at least 1 bin, got {bins}")
    lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    k = np.arange(bins + 1, dtype=np.float64)
    delta = hi - lo
    step = delta / bins
    edges = k * step[:, None]
    zero = step == 0
    if zero.any():
        edges[zero] = k / bins * delta[zero, None]
    edges += lo[:, None]
    edges[:, -1] = hi
    return edges


def _config_markdown(flat: dict) -> str:
    rows = ["| key | value |", "| --- | --- |"]
    rows += [f"| {k} | {v} |" for k, v in flat.items()]
    return "\n".join(rows)


def _finish(run: Run, res: trainer.RunResult | None, status: str, hkeys, writer, flat: dict | None = None,
            error=None, trace=None) -> None:
    """Close the event file (with the hparams record) and write summary.json (atomically)."""
    flat = config_mod.to_flat(run.config) if flat is None else flat
    try:
        # A run with no event file (it failed, or a Ctrl-C came before its population started) gets one
        # with its hparams and end status: TensorBoard's HParams dashboard lists every run of a study.
        writer = EventWriter(run.dir) if writer is None else writer
        _close_events(res, hkeys, writer, flat, status)
    except OSError as e:  # (no event file, then: the summary still says what happened)
        print(f"note: {run.name}: event file not written: {e}", file=sys.stderr)
    _write_summary(run, res, status, flat, error, trace)


# A run's status as the HParams dashboard's session status (it has no word for interrupted)
_SESSION_STATUS = {"completed": "success", "diverged": "failure", "failed": "failure", "interrupted": "unknown"}


def _close_events(res: trainer.RunResult | None, hkeys, writer, flat: dict, status: str | None = None) -> None:
    """The custom-scalars layout (where scalars were logged over the steps) and the hparams record with the
    run's end status (its final metrics where it has results, NaN where not), then close."""
    if res is not None and flat.get("train.log_every"):  # (logging off: no series for the layout's charts)
        writer.add_summary(custom_scalars_layout(res.final), step=0)
    hparams = {k: _hparam_value(flat.get(k)) for k in hkeys}
    final = res.final if res is not None else {}
    metrics = {m: final.get(tag, float("nan")) for m, tag in FINAL_METRICS.items()}
    # experiment=False: TensorBoard unions the hparams of every run below --logdir, so runs of
    # sweeps with different swept keys all show their columns (with one experiment summary per
    # run, the plugin would take an arbitrary run's columns for all).
    writer.add_hparams(hparams, metrics, step=max(res.steps, 0) if res is not None else 0, experiment=False,
                       status=_SESSION_STATUS[res.status if res is not None else status])
    writer.close()


def _write_summary(run: Run, res: trainer.RunResult | None, status: str, flat: dict | None = None,
                   error=None, trace=None) -> None:
    flat = config_mod.to_flat(run.config) if flat is None else flat
    summary = {"status": status, "name": run.name, "swept": rundir.config_values(run.swept),
               "config": rundir.config_values(flat),
               "resolved": _resolved(run.config)}
    if res is not None:
        summary.update(steps=res.steps, params=res.params, reference=res.reference, final=res.final,
                       steps_to_converge=res.steps_to_converge, diverged_step=res.diverged_step,
                       last_finite=res.last_finite, wall_s=res.wall_s, population_size=res.population_size)
    if error:
        summary["error"] = error
        summary["traceback"] = trace
    rundir.write_summary(run.dir, summary)
    run.summary = summary


def _resolved(cfg: Config) -> dict:
    """Loss and dataset parameters with the defaults the user did not set (e.g. huber's delta = 1.0)."""
    try:
        loss = {k: list(v) if isinstance(v, tuple) else v for k, v in config_mod.loss_params(cfg).items()}
        params = data.check(cfg.data.kind, **config_mod.data_params(cfg.data))
        return {"loss": loss, "data": {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()}}
    except ValueError:
        return {}


def _hparam_value(v):
    """A value the HParams plugin can show: lists as 'a,b'; None (a parameter this run's loss does
    not take) stays None, which the plugin skips, so a numeric column stays numeric."""
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v))
    return v


def custom_scalars_layout(tags) -> summary_pb2.Summary:
    """The Custom Scalars dashboard's layout: one category per tag namespace, one chart per tag.

    Each chart's regex matches exactly one tag, and a custom-scalars chart draws that tag for every
    run, so e.g. `loss/train` of all losses of a sweep lands on one chart. Every run writes the same
    layout; TensorBoard merges the layouts of all runs and drops repeated charts.
    """
    return summary_pb2.Summary.FromString(_custom_scalars_layout(tuple(tags)))


@lru_cache(maxsize=64)
def _custom_scalars_layout(tags: tuple[str, ...]) -> bytes:
    """The serialised layout, built once per tag tuple: every run of a population has the same tags."""
    by_namespace: dict[str, list[str]] = {}
    for tag in tags:
        by_namespace.setdefault(tag.split("/")[0], []).append(tag)
    layout = layout_pb2.Layout(category=[
        layout_pb2.Category(title=namespace, chart=[
            layout_pb2.Chart(title=tag, multiline=layout_pb2.MultilineChartContent(tag=[f"^{re.escape(tag)}$"]))
            for tag in namespace_tags])
        for namespace, namespace_tags in by_namespace.items()])
    tensor = TensorProto(dtype="DT_STRING", string_val=[layout.SerializeToString()],
                         tensor_shape=TensorShapeProto())
    return summary_pb2.Summary(value=[summary_pb2.Summary.Value(
        tag=custom_scalar_metadata.CONFIG_SUMMARY_TAG, metadata=custom_scalar_metadata.create_summary_metadata(),
        tensor=tensor)]).SerializeToString()


def _figures(run: Run, writer, ds, res) -> None:
    from lab import figures  # matplotlib only when figures are asked for

    out = run.dir / "figures"
    out.mkdir(exist_ok=True)
    for name, png in figures.run_figures(run.config, ds, res).items():
        rundir.write_atomic(out / f"{name}.png", png)
        writer.add_image(f"figures/{name}", png, step=max(res.steps, 0))
