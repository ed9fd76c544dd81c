"""Theory: pure functions of architecture and hyper-parameters that predict gradient flow.

* :mod:`~gradprobe.theory.meanfield`: mean-field χ₁, depth scales, critical line, residual growth
  (Poole et al. 2016; Schoenholz et al. 2017).
* :mod:`~gradprobe.theory.rnn`: Pascanu et al. 2013's conditions, the eigen view of W^t, and the
  Jacobians of a recurrent map along a sequence (for Lyapunov exponents).
"""
from gradprobe.theory.meanfield import (
    MeanField,
    ResidualGrowth,
    critical_line,
    critical_sigma_w2,
    mean_field,
    residual_growth,
)
from gradprobe.theory.rnn import (
    GAMMA,
    EigenGrowth,
    RNNCondition,
    eigen_growth,
    rnn_condition,
    rnn_conditions,
    rnn_jacobians,
    tanh_map_jacobians,
)

__all__ = [
    "MeanField",
    "ResidualGrowth",
    "critical_line",
    "critical_sigma_w2",
    "mean_field",
    "residual_growth",
    "GAMMA",
    "EigenGrowth",
    "RNNCondition",
    "eigen_growth",
    "rnn_condition",
    "rnn_conditions",
    "rnn_jacobians",
    "tanh_map_jacobians",
]
