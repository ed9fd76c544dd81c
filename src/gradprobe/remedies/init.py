"""Initialise a whole model in one call with a named scheme (the published inits, each citing its paper).

The per-tensor math lives in :mod:`gradprobe.functional.init`; this module decides *which* tensors a
scheme touches and with which role:

=================  ===========================================================================
module             tensors (role)
=================  ===========================================================================
``nn.Linear``      ``weight`` (feed-forward), ``bias``
``nn.ConvNd``      ``weight`` (feed-forward; fan_in = in_channels/groups · kernel size), ``bias``
``ConvTransposeNd````weight`` seen as ``(out, in, *k)`` (its fans are swapped in storage), ``bias``
``nn.RNN/LSTM/GRU````weight_ih_l*`` (input) and ``weight_hh_l*`` (recurrent), **one gate block at a time**
and cells          (a ``(G·H, ·)`` weight is G blocks of H rows: G = 1 RNN, 4 LSTM, 3 GRU);
                   ``weight_hr_l*`` (LSTM projection, feed-forward); ``bias_ih``/``bias_hh``
``nn.Embedding``   left as it is: torch's N(0, 1) is already the variance-preserving choice for
                   a one-hot input (fan_in = 1)
everything else    left as it is (normalisation layers, attention ``in_proj_weight``, custom Parameters)
=================  ===========================================================================

Schemes (``fan_in``, ``fan_out`` of one weight or gate block; ``g`` the gain):

* ``standard``: U[−g/√fan_in, g/√fan_in], fan_in·Var = g²/3 (Glorot & Bengio 2010 eq. 1, "commonly used").
* ``xavier`` / ``glorot``: U[±g·√(6/(fan_in+fan_out))], Var = 2g²/(fan_in+fan_out) (Glorot & Bengio 2010 eq. 16).
* ``he`` / ``kaiming``: N(0, g²/fan_in) with g = √2 for ReLU (He et al. 2015 eq. 10); ``nonlinearity``
  picks g by ``torch.nn.init.calculate_gain`` (e.g. "leaky_relu").
* ``lecun``: N(0, g²/fan_in), g = 1 (LeCun et al. 1998; the SELU init of Klambauer et al. 2017).
* ``orthogonal``: Haar-random (semi-)orthogonal blocks times g (Saxe et al. 2014); ``nonlinearity``
  sets g by ``calculate_gain`` (tanh 5/3, relu √2).
* ``identity``: IRNN (Le, Jaitly & Hinton 2015): recurrent ``weight_hh = g·I`` (g = 1 by default),
  input weights N(0, ``input_std``²) (the paper's 0.001), biases 0; feed-forward weights get g·I
  (Dirac kernels for convolutions). LSTM/GRU are refused: IRNN is a vanilla-RNN recipe.
* ``critical``: N(0, σ_w²/fan_in) for every weight, biases N(0, σ_b²) (Poole et al. 2016; Schoenholz
  et al. 2017): the mean-field parameterisation at the edge of chaos. ``sigma_w2`` must be computed by
  the caller so that χ₁ = σ_w² E[φ'(√q* z)²] = 1 for the network's activation and ``sigma_b2``, e.g.
  with ``gradprobe.theory`` (the mean-field module: its critical-line solver for the activation). Closed
  forms: ReLU σ_w² = 2 (any σ_b² = 0); tanh with σ_b² = 0: σ_w² = 1; linear σ_w² = 1.

Biases: every scheme zeroes them, unless ``sigma_b2 > 0`` (then N(0, σ_b²); an RNN's two bias vectors
get σ_b²/2 each so that their sum has variance σ_b², and IRNN keeps them zero).
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from gradprobe.errors import ConfigError
from gradprobe.functional.init import identity_, init_weight_

__all__ = ["INIT_SCHEMES", "InitTarget", "init_targets", "initialize_", "forget_bias_"]

INIT_SCHEMES = ("standard", "xavier", "glorot", "he", "kaiming", "lecun", "orthogonal", "identity", "critical")
_ALIASES = {"glorot": "xavier", "kaiming": "he"}
_GATES = {"RNN_TANH": 1, "RNN_RELU": 1, "LSTM": 4, "GRU": 3}


@dataclass(frozen=True)
class InitTarget:
    """One tensor a scheme touches: qualified name, the tensor, its role and its gate-block count."""

    name: str
    tensor: torch.Tensor
    role: str  # "feedforward" | "input" | "recurrent" | "bias" | "recurrent_bias"
    blocks: int = 1
    transposed: bool = False  # ConvTranspose storage (in, out, *k)


def _gates(module: nn.Module) -> int:
    if isinstance(module, nn.RNNBase):
        return _GATES[module.mode]
    return {nn.RNNCell: 1, nn.LSTMCell: 4, nn.GRUCell: 3}[type(module)]


def init_targets(model: nn.Module) -> list[InitTarget]:
    """The tensors :func:`initialize_` would touch, in ``named_modules`` order (shared modules once).

    >>> [(t.name, t.role, t.blocks) for t in init_targets(nn.LSTM(3, 4))]  # doctest: +NORMALIZE_WHITESPACE
    [('weight_ih_l0', 'input', 4), ('weight_hh_l0', 'recurrent', 4),
     ('bias_ih_l0', 'recurrent_bias', 1), ('bias_hh_l0', 'recurrent_bias', 1)]
    """
    out: list[InitTarget] = []

    def q(prefix: str, name: str) -> str:
        return f"{prefix}.{name}" if prefix else name

    for prefix, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
            transposed = isinstance(m, nn.modules.conv._ConvTransposeNd)
            out.append(InitTarget(q(prefix, "weight"), m.weight, "feedforward", 1, transposed))
            if m.bias is not None:
                out.append(InitTarget(q(prefix, "bias"), m.bias, "bias"))
        elif isinstance(m, (nn.RNNBase, nn.RNNCellBase)):
            g = _gates(m)
            for name, p in m.named_parameters(recurse=False):
                if name.startswith("weight_ih"):
                    out.append(InitTarget(q(prefix, name), p, "input", g))
                elif name.startswith("weight_hh"):
                    out.append(InitTarget(q(prefix, name), p, "recurrent", g))
                elif name.startswith("weight_hr"):
                    out.append(InitTarget(q(prefix, name), p, "feedforward", 1))
                elif name.startswith("bias"):
                    out.append(InitTarget(q(prefix, name), p, "recurrent_bias"))
    return out


def _blocks(t: InitTarget) -> Iterator[torch.Tensor]:
    w = t.tensor.transpose(0, 1) if t.transposed else t.tensor
    yield from w.chunk(t.blocks, dim=0) if t.blocks > 1 else (w,)


def _gain(scheme: str, gain: float | None, nonlinearity: str | None) -> float:
    if gain is not None:
        return float(gain)
    if scheme == "he":
        return nn.init.calculate_gain(nonlinearity or "relu")
    if scheme in ("xavier", "orthogonal") and nonlinearity is not None:
        return nn.init.calculate_gain(nonlinearity)
    return 1.0


@torch.no_grad()
def initialize_(
    model: nn.Module,
    scheme: str,
    *,
    nonlinearity: str | None = None,
    sigma_w2: float | None = None,
    sigma_b2: float = 0.0,
    gain: float | None = None,
    input_std: float = 1e-3,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """Re-initialise every Linear / Conv / recurrent weight of ``model`` in place with ``scheme``.

    See the module docstring for the schemes, the tensors touched and the bias rule. ``gain``
    overrides the scheme's default gain; ``nonlinearity`` (a ``torch.nn.init.calculate_gain`` name)
    sets it for ``he``, ``xavier`` and ``orthogonal``. ``input_std`` is the IRNN input-weight std.
    Returns ``model`` (for chaining).

    >>> net = nn.Sequential(nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10))
    >>> _ = initialize_(net, "he", generator=torch.Generator().manual_seed(0))
    >>> w, b = net[0].weight.detach(), net[0].bias.detach()
    >>> round(float(w.var() * 512), 1), float(b.abs().max())
    (2.0, 0.0)
    """
    if scheme not in INIT_SCHEMES:
        raise ConfigError(f"unknown init scheme {scheme!r}; choose one of {INIT_SCHEMES}")
    scheme = _ALIASES.get(scheme, scheme)
    if scheme == "critical" and (sigma_w2 is None or not (sigma_w2 > 0 and math.isfinite(sigma_w2))):
        raise ConfigError(
            f"the 'critical' init needs sigma_w2 > 0 (got {sigma_w2}): the weight variance σ_w² at which χ₁ = 1 "
            "for your activation and sigma_b2, from gradprobe.theory's mean-field functions (ReLU: 2; tanh with "
            "sigma_b2=0: 1)"
        )
    if not (sigma_b2 >= 0 and math.isfinite(sigma_b2)):
        raise ConfigError(f"sigma_b2={sigma_b2} must be a finite variance >= 0")
    if not (input_std >= 0):
        raise ConfigError(f"input_std={input_std} must be >= 0")
    targets = init_targets(model)
    if not targets:
        raise ConfigError(
            f"{type(model).__name__} has no Linear, Conv or recurrent layer for initialize_ to set"
        )
    if scheme == "identity":
        gated = sorted({type(m).__name__ for m in model.modules()
                        if isinstance(m, (nn.RNNBase, nn.RNNCellBase)) and _gates(m) > 1})
        if gated:
            raise ConfigError(
                f"the 'identity' (IRNN) init is for vanilla RNNs; {gated} have gates. Use 'orthogonal' for them"
            )
    g = _gain(scheme, gain, nonlinearity)
    for t in targets:
        if t.role in ("bias", "recurrent_bias"):
            var = 0.0 if scheme == "identity" else sigma_b2 / (2.0 if t.role == "recurrent_bias" else 1.0)
            if var > 0:
                t.tensor.normal_(0.0, math.sqrt(var), generator=generator)
            else:
                t.tensor.zero_()
            continue
        for w in _blocks(t):
            if scheme == "identity":
                if t.role == "input":
                    w.normal_(0.0, input_std, generator=generator)
                else:
                    identity_(w, g)
            elif scheme == "critical":
                init_weight_(w, "gaussian", sigma_w2=sigma_w2, generator=generator)
            elif scheme == "he":
                init_weight_(w, "he", gain=g / math.sqrt(2.0), generator=generator)  # std = g/√fan_in
            else:  # standard, xavier, lecun, orthogonal
                init_weight_(w, scheme, gain=g, generator=generator)
    return model


@torch.no_grad()
def forget_bias_(model: nn.Module, value: float = 1.0) -> nn.Module:
    """Set the forget-gate bias of every ``nn.LSTM`` / ``nn.LSTMCell`` in ``model`` to ``value``, in place.

    An LSTM keeps its cell state as ``c_t = f_t ⊙ c_{t−1} + i_t ⊙ g_t`` with ``f_t = σ(W_f [x_t, h_{t−1}] + b_f)``;
    ``∂c_t/∂c_{t−1} = diag(f_t)``, so the error carousel of Hochreiter & Schmidhuber (1997) carries the
    gradient back in time only while ``f_t ≈ 1``. torch's default bias gives ``f ≈ σ(0) = 1/2`` at init,
    which halves the cell-state gradient per step; a forget bias of 1 (Gers, Schmidhuber & Cummins 2000;
    Jozefowicz, Zaremba & Sutskever 2015) starts at ``σ(1) ≈ 0.73``. torch adds two bias vectors
    (``bias_ih + bias_hh``), so each gets ``value / 2`` in the forget block (gate order i, f, g, o;
    rows ``H:2H``). Returns ``model``.

    >>> lstm = nn.LSTM(3, 4)
    >>> _ = forget_bias_(lstm, 1.0)
    >>> (lstm.bias_ih_l0 + lstm.bias_hh_l0)[4:8].tolist()
    [1.0, 1.0, 1.0, 1.0]
    """
    if not math.isfinite(value):
        raise ConfigError(f"forget bias value={value} must be finite")
    cells = [m for m in model.modules() if isinstance(m, (nn.LSTM, nn.LSTMCell))]
    if not cells:
        raise ConfigError(f"no nn.LSTM or nn.LSTMCell in {type(model).__name__}: a forget gate belongs to an LSTM")
    if not any(m.bias for m in cells):
        raise ConfigError("the LSTM layers were built with bias=False: there is no forget-gate bias to set")
    for m in cells:
        h = m.hidden_size
        for name, p in m.named_parameters(recurse=False):
            if name.startswith("bias"):
                p[h : 2 * h] = value / 2.0
    return model
