"""TensorBoard: per-layer scalars live during training (a :class:`~gradprobe.trace.Sink`) or from a run log.

One tag tree per quantity, so TensorBoard draws each quantity's layers side by side:
``gradprobe/<quantity>/<layer>`` for every per-layer quantity (built-in or a user recorder's),
``gradprobe/<table>.<column>/<site>`` for the scalar columns of tables (units, totals, scaler, ...)
and ``gradprobe/loss`` (see :func:`gradprobe.trace.tidy.scalars`), one point per recorded step at
the record's step number. The diagnosis is written as text (``gradprobe/diagnosis``).

>>> import tempfile, torch
>>> from torch import nn
>>> import gradprobe
>>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
>>> with gradprobe.Probe(net, sinks=[TensorBoardSink(tempfile.mkdtemp())]) as probe:
...     net(torch.randn(16, 4)).pow(2).mean().backward()
...     _ = probe.step()

Needs the ``tensorboard`` extra (``torch.utils.tensorboard`` writes the event files).
"""
from __future__ import annotations

import os
from pathlib import Path

from gradprobe.diagnosis import Diagnosis
from gradprobe.diagnosis.remedies import CATALOGUE
from gradprobe.errors import ConfigError, require
from gradprobe.runlog import read_run
from gradprobe.trace import LayerFlow, RunHeader, Sink
from gradprobe.trace.tidy import scalars

__all__ = ["TensorBoardSink", "export_tensorboard"]


def _summary_writer():
    return require("torch.utils.tensorboard", "tensorboard").SummaryWriter


class TensorBoardSink(Sink):
    """Writes every recorded step as TensorBoard scalars.

    Args:
        log_dir: the directory of the event files (a TensorBoard run); created on the first record.
        writer: an open ``torch.utils.tensorboard.SummaryWriter`` to write to instead (not closed by
            the sink), e.g. the one a framework logger already has.
        prefix: the root of the tag tree.
    """

    def __init__(self, log_dir: str | os.PathLike | None = None, *, writer=None, prefix: str = "gradprobe"):
        if (log_dir is None) == (writer is None):
            raise ConfigError("TensorBoardSink needs exactly one of log_dir= (a directory) or writer= (a SummaryWriter)")
        if writer is None:
            _summary_writer()  # a missing extra fails here, at construction, not at the first step
        self.log_dir = None if log_dir is None else Path(log_dir)
        self.prefix = prefix
        self._writer = writer
        self._owned = writer is None

    @property
    def writer(self):
        if self._writer is None:
            self._writer = _summary_writer()(log_dir=str(self.log_dir))
        return self._writer

    def open(self, header: RunHeader) -> None:
        self.writer.add_text(f"{self.prefix}/run", f"{header.model}: {len(header.layers)} layers "
                             f"(first step {header.first_step})", global_step=header.first_step)

    def write(self, record: LayerFlow) -> None:
        w = self.writer
        for tag, v in scalars(record, self.prefix).items():
            # float64 tensor summaries (the scalars plugin reads them): the run log's numbers, not float32 roundings
            w.add_scalar(tag, v, global_step=record.step, new_style=True, double_precision=True)

    def note(self, key: str, value) -> None:
        if key == "diagnosis" and isinstance(value, dict):
            try:
                text = str(Diagnosis.from_dict(value, CATALOGUE))
            except (KeyError, TypeError, ValueError):
                return
            # Markdown: keep the line breaks of the plain-text diagnosis
            self.writer.add_text(f"{self.prefix}/diagnosis", "    " + text.replace("\n", "\n    "))

    def close(self) -> None:
        if self._writer is None:
            return
        if self._owned:
            self._writer.close()
            self._writer = None
        else:
            self._writer.flush()


def export_tensorboard(run_log: str | os.PathLike, log_dir: str | os.PathLike, *, prefix: str = "gradprobe") -> int:
    """Write a finished run log (the file, or a directory holding one) as TensorBoard event files in
    ``log_dir``: the same tags and numbers the live :class:`TensorBoardSink` writes, one point per
    recorded step. Returns the number of steps written."""
    run = read_run(run_log)
    sink = TensorBoardSink(log_dir, prefix=prefix)
    meta = run.meta
    first = run.records[0].step if run.records else 0
    sink.open(RunHeader(str(meta.get("model", run.path.stem)), tuple(meta.get("layers", ())), tuple(meta.get("kinds", ())),
                        run.facts, meta.get("config") or {}, {}, first))
    for f in run.records:
        sink.write(f)
    if "diagnosis" in meta:
        sink.note("diagnosis", meta["diagnosis"])
    sink.close()
    return len(run.records)
