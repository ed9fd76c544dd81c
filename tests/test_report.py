"""Plots and the HTML report read saved data only (a trace from a run log)."""
import numpy as np
import pytest

from gradprobe.errors import ConfigError, MissingExtraError, require
from gradprobe.report.html import Section, write_html
from gradprobe.report.plots import figure_png, plot_signal_heatmap, plot_signal_profiles
from gradprobe.trace import LayerFlow, Trace


def _trace(n_steps=5, n_layers=4):
    t = Trace()
    for s in range(n_steps):
        t.append(LayerFlow.from_arrays([f"l{i}" for i in range(n_layers)], step=s,
                                       output_grad_norm=10.0 ** np.arange(-n_layers, 0)))
    return t


def test_heatmap_and_profiles_render_png():
    t = _trace()
    for fig in (plot_signal_heatmap(t), plot_signal_profiles({"a": t, "b": _trace(3)})):
        png = figure_png(fig)
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000


def test_plot_errors_name_the_problem():
    with pytest.raises(ConfigError, match="empty"):
        plot_signal_heatmap(Trace())
    with pytest.raises(ConfigError, match="unknown quantity"):
        plot_signal_heatmap(_trace(), quantity="gradnorm")


def test_missing_extra_names_the_extra():
    with pytest.raises(MissingExtraError, match=r"pip install 'gradprobe\[plot\]'"):
        require("matplotlib_not_installed_anywhere", "plot")


def test_html_is_self_contained_and_escaped(tmp_path):
    png = figure_png(plot_signal_heatmap(_trace()))
    path = write_html(tmp_path / "r.html", "t<1>", [Section("s", ["a & b"], ("vanishing", "error"), ["x<y"], [("cap", png)])])
    html = path.read_text(encoding="utf-8")
    assert "t&lt;1&gt;" in html and "a &amp; b" in html and "x&lt;y" in html
    assert "src='data:image/png;base64," in html and "http" not in html
