"""The run-level notes the report reads, and how it reads them.

A note is a plain-JSON value saved with a run: ``probe.note(key, value)`` while the probe is open, or
``run.note(key, value)`` on a :class:`~gradprobe.Run` afterwards (it is written into the run log too).
The report is built from the run alone, so anything it shows beyond the trace, the model facts and
the diagnosis comes from these keys:

| key | value |
| --- | --- |
| ``"report"`` | ``{"title": str, "intro": str or [str, ...]}``: the report's title and opening paragraphs, used when :func:`~gradprobe.report.build_report` is not given them and all runs agree |
| ``"description"`` | ``str`` or ``[str, ...]``: paragraphs about this run, shown at the top of its section |
| ``"summary"`` | ``{name: number, str or bool}``: extra columns of the summary table (a test accuracy, the training settings), in the order given |
| ``"trials"`` | ``[{column: value, ...}, ...]`` (one row per remedy, baseline first) or ``{"rows": [...], "caption": str}``: equal-budget remedy trials, shown as a table; suggested columns ``remedy``, ``call``, ``verdict_end``, ``ratio_init``, ``ratio_end``, ``held_out_loss``, ``loss_end``, ``restored`` |
| ``"spectrum"`` | :meth:`gradprobe.analysis.JacobianSpectrum.as_dict`, or ``{label: that, ...}`` for several (at initialisation and after training): singular values of the input–output Jacobian, drawn with their distance from isometry (Saxe et al. 2014; Pennington, Schoenholz & Ganguli 2017) |
| ``"curvature"`` | ``{field: value, ...}`` merged from ``HessianEigs.as_dict()``, ``HessianTrace.as_dict()`` and/or ``StationaryPoint.as_dict()`` (:mod:`gradprobe.analysis`), or ``{label: that, ...}``: extreme Hessian eigenvalues, its trace, and whether a small gradient is a minimum, a saddle or a vanishing gradient (Dauphin et al. 2014) |

A malformed note is a :class:`~gradprobe.errors.ConfigError` naming the run and the key.

>>> paragraphs(["one", "two"]), paragraphs("one")
(['one', 'two'], ['one'])
>>> labelled({"singular_values": [[1.0]]}, "singular_values")
{'': {'singular_values': [[1.0]]}}
"""
from __future__ import annotations

import numbers

from gradprobe.errors import ConfigError

__all__ = ["NOTE_KEYS", "paragraphs", "labelled", "scalar", "trial_table"]

#: every note key the report reads
NOTE_KEYS = ("report", "description", "summary", "trials", "spectrum", "curvature")


def paragraphs(value, what: str = "note") -> list[str]:
    """A string or a list of strings as a list of paragraphs."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(p, str) for p in value):
        return list(value)
    raise ConfigError(f"{what} must be a string or a list of strings; got {type(value).__name__}")


def labelled(value, marker: str, what: str = "note") -> dict[str, dict]:
    """One result dict (it has the ``marker`` key) as ``{"": it}``, or ``{label: dict}`` as it is."""
    if not isinstance(value, dict):
        raise ConfigError(f"{what} must be a JSON object; got {type(value).__name__}")
    if marker in value:
        return {"": value}
    if value and all(isinstance(v, dict) for v in value.values()):
        return dict(value)
    raise ConfigError(f"{what} must hold {marker!r} (one result) or map labels to results")


def scalar(value, what: str):
    """A table cell: a number, string, bool or null (anything else is an error)."""
    if value is None or isinstance(value, (str, bool, numbers.Real)):
        return value
    raise ConfigError(f"{what} must be a number, string, true/false or null; got {type(value).__name__}")


def trial_table(value, what: str = "the 'trials' note") -> tuple[list[str], list[list], str | None]:
    """(columns, rows, caption) of a ``"trials"`` note; columns in order of first appearance."""
    caption = None
    if isinstance(value, dict):
        caption = value.get("caption")
        if caption is not None and not isinstance(caption, str):
            raise ConfigError(f"{what}: 'caption' must be a string")
        value = value.get("rows")
    if not isinstance(value, list) or not all(isinstance(r, dict) for r in value):
        raise ConfigError(f"{what} must be a list of rows (JSON objects) or {{'rows': [...], 'caption': ...}}")
    columns: dict[str, None] = {}
    for r in value:
        columns.update(dict.fromkeys(r))
    rows = [[scalar(r.get(c), f"{what}, column {c!r}") for c in columns] for r in value]
    return list(columns), rows, caption
