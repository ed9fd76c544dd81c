"""What a recorder puts on the user's modules, owned so that it can always be taken off again.

A forward hook is an entry in ``module._forward_hooks``, and a forward override an entry in the
module's ``__dict__``; both are copied along with the module by ``copy.deepcopy`` (an EMA or teacher
copy of a model that is being probed) and by ``pickle`` / ``torch.save``. A plain closure would then
make the copy report into the probe of the original, and stay on the copy after the probe closed.
The objects here behave correctly under copying:

* :class:`ForwardHooks`: the forward hooks one recorder owns. A hook only ever reports a call of the
  module object it was installed on (a shallow ``copy.copy`` shares the hook dict, and is ignored);
  ``copy.deepcopy`` and unpickling give the copy an inert :class:`_Ghost` instead, which deletes itself
  on the copy's first call, and :meth:`ForwardHooks.remove` deletes every ghost a deep copy still holds.
* :class:`SharedForward`: an instance ``forward`` that several owners share (two probes on one
  recurrent module): installed by the first owner, kept while any owner remains, and removed by the
  last, in whichever order they leave. A deep copy or unpickled copy of the module gets its class's
  own ``forward`` back (a stand-in that deletes itself on first use).

>>> import copy, torch
>>> from torch import nn
>>> lin, calls = nn.Linear(2, 2), []
>>> hooks = ForwardHooks()
>>> hooks.add(lin, lambda m, args, out: calls.append(m))
>>> twin = copy.deepcopy(lin)
>>> _ = twin(torch.ones(2)); _ = lin(torch.ones(2))
>>> calls == [lin], len(twin._forward_hooks)  # the copy did not report, and its ghost is gone
(True, 0)
>>> hooks.remove(); len(lin._forward_hooks)
0
"""
from __future__ import annotations

import copy
import sys
import weakref
from collections.abc import Callable

from torch import nn

__all__ = ["ForwardHooks", "SharedForward", "TensorHookDict"]


class TensorHookDict:
    """A tensor's hook dict (``_backward_hooks``, ``_post_accumulate_grad_hooks``) put back as found.

    torch keeps ``None`` until a first hook is registered and an empty dict after the last is removed.
    ``before(t)`` (called before registering) marks a dict that a probe's registration creates;
    ``after_removal(t)`` (called after removing) turns a marked dict that has become empty back into
    ``None``: right whichever of several probes on the same tensor leaves last."""

    _MARK = "_gradprobe_created"

    def __init__(self, attr: str):
        self.attr = attr

    def before(self, t) -> None:
        if getattr(t, self.attr) is None:
            self._fresh = t

    def registered(self, t) -> None:
        d = getattr(t, self.attr)
        if getattr(self, "_fresh", None) is t and d is not None:
            setattr(d, self._MARK, True)  # an OrderedDict takes attributes
        self._fresh = None

    def after_removal(self, t) -> None:
        d = getattr(t, self.attr)
        if d is not None and not d and getattr(d, self._MARK, False):
            setattr(t, self.attr, None)


class _Ghost:
    """What a copy of a hooked module holds in place of the hook: inert; removes itself when called."""

    __slots__ = ("key",)

    def __init__(self, key: int):
        self.key = key

    def __call__(self, module, args, output):
        hooks = getattr(module, "_forward_hooks", None)
        if hooks is not None and hooks.get(self.key) is self:
            del hooks[self.key]  # _call_impl iterates over a snapshot of the dict: deleting is safe
        return None


class _Hook:
    """A forward hook bound to one module object (see the module docstring)."""

    __slots__ = ("module", "fn", "key", "owner", "__weakref__")

    def __init__(self, module: nn.Module, fn: Callable, owner: ForwardHooks):
        self.module = weakref.ref(module)
        self.fn = fn
        self.key = -1
        self.owner = owner

    def __call__(self, module, args, output):
        if module is not self.module():
            return None  # a shallow copy of the module shares its hook dict: not ours to measure
        return self.fn(module, args, output)

    def __deepcopy__(self, memo):
        ghost = _Ghost(self.key)
        twin = memo.get(id(self.module()))  # deepcopy records the module's copy before copying its dicts
        if isinstance(twin, nn.Module):
            self.owner._remember(twin, ghost)
        return ghost

    def __reduce__(self):
        return (_Ghost, (self.key,))


def _compiled_anything() -> bool:
    """Whether ``torch.compile`` has compiled a frame in this process (read without importing Dynamo)."""
    utils = sys.modules.get("torch._dynamo.utils")
    return utils is not None and utils.counters["frames"]["total"] > 0


class ForwardHooks:
    """The forward hooks one recorder owns: ``add(module, fn)`` registers ``fn(module, args, output)``
    (called for that module object only), :meth:`remove` takes every one off, and off any deep copy
    made meanwhile.

    :meth:`detach` takes the hooks off the modules but keeps them, :meth:`attach` puts them back (after
    any forward hook registered meanwhile: hooks observe, they never change an output). A recorder
    detaches while it is not armed: an idle forward hook still sends every call of its module through
    ``nn.Module``'s slow hook path, which on a narrow MLP whose recorders skip most steps under an
    overhead budget was several percent of the step. :meth:`set` does this, except once
    ``torch.compile`` has compiled anything in the process: Dynamo does not guard on module hooks
    (``torch._dynamo.config.skip_nnmodule_hook_guards``), so a forward compiled while they were off
    would never call them again; they then stay on, idle."""

    def __init__(self) -> None:
        self._hooks: list[_Hook] = []
        self._handles: list = []
        self._ghosts: list[tuple[weakref.ref, _Ghost]] = []
        self._prune_at = 1024
        self.attached = True

    def add(self, module: nn.Module, fn: Callable) -> None:
        hook = _Hook(module, fn, self)
        self._hooks.append(hook)
        if self.attached:
            self._register(module, hook)

    def _register(self, module: nn.Module, hook: _Hook) -> None:
        handle = module.register_forward_hook(hook)
        hook.key = handle.id  # (a ghost made earlier keeps the key it was copied with)
        self._handles.append(handle)

    def __len__(self) -> int:
        return len(self._hooks)

    def attach(self) -> None:
        """Register every hook again (no-op while attached)."""
        if self.attached:
            return
        self.attached = True
        for hook in self._hooks:
            m = hook.module()
            if m is not None:
                self._register(m, hook)

    def detach(self) -> None:
        """Take the hooks off the modules, keeping them for :meth:`attach`."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.attached = False

    def set(self, on: bool) -> None:
        """Attached iff ``on``, except that they stay attached once ``torch.compile`` has compiled anything."""
        if on:
            self.attach()
        elif self.attached and not _compiled_anything():
            self.detach()

    def _remember(self, twin: nn.Module, ghost: _Ghost) -> None:
        self._ghosts.append((weakref.ref(twin), ghost))
        if len(self._ghosts) > self._prune_at:
            # a copy every step (an EMA copy, SAM): forget copies that are gone or already clean
            self._ghosts = [(r, g) for r, g in self._ghosts
                            if (m := r()) is not None and ((h := vars(m).get("_forward_hooks")) is None  # (being copied)
                                                           or h.get(g.key) is g)]
            self._prune_at = max(1024, 2 * len(self._ghosts))

    def remove(self) -> None:
        self.detach()
        self._hooks.clear()
        for ref, ghost in self._ghosts:
            m = ref()
            if m is not None:
                ghost(m, None, None)
        self._ghosts.clear()


class _ClassForward:
    """Stand-in for a :class:`SharedForward` on a copied module: runs the class's ``forward`` and, on
    first use, deletes itself so that the copy is a plain module again."""

    __slots__ = ("module",)

    def __init__(self, module: nn.Module):
        self.module = weakref.ref(module)

    def __call__(self, *args, **kwargs):
        m = self.module()
        if vars(m).get("forward") is self:
            del m.__dict__["forward"]
        return type(m).forward(m, *args, **kwargs)


def _class_forward(module: nn.Module) -> _ClassForward:
    return _ClassForward(module)


class SharedForward:
    """An instance ``forward`` override shared by several owners (see the module docstring).

    ``run(module, fused, owners, *args, **kwargs)`` computes the module's output given its own forward
    (``fused``: the user's instance forward, or the class's, bound) and the current owners; owners
    decide for themselves whether the call is theirs to measure.
    """

    def __init__(self, module: nn.Module, run: Callable):
        self.module = weakref.ref(module)
        self.previous = vars(module).get("forward")  # a forward the user had set on the instance, if any
        self.fused = self.previous if self.previous is not None else type(module).forward.__get__(module)
        self.run = run
        self.owners: list = []
        self._twins: list[weakref.ref] = []

    @classmethod
    def attach(cls, module: nn.Module, run: Callable, owner) -> SharedForward:
        """Add ``owner`` to the module's shared forward (installing one if there is none of ``run``'s kind)."""
        current = vars(module).get("forward")
        shared = current if isinstance(current, SharedForward) and current.run is run else None
        if shared is None:
            shared = cls(module, run)
            # an instance attribute shadows the class's forward; nn.Module.__call__ looks it up on self
            object.__setattr__(module, "forward", shared)
        shared.owners.append(owner)
        return shared

    def detach(self, owner) -> None:
        """Remove ``owner``; the last one out restores the module's own forward. Idempotent."""
        self.owners = [o for o in self.owners if o is not owner]
        if self.owners:
            return
        m = self.module()
        if m is not None and vars(m).get("forward") is self:
            if self.previous is None:
                del m.__dict__["forward"]
            else:
                object.__setattr__(m, "forward", self.previous)
        # (if something else wrapped our forward since, it stays, and we are a plain pass-through)
        for ref in self._twins:
            twin = ref()
            if twin is not None and isinstance(vars(twin).get("forward"), _ClassForward):
                del twin.__dict__["forward"]
        self._twins.clear()

    def __call__(self, *args, **kwargs):
        if not self.owners:
            return self.fused(*args, **kwargs)
        return self.run(self.module(), self.fused, tuple(self.owners), *args, **kwargs)

    def __deepcopy__(self, memo):
        if self.previous is not None:
            return copy.deepcopy(self.previous, memo)  # what the copy would hold without the probe
        twin = memo.get(id(self.module()))
        if not isinstance(twin, nn.Module):
            return self  # the override copied on its own, not as part of its module: nothing to copy
        self._twins = [r for r in self._twins if r() is not None] if len(self._twins) > 1024 else self._twins
        self._twins.append(weakref.ref(twin))
        return _ClassForward(twin)

    def __reduce__(self):
        if self.previous is not None:
            return (_identity, (self.previous,))
        return (_class_forward, (self.module(),))


def _identity(x):
    return x
