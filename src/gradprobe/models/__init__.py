"""Plain ``nn.Module``s of the classic analyses and experiments; they work without gradprobe.

* :class:`DeepMLP` — deep fully-connected nets (every activation / init / residual / norm).
* :class:`SigmoidChain` — a chain of single sigmoid neurons (a Cross Validated answer), closed-form gradient.
* :class:`SigmoidRNN` — the RNN of Pascanu, Mikolov & Bengio 2013 with their three inits.
* :class:`DoyaNeuron` — Doya's (1993) one-neuron dynamical model: fixed points, bifurcations.
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
