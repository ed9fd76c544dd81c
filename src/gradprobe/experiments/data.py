"""Built-in data that needs no download: scikit-learn's bundled digits (extra ``experiments``)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from gradprobe.errors import require

__all__ = ["Split", "digits"]


@dataclass(frozen=True)
class Split:
    x_train: torch.Tensor  # (N_train, 64) float32 in [0, 1]
    y_train: torch.Tensor  # (N_train,) int64 in 0..9
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def n_features(self) -> int:
        return self.x_train.shape[1]

    @property
    def n_classes(self) -> int:
        return int(self.y_train.max()) + 1


def digits(test_fraction: float = 0.2, seed: int = 0) -> Split:
    """The 1,797 8×8 digit images shipped inside scikit-learn, pixels scaled by 1/16, stratified split."""
    datasets = require("sklearn.datasets", "experiments")
    x, y = datasets.load_digits(return_X_y=True)
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):  # stratified: the same fraction of every class in the test split
        idx = np.flatnonzero(y == c)
        test[rng.choice(idx, size=int(round(test_fraction * len(idx))), replace=False)] = True
    xt = torch.tensor(x / 16.0, dtype=torch.float32)
    yt = torch.tensor(y, dtype=torch.int64)
    return Split(xt[~test], yt[~test], xt[test], yt[test])
