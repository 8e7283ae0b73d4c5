"""TensorBoard event files cheap enough to give every run of a population its own.

`torch.utils.tensorboard.SummaryWriter.add_scalar` costs tens of microseconds a
call (a proto built per scalar, a hand-off to a writer thread, a pure-Python
CRC). A study of 200 runs x 200 log steps x 10 tags is 400k scalars, so that
cost would rival the training itself. `EventWriter` writes the same file format
synchronously: scalar events are hand-encoded from per-tag byte templates (the
tag bytes never change, only the step varint, the wall time and the float32
values do), checksummed with the C CRC-32C from `google_crc32c`, buffered in
memory and appended with one file write per flush. A population of runs that
log the same tags at the same steps is encoded in one pass for all its writers
(`add_scalar_blocks`, `add_histograms_raw`). The rare records (text, images,
hparams) go through the compiled protos that ship with TensorBoard, in
`lab.event_protos`, whose `ProtoRecords` EventWriter inherits; histograms are
hand-encoded too, byte for byte what the protos would write.

The byte formats (TFRecord framing, the Event and HistogramProto layouts) and
the encoders live in `lab.records`; this module checks inputs, buffers the
encoded records and writes the files.
"""

from __future__ import annotations

import itertools
import os
import socket
import struct
import time
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from tensorboard.compat.proto import event_pb2

from lab.event_protos import ProtoRecords
from lab.records import (
    _HISTO_STATS,
    _encode_histograms,
    _encode_scalar_runs,
    _record,
    _scalar_layout,
    _scalar_record,
    _step,
)

# Below this many events per add_scalar_block call, encoding event by event in
# Python beats numpy's fixed cost per call (measured by bench()).
_MIN_VECTOR_ROWS = 32
# Our own counter for file names; collisions with other writers in the same
# logdir and second are resolved by exclusive creation in EventWriter.__init__.
_file_counter = itertools.count()


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach()
        if x.is_floating_point() and x.dtype != torch.float64:
            x = x.float()  # numpy has no bfloat16; float32 holds every narrower float
        return x.cpu().numpy()  # .cpu() waits for the device: callers pass whole blocks
    return np.asarray(x)


def _block_inputs(tags: Sequence[str], steps, values, wall_times, n_runs: int | None = None):
    """Checked arguments of a scalar block: (layout, steps [S] uint64, wall_times [S], values).

    values is [S, T] for one writer, [S, T, n_runs] for a population; None
    when there is nothing to write (no steps, no tags or no runs).
    """
    tags = tuple(tags)
    steps, values = _to_numpy(steps), _to_numpy(values)
    expected = (len(steps), len(tags)) + (() if n_runs is None else (n_runs,))
    if steps.ndim != 1 or values.shape != expected:
        shape = ", ".join(["S", *map(str, expected[1:])])
        raise ValueError(f"expected steps [S] and values [{shape}] for {len(tags)} tags"
                         f"{'' if n_runs is None else f' and {n_runs} runs'}, got steps "
                         f"{steps.shape} and values {values.shape}")
    if steps.dtype.kind not in "iu":
        raise TypeError(f"steps must be integers, got dtype {steps.dtype}")
    if steps.dtype.kind == "u" and steps.size and steps.max() >= 2**63:
        raise ValueError(f"steps must fit an int64, got {steps.max()}")
    if values.dtype.kind not in "fiu":
        raise TypeError(f"values must be real numbers, got dtype {values.dtype}")
    n = len(steps)
    if n == 0 or not tags or n_runs == 0:
        return None
    if wall_times is not None:
        wall_times = np.asarray(wall_times, np.float64)
        if wall_times.shape not in ((), (n,)):
            raise ValueError(f"wall_times must be a scalar or [{n}], got {wall_times.shape}")
    times = np.broadcast_to(np.float64(time.time()) if wall_times is None else wall_times, (n,))
    # Negative steps as their int64 bits, the 10-byte varint protobuf writes.
    return _scalar_layout(tags), steps.astype(np.int64).view(np.uint64), times, values


class EventWriter(ProtoRecords):
    """One TensorBoard event file in `logdir`, written synchronously in batches.

    The file is named events.out.tfevents.<time>.<host>.<pid>.<counter><suffix>,
    the name TensorBoard looks for. Records are TFRecords checksummed with the C
    CRC-32C; the first is the file_version event "brain.Event:2" (which also
    tells TensorBoard not to purge events whose steps go backwards). Scalars and
    histograms are encoded here; the rare records (`add_summary`, `add_text`,
    `add_image`, `add_hparams`) are inherited from `lab.event_protos.ProtoRecords`.

    Encoded records wait in memory and are appended with one write per
    `flush()` (or when more than `max_buffer_bytes` wait), so the file only
    ever holds whole records and TensorBoard can read it at any time. The file
    is opened per flush rather than held, so a population of hundreds of
    writers holds no file descriptors. Records not flushed are lost if the
    process dies: call `close()` or use the writer as a context manager.

    Args:
      logdir: directory of this run; created if missing.
      filename_suffix: appended to the file name.
      max_buffer_bytes: flush automatically once this many bytes wait.
    """

    def __init__(self, logdir, filename_suffix: str = "", max_buffer_bytes: int = 1 << 22):
        self.logdir = os.fspath(logdir)
        self.max_buffer_bytes = max_buffer_bytes
        self._chunks: list[bytes | memoryview] = []
        self._pending = 0
        self._closed = False
        os.makedirs(self.logdir, exist_ok=True)
        version = event_pb2.Event(
            wall_time=time.time(), file_version="brain.Event:2",
            source_metadata=event_pb2.SourceMetadata(writer="lab.events"))
        host, pid = socket.gethostname(), os.getpid()
        while True:
            name = (f"events.out.tfevents.{int(time.time()):010d}.{host}.{pid}."
                    f"{next(_file_counter)}{filename_suffix}")
            self.path = os.path.join(self.logdir, name)
            try:
                with open(self.path, "xb") as f:  # exclusive: never append to another writer's file
                    f.write(_record(version.SerializeToString()))
                break
            except FileExistsError:
                continue

    # -- scalars: the hot path -------------------------------------------------

    def add_scalar(self, tag: str, value: float, step: int, wall_time: float | None = None):
        """One scalar; `add_scalars` with one tag (SummaryWriter's argument order)."""
        self.add_scalars(step, {tag: value}, wall_time)

    def add_scalars(self, step: int, values: Mapping[str, float], wall_time: float | None = None):
        """One Event holding a simple_value per tag; TensorBoard splits it per tag.

        Values are stored as float32 (simple_value's type); NaN and inf are kept.
        """
        if not values:
            return
        layout = _scalar_layout(tuple(values))
        try:
            summary = layout.summary(list(values.values()))
        except struct.error as e:
            raise TypeError(f"scalar values must be real numbers, got {values!r}") from e
        wall_time = time.time() if wall_time is None else wall_time
        self._write(_scalar_record(layout, _step(step), wall_time, summary))

    def add_scalar_block(self, tags: Sequence[str], steps, values, wall_times=None):
        """S events at once, event s holding values[s, t] under tags[t] at steps[s].

        Args:
          tags: T distinct tags.
          steps: [S] integers (int64 range).
          values: [S, T] real numbers, numpy or torch; stored as float32,
            finite values beyond float32 range become +-inf as protobuf does.
          wall_times: None (now, for every event), a scalar, or [S] seconds.
        """
        checked = _block_inputs(tags, steps, values, wall_times)
        if checked is None:
            return
        layout, steps, times, values = checked
        with np.errstate(over="ignore"):  # beyond float32 range -> inf, as protobuf
            values = np.ascontiguousarray(values, dtype="<f4")  # [S, T]
        if len(steps) < _MIN_VECTOR_ROWS:
            # A population steps in lockstep, so S=1 is common: numpy's fixed
            # cost per call would then exceed the per-event Python encoding.
            self._write(b"".join(
                _scalar_record(layout, step, wall_time, layout.summary(row))
                for step, wall_time, row in zip(steps.tolist(), times.tolist(), values.tolist())))
            return
        self._write(_encode_scalar_runs(layout, steps, times, values[None]).tobytes())

    # -- histograms: hand-encoded like the scalars ----------------------------------

    def add_histogram(self, tag: str, values, step: int, bins: int = 30,
                      wall_time: float | None = None):
        """Histogram of `values` (numpy or torch, any shape) in `bins` equal bins.

        Non-finite values are left out of every statistic (a HistogramProto has
        no bucket for them); if none is finite, nothing is written.
        """
        values = _to_numpy(values).astype(np.float64).ravel()
        values = values[np.isfinite(values)]
        if values.size == 0:
            return
        counts, edges = np.histogram(values, bins=bins)
        # TensorBoard reads bucket[i] as (bucket_limit[i-1], bucket_limit[i]] and
        # takes `min` as the first left edge, so only right edges are stored.
        self.add_histogram_raw(tag, values.min(), values.max(), values.size, values.sum(),
                               values @ values, edges[1:], counts, step, wall_time)

    def add_histogram_raw(self, tag: str, min: float, max: float, num: int, sum: float,
                          sum_squares: float, bucket_limits, bucket_counts, step: int,
                          wall_time: float | None = None):
        """Histogram from precomputed statistics; bucket_limits are right edges."""
        if not isinstance(tag, str):
            raise TypeError(f"tag must be str, got {tag!r}")
        limits = _to_numpy(bucket_limits).astype(np.float64)
        counts = _to_numpy(bucket_counts).astype(np.float64)
        if limits.ndim != 1 or counts.ndim != 1:
            raise ValueError(f"bucket_limits and bucket_counts must be 1-D, got {limits.shape} "
                             f"and {counts.shape}")
        stats = np.array([[float(min), float(max), float(num), float(sum), float(sum_squares)]])
        self._write(_encode_histograms(tag, _step(step), time.time() if wall_time is None else wall_time,
                                       stats, limits[None], counts[None])[0])

    # -- buffering -------------------------------------------------------------

    def _write(self, chunk: bytes | memoryview):
        if self._closed:
            raise ValueError(f"EventWriter for {self.path} is closed")
        self._chunks.append(chunk)
        self._pending += len(chunk)
        if self._pending >= self.max_buffer_bytes:
            self.flush()

    @property
    def pending_bytes(self) -> int:
        """Bytes of records waiting for the next flush."""
        return self._pending

    def flush(self):
        """Append every waiting record to the file in one write."""
        if not self._chunks:
            return
        with open(self.path, "ab") as f:
            f.write(self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks))
        self._chunks.clear()
        self._pending = 0

    def close(self):
        """Flush and refuse further records; closing again does nothing."""
        if not self._closed:
            self.flush()
            self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


# -- a population: N writers that log the same tags at the same steps -----------


def add_scalar_blocks(writers: Sequence[EventWriter], tags: Sequence[str], steps, values,
                      wall_times=None):
    """Writer i gets the events of values[:, :, i], encoded for all writers at once.

    Appends the bytes `writers[i].add_scalar_block(tags, steps, values[:, :, i],
    wall_times)` would, for every i, from one numpy record array and one CRC
    pass: the runs of a population share tags and steps, so all their records
    have one layout.

    Args:
      writers: N writers, one per run.
      tags: T distinct tags.
      steps: [S] integers (int64 range).
      values: [S, T, N] real numbers (lab.trainer.LogBlock.values), numpy or
        torch; stored as float32 as in add_scalar_block.
      wall_times: None (now), a scalar, or [S] seconds, the same for every run.
    """
    checked = _block_inputs(tags, steps, values, wall_times, len(writers))
    if checked is None:
        return
    layout, steps, times, values = checked
    with np.errstate(over="ignore"):  # beyond float32 range -> inf, as protobuf
        out = _encode_scalar_runs(layout, steps, times, values.transpose(2, 0, 1))  # [N, bytes]
    for w, row in zip(writers, out):
        w._write(row.data)  # a view: the bytes are copied once, into the file, at the next flush


def add_histograms_raw(writers: Sequence[EventWriter], tag: str, step: int, min, max, num, sum,
                       sum_squares, bucket_limits, bucket_counts, wall_time: float | None = None):
    """Writer i gets the histogram of row i, encoded for all writers at once.

    The bytes `writers[i].add_histogram_raw(tag, min[i], max[i], num[i], sum[i],
    sum_squares[i], bucket_limits[i], bucket_counts[i], step, wall_time)` would
    append, for every i. min, max, num, sum, sum_squares: [N]; bucket_limits
    [N, B] right edges and bucket_counts [N, C]; all stored as float64.
    """
    if not isinstance(tag, str):
        raise TypeError(f"tag must be str, got {tag!r}")
    n = len(writers)
    stats = np.stack([_to_numpy(x).astype(np.float64).reshape(-1)
                      for x in (min, max, num, sum, sum_squares)], axis=1)  # [?, 5]
    limits = _to_numpy(bucket_limits).astype(np.float64)
    counts = _to_numpy(bucket_counts).astype(np.float64)
    if stats.shape != (n, _HISTO_STATS) or limits.ndim != 2 or counts.ndim != 2 \
            or len(limits) != n or len(counts) != n:
        raise ValueError(f"expected [{n}] statistics and [{n}, bins] buckets for {n} writers, got "
                         f"{stats.shape[0]} statistics, bucket_limits {limits.shape} and "
                         f"bucket_counts {counts.shape}")
    records = _encode_histograms(tag, _step(step), time.time() if wall_time is None else wall_time,
                                 stats, limits, counts)
    for w, record in zip(writers, records):
        w._write(record)


def bench(n_runs: int = 200, steps: int = 200, tags: int = 10, reference_runs: int = 10):
    """Print microseconds per scalar, files written, for each way to log vs SummaryWriter.

    SummaryWriter.add_scalar is slow, so it logs only `reference_runs` runs.
    """
    import tempfile

    from torch.utils.tensorboard import SummaryWriter

    names = [f"loss/tag{t}" for t in range(tags)]
    step_ids = np.arange(steps) * 10
    values = np.random.default_rng(0).standard_normal((n_runs, steps, tags)).astype(np.float32)
    dicts = [[dict(zip(names, row.tolist())) for row in run] for run in values]  # [R][S]

    def population(ws):  # lab.study's way: every run's history in one call for all runs
        add_scalar_blocks(ws, names, step_ids, values.transpose(1, 2, 0))

    def block(ws):  # each run's whole history in one call
        for r, w in enumerate(ws):
            w.add_scalar_block(names, step_ids, values[r])

    def lockstep_block(ws):  # the population loop: every step, every run, S=1
        for s in range(steps):
            for r, w in enumerate(ws):
                w.add_scalar_block(names, step_ids[s:s + 1], values[r, s:s + 1])

    def lockstep_dict(ws):
        for s in range(steps):
            for r, w in enumerate(ws):
                w.add_scalars(int(step_ids[s]), dicts[r][s])

    def summary_writer(ws):
        for r, w in enumerate(ws):
            for s in range(steps):
                for t, name in enumerate(names):
                    w.add_scalar(name, values[r, s, t], int(step_ids[s]))

    print(f"{n_runs} runs x {steps} steps x {tags} tags")
    with tempfile.TemporaryDirectory() as root:
        for fn, make, runs in [(population, EventWriter, n_runs), (block, EventWriter, n_runs),
                               (lockstep_block, EventWriter, n_runs),
                               (lockstep_dict, EventWriter, n_runs),
                               (summary_writer, SummaryWriter, reference_runs)]:
            start = time.perf_counter()
            writers = [make(f"{root}/{fn.__name__}/{r}") for r in range(runs)]
            fn(writers)
            for w in writers:
                w.close()
            seconds = time.perf_counter() - start
            print(f"{fn.__name__:<16s} {seconds * 1e6 / (runs * steps * tags):8.3f} us/scalar")


if __name__ == "__main__":
    bench()
