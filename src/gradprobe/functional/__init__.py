"""Pure tensor math used by the upper floors: norms, products, iterations, the RNN unroll and BPTT, the
activation table (σ, σ′, γ). No hooks, no state."""
from gradprobe._deprecation import module_getattr
from gradprobe.functional.activations import ACTIVATIONS, GAMMA, Activation, activation
from gradprobe.functional.gauss import gauss_expect, gauss_rule
from gradprobe.functional.lanczos import OLD_NAMES as _OLD_LANCZOS_NAMES
from gradprobe.functional.lanczos import (
    SingularValues,
    RitzValues,
    DominantEigenpair,
    TraceEstimate,
    block_krylov_svd,
    block_lanczos,
    hutchinson_trace,
    lanczos,
    power_iteration,
)
from gradprobe.functional.lyapunov import lyapunov_spectrum
from gradprobe.functional.norms import grouped_norms
from gradprobe.functional.products import gram_operator, hessian_operator, hvp, jacobian_block_operators, jvp, vjp
from gradprobe.functional.profiles import fit_decay_rate, gradient_horizon
from gradprobe.functional.rnn import (
    StateEvent,
    bptt,
    is_fused_recurrent,
    layer_outputs,
    step_jacobian,
    step_vjp,
    unrolled_forward,
)

__all__ = [
    "Activation",
    "ACTIVATIONS",
    "GAMMA",
    "activation",
    "StateEvent",
    "unrolled_forward",
    "is_fused_recurrent",
    "layer_outputs",
    "step_jacobian",
    "step_vjp",
    "bptt",
    "grouped_norms",
    "gauss_expect",
    "gauss_rule",
    "lyapunov_spectrum",
    "fit_decay_rate",
    "gradient_horizon",
    "lanczos",
    "block_lanczos",
    "block_krylov_svd",
    "SingularValues",
    "jacobian_block_operators",
    "power_iteration",
    "hutchinson_trace",
    "RitzValues",
    "DominantEigenpair",
    "TraceEstimate",
    "hvp",
    "hessian_operator",
    "jvp",
    "vjp",
    "gram_operator",
]

__getattr__ = module_getattr(__name__, _OLD_LANCZOS_NAMES)  # LanczosResult, PowerResult, KrylovSVDResult: warn
