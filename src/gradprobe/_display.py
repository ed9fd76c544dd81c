"""How results look to a person: one number format, HTML escaping, small HTML tables and badges.

Shared by the ``__str__`` / ``_repr_html_`` (Jupyter's rich display) of result classes on every floor
and by the HTML report, so a number reads the same everywhere. Imports nothing of gradprobe (floor 0).
Every string that reaches HTML goes through :func:`esc`.

>>> num(0.000123456), num(float("nan")), num(None), num(3), num(float("-inf"))
('0.000123', 'nan', '—', '3', '-inf')
>>> html_table(["a", "b"], [["<x>", 1.5]])
'<table class="gp-table"><thead><tr><th>a</th><th>b</th></tr></thead><tbody><tr><td>&lt;x&gt;</td><td class="num">1.5</td></tr></tbody></table>'
"""
from __future__ import annotations

import html
import math
import numbers

__all__ = ["num", "esc", "Markup", "html_table", "html_pre", "badge", "SEVERITY_COLORS"]

#: background colour of a severity badge (white text)
SEVERITY_COLORS = {"ok": "#2e7d32", "info": "#1565c0", "warning": "#b45309", "error": "#c62828"}


def num(x, digits: int = 3) -> str:
    """``x`` with ``digits`` significant digits; ``—`` for ``None`` (not measured), ``nan``/``inf`` spelled out."""
    if x is None:
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, numbers.Integral):
        return str(int(x))
    if not isinstance(x, numbers.Real):
        return str(x)
    x = float(x)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.{digits}g}"


def esc(s) -> str:
    """HTML-escape ``str(s)`` (quotes too, so it is safe inside attributes)."""
    return html.escape(str(s), quote=True)


class Markup(str):
    """A string that is already HTML (built from escaped parts): :func:`html_table` does not escape it again."""


def _cell(v, tag: str = "td") -> str:
    if isinstance(v, numbers.Number) and not isinstance(v, bool):
        return f'<{tag} class="num">{esc(num(v))}</{tag}>'
    if isinstance(v, Markup):
        return f"<{tag}>{v}</{tag}>"
    return f"<{tag}>{esc('—' if v is None else v)}</{tag}>"


def html_table(header, rows, *, caption: str | None = None, cls: str = "gp-table") -> str:
    """A ``<table>``: ``header`` strings (``None``: no header row), ``rows`` of cells (numbers formatted by :func:`num`, text escaped,
    :class:`Markup` kept as HTML)."""
    parts = [f'<table class="{esc(cls)}">']
    if caption:
        parts.append(f"<caption>{esc(caption)}</caption>")
    if header is not None:
        parts.append("<thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr></thead>")
    parts.append("<tbody>")
    for row in rows:
        parts.append("<tr>" + "".join(_cell(v) for v in row) + "</tr>")
    parts.append("</tbody></table>")
    return "".join(parts)


def html_pre(text: str) -> str:
    """Preformatted, escaped text that wraps instead of scrolling sideways."""
    return f'<pre style="white-space:pre-wrap">{esc(text)}</pre>'


def badge(text: str, severity: str) -> Markup:
    """A coloured label for a verdict (``severity`` one of ok/info/warning/error)."""
    color = SEVERITY_COLORS.get(severity, "#555")
    return Markup(f'<span class="gp-badge gp-{esc(severity)}" style="display:inline-block;padding:0 .5em;'
                  f'border-radius:.3em;font-weight:600;color:#fff;background:{color}">{esc(text)}</span>')
