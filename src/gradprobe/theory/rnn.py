"""Recurrent networks: Pascanu et al. 2013's conditions, the eigenvalue view of W^t, and the Jacobians of
a recurrent map along an actual sequence (input to :func:`gradprobe.functional.lyapunov.lyapunov_spectrum`).

Back-propagation through time multiplies Jacobians: ``∂x_t/∂x_k = Π_{i=k+1..t} J_i`` with
``J_i = W_rec·diag(σ'(x_{i−1}))`` for ``x_t = W_rec σ(x_{t−1}) + W_in u_t + b`` (Pascanu, Mikolov &
Bengio 2013, §2), or ``J_i = diag(σ'(a_i))·W_hh`` for ``nn.RNN``'s ``h_t = σ(W_ih u_t + W_hh h_{t−1} + b)``
(both built by :func:`gradprobe.functional.rnn.step_jacobian`). With ``γ = sup|σ'|`` (the activation
table of :mod:`gradprobe.functional.activations`) and ``λ₁ = ‖W_rec‖₂``, every factor has
``‖J_i‖ ≤ η = γλ₁`` (Pascanu et al. 2013, §2.1), so

* ``λ₁ < 1/γ`` is *sufficient* for vanishing: ``‖∂x_t/∂x_k‖ ≤ η^{t−k} → 0``;
* ``λ₁ > 1/γ`` is *necessary* for explosion, not sufficient: the bound is exact but loose
  (sigmoid, λ₁ = 3.5, T = 60: measured ln‖ΠJ‖ = −60.7 vs bound −8.0; ``shared/references.md``).

**Gated cells (LSTM, GRU).** Their state Jacobian is not ``W_hh·diag(σ')``: it contains the forget
gate (LSTM's ``∂c_t/∂c_{t−1} = diag(f_t)`` plus terms through every gate), so ``γλ₁`` computed on a
recurrent block bounds nothing. For gated modules :func:`rnn_condition` still reports λ₁ and ρ of
each gate's recurrent block (the candidate block in the main fields), but marks the result
``gated=True, bound_valid=False``: neither "vanishing guaranteed" nor "explosion possible" follows.
What the numbers *do* say: each block's λ₁ bounds how strongly that gate's pre-activation responds
to a change of h_{t−1}. The LSTM cell path ``c_t = f_t ⊙ c_{t−1} + …`` carries the gradient with the
factor f_t, which can stay near 1 whatever λ₁ is; that path is why LSTMs avoid vanishing gradients
(Hochreiter & Schmidhuber 1997). Use the measured temporal flow or the Lyapunov spectrum of the
actual state Jacobian instead.
"""
from __future__ import annotations

import html
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from gradprobe.errors import ConfigError
from gradprobe.functional.activations import GAMMA
from gradprobe.functional.activations import activation as _activation
from gradprobe.functional.rnn import layer_outputs, step_jacobian

__all__ = [
    "GAMMA",
    "RNNCondition",
    "rnn_condition",
    "rnn_conditions",
    "EigenGrowth",
    "eigen_growth",
    "tanh_map_jacobians",
    "rnn_jacobians",
]

_GATE_NAMES = {"LSTM": ("input", "forget", "cell", "output"), "GRU": ("reset", "update", "new")}
_GATED_NOTE = (
    "gated cell: its state Jacobian contains the gates (LSTM: diag(f_t) on the cell path), so γ·λ₁ of a "
    "recurrent block is not a bound; neither 'vanishing guaranteed' nor 'explosion possible' follows"
)


@dataclass(frozen=True)
class RNNCondition:
    """Pascanu's quantities for one recurrent weight (see the module docstring).

    ``lambda1``: largest singular value of W_rec; ``rho``: spectral radius; ``gamma``: sup|σ'|;
    ``eta = gamma·lambda1``; ``vanishing_guaranteed``: λ₁ < 1/γ (sufficient); ``explosion_possible``:
    λ₁ > 1/γ (necessary only). For gated cells ``bound_valid`` is False and both booleans are False.
    """

    lambda1: float
    rho: float
    gamma: float
    eta: float
    vanishing_guaranteed: bool
    explosion_possible: bool
    gated: bool = False
    bound_valid: bool = True
    layer: int = 0
    direction: int = 0
    blocks: dict = field(default_factory=dict)  # gated: gate name -> (λ₁, ρ) of its recurrent block
    note: str = ""

    def bound(self, t_minus_k) -> np.ndarray | float:
        """Upper bound η^(t−k) on ‖∂x_t/∂x_k‖₂ (scalar or array in, same out). NaN for gated cells."""
        lag = np.asarray(t_minus_k, dtype=np.float64)
        if np.any(lag < 0):
            raise ConfigError(f"t − k must be >= 0; got {t_minus_k}")
        out = np.full(lag.shape, np.nan) if not self.bound_valid else self.eta**lag
        return float(out) if out.ndim == 0 else out

    def __str__(self) -> str:
        """In words: the numbers, which of Pascanu et al.'s (2013) conditions holds, and what follows."""
        where = f"layer {self.layer}" + (", reverse direction" if self.direction else "")
        lines = [f"recurrent weight ({where}): λ₁ = ‖W_rec‖₂ = {self.lambda1:.4g}, spectral radius ρ = {self.rho:.4g}, "
                 f"γ = sup|σ'| = {self.gamma:.4g}, η = γλ₁ = {self.eta:.4g}"]
        if not self.bound_valid:
            lines.append("  " + (self.note or "the bound does not apply"))
            lines += [f"  {gate} gate block: λ₁ = {l1:.4g}, ρ = {rho:.4g}" for gate, (l1, rho) in self.blocks.items()]
        elif self.vanishing_guaranteed:
            lines.append(f"  λ₁ < 1/γ = {1 / self.gamma:.4g}: vanishing is guaranteed (Pascanu et al. 2013, sufficient "
                         f"condition): ‖∂x_t/∂x_k‖ ≤ η^(t−k), e.g. ≤ {self.eta ** 10:.3g} over 10 steps")
        elif self.explosion_possible:
            lines.append(f"  λ₁ > 1/γ = {1 / self.gamma:.4g}: explosion is possible (Pascanu et al. 2013, necessary "
                         "condition only; the bound η^(t−k) grows, measure the actual flow)")
        else:
            lines.append(f"  λ₁ = 1/γ = {1 / self.gamma:.4g}: on the boundary; neither condition decides")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        return "<pre style=\"white-space:pre-wrap\">" + html.escape(str(self)) + "</pre>"


def _spectral(w: torch.Tensor) -> tuple[float, float]:
    w64 = w.detach().to(torch.float64).cpu()
    lam1 = float(torch.linalg.matrix_norm(w64, ord=2))
    rho = float(torch.linalg.eigvals(w64).abs().max())
    return lam1, rho


def _gamma(activation) -> float:
    if isinstance(activation, (int, float)) and not isinstance(activation, bool):
        if not activation > 0:
            raise ConfigError(f"gamma (sup|σ'|) must be > 0; got {activation}")
        return float(activation)
    if not isinstance(activation, str) or activation not in GAMMA:
        raise ConfigError(f"unknown recurrent activation {activation!r}; choose one of {sorted(GAMMA)} or pass γ as a number")
    return GAMMA[activation]


def _from_matrix(w: torch.Tensor, gamma: float, **kw) -> RNNCondition:
    if w.dim() != 2 or w.shape[0] != w.shape[1]:
        raise ConfigError(f"a recurrent weight must be a square matrix; got shape {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()):
        raise ConfigError("the recurrent weight contains NaN or Inf")
    lam1, rho = _spectral(w)
    return RNNCondition(
        lambda1=lam1,
        rho=rho,
        gamma=gamma,
        eta=gamma * lam1,
        vanishing_guaranteed=lam1 < 1.0 / gamma,
        explosion_possible=lam1 > 1.0 / gamma,
        **kw,
    )


def _weight_name(module: nn.RNNBase, layer: int, direction: int) -> str:
    if not 0 <= layer < module.num_layers:
        raise ConfigError(f"layer must be in [0, {module.num_layers}); got {layer}")
    if direction not in ((0, 1) if module.bidirectional else (0,)):
        raise ConfigError(f"direction must be 0{' or 1' if module.bidirectional else ''} for this module; got {direction}")
    return f"weight_hh_l{layer}" + ("_reverse" if direction == 1 else "")


def rnn_condition(weight_or_module, activation="tanh", *, layer: int = 0, direction: int = 0) -> RNNCondition:
    """λ₁, ρ, γ and Pascanu's sufficient/necessary conditions for one recurrent weight.

    Args:
        weight_or_module: a square tensor W_rec ``(H, H)``, or an ``nn.RNN`` (reads
            ``weight_hh_l{layer}[_reverse]`` and its ``nonlinearity``), or an ``nn.LSTM``/``nn.GRU``
            (gated: numbers per gate block, ``bound_valid=False``; see the module docstring).
        activation: for a tensor, one of ``GAMMA``'s keys or γ itself as a number; ignored for modules.
        layer, direction: which layer / direction of a module (``rnn_conditions`` gives all).

    >>> c = rnn_condition(3.5 * torch.eye(4), "sigmoid")
    >>> c.lambda1, c.eta, c.vanishing_guaranteed, c.explosion_possible, c.bound(2)
    (3.5, 0.875, True, False, 0.765625)
    """
    if isinstance(weight_or_module, torch.Tensor):
        return _from_matrix(weight_or_module, _gamma(activation))
    if isinstance(weight_or_module, (nn.LSTM, nn.GRU)):
        m = weight_or_module
        w = getattr(m, _weight_name(m, layer, direction))
        if isinstance(m, nn.LSTM) and m.proj_size > 0:
            raise ConfigError("LSTM with proj_size > 0 has rectangular recurrent blocks; Pascanu's condition does not apply")
        kind = type(m).__name__
        names = _GATE_NAMES[kind]
        h = m.hidden_size
        blocks = {n: _spectral(w[i * h : (i + 1) * h]) for i, n in enumerate(names)}
        cand = w[2 * h : 3 * h]  # LSTM "cell" (g) / GRU "new" (n): the tanh block playing W_rec's role
        base = _from_matrix(cand, 1.0)
        return RNNCondition(
            lambda1=base.lambda1,
            rho=base.rho,
            gamma=1.0,
            eta=base.eta,
            vanishing_guaranteed=False,
            explosion_possible=False,
            gated=True,
            bound_valid=False,
            layer=layer,
            direction=direction,
            blocks=blocks,
            note=_GATED_NOTE,
        )
    if isinstance(weight_or_module, nn.RNN):
        m = weight_or_module
        w = getattr(m, _weight_name(m, layer, direction))
        return _from_matrix(w, GAMMA[m.nonlinearity], layer=layer, direction=direction)
    raise ConfigError(
        f"rnn_condition expects a square tensor, nn.RNN, nn.LSTM or nn.GRU; got {type(weight_or_module).__name__}"
    )


def rnn_conditions(module: nn.RNNBase) -> tuple[RNNCondition, ...]:
    """:func:`rnn_condition` for every layer and direction of ``module``, in (layer, direction) order."""
    if not isinstance(module, (nn.RNN, nn.LSTM, nn.GRU)):
        raise ConfigError(f"rnn_conditions expects nn.RNN, nn.LSTM or nn.GRU; got {type(module).__name__}")
    dirs = (0, 1) if module.bidirectional else (0,)
    return tuple(rnn_condition(module, layer=l, direction=d) for l in range(module.num_layers) for d in dirs)


@dataclass(frozen=True)
class EigenGrowth:
    """The eigenvalue view of ``W^t = Q Λ^t Q⁻¹`` (Pascanu et al. 2013, §2.1; Bengio, Simard & Frasconi 1994).

    ``eigenvalues``: complex ``(H,)`` sorted by decreasing modulus; ``log_rate``: ``ln|μ_i|`` per step
    (> 0 grows, < 0 decays); ``growing``/``decaying``: boolean masks (|μ| > 1, |μ| < 1);
    ``steps_to_e``: 1/|ln|μ_i||, the steps for a factor e (inf at |μ| = 1);
    ``t``: ``(T+1,)`` powers 0…T; ``norm``: ``‖W^t‖₂``; ``rho_t``: ``ρ^t``. For a normal W the two
    coincide; a non-normal W can have ``‖W^t‖ ≫ ρ^t`` for a while (transient growth) although
    ``‖W^t‖^{1/t} → ρ`` (Gelfand's formula).
    """

    eigenvalues: np.ndarray
    log_rate: np.ndarray
    growing: np.ndarray
    decaying: np.ndarray
    steps_to_e: np.ndarray
    t: np.ndarray
    norm: np.ndarray
    rho_t: np.ndarray

    @property
    def rho(self) -> float:
        return float(np.abs(self.eigenvalues[0]))


def eigen_growth(W, t: int) -> EigenGrowth:
    """Eigenvalues of W and ‖W^s‖₂ vs ρ^s for s = 0…t (float64).

    >>> g = eigen_growth(torch.diag(torch.tensor([2.0, 0.5])), 3)
    >>> g.log_rate.round(4).tolist(), g.growing.tolist(), g.norm.tolist()
    ([0.6931, -0.6931], [True, False], [1.0, 2.0, 4.0, 8.0])
    """
    w = torch.as_tensor(W).detach().to(torch.float64).cpu()
    if w.dim() != 2 or w.shape[0] != w.shape[1]:
        raise ConfigError(f"W must be a square matrix; got shape {tuple(w.shape)}")
    if not isinstance(t, (int, np.integer)) or t < 0:
        raise ConfigError(f"t must be a non-negative integer (the largest power); got {t!r}")
    mu = torch.linalg.eigvals(w).numpy()
    mu = mu[np.argsort(-np.abs(mu), kind="stable")]
    mod = np.abs(mu)
    with np.errstate(divide="ignore"):
        rate = np.log(mod)
        steps = np.where(rate == 0, np.inf, 1.0 / np.abs(rate))
    norms = np.empty(t + 1)
    p = torch.eye(w.shape[0], dtype=torch.float64)
    for s in range(t + 1):
        norms[s] = float(torch.linalg.matrix_norm(p, ord=2))
        p = p @ w
    rho = float(mod[0]) if mod.size else 0.0
    ts = np.arange(t + 1)
    return EigenGrowth(
        eigenvalues=mu,
        log_rate=rate,
        growing=mod > 1.0,
        decaying=mod < 1.0,
        steps_to_e=steps,
        t=ts,
        norm=norms,
        rho_t=rho ** ts.astype(np.float64),
    )


def tanh_map_jacobians(
    W: torch.Tensor, x0: torch.Tensor, steps: int, inputs: torch.Tensor | None = None, U: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Jacobians of ``x_{t+1} = W tanh(x_t) + U u_t`` along its trajectory from ``x0``.

    Shapes: W ``(N, N)``, x0 ``(N,)``, inputs ``(steps, M)`` with U ``(N, M)`` (or both None).
    Returns ``(J, x)``: ``J[t] = ∂x_{t+1}/∂x_t = W·diag(1 − tanh²(x_t))`` ``(steps, N, N)`` and the states
    ``x`` ``(steps+1, N)``. Computed in W's dtype (use float64 for Lyapunov exponents).

    >>> J, x = tanh_map_jacobians(0.5 * torch.eye(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64), 3)
    >>> J.shape, float(J[0, 0, 0])
    (torch.Size([3, 2, 2]), 0.5)
    """
    if W.dim() != 2 or W.shape[0] != W.shape[1] or x0.shape != (W.shape[0],):
        raise ConfigError(f"need W (N, N) and x0 (N,); got {tuple(W.shape)} and {tuple(x0.shape)}")
    if (inputs is None) != (U is None):
        raise ConfigError("give both inputs (steps, M) and U (N, M), or neither")
    if inputs is not None and (inputs.shape[0] < steps or U.shape != (W.shape[0], inputs.shape[1])):
        raise ConfigError(f"inputs must be (>= {steps}, M) and U (N, M); got {tuple(inputs.shape)} and {tuple(U.shape)}")
    tanh = _activation("tanh")
    with torch.no_grad():
        xs = [x0]
        for t in range(steps):
            nxt = W @ tanh.fn(xs[-1])
            if inputs is not None:
                nxt = nxt + U @ inputs[t]
            xs.append(nxt)
        x = torch.stack(xs)  # (steps+1, N)
        J = step_jacobian(W, tanh.grad(x[:-1]), "x")  # W·diag(σ'(x_t)), (steps, N, N)
    return J, x


def rnn_jacobians(module: nn.RNN, inputs: torch.Tensor, h0: torch.Tensor | None = None, *, layer: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """State Jacobians ``J_t = ∂h_t/∂h_{t−1} = diag(σ'(a_t))·W_hh`` of one layer of an ``nn.RNN`` along a sequence.

    ``inputs``: one unbatched sequence ``(T, input_size)`` (time-major); ``h0``: ``(num_layers, H)`` or
    None (zeros). Unidirectional modules only. The recurrence is unrolled by
    :func:`gradprobe.functional.rnn.layer_outputs` in the module's dtype with its own parameters (between-layer
    dropout not applied; tanh: σ' = 1 − h_t²; relu: σ' = 1[a_t > 0]); call ``module.double()`` first for
    Lyapunov exponents. Returns ``(J, h)`` with ``J``
    ``(T, H, H)`` (J[t] maps h_{t} to h_{t+1}, h_0 the initial state) and the layer's states ``h``
    ``(T+1, H)`` including h_0.
    """
    if not isinstance(module, nn.RNN):
        raise ConfigError(f"rnn_jacobians expects an nn.RNN (for a custom map use tanh_map_jacobians); got {type(module).__name__}")
    if module.bidirectional:
        raise ConfigError("rnn_jacobians supports unidirectional nn.RNN only; pass each direction as its own module")
    if inputs.dim() != 2 or inputs.shape[1] != module.input_size:
        raise ConfigError(f"inputs must be one unbatched sequence (T, {module.input_size}); got {tuple(inputs.shape)}")
    L = module.num_layers
    layer = layer % L
    H = module.hidden_size
    if h0 is None:
        h0 = inputs.new_zeros(L, H)
    if h0.shape != (L, H):
        raise ConfigError(f"h0 must be (num_layers, hidden_size) = {(L, H)}; got {tuple(h0.shape)}")
    dtype = module.weight_hh_l0.dtype
    dphi = _activation(module.nonlinearity).grad_from_output  # tanh: 1 − h², relu: 1[h > 0] = 1[a > 0]
    with torch.no_grad():
        h0 = h0.to(dtype)
        hs = layer_outputs(module, inputs.to(dtype), h0, layers=layer + 1)[layer][:, 0]  # (T, H)
        J = step_jacobian(getattr(module, f"weight_hh_l{layer}"), dphi(hs), "h")  # diag(σ'(a_t))·W_hh
    return J, torch.cat([h0[layer].unsqueeze(0), hs])
