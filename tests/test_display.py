"""Output a person reads: readable __str__ and a notebook _repr_html_ for the result classes, with the numbers
they hold, every user string escaped, and comparisons that say by which criterion they agree."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from torch import nn

import gradprobe
from gradprobe._display import badge, esc, html_table, num
from gradprobe.analysis import (
    compare_depth,
    hessian_eigs,
    hessian_trace,
    classify_stationary,
    isometry_summary,
    jacobian_spectrum,
)
from gradprobe.diagnosis import Diagnosis, Remedy, Verdict
from gradprobe.remedies import initialize_
from gradprobe.remedies.catalogue import MODEL, Call
from gradprobe.theory import rnn_condition
from gradprobe.trace import LayerFlow, TemporalFlow

EVIL = "<script>alert('x')</script>"


def test_num_formats_and_marks_what_was_not_measured():
    assert [num(v) for v in (1234567.0, 0.5, -2.5e-9, None, float("nan"), float("inf"), 7, True)] == [
        "1.23e+06", "0.5", "-2.5e-09", "—", "nan", "inf", "7", "yes"]
    assert esc(EVIL) == "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;"
    assert EVIL not in html_table([EVIL], [[EVIL, 1.0]]) and EVIL not in badge(EVIL, "error")


def test_layerflow_html_lists_every_recorded_quantity_escaped():
    f = LayerFlow.from_arrays(["fc", EVIL], ["Linear", "Linear"], grad_norm=[1.5, 2.5],
                              output_grad_norm=[1e-3, np.nan], step=4, loss=0.25)
    h = f._repr_html_()
    assert EVIL not in h and esc(EVIL) in h
    assert "step 4, loss 0.25, 2 layers" in h
    assert "<th>‖∂L/∂h‖</th>" in h and "<th>‖∂L/∂θ‖</th>" in h and "‖θ‖" not in h  # weight_norm not measured
    cells = re.findall(r'<td class="num">([^<]*)</td>', h)
    assert cells == ["0", "0.001", "1.5", "1", "2.5"]  # index, ‖∂L/∂h‖, ‖∂L/∂θ‖ per row; not measured is '—'
    assert "<td>—</td>" in h


def test_diagnosis_html_has_badges_evidence_and_ranked_remedies_with_their_call():
    d = Diagnosis((Verdict("vanishing", "error", (f"ratio 1e-6 at {EVIL}",),
                           (Remedy("a", "First", "because", (Call(initialize_, (MODEL, "he")),)),
                            Remedy("b", "Second", "also", "")), layer=EVIL),
                   Verdict("dead_units", "warning", ("half the units are dead",))))
    h = d._repr_html_()
    assert EVIL not in h and h.count(esc(EVIL)) == 2
    assert h.index("First") < h.index("Second") and h.count("<li>") == 4
    assert "<code>gradprobe.remedies.initialize_(model, &quot;he&quot;)</code>" in h
    assert "background:#c62828" in h and "background:#b45309" in h  # error, warning


def test_temporal_flow_str_states_the_decay_and_horizon():
    alpha = 0.9
    tf = TemporalFlow(EVIL, None, profile=alpha ** np.arange(60)[::-1])  # ‖∂E/∂h_k‖ = α^(T−1−k)
    s = str(tf)
    assert f"×{alpha:.4g}" in s and f"ln gain {np.log(alpha):.4g}" in s
    assert f"{int(np.floor(np.log(1e-2) / np.log(alpha)))} steps" in s  # horizon ⌊ln 0.01/ln α⌋
    assert "59 steps back" in s and num(alpha ** 59) in s
    assert EVIL not in tf._repr_html_()


def test_rnn_condition_says_which_condition_holds():
    s = str(rnn_condition(3.5 * torch.eye(4), "sigmoid"))
    assert "λ₁ = ‖W_rec‖₂ = 3.5" in s and "η = γλ₁ = 0.875" in s and "vanishing is guaranteed" in s
    assert f"{0.875 ** 10:.3g}" in s
    assert "explosion is possible" in str(rnn_condition(2.0 * torch.eye(4), "tanh"))
    lstm = str(rnn_condition(nn.LSTM(3, 8)))
    assert "gated" in lstm and lstm.count("gate block") == 4
    assert "<pre" in rnn_condition(torch.eye(2), "tanh")._repr_html_()
    assert "RNNCondition(" not in s  # not the raw dataclass


def test_spectrum_str_is_a_few_lines_with_the_extremes():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 20), nn.Tanh(), nn.Linear(20, 20))
    x = torch.randn(3, 20, dtype=torch.float64)
    spec = jacobian_spectrum(net.double(), x, k=5)
    s = str(spec)
    assert len(s.splitlines()) <= 8
    sv = spec.singular_values
    assert f"{sv[0, 0]:.4g}" in s and f"{sv.max():.4g}" in s and "isometry" in s
    assert "[[" not in s and "array(" not in s
    d = spec.as_dict()
    assert json.loads(json.dumps(d))["singular_values"] == sv.tolist()
    iso = isometry_summary(np.array([0.5, 1.0, 1.05, 2.0]))
    assert "σ in [0.5, 2] (condition 4)" in str(iso) and "50 % of 4" in str(iso)


def test_curvature_results_serialise_for_the_report():
    w = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    f = lambda: w[0] ** 2 - 3 * w[1] ** 2  # noqa: E731  H = diag(2, −6)
    e = hessian_eigs(f, [w]).as_dict()
    assert e["top"] == pytest.approx([2.0]) and e["bottom"] == pytest.approx([-6.0])
    t = hessian_trace(f, [w], n_probes=4).as_dict()
    assert t["trace"] == pytest.approx(-4.0) and t["trace_stderr"] == 0.0
    p = classify_stationary(f, [w])
    d = p.as_dict()
    assert d["kind"] == "saddle" and d["reasons"] == list(p.reasons)
    json.dumps({**e, **t, **d})
    assert str(p).startswith("saddle") and all(r in str(p) for r in p.reasons)


def test_compare_depth_states_its_criterion():
    prof = [2.0 ** (-(5 - l) / 2) for l in range(6)]  # exact √χ₁ profile, χ₁ = 1/2
    inside = compare_depth(prof, 0.5, width=1000, r=2.0)
    assert "within |z| ≤ 3" in inside.summary() and "agrees with" in inside.summary()
    far = compare_depth([v * 100 ** (l / 5) for l, v in enumerate(prof)], 0.5, width=1000, r=2.0)
    assert not far.within and "outside |z| ≤ 3" in str(far) and "departs from" in str(far)
    assert f"z = {far.z:.2f}" in far.summary()


def test_run_str_and_html_summarise_the_run(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(*[m for _ in range(8) for m in (nn.Linear(16, 16), nn.Sigmoid())])
    with gradprobe.Probe(net, log_dir=tmp_path, run_name="sig", fetch_every=1) as probe:
        for _ in range(2):
            net.zero_grad()
            loss = net(torch.randn(32, 16)).pow(2).mean()
            loss.backward()
            flow = probe.step(loss)
        d = probe.diagnose()
    run = gradprobe.load_run(tmp_path)
    s = str(run)
    ratio = flow.output_grad_norm[0] / flow.output_grad_norm[-1]  # oracle: straight from the last step
    assert f"{ratio:.3g} at step 1" in s and "vanishing (error)" in s and num(flow.loss, 4) in s
    assert str(d) in s
    h = run._repr_html_()
    assert "gp-badge" in h and "vanishing" in h and "<ol" in h
