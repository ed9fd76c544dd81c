"""``gradprobe.diagnose``: a one-call check of a model on one batch (at init or after a few steps)."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from gradprobe.analysis.curvature import classify_stationary
from gradprobe.analysis.depth import signal_profile
from gradprobe.diagnosis import Diagnosis
from gradprobe.errors import ConfigError
from gradprobe.training import call_model, check_scalar_loss, train

__all__ = ["diagnose"]


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

    def loss_of_output(out, _target=None):
        return loss_fn(out) if target is None else loss_fn(out, target)

    params = list(model.parameters()) + ([q for g in optimizer.param_groups for q in g["params"]] if optimizer else [])
    saved = {id(p): (p, p.grad) for p in params}
    # `steps` updates, then one more pass that is measured without an update
    run = train(model, lambda s: (batch, None), loss_of_output, steps=steps + 1, lr=lr, optimizer=optimizer,
                update_last=False, probe={"update_ratio": False, "temporal": temporal})
    stationary = None
    if curvature:
        def loss_of():
            return check_scalar_loss(loss_of_output(call_model(model, batch)))

        stationary = _stationary(model, loss_of, run.last, loss_floor)
    result = run.diagnose(stationary=stationary, **config)
    for p, grad in saved.values():  # leave .grad as the caller had it
        p.grad = grad
    return result


def _stationary(model: nn.Module, loss_of: Callable, flow, loss_floor: float | None):
    params = [p for p in model.parameters() if p.requires_grad]
    prof = signal_profile(flow)
    with torch.enable_grad():
        return classify_stationary(loss_of, params, loss_floor,
                                   layer_grad_norms=None if prof is None else prof.values.tolist())
