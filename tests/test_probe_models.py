"""Every number the probe records equals a brute-force float64 twin, on many kinds of model.

Oracle: ``tests/reference/brute.py`` (one ``torch.autograd.grad`` per parameter and per layer output,
on an independent copy of the model). Tolerance: rtol 1e-10 in float64. The probe and the twin sum
the same squares in a different order, so they differ by a few ulps (≈1e-15 relative); 1e-10 leaves
room for that and for the different reduction kernels (``_foreach_norm`` vs ``pow(2).sum()``) but
catches any missing/extra/double-counted term, which changes a norm by far more than 1e-10.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from gradprobe import Probe
from reference.brute import brute_flow
from reference.models import RunsBackwards, TiedEmbedding

RTOL = 1e-10
DT = torch.float64


def _check(flow, twin, *, only_called_order=True):
    """Compare a LayerFlow with a BruteFlow layer by layer (NaN positions must agree too)."""
    names = list(flow.names)
    assert sorted(names) == sorted(twin.grad_norm), "probe and twin disagree on what the layers are"
    called = [n for n in names if flow.has_output[names.index(n)]]
    assert called == twin.order, "names must be in forward execution order"
    for q in ("grad_norm", "output_grad_norm", "activation_norm", "weight_norm"):
        want = np.array([getattr(twin, q)[n] for n in names])
        got = getattr(flow, q)
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=0, equal_nan=True, err_msg=q)
    np.testing.assert_array_equal(flow.has_grad, ~np.isnan(flow.grad_norm))
    np.testing.assert_array_equal(flow.has_output_grad, ~np.isnan(flow.output_grad_norm))


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def run_case(make_model, make_loss, steps=2, lr=0.1):
    """Probe ``steps`` SGD steps of a model and check each recorded step against the twin.

    ``make_loss(model) -> loss`` does the forward pass. The twin is a deep copy made before the
    probe opens (so it carries none of the probe's hooks) and is re-synchronised from the state dict
    before each step. ``update_ratio`` is checked from snapshots of the parameters:
    ‖θ_l(t) − θ_l(t−1)‖ / ‖θ_l(t−1)‖.
    """
    torch.manual_seed(0)
    model = make_model().to(DT)
    twin_model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    layers = {}
    flows = []
    with Probe(model, fetch_every=1) as probe:
        prev = None
        for s in range(steps):
            twin_model.load_state_dict(model.state_dict())
            twin = brute_flow(twin_model, lambda: make_loss(twin_model))
            opt.zero_grad(set_to_none=True)
            loss = make_loss(model)
            loss.backward()
            flow = probe.step(loss)
            assert flow.step == s
            assert flow.loss == pytest.approx(twin.loss, rel=1e-12)
            _check(flow, twin)
            layers = {n: m for n, m in _named_layers(model)}
            now = {n: [p.detach().clone() for p in m.parameters(recurse=False)] for n, m in layers.items()}
            if prev is None:
                assert np.isnan(flow.update_ratio).all()
            else:
                want = []
                for n in flow.names:
                    d = math.sqrt(sum(float((a - b).pow(2).sum()) for a, b in zip(now[n], prev[n])))
                    w = math.sqrt(sum(float(b.pow(2).sum()) for b in prev[n]))
                    want.append(d / w)
                np.testing.assert_allclose(flow.update_ratio, want, rtol=RTOL, err_msg="update_ratio")
            prev = now
            flows.append(flow)
            opt.step()
    return flows


def _named_layers(model):
    from reference.brute import layer_modules

    return layer_modules(model)


# ------------------------------------------------------------------ models
class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 3))

    def forward(self, x):
        return self.net(x)


def test_mlp():
    x, y = torch.randn(9, 5, dtype=DT), torch.randn(9, 3, dtype=DT)
    run_case(MLP, lambda m: nn.functional.mse_loss(m(x), y), steps=3)


class SkipCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(4)
        self.c1 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.down = nn.Conv2d(4, 6, 1, stride=2)  # projection skip
        self.c3 = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.head = nn.Linear(6, 3)

    def forward(self, x):  # (B, 2, 8, 8)
        h = torch.relu(self.bn0(self.stem(x)))
        h = torch.relu(h + self.bn2(self.c2(torch.relu(self.bn1(self.c1(h))))))  # identity skip
        h = torch.relu(self.c3(h) + self.down(h))  # (B, 6, 4, 4)
        return self.head(h.mean(dim=(2, 3)))


def test_cnn_with_skips_and_batchnorm():
    x, y = torch.randn(4, 2, 8, 8, dtype=DT), torch.randint(0, 3, (4,))
    run_case(SkipCNN, lambda m: nn.functional.cross_entropy(m(x), y))


class LSTMModel(nn.Module):
    """Uses the sequence output *and* h_n (c_n unused: its hook never fires, as in the twin)."""

    def __init__(self, cell=nn.LSTM):
        super().__init__()
        self.rnn = cell(3, 5, num_layers=2, batch_first=True)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        out, state = self.rnn(x)
        h = state[0] if isinstance(state, tuple) else state
        return self.head(out[:, -1]) + h[-1, :, :2]


def test_lstm_tuple_output():
    x, y = torch.randn(4, 6, 3, dtype=DT), torch.randn(4, 2, dtype=DT)
    flows = run_case(LSTMModel, lambda m: nn.functional.mse_loss(m(x), y))
    assert flows[0].names == ("rnn", "head")


@pytest.mark.parametrize("cell", [nn.GRU, nn.RNN])
def test_gru_and_rnn(cell):
    x, y = torch.randn(4, 6, 3, dtype=DT), torch.randn(4, 2, dtype=DT)
    run_case(lambda: LSTMModel(cell), lambda m: nn.functional.mse_loss(m(x), y))


class Unrolled(nn.Module):
    """An nn.LSTMCell called once per time step (T calls, tuple output (h, c) each time)."""

    def __init__(self):
        super().__init__()
        self.cell = nn.LSTMCell(3, 4)
        self.head = nn.Linear(4, 1)

    def forward(self, x):  # (T, B, 3)
        h = c = torch.zeros(x.shape[1], 4, dtype=x.dtype)
        for x_t in x:
            h, c = self.cell(x_t, (h, c))
        return self.head(h)


def test_unrolled_lstm_cell():
    x = torch.randn(5, 2, 3, dtype=DT)
    run_case(Unrolled, lambda m: m(x).pow(2).sum())


class PackedLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(3, 4)
        self.head = nn.Linear(4, 1)

    def forward(self, x, lengths):
        packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
        out, (h, c) = self.rnn(packed)  # out is a PackedSequence
        return self.head(h[-1]) + out.data.sum()


def test_packed_sequence_into_lstm():
    x, lengths = torch.randn(5, 3, 3, dtype=DT), torch.tensor([5, 2, 4])
    run_case(PackedLSTM, lambda m: m(x, lengths).pow(2).sum())


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 8)
        layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=12, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)).mean(1))


def test_transformer_encoder_and_uncalled_out_proj():
    x, y = torch.randn(3, 5, 3, dtype=DT), torch.randn(3, 2, dtype=DT)
    flows = run_case(Encoder, lambda m: nn.functional.mse_loss(m(x), y))
    f = flows[-1]
    # MultiheadAttention uses out_proj.weight directly, never calls out_proj: a layer with a
    # parameter gradient but no output; it is placed right after its attention module.
    i = f.index("encoder.layers.0.self_attn.out_proj")
    assert f.has_grad[i] and not f.has_output[i] and not f.has_output_grad[i]
    assert f.names[i - 1] == "encoder.layers.0.self_attn"
    assert np.isfinite(f.grad_norm[i]) and f.grad_norm[i] > 0


class Shared(nn.Module):
    """One Linear called twice per forward: its output norm is √(Σ_calls ‖·‖²)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 4)
        self.shared = nn.Linear(4, 4)
        self.alias = self.shared  # a second name for the same module: still one layer
        self.out = nn.Linear(4, 1)

    def forward(self, x):
        return self.out(self.alias(torch.tanh(self.shared(torch.tanh(self.inp(x))))))


def test_module_called_twice():
    x = torch.randn(6, 4, dtype=DT)
    flows = run_case(Shared, lambda m: m(x).pow(2).mean())
    assert flows[0].names == ("inp", "shared", "out")


class Frozen(nn.Module):
    def __init__(self, freeze):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)
        for name in freeze:
            for p in getattr(self, name).parameters():
                p.requires_grad_(False)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


@pytest.mark.parametrize("freeze", [("b",), ("a",), ("a", "b")])
def test_frozen_parameters(freeze):
    x = torch.randn(5, 3, dtype=DT)
    flows = run_case(lambda: Frozen(freeze), lambda m: m(x).pow(2).sum())
    f = flows[-1]
    for name in freeze:
        assert not f.has_grad[f.index(name)] and np.isnan(f.grad_norm[f.index(name)])
    if "a" in freeze:
        # the first layer's output does not require grad: ∂L/∂h is not observable (and the twin agrees)
        assert not f.has_output_grad[f.index("a")]
    if freeze == ("b",):
        # a frozen layer in the middle still passes (and reports) the signal
        assert f.has_output_grad[f.index("b")] and f.has_grad[f.index("a")]


class Unused(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.spare, self.c = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 1)

    def forward(self, x):
        return self.c(torch.relu(self.a(x)))


def test_parameter_unused_in_a_step():
    x = torch.randn(5, 3, dtype=DT)
    flows = run_case(Unused, lambda m: m(x).sum())
    f = flows[-1]
    i = f.index("spare")
    assert not f.has_grad[i] and np.isnan(f.grad_norm[i]) and np.isnan(f.output_grad_norm[i])
    assert f.weight_norm[i] > 0 and f.update_ratio[i] == 0.0  # SGD with grad None leaves it alone


class RegisteredBackwards(RunsBackwards):
    """Registration order c, b, a; execution order a, b, c."""

    def __init__(self):
        super().__init__(names=("a", "b", "c"), n_in=2, act=torch.sigmoid)


def test_forward_order_is_execution_order():
    x = torch.randn(5, 2, dtype=DT)
    flows = run_case(RegisteredBackwards, lambda m: m(x).pow(2).sum())
    f = flows[0]
    assert f.names == ("a", "b", "c")
    # backward rank: c is reached first by the backward pass, a last
    assert f.backward_rank.tolist() == [2, 1, 0]


class Chain(nn.Module):
    def __init__(self, inplace):
        super().__init__()
        self.l1, self.act, self.l2 = nn.Linear(3, 6), nn.ReLU(inplace=inplace), nn.Linear(6, 2)

    def forward(self, x):
        return self.l2(self.act(self.l1(x)))


def test_inplace_relu_after_linear_sees_true_output_gradient():
    """ReLU(inplace=True) overwrites l1's output. A tensor hook registered *before* the in-place op
    receives ∂L/∂(pre-ReLU tensor) (PyTorch ≥ 2.0 semantics), i.e. the true ∂L/∂(l1 output); the
    activation norm is taken in the forward hook, before the overwrite. The twin is built from an
    out-of-place copy with the same weights (autograd.grad on an in-place-modified tensor would give
    the post-ReLU gradient)."""
    x = torch.randn(7, 3, dtype=DT)
    torch.manual_seed(0)
    model = Chain(inplace=True).to(DT)
    twin_model = Chain(inplace=False).to(DT)
    twin_model.load_state_dict(model.state_dict())
    twin = brute_flow(twin_model, lambda: twin_model(x).pow(2).sum())
    with Probe(model, fetch_every=1) as probe:
        model(x).pow(2).sum().backward()
        flow = probe.step()
    _check(flow, twin)
    # and the in-place result differs from the post-ReLU gradient (else this test proves nothing)
    h = twin_model.l1(x)
    r = torch.relu(h)
    (g_post,) = torch.autograd.grad(twin_model.l2(r).pow(2).sum(), r)
    assert not math.isclose(float(g_post.norm()), flow.output_grad_norm[0], rel_tol=1e-6)


def test_every_recorded_number_in_float32_is_close():
    """Sanity in the default dtype: same oracle, float32 tolerance (~1e-5 relative)."""
    torch.manual_seed(1)
    model = MLP()
    twin_model = copy.deepcopy(model).to(DT)
    x = torch.randn(9, 5)
    twin = brute_flow(twin_model, lambda: twin_model(x.to(DT)).pow(2).mean())
    with Probe(model, fetch_every=1) as probe:
        model(x).pow(2).mean().backward()
        flow = probe.step()
    for q in ("grad_norm", "output_grad_norm", "activation_norm", "weight_norm"):
        want = [getattr(twin, q)[n] for n in flow.names]
        np.testing.assert_allclose(getattr(flow, q), want, rtol=1e-4, err_msg=q)


class Tied(TiedEmbedding):
    """Weight tying: the embedding matrix is also the output projection (two layers, one Parameter)."""

    def __init__(self):
        super().__init__(vocab=7, width=4, head="out")


def test_tied_weights():
    idx = torch.tensor([[1, 2, 3], [4, 5, 6]])
    flows = run_case(Tied, lambda m: m(idx).logsumexp(-1).sum())
    f = flows[-1]
    assert f.names == ("emb", "mid", "out")
    assert f.grad_norm[0] == f.grad_norm[2]  # the same (accumulated) .grad, reported for both owners


class Checkpointed(nn.Module):
    """``b`` is called twice inside an activation-checkpointed segment."""

    def __init__(self, mode):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 1)
        self.mode = mode  # None (no checkpoint), "reentrant" or "non_reentrant"

    def inner(self, h):
        return torch.tanh(self.b(torch.tanh(self.b(h))))

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if self.mode is None:
            h = self.inner(h)
        else:
            h = torch.utils.checkpoint.checkpoint(self.inner, h, use_reentrant=self.mode == "reentrant")
        return self.c(h)


@pytest.mark.parametrize("mode", ["non_reentrant", "reentrant"])
def test_activation_checkpointing_regression(mode):
    """Regression: checkpointing re-runs the forward during backward. Non-reentrant: the recomputed
    calls were measured again (‖h‖ of b came out √2× too large). Reentrant: the first forward runs
    under no_grad, so layers were ordered by their recomputation (a, c, b instead of a, b, c).
    Twin: the same weights without checkpointing."""
    torch.manual_seed(0)
    x = torch.randn(5, 3, dtype=DT)
    model = Checkpointed(mode).to(DT)
    twin_model = copy.deepcopy(model)
    twin_model.mode = None
    twin = brute_flow(twin_model, lambda: twin_model(x).pow(2).sum())
    with Probe(model, fetch_every=1) as probe:
        for _ in range(2):
            model.zero_grad()
            model(x).pow(2).sum().backward()
            flow = probe.step()
            assert flow.names == ("a", "b", "c")
            _check(flow, twin)


class SparseEmb(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4, sparse=True)  # sparse .grad with repeated indices
        self.head = nn.Linear(4, 1)

    def forward(self, idx):
        return self.head(torch.tanh(self.emb(idx)))


def test_sparse_embedding_gradient():
    idx = torch.tensor([[1, 2, 2, 3], [2, 2, 9, 1]])
    run_case(SparseEmb, lambda m: m(idx).pow(2).sum(), steps=3)


def test_huge_but_finite_float32_parameter_gradient_is_finite():
    """float32 squares overflow above ~1.8e19 per entry; the parameter-gradient norm is rechecked in
    float64 so a finite gradient is never reported as Inf. Oracle: the float64 norm of ``.grad``."""
    m = nn.Linear(3, 2)
    with Probe(m, fetch_every=1) as probe:
        (m(torch.ones(1, 3)) * 1e30).sum().backward()
        f = probe.step()
    want = float(torch.cat([p.grad.double().flatten() for p in m.parameters()]).norm())
    assert np.isfinite(f.grad_norm[0]) and f.grad_norm[0] == pytest.approx(want, rel=1e-7)
