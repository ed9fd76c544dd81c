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
    if all(t.is_cpu and t.dtype in _FLOATS and t.layout is torch.strided for t in tensors):
        # already on the host: nothing to batch, one float64 copy each (astype copies: no alias)
        return [t.detach().numpy().astype(np.float64) for t in tensors]
    if len(tensors) == 1 or all(t.device == tensors[0].device for t in tensors):
        return _one_device(tensors)  # the common case: one device (fewer dispatcher calls per fetch)
    out: list[np.ndarray | None] = [None] * len(tensors)
    by_dev: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        by_dev.setdefault(t.device, []).append(i)
    for idx in by_dev.values():
        for i, a in zip(idx, _one_device([tensors[i] for i in idx])):
            out[i] = a
    return out  # type: ignore[return-value]


_FLOATS = (torch.float32, torch.float64)


def _one_device(tensors: Sequence[torch.Tensor]) -> list[np.ndarray]:
    """:func:`to_host` of tensors that share one device: one concatenation on it, one copy."""
    if len(tensors) == 1:
        t = tensors[0].detach()
        flat = t.reshape(-1) if t.dtype in _FLOATS else t.reshape(-1).to(torch.float64)
        host = flat.cpu().numpy().astype(np.float64)  # astype copies: the array never aliases a live tensor
        return [host.reshape(t.shape)]
    dtype = tensors[0].dtype
    if dtype in _FLOATS and all(t.dtype is dtype for t in tensors):
        flat = [t.detach().reshape(-1) for t in tensors]
    else:  # mixed or integer dtypes: every piece in float64 first (exact below 2⁵³)
        flat = [t.detach().reshape(-1).to(torch.float64) for t in tensors]
    host = torch.cat(flat).cpu().numpy().astype(np.float64, copy=False)  # cat made a fresh tensor: no alias
    out = []
    pos = 0
    for t, f in zip(tensors, flat):
        n = f.numel()
        out.append(host[pos : pos + n].reshape(t.shape))
        pos += n
    return out
