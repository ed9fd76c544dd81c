"""Where records go: the :class:`Sink` interface and the :class:`RunHeader` a sink receives first.

A probe session sends every sink the run's header once (:meth:`Sink.open`), then every recorded step
(:meth:`Sink.write`), run-level results as they are known (:meth:`Sink.note`: the diagnosis, updated
model facts) and finally :meth:`Sink.close`. The in-memory :class:`~gradprobe.trace.Trace` and the SQLite
run log are sinks; so are the TensorBoard writer and framework loggers of ``gradprobe.integrations``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from gradprobe.trace.facts import ModelFacts
from gradprobe.trace.records import LayerFlow

__all__ = ["Sink", "RunHeader"]


@dataclass(frozen=True)
class RunHeader:
    """What a run is, known before its first step.

    * ``model``: the model's class name; ``layers`` / ``kinds``: every layer in discovery order;
    * ``facts``: the model's building blocks (:class:`~gradprobe.trace.ModelFacts`);
    * ``config``: the probe's configuration as plain JSON values (options, recorders, cadence);
    * ``versions``: python / torch / gradprobe versions; ``first_step``: the number of the first step
      this session records (0, or the next step when appending to an existing run log).
    """

    model: str
    layers: tuple[str, ...]
    kinds: tuple[str, ...]
    facts: ModelFacts | None = None
    config: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    first_step: int = 0


class Sink:
    """Receives what a probe session records. Override what you need; the defaults do nothing.

    >>> class Count(Sink):
    ...     def __init__(self): self.n = 0
    ...     def write(self, record): self.n += 1
    >>> Count().n
    0
    """

    #: in a data-parallel run, only rank 0 calls this sink (every rank measures the same combined
    #: numbers; one writer is enough). Set it to False for a sink every rank should feed.
    rank_zero_only: bool = True

    def open(self, header: RunHeader) -> None:
        """The run starts (called once, before the first :meth:`write`)."""

    def write(self, record: LayerFlow) -> None:
        """One recorded step."""

    def note(self, key: str, value) -> None:
        """A run-level result as plain JSON values (``"diagnosis"``, ``"facts"``, ...); a later note replaces an earlier one."""

    def close(self) -> None:
        """The run ends; flush and release resources. Must be idempotent."""
