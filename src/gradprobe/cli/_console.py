"""Tiny terminal helpers (no dependency): a progress bar that degrades to occasional lines off a TTY."""
from __future__ import annotations

import sys
import time


class Progress:
    """``with Progress(total, "label") as bar: bar.update(n, **fields)``; writes to stderr."""

    def __init__(self, total: int, label: str, stream=None, width: int = 28):
        self.total = max(int(total), 1)
        self.label = label
        self.stream = stream or sys.stderr
        self.width = width
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = time.perf_counter()
        self._last_line = -1.0

    def update(self, done: int, **fields) -> None:
        frac = min(done / self.total, 1.0)
        elapsed = time.perf_counter() - self.start
        extra = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
        bar = "█" * int(frac * self.width) + "·" * (self.width - int(frac * self.width))
        line = f"{self.label:<22} {bar} {done:>5}/{self.total} {elapsed:5.1f}s {extra}"
        if self.tty:
            self.stream.write("\r" + line)
            self.stream.flush()
        elif done == self.total or elapsed - self._last_line >= 5.0:
            self._last_line = elapsed
            self.stream.write(line + "\n")
            self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
