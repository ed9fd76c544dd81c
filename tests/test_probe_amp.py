"""Mixed precision: ``Probe(scaler=...)`` reports every quantity unscaled and marks the steps the scaler skips.

Oracle: the same model and batch without a scaler. A ``GradScaler`` on float32 math multiplies the loss by
a power of two, which is exact in floating point, so the unscaled numbers must equal the reference to the
last bit whether ``step()`` comes before or after ``scaler.unscale_``. Without the correction
``output_grad_norm`` is 65536× too large (issue 10).
"""
import copy

import numpy as np
import pytest
import torch
from torch import nn

import gradprobe
from gradprobe.errors import ConfigError


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2))


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 6, generator=g), torch.randn(32, 2, generator=g)


def _reference(net):
    x, y = _batch()
    with gradprobe.Probe(net, fetch_every=1) as probe:
        loss = (net(x) - y).pow(2).mean()
        loss.backward()
        return probe.step(loss)


@pytest.mark.parametrize("when", ["before_unscale", "after_unscale"])
def test_scaled_step_reports_unscaled_numbers(when):
    net = _net()
    ref = _reference(copy.deepcopy(net))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x, y = _batch()
    with gradprobe.Probe(net, scaler=scaler, fetch_every=1) as probe:
        loss = (net(x) - y).pow(2).mean()
        scaler.scale(loss).backward()
        if when == "after_unscale":
            scaler.unscale_(opt)
        flow = probe.step(loss)
        scaler.step(opt)
        scaler.update()
    for q in ("grad_norm", "output_grad_norm", "activation_norm", "weight_norm"):
        np.testing.assert_array_equal(flow[q], ref[q], err_msg=q)
    assert flow.tables["totals"].column("grad_norm")[0] == ref.tables["totals"].column("grad_norm")[0]
    assert flow.tables["scaler"].column("scale").tolist() == [2.0**16]
    assert not flow.skipped and not ref.skipped


def test_total_grad_norm_counts_a_shared_parameter_once():
    """The "totals" table is what clip_grad_norm_ over model.parameters() computes (tied weights once)."""
    emb, head = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
    head.weight = emb.weight  # tied, as in language models
    net = nn.Sequential(emb, nn.Tanh(), head)
    with gradprobe.Probe(net, fetch_every=1) as probe:
        net(torch.tensor([[1, 2, 3]])).pow(2).sum().backward()
        flow = probe.step()
    expected = torch.nn.utils.clip_grad_norm_(net.parameters(), float("inf")).item()
    assert flow.tables["totals"].column("grad_norm")[0] == pytest.approx(expected, rel=1e-6)
    assert len(flow.names) == 2 and flow.grad_norm[0] == flow.grad_norm[1]  # both layers report the shared grad


@pytest.mark.parametrize("when", ["before_unscale", "after_unscale"])
def test_overflowing_step_is_recorded_as_skipped_not_as_an_explosion(when, tmp_path):
    net = _net()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    x, y = _batch()
    with gradprobe.Probe(net, scaler=scaler, log_dir=tmp_path, run_name="amp", fetch_every=1) as probe:
        flows = []
        for s in range(3):
            opt.zero_grad()
            loss = (net(x) - y).pow(2).mean()
            # step 1 overflows: the scaled loss is infinite in float32
            scaler.scale(loss * (1e36 if s == 1 else 1.0)).backward()
            if when == "after_unscale":
                scaler.unscale_(opt)
            flows.append(probe.step(loss))
            scaler.step(opt)
            scaler.update()
        live = probe.diagnose()
        assert probe.run().last.step == 2
    assert [f.skipped for f in flows] == [False, True, False]
    assert flows[1].nonfinite().any()  # the values are kept as they were: Inf/NaN
    assert flows[1].tables["scaler"].column("scale")[0] == 2.0**16
    assert flows[2].tables["scaler"].column("scale")[0] == 2.0**15  # the scaler backed off
    assert live.verdict != "non_finite"
    run = gradprobe.load_run(tmp_path)
    assert [f.skipped for f in run.trace] == [False, True, False]
    assert run.diagnose() == live


def test_diagnosis_passes_over_a_skipped_last_step():
    net = _net()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    x, y = _batch()
    with gradprobe.Probe(net, scaler=scaler) as probe:
        for s in range(2):
            opt.zero_grad()
            loss = (net(x) - y).pow(2).mean()
            scaler.scale(loss * (1e36 if s == 1 else 1.0)).backward()
            probe.step(loss)
            scaler.step(opt)
            scaler.update()
        d = probe.diagnose()
        assert probe.trace.last.skipped and d.verdict != "non_finite"
        assert probe.run().last.step == 0


def test_autocast_fp16_and_bf16_parameters_keep_working():
    """torch.autocast(float16) under a scaler and bfloat16 parameters: unscaled numbers within the
    precision of the half types of the float32 reference."""
    net = _net()
    ref = _reference(copy.deepcopy(net))
    x, y = _batch()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    amp_net = copy.deepcopy(net)
    with gradprobe.Probe(amp_net, scaler=scaler, fetch_every=1) as probe:
        with torch.autocast("cpu", dtype=torch.float16):
            loss = (amp_net(x) - y).float().pow(2).mean()
        scaler.scale(loss).backward()
        flow = probe.step(loss)
    for q in ("grad_norm", "output_grad_norm", "activation_norm"):
        np.testing.assert_allclose(flow[q], ref[q], rtol=2e-2, err_msg=q)
    bf = copy.deepcopy(net).to(torch.bfloat16)
    with gradprobe.Probe(bf, fetch_every=1) as probe:
        (bf(x.bfloat16()) - y.bfloat16()).float().pow(2).mean().backward()
        flow = probe.step()
    for q in ("grad_norm", "output_grad_norm", "activation_norm"):
        np.testing.assert_allclose(flow[q], ref[q], rtol=5e-2, err_msg=q)


def test_disabled_scaler_changes_nothing_and_a_wrong_object_is_refused():
    net = _net()
    ref = _reference(copy.deepcopy(net))
    x, y = _batch()
    with gradprobe.Probe(net, scaler=torch.amp.GradScaler("cpu", enabled=False), fetch_every=1) as probe:
        (net(x) - y).pow(2).mean().backward()
        flow = probe.step()
    np.testing.assert_array_equal(flow.output_grad_norm, ref.output_grad_norm)
    assert "scaler" not in flow.tables
    with pytest.raises(ConfigError, match="GradScaler"):
        gradprobe.Probe(net, scaler=2.0**16, fetch_every=1)
