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

from gradprobe._deprecation import module_getattr
from gradprobe.functional import rnn as _rnn

__getattr__ = module_getattr(__name__, {n: getattr(_rnn, n) for n in ("StateEvent", "unrolled_forward", "is_fused_recurrent")})
