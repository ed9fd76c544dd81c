"""Which backward passes are the training step's: those that accumulate into a parameter's ``.grad``.

A tensor hook on a layer output fires in *every* backward pass through that tensor: the training
step's ``loss.backward()``, but also a ``torch.autograd.grad`` call made for something else (a saliency
map, an input-gradient penalty, the inner loop of a meta-learning step). Only the first kind delivers
the gradient that ends up in ``.grad`` and that ``grad_norm`` reads; a record that added the others
would mix two different losses in one number.

Autograd runs each pass as a *graph task* with its own id (``torch._C._current_graph_task_id()``
inside a hook). :class:`BackwardPasses` puts a post-accumulate-grad hook on one trainable parameter
of every layer, and on every leaf tensor that requires grad and is fed to a layer during the step (the
input of a frozen model probed for its input gradients), and notes the tasks in which one fired; a
hook event tagged with its task then counts if that task accumulated (:meth:`BackwardPasses.counts`).
If no task of the step accumulated into anything (gradients taken with ``torch.autograd.grad`` and
assigned to ``.grad`` by hand), every pass counts: nothing tells them apart then.

A reentrant activation checkpoint runs its recomputation's backward as a nested task, from inside a
node of the outer one; its events are tagged with the outer task too (:meth:`BackwardPasses.link`),
so they count whenever the outer pass does.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from gradprobe.probe.owned import TensorHookDict

__all__ = ["BackwardPasses", "current_task"]

current_task = torch._C._current_graph_task_id
"""The id of the backward pass (graph task) running now; ``-1`` outside a backward pass."""


class BackwardPasses:
    """Post-accumulate-grad hooks on one trainable parameter per layer (see the module docstring)."""

    def __init__(self) -> None:
        self._targets: list[nn.Parameter] = []
        self._handles: list = []
        self._dicts = TensorHookDict("_post_accumulate_grad_hooks")
        self._leaves: dict[int, tuple] = {}  # id -> (leaf input, handle), for this step only
        self._accumulated: set[int] = set()
        self._last = -2
        self._parent: dict[int, int] = {}

    def watch(self, modules: Iterable[nn.Module]) -> None:
        """Hook one trainable parameter of every module (a layer); re-hooks only if the choice changed
        (a parameter replaced, frozen or unfrozen since). Cheap enough for every step: one pass over
        the modules' parameter dicts."""
        targets = []
        for m in modules:
            for p in m._parameters.values():
                if p is not None and p.requires_grad:
                    targets.append(p)
                    break
        if len(targets) == len(self._targets) and all(a is b for a, b in zip(targets, self._targets)):
            return
        self._unhook()
        for p in targets:
            self._dicts.before(p)
            self._handles.append(p.register_post_accumulate_grad_hook(self._accumulating))
            self._dicts.registered(p)
        self._targets = targets

    def watch_inputs(self, args) -> None:
        """Also note accumulation into the leaf tensors among ``args`` (a layer's forward inputs) that
        require grad and are not parameters already watched (until :meth:`reset`)."""
        for a in args:
            if (type(a) is torch.Tensor and a.requires_grad and a.grad_fn is None and id(a) not in self._leaves
                    and not isinstance(a, nn.Parameter)):
                self._dicts.before(a)
                handle = a.register_post_accumulate_grad_hook(self._accumulating)
                self._dicts.registered(a)
                self._leaves[id(a)] = (a, handle)

    def _accumulating(self, param) -> None:
        tid = current_task()
        if tid != self._last:
            self._last = tid
            self._accumulated.add(tid)

    def link(self, task: int, outer: int) -> None:
        """``task`` runs inside ``outer`` (a reentrant checkpoint's backward): it counts when ``outer`` does."""
        if outer != -1 and task != outer:
            self._parent[task] = outer

    #: bucket keys for finished passes: those that accumulated, and those that did not (see :meth:`settle`)
    ACCUMULATED, REST = -10, -11

    def counts(self, task: int) -> bool:
        """Whether hook events of the backward pass ``task`` (or of a :meth:`settle` bucket) belong to the training step."""
        acc = self._accumulated
        if task == self.ACCUMULATED:
            return True
        if not acc:
            return True
        return task in acc or self._parent.get(task, -3) in acc

    def settle(self, task: int) -> int:
        """The key under which ``task``'s events may be summed with others' from now on: a finished pass
        is :attr:`ACCUMULATED` or :attr:`REST` (whose fate is common: counted iff no pass of the step
        accumulates), a running one (or one nested in a running one) keeps its own. Keeps the memory of
        many backward passes without ``step()`` bounded."""
        if task in (self.ACCUMULATED, self.REST) or task == -1:
            return task
        if task in self._accumulated or self._parent.get(task, -3) in self._accumulated:
            return self.ACCUMULATED
        live, t = set(), current_task()
        while t != -1 and t not in live:
            live.add(t)
            t = self._parent.get(t, -1)
        if task in live or self._parent.get(task, -3) in live:
            return task
        return self.REST

    def reset(self) -> None:
        for a, handle in self._leaves.values():
            handle.remove()
            self._dicts.after_removal(a)
        self._leaves = {}
        self._accumulated = set()
        self._parent = {}
        self._last = -2

    def unwatch(self) -> None:
        """Take the parameters' hooks off (until the next :meth:`watch`): a recorder that is not recording
        a step need not know its passes, and an idle hook still costs a call per layer and backward pass."""
        self._unhook()

    def _unhook(self) -> None:
        for h in self._handles:
            h.remove()
        for p in self._targets:
            self._dicts.after_removal(p)  # leave the parameter exactly as we found it
        self._handles.clear()
        self._targets = []

    def remove(self) -> None:
        self._unhook()
        self.reset()
