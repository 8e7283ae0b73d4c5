"""EventWriter files read back by TensorBoard's own readers, byte for byte where it matters."""

import math
import os
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.compat.tensorflow_stub import errors
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import (
    PyRecordReader_New,
    masked_crc32c,
)
from tensorboard.plugins.hparams import metadata as hparams_metadata

from lab import events
from lab.events import EventWriter

ALL = {"scalars": 0, "histograms": 0, "images": 0, "tensors": 0}


def accumulate(logdir):
    acc = EventAccumulator(str(logdir), size_guidance=ALL)
    acc.Reload()
    return acc


def records(path):
    """Each record's data, checking both masked CRCs with TensorBoard's own CRC-32C."""
    raw = Path(path).read_bytes()
    out, pos = [], 0
    while pos < len(raw):
        (length,) = struct.unpack_from("<Q", raw, pos)
        (length_crc,) = struct.unpack_from("<I", raw, pos + 8)
        assert length_crc == masked_crc32c(raw[pos:pos + 8])
        data = raw[pos + 12:pos + 12 + length]
        (data_crc,) = struct.unpack_from("<I", raw, pos + 12 + length)
        assert data_crc == masked_crc32c(data)
        out.append(data)
        pos += 16 + length
    assert pos == len(raw)  # whole records only
    return out


def scalar_event(step, wall_time, tags, values):
    """The Event TensorBoard's protos build for the same scalars."""
    return event_pb2.Event(wall_time=wall_time, step=step, summary=summary_pb2.Summary(value=[
        summary_pb2.Summary.Value(tag=t, simple_value=v) for t, v in zip(tags, values)]))


def f32(x):
    return float(np.float32(x))


def tiny_png(width, height):
    """A valid RGB PNG made with zlib, since no image library is a dependency."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(
            ">I", zlib.crc32(kind + body))
    rows = b"".join(b"\x00" + bytes(3 * width) for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_file_name_and_version_record(tmp_path):
    with EventWriter(tmp_path / "run", filename_suffix=".lab") as w:
        pass
    (name,) = os.listdir(tmp_path / "run")
    assert name == os.path.basename(w.path)
    assert re.fullmatch(r"events\.out\.tfevents\.\d{10}\..+\.\d+\.\d+\.lab", name)
    (first,) = records(w.path)
    assert event_pb2.Event.FromString(first).file_version == "brain.Event:2"


def test_writers_in_one_dir_get_separate_files(tmp_path):
    writers = [EventWriter(tmp_path) for _ in range(3)]
    for i, w in enumerate(writers):
        w.add_scalars(i, {"a": float(i)})
        w.close()
    assert len(os.listdir(tmp_path)) == 3
    assert [(e.step, e.value) for e in accumulate(tmp_path).Scalars("a")] == [
        (0, 0.0), (1, 1.0), (2, 2.0)]


def test_scalars_round_trip_through_event_accumulator(tmp_path):
    rng = np.random.default_rng(0)
    tags = ["loss/train", "loss/val", "grad/norm"]
    steps = np.arange(10_000)  # crosses the 1- to 2-byte step varint at 128
    values = rng.standard_normal((10_000, 3)) * 1e3  # float64, rounded on write
    with EventWriter(tmp_path) as w:
        for lo in range(0, 10_000, 1000):
            w.add_scalar_block(tags, steps[lo:lo + 1000], values[lo:lo + 1000])
        w.add_scalars(10_000, {"loss/train": 0.5, "residual/max": 2.0})  # several tags, one event
    acc = accumulate(tmp_path)
    assert sorted(acc.Tags()["scalars"]) == sorted(tags + ["residual/max"])
    for t, tag in enumerate(tags):
        events = acc.Scalars(tag)
        assert [e.step for e in events] == list(range(10_000)) + ([10_000] if t == 0 else [])
        read = np.array([e.value for e in events[:10_000]])
        np.testing.assert_array_equal(read, values[:, t].astype(np.float32).astype(np.float64))
    assert [(e.step, e.value) for e in acc.Scalars("residual/max")] == [(10_000, 2.0)]


def test_non_finite_scalars_survive(tmp_path):
    with EventWriter(tmp_path) as w:
        w.add_scalars(0, {"a": math.nan, "b": math.inf, "c": -math.inf, "d": 1e40})
        w.add_scalar_block(["a", "b"], np.arange(1, 41), np.full((40, 2), [math.nan, -1e39]))
    acc = accumulate(tmp_path)
    assert all(math.isnan(e.value) for e in acc.Scalars("a"))
    assert [e.value for e in acc.Scalars("b")] == [math.inf] + [-math.inf] * 40
    assert acc.Scalars("c")[0].value == -math.inf
    assert acc.Scalars("d")[0].value == math.inf  # protobuf's float32 cast gives inf too


@pytest.mark.parametrize("n_steps", [3, 40])  # event-by-event and vectorised encoders
def test_scalar_bytes_equal_protobuf_serialisation(tmp_path, n_steps):
    # Steps cover every varint length class: 1, 2, 3, 5, 9 and 10 bytes (negative int64).
    special = [1, 127, 128, 300, 16_384, 2**31, 2**62, -1, -(2**63), 2**63 - 1]
    steps = np.array((special * 4)[:n_steps], np.int64)
    tags = ["a", "loss/" + "x" * 200, "ünïcode"]  # 200-byte tag: 2-byte length varint
    rng = np.random.default_rng(1)
    values = rng.standard_normal((n_steps, 3))
    values[0] = [0.0, -0.0, 1e-45]  # zeros are still written: simple_value is in a oneof
    wall_times = 1.7e9 + rng.random(n_steps)
    with EventWriter(tmp_path) as w:
        w.add_scalar_block(tags, steps, values, wall_times)
    data = records(w.path)[1:]
    assert len(data) == n_steps
    for s in range(n_steps):
        expected = scalar_event(int(steps[s]), wall_times[s], tags, values[s].tolist())
        assert event_pb2.Event.FromString(data[s]) == expected
        # Nonzero step and wall time: protobuf writes every field, so even the bytes agree.
        assert data[s] == expected.SerializeToString()


def test_step_zero_decodes_like_protobuf(tmp_path):
    # Protobuf omits step 0; the template writes it, which decodes to the same Event.
    with EventWriter(tmp_path) as w:
        w.add_scalars(0, {"a": 1.5}, wall_time=0.0)
    assert event_pb2.Event.FromString(records(w.path)[1]) == scalar_event(0, 0.0, ["a"], [1.5])


def test_block_equals_repeated_add_scalars(tmp_path):
    tags = ["x", "y"]
    steps = np.arange(100, 200)
    values = np.random.default_rng(2).standard_normal((100, 2)).astype(np.float32)
    wall_times = np.linspace(1e9, 1e9 + 10, 100)
    with EventWriter(tmp_path / "block") as block, EventWriter(tmp_path / "dict") as single:
        block.add_scalar_block(tags, steps, values, wall_times)
        for s in range(100):
            single.add_scalars(int(steps[s]), dict(zip(tags, values[s].tolist())),
                               wall_time=float(wall_times[s]))
    assert records(block.path)[1:] == records(single.path)[1:]


def test_torch_inputs_and_scalar_wall_time(tmp_path):
    with EventWriter(tmp_path) as w:
        w.add_scalar_block(["a"], torch.arange(50), torch.ones(50, 1, dtype=torch.bfloat16), 5.0)
    events = accumulate(tmp_path).Scalars("a")
    assert [(e.wall_time, e.step, e.value) for e in events] == [(5.0, s, 1.0) for s in range(50)]


def test_same_scalars_as_summary_writer(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    values = np.random.default_rng(3).standard_normal((30, 2))
    with SummaryWriter(tmp_path / "ref") as ref, EventWriter(tmp_path / "lab") as w:
        for s in range(30):
            for t, tag in enumerate(["a", "b"]):
                ref.add_scalar(tag, values[s, t], s)
        w.add_scalar_block(["a", "b"], np.arange(30), values)
    ours, theirs = accumulate(tmp_path / "lab"), accumulate(tmp_path / "ref")
    for tag in ["a", "b"]:
        assert ([(e.step, e.value) for e in ours.Scalars(tag)]
                == [(e.step, e.value) for e in theirs.Scalars(tag)])


def test_corrupt_byte_is_caught_by_tensorboard_reader(tmp_path):
    with EventWriter(tmp_path) as w:
        w.add_scalar_block(["a"], np.arange(40), np.arange(40.0)[:, None])
    raw = bytearray(Path(w.path).read_bytes())
    sizes = [16 + len(d) for d in records(w.path)]
    corrupt = sum(sizes[:10])  # record 10 (step 9) starts here
    raw[corrupt + 12 + 5] ^= 0x01  # one bit of its wall time
    Path(w.path).write_bytes(bytes(raw))
    assert len(list(RawEventFileLoader(w.path).Load())) == 10  # stops at the bad record
    reader = PyRecordReader_New(w.path)
    for _ in range(10):
        reader.GetNext()
    with pytest.raises(errors.DataLossError, match="crc32"):
        reader.GetNext()


def test_histogram(tmp_path):
    values = np.random.default_rng(4).standard_normal(1000)
    with EventWriter(tmp_path) as w:
        w.add_histogram("w/hist", np.append(values, [np.nan, np.inf]), step=3, bins=20)
        w.add_histogram("w/torch", torch.tensor(values, dtype=torch.float32).reshape(10, 100), 4)
        w.add_histogram("w/empty", np.array([np.nan]), 5)  # nothing finite: nothing written
        w.add_histogram_raw("w/raw", 0.0, 3.0, 6, 9.0, 17.0, [1.0, 2.0, 3.0], [1, 2, 3], step=6)
    acc = accumulate(tmp_path)
    assert sorted(acc.Tags()["histograms"]) == ["w/hist", "w/raw", "w/torch"]
    (event,) = acc.Histograms("w/hist")
    h = event.histogram_value
    assert event.step == 3
    assert (h.num, sum(h.bucket), len(h.bucket)) == (1000, 1000, 20)  # NaN/inf left out
    assert (h.min, h.max) == (values.min(), values.max())
    assert h.sum == pytest.approx(values.sum()) and h.sum_squares == pytest.approx(values @ values)
    assert h.bucket_limit[-1] == values.max()
    assert sum(acc.Histograms("w/torch")[0].histogram_value.bucket) == 1000
    raw = acc.Histograms("w/raw")[0].histogram_value
    assert (raw.num, raw.sum, list(raw.bucket_limit), list(raw.bucket)) == (
        6, 9.0, [1.0, 2.0, 3.0], [1.0, 2.0, 3.0])


def test_text_image_and_any_summary(tmp_path):
    from torch.utils.tensorboard.summary import scalar

    png = tiny_png(5, 3)
    with EventWriter(tmp_path) as w:
        w.add_text("config", "| key | value |\n|---|---|\n| lr | 0.1 |", step=0)
        w.add_image("figures/residuals", png, step=7)
        w.add_summary(scalar("from/torch", 2.5), step=9)
    acc = accumulate(tmp_path)
    tags = acc.Tags()
    assert tags["tensors"] == ["config"] and tags["images"] == ["figures/residuals"]
    text = acc.Tensors("config")[0].tensor_proto.string_val[0].decode()
    assert text.startswith("| key | value |")
    assert acc.summary_metadata["config"].plugin_data.plugin_name == "text"
    (image,) = acc.Images("figures/residuals")
    assert (image.step, image.width, image.height, image.encoded_image_string) == (7, 5, 3, png)
    assert [(e.step, e.value) for e in acc.Scalars("from/torch")] == [(9, 2.5)]
    with pytest.raises(ValueError, match="PNG"):
        w.add_image("x", b"GIF89a...")


def test_hparams_live_in_the_runs_own_file(tmp_path):
    with EventWriter(tmp_path) as w:
        w.add_hparams({"lr": 0.1, "loss": "huber", "delta": 1}, {"final/loss": 0.25}, step=100)
    assert os.listdir(tmp_path) == [os.path.basename(w.path)]  # no timestamp subfolder
    acc = accumulate(tmp_path)
    content = acc.PluginTagToContent(hparams_metadata.PLUGIN_NAME)
    assert set(content) == {hparams_metadata.EXPERIMENT_TAG, hparams_metadata.SESSION_START_INFO_TAG,
                            hparams_metadata.SESSION_END_INFO_TAG}
    start = hparams_metadata.parse_session_start_info_plugin_data(
        content[hparams_metadata.SESSION_START_INFO_TAG])
    assert start.hparams["lr"].number_value == 0.1
    assert start.hparams["loss"].string_value == "huber"
    experiment = hparams_metadata.parse_experiment_plugin_data(
        content[hparams_metadata.EXPERIMENT_TAG])
    assert {h.name for h in experiment.hparam_infos} == {"lr", "loss", "delta"}
    assert [m.name.tag for m in experiment.metric_infos] == ["final/loss"]
    assert [(e.step, e.value) for e in acc.Scalars("final/loss")] == [(100, 0.25)]


@pytest.mark.parametrize("status,code", [("success", 1), ("failure", 2), ("unknown", 0)])
def test_hparams_session_end_status_is_the_runs(tmp_path, status, code):
    # The dashboard's session status (tensorboard.plugins.hparams.api_pb2.Status: UNKNOWN 0, SUCCESS 1,
    # FAILURE 2): SummaryWriter always writes success, so interrupted and diverged runs read as succeeded.
    with EventWriter(tmp_path) as w:
        w.add_hparams({"lr": 0.1}, {"final/loss": 0.25}, status=status)
    content = accumulate(tmp_path).PluginTagToContent(hparams_metadata.PLUGIN_NAME)
    end = hparams_metadata.parse_session_end_info_plugin_data(content[hparams_metadata.SESSION_END_INFO_TAG])
    assert end.status == code
    with EventWriter(tmp_path / "other") as w, pytest.raises(ValueError):
        w.add_hparams({"lr": 0.1}, {"final/loss": 0.25}, status="aborted")


def test_hparams_without_experiment(tmp_path):
    with EventWriter(tmp_path) as w:
        w.add_hparams({"lr": 0.1}, {"m": 1.0}, experiment=False)
    content = accumulate(tmp_path).PluginTagToContent(hparams_metadata.PLUGIN_NAME)
    assert hparams_metadata.EXPERIMENT_TAG not in content
    assert hparams_metadata.SESSION_START_INFO_TAG in content


def test_flush_leaves_a_readable_file_and_close_is_idempotent(tmp_path):
    w = EventWriter(tmp_path)
    w.add_scalar_block(["a"], np.arange(50), np.zeros((50, 1)))
    assert len(records(w.path)) == 1  # buffered: only the version record so far
    w.flush()
    assert len(accumulate(tmp_path).Scalars("a")) == 50
    w.add_scalar("a", 1.0, 50)
    w.close()
    w.close()
    assert len(accumulate(tmp_path).Scalars("a")) == 51
    with pytest.raises(ValueError, match="closed"):
        w.add_scalars(51, {"a": 1.0})


def test_buffer_limit_flushes_automatically(tmp_path):
    w = EventWriter(tmp_path, max_buffer_bytes=1000)
    for s in range(100):
        w.add_scalars(s, {"a": 1.0})
    n_records = len(records(w.path))
    assert 1 < n_records < 101  # whole records reached the file without flush()
    w.close()
    assert len(records(w.path)) == 101


def test_invalid_inputs(tmp_path):
    with EventWriter(tmp_path) as w:
        with pytest.raises(ValueError, match=r"\[S, 2\]"):
            w.add_scalar_block(["a", "b"], np.arange(3), np.zeros((3, 3)))
        with pytest.raises(ValueError, match="wall_times"):
            w.add_scalar_block(["a"], np.arange(3), np.zeros((3, 1)), wall_times=np.zeros(2))
        with pytest.raises(TypeError, match="integers"):
            w.add_scalar_block(["a"], np.arange(3.0), np.zeros((3, 1)))
        with pytest.raises(TypeError, match="real numbers"):
            w.add_scalar_block(["a"], np.arange(3), np.zeros((3, 1), complex))
        with pytest.raises(ValueError, match="duplicate"):
            w.add_scalar_block(["a", "a"], np.arange(3), np.zeros((3, 2)))
        with pytest.raises(TypeError, match="real numbers"):
            w.add_scalars(0, {"a": "high"})
        # Steps are int64 in the Event proto: 3.7 was written as 3, 2**64 wrapped to 0, uint64 2**63 to -2**63.
        with pytest.raises(TypeError, match="step must be an integer, got 3.7"):
            w.add_scalar("a", 1.0, 3.7)
        with pytest.raises(ValueError, match="step must fit an int64, got 18446744073709551616"):
            w.add_scalar("a", 1.0, 2**64)
        with pytest.raises(ValueError, match="step must fit an int64"):
            w.add_histogram_raw("h", 0.0, 1.0, 1, 0.5, 0.25, [1.0], [1.0], step=2**63)
        with pytest.raises(ValueError, match="steps must fit an int64"):
            w.add_scalar_block(["a"], np.array([2**63], np.uint64), np.zeros((1, 1)))
    assert len(records(w.path)) == 1  # nothing half-written
    with EventWriter(tmp_path) as w:  # integers of every kind are steps; -2**63 and 2**63 - 1 the ends
        w.add_scalar("a", 1.0, np.int64(5))
        w.add_scalar("a", 2.0, torch.tensor(6))
        w.add_scalar("a", 3.0, 2**63 - 1)
        w.add_scalar("a", 4.0, -(2**63))
    assert [event_pb2.Event.FromString(r).step for r in records(w.path)[1:]] == [5, 6, 2**63 - 1, -(2**63)]


# -- a population: one encoding pass for N writers -------------------------------------------------

def population_values(rng, n_steps, n_tags, n_runs):
    """[S, T, N] float64 values with the cases float32 storage must handle."""
    values = rng.standard_normal((n_steps, n_tags, n_runs)) * 10.0 ** rng.integers(-30, 30, (n_steps, n_tags, n_runs))
    values[0, :, 0] = [np.nan, np.inf, -0.0][:n_tags]
    values[1, :, 1] = [1e40, -1e39, 1e-46][:n_tags]  # beyond float32: +-inf; below: 0
    return values


@pytest.mark.parametrize("n_steps", [3, 40])  # beside the writers' event-by-event and vectorised encoders
def test_population_writes_each_writer_what_its_own_block_would(tmp_path, n_steps):
    # Steps 100.. cross the 1- to 2-byte varint at 128 for n_steps=40, so a block has two layouts.
    rng = np.random.default_rng(5)
    tags = ["loss/train", "ünïcode", "x" * 130]  # a 130-byte tag: 2-byte length varints
    steps = np.arange(100, 100 + 3 * n_steps, 3)
    values = population_values(rng, n_steps, 3, 6)
    wall_times = 1.7e9 + rng.random(n_steps)
    ours = [EventWriter(tmp_path / "population" / str(i)) for i in range(6)]
    theirs = [EventWriter(tmp_path / "single" / str(i)) for i in range(6)]
    events.add_scalar_blocks(ours, tags, steps, values, wall_times)
    for i, w in enumerate(theirs):
        w.add_scalar_block(tags, steps, values[:, :, i], wall_times)
    for a, b in zip(ours, theirs):
        a.close()
        b.close()
        assert records(a.path)[1:] == records(b.path)[1:]  # records() also checks every CRC
    # And against protobuf's own serialisation, record by record, for the run with the special values.
    for s, data in enumerate(records(ours[1].path)[1:]):
        expected = scalar_event(int(steps[s]), wall_times[s], tags, values[s, :, 1].tolist())
        assert data == expected.SerializeToString()


def test_population_scalars_read_back_per_run(tmp_path):
    values = np.arange(2 * 50 * 4, dtype=np.float32).reshape(50, 2, 4)  # [S, T, N], every value distinct
    writers = [EventWriter(tmp_path / f"run{i}") for i in range(4)]
    events.add_scalar_blocks(writers, ["a", "b"], torch.arange(50), torch.from_numpy(values), 7.0)
    for i, w in enumerate(writers):
        w.close()
        acc = accumulate(tmp_path / f"run{i}")
        for t, tag in enumerate(["a", "b"]):
            assert [(e.wall_time, e.step, e.value) for e in acc.Scalars(tag)] == [
                (7.0, s, float(values[s, t, i])) for s in range(50)]


def test_population_invalid_inputs(tmp_path):
    writers = [EventWriter(tmp_path / str(i)) for i in range(2)]
    with pytest.raises(ValueError, match=r"\[S, 1, 2\].*2 runs"):
        events.add_scalar_blocks(writers, ["a"], np.arange(3), np.zeros((3, 1, 3)))
    with pytest.raises(ValueError, match="duplicate"):
        events.add_scalar_blocks(writers, ["a", "a"], np.arange(3), np.zeros((3, 2, 2)))
    with pytest.raises(ValueError, match=r"\[2\] statistics"):
        events.add_histograms_raw(writers, "h", 0, [0.0], [1.0], [1.0], [1.0], [1.0], np.ones((1, 3)),
                                  np.ones((1, 3)))
    events.add_scalar_blocks([], ["a"], np.arange(3), np.zeros((3, 1, 0)))  # no runs: nothing to do
    for w in writers:
        w.close()
        assert len(records(w.path)) == 1  # nothing half-written


def histogram_event(tag, step, wall_time, stats, limits, counts):
    """The Event TensorBoard's protos build for the same histogram (the previous implementation)."""
    histo = summary_pb2.HistogramProto(min=stats[0], max=stats[1], num=stats[2], sum=stats[3],
                                       sum_squares=stats[4], bucket_limit=limits, bucket=counts)
    return event_pb2.Event(wall_time=wall_time, step=step, summary=summary_pb2.Summary(
        value=[summary_pb2.Summary.Value(tag=tag, histo=histo)]))


# Each row exercises a layout: proto3 leaves out a double whose bits are zero (+0.0, not -0.0 or NaN).
HISTOGRAM_ROWS = [
    ([-1.5, 2.5, 10.0, 3.25, 20.0], [-0.5, 0.5, 1.5, 2.5], [1.0, 2.0, 3.0, 4.0]),  # every field
    ([0.0, 3.0, 4.0, 6.0, 12.0], [1.0, 2.0, 3.0, 4.0], [0.0, 4.0, 0.0, 0.0]),  # min = 0: left out; one bin
    ([-0.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]),  # only -0.0 stays
    ([-1.7e308, 1.7e308, 4.0, np.nan, np.inf],  # a diverged float64 run: linspace's inf and NaN edges
     [np.inf, np.inf, np.inf, 1.7e308], [1.0, 0.0, 0.0, 3.0]),
    ([np.finfo(np.float32).min, np.finfo(np.float32).max, 4.0, 5e-324, 1e300],
     [-1.7e38, 0.0, 1.7e38, 3.4e38], [0.0, 0.0, 0.0, 4.0]),
]


@pytest.mark.parametrize("step", [0, 7, 2**40, -3])  # step 0 is left out by protobuf; -3 a 10-byte varint
def test_histogram_bytes_equal_protobuf_serialisation(tmp_path, step):
    stats = np.array([r[0] for r in HISTOGRAM_ROWS])
    limits = np.array([r[1] for r in HISTOGRAM_ROWS])
    counts = np.array([r[2] for r in HISTOGRAM_ROWS])
    writers = [EventWriter(tmp_path / str(i)) for i in range(len(stats))]
    events.add_histograms_raw(writers, "residual/values", step, *stats.T, limits, counts, wall_time=1.7e9 + 0.25)
    with EventWriter(tmp_path / "one") as one:  # the single-writer method shares the encoder
        for row in HISTOGRAM_ROWS:
            one.add_histogram_raw("residual/values", *row[0], row[1], row[2], step, wall_time=1.7e9 + 0.25)
        one.add_histogram_raw("empty", 0.0, 0.0, 0, 0.0, 0.0, [], [], step, wall_time=0.0)  # no buckets
    expected = [histogram_event("residual/values", step, 1.7e9 + 0.25, *row).SerializeToString()
                for row in HISTOGRAM_ROWS]
    for w, want in zip(writers, expected):
        w.close()
        assert records(w.path)[1:] == [want]
    assert records(one.path)[1:] == expected + [
        histogram_event("empty", step, 0.0, [0.0] * 5, [], []).SerializeToString()]


def test_population_histograms_read_back_per_run(tmp_path):
    counts = np.array([[1.0, 0.0, 3.0], [0.0, 5.0, 0.0]])
    writers = [EventWriter(tmp_path / f"run{i}") for i in range(2)]
    events.add_histograms_raw(writers, "h", 200, min=np.array([-1.0, 2.0]), max=np.array([2.0, 5.0]),
                              num=counts.sum(1), sum=np.array([1.0, 17.5]), sum_squares=np.array([3.0, 61.25]),
                              bucket_limits=np.array([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]), bucket_counts=counts)
    for i, w in enumerate(writers):
        w.close()
        (event,) = accumulate(tmp_path / f"run{i}").Histograms("h")
        h = event.histogram_value
        assert event.step == 200 and (h.min, h.max, h.num) == ([-1.0, 2.0][i], [2.0, 5.0][i], counts[i].sum())
        assert list(h.bucket) == counts[i].tolist()
