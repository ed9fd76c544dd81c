"""One small training loop under a probe, shared by ``gradprobe.diagnose``, ``gradprobe doctor``,
``gradprobe demo`` and the remedy trials.

Each step ``s`` (0-based) of :func:`train` is::

    x, y = batches(s)
    zero every .grad (the optimizer's and the model's)
    loss = loss_fn(call_model(model, x), y)             # a scalar tensor
    loss.backward()
    flow = probe.step(loss)                              # the task loss's gradient flow (with TrainingChange(
                                                         #   skip_spikes=True) a spiking step's update is skipped)
    on_step(StepView(s, loss, flow, ...))                # progress, a diagnosis at this step, ...
    (α·Ω).backward()                                     # with TrainingChange(omega=α): Pascanu et al. 2013, eq. 9
    clip ‖g‖ to c                                        # with TrainingChange(clip_norm=c): their Algorithm 1
    lr ← lr₀ · min(1, (s+1)/w)                           # with TrainingChange(warmup=w): a linear warm-up
    optimizer.step()                                     # skipped after the last pass with update_last=False

so the flow recorded at step ``s`` is that of the weights after ``s`` updates. The clipping and Ω
come after the probe, which therefore reports the gradients of the task loss as back-propagation
delivered them (before clipping), the quantity whose vanishing or explosion is diagnosed.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from gradprobe.diagnosis import Diagnosis, diagnose_flow
from gradprobe.errors import ConfigError
from gradprobe.monitor import Probe
from gradprobe.remedies.catalogue import TrainingChange
from gradprobe.run import Run
from gradprobe.trace import LayerFlow, ModelFacts, Trace

__all__ = ["call_model", "check_scalar_loss", "evaluate", "StepView", "TrainingRun", "train"]


def call_model(model: nn.Module, inputs):
    """``model(**inputs)`` for a dict, ``model(*inputs)`` for a tuple/list, else ``model(inputs)``."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def check_scalar_loss(loss) -> torch.Tensor:
    """``loss`` itself if it is a one-element tensor, else a :class:`~gradprobe.errors.ConfigError`."""
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ConfigError(
            f"loss_fn must return a scalar tensor; got {type(loss).__name__}"
            + (f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else "")
        )
    return loss


@torch.no_grad()
def evaluate(model: nn.Module, batch: tuple, loss_fn: Callable, forward: Callable = call_model) -> float:
    """``loss_fn(forward(model, x), y)`` on ``batch = (x, y)`` in eval mode without grad (a held-out loss);
    the model's train/eval mode is restored."""
    was_training = model.training
    model.eval()
    try:
        x, y = batch
        return float(check_scalar_loss(loss_fn(forward(model, x), y)).item())
    finally:
        model.train(was_training)


@dataclass(frozen=True, eq=False)
class StepView:
    """What the per-step callback sees: the step (0-based), its loss, the recorded flow (``None`` on a step
    the probe skips, ``Probe(every=N)``), whether this is the last pass, and :meth:`diagnose` (the
    probe's own :meth:`gradprobe.Probe.diagnose`, so the diagnosis is saved to the run log too)."""

    step: int
    loss: float
    flow: LayerFlow | None
    last: bool
    _diagnose: Callable[..., Diagnosis] = field(repr=False)

    def diagnose(self, **config) -> Diagnosis:
        """The diagnosis of this step (its flow, the history so far, the model facts measured now); call it
        inside the callback, while the probe is open."""
        if self.flow is None:
            raise ConfigError(f"step {self.step} was not recorded (Probe(every=...)): nothing to diagnose")
        return self._diagnose(**config)


@dataclass(eq=False)
class TrainingRun:
    """The result of :func:`train`: the (trained) model, what the probe recorded, and the losses.

    ``facts`` are measured at the end (after the last update); ``result`` is the probe's live
    :class:`~gradprobe.Run` (what its run log holds), with the final diagnosis when ``train(diagnose=True)``.
    """

    model: nn.Module
    trace: Trace
    facts: ModelFacts
    losses: np.ndarray  # (steps,) the loss of every pass
    first: LayerFlow | None  # the first recorded flow (at the weights the run started from)
    last: LayerFlow | None  # the last recorded flow
    log_path: Path | None = None  # the run log, with Probe(log_dir=...)
    result: Run | None = None
    diagnosis: Diagnosis | None = None  # the probe's diagnosis after the last pass (train(diagnose=True))

    def diagnose(self, flow: LayerFlow | None = None, *, stationary=None, **config) -> Diagnosis:
        """The diagnosis of ``flow`` (default: the last recorded one) with the whole trace and the facts
        measured at the end of the run (not saved to the run log: use ``train(diagnose=True)`` for that)."""
        flow = self.last if flow is None else flow
        if flow is None:
            raise ConfigError("the run recorded no step: nothing to diagnose")
        return diagnose_flow(flow, facts=self.facts, trace=self.trace, stationary=stationary, **config)


def train(
    model: nn.Module,
    batches: Callable[[int], tuple],
    loss_fn: Callable,
    *,
    steps: int,
    lr: float = 0.01,
    optimizer: torch.optim.Optimizer | None = None,
    change: TrainingChange | None = None,
    update_last: bool = True,
    probe: dict | None = None,
    on_step: Callable[[StepView], None] | None = None,
    forward: Callable = call_model,
    diagnose: bool = False,
) -> TrainingRun:
    """Train ``model`` for ``steps`` passes under a :class:`gradprobe.Probe` (see the module docstring).

    Args:
        batches: ``batches(step) -> (inputs, target)``; ``inputs`` go to :func:`call_model`.
        loss_fn: ``loss_fn(output, target) -> scalar tensor``.
        steps: number of forward/backward passes (>= 1).
        lr: learning rate of the default optimizer (SGD, or the :class:`TrainingChange`'s), scaled by
            ``change.lr_scale``.
        optimizer: an optimizer to use instead (then ``change`` may not set the optimizer or lr).
        change: a remedy's training change (clipping, Ω, optimizer, lr scale).
        update_last: call ``optimizer.step()`` after the last pass too; ``False`` measures the weights
            after ``steps − 1`` updates at the last pass (what a diagnosis "after N steps" wants).
        probe: keyword arguments of :class:`gradprobe.Probe` (``temporal``, ``log_dir``, ``every``, ...);
            unless it sets ``budget``, every step is recorded in full (``budget=None``).
        on_step: called after each pass's probe step with a :class:`StepView`.
        forward: ``forward(model, inputs) -> output`` (default :func:`call_model`).
        diagnose: after the last pass (and update), diagnose with the probe still open, so the
            diagnosis is saved to the run log: :attr:`TrainingRun.diagnosis`.

    The model's train/eval mode is left as it is (call ``model.train()`` first to train dropout and
    batch-norm statistics).

    >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    >>> x, y = torch.randn(16, 4), torch.randn(16, 1)
    >>> run = train(net, lambda s: (x, y), nn.functional.mse_loss, steps=20, lr=0.1)
    >>> len(run.trace), bool(run.losses[-1] < run.losses[0]), run.diagnose().verdict
    (20, True, 'healthy')
    """
    if steps < 1:
        raise ConfigError(f"steps={steps} must be >= 1")
    change = change or TrainingChange()
    if optimizer is not None and (change.optimizer != "sgd" or change.lr_scale != 1.0):
        raise ConfigError("pass either an optimizer or a TrainingChange that sets the optimizer / lr, not both")
    opt = optimizer if optimizer is not None else change.make_optimizer(model, lr)
    losses = []
    first = last = None
    reg = change.regulariser(model)
    base_lrs = [g["lr"] for g in opt.param_groups]
    options = {"budget": None, **(probe or {})}
    if change.skip_spikes:
        if options.get("on_spike") not in (None, "skip"):
            raise ConfigError(f"TrainingChange(skip_spikes=True) contradicts probe on_spike={options['on_spike']!r}")
        options["on_spike"] = "skip"
    try:
        # every step recorded unless the caller asks for an overhead budget (Probe(budget=...))
        with Probe(model, **options) as p:
            for s in range(steps):
                inputs, target = batches(s)
                opt.zero_grad(set_to_none=True)
                model.zero_grad(set_to_none=True)
                loss = check_scalar_loss(loss_fn(forward(model, inputs), target))
                loss.backward()
                flow = p.step(loss)
                value = float(loss.detach().item())
                losses.append(value)
                if flow is not None:
                    first = first or flow
                    last = flow
                if on_step is not None:
                    on_step(StepView(s, value, flow, s == steps - 1, p.diagnose))
                if p.skipped:  # the guard set every .grad to None: nothing to regularise, clip or apply
                    continue
                if reg is not None:
                    (change.omega * reg.penalty()).backward()
                change.clip_(model.parameters())
                if change.warmup > 1:
                    for g, lr0 in zip(opt.param_groups, base_lrs):
                        g["lr"] = lr0 * change.lr_factor(s)
                if update_last or s < steps - 1:
                    opt.step()
            if p.fetch_every > 1 and len(p.trace):  # (records arrive in batches: reading the trace fetches them)
                first, last = p.trace[0], p.trace.last
            diagnosis = p.diagnose() if diagnose and last is not None else None
        # after close: the run holds what its run log holds (the final facts and cadence included)
        result = p.run()
        run = TrainingRun(model, p.trace, p.facts, np.asarray(losses), first, last,
                          None if p.runlog is None else Path(p.runlog.path), result, diagnosis)
    finally:
        if reg is not None:
            reg.close()
    return run
