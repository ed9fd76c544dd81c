"""Figures for the prototypical models of :mod:`gradprobe.models` (needs the ``plot`` extra: matplotlib).

Each function takes a model (or its computed data), draws one figure, and returns the matplotlib
``Figure``; nothing is shown or saved unless ``path`` is given. matplotlib is imported lazily, with
the non-interactive Agg backend when no backend has been chosen, so plotting works headless.

* :func:`plot_chain_gradients` — the sigmoid chain: |dF/dw_k| per layer k (log scale), the vanishing gradient.
* :func:`plot_bifurcation_diagram` — Doya 1993 / Pascanu et al. 2013, Fig. 3: fixed points of Doya's neuron over b.
* :func:`plot_doya_sensitivity` — Doya 1993: x(T) and |dx(T)/dx(0)| against x(0), jumping at the
  unstable fixed point (the basin boundary).
* :func:`plot_error_surface` — Pascanu Fig. 6: E(w, b) and log₁₀‖∇E‖ of the geometric model, with the wall.
* :func:`plot_rnn_jacobian_norms` — Pascanu et al. 2013, §2: ‖∂x_T/∂x_{T−s}‖ against lag s for a SigmoidRNN.
"""
from __future__ import annotations

import os
import sys

import numpy as np
import torch

from gradprobe.errors import require
from gradprobe.models.chain import SigmoidChain
from gradprobe.models.doya import BifurcationDiagram, DoyaNeuron, doya_fixed_point_curve, doya_sensitivity
from gradprobe.models.geometric import ErrorSurface, wall_curve
from gradprobe.models.rnn import SigmoidRNN

__all__ = [
    "plot_chain_gradients",
    "plot_bifurcation_diagram",
    "plot_doya_sensitivity",
    "plot_error_surface",
    "plot_rnn_jacobian_norms",
]


def _pyplot():
    require("matplotlib", "plot")
    import matplotlib

    # Respect a backend the user chose (MPLBACKEND or an earlier matplotlib.use); otherwise Agg.
    if "MPLBACKEND" not in os.environ and "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    return require("matplotlib.pyplot", "plot")


def _finish(fig, path):
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def plot_chain_gradients(chain: SigmoidChain, *, x=None, ax=None, path=None):
    """|dF/dw_k| against layer k for the sigmoid chain (closed form), log y-axis.

    >>> fig = plot_chain_gradients(SigmoidChain(10))
    >>> fig.axes[0].get_yscale()
    'log'
    """
    plt = _pyplot()
    g = np.abs(chain.closed_form_grad(x).detach().cpu().numpy().reshape(-1, chain.L))
    if ax is None:
        fig, ax = plt.subplots(figsize=(5, 3.5))
    else:
        fig = ax.figure
    k = np.arange(1, chain.L + 1)
    for row in g:
        ax.semilogy(k, np.where(row > 0, row, np.nan), marker="o")
    ax.set_xlabel("layer k")
    ax.set_ylabel("|dF/dw_k|")
    ax.set_title(f"Sigmoid chain, L = {chain.L}")
    return _finish(fig, path)


def plot_bifurcation_diagram(diagram: BifurcationDiagram, *, ax=None, path=None):
    """Fixed points of Doya's neuron over b: stable solid, unstable dashed, the saddle nodes shaded.

    >>> from gradprobe.models.doya import doya_bifurcation_diagram
    >>> fig = plot_bifurcation_diagram(doya_bifurcation_diagram(5.0, np.linspace(-3, -2, 51)))
    >>> len(fig.axes)
    1
    """
    plt = _pyplot()
    if ax is None:
        fig, ax = plt.subplots(figsize=(5, 3.5))
    else:
        fig = ax.figure
    # The closed-form curve b(x) = logit(x) − wx, split by stability, drawn over the sweep's b-range.
    xs = np.linspace(1e-4, 1 - 1e-4, 2000)
    cb, stable = doya_fixed_point_curve(diagram.w, xs)
    lo, hi = (diagram.b.min(), diagram.b.max()) if diagram.b.size else (cb.min(), cb.max())
    inside = (cb >= lo) & (cb <= hi)
    ax.plot(np.where(inside & stable, cb, np.nan), xs, "k-", lw=1.5, label="stable")
    ax.plot(np.where(inside & ~stable, cb, np.nan), xs, "r--", lw=1.5, label="unstable")
    ax.scatter(diagram.b[diagram.stable], diagram.x[diagram.stable], s=6, c="k")
    ax.scatter(diagram.b[~diagram.stable], diagram.x[~diagram.stable], s=6, c="r")
    if diagram.window is not None:
        ax.axvspan(*diagram.window, color="0.9", zorder=0, label="bistable window")
    ax.set_xlabel("bias b")
    ax.set_ylabel("fixed point x*")
    ax.set_title(f"Doya's neuron, w = {diagram.w:g} (Pascanu Fig. 3)")
    ax.legend(loc="best", fontsize=8)
    return _finish(fig, path)


def plot_error_surface(surface: ErrorSurface, *, path=None):
    """Two panels over (w, b): the error E and log₁₀‖∇E‖, with the closed-form wall overlaid.

    >>> from gradprobe.models.geometric import error_surface
    >>> fig = plot_error_surface(error_surface(np.linspace(0, 10, 21), np.linspace(-6, 0, 13)))
    >>> len(fig.axes)
    4
    """
    plt = _pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    m1 = a1.pcolormesh(surface.ws, surface.bs, surface.loss, shading="auto")
    fig.colorbar(m1, ax=a1, label="E")
    with np.errstate(divide="ignore"):
        lg = np.log10(surface.grad_norm)
    m2 = a2.pcolormesh(surface.ws, surface.bs, np.where(np.isfinite(lg), lg, np.nan), shading="auto")
    fig.colorbar(m2, ax=a2, label="log10 ‖∇E‖")
    wall_b, valid = wall_curve(surface.ws, surface.x0, surface.activation)
    in_view = valid & (wall_b >= surface.bs.min()) & (wall_b <= surface.bs.max())
    for ax, title in ((a1, "error E"), (a2, "gradient norm")):
        ax.plot(np.where(in_view, surface.ws, np.nan), wall_b, "w--", lw=1)
        ax.set_xlabel("w")
        ax.set_ylabel("b")
        ax.set_title(f"{title} (Pascanu Fig. 6)")
    return _finish(fig, path)


def plot_doya_sensitivity(neuron: DoyaNeuron, x0s, T: int, *, path=None):
    """Two panels against x(0): the settled state x(T), and |dx(T)/dx(0)| (log) from the exact
    recursion; dotted lines mark the unstable fixed points. ``x0s``: 1-D grid of initial states.

    >>> fig = plot_doya_sensitivity(DoyaNeuron(w=5.0, b=-2.5, eps=0.1), np.linspace(0.0, 1.0, 41), T=200)
    >>> len(fig.axes)
    2
    """
    plt = _pyplot()
    w, b = float(neuron.w.detach()), float(neuron.b.detach())
    x0s = np.asarray(x0s, dtype=np.float64).reshape(-1)
    sens = [doya_sensitivity(w, b, neuron.eps, float(x0), int(T)) for x0 in x0s]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.5))
    a1.plot(x0s, [r.x_T for r in sens], "k.-", ms=3)
    a1.set_ylabel(f"x(T), T = {int(T)}")
    d = np.abs([r.dx0 for r in sens])
    a2.semilogy(x0s, np.where(d > 0, d, np.nan), "b.-", ms=3)
    a2.set_ylabel("|dx(T)/dx(0)|")
    for ax in (a1, a2):
        for p in neuron.fixed_points():
            if not p.stable:
                ax.axvline(p.x, color="r", ls=":", lw=1)
        ax.set_xlabel("x(0)")
    a1.set_title(f"Doya's neuron, w = {w:g}, b = {b:g}")
    a2.set_title("sensitivity (explodes at the basin boundary)")
    return _finish(fig, path)


def plot_rnn_jacobian_norms(net: SigmoidRNN, u, *, ax=None, path=None):
    """‖∂x_T/∂x_{T−s}‖₂ against lag s (log y) for each sequence of ``u`` (time-major ``(T, B, n_in)``).

    >>> net = SigmoidRNN(2, 10, 1, init="basic_tanh", generator=torch.Generator().manual_seed(0))
    >>> fig = plot_rnn_jacobian_norms(net, torch.randn(20, 3, 2))
    >>> len(fig.axes[0].get_lines())
    3
    """
    plt = _pyplot()
    with torch.no_grad():
        _, x = net(u)
    norms = net.jacobian_norms(x).cpu().numpy()  # (T, B)
    if ax is None:
        fig, ax = plt.subplots(figsize=(5, 3.5))
    else:
        fig = ax.figure
    lags = np.arange(norms.shape[0])
    for col in norms.T:
        ax.semilogy(lags, np.where(col > 0, col, np.nan), alpha=0.7)
    ax.set_xlabel("lag s = T − k")
    ax.set_ylabel("‖∂x_T/∂x_k‖₂")
    ax.set_title(f"SigmoidRNN, init = {net.init!r}")
    return _finish(fig, path)
