"""Lyapunov spectrum of a product of Jacobians by QR iteration (Benettin et al. 1980; Eckmann & Ruelle 1985).

For ``x_{t+1} = f_t(x_t)`` with Jacobians ``J_t`` ``(N, N)``, the top-k exponents are
``λ_i = lim_T (1/T) Σ_t ln|R_t[i, i]|`` where ``Q_{t+1} R_t = J_t Q_t`` is the QR factorisation of the
propagated orthonormal frame ``Q_t`` ``(N, k)``. Units: natural log per step. A gradient back-propagated
over a lag s behaves like e^{λ₁ s} (``shared/references.md``). Self-check: with k = N,
``Σ_i λ_i = (1/T) Σ_t ln|det J_t|`` to rounding.

Cost per step: one ``(N, N)×(N, k)`` product and one QR of ``(N, k)``. The estimate converges like 1/T
(start-up of the frame; use ``transient``) and at the rate of the gaps between exponents. A singular
J_t (dead ReLU units) gives an exponent of −inf, which is the right answer. States that decay into
float64's subnormal range make every step very slow: keep T such that the trajectory stays > 1e-300.
"""
from __future__ import annotations

import math  # noqa: F401  (used in the doctest)
from collections.abc import Callable, Iterable

import torch

from gradprobe.errors import ConfigError

__all__ = ["lyapunov_spectrum"]


def lyapunov_spectrum(
    jacobians: torch.Tensor | Iterable[torch.Tensor] | Callable[[int], torch.Tensor],
    k: int,
    *,
    steps: int | None = None,
    transient: int = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Top-``k`` Lyapunov exponents (descending, float64 ``(k,)``) of ``Π_t J_t``.

    Args:
        jacobians: a tensor ``(T, N, N)``, an iterable of ``(N, N)`` tensors, or a callable ``t ↦ J_t``
            (then ``steps`` is required). J_t maps the state at t to the state at t+1.
        k: number of exponents (1 ≤ k ≤ N).
        transient: leading steps that only align the frame and are not averaged.
        generator: seeds the random initial frame (default: a fixed seed, so results are reproducible).

    >>> Q = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))[0]   # orthogonal
    >>> lam = lyapunov_spectrum((0.9 * Q).expand(50, 5, 5), 3)          # W = 0.9·Q: all exponents ln 0.9
    >>> bool((lam - math.log(0.9)).abs().max() < 1e-12)
    True
    """
    if callable(jacobians) and not isinstance(jacobians, torch.Tensor):
        if steps is None or steps < 1:
            raise ConfigError("with a callable t -> J_t, pass steps >= 1")
        seq: Iterable[torch.Tensor] = (jacobians(t) for t in range(steps))
    else:
        if isinstance(jacobians, torch.Tensor) and jacobians.dim() != 3:
            raise ConfigError(f"a Jacobian tensor must be (T, N, N); got shape {tuple(jacobians.shape)}")
        seq = jacobians if steps is None else (j for i, j in zip(range(steps), jacobians))
    if transient < 0:
        raise ConfigError(f"transient must be >= 0; got {transient}")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    Q = None
    acc = None
    n_avg = 0
    for t, J in enumerate(seq):
        J = torch.as_tensor(J).detach().to(torch.float64)
        if Q is None:
            if J.dim() != 2 or J.shape[0] != J.shape[1]:
                raise ConfigError(f"each Jacobian must be square (N, N); got {tuple(J.shape)}")
            N = J.shape[0]
            if not 1 <= k <= N:
                raise ConfigError(f"k must be between 1 and N = {N}; got {k}")
            Q = torch.linalg.qr(torch.randn(N, k, dtype=torch.float64, generator=gen))[0]  # (N, k)
            acc = torch.zeros(k, dtype=torch.float64)
        elif J.shape != (Q.shape[0], Q.shape[0]):
            raise ConfigError(f"Jacobian {t} has shape {tuple(J.shape)}, expected {(Q.shape[0], Q.shape[0])}")
        Q, R = torch.linalg.qr(J @ Q)  # (N, k), (k, k)
        if t >= transient:
            acc += torch.log(torch.abs(torch.diagonal(R)))
            n_avg += 1
    if n_avg == 0:
        raise ConfigError(f"no steps left to average: got {0 if Q is None else t + 1} Jacobians and transient={transient}")
    # QR does not order the diagonal; sort so exponents are descending (they are a.s. already ordered
    # after alignment, sorting only guards against ties).
    return torch.sort(acc / n_avg, descending=True).values
