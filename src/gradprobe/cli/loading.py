"""The model-spec loader now lives in :mod:`gradprobe.specs` (below the CLI, so runners can use it);
this module re-exports it for code that imported ``gradprobe.cli.loading``."""
from gradprobe.specs import LOSSES, load_data, load_model, make_loss, parse_kwargs, parse_shape

__all__ = ["parse_kwargs", "load_model", "parse_shape", "load_data", "LOSSES", "make_loss"]
