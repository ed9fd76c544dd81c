"""Pascanu's Ω against a direct float64 implementation of eq. 9/10 on an explicitly unrolled RNN.

Oracle: ∂E/∂h_k by torch.autograd.grad on an unrolled loop with retained states (independent of the
regulariser's hooks + BPTT recursion), then Ω and ∂Ω/∂W by the closed form in numpy:
v = (δ ⊙ φ') W, r = ‖v‖²/‖δ‖², Ω = mean_valid (r − 1)², ∂Ω/∂W = mean_valid 2(r − 1)·2 u vᵀ/‖δ‖² (u = δ ⊙ φ').
Everything is float64; tolerance 1e-10 (the two paths differ only by summation order, ~1e-15 relative).
"""
import math

import numpy as np
import pytest
import torch
from torch import nn

from gradprobe.errors import ConfigError, ProbeStateError
from gradprobe.remedies import PascanuRegularizer, clip_grad_norm_, pascanu_vjp

T, B, I, H = 12, 5, 3, 7


def _rnn(nonlinearity, batch_first, seed=0):
    torch.manual_seed(seed)
    rnn = nn.RNN(I, H, nonlinearity=nonlinearity, batch_first=batch_first).double()
    with torch.no_grad():
        rnn.weight_hh_l0.mul_(2.0)  # away from the trivial regime: ratios far from 1
    return rnn


def _unrolled(rnn, u, h0):
    """h_t = φ(W_ih u_t + b_ih + W_hh h_{t−1} + b_hh), time-major u (T, B, I); returns [h_1 … h_T]."""
    act = torch.tanh if rnn.nonlinearity == "tanh" else torch.relu
    hs, h = [], h0
    for t in range(u.shape[0]):
        h = act(u[t] @ rnn.weight_ih_l0.T + rnn.bias_ih_l0 + h @ rnn.weight_hh_l0.T + rnn.bias_hh_l0)
        hs.append(h)
    return hs


def _loss(out_tm, h_last, c, use_last, cut):
    """A loss using the output sequence (steps < cut only) and optionally the final state."""
    loss = (out_tm[:cut] * c[:cut]).sum() + (out_tm[:cut] ** 2).sum() * 0.1
    if use_last:
        loss = loss + (h_last.sin() * c[0]).sum()
    return loss


def _oracle(W, deltas, hs, dphi, bound=1e-20):
    W = W.detach().numpy()
    tot, grad, n = 0.0, np.zeros_like(W), 0
    for d, h in zip(deltas, hs):
        for b in range(d.shape[0]):
            delta = d[b].detach().numpy()
            den = float(delta @ delta)
            if den < bound:
                continue
            u = delta * dphi(h[b].detach().numpy())
            v = u @ W
            r = float(v @ v) / den
            tot += (r - 1.0) ** 2
            grad += 2.0 * (r - 1.0) * 2.0 * np.outer(u, v) / den
            n += 1
    return tot / max(n, 1), grad / max(n, 1), n


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("use_last,cut", [(True, T), (False, T - 3), (True, T - 4)])
def test_fused_rnn_matches_unrolled_oracle(nonlinearity, batch_first, use_last, cut):
    rnn = _rnn(nonlinearity, batch_first)
    g = torch.Generator().manual_seed(1)
    u = torch.randn(T, B, I, generator=g, dtype=torch.float64)
    c = torch.randn(T, B, H, generator=g, dtype=torch.float64)
    h0 = torch.randn(1, B, H, generator=g, dtype=torch.float64) * 0.5

    # oracle: unrolled loop, autograd for the total ∂E/∂h_k
    hs = _unrolled(rnn, u, h0[0])
    loss = _loss(torch.stack(hs), hs[-1], c, use_last, cut)
    deltas = torch.autograd.grad(loss, hs)
    dphi = (lambda h: 1.0 - h * h) if nonlinearity == "tanh" else (lambda h: (h > 0).astype(float))
    om_ref, grad_ref, n_ref = _oracle(rnn.weight_hh_l0, deltas, hs, dphi)

    # regulariser on the fused module
    reg = PascanuRegularizer(rnn)
    x = u.transpose(0, 1) if batch_first else u
    out, h_n = rnn(x, h0)
    out_tm = out.transpose(0, 1) if batch_first else out
    # fused forward equals the unrolled one (same parameters)
    torch.testing.assert_close(out_tm, torch.stack(hs).detach(), rtol=1e-12, atol=1e-12)
    _loss(out_tm, h_n[0], c, use_last, cut).backward()
    grads_before = {n: p.grad.clone() for n, p in rnn.named_parameters()}
    omega = reg.penalty()
    assert reg.last_n_valid == n_ref
    if not use_last:
        assert n_ref == cut * B  # the last T − cut steps got no gradient and were skipped
    assert float(omega.detach()) == pytest.approx(om_ref, rel=1e-10, abs=1e-12)
    omega.backward()
    dW = (rnn.weight_hh_l0.grad - grads_before["weight_hh_l0"]).numpy()
    np.testing.assert_allclose(dW, grad_ref, rtol=1e-10, atol=1e-12 * np.abs(grad_ref).max())
    # immediate derivative: nothing but W_hh receives gradient
    for name, p in rnn.named_parameters():
        if name != "weight_hh_l0":
            assert torch.equal(p.grad, grads_before[name]), name
    reg.close()
    assert not rnn._forward_hooks


def test_unbatched_input_and_accumulation():
    rnn = _rnn("tanh", False)
    g = torch.Generator().manual_seed(2)
    us = [torch.randn(T, I, generator=g, dtype=torch.float64) for _ in range(2)]
    tot, gsum, n = 0.0, 0.0, 0
    for u in us:  # oracle per sequence, then pooled: Ω = Σ terms / Σ valid
        hs = _unrolled(rnn, u.unsqueeze(1), torch.zeros(1, H, dtype=torch.float64))
        deltas = torch.autograd.grad(torch.stack(hs).pow(2).sum(), hs)
        om, gr, k = _oracle(rnn.weight_hh_l0, deltas, hs, lambda h: 1.0 - h * h)
        tot, gsum, n = tot + om * k, gsum + gr * k, n + k
    with PascanuRegularizer(rnn) as reg:
        for u in us:  # gradient accumulation: two forward/backward passes, one penalty
            out, _ = rnn(u)
            out.pow(2).sum().backward()
        rnn.zero_grad()
        omega = reg.penalty()
        omega.backward()
    assert reg.last_n_valid == n == 2 * T
    assert float(omega.detach()) == pytest.approx(tot / n, rel=1e-10)
    np.testing.assert_allclose(rnn.weight_hh_l0.grad.numpy(), gsum / n, rtol=1e-10, atol=1e-14)


def test_custom_recurrence_pascanu_form():
    """x_{k+1} = W σ(x_k) + W_in u + b (the seeds' form) through for_recurrence + record."""
    torch.manual_seed(3)
    N = 6
    W = nn.Parameter(torch.randn(N, N, dtype=torch.float64) * 1.5)
    W_in = nn.Parameter(torch.randn(N, 2, dtype=torch.float64))
    u = torch.randn(T, B, 2, dtype=torch.float64)
    reg = PascanuRegularizer.for_recurrence(W, pascanu_vjp("sigmoid"))
    xs = [torch.full((B, N), 0.5, dtype=torch.float64)]
    for t in range(T):
        xs.append(torch.sigmoid(xs[-1]) @ W.T + u[t] @ W_in.T)
    reg.record(xs)
    loss = (torch.sigmoid(xs[-1]) - 0.7).pow(2).sum() + xs[T // 2].pow(2).sum() * 0.01
    deltas = torch.autograd.grad(loss, xs[1:], retain_graph=True)
    loss.backward()
    Wn = W.detach().numpy()
    tot, grad, n = 0.0, np.zeros_like(Wn), 0
    for k in range(T):  # direct formula: v = σ'(x_k) ⊙ Wᵀδ_{k+1}
        for b in range(B):
            d = deltas[k][b].numpy()
            s = torch.sigmoid(xs[k][b].detach()).numpy()
            s = s * (1 - s)
            v = (d @ Wn) * s
            den = d @ d
            r = (v @ v) / den
            tot += (r - 1) ** 2
            grad += 2 * (r - 1) * 2 * np.outer(d, v * s) / den
            n += 1
    W.grad = None
    omega = reg.penalty()
    omega.backward()
    assert reg.last_n_valid == n
    assert float(omega.detach()) == pytest.approx(tot / n, rel=1e-10)
    np.testing.assert_allclose(W.grad.numpy(), grad / n, rtol=1e-10, atol=1e-14)
    assert W_in.grad is not None  # from loss.backward(); untouched by Ω (checked above via W only)


def test_training_loop_with_clipping():
    """The documented loop: backward, penalty, (α Ω).backward, clip — the norm includes ∂Ω/∂W_hh."""
    torch.manual_seed(4)
    rnn, head = nn.RNN(I, H).double(), nn.Linear(H, 1).double()
    params = list(rnn.parameters()) + list(head.parameters())
    opt = torch.optim.SGD(params, lr=0.01)
    reg = PascanuRegularizer(rnn)
    alpha = 2.0
    for _ in range(3):
        opt.zero_grad()
        out, _ = rnn(torch.randn(30, 4, I, dtype=torch.float64))
        head(out[-1]).pow(2).mean().backward()
        g_loss = rnn.weight_hh_l0.grad.clone()
        omega = reg.penalty()
        g_omega = torch.autograd.grad(alpha * omega, rnn.weight_hh_l0, retain_graph=True)[0]
        (alpha * omega).backward()
        torch.testing.assert_close(rnn.weight_hh_l0.grad, g_loss + g_omega, rtol=1e-14, atol=1e-16)
        expected = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in params))
        r = clip_grad_norm_(params, 1e-3)
        assert r.pre_norm == pytest.approx(expected, rel=1e-12)
        opt.step()
    reg.close()


def test_errors():
    deep = nn.RNN(3, 4, num_layers=2, dropout=0.5)
    with PascanuRegularizer(deep):
        with pytest.raises(ConfigError, match="dropout"):
            deep(torch.randn(5, 2, 3))  # training mode: dropout masks between layers are unobservable
        deep.eval()
        deep(torch.randn(5, 2, 3))  # fine in eval mode
    with pytest.raises(ConfigError):
        PascanuRegularizer(nn.Sequential(nn.RNN(3, 4), nn.RNN(4, 4)))
    with pytest.raises(ConfigError):
        PascanuRegularizer(nn.Linear(3, 4))
    model = nn.Sequential(nn.RNN(3, 4))  # one RNN inside a container is found
    reg = PascanuRegularizer(model)
    with pytest.raises(ProbeStateError):
        reg.penalty()  # nothing captured yet
    with torch.no_grad():
        model(torch.randn(5, 2, 3))  # no-grad forward: ignored
    with pytest.raises(ProbeStateError):
        reg.penalty()
    packed = nn.utils.rnn.pack_padded_sequence(torch.randn(5, 2, 3), [5, 3])
    with pytest.raises(ConfigError):
        model(packed)
    with pytest.raises(ConfigError):
        reg.record([torch.zeros(2, 4), torch.zeros(2, 4)])
    reg.close()
    with pytest.raises(ProbeStateError):
        reg.penalty()
    W = nn.Parameter(torch.eye(3))
    custom = PascanuRegularizer.for_recurrence(W, pascanu_vjp("tanh"))
    with pytest.raises(ConfigError):
        custom.record(torch.zeros(4, 2, 3))  # a stacked tensor: hooks would never fire
    with pytest.raises(ConfigError):
        PascanuRegularizer.for_recurrence(torch.zeros(3, 4, requires_grad=True), pascanu_vjp())


def test_descending_omega_restores_long_range_gradient():
    """What Ω is for (Pascanu et al. 2013 §3.3): on a vanishing tanh RNN (W_hh scaled 0.6, T = 40),
    gradient descent on Ω alone makes ‖∂E/∂h_1‖/‖∂E/∂h_T‖ (autograd on an unrolled copy) go from
    ~1e-19 to order 0.1. Measured: 1.1e-19 → 0.23 after 60 steps, Ω 0.79 → 0.040."""
    torch.manual_seed(0)
    T_, B_, H_ = 40, 16, 20
    rnn, head = nn.RNN(4, H_).double(), nn.Linear(H_, 1).double()
    with torch.no_grad():
        rnn.weight_hh_l0.mul_(0.6)
    x = torch.randn(T_, B_, 4, dtype=torch.float64)

    def ratio():
        hs = _unrolled(rnn, x, torch.zeros(B_, H_, dtype=torch.float64))
        d = torch.autograd.grad(head(hs[-1]).pow(2).mean(), hs)
        return float(d[0].norm() / d[-1].norm())

    before = ratio()
    reg = PascanuRegularizer(rnn)
    opt = torch.optim.SGD([rnn.weight_hh_l0], lr=0.05)
    omegas = []
    for _ in range(60):
        opt.zero_grad()
        out, _ = rnn(x)
        head(out[-1]).pow(2).mean().backward()
        rnn.weight_hh_l0.grad = None  # descend on Ω only
        reg.penalty().backward()
        omegas.append(reg.last_value)
        opt.step()
    reg.close()
    after = ratio()
    assert before < 1e-15
    assert after > 1e-2, after
    assert omegas[-1] < 0.1 * omegas[0]


def _unrolled_deep(rnn, u, h0):
    """Multi-layer (bi)directional RNN written out; returns (top outputs (T, B, D·H), h_n, {(l, d): [h_t]})."""
    act = torch.tanh if rnn.nonlinearity == "tanh" else torch.relu
    D = 2 if rnn.bidirectional else 1
    Tn = u.shape[0]
    inp, states = u, {}
    for layer in range(rnn.num_layers):
        outs = []
        for d in range(D):
            sfx = f"l{layer}" + ("_reverse" if d else "")
            w_ih, w_hh = getattr(rnn, "weight_ih_" + sfx), getattr(rnn, "weight_hh_" + sfx)
            b = getattr(rnn, "bias_ih_" + sfx) + getattr(rnn, "bias_hh_" + sfx)
            h, seq = h0[layer * D + d], [None] * Tn
            for t in (range(Tn - 1, -1, -1) if d else range(Tn)):
                h = act(inp[t] @ w_ih.T + h @ w_hh.T + b)
                seq[t] = h
            states[(layer, d)] = seq
            outs.append(torch.stack(seq))
        inp = torch.cat(outs, -1)
    h_n = torch.stack([states[(layer, d)][0 if d else -1] for layer in range(rnn.num_layers) for d in range(D)])
    return inp, h_n, states


@pytest.mark.parametrize(
    "layers,bidirectional,nonlinearity,batch_first",
    [(2, True, "tanh", True), (3, False, "relu", False), (1, True, "tanh", False), (2, False, "tanh", False)],
)
def test_multilayer_bidirectional_matches_unrolled_oracle(layers, bidirectional, nonlinearity, batch_first):
    torch.manual_seed(5)
    rnn = nn.RNN(I, H, num_layers=layers, bidirectional=bidirectional, nonlinearity=nonlinearity,
                 batch_first=batch_first).double()
    D = 2 if bidirectional else 1
    g = torch.Generator().manual_seed(6)
    u = torch.randn(T, B, I, generator=g, dtype=torch.float64)
    c = torch.randn(T, B, D * H, generator=g, dtype=torch.float64)
    h0 = torch.randn(layers * D, B, H, generator=g, dtype=torch.float64) * 0.5

    def loss_of(out_tm, h_n):  # uses outputs (only steps < T − 2) and every layer's final state
        return (out_tm[: T - 2] * c[: T - 2]).sum() + (h_n.sin() * c[0, :, :H]).sum()

    out_ref, hn_ref, states = _unrolled_deep(rnn, u, h0)
    keys = sorted(states)
    flat = [h for k in keys for h in states[k]]
    deltas = torch.autograd.grad(loss_of(out_ref, hn_ref), flat)
    dphi = (lambda h: 1.0 - h * h) if nonlinearity == "tanh" else (lambda h: (h > 0).astype(float))
    tot, n, grads = 0.0, 0, {}
    for i, (layer, d) in enumerate(keys):
        w = getattr(rnn, f"weight_hh_l{layer}" + ("_reverse" if d else ""))
        om, gr, k = _oracle(w, deltas[i * T : (i + 1) * T], states[(layer, d)], dphi)
        tot, n, grads[(layer, d)] = tot + om * k, n + k, gr * k

    with PascanuRegularizer(rnn) as reg:
        x = u.transpose(0, 1) if batch_first else u
        out, h_n = rnn(x, h0)
        out_tm = out.transpose(0, 1) if batch_first else out
        torch.testing.assert_close(out_tm, out_ref.detach(), rtol=1e-12, atol=1e-12)
        loss_of(out_tm, h_n).backward()
        rnn.zero_grad()
        omega = reg.penalty()
        omega.backward()
    assert reg.last_n_valid == n
    assert float(omega.detach()) == pytest.approx(tot / n, rel=1e-10)
    for (layer, d), gr in grads.items():
        w = getattr(rnn, f"weight_hh_l{layer}" + ("_reverse" if d else ""))
        np.testing.assert_allclose(w.grad.numpy(), gr / n, rtol=1e-10, atol=1e-12 * np.abs(gr / n).max())
    for name, p in rnn.named_parameters():
        if not name.startswith("weight_hh"):
            assert p.grad is None or float(p.grad.abs().max()) == 0.0, name


def test_unbatched_multilayer_equals_batch_of_one():
    torch.manual_seed(7)
    rnn = nn.RNN(I, H, num_layers=2, bidirectional=True).double()
    u = torch.randn(T, I, dtype=torch.float64)
    h0 = torch.randn(4, H, dtype=torch.float64)
    values = []
    with PascanuRegularizer(rnn) as reg:
        for x, hx in ((u, h0), (u.unsqueeze(1), h0.unsqueeze(1))):
            out, h_n = rnn(x, hx)
            (out.pow(2).sum() + h_n.sum()).backward()
            rnn.zero_grad()
            omega = reg.penalty()
            omega.backward()
            values.append((float(omega.detach()), reg.last_n_valid, rnn.weight_hh_l0_reverse.grad.clone()))
            rnn.zero_grad()
    assert values[0][1] == values[1][1] == 4 * T
    assert values[0][0] == pytest.approx(values[1][0], rel=1e-12)
    torch.testing.assert_close(values[0][2], values[1][2], rtol=1e-12, atol=1e-14)
