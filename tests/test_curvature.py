"""Hessian eigenvalues/trace against the dense Hessian (float64), and seed 004's stationary points."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from gradprobe.analysis.curvature import classify_stationary, hessian_eigs, hessian_trace
from gradprobe.errors import ConfigError
from gradprobe.functional.products import flatten, hvp
from gradprobe.models import DeepMLP


pytestmark = pytest.mark.usefixtures("one_thread")


def _small_problem(seed=0, return_flat=False):
    """A tanh MLP 3→5→2 with MSE loss on 8 points (32 parameters), float64."""
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    x = torch.randn(8, 3, generator=g, dtype=torch.float64)
    y = torch.randn(8, 2, generator=g, dtype=torch.float64)
    params = list(net.parameters())

    def loss_fn():
        return nn.functional.mse_loss(net(x), y)

    def loss_of_flat(theta):  # the same loss written out on one flat vector, for the dense twin
        W1, b1, W2, b2 = theta[:15].reshape(5, 3), theta[15:20], theta[20:30].reshape(2, 5), theta[30:32]
        out = torch.tanh(x @ W1.T + b1) @ W2.T + b2
        return ((out - y) ** 2).mean()

    dense = torch.autograd.functional.hessian(loss_of_flat, flatten([p.detach() for p in params])).numpy()
    return (loss_fn, params, dense, loss_of_flat) if return_flat else (loss_fn, params, dense)


def test_hvp_equals_dense_hessian_and_forward_over_reverse():
    loss_fn, params, H, loss_of_flat = _small_problem(return_flat=True)
    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    hv = hvp(loss_fn, params, v)
    np.testing.assert_allclose(hv.numpy(), H @ v.numpy(), rtol=1e-12, atol=1e-12)
    # References: double backward and torch.func.jvp(grad) agree to ~1e-15.
    theta = flatten([p.detach() for p in params])
    _, fwd = torch.func.jvp(torch.func.grad(loss_of_flat), (theta,), (v,))
    np.testing.assert_allclose(hv.numpy(), fwd.detach().numpy(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("seed", [0, 1])
def test_hessian_eigs_match_dense(seed):
    loss_fn, params, H = _small_problem(seed)
    exact = np.linalg.eigvalsh(H)
    e = hessian_eigs(loss_fn, params, k=3, which="both", tol=1e-12)
    scale = np.abs(exact).max()
    # 1e-6 relative to ‖H‖ (brief); full reorthogonalization gives ~1e-12 here.
    np.testing.assert_allclose(e.top, exact[::-1][:3], rtol=0, atol=1e-6 * scale)
    np.testing.assert_allclose(e.bottom, exact[:3], rtol=0, atol=1e-6 * scale)
    assert exact[0] < 0 < exact[-1]  # the problem is genuinely indefinite
    assert e.n_params == H.shape[0] == 32


def test_hessian_trace_matches_dense():
    loss_fn, params, H = _small_problem(2)
    t = hessian_trace(loss_fn, params, n_probes=300)
    assert abs(t.value - np.trace(H)) < 4 * t.stderr  # unbiased estimator: 4 standard errors
    true_se = np.sqrt(2 * (np.sum(H**2) - np.sum(np.diag(H) ** 2)) / 300)
    assert t.stderr == pytest.approx(true_se, rel=0.25)
    # A separable loss has a diagonal Hessian: every Rademacher probe returns the exact trace.
    w = torch.linspace(-1, 2, 7, dtype=torch.float64).requires_grad_(True)
    exact = hessian_trace(lambda: (torch.cosh(w) + w**4).sum(), [w], n_probes=3)
    assert exact.value == pytest.approx(float((torch.cosh(w) + 12 * w**2).sum().detach()), rel=1e-13)
    assert exact.stderr == pytest.approx(0.0, abs=1e-12)


def test_saddle_x2_minus_y2():
    xy = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    loss_fn = lambda: xy[0] ** 2 - xy[1] ** 2  # noqa: E731
    e = hessian_eigs(loss_fn, [xy])
    assert (e.top[0], e.bottom[0]) == (pytest.approx(2.0, abs=1e-12), pytest.approx(-2.0, abs=1e-12))
    r = classify_stationary(loss_fn, [xy])
    assert r.kind == "saddle" and r.grad_norm == 0.0 and r.neg_curvature == pytest.approx(1.0)


@pytest.mark.parametrize("floor", [0.0, None])
def test_quadratic_bowl_at_its_minimum_is_converged(floor):
    g = torch.Generator().manual_seed(3)
    M = torch.randn(6, 6, generator=g, dtype=torch.float64)
    A = M @ M.T + 0.1 * torch.eye(6, dtype=torch.float64)
    a = torch.randn(6, generator=g, dtype=torch.float64)
    x = a.clone().requires_grad_(True)
    loss_fn = lambda: 0.5 * (x - a) @ A @ (x - a)  # noqa: E731
    r = classify_stationary(loss_fn, [x], loss_floor=floor)
    assert r.kind == "converged" and r.is_converged
    exact = torch.linalg.eigvalsh(A)
    assert r.top_eig == pytest.approx(float(exact[-1]), rel=1e-8)
    assert r.bottom_eig == pytest.approx(float(exact[0]), rel=1e-6)
    # Away from the minimum the same bowl is an ordinary, non-stationary point.
    with torch.no_grad():
        x.add_(1.0)
    assert classify_stationary(loss_fn, [x], loss_floor=floor).kind == "not_stationary"


@pytest.mark.parametrize("floor", [0.0, None])
def test_seed004_relu_ramp_small_gradient_far_from_minimum(floor):
    # f_c(x) = max(0, c·x): f' = c at every x > 0, the minimum 0 is far away (seed 004).
    c = 1e-6
    x = torch.tensor([1e6], dtype=torch.float64, requires_grad=True)
    loss_fn = lambda: torch.relu(c * x).sum()  # noqa: E731
    r = classify_stationary(loss_fn, [x], loss_floor=floor)
    assert r.grad_norm == pytest.approx(c)  # tiny gradient ...
    assert r.loss == pytest.approx(1.0)  # ... yet the loss is 1, not 0
    assert r.top_eig == 0.0 and r.bottom_eig == 0.0  # flat: no curvature to call it a minimum
    assert r.kind == "vanishing_far_from_optimum"
    # Near the kink the loss is at its floor: the same function is then "converged".
    with torch.no_grad():
        x.fill_(1e-3)
    assert classify_stationary(loss_fn, [x], loss_floor=0.0).kind == "converged"


def _deep_problem(activation, init, depth):
    g = torch.Generator().manual_seed(0)
    net = DeepMLP(64, 10, width=64, depth=depth, activation=activation, init=init, generator=g)
    x = torch.randn(64, 64, generator=g)
    y = torch.randint(0, 10, (64,), generator=g)
    loss_fn = lambda: nn.functional.cross_entropy(net(x), y)  # noqa: E731
    return net, loss_fn


def test_deep_sigmoid_mlp_is_vanishing_not_converged():
    net, loss_fn = _deep_problem("sigmoid", "standard", depth=10)
    layers = [list(m.parameters()) for m in net.linears]
    r = classify_stationary(loss_fn, net.parameters(), loss_floor=0.0, loss_scale=float(np.log(10)), layers=layers)
    assert r.kind == "vanishing_far_from_optimum" and not r.is_converged
    assert r.layer_ratio < 1e-2  # the input layer gets < 1% of the output layer's gradient
    assert r.loss > 0.5 * np.log(10)  # near chance level
    # The per-layer ratio comes from the same gradient as autograd's .grad (slow twin).
    net.zero_grad()
    loss_fn().backward()
    first = torch.cat([p.grad.reshape(-1) for p in net.linears[0].parameters()]).norm()
    last = torch.cat([p.grad.reshape(-1) for p in net.linears[-1].parameters()]).norm()
    assert r.layer_ratio == pytest.approx(float(first / last), rel=1e-4)


def test_shallow_relu_mlp_is_not_starved():
    # Contrast: a 2-layer ReLU net at He init passes gradient to its first layer; it is simply
    # not at a stationary point.
    net, loss_fn = _deep_problem("relu", "he", depth=1)
    layers = [list(m.parameters()) for m in net.linears]
    r = classify_stationary(loss_fn, net.parameters(), loss_floor=0.0, loss_scale=float(np.log(10)), layers=layers)
    assert r.layer_ratio > 1e-1 and r.kind == "not_stationary"


def test_layer_grad_norms_given_directly():
    w = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    loss_fn = lambda: (w**2).sum()  # noqa: E731
    r = classify_stationary(loss_fn, [w], loss_floor=0.0, layer_grad_norms=[1e-6, 1e-3, 1.0])
    assert r.layer_ratio == pytest.approx(1e-6) and r.kind == "vanishing_far_from_optimum"


def test_bad_arguments_raise_config_error():
    w = torch.ones(2, dtype=torch.float64, requires_grad=True)
    loss_fn = lambda: (w**2).sum()  # noqa: E731
    with pytest.raises(ConfigError, match="grad_tol"):
        classify_stationary(loss_fn, [w], grad_tol=0)
    with pytest.raises(ConfigError, match="not both"):
        classify_stationary(loss_fn, [w], layers=[[w]], layer_grad_norms=[1.0, 1.0])
    with pytest.raises(ConfigError, match="not among params"):
        classify_stationary(loss_fn, [w], layers=[[w], [torch.ones(1)]])
    with pytest.raises(ConfigError, match="scalar"):
        hessian_eigs(lambda: w * 2, [w])
    with pytest.raises(ConfigError, match="require grad"):
        hessian_eigs(loss_fn, [torch.ones(2)])
    with pytest.raises(ConfigError, match="k=3"):
        hessian_eigs(loss_fn, [w], k=3)
    with pytest.raises(ConfigError, match="no parameters"):
        hessian_trace(loss_fn, [])
