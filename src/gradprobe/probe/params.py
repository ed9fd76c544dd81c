"""Parameter statistics per layer, as two recorders with their own cadences.

Equations (layer ``l`` with parameters ``θ_l``; ``L`` the scalar loss as the user defines it, so a
mean-reduced loss gives gradients of the mean):

* :class:`GradRecorder` — ``grad_norm[l] = ‖∂L/∂θ_l‖₂`` read from ``.grad`` (what the optimizer will
  see, i.e. after any accumulation, before clipping). A NaN/Inf norm is a non-finite gradient. One
  batched ``torch._foreach_norm`` over the gradients: the cheapest useful measurement, kept every step.
* :class:`WeightRecorder` — ``weight_norm[l] = ‖θ_l‖₂`` and ``update_ratio[l] = ‖θ_l(t) − θ_l(t′)‖₂ /
  ‖θ_l(t′)‖₂`` between two consecutive steps ``t′ < t`` this recorder measured (Bengio et al.'s
  observation that "higher layers change a lot, lower layers barely"; with a cadence of ``p`` steps the
  ratio spans ``p`` optimizer updates). It reads every weight (one pass, plus three for the update
  ratio: subtract, norm, snapshot copy) and keeps one snapshot of the parameters, taken only on the
  steps it measures.

Neither synchronises with the host: the norms stay device tensors until the session copies every
recorder's numbers at once.

:class:`GradRecorder` also fills the ``"totals"`` table (one site, ``"model"``): ``grad_norm = ‖∂L/∂θ‖₂``
over every distinct parameter of the layers (a parameter shared by two layers counts once), the total
norm ``torch.nn.utils.clip_grad_norm_(model.parameters(), ...)`` computes and clips.

Sharded parameters (``DTensor``, e.g. FSDP2's ``fully_shard``) are measured on their local shards and
the squares of the shard norms are summed over the mesh (one collective per recorded step, on the norms
only): ``‖g‖² = Σ_r ‖g_r‖²``, the value of the unsharded model.

Both follow a parameter replaced by another under the same name (``load_state_dict(..., assign=True)``:
:class:`~gradprobe.probe.layers.ParamWatch`). A layer with a parameter on the ``meta`` device (no data)
is not measured. Integer and bool parameters (quantized weights, masks) count in ``weight_norm``
(exactly, in float64) but give their layer no ``update_ratio``. A float32 norm that overflows for
finite entries is recomputed in float64.
"""
from __future__ import annotations

import math
import operator
import weakref

import numpy as np
import torch

from gradprobe.functional.norms import exact_norm, grouped_norms
from gradprobe.probe.distributed import all_reduce_, local_part
from gradprobe.probe.layers import ParamWatch
from gradprobe.probe.recorder import Context, Contribution, Deferred, Recorder
from gradprobe.trace import Table

__all__ = ["GradRecorder", "WeightRecorder"]

_FAST_DTYPES = {torch.float32, torch.float64}
# (dtype, is_sparse, is_meta, requires_grad) of a gradient the fused kernel reads as it is
_GRAD_KIND = operator.attrgetter("dtype", "is_sparse", "is_meta", "requires_grad")
_FAST_KINDS = {(d, False, False, False) for d in _FAST_DTYPES}
_IS_META, _SHAPE, _DTYPE, _DEVICE, _LAYOUT = map(operator.attrgetter, ("is_meta", "shape", "dtype", "device", "layout"))
# (dtype, device, layout) of a weight: one such group of a fast dtype, dense, is one fused kernel
_GROUP = operator.attrgetter("dtype", "device", "layout")
_GRAD_OF, _VERSION = operator.attrgetter("grad"), operator.attrgetter("_version")


class _AllGrads:
    """The finish of a step on which every parameter had a dense float32/64 gradient
    (:meth:`GradRecorder._finish_all`), with what it needs: the gradients' references and the layout."""

    __slots__ = ("rec", "refs", "layout")

    def __init__(self, rec: GradRecorder, refs, layout: tuple):
        self.rec, self.refs, self.layout = rec, refs, layout

    def __call__(self, host: list[np.ndarray]) -> Contribution:
        return self.rec._finish_all(self.refs, host, self.layout)


class _Params:
    """The flat parameter list of a session's layers (as the modules hold them now) and the owning layer
    of each entry."""

    def __init__(self, ctx: Context):
        self.watch = ParamWatch(ctx.layers)
        self.n = len(ctx.layers)
        self.model_kind = type(ctx.model).__name__
        self._take()

    def _take(self) -> None:
        self.params = self.watch.params
        self.owner = np.asarray(self.watch.owner, dtype=np.int64)
        self.count = np.bincount(self.owner, minlength=self.n)
        self.has_params = self.count > 0
        self.has_params.setflags(write=False)  # (handed to every record as it is: records share read-only masks)
        first: dict[int, int] = {}
        #: entries of distinct parameters (a parameter shared by two layers is listed under both)
        self.unique = np.asarray([k for k, p in enumerate(self.params) if first.setdefault(id(p), k) == k], dtype=np.int64)
        self.all_unique = len(self.unique) == len(self.params)  # no parameter shared by two layers
        # sharded parameters (DTensor) are read through their local shards; ``None`` for plain tensors
        self.groups = [local_part(p)[1] for p in self.params]
        self.sharded = any(g is not None for g in self.groups)
        #: what a finish needs of the layout, taken by a step's deferred numbers when collected (a batched
        #: fetch may finish them after the parameters were replaced): (owner, unique, all_unique, has_params, n)
        self.layout = (self.owner, self.unique, self.all_unique, self.has_params, self.n)

    def refresh(self) -> bool:
        """Follow replaced parameters; ``True`` if some were (raises if a layer's parameter set changed)."""
        changed = self.watch.refresh()  # (raises, on every call, while a layer's parameter set differs)
        if changed:
            self._take()
        return changed

    def complete(self, idx) -> np.ndarray:
        """``(L,)`` bool: every parameter of the layer is among ``idx``."""
        return np.bincount(self.owner[idx], minlength=self.n) == self.count

    def per_layer(self, sq: np.ndarray, where: np.ndarray | None = None) -> np.ndarray:
        """``(L,)`` Σ over each layer's parameters of ``sq`` (float64; ``where`` selects entries)."""
        own = self.owner if where is None else self.owner[where]
        return np.bincount(own, weights=sq if where is None else sq[where], minlength=self.n)


class GradRecorder(Recorder):
    """``grad_norm`` of every layer (``measured`` False where no parameter of the layer has a ``.grad``)."""

    name = "grads"
    essential = True
    norm_of = {"grad_norm": "param_grad", "totals.grad_norm": "param_grad"}

    def install(self, ctx: Context) -> None:
        self._p = _Params(ctx)
        self._deferred = ctx.deferred
        self._all = list(range(len(self._p.params)))
        self._batch_index = None  # (owner, steps, flattened (step, layer) index) of _finish_batch
        # the totals table's sites, built once (its one column is the only thing a step changes)
        self._totals_sites = (("model",), (self._p.model_kind,))

    def collect(self, advance: bool) -> Deferred:
        p = self._p
        if p.refresh():
            self._all = list(range(len(p.params)))
        grads = list(map(_GRAD_OF, p.params))
        if not p.sharded:
            try:  # (dtype, sparse?, meta?, requires grad?) of every .grad in one C-level pass; None raises
                kinds = set(map(_GRAD_KIND, grads))
            except AttributeError:
                kinds = None
            if kinds is not None and kinds <= _FAST_KINDS:
                # the common case (every gradient present, dense, float32/64, with data, not part of a
                # graph: no torch.no_grad() needed): what the general path below does for it, without
                # its per-tensor checks
                norms = torch.stack(torch._foreach_norm(grads, 2)) if grads else torch.zeros(0)
                return Deferred([norms], _AllGrads(self, self._refs(grads), p.layout), self._finish_batch)
        return self._collect_general(grads)

    def _refs(self, grads: list):
        """For the float64 recheck of an overflowed norm: which ``.grad`` each norm came from. When the copy
        is deferred (``fetch_every > 1``) only weak references and versions (old gradients must not be kept
        alive, and one changed in place since is not the one measured), in C-level passes."""
        if not self._deferred:
            return grads
        return list(map(weakref.ref, grads)), list(map(_VERSION, grads))

    @staticmethod
    def _still(refs, j: int):
        """The ``.grad`` norm ``j`` was measured from, or ``None`` if it was freed or changed since."""
        if isinstance(refs, list):
            return refs[j]
        g = refs[0][j]()
        return g if g is not None and g._version == refs[1][j] else None

    def _collect_general(self, grads: list) -> Deferred:
        """:meth:`collect` for missing, meta, sparse, low-precision or sharded gradients."""
        if any(g is None or g.is_meta for g in grads):  # (a meta gradient has no data: not measured)
            g_idx = [k for k, g in enumerate(grads) if g is not None and not g.is_meta]
            grads = [grads[k] for k in g_idx]
        else:
            g_idx = self._all
        groups = None
        if self._p.sharded:
            parts = [local_part(g) for g in grads]
            grads, groups = [t for t, _ in parts], [g for _, g in parts]
        with torch.no_grad():
            if {g.dtype for g in grads} <= _FAST_DTYPES and not any(g.is_sparse for g in grads):
                # one fused kernel (autograd keeps every .grad on its parameter's device and dtype)
                norms = torch.stack(torch._foreach_norm(grads, 2)) if grads else torch.zeros(0)
            else:
                norms = grouped_norms(grads)
            if groups is not None and any(g is not None for g in groups):
                norms = _sharded_norms(norms, groups)
        refs = self._refs(grads)
        return Deferred([norms], lambda host: self._finish(host[0], g_idx, refs))

    def _finish_all(self, refs, host: list[np.ndarray], layout: tuple) -> Contribution:
        """:meth:`_finish` when every parameter has a gradient (``g_idx`` is every entry); ``layout``:
        :attr:`_Params.layout` when the norms were collected."""
        norms = host[0]
        owner, unique, all_unique, has_params, n = layout
        sq = norms * norms
        # (1,) Σ over distinct parameters; an Inf norm makes it Inf (squares are ≥ 0 or NaN), so a finite
        # sum proves every norm finite without a pass over them
        total = (sq if all_unique else sq[unique]).sum(keepdims=True)
        if not math.isfinite(total[0]) and np.isinf(norms).any():
            return self._finish(norms, self._all, refs)
        np.sqrt(total, out=total)
        total.setflags(write=False)
        per_layer = np.sqrt(np.bincount(owner, weights=sq, minlength=n))  # Σ per layer (_Params.per_layer)
        per_layer.setflags(write=False)  # fresh and read-only: the record takes it without a copy
        return Contribution(layers={"grad_norm": per_layer}, measured={"grad_norm": has_params},
                            tables={"totals": Table.trusted(*self._totals_sites, {"grad_norm": total})})

    def _finish_batch(self, deferreds: list[Deferred], hosts: list[list[np.ndarray]]) -> list[Contribution]:
        """:meth:`_finish_all` of ``N`` steps at once (:attr:`Deferred.batch`): the ``(N, P)`` norms squared,
        their ``(N,)`` sums over distinct parameters (a row sum, as :meth:`_finish_all`'s sum of one row)
        and their ``(N, L)`` sums per layer in one ``np.bincount`` over the flattened ``(step, layer)``
        index (each bin adds its entries in the same order as the per-step ``bincount``): bitwise the
        numbers of :meth:`_finish_all`, step by step. A step whose sum is not finite, or collected under
        another parameter layout, is finished on its own."""
        finishes = [d.finish for d in deferreds]
        layout = finishes[0].layout
        if any(f.layout is not layout for f in finishes):  # (parameters replaced within the batch)
            return [f(h) for f, h in zip(finishes, hosts)]
        owner, unique, all_unique, has_params, n = layout
        steps = len(deferreds)
        norms = np.concatenate([h[0] for h in hosts]).reshape(steps, -1)  # (C calls: np.stack is Python)
        sq = norms * norms
        totals = np.add.reduce(sq if all_unique else sq[:, unique], axis=1)  # (what ndarray.sum calls)
        index = self._batch_index
        if index is None or index[0] is not owner or index[1] != steps:
            flat = (owner[None, :] + n * np.arange(steps, dtype=np.int64)[:, None]).reshape(-1)
            index = self._batch_index = (owner, steps, flat)
        per_layer = np.bincount(index[2], weights=sq.reshape(-1), minlength=steps * n).reshape(steps, n)
        finite = np.isfinite(totals)
        sites = self._totals_sites
        out = []
        for i in range(steps):
            if not finite[i] and np.isinf(norms[i]).any():
                out.append(finishes[i](hosts[i]))
                continue
            total = np.sqrt(totals[i : i + 1])  # fresh arrays (a ufunc's output), read-only: records take them as they are
            total.setflags(write=False)
            layer = np.sqrt(per_layer[i])
            layer.setflags(write=False)
            out.append(Contribution(layers={"grad_norm": layer}, measured={"grad_norm": has_params},
                                    tables={"totals": Table.trusted(*sites, {"grad_norm": total})}))
        return out

    def _finish(self, norms: np.ndarray, g_idx: list[int], refs: list) -> Contribution:
        p = self._p
        if g_idx is self._all and not np.isinf(norms).any():
            return self._finish_all(refs, [norms], p.layout)  # the common case: every parameter has a finite-norm gradient
        gn = np.zeros(len(p.params))
        has = np.zeros(len(p.params), dtype=bool)
        gn[g_idx] = norms
        has[g_idx] = True
        unknown = np.zeros(len(p.params), dtype=bool)
        # float32 accumulation overflows for huge but finite entries: recheck those in float64, if the
        # gradient is still the one measured (else the value is unknown: reported as not measured)
        for j in np.flatnonzero(np.isinf(norms)):
            k = g_idx[j]
            g = self._still(refs, j)
            if g is None:
                unknown[k] = True
                continue
            if p.groups[k] is None and torch.isfinite(g).all():  # (a shard's norm alone is not the layer's)
                gn[k] = float(torch.linalg.vector_norm(g, dtype=torch.float64))
        has_grad = np.zeros(p.n, dtype=bool)
        has_grad[p.owner[has & ~unknown]] = True
        has_grad[p.owner[unknown]] = False
        g_sq = p.per_layer(gn**2, has)
        u = p.unique[has[p.unique] & ~unknown[p.unique]]
        total = np.sqrt(np.sum(gn[u] ** 2)) if len(u) else np.nan
        return Contribution(layers={"grad_norm": np.where(has_grad, np.sqrt(g_sq), np.nan)},
                            measured={"grad_norm": has_grad}, tables=self._totals(total))

    def _totals(self, total: float) -> dict:
        col = np.array([total], dtype=np.float64)
        col.setflags(write=False)
        return {"totals": Table.trusted(*self._totals_sites, {"grad_norm": col})}


class WeightRecorder(Recorder):
    """``weight_norm`` and (``update_ratio=True``) ``update_ratio`` of every layer."""

    name = "weights"

    #: True when a consumer may finish this recorder's contributions after the parameters changed (the full
    #: flight recorder reusing them): ``collect`` then notes the parameters' versions, and a weight norm that
    #: overflowed float32 is re-read only from an unchanged parameter (else unmeasured), as with a deferred context
    late_finish: bool = False

    def __init__(self, update_ratio: bool = True):
        super().__init__()
        self.track_updates = bool(update_ratio)
        self._prev: list[torch.Tensor] | None = None
        self._prev_sig: tuple | None = None  # _signature of the tensors the snapshot was cloned from
        self._prev_norms: torch.Tensor | None = None  # (P,) weight norms at the snapshot (device)

    #: on a step it records, its contribution is its flight twin's where its update ratio spans that one step
    #: (the full flight recorder reuses it only then: it recorded the step before, or neither has a snapshot)
    flight_reuse = True

    def flight_twin(self) -> WeightRecorder:
        """The full flight recorder's twin: ``weight_norm`` and (if this recorder tracks updates) the one-step
        ``update_ratio``, over its own parameter snapshot (:mod:`gradprobe.probe.flight`)."""
        return WeightRecorder(update_ratio=self.track_updates)

    def config(self) -> dict:
        return {"update_ratio": self.track_updates}

    @property
    def has_snapshot(self) -> bool:
        """Whether a parameter snapshot is held (the update ratio of the next recorded step is measurable)."""
        return self._prev is not None

    def continue_from(self, other: WeightRecorder) -> None:
        """Take ``other``'s parameter snapshot and weight norms as this recorder's own, so its next update
        ratio spans the step since ``other`` last recorded (the full flight recorder's weights twin after
        sitting out steps the session's recorder recorded). The snapshot is copied into this recorder's own
        buffers: ``other`` overwrites its own in place when it next records."""
        if other._prev is None:
            self._prev = self._prev_sig = self._prev_norms = None
            return
        with torch.no_grad():
            if self._prev is not None and self._prev_sig == other._prev_sig:
                torch._foreach_copy_(self._prev, other._prev)
            else:
                self._prev = [p.clone() for p in other._prev]
        self._prev_sig = other._prev_sig
        self._prev_norms = other._prev_norms  # (a view of that step's norms, never written again)

    def install(self, ctx: Context) -> None:
        self._p = _Params(ctx)
        self._deferred = ctx.deferred
        self._plan = None

    def _plan_for(self, params) -> tuple[list[int], list[int], bool]:
        """(parameters with data, parameters whose updates are tracked, any on meta?), recomputed only
        when it changes. Integer/bool parameters are not tracked: ``_foreach_sub`` wraps or refuses them."""
        meta = any(map(_IS_META, params))
        if self._plan is None or self._plan[2] != meta or self._plan[3] is not params:
            w_idx = [k for k, p in enumerate(params) if not p.is_meta]
            u_idx = [k for k in w_idx if params[k].is_floating_point() or params[k].is_complex()]
            self._plan = (w_idx, u_idx, meta, params)
            # for finish(): the index arrays and which layers they cover, once per plan (not per step)
            w_arr, u_arr = np.asarray(w_idx, dtype=np.int64), np.asarray(u_idx, dtype=np.int64)
            self._masks = (w_arr, u_arr, self._p.complete(w_arr), self._p.complete(u_arr))
            self._masks[2].setflags(write=False)  # (finish_whole hands it to every record as it is)
            # every parameter has data and every layer is complete: finish() needs no scatter nor mask
            self._whole = len(w_idx) == len(params) and bool(self._masks[2].all())
        return self._plan[:3]

    def collect(self, advance: bool) -> Deferred:
        self._p.refresh()
        params = self._p.params
        w_idx, u_idx, _ = self._plan_for(params)
        with torch.no_grad():  # (so the parameters themselves can be read: no graph, no detached copies)
            if self._p.sharded:
                detached = [local_part(params[k].detach())[0] for k in w_idx]
                tracked = [local_part(params[k].detach())[0] for k in u_idx]
            else:
                detached = params if len(w_idx) == len(params) else [params[k] for k in w_idx]
                tracked = detached if len(u_idx) == len(w_idx) else [params[k] for k in u_idx]
            tensors = detached
            update = None
            same_shapes = False
            if self.track_updates:
                sig = _signature(detached)
                tracked_sig = sig if tracked is detached else _signature(tracked)
                prev = self._prev
                # the snapshot was cloned from tensors of this signature: same shapes, dtypes, devices, layouts
                same_shapes = prev is not None and len(prev) == len(tracked) and self._prev_sig == tracked_sig
                if same_shapes and tracked:
                    if advance:
                        # subtract in place into the snapshot (its old value is not needed after this):
                        # a fresh _foreach_sub allocates a parameter-sized buffer every step, which costs
                        # about 3x the subtraction itself (page faults; measured in BENCHMARKS.md)
                        torch._foreach_sub_(prev, tracked)
                        update = prev  # holds prev − θ: same norm as θ − prev
                    else:
                        update = torch._foreach_sub(tracked, prev)
                    tensors = detached + list(update)
                _, dtypes, devices, layouts = sig
                one_group = (len(set(dtypes)) == 1 and dtypes[0] in _FAST_DTYPES and len(set(devices)) == 1
                             and len(set(layouts)) == 1 and layouts[0] is torch.strided)
            else:  # (no snapshot to fit: only the group check, in one C-level pass)
                groups_seen = set(map(_GROUP, detached))
                dtype, _, layout = next(iter(groups_seen)) if len(groups_seen) == 1 else (None, None, None)
                one_group = dtype in _FAST_DTYPES and layout is torch.strided
            if tensors and one_group:
                # grouped_norms' one-group case without its per-tensor checks (the signature has them;
                # the update buffers share it): one fused kernel
                norms = torch.stack(torch._foreach_norm(tensors, 2)).to(torch.float64)
            else:
                norms = grouped_norms(tensors)
            if self._p.sharded:
                groups = [self._p.groups[k] for k in w_idx]
                if update is not None:
                    groups += [self._p.groups[k] for k in u_idx]
                norms = _sharded_norms(norms, groups)
            if self.track_updates and advance:
                if not same_shapes:
                    self._prev = [p.clone() for p in tracked]
                    self._prev_sig = tracked_sig
                elif tracked:
                    torch._foreach_copy_(prev, tracked)
        nw = len(w_idx)
        w_arr, u_arr, w_complete, u_complete = self._masks
        # everything finish() needs is captured now (it may run steps later, after a batched fetch)
        prev = self._prev_norms if update is not None else None
        if self.track_updates and advance:
            self._prev_norms = (norms[:nw], w_arr, w_complete)
        out = [norms] if prev is None else [norms, prev[0]]
        prev_idx = None if prev is None else prev[1]
        ratio_ok = None if prev is None else u_complete & prev[2]
        # the float64 recheck of overflowed weight norms reads the parameter again: only if it is unchanged
        versions = [params[k]._version for k in w_idx] if self._deferred or self.late_finish else None

        if self._whole and not self.track_updates:
            def finish_whole(host: list[np.ndarray]) -> Contribution:
                # finish() below when every weight is measured and none overflowed: the same numbers
                # (wn is v itself, w_ok all True) without the scatter, the copy and the masked select
                v = host[0]
                if np.isinf(v).any():
                    return finish(host)
                per_layer = np.sqrt(np.bincount(self._p.owner, weights=v**2, minlength=self._p.n))
                per_layer.setflags(write=False)  # fresh and read-only: the record takes it without a copy
                return Contribution(layers={"weight_norm": per_layer}, measured={"weight_norm": w_complete})

        def finish(host: list[np.ndarray]) -> Contribution:
            p, v = self._p, host[0]
            wn = np.zeros(len(params))
            wn[w_arr] = v[:nw]
            w_ok = w_complete.copy()
            for j in np.flatnonzero(np.isinf(v[:nw])):  # float32 overflow for huge but finite weights
                k = w_idx[j]
                if versions is not None and params[k]._version != versions[j]:
                    w_ok[p.owner[k]] = False  # changed since: the value is unknown
                elif bool(torch.isfinite(params[k].detach()).all()):
                    wn[k] = float(exact_norm(params[k].detach()))
            layers = {"weight_norm": np.where(w_ok, np.sqrt(p.per_layer(wn**2)), np.nan)}
            measured = {"weight_norm": w_ok}
            if self.track_updates:
                ratio = np.full(p.n, np.nan)
                if prev_idx is not None:
                    u = np.zeros(len(params))
                    u[u_arr] = v[nw:]
                    before = np.zeros(len(params))
                    before[prev_idx] = host[1]
                    with np.errstate(divide="ignore", invalid="ignore"):
                        ratio = np.where(ratio_ok, np.sqrt(p.per_layer(u**2)) / np.sqrt(p.per_layer(before**2)), np.nan)
                layers["update_ratio"] = ratio
                measured["update_ratio"] = ~np.isnan(ratio)
            return Contribution(layers=layers, measured=measured)

        return Deferred(out, finish_whole if self._whole and not self.track_updates else finish)

    def remove(self) -> None:
        self._prev = None
        self._prev_sig = None
        self._prev_norms = None


def _signature(ts) -> tuple[list, list, list, list]:
    """(shapes, dtypes, devices, layouts) of ``ts``: one list comparison tells whether a snapshot still fits."""
    return list(map(_SHAPE, ts)), list(map(_DTYPE, ts)), list(map(_DEVICE, ts)), list(map(_LAYOUT, ts))


def _sharded_norms(norms: torch.Tensor, groups: list) -> torch.Tensor:
    """Global norms from local ones: ``√(Σ_r n_r²)`` over its group for every sharded entry (one
    collective per distinct group, on the device of the norms), the others unchanged."""
    sq = norms * norms
    out = sq.clone()
    keys: dict[int, tuple] = {}
    for i, g in enumerate(groups):
        if g is not None:
            keys.setdefault(id(g), (g, []))[1].append(i)
    for g, idx in keys.values():
        sel = torch.tensor(idx, device=norms.device)
        part = sq.index_select(0, sel)
        all_reduce_(part, g)
        out.index_copy_(0, sel, part)
    return out.sqrt()
