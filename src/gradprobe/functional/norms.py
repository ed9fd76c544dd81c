"""Batched norms with a single host synchronisation.

The probe needs one L2 norm per parameter (or per activation) every step. Computing
``p.grad.norm().item()`` per tensor costs a host sync each; instead we group tensors by
(device, dtype), use ``torch._foreach_norm`` (the kernel ``torch.nn.utils.clip_grad_norm_`` uses),
and return one float64 vector that the caller moves to the host once.

:func:`tensor_norm` is the norm of one tensor of any kind a model can produce or hold (nested,
sparse, integer, low precision, meta), never overflowing for finite entries.
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

import torch

__all__ = ["grouped_norms", "norm_dtype", "tensor_norm", "exact_norm"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_COMPRESSED = (torch.sparse_csr, torch.sparse_csc, torch.sparse_bsr, torch.sparse_bsc)
#: integer tensors are cast to float64 this many entries at a time (a quantized weight stays its size)
_CHUNK = 1 << 22


def norm_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for a norm of a ``dtype`` tensor: float32 for half types, else itself."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def _dense(t: torch.Tensor) -> torch.Tensor:
    if t.is_sparse:
        return t.coalesce()._values()
    if t.layout in _COMPRESSED:
        return t.values()
    return t


def exact_norm(t: torch.Tensor) -> torch.Tensor:
    """``‖t‖₂`` accumulated in float64 (0-d float64 tensor on ``t``'s device): exact for integer and bool
    tensors, no overflow for finite float entries up to float64's range. Integer tensors are cast a
    chunk at a time, so no float64 copy of a whole quantized weight is made.

    >>> exact_norm(torch.tensor([3, 4], dtype=torch.int8)).item()
    5.0
    """
    t = _dense(t)
    if t.is_floating_point() or t.is_complex():
        return torch.linalg.vector_norm(t, dtype=torch.complex128 if t.is_complex() else torch.float64).real
    flat = t.reshape(-1)
    sq = torch.zeros((), dtype=torch.float64, device=t.device)
    for k in range(0, flat.numel(), _CHUNK):
        sq = sq + flat[k : k + _CHUNK].to(torch.float64).square().sum()
    return sq.sqrt()


def tensor_norm(t: torch.Tensor) -> torch.Tensor | None:
    """``‖t‖₂`` of one tensor as a 0-d float tensor on ``t``'s device; ``None`` if ``t`` has no data (meta).

    Every entry counts once: a sparse tensor's stored values (duplicates of a COO tensor summed
    first), a nested tensor's components (padding is not part of it), an integer or bool tensor's
    values (in float64, exact). Half types accumulate in float32. A finite tensor never gets an
    infinite norm: on the CPU a float32 norm beyond float32's range (about 3.4e38) is recomputed in
    float64 at once (there is no device to wait for); on other devices float32 and bfloat16 tensors
    accumulate in float64 from the start, so no host synchronisation is needed.

    >>> tensor_norm(torch.tensor([3e37, 4e37] * 8)).item() > 1e38
    True
    >>> tensor_norm(torch.nested.nested_tensor([torch.ones(2), torch.ones(7)], layout=torch.jagged)).item()
    3.0
    """
    dt = t.dtype
    if (dt is torch.float32 or dt is torch.float64) and t.layout is torch.strided and not t.is_nested and t.is_cpu:
        # the common case first (a dense float tensor on the CPU): no other checks
        if dt is torch.float64:
            return torch.linalg.vector_norm(t)
        if torch.compiler.is_compiling():  # traced into a graph: no host read; accumulate in float64 instead
            return torch.linalg.vector_norm(t, dtype=torch.float64)
        n = torch.linalg.vector_norm(t)
        # float32 overflow, or a real Inf/NaN entry: float64 tells the two apart (Inf stays Inf)
        return exact_norm(t) if n.item() == math.inf else n
    if t.is_meta:
        return None
    if t.is_nested:
        parts = [t.values()] if t.layout == torch.jagged else list(t.unbind())
        norms = [tensor_norm(p) for p in parts]
        if not norms:
            return torch.zeros((), device=t.device)
        return torch.linalg.vector_norm(torch.stack([n.to(torch.float64) for n in norms]))
    if not (t.is_floating_point() or t.is_complex()):
        return exact_norm(t)
    t = _dense(t)
    if t.device.type != "cpu":
        if t.dtype in (torch.float32, torch.bfloat16):
            return torch.linalg.vector_norm(t, dtype=torch.float64)
        return torch.linalg.vector_norm(t, dtype=norm_dtype(t.dtype))
    n = torch.linalg.vector_norm(t, dtype=norm_dtype(t.dtype))
    if torch.compiler.is_compiling():  # traced into a graph: no host read; accumulate in float64 instead
        return torch.linalg.vector_norm(t, dtype=torch.float64) if n.dtype != torch.float64 else n
    if n.dtype != torch.float64 and n.item() == math.inf:
        # float32 overflow, or a real Inf/NaN entry: float64 tells the two apart (Inf stays Inf)
        return exact_norm(t)
    return n


def grouped_norms(tensors: Sequence[torch.Tensor], device: torch.device | None = None) -> torch.Tensor:
    """L2 norms ``[‖t_0‖₂, …, ‖t_{n-1}‖₂]`` of ``n`` tensors as one float64 tensor of shape ``(n,)``.

    Non-finite entries propagate (a tensor containing NaN has norm NaN; Inf gives Inf), so callers
    can report them; a float32 norm beyond float32's range is Inf too (callers recheck those with
    :func:`exact_norm`). Integer and bool tensors are measured exactly in float64. The result lives on ``device`` (default: the first tensor's device); nothing
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
        if not (dtype.is_floating_point or dtype.is_complex):
            norms = [exact_norm(t) for t in group]  # integer / bool: linalg.vector_norm refuses them
        elif hasattr(torch, "_foreach_norm") and acc == dtype and dtype.is_floating_point:
            norms = torch._foreach_norm(group, 2)
        else:
            norms = [torch.linalg.vector_norm(t, dtype=acc) for t in group]
        vals = torch.stack(list(norms)).to(device=out_device, dtype=torch.float64)
        out[torch.tensor(idx, device=out_device)] = vals
    return out
