"""The activation table: for each elementwise nonlinearity σ, its derivative σ′ and γ = sup|σ′|.

Every part of gradprobe that needs a derivative of an activation reads it here: the recurrent models'
closed-form Jacobians, Pascanu's Ω, the Jacobians of ``theory.rnn``, the lag decomposition of
``analysis.temporal`` and (through NumPy wrappers) mean-field theory.

For each name, :class:`Activation` holds

* ``fn``: σ(a), a torch function of a tensor (any shape, any float dtype);
* ``grad``: σ′(a) at the pre-activation ``a``, in closed form (no autograd);
* ``grad_from_output``: σ′ as a function of the output ``h = σ(a)`` where that exists
  (tanh: 1 − h², sigmoid: h(1 − h), relu: 1[h > 0], ...), ``None`` where σ is not invertible
  (gelu, erf). Back-propagation through time uses it because the states ``h_t`` are what the forward
  pass keeps (Pascanu, Mikolov & Bengio 2013, §2.1: ∂h_{t+1}/∂h_t = diag(σ′(a_{t+1}))·W_hh);
* ``gamma``: γ = sup_a |σ′(a)|, the constant of Pascanu et al. 2013's bound ‖∂h_{t+1}/∂h_t‖ ≤ γ·λ₁
  (sigmoid 1/4, tanh 1, relu 1, linear 1, selu λα ≈ 1.758, gelu ≈ 1.129, erf 2/√π);
* ``kinks``: the points where σ′ (or σ″) jumps, for quadrature rules that must split panels there.

At a kink σ′ takes the value torch's autograd gives (relu′(0) = 0, hard_tanh′(±1) = 0,
leaky_relu′(0) = slope). The tests compare every ``grad`` with autograd in float64, every
``grad_from_output`` with ``grad``, and every γ with the maximum over a dense grid.

All entries are module-level named functions (no lambdas), so models holding them pickle.

>>> tanh = activation("tanh")
>>> a = torch.tensor([0.0, 0.5], dtype=torch.float64)
>>> bool(torch.allclose(tanh.grad(a), tanh.grad_from_output(tanh.fn(a)))), tanh.gamma, GAMMA["sigmoid"]
(True, 1.0, 0.25)
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gradprobe.errors import ConfigError

__all__ = ["Activation", "ACTIVATIONS", "GAMMA", "activation", "leaky_relu"]

Fn = Callable[[torch.Tensor], torch.Tensor]

# SELU's constants (Klambauer et al. 2017), as torch uses them
SELU_LAMBDA = 1.0507009873554804934193349852946
SELU_ALPHA = 1.6732632423543772848170429916717
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@dataclass(frozen=True)
class Activation:
    """One row of the table (see the module docstring). ``grad_from_output`` may be ``None``."""

    name: str
    fn: Fn
    grad: Fn
    grad_from_output: Fn | None
    gamma: float
    kinks: tuple[float, ...] = ()


# ------------------------------------------------------------------------------------------ σ and σ′
def _ones(x: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(x)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _dsigmoid(x: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(x)
    return s * (1.0 - s)


def _dsigmoid_out(h):
    return h * (1.0 - h)  # plain arithmetic: works on floats, arrays and tensors


def _dtanh(x: torch.Tensor) -> torch.Tensor:
    t = torch.tanh(x)
    return 1.0 - t * t


def _dtanh_out(h):
    return 1.0 - h * h


def _step(x: torch.Tensor) -> torch.Tensor:  # relu′ = 1[x > 0] (also from the output)
    return (x > 0).to(x.dtype)


def _hard_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.hardtanh(x)  # autograd: 0 at ±1, as nn.Hardtanh


def _dhard_tanh(x: torch.Tensor) -> torch.Tensor:
    return (x.abs() < 1.0).to(x.dtype)  # also from the output: |h| < 1 exactly where |a| < 1


def _leaky(x: torch.Tensor, slope: float) -> torch.Tensor:
    return F.leaky_relu(x, slope)


def _dleaky(x: torch.Tensor, slope: float) -> torch.Tensor:
    # from the output too when slope > 0: h > 0 exactly where a > 0
    return torch.where(x > 0, torch.ones_like(x), torch.full_like(x, slope))


def _elu(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x)


def _delu(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, torch.ones_like(x), torch.exp(torch.clamp(x, max=0.0)))


def _delu_out(h: torch.Tensor) -> torch.Tensor:
    return torch.where(h > 0, torch.ones_like(h), h + 1.0)  # h = e^a − 1 for a ≤ 0


def _selu(x: torch.Tensor) -> torch.Tensor:
    return F.selu(x)


def _dselu(x: torch.Tensor) -> torch.Tensor:
    neg = SELU_ALPHA * torch.exp(torch.clamp(x, max=0.0))
    return SELU_LAMBDA * torch.where(x > 0, torch.ones_like(x), neg)


def _dselu_out(h: torch.Tensor) -> torch.Tensor:
    return torch.where(h > 0, torch.full_like(h, SELU_LAMBDA), h + SELU_LAMBDA * SELU_ALPHA)  # h = λα(e^a − 1)


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x)  # exact form x·Φ(x)


def _dgelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0))) + x * torch.exp(-0.5 * x * x) * _INV_SQRT_2PI


def _softplus(x: torch.Tensor) -> torch.Tensor:
    return torch.logaddexp(x, torch.zeros_like(x))  # exact log(1 + e^x); F.softplus cuts off at 20


def _dsoftplus_out(h: torch.Tensor) -> torch.Tensor:
    return -torch.expm1(-h)  # σ′ = sigmoid(a) = 1 − e^{−h}


def _derf(x: torch.Tensor) -> torch.Tensor:
    return (2.0 / math.sqrt(math.pi)) * torch.exp(-x * x)


def leaky_relu(slope: float = 0.01) -> Activation:
    """The leaky ReLU row for a given negative-side ``slope``: σ(a) = a for a > 0, slope·a otherwise.

    γ = max(1, |slope|). σ′ from the output exists for slope > 0 (h > 0 exactly where a > 0) and
    slope = 0 (relu); a negative slope folds a < 0 onto h > 0, so ``grad_from_output`` is ``None`` there.
    """
    slope = float(slope)
    if not math.isfinite(slope):
        raise ConfigError(f"leaky_relu needs a finite slope; got {slope}")
    d = functools.partial(_dleaky, slope=slope)
    from_output = d if slope > 0 else (_step if slope == 0 else None)
    return Activation("leaky_relu", functools.partial(_leaky, slope=slope), d, from_output, max(1.0, abs(slope)), (0.0,))


# γ of gelu: σ″(a) = ϕ(a)(2 − a²) vanishes at a = √2, so γ = Φ(√2) + √2·ϕ(√2)
_GELU_GAMMA = 0.5 * (1.0 + math.erf(1.0)) + math.sqrt(2.0) * math.exp(-1.0) * _INV_SQRT_2PI

#: name -> :class:`Activation`
ACTIVATIONS: dict[str, Activation] = {
    a.name: a
    for a in (
        Activation("sigmoid", torch.sigmoid, _dsigmoid, _dsigmoid_out, 0.25),
        Activation("tanh", torch.tanh, _dtanh, _dtanh_out, 1.0),
        Activation("relu", torch.relu, _step, _step, 1.0, (0.0,)),
        Activation("linear", _identity, _ones, _ones, 1.0),
        Activation("hard_tanh", _hard_tanh, _dhard_tanh, _dhard_tanh, 1.0, (-1.0, 1.0)),
        leaky_relu(0.01),
        Activation("elu", _elu, _delu, _delu_out, 1.0, (0.0,)),
        Activation("selu", _selu, _dselu, _dselu_out, SELU_LAMBDA * SELU_ALPHA, (0.0,)),
        Activation("gelu", _gelu, _dgelu, None, _GELU_GAMMA),
        Activation("softplus", _softplus, torch.sigmoid, _dsoftplus_out, 1.0),
        Activation("erf", torch.erf, _derf, None, 2.0 / math.sqrt(math.pi)),
    )
}

#: γ = sup|σ′| by name (Pascanu, Mikolov & Bengio 2013, §2.1)
GAMMA: dict[str, float] = {name: a.gamma for name, a in ACTIVATIONS.items()}


def activation(name: str, allowed: tuple[str, ...] | None = None, where: str = "", *, from_output: bool = False) -> Activation:
    """The table row for ``name``; ``allowed`` restricts the choice (the error names ``where``, e.g.
    ``" for the geometric model"``); ``from_output=True`` also requires ``grad_from_output``."""
    choices = tuple(ACTIVATIONS) if allowed is None else allowed
    if not isinstance(name, str) or name not in choices:
        raise ConfigError(f"unknown activation {name!r}{where}; choose one of {sorted(choices)}")
    row = ACTIVATIONS[name]
    if from_output and row.grad_from_output is None:
        raise ConfigError(f"activation {name!r}{where} cannot give σ′ from its output (σ is not invertible)")
    return row
