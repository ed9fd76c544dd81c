"""Singular values of input–output Jacobians, matrix-free, and how far they are from an isometry.

For a network ``y = f(x)`` the input–output Jacobian ``J = ∂y/∂x`` (one per example) maps an input
perturbation to the output; back-propagated gradients are ``Jᵀ ∂L/∂y``. Its singular values tell the
whole story of vanishing/exploding gradients through the network: all ≈ 1 is *dynamical isometry*
(Saxe et al. 2014; Pennington, Schoenholz & Ganguli 2017: orthogonal weights + tanh at criticality),
while a spread over orders of magnitude means some directions vanish and others explode.

**Per-example convention.** ``x`` is a batch ``(B, *in)`` and the function must treat examples
independently (put BatchNorm in eval mode). We report the spectrum of each example's Jacobian
``J_b (n_out × n_in)``: the batch Jacobian is block-diagonal, and its spectrum is just the union, so
nothing is lost; the ``B`` Lanczos recurrences share every forward/backward pass.

Methods (``method=``): **"krylov"** (the default for the top of the spectrum) is randomized block
Krylov on ``JᵀJ`` (:func:`gradprobe.functional.lanczos.block_krylov_svd`; Musco & Musco 2015) with
``J`` and ``Jᵀ`` applied to a whole block of vectors per pass: every weight matrix is read once per
block, and a handful of block steps reach 1e-5 relative accuracy where single-vector Lanczos needs
tens of one-vector passes. The passes are plain matmul chains when the model is a chain of
``nn.Linear`` and elementwise layers (:func:`chain_operators`: one forward pass records each layer's
``diag(φ′)``, then ``J V`` and ``Jᵀ U`` are ``(V Wᵀ) ⊙ φ′`` layer by layer, no autograd), and
otherwise go through one retained autograd graph
(:func:`gradprobe.functional.products.jacobian_block_operators`). **"lanczos"** (the default for
``which="bottom"``) is Lanczos with full reorthogonalization (:func:`gradprobe.functional.lanczos.lanczos`,
or :func:`~gradprobe.functional.lanczos.block_lanczos` with ``block > 1``) on ``JᵀJ``, whose eigenvalues are
``σ_i²``, with products ``JᵀJ v`` by a double-vjp and a vjp through one retained graph
(:func:`gradprobe.functional.products.gram_operator`). The mean squared singular value
``tr(JᵀJ)/n_in`` (the quantity mean-field theory predicts, ``χ₁^L`` for a deep net) is estimated by
Hutchinson's estimator ``E‖J z‖²`` with Rademacher ``z``.

**Cost model** (CPU, one thread; numbers for DeepMLP width 2048, depth 20, k = 8 from
``benchmarks/bench_spectra.py``). A *pass* applies ``J`` or ``Jᵀ`` to a block of ``b`` vectors: one
``(b × 2048) · (2048 × 2048)`` matmul per linear layer (22 of them); through the matmul chain a pass
costs what those matmuls cost (through autograd 3–11 % more: ReLU's ``threshold_backward``, the
batched backward, and a backward at setup to build the double-backward graph). MKL runs such skinny
products at 25–85 GFLOP/s (b = 8–64) against ~155 GFLOP/s for the square
``2048 × 2048 · 2048 × 2048`` products of dense ``jacrev``, so a pass costs ~60–110 ms almost
regardless of ``b``. Block Krylov needs two passes per step and here 5 steps (σ₈/σ₉ = 1.011) to
*certify* 1e-5: its stopping rule's bound (the Schur-complement bound of
:func:`~gradprobe.functional.lanczos.block_krylov_svd`) is sharp enough to stop at the step where an
oracle that knows the answer would, and the values it returns (left Ritz values) are typically
more accurate than that. The oracle needs one pass fewer (the last ``Jᵀ`` pass only serves the
certificate): with the setup (one forward) and the orthogonalisation and Ritz extraction (~4 % of
the run) that is the gap to the ceiling measured by ``bench_spectra.py --oracle`` (86 % of it
reached; the extra pass alone caps a certified run at ~90 %). Dense ``jacrev`` + ``svdvals`` needs ~6 s, so one example is ~7× faster and the ceiling of
any block size is ~8–9× at this width (measured: ``BENCHMARKS.md``).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.modules import module as _torch_module

from gradprobe._display import html_pre
from gradprobe.errors import ConfigError
from gradprobe.functional.lanczos import (
    block_krylov_svd,
    block_lanczos,
    hutchinson_trace,
    lanczos,
    rademacher,
)
from gradprobe.functional.products import gram_operator, jacobian_block_operators

__all__ = ["METHODS", "IsometrySummary", "JacobianSpectrum", "between_layers", "chain_operators", "isometry_summary", "jacobian_spectrum"]


@dataclass(frozen=True)
class JacobianSpectrum:
    """Spectrum of the per-example Jacobians of a batch.

    ``singular_values (B, k)``: descending top-k (or ascending bottom-k when ``which="bottom"``)
    singular values of each ``J_b``; ``mean_sq (B,)``: Hutchinson estimate of ``tr(J_bᵀJ_b)/n_in``
    (mean of ``σ_i²`` over the ``n_in`` input directions, zeros included), ``mean_sq_stderr (B,)`` its
    standard error; ``residuals (B, k)``: Ritz residuals ``‖JᵀJ v − θ² v‖`` in units of ``σ²``;
    ``n_iter``: vectors applied per example (Krylov dimension); ``method``: "krylov" or "lanczos";
    ``error_bounds (B, k)``: for "krylov", the a-posteriori estimate of each ``σ_i − θ_i`` the
    stopping rule used (the "krylov" values are lower bounds, ``θ_i <= σ_i``, and ``θ_i + bound`` an
    upper one under the estimate's stated assumption, see
    :func:`~gradprobe.functional.lanczos.block_krylov_svd`; ``None`` for "lanczos").
    """

    singular_values: np.ndarray
    mean_sq: np.ndarray
    mean_sq_stderr: np.ndarray
    residuals: np.ndarray
    n_in: int
    n_out: int
    which: str
    n_iter: int
    converged: bool
    method: str = "lanczos"
    error_bounds: np.ndarray | None = None

    def as_dict(self) -> dict:
        """Plain JSON values, e.g. ``probe.note("spectrum", spectrum.as_dict())`` for the report."""
        out = {"singular_values": np.asarray(self.singular_values, dtype=np.float64).tolist(),
               "mean_sq": np.asarray(self.mean_sq, dtype=np.float64).tolist(),
               "mean_sq_stderr": np.asarray(self.mean_sq_stderr, dtype=np.float64).tolist(),
               "n_in": int(self.n_in), "n_out": int(self.n_out), "which": self.which, "n_iter": int(self.n_iter),
               "converged": bool(self.converged), "method": self.method}
        if self.error_bounds is not None:
            out["error_bounds"] = np.asarray(self.error_bounds, dtype=np.float64).tolist()
        return out

    def __str__(self) -> str:
        """A few lines: the extreme singular values, the mean σ² over the whole spectrum, the distance from isometry."""
        sv = np.atleast_2d(np.asarray(self.singular_values, dtype=np.float64))
        b, k = sv.shape
        end = "largest" if self.which == "top" else "smallest"
        lines = [f"Jacobian spectrum: the {k} {end} singular values of each of {b} example Jacobian(s) "
                 f"({self.n_out} × {self.n_in}), {self.method}, {self.n_iter} products"
                 + ("" if self.converged else ", NOT converged")]
        show = lambda row: ", ".join(f"{x:.4g}" for x in row[:6]) + (", …" if len(row) > 6 else "")  # noqa: E731
        for i in range(min(b, 4)):
            lines.append(f"  example {i}: σ = {show(sv[i])}")
        if b > 4:
            lines.append(f"  … {b - 4} more examples")
        ms, se = float(np.mean(self.mean_sq)), float(np.mean(self.mean_sq_stderr))
        lines.append(f"  mean σ² over all {self.n_in} input directions (Hutchinson): {ms:.4g} ± {se:.2g}")
        if np.all(np.isfinite(sv)) and np.all(sv >= 0):
            lines.append("  " + str(isometry_summary(sv)))
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        return html_pre(str(self))


METHODS = ("auto", "krylov", "lanczos")


class _Stop(Exception):
    """Raised by a forward hook to end the forward pass once the layer we need has produced its output."""

    def __init__(self, output: torch.Tensor):
        super().__init__("forward stopped by gradprobe.analysis.spectra")
        self.output = output


def between_layers(model: nn.Module, x: torch.Tensor, module_a: nn.Module, module_b: nn.Module) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """``(h_a, g)`` with ``h_a`` the output of ``module_a`` on input ``x`` and ``g: h_a ↦ h_b`` the map to ``module_b``'s output.

    ``g`` replaces ``module_a``'s output by its argument (a forward hook returning a new output)
    and stops the forward pass when ``module_b`` has run. Everything not computed from ``h_a`` (the
    input ``x``, skip connections from before ``module_a``) is held at its value for ``x``: the result
    is the partial Jacobian ``∂h_b/∂h_a``. The hooks live only during each call of ``g``. Each module
    must run once per forward pass and output a single tensor (a module reused at several places is
    ambiguous: pick the instance you mean).

    >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    >>> h, g = between_layers(net, torch.zeros(1, 3), net[0], net[1])
    >>> torch.equal(g(h), torch.tanh(h))
    True
    """
    if module_a is module_b:
        raise ConfigError("between=(a, b) needs two different modules; the Jacobian of a layer to itself is the identity")
    names = {id(m) for m in model.modules()}
    for label, mod in (("first", module_a), ("second", module_b)):
        if id(mod) not in names:
            raise ConfigError(f"the {label} module of between=(...) ({type(mod).__name__}) is not part of the model")

    def capture(_m, _inp, out):
        raise _Stop(out)

    handle = module_a.register_forward_hook(capture)
    try:
        with torch.no_grad():
            model(x)
    except _Stop as stop:
        h_a = stop.output
    else:
        raise ConfigError(f"the first module of between=(...) ({type(module_a).__name__}) did not run in the model's forward pass")
    finally:
        handle.remove()
    if not isinstance(h_a, torch.Tensor):
        raise ConfigError(f"between=(...) needs modules that output one tensor; {type(module_a).__name__} returned {type(h_a).__name__}")

    def g(h: torch.Tensor) -> torch.Tensor:
        ran_a = []

        def replace(_m, _inp, _out):
            ran_a.append(True)
            return h

        def stop(_m, _inp, out):
            if ran_a:  # module_b after module_a: done
                raise _Stop(out)

        # A batch of h larger than x's (block Lanczos replicates each example) runs x replicated alike.
        reps = h.shape[0] // x.shape[0]
        xin = x if reps == 1 else x.repeat_interleave(reps, 0)
        ha = module_a.register_forward_hook(replace)
        hb = module_b.register_forward_hook(stop)
        try:
            model(xin)
        except _Stop as s:
            return s.output
        finally:
            ha.remove()
            hb.remove()
        raise ConfigError(
            f"the second module of between=(...) ({type(module_b).__name__}) did not run after the first "
            f"({type(module_a).__name__}); pass them in forward order"
        )

    return h_a.detach(), g


# Elementwise modules (exact types: a subclass may override forward): their Jacobian on a (B, n)
# input is diagonal, so autograd with an all-ones cotangent gives its diagonal φ'(z) exactly.
_DIAGONAL_MODULES = frozenset({
    nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.Tanh, nn.Sigmoid, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Softplus, nn.Mish, nn.Hardtanh, nn.ReLU6, nn.Hardsigmoid, nn.Hardswish, nn.Softsign, nn.LogSigmoid,
    nn.Tanhshrink,
})
# Modules that return their input unchanged (dropout only in eval mode).
_IDENTITY_MODULES = frozenset({nn.Identity})
_DROPOUT_MODULES = frozenset({nn.Dropout, nn.AlphaDropout})


def _has_hooks(m: nn.Module) -> bool:
    return any(getattr(m, name, None) for name in (
        "_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
        "_backward_hooks", "_backward_pre_hooks"))


def chain_operators(
    model: nn.Module, x: torch.Tensor
) -> tuple[torch.Tensor, int, Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]] | None:
    """The operators of :func:`~gradprobe.functional.products.jacobian_block_operators` for a chain of linear and elementwise layers, as plain matmuls; ``None`` when ``model`` is not such a chain.

    A network whose forward pass is ``y = W_L φ(… φ(W_1 x + b_1) …) + b_L`` (any order of
    ``nn.Linear``, elementwise activations, ``nn.Identity`` and eval-mode dropout, each consuming
    exactly the previous one's output: ``nn.Sequential``, ``DeepMLP`` without residual or
    normalisation, ...) has per-example Jacobian ``J_b = W_L D_{L-1,b} W_{L-1} ⋯ D_{1,b} W_1`` with
    ``D_{l,b} = diag(φ′(z_{l,b}))``. One forward pass (no autograd graph) records the chain and each
    ``D_{l,b}``; then ``forward(V (B, b, n_in)) = [V J_bᵀ]_b`` is ``V ← (V W_lᵀ) ⊙ d_l`` layer by layer
    and ``adjoint(U (B, b, n_out)) = [U J_b]_b`` is ``U ← (U ⊙ d_l) W_l`` in reverse: one
    ``(B·b) × n`` matmul per linear layer and nothing else, in ``x``'s dtype, float64 in and out (the
    same contract as the autograd operators, whose products it equals to rounding: tested).

    It is used only when the chain is proven from the recorded forward pass: every module that runs
    is a leaf of an allowed exact type (no subclass, no parametrization, no hooks of the user's),
    ``x`` (2-D, a plain tensor) is the first one's input, each one's input is the previous one's
    output object, unmodified in place since (tensor versions), and the model returns the last one's
    output. Anything else (a residual sum, a normalisation, a reshape, a functional call in
    ``forward``) breaks that and returns ``None``: the caller falls back to autograd.

    >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> chain_operators(net, torch.randn(2, 3)) is not None
    True
    >>> chain_operators(lambda z: 2 * z, torch.randn(2, 3)) is None
    True
    """
    if not isinstance(model, nn.Module) or type(x) is not torch.Tensor or x.dim() != 2:
        return None
    if any(_has_hooks(m) for m in model.modules()):
        return None
    if any(getattr(_torch_module, name, None) for name in (
            "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks", "_global_backward_pre_hooks",
            "_global_forward_hooks_always_called")):
        return None
    allowed = _DIAGONAL_MODULES | _IDENTITY_MODULES | _DROPOUT_MODULES | {nn.Linear}
    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    for m in leaves:
        t = type(m)
        if t not in allowed or (t in _DROPOUT_MODULES and m.training):
            return None
        if t is nn.Linear and (m.weight.dtype != x.dtype or type(m.weight.data) is not torch.Tensor):
            return None
    calls: list = []  # (module, input tensor, its version, a copy of it for elementwise modules)
    outs: list = []  # (output tensor, its version)
    broken = []

    def pre(m, inp):
        if len(inp) != 1 or not isinstance(inp[0], torch.Tensor):
            broken.append(m)
            return
        z = inp[0]
        calls.append((m, z, z._version, z.clone() if type(m) in _DIAGONAL_MODULES else None))

    def post(m, _inp, out):
        if not isinstance(out, torch.Tensor):
            broken.append(m)
            return
        outs.append((out, out._version))

    handles = []
    try:
        for m in leaves:
            handles.append(m.register_forward_pre_hook(pre))
            handles.append(m.register_forward_hook(post))
        with torch.no_grad():
            y = model(x)
    finally:
        for h in handles:
            h.remove()
    if broken or not calls or len(calls) != len(outs) or not isinstance(y, torch.Tensor):
        return None
    prev, prev_version = x, x._version
    for (m, z, version, _), (out, out_version) in zip(calls, outs):
        if z is not prev or version != prev_version:
            return None
        prev, prev_version = out, out_version
    if y is not prev or y._version != prev_version or y.dim() != 2 or y.dtype != x.dtype:
        return None
    # φ'(z) of every elementwise call at once: one backward with all-ones cotangents.
    acts = [(m, z.detach().requires_grad_(True)) for m, _, _, z in calls if z is not None]
    derivs = []
    if acts:
        with torch.enable_grad():
            outs_ = [m(z0 * 1) for m, z0 in acts]  # `z0 * 1`: not a leaf, so in-place activations may write into it
            derivs = list(torch.autograd.grad(outs_, [z0 for _, z0 in acts], [torch.ones_like(o) for o in outs_]))
    # The chain, with consecutive elementwise factors merged: ("W", weight) or ("D", d (B, 1, n)).
    ops: list = []
    for m, _, _, z in calls:
        if type(m) is nn.Linear:
            ops.append(("W", m.weight.detach()))
        elif z is not None:
            d = derivs.pop(0).detach()[:, None, :]  # (B, 1, n)
            if ops and ops[-1][0] == "D":
                ops[-1] = ("D", ops[-1][1] * d)
            else:
                ops.append(("D", d))
    B, n_in, n_out = x.shape[0], x.shape[1], y.shape[1]

    def check(W: torch.Tensor, size: int) -> None:
        if W.dim() != 3 or W.shape[0] != B or W.shape[2] != size:
            raise ConfigError(f"expected a block of shape ({B}, b, {size}); got {tuple(W.shape)}")

    def forward(V: torch.Tensor) -> torch.Tensor:
        check(V, n_in)
        X = V.to(x.dtype)
        for kind, A in ops:
            X = X @ A.T if kind == "W" else X * A
        return X.to(torch.float64)

    def adjoint(U: torch.Tensor) -> torch.Tensor:
        check(U, n_out)
        X = U.to(x.dtype)
        for kind, A in reversed(ops):
            X = X @ A if kind == "W" else X * A
        return X.to(torch.float64)

    return y.detach(), n_out, forward, adjoint


def _block_operators(fn, x):
    """``chain_operators(fn, x)`` where it applies, else autograd's :func:`jacobian_block_operators`."""
    ops = chain_operators(fn, x)
    return ops if ops is not None else jacobian_block_operators(fn, x)


def jacobian_spectrum(
    model_or_fn: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    k: int = 8,
    between: tuple[nn.Module, nn.Module] | None = None,
    *,
    which: str = "top",
    method: str = "auto",
    block: int | None = None,
    n_probes: int = 16,
    tol: float | None = None,
    max_iter: int | None = None,
    generator: torch.Generator | None = None,
) -> JacobianSpectrum:
    """Top-k (or bottom-k) singular values of each example's input–output Jacobian, matrix-free.

    Args:
        model_or_fn: a module or callable ``(B, *in) -> (B, *out)`` that treats examples independently.
        x: the batch ``(B, *in)``; use ``B = 1`` for one example. The Jacobian is taken in ``x``'s dtype
            (use float64 for oracle-grade accuracy).
        k: how many singular values per example (``1 <= k <= min(n_in, n_out)``).
        between: ``(module_a, module_b)`` of a model: the Jacobian ``∂h_b/∂h_a`` between their outputs
            instead (see :func:`between_layers`).
        which: "top" (descending) or "bottom" (ascending; slower to converge).
        method: "krylov" (block Krylov on J and Jᵀ; top only), "lanczos" (Lanczos on JᵀJ), or "auto"
            (the default: "krylov" for ``which="top"``, "lanczos" for "bottom"). "krylov" needs far
            fewer passes through the network (10–12 instead of ~80 one-vector products for plain Lanczos
            on DeepMLP width 2048, depth 20, k = 8), each costing little more than a one-vector pass on CPU; see
            ``benchmarks/bench_spectra.py`` for measured times.
        block: vectors per pass. "krylov": default ``max(2k, 16)`` (capped at ``n_in``); larger blocks
            need fewer steps but cost more per pass. "lanczos": default 1 (plain Lanczos, least
            memory); ``block > 1`` runs :func:`~gradprobe.functional.lanczos.block_lanczos` with each
            example replicated ``block`` times, and Hutchinson probes are drawn ``block`` at a time.
        n_probes: Rademacher probes for the mean squared singular value (0: skip it; ``mean_sq`` is NaN).
        tol: stopping tolerance. "krylov": on the estimated relative error of each singular value
            (:func:`~gradprobe.functional.lanczos.block_krylov_svd`), default 1e-10 for float64 and
            1e-5 otherwise. Why 1e-5 for float32: the products themselves are only accurate to ~1e-6
            relative through a deep network (measured: 7e-7 against a float64 SVD of the same weights
            at width 2048, depth 20), so a tighter certificate buys few real digits; the values
            returned are typically several times more accurate than the certified bound; and what a
            gradient diagnosis reads from them (a condition number, the distance from isometry, the
            growth rate with depth) needs two or three digits. ``tol=1e-6`` costs one more block step
            (two passes, ~20 % there). "lanczos": on Ritz residuals relative to ``σ_max²``, default 1e-10 for
            float64 and 1e-5 otherwise (products computed in float32 carry rounding noise near
            1e-6·σ_max², below which block Lanczos's explicit residuals cannot go); singular values
            are far more accurate than the residual: the error of an isolated ``σ²`` is ~residual²/gap.
        max_iter: cap on vectors applied per example (see the solvers for the defaults).
        generator: random source for start vectors and probes (default seeded with 0).

    Accuracy: both methods work on ``σ²``, so singular values are relative-accurate down to about
    ``√eps · σ_max`` (1e-8·σ_max in float64); smaller ones (a rank-deficient ``J``) are only
    absolutely accurate to that level.

    >>> net = nn.Linear(4, 4, bias=False)
    >>> with torch.no_grad(): _ = net.weight.copy_(2 * torch.eye(4))
    >>> s = jacobian_spectrum(net, torch.ones(1, 4), k=2)
    >>> s.singular_values.round(6).tolist(), s.mean_sq.round(6).tolist()
    ([[2.0, 2.0]], [4.0])
    """
    if which not in ("top", "bottom"):
        raise ConfigError(f"which must be 'top' or 'bottom' for Jacobian spectra; got {which!r}")
    if n_probes == 1 or n_probes < 0:
        raise ConfigError(f"n_probes must be 0 (no trace estimate) or >= 2 (for a standard error); got {n_probes}")
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise ConfigError(
            f"x must be a batch of shape (B, *in) (use x.unsqueeze(0) for one example); got "
            f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}"
        )
    if isinstance(model_or_fn, nn.Module):
        coupled = [type(m).__name__ for m in model_or_fn.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
        if coupled:
            raise ConfigError(
                f"the model has {coupled[0]} in training mode, which mixes the examples of a batch, so a "
                "per-example Jacobian is not defined; call model.eval() first"
            )
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    if between is not None:
        if not isinstance(model_or_fn, nn.Module):
            raise ConfigError("between=(module_a, module_b) needs the model as an nn.Module, not a plain function")
        if len(between) != 2:
            raise ConfigError(f"between must be a pair (module_a, module_b); got {len(between)} items")
        x, fn = between_layers(model_or_fn, x, between[0], between[1])
    else:
        fn = model_or_fn
    if method not in METHODS:
        raise ConfigError(f"method must be one of {METHODS}; got {method!r}")
    if method == "auto":
        method = "krylov" if which == "top" else "lanczos"
    if method == "krylov" and which != "top":
        raise ConfigError("method='krylov' finds the top of the spectrum only; use method='lanczos' for which='bottom'")
    if block is not None and block < 1:
        raise ConfigError(f"block must be >= 1; got {block}")
    B = x.shape[0]
    n_in = x[0].numel()
    if method == "krylov":
        return _krylov_spectrum(fn, x, k, block, n_probes, tol, max_iter, generator)
    block = 1 if block is None else block
    if tol is None:
        tol = 1e-10 if x.dtype == torch.float64 else 1e-5
    block = min(block, n_in)
    xr = x if block == 1 else x.repeat_interleave(block, 0)  # (B·block, *in): row b·block + i is example b
    _, n_out, gram, forward = gram_operator(fn, xr)
    if not 1 <= k <= min(n_in, n_out):
        raise ConfigError(f"k={k} singular values asked of a {n_out}×{n_in} Jacobian; need 1 <= k <= {min(n_in, n_out)}")
    if block == 1:
        r = lanczos(gram, n_in, k=k, which=which, batch=B, tol=tol, max_iter=max_iter, generator=generator, device=x.device)
    else:
        r = block_lanczos(
            lambda V: gram(V.reshape(B * block, n_in)).reshape(B, block, n_in),
            n_in, k=k, which=which, block=block, batch=B, tol=tol, max_iter=max_iter, generator=generator, device=x.device,
        )
    eig = r.top if which == "top" else r.bottom
    res = r.top_residuals if which == "top" else r.bottom_residuals
    # σ² ≥ 0; tiny negative Ritz values of a rank-deficient JᵀJ are rounding, so clip before √.
    sv = np.sqrt(np.clip(eig, 0.0, None))
    if n_probes == 0:  # top-k only: skip the trace estimate
        nan = np.full(B, np.nan)
        return JacobianSpectrum(sv, nan, nan, res, n_in, n_out, which, r.n_iter, r.converged)
    rounds = max(2, -(-n_probes // block))
    tr = hutchinson_trace(
        lambda Z: forward(Z).pow(2).sum(1), n_in, n_probes=rounds, batch=B * block, generator=generator, device=x.device
    )
    # Pool each example's `block` independent estimates (each a mean over `rounds` probes).
    mean = tr.value.reshape(B, block).mean(1)
    stderr = np.sqrt((tr.stderr.reshape(B, block) ** 2).sum(1)) / block
    return JacobianSpectrum(sv, mean / n_in, stderr / n_in, res, n_in, n_out, which, r.n_iter, r.converged)


def _krylov_spectrum(fn, x, k, block, n_probes, tol, max_iter, generator) -> JacobianSpectrum:
    """``method="krylov"`` of :func:`jacobian_spectrum` (arguments already checked there)."""
    B, n_in = x.shape[0], x[0].numel()
    _, n_out, forward, adjoint = _block_operators(fn, x)
    if not 1 <= k <= min(n_in, n_out):
        raise ConfigError(f"k={k} singular values asked of a {n_out}×{n_in} Jacobian; need 1 <= k <= {min(n_in, n_out)}")
    if tol is None:
        tol = 1e-10 if x.dtype == torch.float64 else 1e-5  # float32: see `tol` in jacobian_spectrum
    block = min(n_in, max(2 * k, 16) if block is None else block)
    r = block_krylov_svd(
        forward, adjoint, n_in, k=k, block=block, batch=B, tol=tol, max_iter=max_iter,
        eps=float(torch.finfo(x.dtype).eps), generator=generator, device=x.device,
    )
    if n_probes == 0:
        nan = np.full(B, np.nan)
        mean, stderr = nan, nan
    else:
        # All probes in one batched pass: ‖J z‖² is zᵀ(JᵀJ)z, Hutchinson's estimator of tr(JᵀJ).
        Z = rademacher((B, n_probes, n_in), generator, x.device)
        vals = forward(Z).pow(2).sum(2).cpu()  # (B, P)
        mean = (vals.mean(1) / n_in).numpy()
        stderr = (vals.std(1, unbiased=True) / np.sqrt(n_probes) / n_in).numpy()
    return JacobianSpectrum(
        r.values, mean, stderr, r.residuals, n_in, n_out, "top", r.n_iter, r.converged, "krylov", r.error_bounds
    )


@dataclass(frozen=True)
class IsometrySummary:
    """How far singular values are from 1 (dynamical isometry).

    ``mean``, ``std`` of σ; ``mean_log``/``std_log`` of ``ln σ`` (distance from isometry on the scale
    on which products of layers act: 0 and 0 at isometry); ``max``, ``min``, ``condition = max/min``;
    ``frac_within_band``: fraction of σ with ``|σ − 1| <= band``; ``mean_sq``: mean σ² (1 at isometry).
    """

    mean: float
    std: float
    mean_log: float
    std_log: float
    max: float
    min: float
    condition: float
    frac_within_band: float
    band: float
    mean_sq: float
    n: int

    @property
    def is_isometric(self) -> bool:
        """Every singular value within the band around 1."""
        return self.frac_within_band == 1.0

    def __str__(self) -> str:
        return (f"isometry: σ in [{self.min:.4g}, {self.max:.4g}] (condition {self.condition:.4g}), mean ln σ "
                f"{self.mean_log:.3g} ± {self.std_log:.3g}, {100 * self.frac_within_band:.0f} % of {self.n} within "
                f"±{self.band:g} of 1 (dynamical isometry: all of them)")


def isometry_summary(spectrum: JacobianSpectrum | np.ndarray | torch.Tensor, band: float = 0.1) -> IsometrySummary:
    """Summarise singular values' distance from 1, pooled over examples.

    Accepts a :class:`JacobianSpectrum` (only its computed top/bottom-k values are summarised; its
    ``mean_sq`` field reports the Hutchinson estimate over the whole spectrum) or any array of
    singular values (e.g. a full dense spectrum).

    >>> s = isometry_summary(np.array([0.5, 1.0, 1.05, 2.0]), band=0.1)
    >>> s.frac_within_band, s.condition, round(s.mean_log, 6)
    (0.5, 4.0, 0.012198)
    """
    if band < 0:
        raise ConfigError(f"band must be >= 0; got {band}")
    if isinstance(spectrum, JacobianSpectrum):
        sv = np.asarray(spectrum.singular_values, dtype=np.float64).ravel()
        mean_sq = float(np.mean(spectrum.mean_sq))
    else:
        t = spectrum.detach().cpu().numpy() if isinstance(spectrum, torch.Tensor) else np.asarray(spectrum)
        sv = np.asarray(t, dtype=np.float64).ravel()
        mean_sq = float(np.mean(sv**2)) if sv.size else float("nan")
    if sv.size == 0:
        raise ConfigError("no singular values to summarise")
    if np.any(sv < 0) or not np.all(np.isfinite(sv)):
        raise ConfigError("singular values must be finite and non-negative")
    with np.errstate(divide="ignore"):
        logs = np.log(sv)
    smin, smax = float(sv.min()), float(sv.max())
    return IsometrySummary(
        mean=float(sv.mean()),
        std=float(sv.std()),
        mean_log=float(logs.mean()),
        std_log=float(logs.std()) if np.all(np.isfinite(logs)) else float("inf"),
        max=smax,
        min=smin,
        condition=smax / smin if smin > 0 else float("inf"),
        frac_within_band=float(np.mean(np.abs(sv - 1.0) <= band)),
        band=float(band),
        mean_sq=mean_sq,
        n=int(sv.size),
    )
