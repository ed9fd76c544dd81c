"""Small models the probe tests share (plain torch, independent of gradprobe)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class TiedEmbedding(nn.Module):
    """Weight tying: the embedding matrix is also the output projection (two layers, one Parameter).

    ``emb`` is ``nn.Embedding(vocab, width)``, ``mid`` a ``width → width`` Linear and the head a bias-free
    ``width → vocab`` Linear whose ``weight`` *is* ``emb.weight``, stored under the attribute ``head``
    names (so each test keeps the layer names it asserts). ``forward(idx)`` maps token ids of shape ``(...)`` to
    ``head(tanh(mid(emb(idx))))`` of shape ``(..., vocab)``, then applies ``reduce`` if one is given.
    The modules are created in the order emb, mid, head, so a seeded construction draws the same
    initial weights as the hand-written models it replaced.
    """

    def __init__(self, vocab: int, width: int, head: str = "out",
                 reduce: Callable[[torch.Tensor], torch.Tensor] | None = None):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.mid = nn.Linear(width, width)
        setattr(self, head, nn.Linear(width, vocab, bias=False))
        getattr(self, head).weight = self.emb.weight
        self._head = head
        self._reduce = reduce

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        out = getattr(self, self._head)(torch.tanh(self.mid(self.emb(idx))))
        return out if self._reduce is None else self._reduce(out)


class RunsBackwards(nn.Module):
    """Three Linears registered last-first and run first-last: registration order ≠ execution order.

    ``names = (first, mid, last)``; ``forward(x)`` maps ``x`` of shape ``(batch, n_in)`` to
    ``last(act(mid(act(first(x)))))`` of shape ``(batch, 1)`` (widths ``n_in → 4 → 4 → 1``). ``spare``
    names an optional 4 → 4 Linear that is registered (right after ``last``) but never called, so it
    gets no gradient. Modules are created in registration order (last, [spare], mid, first), so a
    seeded construction draws the same weights as the hand-written models it replaced.
    """

    def __init__(self, names: tuple[str, str, str] = ("first", "mid", "last"), n_in: int = 3,
                 act: Callable[[torch.Tensor], torch.Tensor] = torch.tanh, spare: str | None = None):
        super().__init__()
        first, mid, last = names
        setattr(self, last, nn.Linear(4, 1))
        if spare is not None:
            setattr(self, spare, nn.Linear(4, 4))
        setattr(self, mid, nn.Linear(4, 4))
        setattr(self, first, nn.Linear(n_in, 4))
        self._names = names
        self._act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, mid, last = (getattr(self, n) for n in self._names)
        return last(self._act(mid(self._act(first(x)))))


class LastStepReadout(nn.Module):
    """A recurrent layer read out by a Linear at the last time step.

    ``rnn = cell(n_in, hidden)`` (``nn.RNN``, ``nn.LSTM`` or ``nn.GRU``, sequence-first) and
    ``head = nn.Linear(hidden, 1)``, created in that order; ``forward(x)`` maps ``x`` of shape
    ``(T, batch, n_in)`` to ``head(h_T)`` of shape ``(batch, 1)``.
    """

    def __init__(self, cell: type[nn.Module], n_in: int, hidden: int):
        super().__init__()
        self.rnn = cell(n_in, hidden)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][-1])
