"""Gradient clipping: Pascanu's norm clipping (Algorithm 1), value clipping and AutoClip.

Norm clipping (Pascanu, Mikolov & Bengio 2013, Algorithm 1): with ``g = ∂E/∂θ`` over **all**
parameters concatenated into one vector,

    if ‖g‖ ≥ threshold:  g ← threshold · g / ‖g‖

We use the same arithmetic as :func:`torch.nn.utils.clip_grad_norm_` so the two are interchangeable:
the scale is ``min(1, max_norm / (‖g‖ + eps))`` with ``eps = 1e-6`` guarding ``‖g‖ = 0`` (the clipped
norm is therefore ``max_norm·‖g‖/(‖g‖ + eps)``, a relative ``eps/‖g‖`` below the threshold). What this
module adds is the bookkeeping users ask for: the *pre*-clip norm (what torch returns and what most
loggers show), the *post*-clip norm (what the optimizer actually used), whether the step was clipped,
and a clip rate (:class:`GradClipper`). The paper suggests a threshold between 0.5× and 10× the
average gradient norm; :class:`AutoClip` picks it from the observed history instead.
"""
from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from gradprobe._deprecation import module_getattr
from gradprobe.errors import ConfigError, NonFiniteGradientError

__all__ = [
    "ClipStep",
    "NonFiniteGradientError",
    "total_grad_norm",
    "clip_grad_norm_",
    "clip_grad_value_",
    "GradClipper",
    "AutoClip",
]

_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s guard against a zero norm; kept for equal results


@dataclass(frozen=True)
class ClipStep:
    """One clipping step.

    * ``pre_norm``: ‖g‖ before clipping (equals ``torch.nn.utils.clip_grad_norm_``'s return value);
    * ``post_norm``: ‖g‖ after clipping, i.e. what the optimizer sees (``pre_norm · scale``);
    * ``clipped``: whether the gradients were scaled down (``scale < 1``);
    * ``scale``: the factor the gradients were multiplied by, ``min(1, max_norm/(pre_norm + 1e-6))``;
    * ``max_norm``: the threshold used (fixed, or AutoClip's percentile).
    """

    pre_norm: float
    post_norm: float
    clipped: bool
    scale: float
    max_norm: float


def _grads(parameters) -> list[torch.Tensor]:
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    return [p.grad for p in parameters if p.grad is not None]


def _check_norm_type(norm_type: float) -> float:
    norm_type = float(norm_type)
    if not (norm_type > 0):  # also rejects NaN
        raise ConfigError(f"norm_type={norm_type} must be a positive number or float('inf')")
    return norm_type


def _check_threshold(name: str, value: float) -> float:
    value = float(value)
    if not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"{name}={value} must be a positive finite number (the clipping threshold)")
    return value


@torch.no_grad()
def total_grad_norm(parameters: Iterable[torch.Tensor] | torch.Tensor, norm_type: float = 2.0) -> torch.Tensor:
    """‖g‖_p of all gradients concatenated, as a 0-dim tensor (float64 when the grads are float64).

    Parameters without ``.grad`` are skipped; no gradient at all gives 0.

    >>> p = torch.nn.Parameter(torch.zeros(2)); p.grad = torch.tensor([3.0, 4.0])
    >>> float(total_grad_norm([p]))
    5.0
    """
    norm_type = _check_norm_type(norm_type)
    grads = _grads(parameters)
    if not grads:
        return torch.tensor(0.0)
    device = grads[0].device
    # per-tensor norms first (as torch does), then the norm of those norms
    norms = [torch.linalg.vector_norm(g, norm_type).to(device) for g in grads]
    return torch.linalg.vector_norm(torch.stack(norms), norm_type)


@torch.no_grad()
def _scale_grads_(grads: list[torch.Tensor], total: torch.Tensor, max_norm: float) -> torch.Tensor:
    coef = torch.clamp(max_norm / (total + _EPS), max=1.0)
    for g in grads:
        g.mul_(coef.to(device=g.device, dtype=g.dtype))
    return coef


def clip_grad_norm_(
    parameters: Iterable[torch.Tensor] | torch.Tensor,
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
) -> ClipStep:
    """Pascanu's Algorithm 1 on the ``.grad`` of ``parameters``, in place; returns a :class:`ClipStep`.

    ``g ← g · min(1, max_norm / (‖g‖_p + 1e-6))`` with ``‖g‖_p`` the p-norm of all gradients
    concatenated (``norm_type=float('inf')`` gives the largest absolute entry). Identical to
    ``torch.nn.utils.clip_grad_norm_`` (whose return value is ``pre_norm``), plus the post-clip norm.

    Non-finite norms: with ``error_if_nonfinite=True`` raises :class:`NonFiniteGradientError` and
    leaves ``.grad`` untouched; otherwise the gradients are scaled as torch does (they become NaN).

    >>> p = torch.nn.Parameter(torch.zeros(2)); p.grad = torch.tensor([3.0, 4.0])
    >>> r = clip_grad_norm_([p], max_norm=1.0)
    >>> round(r.pre_norm, 6), round(r.post_norm, 6), r.clipped
    (5.0, 1.0, True)
    """
    max_norm = _check_threshold("max_norm", max_norm)
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    parameters = list(parameters)
    total = total_grad_norm(parameters, norm_type)
    pre = float(total)
    if error_if_nonfinite and not math.isfinite(pre):
        raise NonFiniteGradientError(
            f"the total gradient norm (order {norm_type}) is {pre}, so it cannot be clipped; look for the "
            "first layer with a non-finite gradient (gradprobe.Probe reports it) or pass error_if_nonfinite=False"
        )
    grads = _grads(parameters)
    if not grads:
        return ClipStep(0.0, 0.0, False, 1.0, max_norm)
    scale = float(_scale_grads_(grads, total, max_norm))
    return ClipStep(pre, pre * scale, scale < 1.0, scale, max_norm)


@torch.no_grad()
def clip_grad_value_(parameters: Iterable[torch.Tensor] | torch.Tensor, clip_value: float) -> float:
    """Clamp every gradient entry to ``[−clip_value, clip_value]`` in place (as
    ``torch.nn.utils.clip_grad_value_``); returns the fraction of entries that were clamped.

    Unlike norm clipping this changes the gradient's *direction* (Pascanu et al. 2013 §3.2 prefer
    the norm version for that reason); it is here for completeness and for comparisons.

    >>> p = torch.nn.Parameter(torch.zeros(4)); p.grad = torch.tensor([-3.0, 0.5, 2.0, 0.1])
    >>> clip_grad_value_([p], 1.0), p.grad.tolist()
    (0.5, [-1.0, 0.5, 1.0, 0.10000000149011612])
    """
    clip_value = _check_threshold("clip_value", clip_value)
    grads = _grads(parameters)
    n = sum(g.numel() for g in grads)
    if n == 0:
        return 0.0
    hit = sum(int((g.abs() > clip_value).sum()) for g in grads)
    for g in grads:
        g.clamp_(-clip_value, clip_value)
    return hit / n


class _ClipLog:
    """Counts shared by the clippers: steps, clipped steps, clip rate, bounded norm history."""

    def __init__(self, history: int | None):
        if history is not None and int(history) < 1:
            raise ConfigError(f"history={history} must be a positive number of steps (or None to keep all)")
        maxlen = None if history is None else int(history)
        self.steps = 0
        self.clipped_steps = 0
        self.pre_norms: deque[float] = deque(maxlen=maxlen)
        self.post_norms: deque[float] = deque(maxlen=maxlen)
        self.last: ClipStep | None = None

    def _record(self, r: ClipStep, *, keep_pre: bool = True) -> ClipStep:
        self.steps += 1
        self.clipped_steps += int(r.clipped)
        if keep_pre:
            self.pre_norms.append(r.pre_norm)
        self.post_norms.append(r.post_norm)
        self.last = r
        return r

    @property
    def clip_rate(self) -> float:
        """Fraction of steps that were clipped (NaN before the first step)."""
        return self.clipped_steps / self.steps if self.steps else float("nan")


class GradClipper(_ClipLog):
    """Norm clipping with counts for logging: steps, clipped steps, clip rate, recent pre/post norms.

    Call it once per step after ``loss.backward()`` and before ``optimizer.step()``; it returns the
    step's :class:`ClipStep`. Log ``post_norm`` (what the optimizer used) next to ``pre_norm``
    (what the loss produced): a high clip rate means the threshold is setting the step size.

    Args:
        max_norm: Pascanu's threshold; norm_type: p of the norm; history: how many recent steps'
            norms to keep in ``pre_norms``/``post_norms`` (the counts cover every step).

    >>> p = torch.nn.Parameter(torch.zeros(2))
    >>> clipper = GradClipper(max_norm=1.0)
    >>> for g in ([3.0, 4.0], [0.3, 0.4]):
    ...     p.grad = torch.tensor(g); _ = clipper([p])
    >>> clipper.steps, clipper.clipped_steps, clipper.clip_rate
    (2, 1, 0.5)
    """

    def __init__(self, max_norm: float, norm_type: float = 2.0, *, history: int = 1000, error_if_nonfinite: bool = False):
        super().__init__(history)
        self.max_norm = _check_threshold("max_norm", max_norm)
        self.norm_type = _check_norm_type(norm_type)
        self.error_if_nonfinite = bool(error_if_nonfinite)

    def __call__(self, parameters) -> ClipStep:
        return self._record(clip_grad_norm_(parameters, self.max_norm, self.norm_type, self.error_if_nonfinite))

    def __repr__(self) -> str:
        return f"GradClipper(max_norm={self.max_norm:g}, steps={self.steps}, clip_rate={self.clip_rate:.3g})"


class AutoClip(_ClipLog):
    """Adaptive norm clipping at a percentile of the gradient-norm history (Seetharaman et al. 2020,
    "AutoClip: Adaptive Gradient Clipping for Source Separation Networks").

    Each call: append the current pre-clip norm ``‖g‖`` to the history ``pre_norms``, set the
    threshold to ``numpy.percentile(pre_norms, percentile)`` (linear interpolation, as the authors'
    code), and clip to it. The history includes the current step, so the first step is not clipped
    beyond torch's relative 1e-6 (the percentile of one value is that value).

    Args:
        percentile: in [0, 100]; the paper's default is 10.
        history: keep the last ``history`` norms (``None``: all of them, as in the paper). Each step
            costs O(len(history)) for the percentile, so bound it (e.g. 10_000) for long runs.

    >>> p = torch.nn.Parameter(torch.zeros(1))
    >>> clip = AutoClip(percentile=50)
    >>> for g in (1.0, 3.0, 2.0):
    ...     p.grad = torch.tensor([g]); r = clip([p])
    >>> r.max_norm, round(r.post_norm, 5)
    (2.0, 2.0)
    """

    def __init__(self, percentile: float = 10.0, history: int | None = None, norm_type: float = 2.0, *, error_if_nonfinite: bool = False):
        super().__init__(history)
        if not (0.0 <= float(percentile) <= 100.0):
            raise ConfigError(f"percentile={percentile} must be within [0, 100]")
        self.percentile = float(percentile)
        self.norm_type = _check_norm_type(norm_type)
        self.error_if_nonfinite = bool(error_if_nonfinite)
        self.max_norm = float("nan")  # the current threshold, set at every step

    def __call__(self, parameters) -> ClipStep:
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        parameters = list(parameters)
        total = total_grad_norm(parameters, self.norm_type)
        pre = float(total)
        if not math.isfinite(pre):
            if self.error_if_nonfinite:
                raise NonFiniteGradientError(f"AutoClip: the total gradient norm is {pre}; nothing was clipped")
            # A NaN/Inf norm would poison the percentile forever, so it stays out of the history. The
            # gradients are scaled as torch would (coefficient NaN or 0 whatever the finite threshold).
            grads = _grads(parameters)
            scale = float(_scale_grads_(grads, total, 1.0))
            return self._record(ClipStep(pre, pre * scale, True, scale, self.max_norm), keep_pre=False)
        self.pre_norms.append(pre)
        self.max_norm = float(np.percentile(np.asarray(self.pre_norms, dtype=np.float64), self.percentile))
        grads = _grads(parameters)
        if not grads or self.max_norm <= 0:  # all-zero history: nothing to scale
            r = ClipStep(pre, pre, False, 1.0, self.max_norm)
        else:
            scale = float(_scale_grads_(grads, total, self.max_norm))
            r = ClipStep(pre, pre * scale, scale < 1.0, scale, self.max_norm)
        return self._record(r, keep_pre=False)

    def __repr__(self) -> str:
        return f"AutoClip(percentile={self.percentile:g}, steps={self.steps}, clip_rate={self.clip_rate:.3g})"


OLD_NAMES = {"ClipResult": ClipStep}  # old name, warns for one release
__getattr__ = module_getattr(__name__, OLD_NAMES)
