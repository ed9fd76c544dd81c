"""The experiments ``gradprobe experiment`` knows, by name (an explicit table: adding one is one line)."""
from __future__ import annotations

from gradprobe.errors import ConfigError
from gradprobe.experiments.feedforward import Glorot2010, He2015, Schoenholz2017
from gradprobe.experiments.longrange import LongRange
from gradprobe.experiments.pascanu import Pascanu2013
from gradprobe.experiments.runner import Experiment

__all__ = ["EXPERIMENTS", "get_experiment"]

EXPERIMENTS: dict[str, type[Experiment]] = {
    Pascanu2013.name: Pascanu2013,
    Glorot2010.name: Glorot2010,
    He2015.name: He2015,
    Schoenholz2017.name: Schoenholz2017,
    LongRange.name: LongRange,
}


def get_experiment(name: str) -> Experiment:
    try:
        return EXPERIMENTS[name]()
    except KeyError:
        raise ConfigError(f"unknown experiment {name!r}; choose one of {sorted(EXPERIMENTS)} "
                          "(gradprobe experiment list)") from None
