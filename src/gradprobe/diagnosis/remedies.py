"""The remedy catalogue: what the seeds prescribe, ranked per verdict from the model's building blocks.

``diagnosis`` only *names* remedies; ``gradprobe.remedies`` implements the ones that change training.
"""
from __future__ import annotations

from gradprobe.diagnosis.verdict import Remedy
from gradprobe.trace import ModelFacts

__all__ = ["CATALOGUE", "pick", "rank_for_vanishing", "rank_for_exploding", "rank_for_nonfinite"]

CATALOGUE: dict[str, Remedy] = {
    r.id: r
    for r in (
        Remedy("relu_activation", "Use a non-saturating activation (ReLU, LeakyReLU, ELU, SELU)",
               "sigmoid/tanh have |φ'| ≤ 1/4 resp. 1 and near 0 when saturated, so each layer multiplies the "
               "signal by a small factor (seed 000, 002)",
               "gradprobe.remedies.swap_activations + initialize_(model, 'he')"),
        Remedy("he_init", "Initialise with He (Kaiming) for ReLU or Xavier/Glorot for tanh/sigmoid",
               "a variance of 2/fan_in (ReLU) or 2/(fan_in+fan_out) keeps the per-layer gain near 1 "
               "(He et al. 2015; Glorot & Bengio 2010)",
               "gradprobe.remedies.initialize_(model, 'he' | 'xavier')"),
        Remedy("residual", "Add residual (skip) connections",
               "an identity path has local Jacobian I, so the signal reaches early layers undiminished (seed 002)",
               "gradprobe.remedies.add_residual"),
        Remedy("normalization", "Insert BatchNorm or LayerNorm",
               "normalising each layer's pre-activations keeps them out of saturation (seed 002)",
               "gradprobe.remedies.insert_normalization"),
        Remedy("gated_cells", "Use gated recurrent cells (LSTM/GRU) or leaky units",
               "the LSTM's constant error carousel carries gradient across time (seed 002; Hochreiter 1997)",
               "gradprobe.remedies.to_gated / to_leaky"),
        Remedy("pretraining", "Greedy layer-wise pre-training, then fine-tune",
               "the 'multi-level hierarchy' of seed 002: each layer is trained while shallow",
               "gradprobe.remedies.greedy_layerwise_pretrain"),
        Remedy("rprop", "Use a sign-based optimiser (Rprop)",
               "Rprop's step ignores the gradient's magnitude, so tiny gradients still move weights (seed 000)",
               "gradprobe.remedies.make_rprop (full batch)"),
        Remedy("clip_norm", "Clip the gradient norm (Pascanu et al. 2013, Algorithm 1)",
               "rescale g to threshold·g/‖g‖ when ‖g‖ ≥ threshold; choose 0.5–10× the average norm",
               "gradprobe.remedies.clip_grad_norm_ / GradClipper"),
        Remedy("smaller_init", "Reduce the initial weight scale",
               "the per-layer gain grows with the weight variance; use fan-in scaled init (LeCun/Xavier/He)",
               "gradprobe.remedies.initialize_(model, 'xavier' | 'lecun')"),
        Remedy("scale_residual", "Scale residual branches down (e.g. by 1/√depth) or zero-init their last layer",
               "an unscaled ReLU block x + V·relu(W x) multiplies the signal by about √(1 + σ_w²σ_v²/2): "
               "√2 with He on W only, √3 with He on both", ""),
        Remedy("lower_lr", "Lower the learning rate", "large steps amplify explosive directions", ""),
        Remedy("check_inputs", "Check the data and the loss for NaN/Inf and unsafe ops",
               "log(0), division by zero, sqrt at 0 in the backward pass, or overflow in half precision", ""),
        Remedy("anomaly_mode", "Locate the op with torch.autograd.detect_anomaly()",
               "it raises at the first backward op producing NaN", "torch.autograd.detect_anomaly"),
        Remedy("leaky_activation", "Use LeakyReLU/ELU/SELU instead of ReLU",
               "a non-zero slope for negative inputs lets dead units recover (seed 002)",
               "gradprobe.remedies.swap_activations(model, nn.ReLU, nn.LeakyReLU)"),
        Remedy("pascanu_omega", "Add Pascanu's Ω regulariser (with norm clipping)",
               "Ω pushes ‖(∂E/∂x_{k+1})·∂x_{k+1}/∂x_k‖ toward ‖∂E/∂x_{k+1}‖ so the error signal keeps its norm back "
               "in time (Pascanu et al. 2013, eq. 9); the regulariser alone without clipping usually fails",
               "gradprobe.remedies.PascanuRegularizer"),
        Remedy("escape_saddle", "Keep training with noise or momentum (SGD's noise escapes strict saddles)",
               "the gradient is small only because the point is a saddle: a descent direction of negative "
               "curvature exists", "torch.optim.SGD(momentum=0.9)"),
    )
}


def pick(*ids: str) -> tuple[Remedy, ...]:
    """Catalogue remedies by id, in the given (ranked) order."""
    return tuple(CATALOGUE[i] for i in ids)


def rank_for_vanishing(facts: ModelFacts | None) -> tuple[Remedy, ...]:
    """Remedies for depth-wise vanishing, ranked by what the model contains."""
    if facts is not None and facts.recurrent:
        return pick("gated_cells", "he_init", "residual", "normalization", "relu_activation", "pretraining")
    if facts is not None and facts.saturating and not facts.relu_family:
        return pick("relu_activation", "he_init", "residual", "normalization", "pretraining", "rprop")
    if facts is not None and not facts.normalization:
        return pick("he_init", "residual", "normalization", "relu_activation", "pretraining", "rprop")
    return pick("he_init", "residual", "relu_activation", "normalization", "pretraining", "rprop")


def rank_for_exploding(facts: ModelFacts | None) -> tuple[Remedy, ...]:
    """Remedies for depth-wise explosion."""
    if facts is not None and facts.relu_family and not facts.saturating:
        return pick("scale_residual", "smaller_init", "normalization", "clip_norm", "lower_lr")
    return pick("smaller_init", "clip_norm", "normalization", "scale_residual", "lower_lr")


def rank_for_nonfinite(facts: ModelFacts | None) -> tuple[Remedy, ...]:
    return pick("check_inputs", "anomaly_mode", "clip_norm", "lower_lr")
