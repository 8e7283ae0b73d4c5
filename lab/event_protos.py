"""The rare records of an event file, built through the compiled protos that ship with TensorBoard.

`ProtoRecords` gives `lab.events.EventWriter` its `add_summary` (any Summary
proto), `add_text` (markdown for the Text dashboard), `add_image` (an encoded
PNG) and `add_hparams` (the HParams dashboard's three summaries). A run writes
these a handful of times, so the cost of building a proto per record does not
matter here, unlike on the scalar and histogram hot path that `lab.events`
hand-encodes through `lab.records`; kept apart so that module reads as that hot
path alone. The methods only append encoded records through the host class's
`_write` (and `add_hparams` its metrics through `add_scalars`).
"""

from __future__ import annotations

import struct
import time
from collections.abc import Mapping

from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.compat.proto.tensor_pb2 import TensorProto
from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
from tensorboard.plugins.text.plugin_data_pb2 import TextPluginData

from lab.records import _record, _step

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# PNG colour type -> Summary.Image.colorspace (1 grey, 2 grey+alpha, 3 RGB, 4 RGBA).
_PNG_COLORSPACE = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}


class ProtoRecords:
    """EventWriter's records built through TensorBoard's protos; the host class provides
    `_write(bytes)` (buffer one encoded record) and `add_scalars(step, values)`."""

    def add_summary(self, summary: summary_pb2.Summary, step: int, wall_time: float | None = None):
        """Any Summary proto (e.g. from torch.utils.tensorboard.summary) as one Event."""
        event = event_pb2.Event(wall_time=time.time() if wall_time is None else wall_time,
                                step=_step(step), summary=summary)
        self._write(_record(event.SerializeToString()))

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
                    experiment: bool = True, status: str = "success"):
        """This run's hyperparameters and final metrics for the HParams dashboard.

        Unlike SummaryWriter.add_hparams, which opens a timestamped subfolder,
        the three hparams-plugin summaries go into this run's own file, so the
        dashboard lists each run once. Metric values are also written as
        scalars under their tags, which is where the dashboard reads them.

        Values must be int, float, str, bool or None (None is skipped), as
        torch.utils.tensorboard.summary.hparams requires. The plugin takes the
        `_hparams_/experiment` summary of an arbitrary run as the column set;
        with `experiment=False` it instead unions every run's hparams and infers
        their domains, which suits runs whose hparam keys differ. `status` is the
        session's end status the dashboard shows: success, failure, unknown or
        running (SummaryWriter writes success whatever happened).
        """
        from tensorboard.plugins.hparams import api_pb2
        from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        code = api_pb2.Status.Value(f"STATUS_{status.upper()}")  # (ValueError for another word)
        exp, start, end = hparams_summaries(dict(hparams), dict(metrics))
        data = HParamsPluginData.FromString(end.value[0].metadata.plugin_data.content)
        data.session_end_info.status = code
        end.value[0].metadata.plugin_data.content = data.SerializeToString()
        for summary in (exp, start, end) if experiment else (start, end):
            self.add_summary(summary, step)
        self.add_scalars(step, metrics)
