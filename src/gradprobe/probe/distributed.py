"""Data-parallel training (DDP, FSDP2): which process this is, and sums over processes.

Every process (rank) of a data-parallel run holds the same model and its own share of the global batch.

* Parameter gradients: DDP all-reduces ``.grad`` during backward (every rank holds the mean over ranks);
  FSDP2 (``torch.distributed.fsdp.fully_shard``) leaves each rank one shard of it as a ``DTensor``, so a
  norm is ``√(Σ_r ‖shard_r‖²)``: :func:`local_part` and :func:`all_reduce_` give that.
* Hook quantities (``‖∂L/∂h‖``, ``‖h‖``) see only the rank's own samples: the session sums their squares
  over ranks (:func:`all_reduce_`) and rescales them to the loss whose gradient the optimizer sees
  (see :class:`~gradprobe.probe.Session`).

An overhead budget (:mod:`gradprobe.probe.schedule`) times every rank on its own calling thread's CPU
clock: the gradient all-reduce, which DDP runs on communication threads overlapping backward, and the
waits for it cost that thread no CPU time, so each rank budgets against its computation alone (the
probe records less often than the budget would allow on the wall clock, never more); the ranks then
agree on the slowest cadence any of them planned, so that all record the same steps.

Collectives run on the default process group (on CPU for ``gloo``, on the current CUDA device for
``nccl``) and on the meshes of sharded tensors; every rank must reach them together, i.e. call
``probe.step()`` on the same steps.
"""
from __future__ import annotations

import sys

import numpy as np
import torch

from gradprobe.errors import ConfigError

__all__ = ["world", "is_sharded_tensor", "local_part", "all_reduce_", "all_reduce_host", "collective_device"]


def world() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group; ``(0, 1)`` when none is initialised."""
    dist = torch.distributed
    if not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def _dtensor_type():
    # no tensor can be a DTensor unless torch.distributed.tensor was imported: never import it ourselves
    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None)


def is_sharded_tensor(t: torch.Tensor) -> bool:
    """``t`` is a ``DTensor`` (a sharded or replicated tensor over a device mesh)."""
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def local_part(t: torch.Tensor):
    """``(local tensor, group or None)``: for a DTensor, its local shard and the process group over
    which the squares of local norms add up to the global one (``None`` if it is replicated); for a
    plain tensor, itself and ``None``.

    Only placements a norm can be assembled from are accepted: ``Shard`` (sum over that mesh dimension)
    and ``Replicate`` (nothing to sum). A ``Partial`` gradient is a sum of not-yet-reduced terms whose
    norm is not a function of the local norms: a clear error.
    """
    if not is_sharded_tensor(t):
        return t, None
    dims = []
    for d, p in enumerate(t.placements):
        if p.is_shard():
            dims.append(d)
        elif not p.is_replicate():
            raise ConfigError(f"a gradient or parameter is a DTensor with placement {p} on mesh dimension {d}: its "
                              "norm needs the reduced tensor; record after the gradients are reduced (e.g. in "
                              "on_before_optimizer_step, not inside backward)")
    if not dims:
        return t.to_local(), None
    groups = tuple(t.device_mesh.get_group(d) for d in dims)  # sharded over each of these mesh dimensions
    return t.to_local(), groups[0] if len(groups) == 1 else groups


def collective_device(group=None) -> torch.device:
    """Where a collective's tensor must live: the current CUDA device for NCCL, else the CPU."""
    dist = torch.distributed
    backend = dist.get_backend(group)
    if "nccl" in str(backend).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_(t: torch.Tensor, group=None) -> torch.Tensor:
    """Sum ``t`` over the ranks of ``group`` (one group, a tuple of groups summed in turn, or the
    default group) in place; returns ``t``."""
    dist = torch.distributed
    groups = group if isinstance(group, tuple) else (group,)
    for g in groups:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=g)
    return t


def all_reduce_host(a: np.ndarray, op: str = "sum") -> np.ndarray:
    """``Σ_ranks a`` (``op="max"``: the maximum) of a float64 host array: one collective on the default group."""
    dist = torch.distributed
    t = torch.from_numpy(np.array(a, dtype=np.float64)).to(collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.cpu().numpy()
