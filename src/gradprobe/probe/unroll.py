"""Deprecated location of the unrolled fused-RNN replica: use :mod:`gradprobe.functional.rnn`.

``StateEvent``, ``unrolled_forward`` and ``is_fused_recurrent`` moved to :mod:`gradprobe.functional.rnn`
(one unroll serves the probe, Pascanu's Ω and the recurrent theory). Reading them from here still works
for one release and warns.

>>> import warnings
>>> import gradprobe.probe.unroll as old
>>> with warnings.catch_warnings(record=True) as caught:
...     warnings.simplefilter("always")
...     fn = old.unrolled_forward
>>> from gradprobe.functional.rnn import unrolled_forward
>>> fn is unrolled_forward, caught[0].category.__name__
(True, 'DeprecationWarning')
"""
from __future__ import annotations

import warnings

from gradprobe.functional import rnn as _rnn

_MOVED = ("StateEvent", "unrolled_forward", "is_fused_recurrent")


def __getattr__(name: str):
    if name in _MOVED:
        warnings.warn(
            f"gradprobe.probe.unroll.{name} moved to gradprobe.functional.rnn.{name}; the old name goes away "
            "in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(_rnn, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_MOVED))
