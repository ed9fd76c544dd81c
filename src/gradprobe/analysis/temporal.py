"""Temporal gradient flow through back-propagation through time (Hochreiter 1991; Pascanu, Mikolov & Bengio 2013).

Pascanu, Mikolov & Bengio 2013 (§2): ``∂E/∂θ = Σ_t Σ_{k≤t} (∂E_t/∂x_t)(∂x_t/∂x_k)(∂⁺x_k/∂θ)`` with
``∂x_t/∂x_k = Π_{t≥i>k} W_recᵀ diag(σ'(x_{i−1}))``: the term of lag ``t−k`` carries the influence of
step ``k`` on the loss at step ``t``; "long-term components" (large lag) vanishing exponentially fast is
the vanishing gradient problem in time.

Two views live here:

* :class:`TemporalFlow`: the *total* gradient reaching each state, ``‖∂E/∂h_k‖`` for every step ``k``
  (recorded by :class:`gradprobe.probe.temporal.TemporalRecorder`), with its fitted decay rate and
  horizon;
* :func:`lag_decomposition` / :func:`rnn_lag_decomposition`: the gradient of a vanilla RNN's weights
  split by lag ``t−k``, and the share of ``∂E/∂W`` carried by lags ``≥ τ`` (Pascanu et al.'s long-term
  components) as a curve over ``τ``.

Direction convention. Gradients flow against the direction of processing. For a forward-in-time layer
"``s`` steps back" means time index ``k = T−1−s``; for the reverse direction of a bidirectional layer,
which processes ``T−1 … 0``, it means ``k = s`` (its "earlier" is later in time). Profiles indexed by
``s`` are in *propagation order*; ``grad_norm`` and ``per_sequence`` are always in time order.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from gradprobe.errors import ConfigError
from gradprobe.functional.activations import activation
from gradprobe.functional.profiles import fit_decay_rate, gradient_horizon
from gradprobe.functional.rnn import step_vjp
from gradprobe.trace import TemporalFlow

__all__ = [
    "TemporalFlow",
    "fit_decay_rate",
    "gradient_horizon",
    "LagDecomposition",
    "lag_decomposition",
    "rnn_lag_decomposition",
]


# ---------------------------------------------------------------------------------- lag decomposition
@dataclass(frozen=True, eq=False)
class LagDecomposition:
    """``∂E/∂W`` of a vanilla RNN split by lag ``j = t − k`` (Pascanu, Mikolov & Bengio 2013, §2).

    ``G_j = Σ_{t−k=j} (∂E_t/∂h_t)(∂h_t/∂h_k)(∂⁺h_k/∂W)``, so ``Σ_j G_j = ∂E/∂W``. Arrays over ``j = 0…T−1``:

    Attributes:
        lag_norm_hh / lag_norm_ih / lag_norm_b: ``‖G_j‖_F`` for ``W_hh``, ``W_ih`` and the bias.
        long_term_hh / long_term_ih: ``‖Σ_{j≥τ} G_j‖ / ‖∂E/∂W‖`` for ``τ = 0…T−1`` (1 at ``τ = 0``).
        short_term_hh / short_term_ih: ``‖Σ_{j<τ} G_j‖ / ‖∂E/∂W‖`` (0 at ``τ = 0``).
        grad_hh, grad_ih, grad_b: the totals ``Σ_j G_j`` (numpy), equal to autograd's gradient.
        terms_hh, terms_ih: ``(T, H, H)`` / ``(T, H, I)`` the ``G_j`` themselves if ``keep_terms``.
    """

    lag_norm_hh: np.ndarray
    lag_norm_ih: np.ndarray
    lag_norm_b: np.ndarray
    long_term_hh: np.ndarray
    long_term_ih: np.ndarray
    short_term_hh: np.ndarray
    short_term_ih: np.ndarray
    grad_hh: np.ndarray
    grad_ih: np.ndarray
    grad_b: np.ndarray
    terms_hh: np.ndarray | None = None
    terms_ih: np.ndarray | None = None

    def long_term_share(self, tau: int, which: str = "hh") -> float:
        """``‖Σ_{lag≥τ} G‖ / ‖∂E/∂W‖``: how much of the gradient carries dependencies ``τ`` or more steps long."""
        curve = self.long_term_hh if which == "hh" else self.long_term_ih
        return float(curve[tau]) if tau < len(curve) else 0.0


def _tail_head(terms: torch.Tensor) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    total = terms.sum(0)
    tn = torch.linalg.vector_norm(total)
    tail = terms.flip(0).cumsum(0).flip(0)  # Σ_{j≥τ}
    head = torch.cat([torch.zeros_like(terms[:1]), terms.cumsum(0)[:-1]])  # Σ_{j<τ}
    dims = tuple(range(1, terms.dim()))
    if tn == 0:
        z = np.zeros(terms.shape[0])
        return z, z.copy(), total
    long = (torch.linalg.vector_norm(tail, dim=dims) / tn).cpu().numpy()
    short = (torch.linalg.vector_norm(head, dim=dims) / tn).cpu().numpy()
    return long, short, total


def lag_decomposition(
    inputs: torch.Tensor,
    states: torch.Tensor,
    h0: torch.Tensor,
    w_hh: torch.Tensor,
    state_grad: torch.Tensor,
    nonlinearity: str = "tanh",
    *,
    keep_terms: bool = False,
) -> LagDecomposition:
    """Split ``∂E/∂W`` of ``h_k = σ(W_ih x_k + W_hh h_{k−1} + b)`` by lag (Pascanu et al. 2013, §2).

    Args:
        inputs: ``(T, B, I)`` the inputs ``x_k`` (time-major).
        states: ``(T, B, H)`` the states ``h_k`` the forward pass produced.
        h0: ``(B, H)`` the initial state.
        w_hh: ``(H, H)`` the recurrent weight.
        state_grad: ``(T, B, H)`` ``∂E/∂h_t`` through the *direct* path only (the loss's gradient with
            respect to the output at ``t``, plus ``∂E/∂h_n`` at ``t = T−1``): the ``∂E_t/∂x_t`` factors.
        nonlinearity: ``"tanh"`` or ``"relu"`` (``σ'`` is computed from ``h_k``: ``1 − h²`` or ``h > 0``).
        keep_terms: also return every ``G_j`` (memory ``T·H·(H+I)``).

    Algorithm: all sources ``t`` are propagated back together, one lag per iteration:
    ``D_0 = state_grad``, ``D_{j+1}[k] = W_hhᵀ (σ'_{k+1} ⊙ D_j[k+1])`` (the BPTT step
    :func:`gradprobe.functional.rnn.step_vjp`, applied to every ``k`` at once; summing ``D_j`` over ``j``
    gives :func:`gradprobe.functional.rnn.bptt`'s total gradient); the pre-activation adjoints
    ``P_j[k] = σ'_k ⊙ D_j[k]`` give ``G_j(W_hh) = Σ_{k,b} P_j[k]ᵀ h_{k−1}``, ``G_j(W_ih) = Σ P_j[k]ᵀ x_k``,
    ``G_j(b) = Σ P_j[k]``. Cost ``O(T²·B·H²)`` (a ``T``-times larger backward pass); memory ``O(T·B·H)``.

    >>> import torch
    >>> rnn = torch.nn.RNN(2, 3).double()
    >>> x = torch.randn(6, 1, 2, dtype=torch.float64)
    >>> dec = rnn_lag_decomposition(rnn, x, lambda out, h: out[-1].sum())
    >>> bool(abs(dec.long_term_hh[0] - 1) < 1e-12), dec.lag_norm_hh.shape
    (True, (6,))
    """
    if nonlinearity not in ("tanh", "relu"):
        raise ConfigError(f"lag_decomposition(nonlinearity={nonlinearity!r}) must be 'tanh' or 'relu'")
    if states.dim() != 3 or inputs.dim() != 3 or state_grad.shape != states.shape:
        raise ConfigError(
            "lag_decomposition expects time-major inputs (T, B, I), states (T, B, H) and state_grad of the "
            f"states' shape; got {tuple(inputs.shape)}, {tuple(states.shape)}, {tuple(state_grad.shape)}"
        )
    T = states.shape[0]
    with torch.no_grad():
        dsig = activation(nonlinearity).grad_from_output(states)  # σ'(a_k) from h_k: 1 − h² or 1[h > 0], (T, B, H)
        h_prev = torch.cat([h0.unsqueeze(0), states[:-1]], 0)  # (T, B, H)
        terms_hh, terms_ih, terms_b = [], [], []
        D = state_grad  # (T−j, B, H): sources t = k + j for k = 0…T−1−j
        for j in range(T):
            P = dsig[: T - j] * D  # (T−j, B, H) adjoint of the pre-activation a_k, lag j
            Pf = P.reshape(-1, P.shape[-1])
            terms_hh.append(Pf.t() @ h_prev[: T - j].reshape(-1, h_prev.shape[-1]))
            terms_ih.append(Pf.t() @ inputs[: T - j].reshape(-1, inputs.shape[-1]))
            terms_b.append(Pf.sum(0))
            if j < T - 1:
                D = step_vjp(w_hh, D[1:], dsig[1 : T - j], "h")  # W_hhᵀ (σ'_{k+1} ⊙ D_j[k+1]), row vectors
        th, ti, tb = torch.stack(terms_hh), torch.stack(terms_ih), torch.stack(terms_b)
        long_hh, short_hh, g_hh = _tail_head(th)
        long_ih, short_ih, g_ih = _tail_head(ti)

        def norms(t):
            return torch.linalg.vector_norm(t.flatten(1), dim=1).cpu().numpy()

        return LagDecomposition(
            lag_norm_hh=norms(th),
            lag_norm_ih=norms(ti),
            lag_norm_b=norms(tb),
            long_term_hh=long_hh,
            long_term_ih=long_ih,
            short_term_hh=short_hh,
            short_term_ih=short_ih,
            grad_hh=g_hh.cpu().numpy(),
            grad_ih=g_ih.cpu().numpy(),
            grad_b=tb.sum(0).cpu().numpy(),
            terms_hh=th.cpu().numpy() if keep_terms else None,
            terms_ih=ti.cpu().numpy() if keep_terms else None,
        )


def rnn_lag_decomposition(rnn: nn.RNN, input: torch.Tensor, loss_fn, hx: torch.Tensor | None = None, *, keep_terms: bool = False) -> LagDecomposition:
    """Lag decomposition of ``∂E/∂W`` for a single-layer, unidirectional ``nn.RNN`` and a loss.

    Args:
        rnn: ``nn.RNN`` (tanh or relu, ``num_layers=1``, not bidirectional, either ``batch_first``).
        input: ``(T, B, I)`` (or ``(B, T, I)`` with ``batch_first``), padded (not packed).
        loss_fn: ``loss_fn(output, h_n) -> scalar E``; e.g. a loss at the last step only,
            ``lambda out, h: crit(head(out[-1]), y)``, or summed over steps (``E = Σ_t E_t``).
        hx: ``(1, B, H)`` initial state or ``None``.

    The fused module runs once; ``∂E/∂output`` and ``∂E/∂h_n`` come from ``torch.autograd.grad`` (the
    model's ``.grad`` is left untouched) and feed :func:`lag_decomposition`. Parameters of ``loss_fn``
    (e.g. a read-out layer) are treated as constants.
    """
    if not isinstance(rnn, nn.RNN) or rnn.num_layers != 1 or rnn.bidirectional or getattr(rnn, "proj_size", 0):
        raise ConfigError(
            "rnn_lag_decomposition needs a single-layer, unidirectional nn.RNN (the lag terms of a layer "
            "fed by another recurrent layer mix both layers' lags); got " + repr(rnn)
        )
    if isinstance(input, nn.utils.rnn.PackedSequence) or input.dim() != 3:
        raise ConfigError("rnn_lag_decomposition expects a padded 3-D input tensor, not a PackedSequence")
    x = input.detach()
    with torch.enable_grad():
        out, h_n = rnn(x, hx)
        E = loss_fn(out, h_n)
        if not isinstance(E, torch.Tensor) or E.numel() != 1:
            raise ConfigError("rnn_lag_decomposition: loss_fn(output, h_n) must return a scalar tensor")
        g_out, g_hn = torch.autograd.grad(E, (out, h_n), allow_unused=True)
    if rnn.batch_first:
        x, out = x.transpose(0, 1), out.transpose(0, 1)
        g_out = g_out.transpose(0, 1) if g_out is not None else None
    states = out.detach()
    g = torch.zeros_like(states) if g_out is None else g_out.clone()
    if g_hn is not None:
        g[-1] += g_hn[0]
    h0 = torch.zeros_like(states[0]) if hx is None else hx[0].detach()
    return lag_decomposition(x, states, h0, rnn.weight_hh_l0.detach(), g, rnn.nonlinearity, keep_terms=keep_terms)
