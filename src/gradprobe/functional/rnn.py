"""Recurrent computations written once: the unrolled fused RNN/LSTM/GRU, the step Jacobian, BPTT, leaky units.

**The unroll.** A fused module runs its whole time loop in one kernel, so the hidden state of step ``k``
never exists as a tensor that a hook could see. :func:`unrolled_forward` computes the *same function*
with a Python loop over time, using the module's own ``Parameter`` objects (no copies), and calls
``on_state`` with every per-step state tensor, so a caller can register tensor hooks on them and read
the total gradient ``∂E/∂h_k`` (Pascanu, Mikolov & Bengio 2013, §2: everything that reaches step
``k`` through the output at ``k`` *and* through the recurrence ``k → k+1``). :func:`layer_outputs`
gives the per-layer state sequences of the same computation (Ω of the stacked layers, the Jacobians of
``theory.rnn``).

Equations (PyTorch's documented cells; ``W_ih x + b_ih`` is computed for all steps at once because it
does not depend on the state):

* RNN:  ``h_t = σ(W_ih x_t + b_ih + W_hh h_{t−1} + b_hh)``, ``σ = tanh`` or ``relu``;
* LSTM: ``i, f, g, o = σ, σ, tanh, σ (W_ih x_t + b_ih + W_hh h_{t−1} + b_hh)`` (chunks in that order),
  ``c_t = f⊙c_{t−1} + i⊙g``, ``h_t = o⊙tanh(c_t)`` (then ``h_t = W_hr h_t`` when ``proj_size > 0``;
  Hochreiter & Schmidhuber 1997, with the forget gate of Gers et al. 2000);
* GRU:  ``r, z = σ(W_i{r,z} x_t + b_i{r,z} + W_h{r,z} h_{t−1} + b_h{r,z})``,
  ``n = tanh(W_in x_t + b_in + r⊙(W_hn h_{t−1} + b_hn))``, ``h_t = (1−z)⊙n + z⊙h_{t−1}`` (Cho et al. 2014).

Layout: every argument form the fused module accepts (time-major or ``batch_first``, unbatched 2-D
input, ``PackedSequence``) is accepted and the result has the fused module's exact layout. Packed
sequences are processed as cuDNN does: at step ``t`` only the first ``batch_sizes[t]`` (length-sorted)
sequences are active; the others keep their state (forward direction: the state at their last valid
step; reverse direction: the initial state until their first valid step, which is their *last* time
index). Multi-layer modules feed each layer's concatenated (forward, reverse) outputs to the next.

Dropout between layers (``dropout > 0``, ``num_layers > 1``, module in train mode) uses a random mask
drawn inside the fused kernel that cannot be reproduced, so :func:`unrolled_forward` raises
:class:`ConfigError`; put the module in ``eval()`` mode or set ``dropout=0`` while measuring.

**One step back in time.** Two recurrences appear in gradprobe, with one Jacobian each:

* ``"h"`` form (``nn.RNN``): ``h_{t+1} = φ(W_ih u + W h_t + b)``, ``∂h_{t+1}/∂h_t = diag(φ′(a_{t+1}))·W``;
* ``"x"`` form (the pre-activation state of Pascanu et al. 2013, §2):
  ``x_{t+1} = W σ(x_t) + W_in u + b``, ``∂x_{t+1}/∂x_t = W·diag(σ′(x_t))``.

:func:`step_jacobian` builds that matrix, :func:`step_vjp` multiplies a row vector δ by it without
building it, and :func:`bptt` runs the backward recursion ``δ_t = g_t + δ_{t+1}·∂s_{t+1}/∂s_t`` that
turns direct gradients ``g_t = ∂⁺E/∂s_t`` into total ones ``δ_t = ∂E/∂s_t`` (back-propagation through time; Pascanu et al. 2013, §2).
``leaky_recurrence`` / ``leaky_jacobian`` are the leaky-integrator units of Jaeger et al. 2007.

The tests (``tests/test_temporal_unroll.py``, ``tests/test_functional_rnn.py``) check outputs, final
states and every parameter gradient against the fused module in float64 to ``rtol 1e-10``, and the
Jacobians and BPTT against autograd.

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

__all__ = [
    "StateEvent",
    "unrolled_forward",
    "is_fused_recurrent",
    "layer_outputs",
    "step_jacobian",
    "step_vjp",
    "bptt",
    "leaky_recurrence",
    "leaky_jacobian",
]


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


def _time_steps(module: nn.RNNBase, input):
    """Split ``input`` into per-step tensors in processing order; returns what the loop needs."""
    packed = isinstance(input, PackedSequence)
    unbatched = False
    sorted_idx = unsorted_idx = offsets = None
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
        if not isinstance(input, torch.Tensor):
            raise ConfigError(f"{type(module).__name__} expects a tensor or PackedSequence; got {type(input).__name__}")
        if input.dim() == 2:
            unbatched = True
            input = input.unsqueeze(1)
        elif input.dim() != 3:
            raise ConfigError(f"{type(module).__name__} expects 2-D or 3-D input; got shape {tuple(input.shape)}")
        x = input.transpose(0, 1) if module.batch_first and not unbatched else input
        xs = list(x.unbind(0))
        B = x.shape[1]
        bs = [B] * len(xs)
    return xs, bs, B, packed, unbatched, sorted_idx, unsorted_idx, offsets


def _unroll(module: nn.RNNBase, input, hx, on_state: StateCallback | None, n_layers: int):
    """The loop of :func:`unrolled_forward` over the first ``n_layers`` layers.

    Returns ``(outputs, h_n, c_n, steps)``: ``outputs[l]`` the list of per-step outputs of layer ``l``
    (``(n_active, D·H)`` each, processing order), ``h_n``/``c_n`` the final states per (layer, direction)
    in processing order, and ``steps`` the tuple from :func:`_time_steps`.
    """
    mode = _mode(module)
    D = 2 if module.bidirectional else 1
    L = module.num_layers
    H = module.hidden_size
    H_out = getattr(module, "proj_size", 0) or H
    steps = _time_steps(module, input)
    xs, bs, B, packed, unbatched, sorted_idx, _, offsets = steps
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
    outputs, h_n, c_n = [], [], []
    for layer in range(n_layers):
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
        outputs.append(layer_in)
    return outputs, h_n, c_n, steps


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
    if module.training and module.dropout > 0 and module.num_layers > 1:
        raise ConfigError(
            f"{type(module).__name__}(dropout={module.dropout}) in train mode draws its dropout mask inside the "
            "fused kernel, which cannot be reproduced step by step; measure with module.eval() or dropout=0"
        )
    outputs, h_n, c_n, steps = _unroll(module, input, hx, on_state, module.num_layers)
    _, _, _, packed, unbatched, sorted_idx, unsorted_idx, _ = steps
    layer_in = outputs[-1]
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


def layer_outputs(module: nn.RNNBase, input: torch.Tensor, hx=None, *, layers: int | None = None) -> list[torch.Tensor]:
    """Output sequences of the first ``layers`` layers of a fused module (default: all), time-major.

    The same computation as :func:`unrolled_forward` (the module's own parameters, in its dtype), for a
    padded ``input`` in the module's layout (``batch_first`` respected, unbatched ``(T, I)`` allowed) and
    ``hx`` as the module takes it. Returns one ``(T, B, D·H)`` tensor per layer (``B = 1`` for unbatched
    input; ``D = 2`` for bidirectional modules, forward half first), i.e. the input the next layer sees.
    Dropout between layers is not applied: this is the module's function in ``eval()`` mode.
    Differentiable; wrap in ``torch.no_grad()`` for constants.

    >>> rnn = nn.RNN(3, 4, num_layers=2).double()
    >>> x = torch.randn(6, 2, 3, dtype=torch.float64)
    >>> lower, top = layer_outputs(rnn, x)
    >>> lower.shape, bool(torch.allclose(top, rnn(x)[0]))
    (torch.Size([6, 2, 4]), True)
    """
    if isinstance(input, PackedSequence):
        raise ConfigError("layer_outputs takes a padded tensor; unpack it with pad_packed_sequence first")
    n = module.num_layers if layers is None else int(layers)
    if not 0 <= n <= module.num_layers:
        raise ConfigError(f"layers must be in [0, {module.num_layers}]; got {layers}")
    if n == 0:
        return []
    outputs, _, _, _ = _unroll(module, input, hx, None, n)
    return [torch.stack(seq, 0) for seq in outputs]


# ---------------------------------------------------------------------------------------- one step back
_FORMS = ("h", "x")


def _check_form(form: str) -> None:
    if form not in _FORMS:
        raise ConfigError(f"form={form!r}: choose 'h' (h' = φ(W h + …), nn.RNN) or 'x' (x' = W σ(x) + …)")


def step_jacobian(weight: torch.Tensor, dphi: torch.Tensor, form: str = "h") -> torch.Tensor:
    """The state Jacobian of one recurrent step, batched over the leading dimensions of ``dphi``.

    * ``form="h"``: ``∂h_{t+1}/∂h_t = diag(φ′(a_{t+1}))·W`` with ``dphi = φ′(a_{t+1})`` (rows scaled);
    * ``form="x"``: ``∂x_{t+1}/∂x_t = W·diag(σ′(x_t))`` with ``dphi = σ′(x_t)`` (columns scaled).

    Shapes: ``weight (N, N)``, ``dphi (..., N)`` → ``(..., N, N)``.

    >>> W = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    >>> step_jacobian(W, torch.tensor([0.5, 1.0])).tolist(), step_jacobian(W, torch.tensor([0.5, 1.0]), "x").tolist()
    ([[0.5, 1.0], [3.0, 4.0]], [[0.5, 2.0], [1.5, 4.0]])
    """
    _check_form(form)
    return dphi.unsqueeze(-1) * weight if form == "h" else weight * dphi.unsqueeze(-2)


def step_vjp(weight: torch.Tensor, delta: torch.Tensor, dphi: torch.Tensor, form: str = "h") -> torch.Tensor:
    """``δ · ∂s_{t+1}/∂s_t`` (a row vector times :func:`step_jacobian`) without building the matrix.

    ``form="h"``: ``(φ′(a_{t+1}) ⊙ δ) W`` = ``Wᵀ(φ′ ⊙ δ)``; ``form="x"``: ``σ′(x_t) ⊙ (δ W)`` = ``diag(σ′) Wᵀδ``.
    Shapes: ``weight (N, N)`` (or ``(N, M)`` for the input weight in the ``"h"`` form, giving ``(..., M)``),
    ``delta, dphi (..., N)`` → ``(..., N)``. Differentiable in every argument.
    """
    _check_form(form)
    return (dphi * delta) @ weight if form == "h" else (delta @ weight) * dphi


def bptt(weight: torch.Tensor, g: torch.Tensor, dphi: torch.Tensor, g_last: torch.Tensor | None = None,
         form: str = "h") -> torch.Tensor:
    """Total gradients ``δ_t = ∂E/∂s_t`` from direct ones by back-propagation through time.

    ``δ_{T−1} = g_{T−1} + g_last``, ``δ_t = g_t + δ_{t+1}·∂s_{t+1}/∂s_t`` (:func:`step_vjp`), where
    ``g_t = ∂⁺E/∂s_t`` is what reaches state ``s_t`` *not* through the recurrence (the loss through the
    output at ``t``; Pascanu, Mikolov & Bengio 2013, §2).

    Args (time-major): ``weight (N, N)`` the recurrent weight; ``g (T, B, N)``; ``dphi (T, B, N)`` the
        derivative at each state's own pre-activation: ``"h"`` form ``φ′(a_t)`` of ``h_t = φ(a_t)`` (from
        the output: ``activation(name).grad_from_output(h)``), ``"x"`` form ``σ′(x_t)``;
        ``g_last (B, N)`` an extra gradient on the last state (e.g. ``∂E/∂h_n``) or ``None``.
    Returns ``(T, B, N)``. Cost ``T`` matrix products of ``(B, N)·(N, N)``. Runs in the caller's grad mode.

    >>> W = torch.tensor([[0.5]])
    >>> bptt(W, torch.tensor([[[0.0]], [[0.0]], [[1.0]]]), torch.ones(3, 1, 1)).flatten().tolist()
    [0.25, 0.5, 1.0]
    """
    _check_form(form)
    if g.dim() != 3 or dphi.shape != g.shape:
        raise ConfigError(f"bptt needs g and dphi of one shape (T, B, N); got {tuple(g.shape)} and {tuple(dphi.shape)}")
    deltas = [None] * g.shape[0]
    d = g[-1] if g_last is None else g[-1] + g_last
    deltas[-1] = d
    shift = 1 if form == "h" else 0  # "h": J_{t+1} uses φ′(a_{t+1}); "x": it uses σ′(x_t)
    for t in range(g.shape[0] - 2, -1, -1):
        d = g[t] + step_vjp(weight, d, dphi[t + shift], form)
        deltas[t] = d
    return torch.stack(deltas, 0)


# ------------------------------------------------------------------------------------------ leaky units
def leaky_recurrence(drive: torch.Tensor, weight: torch.Tensor, alpha: float, fn: Callable[[torch.Tensor], torch.Tensor],
                     h0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Leaky-integrator units (Jaeger, Lukoševičius, Popovici & Siewert 2007):

        h_t = (1 − α) h_{t−1} + α f(d_t + W h_{t−1}),   t = 0 … T−1,

    from the precomputed input drive ``d_t = W_in u_t + b`` (all steps at once: it does not depend on
    the state). α = 1 is the vanilla RNN ``h_t = f(W_in u_t + W h_{t−1} + b)``; small α keeps the step
    Jacobian (1 − α)I + α·diag(f′)W near the identity (:func:`leaky_jacobian`).

    Shapes: ``drive (T, B, H)``, ``weight (H, H)``, ``h0 (B, H)`` → ``(states (T, B, H), h_last (B, H))``.
    Differentiable in every tensor argument.
    """
    h, outs = h0, []
    for t in range(drive.shape[0]):
        h = (1.0 - alpha) * h + alpha * fn(torch.addmm(drive[t], h, weight.t()))
        outs.append(h)
    return torch.stack(outs, 0), h


def leaky_jacobian(weight: torch.Tensor, dphi: torch.Tensor, alpha: float) -> torch.Tensor:
    """``∂h_t/∂h_{t−1} = (1 − α) I + α·diag(f′(z_t))·W`` of :func:`leaky_recurrence`, ``dphi = f′(z_t)``.

    Shapes: ``weight (H, H)``, ``dphi (..., H)`` → ``(..., H, H)``.
    """
    eye = torch.eye(weight.shape[0], dtype=weight.dtype, device=weight.device)
    return (1.0 - alpha) * eye + alpha * step_jacobian(weight, dphi, "h")
