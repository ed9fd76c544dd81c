"""The experiments ``gradprobe experiment`` knows, by name (an explicit table: adding one is one line)."""
from __future__ import annotations

from gradprobe.errors import ConfigError
from gradprobe.experiments.pascanu import Pascanu2013
from gradprobe.experiments.runner import Experiment

__all__ = ["EXPERIMENTS", "get_experiment"]

EXPERIMENTS: dict[str, type[Experiment]] = {
    Pascanu2013.name: Pascanu2013,
}


def get_experiment(name: str) -> Experiment:
    try:
        return EXPERIMENTS[name]()
    except KeyError:
        raise ConfigError(f"unknown experiment {name!r}; choose one of {sorted(EXPERIMENTS)} "
                          "(gradprobe experiment list)") from None
