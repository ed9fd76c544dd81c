"""``GradProbeCallback`` for ``transformers.Trainer``: gradient flow of every optimizer step, before clipping.

>>> from transformers import Trainer
>>> from gradprobe.integrations.transformers import GradProbeCallback
>>> probe = GradProbeCallback(log_dir="runs")                    # any gradprobe.Probe option  # doctest: +SKIP
>>> Trainer(model, args, train_dataset=data, callbacks=[probe]).train()                     # doctest: +SKIP
>>> probe.diagnosis.verdict, probe.trace.last.table()                                       # doctest: +SKIP

Where it measures. The only ``TrainerCallback`` event between the backward passes and the optimizer
step, ``on_pre_optimizer_step``, fires after ``max_grad_norm`` clipping, so a probe stepped there reports
the clipped gradient. This callback records instead at the end of the last backward pass of each
optimizer step (the micro-batch on which the Trainer syncs gradients, ``gradient_accumulation_steps``):
at ``on_train_begin`` it puts a post-accumulate-grad hook on every trainable parameter, and the first one
to fire in such a backward pass queues ``probe.step()`` to run when the autograd engine has finished it
(after DDP's own end-of-backward reduction). The gradients it sees are exactly the ones the Trainer then
clips: the ``"totals"`` table's ``grad_norm`` equals the ``grad_norm`` the Trainer logs.

The step's loss is the model's ``loss`` output over the step's micro-batches, combined as the Trainer
combines them: summed when the Trainer passes ``num_items_in_batch`` (the model then normalises by the
tokens of the whole step), else averaged.

Logging: the Trainer's loggers are callbacks themselves, which another callback cannot reach; with
``"tensorboard"`` in ``args.report_to`` the per-layer scalars (``gradprobe/<quantity>/<layer>``) go to a
TensorBoard run of their own, ``<TENSORBOARD_LOGGING_DIR or output_dir/runs>/gradprobe``, next to the
Trainer's. Mixed precision: the accelerator's ``GradScaler`` (fp16) is passed to the probe. Under DDP every
rank measures; rank 0 writes.
"""
from __future__ import annotations

import os

import torch

from gradprobe.errors import ProbeStateError, require
from gradprobe.integrations._options import check_probe_options
from gradprobe.integrations.tensorboard import TensorBoardSink
from gradprobe.monitor import Probe

_tf = require("transformers", "transformers")
_accelerate_state = require("accelerate.state", "transformers")

__all__ = ["GradProbeCallback"]


def _syncing() -> bool:
    """The Trainer is in the last micro-batch of an optimizer step (it set accelerate's sync flag)."""
    return bool(_accelerate_state.GradientState().sync_gradients)


class GradProbeCallback(_tf.TrainerCallback):
    """Record per-layer gradient flow at every optimizer step of ``Trainer.train`` (see the module docstring).

    Args:
        **probe_options: any :class:`gradprobe.Probe` option (``log_dir=``, ``every=``, ``hooks=``,
            ``recorders=``, ``sinks=``, ...).

    After training: :attr:`trace`, :attr:`diagnosis` (of the last recorded step), :attr:`run`.
    """

    def __init__(self, **probe_options):
        self.options = check_probe_options(type(self).__name__, probe_options)
        self.probe: Probe | None = None
        self.diagnosis = None
        self.run = None
        self._trace = None
        self._handles: list = []
        self._queued = False
        self._losses: list = []
        self._sum_losses = False

    @property
    def trace(self):
        """The recorded steps (kept after training)."""
        if self.probe is not None:
            return self.probe.trace
        if self._trace is None:
            raise ProbeStateError("GradProbeCallback.trace: the Trainer has not started training with this callback yet")
        return self._trace

    # ------------------------------------------------------------------- events
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None:
            raise ProbeStateError("GradProbeCallback.on_train_begin: the Trainer passed no model")
        opts = dict(self.options)
        sinks = list(opts.pop("sinks", ()))
        if "tensorboard" in (args.report_to or []):
            root = os.getenv("TENSORBOARD_LOGGING_DIR") or os.path.join(args.output_dir, "runs")
            sinks.append(TensorBoardSink(os.path.join(os.path.expanduser(root), "gradprobe")))
        if "scaler" not in opts:
            opts["scaler"] = getattr(optimizer, "scaler", None)  # accelerate's AcceleratedOptimizer holds it
        self.probe = Probe(model, sinks=sinks, **opts)
        self.diagnosis = self.run = None
        self._losses, self._queued = [], False
        try:
            for p in model.parameters():
                if p.requires_grad:
                    self._handles.append(p.register_post_accumulate_grad_hook(self._on_grad))
            self._handles.append(model.register_forward_hook(self._on_forward, with_kwargs=True))
        except BaseException:
            self._close()
            raise

    def on_train_end(self, args, state, control, **kwargs):
        if self.probe is None:
            return
        if self.probe.trace.recorded:
            self.diagnosis = self.probe.diagnose(recorded=True)
        self.run = self.probe.run()
        self._close()

    # -------------------------------------------------------------------- hooks
    def _on_forward(self, module, args, kwargs, output):
        loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
        if isinstance(loss, torch.Tensor) and torch.is_grad_enabled() and module.training:
            self._losses.append(loss.detach())
            self._sum_losses = kwargs.get("num_items_in_batch") is not None
        return None

    def _on_grad(self, param) -> None:
        if self._queued or self.probe is None or not _syncing():
            return
        self._queued = True
        engine = torch.autograd.Variable._execution_engine
        # queued from inside the first end-of-backward callback, ours runs after those queued before it
        # (DDP's reduction of the last buckets): .grad then holds what the Trainer clips
        engine.queue_callback(lambda: engine.queue_callback(self._record))

    def _record(self) -> None:
        self._queued = False
        loss = None
        if self._losses:
            loss = torch.stack([t.float() for t in self._losses]).sum()
            if not self._sum_losses:
                loss = loss / len(self._losses)
        self._losses = []
        self.probe.step(loss)

    def _close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self.probe is not None:
            probe, self.probe = self.probe, None
            self._trace = probe.trace
            probe.close()
