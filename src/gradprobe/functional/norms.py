"""Batched norms with a single host synchronisation.

The probe needs one L2 norm per parameter (or per activation) every step. Computing
``p.grad.norm().item()`` per tensor costs a host sync each; instead we group tensors by
(device, dtype), use ``torch._foreach_norm`` (the kernel ``torch.nn.utils.clip_grad_norm_`` uses),
and return one float64 vector that the caller moves to the host once.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch

__all__ = ["grouped_norms", "norm_dtype"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def norm_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for a norm of a ``dtype`` tensor: float32 for half types, else itself."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def _dense(t: torch.Tensor) -> torch.Tensor:
    if t.is_sparse:
        return t.coalesce()._values()
    return t


def grouped_norms(tensors: Sequence[torch.Tensor], device: torch.device | None = None) -> torch.Tensor:
    """L2 norms ``[‖t_0‖₂, …, ‖t_{n-1}‖₂]`` of ``n`` tensors as one float64 tensor of shape ``(n,)``.

    Non-finite entries propagate (a tensor containing NaN has norm NaN; Inf gives Inf), so callers
    can report them. The result lives on ``device`` (default: the first tensor's device); nothing
    is synchronised with the host.

    >>> import torch
    >>> grouped_norms([torch.tensor([3.0, 4.0]), torch.ones(4, dtype=torch.float64)]).tolist()
    [5.0, 2.0]
    """
    n = len(tensors)
    if n == 0:
        return torch.zeros(0, dtype=torch.float64, device=device)
    out_device = device if device is not None else tensors[0].device
    t0 = tensors[0]
    if (
        t0.dtype in (torch.float32, torch.float64)
        and not any(t.is_sparse for t in tensors)
        and all(t.device == t0.device and t.dtype == t0.dtype for t in tensors)
    ):
        # the common case, one (device, dtype) group: one fused kernel, no scatter
        return torch.stack(torch._foreach_norm(list(tensors), 2)).to(device=out_device, dtype=torch.float64)
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    dense = [_dense(t) for t in tensors]
    for i, t in enumerate(dense):
        groups[(t.device, t.dtype)].append(i)
    out = torch.empty(n, dtype=torch.float64, device=out_device)
    for (dev, dtype), idx in groups.items():
        group = [dense[i] for i in idx]
        acc = norm_dtype(dtype)
        if hasattr(torch, "_foreach_norm") and acc == dtype and dtype.is_floating_point:
            norms = torch._foreach_norm(group, 2)
        else:
            norms = [torch.linalg.vector_norm(t, dtype=acc) for t in group]
        vals = torch.stack(list(norms)).to(device=out_device, dtype=torch.float64)
        out[torch.tensor(idx, device=out_device)] = vals
    return out
