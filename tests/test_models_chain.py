"""SigmoidChain (seed 004) against float64 autograd and the seed's own product formula."""
import math

import numpy as np

import pytest
import torch

from gradprobe.errors import ConfigError
from gradprobe.models.chain import SigmoidChain, chain_grad, chain_outputs
from gradprobe.probe.layers import find_layers


def _autograd_grad(net: SigmoidChain, x=None) -> torch.Tensor:
    net.zero_grad(set_to_none=True)
    net(x).backward()
    return net.grad_vector()


@pytest.mark.parametrize("L", [1, 2, 3, 7, 20])
def test_closed_form_matches_autograd_float64(L):
    # Both are exact float64 evaluations of the same products, differing only in operation order:
    # 1e-12 relative leaves ~1e4 ulps of room for L ≤ 20 factors.
    g = torch.Generator().manual_seed(L)
    w = torch.randn(L, generator=g, dtype=torch.float64) * 2.0
    net = SigmoidChain(L, w, dtype=torch.float64)
    torch.testing.assert_close(net.closed_form_grad(), _autograd_grad(net), rtol=1e-12, atol=0.0)


def test_closed_form_batch_matches_per_example_autograd():
    g = torch.Generator().manual_seed(1)
    net = SigmoidChain(6, torch.randn(6, generator=g, dtype=torch.float64), dtype=torch.float64)
    x = torch.randn(4, generator=g, dtype=torch.float64)
    got = net.closed_form_grad(x)  # (4, 6)
    assert got.shape == (4, 6)
    for b in range(4):
        torch.testing.assert_close(got[b], _autograd_grad(net, x[b]), rtol=1e-12, atol=0.0)


def test_first_weight_gradient_is_the_seeds_formula_literally():
    # dF/dw_1 = Π_{i=2..L} w_i · Π_{i=2..L} σ'(w_i o_{i−1}), written as in seed 004, with math.
    w = [0.7, -1.3, 2.1, 0.4, 3.0]
    o = [w[0]]
    for wi in w[1:]:
        o.append(1.0 / (1.0 + math.exp(-wi * o[-1])))
    dsig = lambda z: math.exp(-z) / (1.0 + math.exp(-z)) ** 2  # noqa: E731
    expected = math.prod(w[1:]) * math.prod(dsig(w[i] * o[i - 1]) for i in range(1, len(w)))
    net = SigmoidChain(5, w, dtype=torch.float64)
    assert float(net.closed_form_grad()[0]) == pytest.approx(expected, rel=1e-13, abs=0.0)
    assert float(net().detach()) == pytest.approx(o[-1], rel=1e-14)
    torch.testing.assert_close(net.outputs(), torch.tensor(o, dtype=torch.float64), rtol=1e-14, atol=0.0)


def test_unit_weights_vanish_geometrically():
    # With w_i = 1 every factor σ'(o) ≤ 1/4, so |dF/dw_1| ≤ 4^-(L-1): the seed's vanishing gradient.
    for L in (5, 10, 20):
        g1 = float(SigmoidChain(L, dtype=torch.float64).closed_form_grad()[0])
        assert 0.0 < g1 <= 0.25 ** (L - 1)
    g = SigmoidChain(20, dtype=torch.float64).closed_form_grad()
    assert abs(float(g[0])) < 1e-3 * abs(float(g[-1]))  # first layer starved relative to the last


def test_probe_sees_one_layer_per_weight():
    net = SigmoidChain(7)
    layers = find_layers(net)
    assert len(layers) == 7
    assert all(sum(p.numel() for p in layer.params) == 1 for layer in layers)


def test_pure_functions_agree_with_module():
    w = torch.tensor([1.5, -0.5, 2.0], dtype=torch.float64)
    net = SigmoidChain(3, w, dtype=torch.float64)
    torch.testing.assert_close(chain_grad(w), net.closed_form_grad(), rtol=0, atol=0)
    torch.testing.assert_close(chain_outputs(w)[-1], net().detach(), rtol=1e-15, atol=0)


@pytest.mark.parametrize("bad", [dict(L=0), dict(L=2.5), dict(L=3, weights=[1.0, 2.0])])
def test_bad_config_raises(bad):
    with pytest.raises(ConfigError):
        SigmoidChain(**bad)


def test_probe_reports_the_closed_form_per_layer():
    # Integration: gradprobe's Probe reads ‖∂F/∂w_k‖ per layer; for one-parameter layers that is |dF/dw_k|.
    from gradprobe.monitor import Probe

    net = SigmoidChain(12, torch.linspace(0.5, 2.5, 12, dtype=torch.float64), dtype=torch.float64)
    with Probe(net, update_ratio=False) as probe:
        F = net()
        F.backward()
        probe.step(F.detach())
        flow = probe.flow()
    assert len(flow.names) == 12
    order = [flow.index(f"layers.{k}") for k in range(12)]
    # float64 throughout (measured max relative gap 9e-16): 1e-12 relative.
    np.testing.assert_allclose(flow.grad_norm[order], net.closed_form_grad().abs().numpy(), rtol=1e-12, atol=0)
