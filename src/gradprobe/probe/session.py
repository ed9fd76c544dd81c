"""The probe session: owns hooks on a model, records per-layer gradient flow into a trace.

Equations (per layer ``l`` with parameters ``θ_l`` and output ``h_l``; ``L`` the scalar loss as the
user defines it, so a mean-reduced loss gives gradients of the mean):

* ``grad_norm[l]        = ‖∂L/∂θ_l‖₂`` read from ``.grad`` (what the optimizer will see, i.e. after
  any accumulation, before clipping);
* ``output_grad_norm[l] = ‖∂L/∂h_l‖₂``: the back-propagated signal, captured by a tensor hook on the
  module's output; seed 000's "greatly diverging gradient magnitudes between earlier and later
  layers" is the profile of this quantity over ``l``;
* ``weight_norm[l]      = ‖θ_l‖₂``; ``update_ratio[l] = ‖θ_l(t) − θ_l(t′)‖₂ / ‖θ_l(t′)‖₂`` between two
  consecutive recorded steps ``t′ < t`` (seed 002: "higher layers change a lot, lower layers barely").
"""
from __future__ import annotations

import os
import time
import weakref
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from gradprobe.errors import ConfigError, ProbeStateError
from gradprobe.functional.norms import grouped_norms, norm_dtype
from gradprobe.probe.layers import Layer, find_layers, iter_tensors, model_facts
from gradprobe.probe.temporal import TemporalRecorder
from gradprobe.probe.units import UnitRecorder
from gradprobe.trace import LayerFlow, TemporalFlow, Trace

__all__ = ["Probe"]

# Hook norms are kept as device tensors and reduced in one go; past this many pending entries
# (e.g. many backward passes without ``step()``) they are folded into per-layer sums.
_COMPACT_AT = 4096


class _Accumulator:
    """Squared norms per layer, fed by hooks without host synchronisation."""

    __slots__ = ("idx", "vals", "folded", "folded_seen", "n_layers")

    def __init__(self, n_layers: int):
        self.n_layers = n_layers
        self.idx: list[int] = []
        self.vals: list[torch.Tensor] = []
        self.folded: np.ndarray | None = None  # (L,) squared-norm sums already moved to host
        # which layers the folded sums cover (a sum can be exactly 0: a dead layer is still measured)
        self.folded_seen = np.zeros(n_layers, dtype=bool)

    def add(self, i: int, norm: torch.Tensor) -> None:
        self.idx.append(i)
        self.vals.append(norm)
        if len(self.vals) >= _COMPACT_AT:
            self.folded = self.squared()
            self.folded_seen = self.seen()
            self.idx.clear()
            self.vals.clear()

    def squared(self) -> np.ndarray:
        """``(L,)`` Σ of squared norms per layer (host numpy, float64); one sync per device."""
        out = np.zeros(self.n_layers) if self.folded is None else self.folded.copy()
        if self.vals:
            by_dev: dict[torch.device, list[int]] = {}
            for k, v in enumerate(self.vals):
                by_dev.setdefault(v.device, []).append(k)
            idx = np.asarray(self.idx)
            for ks in by_dev.values():
                v = torch.stack([self.vals[k] for k in ks]).to(torch.float64).cpu().numpy()
                np.add.at(out, idx[ks], v * v)
        return out

    def seen(self) -> np.ndarray:
        mask = np.zeros(self.n_layers, dtype=bool)
        mask[self.idx] = True
        return mask | self.folded_seen

    def clear(self) -> None:
        self.idx.clear()
        self.vals.clear()
        self.folded = None
        self.folded_seen = np.zeros(self.n_layers, dtype=bool)


class Probe:
    """Record per-layer gradient flow of any ``nn.Module``.

    Use it as a context manager (or call :meth:`close`); while open it owns forward hooks on every
    layer (a module owning parameters directly) and tensor hooks on their outputs. It never changes
    ``.grad``, never stores anything on the model or its tensors, and removes every hook on close.

    Args:
        model: any ``nn.Module`` (Sequential, branches, shared modules, RNNs, attention, ...).
        hooks: record ``‖∂L/∂h_l‖`` and ``‖h_l‖`` (tensor hooks on layer outputs). ``False`` keeps
            only parameter statistics (cheapest); forward order is then learnt from the first forward.
        update_ratio: keep a snapshot of the parameters to report ``‖Δθ‖/‖θ‖`` (one copy of the
            parameters in memory).
        every: record one step in ``every`` (hooks are idle on the other steps).
        max_steps: in-memory trace bound (see :class:`~gradprobe.trace.Trace`); the run log keeps all.
        log_dir: if given, every recorded step is also written to ``log_dir/<run_name>.sqlite``.
        run_name: file stem of the run log (default: ``run-<time>-<pid>``).
        commit_every: run-log commit interval in recorded steps (and at close).
        units: with ``hooks``, also record saturated sigmoid/tanh and dead ReLU units of activation
            modules (:class:`~gradprobe.probe.units.UnitRecorder`); ``saturation`` is its threshold.
        temporal: record ``‖∂E/∂h_k‖`` for every time step of every recurrent layer (BPTT; see
            :class:`~gradprobe.probe.temporal.TemporalRecorder`): fused ``nn.RNN``/``LSTM``/``GRU`` run
            as an unrolled computation on the same parameters while the probe is open (identical
            outputs and gradients, slower), and user cells mark their state with
            :func:`gradprobe.mark_state`. Read it with :meth:`temporal_flow`.

    Call :meth:`step` once per training step after ``loss.backward()`` and before
    ``optimizer.zero_grad()``. Several backward passes before one ``step()`` (gradient accumulation)
    add up: ``‖∂L/∂h_l‖`` is √(Σ_passes ‖·‖²), ``‖∇θ_l‖`` the norm of the accumulated ``.grad``.

    Notes: an in-place op on a layer's output (``ReLU(inplace=True)``) does not disturb the numbers:
    the tensor hook, registered before the op, receives ∂L/∂(the layer's own output) and ``‖h‖`` is
    taken in the forward hook. Activation checkpointing is supported (recomputed forwards are not
    counted twice). Outputs that do not require grad (e.g. a frozen first layer) have no measurable
    ``∂L/∂h`` (``has_output_grad`` False). A module that returns its own parameter is measured with
    one hook per step: the leaf's total gradient.

    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    >>> with Probe(net) as probe:
    ...     loss = net(torch.randn(16, 4)).pow(2).mean()
    ...     loss.backward()
    ...     _ = probe.step(loss)
    ...     flow = probe.flow()
    >>> flow.names
    ('0', '2')
    >>> bool((flow.output_grad_norm > 0).all())
    True
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        hooks: bool = True,
        update_ratio: bool = True,
        every: int = 1,
        max_steps: int | None = 10_000,
        log_dir: str | os.PathLike | None = None,
        run_name: str | None = None,
        commit_every: int = 50,
        units: bool = True,
        saturation: float = 0.05,
        temporal: bool = False,
    ):
        if not isinstance(model, nn.Module):
            raise ConfigError(f"Probe needs a torch.nn.Module; got {type(model).__name__}")
        if int(every) < 1:
            raise ConfigError(f"Probe(every={every}) must be a positive number of steps")
        self.model = model
        self.layers: list[Layer] = find_layers(model)
        if not self.layers:
            raise ConfigError(
                f"{type(model).__name__} has no parameters, so there is no gradient to probe"
            )
        self.facts = model_facts(model)
        self._record_hooks = bool(hooks)
        self._track_updates = bool(update_ratio)
        self.every = int(every)
        self.trace = Trace(max_steps=max_steps)
        n = len(self.layers)
        self._act = _Accumulator(n)
        self._grad = _Accumulator(n)
        self._fwd_first: dict[int, int] = {}
        self._fwd_measured: set[int] = set()  # layers measured by a forward outside backward
        self._bwd_first: dict[int, int] = {}
        self._tensor_handles: list = []
        self._prune_at = _COMPACT_AT
        self._hooked_leaves: dict[int, tuple[torch.Tensor, bool]] = {}  # id -> (leaf, had no hook dict)
        self._module_handles: list = []
        self._order: list[int] = list(range(n))
        self._order_known = False
        self._step = 0
        self._armed = True
        self._dirty = False  # hooks saw something since the last step()
        self._grad_marks: list | None = None  # .grad identity/version at the last step()
        self._last: LayerFlow | None = None
        self._prev_params: list[torch.Tensor] | None = None
        self._prev_w_sq: np.ndarray | None = None
        self._closed = False
        # flat parameter list with the owning layer of each entry
        self._params: list[nn.Parameter] = []
        self._owner: list[int] = []
        for layer in self.layers:
            for p in layer.params:
                self._params.append(p)
                self._owner.append(layer.index)
        self._owner_np = np.asarray(self._owner)
        self.runlog = None
        if log_dir is not None:
            from gradprobe.runlog import RunLog

            stem = run_name or f"run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
            self.runlog = RunLog(
                Path(log_dir) / f"{stem}.sqlite",
                commit_every=commit_every,
                meta={"model": type(model).__name__, "layers": [l.name for l in self.layers], "every": self.every},
            )
        self._grad_hooks = [self._make_grad_hook(i) for i in range(n)]  # built once, not per forward
        self._units = UnitRecorder(model, saturation) if (hooks and units) else None
        self._temporal = TemporalRecorder(model) if temporal else None
        self._install()  # last: if anything above raises, the model is left untouched

    # ------------------------------------------------------------------ hooks
    def _install(self) -> None:
        if self._units is not None:
            self._units.install()
        if self._temporal is not None:
            self._temporal.install()
        for layer in self.layers:
            h = layer.module.register_forward_hook(self._make_forward_hook(layer.index))
            self._module_handles.append(h)

    def _make_forward_hook(self, i: int):
        def forward_hook(module, args, output):
            if not self._armed:
                return None
            # order even without grad: a reentrant checkpoint runs the first forward under no_grad
            self._fwd_first.setdefault(i, len(self._fwd_first))
            if not self._record_hooks or not torch.is_grad_enabled():
                return None
            # A forward during a backward pass is a checkpoint recomputation. If the call was already
            # measured in the forward pass (non-reentrant checkpoint), counting it again would add its
            # ‖h‖ twice; a reentrant checkpoint's first forward ran without grad, so measure it now.
            in_backward = torch._C._current_graph_task_id() != -1
            if in_backward and i in self._fwd_measured:
                return None
            if not in_backward:
                self._fwd_measured.add(i)
            self._dirty = True
            for t in iter_tensors(output):
                self._act.add(i, torch.linalg.vector_norm(t.detach(), dtype=norm_dtype(t.dtype)))
                if t.requires_grad and self._first_hook_on(t):
                    self._tensor_handles.append(t.register_hook(self._grad_hooks[i]))
            if len(self._tensor_handles) >= self._prune_at:
                self._prune_handles()
            return None

        return forward_hook

    def _first_hook_on(self, t: torch.Tensor) -> bool:
        """False for a leaf output (a module returning its parameter as is) already hooked since the
        last step: a tensor hook fires once per registration, so a second one would count the same
        gradient twice. (Non-leaf outputs are new tensors on every call.)"""
        if t.grad_fn is not None:
            return True
        if id(t) in self._hooked_leaves:
            return False
        # keeps the leaf alive, so its id cannot be reused; remembers whether torch must create its hook dict
        self._hooked_leaves[id(t)] = (t, t._backward_hooks is None)
        return True

    def _unhook_outputs(self) -> None:
        for h in self._tensor_handles:
            h.remove()
        self._tensor_handles.clear()
        for t, had_none in self._hooked_leaves.values():
            if had_none and not t._backward_hooks:
                t._backward_hooks = None  # leave the user's parameter exactly as we found it
        self._hooked_leaves.clear()
        self._prune_at = _COMPACT_AT

    def _prune_handles(self) -> None:
        # flow() without step(): handles of outputs already freed are dead weight; drop them so the
        # list stays bounded. The threshold doubles if most outputs are still alive (no O(n²)).
        self._tensor_handles = [h for h in self._tensor_handles if h.hooks_dict_ref() is not None]
        self._prune_at = max(_COMPACT_AT, 2 * len(self._tensor_handles))

    def _make_grad_hook(self, i: int):
        def grad_hook(grad: torch.Tensor):
            if self._closed:
                return None
            self._bwd_first.setdefault(i, len(self._bwd_first))
            self._grad.add(i, torch.linalg.vector_norm(grad, dtype=norm_dtype(grad.dtype)))
            self._dirty = True
            return None  # never changes the gradient

        return grad_hook

    # ------------------------------------------------------------- measuring
    def _forward_order(self) -> list[int]:
        if self._fwd_first:
            first = self._fwd_first
            key: dict[int, tuple] = {}
            anchor = -1.0
            for layer in self.layers:  # discovery order; uncalled layers follow the called one before them
                i = layer.index
                if i in first:
                    anchor = first[i]
                    key[i] = (anchor, 0, i)
                else:
                    key[i] = (anchor, 1, i)
            self._order = sorted(key, key=key.__getitem__)
            self._order_known = True
        return self._order

    def _param_stats(self, advance: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per-parameter (grad norm, has grad, weight norm, update norm) as host arrays; few syncs.

        ``advance`` moves the update-ratio reference snapshot to the current parameters.
        """
        params = self._params
        with torch.no_grad():
            g_idx = [k for k, p in enumerate(params) if p.grad is not None]
            grads = [params[k].grad for k in g_idx]
            detached = [p.detach() for p in params]
            tensors = grads + detached
            update = None
            same_shapes = self._prev_params is not None and all(
                a.shape == b.shape for a, b in zip(self._prev_params, params)
            )
            if self._track_updates and same_shapes:
                if advance:
                    # subtract in place into the snapshot (its old value is not needed after this):
                    # a fresh _foreach_sub allocates a parameter-sized buffer every step, which costs
                    # about 3x the subtraction itself (page faults; measured in BENCHMARKS.md)
                    torch._foreach_sub_(self._prev_params, detached)
                    update = self._prev_params  # holds prev − θ: same norm as θ − prev
                else:
                    update = torch._foreach_sub(detached, self._prev_params)
                tensors = tensors + list(update)
            norms = grouped_norms(tensors, device=torch.device("cpu")).numpy()
            if self._track_updates and advance:
                if not same_shapes:
                    self._prev_params = [p.clone() for p in detached]
                else:
                    torch._foreach_copy_(self._prev_params, detached)
        ng, npar = len(grads), len(params)
        gn = np.full(npar, np.nan)
        gn[g_idx] = norms[:ng]
        # float32 accumulation can overflow for huge but finite entries: recheck those in float64
        for k in np.flatnonzero(np.isinf(gn)):
            g = params[k].grad
            if torch.isfinite(g).all():
                gn[k] = float(torch.linalg.vector_norm(g, dtype=torch.float64))
        has = np.zeros(npar, dtype=bool)
        has[g_idx] = True
        wn = norms[ng : ng + npar]
        un = norms[ng + npar :] if update is not None else None
        return gn, has, wn, un

    def _collect(self, advance: bool) -> LayerFlow:
        n = len(self.layers)
        gn, has, wn, un = self._param_stats(advance)
        own = self._owner_np
        g_sq = np.bincount(own[has], weights=gn[has] ** 2, minlength=n)
        has_grad = np.zeros(n, dtype=bool)
        has_grad[own[has]] = True
        w_sq = np.bincount(own, weights=wn**2, minlength=n)
        prev_w = self._prev_w_sq
        ratio = np.full(n, np.nan)
        if un is not None and prev_w is not None:
            u_sq = np.bincount(own, weights=un**2, minlength=n)
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = np.sqrt(u_sq) / np.sqrt(prev_w)
        if advance:
            self._prev_w_sq = w_sq
        grad_norm = np.where(has_grad, np.sqrt(g_sq), np.nan)
        has_out_grad = self._grad.seen()
        has_out = self._act.seen()
        out_grad = np.where(has_out_grad, np.sqrt(self._grad.squared()), np.nan)
        act = np.where(has_out, np.sqrt(self._act.squared()), np.nan)
        order = self._forward_order()
        # backward rank: hook firing order, then unseen layers in reverse forward order
        bwd = sorted(self._bwd_first, key=self._bwd_first.__getitem__)
        rest = [i for i in reversed(order) if i not in self._bwd_first]
        rank_by_index = {i: r for r, i in enumerate(bwd + rest)}
        o = np.asarray(order)
        return LayerFlow.from_arrays(
            [self.layers[i].name for i in order],
            [self.layers[i].kind for i in order],
            step=self._step,
            backward_rank=[rank_by_index[i] for i in order],
            grad_norm=grad_norm[o],
            output_grad_norm=out_grad[o],
            activation_norm=act[o],
            weight_norm=np.sqrt(w_sq)[o],
            update_ratio=ratio[o],
            has_grad=has_grad[o],
            has_output_grad=has_out_grad[o],
            has_output=has_out[o],
        )

    def _reset_pending(self) -> None:
        self._act.clear()
        self._grad.clear()
        self._fwd_first = {}
        self._fwd_measured = set()
        self._bwd_first = {}
        # the step is closed: unhook its outputs (a parameter returned as an output would otherwise
        # keep one more hook per step, and user tensors would keep ours after close)
        self._unhook_outputs()
        self._dirty = False

    # ------------------------------------------------------------ public API
    def step(self, loss: torch.Tensor | float | None = None) -> LayerFlow | None:
        """Close the current training step: record it (if it is a recorded step) and re-arm the hooks.

        Call after ``loss.backward()`` and before ``optimizer.zero_grad()``. ``loss`` (tensor or float)
        is stored with the step. Returns the recorded :class:`LayerFlow`, or ``None`` on a skipped
        step (``every > 1``).
        """
        self._check_open("step")
        flow = None
        if self._armed:
            flow = self._with_recorders(self._collect(advance=True))
            if loss is not None:
                # .item() keeps float64 losses exact (a .float() cast would round them to float32)
                value = float(loss.detach().item() if isinstance(loss, torch.Tensor) else loss)
                flow = replace(flow, loss=value)
            self.trace.append(flow)
            if self.runlog is not None:
                self.runlog.write(flow)
            self._last = flow
            self._grad_marks = self._grad_state()
        self._reset_pending()
        self._step += 1
        self._armed = self._step % self.every == 0
        for rec in (self._units, self._temporal):
            if rec is not None:
                rec.reset()
        if self._units is not None:
            self._units.active = self._armed
        if self._temporal is not None:
            self._temporal.enabled = self._armed
        if self._order_known and not self._record_hooks and self._module_handles:
            # forward order is known: order-only hooks are no longer needed
            self._remove_module_hooks()
        return flow

    def flow(self) -> LayerFlow:
        """The per-layer flow of the most recent backward pass.

        If a backward pass happened since the last :meth:`step`, it is measured now from the
        pending hook data and the current ``.grad``; otherwise it is the last recorded step. Without
        ``step()`` the pending data keeps adding up over backward passes (bounded memory: folded into
        per-layer sums), so call ``step()`` once per training step.
        """
        self._check_open("flow")
        # a forward pass alone (hooks fired, no backward yet) is not a backward pass to report
        backward_seen = bool(self._bwd_first) or any(p.grad is not None for p in self._params)
        if backward_seen and (self._dirty or self._last is None or self._grads_changed()):
            return self._with_recorders(self._collect(advance=False))
        if self._last is None:
            raise ProbeStateError(
                "no backward pass has been observed yet: run loss.backward() while the probe is open, then call flow()"
            )
        return self._last

    def _grad_state(self) -> list:
        # weak references, so a freed .grad whose id is reused by a new one is not mistaken for it
        return [None if p.grad is None else (weakref.ref(p.grad), p.grad._version) for p in self._params]

    def _grads_changed(self) -> bool:
        """A backward pass since the last recorded step changed some ``.grad`` (new tensor or written in
        place). Needed with ``hooks=False``, where no tensor hook marks the probe dirty."""
        if not self._armed or self._grad_marks is None:
            return False
        for p, mark in zip(self._params, self._grad_marks):
            g = p.grad
            if (mark is None) != (g is None) or (g is not None and (mark[0]() is not g or mark[1] != g._version)):
                return True
        return False

    def _with_recorders(self, flow: LayerFlow) -> LayerFlow:
        units = self._units.collect() if self._units is not None else None
        temporal = self._temporal.collect() if self._temporal is not None else None
        return replace(flow, units=units, temporal=temporal)

    def temporal_flow(self) -> dict[str, TemporalFlow]:
        """``{recurrent layer: TemporalFlow}`` of the most recent backward pass (``Probe(temporal=True)``).

        Names are ``"<module>.l<layer>"`` (``".reverse"`` for the reverse direction of a bidirectional
        layer) or the names given to :func:`gradprobe.mark_state`.
        """
        self._check_open("temporal_flow")
        if self._temporal is None:
            raise ProbeStateError("temporal_flow() needs Probe(model, temporal=True)")
        return dict(self.flow().temporal or {})

    def diagnose(self, **config):
        """Verdicts on the latest flow (see :func:`gradprobe.diagnosis.diagnose_flow`); ``config`` holds
        :class:`~gradprobe.diagnosis.DiagnosisConfig` overrides."""
        from gradprobe.analysis.depth import signal_profile
        from gradprobe.analysis.expectation import depth_expectation
        from gradprobe.diagnosis import diagnose_flow

        flow = self.flow()
        return diagnose_flow(flow, facts=self.facts, trace=self.trace,
                             expectation=depth_expectation(self.model, signal_profile(flow)), **config)

    @property
    def step_count(self) -> int:
        """Number of :meth:`step` calls so far."""
        return self._step

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise ProbeStateError(f"Probe.{what}() called after the probe was closed")

    def _remove_module_hooks(self) -> None:
        for h in self._module_handles:
            h.remove()
        self._module_handles.clear()

    def close(self) -> None:
        """Remove every hook, free the parameter snapshot and commit the run log. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for rec in (self._units, self._temporal):
            if rec is not None:
                rec.remove()
        self._remove_module_hooks()
        self._unhook_outputs()
        self._prev_params = None
        self._prev_w_sq = None
        if self.runlog is not None:
            self.runlog.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Probe:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"step {self._step}"
        return f"Probe({type(self.model).__name__}, {len(self.layers)} layers, {state})"
