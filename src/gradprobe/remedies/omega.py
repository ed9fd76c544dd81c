"""Pascanu's Ω: a regulariser that keeps the back-propagated error's norm constant through time.

Pascanu, Mikolov & Bengio 2013, "On the difficulty of training recurrent neural networks", eq. 9/10:

    Ω = Σ_k Ω_k,   Ω_k = ( ‖(∂E/∂x_{k+1}) · ∂x_{k+1}/∂x_k‖² / ‖∂E/∂x_{k+1}‖² − 1 )²

with the paper's *immediate* derivative: ∂E/∂x_{k+1} and x_k are held constant and only W_rec
receives ∂Ω/∂W_rec. As in the authors' code (github pascanur/trainingRNNs, ``RNN.py``) steps with
‖∂E/∂x_{k+1}‖² < 1e-20 are skipped and Ω is the **mean** over the valid (step, sequence) pairs, not the
sum; a step counts as a transition k → k+1 for k+1 = 1 … T (the first one leaves the initial state).

Two recurrences are supported, both through a *vector-Jacobian product* ``vjp(W, δ, x_prev, x_next)``
returning ``δ · ∂x_{k+1}/∂x_k`` (batched over leading dimensions, differentiable in ``W`` only):

* ``nn.RNN`` (state h): h_{k+1} = φ(W_ih u + W_hh h_k + b) ⇒ δ·∂h_{k+1}/∂h_k = W_hhᵀ(φ'(a_{k+1}) ⊙ δ),
  φ'(a_{k+1}) read from the saved output (tanh: 1 − h², relu: 1[h > 0]) and held constant, the
  analogue of holding x_k constant (:func:`rnn_vjp`). This is exactly what the authors' code computes.
* the seeds' form (state x): x_{k+1} = W_rec σ(x_k) + W_in u + b ⇒ δ·∂x_{k+1}/∂x_k = σ'(x_k) ⊙ W_recᵀδ
  (:func:`pascanu_vjp`), or any user recurrence with its own ``vjp``.

Fused ``nn.RNN`` modules cannot be looked into, so :class:`PascanuRegularizer` captures the direct
output gradients g_t = ∂E/∂out_t (and ∂E/∂h_n) with tensor hooks and recovers the total
δ_t = ∂E/∂h_t by the backward recursion δ_t = g_t + W_hhᵀ(φ'(a_{t+1}) ⊙ δ_{t+1}) (:func:`rnn_state_grads`);
stacked layers pass g = Σ_d W_ihᵀ(φ' ⊙ δ) down, bidirectional ones run the reverse direction in flipped time.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from gradprobe.errors import ConfigError, ProbeStateError

__all__ = [
    "Vjp",
    "rnn_vjp",
    "pascanu_vjp",
    "omega_terms",
    "pascanu_omega",
    "rnn_state_grads",
    "PascanuRegularizer",
]

BOUND = 1e-20  # the authors' `state['bound']`: smaller ‖∂E/∂x_{k+1}‖² are skipped

Vjp = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _rnn_act_grad(nonlinearity: str) -> Callable[[torch.Tensor], torch.Tensor]:
    # derivative from the *output* h = φ(a): tanh' = 1 − h², relu' = 1[h > 0]
    if nonlinearity == "tanh":
        return lambda h: 1.0 - h * h
    if nonlinearity == "relu":
        return lambda h: (h > 0).to(h.dtype)
    raise ConfigError(f"nn.RNN nonlinearity {nonlinearity!r} is not supported; use 'tanh' or 'relu'")


def _pre_act_grad(activation: str | Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    # derivative σ'(x) of the activation at its *input* x
    if callable(activation):
        return activation
    table = {
        "sigmoid": lambda x: torch.sigmoid(x) * (1.0 - torch.sigmoid(x)),
        "tanh": lambda x: 1.0 - torch.tanh(x) ** 2,
        "relu": lambda x: (x > 0).to(x.dtype),
        "linear": lambda x: torch.ones_like(x),
    }
    if activation not in table:
        raise ConfigError(f"unknown activation {activation!r}; choose one of {sorted(table)} or pass σ' as a function")
    return table[activation]


def rnn_vjp(nonlinearity: str = "tanh") -> Vjp:
    """``vjp`` for h_{k+1} = φ(W_ih u + W h_k + b) (``nn.RNN``): returns ``W_hhᵀ(φ'(a_{k+1}) ⊙ δ)``.

    Shapes: ``W (H, H)``, ``δ, x_prev, x_next (..., H)`` → ``(..., H)``; φ' comes from ``x_next = h_{k+1}``.
    """
    dphi = _rnn_act_grad(nonlinearity)

    def vjp(weight, delta, prev, nxt):
        return (delta * dphi(nxt)) @ weight  # row form of W_hhᵀ(φ' ⊙ δ)

    return vjp


def pascanu_vjp(activation: str | Callable[[torch.Tensor], torch.Tensor] = "sigmoid") -> Vjp:
    """``vjp`` for the seeds' x_{k+1} = W_rec σ(x_k) + W_in u + b: returns ``σ'(x_k) ⊙ W_recᵀδ``.

    ``activation`` is "sigmoid", "tanh", "relu", "linear" or a function giving σ'(x).
    Shapes: ``W (N, N)``, ``δ, x_prev, x_next (..., N)`` → ``(..., N)``.
    """
    dsigma = _pre_act_grad(activation)

    def vjp(weight, delta, prev, nxt):
        return (delta @ weight) * dsigma(prev)

    return vjp


def omega_terms(
    weight: torch.Tensor,
    deltas: torch.Tensor,
    prev: torch.Tensor,
    nxt: torch.Tensor,
    vjp: Vjp,
    bound: float = BOUND,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(step, sequence) Ω_k and the validity mask.

    Args:
        weight: W_rec (differentiable; the only input that carries gradient).
        deltas: ``(T, B, N)`` ∂E/∂x_{k+1} for the T transitions (treated as constants).
        prev, nxt: ``(T, B, N)`` x_k and x_{k+1} (constants).
    Returns ``(terms (T, B), valid (T, B) bool)``; invalid entries (‖δ‖² < ``bound``) have term 0.
    """
    deltas, prev, nxt = deltas.detach(), prev.detach(), nxt.detach()
    den = deltas.pow(2).sum(-1)  # (T, B)
    valid = den >= bound
    num = vjp(weight, deltas, prev, nxt).pow(2).sum(-1)  # (T, B)
    safe = torch.where(valid, den, torch.ones_like(den))  # no 0/0 in the unused branch's gradient
    ratio = torch.where(valid, num / safe, torch.ones_like(num))
    return (ratio - 1.0) ** 2, valid


def pascanu_omega(weight, deltas, prev, nxt, vjp: Vjp, bound: float = BOUND) -> torch.Tensor:
    """Ω = mean of Ω_k over the valid (step, sequence) pairs (0 when none is valid). See :func:`omega_terms`.

    >>> W = torch.eye(3, dtype=torch.float64) * 2.0
    >>> d = torch.ones(1, 1, 3, dtype=torch.float64)
    >>> float(pascanu_omega(W, d, d, d, pascanu_vjp("linear")))  # ‖2δ‖²/‖δ‖² = 4 → (4 − 1)² = 9
    9.0
    """
    terms, valid = omega_terms(weight, deltas, prev, nxt, vjp, bound)
    n = int(valid.sum())
    return terms.sum() / max(n, 1)


@torch.no_grad()
def rnn_state_grads(
    w_hh: torch.Tensor,
    outputs: torch.Tensor,
    g_out: torch.Tensor,
    g_last: torch.Tensor | None = None,
    nonlinearity: str = "tanh",
) -> torch.Tensor:
    """Total ∂E/∂h_t of a single-layer ``nn.RNN`` from the direct gradients on its outputs.

    δ_T = g_T + g_last,  δ_t = g_t + W_hhᵀ(φ'(a_{t+1}) ⊙ δ_{t+1})  (BPTT through the recurrence).

    Args (time-major): w_hh ``(H, H)``; outputs ``(T, B, H)`` = h_1 … h_T; g_out ``(T, B, H)`` = ∂E/∂out_t
    as the loss sees the output sequence; g_last ``(B, H)`` = ∂E/∂h_n (or None). Returns ``(T, B, H)``.
    """
    dphi = _rnn_act_grad(nonlinearity)
    w = w_hh.detach()
    deltas = torch.empty_like(g_out)
    d = g_out[-1] if g_last is None else g_out[-1] + g_last
    deltas[-1] = d
    for t in range(outputs.shape[0] - 2, -1, -1):
        d = g_out[t] + (dphi(outputs[t + 1]) * d) @ w
        deltas[t] = d
    return deltas


# ---------------------------------------------------------------------------------------------- capture
@dataclass(eq=False)
class _Capture:
    """One forward pass: constants for Ω and the gradients the hooks saw (all time-major).

    nn.RNN: ``states`` = per-layer output sequences ``(T, B, D·H)``, ``grads = [∂E/∂out, ∂E/∂h_n]``.
    Hand-written loop: ``states = [x_0 … x_{T−1}, x_1 … x_T]`` stacked, ``grads`` = δ_1 … δ_T.
    """

    states: list[torch.Tensor]
    grads: list[torch.Tensor | None]
    handles: list = field(default_factory=list)

    def add(self, i: int, g: torch.Tensor) -> None:
        # several backward calls through the same graph (retain_graph=True) accumulate, like .grad
        self.grads[i] = g.detach() if self.grads[i] is None else self.grads[i] + g.detach()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def _single_rnn(module: nn.Module) -> nn.RNN:
    if isinstance(module, nn.RNN):
        return module
    found = [m for m in module.modules() if isinstance(m, nn.RNN)]
    if len(found) != 1:
        raise ConfigError(
            f"PascanuRegularizer needs one nn.RNN; {type(module).__name__} contains {len(found)}. Pass the "
            "nn.RNN module itself, or use PascanuRegularizer.for_recurrence(weight, vjp) for a hand-written loop"
        )
    return found[0]


def _param(rnn: nn.RNN, kind: str, layer: int, direction: int) -> torch.Tensor | None:
    return getattr(rnn, f"{kind}_l{layer}{'_reverse' if direction else ''}", None)


@torch.no_grad()
def _layer_outputs(rnn: nn.RNN, x: torch.Tensor, hx: torch.Tensor | None) -> list[torch.Tensor]:
    """Output sequences ``(T, B, D·H)`` of layers 0 … L−2 of a fused RNN, recomputed step by step
    (the fused kernel does not expose them); time-major ``x (T, B, I)``, ``hx (L·D, B, H)`` or None."""
    act = torch.tanh if rnn.nonlinearity == "tanh" else torch.relu
    D, H = (2 if rnn.bidirectional else 1), rnn.hidden_size
    outs, inp = [], x
    for layer in range(rnn.num_layers - 1):
        dirs = []
        for d in range(D):
            w_ih, w_hh = _param(rnn, "weight_ih", layer, d), _param(rnn, "weight_hh", layer, d)
            b = 0.0
            if rnn.bias:
                b = _param(rnn, "bias_ih", layer, d) + _param(rnn, "bias_hh", layer, d)
            h = x.new_zeros(x.shape[1], H) if hx is None else hx[layer * D + d]
            seq = [None] * x.shape[0]
            steps = range(x.shape[0] - 1, -1, -1) if d else range(x.shape[0])
            for t in steps:
                h = act(inp[t] @ w_ih.T + h @ w_hh.T + b)
                seq[t] = h
            dirs.append(torch.stack(seq))
        inp = torch.cat(dirs, dim=-1)  # (T, B, D·H)
        outs.append(inp)
    return outs

class PascanuRegularizer:
    """Pascanu's Ω for a fused ``nn.RNN`` (or any recurrence via :meth:`for_recurrence`).

    While open it owns a forward hook on the RNN and tensor hooks on each forward's outputs (removed
    by :meth:`penalty`, :meth:`reset` and :meth:`close`); it never changes a gradient. Use::

        reg = PascanuRegularizer(model.rnn)          # once
        ...
        loss.backward()                              # hooks capture ∂E/∂out_t and ∂E/∂h_n
        omega = reg.penalty()                        # Ω, differentiable in W_hh only
        (alpha * omega).backward()                   # adds α ∂Ω/∂W_hh to W_hh.grad
        clip_grad_norm_(model.parameters(), 1.0)     # clip the sum, as the authors' code does
        optimizer.step()

    Clipping: the authors add α∂Ω/∂W_rec to the gradient *before* computing the clipping norm (so
    the threshold bounds the total step); calling ``backward`` on the penalty before clipping does
    the same. The paper uses α = 4 (code default 2) with threshold 1 and warns that Ω alone, without
    clipping, usually fails (footnote 4). Ω is a mean over (step, sequence) pairs, so α does not
    depend on the sequence length or batch size.

    Multi-layer and bidirectional ``nn.RNN``: every layer's and direction's W_hh is regularised and
    Ω is the mean over all their valid (step, sequence) pairs; the lower layers' state sequences are
    recomputed step by step inside the forward hook (no grad; about one extra forward of those
    layers), and their ∂E/∂h follows from the layer above through W_ih. Between-layer dropout in
    training mode is refused (its masks cannot be observed).

    Limits: ``nn.RNN`` only (tanh or relu); padded, not packed, input; batched or not, ``batch_first``
    either way. Several forward passes before one :meth:`penalty` (gradient accumulation) are
    pooled: Ω is the mean over all their valid pairs. Padding steps are not masked (their ‖∂E/∂h‖ is
    usually 0 and the bound skips them). LSTM/GRU have no single W_rec Jacobian of this form: Ω is
    not defined for them here.

    >>> torch.manual_seed(0) and None
    >>> rnn, head = nn.RNN(3, 8), nn.Linear(8, 1)
    >>> reg = PascanuRegularizer(rnn)
    >>> out, h_n = rnn(torch.randn(20, 4, 3))        # (T, B, H)
    >>> head(out[-1]).pow(2).mean().backward()
    >>> omega = reg.penalty()
    >>> (2.0 * omega).backward()                      # only rnn.weight_hh_l0.grad changes
    >>> reg.last_n_valid, bool(omega > 0)
    (80, True)
    >>> reg.close()
    """

    def __init__(self, rnn: nn.Module, *, bound: float = BOUND):
        rnn = _single_rnn(rnn)
        D = 2 if rnn.bidirectional else 1
        w_hh = [_param(rnn, "weight_hh", layer, d) for layer in range(rnn.num_layers) for d in range(D)]
        self._init(w_hh, rnn_vjp(rnn.nonlinearity), bound)
        self.rnn: nn.RNN | None = rnn
        self._module_handle = rnn.register_forward_hook(self._forward_hook)

    @classmethod
    def for_recurrence(cls, weight: torch.Tensor, vjp: Vjp, *, bound: float = BOUND) -> PascanuRegularizer:
        """Ω for a hand-written recurrence: call :meth:`record` with the loop's states in ``forward``.

        ``vjp(weight, δ, x_prev, x_next)`` returns δ·∂x_{k+1}/∂x_k batched over leading dims, e.g.
        :func:`pascanu_vjp` for x_{k+1} = W_rec σ(x_k) + W_in u_{k+1} + b or :func:`rnn_vjp` for
        h_{k+1} = φ(W h_k + …).

        >>> W = nn.Parameter(torch.randn(5, 5) * 0.5)
        >>> reg = PascanuRegularizer.for_recurrence(W, pascanu_vjp("sigmoid"))
        >>> xs = [torch.zeros(2, 5)]
        >>> for u in torch.randn(10, 2, 5):
        ...     xs.append(torch.sigmoid(xs[-1]) @ W.T + u)
        >>> reg.record(xs)                           # the list the loop built: x_0 … x_T
        >>> xs[-1].pow(2).sum().backward()
        >>> reg.penalty().backward()
        >>> W.grad.shape
        torch.Size([5, 5])
        """
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[0] != weight.shape[1]:
            raise ConfigError(f"for_recurrence needs a square recurrent weight matrix; got {getattr(weight, 'shape', weight)}")
        if not weight.requires_grad:
            raise ConfigError("the recurrent weight does not require grad, so Ω could not change it")
        self = cls.__new__(cls)
        self._init([weight], vjp, bound)
        self.rnn = None
        self._module_handle = None
        return self

    def _init(self, weights: list[torch.Tensor], vjp: Vjp, bound: float) -> None:
        if not (bound >= 0):
            raise ConfigError(f"bound={bound} must be >= 0 (the authors use 1e-20)")
        self.weights: tuple[torch.Tensor, ...] = tuple(weights)  # every W_rec that Ω regularises
        self.vjp = vjp
        self.bound = float(bound)
        self._captures: list[_Capture] = []
        self._closed = False
        self.last_value: float | None = None
        self.last_n_valid: int = 0

    # ------------------------------------------------------------------ hooks
    def _forward_hook(self, module: nn.RNN, args, output) -> None:
        if self._closed or not torch.is_grad_enabled():
            return None
        inp = args[0] if args else None
        if isinstance(inp, nn.utils.rnn.PackedSequence):
            raise ConfigError(
                "PascanuRegularizer does not support packed sequences; pad them (pad_packed_sequence) or "
                "close the regulariser while running packed batches"
            )
        out, h_n = output
        if not out.requires_grad:
            return None
        if module.num_layers > 1 and module.dropout > 0 and module.training:
            raise ConfigError(
                f"nn.RNN(num_layers={module.num_layers}, dropout={module.dropout}) in training mode: the dropout "
                "masks between layers are not observable, so Ω cannot be computed; use dropout=0 or one "
                "PascanuRegularizer per single-layer nn.RNN"
            )
        unbatched = out.dim() == 2

        def time_major(t: torch.Tensor) -> torch.Tensor:
            if unbatched:
                return t.unsqueeze(1)  # (T, H) -> (T, 1, H)
            return t.transpose(0, 1) if module.batch_first else t

        states = []
        if module.num_layers > 1:
            hx = args[1] if len(args) > 1 else None
            if hx is not None and unbatched:
                hx = hx.unsqueeze(1)  # (L·D, H) -> (L·D, 1, H)
            states = _layer_outputs(module, time_major(inp.detach()), None if hx is None else hx.detach())
        states.append(time_major(out.detach()))  # the top layer's outputs are the module's output
        cap = _Capture(states=states, grads=[None, None])
        cap.handles.append(out.register_hook(lambda g: cap.add(0, time_major(g))))
        if h_n.requires_grad:
            # h_n is (L·D, B, H) (or (L·D, H) unbatched): the last state of every layer and direction
            cap.handles.append(h_n.register_hook(lambda g: cap.add(1, g.unsqueeze(1) if unbatched else g)))
        self._captures.append(cap)
        return None

    def record(self, states: Sequence[torch.Tensor]) -> None:
        """Mark the states ``[x_0, x_1, …, x_T]`` of one forward pass of a hand-written recurrence.

        Pass the very tensors the loop produced (each ``(B, N)`` or ``(N,)``), not a stacked copy:
        the total ∂E/∂x_k is read by a tensor hook on each of them.
        """
        self._check_open("record")
        if self.rnn is not None:
            raise ConfigError("record() is for for_recurrence(); an nn.RNN is captured automatically")
        if isinstance(states, torch.Tensor) or len(states) < 2:
            raise ConfigError(
                "record() needs the list [x_0, …, x_T] of the tensors the loop produced (at least two); a "
                "stacked tensor's slices are copies that no gradient reaches"
            )
        xs = [s if s.dim() >= 2 else s.unsqueeze(0) for s in states]
        cap = _Capture(
            states=[torch.stack([x.detach() for x in xs[:-1]]), torch.stack([x.detach() for x in xs[1:]])],
            grads=[None] * (len(xs) - 1),
        )
        for k, x in enumerate(states[1:]):
            if x.requires_grad:
                fix = (lambda g: g) if x.dim() >= 2 else (lambda g: g.unsqueeze(0))
                cap.handles.append(x.register_hook(lambda g, k=k, fix=fix: cap.add(k, fix(g))))
        self._captures.append(cap)

    # --------------------------------------------------------------- penalty
    def _assemble(self, cap: _Capture) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``[(W_rec, δ, x_prev, x_next), …]`` for one captured pass (empty if no gradient reached it)."""
        if all(g is None for g in cap.grads):
            return []
        if self.rnn is None:
            prev, nxt = cap.states
            deltas = torch.stack([torch.zeros_like(nxt[k]) if g is None else g for k, g in enumerate(cap.grads)])
            return [(self.weights[0], deltas, prev, nxt)]
        return self._assemble_rnn(cap)

    def _assemble_rnn(self, cap: _Capture) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        # Backward through the layers, top first: in each layer and direction the total ∂E/∂h_t follows
        # from the gradient on the layer's outputs by rnn_state_grads; the gradient on the layer's input
        # (= the outputs of the layer below) is Σ_d W_ihᵀ(φ'(a_t) ⊙ δ_t).
        rnn = self.rnn
        D, H = (2 if rnn.bidirectional else 1), rnn.hidden_size
        dphi = _rnn_act_grad(rnn.nonlinearity)
        g_out, g_hn = cap.grads
        g = torch.zeros_like(cap.states[-1]) if g_out is None else g_out  # (T, B, D·H)
        items = []
        for layer in range(rnn.num_layers - 1, -1, -1):
            outs = cap.states[layer]
            g_below = None
            for d in range(D):
                h_seq, g_seq = outs[..., d * H : (d + 1) * H], g[..., d * H : (d + 1) * H]
                if d:  # the reverse direction runs T → 1: in flipped time it is a forward recursion
                    h_seq, g_seq = h_seq.flip(0), g_seq.flip(0)
                last = None if g_hn is None else g_hn[layer * D + d]
                w_hh = _param(rnn, "weight_hh", layer, d)
                deltas = rnn_state_grads(w_hh, h_seq, g_seq, last, rnn.nonlinearity)
                prev = torch.cat([torch.zeros_like(h_seq[:1]), h_seq[:-1]])  # unused by the h-form vjp
                items.append((w_hh, deltas, prev, h_seq))
                if layer > 0:
                    with torch.no_grad():
                        g_in = (dphi(h_seq) * deltas) @ _param(rnn, "weight_ih", layer, d).detach()
                    g_in = g_in.flip(0) if d else g_in
                    g_below = g_in if g_below is None else g_below + g_in
            g = g_below
        return items

    def penalty(self) -> torch.Tensor:
        """Ω over the forward passes seen since the last call (a 0-dim tensor differentiable in W_rec).

        Call after ``loss.backward()``. Consumes the captured passes and removes their hooks; sets
        ``last_value`` and ``last_n_valid`` (number of valid (step, sequence) pairs) for logging.
        Raises :class:`~gradprobe.errors.ProbeStateError` when no backward pass reached the RNN.
        """
        self._check_open("penalty")
        caps, self._captures = self._captures, []
        for cap in caps:
            cap.remove()
        parts = [item for c in caps for item in self._assemble(c)]
        if not parts:
            raise ProbeStateError(
                "PascanuRegularizer.penalty(): no gradient reached the recurrent states since the last call; "
                "run the forward pass and loss.backward() first"
            )
        total = sum(w.sum() for w in self.weights) * 0.0  # keeps the graph when no pair is valid
        n = 0
        for weight, deltas, prev, nxt in parts:
            terms, valid = omega_terms(weight, deltas, prev, nxt, self.vjp, self.bound)
            total = total + terms.sum()
            n += int(valid.sum())
        omega = total / max(n, 1)
        self.last_value = float(omega.detach())
        self.last_n_valid = n
        return omega

    def reset(self) -> None:
        """Forget the captured forward passes (e.g. after an evaluation pass run with grad enabled)."""
        for cap in self._captures:
            cap.remove()
        self._captures = []

    def close(self) -> None:
        """Remove every hook. Idempotent."""
        if self._closed:
            return
        self.reset()
        if self._module_handle is not None:
            self._module_handle.remove()
            self._module_handle = None
        self._closed = True

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise ProbeStateError(f"PascanuRegularizer.{what}() called after close()")

    def __enter__(self) -> PascanuRegularizer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        target = type(self.rnn).__name__ if self.rnn is not None else f"weight {tuple(self.weights[0].shape)}"
        return f"PascanuRegularizer({target}, bound={self.bound:g})"
