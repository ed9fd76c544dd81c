"""functional.rnn: step Jacobians, BPTT and leaky units against autograd in float64; layer_outputs against
the fused module; the old probe.unroll location warns."""
import importlib

import pytest
import torch
from torch import nn
from torch.func import jacrev

from gradprobe.errors import ConfigError
from gradprobe.functional.activations import activation
from gradprobe.functional.rnn import (
    bptt,
    layer_outputs,
    leaky_jacobian,
    leaky_recurrence,
    step_jacobian,
    step_vjp,
    unrolled_forward,
)

F64 = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", ["tanh", "sigmoid", "relu"])
def test_step_jacobian_and_vjp_equal_autograd(name):
    act = activation(name)
    W = torch.randn(5, 5, generator=gen(0), dtype=F64)
    u = torch.randn(5, generator=gen(1), dtype=F64)
    s = torch.randn(3, 5, generator=gen(2), dtype=F64)

    def h_step(h):  # h' = φ(W h + u)
        return act.fn(W @ h + u)

    def x_step(x):  # x' = W σ(x) + u
        return W @ act.fn(x) + u

    for i in range(3):
        J_h = jacrev(h_step)(s[i])
        J_x = jacrev(x_step)(s[i])
        torch.testing.assert_close(step_jacobian(W, act.grad(W @ s[i] + u), "h"), J_h, rtol=1e-13, atol=1e-15)
        torch.testing.assert_close(step_jacobian(W, act.grad(s[i]), "x"), J_x, rtol=1e-13, atol=1e-15)
    # batched: (B, N) δ times the Jacobian of each row
    delta = torch.randn(3, 5, generator=gen(3), dtype=F64)
    dphi = act.grad(s)
    for form in ("h", "x"):
        J = step_jacobian(W, dphi, form)  # (3, 5, 5)
        ref = torch.einsum("bi,bij->bj", delta, J)
        torch.testing.assert_close(step_vjp(W, delta, dphi, form), ref, rtol=1e-13, atol=1e-15)
    with pytest.raises(ConfigError, match="form"):
        step_vjp(W, delta, dphi, "y")


@pytest.mark.parametrize("form", ["h", "x"])
def test_bptt_equals_autograd_through_the_loop(form):
    """δ_t = ∂E/∂s_t of an explicit loop with retained states, E using every state and a final-state term."""
    T, B, N = 9, 3, 4
    act = activation("tanh")
    W = torch.randn(N, N, generator=gen(4), dtype=F64) * 0.9
    u = torch.randn(T, B, N, generator=gen(5), dtype=F64)
    c = torch.randn(T, B, N, generator=gen(6), dtype=F64)
    s = torch.randn(B, N, generator=gen(7), dtype=F64).requires_grad_(True)
    states = []
    for t in range(T):
        s = act.fn(s @ W.T + u[t]) if form == "h" else act.fn(s) @ W.T + u[t]
        states.append(s)
    S = torch.stack(states)
    # E = Σ_t <c_t, s_t²> + Σ sin(s_T): direct gradient g_t = 2 c_t s_t, plus cos(s_T) on the last state
    E = (c * S**2).sum() + states[-1].sin().sum()
    total = torch.autograd.grad(E, states)
    with torch.no_grad():
        g = 2 * c * S
        dphi = act.grad_from_output(S) if form == "h" else act.grad(S)
        deltas = bptt(W, g, dphi, states[-1].cos(), form)
    torch.testing.assert_close(deltas, torch.stack(total), rtol=1e-12, atol=1e-14)
    with pytest.raises(ConfigError, match="one shape"):
        bptt(W, g, dphi[1:])


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_layer_outputs_are_the_stacked_layers(cell, batch_first):
    torch.manual_seed(0)
    kw = dict(num_layers=3, bidirectional=True, batch_first=batch_first)
    m = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}[cell](3, 4, **kw).double()
    x = torch.randn(2, 6, 3, dtype=F64) if batch_first else torch.randn(6, 2, 3, dtype=F64)
    outs = layer_outputs(m, x)
    assert len(outs) == 3 and all(o.shape == (6, 2, 8) for o in outs)
    ref = m(x)[0]
    torch.testing.assert_close(outs[-1], ref.transpose(0, 1) if batch_first else ref, rtol=1e-12, atol=1e-13)
    # layer l's output is what a one-layer copy of layer l+1 receives: rebuild layer 1 alone from layer 0's output
    one = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}[cell](8, 4, bidirectional=True).double()
    with torch.no_grad():
        for name, p in one.named_parameters():
            p.copy_(getattr(m, name.replace("_l0", "_l1")))
    torch.testing.assert_close(layer_outputs(one, outs[0])[0], outs[1], rtol=1e-12, atol=1e-13)
    assert len(layer_outputs(m, x, layers=1)) == 1
    with pytest.raises(ConfigError):
        layer_outputs(m, x, layers=4)


def test_layer_outputs_unbatched_with_initial_state():
    torch.manual_seed(1)
    m = nn.RNN(3, 4, num_layers=2).double()
    x, h0 = torch.randn(5, 3, dtype=F64), torch.randn(2, 4, dtype=F64)
    lower, top = layer_outputs(m, x, h0)
    assert top.shape == (5, 1, 4)
    torch.testing.assert_close(top[:, 0], m(x, h0)[0], rtol=1e-12, atol=1e-13)


def test_leaky_recurrence_and_jacobian():
    T, B, H, alpha = 7, 2, 5, 0.3
    W = torch.randn(H, H, generator=gen(8), dtype=F64)
    drive = torch.randn(T, B, H, generator=gen(9), dtype=F64)
    h0 = torch.randn(B, H, generator=gen(10), dtype=F64)
    states, last = leaky_recurrence(drive, W, alpha, torch.tanh, h0)
    h = h0
    for t in range(T):  # the defining equation, written out
        h = (1 - alpha) * h + alpha * torch.tanh(drive[t] + h @ W.T)
        torch.testing.assert_close(states[t], h, rtol=1e-13, atol=1e-15)
    assert torch.equal(last, states[-1])
    z = drive[0] + h0 @ W.T
    auto = torch.stack([jacrev(lambda hp, d=drive[0, i]: (1 - alpha) * hp + alpha * torch.tanh(d + W @ hp))(h0[i])
                        for i in range(B)])
    torch.testing.assert_close(leaky_jacobian(W, activation("tanh").grad(z), alpha), auto, rtol=1e-13, atol=1e-15)


def test_probe_unroll_location_warns_and_forwards():
    old = importlib.import_module("gradprobe.probe.unroll")
    with pytest.warns(DeprecationWarning, match="gradprobe.functional.rnn"):
        fn = old.unrolled_forward
    assert fn is unrolled_forward
    with pytest.raises(AttributeError):
        old.no_such_name
    # importing it does not warn: tests/test_deprecated_names.py::test_importing_the_packages_does_not_warn


def test_lag_by_lag_propagation_sums_to_bptt():
    """analysis.temporal's lag decomposition runs step_vjp on every k at once, one lag per iteration:
    D_0 = g, D_{j+1}[k] = step_vjp(D_j[k+1]); Σ_j D_j[k] (aligned at k) is bptt's total δ_k."""
    T, B, N = 8, 2, 3
    act = activation("tanh")
    W = torch.randn(N, N, generator=gen(11), dtype=F64)
    h = act.fn(torch.randn(T, B, N, generator=gen(12), dtype=F64))
    g = torch.randn(T, B, N, generator=gen(13), dtype=F64)
    dphi = act.grad_from_output(h)
    total, D = g.clone(), g
    for j in range(T - 1):
        D = step_vjp(W, D[1:], dphi[1 : T - j], "h")  # (T−j−1, B, N): sources k + j + 1 reaching k
        total[: T - j - 1] += D
    torch.testing.assert_close(total, bptt(W, g, dphi), rtol=1e-12, atol=1e-14)
