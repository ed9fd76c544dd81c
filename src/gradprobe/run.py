"""A whole run, live or read back from its run log: trace, model facts, metadata and the diagnosis.

:func:`load_run` reads a run log (no model needed) into a :class:`Run`; ``run.diagnose()`` applies the
same rules to the same data as the live ``probe.diagnose()`` did (the in-memory trace bound is replayed
from the saved configuration, the mean-field expectation comes from the saved model facts), so both say
exactly the same: verdicts, evidence, remedies, order.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from gradprobe._display import badge, esc, html_table, num
from gradprobe.analysis.depth import SignalProfile, signal_profile
from gradprobe.analysis.expectation import DepthExpectation, depth_expectation
from gradprobe.diagnosis import Diagnosis, DiagnosisConfig, diagnose_flow
from gradprobe.diagnosis.remedies import CATALOGUE
from gradprobe.errors import ConfigError, ProbeStateError, RunLogError
from gradprobe.runlog import add_note, plain_json, read_run
from gradprobe.trace import LayerFlow, ModelFacts, SpikeLog, Trace
from gradprobe.trace.spikes import NOTE_KEY as SPIKES_NOTE

__all__ = ["Run", "RunSummary", "load_run", "config_as_dict", "config_from_dict"]


def config_as_dict(config: DiagnosisConfig) -> dict:
    return dataclasses.asdict(config)


def config_from_dict(d: dict | None) -> DiagnosisConfig:
    known = {f.name for f in dataclasses.fields(DiagnosisConfig)}
    return DiagnosisConfig(**{k: v for k, v in (d or {}).items() if k in known})


@dataclass(frozen=True)
class RunSummary:
    """What a person wants to know first about a run (one row of the report's summary table).

    ``recorded``: recorded steps (``first_step`` … ``last_step``); ``final_loss``: the loss of the last
    recorded step; ``diagnosis``: the verdicts at the last recorded step (the saved diagnosis when it
    was made there, else :meth:`Run.diagnose`); ``first`` / ``last``: the depth profile of
    ``‖∂L/∂h_l‖`` at the first and last recorded step (``ratio`` = first layer / last layer,
    ``factor`` = per-layer gain going backward); ``expectation``: mean-field theory's per-layer gain
    √χ₁ for a plain MLP (Poole et al. 2016; Schoenholz et al. 2017), ``None`` for other models.
    """

    name: str
    model: str
    n_layers: int
    recorded: int
    first_step: int | None
    last_step: int | None
    final_loss: float | None
    diagnosis: Diagnosis | None
    first: SignalProfile | None
    last: SignalProfile | None
    expectation: DepthExpectation | None

    def mean_field_text(self) -> str:
        """``√χ₁ = 0.98 (z = 1.2, within |z| ≤ 3)``, or ``—`` where mean field does not apply."""
        e = self.expectation
        if e is None:
            return "—"
        where = "within" if abs(e.z) <= 3 else "outside"
        return f"√χ₁ = {num(e.gain)} (z = {e.z:.2f}, {where} |z| ≤ 3)"

    def lines(self) -> list[tuple[str, str]]:
        """(what, value) pairs, in reading order."""
        d = self.diagnosis

        def ratio(p: SignalProfile | None) -> str:
            return num(p.ratio) if p is not None else "—"

        steps = "none" if not self.recorded else f"{self.recorded} ({self.first_step} … {self.last_step})"
        return [
            ("model", f"{self.model}, {self.n_layers} layers"),
            ("recorded steps", steps),
            ("final loss", num(self.final_loss, 4)),
            ("verdicts", "—" if d is None else ", ".join(f"{v.kind} ({v.severity})" for v in d.verdicts)),
            ("signal ratio first/last layer", f"{ratio(self.first)} at step {self.first_step} → "
                                              f"{ratio(self.last)} at step {self.last_step}"),
            ("per-layer gain (last step)", num(self.last.factor) if self.last is not None else "—"),
            ("mean-field expectation", self.mean_field_text()),
        ]


@dataclass(frozen=True, eq=False)
class Run:
    """One run: ``trace`` (every recorded step), ``facts``, ``meta`` (versions, model, layers, probe
    configuration and cadence, sessions), the saved ``diagnosis`` (``None`` if the run was never
    diagnosed) and the diagnosis configuration it used.

    >>> import tempfile, torch
    >>> from torch import nn
    >>> import gradprobe
    >>> net = nn.Sequential(*[m for _ in range(8) for m in (nn.Linear(16, 16), nn.Sigmoid())])
    >>> d = tempfile.mkdtemp()
    >>> with gradprobe.Probe(net, log_dir=d, run_name="sig") as probe:
    ...     net(torch.randn(32, 16)).pow(2).mean().backward()
    ...     _ = probe.step()
    ...     live = probe.diagnose()
    >>> run = gradprobe.load_run(d)
    >>> run.diagnose() == live == run.diagnosis, live.verdict
    (True, 'vanishing')
    """

    trace: Trace
    facts: ModelFacts | None = None
    #: the last recorded step (a bounded live trace may not retain it); ``None``: ``trace.last``
    last: LayerFlow | None = None
    meta: dict = field(default_factory=dict)
    diagnosis: Diagnosis | None = None
    diagnosis_config: DiagnosisConfig = field(default_factory=DiagnosisConfig)
    path: Path | None = None

    @property
    def config(self) -> dict:
        """The probe configuration the run was recorded with (``every``, ``max_steps``, recorders, ...)."""
        return dict(self.meta.get("config") or {})

    @property
    def name(self) -> str:
        return self.path.stem if self.path is not None else str(self.meta.get("model", "run"))

    @property
    def spikes(self) -> SpikeLog | None:
        """The gradient spikes found during the run (the note ``"spikes"``), or ``None`` if none were watched."""
        saved = self.meta.get(SPIKES_NOTE)
        return None if saved is None else SpikeLog.from_dict(saved)

    def diagnose(self, **overrides) -> Diagnosis:
        """Diagnose the last recorded step as the live probe did (``overrides``: DiagnosisConfig fields)."""
        last = self.last if self.last is not None else self.last_full()
        if last is None:
            raise ProbeStateError(f"the run {self.name!r} holds no recorded step, so there is nothing to diagnose")
        config = dataclasses.replace(self.diagnosis_config, **overrides) if overrides else self.diagnosis_config
        # the last recorded step, with the history a live bounded trace would have held beside it
        history = self.trace.thinned(self.config.get("max_steps", 10_000))
        return diagnose_flow(last, facts=self.facts, trace=history, config=config, spikes=self.spikes)

    def last_full(self) -> LayerFlow | None:
        """The latest record every scheduled recorder measured (what a diagnosis rests on); a step the loss
        scaler skipped (:attr:`LayerFlow.skipped`: an fp16 overflow) does not count."""
        scheduled = {r["name"] for r in self.config.get("recorders", []) if r.get("scheduled", True)}
        return next((f for f in reversed(list(self.trace))
                     if not f.skipped and (not f.recorders or set(f.recorders) >= scheduled)), None)

    @property
    def history(self) -> Trace:
        """The trace as the live probe held it (its ``max_steps`` bound replayed on a reloaded run)."""
        try:
            return self.trace.thinned(self.config.get("max_steps", 10_000))
        except ConfigError:  # already thinned under another bound: it is what the live probe held
            return self.trace

    @property
    def last_flow(self) -> LayerFlow | None:
        """The step the diagnosis rests on: the latest record every scheduled recorder measured
        (:meth:`last_full`; ``None`` for an empty run)."""
        return self.last if self.last is not None else self.last_full()

    def final_diagnosis(self) -> Diagnosis | None:
        """The verdicts at the last recorded step: the saved diagnosis when it was made at that step,
        else :meth:`diagnose` (``None`` for an empty run)."""
        last = self.last_flow
        if last is None:
            return None
        if self.diagnosis is not None and self.meta.get("diagnosis_step") == last.step:
            return self.diagnosis
        return self.diagnose()

    def summary(self) -> RunSummary:
        """The run at a glance (:class:`RunSummary`), computed from saved data only."""
        history, last = self.history, self.last_flow
        first_flow = history[0] if len(history) else None
        first = signal_profile(first_flow) if first_flow is not None else None
        prof = signal_profile(last) if last is not None else None
        return RunSummary(
            name=self.name, model=str(self.meta.get("model", "?")),
            n_layers=len(self.meta.get("layers") or (last.names if last is not None else ())),
            recorded=history.recorded, first_step=None if first_flow is None else first_flow.step,
            last_step=None if last is None else last.step, final_loss=None if last is None else last.loss,
            diagnosis=self.final_diagnosis(), first=first, last=prof,
            expectation=depth_expectation(self.facts, prof) if self.facts is not None else None,
        )

    def __str__(self) -> str:
        s = self.summary()
        width = max(len(k) for k, _ in s.lines())
        out = [f"run {self.name!r}"] + [f"  {k:<{width}}  {v}" for k, v in s.lines()]
        if s.diagnosis is not None:
            out += ["", str(s.diagnosis)]
        return "\n".join(out)

    def _repr_html_(self) -> str:
        s = self.summary()
        head = f"<p><b>run <code>{esc(self.name)}</code></b>"
        if s.diagnosis is not None:
            head += " " + badge(s.diagnosis.verdict, s.diagnosis.primary.severity)
        body = html_table(None, s.lines())
        return f"<div>{head}</p>{body}" + (s.diagnosis._repr_html_() if s.diagnosis is not None else "") + "</div>"

    def note(self, key: str, value) -> None:
        """Save a run-level result known only after the probe closed (a test accuracy, remedy trials, a
        spectrum): into :attr:`meta` and, when the run has a run log, into its ``meta`` table
        (:func:`gradprobe.runlog.add_note`), so ``load_run(path).meta[key]`` gives the same value back.

        ``value`` must be plain JSON; it is stored as the run log gives it back (tuples become lists).
        The report's keys are documented in :mod:`gradprobe.report.notes`.
        """
        value = plain_json(key, value)
        if self.path is not None:
            add_note(self.path, key, value)
        self.meta[key] = value

    def __repr__(self) -> str:
        d = self.diagnosis.verdict if self.diagnosis is not None else "not diagnosed"
        return f"Run({self.name!r}, {len(self.trace)} steps, {d})"


def load_run(path: str | os.PathLike) -> Run:
    """Read a run log (the ``.sqlite`` file, or a ``log_dir`` holding exactly one) into a :class:`Run`."""
    rec = read_run(path)
    try:
        saved = rec.meta.get("diagnosis")
        diagnosis = Diagnosis.from_dict(saved, CATALOGUE, rec.facts) if saved is not None else None
        config = config_from_dict(rec.meta.get("diagnosis_config"))
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        raise RunLogError(f"the diagnosis saved in the run log {rec.path} is malformed: {exc}") from exc
    return Run(rec.trace(), rec.facts, None, rec.meta, diagnosis, config, rec.path)
