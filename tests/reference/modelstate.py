"""Everything a probe could leave behind on a model, as comparable plain data (independent of gradprobe).

``hooks_and_attributes(model)`` lists, for every module, every hook dict torch keeps and the names in
its ``__dict__`` (a patched ``forward`` is one), and for every parameter its hook dicts and attributes;
``values(model)`` clones every parameter, buffer and ``.grad``. Two snapshots are equal iff nothing was
added, removed or changed; ``bitwise_equal`` compares values exactly (NaN equal to NaN).
"""
from __future__ import annotations

import torch
from torch import nn

_MODULE_HOOK_DICTS = (
    "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks", "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called", "_state_dict_hooks", "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)


def hooks_and_attributes(model: nn.Module) -> list:
    out = []
    for name, m in model.named_modules():
        dicts = tuple((d, dict(getattr(m, d, None) or {})) for d in _MODULE_HOOK_DICTS)
        out.append((name, type(m), dicts, sorted(vars(m)), vars(m).get("forward")))
    for name, p in model.named_parameters():
        out.append((name, id(p), p._backward_hooks is None, dict(p._backward_hooks or {}),
                    p._post_accumulate_grad_hooks is None, dict(p._post_accumulate_grad_hooks or {}),
                    sorted(vars(p)), p.requires_grad))
    return out


def values(model: nn.Module) -> dict[str, torch.Tensor | None]:
    out: dict[str, torch.Tensor | None] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        out[name] = t.detach().clone()
    for name, p in model.named_parameters():
        out[name + ".grad"] = None if p.grad is None else p.grad.detach().clone()
    return out


def bitwise_equal(a, b) -> bool:
    """Same keys, and each pair of tensors identical bit for bit (``None`` only equals ``None``)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(bitwise_equal(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return isinstance(b, (tuple, list)) and len(a) == len(b) and all(bitwise_equal(x, y) for x, y in zip(a, b))
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor) or a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.is_floating_point() or a.is_complex():
            return bool(torch.equal(a.view(torch.uint8) if a.dtype.itemsize == 1 else a.contiguous().view(_int_of(a)),
                                    b.contiguous().view(_int_of(b)) if a.dtype.itemsize != 1 else b.view(torch.uint8)))
        return bool(torch.equal(a, b))
    return a == b


def _int_of(t: torch.Tensor) -> torch.dtype:
    return {2: torch.int16, 4: torch.int32, 8: torch.int64, 16: torch.int64}[t.dtype.itemsize]
