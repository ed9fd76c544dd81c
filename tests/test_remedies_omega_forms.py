"""Both forms of Pascanu's Ω (the authors' RNN.py and the paper's printed formula) against a brute-force
float64 computation with explicit Jacobian matrices.

Oracle, independent of gradprobe's hooks, BPTT and vector-Jacobian products: the RNN is unrolled by hand,
δ_k = ∂E/∂h_k comes from torch.autograd.grad on the retained states, each step Jacobian
J_{k+1} = ∂h_{k+1}/∂h_k is built as a full matrix by torch.func.jacrev, and v = δ_{k+1} J_{k+1} is a
matrix product. ∂Ω/∂W uses J(W) = D_{k+1} W with D_{k+1} = jacrev(φ)(a_{k+1}) held constant (the
paper's immediate derivative), checked to equal the jacrev Jacobian at W. Tolerance 1e-10 relative
(the two paths differ by summation order only)."""
import pytest
import torch
from torch import nn
from torch.func import jacrev

from gradprobe.errors import ConfigError
from gradprobe.remedies import PascanuRegularizer, pascanu_omega, pascanu_vjp

F64 = torch.float64
T, B, I, H = 10, 4, 3, 6


def _omega_brute(deltas, jac_of_w, W, form):
    """Ω(W) from explicit matrices: deltas[k] (B, N) = δ_{k+1}; jac_of_w(k, b, W) the (N, N) matrix J_{k+1}."""
    Wv = W.detach().clone().requires_grad_(True)
    total, n = 0.0, 0
    for k, d in enumerate(deltas):
        for b in range(d.shape[0]):
            den = float(d[b] @ d[b])
            if den < 1e-20:
                continue
            v = d[b] @ jac_of_w(k, b, Wv)
            if form == "code":
                total = total + ((v @ v) / den - 1.0) ** 2
            else:
                total = total + (torch.sqrt(v @ v) / den**0.5 - 1.0) ** 2
            n += 1
    omega = total / (n if form == "code" else deltas[0].shape[0])
    (grad,) = torch.autograd.grad(omega, Wv)
    return float(omega.detach()), grad, n


@pytest.mark.parametrize("form", ["code", "paper"])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_nn_rnn_both_forms_equal_explicit_jacobian_products(form, nonlinearity):
    torch.manual_seed(3)
    rnn = nn.RNN(I, H, nonlinearity=nonlinearity).double()
    with torch.no_grad():
        rnn.weight_hh_l0.mul_(1.7)
    g = torch.Generator().manual_seed(4)
    u = torch.randn(T, B, I, generator=g, dtype=F64)
    c = torch.randn(T, B, H, generator=g, dtype=F64)
    W, W_ih, b = rnn.weight_hh_l0, rnn.weight_ih_l0, rnn.bias_ih_l0 + rnn.bias_hh_l0
    act = torch.tanh if nonlinearity == "tanh" else torch.relu

    # oracle: hand-unrolled states, autograd δ, explicit Jacobians
    h0 = torch.zeros(B, H, dtype=F64)
    hs, pre, h = [], [], h0
    for t in range(T):
        a = u[t] @ W_ih.T + b + h @ W.T
        h = act(a)
        pre.append(a.detach())
        hs.append(h)
    loss = (torch.stack(hs) * c).sum() + torch.stack(hs).pow(2).sum() * 0.3
    deltas = [d.detach() for d in torch.autograd.grad(loss, hs)]
    h_prev = [h0] + [x.detach() for x in hs[:-1]]
    D = [[jacrev(act)(pre[k][bb]) for bb in range(B)] for k in range(T)]  # (H, H) diagonal matrices
    for k in (0, T // 2, T - 1):  # D·W is the Jacobian of the step map at W
        for bb in range(B):
            step = lambda hp, k=k, bb=bb: act(u[k, bb] @ W_ih.T + b + W @ hp)  # noqa: E731
            torch.testing.assert_close(D[k][bb] @ W, jacrev(step)(h_prev[k][bb]), rtol=1e-13, atol=1e-15)
    om_ref, grad_ref, n_ref = _omega_brute(deltas, lambda k, bb, Wv: D[k][bb] @ Wv, W, form)

    rnn.zero_grad()
    with PascanuRegularizer(rnn, form=form) as reg:
        out, _ = rnn(u)
        ((out * c).sum() + out.pow(2).sum() * 0.3).backward()
        rnn.zero_grad()
        omega = reg.penalty()
        omega.backward()
    assert reg.last_n_valid == n_ref
    assert float(omega.detach()) == pytest.approx(om_ref, rel=1e-10)
    torch.testing.assert_close(rnn.weight_hh_l0.grad, grad_ref, rtol=1e-10, atol=1e-12 * float(grad_ref.abs().max()))


@pytest.mark.parametrize("form", ["code", "paper"])
def test_custom_recurrence_both_forms_equal_explicit_jacobian_products(form):
    """x_{k+1} = W σ(x_k) + W_in u_{k+1} (Pascanu et al. 2013, §2), sigmoid, through for_recurrence."""
    g = torch.Generator().manual_seed(5)
    N = 5
    W = nn.Parameter(torch.randn(N, N, generator=g, dtype=F64) * 1.5)
    W_in = torch.randn(N, 2, generator=g, dtype=F64)
    u = torch.randn(T, B, 2, generator=g, dtype=F64)
    reg = PascanuRegularizer.for_recurrence(W, pascanu_vjp("sigmoid"), form=form)
    xs = [torch.zeros(B, N, dtype=F64)]
    for t in range(T):
        xs.append(torch.sigmoid(xs[-1]) @ W.T + u[t] @ W_in.T)
    reg.record(xs)
    E = sum((x.sin() * (k + 1)).sum() for k, x in enumerate(xs[1:]))
    deltas = [d.detach() for d in torch.autograd.grad(E, xs[1:], retain_graph=True)]
    E.backward()
    W.grad = None
    omega = reg.penalty()
    omega.backward()

    prev = [x.detach() for x in xs[:-1]]
    Dg = [[jacrev(torch.sigmoid)(prev[k][bb]) for bb in range(B)] for k in range(T)]
    step = lambda xp: W.detach() @ torch.sigmoid(xp)  # noqa: E731  (the input term does not depend on x_k)
    torch.testing.assert_close(W.detach() @ Dg[3][1], jacrev(step)(prev[3][1]), rtol=1e-13, atol=1e-15)
    om_ref, grad_ref, _ = _omega_brute(deltas, lambda k, bb, Wv: Wv @ Dg[k][bb], W, form)
    assert float(omega.detach()) == pytest.approx(om_ref, rel=1e-10)
    torch.testing.assert_close(W.grad, grad_ref, rtol=1e-10, atol=1e-12 * float(grad_ref.abs().max()))


def test_the_two_forms_differ_and_scale_differently_with_length():
    # one linear map W = 2I: r = ‖δW‖/‖δ‖ = 2 at every step; code (r² − 1)² = 9 (mean), paper (r − 1)² = 1 per step
    W = 2.0 * torch.eye(3, dtype=F64)
    for steps in (1, 5, 40):
        d = torch.randn(steps, 2, 3, dtype=F64)
        assert float(pascanu_omega(W, d, d, d, pascanu_vjp("linear"))) == pytest.approx(9.0, rel=1e-14)
        assert float(pascanu_omega(W, d, d, d, pascanu_vjp("linear"), form="paper")) == pytest.approx(steps, rel=1e-14)


def test_form_is_checked():
    with pytest.raises(ConfigError, match="form='eq15'.*'code'.*'paper'"):
        PascanuRegularizer(nn.RNN(2, 3), form="eq15")
    W = torch.eye(2)
    d = torch.ones(1, 1, 2)
    with pytest.raises(ConfigError, match="form"):
        pascanu_omega(W, d, d, d, pascanu_vjp("linear"), form="sum")
