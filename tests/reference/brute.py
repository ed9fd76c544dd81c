"""Brute-force float64 twin of one probed step: one ``torch.autograd.grad`` call per tensor.

Nothing here shares code with ``gradprobe.probe``: layers are found again from ``named_modules``,
outputs are captured by a throw-away forward hook that only keeps references (and, for in-place
safety, the output's squared norm at the moment it was produced), and every gradient is obtained by
``torch.autograd.grad(loss, tensor, retain_graph=True)`` on that tensor alone:

* ``grad_norm[l]        = √(Σ_{p ∈ θ_l} ‖∂L/∂p‖²)``           (NaN if no parameter is reached)
* ``output_grad_norm[l] = √(Σ_calls Σ_tensors ‖∂L/∂h‖²)``      (NaN if no output is reached)
* ``activation_norm[l]  = √(Σ_calls Σ_tensors ‖h‖²)``
* ``weight_norm[l]      = √(Σ_{p ∈ θ_l} ‖p‖²)``

Caveat built into the oracle: an output that a later op modifies in place is rebased by autograd, so
``autograd.grad`` w.r.t. it gives the gradient of the *modified* tensor; build the twin from an
out-of-place copy of such a model (the tests do).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class BruteFlow:
    order: list[str]  # layers in order of first call (uncalled layers absent)
    grad_norm: dict[str, float]
    output_grad_norm: dict[str, float]
    activation_norm: dict[str, float]
    weight_norm: dict[str, float]
    loss: float


def layer_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules that own a parameter directly, first qualified name per module object."""
    seen, out = set(), []
    for name, m in model.named_modules():
        if id(m) in seen:
            continue
        seen.add(id(m))
        if any(True for _ in m.parameters(recurse=False)):
            out.append((name or type(m).__name__, m))
    return out


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, nn.utils.rnn.PackedSequence):
        return [obj.data]
    if isinstance(obj, torch.Tensor):
        return [obj] if obj.is_floating_point() else []
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    if hasattr(type(obj), "__dataclass_fields__"):
        return [t for name in type(obj).__dataclass_fields__ for t in _tensors(getattr(obj, name))]
    return []


def _sq(t: torch.Tensor) -> float:
    if t.is_sparse:  # duplicate indices add up: square the dense tensor, not the raw values
        t = t.to_dense()
    return float(t.detach().to(torch.float64).pow(2).sum())


def brute_flow(model: nn.Module, run: Callable[[], torch.Tensor], only: set[str] | None = None) -> BruteFlow:
    """Run ``run()`` (forward + scalar loss, no backward) and measure every layer one tensor at a time.

    ``only``: measure gradients of these layers only (others get NaN); saves time on deep models.
    """
    layers = layer_modules(model)
    order: list[str] = []
    outs: dict[str, list[torch.Tensor]] = {n: [] for n, _ in layers}
    act_sq: dict[str, float] = {n: 0.0 for n, _ in layers}

    def make(name):
        def hook(module, args, output):
            if name not in order:
                order.append(name)
            for t in _tensors(output):
                outs[name].append(t)
                act_sq[name] += _sq(t)

        return hook

    handles = [m.register_forward_hook(make(n)) for n, m in layers]
    try:
        loss = run()
    finally:
        for h in handles:
            h.remove()

    def grad_sq(t: torch.Tensor) -> float | None:
        if not t.requires_grad:
            return None
        (g,) = torch.autograd.grad(loss, t, retain_graph=True, allow_unused=True)
        return None if g is None else _sq(g)

    def total(vals) -> float:
        vals = [v for v in vals if v is not None]
        return math.sqrt(sum(vals)) if vals else float("nan")

    gn, ogn, an, wn = {}, {}, {}, {}
    for name, m in layers:
        if only is not None and name not in only:
            gn[name] = ogn[name] = an[name] = wn[name] = float("nan")
            continue
        params = list(m.parameters(recurse=False))
        gn[name] = total(grad_sq(p) for p in params)
        wn[name] = math.sqrt(sum(_sq(p) for p in params))
        ogn[name] = total(grad_sq(t) for t in outs[name])
        an[name] = math.sqrt(act_sq[name]) if outs[name] else float("nan")
    return BruteFlow(order, gn, ogn, an, wn, float(loss.detach()))
