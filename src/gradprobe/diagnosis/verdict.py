"""Verdicts and diagnoses: what is wrong, the numbers behind it, and what to do.

A remedy is a :class:`gradprobe.remedies.Remedy` (the catalogue's one object per remedy); it is
re-exported here so ``gradprobe.diagnosis.Remedy`` keeps working.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from gradprobe._display import badge, esc
from gradprobe.remedies.catalogue import Remedy
from gradprobe.trace import ModelFacts

__all__ = ["Remedy", "Verdict", "Diagnosis", "SEVERITY", "remedy_call"]

#: Severity levels, most severe last.
SEVERITY = ("ok", "info", "warning", "error")


@dataclass(frozen=True)
class Verdict:
    """One finding: a stable ``kind`` id, a severity, evidence sentences with numbers, ranked remedies."""

    kind: str
    severity: str
    evidence: tuple[str, ...]
    remedies: tuple[Remedy, ...] = ()
    layer: str | None = None
    data: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.severity not in SEVERITY:
            raise ValueError(f"severity {self.severity!r} is not one of {SEVERITY}")

    def as_dict(self) -> dict:
        """Plain JSON values; remedies by id (with their text and call, for readers without gradprobe)."""
        return {"kind": self.kind, "severity": self.severity, "evidence": list(self.evidence),
                "remedies": [r.as_dict() for r in self.remedies], "layer": self.layer, "data": _plain(self.data)}

    @classmethod
    def from_dict(cls, d: dict, catalogue=None, facts: ModelFacts | None = None) -> Verdict:
        """Inverse of :meth:`as_dict`; remedies are looked up by id in ``catalogue`` when it has them and
        fitted to the model's ``facts`` as the live diagnosis fitted them (:meth:`Remedy.for_model`); an
        id it lacks (a newer gradprobe's) keeps its saved title and reason, without calls. A saved training
        change (a clipping threshold measured from the run) is kept (:meth:`Remedy.with_saved`)."""
        cat = catalogue or {}
        remedies = tuple(cat[r["id"]].for_model(facts).with_saved(r) if r["id"] in cat else Remedy(r["id"], r["title"], r["why"])
                         for r in d["remedies"])
        return cls(d["kind"], d["severity"], tuple(d["evidence"]), remedies, d.get("layer"), dict(d.get("data") or {}))


@dataclass(frozen=True)
class Diagnosis:
    """All verdicts for one flow, the most severe first. ``verdict`` is the primary one's kind.

    >>> d = Diagnosis((Verdict("healthy", "ok", ("ratio 1.0",)),))
    >>> d.verdict, d.evidence
    ('healthy', ['ratio 1.0'])
    """

    verdicts: tuple[Verdict, ...]
    #: what the diagnosis rests on: ``step`` (the record diagnosed), ``history`` (recorded steps the
    #: rules over time could use) and ``recorders`` (which recorders measured that step)
    basis: dict = field(default_factory=dict)

    @property
    def primary(self) -> Verdict:
        return self.verdicts[0]

    @property
    def verdict(self) -> str:
        return self.primary.kind

    @property
    def kinds(self) -> list[str]:
        return [v.kind for v in self.verdicts]

    @property
    def evidence(self) -> list[str]:
        return list(self.primary.evidence)

    @property
    def remedies(self) -> list[Remedy]:
        return list(self.primary.remedies)

    @property
    def healthy(self) -> bool:
        return self.verdict == "healthy"

    @property
    def ok(self) -> bool:
        """No problem found: the primary verdict is "healthy", "converged" or another of severity ok/info."""
        return SEVERITY.index(self.primary.severity) <= SEVERITY.index("info")

    def __contains__(self, kind: str) -> bool:
        return kind in self.kinds

    def __eq__(self, other) -> bool:
        return isinstance(other, Diagnosis) and self.as_dict() == other.as_dict()

    __hash__ = None

    def _repr_html_(self) -> str:
        """Every verdict as a coloured badge, its evidence as a list, its remedies ranked with the call
        that applies each (Jupyter's rich display; the HTML report shows the same)."""
        parts = ['<div class="gp-diagnosis">']
        for v in self.verdicts:
            where = f" at <code>{esc(v.layer)}</code>" if v.layer else ""
            parts.append(f'<div class="gp-verdict"><p>{badge(v.kind, v.severity)} '
                         f"<span class=\"gp-sev\">{esc(v.severity)}</span>{where}</p>")
            if v.evidence:
                parts.append("<ul class=\"gp-evidence\">" + "".join(f"<li>{esc(e)}</li>" for e in v.evidence) + "</ul>")
            if v.remedies:
                items = []
                for r in v.remedies:
                    call = remedy_call(r)
                    items.append(f"<li><b>{esc(r.title)}</b>: {esc(r.why)}"
                                 + (f"<br><code>{esc(call)}</code>" if call else "") + "</li>")
                parts.append("<ol class=\"gp-remedies\">" + "".join(items) + "</ol>")
            parts.append("</div>")
        parts.append("</div>")
        return "".join(parts)

    def as_dict(self) -> dict:
        """Plain JSON values (see :meth:`Verdict.as_dict`), e.g. for ``--json`` and the run log."""
        return {"verdict": self.verdict, "verdicts": [v.as_dict() for v in self.verdicts], "basis": _plain(self.basis)}

    @classmethod
    def from_dict(cls, d: dict, catalogue=None, facts: ModelFacts | None = None) -> Diagnosis:
        """Inverse of :meth:`as_dict` (see :meth:`Verdict.from_dict`)."""
        return cls(tuple(Verdict.from_dict(v, catalogue, facts) for v in d["verdicts"]), dict(d.get("basis") or {}))

    def basis_sentence(self) -> str:
        """One line saying which step the verdicts rest on and how much history there was ('' if unknown)."""
        b = self.basis
        if "step" not in b:
            return ""
        hist = b.get("history", 0)
        rec = b.get("recorders") or []
        return (f"based on step {b['step']}" + (f" (measured by {', '.join(rec)})" if rec else "")
                + f" and {hist} recorded step{'s' if hist != 1 else ''} of history")

    def __str__(self) -> str:
        basis = self.basis_sentence()
        lines = [basis[0].upper() + basis[1:]] if basis else []
        for v in self.verdicts:
            where = f" at {v.layer}" if v.layer else ""
            lines.append(f"[{v.severity.upper()}] {v.kind}{where}")
            lines.extend(f"  - {e}" for e in v.evidence)
            for k, r in enumerate(v.remedies, 1):
                lines.append(f"  {k}. {r.title}" + (f"  [{r.call}]" if r.call else ""))
                lines.append(f"     {r.why}")
        return "\n".join(lines)


def remedy_call(remedy) -> str:
    """The call that applies ``remedy`` as text (``""`` when there is none to show)."""
    return remedy.call


def _plain(x):
    """JSON-safe copy: tuples become lists, numpy scalars and arrays Python numbers and lists (NaN/Inf kept)."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if hasattr(x, "tolist"):
        return _plain(x.tolist())
    return x
