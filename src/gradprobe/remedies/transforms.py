"""Architecture transforms: the structural remedies for vanishing gradients applied to an existing model.

Each transform returns a **new** model (a deep copy; parameters of untouched modules keep their
values) unless ``inplace=True`` (then the model's sub-modules are rewritten where they stand; use the
returned object, which differs from the argument when the model itself is the module replaced), and
raises :class:`~gradprobe.errors.ConfigError` when there is nothing to change (a silent no-op would
look like a fix that did not help).

* :func:`swap_activations`: sigmoid/tanh → ReLU family (σ' ≤ 1/4 resp. ≤ 1 shrinks the signal at every
  layer; Glorot & Bengio 2010, Glorot, Bordes & Bengio 2011); re-initialise afterwards
  (``initialize_(model, "he")``, He et al. 2015).
* :func:`insert_normalization`: BatchNorm/LayerNorm after each Linear/Conv inside ``nn.Sequential``s.
* :func:`add_residual`: wrap each same-shape ``[Linear(d, d), activation, …]`` run as ``x + s·f(x)``
  (He et al. 2016); works on ``nn.Sequential`` models and on :class:`gradprobe.models.DeepMLP`.
* :func:`to_gated`: ``nn.RNN`` → ``nn.GRU`` or ``nn.LSTM`` of the same sizes (Hochreiter & Schmidhuber 1997).
* :func:`to_leaky` / :class:`Leaky`: leaky-integrator units h_t = (1−α)h_{t−1} + α·φ(…) over the
  ``nn.RNN``'s own parameters (Jaeger et al. 2007).
"""
from __future__ import annotations

import copy
import warnings
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

from gradprobe.errors import ConfigError
from gradprobe.functional.activations import activation as _activation
from gradprobe.functional.rnn import leaky_recurrence

__all__ = [
    "Residual",
    "LSTMAsRNN",
    "Leaky",
    "LeakyRNN",
    "swap_activations",
    "insert_normalization",
    "add_residual",
    "to_gated",
    "to_leaky",
]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
_DROPOUT = (nn.modules.dropout._DropoutNd, nn.AlphaDropout, nn.Identity)


def _is_activation(m: nn.Module) -> bool:
    # every elementwise activation lives in torch.nn.modules.activation; attention does too, but
    # it is not shape-preserving in the sense needed here
    return type(m).__module__ == "torch.nn.modules.activation" and not isinstance(m, nn.MultiheadAttention)


def _target(model: nn.Module, inplace: bool) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise ConfigError(f"expected a torch.nn.Module; got {type(model).__name__}")
    return model if inplace else copy.deepcopy(model)


def _replace(module: nn.Module, fn: Callable[[nn.Module], nn.Module | None]) -> tuple[nn.Module, int]:
    """Post-order rewrite: ``fn(m)`` returns a replacement or ``None``; returns (root, count)."""
    count = 0
    for name, child in list(module.named_children()):
        new, k = _replace(child, fn)
        count += k
        if new is not child:
            setattr(module, name, new)
    new = fn(module)
    if new is not None:
        return new, count + 1
    return module, count


def _like(new: nn.Module, ref: torch.Tensor) -> nn.Module:
    return new.to(device=ref.device, dtype=ref.dtype)


# ------------------------------------------------------------------------------------------ activations
def swap_activations(
    model: nn.Module,
    old: type | tuple[type, ...] = (nn.Sigmoid, nn.Tanh),
    new: Callable[[], nn.Module] = nn.ReLU,
    *,
    inplace: bool = False,
) -> nn.Module:
    """Replace every module of type ``old`` by ``new()`` (a class or a zero-argument factory).

    Functional activations inside ``forward`` (``torch.sigmoid(x)``) cannot be seen and are not changed.
    The weights were scaled for the old activation: re-initialise (He for ReLU) afterwards.

    >>> net = nn.Sequential(nn.Linear(4, 4), nn.Sigmoid(), nn.Linear(4, 1))
    >>> swap_activations(net)
    Sequential(
      (0): Linear(in_features=4, out_features=4, bias=True)
      (1): ReLU()
      (2): Linear(in_features=4, out_features=1, bias=True)
    )
    """
    old = old if isinstance(old, tuple) else (old,)
    model = _target(model, inplace)
    root, n = _replace(model, lambda m: new() if isinstance(m, old) else None)
    if n == 0:
        raise ConfigError(f"no {' / '.join(t.__name__ for t in old)} module found in {type(model).__name__}")
    return root


# ------------------------------------------------------------------------------------------ normalization
def _norm_for(layer: nn.Module, kind: str) -> nn.Module:
    if isinstance(layer, nn.Linear):
        n = layer.out_features
        return nn.BatchNorm1d(n) if kind == "batch" else nn.LayerNorm(n)
    c = layer.out_channels
    if kind == "layer":
        return nn.GroupNorm(1, c)  # = LayerNorm over (C, *spatial) with per-channel affine
    return {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d}[type(layer)](c)


def insert_normalization(model: nn.Module, kind: str = "batch", *, skip_last: bool = True, inplace: bool = False) -> nn.Module:
    """Insert a normalisation layer right after each ``nn.Linear`` / ``nn.ConvNd`` inside ``nn.Sequential``s.

    ``kind="batch"``: BatchNorm1d/2d/3d (Ioffe & Szegedy 2015); ``kind="layer"``: LayerNorm for Linear
    (Ba et al. 2016) and GroupNorm(1, C) for convolutions. ``skip_last`` leaves the model's last
    Linear/Conv (the output layer) alone. Linear layers are assumed to see ``(B, features)`` inputs
    (BatchNorm1d would normalise the wrong axis of ``(B, T, features)``). The inserted module after
    child ``k`` is named ``"k_norm"``.

    >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    >>> [type(m).__name__ for m in insert_normalization(net, "layer")]
    ['Linear', 'LayerNorm', 'Tanh', 'Linear']
    """
    if kind not in ("batch", "layer"):
        raise ConfigError(f"kind={kind!r}: choose 'batch' or 'layer'")
    model = _target(model, inplace)
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear,) + _CONV)]
    skip = {id(layers[-1])} if (skip_last and layers) else set()

    def rewrite(m: nn.Module):
        if not isinstance(m, nn.Sequential):
            return None
        items, changed = [], False
        for name, child in m.named_children():
            items.append((name, child))
            if isinstance(child, (nn.Linear,) + _CONV) and id(child) not in skip:
                items.append((f"{name}_norm", _like(_norm_for(child, kind), child.weight)))
                changed = True
        return nn.Sequential(OrderedDict(items)) if changed else None

    root, n = _replace(model, rewrite)
    if n == 0:
        raise ConfigError(
            f"no Linear/Conv layer inside an nn.Sequential of {type(model).__name__} to normalise"
            + (" (the only one is the output layer; pass skip_last=False)" if layers else "")
        )
    return root


# ------------------------------------------------------------------------------------------ residual
class Residual(nn.Module):
    """``y = x + scale · branch(x)``: an identity path whose local Jacobian is I + scale·∂branch/∂x.

    With He-initialised ReLU branches the signal grows with depth (≈ √2 per unscaled block; see
    ``references.md``); ``scale = 1/√(number of blocks)`` keeps it bounded.
    """

    def __init__(self, branch: nn.Module, scale: float = 1.0):
        super().__init__()
        self.branch = branch
        self.scale = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.scale * self.branch(x)

    def extra_repr(self) -> str:
        return f"scale={self.scale:g}"


def _shape_preserving(m: nn.Module) -> bool:
    return _is_activation(m) or isinstance(m, _NORM_TYPES + _DROPOUT)


def add_residual(model: nn.Module, *, scale: float | None = 1.0, inplace: bool = False) -> nn.Module:
    """Wrap each run ``[Linear(d, d), activation, (norm, dropout, …)]`` inside an ``nn.Sequential`` as
    :class:`Residual` (``x + scale·f(x)``).

    A run starts at a square ``nn.Linear`` and takes the following shape-preserving modules
    (activations, normalisation, dropout) up to the next other module; it must contain an
    activation. ``scale=None`` uses ``1/√n_blocks`` over the whole model.

    >>> net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
    >>> [type(m).__name__ for m in add_residual(net)]
    ['Linear', 'ReLU', 'Residual', 'Linear']
    """
    model = _target(model, inplace)

    def runs(seq: nn.Sequential) -> list[tuple[int, int]]:
        kids = list(seq.children())
        out, i = [], 0
        while i < len(kids):
            m = kids[i]
            if isinstance(m, nn.Linear) and m.in_features == m.out_features:
                j = i + 1
                while j < len(kids) and _shape_preserving(kids[j]):
                    j += 1
                if any(_is_activation(k) for k in kids[i + 1 : j]):
                    out.append((i, j))
                    i = j
                    continue
            i += 1
        return out

    n_blocks = sum(len(runs(m)) for m in model.modules() if isinstance(m, nn.Sequential))
    if n_blocks == 0:
        raise ConfigError(
            f"no [Linear(d, d), activation] run inside an nn.Sequential of {type(model).__name__}: a residual "
            "connection needs a block whose input and output have the same shape"
        )
    s = n_blocks**-0.5 if scale is None else float(scale)

    def rewrite(m: nn.Module):
        if not isinstance(m, nn.Sequential):
            return None
        spans = runs(m)
        if not spans:
            return None
        named = list(m.named_children())
        items, i = [], 0
        for a, b in spans:
            items.extend(named[i:a])
            items.append((f"{named[a][0]}_res", Residual(nn.Sequential(OrderedDict(named[a:b])), s)))
            i = b
        items.extend(named[i:])
        return nn.Sequential(OrderedDict(items))

    return _replace(model, rewrite)[0]


# ------------------------------------------------------------------------------------------ recurrent
class LSTMAsRNN(nn.Module):
    """An ``nn.LSTM`` with ``nn.RNN``'s call signature: ``forward(input, hx=None) -> (output, h_n)``.

    ``hx`` is h_0 (c_0 starts at zero); the cell state is internal. Lets :func:`to_gated` replace an
    ``nn.RNN`` in a model whose ``forward`` unpacks ``out, h = self.rnn(x)``.
    """

    def __init__(self, lstm: nn.LSTM):
        super().__init__()
        self.lstm = lstm

    def forward(self, input, hx: torch.Tensor | None = None):
        if hx is None:
            out, (h, _) = self.lstm(input)
        else:
            out, (h, _) = self.lstm(input, (hx, torch.zeros_like(hx)))
        return out, h


def _rnn_kwargs(rnn: nn.RNN) -> dict:
    return dict(
        input_size=rnn.input_size, hidden_size=rnn.hidden_size, num_layers=rnn.num_layers, bias=rnn.bias,
        batch_first=rnn.batch_first, dropout=rnn.dropout, bidirectional=rnn.bidirectional,
    )


def to_gated(
    model: nn.Module, cell: str = "lstm", *, forget_bias: float = 1.0, keep_interface: bool = True, inplace: bool = False
) -> nn.Module:
    """Replace every ``nn.RNN`` by an ``nn.LSTM`` or ``nn.GRU`` with the same sizes and options.

    New cells start from torch's default init, on the RNN's device and dtype. For LSTM the forget
    gate bias is set to ``forget_bias`` (split over ``bias_ih`` and ``bias_hh``; Gers et al. 2000,
    Jozefowicz et al. 2015) so the cell state is kept by default. ``nn.GRU`` is a drop-in
    replacement; an LSTM returns ``(h, c)`` as its state, so with ``keep_interface`` it is wrapped in
    :class:`LSTMAsRNN` to keep ``nn.RNN``'s ``(output, h_n)``.

    >>> net = nn.Sequential(nn.RNN(3, 8))
    >>> type(to_gated(net, "gru")[0]).__name__, type(to_gated(net, "lstm")[0].lstm).__name__
    ('GRU', 'LSTM')
    """
    if cell not in ("lstm", "gru"):
        raise ConfigError(f"cell={cell!r}: choose 'lstm' or 'gru'")

    def rewrite(m: nn.RNN) -> nn.Module:
        ref = m.weight_hh_l0
        if cell == "gru":
            return _like(nn.GRU(**_rnn_kwargs(m)), ref)
        lstm = _like(nn.LSTM(**_rnn_kwargs(m)), ref)
        if m.bias:
            h = m.hidden_size
            with torch.no_grad():
                for name, p in lstm.named_parameters():
                    if name.startswith("bias"):
                        p[h : 2 * h] = forget_bias / 2.0  # gate order (i, f, g, o)
        return LSTMAsRNN(lstm) if keep_interface else lstm

    return _replace_rnns(model, rewrite, inplace)


class Leaky(nn.Module):
    """A single-layer ``nn.RNN`` made leaky: h_t = (1 − α)·h_{t−1} + α·φ(W_ih u_t + b_ih + W_hh h_{t−1} + b_hh).

    The wrapped module's own ``Parameter`` objects are used (an optimiser built on the ``nn.RNN`` keeps
    working), through :func:`gradprobe.functional.rnn.leaky_recurrence`. Its step Jacobian is
    (1 − α)·I + α·diag(φ'(a_t))·W_hh: the identity part carries gradient across many steps, at the price
    of slower state changes (Jaeger, Lukoševičius, Popovici & Siewert 2007; Bengio, Boulanger-Lewandowski
    & Pascanu 2013, "Advances in optimizing recurrent networks", §3.4). α = 1 is the ``nn.RNN`` itself.

    Same interface as the wrapped ``nn.RNN`` (single layer, unidirectional): input ``(T, B, I)``
    (``(B, T, I)`` with ``batch_first``, or unbatched ``(T, I)``), optional ``hx (1, B, H)``; returns
    ``(output (T, B, H), h_n (1, B, H))``. gradprobe's stand-alone leaky model is
    :class:`gradprobe.models.LeakyRNN`; this wrapper is what :func:`to_leaky` puts in place of an ``nn.RNN``.

    >>> rnn = Leaky(nn.RNN(3, 5), alpha=0.2)
    >>> out, h = rnn(torch.randn(7, 2, 3))
    >>> out.shape, h.shape
    (torch.Size([7, 2, 5]), torch.Size([1, 2, 5]))
    """

    def __init__(self, rnn: nn.RNN, alpha: float = 0.5):
        super().__init__()
        if not isinstance(rnn, nn.RNN) or rnn.num_layers != 1 or rnn.bidirectional:
            raise ConfigError(
                "Leaky wraps a single-layer unidirectional nn.RNN; got "
                + (repr(rnn) if isinstance(rnn, nn.Module) else type(rnn).__name__)
            )
        self.rnn = rnn
        self.alpha = _check_alpha(alpha)

    @property
    def hidden_size(self) -> int:
        return self.rnn.hidden_size

    @property
    def batch_first(self) -> bool:
        return self.rnn.batch_first

    def forward(self, input: torch.Tensor, hx: torch.Tensor | None = None):
        rnn = self.rnn
        unbatched = input.dim() == 2
        x = input.unsqueeze(1) if unbatched else (input.transpose(0, 1) if rnn.batch_first else input)  # (T, B, I)
        B = x.shape[1]
        h0 = x.new_zeros(B, rnn.hidden_size) if hx is None else hx.reshape(B, rnn.hidden_size)  # (1, B, H) / (1, H)
        drive = x @ rnn.weight_ih_l0.t()  # W_ih u_t (+ both biases) for all steps at once, (T, B, H)
        if rnn.bias:
            drive = drive + (rnn.bias_ih_l0 + rnn.bias_hh_l0)
        act = _activation(rnn.nonlinearity).fn
        out, h = leaky_recurrence(drive, rnn.weight_hh_l0, self.alpha, act, h0)  # (T, B, H), (B, H)
        h_n = h.unsqueeze(0)
        if unbatched:
            return out.squeeze(1), h_n.squeeze(1)
        return (out.transpose(0, 1) if rnn.batch_first else out), h_n

    def extra_repr(self) -> str:
        return f"alpha={self.alpha:g}"


class LeakyRNN(Leaky):
    """Deprecated: ``LeakyRNN(input_size, hidden_size, alpha=…)`` is ``Leaky(nn.RNN(input_size, hidden_size, …), alpha)``.

    gradprobe has one leaky RNN model, :class:`gradprobe.models.LeakyRNN`; to make an existing
    ``nn.RNN`` leaky use :func:`to_leaky` or :class:`Leaky`. This name maps its arguments onto
    :class:`Leaky` over a fresh ``nn.RNN`` (same default init, U(±1/√H); the parameters now live in
    ``self.rnn`` as ``weight_ih_l0`` …, where they were ``self.cell.weight_ih`` …) and goes away in
    the next release.
    """

    def __init__(self, input_size: int, hidden_size: int, *, alpha: float = 0.5, nonlinearity: str = "tanh",
                 bias: bool = True, batch_first: bool = False, device=None, dtype=None):
        warnings.warn(
            "gradprobe.remedies.LeakyRNN is deprecated: use gradprobe.models.LeakyRNN for a leaky model, or "
            "gradprobe.remedies.Leaky(nn.RNN(...), alpha) / to_leaky(model, alpha) to make an nn.RNN leaky",
            DeprecationWarning,
            stacklevel=2,
        )
        super().__init__(nn.RNN(input_size, hidden_size, nonlinearity=nonlinearity, bias=bias, batch_first=batch_first,
                                device=device, dtype=dtype), alpha)


def _check_alpha(alpha: float) -> float:
    if not (0.0 < float(alpha) <= 1.0):
        raise ConfigError(f"alpha={alpha} must be in (0, 1]: the fraction of the state renewed per step")
    return float(alpha)


def _replace_rnns(model: nn.Module, fn: Callable[[nn.RNN], nn.Module], inplace: bool) -> nn.Module:
    """Replace every plain ``nn.RNN`` by ``fn(rnn)`` (:func:`to_gated`, :func:`to_leaky`); those already
    wrapped in a :class:`Leaky` are left alone (rewriting them would break the wrapper)."""
    model = _target(model, inplace)
    wrapped = {id(m.rnn) for m in model.modules() if isinstance(m, Leaky)}
    root, n = _replace(model, lambda m: fn(m) if type(m) is nn.RNN and id(m) not in wrapped else None)
    if n == 0:
        raise ConfigError(f"no nn.RNN module found in {type(model).__name__}")
    return root


def to_leaky(model: nn.Module, alpha: float = 0.5, *, inplace: bool = False) -> nn.Module:
    """Wrap every single-layer, unidirectional ``nn.RNN`` in :class:`Leaky` with leak ``alpha``: the
    *same* parameters, so ``alpha=1`` computes exactly what the model computed before.

    >>> net = nn.Sequential(nn.RNN(3, 8))
    >>> type(to_leaky(net, 0.3)[0]).__name__
    'Leaky'
    """
    alpha = _check_alpha(alpha)

    def rewrite(m: nn.RNN) -> nn.Module:
        if m.num_layers != 1 or m.bidirectional:
            raise ConfigError(
                f"to_leaky supports single-layer unidirectional nn.RNN; got num_layers={m.num_layers}, "
                f"bidirectional={m.bidirectional}"
            )
        return Leaky(m, alpha)

    return _replace_rnns(model, rewrite, inplace)
