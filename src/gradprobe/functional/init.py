"""Weight initialisations as pure in-place tensor functions (each cites its paper).

All take a weight of shape ``(fan_out, fan_in, *kernel)`` (``nn.Linear``/``nn.ConvNd`` layout);
``fan_in = in_features · prod(kernel)``.
"""
from __future__ import annotations

import math

import torch

from gradprobe.errors import ConfigError

__all__ = ["fans", "init_weight_", "identity_", "SCHEMES"]

SCHEMES = ("standard", "xavier", "he", "lecun", "orthogonal", "gaussian")


def fans(weight: torch.Tensor) -> tuple[int, int]:
    """``(fan_in, fan_out)`` of a Linear/Conv weight."""
    if weight.dim() < 2:
        raise ConfigError(f"a weight needs at least 2 dimensions to have fans; got shape {tuple(weight.shape)}")
    receptive = math.prod(weight.shape[2:]) if weight.dim() > 2 else 1
    return weight.shape[1] * receptive, weight.shape[0] * receptive


@torch.no_grad()
def init_weight_(
    weight: torch.Tensor,
    scheme: str,
    *,
    gain: float = 1.0,
    sigma_w2: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Fill ``weight`` in place with ``scheme`` and return it.

    * ``standard``: U[−1/√fan_in, 1/√fan_in], so fan_in·Var W = 1/3 (the "commonly used heuristic" of
      Glorot & Bengio 2010, eq. 1).
    * ``xavier``: U[±gain·√6/√(fan_in+fan_out)] (Glorot & Bengio 2010, eq. 16, "normalized").
    * ``he``: N(0, 2/fan_in) (He et al. 2015, eq. 10); ``gain`` multiplies the std.
    * ``lecun``: N(0, 1/fan_in) (LeCun et al. 1998; the SELU init of Klambauer et al. 2017).
    * ``orthogonal``: a (semi-)orthogonal matrix times ``gain`` (Saxe et al. 2014).
    * ``gaussian``: N(0, sigma_w2/fan_in), the mean-field parameterisation (Poole et al. 2016).

    >>> w = init_weight_(torch.empty(256, 512), "he", generator=torch.Generator().manual_seed(0))
    >>> round(float(w.var() * 512), 1)
    2.0
    """
    fan_in, fan_out = fans(weight)
    if scheme == "standard":
        bound = gain / math.sqrt(fan_in)
        return weight.uniform_(-bound, bound, generator=generator)
    if scheme == "xavier":
        bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
        return weight.uniform_(-bound, bound, generator=generator)
    if scheme == "he":
        return weight.normal_(0.0, gain * math.sqrt(2.0 / fan_in), generator=generator)
    if scheme == "lecun":
        return weight.normal_(0.0, gain * math.sqrt(1.0 / fan_in), generator=generator)
    if scheme == "gaussian":
        if sigma_w2 is None or sigma_w2 < 0:
            raise ConfigError(f"the 'gaussian' init needs sigma_w2 >= 0; got {sigma_w2}")
        return weight.normal_(0.0, math.sqrt(sigma_w2 / fan_in), generator=generator)
    if scheme == "orthogonal":
        rows, cols = weight.shape[0], fan_in
        flat = torch.empty(max(rows, cols), min(rows, cols), dtype=torch.float64).normal_(generator=generator)
        q, r = torch.linalg.qr(flat)
        q = q * torch.sign(torch.diagonal(r))  # Haar-uniform (Mezzadri 2007)
        if rows < cols:
            q = q.T
        weight.copy_((gain * q).reshape(weight.shape).to(weight.dtype))
        return weight
    raise ConfigError(f"unknown init scheme {scheme!r}; choose one of {SCHEMES}")


@torch.no_grad()
def identity_(weight: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Fill ``weight`` in place with ``scale`` times the identity map and return it.

    A matrix ``(fan_out, fan_in)`` gets ``scale·I`` (rectangular: ones on the main diagonal, zeros
    elsewhere); a convolution kernel ``(out, in, *k)`` gets the Dirac kernel (channel i → i through the
    centre tap), so the layer maps its input to itself. This is the IRNN recurrent init of Le, Jaitly
    & Hinton 2015 ("A simple way to initialize recurrent networks of rectified linear units").

    >>> identity_(torch.empty(2, 3), scale=0.5).tolist()
    [[0.5, 0.0, 0.0], [0.0, 0.5, 0.0]]
    """
    if weight.dim() < 2:
        raise ConfigError(f"identity init needs a matrix or a conv kernel; got shape {tuple(weight.shape)}")
    weight.zero_()
    n = min(weight.shape[0], weight.shape[1])
    idx = torch.arange(n, device=weight.device)
    centre = tuple(k // 2 for k in weight.shape[2:])
    weight[(idx, idx) + centre] = scale
    return weight
