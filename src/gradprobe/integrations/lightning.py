"""``GradProbeCallback`` for ``lightning.Trainer``: gradient flow of every optimizer step, logged and diagnosed.

>>> import lightning as L
>>> from gradprobe.integrations.lightning import GradProbeCallback
>>> probe = GradProbeCallback(log_dir="runs")                   # any gradprobe.Probe option   # doctest: +SKIP
>>> L.Trainer(callbacks=[probe]).fit(model, data)               # doctest: +SKIP
>>> probe.diagnosis.verdict, probe.trace.last.table()           # doctest: +SKIP

Where it measures: ``on_before_optimizer_step``, once per optimizer step: the gradients are accumulated
(``accumulate_grad_batches``), unscaled (``precision="16-mixed"``: the precision plugin's
``GradScaler`` is passed to the probe, so the hook gradients are unscaled too and skipped steps are
flagged) and not yet clipped (``gradient_clip_val`` clips after this hook). The step's loss is the sum of
the losses Lightning back-propagates in it (each already divided by ``accumulate_grad_batches``: the
mean over the micro-batches).

What it logs: the per-layer scalars of every recorded step (``gradprobe/<quantity>/<layer>``, see
:func:`gradprobe.trace.tidy.scalars`) to every logger of the trainer, at ``trainer.global_step`` and at
the trainer's ``log_every_n_steps`` (``log_every_n_steps=`` overrides it, ``log=False`` turns it off).

Under DDP/FSDP every rank measures and the numbers are those of the global batch (see
:class:`gradprobe.probe.Session`); the run log and the loggers are written by rank 0 only.
"""
from __future__ import annotations

from collections import deque

from gradprobe.errors import ConfigError, ProbeStateError, require
from gradprobe.integrations._options import check_probe_options
from gradprobe.monitor import Probe
from gradprobe.trace import LayerFlow, Sink
from gradprobe.trace.tidy import scalars

_pl = require("lightning.pytorch", "lightning")

__all__ = ["GradProbeCallback", "LoggerSink"]


class LoggerSink(Sink):
    """Sends every recorded step's scalars to the trainer's loggers (``logger.log_metrics``)."""

    def __init__(self, trainer, every: int, prefix: str = "gradprobe"):
        self.trainer = trainer
        self.every = max(int(every), 1)
        self.prefix = prefix
        #: (probe step, trainer.global_step) of every probe.step() since the last record written
        self.at: deque[tuple[int, int]] = deque()

    def write(self, record: LayerFlow) -> None:
        step = self.trainer.global_step
        # the trainer's step when the probe took the record (records of a batch arrive steps later)
        at = self.at
        while at and at[0][0] <= record.step:
            probe_step, global_step = at.popleft()
            if probe_step == record.step:
                step = global_step
        if step % self.every and not self.trainer.should_stop:
            return
        metrics = scalars(record, self.prefix)
        for logger in self.trainer.loggers:
            logger.log_metrics(metrics, step=step)


class GradProbeCallback(_pl.Callback):
    """Record per-layer gradient flow at every optimizer step of ``Trainer.fit`` (see the module docstring).

    Args:
        log: send the per-layer scalars to the trainer's loggers.
        log_every_n_steps: how often (in optimizer steps); default: the trainer's ``log_every_n_steps``.
        **probe_options: any :class:`gradprobe.Probe` option (``log_dir=``, ``every=``, ``hooks=``,
            ``temporal=``, ``recorders=``, ``sinks=``, ...).

    After ``fit``: :attr:`trace` (the recorded steps), :attr:`diagnosis` (the diagnosis of the last
    recorded step, with its back-propagated signal), :attr:`run` (trace, facts, diagnosis together).
    """

    def __init__(self, *, log: bool = True, log_every_n_steps: int | None = None, **probe_options):
        super().__init__()
        self.options = check_probe_options(type(self).__name__, probe_options)
        self.log = bool(log)
        if log_every_n_steps is not None and int(log_every_n_steps) < 1:
            raise ConfigError(f"GradProbeCallback(log_every_n_steps={log_every_n_steps}) must be a positive number of steps")
        self.log_every_n_steps = log_every_n_steps
        self.probe: Probe | None = None
        self.diagnosis = None
        self.run = None
        self._trace = None
        self._logger = None
        self._loss = None

    # ----------------------------------------------------------------- results
    @property
    def trace(self):
        """The recorded steps (the probe's :class:`~gradprobe.Trace`; kept after ``fit``)."""
        if self.probe is not None:
            return self.probe.trace
        if self._trace is None:
            raise ProbeStateError("GradProbeCallback.trace: the trainer has not started fitting with this callback yet")
        return self._trace

    # ------------------------------------------------------------------- hooks
    def on_fit_start(self, trainer, pl_module) -> None:
        opts = dict(self.options)
        sinks = list(opts.pop("sinks", ()))
        self._logger = None
        if self.log and trainer.loggers:
            self._logger = LoggerSink(trainer, self.log_every_n_steps or trainer.log_every_n_steps)
            sinks.append(self._logger)
        if "scaler" not in opts:
            opts["scaler"] = getattr(trainer.precision_plugin, "scaler", None)
        self.probe = Probe(pl_module, sinks=sinks, **opts)
        self.diagnosis = self.run = None
        self._loss = None

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if self.probe is None:
            return
        loss = loss.detach()
        scaler = self.probe.scaler
        if scaler is not None and scaler.is_enabled():
            loss = loss / scaler.get_scale()  # the precision plugin hands over the scaled loss
        self._loss = loss if self._loss is None else self._loss + loss

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.probe is None:
            return
        if self._logger is not None:
            self._logger.at.append((self.probe.current_step, trainer.global_step))
        self.probe.step(self._loss)
        self._loss = None

    def on_train_end(self, trainer, pl_module) -> None:
        if self.probe is None:
            return
        if self.probe.trace.recorded:  # diagnose the last recorded step, not what later forward passes left
            self.diagnosis = self.probe.diagnose(recorded=True)
        self.run = self.probe.run()
        self._close()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._close()

    def teardown(self, trainer, pl_module, stage) -> None:
        self._close()

    def _close(self) -> None:
        if self.probe is None:
            return
        probe, self.probe = self.probe, None
        self._trace = probe.trace
        probe.close()
