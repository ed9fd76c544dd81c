"""Training loops the tests share (plain torch around a gradprobe ``Probe``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def train_cross_entropy(probe, net: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                        steps: int) -> torch.Tensor:
    """``steps`` full-batch steps on ``(x, y)`` under ``probe``; returns the last loss.

    Each step: ``opt.zero_grad()``, the mean cross-entropy ``F.cross_entropy(net(x), y)``, ``backward()``,
    ``probe.step(loss)``, ``opt.step()`` (the probe records before the optimizer moves the weights).
    """
    loss = None
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        probe.step(loss)
        opt.step()
    return loss
