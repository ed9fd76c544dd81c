"""Unrolled replicas of the fused recurrent modules ``nn.RNN``, ``nn.LSTM`` and ``nn.GRU``.

A fused module runs its whole time loop in one kernel, so the hidden state of step ``k`` never exists
as a tensor that a hook could see. :func:`unrolled_forward` computes the *same function* with a
Python loop over time, using the module's own ``Parameter`` objects (no copies), and calls
``on_state`` with every per-step state tensor, so a caller can register tensor hooks on them and read
the total gradient ``∂E/∂h_k`` (seed 003, eq. 6/7: everything that reaches step ``k`` through the
output at ``k`` *and* through the recurrence ``k → k+1``).

Equations (PyTorch's documented cells; ``W_ih x + b_ih`` is computed for all steps at once because it
does not depend on the state):

* RNN:  ``h_t = σ(W_ih x_t + b_ih + W_hh h_{t−1} + b_hh)``, ``σ = tanh`` or ``relu``;
* LSTM: ``i, f, g, o = σ, σ, tanh, σ (W_ih x_t + b_ih + W_hh h_{t−1} + b_hh)`` (chunks in that order),
  ``c_t = f⊙c_{t−1} + i⊙g``, ``h_t = o⊙tanh(c_t)`` (then ``h_t = W_hr h_t`` when ``proj_size > 0``);
* GRU:  ``r, z = σ(W_i{r,z} x_t + b_i{r,z} + W_h{r,z} h_{t−1} + b_h{r,z})``,
  ``n = tanh(W_in x_t + b_in + r⊙(W_hn h_{t−1} + b_hn))``, ``h_t = (1−z)⊙n + z⊙h_{t−1}``.

Layout: every argument form the fused module accepts (time-major or ``batch_first``, unbatched 2-D
input, ``PackedSequence``) is accepted and the result has the fused module's exact layout. Packed
sequences are processed as cuDNN does: at step ``t`` only the first ``batch_sizes[t]`` (length-sorted)
sequences are active; the others keep their state (forward direction: the state at their last valid
step; reverse direction: the initial state until their first valid step, which is their *last* time
index). Multi-layer modules feed each layer's concatenated (forward, reverse) outputs to the next.

Dropout between layers (``dropout > 0``, ``num_layers > 1``, module in train mode) uses a random mask
drawn inside the fused kernel that cannot be reproduced, so it raises :class:`ConfigError`; put the
module in ``eval()`` mode or set ``dropout=0`` while measuring.

The tests (``tests/test_temporal_unroll.py``) check outputs, final states and every parameter
gradient against the fused module in float64 to ``rtol 1e-10``.

>>> import torch
>>> from torch import nn
>>> lstm = nn.LSTM(3, 5, num_layers=2, bidirectional=True).double()
>>> x = torch.randn(7, 2, 3, dtype=torch.float64)
>>> out, (h, c) = unrolled_forward(lstm, x)
>>> ref, (h_ref, c_ref) = lstm(x)
>>> bool(torch.allclose(out, ref, rtol=1e-10, atol=1e-12) and torch.allclose(c, c_ref, rtol=1e-10, atol=1e-12))
True
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from gradprobe.errors import ConfigError

__all__ = ["StateEvent", "unrolled_forward", "is_fused_recurrent"]


@dataclass(frozen=True)
class StateEvent:
    """One per-step state tensor produced by the unrolled computation.

    ``h`` (and ``c`` for an LSTM) has shape ``(n_active, H)``: the rows are the first ``n_active``
    sequences of the batch in *processing* order; ``rows`` maps them to the user's batch positions
    (``None`` means ``rows = 0 … n_active−1``, i.e. every sequence is active, in the user's order).
    ``time`` is the position in the sequence (0-based), in the user's time axis for both directions.
    """

    layer: int
    direction: int  # 0 forward, 1 reverse
    time: int
    steps: int  # T, the padded sequence length
    batch: int  # B, the full batch size
    rows: torch.Tensor | None
    h: torch.Tensor
    c: torch.Tensor | None


StateCallback = Callable[[StateEvent], None]


def is_fused_recurrent(module: nn.Module) -> bool:
    """True for the fused modules this file replicates (``nn.RNN``, ``nn.LSTM``, ``nn.GRU`` and subclasses)."""
    return isinstance(module, (nn.RNN, nn.LSTM, nn.GRU))


def _mode(module: nn.Module) -> str:
    if isinstance(module, nn.LSTM):
        return "LSTM"
    if isinstance(module, nn.GRU):
        return "GRU"
    if isinstance(module, nn.RNN):
        return "RNN_TANH" if module.nonlinearity == "tanh" else "RNN_RELU"
    raise ConfigError(f"unrolled_forward supports nn.RNN, nn.LSTM and nn.GRU; got {type(module).__name__}")


def _params(module: nn.RNNBase, layer: int, direction: int):
    sfx = f"_l{layer}" + ("_reverse" if direction == 1 else "")
    w_ih = getattr(module, "weight_ih" + sfx)
    w_hh = getattr(module, "weight_hh" + sfx)
    b_ih = getattr(module, "bias_ih" + sfx) if module.bias else None
    b_hh = getattr(module, "bias_hh" + sfx) if module.bias else None
    w_hr = getattr(module, "weight_hr" + sfx) if getattr(module, "proj_size", 0) > 0 else None
    return w_ih, w_hh, b_ih, b_hh, w_hr


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return torch.addmm(b, x, w.t()) if b is not None else x @ w.t()


def _step(mode: str, xg, h, c, w_hh, b_hh, w_hr):
    """One cell step from the precomputed input part ``xg = W_ih x_t + b_ih`` (plus ``b_hh`` if folded)."""
    if mode == "GRU":
        gh = _linear(h, w_hh, b_hh)
        xr, xz, xn = xg.chunk(3, 1)
        hr, hz, hn = gh.chunk(3, 1)
        r = torch.sigmoid(xr + hr)
        z = torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        return n + z * (h - n), None
    pre = torch.addmm(xg, h, w_hh.t())  # b_hh already folded into xg for RNN/LSTM
    if mode == "RNN_TANH":
        return torch.tanh(pre), None
    if mode == "RNN_RELU":
        return torch.relu(pre), None
    i, f, g, o = pre.chunk(4, 1)
    c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h_new = torch.sigmoid(o) * torch.tanh(c_new)
    if w_hr is not None:
        h_new = h_new @ w_hr.t()
    return h_new, c_new


def unrolled_forward(module: nn.RNNBase, input, hx=None, *, on_state: StateCallback | None = None):
    """Run ``module(input, hx)`` as an explicit loop over time with the module's own parameters.

    Args:
        module: an ``nn.RNN``, ``nn.LSTM`` or ``nn.GRU`` (any ``num_layers``, ``bidirectional``,
            ``batch_first``, ``bias``, LSTM ``proj_size``).
        input: what the module accepts: ``(T, B, I)`` (``(B, T, I)`` if ``batch_first``), ``(T, I)``
            unbatched, or a ``PackedSequence``.
        hx: initial state as the module accepts it (``(h0, c0)`` for an LSTM), or ``None`` for zeros.
        on_state: called with a :class:`StateEvent` for every new state tensor, in computation order.

    Returns:
        exactly what ``module(input, hx)`` returns (same shapes, layout and values up to rounding);
        gradients flow into the module's parameters as the fused kernel's would.
    """
    mode = _mode(module)
    L, D = module.num_layers, 2 if module.bidirectional else 1
    H = module.hidden_size
    H_out = getattr(module, "proj_size", 0) or H
    if module.training and module.dropout > 0 and L > 1:
        raise ConfigError(
            f"{type(module).__name__}(dropout={module.dropout}) in train mode draws its dropout mask inside the "
            "fused kernel, which cannot be reproduced step by step; measure with module.eval() or dropout=0"
        )
    packed = isinstance(input, PackedSequence)
    unbatched = False
    sorted_idx = unsorted_idx = None
    if packed:
        data, batch_sizes = input.data, input.batch_sizes
        sorted_idx, unsorted_idx = input.sorted_indices, input.unsorted_indices
        bs = [int(b) for b in batch_sizes]
        B = bs[0]
        offsets = [0]
        for b in bs:
            offsets.append(offsets[-1] + b)
        xs = [data[offsets[t] : offsets[t + 1]] for t in range(len(bs))]
    else:
        if input.dim() == 2:
            unbatched = True
            input = input.unsqueeze(1)
        elif input.dim() != 3:
            raise ConfigError(f"{type(module).__name__} expects 2-D or 3-D input; got shape {tuple(input.shape)}")
        x = input.transpose(0, 1) if module.batch_first and not unbatched else input
        xs = list(x.unbind(0))
        B = x.shape[1]
        bs = [B] * len(xs)
    T = len(xs)
    dt, dev = xs[0].dtype, xs[0].device

    # initial states, (L·D, B, H) in processing (sorted) order
    def _prep(s, width):
        if s is None:
            return torch.zeros(L * D, B, width, dtype=dt, device=dev)
        if unbatched:
            s = s.unsqueeze(1)
        return s.index_select(1, sorted_idx) if sorted_idx is not None else s

    if mode == "LSTM":
        h0, c0 = (None, None) if hx is None else hx
        h0, c0 = _prep(h0, H_out), _prep(c0, H)
    else:
        h0, c0 = _prep(hx, H_out), None

    rows_at = [None] * T
    if sorted_idx is not None:
        rows_at = [sorted_idx[:b] for b in bs]
    elif packed:
        rows_at = [None if b == B else torch.arange(b, device=dev) for b in bs]

    layer_in = xs
    h_n, c_n = [], []
    for layer in range(L):
        outs_dirs = []
        for d in range(D):
            w_ih, w_hh, b_ih, b_hh, w_hr = _params(module, layer, d)
            # The input projection does not depend on the state: one matmul for all steps.
            # RNN/LSTM add b_hh outside the nonlinearity, so it is folded in here; GRU keeps b_hn inside r⊙(·).
            b_x = b_ih if (mode == "GRU" or b_ih is None) else b_ih + b_hh
            xg_all = _linear(torch.cat(layer_in, 0) if packed else torch.stack(layer_in, 0).flatten(0, 1), w_ih, b_x)
            if packed:
                xg = [xg_all[offsets[t] : offsets[t + 1]] for t in range(T)]
            else:
                xg = list(xg_all.view(T, B, -1).unbind(0))
            b_rec = b_hh if mode == "GRU" else None
            h, c = h0[layer * D + d], (c0[layer * D + d] if c0 is not None else None)
            outs = [None] * T
            for t in range(T) if d == 0 else range(T - 1, -1, -1):
                n = bs[t]
                full = n == h.shape[0]
                h_t, c_t = _step(mode, xg[t], h if full else h[:n], None if c is None else (c if full else c[:n]), w_hh, b_rec, w_hr)
                if on_state is not None:
                    on_state(StateEvent(layer, d, t, T, B, rows_at[t], h_t, c_t))
                outs[t] = h_t
                # inactive rows keep their state (packed sequences of different lengths)
                h = h_t if full else torch.cat([h_t, h[n:]], 0)
                if c is not None:
                    c = c_t if full else torch.cat([c_t, c[n:]], 0)
            h_n.append(h)
            if c is not None:
                c_n.append(c)
            outs_dirs.append(outs)
        layer_in = outs_dirs[0] if D == 1 else [torch.cat(pair, 1) for pair in zip(*outs_dirs)]

    h_n = torch.stack(h_n, 0)
    c_n = torch.stack(c_n, 0) if c_n else None
    if unsorted_idx is not None:
        h_n = h_n.index_select(1, unsorted_idx)
        c_n = c_n.index_select(1, unsorted_idx) if c_n is not None else None
    if packed:
        output = PackedSequence(torch.cat(layer_in, 0), input.batch_sizes, sorted_idx, unsorted_idx)
    else:
        output = torch.stack(layer_in, 0)
        if unbatched:
            output, h_n = output.squeeze(1), h_n.squeeze(1)
            c_n = c_n.squeeze(1) if c_n is not None else None
        elif module.batch_first:
            output = output.transpose(0, 1)
    return output, ((h_n, c_n) if mode == "LSTM" else h_n)
