"""analysis.temporal: decay rate and horizon against closed forms; the lag decomposition of seed 003
(eq. 6) against an explicit enumeration of every (t, k) term with Jacobians from autograd."""
import doctest
import math

import numpy as np
import pytest
import torch
from torch import nn

import gradprobe.analysis.temporal as analysis_temporal
import gradprobe.probe.temporal as probe_temporal
import gradprobe.probe.unroll as probe_unroll
from gradprobe.analysis.temporal import TemporalFlow, fit_decay_rate, gradient_horizon, rnn_lag_decomposition
from gradprobe.errors import ConfigError


@pytest.mark.parametrize("module", [analysis_temporal, probe_temporal, probe_unroll])
def test_docstring_examples(module):
    result = doctest.testmod(module, raise_on_error=False, verbose=False)
    assert result.attempted > 0 and result.failed == 0


# ------------------------------------------------------------------------------ decay rate, horizon
@pytest.mark.parametrize("alpha", [0.3, 0.9, 1.0, 1.7])
def test_decay_rate_of_geometric_profile_is_ln_alpha(alpha):
    p = 2.5 * alpha ** np.arange(30.0)
    r, window = fit_decay_rate(p)
    assert abs(r - math.log(alpha)) < 1e-12
    assert window == (0, 29)


def test_decay_rate_fits_the_decaying_side_only():
    # rises for 4 steps back (gradients accumulating), then decays by 0.6 per step
    p = np.concatenate([[1.0, 2.0, 4.0, 8.0], 8.0 * 0.6 ** np.arange(1, 20)])
    r, window = fit_decay_rate(p)
    assert window == (3, len(p) - 1)
    assert abs(r - math.log(0.6)) < 1e-12


def test_decay_rate_skips_zeros_and_reports_nan_without_data():
    p = 0.5 ** np.arange(10.0)
    p[[4, 7]] = 0.0  # e.g. underflow or a step with no gradient
    assert abs(fit_decay_rate(p)[0] - math.log(0.5)) < 1e-12
    assert math.isnan(fit_decay_rate(np.zeros(5))[0])
    assert math.isnan(fit_decay_rate(np.array([0.0, 1.0]))[0])


@pytest.mark.parametrize("alpha,fraction", [(0.8, 1e-2), (0.5, 0.3), (0.95, 1e-3)])
def test_horizon_closed_form(alpha, fraction):
    T = 400
    p = alpha ** np.arange(T, dtype=float)
    assert gradient_horizon(p, fraction) == min(math.floor(math.log(fraction) / math.log(alpha)), T - 1)


def test_horizon_counts_from_where_the_gradient_enters_and_covers_explosion():
    p = np.concatenate([[0.0, 0.0], 0.5 ** np.arange(10.0)])  # loss two steps before the end
    assert gradient_horizon(p, 0.1) == 3
    assert gradient_horizon(1.5 ** np.arange(12.0), 0.01) == 11  # exploding: reaches the start
    assert gradient_horizon(np.zeros(4)) == 0
    for bad in (0.0, -1.0, 1.5):
        with pytest.raises(ConfigError, match="fraction"):
            gradient_horizon(p, bad)


def test_temporal_flow_views():
    per = np.array([[3.0, 0.0, 1.0], [4.0, 2.0, 0.0]])
    f = TemporalFlow("x", per, cell_per_sequence=2 * per)
    np.testing.assert_allclose(f.grad_norm, [5.0, 2.0, 1.0], rtol=1e-15)
    np.testing.assert_allclose(f.cell_norm, [10.0, 4.0, 2.0], rtol=1e-15)
    np.testing.assert_array_equal(f.steps_back(), f.grad_norm[::-1])
    np.testing.assert_array_equal(f.steps_back("c"), f.cell_norm[::-1])
    r = TemporalFlow("x.reverse", per, reverse=True)
    np.testing.assert_array_equal(r.steps_back(), r.grad_norm)
    with pytest.raises(ConfigError, match="cell"):
        r.steps_back("c")
    assert "decay_rate" in repr(f)


# ------------------------------------------------------------------------------ lag decomposition
def _brute_force_terms(rnn, x, losses):
    """G_j by enumeration: Σ_{t−k=j} Σ_b (∂E_t/∂h_t)(∂h_t/∂h_k)(∂⁺h_k/∂W) for W_hh and W_ih.

    losses[t] maps h_t (B, H) to E_t (or is None). Every factor comes from autograd on one step map,
    with nothing shared with the implementation under test."""
    T, B, _ = x.shape
    H = rnn.hidden_size
    W_ih, W_hh = rnn.weight_ih_l0.detach(), rnn.weight_hh_l0.detach()
    b = (rnn.bias_ih_l0 + rnn.bias_hh_l0).detach()
    act = torch.tanh if rnn.nonlinearity == "tanh" else torch.relu
    hs = [torch.zeros(B, H, dtype=x.dtype)]
    for t in range(T):
        hs.append(act(x[t] @ W_ih.t() + hs[-1] @ W_hh.t() + b))
    h_prev = hs[:-1]  # h_{k−1} for k = 0 … T−1
    states = hs[1:]

    def jac(fn, at):
        return torch.autograd.functional.jacobian(fn, at)

    G_hh = torch.zeros(T, H, H, dtype=x.dtype)
    G_ih = torch.zeros(T, H, W_ih.shape[1], dtype=x.dtype)
    for t in range(T):
        if losses[t] is None:
            continue
        h_t = states[t].clone().requires_grad_()
        (g_t,) = torch.autograd.grad(losses[t](h_t), h_t)  # ∂E_t/∂h_t, (B, H)
        for bb in range(B):
            J = torch.eye(H, dtype=x.dtype)  # ∂h_t/∂h_k, built from k = t down
            for k in range(t, -1, -1):
                if k < t:
                    step = lambda h, i=k + 1: act(x[i, bb] @ W_ih.t() + h @ W_hh.t() + b)
                    J = J @ jac(step, h_prev[k + 1][bb])  # ∂h_{k+1}/∂h_k
                d_hh = jac(lambda W: act(x[k, bb] @ W_ih.t() + h_prev[k][bb] @ W.t() + b), W_hh)  # (H, H, H)
                d_ih = jac(lambda W: act(x[k, bb] @ W.t() + h_prev[k][bb] @ W_hh.t() + b), W_ih)
                row = g_t[bb] @ J
                G_hh[t - k] += torch.einsum("h,hij->ij", row, d_hh)
                G_ih[t - k] += torch.einsum("h,hij->ij", row, d_ih)
    return G_hh, G_ih


def _tail_curve(G):
    total = np.linalg.norm(G.sum(0))
    return np.array([np.linalg.norm(G[tau:].sum(0)) / total for tau in range(len(G))])


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("loss_kind", ["sum_over_time", "last_step", "last_state"])
def test_lag_decomposition_equals_enumeration_and_autograd(nonlinearity, loss_kind):
    torch.manual_seed(0)
    T, B, I, H = 5, 2, 2, 3
    rnn = nn.RNN(I, H, nonlinearity=nonlinearity).double()
    x = torch.randn(T, B, I, dtype=torch.float64)
    R = torch.randn(T, B, H, dtype=torch.float64)
    if loss_kind == "sum_over_time":  # E = Σ_t E_t, E_t = Σ_b tanh(h_t[b])·r_t[b]
        per_step = [lambda h, t=t: (torch.tanh(h) * R[t]).sum() for t in range(T)]
        loss_fn = lambda out, h_n: sum(per_step[t](out[t]) for t in range(T))
    elif loss_kind == "last_step":
        per_step = [None] * (T - 1) + [lambda h: (h @ R[0, 0]).pow(2).sum()]
        loss_fn = lambda out, h_n: per_step[-1](out[-1])
    else:  # through h_n, not the output sequence
        per_step = [None] * (T - 1) + [lambda h: (torch.sin(h) * R[1]).sum()]
        loss_fn = lambda out, h_n: per_step[-1](h_n[0])

    dec = rnn_lag_decomposition(rnn, x, loss_fn, keep_terms=True)
    G_hh, G_ih = _brute_force_terms(rnn, x, per_step)
    # each lag's contribution: all O(1) numbers computed in float64 -> 1e-12 absolute
    np.testing.assert_allclose(dec.terms_hh, G_hh.numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(dec.terms_ih, G_ih.numpy(), rtol=0, atol=1e-12)
    # the sum over all lags is autograd's gradient
    rnn.zero_grad()
    out, h_n = rnn(x)
    loss_fn(out, h_n).backward()
    np.testing.assert_allclose(dec.grad_hh, rnn.weight_hh_l0.grad.numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(G_hh.sum(0).numpy(), rnn.weight_hh_l0.grad.numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(dec.grad_ih, rnn.weight_ih_l0.grad.numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(dec.grad_b, rnn.bias_hh_l0.grad.numpy(), rtol=0, atol=1e-12)
    # curves
    np.testing.assert_allclose(dec.long_term_hh, _tail_curve(G_hh.numpy()), rtol=1e-10)
    np.testing.assert_allclose(dec.long_term_ih, _tail_curve(G_ih.numpy()), rtol=1e-10)
    head = [np.linalg.norm(G_hh.numpy()[:tau].sum(0)) / np.linalg.norm(G_hh.numpy().sum(0)) for tau in range(T)]
    np.testing.assert_allclose(dec.short_term_hh, head, rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(dec.lag_norm_hh, np.linalg.norm(G_hh.numpy(), axis=(1, 2)), rtol=1e-10)
    assert dec.long_term_hh[0] == pytest.approx(1.0, abs=1e-14) and dec.short_term_hh[0] == 0.0
    # the oracle has real long-term terms to compare (lag T−1 of W_hh is 0 exactly: it multiplies h_{−1} = h0 = 0)
    assert np.all(dec.lag_norm_ih > 0) and np.all(dec.lag_norm_hh[: T - 1] > 0) and dec.lag_norm_hh[T - 1] == 0
    assert dec.long_term_share(T + 3) == 0.0


def test_lag_decomposition_batch_first_and_initial_state():
    torch.manual_seed(1)
    rnn = nn.RNN(2, 3, batch_first=True).double()
    x = torch.randn(2, 6, 2, dtype=torch.float64)
    h0 = torch.randn(1, 2, 3, dtype=torch.float64)
    loss_fn = lambda out, h_n: out[:, -1].pow(2).sum() + out[:, 2].sum()
    dec = rnn_lag_decomposition(rnn, x, loss_fn, hx=h0)
    rnn.zero_grad()
    loss_fn(*rnn(x, h0)).backward()
    np.testing.assert_allclose(dec.grad_hh, rnn.weight_hh_l0.grad.numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(dec.grad_ih, rnn.weight_ih_l0.grad.numpy(), rtol=0, atol=1e-12)


def test_linear_like_rnn_long_term_share_shrinks_with_contraction():
    """Small recurrent weights (‖W‖ ≪ 1, Pascanu's sufficient condition) make long-term components
    vanish: the share of lags ≥ 5 is tiny; a large orthogonal-ish W keeps a sizeable share."""
    torch.manual_seed(2)
    T = 30
    x = torch.randn(T, 4, 3, dtype=torch.float64)
    shares = []
    for scale in (0.2, 1.0):
        rnn = nn.RNN(3, 8).double()
        Q, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))
        with torch.no_grad():
            rnn.weight_hh_l0.copy_(scale * Q)
        dec = rnn_lag_decomposition(rnn, x, lambda out, h: out[-1].sum())
        shares.append(dec.long_term_share(5))
    assert shares[0] < 1e-3 < shares[1]


def test_lag_decomposition_rejects_unsupported_modules():
    for m in (nn.RNN(2, 3, num_layers=2), nn.RNN(2, 3, bidirectional=True), nn.LSTM(2, 3)):
        with pytest.raises(ConfigError, match="single-layer"):
            rnn_lag_decomposition(m, torch.randn(4, 1, 2), lambda o, h: o.sum())
    with pytest.raises(ConfigError, match="scalar"):
        rnn_lag_decomposition(nn.RNN(2, 3), torch.randn(4, 1, 2), lambda o, h: o)
