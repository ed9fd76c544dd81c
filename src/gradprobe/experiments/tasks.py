"""Pathological sequence tasks of Pascanu, Mikolov & Bengio (2013) and the modern adding/copying tasks.

Implemented from the definitions in the paper and its authors' code (see ``shared/references.md``),
generated fresh for every batch from a ``torch.Generator``. Inputs are **time-major** ``(T, B, C)``
float32, as in the paper. Each task knows its loss, its per-sequence error rule and the loss of the
best input-independent prediction (the baseline a network that learns nothing sits at).

=========================  ============  =======================================================
task                       output        per-sequence error / baseline
=========================  ============  =======================================================
``temporal_order``         last, 4-way   argmax wrong; chance 75 % error, NLL ln 4
``temporal_order_3bit``    last, 8-way   argmax wrong; chance 87.5 % error, NLL ln 8
``addition``               last, linear  (ŷ − y)² > 0.04; predicting 0.5 gives MSE 1/24
``multiplication``         last, linear  (ŷ − y)² > 0.04; predicting 1/4 gives MSE 7/144
``permutation``            last, 100-way argmax wrong; NLL of the best constant guess ln 2
``memorization``           every step    any step wrong; see :class:`Memorization`
``adding_arjovsky``        last, linear  target a + b; predicting 1 gives MSE 1/6
``copying``                every step    CE baseline 10·ln 8 / (T + 20)
=========================  ============  =======================================================
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gradprobe.errors import ConfigError

__all__ = ["Batch", "Task", "TASKS", "make_task", "TemporalOrder", "Addition", "Permutation", "Memorization",
           "AddingArjovsky", "Copying"]


@dataclass(frozen=True)
class Batch:
    x: torch.Tensor  # (T, B, n_in) float32, time-major
    y: torch.Tensor  # (B,) class ids, (B, 1) regression targets, or (T, B) class ids for per-step tasks
    meta: dict


class Task:
    """Base: subclasses set ``n_in``, ``n_out``, ``output`` ("last" or "all"), ``kind`` and ``generate``."""

    name: str = ""
    n_in: int
    n_out: int
    output: str = "last"  # which time steps the loss reads
    kind: str = "classification"  # or "regression"
    threshold: float = 0.04  # regression: a sequence is wrong when its squared error exceeds this

    def generate(self, batch: int, length: int, generator: torch.Generator) -> Batch:
        raise NotImplementedError

    def _check(self, batch: int, length: int, minimum: int = 10) -> None:
        if batch < 1 or length < minimum:
            raise ConfigError(f"{self.name}: need batch >= 1 and length >= {minimum}; got batch={batch}, length={length}")

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean loss. ``out`` is ``(B, n_out)`` for "last" tasks, ``(T, B, n_out)`` for "all" tasks."""
        if self.kind == "regression":
            return F.mse_loss(out, y)
        if self.output == "all":
            return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        return F.cross_entropy(out, y)

    def wrong(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Boolean ``(B,)``: which sequences are misclassified (the paper's success criterion counts these)."""
        if self.kind == "regression":
            return ((out - y) ** 2).reshape(out.shape[0], -1).sum(1) > self.threshold
        if self.output == "all":
            return (out.argmax(-1) != y).any(dim=0)
        return out.argmax(-1) != y


def _uniform_int(low: int, high: int, size, g: torch.Generator) -> torch.Tensor:
    return torch.randint(low, high, size, generator=g)


def _one_hot(symbols: torch.Tensor, n: int) -> torch.Tensor:
    return F.one_hot(symbols, n).to(torch.float32)


class TemporalOrder(Task):
    """Temporal order (2-bit: AA/AB/BA/BB; ``bits=3``: 8 classes).

    6 one-hot channels: {A, B} are 0 and 1, distractors {c, d, e, f} are 2–5. A or B appears at one
    position in [0.1L, 0.2L) and one in [0.5L, 0.6L) (3-bit: [0.1L,0.2L), [0.3L,0.4L), [0.6L,0.7L));
    every other step is a random distractor. Class = Σ_i v_i·2^i, predicted at the last step.
    """

    n_in = 6

    def __init__(self, bits: int = 2):
        if bits not in (2, 3):
            raise ConfigError(f"temporal order has 2 or 3 bits; got {bits}")
        self.bits = bits
        self.n_out = 2**bits
        self.name = "temporal_order" if bits == 2 else "temporal_order_3bit"
        self.starts = (0.1, 0.5) if bits == 2 else (0.1, 0.3, 0.6)

    def generate(self, batch, length, generator):
        self._check(batch, length)
        L = length
        sym = _uniform_int(2, 6, (L, batch), generator)
        cls = torch.zeros(batch, dtype=torch.int64)
        positions = []
        cols = torch.arange(batch)
        for i, s in enumerate(self.starts):
            p = _uniform_int(0, int(L * 0.1), (batch,), generator) + int(L * s)
            v = _uniform_int(0, 2, (batch,), generator)
            sym[p, cols] = v
            cls += v * 2**i
            positions.append(p)
        return Batch(_one_hot(sym, 6), cls, {"positions": positions, "length": L})


class Addition(Task):
    """Addition (``op="add"``) or multiplication (``op="mul"``) of two marked values.

    Length l ∈ [L, 1.1L) drawn once per batch. Channel 0: markers (two 1s), channel 1: values ~ U[0, 1).
    First marker in [0, 0.1l), second in [0.1l, 0.5l). Target (a + b)/2 or a·b at the last step.
    """

    n_in, n_out, kind = 2, 1, "regression"

    def __init__(self, op: str = "add"):
        if op not in ("add", "mul"):
            raise ConfigError(f"op must be 'add' or 'mul'; got {op!r}")
        self.op = op
        self.name = "addition" if op == "add" else "multiplication"

    def generate(self, batch, length, generator):
        self._check(batch, length)
        l = length + int(_uniform_int(0, max(int(length * 0.1), 1), (1,), generator))
        x = torch.rand(l, batch, 2, generator=generator)
        x[:, :, 0] = 0.0
        cols = torch.arange(batch)
        p0 = _uniform_int(0, int(l * 0.1), (batch,), generator)
        p1 = _uniform_int(0, int(l * 0.4), (batch,), generator) + int(l * 0.1)
        x[p0, cols, 0] = 1.0
        x[p1, cols, 0] = 1.0
        a, b = x[p0, cols, 1], x[p1, cols, 1]
        y = (a + b) / 2 if self.op == "add" else a * b
        return Batch(x, y.reshape(-1, 1), {"positions": [p0, p1], "length": l})


class Permutation(Task):
    """Random permutation: 100 one-hot symbols, the first ∈ {0, 1}, the rest uniform over {2..99};
    predict the first symbol at the last step (nothing is actually permuted)."""

    name, n_in, n_out = "permutation", 100, 100

    def generate(self, batch, length, generator):
        self._check(batch, length)
        sym = _uniform_int(2, 100, (length, batch), generator)
        first = _uniform_int(0, 2, (batch,), generator)
        sym[0] = first
        return Batch(_one_hot(sym, 100), first, {"length": length})


class Memorization(Task):
    """Noiseless memorization: a pattern of ``n_pos`` symbols over ``n_values`` values, ``length`` blanks,
    then a "go" symbol and blanks while the pattern is reproduced in the last ``n_pos`` steps (the
    first of which is the "go" step).

    Inputs have ``n_values + 2`` channels (values, blank, go); T = length + 2·n_pos. Targets (T, B) are
    class ids over ``n_values + 1`` (values, blank): blank everywhere except the last ``n_pos`` steps.
    The loss reads every step; a sequence is wrong if any step is. The paper's "5-bit" task is
    ``Memorization(2, 5)``, its "20-bit" ``Memorization(5, 10)``.
    """

    output = "all"

    def __init__(self, n_values: int = 5, n_pos: int = 10):
        if n_values < 2 or n_pos < 1:
            raise ConfigError(f"need n_values >= 2 and n_pos >= 1; got {n_values}, {n_pos}")
        self.n_values, self.n_pos = n_values, n_pos
        self.n_in, self.n_out = n_values + 2, n_values + 1
        self.name = "memorization"

    def generate(self, batch, length, generator):
        self._check(batch, length, minimum=1)
        V, P = self.n_values, self.n_pos
        T = length + 2 * P
        pattern = _uniform_int(0, V, (P, batch), generator)
        x = torch.zeros(T, batch, V + 2)
        x[:P] = _one_hot(pattern, V + 2)
        x[P:, :, V] = 1.0  # blank
        x[length + P, :, V] = 0.0  # after `length` blanks, "go" (with the first output step)
        x[length + P, :, V + 1] = 1.0
        y = torch.full((T, batch), V, dtype=torch.int64)
        y[-P:] = pattern
        return Batch(x, y, {"pattern": pattern, "length": T})


class AddingArjovsky(Task):
    """Adding problem in the modern form (Arjovsky et al. 2016): values ~ U[0, 1], one marker in each
    half, target the sum; predicting 1 gives MSE 1/6."""

    name, n_in, n_out, kind = "adding_arjovsky", 2, 1, "regression"

    def generate(self, batch, length, generator):
        self._check(batch, length, minimum=2)
        x = torch.zeros(length, batch, 2)
        x[:, :, 0] = torch.rand(length, batch, generator=generator)
        cols = torch.arange(batch)
        half = length // 2
        p0 = _uniform_int(0, half, (batch,), generator)
        p1 = _uniform_int(half, length, (batch,), generator)
        x[p0, cols, 1] = 1.0
        x[p1, cols, 1] = 1.0
        y = x[p0, cols, 0] + x[p1, cols, 0]
        return Batch(x, y.reshape(-1, 1), {"positions": [p0, p1], "length": length})


class Copying(Task):
    """Copying memory (Arjovsky et al. 2016): 10 symbols from {1..8}, T−1 blanks (0), a delimiter (9),
    then 10 blanks; reproduce the 10 symbols in the last 10 steps. Total length T + 20; 10 channels.
    A memoryless strategy reaches cross-entropy 10·ln 8 / (T + 20)."""

    name, n_in, n_out, output = "copying", 10, 10, "all"

    def generate(self, batch, length, generator):
        self._check(batch, length, minimum=1)
        T = length + 20
        sym = torch.zeros(T, batch, dtype=torch.int64)
        seq = _uniform_int(1, 9, (10, batch), generator)
        sym[:10] = seq
        sym[length + 9] = 9  # delimiter after T-1 blanks
        y = torch.zeros(T, batch, dtype=torch.int64)
        y[-10:] = seq
        return Batch(_one_hot(sym, 10), y, {"length": T})

    @staticmethod
    def baseline(length: int) -> float:
        return 10 * math.log(8) / (length + 20)


TASKS = {
    "temporal_order": lambda: TemporalOrder(2),
    "temporal_order_3bit": lambda: TemporalOrder(3),
    "addition": lambda: Addition("add"),
    "multiplication": lambda: Addition("mul"),
    "permutation": Permutation,
    "memorization": Memorization,
    "memorization_5bit": lambda: Memorization(2, 5),
    "adding_arjovsky": AddingArjovsky,
    "copying": Copying,
}


def make_task(name: str) -> Task:
    """A task by name (see ``TASKS``).

    >>> t = make_task("temporal_order")
    >>> b = t.generate(4, 50, torch.Generator().manual_seed(0))
    >>> tuple(b.x.shape), tuple(b.y.shape), t.n_out
    ((50, 4, 6), (4,), 4)
    """
    try:
        return TASKS[name]()
    except KeyError:
        raise ConfigError(f"unknown task {name!r}; choose one of {sorted(TASKS)}") from None
