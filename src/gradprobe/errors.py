"""One exception family for gradprobe.

Every error gradprobe raises on purpose derives from :class:`GradprobeError`, and also from the
builtin type a user would expect (``ValueError`` for bad arguments, ``RuntimeError`` for calls made
in the wrong state, ``ImportError`` for a missing optional extra), so ``except ValueError`` keeps
working. Messages name the problem in the user's terms: which module, which step, what to do.
"""
from __future__ import annotations

import importlib
from types import ModuleType

__all__ = [
    "GradprobeError",
    "ConfigError",
    "ProbeStateError",
    "MissingExtraError",
    "RunLogError",
    "NonFiniteGradientError",
    "GradientSpikeError",
    "require",
]


class GradprobeError(Exception):
    """Base class of every error gradprobe raises on purpose."""


class ConfigError(GradprobeError, ValueError):
    """An argument or configuration value is invalid."""


class ProbeStateError(GradprobeError, RuntimeError):
    """A probe method was called when the probe cannot answer (closed, nothing recorded yet, ...)."""


class MissingExtraError(GradprobeError, ImportError):
    """An optional dependency is missing; the message names the extra to install."""


class RunLogError(GradprobeError, OSError):
    """A run log cannot be created, written or read."""


class NonFiniteGradientError(GradprobeError, RuntimeError):
    """A gradient norm is NaN or Inf where a finite one is needed (e.g. there is nothing meaningful to clip)."""


class GradientSpikeError(GradprobeError, RuntimeError):
    """Training was stopped at a gradient spike (``Probe(on_spike="raise")``); ``.event`` holds the evidence
    (a :class:`gradprobe.trace.SpikeEvent`: step, layer, jump, clipping, the flight record)."""

    event = None


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingExtraError` naming ``pip install 'gradprobe[extra]'``.

    >>> require("math", "core").sqrt(4.0)
    2.0
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - exercised with a fake module name in tests
        raise MissingExtraError(
            f"this feature needs the optional package '{module.split('.')[0]}', which is not installed; "
            f"install it with: pip install 'gradprobe[{extra}]'"
        ) from exc
