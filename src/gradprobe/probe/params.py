"""Parameter statistics per layer: gradient norm, weight norm and update ratio.

Equations (layer ``l`` with parameters ``θ_l``; ``L`` the scalar loss as the user defines it, so a
mean-reduced loss gives gradients of the mean):

* ``grad_norm[l]    = ‖∂L/∂θ_l‖₂`` read from ``.grad`` (what the optimizer will see, i.e. after any
  accumulation, before clipping);
* ``weight_norm[l]  = ‖θ_l‖₂``;
* ``update_ratio[l] = ‖θ_l(t) − θ_l(t′)‖₂ / ‖θ_l(t′)‖₂`` between two consecutive recorded steps
  ``t′ < t`` (Bengio et al.'s observation that "higher layers change a lot, lower layers barely").

All norms of a step come from one batched ``torch._foreach_norm`` (no host synchronisation); the
update ratio keeps one snapshot of the parameters.
"""
from __future__ import annotations

import numpy as np
import torch

from gradprobe.functional.norms import grouped_norms
from gradprobe.probe.recorder import Context, Contribution, Deferred, Recorder

__all__ = ["ParamRecorder"]


class ParamRecorder(Recorder):
    """``grad_norm``, ``weight_norm`` and (with ``update_ratio=True``) ``update_ratio`` of every layer."""

    name = "params"

    def __init__(self, update_ratio: bool = True):
        super().__init__()
        self.track_updates = bool(update_ratio)
        self._prev: list[torch.Tensor] | None = None
        self._prev_w_sq: np.ndarray | None = None

    def config(self) -> dict:
        return {"update_ratio": self.track_updates}

    def install(self, ctx: Context) -> None:
        self._params = [p for layer in ctx.layers for p in layer.params]
        self._owner = np.asarray([layer.index for layer in ctx.layers for _ in layer.params], dtype=np.int64)
        self._n = len(ctx.layers)

    def collect(self, advance: bool) -> Deferred:
        params = self._params
        with torch.no_grad():
            g_idx = [k for k, p in enumerate(params) if p.grad is not None]
            grads = [params[k].grad for k in g_idx]
            detached = [p.detach() for p in params]
            tensors = grads + detached
            update = None
            prev = self._prev
            same_shapes = prev is not None and all(a.shape == b.shape for a, b in zip(prev, params))
            if self.track_updates and same_shapes:
                if advance:
                    # subtract in place into the snapshot (its old value is not needed after this):
                    # a fresh _foreach_sub allocates a parameter-sized buffer every step, which costs
                    # about 3x the subtraction itself (page faults; measured in BENCHMARKS.md)
                    torch._foreach_sub_(prev, detached)
                    update = prev  # holds prev − θ: same norm as θ − prev
                else:
                    update = torch._foreach_sub(detached, prev)
                tensors = tensors + list(update)
            norms = grouped_norms(tensors)
            if self.track_updates and advance:
                if not same_shapes:
                    self._prev = [p.clone() for p in detached]
                else:
                    torch._foreach_copy_(prev, detached)
        n_grad, has_update = len(grads), update is not None
        return Deferred([norms], lambda host: self._finish(host[0], g_idx, n_grad, has_update, advance))

    def _finish(self, norms: np.ndarray, g_idx: list[int], ng: int, has_update: bool, advance: bool) -> Contribution:
        params, own, n = self._params, self._owner, self._n
        npar = len(params)
        gn = np.full(npar, np.nan)
        gn[g_idx] = norms[:ng]
        # float32 accumulation can overflow for huge but finite entries: recheck those in float64
        for k in np.flatnonzero(np.isinf(gn)):
            g = params[k].grad
            if torch.isfinite(g).all():
                gn[k] = float(torch.linalg.vector_norm(g, dtype=torch.float64))
        has = np.zeros(npar, dtype=bool)
        has[g_idx] = True
        g_sq = np.bincount(own[has], weights=gn[has] ** 2, minlength=n)
        has_grad = np.zeros(n, dtype=bool)
        has_grad[own[has]] = True
        wn = norms[ng : ng + npar]
        w_sq = np.bincount(own, weights=wn**2, minlength=n)
        layers = {"grad_norm": np.where(has_grad, np.sqrt(g_sq), np.nan), "weight_norm": np.sqrt(w_sq)}
        measured = {"grad_norm": has_grad, "weight_norm": np.ones(n, dtype=bool)}
        if self.track_updates:
            ratio = np.full(n, np.nan)
            prev_w = self._prev_w_sq
            if has_update and prev_w is not None:
                u_sq = np.bincount(own, weights=norms[ng + npar :] ** 2, minlength=n)
                with np.errstate(divide="ignore", invalid="ignore"):
                    ratio = np.sqrt(u_sq) / np.sqrt(prev_w)
            if advance:
                self._prev_w_sq = w_sq
            layers["update_ratio"] = ratio
            measured["update_ratio"] = ~np.isnan(ratio) if has_update and prev_w is not None else np.zeros(n, dtype=bool)
        return Contribution(layers=layers, measured=measured)

    def remove(self) -> None:
        self._prev = None
        self._prev_w_sq = None
