"""lab.study: a run's figures never cost results, every file of a run directory is written atomically and
synced in an order that keeps --resume right, and a population's events are the bytes one writer per run wrote.

Runs here are tiny (20 steps over 40 points on the CPU) so each test takes well under a second of training.
"""

import json
import os
import signal
import struct
import tomllib
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.custom_scalar import layout_pb2

from lab import atomic, config, figures, rundir, study, sweeps, trainer
from lab.events import EventWriter

TINY = {"device": "cpu", "data.n": 40, "data.n_val": 20, "train.steps": 20, "train.log_every": 10,
        "train.hist_every": 0}


def _runs(*losses):
    return [sweeps.Run(config=config.from_flat({**TINY, "loss.name": loss}), name=f"clean-{loss}-s0") for loss in losses]


def test_a_figure_that_raises_costs_no_summary(tmp_path, monkeypatch, capsys):
    # Both runs train as one population; drawing the first run's figures raises. Before the guard the
    # exception left execute() and the second run never got its summary.json.
    def broken(cfg, ds, res):
        raise RuntimeError("no display")

    monkeypatch.setattr(figures, "run_figures", broken)
    runs, interrupted = study.execute(_runs("mse", "mae"), tmp_path, figures=True)
    assert not interrupted
    for r in runs:
        s = json.loads((r.dir / "summary.json").read_text())
        assert s["status"] == "completed" and r.summary["status"] == "completed"
    err = capsys.readouterr().err
    assert err.count("note: figures of") == 2 and "RuntimeError: no display" in err


def test_every_file_of_a_run_directory_is_written_atomically(tmp_path, monkeypatch):
    # Spy on rundir.write_atomic: the figures and the result files go through it (data.npz has its own
    # atomic write in lab.data, tested in test_data.py).
    written = []
    real = rundir.write_atomic

    def spy(path, payload):
        written.append(path.relative_to(tmp_path).as_posix())
        real(path, payload)

    monkeypatch.setattr(rundir, "write_atomic", spy)
    (run,), _ = study.execute(_runs("huber"), tmp_path, figures=True)
    assert set(written) == {"clean-huber-s0/config.toml", "clean-huber-s0/figures/fit.png",
                            "clean-huber-s0/figures/residuals.png", "clean-huber-s0/summary.json"}
    assert (run.dir / "figures" / "fit.png").read_bytes()[:4] == b"\x89PNG"
    assert (run.dir / "data.npz").is_file()
    assert not [p for p in run.dir.rglob(".*.tmp")]  # no temporary left behind


# -- writing a population's events: the same bytes as one writer per run ----------------------------

def _data_records(path):
    """The data of each record after the file_version record (framing checked by test_events)."""
    raw, out, pos = Path(path).read_bytes(), [], 0
    while pos < len(raw):
        (length,) = struct.unpack_from("<Q", raw, pos)
        out.append(raw[pos + 12:pos + 12 + length])
        pos += 16 + length
    return out[1:]


def _old_histogram(step, tag, c, lo, hi, wall_time):
    """One run's histogram as lab.study wrote it before it was vectorised: np.linspace per run and
    a HistogramProto built by TensorBoard's protos."""
    with np.errstate(over="ignore", invalid="ignore"):  # a diverged run: inf and NaN edges
        edges = np.linspace(float(lo), float(hi), len(c) + 1)
        mids = (edges[:-1] + edges[1:]) / 2
        sums, sum_squares = float((c * mids).sum()), float((c * mids**2).sum())
    histo = summary_pb2.HistogramProto(min=float(lo), max=float(hi), num=int(c.sum()), sum=sums,
                                       sum_squares=sum_squares, bucket_limit=edges[1:].tolist(), bucket=c.tolist())
    return event_pb2.Event(wall_time=wall_time, step=step, summary=summary_pb2.Summary(
        value=[summary_pb2.Summary.Value(tag=tag, histo=histo)])).SerializeToString()


def _histogram_population(dtype):
    """counts [N, 30], lo [N], hi [N] as lab.metrics.histogram returns them, with the hard rows first."""
    rng = np.random.default_rng(7)
    n = 300  # many rows: a per-row sum in another order would differ somewhere
    counts = rng.integers(0, 50, (n, 30)).astype(dtype)
    lo = (rng.standard_normal(n) * 10.0 ** rng.integers(-5, 5, n)).astype(dtype)
    hi = (lo + rng.random(n) * 10.0 ** rng.integers(-5, 5, n)).astype(dtype)
    big = np.finfo(dtype).max  # metrics.histogram maps +-inf to the dtype's extremes: a diverged run
    lo[0], hi[0] = -big, big
    lo[1] = hi[1] = 2.5  # every value equal: linspace's zero-step branch, all counts in one bin
    counts[1] = 0
    counts[1, 0] = 40
    lo[2], hi[2] = 0.0, 1e-320  # a subnormal range whose step underflows to zero
    lo[3], hi[3] = 0.0, 1.0  # min = 0.0: protobuf leaves the field out
    return counts, lo, hi


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_population_histograms_are_the_bytes_of_one_proto_per_run(tmp_path, dtype):
    counts, lo, hi = _histogram_population(dtype)
    writers = [EventWriter(tmp_path / str(i)) for i in range(len(counts))]
    on_hist = study._hist_writer(writers)
    on_hist(200, "residual/values", counts, lo, hi)
    on_hist(0, "grad/per_sample_abs", counts[::-1].copy(), lo[::-1].copy(), hi[::-1].copy())  # step 0: no field
    for i, w in enumerate(writers):
        w.close()
        first, second = _data_records(w.path)
        wall_time = event_pb2.Event.FromString(first).wall_time  # time.time() at the call
        j = len(counts) - 1 - i
        assert first == _old_histogram(200, "residual/values", counts[i], lo[i], hi[i], wall_time), i
        assert second == _old_histogram(0, "grad/per_sample_abs", counts[j], lo[j], hi[j],
                                        event_pb2.Event.FromString(second).wall_time), i
    diverged = event_pb2.Event.FromString(_data_records(writers[0].path)[0]).summary.value[0].histo
    assert diverged.bucket_limit[-1] == float(np.finfo(dtype).max)  # the right edge survives float64


def test_linspace_rows_is_np_linspace_row_by_row():
    _, lo, hi = _histogram_population(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):  # row 0's range overflows: inf and NaN edges
        ours = study._linspace_rows(lo, hi, 30)
        theirs = np.stack([np.linspace(a, b, 31) for a, b in zip(lo, hi)])
        # Why not np.linspace(lo, hi, 31, axis=-1): one zero step sends every row down the other branch.
        arrays = np.linspace(lo, hi, 31, axis=-1)
    assert ours.tobytes() == theirs.tobytes()  # bit for bit, NaN and inf edges of row 0 included
    assert arrays.tobytes() != theirs.tobytes()


def test_population_scalars_reach_each_run_at_the_blocks_wall_time(tmp_path):
    tags = ("loss/train", "grad/norm")
    values = np.arange(60, dtype=np.float32).reshape(10, 2, 3)  # [S, T, N]
    block = trainer.LogBlock(np.arange(0, 100, 10), tags, values, 1.7e9)
    writers = [EventWriter(tmp_path / "population" / str(i)) for i in range(3)]
    study._log_writer(writers)(block)
    for i, w in enumerate(writers):
        w.close()
        with EventWriter(tmp_path / "single" / str(i)) as single:
            single.add_scalar_block(tags, block.steps, values[:, :, i], wall_times=1.7e9)
        assert _data_records(w.path) == _data_records(single.path)
        (record,) = {event_pb2.Event.FromString(r).wall_time for r in _data_records(w.path)}
        assert record == 1.7e9


def test_flusher_waits_for_bytes_or_time_at_block_ends(tmp_path, monkeypatch):
    now = [0.0]
    monkeypatch.setattr(study.time, "monotonic", lambda: now[0])
    writers = [EventWriter(tmp_path / str(i)) for i in range(2)]
    flusher = study._Flusher(writers, max_bytes=1000, seconds=2.0, cost_ratio=20.0)

    def on_disk():
        return [os.path.getsize(w.path) for w in writers]

    empty = on_disk()  # the file_version records only
    # A record of one scalar "a" at a 1-byte step: 16 framing bytes + Event 0x09 wall(8), 0x10 step(1),
    # 0x2a len, Summary{0x0a len Value{0x0a 0x01 "a" 0x15 float(4)}} = 16 + 9 + 2 + 2 + 10 = 39 bytes.
    for w in writers:
        w.add_scalars(0, {"a": 1.0})  # 2 x 39 bytes wait
    now[0] = 1.9
    flusher(block_end=True)
    assert on_disk() == empty  # under 2 s and 1000 bytes: nothing written yet
    now[0] = 2.0
    flusher(block_end=False)
    assert on_disk() == empty  # histograms never flush on time alone
    flusher(block_end=True)
    assert [size - e for size, e in zip(on_disk(), empty)] == [39, 39]
    now[0] = 3.0
    writers[0].add_scalar_block(["a"], np.arange(20), np.zeros((20, 1)))  # 20 x 39 = 780 bytes
    flusher(block_end=True)
    assert on_disk()[0] == empty[0] + 39  # 1 s since the last flush, 780 bytes: they wait
    writers[1].add_scalar_block(["a"], np.arange(20), np.zeros((20, 1)))  # 1560 bytes in all
    flusher(block_end=False)
    assert [size - e for size, e in zip(on_disk(), empty)] == [21 * 39, 21 * 39]  # over max_bytes: at once


# -- run directories: synced in batches, in an order that keeps --resume right ------------------

@pytest.mark.skipif(not atomic._SYNC_WAITS, reason="needs a sync(2) that waits (Linux)")
def test_a_summary_is_never_durable_before_the_files_it_vouches_for(tmp_path, monkeypatch):
    # At each sync(2), note the files and their sizes: the first sync must see every config.toml,
    # data.npz and complete event file and no summary.json; the last must see everything.
    snapshots, fsyncs = [], []
    monkeypatch.setattr(os, "sync", lambda: snapshots.append(
        {p.relative_to(tmp_path).as_posix(): p.stat().st_size for p in tmp_path.rglob("*") if p.is_file()}))
    monkeypatch.setattr(os, "fsync", fsyncs.append)
    runs = [sweeps.Run(config=config.from_flat({**TINY, "train.hist_every": 10, "loss.name": loss}),
                      name=f"clean-{loss}-s0") for loss in ("mse", "huber")]
    study.execute(runs, tmp_path)
    final = {p.relative_to(tmp_path).as_posix(): p.stat().st_size for p in tmp_path.rglob("*") if p.is_file()}
    assert fsyncs == []  # no fsync per file
    assert len(snapshots) == 3  # before the summaries, after them, leaving the study
    before = snapshots[0]
    assert not [f for f in before if f.endswith("summary.json")]
    assert {f: s for f, s in final.items() if not f.endswith("summary.json")} == before
    assert len([f for f in before if "events.out.tfevents" in f]) == 2
    assert snapshots[1] == final


def test_run_directory_contents_come_from_the_config(tmp_path):
    # The flat config is built once per run now; every file must still hold what to_flat/to_dict say.
    (run,), _ = study.execute(_runs("huber"), tmp_path)
    flat = config.to_flat(run.config)
    assert json.loads((run.dir / "summary.json").read_text())["config"] == rundir.jsonable(flat)
    assert tomllib.loads((run.dir / "config.toml").read_text()) == config.to_dict(run.config)
    acc = EventAccumulator(str(run.dir), size_guidance={"tensors": 0})
    acc.Reload()
    text = acc.Tensors("config")[0].tensor_proto.string_val[0].decode()
    assert text.splitlines()[2:] == [f"| {k} | {v} |" for k, v in flat.items()]


def test_custom_scalars_layout_is_cached_but_returned_fresh():
    tags = ("loss/train", "grad/norm", "loss/val_mse")
    first = study.custom_scalars_layout(tags)
    layout = layout_pb2.Layout.FromString(first.value[0].tensor.string_val[0])
    assert [(c.title, [ch.title for ch in c.chart]) for c in layout.category] == [
        ("loss", ["loss/train", "loss/val_mse"]), ("grad", ["grad/norm"])]
    first.value[0].tag = "changed"  # a caller's change must not reach the next run's layout
    assert study.custom_scalars_layout(list(tags)).value[0].tag != "changed"


def test_a_float64_run_trains_on_float64_data(tmp_path):
    """The dataset is drawn in the run's dtype: a float64 run's data.npz equals lab.data.make(..., float64)
    bit for bit, and its noise is not float32 values widened to float64."""
    import torch

    from lab import data

    runs = sweeps.sweep_runs({"name": "f64", "dtype": "float64", "data.kind": "heavy_tailed", "data.n": 50,
                             "train.steps": 3, "train.figures": False}, {"seed": [0, 1]})
    study.execute(runs, tmp_path)
    for r in runs:
        saved = np.load(r.dir / "data.npz", allow_pickle=False)
        expected = data.make("heavy_tailed", seed=r.config.seed, n=50, dtype=torch.float64)
        y = saved["y_train"]
        assert y.dtype == np.float64
        assert np.array_equal(y, expected.y.numpy())
        assert not np.array_equal(y, y.astype(np.float32).astype(np.float64))


def test_draw_data_draws_each_dataset_once_and_execute_trains_on_it(tmp_path, monkeypatch):
    from lab import data

    calls = []
    real_make = data.make

    def make(kind, seed=0, **kw):
        calls.append(seed)
        return real_make(kind, seed=seed, **kw)

    monkeypatch.setattr(data, "make", make)
    runs = sweeps.sweep_runs({**TINY, "name": "once"}, {"seed": [0, 1, 2]})
    study.draw_data(runs)
    drawn = [r.dataset for r in runs]
    assert calls == [0, 1, 2] and all(d is not None for d in drawn)
    study.execute(runs, tmp_path)
    assert calls == [0, 1, 2]  # training reused the drawn data: no second draw
    assert all(r.summary["status"] == "completed" for r in runs)
    assert all(r.dataset is None for r in runs)  # let go once its population is trained
    for r, ds in zip(runs, drawn):
        assert np.array_equal(np.load(r.dir / "data.npz")["y_train"], ds.y.numpy())


def test_draw_data_names_the_runs_whose_data_overflows_and_defers_other_errors(monkeypatch):
    from lab import data

    real_make = data.make

    def make(kind, seed=0, **kw):  # seed 3 fails for a reason that is not the config's: left to execute
        if seed == 3:
            raise RuntimeError("disk on fire")
        return real_make(kind, seed=seed, **kw)

    monkeypatch.setattr(data, "make", make)
    runs = sweeps.sweep_runs({**TINY, "name": "big"}, {"data.target_scale": [1.0, 1e38], "seed": [0, 3]})
    with pytest.raises(data.DataRangeError) as error:
        study.draw_data(runs)
    assert str(error.value).startswith("1 of 4 runs draw data their dtype cannot hold (data.target_scale=1e+38, "
                                       "seed=0); the first: targets are not finite in float32")
    assert [r.dataset is not None for r in runs] == [True, False, False, False]
    # One run alone: its own message, nothing about counts.
    with pytest.raises(data.DataRangeError, match=r"^targets are not finite in float32 \("):
        study.draw_data([sweeps.Run(config=runs[2].config, name="one")])


def test_overflowing_data_fails_its_run_alone_when_execute_draws_it(tmp_path):
    # The library path (lab claims, lab.bench) draws inside execute: the run is recorded as failed and
    # the others of its population still train.
    runs = sweeps.sweep_runs({**TINY, "name": "lib"}, {"data.target_scale": [1.0, 1e38, 2.0]})
    study.execute(runs, tmp_path)
    assert [r.summary["status"] for r in runs] == ["completed", "failed", "completed"]
    assert runs[1].summary["error"].startswith("DataRangeError: targets are not finite in float32")


def test_a_second_interrupt_while_the_first_is_recorded_loses_nothing(tmp_path, monkeypatch):
    # Ctrl-C twice: the first stops the training, the second lands while the interrupted runs' files are
    # written (in _close_events, where a slow first import made it land in a real sweep). It used to cut
    # that writing short and leave the population without summaries; every run is recorded now.
    train, close = trainer.train, study._close_events

    def interrupted_train(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C, as the training starts
        return train(*args, **kwargs)

    def close_twice(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # the second, while the files are written
        return close(*args, **kwargs)

    monkeypatch.setattr(study.trainer, "train", interrupted_train)
    monkeypatch.setattr(study, "_close_events", close_twice)
    runs = _runs("mse", "mae")
    _, interrupted = study.execute(runs, tmp_path)
    assert interrupted
    assert [rundir.read_summary(r.dir)["status"] for r in runs] == ["interrupted", "interrupted"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # given back


def test_the_hparams_dashboard_shows_each_runs_own_status(tmp_path):
    # completed -> success, diverged -> failure (SummaryWriter's hparams wrote success for every run)
    from tensorboard.plugins.hparams import metadata as hparams_metadata

    runs = [sweeps.Run(config=config.from_flat({**TINY, "optim.lr": lr}), name=name)
            for lr, name in ((0.05, "calm"), (1e6, "wild"))]
    study.execute(runs, tmp_path)
    got = {}
    for r in runs:
        acc = EventAccumulator(str(r.dir))
        acc.Reload()
        content = acc.PluginTagToContent(hparams_metadata.PLUGIN_NAME)[hparams_metadata.SESSION_END_INFO_TAG]
        got[r.name] = (r.summary["status"], hparams_metadata.parse_session_end_info_plugin_data(content).status)
    assert got == {"calm": ("completed", 1), "wild": ("diverged", 2)}


def test_a_failed_run_records_its_error_on_one_line_and_whole_in_its_traceback(tmp_path, monkeypatch):
    # A torch allocation failure carries its C++ stack in the message: the summary's error ran over ~25
    # lines, and with it the sweep's progress line and the report's table. Expected: the type and the
    # message's first line; the rest in `traceback`; a message past 400 characters cut there.
    def fails(*args, **kw):
        raise RuntimeError("\n[enforce fail at alloc_cpu.cpp:117] not enough memory: you tried to allocate 40 GB\n"
                           "Exception raised from alloc_cpu at alloc_cpu.cpp:117\nframe #0: c10::Error")

    monkeypatch.setattr(study.trainer, "train", fails)
    runs = sweeps.sweep_runs({**TINY, "name": "oom"}, {"seed": [0]})
    study.execute(runs, tmp_path)
    s = runs[0].summary
    assert s["status"] == "failed"
    assert s["error"] == "RuntimeError: [enforce fail at alloc_cpu.cpp:117] not enough memory: you tried to allocate 40 GB"
    assert "frame #0: c10::Error" in s["traceback"]
    long = study._error_line(ValueError("x" * 1000))
    assert len(long) == 400 and long.startswith("ValueError: xxx") and long.endswith("...")


def _session_status(run_dir) -> int | None:
    """The HParams session status TensorBoard reads from a run's event files (1 success, 2 failure, 0 unknown)."""
    from tensorboard.plugins.hparams import metadata as hparams_metadata

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    content = acc.PluginTagToContent(hparams_metadata.PLUGIN_NAME).get(hparams_metadata.SESSION_END_INFO_TAG)
    return None if content is None else hparams_metadata.parse_session_end_info_plugin_data(content).status


def test_failed_and_never_started_runs_show_in_the_hparams_dashboard(tmp_path, monkeypatch):
    # A failed run's event file was deleted (for the retry alone) and none written after; the runs of a
    # population a Ctrl-C stopped before it started had none either: TensorBoard did not list them.
    # Expected: an event file with the hparams and the end status (failure; unknown for interrupted).
    real = study.trainer.train

    def mae_fails(cfgs, *args, **kw):
        if any(c.loss.name == "mae" for c in cfgs):
            raise RuntimeError("no mae today")
        return real(cfgs, *args, **kw)

    monkeypatch.setattr(study.trainer, "train", mae_fails)
    runs = _runs("mse", "mae")
    study.execute(runs, tmp_path)
    assert [r.summary["status"] for r in runs] == ["completed", "failed"]
    assert [_session_status(r.dir) for r in runs] == [1, 2]
    # Two populations (different step counts); the first is stopped by a Ctrl-C, the second never starts.
    calls = []

    def interrupted(cfgs, *args, **kw):
        calls.append(len(cfgs))
        raise KeyboardInterrupt

    monkeypatch.setattr(study.trainer, "train", interrupted)
    cut = [sweeps.Run(config=config.from_flat({**TINY, "train.steps": s}), name=f"cut{s}") for s in (20, 30)]
    _, stopped = study.execute(cut, tmp_path / "cut")
    assert stopped and calls == [1] and [r.summary["status"] for r in cut] == ["interrupted", "interrupted"]
    assert [_session_status(r.dir) for r in cut] == [0, 0]


def test_a_ctrl_c_while_a_flush_is_logged_logs_it_once(tmp_path, monkeypatch):
    # A real SIGINT just after the flush's scalars were buffered (before the rows were cleared): the final
    # flush logged the same rows again, so every point of that flush was twice in the event file.
    real, blocks = study._Flusher.__call__, []

    def ctrl_c_after_the_first_block(self, block_end):
        blocks.append(block_end)
        if block_end and blocks.count(True) == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, block_end)

    monkeypatch.setattr(study._Flusher, "__call__", ctrl_c_after_the_first_block)
    runs = [sweeps.Run(config=config.from_flat({**TINY, "train.steps": 30}), name="once")]
    _, interrupted = study.execute(runs, tmp_path, flush_every=2)
    assert interrupted and runs[0].summary["status"] == "interrupted"
    acc = EventAccumulator(str(runs[0].dir))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("loss/train")]
    assert steps == sorted(set(steps)) and steps[:2] == [0, 10]


def test_with_logging_off_no_custom_scalars_layout_is_written(tmp_path):
    # The layout charts the scalars logged over the steps; with train.log_every = 0 there are none, and
    # its 19 charts were all empty.
    runs = [sweeps.Run(config=config.from_flat({**TINY, "train.log_every": 0}), name="off"),
            sweeps.Run(config=config.from_flat(TINY), name="on")]
    study.execute(runs, tmp_path)
    tags = {}
    for r in runs:
        acc = EventAccumulator(str(r.dir))
        acc.Reload()
        tags[r.name] = set(acc.Tags()["tensors"]) | set(acc.Tags()["scalars"])
    assert "custom_scalars__config__" not in tags["off"] and "custom_scalars__config__" in tags["on"]
