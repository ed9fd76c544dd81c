"""Recurrent models: Pascanu's ``SigmoidRNN`` and the task models (vanilla, LSTM, GRU, IRNN, leaky, ESN).

``SigmoidRNN`` is the RNN of Pascanu, Mikolov & Bengio 2013 (§2, in the pre-activation state x) with
their three initialisations;
:class:`RecurrentNet` (and its :class:`RecurrentClassifier` / :class:`RecurrentRegressor` names)
wraps a recurrent core and a linear readout for the classic long-term-dependency tasks.

Time layout: every model here is **time-major** by default, input ``(T, B, n_in)`` as in Pascanu's
code; ``RecurrentNet(batch_first=True)`` takes ``(B, T, n_in)`` and returns batch-first outputs.
All are plain ``nn.Module``s; the recurrence is a visible Python loop except where PyTorch's fused
``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` are used (vanilla, IRNN, LSTM, GRU).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from gradprobe._deprecation import renamed_function
from gradprobe.errors import ConfigError
from gradprobe.functional.activations import activation as _activation_row
from gradprobe.functional.rnn import leaky_jacobian, leaky_recurrence, step_jacobian

__all__ = [
    "SigmoidRNN",
    "PASCANU_INITS",
    "SMART_LAYOUTS",
    "pascanu_weights",
    "rnn_step_jacobian",
    "LeakyRNN",
    "EchoStateReservoir",
    "RecurrentNet",
    "RecurrentClassifier",
    "RecurrentRegressor",
    "CELLS",
    "irnn_init_",
    "scale_to_spectral_radius_",
    "spectral_radius",
]

def _activation(name: str):
    row = _activation_row(name)
    return row.fn, row.grad


def spectral_radius(w: torch.Tensor) -> float:
    """max |eigenvalue| of a square matrix (dense, in float64)."""
    return float(torch.linalg.eigvals(w.detach().to(torch.float64)).abs().max())


@torch.no_grad()
def scale_to_spectral_radius_(w: torch.Tensor, radius: float) -> torch.Tensor:
    """Rescale the square matrix ``w`` in place so that its spectral radius is ``radius``."""
    rho = spectral_radius(w)
    if rho == 0.0:
        raise ConfigError("cannot rescale a matrix with spectral radius 0 (all eigenvalues zero)")
    return w.mul_(radius / rho)


scale_to_spectral_radius = renamed_function(scale_to_spectral_radius_, "scale_to_spectral_radius", __name__)


# ---------------------------------------------------------------------------------------------
# Pascanu's sigmoid/tanh RNN (Pascanu, Mikolov & Bengio 2013, §2)
# ---------------------------------------------------------------------------------------------
PASCANU_INITS = {"sigmoid": "sigmoid", "basic_tanh": "tanh", "smart_tanh": "tanh"}  # init -> default σ
SMART_LAYOUTS = ("paper", "code")  # which weights of each unit "smart_tanh" keeps; see pascanu_weights


def pascanu_weights(n_in: int, n_hidden: int, n_out: int, init: str, *, generator: torch.Generator | None = None,
                    dtype: torch.dtype = torch.float32, n_incoming: int = 15,
                    radius: float = 0.95, layout: str = "paper") -> dict[str, torch.Tensor]:
    """Pascanu, Mikolov & Bengio (2013) initial weights, following their ``RNN.py``; biases are zero.

    * ``"sigmoid"``: W_in, W_rec, W_out ~ N(0, 0.01²).
    * ``"basic_tanh"``: all three ~ N(0, 0.1²).
    * ``"smart_tanh"``: W_in, W_out ~ N(0, 0.01²); W_rec ~ N(0, 0.01²) with all but ``n_incoming``
      (15) randomly chosen weights per unit zeroed, then rescaled to spectral radius ``radius`` (0.95).
      Which weights of a unit are kept is ``layout``:

      - ``"paper"`` (default): 15 non-zero *incoming* weights per unit (the entries of its row of
        W_rec in ``h_t = σ(W_rec h_{t−1} + …)``), as the paper describes the init;
      - ``"code"``: what the authors' ``RNN.py`` does: its Theano code multiplies row vectors,
        ``h W_hh``, and zeroes all but 15 entries of each *row of W_hh*, which are the unit's
        *outgoing* weights: 15 non-zeros per column of our W_rec (``W_rec = W_hhᵀ``).

      The spectral radius is the same either way; the two differ as W and Wᵀ do (same eigenvalues,
      transposed sparsity pattern).

    Shapes (torch ``nn.Linear`` layout): ``W_in (n_hidden, n_in)``, ``W_rec (n_hidden, n_hidden)``,
    ``W_out (n_out, n_hidden)``, ``b (n_hidden,)``, ``b_out (n_out,)``.
    """
    if init not in PASCANU_INITS:
        raise ConfigError(f"unknown Pascanu init {init!r}; choose one of {sorted(PASCANU_INITS)}")
    if layout not in SMART_LAYOUTS:
        raise ConfigError(
            f"layout={layout!r}: choose 'paper' (15 incoming weights per unit) or 'code' (the authors' RNN.py: "
            "15 outgoing weights per unit)"
        )
    std = 0.1 if init == "basic_tanh" else 0.01

    def normal(*shape: int) -> torch.Tensor:
        return torch.empty(*shape, dtype=torch.float64).normal_(0.0, std, generator=generator)

    w_in, w_rec, w_out = normal(n_hidden, n_in), normal(n_hidden, n_hidden), normal(n_out, n_hidden)
    if init == "smart_tanh":
        keep = min(int(n_incoming), n_hidden)
        mask = torch.zeros(n_hidden, n_hidden, dtype=torch.bool)
        for i in range(n_hidden):  # unit i keeps `keep` randomly chosen weights (one permutation per unit)
            mask[i, torch.randperm(n_hidden, generator=generator)[:keep]] = True
        w_rec = w_rec * (mask if layout == "paper" else mask.T)  # rows: incoming; columns: outgoing
        scale_to_spectral_radius_(w_rec, radius)  # in float64 so the radius is exact before the cast
    out = dict(W_in=w_in, W_rec=w_rec, W_out=w_out, b=torch.zeros(n_hidden, dtype=torch.float64),
               b_out=torch.zeros(n_out, dtype=torch.float64))
    return {k: v.to(dtype) for k, v in out.items()}


def rnn_step_jacobian(w_rec: torch.Tensor, x_prev: torch.Tensor, dact: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """∂x_t/∂x_{t−1} = W_rec diag(σ′(x_{t−1})) for ``x_t = W_rec σ(x_{t−1}) + W_in u_t + b``
    (Pascanu, Mikolov & Bengio 2013, §2; :func:`gradprobe.functional.rnn.step_jacobian`, ``"x"`` form).

    ``w_rec (n, n)``, ``x_prev (B, n)`` → ``(B, n, n)``; entry [b, i, j] = W_rec[i, j] σ′(x_prev[b, j]).
    (Pascanu et al. write the transpose, W_recᵀ diag(σ′), in the row-vector/gradient convention.)
    """
    return step_jacobian(w_rec, dact(x_prev), "x")


class SigmoidRNN(nn.Module):
    """Pascanu's RNN in its pre-activation form: ``x_t = W_rec σ(x_{t−1}) + W_in u_t + b``, ``y_t = W_out σ(x_t) + b_out``.

    Equivalent to the code's ``h_t = σ(W_rec h_{t−1} + W_in u_t + b)`` with ``h_t = σ(x_t)`` and
    ``h_0 = 0`` (Pascanu, Mikolov & Bengio 2013, §2, and their ``RNN.py``).

    Args:
        n_in, n_hidden, n_out: sizes (Pascanu: 50 hidden units).
        init: ``"sigmoid"``, ``"basic_tanh"`` or ``"smart_tanh"`` (see :func:`pascanu_weights`).
        activation: σ; default sigmoid for ``init="sigmoid"``, tanh otherwise (any name of the activation
            table, :mod:`gradprobe.functional.activations`).
        layout: ``"smart_tanh"``'s sparsity, ``"paper"`` (15 incoming weights per unit) or ``"code"``
            (the authors' ``RNN.py``: 15 outgoing); see :func:`pascanu_weights`.
        generator, dtype: for the initial weights.

    Sub-modules ``input`` (W_in with bias b), ``recurrent`` (W_rec, no bias), ``output`` (W_out, b_out)
    so a probe sees three layers; ``self.W_rec`` is ``recurrent.weight``.

    ``forward(u, h0=None)``: ``u`` time-major ``(T, B, n_in)``; ``h0`` the initial hidden activity
    σ(x_0) of shape ``(B, n_hidden)`` (default zeros). Returns ``(y, x)``: outputs ``(T, B, n_out)``
    at every step and pre-activation states ``x_1 … x_T`` of shape ``(T, B, n_hidden)``.

    >>> net = SigmoidRNN(2, 50, 1, init="smart_tanh", generator=torch.Generator().manual_seed(0))
    >>> y, x = net(torch.randn(30, 4, 2))
    >>> y.shape, x.shape, round(spectral_radius(net.W_rec), 4)
    (torch.Size([30, 4, 1]), torch.Size([30, 4, 50]), 0.95)
    """

    def __init__(self, n_in: int, n_hidden: int, n_out: int, *, init: str = "sigmoid", activation: str | None = None,
                 layout: str = "paper", generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        for name, v in (("n_in", n_in), ("n_hidden", n_hidden), ("n_out", n_out)):
            if int(v) != v or v < 1:
                raise ConfigError(f"SigmoidRNN needs {name} >= 1; got {v!r}")
        ws = pascanu_weights(n_in, n_hidden, n_out, init, generator=generator, dtype=dtype, layout=layout)
        self.init = init
        self.activation = activation or PASCANU_INITS[init]
        self.act, self.dact = _activation(self.activation)
        self.input = nn.Linear(n_in, n_hidden, dtype=dtype)
        self.recurrent = nn.Linear(n_hidden, n_hidden, bias=False, dtype=dtype)
        self.output = nn.Linear(n_hidden, n_out, dtype=dtype)
        with torch.no_grad():
            self.input.weight.copy_(ws["W_in"])
            self.input.bias.copy_(ws["b"])
            self.recurrent.weight.copy_(ws["W_rec"])
            self.output.weight.copy_(ws["W_out"])
            self.output.bias.copy_(ws["b_out"])

    @property
    def W_rec(self) -> torch.Tensor:
        return self.recurrent.weight

    def forward(self, u: torch.Tensor, h0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if u.dim() != 3 or u.shape[-1] != self.input.in_features:
            raise ConfigError(
                f"SigmoidRNN expects time-major input (T, B, {self.input.in_features}); got shape {tuple(u.shape)}"
            )
        T, B, _ = u.shape
        h = u.new_zeros(B, self.recurrent.in_features) if h0 is None else h0  # σ(x_0), (B, H)
        drive = self.input(u)  # W_in u_t + b for all t at once, (T, B, H)
        xs = []
        for t in range(T):
            x = self.recurrent(h) + drive[t]  # x_t = W_rec σ(x_{t−1}) + W_in u_t + b, (B, H)
            xs.append(x)
            h = self.act(x)
        x = torch.stack(xs)  # (T, B, H)
        return self.output(self.act(x)), x

    def jacobian(self, x_prev: torch.Tensor) -> torch.Tensor:
        """Closed-form ∂x_t/∂x_{t−1} = W_rec diag(σ′(x_{t−1})): ``(B, H)`` → ``(B, H, H)`` (detached)."""
        return rnn_step_jacobian(self.W_rec.detach(), x_prev.detach(), self.dact)

    def jacobian_product(self, x: torch.Tensor, t: int, k: int) -> torch.Tensor:
        """∂x_t/∂x_k = Π_{t ≥ i > k} W_rec diag(σ′(x_{i−1})) (Pascanu et al. 2013, §2), ``(B, H, H)``.

        ``x`` is the state sequence returned by ``forward`` (``x[0]`` is x_1), ``1 ≤ k ≤ t ≤ T``.
        """
        T = x.shape[0]
        if not 1 <= k <= t <= T:
            raise ConfigError(f"need 1 <= k <= t <= T={T}; got t={t}, k={k}")
        B, H = x.shape[1], x.shape[2]
        prod = torch.eye(H, dtype=x.dtype).expand(B, H, H).clone()
        for i in range(k + 1, t + 1):  # left-multiply the newer Jacobians
            prod = self.jacobian(x[i - 2]) @ prod
        return prod


    def jacobian_norms(self, x: torch.Tensor) -> torch.Tensor:
        """‖∂x_T/∂x_{T−s}‖₂ (spectral norm) for lags s = 0 … T−1: shape ``(T, B)``, row 0 is ‖I‖ = 1.

        Accumulates ∂x_T/∂x_{k−1} = (∂x_T/∂x_k) · W_rec diag(σ′(x_{k−1})) from k = T down;
        ``x`` is the state sequence from ``forward``. The decay of this curve with s is the vanishing
        gradient through time (Hochreiter 1991; bounded by (‖W_rec‖·γ)^s, Pascanu et al. 2013, §2.1).
        """
        T, B, H = x.shape
        prod = torch.eye(H, dtype=x.dtype).expand(B, H, H).clone()
        norms = [torch.linalg.matrix_norm(prod, ord=2)]
        for k in range(T, 1, -1):  # multiply in J_k = ∂x_k/∂x_{k−1}, which needs x_{k−1} = x[k − 2]
            prod = prod @ self.jacobian(x[k - 2])
            norms.append(torch.linalg.matrix_norm(prod, ord=2))
        return torch.stack(norms)  # (T, B)


# ---------------------------------------------------------------------------------------------
# Task models
# ---------------------------------------------------------------------------------------------
class LeakyRNN(nn.Module):
    """Leaky-integrator units: ``x_t = (1 − a) x_{t−1} + a f(W_rec x_{t−1} + W_in u_t + b)``.

    ``a ∈ (0, 1]`` is the leak rate (a = 1: the vanilla RNN; small a: slow units whose Jacobian
    ``(1 − a)I + a diag(f′) W_rec`` stays near the identity; Jaeger et al. 2007; Bengio,
    Boulanger-Lewandowski & Pascanu 2013). Input ``(T, B, n_in)``, optional ``x0 (B, H)``; returns the
    states ``(T, B, H)``. ``activation``: any name of the activation table. Weights default to PyTorch's
    ``nn.RNN`` init, U(±1/√H). The recurrence is :func:`gradprobe.functional.rnn.leaky_recurrence`.

    This is gradprobe's one leaky RNN. To make an existing ``nn.RNN`` leaky, keeping its parameters,
    use :func:`gradprobe.remedies.to_leaky` (it wraps the module in :class:`gradprobe.remedies.Leaky`).
    """

    def __init__(self, n_in: int, n_hidden: int, *, leak: float = 0.5, activation: str = "tanh",
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if int(n_in) != n_in or int(n_hidden) != n_hidden or n_in < 1 or n_hidden < 1:
            raise ConfigError(f"{type(self).__name__} needs n_in >= 1 and n_hidden >= 1; got {n_in!r}, {n_hidden!r}")
        if not 0.0 < leak <= 1.0:
            raise ConfigError(f"the leak rate must lie in (0, 1]; got {leak}")
        self.leak = float(leak)
        self.activation = activation
        self.act, self.dact = _activation(activation)
        self.input = nn.Linear(n_in, n_hidden, dtype=dtype)
        self.recurrent = nn.Linear(n_hidden, n_hidden, bias=False, dtype=dtype)
        bound = 1.0 / math.sqrt(n_hidden)
        with torch.no_grad():
            for p in (self.input.weight, self.input.bias, self.recurrent.weight):
                p.uniform_(-bound, bound)

    @property
    def hidden_size(self) -> int:
        return self.recurrent.in_features

    def forward(self, u: torch.Tensor, x0: torch.Tensor | None = None) -> torch.Tensor:
        if u.dim() != 3 or u.shape[-1] != self.input.in_features:
            raise ConfigError(
                f"{type(self).__name__} expects time-major input (T, B, {self.input.in_features}); got shape {tuple(u.shape)}"
            )
        x = u.new_zeros(u.shape[1], self.hidden_size) if x0 is None else x0
        drive = self.input(u)  # W_in u_t + b for all t at once, (T, B, H)
        return leaky_recurrence(drive, self.recurrent.weight, self.leak, self.act, x)[0]  # (T, B, H)

    def jacobian(self, x_prev: torch.Tensor, u_t: torch.Tensor) -> torch.Tensor:
        """∂x_t/∂x_{t−1} = (1 − a) I + a diag(f′(z_t)) W_rec, z_t = W_rec x_{t−1} + W_in u_t + b; ``(B, H, H)``."""
        with torch.no_grad():
            z = self.recurrent(x_prev) + self.input(u_t)
            return leaky_jacobian(self.recurrent.weight, self.dact(z), self.leak)


class EchoStateReservoir(LeakyRNN):
    """An echo state network's fixed reservoir (Jaeger 2001): a :class:`LeakyRNN` with no
    bias, random W_in ~ U(±input_scale), W_rec ~ N(0, 1) with a fraction ``density`` of non-zeros,
    rescaled to spectral radius ``radius``, and ``requires_grad=False`` everywhere (only the readout
    is trained, e.g. by :meth:`RecurrentNet.fit_readout`)."""

    def __init__(self, n_in: int, n_hidden: int, *, radius: float = 0.9, density: float = 0.1,
                 input_scale: float = 1.0, leak: float = 1.0, activation: str = "tanh",
                 generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32):
        super().__init__(n_in, n_hidden, leak=leak, activation=activation, dtype=dtype)
        if not 0.0 < density <= 1.0:
            raise ConfigError(f"reservoir density must lie in (0, 1]; got {density}")
        # A sparse random matrix can be nilpotent (its non-zeros form an acyclic graph: every
        # eigenvalue 0, common for small or very sparse reservoirs); it cannot be rescaled, so redraw.
        for _ in range(100):
            w = torch.empty(n_hidden, n_hidden, dtype=torch.float64).normal_(generator=generator)
            w = w * (torch.rand(n_hidden, n_hidden, generator=generator, dtype=torch.float64) < density)
            if spectral_radius(w) > 1e-6 * max(float(torch.linalg.matrix_norm(w)), 1e-300):
                break
        else:
            raise ConfigError(
                f"could not draw a reservoir with non-zero spectral radius at n_hidden={n_hidden}, "
                f"density={density} in 100 tries; raise the density"
            )
        scale_to_spectral_radius_(w, radius)
        w_in = torch.empty(n_hidden, n_in, dtype=torch.float64).uniform_(-input_scale, input_scale, generator=generator)
        with torch.no_grad():
            self.recurrent.weight.copy_(w)
            self.input.weight.copy_(w_in)
            self.input.bias.zero_()
        self.requires_grad_(False)


@torch.no_grad()
def irnn_init_(rnn: nn.RNN, *, scale: float = 1.0, input_std: float = 1e-3,
               generator: torch.Generator | None = None) -> nn.RNN:
    """Le, Jaitly & Hinton (2015) IRNN: recurrent weights ``scale · I``, biases 0, input weights
    N(0, input_std²) (the paper's 0.001). In place on a ReLU ``nn.RNN``; returns it."""
    for name, p in rnn.named_parameters():
        if name.startswith("weight_hh"):
            p.copy_(scale * torch.eye(p.shape[0], dtype=p.dtype))
        elif name.startswith("bias"):
            p.zero_()
        elif name.startswith("weight_ih"):
            p.copy_(torch.empty(p.shape, dtype=torch.float64).normal_(0.0, input_std, generator=generator))
    return rnn


CELLS = ("tanh", "relu", "irnn", "lstm", "gru", "leaky", "esn")


class RecurrentNet(nn.Module):
    """A recurrent core and a linear readout, for the long-term-dependency tasks.

    Cells: ``"tanh"`` / ``"relu"`` (vanilla ``nn.RNN``), ``"irnn"`` (ReLU RNN with identity
    recurrent init, Le et al. 2015), ``"lstm"``, ``"gru"``, ``"leaky"`` (:class:`LeakyRNN`), ``"esn"``
    (:class:`EchoStateReservoir`: fixed reservoir, only the readout is trained; Jaeger 2001).

    Args:
        n_in, n_hidden, n_out: sizes.
        cell: one of ``CELLS``; num_layers: stacked layers (nn.RNN/LSTM/GRU cells only).
        readout: ``"last"`` (output from the last step, ``(B, n_out)``) or ``"all"`` (every step,
            ``(T, B, n_out)``, or ``(B, T, n_out)`` when ``batch_first``).
        batch_first: input ``(B, T, n_in)`` instead of the default time-major ``(T, B, n_in)``.
        leak: leak rate of "leaky" (default 0.5) / "esn" (default 1.0); radius, density, input_scale: ESN reservoir;
        irnn_scale: identity scale of "irnn"; forget_bias: LSTM forget-gate bias (e.g. 1.0, Gers et al. 2000).

    >>> net = RecurrentNet(2, 16, 1, cell="lstm")
    >>> net(torch.randn(50, 8, 2)).shape
    torch.Size([8, 1])
    >>> RecurrentNet(2, 16, 3, cell="esn", readout="all", batch_first=True)(torch.randn(8, 50, 2)).shape
    torch.Size([8, 50, 3])
    """

    def __init__(self, n_in: int, n_hidden: int, n_out: int, *, cell: str = "tanh", readout: str = "last",
                 batch_first: bool = False, num_layers: int = 1, leak: float | None = None, radius: float = 0.9,
                 density: float = 0.1, input_scale: float = 1.0, irnn_scale: float = 1.0,
                 forget_bias: float | None = None, generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if cell not in CELLS:
            raise ConfigError(f"unknown recurrent cell {cell!r}; choose one of {CELLS}")
        if readout not in ("last", "all"):
            raise ConfigError(f"readout must be 'last' or 'all'; got {readout!r}")
        if num_layers != 1 and cell in ("leaky", "esn"):
            raise ConfigError(f"cell {cell!r} supports num_layers=1 only; got {num_layers}")
        if leak is not None and cell not in ("leaky", "esn"):
            raise ConfigError(f"leak applies to cell='leaky' or 'esn' only; got cell={cell!r}")
        if forget_bias is not None and cell != "lstm":
            raise ConfigError("forget_bias applies to cell='lstm' only")
        self.cell, self.readout_mode, self.batch_first = cell, readout, batch_first
        if cell in ("tanh", "relu", "irnn"):
            core = nn.RNN(n_in, n_hidden, num_layers, nonlinearity="tanh" if cell == "tanh" else "relu", dtype=dtype)
            if cell == "irnn":
                irnn_init_(core, scale=irnn_scale, generator=generator)
        elif cell == "lstm":
            core = nn.LSTM(n_in, n_hidden, num_layers, dtype=dtype)
            if forget_bias is not None:
                with torch.no_grad():
                    for name, p in core.named_parameters():
                        if name.startswith("bias"):
                            p[n_hidden:2 * n_hidden] = forget_bias / 2.0  # b_ih + b_hh: gate order i, f, g, o
        elif cell == "gru":
            core = nn.GRU(n_in, n_hidden, num_layers, dtype=dtype)
        elif cell == "leaky":
            core = LeakyRNN(n_in, n_hidden, leak=0.5 if leak is None else leak, dtype=dtype)
        else:
            core = EchoStateReservoir(n_in, n_hidden, radius=radius, density=density, input_scale=input_scale,
                                      leak=1.0 if leak is None else leak, generator=generator,
                                      dtype=dtype)
        self.core = core
        self.readout = nn.Linear(n_hidden, n_out, dtype=dtype)

    def states(self, u: torch.Tensor) -> torch.Tensor:
        """Hidden states of the (last) layer, always time-major ``(T, B, H)``."""
        if u.dim() != 3:
            raise ConfigError(f"RecurrentNet expects a 3-d input {'(B, T, n_in)' if self.batch_first else '(T, B, n_in)'}; "
                              f"got shape {tuple(u.shape)}")
        if self.batch_first:
            u = u.transpose(0, 1)
        out = self.core(u)
        return out[0] if isinstance(out, tuple) else out  # nn.RNN/LSTM/GRU return (output, h_n)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        h = self.states(u)  # (T, B, H)
        if self.readout_mode == "last":
            return self.readout(h[-1])  # (B, n_out)
        y = self.readout(h)  # (T, B, n_out)
        return y.transpose(0, 1) if self.batch_first else y

    @torch.no_grad()
    def fit_readout(self, u: torch.Tensor, y: torch.Tensor, *, ridge: float = 1e-6, washout: int = 0) -> torch.Tensor:
        """Closed-form ridge regression of the readout on the states (the ESN way; any cell works).

        ``u`` as for ``forward``; ``y`` matches ``forward``'s output shape. With ``readout="all"`` the
        first ``washout`` steps are dropped. Minimises Σ‖W h + c − y‖² + ridge‖W‖² (bias unpenalised);
        sets ``readout`` and returns the training mean squared error.
        """
        h = self.states(u)  # (T, B, H)
        if self.readout_mode == "last":
            X, Y = h[-1], y
        else:
            yt = y.transpose(0, 1) if self.batch_first else y
            X, Y = h[washout:].reshape(-1, h.shape[-1]), yt[washout:].reshape(-1, yt.shape[-1])
        X64, Y64 = X.to(torch.float64), Y.to(torch.float64)
        xm, ym = X64.mean(0), Y64.mean(0)
        Xc, Yc = X64 - xm, Y64 - ym  # centring handles the unpenalised bias
        A = Xc.T @ Xc + ridge * torch.eye(X64.shape[1], dtype=torch.float64)
        W = torch.linalg.solve(A, Xc.T @ Yc).T  # (n_out, H)
        self.readout.weight.copy_(W)
        self.readout.bias.copy_(ym - W @ xm)
        return ((X64 @ W.T + (ym - W @ xm) - Y64) ** 2).mean()


class RecurrentClassifier(RecurrentNet):
    """:class:`RecurrentNet` whose outputs are logits over ``n_classes`` (use cross-entropy).

    >>> RecurrentClassifier(6, 32, 4, cell="gru").predict(torch.randn(20, 5, 6)).shape
    torch.Size([5])
    """

    def __init__(self, n_in: int, n_hidden: int, n_classes: int, **kwargs):
        super().__init__(n_in, n_hidden, n_classes, **kwargs)

    @torch.no_grad()
    def predict(self, u: torch.Tensor) -> torch.Tensor:
        """Class indices (argmax of the logits): ``(B,)``, or per step for ``readout="all"``."""
        return self(u).argmax(-1)


class RecurrentRegressor(RecurrentNet):
    """:class:`RecurrentNet` with a linear output of size ``n_out`` (default 1; use squared error)."""

    def __init__(self, n_in: int, n_hidden: int, n_out: int = 1, **kwargs):
        super().__init__(n_in, n_hidden, n_out, **kwargs)
