"""Plain ``nn.Module``s from the seeds and the classic experiments; they work without gradprobe.

* :class:`DeepMLP` — deep fully-connected nets (every activation / init / residual / norm).
* :class:`SigmoidChain` — seed 004's chain of single sigmoid neurons, closed-form gradient.
* :class:`SigmoidRNN` — seed 000/003 eq. 2 with Pascanu et al.'s three inits.
* :class:`DoyaNeuron` — seed 000's one-neuron dynamical model: fixed points, bifurcations.
* :class:`GeometricRNN` — Pascanu's Fig. 6 model: the error surface and its wall.
* :class:`RecurrentNet` / :class:`RecurrentClassifier` / :class:`RecurrentRegressor` — vanilla, IRNN,
  LSTM, GRU, leaky and echo-state recurrent models for the tasks.

Figures live in :mod:`gradprobe.models.plots` (matplotlib extra; not imported here).
"""
from gradprobe.models.chain import SigmoidChain
from gradprobe.models.doya import DoyaNeuron
from gradprobe.models.geometric import GeometricRNN
from gradprobe.models.mlp import DeepMLP
from gradprobe.models.rnn import (
    EchoStateReservoir,
    LeakyRNN,
    RecurrentClassifier,
    RecurrentNet,
    RecurrentRegressor,
    SigmoidRNN,
)

__all__ = [
    "DeepMLP",
    "SigmoidChain",
    "SigmoidRNN",
    "DoyaNeuron",
    "GeometricRNN",
    "RecurrentNet",
    "RecurrentClassifier",
    "RecurrentRegressor",
    "LeakyRNN",
    "EchoStateReservoir",
]
