"""Layer-output hooks: the back-propagated signal ``‖∂L/∂h_l‖₂`` and the activation norm ``‖h_l‖₂``.

``output_grad_norm[l] = ‖∂L/∂h_l‖₂`` is captured by a tensor hook on the layer's output(s): the
"greatly diverging gradient magnitudes between earlier and later layers" of the vanishing-gradient
problem (Hochreiter 1991) is the profile of this quantity over ``l``. ``activation_norm[l] = ‖h_l‖₂``
is taken in the forward hook. A module called several times in one step reports √(Σ_calls ‖·‖²).

Notes: an in-place op on a layer's output (``ReLU(inplace=True)``) does not disturb the numbers: the
tensor hook, registered before the op, receives ∂L/∂(the layer's own output) and ``‖h‖`` is taken in
the forward hook. Activation checkpointing is supported (recomputed forwards are not counted twice).
Outputs that do not require grad (e.g. a frozen first layer) have no measurable ``∂L/∂h``. A module
that returns its own parameter is measured with one hook per step: the leaf's total gradient.
"""
from __future__ import annotations

import warnings
from time import perf_counter

import numpy as np
import torch

from gradprobe.functional.norms import norm_dtype
from gradprobe.probe.layers import iter_tensors
from gradprobe.probe.recorder import Context, Contribution, Deferred, Recorder, eager_hook

__all__ = ["OutputRecorder", "OrderRecorder"]

# Hook norms are kept as device tensors and reduced in one go; past this many pending entries
# (e.g. many backward passes without ``step()``) they are folded into per-layer sums.
COMPACT_AT = 4096


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
        if len(self.vals) >= COMPACT_AT:
            self.folded = self.squared(self.pending().double().cpu().numpy())
            self.folded_seen = self.seen()
            self.idx.clear()
            self.vals.clear()

    def pending(self) -> torch.Tensor | None:
        """The pending norms as one device tensor (``None`` if there are none)."""
        if not self.vals:
            return None
        if len({v.device for v in self.vals}) == 1:
            return torch.stack(self.vals)
        return torch.stack([v.to(self.vals[0].device, torch.float64) for v in self.vals])

    def squared(self, host) -> np.ndarray:
        """``(L,)`` Σ of squared norms per layer (float64) from the host copy of :meth:`pending`."""
        return self.freeze()(host)[0]

    def seen(self) -> np.ndarray:
        mask = np.zeros(self.n_layers, dtype=bool)
        mask[self.idx] = True
        return mask | self.folded_seen

    def freeze(self):
        """A function of the host copy of :meth:`pending` giving ``(Σ‖·‖² per layer, seen mask)`` as they
        are now (it may be called steps later, after the accumulator moved on)."""
        idx = np.asarray(self.idx, dtype=np.int64)
        folded = None if self.folded is None else self.folded.copy()
        seen = self.seen()
        n = self.n_layers

        def result(host):
            out = np.zeros(n) if folded is None else folded.copy()
            if idx.size:
                v = np.asarray(host, dtype=np.float64).reshape(-1)
                np.add.at(out, idx, v * v)
            return out, seen

        return result

    def clear(self) -> None:
        self.idx.clear()
        self.vals.clear()
        self.folded = None
        self.folded_seen = np.zeros(self.n_layers, dtype=bool)


class OutputRecorder(Recorder):
    """Forward hooks on every layer and tensor hooks on their outputs (see the module docstring)."""

    name = "outputs"
    norm_of = {"output_grad_norm": "output_grad", "activation_norm": "activation"}

    def install(self, ctx: Context) -> None:
        n = len(ctx.layers)
        self._order = ctx.order
        self._act = _Accumulator(n)
        self._grad = _Accumulator(n)
        self._fwd_measured: set[int] = set()  # layers measured by a forward outside backward
        self._tensor_handles: list = []
        self._prune_at = COMPACT_AT
        self._hooked_leaves: dict[int, tuple[torch.Tensor, bool]] = {}  # id -> (leaf, had no hook dict)
        self._removed = False
        self._params = [p for layer in ctx.layers for p in layer.params]
        self._warned_unseen = False
        self._called = False  # a forward hook was called (armed or not) since the last reset
        self.dirty = False  # hooks saw something since the last reset
        self._grad_hooks = [self._make_grad_hook(i) for i in range(n)]  # built once, not per forward
        self._module_handles = [layer.module.register_forward_hook(self._make_forward_hook(layer.index))
                                for layer in ctx.layers]

    def _make_forward_hook(self, i: int):
        order = self._order

        def forward_hook(module, args, output):
            self._called = True
            if not self.armed:
                return None
            start = perf_counter()
            # order even without grad: a reentrant checkpoint runs the first forward under no_grad
            order.saw_forward(i)
            if torch.is_grad_enabled():
                self._measure_output(i, output)
            self.seconds += perf_counter() - start
            return None

        return eager_hook(forward_hook)

    def _measure_output(self, i: int, output) -> None:
        # A forward during a backward pass is a checkpoint recomputation. If the call was already
        # measured in the forward pass (non-reentrant checkpoint), counting it again would add its
        # ‖h‖ twice; a reentrant checkpoint's first forward ran without grad, so measure it now.
        in_backward = torch._C._current_graph_task_id() != -1
        if in_backward and i in self._fwd_measured:
            return
        if not in_backward:
            self._fwd_measured.add(i)
        self.dirty = True
        for t in iter_tensors(output):
            self._act.add(i, torch.linalg.vector_norm(t.detach(), dtype=norm_dtype(t.dtype)))
            if t.requires_grad and self._first_hook_on(t):
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
        self._prune_at = COMPACT_AT

    def _prune_handles(self) -> None:
        # flow() without step(): handles of outputs already freed are dead weight; drop them so the
        # list stays bounded. The threshold doubles if most outputs are still alive (no O(n²)).
        self._tensor_handles = [h for h in self._tensor_handles if h.hooks_dict_ref() is not None]
        self._prune_at = max(COMPACT_AT, 2 * len(self._tensor_handles))

    def _make_grad_hook(self, i: int):
        order = self._order

        def grad_hook(grad: torch.Tensor):
            if self._removed:
                return None
            start = perf_counter()
            order.saw_backward(i)
            self._grad.add(i, torch.linalg.vector_norm(grad, dtype=norm_dtype(grad.dtype)))
            self.dirty = True
            self.seconds += perf_counter() - start
            return None  # never changes the gradient

        return eager_hook(grad_hook)

    def collect(self, advance: bool) -> Deferred:
        if advance and not self._called and not self._warned_unseen and any(p.grad is not None for p in self._params):
            # a recorded step with gradients but not one hook call since the last step: the forward ran
            # code that skips module hooks (a model torch.compile'd before the probe was opened: Dynamo
            # does not guard on hooks added later)
            self._warned_unseen = True
            warnings.warn(
                "the probe's layer hooks saw no forward pass before this backward, so ‖∂L/∂h‖ and ‖h‖ are not "
                "measured. If the model was torch.compile'd and called before the probe was opened, compiled code "
                "ignores hooks added later: open the probe before the first call of the compiled model (or call "
                "torch._dynamo.reset() once after opening it)", UserWarning, stacklevel=3)
        pend = [self._grad.pending(), self._act.pending()]
        frozen = [self._grad.freeze(), self._act.freeze()]
        tensors = [p for p in pend if p is not None]

        def finish(host: list[np.ndarray]) -> Contribution:
            it = iter(host)
            g_sq, has_out_grad = frozen[0](next(it) if pend[0] is not None else None)
            a_sq, has_out = frozen[1](next(it) if pend[1] is not None else None)
            out_grad = np.where(has_out_grad, np.sqrt(g_sq), np.nan)
            act = np.where(has_out, np.sqrt(a_sq), np.nan)
            return Contribution(layers={"output_grad_norm": out_grad, "activation_norm": act},
                                measured={"output_grad_norm": has_out_grad, "activation_norm": has_out})

        return Deferred(tensors, finish)

    def reset(self) -> None:
        self._act.clear()
        self._grad.clear()
        self._fwd_measured = set()
        self._called = False
        # the step is closed: unhook its outputs (a parameter returned as an output would otherwise
        # keep one more hook per step, and user tensors would keep ours after close)
        self._unhook_outputs()
        self.dirty = False

    def remove(self) -> None:
        if self._removed:
            return
        self._removed = True
        for h in self._module_handles:
            h.remove()
        self._module_handles.clear()
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

        self._handles = [layer.module.register_forward_hook(hook_for(layer.index)) for layer in ctx.layers]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
