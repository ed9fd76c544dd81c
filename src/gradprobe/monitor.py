"""``gradprobe.Probe``: a recording :class:`~gradprobe.probe.Session` that can also diagnose what it recorded.

The session (probe floor) measures; judging is the diagnosis floor's job. This class joins the two,
and saves every diagnosis (with the model facts and the configuration it used) to the session's
sinks, so a run log holds the whole result.
"""
from __future__ import annotations

from dataclasses import replace

from gradprobe.diagnosis import Diagnosis, DiagnosisConfig, diagnose_flow
from gradprobe.errors import ProbeStateError
from gradprobe.probe import Session
from gradprobe.run import Run, config_as_dict
from gradprobe.runlog import plain_json, versions
from gradprobe.trace.spikes import NOTE_KEY as SPIKES_NOTE

__all__ = ["Probe"]


def _plain_config(config: dict) -> dict:
    """The configuration as the run log gives it back (JSON values)."""
    return plain_json("probe_config", config)


class Probe(Session):
    __doc__ = Session.__doc__ + """
    Beyond the session: :meth:`diagnose` (verdicts on the latest step, saved to the run log) and
    :meth:`run` (the whole live result as a :class:`~gradprobe.Run`).

    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    >>> with Probe(net) as probe:
    ...     loss = net(torch.randn(16, 4)).pow(2).mean()
    ...     loss.backward()
    ...     _ = probe.step(loss)
    ...     flow = probe.flow()
    >>> flow.names
    ('0', '2')
    >>> bool((flow.output_grad_norm > 0).all())
    True
    """

    _diagnosis: Diagnosis | None = None
    _diagnosis_config: DiagnosisConfig | None = None

    def diagnose(self, config: DiagnosisConfig | None = None, *, recorded: bool = False, **overrides) -> Diagnosis:
        """Verdicts on the latest flow (see :func:`gradprobe.diagnosis.diagnose_flow`), with the model
        facts measured now; ``overrides`` are :class:`~gradprobe.DiagnosisConfig` fields. The diagnosis
        and its inputs are noted to every sink (the run log keeps them).

        With an overhead budget the slower recorders skip steps: the verdicts then rest on the latest
        step every recorder measured (``diagnosis.basis`` says which, and how much history). A step the
        loss scaler skipped (``flow.skipped``: an fp16 overflow, not an explosion) is passed over likewise.

        ``recorded=True`` diagnoses the last recorded step even if backward passes ran since (a
        framework callback at the end of training: what the hooks hold then is not a training step).

        With ``spikes=True`` (or ``on_spike=``) the gradient spikes found so far are checked first and
        judged too (``exploding_in_training``).
        """
        if recorded:
            self._check_open("diagnose")
            self._fetch()
            if self._last is None:
                raise ProbeStateError("diagnose(recorded=True): no step has been recorded yet; call step() after a backward pass")
            flow = self._last
        else:
            flow = self.flow()
        if (not self.is_full(flow) or flow.skipped) and self._last_full is not None:
            flow = self._last_full
        facts = self.refresh_facts()
        config = config or DiagnosisConfig()
        if overrides:
            config = replace(config, **overrides)
        spikes = self.spike_log() if self.spikes is not None else None
        d = diagnose_flow(flow, facts=facts, trace=self.trace, config=config, spikes=spikes)
        self._diagnosis, self._diagnosis_config = d, config
        self.note("diagnosis_config", config_as_dict(config))
        self.note("diagnosis_step", flow.step)
        self.note("diagnosis", d.as_dict())
        return d

    def run(self) -> Run:
        """The live result so far: trace, facts, configuration, every note and the last diagnosis (if any).

        ``run.meta`` holds what the run log's ``meta`` holds (notes, model, layers, configuration,
        versions), except its timestamps and sessions, so a report built from it is the one rebuilt
        from the run log (:func:`gradprobe.report.build_report`). Also after the probe closed (the
        model facts are then the final ones the run log holds)."""
        meta = {**self.notes, "model": type(self.model).__name__, "layers": [l.name for l in self.layers],
                "kinds": [l.kind for l in self.layers], "config": _plain_config(self.config), **versions()}
        if self.spikes is not None:  # the latest log (a spike may not have been noted yet)
            meta[SPIKES_NOTE] = self.spikes.log().as_dict()
        return Run(self.trace, self.facts, self._last_full or self._last, meta, self._diagnosis,
                   self._diagnosis_config or DiagnosisConfig(), self.runlog.path if self.runlog is not None else None)
