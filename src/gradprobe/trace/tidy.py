"""Records as flat rows and scalars: what the exports (CSV, pandas, TensorBoard, framework loggers) write.

:func:`tidy_rows` gives one row per number of a record, in the long ("tidy") form with the columns
:data:`COLUMNS`:

* ``step``: the record's step; ``table``: ``""`` for per-layer quantities and the loss, else the table's
  name (``"units"``, ``"temporal"``, ``"totals"``, ``"scaler"``, a user recorder's);
* ``layer``: the layer name (per-layer quantities) or the table's site (a table row); ``""`` for the loss;
* ``quantity``: ``"loss"``, a per-layer quantity (``"grad_norm"``, ...) or the table's column;
* ``index``: ``0``, or the position inside an array-valued entry (the time step ``k`` of a temporal
  profile ``‖∂E/∂h_k‖``); ``value``: a float (booleans as 0/1).

A per-layer value that was not measured has no row; a measured NaN or ±Inf has one. Table entries are
written as stored (NaN where a column does not apply to a site, e.g. ``dead_fraction`` of a tanh).
Transient table columns (kept in memory only, like per-sequence profiles) are left out, so the rows of
a live record and of the same record read back from its run log are identical.

:func:`scalars` gives the same numbers as ``{tag: value}`` for scalar loggers, one tag tree per
quantity: ``<prefix>/<quantity>/<layer>`` and ``<prefix>/<table>.<column>/<site>`` for the scalar
columns of tables, ``<prefix>/loss``.

>>> import numpy as np
>>> from gradprobe.trace import LayerFlow
>>> f = LayerFlow.from_arrays(["fc1", "fc2"], grad_norm=[0.5, np.nan], has_grad=[True, False], step=3, loss=1.25)
>>> list(tidy_rows(f))
[(3, '', '', 'loss', 0, 1.25), (3, '', 'fc1', 'grad_norm', 0, 0.5)]
>>> scalars(f)
{'gradprobe/loss': 1.25, 'gradprobe/grad_norm/fc1': 0.5}
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from gradprobe.trace.records import LayerFlow

__all__ = ["COLUMNS", "tidy_rows", "scalars"]

COLUMNS = ("step", "table", "layer", "quantity", "index", "value")


def tidy_rows(flow: LayerFlow) -> Iterator[tuple]:
    """One ``(step, table, layer, quantity, index, value)`` row per number of ``flow`` (see the module docstring)."""
    step = flow.step
    if flow.loss is not None:
        yield (step, "", "", "loss", 0, float(flow.loss))
    for q in flow.quantities:
        for name, x, ok in zip(flow.names, flow.values[q], flow.measured[q]):
            if ok:
                yield (step, "", name, q, 0, float(x))
    for tname, t in flow.tables.items():
        for c, col in t.columns.items():
            if c in t.transient:
                continue
            for i, site in enumerate(t.sites):
                a = col[i]
                if a is None:
                    continue
                for k, x in enumerate(np.asarray(a).reshape(-1)):
                    yield (step, tname, site, c, k, float(x))


def scalars(flow: LayerFlow, prefix: str = "gradprobe") -> dict[str, float]:
    """``{tag: value}``: the loss, every measured per-layer value and every finite scalar table entry."""
    out: dict[str, float] = {}
    if flow.loss is not None:
        out[f"{prefix}/loss"] = float(flow.loss)
    for q in flow.quantities:
        for name, x, ok in zip(flow.names, flow.values[q], flow.measured[q]):
            if ok:
                out[f"{prefix}/{q}/{name}"] = float(x)
    for tname, t in flow.tables.items():
        for c, col in t.columns.items():
            if c in t.transient or isinstance(col, tuple) or np.asarray(col).ndim != 1:
                continue  # array-valued entries (time profiles) are no scalars
            for site, x in zip(t.sites, np.asarray(col, dtype=np.float64)):
                if not np.isnan(x):
                    out[f"{prefix}/{tname}.{c}/{site}"] = float(x)
    return out
