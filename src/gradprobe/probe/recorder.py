"""The recorder contract: one family of quantities, one small class.

A :class:`Recorder` owns whatever hooks it needs on the model, and at the end of a recorded step turns
what it saw into a :class:`Contribution`: per-layer quantities (``(L,)`` arrays aligned with the
session's layers, in discovery order) and/or :class:`~gradprobe.trace.Table` s over its own sites. The
session (:class:`gradprobe.probe.Session`) merges every recorder's contribution into one
:class:`~gradprobe.trace.LayerFlow` and hands it to its sinks; nothing else in gradprobe names a
recorder, so a user's recorder passed as ``Probe(model, recorders=[...])`` is traced, saved to the run
log, exported and read back exactly like the built-in ones.

Life cycle, driven by the session::

    install(ctx)         once: register hooks (ctx.model, ctx.layers, ctx.order)
    arm(on)              before a step, when the scheduler turns the recorder on or off for it (not
                         repeated while its state stays the same)
    collect(advance)     at the end of an armed step (advance=False: a peek by Probe.flow())
    reset()              after every step, armed or not: forget what the step left (with
                         ``idle_reset = False``: after armed steps, and before re-arming)
    remove()             once: remove every hook (the model is exactly as before)

``collect`` may return its numbers as device tensors (a :class:`Deferred`): the session copies every
recorder's tensors to the host together, once per device, and then calls ``Deferred.finish``.

A recorder of the largest |gradient| entry per layer, the whole contract in a few lines:

>>> import numpy as np, torch
>>> from torch import nn
>>> class MaxAbsGrad(Recorder):
...     name = "max_abs_grad"
...     def install(self, ctx):
...         self.layers = ctx.layers
...     def collect(self, advance):
...         peaks = [max((p.grad.abs().max() for p in l.params if p.grad is not None), default=torch.tensor(float("nan")))
...                  for l in self.layers]
...         return Deferred(peaks, lambda host: Contribution(layers={"max_abs_grad": np.array([float(h) for h in host])}))
>>> from gradprobe.probe import Session
>>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
>>> with Session(net, recorders=[MaxAbsGrad()]) as s:
...     net(torch.randn(5, 3)).sum().backward()
...     _ = s.step()  # (None while a batch of records is pending: flow() fetches it)
...     flow = s.flow()
>>> bool(np.allclose(flow["max_abs_grad"], [max(p.grad.abs().max().item() for p in m.parameters()) for m in (net[0], net[2])]))
True
"""
from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from time import perf_counter
from types import MappingProxyType

import numpy as np
import torch
from torch import nn

from gradprobe.probe.layers import Layer
from gradprobe.trace import Table

__all__ = ["Recorder", "Context", "Contribution", "Deferred", "LayerOrder", "eager_hook", "clock", "NORM_KINDS"]

#: What a recorder's quantity can be the L2 norm of (:attr:`Recorder.norm_of`), and what the session does:
#:
#: * ``"output_grad"``: a gradient w.r.t. activations of this process's batch, taken during backward
#:   (``‖∂L/∂h‖``): divided by the loss scale the backward ran with; over ``W`` data-parallel ranks,
#:   ``√(Σ_r v_r²) / W`` (see :class:`~gradprobe.probe.Session`).
#: * ``"activation"``: a forward activation of this process's batch (``‖h‖``): over ranks ``√(Σ_r v_r²)``.
#: * ``"param_grad"``: read from ``.grad``: divided by the loss scale still in ``.grad`` (none after
#:   ``scaler.unscale_``); the same on every rank (DDP all-reduces gradients; a recorder reading sharded
#:   gradients reduces them itself, see :func:`gradprobe.probe.distributed.local_part`).
NORM_KINDS = ("output_grad", "activation", "param_grad")


def eager_hook(fn: Callable) -> Callable:
    """``fn`` as a hook that always runs eagerly, also inside a ``torch.compile`` d forward.

    A recorder's hook is bookkeeping in Python (lists that grow, sets, flags that change every step):
    traced by Dynamo, every change is a guard that fails, and the model recompiles until Dynamo's
    recompile limit. Wrapped, a compiled forward breaks its graph at the hook and runs it as plain
    Python on real tensors (so ``Tensor.register_hook`` works there); in eager mode the wrapper costs
    one ``torch.compiler.is_compiling()`` call.

    >>> calls = []
    >>> h = eager_hook(lambda *args: calls.append(len(args)))
    >>> h(1, 2, 3); calls
    [3]
    """
    disabled = torch.compiler.disable(fn, recursive=True)

    @functools.wraps(fn)
    def hook(*args):
        if torch.compiler.is_compiling():
            return disabled(*args)
        return fn(*args)

    return hook


def clock() -> float:
    """``time.perf_counter()`` for a hook's cost (:attr:`Recorder.seconds`), or 0 while ``torch.compile``
    traces the hook (the tracer cannot run the clock, and traced code costs nothing per call to trace)."""
    return 0.0 if torch.compiler.is_compiling() else perf_counter()


_LIVE = object()  # LayerOrder's default: the firing order of the step in progress


class LayerOrder:
    """Forward and backward order of the layers in the current step, fed by hooks.

    ``forward_order()`` lists layer indices in execution order; layers not called this step keep
    their place after the called layer before them in discovery order (so the order is stable).
    ``backward_rank(order)``: position of each layer in backward order (hooks' firing order; unseen
    layers after the others, in reverse forward order).
    """

    def __init__(self, n_layers: int):
        self.n = n_layers
        self._fwd: dict[int, int] = {}
        self._bwd: dict[int, int] = {}
        self._order: list[int] = list(range(n_layers))
        self.known = False

    def saw_forward(self, i: int) -> None:
        self._fwd.setdefault(i, len(self._fwd))

    def saw_backward(self, i: int) -> None:
        self._bwd.setdefault(i, len(self._bwd))

    @property
    def backward_seen(self) -> bool:
        return bool(self._bwd)

    def capture(self) -> tuple[dict | None, dict | None]:
        """This step's forward and backward firing orders, for a record built later (a batched fetch):
        ``forward_order(fired[0])`` and ``backward_rank(order, fired[1])`` then give what they give now.
        Nothing is copied (:meth:`reset` starts new dicts); ``None`` where no hook fired this step."""
        return self._fwd or None, self._bwd or None

    def forward_order(self, fired=_LIVE) -> list[int]:
        """The layers in forward execution order; ``fired``: a step's :meth:`capture` d forward firing
        order (default: this step's). A step where no forward hook fired keeps the previous order."""
        first = self._fwd if fired is _LIVE else fired
        if first:
            key: dict[int, tuple] = {}
            anchor = -1.0
            for i in range(self.n):  # discovery order; uncalled layers follow the called one before them
                if i in first:
                    anchor = first[i]
                    key[i] = (anchor, 0, i)
                else:
                    key[i] = (anchor, 1, i)
            self._order = sorted(key, key=key.__getitem__)
            self.known = True
        return self._order

    def backward_rank(self, order: Sequence[int], fired=_LIVE) -> list[int]:
        fired = self._bwd if fired is _LIVE else fired
        if not fired:  # no output hook fired: every layer in reverse forward order
            return list(range(len(order) - 1, -1, -1))
        bwd = sorted(fired, key=fired.__getitem__)
        rest = [i for i in reversed(order) if i not in fired]
        rank = {i: r for r, i in enumerate(bwd + rest)}
        return [rank[i] for i in order]

    def reset(self) -> None:
        if self._fwd:
            self._fwd = {}
        if self._bwd:
            self._bwd = {}


@dataclass(frozen=True)
class Context:
    """What a recorder may use: the model, its layers (discovery order), the shared layer order, and
    whether the session defers host copies (``deferred``: a ``Deferred.finish`` may run steps after
    ``collect``, so it must not rely on tensors the training loop changes or frees meanwhile)."""

    model: nn.Module
    layers: tuple[Layer, ...]
    order: LayerOrder
    deferred: bool = False


@dataclass
class Contribution:
    """What a recorder measured in one step.

    * ``layers``: ``{quantity: (L,) values}`` aligned with ``ctx.layers`` (discovery order);
    * ``measured``: ``{quantity: (L,) bool}`` where it was measured (default: where the value is not NaN);
    * ``tables``: ``{name: Table}`` over the recorder's own sites.
    """

    layers: Mapping[str, np.ndarray] = field(default_factory=dict)
    measured: Mapping[str, np.ndarray] = field(default_factory=dict)
    tables: Mapping[str, Table] = field(default_factory=dict)


@dataclass
class Deferred:
    """A contribution whose numbers are still device tensors: ``finish(host_arrays)`` builds it."""

    tensors: Sequence[torch.Tensor]
    finish: Callable[[list[np.ndarray]], Contribution]
    #: optional, for a batched fetch (``Probe(fetch_every=N)``): ``batch(deferreds, hosts)`` finishes many
    #: steps' deferreds of one recorder at once (every one of them carries this same ``batch``; ``hosts[i]``
    #: is ``deferreds[i]``'s host arrays) and returns their contributions, each equal to what
    #: ``deferreds[i].finish(hosts[i])`` returns (e.g. one 2-D numpy pass over every step's numbers)
    batch: Callable[[list, list[list[np.ndarray]]], list[Contribution]] | None = None


class Recorder:
    """Base of every recorder (see the module docstring). Subclasses set :attr:`name` and override
    what they need; the defaults do nothing, so a recorder without hooks only implements ``collect``."""

    #: unique within a session; names the recorder in the run log's configuration
    name: str = ""
    #: an overhead budget keeps essential recorders recording every step as long as it can slow others
    essential: bool = False
    #: False for helpers that the schedule does not drive (always armed while installed)
    scheduled: bool = True
    #: False for a recorder whose hooks record nothing while it is disarmed: the session then skips its
    #: :meth:`reset` after the steps it sat out and calls it just before re-arming it instead (an idle
    #: step then costs it nothing). True (the default): :meth:`reset` after every step.
    idle_reset: bool = True
    #: what each of its quantities is the L2 norm of, so the session can correct it for a loss scaler
    #: and combine it over data-parallel ranks: ``{quantity or "table.column": kind}`` with kind one of
    #: :data:`NORM_KINDS`. Undeclared quantities are recorded as they are.
    norm_of: Mapping[str, str] = MappingProxyType({})

    def __init__(self) -> None:
        self.armed = True
        #: seconds spent in this recorder's hooks since the last :meth:`reset` (for the overhead budget)
        self.seconds = 0.0

    def install(self, ctx: Context) -> None:
        """Register hooks. Must leave the model untouched if it raises."""

    def arm(self, on: bool) -> None:
        """Turn recording on or off from the coming step on (called when the state changes; :attr:`armed`
        must follow ``on``, as the base class does). The output and unit recorders take their forward
        hooks off the modules while disarmed (:class:`~gradprobe.probe.owned.ForwardHooks`); other
        hooks (tensor hooks) stay installed but idle."""
        self.armed = on

    def collect(self, advance: bool) -> Contribution | Deferred | None:
        """What this step measured. ``advance`` is False for a peek (``Probe.flow()`` before
        ``step()``): state that carries over to the next step (snapshots) must not move then."""
        return None

    def reset(self) -> None:
        """Forget what the finished step left (called after every step)."""

    def remove(self) -> None:
        """Remove every hook; idempotent."""

    def config(self) -> dict:
        """Plain JSON values describing this recorder's settings (saved in the run log)."""
        return {}

    #: True when, on a step this recorder records, its own contribution is what its flight twin would
    #: have measured: the full flight recorder then takes it and the twin sits that step out
    flight_reuse: bool = False

    def flight_twin(self) -> Recorder | None:
        """A fresh, uninstalled recorder of the same quantities for the full flight recorder
        (``Probe(model, spikes="full")``, :mod:`gradprobe.probe.flight`), which installs it with its own
        context and arms it every step; ``None`` (the default): this recorder's quantities are listed in
        the flight record's ``not_recorded``. The built-in recorders return theirs; a subclass of one
        inherits that twin (of the built-in quantities): override this if it records more."""
        return None


class _StandaloneCall:
    """Sentinel default of ``collect(advance)`` for recorders that had a standalone ``collect()`` in 0.1."""

    def __repr__(self) -> str:
        return "<standalone call>"

    @staticmethod
    def warn(old: str, new: str) -> None:
        warnings.warn(f"{old} without arguments is deprecated; use {new} (collect(advance) is the recorder "
                      "contract a session calls)", DeprecationWarning, stacklevel=3)


standalone_call = _StandaloneCall()
