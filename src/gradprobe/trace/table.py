"""A table of values over a recorder's own *sites* (activation modules, recurrent series, ...)."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

from gradprobe.errors import ConfigError

__all__ = ["Table", "frozen_array"]


def frozen_array(a, dtype) -> np.ndarray:
    """A read-only copy of ``a`` as ``dtype`` (records never alias a caller's buffer)."""
    arr = np.array(a, dtype=dtype)
    arr.setflags(write=False)
    return arr


@dataclass(frozen=True, eq=False)
class Table:
    """Values a recorder measured over its own *sites* (activation modules, recurrent series, ...).

    ``columns[c]`` is either one array with a leading axis of ``len(sites)`` (a dense column) or a tuple
    of one array (or ``None``) per site (a ragged column, e.g. one time profile per recurrent layer).
    Columns named in ``transient`` stay in memory only (e.g. per-sequence profiles); the run log keeps
    the others exactly.

    >>> t = Table(("a", "b"), ("Tanh", "ReLU"), {"frac": np.array([0.5, 0.0])})
    >>> t.column("frac").tolist(), t.index("b")
    ([0.5, 0.0], 1)
    """

    sites: tuple[str, ...]
    kinds: tuple[str, ...]
    columns: Mapping[str, object]
    transient: frozenset = frozenset()

    def __post_init__(self):
        n = len(self.sites)
        if len(self.kinds) != n:
            raise ConfigError(f"Table has {n} sites but {len(self.kinds)} kinds")
        cols = {}
        for name, col in self.columns.items():
            if isinstance(col, tuple):
                if len(col) != n:
                    raise ConfigError(f"Table column {name!r} has {len(col)} entries for {n} sites")
                cols[name] = tuple(None if a is None else frozen_array(a, np.asarray(a).dtype) for a in col)
            else:
                arr = frozen_array(col, np.asarray(col).dtype)
                if arr.ndim == 0 or arr.shape[0] != n:
                    raise ConfigError(f"Table column {name!r} has shape {arr.shape}; its first axis must be {n} (one row per site)")
                cols[name] = arr
        object.__setattr__(self, "sites", tuple(self.sites))
        object.__setattr__(self, "kinds", tuple(self.kinds))
        object.__setattr__(self, "columns", MappingProxyType(cols))
        object.__setattr__(self, "transient", frozenset(self.transient))

    @classmethod
    def trusted(cls, sites: tuple[str, ...], kinds: tuple[str, ...], columns: dict,
                transient: frozenset = frozenset()) -> Table:
        """The table the constructor would build, without checking or copying: for a recorder that
        builds the same table every step. Preconditions (not checked): ``sites`` and ``kinds`` are tuples
        of equal length ``n``; every column is a read-only array with a leading axis ``n`` that nothing
        else writes (:func:`frozen_array`), or a tuple of ``n`` such arrays or ``None``; ``columns`` is a
        fresh dict the caller does not keep; ``transient`` a frozenset."""
        self = object.__new__(cls)
        put = object.__setattr__
        put(self, "sites", sites)
        put(self, "kinds", kinds)
        put(self, "columns", MappingProxyType(columns))
        put(self, "transient", transient)
        return self

    def __len__(self) -> int:
        return len(self.sites)

    def column(self, name: str):
        try:
            return self.columns[name]
        except KeyError:
            raise ConfigError(f"this table has no column {name!r}; columns are {sorted(self.columns)}") from None

    def index(self, site: str) -> int:
        try:
            return self.sites.index(site)
        except ValueError:
            raise ConfigError(f"no site named {site!r}; sites are {list(self.sites)}") from None
