"""TensorBoard event files cheap enough to give every run of a population its own.

`torch.utils.tensorboard.SummaryWriter.add_scalar` costs tens of microseconds a
call (a proto built per scalar, a hand-off to a writer thread, a pure-Python
CRC). A study of 200 runs x 200 log steps x 10 tags is 400k scalars, so that
cost would rival the training itself. `EventWriter` writes the same file format
synchronously: scalar events are hand-encoded from per-tag byte templates (the
tag bytes never change, only the step varint, the wall time and the float32
values do), checksummed with the C CRC-32C from `google_crc32c`, buffered in
memory and appended with one file write per flush. The rare records
(histograms, text, images, hparams) go through the compiled protos that ship
with TensorBoard.

Record framing (TFRecord, see tensorboard/summary/writer/record_writer.py):
    uint64 length | uint32 masked_crc32c(length) | data | uint32 masked_crc32c(data)
all little-endian, where masked_crc32c(x) = rotr15(crc32c(x)) + 0xA282EAD8 mod 2^32.

Scalar Event layout (tensorboard/compat/proto event.proto / summary.proto):
    Event{1: double wall_time, 2: int64 step, 5: Summary summary}
    Summary{1: repeated Value value}; Value{1: string tag, 2: float simple_value}
"""

from __future__ import annotations

import itertools
import os
import socket
import struct
import time
from collections.abc import Mapping, Sequence
from functools import lru_cache

import google_crc32c
import numpy as np
import torch
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.compat.proto.tensor_pb2 import TensorProto
from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
from tensorboard.plugins.text.plugin_data_pb2 import TextPluginData

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_F64 = struct.Struct("<d")
_CRC_MASK_DELTA = 0xA282EAD8
# Below this many events per add_scalar_block call, encoding event by event in
# Python beats numpy's fixed cost per call (measured by bench()).
_MIN_VECTOR_ROWS = 32
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# PNG colour type -> Summary.Image.colorspace (1 grey, 2 grey+alpha, 3 RGB, 4 RGBA).
_PNG_COLORSPACE = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}
# Our own counter for file names; collisions with other writers in the same
# logdir and second are resolved by exclusive creation in EventWriter.__init__.
_file_counter = itertools.count()


def _masked_crc(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _CRC_MASK_DELTA) & 0xFFFFFFFF


@lru_cache(maxsize=4096)
def _header(length: int) -> bytes:
    """Length field and its masked CRC; scalar records repeat a few lengths."""
    encoded = _U64.pack(length)
    return encoded + _U32.pack(_masked_crc(encoded))


def _record(data: bytes) -> bytes:
    return _header(len(data)) + data + _U32.pack(_masked_crc(data))


def _varint(value: int) -> bytes:
    """Protobuf base-128 varint; negative int64 as its 10-byte two's complement."""
    value &= (1 << 64) - 1
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _varint_lengths(u: np.ndarray) -> np.ndarray:
    """Bytes needed by the varint of each uint64 in `u` ([S] -> [S] int64)."""
    lengths = np.ones(u.shape, np.int64)
    for k in range(1, 10):
        lengths += u >= np.uint64(1 << (7 * k))
    return lengths


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach()
        if x.is_floating_point() and x.dtype != torch.float64:
            x = x.float()  # numpy has no bfloat16; float32 holds every narrower float
        return x.cpu().numpy()  # .cpu() waits for the device: callers pass whole blocks
    return np.asarray(x)


class _ScalarLayout:
    """Byte template of the Summary holding one simple_value per tag, in tag order.

    Only the float32 values vary; each sits at a fixed offset behind its
    tag's bytes, so a Summary is one `struct` pack (one event) or one strided
    numpy assignment (a block of events).
    """

    def __init__(self, tags: tuple[str, ...]):
        prefixes, offsets, size = [], [], 0
        for tag in tags:
            name = tag.encode("utf-8")
            value = b"\x0a" + _varint(len(name)) + name + b"\x15"  # Value.tag, simple_value key
            prefix = b"\x0a" + _varint(len(value) + 4) + value  # Summary.value entry
            prefixes.append(prefix)
            offsets.append(size + len(prefix))
            size += len(prefix) + 4
        self.summary_key = b"\x2a" + _varint(size)  # Event.summary, length-delimited
        self.struct = struct.Struct("<" + "".join(f"{len(p)}sf" for p in prefixes))
        self.args = [x for p in prefixes for x in (p, 0.0)]  # values go in args[1::2]
        self.offsets = np.asarray(offsets, np.int64)  # [T] offset of each float in Summary
        self.n_tags = len(tags)
        self._templates: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def summary(self, values: Sequence[float]) -> bytes:
        args = self.args.copy()
        args[1::2] = values
        try:
            return self.struct.pack(*args)
        except OverflowError:
            # struct refuses finite doubles beyond float32 range; protobuf
            # rounds them to +-inf, and so does numpy's cast.
            with np.errstate(over="ignore"):
                args[1::2] = np.asarray(values, np.float64).astype(np.float32).tolist()
            return self.struct.pack(*args)

    def template(self, step_len: int) -> tuple[np.ndarray, np.ndarray]:
        """Whole-record template for steps whose varint is `step_len` bytes.

        Returns the record with zeros where wall time, step, values and data
        CRC go ([R] uint8), and the record columns of the float bytes ([4T]).
        """
        if step_len not in self._templates:
            data = (b"\x09" + bytes(8) + b"\x10" + bytes(step_len) + self.summary_key
                    + self.struct.pack(*self.args))
            record = np.frombuffer(_header(len(data)) + data + bytes(4), np.uint8)
            summary_start = 12 + 10 + step_len + len(self.summary_key)
            cols = (summary_start + self.offsets[:, None] + np.arange(4)).ravel()
            self._templates[step_len] = (record, cols)
        return self._templates[step_len]


def _scalar_record(layout: _ScalarLayout, step: int, wall_time: float, summary: bytes) -> bytes:
    data = b"\x09" + _F64.pack(wall_time) + b"\x10" + _varint(step) + layout.summary_key + summary
    return _record(data)


def _encode_scalar_rows(layout: _ScalarLayout, step_len: int, steps: np.ndarray,
                        wall_times: np.ndarray, values: np.ndarray) -> bytes:
    """Records for rows whose steps share one varint length, so one fixed layout.

    steps [n] uint64 (int64 bits), wall_times [n] float64, values [n, T] '<f4'.
    """
    template, value_cols = layout.template(step_len)
    n, size = len(steps), template.size
    records = np.empty((n, size), np.uint8)
    records[:] = template
    # Record offsets: 12 header bytes, then data = 0x09 wall_time(8) 0x10 step ...
    records[:, 13:21] = wall_times.astype("<f8").view(np.uint8).reshape(n, 8)
    for k in range(step_len):
        byte = (steps >> np.uint64(7 * k)) & np.uint64(0x7F)
        if k < step_len - 1:
            byte |= np.uint64(0x80)  # continuation bit
        records[:, 22 + k] = byte
    records[:, value_cols] = values.view(np.uint8).reshape(n, 4 * layout.n_tags)
    raw = records.tobytes()
    data_len = size - 16
    crc = google_crc32c.value  # y# in the C extension takes bytes only, hence the slices
    crcs = np.fromiter((crc(raw[i:i + data_len]) for i in range(12, n * size, size)),
                       np.uint32, n)
    masked = ((crcs >> np.uint32(15)) | (crcs << np.uint32(17))) + np.uint32(_CRC_MASK_DELTA)
    records[:, -4:] = masked.astype("<u4").view(np.uint8).reshape(n, 4)
    return records.tobytes()


class EventWriter:
    """One TensorBoard event file in `logdir`, written synchronously in batches.

    The file is named events.out.tfevents.<time>.<host>.<pid>.<counter><suffix>,
    the name TensorBoard looks for. Records are TFRecords checksummed with the C
    CRC-32C; the first is the file_version event "brain.Event:2" (which also
    tells TensorBoard not to purge events whose steps go backwards).

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
        self._chunks: list[bytes] = []
        self._pending = 0
        self._closed = False
        self._layouts: dict[tuple[str, ...], _ScalarLayout] = {}
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

    def _layout(self, tags: tuple[str, ...]) -> _ScalarLayout:
        layout = self._layouts.get(tags)
        if layout is None:
            if not all(isinstance(t, str) for t in tags):
                raise TypeError(f"tags must be str, got {tags!r}")
            if len(set(tags)) != len(tags):
                raise ValueError(f"duplicate tags in {tags!r}")
            layout = self._layouts[tags] = _ScalarLayout(tags)
        return layout

    def add_scalar(self, tag: str, value: float, step: int, wall_time: float | None = None):
        """One scalar; `add_scalars` with one tag (SummaryWriter's argument order)."""
        self.add_scalars(step, {tag: value}, wall_time)

    def add_scalars(self, step: int, values: Mapping[str, float], wall_time: float | None = None):
        """One Event holding a simple_value per tag; TensorBoard splits it per tag.

        Values are stored as float32 (simple_value's type); NaN and inf are kept.
        """
        if not values:
            return
        layout = self._layout(tuple(values))
        try:
            summary = layout.summary(list(values.values()))
        except struct.error as e:
            raise TypeError(f"scalar values must be real numbers, got {values!r}") from e
        wall_time = time.time() if wall_time is None else wall_time
        self._write(_scalar_record(layout, int(step), wall_time, summary))

    def add_scalar_block(self, tags: Sequence[str], steps, values, wall_times=None):
        """S events at once, event s holding values[s, t] under tags[t] at steps[s].

        Args:
          tags: T distinct tags.
          steps: [S] integers (int64 range).
          values: [S, T] real numbers, numpy or torch; stored as float32,
            finite values beyond float32 range become +-inf as protobuf does.
          wall_times: None (now, for every event), a scalar, or [S] seconds.
        """
        tags = tuple(tags)
        steps, values = _to_numpy(steps), _to_numpy(values)
        if steps.ndim != 1 or values.shape != (len(steps), len(tags)):
            raise ValueError(f"expected steps [S] and values [S, {len(tags)}] for {len(tags)} "
                             f"tags, got steps {steps.shape} and values {values.shape}")
        if steps.dtype.kind not in "iu":
            raise TypeError(f"steps must be integers, got dtype {steps.dtype}")
        if values.dtype.kind not in "fiu":
            raise TypeError(f"values must be real numbers, got dtype {values.dtype}")
        n = len(steps)
        if n == 0 or not tags:
            return
        if wall_times is not None:
            wall_times = np.asarray(wall_times, np.float64)
            if wall_times.shape not in ((), (n,)):
                raise ValueError(f"wall_times must be a scalar or [{n}], got {wall_times.shape}")
        layout = self._layout(tags)
        if values.dtype != np.dtype("<f4") or not values.flags.c_contiguous:
            with np.errstate(over="ignore"):  # beyond float32 range -> inf, as protobuf
                values = np.ascontiguousarray(values, dtype="<f4")  # [S, T]
        if n < _MIN_VECTOR_ROWS:
            # A population steps in lockstep, so S=1 is common: numpy's fixed
            # cost per call would then exceed the per-event Python encoding.
            times = ([time.time()] * n if wall_times is None
                     else np.broadcast_to(wall_times, (n,)).tolist())
            self._write(b"".join(
                _scalar_record(layout, step, wall_time, layout.summary(row))
                for step, wall_time, row in zip(steps.tolist(), times, values.tolist())))
            return
        times = np.broadcast_to(time.time() if wall_times is None else wall_times, (n,))
        steps = steps.astype(np.int64).view(np.uint64)  # negative steps as int64 bits
        lengths = _varint_lengths(steps)
        # Steps almost always increase, so equal varint lengths form a few runs.
        cuts = [0, *(np.flatnonzero(np.diff(lengths)) + 1).tolist(), n]
        for lo, hi in itertools.pairwise(cuts):
            self._write(_encode_scalar_rows(layout, int(lengths[lo]), steps[lo:hi],
                                            times[lo:hi], values[lo:hi]))

    # -- rare records through the protos --------------------------------------

    def add_summary(self, summary: summary_pb2.Summary, step: int, wall_time: float | None = None):
        """Any Summary proto (e.g. from torch.utils.tensorboard.summary) as one Event."""
        event = event_pb2.Event(wall_time=time.time() if wall_time is None else wall_time,
                                step=int(step), summary=summary)
        self._write(_record(event.SerializeToString()))

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
        histo = summary_pb2.HistogramProto(
            min=float(min), max=float(max), num=float(num), sum=float(sum),
            sum_squares=float(sum_squares),
            bucket_limit=_to_numpy(bucket_limits).astype(np.float64).tolist(),
            bucket=_to_numpy(bucket_counts).astype(np.float64).tolist())
        self.add_summary(summary_pb2.Summary(value=[summary_pb2.Summary.Value(
            tag=tag, histo=histo)]), step, wall_time)

    def add_text(self, tag: str, markdown: str, step: int = 0, wall_time: float | None = None):
        """Markdown text for the Text dashboard, under `tag` unchanged."""
        metadata = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(
            plugin_name="text", content=TextPluginData(version=0).SerializeToString()))
        tensor = TensorProto(dtype="DT_STRING", string_val=[markdown.encode("utf-8")],
                             tensor_shape=TensorShapeProto(dim=[TensorShapeProto.Dim(size=1)]))
        self.add_summary(summary_pb2.Summary(value=[summary_pb2.Summary.Value(
            tag=tag, metadata=metadata, tensor=tensor)]), step, wall_time)

    def add_image(self, tag: str, png_bytes: bytes, step: int = 0, height: int | None = None,
                  width: int | None = None, wall_time: float | None = None):
        """An encoded PNG (e.g. matplotlib savefig into BytesIO).

        Height, width and colour space are read from the PNG header unless given.
        """
        png_bytes = bytes(png_bytes)
        if png_bytes[:8] != _PNG_SIGNATURE or len(png_bytes) < 26:
            raise ValueError(f"expected PNG bytes, got a file starting {png_bytes[:8]!r}")
        png_width, png_height = struct.unpack(">II", png_bytes[16:24])  # IHDR
        image = summary_pb2.Summary.Image(
            height=png_height if height is None else height,
            width=png_width if width is None else width,
            colorspace=_PNG_COLORSPACE.get(png_bytes[25], 0),
            encoded_image_string=png_bytes)
        self.add_summary(summary_pb2.Summary(value=[summary_pb2.Summary.Value(
            tag=tag, image=image)]), step, wall_time)

    def add_hparams(self, hparams: Mapping, metrics: Mapping[str, float], step: int = 0,
                    experiment: bool = True):
        """This run's hyperparameters and final metrics for the HParams dashboard.

        Unlike SummaryWriter.add_hparams, which opens a timestamped subfolder,
        the three hparams-plugin summaries go into this run's own file, so the
        dashboard lists each run once. Metric values are also written as
        scalars under their tags, which is where the dashboard reads them.

        Values must be int, float, str, bool or None (None is skipped), as
        torch.utils.tensorboard.summary.hparams requires. The plugin takes the
        `_hparams_/experiment` summary of an arbitrary run as the column set;
        with `experiment=False` it instead unions every run's hparams and infers
        their domains, which suits runs whose hparam keys differ.
        """
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        exp, start, end = hparams_summaries(dict(hparams), dict(metrics))
        for summary in (exp, start, end) if experiment else (start, end):
            self.add_summary(summary, step)
        self.add_scalars(step, metrics)

    # -- buffering -------------------------------------------------------------

    def _write(self, chunk: bytes):
        if self._closed:
            raise ValueError(f"EventWriter for {self.path} is closed")
        self._chunks.append(chunk)
        self._pending += len(chunk)
        if self._pending >= self.max_buffer_bytes:
            self.flush()

    def flush(self):
        """Append every waiting record to the file in one write."""
        if not self._chunks:
            return
        with open(self.path, "ab") as f:
            f.write(b"".join(self._chunks))
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
        for fn, make, runs in [(block, EventWriter, n_runs), (lockstep_block, EventWriter, n_runs),
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
