"""Layer-output hooks: the back-propagated signal ``‖∂L/∂h_l‖₂`` and the activation norm ``‖h_l‖₂``.

``output_grad_norm[l] = ‖∂L/∂h_l‖₂`` is captured by a tensor hook on the layer's output(s): the
"greatly diverging gradient magnitudes between earlier and later layers" of the vanishing-gradient
problem (Hochreiter 1991) is the profile of this quantity over ``l``. ``activation_norm[l] = ‖h_l‖₂``
is taken in the forward hook. A module called several times in one step reports √(Σ_calls ‖·‖²).

What counts, call by call:

* only backward passes that accumulate into ``.grad`` (the training step's; see
  :mod:`gradprobe.probe.passes`): a ``torch.autograd.grad`` side pass (saliency map, input-gradient
  penalty) is not added, and with ``create_graph=True`` the gradients of the final ``backward()`` are
  those of the whole loss, penalty included;
* calls inside a ``torch.func`` transform (``grad``, ``vmap``, ``jacrev`` ... over ``functional_call``)
  are side computations whose gradients never reach ``.grad``: not counted;
* activation checkpointing, decided per call: a forward that runs during a backward pass is a
  recomputation; it counts (its ``‖h‖`` and ``‖∂L/∂h‖``) only if its outputs are back-propagated (a
  reentrant checkpoint, whose first forward ran without grad), not when it only refills saved
  tensors (a non-reentrant checkpoint, whose first forward was already measured). A layer used both
  inside and outside a checkpointed region is therefore counted once per call;
* calls of a *copy* of the model (``copy.deepcopy`` while the probe is open: an EMA or teacher) are
  not this model's (see :mod:`gradprobe.probe.owned`).

Outputs of any kind are measured (nested tensors without their padding, sparse, half precision, huge
but finite values without overflow: :func:`gradprobe.functional.norms.tensor_norm`). Whatever cannot
be measured (meta tensors, a ``torch.func`` call, an unexpected failure) is marked *not measured*,
with the reason in the step's ``"unmeasured"`` table (site: layer, kind: reason, column ``calls``);
the hooks never raise into the user's forward or backward. An in-place op on a layer's output
(``ReLU(inplace=True)``) does not disturb the numbers: the tensor hook, registered before the op,
receives ∂L/∂(the layer's own output) and ``‖h‖`` is taken in the forward hook. Outputs that do not
require grad (e.g. a frozen first layer) have no measurable ``∂L/∂h``. A module that returns its own
parameter is measured with one hook per step: the leaf's total gradient.
"""
from __future__ import annotations

import warnings
from time import perf_counter

import numpy as np
import torch

from gradprobe.functional.norms import tensor_norm
from gradprobe.probe.layers import iter_tensors
from gradprobe.probe.owned import ForwardHooks, TensorHookDict
from gradprobe.probe.passes import BackwardPasses, current_task
from gradprobe.probe.recorder import Context, Contribution, Deferred, Recorder, clock, eager_hook
from gradprobe.trace import Table

__all__ = ["OutputRecorder", "OrderRecorder"]

# Hook norms are kept as device tensors and reduced in one go; past this many pending entries
# (e.g. many backward passes without ``step()``) they are folded into per-layer sums.
COMPACT_AT = 4096

_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_FUNC = "called inside a torch.func transform (grad/vmap/...): a side computation whose gradients never reach .grad"
_META = "a meta tensor (no data)"


def _may_be_watched(a) -> bool:
    """Whether :meth:`BackwardPasses.watch_inputs` could watch ``a``: anything but a plain tensor that is
    not a leaf requiring grad (an activation from the layer before, or data without grad)."""
    return type(a) is not torch.Tensor or (a.requires_grad and a.grad_fn is None)


class _Accumulator:
    """Squared norms per layer and backward pass, fed by hooks without host synchronisation.

    Every entry carries the backward pass (graph task) it came from (``-1`` for forward values); at
    collection, ``keep(task)`` says which passes count."""

    __slots__ = ("idx", "vals", "tasks", "folded", "n_layers", "settle")

    def __init__(self, n_layers: int, settle=lambda task: task):
        self.n_layers = n_layers
        self.settle = settle  # folding key of a task (finished passes share a bucket: bounded memory)
        self.idx: list[int] = []
        self.vals: list[torch.Tensor] = []
        self.tasks: list[int] = []
        # task -> ((L,) squared-norm sums already moved to host, (L,) which layers they cover: a sum
        # can be exactly 0, and a dead layer is still measured)
        self.folded: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def add(self, i: int, norm: torch.Tensor, task: int = -1) -> None:
        self.idx.append(i)
        self.vals.append(norm)
        self.tasks.append(task)
        if len(self.vals) >= COMPACT_AT:
            host = self.pending().double().cpu().numpy()
            folded = {}
            for key, (sq, seen) in self.folded.items():  # buckets that settled since the last fold merge too
                k = self.settle(key)
                old = folded.get(k)
                folded[k] = (sq, seen) if old is None else (old[0] + sq, old[1] | seen)
            for t in set(self.tasks):
                sq, seen = self._sums(host, lambda x, t=t: x == t, fold=False)
                k = self.settle(t)
                old = folded.get(k)
                folded[k] = (sq, seen) if old is None else (old[0] + sq, old[1] | seen)
            self.folded = folded
            self.idx.clear()
            self.vals.clear()
            self.tasks.clear()

    def pending(self) -> torch.Tensor | None:
        """The pending norms as one device tensor (``None`` if there are none)."""
        if not self.vals:
            return None
        if len({v.device for v in self.vals}) == 1:
            return torch.stack(self.vals)
        return torch.stack([v.to(self.vals[0].device, torch.float64) for v in self.vals])

    def _sums(self, host, keep, fold: bool = True) -> tuple[np.ndarray, np.ndarray]:
        out = np.zeros(self.n_layers)
        seen = np.zeros(self.n_layers, dtype=bool)
        if fold:
            for t, (sq, s) in self.folded.items():
                if keep(t):
                    out += sq
                    seen |= s
        if self.vals:
            v = np.asarray(host, dtype=np.float64).reshape(-1)
            idx = np.asarray(self.idx)
            kept = {t for t in set(self.tasks) if keep(t)}
            if len(kept) != len(set(self.tasks)):
                m = np.isin(np.asarray(self.tasks), list(kept))
                v, idx = v[m], idx[m]
            np.add.at(out, idx, v * v)
            seen[idx] = True
        return out, seen

    def squared(self, host, keep=lambda task: True) -> tuple[np.ndarray, np.ndarray]:
        """``(L,)`` Σ of squared norms per layer (float64) over the passes ``keep`` accepts, from the host
        copy of :meth:`pending`, and the ``(L,)`` mask of layers that got any entry."""
        return self._sums(host, keep)

    def freeze(self, keep=lambda task: True):
        """:meth:`squared` as a function of the host copy, with everything (entries, folded sums, which
        passes count) taken as it is now: it may be called steps later, after the accumulator moved on."""
        idx = np.asarray(self.idx, dtype=np.int64)
        tasks = np.asarray(self.tasks, dtype=np.int64)
        folded = [(sq.copy(), s.copy()) for t, (sq, s) in self.folded.items() if keep(t)]
        kept = [t for t in set(self.tasks) if keep(t)]
        every = len(kept) == len(set(self.tasks))
        n = self.n_layers

        def result(host):
            out = np.zeros(n)
            seen = np.zeros(n, dtype=bool)
            for sq, s in folded:
                out += sq
                seen |= s
            if idx.size:
                v = np.asarray(host, dtype=np.float64).reshape(-1)
                i = idx
                if not every:
                    m = np.isin(tasks, kept)
                    v, i = v[m], i[m]
                np.add.at(out, i, v * v)
                seen[i] = True
            return out, seen

        return result

    def clear(self) -> None:
        self.idx.clear()
        self.vals.clear()
        self.tasks.clear()
        self.folded = {}


class OutputRecorder(Recorder):
    """Forward hooks on every layer and tensor hooks on their outputs (see the module docstring)."""

    name = "outputs"
    norm_of = {"output_grad_norm": "output_grad", "activation_norm": "activation"}
    idle_reset = False  # its hooks record nothing while disarmed
    flight_reuse = True  # on its recorded steps its norms are its flight twin's (the twin sits out)

    def flight_twin(self) -> OutputRecorder:
        """The full flight recorder's twin: ``output_grad_norm`` and ``activation_norm`` from its own hooks
        (:mod:`gradprobe.probe.flight`)."""
        return OutputRecorder()

    def install(self, ctx: Context) -> None:
        n = len(ctx.layers)
        self._order = ctx.order
        self._layers = ctx.layers
        self._passes = BackwardPasses()
        self._act = _Accumulator(n)
        self._grad = _Accumulator(n, self._passes.settle)
        self._modules = [l.module for l in ctx.layers]
        if self.armed:  # the pass watch's hooks, like the forward hooks, are on the model only while armed
            self._passes.watch(self._modules)
        self._notes: dict[tuple[int, str], int] = {}  # (layer, reason) -> calls not measured
        self._tensor_handles: list = []
        self._prune_at = COMPACT_AT
        self._hooked_leaves: dict[int, torch.Tensor] = {}  # id -> leaf output hooked this step
        self._leaf_dicts = TensorHookDict("_backward_hooks")
        self._removed = False
        self._params = [p for layer in ctx.layers for p in layer.params]
        self._warned_unseen = False
        self._called = False  # a forward hook was called (armed or not) since the last reset
        self.dirty = False  # hooks saw something since the last reset
        self._grad_hooks = [self._make_grad_hook(i) for i in range(n)]  # built once, not per forward
        self._hooks = ForwardHooks()  # on the modules only while armed (see ForwardHooks.set)
        for layer in ctx.layers:
            self._hooks.add(layer.module, self._make_forward_hook(layer.index))
        self._hooks.set(self.armed)

    def arm(self, on: bool) -> None:
        super().arm(on)
        hooks = getattr(self, "_hooks", None)
        if hooks is not None and not self._removed:
            hooks.set(on)
            # an idle post-accumulate-grad hook per layer still runs in every backward pass (Python called
            # from autograd's engine, outside any timed section): off the parameters while disarmed
            if on:
                self._passes.watch(self._modules)
            else:
                self._passes.unwatch()

    def _note(self, i: int, reason: str) -> None:
        key = (i, reason[:300])
        self._notes[key] = self._notes.get(key, 0) + 1

    def _make_forward_hook(self, i: int):
        order = self._order

        def forward_hook(module, args, output):
            self._called = True  # (hooks are off the modules while idle, unless torch.compile ran)
            if not self.armed:
                return None
            compiling = torch.compiler.is_compiling()
            start = 0.0 if compiling else perf_counter()  # (clock(), without asking twice)
            # order even without grad: a reentrant checkpoint runs the first forward under no_grad
            order.saw_forward(i)
            if torch.is_grad_enabled():
                try:
                    if len(args) != 1 or _may_be_watched(args[0]):  # (one activation input: nothing to watch)
                        self._passes.watch_inputs(args)
                    self._forward(i, output, compiling)
                except Exception as exc:  # noqa: BLE001 - never break the user's forward; the reason is recorded
                    self._note(i, f"the forward hook failed: {type(exc).__name__}: {exc}")
            if not compiling:
                self.seconds += perf_counter() - start
            return None

        return eager_hook(forward_hook)

    def _forward(self, i: int, output, compiling: bool | None = None) -> None:
        if type(output) is torch.Tensor and output.is_floating_point():
            tensors = (output,)  # the common case: one plain tensor (no generator)
        else:
            tensors = list(iter_tensors(output))
        if compiling is None:
            compiling = torch.compiler.is_compiling()  # traced by torch.compile: no functorch level, no backward
        if not compiling and any(_is_wrapped(t) for t in tensors):
            self._note(i, _FUNC)
            return
        outer = -1 if compiling else current_task()
        self.dirty = True
        for t in tensors:
            n = tensor_norm(t.detach() if t.requires_grad else t)
            if n is None:
                self._note(i, _META)
                continue
            leaf = t.grad_fn is None
            if outer == -1 and not leaf:
                # the common case: a forward outside backward with a non-leaf output (always a new
                # tensor, so not hooked before): its norm, and the tensor hook for ‖∂L/∂h‖
                self._act.add(i, n)
                if t.requires_grad:
                    self._tensor_handles.append(t.register_hook(self._grad_hooks[i]))
                continue
            if outer != -1:
                # a forward during a backward pass (checkpoint recomputation): counts only if its
                # output is back-propagated, so its ‖h‖ waits for the gradient (see the module docstring)
                if t.requires_grad and not leaf:
                    self._tensor_handles.append(t.register_hook(self._make_recomputed_hook(i, n, outer)))
                elif t.requires_grad and self._first_hook_on(t):  # a leaf not seen in the forward pass
                    self._act.add(i, n)
                    self._hook_leaf(t, self._grad_hooks[i])
                continue
            self._act.add(i, n)
            if t.requires_grad and self._first_hook_on(t):
                if leaf:
                    self._hook_leaf(t, self._grad_hooks[i])
                else:
                    self._tensor_handles.append(t.register_hook(self._grad_hooks[i]))
        if len(self._tensor_handles) >= self._prune_at:
            self._prune_handles()

    def _first_hook_on(self, t: torch.Tensor) -> bool:
        """False for a leaf output (a module returning its parameter as is) already hooked since the
        last step: a tensor hook fires once per registration, so a second one would count the same
        gradient twice. (Non-leaf outputs are new tensors on every call.)"""
        if t.grad_fn is not None:
            return True
        if id(t) in self._hooked_leaves:
            return False
        self._hooked_leaves[id(t)] = t  # keeps the leaf alive, so its id cannot be reused
        return True

    def _hook_leaf(self, t: torch.Tensor, hook) -> None:
        # a leaf (a parameter returned as is): its hook dict must be put back as found at the end
        self._leaf_dicts.before(t)
        self._tensor_handles.append(t.register_hook(hook))
        self._leaf_dicts.registered(t)

    def _unhook_outputs(self) -> None:
        for h in self._tensor_handles:
            h.remove()
        self._tensor_handles.clear()
        for t in self._hooked_leaves.values():
            self._leaf_dicts.after_removal(t)  # leave the user's parameter exactly as we found it
        self._hooked_leaves.clear()
        self._prune_at = COMPACT_AT

    def _prune_handles(self) -> None:
        # flow() without step(): handles of outputs already freed are dead weight; drop them so the
        # list stays bounded. The threshold doubles if most outputs are still alive (no O(n²)).
        self._tensor_handles = [h for h in self._tensor_handles if h.hooks_dict_ref() is not None]
        self._prune_at = max(COMPACT_AT, 2 * len(self._tensor_handles))

    def _on_grad(self, i: int, grad: torch.Tensor) -> int:
        self._order.saw_backward(i)
        task = current_task()
        # detached: a create_graph=True pass hands us a differentiable grad (else no detach needed)
        n = tensor_norm(grad.detach() if grad.requires_grad else grad)
        if n is None:
            self._note(i, _META)
        else:
            self._grad.add(i, n, task)
        self.dirty = True
        return task

    def _make_grad_hook(self, i: int):
        def grad_hook(grad: torch.Tensor):
            if self._removed:
                return None
            start = clock()
            try:
                self._on_grad(i, grad)
            except Exception as exc:  # noqa: BLE001 - never break the user's backward; the reason is recorded
                self._note(i, f"the gradient hook failed: {type(exc).__name__}: {exc}")
            self.seconds += clock() - start
            return None  # never changes the gradient

        return eager_hook(grad_hook)

    def _make_recomputed_hook(self, i: int, act: torch.Tensor, outer: int):
        def recomputed_hook(grad: torch.Tensor):
            if self._removed:
                return None
            start = clock()
            try:
                task = self._on_grad(i, grad)
                self._passes.link(task, outer)
                self._act.add(i, act)
            except Exception as exc:  # noqa: BLE001 - never break the user's backward; the reason is recorded
                self._note(i, f"the gradient hook failed: {type(exc).__name__}: {exc}")
            self.seconds += clock() - start
            return None

        return eager_hook(recomputed_hook)

    def collect(self, advance: bool) -> Deferred:
        if advance and not self._called and not self._warned_unseen and any(p.grad is not None for p in self._params):
            # a recorded step with gradients but not one hook call since the last step: the forward ran
            # code that skips module hooks (a model torch.compile'd before the probe was opened: Dynamo
            # does not guard on hooks added later; also one first compiled on an idle step, see ForwardHooks.set)
            self._warned_unseen = True
            warnings.warn(
                "the probe's layer hooks saw no forward pass before this backward, so ‖∂L/∂h‖ and ‖h‖ are not "
                "measured. If the model was torch.compile'd and called before the probe was opened (or first called "
                "on a step the probe did not record, when its idle hooks are off the model), compiled code ignores "
                "hooks added later: open the probe before the first call of the compiled model (or call "
                "torch._dynamo.reset() once after opening it)", UserWarning, stacklevel=3)
        pend = [self._grad.pending(), self._act.pending()]
        # everything finish() needs is taken now (it may run steps later, after a batched fetch)
        frozen = [self._grad.freeze(self._passes.counts), self._act.freeze()]
        tensors = [p for p in pend if p is not None]
        notes = dict(self._notes)
        names = [l.name for l in self._layers]

        def finish(host: list[np.ndarray]) -> Contribution:
            it = iter(host)
            g_sq, has_out_grad = frozen[0](next(it) if pend[0] is not None else None)
            a_sq, has_out = frozen[1](next(it) if pend[1] is not None else None)
            out_grad = np.where(has_out_grad, np.sqrt(g_sq), np.nan)
            act = np.where(has_out, np.sqrt(a_sq), np.nan)
            tables = {}
            if notes:
                keys = sorted(notes)
                tables["unmeasured"] = Table(tuple(names[i] for i, _ in keys), tuple(r for _, r in keys),
                                             {"calls": np.array([notes[k] for k in keys], dtype=np.int64)})
            return Contribution(layers={"output_grad_norm": out_grad, "activation_norm": act},
                                measured={"output_grad_norm": has_out_grad, "activation_norm": has_out}, tables=tables)

        return Deferred(tensors, finish)

    def reset(self) -> None:
        self._act.clear()
        self._grad.clear()
        self._called = False
        self._notes = {}
        self._passes.reset()
        if self.armed:
            self._passes.watch(self._modules)  # a parameter frozen or replaced since
        # the step is closed: unhook its outputs (a parameter returned as an output would otherwise
        # keep one more hook per step, and user tensors would keep ours after close)
        self._unhook_outputs()
        self.dirty = False

    def remove(self) -> None:
        if self._removed:
            return
        self._removed = True
        self._hooks.remove()
        self._passes.remove()
        self._unhook_outputs()


class OrderRecorder(Recorder):
    """Only the forward order of the layers (for sessions without output hooks): forward hooks that
    note the call order, removed by the session once the order is known."""

    name = "order"
    scheduled = False

    def install(self, ctx: Context) -> None:
        order = ctx.order

        def hook_for(i: int):
            def hook(module, args, output):
                if self.armed:
                    order.saw_forward(i)

            return eager_hook(hook)

        self._hooks = ForwardHooks()
        for layer in ctx.layers:
            self._hooks.add(layer.module, hook_for(layer.index))

    def remove(self) -> None:
        self._hooks.remove()
