"""Elementwise activations with their derivatives written out (σ, σ′), shared by the recurrent models.

σ′ is a closed form, so Jacobians and forward-mode recursions never call autograd; the functions are
named (not lambdas) so that modules holding them stay picklable (``torch.save(model)``).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from gradprobe.errors import ConfigError

Pair = tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _dsigmoid(x: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(x)
    return s * (1.0 - s)


def _dtanh(x: torch.Tensor) -> torch.Tensor:
    return 1.0 - torch.tanh(x) ** 2


def _drelu(x: torch.Tensor) -> torch.Tensor:
    return (x > 0).to(x.dtype)


#: name -> (σ, σ′)
PAIRS: dict[str, Pair] = {
    "sigmoid": (torch.sigmoid, _dsigmoid),
    "tanh": (torch.tanh, _dtanh),
    "relu": (torch.relu, _drelu),
    "linear": (_identity, torch.ones_like),
}


def activation_pair(name: str, allowed: tuple[str, ...] | None = None, where: str = "") -> Pair:
    """(σ, σ′) by name; ``allowed`` restricts the choice (error names the model ``where``)."""
    choices = tuple(PAIRS) if allowed is None else allowed
    if name not in choices:
        raise ConfigError(f"unknown activation {name!r}{where}; choose one of {sorted(choices)}")
    return PAIRS[name]
