"""Fast trainers for Pascanu's 50-unit RNN: one run (``K = 1``) or ``K`` seeds as one batched computation.

The model is the one of Pascanu, Mikolov & Bengio 2013 and their ``RNN.py``:

    h_t = φ(W_in u_t + W_rec h_{t−1} + b),   h_0 = 0,   φ ∈ {tanh, sigmoid}
    out = W_out h_T + b_out ("last" heads)  or  W_out h_t + b_out at every t ("all" head)

Losses follow the authors' code: softmax cross-entropy averaged over the batch (over batch and time
for the "all" head), squared error summed over outputs and averaged over the batch (regression).

Why it is fast. Back-propagation through time is written out instead of recorded by autograd:

* forward: the input projection ``U·W_inᵀ + b`` for all steps at once, then one ``addmm`` (``baddbmm``
  for ``K > 1``) and one ``tanh`` per step, written into a preallocated state buffer;
* backward: ``a_t = δ_t ⊙ φ′(h_t)`` and ``δ_{t−1} = a_t W_rec (+ direct term)``, one multiply and one
  ``mm`` per step; the weight gradients are three large products after the loop
  (``∂E/∂W_rec = Σ_t a_tᵀ h_{t−1}`` over all steps at once, ``∂E/∂W_in = Σ_t a_tᵀ u_t``);
* the total ∂E/∂h_t (the probe's temporal profile, whose horizon we record) and Ω's inputs fall
  out of the same loop for free.

Ω (Pascanu et al. 2013, eq. 9/10, in the authors' code form: squared norms, mean over the valid
(step, sequence) pairs, steps with ‖δ_t‖² < 1e-20 skipped) and its *immediate* gradient, with
``a_t`` and ``δ_t`` held constant: with ``v = a W_rec``, ``ρ = ‖v‖²/‖δ‖²``,

    Ω = (1/n) Σ_valid (ρ − 1)²,   ∂Ω/∂W_rec = (1/n) Σ_valid 4(ρ − 1)/‖δ‖² · aᵀ v

(one large product: without a direct per-step loss term, v_t for t ≥ 2 is the backward loop's
δ_{t−1}, so only v_1 and the gradient's aᵀ(coef·v) are extra). It equals :func:`gradprobe.remedies.pascanu_omega` with
:func:`gradprobe.remedies.rnn_vjp` and autograd (tested in float64).

Clipping follows the code, not ``torch.nn.utils.clip_grad_norm_``: the norm over **all** parameters
(after adding α·∂Ω/∂W_rec); if ‖g‖ > c, g ← c·g/‖g‖ (no epsilon); and if ‖g‖ is NaN, Inf or > 1e10
the step falls back to ``∂W_rec = 0.02·W_rec`` and zero for the rest (the authors' float32 guard,
applied only when clipping is on, as in their code).

``K`` seeds: every tensor carries a leading model dimension ``K``; each model has its own weights and
its own data, and the result for each equals the same run trained alone (float64, tested). Two paths:

* **in memory** (``K = 1``, and ``K > 1`` whose states fit in ``stream_bytes``, 2 MiB by default, or
  with Ω): as above, ``bmm`` over the model dimension, states stored model-major so the three large
  products read views;
* **streaming** (``K > 1``, no Ω, states beyond ``stream_bytes``): at K = 16, L = 200 every
  ``(T, K, B, H)`` array is 12.8 MB, more than this CPU's per-core cache, and the large products
  reading such arrays back ran at ≈ 60 % of the per-step products' speed. Everything is time-major
  instead, each step's ``(K, B, H)`` block contiguous; the forward step is three calls on that block
  (input projection, recurrent ``baddbmm_``, activation in place), and the backward step computes
  φ′ itself and *accumulates* the weight gradients while h_{t−1}, u_t and a_t are in cache
  (``∂E/∂W_rec += h_{t−1}ᵀ a_t`` and ``[∂E/∂W_in; ∂E/∂b] += [u_t 1]ᵀ a_t``, two ``baddbmm_``); δ_t
  is kept only for ``keep_state_grads``. Its sums run in another order, so its float32 results
  differ from the in-memory path's at the rounding level (float64: equal to 1e-13, tested).

**NumPy loop** (``loop_backend="numpy"``, CPU only). The same paths and layouts, with every per-time-step
kernel run by NumPy on array views of the same torch storage (``t.numpy()``, ``out=`` everywhere, nothing
allocated in the loop), because on this CPU NumPy's OpenBLAS and SIMD ufuncs are much cheaper for these
small operands than torch's CPU kernels and their dispatch (one thread, float32; BENCHMARKS.md):

============================================  ===================  =====================
per step                                      torch                NumPy
============================================  ===================  =====================
K = 16: (16, 20, 50)·(16, 50, 50) product     31 µs (``baddbmm``)  18 µs (``np.matmul``)
K = 16: tanh over 16,000 values               45–55 µs             7 µs
K = 1: (20, 50)·(50, 50) product + add        4.5 µs (``addmm``)   2.8 + 0.7 µs
K = 1: tanh over 1,000 values                 4.8 µs               1.0 µs
============================================  ===================  =====================

What runs where: NumPy for the forward's per-step product ``h_{t−1} W_recᵀ`` (streaming: also the
step's ``[u_t 1]·[W_inᵀ; b]``), the add and φ (``np.tanh``; σ(z) = 1/(1 + e^{−z}) as four in-place
ufuncs), the in-memory backward's ``a_t = δ_t ⊙ φ′(h_t)`` and ``δ_{t−1} = a_t W_rec (+ direct)``, and the
whole streaming backward step (φ′, a_t, δ_{t−1} and the accumulated weight gradients, each accumulation a
product into a buffer and an add, as NumPy has no accumulating matmul). Torch, outside the step loop:
the input projection for all steps (in-memory path), the in-memory path's three weight-gradient
products and φ′ over all steps, the head, the loss, Ω (its sums and its one extra product; it has no
step loop) and the update. The results are **not bit for bit** the torch loop's: OpenBLAS sums the
products in another order and NumPy's tanh is within 1.4 ulp (torch's within 0.51), so float32 runs
differ at the rounding level; in float64 the two loops agree to 1e-12 and each equals autograd (tested).
Floating-point warnings are silenced inside the loop (torch never warns; overflow to ∞/NaN is seen by the
step's norm and the authors' guard).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from gradprobe.errors import ConfigError
from gradprobe.models.rnn import pascanu_weights
from gradprobe.trace import TemporalFlow

__all__ = ["RNNParams", "StepStats", "RNNTrainer", "init_params", "HEADS", "TANH_BACKENDS", "LOOP_BACKENDS", "head_for"]

BOUND = 1e-20  # the authors' state['bound']
FALLBACK_NORM = 1e10  # the authors' guard: norms above this (or NaN/Inf) are not trusted
#: K > 1 models whose states exceed this many bytes take the streaming path (see RNNTrainer, ``stream_bytes``)
STREAM_BYTES = 2 * 2**20
HEADS = ("softmax_last", "linear_last", "softmax_all")
TANH_BACKENDS = ("torch", "numpy")
LOOP_BACKENDS = ("torch", "numpy")


def head_for(task) -> str:
    """The output head a :class:`gradprobe.experiments.tasks.Task` needs."""
    if task.kind == "regression":
        if task.output != "last":
            raise ConfigError(f"task {task.name!r}: per-step regression is not supported by the fast trainer")
        return "linear_last"
    return "softmax_all" if task.output == "all" else "softmax_last"


@dataclass
class RNNParams:
    """Weights of ``K`` models, stored in the layout the products need (``h @ R`` is ``W_rec h``).

    ``U (K, I, H) = W_inᵀ``, ``R (K, H, H) = W_recᵀ``, ``b (K, H)``, ``V (K, H, O) = W_outᵀ``, ``c (K, O)``.
    """

    U: torch.Tensor
    R: torch.Tensor
    b: torch.Tensor
    V: torch.Tensor
    c: torch.Tensor

    @property
    def K(self) -> int:
        return self.R.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"U": self.U, "R": self.R, "b": self.b, "V": self.V, "c": self.c}

    def clone(self) -> RNNParams:
        return RNNParams(**{k: v.clone() for k, v in self.tensors().items()})

    def select(self, k: int) -> RNNParams:
        """Model ``k`` alone, as a ``K = 1`` set (a copy)."""
        return RNNParams(**{n: v[k : k + 1].clone() for n, v in self.tensors().items()})

    @staticmethod
    def stack(parts: list[RNNParams]) -> RNNParams:
        return RNNParams(**{n: torch.cat([getattr(p, n) for p in parts]) for n in ("U", "R", "b", "V", "c")})

    def torch_layout(self, k: int = 0) -> dict[str, torch.Tensor]:
        """Model ``k`` in ``nn.Linear`` layout: ``W_in (H, I)``, ``W_rec (H, H)``, ``b``, ``W_out (O, H)``, ``b_out``."""
        return {"W_in": self.U[k].T, "W_rec": self.R[k].T, "b": self.b[k], "W_out": self.V[k].T, "b_out": self.c[k]}


def init_params(n_in: int, n_hidden: int, n_out: int, init: str, generators: list[torch.Generator], *,
                dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> RNNParams:
    """Pascanu et al.'s initial weights (:func:`gradprobe.models.pascanu_weights`), one model per generator."""
    parts = []
    for g in generators:
        w = pascanu_weights(n_in, n_hidden, n_out, init, generator=g, dtype=torch.float64)
        parts.append(RNNParams(U=w["W_in"].T[None], R=w["W_rec"].T[None], b=w["b"][None], V=w["W_out"].T[None],
                               c=w["b_out"][None]))
    p = RNNParams.stack(parts)
    return RNNParams(**{n: v.to(dtype=dtype, device=device).contiguous() for n, v in p.tensors().items()})


@dataclass
class StepStats:
    """One update of ``K`` models; every field is a ``(K,)`` tensor on the models' device.

    ``loss``: training loss before the update; ``norm``: ‖g‖ over all parameters (Ω's gradient
    included) before clipping; ``omega``: Ω (0 without it); ``valid``: fraction of (step, sequence)
    pairs that Ω counted; ``fallback``: the NaN/Inf/>1e10 guard replaced the gradient.
    """

    loss: torch.Tensor
    norm: torch.Tensor
    omega: torch.Tensor
    valid: torch.Tensor
    fallback: torch.Tensor


class RNNTrainer:
    """Plain SGD on ``K`` independent RNNs (``K = 1``: the single-run fast path with 2-D products).

    Args:
        params: :class:`RNNParams` (updated in place by :meth:`step`).
        activation: ``"tanh"`` or ``"sigmoid"`` (Pascanu's "sigmoid" init uses sigmoid units).
        head: one of ``HEADS`` (see :func:`head_for`).
        lr: learning rate (the paper: 0.01). clip: norm-clipping threshold c or ``None`` (SGD).
        alpha: Ω weight α (0: no regulariser; the paper's SGD-CR uses clipping and α > 0).
        fallback: the authors' NaN/Inf/>1e10 guard; default: on exactly when clipping is on.
        keep_state_grads: keep the last step's ∂E/∂h_t for :meth:`temporal_flows`.
        fast_tanh: evaluate tanh as 2σ(2z) − 1 (exact in real arithmetic). PyTorch's CPU ``tanh`` runs
            about 5× slower than its ``sigmoid`` (measured: 41 vs 7 µs for 16,000 float32 values), which
            caps what batching ``K`` models can gain; the price is an *absolute* rounding error of about
            1e-7 in float32 (exact tanh: relative 6e-8), which matters only for very small activations.
        tanh_backend: ``"torch"`` (``torch.tanh``) or ``"numpy"`` (NumPy's SIMD ``np.tanh`` writing into
            the same memory; CPU tensors only). Both are exact tanh to rounding — measured over 2.1M
            float32 values against float64: at most 0.51 ulp (torch) and 1.36 ulp (NumPy 2.4), against
            2·10⁷ ulp for ``fast_tanh`` near 0 — and NumPy's runs ≈ 7× faster on this CPU (6.6 vs 45 µs
            for 16,000 float32 values; BENCHMARKS.md). Rounding differs from ``"torch"`` in ≈ 30 % of
            values by one ulp, so float32 runs with the two backends are not bit-identical.
        loop_backend: ``"torch"`` (default) or ``"numpy"``: every per-time-step kernel of the forward and of
            both backward paths in NumPy on views of the same storage (module docstring: what runs where,
            the kernels' speeds, rounding). CPU tensors in float32 or float64 only (ConfigError otherwise);
            implies NumPy's tanh (leave ``tanh_backend`` unset; ``fast_tanh`` is refused). Measured on the
            benchmark CPU (BENCHMARKS.md, "experiment RNN trainers"; one thread): one K = 1 step takes
            0.69–0.79× (L = 50) and 0.60–0.64× (L = 200) the time of the torch loop's; K = 16 batched has
            2.8–3.3× the throughput of 16 sequential runs of the default (torch-loop) single-run trainer at
            both lengths, and 2.04–2.45× (L = 50) and 1.53–2.03× (L = 200) that of 16 sequential runs that
            also use the NumPy loop (at L = 200 the ratio of the two sides' matrix products alone, 1.84–2.00×).
        stream_bytes: ``K > 1`` runs without Ω whose states, (T+1)·K·B·H values, take more bytes than
            this use the streaming path (module docstring); 2 MiB by default, the crossover measured on
            the benchmark CPU (BENCHMARKS.md); ``float("inf")``: never, ``0``: always.

    Inputs of :meth:`step` are time-major, models second: ``x (T, K, B, I)``; targets ``y (K, B)`` class
    ids (``softmax_last``), ``(K, B, O)`` (``linear_last``) or ``(T, K, B)`` (``softmax_all``).
    """

    def __init__(self, params: RNNParams, *, activation: str = "tanh", head: str = "softmax_last",
                 lr: float = 0.01, clip: float | None = None, alpha: float = 0.0, fallback: bool | None = None,
                 bound: float = BOUND, keep_state_grads: bool = False, fast_tanh: bool = False,
                 tanh_backend: str | None = None, stream_bytes: float = STREAM_BYTES, loop_backend: str = "torch"):
        if activation not in ("tanh", "sigmoid"):
            raise ConfigError(f"the fast RNN trainer supports tanh or sigmoid units; got {activation!r}")
        if head not in HEADS:
            raise ConfigError(f"unknown head {head!r}; choose one of {HEADS}")
        if not (lr > 0):
            raise ConfigError(f"lr={lr} must be > 0")
        if clip is not None and not (clip > 0):
            raise ConfigError(f"clip={clip} must be a positive threshold or None")
        if not (alpha >= 0):
            raise ConfigError(f"alpha={alpha} must be >= 0")
        self.p = params
        self.activation, self.head = activation, head
        self.lr, self.clip, self.alpha, self.bound = float(lr), clip, float(alpha), float(bound)
        self.fallback = (clip is not None) if fallback is None else bool(fallback)
        self.keep_state_grads = keep_state_grads
        if loop_backend not in LOOP_BACKENDS:
            raise ConfigError(f"unknown loop_backend {loop_backend!r}; choose one of {LOOP_BACKENDS}")
        if tanh_backend is not None and tanh_backend not in TANH_BACKENDS:
            raise ConfigError(f"unknown tanh_backend {tanh_backend!r}; choose one of {TANH_BACKENDS}")
        if loop_backend == "numpy" and tanh_backend == "torch":
            raise ConfigError("loop_backend='numpy' runs every per-step kernel in NumPy, tanh included; it cannot be "
                              "combined with tanh_backend='torch' (leave tanh_backend unset)")
        tanh_backend = tanh_backend or ("numpy" if loop_backend == "numpy" else "torch")
        if fast_tanh and tanh_backend != "torch":
            what = "loop_backend='numpy'" if loop_backend == "numpy" else f"tanh_backend={tanh_backend!r}"
            raise ConfigError(f"fast_tanh=True replaces tanh by 2σ(2z) − 1; it cannot be combined with {what} "
                              "(choose one)")
        if loop_backend == "numpy":
            if params.R.device.type != "cpu":
                raise ConfigError(f"loop_backend='numpy' runs the loop in NumPy on the tensors' memory and needs CPU "
                                  f"tensors; the parameters are on {params.R.device} (use loop_backend='torch')")
            if params.R.dtype not in (torch.float32, torch.float64):
                raise ConfigError(f"loop_backend='numpy' needs float32 or float64 parameters; got {params.R.dtype}")
        self.fast_tanh = bool(fast_tanh) and activation == "tanh"
        self.tanh_backend, self.loop_backend = tanh_backend, loop_backend
        if not (stream_bytes >= 0):
            raise ConfigError(f"stream_bytes={stream_bytes} must be >= 0 (0: always stream K > 1 models)")
        self.stream_bytes = float(stream_bytes)
        self.last_state_grads: torch.Tensor | None = None  # (T, K, B, H): ∂E/∂h_t, t = 1 … T

    # ------------------------------------------------------------------ forward
    def _dphi(self, h: torch.Tensor) -> torch.Tensor:
        # φ′ from the output h = φ(a): tanh′ = 1 − h², sigmoid′ = h(1 − h). Written as a product and a
        # subtraction from an expanded 1 with ``out=`` (bitwise the same as ``1.0 - h * h``, tested): a
        # Python scalar on the left (``1.0 - t``) goes through a path ≈ 25× slower on this CPU (4 ms for
        # the 800,000 values of K = 16, L = 50 against 0.11 ms).
        one = h.new_ones(()).expand_as(h)
        if self.activation == "tanh":
            d = torch.mul(h, h)
            return torch.sub(one, d, out=d)
        d = torch.sub(one, h)
        return d.mul_(h)

    def states(self, x: torch.Tensor, p: RNNParams | None = None) -> torch.Tensor:
        """``(T+1, K, B, H)``: h_0 = 0, h_1 … h_T for ``x (T, K, B, I)`` (a time-major view of the
        model-major storage of :meth:`_states`). Always the in-memory forward, also for states beyond
        ``stream_bytes`` (without a backward pass streaming gains nothing), so :meth:`evaluate` gives
        bit for bit what it gave before the streaming path existed."""
        return self._states(x, p)[0].transpose(0, 1)

    def _streams(self, x: torch.Tensor) -> bool:
        """Whether ``x (T, K, B, I)`` takes the streaming path (:meth:`_gradients_batched`): ``K > 1``, no Ω
        (``alpha = 0``), and the states of all models, (T+1)·K·B·H values, larger than ``stream_bytes``."""
        T, K, B, _ = x.shape
        return (K > 1 and self.alpha == 0
                and (T + 1) * K * B * self.p.R.shape[-1] * x.element_size() > self.stream_bytes)

    def _states(self, x: torch.Tensor, p: RNNParams | None = None):
        """Model-major states ``hs (K, T+1, B, H)`` and the model-major inputs ``xk (K, T·B, I)``.

        Model-major storage makes every model's sequence of states one ``(T·B, H)`` block, so the
        weight-gradient products after the backward loop read it without a transposing copy. Each
        step's product goes to a small contiguous buffer (a strided ``out=`` sends ``bmm`` down a
        per-model slow path; strided *inputs* cost nothing) and the add with the input projection
        writes it into its slot; for ``K = 1`` this is the time-major layout and uses 2-D products.
        """
        return self._forward(x, p, self._states_torch, self._states_numpy)

    def _forward(self, x: torch.Tensor, p: RNNParams | None, torch_loop, numpy_loop):
        """What the two forward layouts (:meth:`_states`, :meth:`_states_batched`) share: the parameters
        ``p`` (``None``: the trainer's) through :meth:`_forward_setup`, then the layout's step loop in NumPy
        (``loop_backend="numpy"``: ``numpy_loop(x, U, R, b)``) or in torch
        (``torch_loop(x, U, R, b, h0, act, np_tanh)``); returns what the loop returns."""
        U, R, b, h0, act, np_tanh = self._forward_setup(x, self.p if p is None else p)
        if self.loop_backend == "numpy":
            return numpy_loop(x, U, R, b)
        return torch_loop(x, U, R, b, h0, act, np_tanh)

    def _states_torch(self, x: torch.Tensor, U: torch.Tensor, R: torch.Tensor, b: torch.Tensor, h0: float, act,
                      np_tanh: bool):
        """:meth:`_states` with the step loop in torch (NumPy's tanh with ``tanh_backend="numpy"``)."""
        T, K, B, I = x.shape
        H = R.shape[-1]
        hs = x.new_empty(K, T + 1, B, H)
        hs[:, 0] = h0
        xk = x.transpose(0, 1).reshape(K, T * B, I)  # a view for K = 1
        # Per-step views come from one ``unbind`` (an index per step costs a few µs of Python and
        # dispatch, which at K = 1 is ≈ 20 % of a step); NumPy's tanh writes through array views of them.
        if K == 1:
            R0 = R[0]
            hv = hs[0].unbind(0)
            P = torch.addmm(b[0], xk[0], U[0]).view(T, B, H).unbind(0)  # W_in u_t + b, every t
            mm = torch.addmm
            if np_tanh:
                hn, tanh = list(hs[0].numpy()), np.tanh
                for t in range(T):
                    mm(P[t], hv[t], R0, out=hv[t + 1])
                    tanh(hn[t + 1], out=hn[t + 1])
            else:
                for t in range(T):
                    mm(P[t], hv[t], R0, out=hv[t + 1])
                    act(hv[t + 1])
        else:
            P = torch.baddbmm(b[:, None, :], xk, U).view(K, T, B, H).unbind(1)
            tmp = x.new_empty(K, B, H)
            hv = hs.unbind(1)
            bmm = torch.baddbmm
            if np_tanh:
                hs_np, tmp_np, tanh = hs.numpy(), tmp.numpy(), np.tanh
                hn = [hs_np[:, t] for t in range(T + 1)]
                for t in range(T):
                    bmm(P[t], hv[t], R, out=tmp)
                    tanh(tmp_np, out=hn[t + 1])
            else:
                act = torch.tanh if act is torch.tanh_ else torch.sigmoid
                for t in range(T):
                    bmm(P[t], hv[t], R, out=tmp)
                    act(tmp, out=hv[t + 1])
        if self.fast_tanh:
            hs.mul_(2.0).sub_(1.0)
        return hs, xk

    def _forward_setup(self, x: torch.Tensor, p: RNNParams):
        """The loop's weights (rescaled for ``fast_tanh``), the initial state value, the in-place activation
        and whether NumPy's tanh is used."""
        if self.fast_tanh:
            # tanh z = 2σ(2z) − 1. Carry s_t = σ(2z_t) = (h_t + 1)/2 through the loop: 2z_t = 2(P_t − 1ᵀR)
            # + s_{t−1}(4R), so each step is one product, one add and one sigmoid; h = 2s − 1 at the end.
            U, R, b = 2.0 * p.U, 4.0 * p.R, 2.0 * (p.b - p.R.sum(-2))  # b: (K, H) 2(b − Σ_i R_ij)
            h0, act = 0.5, torch.sigmoid_
        else:
            U, R, b = p.U, p.R, p.b
            h0, act = 0.0, (torch.tanh_ if self.activation == "tanh" else torch.sigmoid_)
        np_tanh = self.tanh_backend == "numpy" and self.activation == "tanh" and not self.fast_tanh
        if self.loop_backend == "numpy" and (x.device.type != "cpu" or p.R.device.type != "cpu"):
            raise ConfigError(f"loop_backend='numpy' runs the loop in NumPy on the tensors' memory and needs CPU "
                              f"tensors; these are on {x.device if x.device.type != 'cpu' else p.R.device} "
                              "(use loop_backend='torch' on other devices)")
        if np_tanh and x.device.type != "cpu":
            raise ConfigError(f"tanh_backend='numpy' needs CPU tensors; these are on {x.device}")
        return U, R, b, h0, act, np_tanh

    def _states_batched(self, x: torch.Tensor, p: RNNParams | None = None) -> torch.Tensor:
        """``K ≥ 1`` models: time-major states ``hs (T+1, K, B, H)``, every step's ``(K, B, H)`` block contiguous.

        Each step is three calls on contiguous blocks: the input projection ``b + u_t W_inᵀ`` written
        into the state's slot (a small ``baddbmm``; computing it for all steps at once first costs a
        12.8 MB buffer at K = 16, L = 200, more than a core's cache, and was slower), the recurrent
        product added in place (``baddbmm_``), and the activation in place. A strided ``out=`` would
        send ``bmm`` down a per-model path and make the activation compute into a temporary and copy.
        """
        return self._forward(x, p, self._states_batched_torch, self._states_batched_numpy)

    def _states_batched_torch(self, x: torch.Tensor, U: torch.Tensor, R: torch.Tensor, b: torch.Tensor, h0: float,
                              act, np_tanh: bool) -> torch.Tensor:
        """:meth:`_states_batched` with the step loop in torch (NumPy's tanh with ``tanh_backend="numpy"``)."""
        T, K, B, _ = x.shape
        H = R.shape[-1]
        hs = x.new_empty(T + 1, K, B, H)
        hs[0] = h0
        hv, xv = hs.unbind(0), x.unbind(0)
        bb = b[:, None, :].expand(K, B, H)
        proj = torch.baddbmm
        if np_tanh:
            hn, tanh = list(hs.numpy()), np.tanh
            for t in range(T):
                h = proj(bb, xv[t], U, out=hv[t + 1])
                h.baddbmm_(hv[t], R)
                tanh(hn[t + 1], out=hn[t + 1])
        else:
            for t in range(T):
                h = proj(bb, xv[t], U, out=hv[t + 1])
                act(h.baddbmm_(hv[t], R))
        if self.fast_tanh:
            hs.mul_(2.0).sub_(1.0)
        return hs

    # ------------------------------------------------------------------ NumPy loop (loop_backend="numpy")
    def _np_act(self):
        """φ in place on a NumPy array: ``np.tanh``, or σ(z) = 1/(1 + e^{−z}) as four in-place ufuncs
        (e^{−z} overflows to ∞ for z < −88 in float32, giving σ = 1/∞ = 0, as ``torch.sigmoid`` does)."""
        if self.activation == "tanh":
            tanh = np.tanh
            return lambda h: tanh(h, out=h)
        neg, exp, add, rec = np.negative, np.exp, np.add, np.reciprocal

        def sigmoid(h):
            rec(add(exp(neg(h, out=h), out=h), 1.0, out=h), out=h)
        return sigmoid

    def _states_numpy(self, x: torch.Tensor, U: torch.Tensor, R: torch.Tensor, b: torch.Tensor):
        """:meth:`_states` with the step loop in NumPy: per step ``h_t = h_{t−1} W_recᵀ`` (``np.matmul``,
        OpenBLAS) into the state's slot, ``+= P_t`` and φ in place, all on array views of the torch storage
        (``out=`` everywhere, nothing allocated in the loop). The input projection ``P = U W_inᵀ + b`` for
        all steps stays one torch product. Same layout and return value as the torch loop."""
        T, K, B, I = x.shape
        H = R.shape[-1]
        hs = x.new_empty(K, T + 1, B, H)
        hs[:, 0] = 0.0
        xk = x.transpose(0, 1).reshape(K, T * B, I)
        if K == 1:
            P = torch.addmm(b[0], xk[0], U[0]).view(1, T, B, H)
        else:
            P = torch.baddbmm(b[:, None, :], xk, U).view(K, T, B, H)
        hn, Pn, Rn = hs.numpy(), P.numpy(), R.detach().numpy()
        if K == 1:  # 2-D products: one gemm per step
            hv, pv, Rn = list(hn[0]), list(Pn[0]), Rn[0]
        else:  # (K, B, H) slots strided over the model axis: np.matmul loops over K with one gemm each
            hv, pv = [hn[:, t] for t in range(T + 1)], [Pn[:, t] for t in range(T)]
        act, matmul, add = self._np_act(), np.matmul, np.add
        with np.errstate(all="ignore"):  # overflow to ±∞ / NaN as in the torch loop: silent (the step's guard sees it)
            for t in range(T):
                h = hv[t + 1]
                matmul(hv[t], Rn, out=h)
                add(h, pv[t], out=h)
                act(h)
        return hs, xk

    def _states_batched_numpy(self, x: torch.Tensor, U: torch.Tensor, R: torch.Tensor, b: torch.Tensor,
                              x1: torch.Tensor | None = None):
        """:meth:`_states_batched` with the step loop in NumPy: time-major ``hs (T+1, K, B, H)``; per step
        ``h_t = [u_t 1]·[W_inᵀ; b]`` (one small ``np.matmul`` into the slot), ``tmp = h_{t−1} W_recᵀ``,
        ``h_t += tmp`` and φ in place (NumPy has no accumulating matmul)."""
        T, K, B, I = x.shape
        H = R.shape[-1]
        hs = x.new_empty(T + 1, K, B, H)
        hs[0] = 0.0
        if x1 is None:
            x1 = torch.cat([x, x.new_ones(T, K, B, 1)], -1)
        U1 = torch.cat([U, b[:, None, :]], 1)  # (K, I+1, H)
        hn, xn, Un, Rn = hs.numpy(), x1.numpy(), U1.detach().numpy(), R.detach().numpy()
        tmp = np.empty((K, B, H), dtype=hn.dtype)
        hv, xv = list(hn), list(xn)
        act, matmul, add = self._np_act(), np.matmul, np.add
        with np.errstate(all="ignore"):  # overflow to ±∞ / NaN as in the torch loop: silent (the step's guard sees it)
            for t in range(T):
                h = matmul(xv[t], Un, out=hv[t + 1])
                add(h, matmul(hv[t], Rn, out=tmp), out=h)
                act(h)
        return hs

    def _backward_numpy(self, a: torch.Tensor, deltas: torch.Tensor, direct: torch.Tensor | None, R: torch.Tensor):
        """The in-memory backward loop in NumPy, in place: for t = T … 2, ``a_t ← a_t ⊙ δ_t`` (``a`` holds
        φ′(h_t) on entry), ``δ_{t−1} = a_t W_rec (+ ∂⁺E/∂h_{t−1})``; then ``a_1 ← a_1 ⊙ δ_1``.
        ``a (K, T, B, H)`` model-major, ``deltas (T, K, B, H)`` time-major with δ_T set, ``direct (K, T, B, H)``."""
        T, K = deltas.shape[:2]
        an, dn = a.numpy(), deltas.numpy()
        Rt = R.transpose(1, 2).contiguous().numpy()  # (K, H, H): W_rec per model (a_t W_rec = a_t @ Rᵀ)
        if K == 1:
            Rt, av, dv = Rt[0], list(an[0]), list(dn[:, 0])
            dr = None if direct is None else list(direct[0].numpy())
        else:
            av, dv = [an[:, t] for t in range(T)], list(dn)
            dr = None if direct is None else [direct.numpy()[:, t] for t in range(T)]
        mul, matmul, add = np.multiply, np.matmul, np.add
        with np.errstate(all="ignore"):  # overflow to ±∞ / NaN as in the torch loop: silent (the step's guard sees it)
            if dr is None:
                for t in range(T - 1, 0, -1):
                    matmul(mul(av[t], dv[t], out=av[t]), Rt, out=dv[t - 1])
            else:
                for t in range(T - 1, 0, -1):
                    d = matmul(mul(av[t], dv[t], out=av[t]), Rt, out=dv[t - 1])
                    add(d, dr[t - 1], out=d)
            mul(av[0], dv[0], out=av[0])

    def _backward_torch(self, a: torch.Tensor, deltas: torch.Tensor, direct: torch.Tensor | None, R: torch.Tensor):
        """The in-memory backward loop with torch kernels (same contract as :meth:`_backward_numpy`)."""
        T, K = deltas.shape[:2]
        if K == 1:  # per-step views from one unbind, as in the forward loop
            Rt, dv, av = R[0].T, deltas[:, 0].unbind(0), a[0].unbind(0)
            dr = None if direct is None else direct[0].unbind(0)
            mm, addmm = torch.mm, torch.addmm
        else:
            Rt, dv, av = R.transpose(1, 2).contiguous(), deltas.unbind(0), a.unbind(1)
            dr = None if direct is None else direct.unbind(1)
            mm, addmm = torch.bmm, torch.baddbmm
        if dr is None:
            for t in range(T - 1, 0, -1):
                at = av[t].mul_(dv[t])
                mm(at, Rt, out=dv[t - 1])
        else:
            for t in range(T - 1, 0, -1):
                at = av[t].mul_(dv[t])
                addmm(dr[t - 1], at, Rt, out=dv[t - 1])
        av[0].mul_(dv[0])

    def outputs(self, hs: torch.Tensor, p: RNNParams | None = None) -> torch.Tensor:
        """Head outputs: ``(K, B, O)`` for the "last" heads, ``(T, K, B, O)`` for ``softmax_all``."""
        p = self.p if p is None else p
        if self.head == "softmax_all":
            return torch.einsum("tkbh,kho->tkbo", hs[1:], p.V) + p.c[None, :, None, :]
        return torch.baddbmm(p.c[:, None, :], hs[-1], p.V)

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor, task) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss (K,), wrong (K, B) bool)`` without training; ``task.wrong`` decides per sequence."""
        out = self.outputs(self.states(x))
        loss = self._loss_and_grad(out, y, grad=False)[0]
        if self.head == "softmax_all":
            wrong = torch.stack([task.wrong(out[:, k], y[:, k]) for k in range(out.shape[1])])
        else:
            wrong = torch.stack([task.wrong(out[k], y[k]) for k in range(out.shape[0])])
        return loss, wrong

    # ------------------------------------------------------------------ loss
    def _loss_and_grad(self, out: torch.Tensor, y: torch.Tensor, grad: bool = True):
        """Per-model loss ``(K,)`` and ∂loss/∂out (same shape as ``out``)."""
        if self.head == "linear_last":
            diff = out - y.to(out.dtype)  # (K, B, O)
            B = out.shape[1]
            loss = diff.pow(2).sum(-1).mean(-1)
            return loss, ((2.0 / B) * diff if grad else None)
        if self.head == "softmax_all":  # (T, K, B, O): mean over the T·B (step, sequence) pairs
            O = out.shape[-1]
            logits, target = out.transpose(0, 1).reshape(out.shape[1], -1, O), y.transpose(0, 1).reshape(y.shape[1], -1)
        else:
            logits, target = out, y  # (K, B, O), (K, B)
        logp = torch.log_softmax(logits, -1)
        loss = -logp.gather(-1, target[..., None]).squeeze(-1).mean(-1)
        if not grad:
            return loss, None
        g = logp.exp_()
        g.scatter_add_(-1, target[..., None], torch.full_like(g[..., :1], -1.0))
        g.mul_(1.0 / logits.shape[1])
        if self.head == "softmax_all":
            T, K, B, O = out.shape
            g = g.view(K, T, B, O).transpose(0, 1)
        return loss, g

    # ------------------------------------------------------------------ one update
    @torch.no_grad()
    def gradients(self, x: torch.Tensor, y: torch.Tensor):
        """Loss ``(K,)``, the gradient (an :class:`RNNParams` of ∂E/∂θ), Ω ``(K,)``, valid fraction ``(K,)``.

        Ω's gradient (times α) is already added to the W_rec part when ``alpha > 0``.
        """
        if self._streams(x):
            return self._gradients_batched(x, y)
        p = self.p
        T, K, B, I = x.shape
        H = p.R.shape[-1]
        hs, xk = self._states(x)  # (K, T+1, B, H) model-major, xk (K, T·B, I)
        out = self.outputs(hs.transpose(0, 1))
        loss, gout = self._loss_and_grad(out, y)
        a = self._dphi(hs[:, 1:])  # (K, T, B, H) φ′(h_t); turned in place into a_t = δ_t ⊙ φ′(h_t)
        deltas = x.new_empty(T, K, B, H)  # total ∂E/∂h_t, time-major: every step's product writes a contiguous slice
        Vt = p.V.transpose(1, 2)  # (K, O, H)
        if self.head == "softmax_all":
            direct = torch.einsum("tkbo,koh->ktbh", gout, Vt)  # ∂⁺E/∂h_t, (K, T, B, H)
            gV = torch.einsum("ktbh,tkbo->kho", hs[:, 1:], gout)
            gc = gout.sum((0, 2))
            deltas[-1] = direct[:, -1]
        else:
            direct = None
            gV = torch.bmm(hs[:, -1].transpose(1, 2), gout)  # (K, H, O)
            gc = gout.sum(1)
            torch.bmm(gout, Vt, out=deltas[-1])
        if self.loop_backend == "numpy":
            self._backward_numpy(a, deltas, direct, p.R)
        else:
            self._backward_torch(a, deltas, direct, p.R)
        A = a.view(K, T * B, H)  # (K, N, H), N = T·B: model-major, no copy
        gR = torch.bmm(hs[:, :-1].reshape(K, T * B, H).transpose(1, 2), A)  # Σ_t h_{t−1}ᵀ a_t (a view)
        gU = torch.bmm(xk.transpose(1, 2), A)  # (K, I, H)
        gb = A.sum(1)
        omega = torch.zeros(K, dtype=x.dtype, device=x.device)
        valid = torch.zeros_like(omega)
        if self.alpha > 0:
            if direct is None:
                omega, valid, g_om = self._omega_from_loop(a.transpose(0, 1), deltas, A, p.R)
            else:
                omega, valid, g_om = self._omega(A, deltas.transpose(0, 1).reshape(K, T * B, H), p.R)
            gR.add_(g_om, alpha=self.alpha)
        if self.keep_state_grads:
            self.last_state_grads = deltas  # (T, K, B, H)
        return loss, RNNParams(U=gU, R=gR, b=gb, V=gV, c=gc), omega, valid

    def _gradients_batched(self, x: torch.Tensor, y: torch.Tensor):
        """:meth:`gradients` on the streaming path (``K > 1``, no Ω; see the module docstring), time-major.

        Per step t = T … 1: ``a_t = δ_t ⊙ φ′(h_t)`` into one small buffer (φ′ as :meth:`_dphi`),
        ``[∂E/∂W_in; ∂E/∂b] += [u_t 1]ᵀ a_t``, ``δ_{t−1} = a_t W_rec (+ direct term)`` and
        ``∂E/∂W_rec += h_{t−1}ᵀ a_t``: every operand and output a contiguous ``(K, B, H)`` block,
        used while it is in cache, instead of three large products over all T·B rows after the
        loop. δ_t is stored only for ``keep_state_grads``; otherwise two buffers alternate.
        """
        p = self.p
        T, K, B, I = x.shape
        H = p.R.shape[-1]
        x1 = torch.cat([x, x.new_ones(T, K, B, 1)], -1)  # [u_t 1]: ∂E/∂W_in and ∂E/∂b from one product
        # (T+1, K, B, H); the NumPy loop's own [u_t 1] products read the same x1
        hs = self._forward(x, p, self._states_batched_torch, partial(self._states_batched_numpy, x1=x1))
        out = self.outputs(hs)
        loss, gout = self._loss_and_grad(out, y)
        if self.keep_state_grads:
            deltas = x.new_empty(T, K, B, H)  # total ∂E/∂h_t
            dv = deltas.unbind(0)
        else:
            deltas, bufs = None, (x.new_empty(K, B, H), x.new_empty(K, B, H))
            dv = [bufs[t % 2] for t in range(T)]  # δ_t is read once, by step t − 1: two buffers alternate
        Vt = p.V.transpose(1, 2)  # (K, O, H)
        if self.head == "softmax_all":
            direct = torch.einsum("tkbo,koh->ktbh", gout, Vt)  # ∂⁺E/∂h_t, (K, T, B, H)
            gV = torch.einsum("tkbh,tkbo->kho", hs[1:], gout)
            gc = gout.sum((0, 2))
            dv[T - 1].copy_(direct[:, -1])
            dr = direct.unbind(1)
        else:
            direct = dr = None
            gV = torch.bmm(hs[-1].transpose(1, 2), gout)  # (K, H, O)
            gc = gout.sum(1)
            torch.bmm(gout, Vt, out=dv[T - 1])
        Rt = p.R.transpose(1, 2).contiguous()
        gR = x.new_zeros(K, H, H)
        gUb = x.new_zeros(K, I + 1, H)
        if self.loop_backend == "numpy":  # the same buffers as NumPy views (one ``.numpy()`` per buffer)
            if deltas is not None:
                dvn = list(deltas.numpy())
            else:
                bn = [v.numpy() for v in bufs]
                dvn = [bn[t % 2] for t in range(T)]
            drn = None if direct is None else list(direct.numpy().swapaxes(0, 1))
            self._stream_backward_numpy(hs, x1, dvn, drn, Rt, gR, gUb)
        else:
            self._stream_backward_torch(hs, x1, dv, dr, Rt, gR, gUb)
        gU, gb = gUb[:, :I], gUb[:, I]
        omega = torch.zeros(K, dtype=x.dtype, device=x.device)
        if self.keep_state_grads:
            self.last_state_grads = deltas  # (T, K, B, H)
        return loss, RNNParams(U=gU, R=gR, b=gb, V=gV, c=gc), omega, torch.zeros_like(omega)

    def _stream_backward_torch(self, hs, x1, dv, dr, Rt, gR, gUb):
        """The streaming backward loop (torch kernels): see :meth:`_gradients_batched`."""
        T, K, B, H = hs.shape[0] - 1, *hs.shape[1:]
        hv = hs.unbind(0)
        hT = hs.transpose(2, 3).unbind(0)  # (K, H, B) views, made in one call (a transpose per step costs ≈ 1 µs)
        xT = x1.transpose(2, 3).unbind(0)
        at_buf = hs.new_empty(K, B, H)  # φ′ step by step into one small buffer, used while it is in cache
        one = hs.new_ones(()).expand(K, B, H)
        tanh = self.activation == "tanh"
        acc_R, acc_Ub, bmm, baddbmm, mul, sub = gR.baddbmm_, gUb.baddbmm_, torch.bmm, torch.baddbmm, torch.mul, torch.sub
        for t in range(T - 1, -1, -1):  # φ′ as in :meth:`_dphi`, bit for bit
            if tanh:
                h = hv[t + 1]
                at = sub(one, mul(h, h, out=at_buf), out=at_buf).mul_(dv[t])
            else:
                h = hv[t + 1]
                at = sub(one, h, out=at_buf).mul_(h).mul_(dv[t])
            acc_Ub(xT[t], at)
            if t == 0:
                break  # h_0 = 0: no W_rec term, and no δ_0 to propagate
            if dr is None:
                bmm(at, Rt, out=dv[t - 1])
            else:
                baddbmm(dr[t - 1], at, Rt, out=dv[t - 1])
            acc_R(hT[t], at)  # a_t (t = 0 … T−1 here) pairs with the state before it, hs[t]

    def _stream_backward_numpy(self, hs, x1, dvn, drn, Rt, gR, gUb):
        """The streaming backward loop in NumPy, on array views of the same storage: per step φ′ and
        ``a_t = δ_t ⊙ φ′`` into one small buffer, ``tmp = [u_t 1]ᵀ a_t`` and ``[∂E/∂W_in; ∂E/∂b] += tmp``,
        ``δ_{t−1} = a_t W_rec (+ direct)``, ``tmp = h_{t−1}ᵀ a_t`` and ``∂E/∂W_rec += tmp`` (NumPy has no
        accumulating matmul: each accumulation is a product into a buffer and an add)."""
        T, K, B, H = hs.shape[0] - 1, *hs.shape[1:]
        hn = hs.numpy()
        hv = list(hn)
        hT = list(hn.transpose(0, 1, 3, 2))  # (K, H, B) transposed views: OpenBLAS reads them as transposed operands
        xT = list(x1.numpy().transpose(0, 1, 3, 2))
        Rtn, gRn, gUbn = Rt.numpy(), gR.numpy(), gUb.numpy()
        at = np.empty((K, B, H), dtype=hn.dtype)
        tR, tUb = np.empty_like(gRn), np.empty_like(gUbn)
        mul, sub, matmul, add = np.multiply, np.subtract, np.matmul, np.add
        tanh = self.activation == "tanh"
        with np.errstate(all="ignore"):  # overflow to ±∞ / NaN as in the torch loop: silent (the step's guard sees it)
            for t in range(T - 1, -1, -1):  # φ′ = 1 − h² / (1 − h)·h, as in :meth:`_dphi`
                h = hv[t + 1]
                if tanh:
                    sub(1.0, mul(h, h, out=at), out=at)
                else:
                    mul(sub(1.0, h, out=at), h, out=at)
                mul(at, dvn[t], out=at)
                add(gUbn, matmul(xT[t], at, out=tUb), out=gUbn)
                if t == 0:
                    break  # h_0 = 0: no W_rec term, and no δ_0 to propagate
                d = matmul(at, Rtn, out=dvn[t - 1])
                if drn is not None:
                    add(d, drn[t - 1], out=d)
                add(gRn, matmul(hT[t], at, out=tR), out=gRn)  # a_t pairs with the state before it, hs[t]

    def _omega_from_loop(self, a: torch.Tensor, deltas: torch.Tensor, A: torch.Tensor, R: torch.Tensor):
        """Ω as :meth:`_omega`, reusing the backward loop ("last" heads only: no direct term).

        Without a direct term the loop's ``δ_{t−1} = a_t W_rec`` *is* Ω's ``v_t`` for t ≥ 2, so
        ``‖v_t‖² = ‖δ_{t−1}‖²`` and only ``v_1 = a_1 W_rec`` needs a product: this saves one large
        product and one reduction over :meth:`_omega`. ``a, deltas (T, K, B, H)`` time-major; ``A (K, N, H)``.
        """
        T, K, B, H = a.shape
        den = deltas.pow(2).sum(-1)  # (T, K, B): ‖δ_t‖²
        v0 = torch.bmm(a[0], R.transpose(1, 2))  # (K, B, H): a_1 W_rec (∂E/∂h_0 through the first step)
        num = torch.cat([v0.pow(2).sum(-1)[None], den[:-1]])  # ‖v_t‖²
        ok = den >= self.bound
        safe = torch.where(ok, den, torch.ones_like(den))
        ratio = torch.where(ok, num / safe, torch.ones_like(num))
        n = ok.sum((0, 2)).clamp_min(1).to(a.dtype)  # (K,)
        omega = (ratio - 1.0).pow(2).sum((0, 2)) / n
        coef = torch.where(ok, 4.0 * (ratio - 1.0) / safe, torch.zeros_like(den)) / n[None, :, None]
        W = deltas.new_empty(K, T, B, H)  # coef·v, model-major (``A``'s layout)
        torch.mul(deltas[:-1], coef[1:, ..., None], out=W[:, 1:].transpose(0, 1))
        torch.mul(v0, coef[0, ..., None], out=W[:, 0])
        g = torch.bmm(W.view(K, T * B, H).transpose(1, 2), A)  # (K, H, H)
        return omega, ok.sum((0, 2)).to(a.dtype) / (T * B), g

    def _omega(self, A: torch.Tensor, D: torch.Tensor, R: torch.Tensor):
        """Ω ``(K,)``, valid fraction ``(K,)`` and ∂Ω/∂R ``(K, H, H)`` from a_t, δ_t ``(K, N, H)`` (constants)."""
        v = torch.bmm(A, R.transpose(1, 2))  # a W_rec: δ_t ∂h_t/∂h_{t−1} in row form, (K, N, H)
        num = v.pow(2).sum(-1)
        den = D.pow(2).sum(-1)
        ok = den >= self.bound
        safe = torch.where(ok, den, torch.ones_like(den))
        ratio = torch.where(ok, num / safe, torch.ones_like(num))
        n = ok.sum(-1).clamp_min(1).to(A.dtype)  # (K,)
        omega = (ratio - 1.0).pow(2).sum(-1) / n
        # ∂Ω/∂W_rec = (1/n) Σ 4(ρ−1)/‖δ‖² aᵀv (W_rec layout); R = W_recᵀ takes the transpose, (coef·v)ᵀ a
        coef = torch.where(ok, 4.0 * (ratio - 1.0) / safe, torch.zeros_like(den)) / n[:, None]
        g = torch.bmm((v * coef[..., None]).transpose(1, 2), A)  # (K, H, H)
        return omega, ok.sum(-1).to(A.dtype) / A.shape[1], g

    @torch.no_grad()
    def step(self, x: torch.Tensor, y: torch.Tensor) -> StepStats:
        """One SGD update of every model on its own batch (see the class docstring for shapes)."""
        loss, g, omega, valid = self.gradients(x, y)
        grads = g.tensors()
        sq = sum(v.reshape(v.shape[0], -1).pow(2).sum(-1) for v in grads.values())
        norm = sq.sqrt()  # (K,)
        fallback = torch.zeros_like(norm, dtype=torch.bool)
        if self.clip is not None:
            scale = torch.where(norm > self.clip, self.clip / norm, torch.ones_like(norm))
            for v in grads.values():
                v.mul_(scale.view(-1, *[1] * (v.dim() - 1)))
            if self.fallback:
                fallback = ~torch.isfinite(norm) | (norm > FALLBACK_NORM) | (norm < 0)
                if bool(fallback.any()):
                    # the authors' guard: ∂W_rec ← 0.02·W_rec, every other gradient 0 (where, not ×0: NaN·0 = NaN)
                    for name, v in grads.items():
                        f = fallback.view(-1, *[1] * (v.dim() - 1))
                        v.copy_(torch.where(f, 0.02 * self.p.R if name == "R" else torch.zeros_like(v), v))
        for name, v in grads.items():
            getattr(self.p, name).sub_(v, alpha=self.lr)
        return StepStats(loss=loss, norm=norm, omega=omega, valid=valid, fallback=fallback)

    # ------------------------------------------------------------------ probe view
    def temporal_flows(self) -> list[TemporalFlow]:
        """The last step's ∂E/∂h_t profiles, one :class:`gradprobe.TemporalFlow` per model (as the probe's
        ``temporal_flow()`` reports them: ``per_sequence (B, T)`` in time order); needs ``keep_state_grads``."""
        if self.last_state_grads is None:
            raise ConfigError("temporal_flows() needs RNNTrainer(keep_state_grads=True) and one step() first")
        norms = torch.linalg.vector_norm(self.last_state_grads, dim=-1)  # (T, K, B)
        arr = norms.permute(1, 2, 0).to(torch.float64).cpu().numpy()  # (K, B, T)
        return [TemporalFlow(f"rnn.model{k}", np.ascontiguousarray(arr[k])) for k in range(arr.shape[0])]
