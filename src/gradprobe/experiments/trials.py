"""Equal-budget A/B trials of remedies: the same model, seed, data and number of steps, with and
without each remedy; the measured effect on gradient flow and on a held-out loss.

A trial applies a catalogue :class:`~gradprobe.remedies.Remedy` through the object itself: its model
transforms (:meth:`~gradprobe.remedies.Remedy.apply`) and its training change (learning-rate scale,
gradient clipping, optimizer, Pascanu's Ω), in the one training loop :func:`gradprobe.training.train`.
The baseline is the untreated model. Every trial starts from ``build()`` under the same
``torch.manual_seed`` and sees the same batches, so differences come from the remedy alone.

Ranking (:func:`rank_trials`): restored flow first (the severity of the diagnosis at the end of the
trial: ok < info < warning < error), then the held-out loss (a batch the trial never trained on), so
a remedy cannot win by memorising one synthetic batch while the gradient still vanishes.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from gradprobe.analysis.depth import signal_profile
from gradprobe.diagnosis import Diagnosis
from gradprobe.diagnosis.rules_time import far_over_peak
from gradprobe.diagnosis.verdict import SEVERITY
from gradprobe.errors import ConfigError
from gradprobe.remedies.catalogue import CATALOGUE, MODEL, Call, Remedy, TrainingChange
from gradprobe.training import call_model, evaluate, train

__all__ = ["BASELINE", "TrialResult", "run_trials", "rank_trials", "format_trials", "trialable", "time_ratio",
           "Treatment", "treatment_for"]

#: the untreated model
BASELINE = Remedy("baseline", "no change", "the model as it is, trained with the same budget")


@dataclass
class TrialResult:
    remedy: Remedy
    ratio_init: float  # first/last layer signal ratio at step 0
    ratio_end: float
    loss_init: float
    loss_end: float  # mean training loss over the last 10% of steps
    verdict_init: str
    verdict_end: str
    losses: np.ndarray = field(repr=False)
    error: str | None = None  # the remedy could not be applied to this model (why)
    held_out_loss: float = math.nan  # loss on the held-out batch after training (NaN without one)
    severity_end: str = "ok"  # severity of the primary verdict at the end
    time_ratio_init: float = math.nan  # through time: farthest-step / peak ‖∂E/∂h_k‖, worst recurrent layer
    time_ratio_end: float = math.nan
    diagnosis_end: Diagnosis | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def restored(self) -> bool:
        """No problem left at the end of the trial (primary verdict of severity ok or info)."""
        return self.ok and SEVERITY.index(self.severity_end) <= SEVERITY.index("info")

    @property
    def treatment(self) -> Remedy:
        """Deprecated name of :attr:`remedy`."""
        warnings.warn("TrialResult.treatment is deprecated; use TrialResult.remedy", DeprecationWarning, stacklevel=2)
        return self.remedy


def trialable(remedies) -> list[Remedy]:
    """The remedies (in order, each once) that a trial can apply by itself (a transform or training change)."""
    out, seen = [], set()
    for r in remedies:
        if r.trialable and r.id not in seen:
            seen.add(r.id)
            out.append(r)
    return out


def _failed(remedy: Remedy, why: str) -> TrialResult:
    nan = math.nan
    return TrialResult(remedy, nan, nan, nan, nan, "", "", np.array([]), error=why)


def run_trials(
    build: Callable[[], nn.Module],
    batches: Callable[[int], tuple],
    loss_fn: Callable,
    remedies: list[Remedy],
    *,
    steps: int = 100,
    lr: float = 0.01,
    seed: int = 0,
    held_out: tuple | None = None,
    probe: dict | None = None,
    forward: Callable = call_model,
) -> list[TrialResult]:
    """Run the baseline and every remedy for ``steps`` steps each; returns the baseline first.

    ``batches(step)`` returns ``(x, y)`` for that step (deterministic in ``step``);
    ``loss_fn(output, y)`` returns a scalar. ``held_out = (x, y)``, if given, is a batch the trials
    never train on: its loss after training is :attr:`TrialResult.held_out_loss`. ``probe`` holds
    :class:`~gradprobe.probe.Probe` options (e.g. ``{"temporal": True}`` to judge flow through time).
    ``forward(model, x)`` runs the model (default :func:`gradprobe.training.call_model`). A remedy
    whose transform or training change does not fit the model is reported, not raised.
    """
    if steps < 1:
        raise ConfigError(f"steps={steps} must be >= 1")
    options = {"update_ratio": False, **(probe or {})}
    out = []
    for remedy in [BASELINE] + list(remedies):
        torch.manual_seed(seed)
        try:
            model = remedy.apply(build())
        except (ConfigError, TypeError, ValueError) as exc:
            out.append(_failed(remedy, str(exc)))
            continue
        model.train()
        first: list[Diagnosis] = []
        try:
            run = train(model, batches, loss_fn, steps=steps, lr=lr, change=remedy.training, probe=options,
                        forward=forward, on_step=lambda v: first.append(v.diagnose()) if v.step == 0 else None)
        except ConfigError as exc:  # e.g. Pascanu's Ω on a model with no single nn.RNN
            out.append(_failed(remedy, str(exc)))
            continue
        end = run.diagnose()
        p0, p1 = signal_profile(run.first), signal_profile(run.last)
        tail = max(1, steps // 10)
        out.append(TrialResult(
            remedy,
            p0.ratio if p0 else math.nan,
            p1.ratio if p1 else math.nan,
            float(run.losses[0]),
            float(np.mean(run.losses[-tail:])),
            first[0].verdict,
            end.verdict,
            run.losses,
            held_out_loss=math.nan if held_out is None else evaluate(model, held_out, loss_fn, forward),
            severity_end=end.primary.severity,
            time_ratio_init=time_ratio(run.first),
            time_ratio_end=time_ratio(run.last),
            diagnosis_end=end,
        ))
    return out


def time_ratio(flow) -> float:
    """The smallest ``‖∂E/∂h‖`` farthest back in time over its peak, over the recurrent layers of ``flow``
    (NaN without temporal flows): the quantity the ``vanishing_in_time`` rule compares with its threshold."""
    temporal = (flow.temporal or {}) if flow is not None else {}
    finite = [r for r in (far_over_peak(tf) for tf in temporal.values()) if math.isfinite(r)]
    return min(finite) if finite else math.nan


def _sort_loss(r: TrialResult) -> float:
    loss = r.held_out_loss if math.isfinite(r.held_out_loss) else r.loss_end
    return loss if math.isfinite(loss) else math.inf


def rank_trials(results: list[TrialResult]) -> list[TrialResult]:
    """The remedies that could be applied, best first: restored flow first (severity of the diagnosis
    at the end), then the lower held-out loss (the training loss when there is no held-out batch)."""
    tried = [r for r in results if r.ok and r.remedy is not BASELINE]
    return sorted(tried, key=lambda r: (SEVERITY.index(r.severity_end), _sort_loss(r)))


def format_trials(results: list[TrialResult]) -> str:
    """A text table: one row per trial, baseline first. The signal ratio is first/last layer of
    ‖∂L/∂h‖ (depth); with temporal flows a column gives farthest-step/peak ‖∂E/∂h_k‖ (time)."""
    timed = any(math.isfinite(r.time_ratio_init) for r in results if r.ok)
    head = (f"{'remedy':<18} {'depth ratio init→end':>23}" + (f" {'time ratio init→end':>23}" if timed else "")
            + f" {'train loss init→end':>21} {'held-out':>9}  verdict init→end")
    rows = [head, "-" * len(head)]
    for r in results:
        if not r.ok:
            rows.append(f"{r.remedy.id:<18} not applicable: {r.error}")
            continue
        in_time = f" {r.time_ratio_init:>10.3g} → {r.time_ratio_end:<10.3g}" if timed else ""
        rows.append(
            f"{r.remedy.id:<18} {r.ratio_init:>10.3g} → {r.ratio_end:<10.3g}{in_time} {r.loss_init:>9.4g} → "
            f"{r.loss_end:<9.4g} {r.held_out_loss:>9.4g}  {r.verdict_init} → {r.verdict_end}"
        )
    return "\n".join(rows)


# ------------------------------------------------------------------------------------------ deprecated
def Treatment(id: str, title: str, transform: Callable[[nn.Module], nn.Module] | None = None, lr_scale: float = 1.0,
              clip_norm: float | None = None, optimizer: str = "sgd") -> Remedy:
    """Deprecated: a trial applies a :class:`~gradprobe.remedies.Remedy`; build one with ``calls`` and
    ``training`` (this returns exactly that)."""
    warnings.warn("gradprobe.experiments.trials.Treatment is deprecated; pass gradprobe.remedies.Remedy "
                  "objects (e.g. CATALOGUE['relu_activation']) to run_trials", DeprecationWarning, stacklevel=2)
    calls = () if transform is None else (Call(transform, (MODEL,)),)
    return Remedy(id, title, "", calls=calls,
                  training=TrainingChange(lr_scale=lr_scale, clip_norm=clip_norm, optimizer=optimizer))


def treatment_for(remedy: Remedy) -> Remedy | None:
    """Deprecated: the remedy itself when a trial can apply it, else ``None``."""
    warnings.warn("treatment_for is deprecated; a Remedy is applied directly (see Remedy.trialable)",
                  DeprecationWarning, stacklevel=2)
    return remedy if remedy.trialable else None


def __getattr__(name: str):
    if name == "TREATABLE":
        warnings.warn("TREATABLE is deprecated; use gradprobe.remedies.CATALOGUE and Remedy.trialable",
                      DeprecationWarning, stacklevel=2)
        return {k: r for k, r in CATALOGUE.items() if r.trialable}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
