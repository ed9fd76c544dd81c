"""The one report builder: from Run objects only; the report built live equals the one rebuilt from the run
logs byte for byte; numbers come from the trace; figures' hover data and geometry match what is drawn;
self-contained; every user string escaped; notes (summary, trials, spectrum, curvature) rendered."""
from __future__ import annotations

import html as html_lib
import io
import json
import math
import re
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradprobe
from gradprobe import ConfigError, load_run
from gradprobe._display import esc, num
from gradprobe.analysis import classify_stationary, jacobian_spectrum
from gradprobe.report import build_report
from gradprobe.report.figures import columns, heatmap_figure, loss_figure
from gradprobe.theory import mean_field
from gradprobe.trace import LayerFlow, Trace
from reference.loops import train_cross_entropy

EVIL = "<script>alert(1)</script>"
EVIL_LAYER = "<img src=x onerror=alert(2)>"
MATH = "$\\alpha$ layer"  # '$' would start matplotlib math text


def _mlp(act, depth=5, width=12):
    mods = OrderedDict()
    for i in range(depth):
        mods[EVIL_LAYER if i == 0 else (MATH if i == 1 else f"fc{i}")] = nn.Linear(width, width)
        mods[f"act{i}"] = act()
    mods["out"] = nn.Linear(width, 3)
    return nn.Sequential(mods)


def _runs(tmp):
    torch.manual_seed(0)
    x, y = torch.randn(32, 12), torch.randint(0, 3, (32,))
    runs = {}
    for label, act in ((f"sigmoid {EVIL}", nn.Sigmoid), ("tanh", nn.Tanh)):
        net = _mlp(act)
        opt = torch.optim.SGD(net.parameters(), lr=0.5)
        # max_steps=4 < 10 steps: the live trace is thinned, the run log keeps all; the report must not care
        with gradprobe.Probe(net, log_dir=tmp, run_name=label.split()[0], max_steps=4) as probe:
            train_cross_entropy(probe, net, opt, x, y, steps=10)
            probe.diagnose()
            probe.note("summary", {"test accuracy": 0.5, "note": EVIL})
            probe.note("description", [f"a run whose description is hostile: {EVIL}", "second paragraph"])
        run = probe.run()
        xs = torch.randn(2, 12, dtype=torch.float64)
        run.note("spectrum", {"at the end": jacobian_spectrum(net.double(), xs, k=3).as_dict()})
        net.float()
        point = classify_stationary(lambda: F.cross_entropy(net(x), y), list(net.parameters()))
        run.note("curvature", point.as_dict())
        run.note("trials", {"caption": f"equal budget {EVIL}", "rows": [
            {"remedy": "baseline", "verdict_end": "vanishing", "ratio_end": 1e-6, "held_out_loss": 1.1},
            {"remedy": "he_init", "call": f"gradprobe.remedies.initialize_(model, 'he') {EVIL}",
             "verdict_end": "healthy", "ratio_end": 0.4, "held_out_loss": 0.9, "restored": True}]})
        runs[label] = run
    rnn, head = nn.RNN(3, 16), nn.Linear(16, 2)
    with gradprobe.Probe(nn.ModuleList([rnn, head]), temporal=True, log_dir=tmp, run_name="rnn") as probe:
        for _ in range(3):
            out, _ = rnn(torch.randn(40, 4, 3))
            loss = F.cross_entropy(head(out[-1]), torch.randint(0, 2, (4,)))
            rnn.zero_grad()
            head.zero_grad()
            loss.backward()
            probe.step(loss)
    runs["rnn"] = probe.run()
    return runs


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    live = _runs(tmp / "logs")
    page = build_report(live, tmp / "live", title=f"title {EVIL}", intro=[f"intro {EVIL}"])
    back = {label: load_run(tmp / "logs" / f"{label.split()[0]}.sqlite") for label in live}
    again = build_report(back, tmp / "back", title=f"title {EVIL}", intro=[f"intro {EVIL}"])
    return live, back, page, again


def _json_blocks(text):
    return [json.loads(m) for m in re.findall(r'<script type="application/json" id="[^"]+">(.*?)</script>', text)]


def test_live_and_rebuilt_reports_are_byte_identical(built):
    live, back, page, again = built
    # the live trace is thinned (max_steps=4), the run log holds every recorded step
    assert live["tanh"].trace.stride > 1 and len(back["tanh"].trace) > len(live["tanh"].trace)
    assert page.read_bytes() == again.read_bytes()
    pngs = sorted(p.name for p in page.parent.glob("*.png"))
    assert pngs == sorted(p.name for p in again.parent.glob("*.png")) and len(pngs) >= 12
    for name in pngs:
        assert (page.parent / name).read_bytes() == (again.parent / name).read_bytes(), name


def test_page_is_self_contained(built):
    text = built[2].read_text(encoding="utf-8")
    assert "http://" not in text and "https://" not in text and "<link" not in text
    srcs = re.findall(r'<img [^>]*src="([^"]*)"', text)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    # one page script, the rest are JSON data blocks (one per figure with hover values)
    assert text.count("<script>") == 1 and text.count("<script") == 1 + len(_json_blocks(text)) == 1 + len(srcs)


def test_every_user_string_is_escaped(built):
    text = built[2].read_text(encoding="utf-8")
    for raw in (EVIL, EVIL_LAYER, "onerror=alert(2)>"):
        assert raw not in text
    assert esc(f"title {EVIL}") in text and esc(f"intro {EVIL}") in text and esc(EVIL_LAYER) in text
    assert esc(f"sigmoid {EVIL}") in text
    # the hover data carries the raw names, parsed back exactly (the script writes them as text only)
    rows = [b["rows"] for b in _json_blocks(text) if b["kind"] == "heat"]
    assert any(EVIL_LAYER in r and MATH in r for r in rows)
    assert ".innerHTML" not in text and "insertAdjacentHTML" not in text and "document.write" not in text


def _summary_rows(text):
    table = text[text.index('<section id="summary">'):text.index("</table>", text.index('<section id="summary">'))]
    return [re.findall(r"<td[^>]*>(.*?)</td>", r) for r in re.findall(r"<tr>(.*?)</tr>", table)[1:]]


def test_summary_numbers_come_from_the_saved_runs(built):
    _, back, page, _ = built
    rows = _summary_rows(page.read_text(encoding="utf-8"))
    assert len(rows) == 3
    for row, (label, run) in zip(rows, back.items()):
        # oracle: the complete run log, not the thinned live trace; the last step every recorder measured
        # (with the overhead budget a slow recorder may skip the very last step)
        first, last = run.trace[0], run.last_full()
        assert bool(last.has_output_grad.all())
        assert esc(label) in row[0]
        assert row[2] == str(len(run.trace)) and row[3] == num(last.loss)
        r0 = first.output_grad_norm[0] / first.output_grad_norm[-1]
        r1 = last.output_grad_norm[0] / last.output_grad_norm[-1]
        assert html_lib.unescape(row[5]) == f"{num(r0)} → {num(r1)}"
        n = len(last) - 1
        assert row[6] == num(r1 ** (1 / n))  # per-layer gain: the geometric mean per layer
    # mean field for the tanh MLP: σ_w², σ_b² read straight off the saved weights' statistics
    facts = back["tanh"].facts.mlp
    hidden = [s for s in facts.linears if s.in_features == s.out_features]
    sw = float(np.median([s.in_features * s.weight_ms for s in hidden]))
    sb = float(np.median([s.bias_ms for s in hidden]))
    assert f"√χ₁ = {num(math.sqrt(mean_field('tanh', sw, sb).chi1))}" in html_lib.unescape(rows[1][7])
    assert rows[2][7] == "—"  # an RNN: mean field does not apply
    assert rows[0][8] == "0.5" and rows[2][8] == "—"  # the 'summary' note's column


def test_diagnosis_evidence_and_ranked_remedies_are_on_the_page(built):
    _, back, page, _ = built
    text = page.read_text(encoding="utf-8")
    for k, run in enumerate(back.values(), 1):
        d = run.final_diagnosis()
        start = text.index(f'<section id="run-{k}">')
        section = text[start:text.index("</section>", start)]
        assert f"<h3>Diagnosis at step {run.last_full().step}</h3>" in section
        for v in d.verdicts:
            for e in v.evidence:
                assert esc(e) in section
            block = section[section.index(esc(v.evidence[0])):]
            pos = [block.index(f"<b>{esc(r.title)}</b>") for r in v.remedies]
            assert pos == sorted(pos)
            for r in v.remedies:
                if r.call:
                    assert f"<code>{esc(r.call)}</code>" in section
    sig = back[f"sigmoid {EVIL}"]
    assert sig.meta["diagnosis_step"] == sig.last_full().step and sig.final_diagnosis() == sig.diagnosis  # the saved one
    assert "vanishing_in_time" in text  # the RNN's verdict through time


def test_notes_are_rendered(built):
    _, back, page, _ = built
    text = page.read_text(encoding="utf-8")
    assert "<h3>Remedies tried</h3>" in text and esc(f"equal budget {EVIL}") in text
    assert "<th>held out loss</th>" in text and "<td>he_init</td>" in text
    spec = back["tanh"].meta["spectrum"]["at the end"]
    assert f'<td class="num">{num(max(spec["singular_values"][0] + spec["singular_values"][1]))}</td>' in text
    kind = back["tanh"].meta["curvature"]["kind"].replace("_", " ")
    assert f"Stationary-point test: <b>{kind}</b>" in text
    assert esc("a run whose description is hostile: " + EVIL) in text
    assert "<h3>Through time</h3>" in text and "rnn_temporal.png" in {p.name for p in page.parent.glob("*.png")}
    assert "tanh_spectrum.png" in {p.name for p in page.parent.glob("*.png")}


def test_heatmap_hover_data_is_the_trace(built):
    _, back, page, _ = built
    text = page.read_text(encoding="utf-8")
    heats = [b for b in _json_blocks(text) if b["kind"] == "heat"]
    tanh = next(h for h in heats if "fc2" in h["rows"] and h["rows"][-1] == "out" and h is not heats[0])
    hist = back["tanh"].history  # what the live probe held: 4 of 10 steps
    m = hist.matrix("output_grad_norm")
    assert tanh["x"] == hist.steps.tolist() and tanh["rows"] == list(hist.names)
    np.testing.assert_array_equal(np.array(tanh["z"], dtype=float), m.T)


def test_columns_keep_the_ends_and_the_cap():
    assert columns(5, 10).tolist() == [0, 1, 2, 3, 4]
    c = columns(1001, 300)
    assert c[0] == 0 and c[-1] == 1000 and len(c) == 300 and np.all(np.diff(c) > 0)


def _png(fig):
    import matplotlib.image as mpimg

    return mpimg.imread(io.BytesIO(fig.png), format="png")  # (H, W, 4) floats in [0, 1]


def test_heatmap_geometry_matches_its_pixels():
    """The box saved for the page script is where matplotlib drew the cells: the pixel at the centre of
    cell (layer r, step c) has the colour of log10(value) on the colour scale."""
    import matplotlib

    L, S = 5, 7
    t = Trace()
    for s in range(S):
        t.append(LayerFlow.from_arrays([f"l{i}" for i in range(L)], output_grad_norm=10.0 ** (np.arange(L) - s / 3),
                                       step=10 * s))
    fig = heatmap_figure(t, "h")
    img = _png(fig)
    H, W = img.shape[:2]
    left, top, right, bottom = fig.hover["box"]
    logs = np.log10(t.matrix("output_grad_norm"))  # (S, L)
    norm = matplotlib.colors.Normalize(logs.min(), logs.max())
    cmap = matplotlib.colormaps["viridis"]
    for r, c in [(0, 0), (4, 6), (2, 3), (1, 5)]:
        px = int((left + (c + 0.5) / S * (right - left)) * W)
        py = int((bottom - (r + 0.5) / L * (bottom - top)) * H)
        np.testing.assert_allclose(img[py, px, :3], cmap(norm(logs[c, r]))[:3], atol=2 / 255)
    assert fig.hover["x"] == [10 * s for s in range(S)]


def test_line_geometry_matches_its_pixels():
    t = Trace()
    for s in range(20):
        t.append(LayerFlow.from_arrays(["a"], grad_norm=[1.0], step=s, loss=3.0 - 0.1 * s))
    fig = loss_figure(t, "l")
    img = _png(fig)
    H, W = img.shape[:2]
    left, top, right, bottom = fig.hover["box"]
    (x0, x1), (y0, y1) = fig.hover["xlim"], fig.hover["ylim"]
    blue = np.array([0x1F, 0x77, 0xB4]) / 255  # matplotlib's C0, the loss line
    for s in (2, 10, 17):
        px = (left + (s - x0) / (x1 - x0) * (right - left)) * W
        py = (bottom - ((3.0 - 0.1 * s) - y0) / (y1 - y0) * (bottom - top)) * H
        win = img[int(py) - 2:int(py) + 3, int(px) - 2:int(px) + 3, :3].reshape(-1, 3)
        assert np.min(np.abs(win - blue).max(1)) < 0.1, s


def test_title_and_intro_come_from_agreeing_report_notes(tmp_path, built):
    live = built[0]
    runs = {"a": live["tanh"], "b": live["rnn"]}
    for r in runs.values():
        r.meta["report"] = {"title": "from the notes", "intro": "said once"}
    try:
        text = build_report(runs, tmp_path / "a").read_text(encoding="utf-8")
        assert "<title>from the notes</title>" in text and "<p>said once</p>" in text
        runs["b"].meta["report"] = {"title": "another"}
        text = build_report(runs, tmp_path / "b").read_text(encoding="utf-8")
        assert "<title>gradprobe report</title>" in text
        assert "<title>given</title>" in build_report(runs, tmp_path / "c", title="given").read_text(encoding="utf-8")
    finally:
        for r in runs.values():
            r.meta.pop("report")


def test_bad_input_is_a_clear_error(tmp_path, built):
    live = built[0]
    with pytest.raises(ConfigError, match="non-empty mapping"):
        build_report({}, tmp_path)
    with pytest.raises(ConfigError, match="'x' is a Trace, not a gradprobe.Run"):
        build_report({"x": Trace()}, tmp_path)
    run = live["rnn"]
    for key, bad, match in (("trials", "nope", "'trials' note must be a list of rows"),
                            ("spectrum", {"singular_values": "x"}, "'spectrum' note '' is malformed"),
                            ("summary", [1], "'summary' note must be a JSON object"),
                            ("description", 3, "'description'")):
        run.meta[key] = bad
        try:
            with pytest.raises(ConfigError, match=match):
                build_report({"rnn": run}, tmp_path)
        finally:
            run.meta.pop(key)
