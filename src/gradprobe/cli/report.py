"""``gradprobe report RUN_LOG...``: rebuild plots and an HTML report from saved run logs (no model needed)."""
from __future__ import annotations

from pathlib import Path

from gradprobe.diagnosis import diagnose_flow
from gradprobe.errors import ConfigError
from gradprobe.report.html import Section, write_html
from gradprobe.report.plots import figure_png, plot_signal_heatmap, plot_signal_profiles
from gradprobe.runlog import load_trace


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="rebuild plots and an HTML report from run logs (*.sqlite)")
    p.add_argument("logs", nargs="+", metavar="RUN_LOG", help="run-log files, or directories holding exactly one")
    p.add_argument("--out", default="gradprobe-report", help="output directory (default: %(default)s)")
    p.set_defaults(run=run)


def run(args) -> int:
    traces = {}
    for log in args.logs:
        trace = load_trace(log)
        if len(trace) == 0:
            raise ConfigError(f"the run log {log} holds no recorded step")
        label = Path(log).stem if Path(log).suffix else Path(log).name
        if label in traces:
            raise ConfigError(f"two run logs are both called {label!r}; pass files with distinct names")
        traces[label] = trace
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    png = figure_png(plot_signal_profiles(traces))
    (out / "signal_profiles.png").write_bytes(png)
    sections = [Section("Back-propagated signal per layer", [f"{len(traces)} run(s), read from their run logs."],
                        images=[("‖∂L/∂h_l‖ per layer, first and last recorded step", png)])]
    worst = 0
    for label, trace in traces.items():
        d = diagnose_flow(trace.last, trace=trace)
        worst = max(worst, 0 if d.ok else 1)
        heat = figure_png(plot_signal_heatmap(trace, title=f"{label}: log10 ‖∂L/∂h_l‖ over training"))
        (out / f"{label}_signal.png").write_bytes(heat)
        sections.append(Section(label, [f"{len(trace)} recorded steps (last: {trace.last.step}); verdict at the "
                                        f"last step: {d.verdict}."], verdict=(d.verdict, d.primary.severity),
                                preformatted=[str(d), trace.last.table()], images=[("log10 ‖∂L/∂h_l‖", heat)]))
        print(f"{label}: {len(trace)} steps, verdict {d.verdict}")
    path = write_html(out / "report.html", "gradprobe report", sections)
    print(f"report: {path}")
    return worst
