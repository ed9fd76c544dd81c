"""The probe's unit and temporal recorders: recorded with each step, persisted, removed on close."""
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import gradprobe
from gradprobe.diagnosis import DiagnosisConfig, Findings
from gradprobe.diagnosis.rules_units import rule_stagnating
from gradprobe.models import DeepMLP
from gradprobe.trace import LayerFlow, Trace
from reference.loops import train_cross_entropy


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(4, 8)
        self.mid = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU())
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(self.mid(out[-1]))


def snapshot(model):
    return [(dict(m._forward_hooks), dict(m._forward_pre_hooks), sorted(vars(m))) for m in model.modules()]


def test_units_and_temporal_recorded_each_step_persisted_and_removed(tmp_path):
    torch.manual_seed(0)
    net = Net()
    before = snapshot(net)
    x, y = torch.randn(12, 5, 4), torch.randint(0, 3, (5,))
    ref = Net()
    ref.load_state_dict(net.state_dict())
    F.cross_entropy(ref(x), y).backward()
    with gradprobe.Probe(net, temporal=True, log_dir=tmp_path, run_name="r", every=2) as probe:
        for _ in range(4):
            net.zero_grad()
            F.cross_entropy(net(x), y).backward()
            probe.step()
        assert [f.step for f in probe.trace] == [0, 2]
        flow = probe.trace.last
        # the unrolled GRU gives the fused module's gradients
        for (n, p), q in zip(net.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=n)
        # unit stats equal a direct computation on the activations
        with torch.no_grad():
            h = net.mid[1](net.mid[0](net.rnn(x)[0][-1]))
            r = net.mid[3](net.mid[2](h))
        assert flow.units.names == ("mid.1", "mid.3")
        np.testing.assert_allclose(flow.units.saturated_fraction[0], (1 - h**2 < 0.05).double().mean().item())
        np.testing.assert_allclose(flow.units.dead_fraction[1], (r.amax(0) <= 0).double().mean().item())
        assert set(flow.temporal) == {"rnn.l0"} and flow.temporal["rnn.l0"].steps == 12
    assert snapshot(net) == before and "forward" not in vars(net.rnn)
    back = gradprobe.load_trace(tmp_path / "r.sqlite")
    assert [f.step for f in back] == [0, 2]
    np.testing.assert_array_equal(back.last.temporal["rnn.l0"].grad_norm, flow.temporal["rnn.l0"].grad_norm)
    np.testing.assert_array_equal(back.last.units.dead_fraction, flow.units.dead_fraction)


def test_temporal_flow_needs_temporal_true():
    net = nn.RNN(3, 4)
    with gradprobe.Probe(net) as probe:
        net(torch.randn(5, 2, 3))[0].sum().backward()
        try:
            probe.temporal_flow()
        except gradprobe.ProbeStateError as e:
            assert "temporal=True" in str(e)
        else:
            raise AssertionError("temporal_flow() without temporal=True must raise")


def test_mark_state_in_a_python_loop_is_recorded():
    cell = nn.RNNCell(3, 6)
    x = torch.randn(10, 2, 3)
    with gradprobe.Probe(cell, temporal=True) as probe:
        h = torch.zeros(2, 6)
        for t in range(10):
            h = gradprobe.mark_state(cell(x[t], h), "cell", t)
        h.pow(2).sum().backward()
        tf = probe.temporal_flow()["cell"]
    assert tf.steps == 10 and tf.grad_norm[-1] > 0


def _flow(step, loss, first_ratio, last_ratio):
    return LayerFlow.from_arrays(["a", "b", "c"], step=step, loss=loss, grad_norm=[1.0, 1.0, 1.0],
                                 update_ratio=[first_ratio, 1e-3, last_ratio])


def test_stagnating_rule_needs_frozen_lower_layers_and_a_plateau():
    cfg = DiagnosisConfig(window=40, window_min=10)

    def trace(first_ratio, loss_of):
        t = Trace()
        for s in range(40):
            t.append(_flow(s, loss_of(s), first_ratio, 1e-2))
        return t

    flat = lambda s: 2.30 - 1e-5 * s  # noqa: E731
    falling = lambda s: 2.30 * 0.97**s  # noqa: E731
    stuck = trace(1e-6, flat)
    v = rule_stagnating(Findings(stuck.last, trace=stuck), cfg)
    assert v is not None and v.kind == "stagnating"
    assert abs(v.data["update_ratio_first_over_last"] - 1e-4) < 1e-12
    assert rule_stagnating(Findings(stuck.last, trace=trace(1e-3, flat)), cfg) is None  # lower layers move
    assert rule_stagnating(Findings(stuck.last, trace=trace(1e-6, falling)), cfg) is None  # loss still falls


def test_deep_sigmoid_training_run_is_called_stagnating():
    torch.manual_seed(0)
    net = DeepMLP(32, 10, width=32, depth=10, activation="sigmoid", init="standard")
    x, y = torch.randn(256, 32), torch.randint(0, 10, (256,))
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    # every step recorded: under the default budget the update ratios the stagnation rule reads are
    # sampled at a cadence that depends on the machine's load (test_schedule.py covers sampled diagnoses)
    with gradprobe.Probe(net, budget=None) as probe:
        train_cross_entropy(probe, net, opt, x, y, steps=60)
        d = probe.diagnose(window=40)
    assert d.verdict == "vanishing" and "stagnating" in d
