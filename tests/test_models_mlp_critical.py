"""DeepMLP(init="critical"): closed-form critical σ_w² (χ₁ = 1 at σ_b = 0), checked against the
Gaussian init it stands for and against the exact-in-expectation gradient ratio of references.md."""
import statistics

import pytest
import torch

from gradprobe.errors import ConfigError
from gradprobe.models import DeepMLP
from gradprobe.models.mlp import CRITICAL_SIGMA_W2

F64 = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("activation,sigma_w2", [("linear", 1.0), ("relu", 2.0), ("tanh", 1.0),
                                                   ("leaky_relu", 2.0 / (1 + 0.01**2)), ("prelu", 2.0 / (1 + 0.25**2))])
def test_critical_is_the_gaussian_init_with_the_closed_form_sigma_w2(activation, sigma_w2):
    assert CRITICAL_SIGMA_W2[activation] == pytest.approx(sigma_w2, rel=1e-15)
    a = DeepMLP(16, 3, width=32, depth=3, activation=activation, init="critical", generator=gen(0))
    b = DeepMLP(16, 3, width=32, depth=3, activation=activation, init="gaussian", sigma_w2=sigma_w2, generator=gen(0))
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)  # same generator stream: bit-identical
    assert all(not lin.bias.any() for lin in a.linears)
    assert a.config["init"] == "critical"


def test_critical_weight_variance():
    # 512×512 = 262,144 draws: the variance estimate has relative s.e. √(2/n) ≈ 0.3%; 2% is > 6 s.e.
    net = DeepMLP(512, 1, width=512, depth=1, activation="prelu", init="critical", generator=gen(1))
    w = net.blocks[0].linear.weight.detach().double()
    assert float(w.var() * 512) == pytest.approx(2.0 / (1 + 0.25**2), rel=0.02)


def _grad_ratios(seed, activation="relu", init="critical", sigma_w2=None, input_scale=1.0, width=128, depth=6,
                 n_inputs=4):
    """Per-input ‖∂y/∂h¹‖² / ‖∂y/∂hᴸ‖² between the first and last hidden pre-activations of one random
    net (zero bias). Inputs do not interact (no batch norm), so row b of each ``.grad`` is input b's."""
    g = gen(seed)
    net = DeepMLP(width, 1, width=width, depth=depth, activation=activation, init=init, sigma_w2=sigma_w2,
                  generator=g).double()
    x = input_scale * torch.randn(n_inputs, width, generator=g, dtype=F64)
    h = net.input_act(net.input(x))
    pre = []
    for block in net.blocks:
        z = block.linear(h)
        z.retain_grad()
        pre.append(z)
        h = block.act(z)
    net.output(h).sum().backward()
    return (pre[0].grad.pow(2).sum(1) / pre[-1].grad.pow(2).sum(1)).tolist()


@pytest.mark.parametrize("activation,input_scale", [("linear", 1.0), ("relu", 1.0), ("leaky_relu", 1.0),
                                                    ("tanh", 1e-3)])
def test_gradient_norm_is_preserved_in_expectation(activation, input_scale):
    # references.md: at zero bias with Gaussian weights, E[‖δ¹‖²/‖δᴸ‖²] = σ_w^(2(L−1)) (linear) and
    # (σ_w²/2)^(L−1) (ReLU) exactly at any width: 1 at the critical σ_w². tanh is critical at q* = 0,
    # so it is tested in its linear regime (tiny input). 100 nets × 4 inputs, width 128, 5 transitions:
    # one ratio's s.d. is ≈ 0.3 (linear) – 0.45 (ReLU); even if the 4 inputs of a net were fully
    # correlated the mean's s.e. is ≤ 0.045, so 0.15 is > 3 s.e. (measured 0.987, 1.001, 1.009, 0.987).
    ratios = [r for s in range(100) for r in _grad_ratios(s, activation, input_scale=input_scale)]
    assert statistics.mean(ratios) == pytest.approx(1.0, abs=0.15)


def test_gaussian_off_critical_is_visibly_different():
    # The same oracle detects a 20 % miss: ReLU at σ_w² = 1.6 gives (0.8)^5 ≈ 0.33.
    ratios = [r for s in range(50) for r in _grad_ratios(s, init="gaussian", sigma_w2=1.6)]
    assert statistics.mean(ratios) == pytest.approx(0.8**5, abs=0.1)


@pytest.mark.parametrize("activation", ["sigmoid", "elu", "gelu", "selu"])
def test_critical_without_closed_form_points_to_theory(activation):
    with pytest.raises(ConfigError, match=r"init='gaussian', sigma_w2=gradprobe.theory.critical_sigma_w2"):
        DeepMLP(4, 2, width=8, depth=2, activation=activation, init="critical")


def test_critical_with_bias_variance_is_refused():
    with pytest.raises(ConfigError, match="sigma_b2"):
        DeepMLP(4, 2, width=8, depth=2, activation="tanh", init="critical", sigma_b2=0.05)
