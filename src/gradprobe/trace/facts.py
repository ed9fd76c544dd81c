"""What a model is made of (:class:`ModelFacts`), measured once by the probe and saved with the run.

The diagnosis ranks remedies from these facts and compares the depth profile with mean-field theory
using :class:`MLPFacts`, so a run log holding them is diagnosed exactly as the live model was.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from gradprobe.errors import RunLogError

__all__ = ["ModelFacts", "MLPFacts", "LinearStats"]


@dataclass(frozen=True)
class LinearStats:
    """One ``nn.Linear`` of a plain MLP: its size and the mean squares of its weight and bias entries.

    ``σ_w² = in_features · weight_ms`` and ``σ_b² = bias_ms`` are the variances mean-field theory
    (Poole et al. 2016; Schoenholz et al. 2017) assumes for ``W_ij ~ N(0, σ_w²/N)``, ``b ~ N(0, σ_b²)``.
    """

    name: str
    in_features: int
    out_features: int
    weight_ms: float
    bias_ms: float  # 0.0 without a bias


@dataclass(frozen=True)
class MLPFacts:
    """A plain MLP ``h^l = W^l φ(h^{l−1}) + b^l`` with one activation type: what mean-field theory needs.

    ``activation`` is the name :func:`gradprobe.theory.mean_field` knows (``"tanh"``, ``"relu"`` ...),
    ``slope`` the LeakyReLU slope (else ``None``); ``linears`` every ``nn.Linear`` in discovery order,
    with its weight statistics at the time the facts were taken.
    """

    activation: str
    slope: float | None
    linears: tuple[LinearStats, ...]


@dataclass(frozen=True)
class ModelFacts:
    """What the diagnosis may want to know about a model's building blocks (found by module type).

    Functional activations (``torch.sigmoid`` inside ``forward``) are invisible here; rules treat
    these facts as hints for ranking remedies and for deciding which remedies fit the model, never
    as evidence. Tuples hold sorted module class names.

    Attributes:
        saturating: sigmoid/tanh-like activation modules (``|φ′| ≤ 1/4`` resp. ``≤ 1``, Glorot & Bengio 2010).
        relu_family: ReLU-like activation modules (He et al. 2015).
        normalization: BatchNorm / LayerNorm / GroupNorm / InstanceNorm modules.
        recurrent: every recurrent module (``nn.RNNBase`` and ``nn.RNNCellBase`` subclasses, and
            gradprobe's own hand-written recurrences such as ``SigmoidRNN`` and ``Leaky``).
        attention: ``nn.MultiheadAttention`` modules.
        n_layers: modules that own parameters directly (see ``gradprobe.probe.layers.find_layers``).
        mlp: set for a plain MLP that mean-field theory describes (see :class:`MLPFacts`), else ``None``.
        vanilla_recurrent: recurrent modules without gates (``nn.RNN``, ``nn.RNNCell``, gradprobe's
            hand-written ones; an ``nn.RNN`` wrapped in gradprobe's ``Leaky`` is listed as ``Leaky``): their
            step Jacobian is ``W_hhᵀ diag(φ′)`` (Pascanu et al. 2013), the case gated cells were made for.
            A recurrence written in some other module's ``forward`` cannot be seen.
        gated_recurrent: ``nn.LSTM`` / ``nn.GRU`` and their cells (Hochreiter & Schmidhuber 1997;
            Cho et al. 2014).
        skip_connections: modules *known* to add an identity path ``x + f(x)`` (He et al. 2016):
            gradprobe's ``Residual`` and ``ResidualBlock`` (``DeepMLP(residual=True)``), ``nn.TransformerEncoderLayer``
            / ``nn.TransformerDecoderLayer`` and torchvision's ResNet blocks. A skip written inside
            some other module's ``forward`` cannot be seen from the module tree and is not listed.
        plain_mlp: every module that computes something is an ``nn.Linear``, an elementwise activation,
            a normalisation, dropout, ``nn.Identity`` or ``nn.Flatten`` (and there is at least one
            ``nn.Linear``); broader than ``mlp``, which mean-field theory needs.
        square_linears: number of ``nn.Linear(d, d)`` layers: blocks a residual connection can wrap.
        sequential_layers: ``nn.Linear`` / ``nn.ConvNd`` layers that are direct children of an
            ``nn.Sequential`` (a layer can be inserted after them without rewriting a ``forward``).
        forget_bias: the smallest mean forget-gate bias ``b_ih + b_hh`` over the LSTM layers (``None``
            without LSTMs): σ(b) is the cell state's gradient gain per step at zero input (Gers et al. 2000).
    """

    saturating: tuple[str, ...]
    relu_family: tuple[str, ...]
    normalization: tuple[str, ...]
    recurrent: tuple[str, ...]
    attention: tuple[str, ...]
    n_layers: int
    mlp: MLPFacts | None = None
    vanilla_recurrent: tuple[str, ...] = ()
    gated_recurrent: tuple[str, ...] = ()
    skip_connections: tuple[str, ...] = ()
    plain_mlp: bool = False
    square_linears: int = 0
    sequential_layers: int = 0
    forget_bias: float | None = None

    def as_dict(self) -> dict:
        """Plain JSON values (tuples become lists)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelFacts:
        """Inverse of :meth:`as_dict`; fields a newer gradprobe added are ignored, missing ones take defaults."""
        try:
            known = {f.name for f in dataclasses.fields(cls)}
            kw = {k: v for k, v in d.items() if k in known}
            for k, v in kw.items():
                if isinstance(v, list):
                    kw[k] = tuple(v)
            mlp = kw.get("mlp")
            if mlp is not None:
                kw["mlp"] = MLPFacts(mlp["activation"], mlp["slope"], tuple(LinearStats(**s) for s in mlp["linears"]))
            return cls(**kw)
        except (TypeError, KeyError, AttributeError) as exc:
            raise RunLogError(f"the model facts saved in this run log are malformed: {exc}") from exc
