"""The activation table against autograd (σ′ = dσ/da in float64) and γ against a dense grid maximum."""
import math
import pickle

import numpy as np
import pytest
import torch

from gradprobe.errors import ConfigError
from gradprobe.functional.activations import ACTIVATIONS, GAMMA, activation, leaky_relu

F64 = torch.float64
NAMES = sorted(ACTIVATIONS)


def _grid():
    # dense on [−8, 8] (spacing 1e-4), without the kinks 0 and ±1 themselves (σ′ jumps there)
    a = torch.linspace(-8.0, 8.0, 160_001, dtype=F64)
    return a[((a.abs() - 1.0).abs() > 1e-9) & (a.abs() > 1e-9)]


@pytest.mark.parametrize("name", NAMES)
def test_grad_equals_autograd(name):
    row = ACTIVATIONS[name]
    a = _grid()[::7].clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(row.fn(a).sum(), a)
    torch.testing.assert_close(row.grad(a.detach()), ref, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("name", [n for n in NAMES if ACTIVATIONS[n].grad_from_output is not None])
def test_grad_from_output_equals_grad(name):
    row = ACTIVATIONS[name]
    a = _grid()[::7]
    if name == "softplus":
        a = a[a > -30]  # 1 − e^{−h} loses relative accuracy where h = softplus(a) underflows
    if name == "sigmoid":
        a = a[a.abs() < 30]
    torch.testing.assert_close(row.grad_from_output(row.fn(a)), row.grad(a), rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("name", NAMES)
def test_gamma_is_the_grid_maximum(name):
    row = ACTIVATIONS[name]
    grid_max = float(row.grad(_grid()).abs().max())
    assert GAMMA[name] == row.gamma
    # the grid (spacing 1e-4) reaches γ up to the curvature of σ′ near its maximum; the sup is not attained
    # for softplus (σ′ → 1 as a → ∞, grid ends at 8) and selu (σ′ → λα as a → 0⁻, grid skips 0)
    tol = {"softplus": 1e-3, "selu": 2e-4}.get(name, 1e-7)
    assert grid_max <= row.gamma * (1 + 1e-12)
    assert grid_max == pytest.approx(row.gamma, rel=tol)


def test_published_gammas():
    # Pascanu, Mikolov & Bengio 2013, §2.1: γ = 1/4 for the sigmoid, 1 for tanh
    assert (GAMMA["sigmoid"], GAMMA["tanh"], GAMMA["relu"], GAMMA["linear"]) == (0.25, 1.0, 1.0, 1.0)
    assert GAMMA["erf"] == pytest.approx(2 / math.sqrt(math.pi), rel=1e-15)


def test_kink_values_follow_autograd():
    for name in ("relu", "hard_tanh", "leaky_relu", "elu"):
        row = ACTIVATIONS[name]
        for k in row.kinks or (0.0,):
            a = torch.tensor([k], dtype=F64, requires_grad=True)
            (g,) = torch.autograd.grad(row.fn(a).sum(), a)
            assert float(row.grad(a.detach())) == float(g), (name, k)


def test_leaky_relu_slopes_and_errors():
    row = leaky_relu(0.3)
    a = torch.tensor([-2.0, 3.0], dtype=F64)
    np.testing.assert_allclose(row.fn(a).numpy(), [-0.6, 3.0], rtol=1e-15)
    assert row.grad(a).tolist() == [0.3, 1.0] and row.gamma == 1.0
    assert leaky_relu(2.0).gamma == 2.0 and leaky_relu(-3.0).gamma == 3.0
    assert leaky_relu(-0.5).grad_from_output is None  # h > 0 on both sides: not invertible
    with pytest.raises(ConfigError, match="slope"):
        leaky_relu(float("nan"))
    with pytest.raises(ConfigError, match="unknown activation 'swish' for the model"):
        activation("swish", where=" for the model")
    with pytest.raises(ConfigError, match="choose one of \\['tanh'\\]"):
        activation("relu", ("tanh",))
    with pytest.raises(ConfigError, match="not invertible"):
        activation("gelu", from_output=True)


def test_rows_pickle():
    # models hold these functions as attributes: torch.save(model) must work
    for row in ACTIVATIONS.values():
        back = pickle.loads(pickle.dumps(row))
        a = torch.linspace(-2, 2, 9, dtype=F64)
        torch.testing.assert_close(back.grad(a), row.grad(a))


def test_one_name_set_and_one_gamma_for_theory():
    import gradprobe.theory as theory
    from gradprobe.theory import meanfield

    assert set(meanfield.ACTIVATIONS) == set(ACTIVATIONS)
    assert theory.GAMMA is GAMMA
