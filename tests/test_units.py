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
