"""The remedy catalogue: every remedy gradprobe names is one :class:`Remedy` object.

A remedy says what it is (``id``, ``title``), why it works (``why``, citing the paper), whether it
fits a model (:meth:`Remedy.why_not` on the model's :class:`~gradprobe.trace.ModelFacts`, with the
reason when it does not), and how it is applied: model transforms (:class:`Call` s of this package's
functions, run on a copy by :meth:`Remedy.apply`) and/or a :class:`TrainingChange` (learning-rate
scale, gradient-norm clipping, optimizer, Pascanu's Ω regulariser). The text of the call a user
reads (:attr:`Remedy.call`) is derived from those objects, never written by hand.

The diagnosis (``gradprobe.diagnosis``) ranks catalogue remedies per verdict and keeps only those
that fit (:func:`remedies_for`); the equal-budget trials (``gradprobe.experiments.trials``) apply the
very same objects.

>>> r = CATALOGUE["relu_activation"]
>>> r.call
'gradprobe.remedies.swap_activations(model, (nn.Sigmoid, nn.Tanh), nn.ReLU); gradprobe.remedies.initialize_(model, "he")'
>>> from gradprobe.trace import ModelFacts
>>> lstm_lm = ModelFacts((), (), (), ("Embedding", "LSTM"), (), 3, gated_recurrent=("LSTM",))
>>> CATALOGUE["gated_cells"].why_not(lstm_lm)
'the recurrent layers are already gated (LSTM)'
"""
from __future__ import annotations

import copy
import math
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from types import MappingProxyType

import torch
from torch import nn

from gradprobe.errors import ConfigError
from gradprobe.remedies.clipping import ClipStep, clip_grad_norm_
from gradprobe.remedies.init import forget_bias_, initialize_
from gradprobe.remedies.omega import PascanuRegularizer
from gradprobe.remedies.pretraining import greedy_layerwise_pretrain_, make_rprop
from gradprobe.remedies.transforms import add_residual, insert_normalization, swap_activations, to_gated
from gradprobe.trace import ModelFacts

__all__ = ["Call", "TrainingChange", "Remedy", "CATALOGUE", "remedies_for", "MODEL"]


# ------------------------------------------------------------------------------------------ calls
class _Placeholder:
    """An argument shown by name in a call's text: the model, or data only the user has."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


#: stands for the model in a :class:`Call`'s arguments
MODEL = _Placeholder("model")


def public_name(obj) -> str:
    """The shortest importable dotted path of a function or class, e.g. ``gradprobe.remedies.initialize_``
    for ``gradprobe.remedies.init.initialize_`` (the package re-exports it); ``nn.ReLU`` for torch.nn classes."""
    if isinstance(obj, type) and getattr(nn, obj.__name__, None) is obj:
        return f"nn.{obj.__name__}"
    parts = obj.__module__.split(".")
    for k in range(1, len(parts) + 1):
        mod = sys.modules.get(".".join(parts[:k]))
        if mod is not None and getattr(mod, obj.__qualname__, None) is obj:
            return f"{'.'.join(parts[:k])}.{obj.__qualname__}"
    return f"{obj.__module__}.{obj.__qualname__}"


def _show(value) -> str:
    if isinstance(value, _Placeholder):
        return value.name
    if isinstance(value, tuple):
        inner = ", ".join(_show(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    if isinstance(value, type) or callable(value):
        return public_name(value)
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


@dataclass(frozen=True)
class Call:
    """``fn(*args, **kwargs)`` with :data:`MODEL` standing for the model; calling it on a model runs it.

    A transform returns the changed model (or changes it in place and returns it, like ``initialize_``).

    >>> str(Call(initialize_, (MODEL, "xavier")))
    'gradprobe.remedies.initialize_(model, "xavier")'
    """

    fn: Callable
    args: tuple = ()
    kwargs: tuple[tuple[str, object], ...] = ()

    def __call__(self, model: nn.Module) -> nn.Module:
        args = tuple(model if a is MODEL else a for a in self.args)
        out = self.fn(*args, **dict(self.kwargs))
        return model if out is None else out

    def __str__(self) -> str:
        shown = [_show(a) for a in self.args] + [f"{k}={_show(v)}" for k, v in self.kwargs]
        return f"{public_name(self.fn)}({', '.join(shown)})"


# ------------------------------------------------------------------------------------------ training
_OPTIMIZERS = ("sgd", "momentum", "rprop")


@dataclass(frozen=True)
class TrainingChange:
    """How a remedy changes the training loop; the defaults change nothing.

    Attributes:
        lr_scale: multiply the learning rate (``0.1``: "lower the learning rate").
        clip_norm: rescale ``g ← c·g/‖g‖`` when ``‖g‖ ≥ c`` before every optimizer step, over all
            parameters concatenated (Pascanu, Mikolov & Bengio 2013, Algorithm 1).
        optimizer: ``"sgd"``; ``"momentum"`` (SGD with momentum 0.9, Polyak 1964); ``"rprop"``
            (sign-based, Riedmiller & Braun 1993; its own initial step 0.01, full batch only).
        omega: weight α of Pascanu et al.'s (2013, eq. 9) regulariser Ω on the model's ``nn.RNN``
            (its code default is 2; the paper warns Ω needs clipping beside it).
        warmup: steps of a linear learning-rate warm-up: step ``s`` (0-based) uses ``lr · min(1, (s+1)/warmup)``
            (Goyal et al. 2017, "gradual warmup"); 0: none.
        skip_spikes: skip the update of a step whose gradient spikes (``gradprobe.Probe(on_spike="skip")``:
            parameters and optimizer state stay as they were).
    """

    lr_scale: float = 1.0
    clip_norm: float | None = None
    optimizer: str = "sgd"
    omega: float = 0.0
    warmup: int = 0
    skip_spikes: bool = False

    def __post_init__(self):
        if not (self.lr_scale > 0 and math.isfinite(self.lr_scale)):
            raise ConfigError(f"lr_scale={self.lr_scale} must be a finite number > 0")
        if self.clip_norm is not None and not (self.clip_norm > 0):
            raise ConfigError(f"clip_norm={self.clip_norm} must be > 0 (or None for no clipping)")
        if self.optimizer not in _OPTIMIZERS:
            raise ConfigError(f"optimizer={self.optimizer!r}: choose one of {_OPTIMIZERS}")
        if not (self.omega >= 0 and math.isfinite(self.omega)):
            raise ConfigError(f"omega={self.omega} must be a finite weight >= 0")
        if isinstance(self.warmup, bool) or int(self.warmup) != self.warmup or self.warmup < 0:
            raise ConfigError(f"warmup={self.warmup!r} must be a whole number of steps >= 0")

    def lr_factor(self, step: int) -> float:
        """The warm-up's factor on the learning rate at 0-based ``step`` (1 without a warm-up)."""
        return 1.0 if self.warmup <= 1 else min(1.0, (step + 1) / self.warmup)

    @property
    def changes_nothing(self) -> bool:
        return self == TrainingChange()

    def changed(self) -> dict:
        """The fields that differ from :class:`TrainingChange` ``()`` (plain JSON values)."""
        base = TrainingChange()
        return {f: getattr(self, f) for f in self.__dataclass_fields__ if getattr(self, f) != getattr(base, f)}

    def make_optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        """The optimizer over ``model``'s parameters at learning rate ``lr · lr_scale``."""
        if self.optimizer == "rprop":
            return make_rprop(model)
        return torch.optim.SGD(model.parameters(), lr=lr * self.lr_scale,
                               momentum=0.9 if self.optimizer == "momentum" else 0.0)

    def regulariser(self, model: nn.Module) -> PascanuRegularizer | None:
        """Pascanu's Ω on the model's one ``nn.RNN`` when ``omega > 0`` (close it after training)."""
        return PascanuRegularizer(model) if self.omega > 0 else None

    def clip_(self, parameters) -> ClipStep | None:
        """Clip the gradient norm in place when ``clip_norm`` is set."""
        return None if self.clip_norm is None else clip_grad_norm_(parameters, self.clip_norm)

    def __str__(self) -> str:
        parts = []
        if self.lr_scale != 1.0:
            parts.append(f"learning rate × {self.lr_scale:g}")
        if self.optimizer == "momentum":
            parts.append(f"{public_name(torch.optim.SGD)}(model.parameters(), lr, momentum=0.9)")
        elif self.optimizer == "rprop":
            parts.append(f"{public_name(make_rprop)}(model) (full batch)")
        if self.omega > 0:
            parts.append(f"loss + {self.omega:g}·Ω with {public_name(PascanuRegularizer)}(model)")
        if self.warmup > 0:
            parts.append(f"{public_name(torch.optim.lr_scheduler.LinearLR)}(optimizer, start_factor={1 / self.warmup:.3g}, "
                         f"total_iters={self.warmup}) (a linear warm-up over the first {self.warmup} steps)")
        if self.clip_norm is not None:
            parts.append(f"{public_name(clip_grad_norm_)}(model.parameters(), {self.clip_norm!r}) before "
                         "every optimizer.step()")
        if self.skip_spikes:
            parts.append('gradprobe.Probe(model, on_spike="skip") with probe.step(loss) before optimizer.step()')
        return "; ".join(parts)


# ------------------------------------------------------------------------------------------ remedy
def _always(facts: ModelFacts) -> str | None:
    return None


@dataclass(frozen=True)
class Remedy:
    """One remedy: what it is, why it works, whether it fits a model, and how it is applied.

    Attributes:
        id: stable identifier (``"relu_activation"``).
        title: one line a person reads.
        why: the mechanism, citing the paper by name.
        calls: model transforms applied in order to a copy of the model by :meth:`apply`.
        training: how the training loop changes (:class:`TrainingChange`).
        by_hand: a call the user makes in their own code (it needs their data or a code change),
            shown in :attr:`call` but never run by gradprobe.
        check: ``facts -> reason`` the remedy does not fit (``None``: it fits); see :meth:`why_not`.
        fit: ``facts -> calls`` adapted to the model (e.g. Xavier instead of He for sigmoid/tanh);
            :meth:`for_model` applies it.
    """

    id: str
    title: str
    why: str
    calls: tuple[Call, ...] = ()
    training: TrainingChange = field(default_factory=TrainingChange)
    by_hand: Call | None = None
    check: Callable[[ModelFacts], str | None] = _always
    fit: Callable[[ModelFacts], tuple[Call, ...]] | None = None

    # -------------------------------------------------------------- fitting the model
    def why_not(self, facts: ModelFacts | None) -> str | None:
        """Why this remedy does not fit a model with these ``facts`` (``None`` when it fits, or when the
        facts are unknown)."""
        return None if facts is None else self.check(facts)

    def applies_to(self, facts: ModelFacts | None) -> bool:
        return self.why_not(facts) is None

    def for_model(self, facts: ModelFacts | None) -> Remedy:
        """This remedy with its calls adapted to the model (itself when there is nothing to adapt)."""
        if facts is None or self.fit is None:
            return self
        calls = self.fit(facts)
        return self if calls == self.calls else replace(self, calls=calls)

    # -------------------------------------------------------------- applying it
    @property
    def trialable(self) -> bool:
        """gradprobe can apply it by itself (a transform or a training change), e.g. in a short trial."""
        return bool(self.calls) or not self.training.changes_nothing

    def apply(self, model: nn.Module) -> nn.Module:
        """A copy of ``model`` with :attr:`calls` applied in order (the model itself is not changed).
        Raises :class:`~gradprobe.errors.ConfigError` when a transform finds nothing to change."""
        out = copy.deepcopy(model)
        for c in self.calls:
            out = c(out)
        return out

    @property
    def call(self) -> str:
        """The call(s) that apply it, as text derived from :attr:`calls`, :attr:`training` and :attr:`by_hand`."""
        parts = [str(c) for c in self.calls]
        if not self.training.changes_nothing:
            parts.append(str(self.training))
        if self.by_hand is not None:
            parts.append(str(self.by_hand))
        return "; ".join(parts)

    @property
    def api(self) -> str:
        """Deprecated name of :attr:`call`."""
        warnings.warn("Remedy.api is deprecated; use Remedy.call (derived from the remedy's calls)",
                      DeprecationWarning, stacklevel=2)
        return self.call

    def as_dict(self) -> dict:
        """``{"id", "title", "why", "call", "trialable"}`` (JSON-ready), and ``"training"`` (the fields of
        :attr:`training` that differ from no change) when it changes the training loop, so that a remedy
        adapted to a run (e.g. a clipping threshold measured from its norms) reads back as it was."""
        d = {"id": self.id, "title": self.title, "why": self.why, "call": self.call, "trialable": self.trialable}
        if not self.training.changes_nothing:
            d["training"] = self.training.changed()
        return d

    def with_saved(self, saved: dict) -> Remedy:
        """This remedy with the training change a saved :meth:`as_dict` holds (itself when it holds none
        or the same one)."""
        fields = saved.get("training")
        if fields is None:
            return self
        change = TrainingChange(**fields)
        return self if change == self.training else replace(self, training=change)

    def __str__(self) -> str:
        call = self.call
        return f"{self.title}: {self.why}" + (f" [{call}]" if call else "")


# ------------------------------------------------------------------------------------------ checks
def _swappable(facts: ModelFacts) -> str | None:
    if {"Sigmoid", "Tanh"} & set(facts.saturating):
        return None
    return ("no nn.Sigmoid / nn.Tanh module to swap (an activation called inside forward, or inside a "
            "recurrent cell such as nn.RNN(nonlinearity='tanh'), cannot be swapped)")


def _has_relu(facts: ModelFacts) -> str | None:
    return None if "ReLU" in facts.relu_family else "no nn.ReLU module to replace"


def _feedforward(facts: ModelFacts) -> str | None:
    if facts.recurrent:
        return (f"the model is recurrent ({', '.join(facts.recurrent)}): He/Xavier scale feed-forward fan-in; "
                "initialise recurrent weights orthogonally instead (orthogonal_init)")
    return None


def _residual_fits(facts: ModelFacts) -> str | None:
    if facts.skip_connections:
        return f"the model already has skip connections ({', '.join(facts.skip_connections)})"
    if facts.recurrent or not facts.plain_mlp:
        return "add_residual wraps [Linear(d, d), activation] blocks of a plain MLP; this model has other layers"
    if facts.square_linears == 0:
        return "no Linear(d, d) layer: a skip connection needs a block whose input and output have the same shape"
    return None


def _normalization_fits(facts: ModelFacts) -> str | None:
    if facts.normalization:
        return f"the model is already normalised ({', '.join(facts.normalization)})"
    if facts.recurrent or facts.attention:
        return ("insert_normalization adds BatchNorm after feed-forward Linear/Conv layers; it cannot normalise "
                "inside recurrent cells or attention (a layer-normalised cell, Ba et al. 2016, is a code change)")
    if facts.sequential_layers < 2:
        return ("insert_normalization adds a layer after the hidden Linear/Conv layers of an nn.Sequential; "
                "this model's hidden layers sit in a custom forward (add the normalisation there)")
    return None


def _has_skips(facts: ModelFacts) -> str | None:
    if facts.skip_connections:
        return None
    return "no skip connection found in the model, so there is no residual branch to scale"


def _vanilla_rnn(facts: ModelFacts) -> str | None:
    if "RNN" in facts.vanilla_recurrent:
        return None
    if facts.gated_recurrent:
        return f"the recurrent layers are already gated ({', '.join(facts.gated_recurrent)})"
    return "no nn.RNN module (a hand-written recurrent cell must be changed in its own code)"


def _lstm(facts: ModelFacts) -> str | None:
    if {"LSTM", "LSTMCell"} & set(facts.gated_recurrent):
        return None
    return "no nn.LSTM / nn.LSTMCell: a forget gate belongs to an LSTM"


def _lstm_closed_gate(facts: ModelFacts) -> str | None:
    """The forget-bias remedy fits an LSTM whose forget-gate bias is below 1 (torch's default is ≈ 0)."""
    if (why := _lstm(facts)) is not None:
        return why
    if facts.forget_bias is not None and facts.forget_bias >= 1.0 - 1e-6:
        return (f"the LSTM forget-gate bias is already {facts.forget_bias:.3g} (≥ 1); for a horizon of T steps "
                "a bias near ln T keeps σ(b)^T ≈ 1/e (Tallec & Ollivier 2018): gradprobe.remedies.forget_bias_(model, "
                "math.log(T))")
    return None


def _recurrent(facts: ModelFacts) -> str | None:
    return None if facts.recurrent else "the model has no recurrent layer"


def _pretrainable(facts: ModelFacts) -> str | None:
    if facts.plain_mlp and not facts.skip_connections and facts.sequential_layers >= 2:
        return None
    return "greedy layer-wise pre-training is for a plain nn.Sequential MLP"


def _fan_in_init(facts: ModelFacts) -> tuple[Call, ...]:
    scheme = "xavier" if facts.saturating and not facts.relu_family else "he"
    return (Call(initialize_, (MODEL, scheme)),)


# ------------------------------------------------------------------------------------------ catalogue
_REMEDIES = (
    Remedy("relu_activation", "Use a non-saturating activation (ReLU, LeakyReLU, ELU, SELU)",
           "sigmoid/tanh have |φ′| ≤ 1/4 resp. ≤ 1 and near 0 when saturated, so every layer multiplies the "
           "back-propagated signal by a small factor (Hochreiter 1991; Glorot & Bengio 2010); ReLU's φ′ is 1 "
           "where active (Glorot, Bordes & Bengio 2011), with He et al.'s (2015) init to keep the gain near 1",
           calls=(Call(swap_activations, (MODEL, (nn.Sigmoid, nn.Tanh), nn.ReLU)), Call(initialize_, (MODEL, "he"))),
           check=_swappable),
    Remedy("he_init", "Initialise with He (Kaiming) for ReLU or Xavier/Glorot for tanh/sigmoid",
           "a weight variance of 2/fan_in (ReLU) or 2/(fan_in+fan_out) keeps the per-layer gain near 1 "
           "(He et al. 2015; Glorot & Bengio 2010)",
           calls=(Call(initialize_, (MODEL, "he")),), check=_feedforward, fit=_fan_in_init),
    Remedy("residual", "Add residual (skip) connections",
           "an identity path has local Jacobian I, so the signal reaches early layers undiminished "
           "(He et al. 2016, deep residual learning); the branches are scaled by 1/√blocks to keep it bounded",
           calls=(Call(add_residual, (MODEL,), (("scale", None),)),), check=_residual_fits),
    Remedy("normalization", "Insert BatchNorm after each hidden layer",
           "normalising each layer's pre-activations keeps them out of saturation (Ioffe & Szegedy 2015)",
           calls=(Call(insert_normalization, (MODEL, "batch")),), check=_normalization_fits),
    Remedy("gated_cells", "Use gated recurrent cells (LSTM/GRU)",
           "the LSTM's cell state c_t = f_t⊙c_{t−1} + … is a constant error carousel that carries the gradient "
           "across time (Hochreiter & Schmidhuber 1997; forget bias 1, Gers et al. 2000)",
           calls=(Call(to_gated, (MODEL, "lstm")),), check=_vanilla_rnn),
    Remedy("forget_bias", "Initialise the LSTM forget-gate bias to 1",
           "∂c_t/∂c_{t−1} = diag(f_t): with torch's default bias f ≈ 1/2 halves the cell-state gradient per step; "
           "a forget bias of 1 keeps it (Gers, Schmidhuber & Cummins 2000; Jozefowicz et al. 2015)",
           calls=(Call(forget_bias_, (MODEL, 1.0)),), check=_lstm_closed_gate),
    Remedy("orthogonal_init", "Initialise the weights orthogonally",
           "an orthogonal recurrent matrix has every singular value 1, so the product of step Jacobians neither "
           "shrinks nor grows through the linear part (Saxe, McClelland & Ganguli 2014; Pascanu et al. 2013: "
           "vanishing is guaranteed when the largest singular value is below 1/γ)",
           calls=(Call(initialize_, (MODEL, "orthogonal")),), check=_recurrent),
    Remedy("pretraining", "Greedy layer-wise pre-training, then fine-tune",
           "each layer is trained as an autoencoder while the network is still shallow, so its gradient does "
           "not cross the whole depth (Hinton, Osindero & Teh 2006; Bengio et al. 2007)",
           by_hand=Call(greedy_layerwise_pretrain_, (MODEL, _Placeholder("data"))), check=_pretrainable),
    Remedy("rprop", "Use a sign-based optimiser (Rprop)",
           "Rprop's step ignores the gradient's magnitude, so tiny gradients still move the weights "
           "(Riedmiller & Braun 1993); full batch only",
           training=TrainingChange(optimizer="rprop")),
    Remedy("clip_norm", "Clip the gradient norm",
           "rescale g to threshold·g/‖g‖ when ‖g‖ ≥ threshold, choosing it 0.5–10× the average norm "
           "(Pascanu, Mikolov & Bengio 2013, Algorithm 1)",
           training=TrainingChange(clip_norm=1.0)),
    Remedy("smaller_init", "Reduce the initial weight scale",
           "the per-layer gain grows with the weight variance; fan-in scaled inits keep it near 1 "
           "(LeCun et al. 1998; Glorot & Bengio 2010)",
           calls=(Call(initialize_, (MODEL, "xavier")),), check=_feedforward),
    Remedy("scale_residual", "Scale residual branches down (e.g. by 1/√depth) or zero-init their last layer",
           "an unscaled ReLU block x + V·relu(W x) multiplies the signal by about √(1 + σ_w²σ_v²/2): "
           "√2 with He on W only, √3 with He on both (Hanin & Rolnick 2018; Zhang, Dauphin & Ma 2019, Fixup)",
           check=_has_skips),
    Remedy("lower_lr", "Lower the learning rate",
           "large steps amplify explosive directions and can jump across the cliffs of the loss surface "
           "(Pascanu, Mikolov & Bengio 2013)",
           training=TrainingChange(lr_scale=0.1)),
    Remedy("check_inputs", "Check the data and the loss for NaN/Inf and unsafe ops",
           "log(0), division by zero, sqrt at 0 in the backward pass, or overflow in half precision, where "
           "float16's range ends at 65504 (Micikevicius et al. 2018, mixed-precision training)"),
    Remedy("anomaly_mode", "Locate the op with torch.autograd.detect_anomaly()",
           "it raises at the first backward op that produces NaN, naming the forward op that created it "
           "(PyTorch's anomaly detection; Paszke et al. 2019)",
           by_hand=Call(torch.autograd.detect_anomaly)),
    Remedy("leaky_activation", "Use LeakyReLU instead of ReLU",
           "a non-zero slope for negative inputs lets dead units recover (Maas, Hannun & Ng 2013)",
           calls=(Call(swap_activations, (MODEL, nn.ReLU, nn.LeakyReLU)),), check=_has_relu),
    Remedy("pascanu_omega", "Add Pascanu's Ω regulariser (with norm clipping)",
           "Ω pushes ‖(∂E/∂x_{k+1})·∂x_{k+1}/∂x_k‖ toward ‖∂E/∂x_{k+1}‖ so the error signal keeps its norm back "
           "in time (Pascanu, Mikolov & Bengio 2013, eq. 9); the regulariser alone without clipping usually fails",
           training=TrainingChange(clip_norm=1.0, omega=2.0), check=_vanilla_rnn),
    Remedy("lr_warmup", "Warm the learning rate up over the first steps",
           "a linear warm-up keeps the early updates small while the loss surface's sharpness and adaptive "
           "optimizers' second-moment estimates settle, the usual cause of early loss and gradient spikes "
           "(Goyal et al. 2017, gradual warmup; Liu et al. 2020, on the variance of the adaptive learning rate)",
           training=TrainingChange(warmup=100)),
    Remedy("skip_spikes", "Skip the update of a spiking step",
           "a step whose gradient norm jumps far above its rolling median is usually one bad batch or a "
           "cliff of the loss surface (Pascanu, Mikolov & Bengio 2013); skipping its update leaves the "
           "parameters and the optimizer state as they were (every rank together under DDP; Chowdhery et al. "
           "2022 restart before a spike and skip its batches)",
           training=TrainingChange(skip_spikes=True)),
    Remedy("escape_saddle", "Keep training with noise or momentum",
           "the gradient is small only because the point is a saddle: a descent direction of negative curvature "
           "exists, and SGD's noise or momentum leaves it (Dauphin et al. 2014; Ge et al. 2015)",
           training=TrainingChange(optimizer="momentum")),
)

#: every remedy by id (read-only)
CATALOGUE = MappingProxyType({r.id: r for r in _REMEDIES})


def remedies_for(facts: ModelFacts | None, *ids: str) -> tuple[Remedy, ...]:
    """The catalogue remedies ``ids``, in that (ranked) order, that fit a model with ``facts``, each
    adapted to it (:meth:`Remedy.for_model`). With ``facts=None`` nothing is known: all of them, as they are.

    >>> lstm_lm = ModelFacts((), (), (), ("LSTM",), (), 3, gated_recurrent=("LSTM",))
    >>> [r.id for r in remedies_for(lstm_lm, "gated_cells", "forget_bias", "residual", "clip_norm")]
    ['forget_bias', 'clip_norm']
    """
    unknown = [i for i in ids if i not in CATALOGUE]
    if unknown:
        raise ConfigError(f"unknown remedy id(s) {unknown}; the catalogue has {sorted(CATALOGUE)}")
    return tuple(CATALOGUE[i].for_model(facts) for i in ids if CATALOGUE[i].applies_to(facts))
