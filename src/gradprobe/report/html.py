"""A generic self-contained page of text sections and images (images inlined; no network, no script).

Run reports are :func:`gradprobe.report.build_report` (summary, figures with hover values, evidence,
remedies); this plain page serves results that are not runs, e.g. ``gradprobe experiment report``."""
from __future__ import annotations

import base64
import html
import os
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Section", "write_html"]

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{font-size:1.25em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
pre{background:#f6f8fa;padding:.8em;overflow-x:auto;font-size:.82em;line-height:1.35}
.verdict{display:inline-block;padding:.15em .6em;border-radius:.3em;font-weight:600;color:#fff}
.ok{background:#2e7d32}.warning{background:#ef6c00}.error{background:#c62828}.info{background:#1565c0}
img{max-width:100%;border:1px solid #eee}
"""


@dataclass
class Section:
    title: str
    paragraphs: list[str] = field(default_factory=list)
    verdict: tuple[str, str] | None = None  # (kind, severity)
    preformatted: list[str] = field(default_factory=list)
    images: list[tuple[str, bytes]] = field(default_factory=list)  # (caption, PNG bytes)


def write_html(path: str | os.PathLike, title: str, sections: list[Section]) -> Path:
    """Write ``sections`` to one HTML file at ``path`` (every string escaped) and return the path."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    for s in sections:
        parts.append(f"<section><h2>{html.escape(s.title)}</h2>")
        if s.verdict:
            kind, sev = s.verdict
            parts.append(f"<p>Verdict: <span class='verdict {html.escape(sev)}'>{html.escape(kind)}</span></p>")
        parts.extend(f"<p>{html.escape(p)}</p>" for p in s.paragraphs)
        parts.extend(f"<pre>{html.escape(t)}</pre>" for t in s.preformatted)
        for caption, png in s.images:
            b64 = base64.b64encode(png).decode("ascii")
            parts.append(f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{b64}'>"
                         f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        parts.append("</section>")
    parts.append("</body></html>")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts), encoding="utf-8")
    return out
