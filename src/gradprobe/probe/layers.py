"""Which modules are layers, and what a model is made of.

A *layer* is a module that owns at least one parameter directly (``recurse=False``); containers
(``nn.Sequential``, a block that only holds sub-modules) are not layers. A module reached under two
names (shared weights) is one layer, reported under its first qualified name. The model itself, if it
owns a parameter, is named after its class (``"Net"``), or ``"Net#2"``, ... if a child already has
that name: layer names are unique.
"""
from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from gradprobe.errors import ConfigError, ProbeStateError
from gradprobe.trace import LinearStats, MLPFacts, ModelFacts

__all__ = ["Layer", "ParamWatch", "find_layers", "iter_tensors", "model_facts", "param_entries"]


@dataclass(frozen=True, eq=False)
class Layer:
    index: int  # position in discovery (named_modules) order
    name: str
    module: nn.Module
    params: tuple[nn.Parameter, ...]

    @property
    def kind(self) -> str:
        return type(self.module).__name__

    def current_params(self) -> tuple[nn.Parameter, ...]:
        """The module's own parameters as it holds them now (``params`` is what it held at discovery; a
        parameter assigned in place of another, e.g. by ``load_state_dict(..., assign=True)``, differs)."""
        return tuple(self.module.parameters(recurse=False))


def find_layers(model: nn.Module) -> list[Layer]:
    """Modules owning parameters directly, in ``named_modules()`` order (one entry per module object)."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"gradprobe probes a torch.nn.Module; got {type(model).__name__}")
    found = [(name, m, params) for name, m in model.named_modules(remove_duplicate=True)
             if (params := tuple(m.parameters(recurse=False)))]
    taken = {name for name, _, _ in found if name}
    layers: list[Layer] = []
    for name, m, params in found:
        if not name:  # the model itself: its class name, unless a child is called that
            name, k = type(m).__name__, 1
            while name in taken:
                k += 1
                name = f"{type(m).__name__}#{k}"
        layers.append(Layer(len(layers), name, m, params))
    return layers


def param_entries(layers: Sequence[Layer]) -> list:
    """Every layer's own parameters as its module holds them *now*, layer by layer (the entries of each
    module's ``_parameters``, ``None`` left out; a parameter shared by two layers is listed under both).

    The one per-step read behind :meth:`ParamWatch.refresh` and the session's ``.grad`` checks: a list
    comprehension, re-read on every call so that a replaced parameter (``load_state_dict(..., assign=True)``,
    ``layer.weight = nn.Parameter(...)``) or a replaced dict is never missed (measured: 8 µs for 60 layers,
    within 10 % of walking dicts held since the probe opened)."""
    return [p for l in layers for p in l.module._parameters.values() if p is not None]


class ParamWatch:
    """The layers' own parameters as their modules hold them now, re-read cheaply every step.

    ``params`` is the flat list (layer by layer, each layer's :meth:`Layer.current_params`) and
    ``owner[k]`` the layer index of ``params[k]``. :meth:`refresh` notices a parameter *replaced* by
    another under the same name (``load_state_dict(..., assign=True)``, ``layer.weight = nn.Parameter(...)``)
    and follows it, so nothing is read from a stale object; a layer that *gained or lost* a parameter
    (a parametrization moves ``weight`` into a sub-module; ``del layer.bias``) changed what it is, and
    :meth:`refresh` raises :class:`~gradprobe.errors.ProbeStateError` naming it.
    """

    def __init__(self, layers: Sequence[Layer]):
        self.layers = tuple(layers)
        self._names = [self._names_of(l) for l in self.layers]
        self._raw = param_entries(self.layers)
        self._rebuild()

    @staticmethod
    def _names_of(layer: Layer) -> tuple[str, ...]:
        return tuple(n for n, p in layer.module._parameters.items() if p is not None)

    def _rebuild(self) -> None:
        per = [l.current_params() for l in self.layers]
        self.params: list[nn.Parameter] = [p for ps in per for p in ps]
        self.owner: list[int] = [l.index for l, ps in zip(self.layers, per) for _ in ps]

    def refresh(self) -> bool:
        """Re-read the parameters; ``True`` if some were replaced since the last call (``params`` follows)."""
        raw = param_entries(self.layers)
        if len(raw) == len(self._raw) and not any(map(operator.is_not, raw, self._raw)):
            return False
        for l, names in zip(self.layers, self._names):
            now = self._names_of(l)
            if now != names:
                gone, new = sorted(set(names) - set(now)), sorted(set(now) - set(names))
                what = "; ".join(x for x in (f"lost {gone}" if gone else "", f"gained {new}" if new else "") if x)
                raise ProbeStateError(
                    f"layer {l.name!r} ({l.kind}) {what} since the probe opened (it had {list(names)}): a "
                    "parametrization, an adapter or a deleted parameter changes what the layer is. Close the "
                    "probe and open a new one after changing the model's structure"
                )
        self._raw = raw
        self._rebuild()
        return True


def iter_tensors(obj) -> Iterator[torch.Tensor]:
    """Floating-point tensors inside a module output: a tensor, a tuple/list/dict (named tuples and
    ``OrderedDict`` subclasses such as Hugging Face's ``ModelOutput`` too), a ``PackedSequence``, or a
    ``@dataclass`` instance (its fields, in order)."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() or obj.is_complex():
            yield obj
    elif isinstance(obj, nn.utils.rnn.PackedSequence):
        yield from iter_tensors(obj.data)
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from iter_tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from iter_tensors(o)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from iter_tensors(getattr(obj, f.name, None))


_SATURATING = (nn.Sigmoid, nn.Tanh, nn.Hardsigmoid, nn.Hardtanh, nn.Softsign, nn.LogSigmoid)
_RELU_FAMILY = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.RReLU)
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)
_RECURRENT = (nn.RNNBase, nn.RNNCellBase)
_VANILLA_RECURRENT = (nn.RNN, nn.RNNCell)
_GATED_RECURRENT = (nn.LSTM, nn.GRU, nn.LSTMCell, nn.GRUCell)
_MLP_LEAVES = (nn.Linear, nn.Identity, nn.Flatten, nn.modules.dropout._DropoutNd, nn.AlphaDropout) + _NORMS
_SKIP_TYPES = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
# known residual blocks from other packages, by (module, class name): importing them here would make
# torchvision a dependency of the probe
_SKIP_NAMES = {("torchvision.models.resnet", "BasicBlock"), ("torchvision.models.resnet", "Bottleneck")}


def _is_activation(m: nn.Module) -> bool:
    # every elementwise activation lives in torch.nn.modules.activation; attention lives there too
    return type(m).__module__ == "torch.nn.modules.activation" and not isinstance(m, nn.MultiheadAttention)


#: gradprobe's own modules, matched by class name inside the ``gradprobe`` package (the probe may not
#: import its siblings ``models`` and ``remedies``): skip connections, and hand-written vanilla
#: (gate-free) recurrences that are not ``nn.RNNBase`` subclasses
_OUR_SKIPS = {"Residual", "ResidualBlock"}
_OUR_VANILLA_RECURRENT = {"SigmoidRNN", "LeakyRNN", "EchoStateReservoir", "Leaky", "GeometricRNN", "DoyaNeuron"}


def _ours(m: nn.Module) -> bool:
    return type(m).__module__.split(".")[0] == "gradprobe"


def _skip_kind(m: nn.Module) -> str | None:
    """The name under which ``m`` is listed in ``ModelFacts.skip_connections``, or ``None``."""
    cls = type(m)
    if isinstance(m, _SKIP_TYPES) or (cls.__module__, cls.__name__) in _SKIP_NAMES or (_ours(m) and cls.__name__ in _OUR_SKIPS):
        return cls.__name__
    return None


def model_facts(model: nn.Module) -> ModelFacts:
    """The building blocks of ``model`` (see :class:`~gradprobe.trace.ModelFacts` for what each field
    means and what cannot be detected from the module tree).

    >>> facts = model_facts(nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1)))
    >>> facts.saturating, facts.plain_mlp, facts.square_linears, facts.skip_connections
    (('Tanh',), True, 1, ())
    >>> model_facts(nn.LSTM(3, 5)).gated_recurrent
    ('LSTM',)
    """
    modules = list(model.modules())

    def kinds(types) -> tuple[str, ...]:
        return tuple(sorted({type(m).__name__ for m in modules if isinstance(m, types)}))

    ours_recurrent = {type(m).__name__ for m in modules if _ours(m) and type(m).__name__ in _OUR_VANILLA_RECURRENT}
    # an nn.RNN inside gradprobe's Leaky wrapper is run by the wrapper's own leaky recurrence
    wrapped = {id(c) for m in modules if _ours(m) and type(m).__name__ in _OUR_VANILLA_RECURRENT for c in m.children()}
    vanilla = {type(m).__name__ for m in modules if isinstance(m, _VANILLA_RECURRENT) and id(m) not in wrapped}
    recurrent = tuple(sorted(set(kinds(_RECURRENT)) | ours_recurrent))
    skips = tuple(sorted({k for m in modules if (k := _skip_kind(m)) is not None}))

    # the modules that compute something: leaves, and containers that own a parameter themselves
    # (e.g. nn.MultiheadAttention's in_proj_weight); a plain MLP is made of MLP pieces only
    working = [m for m in modules if next(m.children(), None) is None or next(m.parameters(recurse=False), None) is not None]
    linears = [m for m in modules if isinstance(m, nn.Linear)]
    plain = bool(linears) and not recurrent and all(isinstance(m, _MLP_LEAVES) or _is_activation(m) for m in working)
    return ModelFacts(
        saturating=kinds(_SATURATING),
        relu_family=kinds(_RELU_FAMILY),
        normalization=kinds(_NORMS),
        recurrent=recurrent,
        attention=kinds((nn.MultiheadAttention,)),
        n_layers=len(find_layers(model)),
        # mean-field theory's plain-MLP recursion does not describe a network with identity paths
        mlp=None if skips or ours_recurrent else mlp_facts(model),
        vanilla_recurrent=tuple(sorted(vanilla | ours_recurrent)),
        gated_recurrent=kinds(_GATED_RECURRENT),
        skip_connections=skips,
        plain_mlp=plain,
        square_linears=sum(m.in_features == m.out_features for m in linears),
        sequential_layers=sum(isinstance(c, (nn.Linear, nn.modules.conv._ConvNd))
                              for m in modules if isinstance(m, nn.Sequential) for c in m.children()),
        forget_bias=_forget_bias(modules),
    )


def _forget_bias(modules) -> float | None:
    """The smallest mean forget-gate bias ``b_ih + b_hh`` (gate block 1 of ``i, f, g, o``) over the
    layers of every ``nn.LSTM`` / ``nn.LSTMCell``; ``None`` without LSTMs or biases (or with meta ones)."""
    means = []
    for m in modules:
        if not isinstance(m, (nn.LSTM, nn.LSTMCell)) or not m.bias:
            continue
        h = m.hidden_size
        names = [n for n, _ in m.named_parameters(recurse=False) if n.startswith("bias_ih")]
        for n in names:
            b_ih, b_hh = getattr(m, n), getattr(m, n.replace("bias_ih", "bias_hh"))
            if b_ih.is_meta or b_hh.is_meta:
                continue
            with torch.no_grad():
                means.append(float((b_ih[h : 2 * h].double() + b_hh[h : 2 * h].double()).mean()))
    return min(means) if means else None


#: activation modules mean-field theory knows by name (``gradprobe.theory.mean_field``)
MEAN_FIELD_ACTIVATIONS = {
    nn.Tanh: "tanh", nn.ReLU: "relu", nn.Sigmoid: "sigmoid", nn.ELU: "elu", nn.SELU: "selu",
    nn.GELU: "gelu", nn.Softplus: "softplus", nn.Hardtanh: "hard_tanh", nn.LeakyReLU: "leaky_relu",
}
# modules that make a network something other than a plain MLP h^l = W^l φ(h^{l−1}) + b^l
_NOT_PLAIN = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.RNNBase, nn.RNNCellBase,
              nn.MultiheadAttention, nn.modules.conv._ConvNd, nn.Embedding, nn.Dropout)


@torch.no_grad()
def mlp_facts(model: nn.Module) -> MLPFacts | None:
    """What mean-field theory needs of a plain MLP (one activation module type, exactly one activation
    between consecutive ``nn.Linear`` layers, no normalisation/convolution/recurrence/attention/dropout),
    with each Linear's weight statistics now; ``None`` for any other model."""
    mods = dict(model.named_modules())
    if any(isinstance(m, _NOT_PLAIN) for m in mods.values()):
        return None
    acts = [m for m in mods.values() if type(m) in MEAN_FIELD_ACTIVATIONS]
    if len({type(m) for m in acts}) != 1:
        return None
    linears = [(name or type(m).__name__, m) for name, m in mods.items() if isinstance(m, nn.Linear)]
    if len(acts) != len(linears) - 1:
        # not one activation between consecutive Linear layers (e.g. two-layer residual branches):
        # the plain-MLP recursion does not describe this model
        return None
    act = acts[0]
    def mean_square(t: torch.Tensor | None) -> float:
        if t is None:
            return 0.0
        return math.nan if t.is_meta else t.detach().double().pow(2).mean().item()  # meta: no data

    stats = tuple(LinearStats(name, m.in_features, m.out_features, mean_square(m.weight), mean_square(m.bias))
                  for name, m in linears)
    slope = float(act.negative_slope) if isinstance(act, nn.LeakyReLU) else None
    return MLPFacts(MEAN_FIELD_ACTIVATIONS[type(act)], slope, stats)
