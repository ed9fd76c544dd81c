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

from gradprobe.diagnosis import Diagnosis, DiagnosisConfig, diagnose_flow
from gradprobe.diagnosis.remedies import CATALOGUE
from gradprobe.errors import ProbeStateError, RunLogError
from gradprobe.runlog import read_run
from gradprobe.trace import LayerFlow, ModelFacts, Trace

__all__ = ["Run", "load_run", "config_as_dict", "config_from_dict"]


def config_as_dict(config: DiagnosisConfig) -> dict:
    return dataclasses.asdict(config)


def config_from_dict(d: dict | None) -> DiagnosisConfig:
    known = {f.name for f in dataclasses.fields(DiagnosisConfig)}
    return DiagnosisConfig(**{k: v for k, v in (d or {}).items() if k in known})


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

    def diagnose(self, **overrides) -> Diagnosis:
        """Diagnose the last recorded step as the live probe did (``overrides``: DiagnosisConfig fields)."""
        last = self.last if self.last is not None else self.last_full()
        if last is None:
            raise ProbeStateError(f"the run {self.name!r} holds no recorded step, so there is nothing to diagnose")
        config = dataclasses.replace(self.diagnosis_config, **overrides) if overrides else self.diagnosis_config
        # the last recorded step, with the history a live bounded trace would have held beside it
        history = self.trace.thinned(self.config.get("max_steps", 10_000))
        return diagnose_flow(last, facts=self.facts, trace=history, config=config)

    def last_full(self) -> LayerFlow | None:
        """The latest record every scheduled recorder measured (what a diagnosis rests on)."""
        scheduled = {r["name"] for r in self.config.get("recorders", []) if r.get("scheduled", True)}
        return next((f for f in reversed(list(self.trace)) if not f.recorders or set(f.recorders) >= scheduled), None)

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
    except (KeyError, TypeError, ValueError) as exc:
        raise RunLogError(f"the diagnosis saved in the run log {rec.path} is malformed: {exc}") from exc
    return Run(rec.trace(), rec.facts, None, rec.meta, diagnosis, config, rec.path)
