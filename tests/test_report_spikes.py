"""Gradient spikes in the report (issue 12): the spikes of a run's ``"spikes"`` note are marked on its loss
and gradient-norm curves (red dotted lines where the spike steps are), listed in a table with the log's
numbers, and each spike's flight record is drawn and tabled; the report rebuilt from the run log is the
live one byte for byte. Oracles: the spike log itself (the watch's own tests check its numbers against a
NumPy twin), and the PNG's pixels at the place the hover data says the mark is."""
from __future__ import annotations

import html as html_lib
import io
import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import gradprobe
from gradprobe import load_run
from gradprobe.models import DeepMLP
from gradprobe.report import build_report
from gradprobe.report.figures import SPIKE_COLOR, flight_figure, loss_figure
from gradprobe.trace import SpikeLog

SPIKE_STEPS = (50, 100)


def _spiky_run(tmp, name="spiky", spikes=True, scale=50.0):
    torch.manual_seed(0)
    mlp = DeepMLP(16, 4, width=16, depth=3, activation="relu", init="he")
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 16, generator=g), torch.randint(0, 4, (32,), generator=g)
    opt = torch.optim.SGD(mlp.parameters(), lr=0.01)
    with gradprobe.Probe(mlp, spikes=spikes, hooks=False, log_dir=tmp, run_name=name) as probe:
        for step in range(120):
            batch = x * scale if step in SPIKE_STEPS else x
            opt.zero_grad()
            loss = F.cross_entropy(mlp(batch), y)
            loss.backward()
            probe.step(loss)
            opt.step()
        probe.diagnose()
    return probe.run()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("spikes_report")
    live = _spiky_run(tmp / "logs")
    page = build_report({"spiky": live}, tmp / "live")
    again = build_report({"spiky": load_run(tmp / "logs" / "spiky.sqlite")}, tmp / "back")
    return live, page, again


def _blocks(text):
    return [json.loads(m) for m in re.findall(r'<script type="application/json" id="[^"]+">(.*?)</script>', text)]


def _png(path):
    import matplotlib.image as mpimg

    return mpimg.imread(io.BytesIO(path.read_bytes()), format="png")[..., :3]


def test_live_and_rebuilt_spike_reports_are_byte_identical(built):
    live, page, again = built
    assert live.spikes.steps == list(SPIKE_STEPS)
    assert page.read_text(encoding="utf-8") == again.read_text(encoding="utf-8")
    for png in page.parent.glob("*.png"):
        assert png.read_bytes() == (again.parent / png.name).read_bytes()


def test_spikes_are_marked_on_the_loss_and_norm_curves(built):
    live, page, _ = built
    text = page.read_text(encoding="utf-8")
    want = [{"x": e.step, "text": e.sentence()} for e in live.spikes.events]
    lines = [b for b in _blocks(text) if b.get("kind") == "lines"]
    loss = next(b for b in lines if b["label"] == "loss")
    norms = next(b for b in lines if b["label"] == "‖∂L/∂θ‖")
    assert loss["marks"] == want and norms["marks"] == want
    assert "Red dotted lines: 2 gradient spikes (steps 50, 100)." in html_lib.unescape(text)
    # the PNG has the spike colour on the column the hover data puts each mark at, inside the axes
    assert SPIKE_COLOR == "C3"  # matplotlib's default red (#d62728); the curves are blue
    px = _png(page.parent / "spiky_loss.png")
    H, W = px.shape[:2]
    left, top, right, bottom = loss["box"]
    rows = slice(int(top * H) + 3, int(bottom * H) - 3)
    redness = px[rows, :, 0] - px[rows, :, 1:].mean(-1)  # an antialiased dotted line: red over white
    is_red = (redness > 0.3).any(0)  # (W,) a column holding the spike colour
    for m in want:
        col = (left + (m["x"] - loss["xlim"][0]) / (loss["xlim"][1] - loss["xlim"][0]) * (right - left)) * W
        assert is_red[int(col) - 2:int(col) + 3].any(), m
    cols = np.flatnonzero(is_red)
    assert len(cols) and all(min(abs(c - (left + (m["x"] - loss["xlim"][0]) / (loss["xlim"][1] - loss["xlim"][0])
                                          * (right - left)) * W) for m in want) < 3 for c in cols)


def test_the_spike_table_and_flight_records_are_the_log(built):
    live, page, _ = built
    text = html_lib.unescape(page.read_text(encoding="utf-8"))
    section = text[text.index("<h3>Gradient spikes</h3>"):]
    rows = re.findall(r"<tr><td class=\"num\">(\d+)</td><td>([^<]*)</td><td>(\d+) \(to step (\d+)\)</td><td>([^<]*)</td>"
                      r"<td>([^<]*)</td><td>([^<]*)×", section)
    assert [(int(r[0]), r[1], int(r[2]), int(r[3]), r[4]) for r in rows] == \
        [(e.step, e.kind, e.flagged_steps, e.last_step, e.layer) for e in live.spikes.events]
    for r, e in zip(rows, live.spikes.events):
        assert r[5] == f"{e.largest_layer} ({gradprobe._display.num(e.largest_jump)}×)"
        assert float(r[6]) == pytest.approx(e.total.jump, rel=5e-3)
    flights = [b for b in _blocks(page.read_text(encoding="utf-8")) if b.get("label") == "gradient norm"]
    assert len(flights) == len(live.spikes.events)
    for b, e in zip(flights, live.spikes.events):
        f = e.flight
        assert b["x"] == list(f.steps) and b["x"][-1] == e.step and b["marks"] == [{"x": e.step, "text": e.sentence()}]
        series = {s["name"]: s["y"] for s in b["series"]}
        assert series["‖∇θ‖ total"] == pytest.approx(list(f.total))
        assert series["rolling median"] == [v if math.isfinite(v) else None for v in f.total_median]
        for j, name in enumerate(f.layers):
            assert series[name] == pytest.approx([row[j] for row in f.grad_norm])
        assert f"Flight record before the spike at step {e.step}: every step's norms ({len(f)} steps" in section


def test_no_section_without_a_watch_and_a_sentence_without_spikes(tmp_path):
    plain = _spiky_run(tmp_path / "a", "plain", spikes=False)
    calm = _spiky_run(tmp_path / "b", "calm", scale=1.0)
    assert calm.spikes is not None and not calm.spikes.events
    text = html_lib.unescape(build_report({"plain": plain, "calm": calm}, tmp_path / "out").read_text(encoding="utf-8"))
    plain_part, calm_part = text.split('<section id="run-2">')
    assert "Gradient spikes" not in plain_part and '"marks"' not in plain_part
    assert f"No gradient spike (watched every step through step {calm.spikes.through})" in calm_part
    assert calm.spikes.through == 119


def test_a_broken_spikes_note_is_a_clear_error(tmp_path, built):
    live, _, _ = built
    bad = gradprobe.Run(live.trace, live.facts, live.last, {**live.meta, "spikes": {"events": [{"nope": 1}]}})
    with pytest.raises(gradprobe.RunLogError, match="the spike log saved in this run log is malformed"):
        build_report({"bad": bad}, tmp_path)


def test_figures_without_a_flight_record_or_spikes():
    from gradprobe.trace import SpikeEvent

    assert flight_figure(SpikeEvent(3), "k") is None
    live_trace = gradprobe.trace.Trace()
    assert loss_figure(live_trace, "k", SpikeLog((SpikeEvent(3),))) is None


def test_a_full_flight_record_is_drawn_and_tabled_from_the_run_log(tmp_path):
    """``spikes="full"``: the report draws ‖∂L/∂h‖ and the one-step update ratio of every flight step, tables
    every per-layer quantity and unit statistic, and the report rebuilt from the run log is the same."""
    torch.manual_seed(0)
    mlp = DeepMLP(16, 4, width=16, depth=3, activation="relu", init="he")
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 16, generator=g), torch.randint(0, 4, (32,), generator=g)
    opt = torch.optim.SGD(mlp.parameters(), lr=0.01)
    with gradprobe.Probe(mlp, spikes="full", log_dir=tmp_path / "logs", run_name="full", every=8) as probe:
        for step in range(60):
            opt.zero_grad()
            loss = F.cross_entropy(mlp(x * 50 if step == 50 else x), y)
            loss.backward()
            probe.step(loss)
            opt.step()
    live = probe.run()
    page = build_report({"full": live}, tmp_path / "live")
    again = build_report({"full": load_run(tmp_path / "logs" / "full.sqlite")}, tmp_path / "back")
    raw = page.read_text(encoding="utf-8")
    assert raw == again.read_text(encoding="utf-8")
    e = live.spikes.events[0]
    f = e.flight
    assert e.step == 50 and f.full
    blocks = {b["label"]: b for b in _blocks(raw) if b.get("kind") == "lines" and b.get("x") == list(f.steps)}
    for q, label in (("output_grad_norm", "‖∂L/∂h‖"), ("update_ratio", "‖Δθ‖/‖θ‖")):
        series = {s["name"]: s["y"] for s in blocks[label]["series"]}
        for j, name in enumerate(f.layers):
            want = [row[j] if row[j] > 0 else None for row in f.quantities[q]]
            assert series[name] == pytest.approx(want, nan_ok=True), (q, name)
    text = html_lib.unescape(raw)
    for label in ("‖∂L/∂h‖", "‖h‖", "‖θ‖", "‖Δθ‖/‖θ‖"):
        assert f"Full flight record before the spike at step 50: {label} per layer ({len(f)} steps, every step)" in text
    assert "Full flight record before the spike at step 50: units dead fraction" in text
