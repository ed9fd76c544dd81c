"""The bounded in-memory history of recorded steps (:class:`Trace`): the probe's first sink."""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from gradprobe.errors import ConfigError, require
from gradprobe.trace.records import QUANTITIES, LayerFlow
from gradprobe.trace.sink import Sink
from gradprobe.trace.tidy import COLUMNS, tidy_rows

__all__ = ["Trace"]


class Trace(Sink):
    """Bounded in-memory history of recorded steps.

    Memory policy: at most ``max_steps`` :class:`LayerFlow` records are kept. When a new record would
    exceed that, every other retained record is dropped and the keep-stride doubles, so the trace
    always spans the whole run at an even stride (1, 2, 4, … recorded steps) and memory stays
    ``O(max_steps × layers)`` on runs of any length. The run log (``Probe(log_dir=...)``) keeps every
    step. ``max_steps=None`` keeps everything (used when reading a run log back). The policy depends
    only on the sequence of appends, so :meth:`thinned` rebuilds exactly what a live bounded trace held.

    >>> t = Trace(max_steps=4)
    >>> for s in range(10):
    ...     t.append(LayerFlow.from_arrays(["a"], grad_norm=[float(s)], step=s))
    >>> t.steps.tolist(), t.stride
    ([0, 4, 8], 4)
    """

    rank_zero_only = False  # every rank of a data-parallel run keeps its own in-memory trace

    def __init__(self, max_steps: int | None = 10_000):
        if max_steps is not None and max_steps < 2:
            raise ConfigError(f"Trace(max_steps={max_steps}) must keep at least 2 steps (or None for unbounded)")
        self.max_steps = max_steps
        self.stride = 1
        self._records: list[tuple[int, LayerFlow]] = []
        self._count = 0
        self._names: dict[str, None] = {}
        self._last_names: tuple | None = None  # the names of the last record appended (already in _names)
        self._quantities: dict[str, None] = dict.fromkeys(QUANTITIES)

    @classmethod
    def of(cls, flows: Iterable[LayerFlow], max_steps: int | None = None) -> Trace:
        """A trace holding ``flows`` appended in order under the ``max_steps`` policy."""
        t = cls(max_steps)
        for f in flows:
            t.append(f)
        return t

    def thinned(self, max_steps: int | None) -> Trace:
        """What a trace bounded at ``max_steps`` would hold had it received this trace's records (itself if unbounded)."""
        if max_steps is None or self.max_steps == max_steps or (self.stride == 1 and len(self) <= max_steps):
            return self
        if self.stride != 1:
            raise ConfigError(f"thinned({max_steps}) needs every record, but this trace is already thinned "
                              f"(max_steps={self.max_steps}, stride {self.stride})")
        return Trace.of(self, max_steps)

    # ------------------------------------------------------------------ sink
    def write(self, record: LayerFlow) -> None:
        self.append(record)

    def append(self, flow: LayerFlow) -> None:
        """Add one recorded step (it is kept or thinned according to the memory policy)."""
        i = self._count
        self._count += 1
        if flow.names is not self._last_names:  # (a probe hands every record the same names tuple)
            for n in flow.names:
                self._names.setdefault(n, None)
            self._last_names = flow.names
        for q in flow.values:
            self._quantities.setdefault(q, None)
        if i % self.stride:
            return
        self._records.append((i, flow))
        if self.max_steps is not None and len(self._records) > self.max_steps:
            self.stride *= 2
            self._records = [(j, f) for j, f in self._records if j % self.stride == 0]

    # ---------------------------------------------------------------- access
    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[LayerFlow]:
        return (f for _, f in self._records)

    def __getitem__(self, i: int) -> LayerFlow:
        return self._records[i][1]

    def __repr__(self) -> str:
        span = f"steps {self[0].step}…{self.last.step}" if self._records else "empty"
        return f"Trace({len(self)} records, {span}, stride {self.stride})"

    @property
    def recorded(self) -> int:
        """How many steps were appended in total (including thinned ones)."""
        return self._count

    @property
    def last(self) -> LayerFlow:
        if not self._records:
            raise IndexError("the trace is empty: no step has been recorded yet")
        return self._records[-1][1]

    @property
    def names(self) -> tuple[str, ...]:
        """Every layer name seen, in order of first appearance."""
        return tuple(self._names)

    @property
    def quantities(self) -> tuple[str, ...]:
        """Every per-layer quantity any record holds (built-in first), e.g. for exports."""
        return tuple(self._quantities)

    @property
    def steps(self) -> np.ndarray:
        return np.array([f.step if f.step is not None else j for j, f in self._records], dtype=np.int64)

    @property
    def losses(self) -> np.ndarray:
        return np.array([np.nan if f.loss is None else f.loss for f in self], dtype=np.float64)

    def to_pandas(self):
        """Every retained record as one long ``pandas.DataFrame`` with the columns ``step, table, layer,
        quantity, index, value`` (see :mod:`gradprobe.trace.tidy`; needs the ``pandas`` extra).

        ``df[df.table == ""].pivot_table(index="step", columns="layer", values="value")`` after choosing a
        ``quantity`` gives the step × layer matrix of :meth:`matrix`.
        """
        pd = require("pandas", "pandas")
        rows = [r for f in self for r in tidy_rows(f)]
        df = pd.DataFrame(rows, columns=list(COLUMNS))
        return df.astype({"index": "int64", "value": "float64"})

    def matrix(self, quantity: str) -> np.ndarray:
        """``(S, L)`` array of ``quantity`` over retained steps × :attr:`names`; NaN where a layer is absent or not measured."""
        if quantity not in self._quantities:
            raise ConfigError(f"unknown quantity {quantity!r}; this trace holds {list(self._quantities)}")
        names = self.names
        col = {n: k for k, n in enumerate(names)}
        out = np.full((len(self), len(names)), np.nan)
        for s, f in enumerate(self):
            if quantity in f.values:
                cols = [col[n] for n in f.names]
                out[s, cols] = np.where(f.mask(quantity), f.values[quantity], np.nan)
        return out
