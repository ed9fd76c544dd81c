"""Pascanu's Ω: a regulariser that keeps the back-propagated error's norm constant through time.

Pascanu, Mikolov & Bengio 2013, "On the difficulty of training recurrent neural networks", §3.3
("Vanishing gradient regularization") and the authors' code (github pascanur/trainingRNNs, ``RNN.py``)
write Ω in two ways, and both are offered (``form=``):

* ``form="code"`` (default), what ``RNN.py`` computes and what the published experiments ran:
  **squared** norms, and the **mean** over the valid (step, sequence) pairs,

      Ω = mean_{valid (k, b)} ( ‖δ_{k+1} · ∂x_{k+1}/∂x_k‖² / ‖δ_{k+1}‖² − 1 )²;

* ``form="paper"``, the formula printed in the paper: **plain** norms, **summed** over the steps k
  (and, for a batch, averaged over its sequences),

      Ω = mean_b Σ_k ( ‖δ_{k+1} · ∂x_{k+1}/∂x_k‖ / ‖δ_{k+1}‖ − 1 )².

Here δ_{k+1} = ∂E/∂x_{k+1}. The two are not rescalings of each other (the code's form is a mean, the
paper's grows with the length T; (r² − 1)² ≠ (r − 1)²): on :class:`PascanuRegularizer`'s example
(20 steps, 4 sequences) they give 0.47 and 4.06. Both use the paper's *immediate* derivative: δ_{k+1} and the states are held
constant and only W_rec receives ∂Ω/∂W_rec. As in the authors' code, pairs with
‖δ_{k+1}‖² < 1e-20 (``bound``) are skipped in both forms; a step counts as a transition k → k+1 for
k+1 = 1 … T (the first one leaves the initial state).

Two recurrences are supported, both through a *vector-Jacobian product* ``vjp(W, δ, x_prev, x_next)``
returning ``δ · ∂x_{k+1}/∂x_k`` (batched over leading dimensions, differentiable in ``W`` only), both
built on :func:`gradprobe.functional.rnn.step_vjp`:

* ``nn.RNN`` (state h): h_{k+1} = φ(W_ih u + W_hh h_k + b) ⇒ δ·∂h_{k+1}/∂h_k = W_hhᵀ(φ'(a_{k+1}) ⊙ δ),
  φ'(a_{k+1}) read from the saved output (tanh: 1 − h², relu: 1[h > 0]; the activation table of
  :mod:`gradprobe.functional.activations`) and held constant, as the authors' code does (:func:`rnn_vjp`).
* the paper's §2 form (state x): x_{k+1} = W_rec σ(x_k) + W_in u + b ⇒ δ·∂x_{k+1}/∂x_k = σ'(x_k) ⊙ W_recᵀδ
  (:func:`pascanu_vjp`), or any user recurrence with its own ``vjp``.

Fused ``nn.RNN`` modules cannot be looked into, so :class:`PascanuRegularizer` captures the direct
output gradients g_t = ∂E/∂out_t (and ∂E/∂h_n) with tensor hooks and recovers the total
δ_t = ∂E/∂h_t by back-propagation through time, δ_t = g_t + W_hhᵀ(φ'(a_{t+1}) ⊙ δ_{t+1})
(:func:`rnn_state_grads`, i.e. :func:`gradprobe.functional.rnn.bptt`); stacked layers pass
g = Σ_d W_ihᵀ(φ' ⊙ δ) down (their state sequences come from :func:`gradprobe.functional.rnn.layer_outputs`),
bidirectional ones run the reverse direction in flipped time.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from gradprobe.errors import ConfigError, ProbeStateError
from gradprobe.functional.activations import activation as _activation
from gradprobe.functional.rnn import bptt, layer_outputs, step_vjp

__all__ = [
    "Vjp",
    "FORMS",
    "rnn_vjp",
    "pascanu_vjp",
    "omega_terms",
    "pascanu_omega",
    "rnn_state_grads",
    "PascanuRegularizer",
]

BOUND = 1e-20  # the authors' `state['bound']`: smaller ‖∂E/∂x_{k+1}‖² are skipped
FORMS = ("code", "paper")  # see the module docstring

Vjp = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _check_form(form: str) -> str:
    if form not in FORMS:
        raise ConfigError(
            f"form={form!r}: choose 'code' (the authors' RNN.py: squared norms, mean over valid steps) or "
            "'paper' (the printed formula: plain norms, summed over steps)"
        )
    return form


def _rnn_act_grad(nonlinearity: str) -> Callable[[torch.Tensor], torch.Tensor]:
    # derivative from the *output* h = φ(a): tanh' = 1 − h², relu' = 1[h > 0]
    if nonlinearity not in ("tanh", "relu"):
        raise ConfigError(f"nn.RNN nonlinearity {nonlinearity!r} is not supported; use 'tanh' or 'relu'")
    return _activation(nonlinearity).grad_from_output


def _pre_act_grad(activation: str | Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    # derivative σ'(x) of the activation at its *input* x
    if callable(activation):
        return activation
    return _activation(activation, where=" (or pass σ' as a function)").grad


def rnn_vjp(nonlinearity: str = "tanh") -> Vjp:
    """``vjp`` for h_{k+1} = φ(W_ih u + W h_k + b) (``nn.RNN``): returns ``W_hhᵀ(φ'(a_{k+1}) ⊙ δ)``.

    Shapes: ``W (H, H)``, ``δ, x_prev, x_next (..., H)`` → ``(..., H)``; φ' comes from ``x_next = h_{k+1}``.
    """
    dphi = _rnn_act_grad(nonlinearity)

    def vjp(weight, delta, prev, nxt):
        return step_vjp(weight, delta, dphi(nxt), "h")

    return vjp


def pascanu_vjp(activation: str | Callable[[torch.Tensor], torch.Tensor] = "sigmoid") -> Vjp:
    """``vjp`` for Pascanu et al. 2013's x_{k+1} = W_rec σ(x_k) + W_in u + b: returns ``σ'(x_k) ⊙ W_recᵀδ``.

    ``activation`` is a name of the activation table (``"sigmoid"``, ``"tanh"``, ``"relu"``,
    ``"linear"``, ...) or a function giving σ'(x). Shapes: ``W (N, N)``, ``δ, x_prev, x_next (..., N)`` → ``(..., N)``.
    """
    dsigma = _pre_act_grad(activation)

    def vjp(weight, delta, prev, nxt):
        return step_vjp(weight, delta, dsigma(prev), "x")

    return vjp


def omega_terms(
    weight: torch.Tensor,
    deltas: torch.Tensor,
    prev: torch.Tensor,
    nxt: torch.Tensor,
    vjp: Vjp,
    bound: float = BOUND,
    form: str = "code",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(step, sequence) Ω_k and the validity mask.

    Args:
        weight: W_rec (differentiable; the only input that carries gradient).
        deltas: ``(T, B, N)`` ∂E/∂x_{k+1} for the T transitions (treated as constants).
        prev, nxt: ``(T, B, N)`` x_k and x_{k+1} (constants).
        form: ``"code"``: Ω_k = (‖δJ‖²/‖δ‖² − 1)²; ``"paper"``: Ω_k = (‖δJ‖/‖δ‖ − 1)² (module docstring).
    Returns ``(terms (T, B), valid (T, B) bool)``; invalid entries (‖δ‖² < ``bound``) have term 0.
    """
    _check_form(form)
    deltas, prev, nxt = deltas.detach(), prev.detach(), nxt.detach()
    den = deltas.pow(2).sum(-1)  # (T, B) ‖δ‖²
    valid = den >= bound
    v = vjp(weight, deltas, prev, nxt)  # (T, B, N) δ·J
    safe = torch.where(valid, den, torch.ones_like(den))  # no 0/0 in the unused branch's gradient
    if form == "code":
        ratio = v.pow(2).sum(-1) / safe
    else:  # the norm's gradient at v = 0 is 0 (a subgradient), so dead units give no NaN
        ratio = torch.linalg.vector_norm(v, dim=-1) / safe.sqrt()
    ratio = torch.where(valid, ratio, torch.ones_like(ratio))
    return (ratio - 1.0) ** 2, valid


def _reduce(total: torch.Tensor, n_valid: int, n_sequences: int, form: str) -> torch.Tensor:
    # code: mean over the valid (step, sequence) pairs; paper: Σ over steps, mean over sequences
    return total / max(n_valid if form == "code" else n_sequences, 1)


def pascanu_omega(weight, deltas, prev, nxt, vjp: Vjp, bound: float = BOUND, form: str = "code") -> torch.Tensor:
    """Ω of one batch of transitions (0 when no pair is valid). See :func:`omega_terms` and the module docstring.

    ``form="code"``: mean of Ω_k over the valid (step, sequence) pairs; ``form="paper"``: Σ_k Ω_k per
    sequence, averaged over the ``B`` sequences.

    >>> W = torch.eye(3, dtype=torch.float64) * 2.0
    >>> d = torch.ones(2, 1, 3, dtype=torch.float64)            # two steps, one sequence
    >>> float(pascanu_omega(W, d, d, d, pascanu_vjp("linear")))  # ‖2δ‖²/‖δ‖² = 4 → (4 − 1)² = 9, mean
    9.0
    >>> float(pascanu_omega(W, d, d, d, pascanu_vjp("linear"), form="paper"))  # (2 − 1)² = 1, summed
    2.0
    """
    terms, valid = omega_terms(weight, deltas, prev, nxt, vjp, bound, form)
    return _reduce(terms.sum(), int(valid.sum()), deltas.shape[1], form)


@torch.no_grad()
def rnn_state_grads(
    w_hh: torch.Tensor,
    outputs: torch.Tensor,
    g_out: torch.Tensor,
    g_last: torch.Tensor | None = None,
    nonlinearity: str = "tanh",
) -> torch.Tensor:
    """Total ∂E/∂h_t of a single-layer ``nn.RNN`` from the direct gradients on its outputs.

    δ_T = g_T + g_last,  δ_t = g_t + W_hhᵀ(φ'(a_{t+1}) ⊙ δ_{t+1})  (back-propagation through time,
    :func:`gradprobe.functional.rnn.bptt` with φ' read from the outputs).

    Args (time-major): w_hh ``(H, H)``; outputs ``(T, B, H)`` = h_1 … h_T; g_out ``(T, B, H)`` = ∂E/∂out_t
    as the loss sees the output sequence; g_last ``(B, H)`` = ∂E/∂h_n (or None). Returns ``(T, B, H)``.
    """
    return bptt(w_hh.detach(), g_out, _rnn_act_grad(nonlinearity)(outputs), g_last, "h")


# ---------------------------------------------------------------------------------------------- capture
@dataclass(eq=False)
class _Capture:
    """One forward pass: constants for Ω and the gradients the hooks saw (all time-major).

    nn.RNN: ``states`` = per-layer output sequences ``(T, B, D·H)``, ``grads = [∂E/∂out, ∂E/∂h_n]``.
    Hand-written loop: ``states = [x_0 … x_{T−1}, x_1 … x_T]`` stacked, ``grads`` = δ_1 … δ_T.
    """

    states: list[torch.Tensor]
    grads: list[torch.Tensor | None]
    n_sequences: int  # B, the batch of this pass (the paper's form averages over it)
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
    clipping, usually fails (footnote 4). With the default ``form="code"`` Ω is a mean over (step,
    sequence) pairs, so α does not depend on the sequence length or batch size (the authors' α = 2
    or 4 is for this form); ``form="paper"`` sums over steps (module docstring), so its scale grows
    with T.

    Multi-layer and bidirectional ``nn.RNN``: every layer's and direction's W_hh is regularised and
    Ω is the mean over all their valid (step, sequence) pairs (``form="paper"``: the sum over all of
    them, averaged over the batch's sequences); the lower layers' state sequences are
    recomputed step by step inside the forward hook (no grad; about one extra forward of those
    layers), and their ∂E/∂h follows from the layer above through W_ih. Between-layer dropout in
    training mode is refused (its masks cannot be observed).

    Limits: ``nn.RNN`` only (tanh or relu); padded, not packed, input; batched or not, ``batch_first``
    either way. Several forward passes before one :meth:`penalty` (gradient accumulation) are
    pooled: Ω is the mean over all their valid pairs (``form="paper"``: over all their sequences). Padding steps are not masked (their ‖∂E/∂h‖ is
    usually 0 and the bound skips them). LSTM/GRU have no single W_rec Jacobian of this form: Ω is
    not defined for them here.

    >>> torch.manual_seed(0) and None
    >>> rnn, head = nn.RNN(3, 8), nn.Linear(8, 1)
    >>> reg = PascanuRegularizer(rnn)
    >>> out, h_n = rnn(torch.randn(20, 4, 3))        # (T, B, H)
    >>> head(out[-1]).pow(2).mean().backward()
    >>> omega = reg.penalty()
    >>> (2.0 * omega).backward()                      # only rnn.weight_hh_l0.grad changes
    >>> reg.last_n_valid, round(float(omega.detach()), 2)
    (80, 0.47)
    >>> reg.close()

    The same pass with the paper's printed formula (plain norms, summed over the 20 steps):

    >>> torch.manual_seed(0) and None
    >>> rnn, head = nn.RNN(3, 8), nn.Linear(8, 1)
    >>> with PascanuRegularizer(rnn, form="paper") as reg:
    ...     out, h_n = rnn(torch.randn(20, 4, 3))
    ...     head(out[-1]).pow(2).mean().backward()
    ...     round(float(reg.penalty().detach()), 2)
    4.06
    """

    def __init__(self, rnn: nn.Module, *, bound: float = BOUND, form: str = "code"):
        rnn = _single_rnn(rnn)
        D = 2 if rnn.bidirectional else 1
        w_hh = [_param(rnn, "weight_hh", layer, d) for layer in range(rnn.num_layers) for d in range(D)]
        self._init(w_hh, rnn_vjp(rnn.nonlinearity), bound, form)
        self.rnn: nn.RNN | None = rnn
        self._module_handle = rnn.register_forward_hook(self._forward_hook)

    @classmethod
    def for_recurrence(cls, weight: torch.Tensor, vjp: Vjp, *, bound: float = BOUND, form: str = "code") -> PascanuRegularizer:
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
        self._init([weight], vjp, bound, form)
        self.rnn = None
        self._module_handle = None
        return self

    def _init(self, weights: list[torch.Tensor], vjp: Vjp, bound: float, form: str) -> None:
        if not (bound >= 0):
            raise ConfigError(f"bound={bound} must be >= 0 (the authors use 1e-20)")
        self.form = _check_form(form)
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
            # the lower layers' outputs (the fused kernel does not expose them), recomputed: time-major (T, B, D·H)
            hx = args[1] if len(args) > 1 else None
            with torch.no_grad():
                states = layer_outputs(module, inp.detach(), None if hx is None else hx.detach(),
                                       layers=module.num_layers - 1)
        states.append(time_major(out.detach()))  # the top layer's outputs are the module's output
        cap = _Capture(states=states, grads=[None, None], n_sequences=1 if unbatched else out.shape[0 if module.batch_first else 1])
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
            n_sequences=xs[0].shape[0],
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
                    with torch.no_grad():  # Σ_d W_ihᵀ(φ'(a_t) ⊙ δ_t): the same step, through the input weight
                        g_in = step_vjp(_param(rnn, "weight_ih", layer, d).detach(), deltas, dphi(h_seq), "h")
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
            terms, valid = omega_terms(weight, deltas, prev, nxt, self.vjp, self.bound, self.form)
            total = total + terms.sum()
            n += int(valid.sum())
        # one captured pass = one batch of sequences (all its layers and directions regularise the same ones)
        n_seq = sum(c.n_sequences for c in caps if c.grads and any(g is not None for g in c.grads))
        omega = _reduce(total, n, n_seq, self.form)
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
        return f"PascanuRegularizer({target}, bound={self.bound:g}, form={self.form!r})"
