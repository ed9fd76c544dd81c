"""Which modules are layers, and what a model is made of.

A *layer* is a module that owns at least one parameter directly (``recurse=False``); containers
(``nn.Sequential``, a block that only holds sub-modules) are not layers. A module reached under two
names (shared weights) is one layer, reported under its first qualified name.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from gradprobe.errors import ConfigError
from gradprobe.trace import LinearStats, MLPFacts, ModelFacts

__all__ = ["Layer", "find_layers", "iter_tensors", "model_facts"]


@dataclass(frozen=True, eq=False)
class Layer:
    index: int  # position in discovery (named_modules) order
    name: str
    module: nn.Module
    params: tuple[nn.Parameter, ...]

    @property
    def kind(self) -> str:
        return type(self.module).__name__


def find_layers(model: nn.Module) -> list[Layer]:
    """Modules owning parameters directly, in ``named_modules()`` order (one entry per module object)."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"gradprobe probes a torch.nn.Module; got {type(model).__name__}")
    layers: list[Layer] = []
    for name, m in model.named_modules(remove_duplicate=True):
        params = tuple(m.parameters(recurse=False))
        if params:
            layers.append(Layer(len(layers), name or type(m).__name__, m, params))
    return layers


def iter_tensors(obj) -> Iterator[torch.Tensor]:
    """Floating-point tensors inside a module output (tensor, tuple/list/dict, PackedSequence, dataclass-like)."""
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
    )


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
    stats = tuple(
        LinearStats(name, m.in_features, m.out_features, m.weight.detach().double().pow(2).mean().item(),
                    0.0 if m.bias is None else m.bias.detach().double().pow(2).mean().item())
        for name, m in linears
    )
    slope = float(act.negative_slope) if isinstance(act, nn.LeakyReLU) else None
    return MLPFacts(MEAN_FIELD_ACTIVATIONS[type(act)], slope, stats)
