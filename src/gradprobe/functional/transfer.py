"""Move many small device tensors to the host at once: one copy per device, not one per tensor."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["to_host"]


def to_host(tensors: Sequence[torch.Tensor]) -> list[np.ndarray]:
    """``[t.double().cpu().numpy() for t in tensors]`` with a single device→host copy per device.

    Each tensor is flattened and cast to float64 on its own device, the pieces of one device are
    concatenated and copied once, and the host buffer is split back into arrays of the original shapes.
    Integer tensors are returned as float64 too (exact below 2⁵³).

    >>> import torch
    >>> [a.tolist() for a in to_host([torch.tensor(2.0), torch.arange(3)])]
    [2.0, [0.0, 1.0, 2.0]]
    """
    out: list[np.ndarray | None] = [None] * len(tensors)
    by_dev: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        by_dev.setdefault(t.device, []).append(i)
    for dev, idx in by_dev.items():
        flat = [tensors[i].detach().reshape(-1).to(torch.float64) for i in idx]
        if len(flat) == 1:
            host = flat[0].cpu().numpy().copy()  # a copy: the arrays never alias a live tensor
        else:
            host = torch.cat(flat).cpu().numpy()  # cat copies
        pos = 0
        for i, f in zip(idx, flat):
            n = f.numel()
            out[i] = host[pos : pos + n].reshape(tensors[i].shape)
            pos += n
    return out  # type: ignore[return-value]
