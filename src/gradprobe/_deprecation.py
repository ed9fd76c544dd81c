"""Old public names that keep working for one release and warn (floor 0: imports nothing of ours).

* :func:`renamed_function` — a function whose name changed (e.g. an in-place function gaining its ``_``);
* :func:`module_getattr` — a module-level ``__getattr__`` for names that moved or were renamed, so that
  importing the module stays silent and only *using* an old name warns.

>>> import warnings
>>> def double_(x):
...     return 2 * x
>>> double = renamed_function(double_, "double", "gradprobe.example")
>>> with warnings.catch_warnings(record=True) as caught:
...     warnings.simplefilter("always")
...     double(2), caught[0].category.__name__
(4, 'DeprecationWarning')
"""
from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

__all__ = ["renamed_function", "module_getattr"]


def _warn(old: str, new: str) -> None:
    warnings.warn(f"{old} is deprecated, use {new}; the old name goes away in the next release",
                  DeprecationWarning, stacklevel=3)


def renamed_function(new: Callable, old_name: str, module: str) -> Callable:
    """``new`` under its old name ``old_name`` (in ``module``), warning on every call."""

    @functools.wraps(new)
    def old(*args, **kwargs):
        _warn(f"{module}.{old_name}", f"{new.__module__}.{new.__name__}")
        return new(*args, **kwargs)

    old.__name__ = old.__qualname__ = old_name
    old.__doc__ = f"Deprecated name of :func:`{new.__module__}.{new.__name__}` (warns)."
    return old


def module_getattr(module: str, moved: dict[str, object]) -> Callable[[str], object]:
    """A module ``__getattr__``: ``moved`` maps each old name to the object now under its new name."""

    def __getattr__(name: str):
        if name not in moved:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        obj = moved[name]
        _warn(f"{module}.{name}", f"{obj.__module__}.{obj.__qualname__}")
        return obj

    return __getattr__
