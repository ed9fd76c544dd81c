"""What a loss scaler did to this step's gradients (mixed-precision training with ``torch.amp.GradScaler``).

Under a scaler the backward pass runs on ``s · L`` (``s`` the loss scale), so every gradient the hooks
see during backward, ``∂(sL)/∂h = s · ∂L/∂h``, is ``s`` times too large; ``.grad`` is too, until
``scaler.unscale_(optimizer)`` (or ``scaler.step``) divides it by ``s``. When the scaled gradients hold
an Inf or NaN, ``scaler.step`` skips the optimizer step and ``scaler.update`` lowers ``s``: an overflow
of the fp16 range, not an explosion of the model's gradients (Micikevicius et al. 2018, "Mixed
Precision Training").

:func:`read_scaler` turns the scaler's state into a :class:`LossScale`; the session divides every
quantity a recorder declares in :attr:`~gradprobe.probe.Recorder.norm_of` by the right factor and
records the step's scale and whether it was skipped in the ``"scaler"`` table. Call ``probe.step()``
before ``scaler.update()`` (which replaces the scale the backward ran with).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import torch

from gradprobe.errors import ConfigError
from gradprobe.trace import Table

__all__ = ["LossScale", "ScalerSnapshot", "snapshot_scaler", "read_scaler", "check_scaler", "divide_scale"]


@dataclass(frozen=True)
class LossScale:
    """``backward``: the loss scale the step's backward passes ran with; ``grad``: the scale still in
    ``.grad`` (1.0 once the scaler has unscaled it); ``found_inf``: the scaler found Inf/NaN gradients
    (the optimizer step is skipped), or ``None`` when it has not looked yet (not unscaled)."""

    backward: float
    grad: float
    found_inf: bool | None


def check_scaler(scaler) -> None:
    """A clear error for something that is not a GradScaler-like object."""
    if scaler is None:
        return
    for attr in ("get_scale", "is_enabled"):
        if not callable(getattr(scaler, attr, None)):
            raise ConfigError(f"Probe(scaler=...) needs a torch.amp.GradScaler (with get_scale() and is_enabled()); "
                              f"got {type(scaler).__name__}")


@dataclass(frozen=True)
class ScalerSnapshot:
    """The scaler's state at ``step()``, kept as device tensors (no host synchronisation) until the
    session copies the step's numbers: :meth:`resolve` gives the :class:`LossScale`."""

    scale: object  # a 0-d tensor, or a float before the scaler's first scale()
    unscaled: bool
    found_inf: tuple | None  # found-inf flags per device (tensors), None if not unscaled yet

    def resolve(self) -> LossScale:
        s = float(self.scale.item() if isinstance(self.scale, torch.Tensor) else self.scale)
        found = None if self.found_inf is None else any(float(v.item()) > 0 for v in self.found_inf)
        return LossScale(backward=s, grad=1.0 if self.unscaled else s, found_inf=found)


def snapshot_scaler(scaler) -> ScalerSnapshot | None:
    """The scaler's state now (``None`` for no scaler or a disabled one), without a host sync.

    Whether ``.grad`` is already unscaled and what the scaler found are read from the per-optimizer
    state ``torch.amp.GradScaler`` keeps between ``unscale_``/``step`` and ``update`` (its stage and
    ``found_inf_per_device``); a scaler without that state is taken as not yet unscaled.
    """
    if scaler is None or not scaler.is_enabled():
        return None
    t = getattr(scaler, "_scale", None)
    scale = t.detach().clone() if isinstance(t, torch.Tensor) else float(scaler.get_scale())
    states = getattr(scaler, "_per_optimizer_states", None) or {}
    unscaled, found = False, []
    for st in states.values():
        if getattr(st.get("stage"), "name", None) in ("UNSCALED", "STEPPED"):
            unscaled = True
            found.extend(v.detach().clone() for v in (st.get("found_inf_per_device") or {}).values())
    return ScalerSnapshot(scale, unscaled, tuple(found) if unscaled and found else None)


def read_scaler(scaler) -> LossScale | None:
    """:class:`LossScale` of the scaler now (``None`` for no scaler or a disabled one)."""
    snap = snapshot_scaler(scaler)
    return None if snap is None else snap.resolve()


def divide_scale(scale: LossScale, norm_of: dict, values: dict, tables: dict) -> None:
    """Divide the loss scale out of what ``norm_of`` declares, in place in ``values`` (``{quantity: (L,)
    array}``) and ``tables`` (``{name: Table}``, a column named ``"name.column"`` in ``norm_of``): an
    ``"output_grad"`` was measured on ∂(s·L)/∂h, so it is divided by ``scale.backward``; a ``"param_grad"``
    by the scale still in ``.grad`` (``scale.grad``, 1.0 once unscaled). Norms are homogeneous of degree 1,
    so ‖∂L/∂·‖ = ‖∂(s·L)/∂·‖ / s exactly (up to the one rounding of the division)."""
    factor = {"output_grad": scale.backward, "param_grad": scale.grad}
    for key, what in norm_of.items():
        f = factor.get(what, 1.0)
        if f == 1.0:
            continue
        if key in values:
            values[key] = values[key] / f
        elif "." in key and key.split(".", 1)[0] in tables:
            name, col = key.split(".", 1)
            t = tables[name]
            if col in t.columns:
                c = t.columns[col]
                c = tuple(None if a is None else np.asarray(a) / f for a in c) if isinstance(c, tuple) else np.asarray(c) / f
                tables[name] = Table(t.sites, t.kinds, {**t.columns, col: c}, t.transient)
