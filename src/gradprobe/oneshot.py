"""``gradprobe.diagnose``: a one-call check of a model on one batch (at init or after a few steps)."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from gradprobe.analysis.depth import signal_profile
from gradprobe.analysis.expectation import depth_expectation
from gradprobe.diagnosis import Diagnosis, diagnose_flow
from gradprobe.errors import ConfigError
from gradprobe.monitor import Probe

__all__ = ["diagnose"]


def _forward(model: nn.Module, batch):
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def diagnose(
    model: nn.Module,
    batch,
    loss_fn: Callable,
    *,
    target=None,
    steps: int = 0,
    optimizer: torch.optim.Optimizer | None = None,
    lr: float = 0.01,
    temporal: bool = False,
    curvature: bool = False,
    loss_floor: float | None = None,
    **config,
) -> Diagnosis:
    """Probe ``model`` on ``batch`` and return its :class:`~gradprobe.Diagnosis`.

    ``loss_fn(output)`` or, when ``target`` is given, ``loss_fn(output, target)`` must return a scalar.
    With ``steps > 0`` the model is first trained for that many steps on the same batch (plain SGD
    with ``lr`` unless an ``optimizer`` is given), which *changes its parameters*; the verdict is for
    the last step. ``config`` holds :class:`~gradprobe.DiagnosisConfig` overrides.

    ``temporal=True`` also measures gradient flow through time in recurrent layers (BPTT verdicts).
    ``curvature=True`` adds the distinction between a minimum ("converged"), a saddle
    ("saddle") and a gradient vanishing far from any optimum, from Lanczos on Hessian-vector products
    (see :func:`gradprobe.analysis.curvature.classify_stationary`; ``loss_floor`` is the best
    achievable loss if known, e.g. 0 for noiseless regression).

    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(*[m for _ in range(12) for m in (nn.Linear(32, 32), nn.Sigmoid())])
    >>> diagnose(net, torch.randn(64, 32), lambda y: y.pow(2).mean()).verdict
    'vanishing'
    """
    if steps < 0:
        raise ConfigError(f"steps={steps} must be >= 0")
    if steps and optimizer is None:
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)

    def loss_of():
        out = _forward(model, batch)
        loss = loss_fn(out) if target is None else loss_fn(out, target)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ConfigError(
                f"loss_fn must return a scalar tensor; got {type(loss).__name__}"
                + (f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else "")
            )
        return loss

    saved = {id(p): p.grad for p in model.parameters()}
    with Probe(model, update_ratio=False, temporal=temporal, budget=None) as probe:
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_of()
            loss.backward()
            probe.step(loss)
            optimizer.step()
        for p in model.parameters():
            p.grad = None
        loss = loss_of()
        loss.backward()
        flow = probe.step(loss)
        stationary = None
        if curvature:
            stationary = _stationary(model, loss_of, flow, loss_floor)
        expectation = depth_expectation(model, signal_profile(flow))
        result = diagnose_flow(flow, facts=probe.facts, trace=probe.trace, stationary=stationary,
                               expectation=expectation, **config)
    for p in model.parameters():  # leave .grad as the caller had it
        p.grad = saved.get(id(p))
    return result


def _stationary(model: nn.Module, loss_of: Callable, flow, loss_floor: float | None):
    from gradprobe.analysis.curvature import classify_stationary

    params = [p for p in model.parameters() if p.requires_grad]
    prof = signal_profile(flow)
    with torch.enable_grad():
        return classify_stationary(loss_of, params, loss_floor,
                                   layer_grad_norms=None if prof is None else prof.values.tolist())
