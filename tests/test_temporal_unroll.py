"""The unrolled replica computes the fused module's function: outputs, final states and every
parameter gradient agree in float64 to rtol 1e-10 (observed ≤ 2e-15; the two differ only in
summation order, so the bound leaves 5 orders of magnitude of slack while still catching any
wrong gate order, bias placement, direction or packing bookkeeping, which give O(1) errors)."""
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from gradprobe.errors import ConfigError
from gradprobe.functional.rnn import unrolled_forward

RTOL, ATOL = 1e-10, 1e-12

CELLS = {
    "rnn_tanh": lambda **k: nn.RNN(3, 4, **k),
    "rnn_relu": lambda **k: nn.RNN(3, 4, nonlinearity="relu", **k),
    "lstm": lambda **k: nn.LSTM(3, 4, **k),
    "lstm_proj": lambda **k: nn.LSTM(3, 4, proj_size=2, **k),
    "gru": lambda **k: nn.GRU(3, 4, **k),
    "gru_nobias": lambda **k: nn.GRU(3, 4, bias=False, **k),
}
LENGTHS = torch.tensor([3, 5, 2])


def _tensors(obj):
    if isinstance(obj, PackedSequence):
        return [obj.data]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors(o)]
    return [obj]


def _run(module, fn, weights_seed=1):
    """Outputs and parameter gradients of a random linear functional of every output tensor."""
    module.zero_grad()
    outs = _tensors(fn())
    gen = torch.Generator().manual_seed(weights_seed)
    loss = sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() for o in outs)
    loss.backward()
    return [o.detach().clone() for o in outs], [p.grad.clone() for p in module.parameters()]


def _make_input(batch_first, packing):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((3, 5, 3) if batch_first else (5, 3, 3), generator=gen, dtype=torch.float64)
    if packing == "padded":
        return x
    if packing == "packed_unsorted":
        return pack_padded_sequence(x, LENGTHS, batch_first=batch_first, enforce_sorted=False)
    lengths, order = LENGTHS.sort(descending=True)
    x = x[order] if batch_first else x[:, order]
    return pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=True)


@pytest.mark.parametrize("packing", ["padded", "packed_unsorted", "packed_sorted"])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("cell", sorted(CELLS))
def test_unrolled_equals_fused(cell, num_layers, bidirectional, batch_first, packing):
    torch.manual_seed(0)
    m = CELLS[cell](num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first).double()
    x = _make_input(batch_first, packing)
    ref_out, ref_grad = _run(m, lambda: m(x))
    out, grad = _run(m, lambda: unrolled_forward(m, x))
    assert len(out) == len(ref_out) and len(grad) == len(ref_grad) == len(list(m.parameters()))
    for a, b in zip(out + grad, ref_out + ref_grad):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("cell", ["rnn_tanh", "lstm", "lstm_proj", "gru"])
@pytest.mark.parametrize("packing", ["padded", "packed_unsorted"])
def test_initial_state_and_its_gradient(cell, packing):
    torch.manual_seed(1)
    m = CELLS[cell](num_layers=2, bidirectional=True).double()
    x = _make_input(False, packing)
    H_out = m.proj_size if getattr(m, "proj_size", 0) else m.hidden_size
    h0 = torch.randn(4, 3, H_out, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(4, 3, m.hidden_size, dtype=torch.float64, requires_grad=True)
    hx = (h0, c0) if isinstance(m, nn.LSTM) else h0
    leaves = [h0, c0] if isinstance(m, nn.LSTM) else [h0]
    results = []
    for fn in (lambda: m(x, hx), lambda: unrolled_forward(m, x, hx)):
        for leaf in leaves:
            leaf.grad = None
        out, grad = _run(m, fn)
        results.append(out + grad + [leaf.grad.clone() for leaf in leaves])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("cell", ["rnn_tanh", "lstm", "gru"])
def test_unbatched_input(cell):
    torch.manual_seed(2)
    m = CELLS[cell](bidirectional=True).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    ref_out, ref_grad = _run(m, lambda: m(x))
    out, grad = _run(m, lambda: unrolled_forward(m, x))
    assert [o.shape for o in out] == [o.shape for o in ref_out]
    for a, b in zip(out + grad, ref_out + ref_grad):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


def test_float32_matches_to_float32_rounding():
    # the default dtype goes through oneDNN in the fused module: agreement to float32 rounding
    torch.manual_seed(3)
    m = nn.LSTM(8, 16, num_layers=2)
    x = torch.randn(30, 4, 8)
    ref_out, ref_grad = _run(m, lambda: m(x))
    out, grad = _run(m, lambda: unrolled_forward(m, x))
    for a, b in zip(out + grad, ref_out + ref_grad):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_dropout_in_train_mode_is_refused_and_eval_mode_matches():
    m = nn.GRU(3, 4, num_layers=2, dropout=0.3).double()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    with pytest.raises(ConfigError, match="dropout"):
        unrolled_forward(m, x)
    m.eval()
    ref_out, ref_grad = _run(m, lambda: m(x))
    out, grad = _run(m, lambda: unrolled_forward(m, x))
    for a, b in zip(out + grad, ref_out + ref_grad):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


def test_bad_input_rank():
    with pytest.raises(ConfigError, match="2-D or 3-D"):
        unrolled_forward(nn.RNN(3, 4), torch.randn(2, 2, 2, 3))
