"""Record the total gradient ``∂E/∂h_k`` reaching every recurrent state at every time step ``k``.

Pascanu, Mikolov & Bengio 2013 (eq. 3–5) write back-propagation through time as ``∂E_t/∂θ = Σ_k (∂E_t/∂x_t)(∂x_t/∂x_k)(∂⁺x_k/∂θ)``
with ``∂x_t/∂x_k`` a product of ``t−k`` Jacobians. The vector ``∂E/∂h_k = Σ_{t≥k} (∂E_t/∂h_t)(∂h_t/∂h_k)``
is what back-propagation delivers to step ``k`` *through the recurrence and the output path together*;
its norm over ``k`` is the temporal gradient profile (vanishing: it dies out going back in time).

How it is measured, without changing the user's model:

* fused ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU``: while installed, the recorder replaces the module's
  ``forward`` (an instance attribute shared by every recorder installed on the module, removed by the
  last one to leave, in any order, and never carried over to a deep copy:
  :class:`~gradprobe.probe.owned.SharedForward`) by the unrolled replica of :mod:`gradprobe.functional.rnn`, which uses the same ``Parameter`` objects, so
  ``.grad`` receives the fused module's gradients; a tensor hook on every per-step state reads
  ``∂E/∂h_k`` (and ``∂E/∂c_k`` for an LSTM). Without grad mode (``torch.no_grad``) or when
  :attr:`TemporalRecorder.armed` is ``False``, the fused kernel runs as usual.
* user-written cells looped in Python: one line per step, ``h = mark_state(h, "decoder", t)``; it is
  the identity (returns ``h`` itself, records nothing) when no recorder is installed.

Only backward passes that accumulate into ``.grad`` count (a ``torch.autograd.grad`` side pass through
the recurrence is not added; :mod:`gradprobe.probe.passes`).

Results are :class:`gradprobe.trace.TemporalFlow` objects, one per recurrent layer and
direction, named ``"<module>.l<layer>"`` and ``"<module>.l<layer>.reverse"`` (``<module>`` the
qualified name inside the model, or the class name for the model itself), or the name given to
:func:`mark_state`. A module called several times between :meth:`~TemporalRecorder.reset` calls gives
one entry per call, the later ones suffixed ``"#2"``, ``"#3"``, ...

>>> import torch
>>> from torch import nn
>>> rnn = nn.GRU(3, 8)
>>> with TemporalRecorder(rnn) as rec:
...     out, h = rnn(torch.randn(20, 4, 3))
...     out[-1].pow(2).sum().backward()
...     flows = rec.flows()
>>> sorted(flows), flows["GRU.l0"].grad_norm.shape
(['GRU.l0'], (20,))
>>> "forward" in vars(rnn)  # the override is gone
False
"""
from __future__ import annotations

from contextvars import ContextVar
from time import perf_counter
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from gradprobe.errors import ConfigError, ProbeStateError
from gradprobe.functional.rnn import StateEvent, is_fused_recurrent, unrolled_forward
from gradprobe.functional.transfer import to_host
from gradprobe.probe.owned import SharedForward
from gradprobe.probe.passes import BackwardPasses, current_task
from gradprobe.probe.recorder import Context, Contribution, Deferred, Recorder, standalone_call
from gradprobe.trace import TemporalFlow

__all__ = ["TemporalRecorder", "TemporalFlightTwin", "mark_state"]

# The recorders that mark_state() reports to. A context variable rather than a module global: install()
# adds a recorder and remove() takes it out again (in any order: nested probes may close either way
# round), and it is local to the thread/async task that installed it.
_ACTIVE: ContextVar[tuple] = ContextVar("gradprobe_temporal_recorders", default=())


def mark_state(state: torch.Tensor, name: str, t: int, *, kind: str = "h") -> torch.Tensor:
    """Mark the recurrent state of a hand-written cell at step ``t``: ``h = mark_state(h, "decoder", t)``.

    Args:
        state: ``(B, ...)`` the state tensor just computed for step ``t`` (batch dimension first; a 1-D
            tensor counts as one sequence). The norm is taken over everything but the batch dimension.
        name: the series this state belongs to (one :class:`TemporalFlow` per name).
        t: the step index in the order the loop processes steps (0-based).
        kind: ``"h"`` for the hidden state, ``"c"`` for an LSTM-style cell state (reported as ``cell``).

    Returns ``state`` itself. With no :class:`TemporalRecorder` installed, or when ``state`` does not
    require grad, nothing is recorded. Mark the tensor that the next step consumes, so that its
    gradient is the total one (output path + recurrence).
    """
    for rec in _ACTIVE.get():
        rec._mark(state, name, t, kind)
    return state


@dataclass
class _Series:
    """Gradients seen for one (layer, direction) or one marked name during one forward call."""

    batch: int
    reverse: bool = False
    steps: int = 0
    lengths: np.ndarray | None = None
    # (kind, t) -> (rows or None, {backward pass: summed gradient (n_rows, H)}); summed if the hook fires twice
    grads: dict = field(default_factory=dict)


class TemporalRecorder(Recorder):
    """Owns the forward overrides and tensor hooks that record ``∂E/∂h_k`` per recurrent layer and step:
    a :class:`~gradprobe.probe.Recorder` of the ``"temporal"`` table (one row per series), or standalone.

    Args:
        model: any ``nn.Module``; every ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` inside it is measured,
            and every :func:`mark_state` call made while installed is recorded.

    Standalone usage: ``install()`` (or ``with``), run forward and backward, ``flows()``, ``reset()`` before
    the next step, ``remove()`` at the end (restores the model exactly: no hooks, no attributes).

    Cost: the unrolled replica builds a few autograd nodes per step; on CPU a whole training step of an
    ``nn.LSTM(128, 128)`` with ``T = 1000``, ``B = 32`` takes about 1.3–1.7× the fused step (median of
    paired ratios, ``benchmarks/bench_temporal.py``). Memory: one ``(B, H)`` gradient per step and state
    kind is kept until :meth:`reset`. Second-order gradients through the replica are plain autograd.
    """

    name = "temporal"
    norm_of = {"temporal.h": "output_grad", "temporal.c": "output_grad"}
    flight_reuse = True  # on its recorded steps its batch profiles are the flight's (the twin sits out)

    def flight_twin(self) -> TemporalRecorder:
        """The full flight recorder's twin: the batch profiles only, reduced on the device
        (:class:`TemporalFlightTwin`)."""
        return TemporalFlightTwin()

    def __init__(self, model: nn.Module | None = None):
        super().__init__()
        if model is not None and not isinstance(model, nn.Module):
            raise ConfigError(f"TemporalRecorder needs a torch.nn.Module; got {type(model).__name__}")
        self.model = model
        self._modules: list[tuple[str, nn.Module]] = []
        self._names: dict[int, str] = {}  # id(module) -> its name in this recorder's model
        self._shared: list[SharedForward] = []
        self._installed = False
        self._passes = BackwardPasses()
        self._handles: list = []
        self._series: dict[str, _Series] = {}
        self._calls: dict[str, int] = {}
        self._marked: dict[str, str] = {}  # mark_state name -> key of its current series

    # ------------------------------------------------------------ install / remove
    @property
    def installed(self) -> bool:
        return self._installed

    def install(self, ctx: Context | None = None) -> TemporalRecorder:
        if self.installed:
            raise ProbeStateError("TemporalRecorder.install() called twice without remove()")
        model = ctx.model if ctx is not None else self.model
        if model is None:
            raise TypeError("TemporalRecorder.install() needs a model: TemporalRecorder(model) or a session context")
        self._modules = [(name or type(m).__name__, m) for name, m in model.named_modules(remove_duplicate=True)
                         if is_fused_recurrent(m)]
        self._names = {id(m): name for name, m in self._modules}
        self._shared = [SharedForward.attach(m, _run_unrolled, self) for _, m in self._modules]
        self._passes.watch(model.modules())
        self._installed = True
        _ACTIVE.set(_ACTIVE.get() + (self,))
        return self

    def remove(self) -> None:
        """Undo :meth:`install`: delete the forward overrides and every pending tensor hook. Idempotent."""
        for shared in reversed(self._shared):
            shared.detach(self)
        self._shared.clear()
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._passes.remove()
        if self._installed:
            _ACTIVE.set(tuple(r for r in _ACTIVE.get() if r is not self))
            self._installed = False

    def __enter__(self) -> TemporalRecorder:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.remove()

    def reset(self) -> None:
        """Forget everything recorded (call between training steps)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._series.clear()
        self._calls.clear()
        self._marked.clear()
        self._passes.reset()

    # ------------------------------------------------------------ recording
    def _new_series(self, base: str, batch: int, reverse: bool = False) -> tuple[str, _Series]:
        n = self._calls.get(base, 0) + 1
        self._calls[base] = n
        key = base if n == 1 else f"{base}#{n}"
        s = _Series(batch=batch, reverse=reverse)
        self._series[key] = s
        return key, s

    def _begin(self, module: nn.Module, input):
        """This recorder's state callback for one call of ``module`` (``None`` if it does not record it)."""
        name = self._names.get(id(module))
        if not self.armed or not self._installed or name is None:
            return None
        self._passes.watch_inputs((input.data if isinstance(input, nn.utils.rnn.PackedSequence) else input,))
        series: dict[tuple[int, int], _Series] = {}

        def on_state(ev: StateEvent) -> None:
            s = series.get((ev.layer, ev.direction))
            if s is None:
                base = f"{name}.l{ev.layer}" + (".reverse" if ev.direction == 1 else "")
                _, s = self._new_series(base, ev.batch, reverse=ev.direction == 1)
                s.steps = ev.steps
                s.lengths = _lengths(input, ev.batch)
                series[(ev.layer, ev.direction)] = s
            self._hook(s, ev.h, "h", ev.time, ev.rows)
            if ev.c is not None:
                self._hook(s, ev.c, "c", ev.time, ev.rows)

        return on_state

    def _mark(self, state: torch.Tensor, name: str, t: int, kind: str) -> None:
        if not self.armed or not self._installed or not isinstance(state, torch.Tensor) or not state.requires_grad:
            return
        if kind not in ("h", "c"):
            raise ConfigError(f"mark_state(kind={kind!r}) must be 'h' (hidden state) or 'c' (cell state)")
        t = int(t)
        if t < 0:
            raise ConfigError(f"mark_state(..., {name!r}, t={t}): the step index must be >= 0")
        batch = 1 if state.dim() <= 1 else state.shape[0]
        s = self._series.get(self._marked.get(name, ""))
        if s is None or (kind, t) in s.grads:
            # a repeated (kind, t) means a new forward pass of the same loop: start a new series
            key, s = self._new_series(name, batch)
            self._marked[name] = key
        if s.batch != batch:
            raise ConfigError(
                f"mark_state(..., {name!r}, t={t}): batch size {batch} differs from {s.batch} at earlier steps"
            )
        s.steps = max(s.steps, t + 1)
        self._hook(s, state, kind, t, None)  # hook the tensor the loop goes on to use, not a view

    def _hook(self, s: _Series, tensor: torch.Tensor, kind: str, t: int, rows) -> None:
        if not tensor.requires_grad:
            return
        s.grads[(kind, t)] = (rows, {})

        def hook(g: torch.Tensor) -> None:
            per_pass = s.grads[(kind, t)][1]
            task = current_task()
            g = g.detach()
            for other in [k for k in per_pass if k != task]:  # finished passes share a bucket: bounded memory
                key = self._passes.settle(other)
                if key != other:
                    moved = per_pass.pop(other)
                    per_pass[key] = moved if key not in per_pass else per_pass[key] + moved
            prev = per_pass.get(task)
            per_pass[task] = g if prev is None else prev + g

        self._handles.append(tensor.register_hook(hook))

    # ------------------------------------------------------------ results
    def collect(self, advance=standalone_call):
        """The ``"temporal"`` table of this step (``None`` if no series received a gradient), as a
        :class:`Deferred`: the per-step norms stay device tensors until the session's batched copy.

        Called without arguments (the standalone use of gradprobe 0.1) it returns :meth:`flows`, with a
        DeprecationWarning."""
        if advance is standalone_call:
            standalone_call.warn("TemporalRecorder.collect()", "TemporalRecorder.flows()")
            return self.flows()
        pending = self._pending()
        if pending is None:
            return None
        tensors, build = pending
        return Deferred(tensors, lambda host: Contribution(tables={"temporal": TemporalFlow.to_table(build(host))}))

    def flows(self) -> dict[str, TemporalFlow]:
        """``{name: TemporalFlow}`` for every series that received gradients since the last :meth:`reset`.

        A state that received no gradient (e.g. steps after the last one the loss depends on through
        nothing) reports 0; steps a packed sequence does not have report 0 and are excluded by
        ``TemporalFlow.lengths``.
        """
        pending = self._pending()
        if pending is None:
            return {}
        tensors, build = pending
        return build(to_host(tensors))

    def _gradients(self) -> list[tuple[str, _Series, list[tuple], bool]]:
        """``[(key, series, [(kind, t, rows or None, ∂E/∂state)], has a cell state)]`` for every series that
        received a gradient in a counted backward pass: each state's gradient summed over those passes,
        ``(n, ...)`` with ``rows`` the user's batch positions of its ``n`` rows (``None``: rows ``0 … n−1``)."""
        out = []
        for key, s in self._series.items():
            grads, seen = [], set()
            for (kind, t), (rows, per_pass) in s.grads.items():
                seen.add(kind)
                kept = [g for task, g in per_pass.items() if self._passes.counts(task)]
                if kept:
                    grads.append((kind, t, rows, kept[0] if len(kept) == 1 else sum(kept[1:], kept[0])))
            if grads:
                out.append((key, s, grads, "c" in seen))
        return out

    def _pending(self):
        """(device tensors: the per-(state, step) row norms; a function of their host copies giving the
        flows as they are now), or ``None`` if nothing received a gradient."""
        tensors: list[torch.Tensor] = []
        plan = []  # (key, series facts, [(kind, t, rows as numpy or None, tensor index)], has a cell state)
        for key, s, grads, has_c in self._gradients():
            entries = []
            for kind, t, rows, g in grads:
                n = s.batch if rows is None else len(rows)
                tensors.append(torch.linalg.vector_norm(g.reshape(n, -1), dim=1, dtype=torch.float64))
                entries.append((kind, t, None if rows is None else rows.cpu().numpy(), len(tensors) - 1))
            plan.append((key, s.batch, s.steps, s.reverse, s.lengths, entries, has_c))
        if not plan:
            return None

        def build(host: list[np.ndarray]) -> dict[str, TemporalFlow]:
            out = {}
            for key, batch, steps, reverse, lengths, entries, has_c in plan:
                per = {"h": np.zeros((batch, steps)), "c": np.zeros((batch, steps))}
                for kind, t, rows, k in entries:
                    norms = host[k]
                    if rows is None:
                        per[kind][: len(norms), t] = norms
                    else:
                        per[kind][rows, t] = norms
                out[key] = TemporalFlow(key, per["h"], per["c"] if has_c else None, reverse, lengths)
            return out

        return tensors, build


class TemporalFlightTwin(TemporalRecorder):
    """The temporal recorder's twin in the full flight recorder (``Probe(model, temporal=True,
    spikes="full")``): every step, the batch profiles ``‖∂E/∂h_k‖₂ = √(Σ_b ‖∂E/∂h_k[b]‖²)`` (and
    ``‖∂E/∂c_k‖₂``) of every series, as one float64 norm per (state, step) on the device. It keeps no
    per-sequence norms: a flight step holds ``8·Σ_series T·(1 + has_c)`` bytes (an ``nn.LSTM`` over
    ``T = 1000`` steps: 16,000 bytes), not ``B`` times that.

    Cost: a fused ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` runs its unrolled replica on every step the
    twin is armed (the session's own temporal recorder pays it only on its recorded steps), plus one
    tensor hook per state and step: about the cost of recording the temporal profile on every step
    (``benchmarks/bench_spikes.py``, ``BENCHMARKS.md``).
    """

    def flight_twin(self) -> None:
        return None

    def collect(self, advance=standalone_call):
        if advance is standalone_call:
            return super().collect(advance)
        gathered = self._gradients()
        if not gathered:
            return None
        grads = [g for _, _, series, _ in gathered for _, _, _, g in series]
        plan = [(key, s.steps, s.reverse, [(kind, t) for kind, t, _, _ in series], has_c)
                for key, s, series, has_c in gathered]
        if len({(g.device, g.dtype) for g in grads}) == 1:
            norms = torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float64))
        else:
            norms = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float64).to(grads[0].device) for g in grads])

        def finish(host: list[np.ndarray]) -> Contribution:
            v, k, flows = host[0], 0, {}
            for key, steps, reverse, entries, has_c in plan:
                per = {"h": np.zeros(steps), "c": np.zeros(steps)}
                for kind, t in entries:
                    per[kind][t] = v[k]
                    k += 1
                flows[key] = TemporalFlow(key, None, None, reverse, None, profile=per["h"],
                                          cell_profile=per["c"] if has_c else None)
            return Contribution(tables={"temporal": TemporalFlow.to_table(flows)})

        return Deferred([norms], finish)


def _run_unrolled(module: nn.Module, fused, owners, input, hx=None):
    """The shared forward of a fused recurrent module: the unrolled replica if any owner records this
    call (every recording owner gets every state), else the module's own forward."""
    if not torch.is_grad_enabled():
        return fused(input, hx)
    recording = [(o, cb) for o in owners if (cb := o._begin(module, input)) is not None]
    if not recording:
        return fused(input, hx)
    calls = [cb for _, cb in recording]
    start = perf_counter()
    try:
        if len(calls) == 1:
            return unrolled_forward(module, input, hx, on_state=calls[0])

        def on_state(ev: StateEvent) -> None:
            for cb in calls:
                cb(ev)

        return unrolled_forward(module, input, hx, on_state=on_state)
    finally:
        # the whole unrolled forward counts as each recording owner's cost (an upper bound: the fused
        # kernel it replaces would have run anyway)
        spent = perf_counter() - start
        for o, _ in recording:
            o.seconds += spent


def _lengths(input, batch: int) -> np.ndarray | None:
    """Per-sequence lengths (user's batch order) of a PackedSequence; ``None`` for padded input."""
    if not isinstance(input, nn.utils.rnn.PackedSequence):
        return None
    bs = input.batch_sizes.cpu().numpy()
    sorted_len = (bs[None, :] > np.arange(batch)[:, None]).sum(1)  # length of the j-th sorted sequence
    if input.sorted_indices is None:
        return sorted_len
    lengths = np.empty(batch, dtype=np.int64)
    lengths[input.sorted_indices.cpu().numpy()] = sorted_len
    return lengths
