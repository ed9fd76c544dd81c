"""``GeometricRNN``: the one-unit model of Pascanu, Mikolov & Bengio (2013, §2.3 and Fig. 6).

    x_t = w σ(x_{t−1}) + b,   x_0 = 0.5,   E = (σ(x_T) − 0.7)²   with T = 50         (Pascanu Fig. 6)

The error surface over (w, b) has a *wall*: along the basin boundary of the map x ↦ wσ(x) + b the
gradient explodes. When x_0 is itself the unstable fixed point (``b = x_0 − wσ(x_0)`` with
``w σ′(x_0) > 1``) the trajectory never moves and the exact derivatives are geometric sums,

    ∂x_T/∂w = σ(x_0) (a^T − 1)/(a − 1),   ∂x_T/∂b = (a^T − 1)/(a − 1),   a = w σ′(x_0),

so ‖∇E‖ grows like a^T: :func:`wall_curve` gives that curve in closed form. With the identity in
place of σ and b = 0 (Pascanu et al. 2013, §2.3's linear case): ``x_t = x_0 w^t``, ``∂x_t/∂w = t x_0 w^(t−1)``,
``∂²x_t/∂w² = t(t−1) x_0 w^(t−2)`` (:func:`linear_closed_form`).

:func:`error_surface` evaluates E and ∇E on a whole (w, b) grid at once by forward-mode recursion
(no autograd): with s_t = ∂x_t/∂θ, ``s_t = ∂⁺x_t/∂θ + w σ′(x_{t−1}) s_{t−1}`` (∂⁺x_t/∂w = σ(x_{t−1}),
∂⁺x_t/∂b = 1), and ``∂E/∂θ = 2(σ(x_T) − target) σ′(x_T) s_T``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from gradprobe.errors import ConfigError
from gradprobe.functional.activations import ACTIVATIONS as _TABLE
from gradprobe.functional.activations import activation as _activation_row

__all__ = ["GeometricRNN", "ErrorSurface", "error_surface", "wall_curve", "linear_closed_form", "ACTIVATIONS"]


#: name -> (σ, σ′) of the activations the geometric model accepts (rows of the activation table)
ACTIVATIONS = {k: (_TABLE[k].fn, _TABLE[k].grad) for k in ("sigmoid", "tanh", "linear")}


def _activation(name: str):
    row = _activation_row(name, tuple(ACTIVATIONS), " for the geometric model")
    return row.fn, row.grad


@dataclass(frozen=True)
class ErrorSurface:
    """E and ∇E on a grid. ``ws`` (n_w,), ``bs`` (n_b,); ``loss``, ``grad_w``, ``grad_b`` have shape
    ``(n_b, n_w)`` (rows are b, columns w: ready for ``pcolormesh(ws, bs, loss)``); ``x0``, ``T``,
    ``target``, ``activation`` record the model they were computed for."""

    ws: np.ndarray
    bs: np.ndarray
    loss: np.ndarray
    grad_w: np.ndarray
    grad_b: np.ndarray
    x0: float = 0.5
    T: int = 50
    target: float = 0.7
    activation: str = "sigmoid"

    @property
    def grad_norm(self) -> np.ndarray:
        """‖∇E‖ = √((∂E/∂w)² + (∂E/∂b)²), shape ``(n_b, n_w)``."""
        return np.hypot(self.grad_w, self.grad_b)

    def cliff(self) -> tuple[float, float, float]:
        """``(w, b, ‖∇E‖)`` at the grid point where the gradient norm is largest."""
        g = self.grad_norm
        r, c = np.unravel_index(int(np.argmax(g)), g.shape)
        return float(self.ws[c]), float(self.bs[r]), float(g[r, c])

    def cliff_per_b(self) -> np.ndarray:
        """For every row b, the w with the largest ‖∇E‖: shape ``(n_b,)`` (the wall traced along w)."""
        return self.ws[np.argmax(self.grad_norm, axis=1)]


def error_surface(ws, bs, *, x0: float = 0.5, T: int = 50, target: float = 0.7,
                  activation: str = "sigmoid") -> ErrorSurface:
    """E = (σ(x_T) − target)² and its gradient on the grid ``ws × bs`` (float64, vectorised).

    Cost: T steps on an ``(n_b, n_w)`` array. Exact forward-mode derivatives (module docstring).

    >>> s = error_surface(np.linspace(1, 10, 4), np.linspace(-6, 0, 3))
    >>> s.loss.shape, s.grad_norm.shape
    ((3, 4), (3, 4))
    """
    if int(T) != T or T < 1:
        raise ConfigError(f"the geometric model needs T >= 1 steps; got T={T!r}")
    act, dact = _activation(activation)
    ws_np = np.asarray(ws, dtype=np.float64).reshape(-1)
    bs_np = np.asarray(bs, dtype=np.float64).reshape(-1)
    W, B = torch.meshgrid(torch.from_numpy(ws_np), torch.from_numpy(bs_np), indexing="xy")  # (n_b, n_w)
    x = torch.full_like(W, float(x0))
    sw = torch.zeros_like(W)  # ∂x_t/∂w
    sb = torch.zeros_like(W)  # ∂x_t/∂b
    for _ in range(int(T)):
        a = W * dact(x)  # ∂x_t/∂x_{t−1}
        sw = act(x) + a * sw
        sb = 1.0 + a * sb
        x = W * act(x) + B
    r = act(x) - float(target)
    dE = 2.0 * r * dact(x)
    return ErrorSurface(ws_np, bs_np, (r**2).numpy(), (dE * sw).numpy(), (dE * sb).numpy(),
                        float(x0), int(T), float(target), activation)


def wall_curve(ws, x0: float = 0.5, activation: str = "sigmoid") -> tuple[np.ndarray, np.ndarray]:
    """Where x_0 is an unstable fixed point: ``b = x_0 − wσ(x_0)``, valid where ``|w σ′(x_0)| > 1``.

    Returns ``(b, valid)`` with the shape of ``ws``. On this curve ‖∇E‖ grows like (wσ′(x_0))^T.
    """
    act, dact = _activation(activation)
    ws_np = np.asarray(ws, dtype=np.float64)
    x = torch.tensor(float(x0), dtype=torch.float64)
    s, ds = float(act(x)), float(dact(x))
    return float(x0) - ws_np * s, np.abs(ws_np * ds) > 1.0


def linear_closed_form(w: float, x0: float, t: int) -> tuple[float, float, float]:
    """Pascanu et al. 2013's linear case (σ = identity, b = 0): ``(x_t, ∂x_t/∂w, ∂²x_t/∂w²)``
    = ``(x_0 w^t, t x_0 w^(t−1), t(t−1) x_0 w^(t−2))``.

    >>> linear_closed_form(2.0, 0.5, 3)
    (4.0, 6.0, 6.0)
    """
    t = int(t)
    if t < 0:
        raise ConfigError(f"t must be >= 0; got {t}")
    x_t = x0 * w**t
    d1 = t * x0 * w ** (t - 1) if t >= 1 else 0.0
    d2 = t * (t - 1) * x0 * w ** (t - 2) if t >= 2 else 0.0
    return x_t, d1, d2


class GeometricRNN(nn.Module):
    """Pascanu's one-unit recurrent model ``x_t = w σ(x_{t−1}) + b`` with error E = (σ(x_T) − target)².

    Args:
        w, b: initial parameters (0-d ``nn.Parameter``s, float64 by default).
        x0: initial state (0.5 in Pascanu Fig. 6); T: steps (50); target: 0.7.
        activation: "sigmoid" (Pascanu), "tanh", or "linear" (the paper's linear case: x_t = x_0 w^t
            when b = 0; E then uses the identity too).

    ``forward()`` returns the states ``(T + 1,)`` including x_0; ``loss()`` returns E (0-d).

    >>> m = GeometricRNN(w=2.0, b=0.0, x0=0.5, T=3, activation="linear")
    >>> m().detach().tolist()
    [0.5, 1.0, 2.0, 4.0]
    """

    def __init__(self, w: float, b: float, *, x0: float = 0.5, T: int = 50, target: float = 0.7,
                 activation: str = "sigmoid", dtype: torch.dtype = torch.float64):
        super().__init__()
        if int(T) != T or T < 1:
            raise ConfigError(f"the geometric model needs T >= 1 steps; got T={T!r}")
        self.act, self.dact = _activation(activation)
        self.activation = activation
        self.x0, self.T, self.target = float(x0), int(T), float(target)
        self.w = nn.Parameter(torch.tensor(float(w), dtype=dtype))
        self.b = nn.Parameter(torch.tensor(float(b), dtype=dtype))

    def forward(self) -> torch.Tensor:
        xs = [torch.tensor(self.x0, dtype=self.w.dtype)]
        for _ in range(self.T):
            xs.append(self.w * self.act(xs[-1]) + self.b)
        return torch.stack(xs)  # (T + 1,)

    def loss(self) -> torch.Tensor:
        """E = (σ(x_T) − target)², differentiable in w and b."""
        return (self.act(self()[-1]) - self.target) ** 2

    def surface(self, ws, bs) -> ErrorSurface:
        """E and ∇E over the grid ``ws × bs`` for this model's x0, T, target and activation."""
        return error_surface(ws, bs, x0=self.x0, T=self.T, target=self.target, activation=self.activation)

    def wall(self, ws) -> tuple[np.ndarray, np.ndarray]:
        """The closed-form wall ``b(w)`` (and where it is valid) for this model's x0 and activation."""
        return wall_curve(ws, self.x0, self.activation)

    def on_wall_gradient(self) -> tuple[float, float]:
        """Exact ``(∂E/∂w, ∂E/∂b)`` when x_0 is a fixed point (b = x_0 − wσ(x_0)); ConfigError otherwise."""
        w, b = float(self.w.detach()), float(self.b.detach())
        x = torch.tensor(self.x0, dtype=torch.float64)
        s, ds = float(self.act(x)), float(self.dact(x))
        if not math.isclose(w * s + b, self.x0, rel_tol=0.0, abs_tol=1e-12):
            raise ConfigError(f"x0={self.x0} is not a fixed point at w={w}, b={b}; set b = x0 − w·σ(x0)")
        a = w * ds
        geo = float(self.T) if a == 1.0 else (a**self.T - 1.0) / (a - 1.0)
        dE = 2.0 * (s - self.target) * ds
        return dE * s * geo, dE * geo
