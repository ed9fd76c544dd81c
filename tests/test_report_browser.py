"""The report in a real headless Chromium (Debian's ``chromium``; ``.ci/run`` installs it): it loads from a
file:// URL with no console error, its script runs, the page is not blank, hovering a heat-map cell reads
out that cell, and hostile layer names stay text."""
from __future__ import annotations

import io
import json
import re
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradprobe
from gradprobe.report import build_report
from reference.loops import train_cross_entropy
from tests.browser import CHROMIUM, Chromium

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (.ci/run installs Debian's chromium; locally: apt-get install -y chromium)")

EVIL = "<img src=x onerror=alert(1)>"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("browser")
    torch.manual_seed(0)
    mods = OrderedDict((EVIL if i == 0 else f"fc{i}", m) for i, m in
                       enumerate(x for _ in range(5) for x in (nn.Linear(10, 10), nn.Sigmoid())))
    net = nn.Sequential(mods)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    x, y = torch.randn(16, 10), torch.randint(0, 10, (16,))
    with gradprobe.Probe(net) as probe:
        train_cross_entropy(probe, net, opt, x, y, steps=6)
        probe.diagnose()
    rnn, head = nn.RNN(2, 8), nn.Linear(8, 2)
    with gradprobe.Probe(nn.ModuleList([rnn, head]), temporal=True) as p2:
        out, _ = rnn(torch.randn(30, 4, 2))
        loss = F.cross_entropy(head(out[-1]), torch.randint(0, 2, (4,)))
        loss.backward()
        p2.step(loss)
    return build_report({f"sigmoid {EVIL}": probe.run(), "rnn": p2.run()}, tmp, title=f"browser test {EVIL}")


def _png_pixels(png: bytes) -> np.ndarray:
    import matplotlib.image as mpimg

    return mpimg.imread(io.BytesIO(png), format="png")


def test_report_loads_without_errors_and_is_not_blank(report):
    n_figures = report.read_text(encoding="utf-8").count("<figure ")
    with Chromium() as b:
        b.open(report.as_uri())
        assert b.evaluate("document.documentElement.getAttribute('data-gp-ready')") == str(n_figures)
        assert b.evaluate("document.title") == f"browser test {EVIL}"  # the name is text, not markup
        assert b.evaluate("document.querySelectorAll('img[src=\"x\"]').length") == 0
        assert b.evaluate("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
        shot = b.screenshot()
        assert b.problems() == []
        assert not any(e.get("method") == "Page.javascriptDialogOpening" for e in b.events)
    px = _png_pixels(shot)[..., :3]
    gray = px.mean(-1)
    assert px.shape[0] > 1500 and gray.std() > 0.05  # a long page with content, not a blank one
    assert (gray < 0.9).mean() > 0.03


def test_hovering_a_heat_map_cell_reads_out_that_cell(report):
    text = report.read_text(encoding="utf-8")
    fid, data = next((m.group(1), json.loads(m.group(2))) for m in re.finditer(
        r'<script type="application/json" id="(gp-fig-\d+)-data">(.*?)</script>', text) if '"kind":"heat"' in m.group(2))
    r, c = 0, len(data["x"]) - 1  # the input-side layer (the hostile name) at the last drawn step
    with Chromium() as b:
        b.open(report.as_uri(), height=900)
        rect = b.evaluate(f"(function () {{ var i = document.querySelector('#{fid} img'); i.scrollIntoView(); "
                          "var r = i.getBoundingClientRect(); return [r.left, r.top, r.width, r.height]; })()")
        left, top, right, bottom = data["box"]
        L, C = len(data["rows"]), len(data["x"])
        x = rect[0] + (left + (c + 0.5) / C * (right - left)) * rect[2]
        y = rect[1] + (bottom - (r + 0.5) / L * (bottom - top)) * rect[3]
        b.mouse_move(x, y)
        hidden, tip = b.evaluate("[document.getElementById('gp-tip').hidden, document.getElementById('gp-tip').textContent]")
        assert not hidden
        value = data["z"][r][c]
        assert tip.startswith(f"{EVIL} · step {data['x'][c]}: ‖∂L/∂h‖ = ")
        assert float(tip.rsplit("= ", 1)[1]) == pytest.approx(value, rel=5e-3)
        b.mouse_move(rect[0] + 2, rect[1] + 2)  # outside the axes: the tooltip goes
        assert b.evaluate("document.getElementById('gp-tip').hidden")
        assert b.problems() == []


def test_the_browser_check_sees_a_script_error(tmp_path):
    """The harness itself can fail: a page whose script throws is reported."""
    page = tmp_path / "broken.html"
    page.write_text("<!doctype html><title>x</title><p>x</p><script>undefinedFunction();</script>", encoding="utf-8")
    with Chromium() as b:
        b.open(page.as_uri())
        assert any("undefinedFunction" in p for p in b.problems())


def test_hovering_a_spike_mark_reads_out_the_spike(tmp_path):
    """The loss curve of a run with a gradient spike: the pointer on the red line at the spike's step
    reads out the spike's sentence; away from it, the curve's value."""
    from gradprobe.models import DeepMLP

    torch.manual_seed(0)
    mlp = DeepMLP(8, 3, width=8, depth=2, activation="relu", init="he")
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    opt = torch.optim.SGD(mlp.parameters(), lr=0.01)
    # every step recorded (a model this small would have its records thinned by the default budget)
    with gradprobe.Probe(mlp, spikes=True, hooks=False, budget=None) as probe:
        for step in range(60):
            opt.zero_grad()
            loss = F.cross_entropy(mlp(x * (50.0 if step == 40 else 1.0)), y)
            loss.backward()
            probe.step(loss)
            opt.step()
    run = probe.run()
    (event,) = run.spikes.events
    page = build_report({"spike": run}, tmp_path)
    text = page.read_text(encoding="utf-8")
    fid, data = next((m.group(1), json.loads(m.group(2))) for m in re.finditer(
        r'<script type="application/json" id="(gp-fig-\d+)-data">(.*?)</script>', text) if '"label":"loss"' in m.group(2))
    assert data["marks"] == [{"x": 40, "text": event.sentence()}]
    with Chromium() as b:
        b.open(page.as_uri(), height=900)
        rect = b.evaluate(f"(function () {{ var i = document.querySelector('#{fid} img'); i.scrollIntoView(); "
                          "var r = i.getBoundingClientRect(); return [r.left, r.top, r.width, r.height]; })()")
        left, top, right, bottom = data["box"]
        lo, hi = data["xlim"]

        def at(step):
            b.mouse_move(rect[0] + (left + (step - lo) / (hi - lo) * (right - left)) * rect[2],
                         rect[1] + (top + 0.5 * (bottom - top)) * rect[3])
            return b.evaluate("document.getElementById('gp-tip').textContent")

        assert at(40) == event.sentence()
        assert at(20).startswith("step 20: loss = ")
        assert b.problems() == []
