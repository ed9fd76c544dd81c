"""Run a snippet of Python in a fresh interpreter (for import-time behaviour no reload can reproduce)."""
from __future__ import annotations

import subprocess
import sys


def run_python(code: str, timeout: float | None = 120, **kwargs) -> subprocess.CompletedProcess:
    """``python -c code`` with this interpreter (``sys.executable``); stdout and stderr captured as text.

    ``timeout`` is in seconds (``None``: wait for ever); other keyword arguments (``env``, ``check``, ...)
    go to ``subprocess.run`` unchanged. Returns the ``CompletedProcess``: the caller asserts on
    ``returncode``, ``stdout`` and ``stderr``.
    """
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, **kwargs)
