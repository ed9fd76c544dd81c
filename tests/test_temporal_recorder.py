"""TemporalRecorder against brute force: an explicitly unrolled float64 copy written here from the
documented cell equations, one sequence at a time (so packed sequences are simply truncated), with
every per-step state retained and ``torch.autograd.grad(E, h_k)`` giving the total gradient.

Tolerance rtol 1e-10 (relative to each series' largest value): both sides are float64 and differ
only in summation order (batching, folded biases), observed ≤ 1e-15 relative."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from gradprobe.analysis.temporal import TemporalFlow
from gradprobe.errors import ConfigError, ProbeStateError
from gradprobe.probe.temporal import TemporalRecorder, mark_state

RTOL = 1e-10


# ------------------------------------------------------------------------------ brute-force reference
def _cell(mode, m, l, d, x, h, c):
    sfx = f"_l{l}" + ("_reverse" if d else "")
    W, U = getattr(m, "weight_ih" + sfx), getattr(m, "weight_hh" + sfx)
    bi = getattr(m, "bias_ih" + sfx) if m.bias else None
    bh = getattr(m, "bias_hh" + sfx) if m.bias else None
    a, b = F.linear(x, W, bi), F.linear(h, U, bh)
    if mode == "RNN":
        return (torch.tanh(a + b) if m.nonlinearity == "tanh" else torch.relu(a + b)), None
    if mode == "GRU":
        H = m.hidden_size
        r = torch.sigmoid(a[:, :H] + b[:, :H])
        z = torch.sigmoid(a[:, H : 2 * H] + b[:, H : 2 * H])
        n = torch.tanh(a[:, 2 * H :] + r * b[:, 2 * H :])
        return (1 - z) * n + z * h, None
    i, f, g, o = (a + b).chunk(4, 1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    if m.proj_size:
        h = F.linear(h, getattr(m, "weight_hr" + sfx))
    return h, c


def brute_force(m, x, lengths, R, S):
    """Expected per_sequence (and cell) arrays for every (layer, direction): {(l, d): (hn[B,T], cn[B,T])}."""
    mode = "LSTM" if isinstance(m, nn.LSTM) else "GRU" if isinstance(m, nn.GRU) else "RNN"
    T, B = x.shape[0], x.shape[1]
    L, D = m.num_layers, 2 if m.bidirectional else 1
    H = m.hidden_size
    Ho = getattr(m, "proj_size", 0) or H
    states, E = [], 0.0
    for b in range(B):
        n = T if lengths is None else int(lengths[b])
        inp = [x[t, b : b + 1] for t in range(n)]
        for l in range(L):
            outs = []
            for d in range(D):
                h, c = torch.zeros(1, Ho, dtype=x.dtype), torch.zeros(1, H, dtype=x.dtype)
                out = [None] * n
                for t in range(n) if d == 0 else reversed(range(n)):
                    h, c_new = _cell(mode, m, l, d, inp[t], h, c)
                    states.append((l, d, b, t, "h", h))
                    if c_new is not None:
                        c = c_new
                        states.append((l, d, b, t, "c", c))
                    out[t] = h
                E = E + (h * S[l * D + d, b]).sum() + (c * c).sum() * S[l * D + d, b, 0]
                outs.append(out)
            inp = [torch.cat([o[t] for o in outs], 1) for t in range(n)]
        E = E + sum((torch.tanh(inp[t]) * R[t, b]).sum() for t in range(n))
    grads = torch.autograd.grad(E, [s[-1] for s in states])
    exp = {}
    for (l, d, b, t, kind, _), g in zip(states, grads):
        arr = exp.setdefault((l, d, kind), np.zeros((B, T)))
        arr[b, t] = float(g.norm())
    return exp


def recorded(m, x, lengths, R, S, batch_first):
    """Run the module under a recorder with the same loss as brute_force."""
    xin = x.transpose(0, 1) if batch_first else x
    if lengths is not None:
        xin = pack_padded_sequence(xin, lengths, batch_first=batch_first, enforce_sorted=False)
    with TemporalRecorder(m) as rec:
        out, hx = m(xin)
        if lengths is not None:
            out, _ = pad_packed_sequence(out, batch_first=batch_first, total_length=x.shape[0])
        if batch_first:
            out = out.transpose(0, 1)
        h_n, c_n = hx if isinstance(m, nn.LSTM) else (hx, torch.zeros(1))
        E = (torch.tanh(out) * R).sum() + (h_n * S).sum()
        if isinstance(m, nn.LSTM):
            E = E + ((c_n * c_n).sum(-1) * S[..., 0]).sum()
        E.backward()
        return rec.flows()


CASES = [
    # (cell factory, num_layers, bidirectional, batch_first, packed)
    *[(c, 1, False, False, False) for c in ("rnn", "relu", "lstm", "gru")],
    *[(c, 2, True, True, False) for c in ("rnn", "relu", "lstm", "gru", "lstm_proj")],
    *[(c, 2, True, False, True) for c in ("rnn", "lstm", "gru")],
]


def _module(cell, **kw):
    return {
        "rnn": lambda: nn.RNN(3, 5, **kw),
        "relu": lambda: nn.RNN(3, 5, nonlinearity="relu", **kw),
        "lstm": lambda: nn.LSTM(3, 5, **kw),
        "lstm_proj": lambda: nn.LSTM(3, 5, proj_size=3, **kw),
        "gru": lambda: nn.GRU(3, 5, **kw),
    }[cell]().double()


@pytest.mark.parametrize("cell,num_layers,bidirectional,batch_first,packed", CASES)
def test_recorded_norms_equal_brute_force(cell, num_layers, bidirectional, batch_first, packed):
    torch.manual_seed(0)
    m = _module(cell, num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first)
    T, B = 7, 3
    D = 2 if bidirectional else 1
    Ho = m.proj_size if getattr(m, "proj_size", 0) else m.hidden_size
    x = torch.randn(T, B, 3, dtype=torch.float64)
    R = torch.randn(T, B, D * Ho, dtype=torch.float64)
    S = torch.randn(num_layers * D, B, Ho, dtype=torch.float64)
    lengths = torch.tensor([4, 7, 2]) if packed else None
    exp = brute_force(m, x, lengths, R, S)
    flows = recorded(m, x, lengths, R, S, batch_first)
    name = type(m).__name__
    expected_keys = {f"{name}.l{l}" + (".reverse" if d else "") for l in range(num_layers) for d in range(D)}
    assert set(flows) == expected_keys
    for (l, d, kind), want in exp.items():
        flow = flows[f"{name}.l{l}" + (".reverse" if d else "")]
        assert isinstance(flow, TemporalFlow) and flow.reverse == bool(d)
        got = flow.per_sequence if kind == "h" else flow.cell_per_sequence
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * want.max())
        assert want.min() >= 0 and want[:, 0].min() > 0  # the oracle is not trivially zero
        if packed:
            np.testing.assert_array_equal(flow.lengths, lengths.numpy())
        # batch norm = norm over (B, H) of ∂E/∂h_k
        batch_norm = flow.grad_norm if kind == "h" else flow.cell_norm
        np.testing.assert_allclose(batch_norm, np.sqrt((want**2).sum(0)), rtol=RTOL)
    if cell.startswith("lstm"):
        assert all(f.cell_per_sequence is not None for f in flows.values())
    else:
        assert all(f.cell_per_sequence is None and f.cell_norm is None for f in flows.values())


def test_parameter_gradients_unchanged_and_model_restored():
    torch.manual_seed(1)
    model = nn.ModuleDict({"enc": nn.LSTM(3, 6, num_layers=2, bidirectional=True), "head": nn.Linear(12, 1)}).double()
    x = torch.randn(9, 4, 3, dtype=torch.float64)

    def step():
        model.zero_grad()
        out, _ = model["enc"](x)
        model["head"](out[-1]).pow(2).sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = step()
    dict_before = {n: dict(vars(m)) for n, m in model.named_modules()}
    rec = TemporalRecorder(model).install()
    assert "forward" in vars(model["enc"])
    measured = step()
    flows = rec.flows()
    rec.remove()
    assert sorted(flows) == ["enc.l0", "enc.l0.reverse", "enc.l1", "enc.l1.reverse"]
    for a, b in zip(measured, plain):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for n, m in model.named_modules():
        assert vars(m).keys() == dict_before[n].keys()
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
    rec.remove()  # idempotent


def test_user_forward_override_is_restored():
    rnn = nn.RNN(2, 3)
    custom = rnn.forward  # a bound method stored as an instance attribute by the user
    object.__setattr__(rnn, "forward", custom)
    with TemporalRecorder(rnn):
        assert vars(rnn)["forward"] is not custom
    assert vars(rnn)["forward"] is custom


def test_no_grad_uses_fused_path_and_records_nothing():
    rnn = nn.GRU(2, 3)
    with TemporalRecorder(rnn) as rec:
        with torch.no_grad():
            rnn(torch.randn(4, 1, 2))
        assert rec.flows() == {}
        rec.arm(False)
        out, _ = rnn(torch.randn(4, 1, 2))
        out.sum().backward()
        assert rec.flows() == {}


def test_reset_and_repeated_calls():
    torch.manual_seed(2)
    rnn = nn.RNN(2, 3).double()
    x = torch.randn(5, 2, 2, dtype=torch.float64)
    with TemporalRecorder(rnn) as rec:
        a, _ = rnn(x)
        b, _ = rnn(x)
        (a[-1].sum() + 2 * b[-1].sum()).backward()
        flows = rec.flows()
        assert sorted(flows) == ["RNN.l0", "RNN.l0#2"]
        # same input and weights: the second call's gradients are exactly twice the first's
        np.testing.assert_allclose(flows["RNN.l0#2"].per_sequence, 2 * flows["RNN.l0"].per_sequence, rtol=1e-14)
        rec.reset()
        assert rec.flows() == {}
        c, _ = rnn(x)
        c[-1].sum().backward()
        assert sorted(rec.flows()) == ["RNN.l0"]


def test_install_twice_is_an_error():
    rec = TemporalRecorder(nn.RNN(2, 3)).install()
    with pytest.raises(ProbeStateError):
        rec.install()
    rec.remove()


def test_model_without_recurrence_is_fine_and_non_module_rejected():
    with TemporalRecorder(nn.Linear(2, 2)) as rec:
        assert rec.flows() == {}
    with pytest.raises(ConfigError):
        TemporalRecorder(lambda x: x)


# ------------------------------------------------------------------------------ hand-written cells
def test_mark_state_is_identity_without_recorder():
    h = torch.randn(2, 3, requires_grad=True) * 1.0
    assert mark_state(h, "x", 0) is h
    assert h._backward_hooks is None


def test_mark_state_total_gradient_equals_autograd():
    torch.manual_seed(3)
    cell = nn.GRUCell(3, 4).double()
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    readout = torch.randn(4, dtype=torch.float64)

    def run(mark):
        h = torch.zeros(2, 4, dtype=torch.float64)
        hs = []
        for t in range(6):
            h = cell(x[t], h)
            if mark:
                h = mark_state(h, "decoder", t)
            hs.append(h)
        E = sum((torch.tanh(hh) @ readout).sum() for hh in hs[::2])  # loss at even steps only
        return E, hs

    E, hs = run(mark=False)
    grads = torch.autograd.grad(E, hs, allow_unused=True)  # the last state is unused: no gradient
    want = np.stack([np.zeros(2) if g is None else g.norm(dim=1).numpy() for g in grads], 1)  # (B, T)
    assert want[:, -1].max() == 0 and want[:, :-1].min() > 0
    with TemporalRecorder(cell) as rec:
        E, _ = run(mark=True)
        E.backward()
        flow = rec.flows()["decoder"]
    np.testing.assert_allclose(flow.per_sequence, want, rtol=RTOL, atol=0)
    assert flow.cell_per_sequence is None


def test_mark_state_new_series_on_second_loop_and_bad_kind():
    cell = nn.RNNCell(2, 2)
    with TemporalRecorder(cell) as rec:
        for _ in range(2):
            h = torch.zeros(1, 2)
            for t in range(3):
                h = mark_state(cell(torch.ones(1, 2), h), "loop", t)
            h.sum().backward()
        assert sorted(rec.flows()) == ["loop", "loop#2"]
        with pytest.raises(ConfigError, match="kind"):
            mark_state(cell(torch.ones(1, 2), h), "loop", 0, kind="z")


def test_linear_orthogonal_rnn_closed_form():
    """h_t = α·Q h_{t−1} + U x_t, loss at the last step: ‖∂E/∂h_k‖ = α^(T−1−k)·‖∂E/∂h_{T−1}‖ (seed 003 eq. 7
    with σ' = 1 and Qᵀ norm-preserving), so the fitted decay is ln α and the horizon ⌊ln f / ln α⌋."""
    torch.manual_seed(4)
    T, B, H, alpha = 40, 3, 6, 0.8
    Q, _ = torch.linalg.qr(torch.randn(H, H, dtype=torch.float64))
    W = (alpha * Q).requires_grad_()
    U = torch.randn(H, 2, dtype=torch.float64)
    x = torch.randn(T, B, 2, dtype=torch.float64)
    with TemporalRecorder(nn.Module()) as rec:
        h = torch.zeros(B, H, dtype=torch.float64)
        for t in range(T):
            h = mark_state(h @ W.t() + x[t] @ U.t(), "lin", t)
        torch.tanh(h).sum().backward()
        flow = rec.flows()["lin"]
    g = flow.grad_norm
    k = np.arange(T)
    np.testing.assert_allclose(g, alpha ** (T - 1 - k) * g[-1], rtol=1e-10)
    np.testing.assert_allclose(flow.per_sequence, alpha ** (T - 1 - k) * flow.per_sequence[:, -1:], rtol=1e-10)
    assert abs(flow.decay_rate - math.log(alpha)) < 1e-10
    for f in (1e-1, 1e-2, 0.05):
        assert flow.horizon(f) == math.floor(math.log(f) / math.log(alpha))


def test_reverse_direction_propagates_forward_in_time():
    """A loss on the output at time 0 only: the reverse direction (which processes T−1 … 0) receives it
    at k = 0 and carries it toward later times; the forward direction gets gradient only at k = 0."""
    torch.manual_seed(5)
    rnn = nn.RNN(2, 4, bidirectional=True).double()
    x = torch.randn(8, 2, 2, dtype=torch.float64)
    with TemporalRecorder(rnn) as rec:
        out, _ = rnn(x)
        out[0].pow(2).sum().backward()
        flows = rec.flows()
    fwd, rev = flows["RNN.l0"], flows["RNN.l0.reverse"]
    assert fwd.grad_norm[0] > 0 and np.all(fwd.grad_norm[1:] == 0)
    assert np.all(rev.grad_norm > 0)
    np.testing.assert_array_equal(rev.steps_back(), rev.grad_norm)  # s steps back = time s
    np.testing.assert_array_equal(fwd.steps_back(), fwd.grad_norm[::-1])


def test_sorted_packed_sequences_report_lengths_and_zero_beyond():
    torch.manual_seed(6)
    lstm = nn.LSTM(2, 3).double()
    x = torch.randn(6, 3, 2, dtype=torch.float64)
    packed = pack_padded_sequence(x, torch.tensor([6, 4, 1]), enforce_sorted=True)
    with TemporalRecorder(lstm) as rec:
        out, _ = lstm(packed)
        out.data.pow(2).sum().backward()
        flow = rec.flows()["LSTM.l0"]
    np.testing.assert_array_equal(flow.lengths, [6, 4, 1])
    valid = np.arange(6)[None, :] < flow.lengths[:, None]
    assert np.all(flow.per_sequence[valid] > 0) and np.all(flow.per_sequence[~valid] == 0)
    assert np.all(flow.cell_per_sequence[valid] > 0) and np.all(flow.cell_per_sequence[~valid] == 0)
