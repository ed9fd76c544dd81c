"""``SigmoidChain``: a chain of L single-neuron sigmoid layers and its closed-form gradient.

The chain comes from an answer on Cross Validated (Stack Exchange) to the question why a vanishing
gradient is not a zero gradient: a network of ``L`` layers of one neuron each, no bias,
sigmoid activation, and the network itself as the objective:

    o_1 = w_1 · x   (the answer has x = 1),    o_i = σ(w_i · o_{i−1})  for i = 2…L,    F = o_L

so that (chain rule, the answer's last display, generalised to every k)

    dF/dw_1 = x · Π_{i=2..L} w_i · Π_{i=2..L} σ'(w_i o_{i−1})
    dF/dw_k = o_{k−1} σ'(w_k o_{k−1}) · Π_{i=k+1..L} w_i σ'(w_i o_{i−1})     (k ≥ 2)

Since σ' ≤ 1/4, |dF/dw_1| ≤ Π|w_i| / 4^(L−1): the gradient of the first weight shrinks geometrically
with depth unless the weights grow to compensate.

The math lives in the pure functions :func:`chain_outputs` and :func:`chain_grad`; the module only
holds the weights, one single-parameter sub-module per layer so that a probe sees L layers.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from gradprobe.errors import ConfigError
from gradprobe.functional.activations import ACTIVATIONS as _ACTIVATIONS

__all__ = ["SigmoidChain", "ChainNeuron", "chain_outputs", "chain_grad"]

_dsigmoid = _ACTIVATIONS["sigmoid"].grad  # σ' = σ(1 − σ) at the pre-activation


def chain_outputs(weights: torch.Tensor, x: torch.Tensor | float = 1.0) -> torch.Tensor:
    """All layer outputs ``o_1 … o_L`` of the sigmoid chain.

    Args:
        weights: shape ``(L,)``, the weights ``w_1 … w_L``.
        x: the input multiplying ``w_1`` (the answer uses 1), a float or a tensor of shape ``(B,)``.

    Returns:
        shape ``(*x.shape, L)``: ``o_1 = w_1 x``, ``o_i = σ(w_i o_{i−1})``.

    >>> chain_outputs(torch.tensor([2.0, 0.0]))
    tensor([2.0000, 0.5000])
    """
    x = torch.as_tensor(x, dtype=weights.dtype, device=weights.device)
    outs = [weights[0] * x]
    for w in weights[1:]:
        outs.append(torch.sigmoid(w * outs[-1]))
    return torch.stack(outs, dim=-1)


def chain_grad(weights: torch.Tensor, x: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Closed-form ``dF/dw_k`` for every k of the sigmoid chain (``F = o_L``; no autograd used).

    Args:
        weights: shape ``(L,)``; x: float or shape ``(B,)``.

    Returns:
        shape ``(*x.shape, L)``; entry k is ``dF/dw_{k+1}`` (0-based) for each input.

    Computed as a backward product: with ``a_i = w_i σ'(w_i o_{i−1})`` (i ≥ 2, the local derivative
    ``do_i/do_{i−1}``) and ``D_k = Π_{i>k} a_i``, ``dF/dw_1 = x D_1`` and
    ``dF/dw_k = o_{k−1} σ'(w_k o_{k−1}) D_k``.

    >>> chain_grad(torch.tensor([1.0, 1.0], dtype=torch.float64))  # both equal σ'(1) = 0.1966...
    tensor([0.1966, 0.1966], dtype=torch.float64)
    """
    with torch.no_grad():
        x = torch.as_tensor(x, dtype=weights.dtype, device=weights.device)
        o = chain_outputs(weights, x)  # (*B, L)
        L = weights.shape[0]
        grads = torch.empty_like(o)
        tail = torch.ones_like(o[..., 0])  # D_k = Π_{i>k} w_i σ'(w_i o_{i−1}), starting with D_L = 1
        for k in range(L - 1, 0, -1):  # 0-based k ≥ 1  ⇔  the answer's k ≥ 2
            ds = _dsigmoid(weights[k] * o[..., k - 1])
            grads[..., k] = o[..., k - 1] * ds * tail
            tail = tail * weights[k] * ds
        grads[..., 0] = x * tail
    return grads


class ChainNeuron(nn.Module):
    """One layer of :class:`SigmoidChain`: a single weight ``w`` (shape ``(1,)``).

    ``forward(o) = σ(w·o)``, or ``w·o`` for the first layer (``first=True``).
    """

    def __init__(self, w: float, *, first: bool = False, dtype: torch.dtype = torch.float32):
        super().__init__()
        # Built directly in ``dtype``: a float32 detour would cost float64 oracles 8 digits.
        self.weight = nn.Parameter(torch.tensor([float(w)], dtype=dtype))
        self.first = first

    def forward(self, o: torch.Tensor) -> torch.Tensor:
        z = self.weight[0] * o
        return z if self.first else torch.sigmoid(z)


class SigmoidChain(nn.Module):
    """The deep chain of single sigmoid neurons, ``F = o_L`` (see the module docstring).

    Args:
        L: number of layers (≥ 1).
        weights: ``L`` initial weights; default all ones.
        dtype: parameter dtype (use ``torch.float64`` for oracle comparisons).

    ``forward(x=None)``: ``x`` is ``None`` (the answer's ``x = 1``), a float, or shape ``(B,)``;
    returns ``F`` of shape ``x.shape`` (a 0-d tensor for ``x = None``). Each weight is its own
    :class:`ChainNeuron` in ``self.layers``, so a gradient probe reports L layers.

    >>> net = SigmoidChain(5, dtype=torch.float64)
    >>> net().backward()
    >>> torch.allclose(net.grad_vector(), net.closed_form_grad(), rtol=1e-12, atol=0)
    True
    """

    def __init__(self, L: int, weights: Sequence[float] | torch.Tensor | None = None, *,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if int(L) != L or L < 1:
            raise ConfigError(f"SigmoidChain needs L >= 1 layers; got L={L!r}")
        L = int(L)
        if weights is None:
            weights = [1.0] * L
        weights = [float(w) for w in torch.as_tensor(weights, dtype=torch.float64).reshape(-1)]
        if len(weights) != L:
            raise ConfigError(f"SigmoidChain(L={L}) needs {L} weights; got {len(weights)}")
        self.layers = nn.ModuleList(ChainNeuron(w, first=(i == 0), dtype=dtype) for i, w in enumerate(weights))

    @property
    def L(self) -> int:
        return len(self.layers)

    def weight_vector(self) -> torch.Tensor:
        """The weights ``w_1 … w_L`` as one detached tensor of shape ``(L,)``."""
        return torch.cat([layer.weight.detach() for layer in self.layers])

    def grad_vector(self) -> torch.Tensor:
        """``.grad`` of every weight as shape ``(L,)`` (zeros where no gradient was accumulated)."""
        return torch.cat([
            layer.weight.grad if layer.weight.grad is not None else torch.zeros_like(layer.weight)
            for layer in self.layers
        ])

    def _input(self, x: torch.Tensor | float | None) -> torch.Tensor:
        w = self.layers[0].weight
        return torch.as_tensor(1.0 if x is None else x, dtype=w.dtype, device=w.device)

    def outputs(self, x: torch.Tensor | float | None = None) -> torch.Tensor:
        """Every layer output ``o_1 … o_L``, shape ``(*x.shape, L)`` (detached)."""
        return chain_outputs(self.weight_vector(), self._input(x))

    def forward(self, x: torch.Tensor | float | None = None) -> torch.Tensor:
        o = self._input(x)
        for layer in self.layers:
            o = layer(o)
        return o

    def closed_form_grad(self, x: torch.Tensor | float | None = None) -> torch.Tensor:
        """``dF/dw_k`` for k = 1…L from the product formula, shape ``(*x.shape, L)``."""
        return chain_grad(self.weight_vector(), self._input(x))
