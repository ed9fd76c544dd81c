"""One report builder: a self-contained ``report.html`` (and its PNGs) from :class:`~gradprobe.Run` objects only.

The same function serves ``gradprobe demo`` (on the live runs, ``probe.run()``), ``gradprobe report``
(on ``load_run(...)`` of the run logs) and your own code. Everything it shows comes from the run:
its trace, model facts, configuration, diagnosis and run-level notes (:mod:`gradprobe.report.notes`),
so the report built live and the one rebuilt from the run logs are byte for byte the same.

The page: a summary table (one row per run), the per-layer signal of every run, then per run its
loss curve, the layer × step heat map of ‖∂L/∂h_l‖, parameter-gradient norms and update ratios per
layer over training (gradient spikes marked on the loss and norm curves, with a table of them and
the flight record of the steps before each), the temporal profiles ‖∂E/∂h_k‖ where they were recorded, Jacobian spectra and
curvature where they were noted, the diagnosis (evidence with the numbers, remedies ranked with the
call that applies each) and remedy trials where they were noted. Images are inlined; the only
script is inline (values under the pointer); nothing is loaded from the network. Every string a
user or a run supplies is escaped.

>>> import tempfile, torch
>>> from torch import nn
>>> import gradprobe
>>> net = nn.Sequential(*[m for _ in range(6) for m in (nn.Linear(8, 8), nn.Sigmoid())])
>>> with gradprobe.Probe(net) as probe:
...     for _ in range(3):
...         net.zero_grad()
...         net(torch.randn(16, 8)).pow(2).mean().backward()
...         _ = probe.step()
>>> path = build_report({"sigmoid": probe.run()}, tempfile.mkdtemp(), title="six sigmoid layers")
>>> path.name, "vanishing" in path.read_text(encoding="utf-8")
('report.html', True)
"""
from __future__ import annotations

import base64
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from gradprobe._display import Markup, badge, esc, html_table, num
from gradprobe._version import __version__
from gradprobe.analysis.spectra import isometry_summary
from gradprobe.errors import ConfigError, GradprobeError
from gradprobe.report.assets import CSS, JS
from gradprobe.report.figures import (
    Figure,
    columns,
    flight_figure,
    flight_quantity_figure,
    heatmap_figure,
    layer_series_figure,
    loss_figure,
    profiles_figure,
    spectrum_figure,
    temporal_figure,
)
from gradprobe.report.notes import labelled, paragraphs, scalar, trial_table
from gradprobe.run import Run, RunSummary
from gradprobe.trace import LABELS, Trace

__all__ = ["build_report", "DEFAULT_TITLE", "MAX_TEMPORAL_SERIES", "MAX_FLIGHTS"]

DEFAULT_TITLE = "gradprobe report"
#: at most this many recurrent series are drawn per run (the table lists all)
MAX_TEMPORAL_SERIES = 6
#: the flight records of at most this many spikes are drawn per run (the first ones; the table lists all)
MAX_FLIGHTS = 3


def _json_script(fid: str, value) -> str:
    """A JSON data block that no string inside can close or break (``<``, ``>``, ``&`` as \\u escapes)."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    text = text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    return f'<script type="application/json" id="{fid}">{text}</script>'


def _slug(label: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-.")
    return s[:60] or "run"


class _Page:
    """Collects figures (written beside the page and inlined) while the sections are composed."""

    def __init__(self, out: Path):
        self.out = out
        self.n = 0

    def figure(self, fig: Figure | None) -> str:
        if fig is None:
            return ""
        self.n += 1
        (self.out / f"{fig.key}.png").write_bytes(fig.png)
        b64 = base64.b64encode(fig.png).decode("ascii")
        fid = f"gp-fig-{self.n}"
        hover = f' data-hover="{fid}-data"' if fig.hover else ""
        data = _json_script(f"{fid}-data", fig.hover) if fig.hover else ""
        return (f'<figure id="{fid}"{hover}><img alt="{esc(fig.caption)}" src="data:image/png;base64,{b64}">'
                f'<div class="gp-guide"></div><figcaption>{esc(fig.caption)}</figcaption>{data}</figure>')


def _title_intro(runs: Mapping[str, Run], title, intro) -> tuple[str, list[str]]:
    """Explicit arguments win; else the runs' ``"report"`` note when every run that has one agrees."""
    notes = [r.meta.get("report") for r in runs.values() if r.meta.get("report") is not None]
    for n in notes:
        if not isinstance(n, dict):
            raise ConfigError(f"the 'report' note must be a JSON object with 'title' and 'intro'; got {type(n).__name__}")
    agreed = notes[0] if notes and all(n == notes[0] for n in notes) else {}
    if title is None:
        title = agreed.get("title") or DEFAULT_TITLE
    if not isinstance(title, str):
        raise ConfigError(f"the report title must be a string; got {type(title).__name__}")
    if intro is None:
        intro = agreed.get("intro")
        if intro is None:
            intro = f"{len(runs)} run{'s' if len(runs) != 1 else ''}, each read from its own record (trace, model facts, diagnosis)."
    return title, paragraphs(intro, "the report's intro")


def _summary_extra(runs: Mapping[str, Run]) -> list[str]:
    cols: dict[str, None] = {}
    for label, run in runs.items():
        s = run.meta.get("summary")
        if s is None:
            continue
        if not isinstance(s, dict):
            raise ConfigError(f"run {label!r}: the 'summary' note must be a JSON object of name → value")
        cols.update(dict.fromkeys(s))
    return list(cols)


def _verdict_badges(s: RunSummary) -> Markup:
    if s.diagnosis is None:
        return Markup("—")
    return Markup(" ".join(badge(f"{v.kind}: {v.severity}", v.severity) for v in s.diagnosis.verdicts))


def _ratio_text(s: RunSummary) -> str:
    first = num(s.first.ratio) if s.first is not None else "—"
    last = num(s.last.ratio) if s.last is not None else "—"
    return f"{first} → {last}"


def _summary_table(items, extra: list[str]) -> str:
    header = ["run", "model", "steps", "final loss", "verdicts (severity)", "signal ratio first/last layer (first → last step)",
              "per-layer gain", "mean-field √χ₁ (Poole et al. 2016)"] + extra
    rows = []
    for label, anchor, run, s in items:
        note = run.meta.get("summary") or {}
        rows.append([Markup(f'<a href="#{anchor}">{esc(label)}</a>'), f"{s.model} ({s.n_layers} layers)", s.recorded,
                     s.final_loss, _verdict_badges(s), _ratio_text(s),
                     s.last.factor if s.last is not None else None, s.mean_field_text()]
                    + [scalar(note.get(c), f"run {label!r}: summary value {c!r}") for c in extra])
    return f'<div class="gp-scroll">{html_table(header, rows)}</div>'


def _profiles_curves(items) -> list:
    curves = []
    for k, (label, _, run, _) in enumerate(items):
        history, last = run.history, run.last_flow
        if last is None:
            continue
        if len(history) and history[0].step != last.step:
            curves.append((f"{label} (first step)", history[0].output_grad_norm, k, True))
        curves.append((f"{label} (last step, {last.step})", last.output_grad_norm, k, False))
    return curves


def _temporal(history: Trace, last) -> tuple[list, str]:
    """Curves (first and last recorded step with a temporal table) and a table of the last step's series."""
    with_t = [f for f in history if "temporal" in f.tables]
    if last is not None and "temporal" in last.tables and (not with_t or with_t[-1].step != last.step):
        with_t.append(last)
    if not with_t:
        return [], ""
    first_t, last_t = with_t[0].temporal, with_t[-1].temporal
    names = list(last_t)
    curves = []
    for k, name in enumerate(names[:MAX_TEMPORAL_SERIES]):
        if with_t[0].step != with_t[-1].step and name in first_t:
            curves.append((f"{name} (first step)", first_t[name].steps_back(), k, True))
        curves.append((f"{name} (step {with_t[-1].step})", last_t[name].steps_back(), k, False))
    rows = []
    for name in names:
        tf = last_t[name]
        facts = dict(tf._facts())
        rows.append([name, tf.steps, facts["change per step back"], facts["horizon (signal ≥ 1 % of its peak)"],
                     float(tf.steps_back()[0]), float(tf.steps_back()[-1])])
    table = html_table(["series", "T", "change per step back", "horizon (≥ 1 % of peak)", "‖∂E/∂h‖ at the loss end",
                        "‖∂E/∂h‖ farthest back"], rows, caption=f"Through time at step {with_t[-1].step}")
    if len(names) > MAX_TEMPORAL_SERIES:
        table += f'<p class="gp-note">The figure draws the first {MAX_TEMPORAL_SERIES} of {len(names)} series.</p>'
    return curves, table


def _spectrum(run: Run, label: str):
    note = run.meta.get("spectrum")
    if note is None:
        return {}, ""
    entries = labelled(note, "singular_values", f"run {label!r}: the 'spectrum' note")
    values, rows = {}, []
    for lab, e in entries.items():
        try:
            sv = np.atleast_2d(np.asarray(e["singular_values"], dtype=np.float64))
            iso = isometry_summary(sv)
        except (KeyError, TypeError, ValueError, GradprobeError) as exc:
            raise ConfigError(f"run {label!r}: the 'spectrum' note {lab!r} is malformed: {exc}") from exc
        values[lab] = sv
        mean_sq = e.get("mean_sq")
        mean_sq = float(np.mean(mean_sq)) if isinstance(mean_sq, list) and mean_sq else mean_sq
        rows.append([lab or "—", e.get("which", "top"), sv.shape[1], sv.shape[0], iso.max, iso.min, iso.condition,
                     iso.mean_log, f"{100 * iso.frac_within_band:.0f} %", scalar(mean_sq, "mean_sq")])
    table = html_table(["spectrum", "end", "k", "examples", "σ max", "σ min", "condition", "mean ln σ",
                        "within ±0.1 of 1", "mean σ² (whole spectrum)"], rows)
    return values, table


def _curvature(run: Run, label: str) -> str:
    note = run.meta.get("curvature")
    if note is None:
        return ""
    if not isinstance(note, dict):
        raise ConfigError(f"run {label!r}: the 'curvature' note must be a JSON object")
    entries = dict(note) if note and all(isinstance(v, dict) for v in note.values()) else {"": note}
    parts = ["<h3>Curvature</h3>"]
    for lab, e in entries.items():
        if lab:
            parts.append(f"<p><b>{esc(lab)}</b></p>")
        if "kind" in e:
            parts.append(f"<p>Stationary-point test: <b>{esc(str(e['kind']).replace('_', ' '))}</b></p>")
        rows = []
        for k, v in e.items():
            if k in ("kind", "reasons"):
                continue
            if isinstance(v, list):
                v = ", ".join(num(x) if isinstance(x, (int, float)) else str(x) for x in v)
            rows.append([k.replace("_", " "), scalar(v, f"run {label!r}: curvature {k!r}")])
        if rows:
            parts.append(html_table(["quantity", "value"], rows))
        reasons = e.get("reasons")
        if reasons:
            parts.append("<ul>" + "".join(f"<li>{esc(r)}</li>" for r in paragraphs(reasons, "curvature reasons")) + "</ul>")
    return "".join(parts)


def _trials(run: Run, label: str) -> str:
    note = run.meta.get("trials")
    if note is None:
        return ""
    cols, rows, caption = trial_table(note, f"run {label!r}: the 'trials' note")
    shown = [[Markup(f"<code>{esc(v)}</code>") if c == "call" and v else v for c, v in zip(cols, r)] for r in rows]
    out = "<h3>Remedies tried</h3>"
    if caption:
        out += f"<p>{esc(caption)}</p>"
    return out + f'<div class="gp-scroll">{html_table([c.replace("_", " ") for c in cols], shown)}</div>'


def _jump(c) -> str:
    return "—" if c is None else f"{num(c.jump)}×" + (" (spike)" if c.spiked else "")


def _spikes(page: _Page, log, key: str) -> str:
    """The gradient spikes the watch found (the run's ``"spikes"`` note): one row per event, then the
    flight record of the first :data:`MAX_FLIGHTS` events (figure and numbers)."""
    if log is None:
        return ""
    cfg = log.config or {}
    rule = (f"a step spikes when its total gradient norm (or loss) is more than k = {num(cfg.get('k'))} robust σ and "
            f"{num(cfg.get('min_jump'))}× above its rolling median over the last {num(cfg.get('window'))} steps, or is "
            "not finite (gradprobe.probe.SpikeWatch)") if cfg else "gradprobe.probe.SpikeWatch"
    if cfg.get("confirm") == "loss":
        rule += (f"; a spike is an alarm only when the loss spikes too and rises by at least {num(cfg.get('setback'))} "
                 "of the progress it made, or is not finite (confirm='loss')")
    out = ["<h3>Gradient spikes</h3>"]
    if not log.events:
        through = "" if log.through is None else f" (watched every step through step {log.through})"
        return "".join(out) + f"<p>No gradient spike{esc(through)}: {esc(rule)}.</p>"
    n = len(log.events) + log.dropped
    out.append(f"<p>{n} spike{'s' if n != 1 else ''}{'' if not log.dropped else f' ({log.dropped} not kept)'}: "
               f"{esc(rule)}. The red dotted lines on the loss and gradient-norm curves mark them.</p>")
    header = ["step", "kind", "flagged steps", "started at", "largest jump", "‖∇θ‖ / median", "loss / median",
              "clipped", "guard"]
    rows = []
    for e in log.events:
        largest = "—" if e.largest_layer is None else f"{e.largest_layer} ({num(e.largest_jump)}×)"
        clipped = "unknown" if e.clipped is None else ("yes" if e.clipped else "no") + f" (max_norm {num(e.max_norm)})"
        guard = e.action if e.confirmed else "no alarm (not confirmed by the loss, confirm='loss')"
        rows.append([e.step, e.kind.replace("_", "-"), f"{e.flagged_steps} (to step {e.last_step})", e.layer or "—",
                     largest, _jump(e.total), _jump(e.loss), clipped, guard])
    out.append(f'<div class="gp-scroll">{html_table(header, rows)}</div>')
    figs, tables = [], []
    for k, e in enumerate(log.events[:MAX_FLIGHTS]):
        f = e.flight
        if f is None or not len(f):
            continue
        figs.append(flight_figure(e, f"{key}_flight_{k + 1}"))
        cols = ["step", "flagged", "‖∇θ‖", "median", "bound", "loss"] + (["clipped"] if f.clipped is not None else [])
        cols += list(f.layers)
        body = []
        for i, st in enumerate(f.steps):
            row = [st, bool(f.flagged[i]), f.total[i], f.total_median[i], f.total_threshold[i], f.loss[i]]
            if f.clipped is not None:
                row.append(bool(f.clipped[i]))
            body.append(row + list(f.grad_norm[i]))
        tables.append(f"<details><summary>Flight record before the spike at step {e.step}: every step's norms "
                      f"({len(f)} steps, ‖∇θ_l‖ per layer)</summary>"
                      f'<div class="gp-scroll">{html_table(cols, body)}</div></details>')
        figs += [fig for q in FLIGHT_FIGURES if (fig := flight_quantity_figure(e, q, f"{key}_flight_{k + 1}_{q}"))]
        tables += _full_flight_tables(e)
    out.append('<div class="gp-figs">' + "".join(page.figure(fig) for fig in figs) + "</div>")
    return "".join(out + tables)


#: the quantities of a full flight record drawn as figures (every one is tabled)
FLIGHT_FIGURES = ("output_grad_norm", "update_ratio")


def _full_flight_tables(e) -> list[str]:
    """The full flight record's other quantities (``SpikeWatch(full_flight=True)``), one table each: the
    per-layer quantities (step × layer), then each table's columns (step × site, e.g. dead units)."""
    f = e.flight
    out = []
    notes = []
    if getattr(f, "not_recorded", ()):
        notes.append("not in the full flight record (recorders without a flight twin): " + ", ".join(f.not_recorded))
    if getattr(f, "world_size", 1) > 1:
        local = ", ".join(f.rank_local) if f.rank_local else "none"
        notes.append(f"data parallel over {f.world_size} ranks, written by rank {f.rank}: the global batch's numbers "
                     f"but for those of rank {f.rank}'s own samples only: {local}")
    if notes and f.full:
        out.append(f"<p>Full flight record before the spike at step {e.step}: {esc('; '.join(notes))}.</p>")
    for q, rows in f.quantities.items():
        label = LABELS.get(q, q)
        body = [[st] + list(rows[i]) for i, st in enumerate(f.steps)]
        out.append(f"<details><summary>Full flight record before the spike at step {e.step}: {esc(label)} per layer "
                   f"({len(f)} steps, every step)</summary>"
                   f'<div class="gp-scroll">{html_table(["step"] + list(f.layers), body)}</div></details>')
    for name, t in f.tables.items():
        for col, rows in t.columns.items():
            v = np.asarray(rows, dtype=np.float64)
            if not np.isfinite(v).any():
                continue
            keep = [j for j in range(len(t.sites)) if np.isfinite(v[:, j]).any()]
            body = [[st] + [rows[i][j] for j in keep] for i, st in enumerate(f.steps)]
            cols = ["step"] + [f"{t.sites[j]} ({t.kinds[j]})" for j in keep]
            out.append(f"<details><summary>Full flight record before the spike at step {e.step}: {esc(name)} "
                       f"{esc(col.replace('_', ' '))} ({len(f)} steps, every step)</summary>"
                       f'<div class="gp-scroll">{html_table(cols, body)}</div></details>')
    for key, series in getattr(f, "profiles", {}).items():
        for site, rows in series.items():
            T = max((len(r) for r in rows), default=0)
            if not T:
                continue
            ks = [int(k) for k in columns(T, MAX_PROFILE_COLUMNS)]
            body = [[st] + [rows[i][k] if k < len(rows[i]) else None for k in ks] for i, st in enumerate(f.steps)]
            what = "‖∂E/∂h_k‖ through time (BPTT)" if key == "temporal.h" else (
                "‖∂E/∂c_k‖ through time (BPTT)" if key == "temporal.c" else key)
            shown = "" if len(ks) == T else f", {len(ks)} of its {T} time steps"
            out.append(f"<details><summary>Full flight record before the spike at step {e.step}: {esc(what)} of "
                       f"{esc(site)} ({len(f)} steps, every step{shown})</summary>"
                       f'<div class="gp-scroll">{html_table(["step"] + [f"k = {k}" for k in ks], body)}</div></details>')
    return out


#: time steps of a flight record's temporal profile shown in its table (evenly spaced, first and last included)
MAX_PROFILE_COLUMNS = 16


def _cadence(cfg: dict) -> str:
    """How often the run was recorded, in words, with its recorders."""
    recorders = ", ".join(str(r.get("name", "?")) for r in cfg.get("recorders", []) if isinstance(r, dict)) or "—"
    sched = cfg.get("schedule") if isinstance(cfg.get("schedule"), dict) else {}
    if sched.get("kind") == "budget":
        cap = sched.get("peer_cap")
        capped = (f" and of {100 * float(cap):g} % of what per-parameter gradient norms cost"
                  if isinstance(cap, (int, float)) else "")
        when = (f"within an overhead budget of {100 * float(sched.get('budget', 0)):g} % of the training step"
                f"{capped} (slower recorders skip steps)")
    elif sched.get("kind") == "fixed" and isinstance(sched.get("cadence"), dict) and len(set(sched["cadence"].values())) > 1:
        when = "per recorder: " + ", ".join(f"{k} every {v}" for k, v in sched["cadence"].items())
    else:
        when = f"every {cfg.get('every') or 1} step(s)"
    return f"{when}; recorders: {recorders}"


def _run_section(page: _Page, label: str, anchor: str, key: str, run: Run, s: RunSummary) -> str:
    history, last = run.history, run.last_flow
    head = f'<section id="{anchor}"><h2>{esc(label)} '
    if s.diagnosis is not None:
        head += badge(s.diagnosis.verdict, s.diagnosis.primary.severity)
    parts = [head + "</h2>"]
    parts += [f"<p>{esc(p)}</p>" for p in paragraphs(run.meta.get("description"), f"run {label!r}: 'description'")]
    facts = s.lines() + [("cadence", _cadence(run.config))]
    parts.append(html_table(None, facts))
    if last is None:
        parts.append("<p>This run holds no recorded step.</p></section>")
        return "".join(parts)
    signal = "output_grad_norm" if bool(last.has_output_grad.any()) else "grad_norm"
    spikes = run.spikes  # a malformed note is a RunLogError naming it
    figs = [loss_figure(history, f"{key}_loss", spikes), heatmap_figure(history, f"{key}_signal", signal),
            layer_series_figure(history, f"{key}_grad_norm", "grad_norm", spikes),
            layer_series_figure(history, f"{key}_update_ratio", "update_ratio")]
    curves, t_table = _temporal(history, last)
    figs.append(temporal_figure(curves, f"{key}_temporal") if curves else None)
    spectra, s_table = _spectrum(run, label)
    figs.append(spectrum_figure(spectra, f"{key}_spectrum") if spectra else None)
    parts.append('<div class="gp-figs">' + "".join(page.figure(f) for f in figs) + "</div>")
    if t_table:
        parts.append("<h3>Through time</h3>" + f'<div class="gp-scroll">{t_table}</div>')
    if s_table:
        parts.append("<h3>Jacobian spectrum</h3>" + f'<div class="gp-scroll">{s_table}</div>')
    parts.append(_curvature(run, label))
    parts.append(_spikes(page, spikes, key))
    if s.diagnosis is not None:
        parts.append(f"<h3>Diagnosis at step {last.step}</h3>")
        parts.append(s.diagnosis._repr_html_())
    parts.append(_trials(run, label))
    parts.append(f"<details><summary>Per-layer numbers at step {last.step}</summary>"
                 f'<div class="gp-scroll">{last._repr_html_()}</div></details>')
    if last.units is not None and len(last.units):
        parts.append(f"<details><summary>Saturated and dead units at step {last.step}</summary>"
                     f'<div class="gp-scroll">{last.units._repr_html_()}</div></details>')
    parts.append("</section>")
    return "".join(parts)


_HOW_TO_READ = (
    "‖∂L/∂h_l‖ is the norm of the loss gradient reaching layer l's output (the back-propagated signal); "
    "‖∂L/∂θ_l‖ the norm of its parameter gradient; ‖Δθ_l‖/‖θ_l‖ how much its weights moved between recorded "
    "steps. The signal ratio first/last layer is ‖∂L/∂h‖ at the first layer over the last: far below 1 the "
    "gradient vanishes on its way back (Hochreiter 1991; Glorot & Bengio 2010), far above 1 it explodes. The "
    "per-layer gain is that ratio's geometric mean per layer; mean-field theory predicts √χ₁ for a wide random "
    "MLP (Poole et al. 2016; Schoenholz et al. 2017), within the finite-width error |z| ≤ 3. Through time, "
    "‖∂E/∂h_k‖ shrinking with the steps back means long-range dependencies get no gradient (Bengio, Simard & "
    "Frasconi 1994; Pascanu, Mikolov & Bengio 2013). Hover over a figure to read its values."
)


def build_report(runs: Mapping[str, Run], out_dir: str | os.PathLike, *, title: str | None = None,
                 intro: str | list[str] | None = None) -> Path:
    """Write ``out_dir/report.html`` (self-contained) and its PNGs from ``runs`` (label → :class:`~gradprobe.Run`).

    ``title`` and ``intro`` (a paragraph or a list of them) default to the runs' ``"report"`` note (when
    every run that has one agrees), else a generic title. Needs the ``report`` extra (matplotlib).
    Returns the path of ``report.html``.
    """
    if not isinstance(runs, Mapping) or not runs:
        raise ConfigError("build_report needs a non-empty mapping of label → Run (e.g. {'baseline': load_run(path)})")
    for label, run in runs.items():
        if not isinstance(label, str) or not label:
            raise ConfigError(f"run labels must be non-empty strings; got {label!r}")
        if not isinstance(run, Run):
            raise ConfigError(f"run {label!r} is a {type(run).__name__}, not a gradprobe.Run "
                              "(use probe.run() or gradprobe.load_run(path))")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    title, intro = _title_intro(runs, title, intro)
    keys: dict[str, None] = {}
    items = []
    for k, (label, run) in enumerate(runs.items(), 1):
        key = _slug(label)
        if key in keys or key == "signal_profiles":
            key = f"{key}-{k}"
        keys[key] = None
        items.append((label, f"run-{k}", run, run.summary()))
    page = _Page(out)
    first = next(iter(runs.values())).meta
    versions = ", ".join(f"{n} {first[n]}" for n in ("gradprobe", "torch", "python") if isinstance(first.get(n), str))
    parts = [
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>",
        f"<header><h1>{esc(title)}</h1>" + "".join(f"<p>{esc(p)}</p>" for p in intro) + "</header>",
        "<nav>" + "".join(f'<a href="#{a}">{esc(label)}</a>' for label, a, _, _ in items) + "</nav>",
        '<section id="summary"><h2>Summary</h2>', _summary_table(items, _summary_extra(runs)),
        page.figure(profiles_figure(_profiles_curves(items), "signal_profiles")), "</section>",
    ]
    parts += [_run_section(page, label, a, key, run, s) for (label, a, run, s), key in zip(items, keys)]
    parts.append(f"<footer><p>{esc(_HOW_TO_READ)}</p><p>Built by gradprobe {esc(__version__)} from "
                 f"{len(runs)} run{'s' if len(runs) != 1 else ''}"
                 + (f" (recorded with {esc(versions)})" if versions else "") + ".</p></footer>")
    parts.append(f'<div id="gp-tip" hidden></div><script>{JS}</script></body></html>\n')
    path = out / "report.html"
    path.write_text("".join(parts), encoding="utf-8", newline="\n")
    return path
