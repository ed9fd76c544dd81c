"""Which remedies a verdict names, ranked: the diagnosis's choice from :data:`gradprobe.remedies.CATALOGUE`.

Each ``rank_for_*`` lists remedy ids in the order that suits the model's building blocks and keeps
only the remedies that fit the model (:meth:`gradprobe.remedies.Remedy.why_not`), adapted to it; with
no model facts (``None``) the whole list is returned. ``diagnosis`` only *names* remedies;
``gradprobe.remedies`` implements them and the trials apply the same objects.
"""
from __future__ import annotations

from gradprobe.remedies.catalogue import CATALOGUE, Remedy, remedies_for
from gradprobe.trace import ModelFacts

__all__ = ["CATALOGUE", "pick", "rank_for_vanishing", "rank_for_exploding", "rank_for_nonfinite",
           "rank_for_vanishing_in_time", "rank_for_exploding_in_time"]


def pick(*ids: str, facts: ModelFacts | None = None) -> tuple[Remedy, ...]:
    """Catalogue remedies by id, in the given (ranked) order, keeping those that fit ``facts``."""
    return remedies_for(facts, *ids)


def rank_for_vanishing(facts: ModelFacts | None) -> tuple[Remedy, ...]:
    """Remedies for depth-wise vanishing, ranked by what the model contains."""
    if facts is not None and facts.recurrent:
        ids = ("gated_cells", "forget_bias", "orthogonal_init", "he_init", "residual", "normalization",
               "relu_activation", "pretraining")
    elif facts is not None and facts.saturating and not facts.relu_family:
        ids = ("relu_activation", "he_init", "residual", "normalization", "pretraining", "rprop")
    elif facts is not None and not facts.normalization:
        ids = ("he_init", "residual", "normalization", "relu_activation", "pretraining", "rprop")
    else:
        ids = ("he_init", "residual", "relu_activation", "normalization", "pretraining", "rprop")
    return pick(*ids, facts=facts)


def rank_for_exploding(facts: ModelFacts | None) -> tuple[Remedy, ...]:
    """Remedies for depth-wise explosion."""
    if facts is not None and facts.relu_family and not facts.saturating:
        ids = ("scale_residual", "smaller_init", "normalization", "clip_norm", "lower_lr")
    else:
        ids = ("smaller_init", "clip_norm", "normalization", "scale_residual", "orthogonal_init", "lower_lr")
    return pick(*ids, facts=facts)


def rank_for_nonfinite(facts: ModelFacts | None) -> tuple[Remedy, ...]:
    return pick("check_inputs", "anomaly_mode", "clip_norm", "lower_lr", facts=facts)


def rank_for_vanishing_in_time(facts: ModelFacts | None) -> tuple[Remedy, ...]:
    """Remedies for a gradient that dies going back in time (Pascanu et al. 2013; Hochreiter & Schmidhuber 1997)."""
    return pick("gated_cells", "pascanu_omega", "forget_bias", "orthogonal_init", "clip_norm", facts=facts)


def rank_for_exploding_in_time(facts: ModelFacts | None) -> tuple[Remedy, ...]:
    """Remedies for a gradient that grows going back in time (Pascanu et al. 2013, Algorithm 1 first)."""
    return pick("clip_norm", "orthogonal_init", "gated_cells", "lower_lr", facts=facts)
