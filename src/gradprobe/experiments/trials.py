"""Equal-budget A/B trials of remedies: the same model, seed, data and number of steps, with and
without each remedy; measured effect on gradient flow and on the loss.

A remedy application is a :class:`Treatment`: an optional model transform (``nn.Module -> nn.Module``)
and training changes (learning rate, optimizer, gradient clipping). The baseline is the untreated
model. Every trial starts from ``build()`` under the same ``torch.manual_seed`` and sees the same
batches, so differences come from the remedy alone.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from gradprobe.analysis.depth import signal_profile
from gradprobe.diagnosis import diagnose_flow
from gradprobe.errors import ConfigError
from gradprobe.monitor import Probe

__all__ = ["Treatment", "TrialResult", "run_trials", "format_trials", "treatment_for", "TREATABLE"]


@dataclass(frozen=True)
class Treatment:
    """What a remedy changes: ``transform`` the model and/or the training loop."""

    id: str
    title: str
    transform: Callable[[nn.Module], nn.Module] | None = None
    lr_scale: float = 1.0
    clip_norm: float | None = None
    optimizer: str = "sgd"  # "sgd" or "rprop"


@dataclass
class TrialResult:
    treatment: Treatment
    ratio_init: float  # first/last layer signal ratio at step 0
    ratio_end: float
    loss_init: float
    loss_end: float  # mean loss over the last 10% of steps
    verdict_init: str
    verdict_end: str
    losses: np.ndarray = field(repr=False)
    error: str | None = None  # the remedy could not be applied to this model (why)

    @property
    def ok(self) -> bool:
        return self.error is None


def _copy_init(model: nn.Module, scheme: str) -> nn.Module:
    from gradprobe.remedies import initialize_

    return initialize_(copy.deepcopy(model), scheme)


def _relu_he(model: nn.Module) -> nn.Module:
    from gradprobe.remedies import initialize_, swap_activations

    return initialize_(swap_activations(model, new=nn.ReLU), "he")


def _init_for(model: nn.Module) -> nn.Module:
    saturating = any(isinstance(m, (nn.Sigmoid, nn.Tanh)) for m in model.modules())
    return _copy_init(model, "xavier" if saturating else "he")


def _residual(model: nn.Module) -> nn.Module:
    from gradprobe.remedies import add_residual

    return add_residual(model, scale=None)


def _norm(model: nn.Module) -> nn.Module:
    from gradprobe.remedies import insert_normalization

    return insert_normalization(model, "batch")


def _gated(model: nn.Module) -> nn.Module:
    from gradprobe.remedies import to_gated

    return to_gated(model, "lstm")


#: remedy id (``gradprobe.diagnosis.remedies.CATALOGUE``) -> how a trial applies it
TREATABLE: dict[str, dict] = {
    "relu_activation": dict(transform=_relu_he),
    "he_init": dict(transform=_init_for),
    "residual": dict(transform=_residual),
    "normalization": dict(transform=_norm),
    "gated_cells": dict(transform=_gated),
    "smaller_init": dict(transform=lambda m: _copy_init(m, "xavier")),
    "clip_norm": dict(clip_norm=1.0),
    "lower_lr": dict(lr_scale=0.1),
    "rprop": dict(optimizer="rprop"),
}


def treatment_for(remedy) -> Treatment | None:
    """The :class:`Treatment` a trial uses for a catalogue :class:`~gradprobe.diagnosis.Remedy` (``None``
    when a short equal-budget trial cannot apply it, e.g. pre-training or a hand edit of the model)."""
    how = TREATABLE.get(remedy.id)
    return None if how is None else Treatment(remedy.id, remedy.title, **how)


def _optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "rprop":
        return torch.optim.Rprop(params)
    raise ConfigError(f"unknown optimizer {name!r}")


def run_trials(
    build: Callable[[], nn.Module],
    batches: Callable[[int], tuple],
    loss_fn: Callable,
    treatments: list[Treatment],
    *,
    steps: int = 100,
    lr: float = 0.01,
    seed: int = 0,
) -> list[TrialResult]:
    """Run the baseline and every treatment for ``steps`` steps each.

    ``batches(step)`` returns ``(x, y)`` for that step (deterministic in ``step``);
    ``loss_fn(output, y)`` returns a scalar. Returns the baseline first.
    """
    if steps < 1:
        raise ConfigError(f"steps={steps} must be >= 1")
    out = []
    for t in [Treatment("baseline", "no change")] + list(treatments):
        torch.manual_seed(seed)
        model = build()
        try:
            if t.transform is not None:
                model = t.transform(model)
        except (ConfigError, TypeError, ValueError) as exc:
            out.append(TrialResult(t, math.nan, math.nan, math.nan, math.nan, "", "", np.array([]), error=str(exc)))
            continue
        model.train()
        opt = _optimizer(t.optimizer, model.parameters(), lr * t.lr_scale)
        losses = []
        first_flow = None
        with Probe(model, update_ratio=False, budget=None) as probe:  # a short trial records every step
            for s in range(steps):
                x, y = batches(s)
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(model(x), y)
                loss.backward()
                flow = probe.step(loss)
                if first_flow is None:
                    first_flow = flow
                if t.clip_norm is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_norm)
                opt.step()
                losses.append(float(flow.loss))
            facts = probe.facts
        last_flow = flow
        p0, p1 = signal_profile(first_flow), signal_profile(last_flow)
        tail = max(1, steps // 10)
        out.append(TrialResult(
            t,
            p0.ratio if p0 else math.nan,
            p1.ratio if p1 else math.nan,
            losses[0],
            float(np.mean(losses[-tail:])),
            diagnose_flow(first_flow, facts=facts).verdict,
            diagnose_flow(last_flow, facts=facts).verdict,
            np.asarray(losses),
        ))
    return out


def format_trials(results: list[TrialResult]) -> str:
    """A text table: one row per trial, baseline first."""
    head = f"{'remedy':<22} {'signal ratio init→end':>24} {'loss init→end':>20}  {'verdict init→end'}"
    rows = [head, "-" * len(head)]
    for r in results:
        if not r.ok:
            rows.append(f"{r.treatment.id:<22} not applicable: {r.error}")
            continue
        rows.append(
            f"{r.treatment.id:<22} {r.ratio_init:>11.3g} → {r.ratio_end:<10.3g} {r.loss_init:>9.4g} → {r.loss_end:<8.4g}"
            f"  {r.verdict_init} → {r.verdict_end}"
        )
    return "\n".join(rows)
