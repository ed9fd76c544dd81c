"""Rules over the course of training: ``exploding_in_training`` (gradient spikes).

Pascanu, Mikolov & Bengio (2013) call "the large increase in the norm of the gradient during
training" the exploding gradient problem. The probe's spike watch (:class:`gradprobe.probe.SpikeWatch`)
finds such increases step by step and names where each started; this rule turns the spike log
(:class:`gradprobe.trace.SpikeLog`, the run-log note ``"spikes"``) into a verdict:

* only alarms count (every spike, unless the watch confirms by the loss: ``confirm="loss"``);
* severity ``error`` when some spike's update went through at full size (not clipped, not skipped),
  ``warning`` when clipping or the guard caught every one;
* evidence: the first spike's step, where it started (the first spiking layer in backward order) and
  the largest relative jump, the total norm's and the loss's jump over their rolling medians,
  whether clipping caught it and the clip rate in the steps before it, what the guard did;
* remedies: clipping first when a spike went through unclipped, then a learning-rate warm-up and a
  lower learning rate (warm-up first for a spike in the first ``EARLY`` steps), Pascanu's Ω for
  recurrent models, the guard when it did not act; for a non-finite spike the NaN/Inf checks first;
* a clipping threshold from the measured history: twice the median total norm of the healthy steps
  in the flight record (Pascanu et al. suggest 0.5–10× the average norm), with the fraction of those
  healthy steps it would have touched.
"""
from __future__ import annotations

import math

import numpy as np

from dataclasses import replace

from gradprobe.diagnosis.remedies import pick
from gradprobe.diagnosis.verdict import Verdict
from gradprobe.trace import SpikeEvent, SpikeLog

__all__ = ["rule_exploding_in_training", "suggested_max_norm"]

#: the suggested clipping threshold is this multiple of the median healthy total norm
CLIP_FACTOR = 2.0
#: a first spike before this step ranks the learning-rate warm-up above a lower learning rate
EARLY = 1000


def suggested_max_norm(event: SpikeEvent) -> tuple[float, float, int] | None:
    """``(threshold, fraction of healthy steps it clips, healthy steps)`` from the event's flight record:
    ``CLIP_FACTOR ×`` the median total norm of its unflagged steps with a finite norm (``None`` if none)."""
    f = event.flight
    if f is None:
        return None
    total = np.asarray(f.total, dtype=np.float64)
    healthy = total[~np.asarray(f.flagged, dtype=bool) & np.isfinite(total)] if len(total) else total
    if not len(healthy):
        return None
    tau = CLIP_FACTOR * float(np.median(healthy))
    return tau, float(np.mean(healthy > tau)), int(len(healthy))


def _g(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3g}"


def _first_sentence(e: SpikeEvent, window) -> str:
    if e.kind == "non_finite":
        return f"at step {e.step} the gradient or the loss was not finite (NaN/Inf)"
    if e.kind == "remote":
        return f"at step {e.step} another rank found a spike (the guard's decision is the OR across ranks)"
    t = e.total
    return (f"at step {e.step} the total gradient norm ‖∇θ‖ = {_g(t.value)} was {_g(t.jump)}× its rolling median "
            f"({_g(t.median)} over up to {window} steps before; a spike is above {_g(t.threshold)})")


def rule_exploding_in_training(findings, config) -> Verdict | None:
    """Gradient spikes during training (see the module docstring); ``None`` without a spike log or spikes."""
    log: SpikeLog | None = findings.spikes
    if log is None or not log.alarms:  # (gradient-only spikes under confirm="loss" are no alarm)
        return None
    events = log.alarms
    first = events[0]
    window = log.config.get("window", "?")
    n = len(events) + log.dropped
    steps = ", ".join(str(e.step) for e in events[:8]) + (", …" if n > 8 else "")
    ev = [f"{n} gradient spike{'s' if n != 1 else ''} during training (starting at step{'s' if n != 1 else ''} {steps}); "
          + _first_sentence(first, window)]
    unconfirmed = len(log.events) - len(events)
    if unconfirmed:
        ev.append(f"{unconfirmed} more gradient spike{'s' if unconfirmed != 1 else ''} that the loss did not confirm "
                  "(not alarms: the watch confirms by the loss, confirm='loss')")
    if first.layers:
        ev.append(f"it started at layer {first.layers[0]!r}, the first of {len(first.layers)} spiking layer"
                  f"{'s' if len(first.layers) != 1 else ''} in backward order")
    if first.largest_layer is not None:
        ev.append(f"the largest relative jump was at layer {first.largest_layer!r}: {_g(first.largest_jump)}× its own "
                  "rolling median")
    if first.loss is not None and first.kind == "jump":
        ev.append(f"the loss at that step was {_g(first.loss.jump)}× its rolling median"
                  + ("" if first.loss.spiked else " (not a spike: the gradient moved before the loss did)"))
    if first.flagged_steps > 1:
        ev.append(f"the first spike lasted {first.flagged_steps} flagged steps (to step {first.last_step}; peak "
                  f"{_g(first.peak_jump)}× the median)")
    if first.clipped is None:
        ev.append("whether clipping caught it is unknown: the probe was given no clipping threshold "
                  "(SpikeWatch(clip=max_norm or the clipper))")
    else:
        rate = "" if first.clip_rate is None else f"; {first.clip_rate:.0%} of the steps before it were clipped"
        ev.append(f"norm clipping at {_g(first.max_norm)} {'caught it (the update was scaled to the threshold)' if first.clipped else 'did not catch it'}{rate}")
    skipped = sum(e.skipped_steps for e in events)
    if skipped:
        ev.append(f"the guard skipped {skipped} update{'s' if skipped != 1 else ''} (parameters and optimizer state unchanged)")
    if any(e.action == "raised" for e in events):
        ev.append("training was stopped at the spike (on_spike='raise')")
    sug = suggested_max_norm(first)
    if sug is not None:
        tau, frac, m = sug
        ev.append(f"a clipping threshold from the measured history: max_norm ≈ {_g(tau)} ({CLIP_FACTOR:g}× the median "
                  f"total norm of the {m} healthy steps before the spike); it would have clipped {frac:.0%} of them")
    applied = [e for e in events if e.action in ("recorded", "warned") and e.clipped is not True]
    facts = findings.facts
    if first.kind == "non_finite":
        ids = ["check_inputs", "anomaly_mode", "clip_norm", "lower_lr"]
    else:
        # an early spike (within the first EARLY steps) is the classic case for a warm-up
        ids = (["clip_norm"] if applied else []) + (["lr_warmup", "lower_lr"] if first.step < EARLY else ["lower_lr", "lr_warmup"])
    if facts is not None and facts.recurrent:
        ids.append("pascanu_omega")
    if not skipped:
        ids.append("skip_spikes")
    data = {"steps": [e.step for e in events], "first_step": first.step, "kind": first.kind, "layer": first.layer,
            "largest_layer": first.largest_layer, "jump": None if first.total is None else first.total.jump,
            "clipped": first.clipped, "clip_rate": first.clip_rate, "skipped_steps": skipped,
            "suggested_max_norm": None if sug is None else sug[0], "dropped": log.dropped}
    remedies = pick(*ids, facts=facts)
    if sug is not None:  # the clipping threshold measured from the run, not the catalogue's default
        tau = float(f"{sug[0]:.3g}")
        remedies = tuple(replace(r, training=replace(r.training, clip_norm=tau)) if r.training.clip_norm is not None
                         else r for r in remedies)
    return Verdict("exploding_in_training", "error" if applied else "warning", tuple(ev), remedies,
                   layer=first.layer, data=data)
