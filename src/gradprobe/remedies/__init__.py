"""Remedies that change training: clipping, initialisations, architecture transforms, pretraining, Ω,
and the catalogue of :class:`Remedy` objects that the diagnosis names and the trials apply.

``diagnosis`` only *names* these; this package applies them. It imports only ``gradprobe.errors``,
``gradprobe.functional``, ``gradprobe.trace`` (the model facts a remedy's fit is checked against) and
the floor-0 helper that keeps renamed names working.
"""
from gradprobe._deprecation import module_getattr
from gradprobe.remedies.catalogue import CATALOGUE, Call, Remedy, TrainingChange, remedies_for
from gradprobe.remedies.clipping import OLD_NAMES as _OLD_CLIPPING_NAMES
from gradprobe.remedies.clipping import (
    AutoClip,
    ClipStep,
    GradClipper,
    NonFiniteGradientError,
    clip_grad_norm_,
    clip_grad_value_,
    total_grad_norm,
)
from gradprobe.remedies.init import INIT_SCHEMES, forget_bias_, init_targets, initialize_
from gradprobe.remedies.omega import PascanuRegularizer, pascanu_omega, pascanu_vjp, rnn_state_grads, rnn_vjp
from gradprobe.remedies.pretraining import (
    greedy_layerwise_pretrain,
    greedy_layerwise_pretrain_,
    make_rprop,
    pretrain_layer,
    pretrain_layer_,
    split_stages,
)
from gradprobe.remedies.transforms import (
    Leaky,
    LeakyRNN,
    LSTMAsRNN,
    Residual,
    add_residual,
    insert_normalization,
    swap_activations,
    to_gated,
    to_leaky,
)

__all__ = [
    "Remedy",
    "Call",
    "TrainingChange",
    "CATALOGUE",
    "remedies_for",
    "ClipStep",
    "NonFiniteGradientError",
    "total_grad_norm",
    "clip_grad_norm_",
    "clip_grad_value_",
    "GradClipper",
    "AutoClip",
    "INIT_SCHEMES",
    "init_targets",
    "initialize_",
    "forget_bias_",
    "swap_activations",
    "insert_normalization",
    "add_residual",
    "Residual",
    "to_gated",
    "LSTMAsRNN",
    "Leaky",
    "LeakyRNN",
    "to_leaky",
    "greedy_layerwise_pretrain_",
    "pretrain_layer_",
    "split_stages",
    "make_rprop",
    "PascanuRegularizer",
    "pascanu_omega",
    "pascanu_vjp",
    "rnn_vjp",
    "rnn_state_grads",
]

__getattr__ = module_getattr(__name__, _OLD_CLIPPING_NAMES)  # ClipResult: old name, warns
