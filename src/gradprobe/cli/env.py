"""``gradprobe env``: versions of Python, torch, gradprobe and the optional extras, for bug reports."""
from __future__ import annotations

import importlib.metadata as md
import os
import platform

import torch

from gradprobe._version import __version__

_EXTRAS = {
    "numpy": "core",
    "matplotlib": "plot",
    "rich": "cli",
    "scipy": "theory",
    "scikit-learn": "experiments",
    "lightning": "lightning",
    "transformers": "transformers",
    "accelerate": "transformers",
    "tensorboard": "tensorboard",
    "pandas": "pandas",
}


def add_parser(sub) -> None:
    p = sub.add_parser("env", help="print versions of python, torch, gradprobe and the extras found")
    p.set_defaults(run=run)


def collect() -> dict[str, str]:
    info = {
        "gradprobe": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch threads": str(torch.get_num_threads()),
        "cpu count": str(os.cpu_count()),
        "cuda available": str(torch.cuda.is_available()),
    }
    for dist, extra in _EXTRAS.items():
        try:
            info[dist] = md.version(dist)
        except md.PackageNotFoundError:
            info[dist] = f"not installed (pip install 'gradprobe[{extra}]')" if extra != "core" else "MISSING"
    return info


def run(args) -> int:
    for k, v in collect().items():
        print(f"{k:<16} {v}")
    return 0
