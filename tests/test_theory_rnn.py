"""Pascanu's conditions, the eigen view and recurrent Jacobians against dense linear algebra and float64 autograd."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from gradprobe.errors import ConfigError
from gradprobe.theory.rnn import eigen_growth, rnn_condition, rnn_conditions, rnn_jacobians, tanh_map_jacobians


def _randn(*shape, seed=0):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("act,gamma", [("sigmoid", 0.25), ("tanh", 1.0), ("relu", 1.0), ("linear", 1.0)])
def test_condition_matches_numpy_svd_and_eig(act, gamma):
    W = _randn(30, 30, seed=1) / math.sqrt(30) * 1.3
    c = rnn_condition(W, act)
    Wn = W.numpy()
    assert c.lambda1 == pytest.approx(np.linalg.svd(Wn, compute_uv=False)[0], rel=1e-12)
    assert c.rho == pytest.approx(np.abs(np.linalg.eigvals(Wn)).max(), rel=1e-12)
    assert c.gamma == gamma and c.eta == pytest.approx(gamma * c.lambda1, rel=1e-15)
    assert c.vanishing_guaranteed == (c.lambda1 < 1 / gamma)
    assert c.explosion_possible == (c.lambda1 > 1 / gamma)
    assert c.bound(np.arange(3)).tolist() == pytest.approx([1.0, c.eta, c.eta**2], rel=1e-14)


def test_condition_reads_nn_rnn_layers_and_nonlinearity():
    torch.manual_seed(0)
    m = nn.RNN(4, 6, num_layers=2, nonlinearity="relu", bidirectional=True)
    conds = rnn_conditions(m)
    assert len(conds) == 4
    for c in conds:
        name = f"weight_hh_l{c.layer}" + ("_reverse" if c.direction else "")
        w = getattr(m, name).detach().double().numpy()
        assert c.lambda1 == pytest.approx(np.linalg.svd(w, compute_uv=False)[0], rel=1e-6)  # float32 weights
        assert c.gamma == 1.0 and c.bound_valid and not c.gated
    with pytest.raises(ConfigError):
        rnn_condition(m, layer=2)


@pytest.mark.parametrize("cls,gates", [(nn.LSTM, 4), (nn.GRU, 3)])
def test_gated_cells_report_blocks_but_no_valid_bound(cls, gates):
    torch.manual_seed(0)
    m = cls(3, 5)
    c = rnn_condition(m)
    assert c.gated and not c.bound_valid and not c.vanishing_guaranteed and not c.explosion_possible
    assert len(c.blocks) == gates and "gate" in c.note
    assert np.isnan(c.bound(3))
    cand = m.weight_hh_l0.detach().double().numpy()[10:15]
    assert c.lambda1 == pytest.approx(np.linalg.svd(cand, compute_uv=False)[0], rel=1e-6)


def test_bad_inputs():
    with pytest.raises(ConfigError):
        rnn_condition(torch.ones(3, 4))
    with pytest.raises(ConfigError):
        rnn_condition(torch.eye(3), "softsign")
    with pytest.raises(ConfigError):
        rnn_condition(nn.Linear(3, 3))


def _unrolled_sigmoid_rnn(W, W_in, b, u, x0):
    xs = [x0]
    for t in range(u.shape[0]):
        xs.append(W @ torch.sigmoid(xs[-1]) + W_in @ u[t] + b)
    return xs


def test_sigmoid_rnn_jacobian_never_exceeds_pascanu_bound():
    # Seed 003 eq. 2: x_t = W σ(x_{t−1}) + W_in u_t + b with λ₁ = 3.5 < 4: vanishing guaranteed, and
    # ‖∂x_t/∂x_k‖₂ ≤ (λ₁/4)^(t−k) for every pair (brute-force float64 autograd, exact inequality).
    N, T = 8, 25
    W = _randn(N, N, seed=2)
    W = W * (3.5 / torch.linalg.matrix_norm(W, ord=2))
    W_in, b, u = _randn(N, 2, seed=3), _randn(N, seed=4), _randn(T, 2, seed=5)
    c = rnn_condition(W, "sigmoid")
    assert c.lambda1 == pytest.approx(3.5, rel=1e-12) and c.vanishing_guaranteed
    x0 = _randn(N, seed=6)
    xs = _unrolled_sigmoid_rnn(W, W_in, b, u, x0)
    worst = -np.inf
    for k in range(0, T, 3):
        def from_k(xk, k=k):
            x = xk
            out = [x]
            for t in range(k, T):
                x = W @ torch.sigmoid(x) + W_in @ u[t] + b
                out.append(x)
            return torch.stack(out)
        jac = torch.autograd.functional.jacobian(from_k, xs[k].detach())  # (T−k+1, N, N)
        for lag in range(1, T - k + 1):
            norm = float(torch.linalg.matrix_norm(jac[lag], ord=2))
            assert norm <= c.bound(lag) * (1 + 1e-12)
            worst = max(worst, math.log(norm) - math.log(c.bound(lag)))
    assert worst < 0  # and it is loose: every pair is strictly below the bound


def test_eigen_growth_against_matrix_power():
    W = _randn(6, 6, seed=7) * 0.5
    g = eigen_growth(W, 12)
    Wn = W.numpy()
    for s in range(13):
        assert g.norm[s] == pytest.approx(np.linalg.norm(np.linalg.matrix_power(Wn, s), 2), rel=1e-12)
    mu = np.linalg.eigvals(Wn)
    assert np.sort(np.abs(g.eigenvalues)) == pytest.approx(np.sort(np.abs(mu)), rel=1e-12)
    assert g.rho_t[5] == pytest.approx(np.abs(mu).max() ** 5, rel=1e-12)
    assert g.growing.tolist() == (np.abs(g.eigenvalues) > 1).tolist()
    # Gelfand: ‖W^t‖^{1/t} → ρ; a normal (symmetric) W has ‖W^t‖ = ρ^t exactly.
    S = W + W.T
    gs = eigen_growth(S, 5)
    assert gs.norm == pytest.approx(gs.rho_t, rel=1e-12)


def test_eigen_growth_shows_transient_growth_of_a_non_normal_matrix():
    W = torch.tensor([[0.5, 10.0], [0.0, 0.5]], dtype=torch.float64)
    g = eigen_growth(W, 30)
    assert g.rho == 0.5 and g.decaying.all()
    assert g.norm[1] > 1 > g.rho_t[1]  # grows at first although every eigen-direction decays
    assert g.norm[30] < 1e-3


def test_tanh_map_jacobians_match_autograd():
    N, T = 5, 6
    W, U = _randn(N, N, seed=8), _randn(N, 2, seed=9)
    inputs, x0 = _randn(T, 2, seed=10), _randn(N, seed=11)
    J, x = tanh_map_jacobians(W, x0, T, inputs, U)
    for t in range(T):
        ref = torch.autograd.functional.jacobian(lambda v: W @ torch.tanh(v) + U @ inputs[t], x[t])
        assert torch.allclose(J[t], ref, rtol=0, atol=1e-13)
        assert torch.allclose(x[t + 1], W @ torch.tanh(x[t]) + U @ inputs[t], rtol=0, atol=1e-13)


@pytest.mark.parametrize("nonlin", ["tanh", "relu"])
@pytest.mark.parametrize("layer", [0, 1])
def test_rnn_jacobians_match_the_module_and_autograd(nonlin, layer):
    torch.manual_seed(3)
    m = nn.RNN(3, 7, num_layers=2, nonlinearity=nonlin).double()
    u = torch.randn(9, 3, dtype=torch.float64)
    h0 = torch.randn(2, 7, dtype=torch.float64)
    J, h = rnn_jacobians(m, u, h0, layer=layer)
    out, hn = m(u[:, None, :], h0[:, None, :])
    assert torch.allclose(hn[layer, 0], h[-1], atol=1e-13)
    if layer == 1:
        assert torch.allclose(out[:, 0], h[1:], atol=1e-13)
    # Oracle: autograd of one step of the layer, feeding that layer's own input sequence.
    if layer == 0:
        seq = u
    else:
        seq = rnn_jacobians(m, u, h0, layer=0)[1][1:]
    W_ih, W_hh = getattr(m, f"weight_ih_l{layer}"), getattr(m, f"weight_hh_l{layer}")
    b = getattr(m, f"bias_ih_l{layer}") + getattr(m, f"bias_hh_l{layer}")
    act = torch.tanh if nonlin == "tanh" else torch.relu
    for t in range(9):
        ref = torch.autograd.functional.jacobian(lambda v: act(W_ih @ seq[t] + W_hh @ v + b), h[t])
        assert torch.allclose(J[t], ref, rtol=0, atol=1e-13)
