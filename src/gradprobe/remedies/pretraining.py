"""Greedy layer-wise pretraining (the "multi-level hierarchy" remedy) and Rprop.

A multi-level hierarchy pre-trains a single layer at a time and then fine-tunes the whole network
by back-propagation (Schmidhuber 1992; Hinton, Osindero & Teh 2006). Here each hidden layer of an ``nn.Sequential`` MLP is trained as
an autoencoder on the codes of the layers below it (Bengio et al. 2007, "Greedy layer-wise training of
deep networks"; with ``noise_std > 0`` a denoising autoencoder, Vincent et al. 2008), while it is still
shallow, so its gradient does not have to cross the whole depth. The decoders are thrown away; the
model is returned for ordinary fine-tuning.

Rprop (Riedmiller & Braun 1993) is the sign-based remedy: each weight moves by its own step
size, grown ×1.2 while the gradient's sign is stable and shrunk ×0.5 when it flips, so the update
does not depend on the gradient's magnitude at all, and a vanishing gradient still moves the weights.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from gradprobe._deprecation import renamed_function
from gradprobe.errors import ConfigError

__all__ = ["Stage", "split_stages", "pretrain_layer_", "greedy_layerwise_pretrain_", "make_rprop"]


@dataclass(frozen=True)
class Stage:
    """One hidden layer of a Sequential MLP: its Linear and the modules after it up to the next Linear."""

    linear: nn.Linear
    modules: tuple[nn.Module, ...]  # (linear, activation, ...) in forward order

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for m in self.modules:
            x = m(x)
        return x


def split_stages(model: nn.Sequential) -> tuple[tuple[nn.Module, ...], list[Stage]]:
    """``(prefix, stages)``: modules before the first Linear (e.g. ``nn.Flatten``) and one
    :class:`Stage` per ``nn.Linear`` child. Only direct children of ``model`` are looked at.
    """
    if not isinstance(model, nn.Sequential):
        raise ConfigError(f"layer-wise pretraining needs an nn.Sequential MLP; got {type(model).__name__}")
    kids = list(model.children())
    starts = [i for i, m in enumerate(kids) if isinstance(m, nn.Linear)]
    if not starts:
        raise ConfigError("the nn.Sequential has no nn.Linear child to pretrain")
    for m in kids:
        if not isinstance(m, nn.Linear) and any(isinstance(sub, nn.Linear) for sub in m.modules()):
            raise ConfigError(
                f"{type(m).__name__} inside the Sequential hides Linear layers: flatten the MLP into one nn.Sequential"
            )
    stages = []
    for k, a in enumerate(starts):
        b = starts[k + 1] if k + 1 < len(starts) else len(kids)
        stages.append(Stage(kids[a], tuple(kids[a:b])))
    return tuple(kids[: starts[0]]), stages


def _as_tensor(data) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        return data
    if isinstance(data, Iterable):
        parts = []
        for batch in data:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            if not isinstance(x, torch.Tensor):
                raise ConfigError(f"data batches must be tensors or (x, y) tuples; got {type(x).__name__}")
            parts.append(x)
        if parts:
            return torch.cat(parts)
    raise ConfigError(f"data must be a tensor (N, features) or an iterable of batches; got {type(data).__name__}")


def pretrain_layer_(
    stage: Stage,
    inputs: torch.Tensor,
    *,
    steps: int = 300,
    lr: float = 1e-2,
    batch_size: int = 64,
    noise_std: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[float, float]:
    """Train ``stage`` (in place) as the encoder of an autoencoder with a temporary linear decoder.

    Minimises the mean squared reconstruction error ``mean((D(stage(x + ε)) − x)²)`` over minibatches
    of ``inputs`` ``(N, in_features)`` with Adam (``lr``), ε ~ N(0, noise_std²) (denoising when > 0).
    Returns the full-data reconstruction error (with the trained decoder) before and after.
    """
    enc = stage.linear
    if inputs.dim() != 2 or inputs.shape[1] != enc.in_features:
        raise ConfigError(
            f"layer inputs must be (N, {enc.in_features}); got {tuple(inputs.shape)} (flatten images first, "
            "or put nn.Flatten at the start of the Sequential)"
        )
    if steps < 1 or batch_size < 1 or not (lr > 0):
        raise ConfigError(f"need steps >= 1, batch_size >= 1 and lr > 0; got {steps}, {batch_size}, {lr}")
    decoder = nn.Linear(enc.out_features, enc.in_features, device=enc.weight.device, dtype=enc.weight.dtype)
    params = [p for m in stage.modules for p in m.parameters()] + list(decoder.parameters())
    opt = torch.optim.Adam(params, lr=lr)

    def recon(x: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        return (decoder(stage(x)) - clean).pow(2).mean()

    with torch.no_grad():
        first = float(recon(inputs, inputs))
    n = inputs.shape[0]
    for _ in range(steps):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=generator, device=inputs.device)
        x = inputs[idx]
        noisy = x + noise_std * torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device) if noise_std > 0 else x
        opt.zero_grad(set_to_none=True)
        recon(noisy, x).backward()
        opt.step()
    with torch.no_grad():
        last = float(recon(inputs, inputs))
    for p in params:  # leave no gradient behind for the fine-tuning optimiser to pick up
        p.grad = None
    return first, last


def greedy_layerwise_pretrain_(
    model: nn.Sequential,
    data,
    *,
    steps_per_layer: int = 300,
    lr: float = 1e-2,
    batch_size: int = 64,
    noise_std: float = 0.0,
    skip_last: bool = True,
    generator: torch.Generator | None = None,
    callback: Callable[[int, float, float], None] | None = None,
) -> nn.Sequential:
    """Pretrain each hidden layer of ``model`` in turn as an autoencoder, **in place**, and return it.

    Layer ``k`` is trained on ``data`` passed through the (already pretrained, now fixed) layers below
    it; see :func:`pretrain_layer_`. ``skip_last`` leaves the output layer for fine-tuning. ``data`` is
    a tensor ``(N, in_features)`` or an iterable of batches (tensors or ``(x, y)`` tuples; all of it is
    held in memory, so pass a subset of a large data set). ``callback(k, before, after)`` receives each
    layer's reconstruction error. Fine-tune afterwards with the usual supervised loop.

    >>> torch.manual_seed(0) and None
    >>> net = nn.Sequential(nn.Linear(10, 6), nn.Sigmoid(), nn.Linear(6, 4), nn.Sigmoid(), nn.Linear(4, 1))
    >>> errs = []
    >>> _ = greedy_layerwise_pretrain_(net, torch.randn(128, 10), steps_per_layer=50,
    ...                               callback=lambda k, a, b: errs.append(b < a))
    >>> errs
    [True, True]
    """
    prefix, stages = split_stages(model)
    x = _as_tensor(data)
    ref = stages[0].linear.weight
    x = x.to(device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        for m in prefix:
            x = m(x)
    todo = stages[:-1] if skip_last else stages
    if not todo:
        raise ConfigError("the model has a single Linear layer (the output): nothing to pretrain")
    for k, stage in enumerate(todo):
        first, last = pretrain_layer_(stage, x, steps=steps_per_layer, lr=lr, batch_size=batch_size,
                                     noise_std=noise_std, generator=generator)
        if callback is not None:
            callback(k, first, last)
        with torch.no_grad():
            x = stage(x)  # codes for the next layer
    return model


def make_rprop(
    model: nn.Module,
    lr: float = 0.01,
    etas: tuple[float, float] = (0.5, 1.2),
    step_sizes: tuple[float, float] = (1e-6, 50.0),
) -> torch.optim.Rprop:
    """``torch.optim.Rprop`` over ``model``'s parameters (Riedmiller & Braun 1993).

    When it helps: a deep network whose lower layers receive gradients orders of magnitude smaller
    than the upper ones (vanishing). Rprop's step per weight is its own adaptive size times the
    *sign* of the gradient, so the gradient's magnitude, the thing that vanished, is ignored; the
    first layer moves as fast as the last. Use it **full batch** (or with very large batches): with
    noisy minibatch gradients the sign flips at random, the step sizes collapse, and Rprop degrades
    (that is what RMSprop was invented to fix). ``lr`` is the initial step size of every weight;
    ``etas`` the (shrink, grow) factors and ``step_sizes`` the (min, max) step.

    >>> opt = make_rprop(nn.Linear(3, 1))
    >>> type(opt).__name__
    'Rprop'
    """
    if not (lr > 0):
        raise ConfigError(f"lr={lr} must be > 0 (Rprop's initial step size)")
    return torch.optim.Rprop(model.parameters(), lr=lr, etas=etas, step_sizes=step_sizes)


# old names of the two in-place trainers (in-place functions end in "_"): warn for one release
pretrain_layer = renamed_function(pretrain_layer_, "pretrain_layer", __name__)
greedy_layerwise_pretrain = renamed_function(greedy_layerwise_pretrain_, "greedy_layerwise_pretrain", __name__)
