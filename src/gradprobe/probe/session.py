"""The probe session: a thin owner of recorders (what is measured) and sinks (where records go).

Per training step the session arms its recorders (or not, by its schedule), and on an armed step's
:meth:`Session.step` asks each recorder for its :class:`~gradprobe.probe.Contribution`, copies every
device tensor to the host together (one copy per device), merges the contributions into one
:class:`~gradprobe.trace.LayerFlow` in forward execution order, and hands it to every sink: the
in-memory :class:`~gradprobe.trace.Trace`, the SQLite run log (``log_dir=``) and any the user passes.
The session names no recorder or sink beyond building the defaults from its options.
"""
from __future__ import annotations

import os
import time
import weakref
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from gradprobe.errors import ConfigError, ProbeStateError
from gradprobe.functional.transfer import to_host
from gradprobe.probe.layers import Layer, find_layers, model_facts
from gradprobe.probe.outputs import OrderRecorder, OutputRecorder
from gradprobe.probe.params import ParamRecorder
from gradprobe.probe.recorder import Context, Contribution, Deferred, LayerOrder, Recorder
from gradprobe.probe.temporal import TemporalRecorder
from gradprobe.probe.units import UnitRecorder
from gradprobe.runlog import MODES, RunLog, versions
from gradprobe.trace import LayerFlow, ModelFacts, RunHeader, Sink, TemporalFlow, Trace

__all__ = ["Session", "default_recorders"]


def default_recorders(*, hooks: bool = True, update_ratio: bool = True, units: bool = True,
                      saturation: float = 0.05, temporal: bool = False) -> list[Recorder]:
    """The built-in recorders a session's options stand for (see :class:`Session`)."""
    recs: list[Recorder] = [ParamRecorder(update_ratio=update_ratio), OutputRecorder() if hooks else OrderRecorder()]
    if hooks and units:
        recs.append(UnitRecorder(saturation=saturation))
    if temporal:
        recs.append(TemporalRecorder())
    return recs


class Session:
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
        units: with ``hooks``, also record saturated sigmoid/tanh and dead ReLU units of activation
            modules (:class:`~gradprobe.probe.UnitRecorder`); ``saturation`` is its threshold.
        temporal: record ``‖∂E/∂h_k‖`` for every time step of every recurrent layer (BPTT; see
            :class:`~gradprobe.probe.TemporalRecorder`).
        recorders: more recorders (:class:`~gradprobe.probe.Recorder`), e.g. your own.
        sinks: more sinks (:class:`~gradprobe.trace.Sink`), e.g. a TensorBoard writer.
        every: record one step in ``every`` (hooks are idle on the other steps).
        max_steps: in-memory trace bound (see :class:`~gradprobe.trace.Trace`); the run log keeps all.
        log_dir: if given, every recorded step is also written to ``log_dir/<run_name>.sqlite``.
        run_name: file stem of the run log (default: ``run-<time>-<pid>``).
        mode: ``"new"`` (an existing run log is an error), ``"append"`` (continue it: steps are numbered
            on from its last one) or ``"overwrite"``.
        commit_every: run-log commit interval in recorded steps (and at close).

    Call :meth:`step` once per training step after ``loss.backward()`` and before
    ``optimizer.zero_grad()``. Several backward passes before one ``step()`` (gradient accumulation)
    add up: ``‖∂L/∂h_l‖`` is √(Σ_passes ‖·‖²), ``‖∇θ_l‖`` the norm of the accumulated ``.grad``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        hooks: bool = True,
        update_ratio: bool = True,
        units: bool = True,
        saturation: float = 0.05,
        temporal: bool = False,
        recorders: Sequence[Recorder] = (),
        sinks: Sequence[Sink] = (),
        every: int = 1,
        max_steps: int | None = 10_000,
        log_dir: str | os.PathLike | None = None,
        run_name: str | None = None,
        mode: str = "new",
        commit_every: int = 50,
    ):
        if not isinstance(model, nn.Module):
            raise ConfigError(f"Probe needs a torch.nn.Module; got {type(model).__name__}")
        if int(every) < 1:
            raise ConfigError(f"Probe(every={every}) must be a positive number of steps")
        if mode not in MODES:
            raise ConfigError(f"Probe(mode={mode!r}) must be one of {MODES}")
        for r in recorders:
            if not isinstance(r, Recorder):
                raise ConfigError(f"recorders must be gradprobe.probe.Recorder instances; got {type(r).__name__}")
        for s in sinks:
            if not isinstance(s, Sink):
                raise ConfigError(f"sinks must be gradprobe.trace.Sink instances; got {type(s).__name__}")
        self.model = model
        self.layers: list[Layer] = find_layers(model)
        if not self.layers:
            raise ConfigError(f"{type(model).__name__} has no parameters, so there is no gradient to probe")
        self.every = int(every)
        self.temporal = bool(temporal)
        self.recorders: list[Recorder] = default_recorders(
            hooks=hooks, update_ratio=update_ratio, units=units, saturation=saturation, temporal=temporal
        ) + list(recorders)
        names = [r.name for r in self.recorders]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup or "" in names:
            raise ConfigError(f"every recorder needs a unique, non-empty name; duplicated or empty: {dup or ['']}")
        self.facts: ModelFacts = model_facts(model)
        self.order = LayerOrder(len(self.layers))
        self._params = [p for layer in self.layers for p in layer.params]
        self.trace = Trace(max_steps=max_steps)
        self.runlog: RunLog | None = None
        if log_dir is not None:
            stem = run_name or f"run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
            self.runlog = RunLog(Path(log_dir) / f"{stem}.sqlite", commit_every=commit_every, mode=mode)
        self.sinks: list[Sink] = [self.trace] + ([self.runlog] if self.runlog is not None else []) + list(sinks)
        self._first_step = self.runlog.next_step if self.runlog is not None else 0
        self._step = self._first_step
        self._armed = True
        self._last: LayerFlow | None = None
        self._grad_marks: list | None = None  # .grad identity/version at the last step()
        self._closed = False
        self.config = {
            "every": self.every, "max_steps": max_steps, "hooks": bool(hooks), "units": bool(units and hooks),
            "temporal": self.temporal, "commit_every": commit_every,
            "recorders": [{"name": r.name, "class": f"{type(r).__module__}.{type(r).__qualname__}", **r.config()}
                          for r in self.recorders],
        }
        self._install()  # last but the sinks: if anything raises, the model is left untouched
        header = RunHeader(type(model).__name__, tuple(l.name for l in self.layers), tuple(l.kind for l in self.layers),
                           self.facts, self.config, versions(), self._first_step)
        try:
            for s in self.sinks:
                s.open(header)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ hooks
    def _install(self) -> None:
        ctx = Context(self.model, tuple(self.layers), self.order)
        done: list[Recorder] = []
        try:
            for r in self.recorders:
                r.install(ctx)
                done.append(r)
                r.arm(True)
        except BaseException:
            for r in reversed(done):
                r.remove()
            if self.runlog is not None:
                self.runlog.close()
            raise

    # ------------------------------------------------------------- measuring
    def _measure(self, advance: bool, loss) -> LayerFlow:
        """Merge every armed recorder's contribution into one record (one host copy per device)."""
        parts = [r.collect(advance) for r in self.recorders if r.armed]
        deferred = [p for p in parts if isinstance(p, Deferred)]
        if deferred:
            host = to_host([t for d in deferred for t in d.tensors])
            done, k = {}, 0
            for d in deferred:
                done[id(d)] = d.finish(host[k : k + len(d.tensors)])
                k += len(d.tensors)
            parts = [done.get(id(p), p) if isinstance(p, Deferred) else p for p in parts]
        order = self.order.forward_order()
        o = np.asarray(order)
        values, measured, tables = {}, {}, {}
        for rec, c in zip((r for r in self.recorders if r.armed), parts):
            if c is None:
                continue
            if not isinstance(c, Contribution):
                raise ConfigError(f"recorder {rec.name!r}.collect() returned {type(c).__name__}, not a Contribution")
            for q, v in c.layers.items():
                if q in values:
                    raise ConfigError(f"two recorders both measure the per-layer quantity {q!r} (the second is {rec.name!r})")
                v = np.asarray(v, dtype=np.float64)
                if v.shape != (len(self.layers),):
                    raise ConfigError(f"recorder {rec.name!r} gave {q!r} with shape {v.shape}; expected ({len(self.layers)},), "
                                      "one value per layer in ctx.layers order")
                values[q] = v[o]
                m = c.measured.get(q)
                measured[q] = (~np.isnan(v) if m is None else np.asarray(m, dtype=bool))[o]
            for name, t in c.tables.items():
                if name in tables:
                    raise ConfigError(f"two recorders both produce the table {name!r} (the second is {rec.name!r})")
                tables[name] = t
        if loss is not None:
            # .item() keeps float64 losses exact (a .float() cast would round them to float32)
            loss = float(loss.detach().item() if isinstance(loss, torch.Tensor) else loss)
        return LayerFlow(
            tuple(self.layers[i].name for i in order), tuple(self.layers[i].kind for i in order),
            values, measured, self.order.backward_rank(order), step=self._step, loss=loss, tables=tables,
        )

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
            flow = self._measure(advance=True, loss=loss)
            for s in self.sinks:
                s.write(flow)
            self._last = flow
            self._grad_marks = self._grad_state()
        for r in self.recorders:
            r.reset()
        self.order.reset()
        self._step += 1
        self._armed = (self._step - self._first_step) % self.every == 0
        for r in self.recorders:
            r.arm(self._armed)
        if self.order.known:
            # the forward order is known: order-only hooks are no longer needed
            for r in [r for r in self.recorders if isinstance(r, OrderRecorder)]:
                r.remove()
                self.recorders.remove(r)
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
        backward_seen = self.order.backward_seen or any(p.grad is not None for p in self._params)
        dirty = any(getattr(r, "dirty", False) for r in self.recorders)
        if backward_seen and (dirty or self._last is None or self._grads_changed()):
            return self._measure(advance=False, loss=None)
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

    def temporal_flow(self) -> dict[str, TemporalFlow]:
        """``{recurrent layer: TemporalFlow}`` of the most recent backward pass (``Probe(temporal=True)``).

        Names are ``"<module>.l<layer>"`` (``".reverse"`` for the reverse direction of a bidirectional
        layer) or the names given to :func:`gradprobe.mark_state`.
        """
        self._check_open("temporal_flow")
        if not self.temporal:
            raise ProbeStateError("temporal_flow() needs Probe(model, temporal=True)")
        return dict(self.flow().temporal or {})

    def refresh_facts(self) -> ModelFacts:
        """Measure the model facts again (weight statistics change in training) and note them to the sinks."""
        self._check_open("refresh_facts")
        self.facts = model_facts(self.model)
        self.note("facts", self.facts.as_dict())
        return self.facts

    def note(self, key: str, value) -> None:
        """Hand a run-level result (plain JSON values) to every sink, e.g. the diagnosis."""
        for s in self.sinks:
            s.note(key, value)

    @property
    def step_count(self) -> int:
        """Number of :meth:`step` calls so far in this session."""
        return self._step - self._first_step

    @property
    def current_step(self) -> int:
        """The number the next recorded step gets (it continues an appended run log's numbering)."""
        return self._step

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise ProbeStateError(f"Probe.{what}() called after the probe was closed")

    def close(self) -> None:
        """Remove every hook, free the parameter snapshot, save the final model facts and close the sinks. Idempotent."""
        if self._closed:
            return
        self._closed = True
        errors = []
        for r in reversed(self.recorders):
            r.remove()
        try:
            self.facts = model_facts(self.model)
            for s in self.sinks:
                s.note("facts", self.facts.as_dict())
        except Exception as exc:  # noqa: BLE001 - closing must release every sink; the error is re-raised below
            errors.append(exc)
        for s in self.sinks:
            try:
                s.close()
            except Exception as exc:  # noqa: BLE001 - every sink is closed; the first failure is re-raised
                errors.append(exc)
        if errors:
            raise errors[0]

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"step {self._step}"
        return f"{type(self).__name__}({type(self.model).__name__}, {len(self.layers)} layers, {state})"
