"""What the framework callbacks share: checking ``**probe_options`` early and in the user's terms."""
from __future__ import annotations

import inspect

from gradprobe.errors import ConfigError
from gradprobe.monitor import Probe

__all__ = ["check_probe_options"]

def check_probe_options(owner: str, options: dict) -> dict:
    """``options`` if every key is a :class:`~gradprobe.Probe` keyword; else a :class:`ConfigError` listing them."""
    known = [n for n, p in inspect.signature(Probe.__init__).parameters.items()
             if p.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ConfigError(f"{owner}({', '.join(f'{k}=...' for k in unknown)}): not Probe options; "
                          f"the callback probes the trainer's model and accepts {known}")
    return dict(options)
