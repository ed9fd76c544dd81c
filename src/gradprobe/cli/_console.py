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


def _fmt(x: float, measured: bool = True) -> str:
    """'—' for a value that was not measured; a measured NaN/Inf is printed as such, never hidden."""
    return "—" if not measured else f"{x:.3g}"


def print_flow_table(flow, max_rows: int = 40, stream=None) -> None:
    """The per-layer table of a :class:`~gradprobe.trace.LayerFlow`: a ``rich`` table when ``rich`` is
    installed (``pip install 'gradprobe[cli]'``), else fixed-width text. Non-finite values are shown."""
    stream = stream or sys.stdout
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(flow.table(max_rows=max_rows), file=stream)
        return
    table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    for col, just in (("#", "right"), ("layer", "left"), ("kind", "left"), ("‖∂L/∂h‖", "right"),
                      ("‖∇θ‖", "right"), ("‖θ‖", "right"), ("‖Δθ‖/‖θ‖", "right")):
        table.add_column(col, justify=just)
    n = len(flow)
    bad = flow.nonfinite()
    rows = list(range(n))
    if n > max_rows:
        rows = rows[: max_rows // 2] + [-1] + rows[n - max_rows // 2 :]
    for i in rows:
        if i == -1:
            table.add_row("…", "", "", "", "", "", "")
            continue
        table.add_row(
            str(i), flow.names[i], flow.kinds[i],
            _fmt(flow.output_grad_norm[i], flow.has_output_grad[i]), _fmt(flow.grad_norm[i], flow.has_grad[i]),
            _fmt(flow.weight_norm[i]), _fmt(flow.update_ratio[i], flow.update_ratio[i] == flow.update_ratio[i]),
            style="bold red" if bad[i] else None,
        )
    Console(file=stream, width=120, color_system=None if not getattr(stream, "isatty", lambda: False)() else "auto",
            highlight=False).print(table)
