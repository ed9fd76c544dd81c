"""Saturated and dead units against direct computations on the activations."""
import numpy as np
import torch
from torch import nn

from gradprobe.probe.units import UnitRecorder


def _snapshot(model):
    return [(dict(m._forward_hooks), dict(m._forward_pre_hooks), sorted(vars(m))) for m in model.modules()]


def test_saturated_fraction_matches_direct_count():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 50), nn.Sigmoid(), nn.Linear(50, 50), nn.Tanh())
    with torch.no_grad():
        net[0].weight.mul_(8.0)  # drive the sigmoid into saturation
    x = torch.randn(64, 10, dtype=torch.float32)
    rec = UnitRecorder(net, saturation=0.05).install()
    net(x)
    stats = rec.stats()
    rec.remove()
    s = torch.sigmoid(net[0](x))
    t = torch.tanh(net[2](s))
    expect_sig = (s * (1 - s) / 0.25 < 0.05).double().mean().item()
    expect_tanh = (1 - t**2 < 0.05).double().mean().item()
    assert stats.names == ("1", "3")
    np.testing.assert_allclose(stats.saturated_fraction, [expect_sig, expect_tanh], rtol=1e-6)
    assert expect_sig > 0.3  # the test exercises real saturation
    assert np.isnan(stats.dead_fraction).all()


def test_dead_relu_units_by_channel_and_feature():
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(6), nn.ReLU())
    x = torch.randn(5, 3, 8, 8)
    conv(x)  # materialise the lazy layer
    with torch.no_grad():
        conv[0].bias[:3] = -1e3  # channels 0..2 dead on every position and sample
        conv[3].bias[:] = -1e4  # all 6 features dead
    rec = UnitRecorder(conv).install()
    conv(x)
    stats = rec.stats()
    rec.remove()
    np.testing.assert_allclose(stats.dead_fraction, [3 / 8, 1.0])
    assert stats.n_units.tolist() == [8, 6]


def test_recorder_leaves_model_as_before_and_averages_calls():
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    before = _snapshot(net)
    rec = UnitRecorder(net).install()
    with torch.no_grad():
        net[0].bias.fill_(-1e3)
    net(torch.randn(8, 4))
    with torch.no_grad():
        net[0].bias.fill_(1e3)
    net(torch.randn(8, 4))
    assert rec.stats().dead_fraction.tolist() == [0.5]  # mean over the two calls
    rec.reset()
    assert rec.stats() is None
    rec.remove()
    assert _snapshot(net) == before


class _Twice(nn.Module):
    """An in-place ReLU whose output is then changed in place, and one ReLU module called on two widths."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(6, 8), nn.Linear(8, 5)
        self.act, self.shared = nn.ReLU(inplace=True), nn.ReLU()

    def forward(self, x):
        h = self.act(self.l1(x))
        h.mul_(-1.0).add_(1.0)  # after the hook: every entry of the ReLU output changes in place
        a = self.shared(h)  # width 8
        return self.shared(self.l2(a))  # width 5: the same module, another width


def _direct_dead(model, x, calls: int = 1):
    """Dead fraction per ReLU module from copies of its outputs taken as each call returned them."""
    seen = {}
    hooks = [m.register_forward_hook(lambda m, a, o, n=n: seen.setdefault(n, []).append(o.detach().clone()))
             for n, m in model.named_modules() if isinstance(m, nn.ReLU)]
    for _ in range(calls):
        model(x)
    for h in hooks:
        h.remove()
    return {n: sum(int((o.amax(0) <= 0).sum()) for o in outs) / sum(o.shape[1] for o in outs) for n, outs in seen.items()}


def test_dead_counts_taken_at_the_call_in_place_changes_and_shared_modules():
    # the hook keeps each call's per-unit peak; comparing and summing happen at collection, batched:
    # the numbers must be those of the outputs as each call left them
    torch.manual_seed(1)
    net = _Twice()
    with torch.no_grad():
        net.l1.bias[:3] = -50.0  # 3 of 8 units dead before the in-place change (all 8 look dead after it)
        net.l2.bias[:2] = -50.0
    x = torch.randn(16, 6)
    expect = _direct_dead(net, x, calls=2)
    assert 0 < expect["act"] < 1 and 0 < expect["shared"] < 1
    rec = UnitRecorder(net).install()
    net(x)
    net(x)
    stats = rec.stats()
    rec.remove()
    got = dict(zip(stats.names, stats.dead_fraction))
    assert got == expect  # integer counts over integer totals: exactly equal


def test_dead_counts_fold_without_a_step(monkeypatch):
    import gradprobe.probe.units as units

    monkeypatch.setattr(units, "_FOLD_AT", 3)  # fold pending peaks every 3 calls
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
    rec = UnitRecorder(net).install()
    xs = [torch.randn(5, 4) * s for s in (0.1, 1.0, 10.0, 0.5, 3.0, 0.2, 7.0)]
    dead = units_total = 0
    for k, x in enumerate(xs):
        with torch.no_grad():
            net[0].bias.fill_(-2.0 * (k % 3))  # some calls have dead units, some none
        out = net(x)
        dead += int((out.detach().amax(0) <= 0).sum())
        units_total += 6
    assert len(rec._dead_done) == 2 and len(rec._peaks) == 1
    assert rec.stats().dead_fraction.tolist() == [dead / units_total]
    assert 0 < dead < units_total
    rec.remove()
