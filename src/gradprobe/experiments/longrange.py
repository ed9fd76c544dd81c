"""Remedies on long-range tasks: vanilla tanh RNN, IRNN, LSTM (forget bias 0 and 1), GRU and RNN + Ω.

Tasks in the modern form (Arjovsky et al. 2016, ``shared/references.md``): the adding problem
(two marked values in [0, 1], target their sum; predicting 1 gives MSE 1/6) and the copying memory
problem (10 symbols, T blanks, a delimiter; the memoryless baseline is 10·ln 8/(T + 20)).

Per run: the loss over training beside its baseline, and the probe's temporal view
(``Probe(model, temporal=True).temporal_flow()``) of the *memory* part of the loss — the last
step for adding, the 10 answer steps for copying (the blank steps' loss would add a direct
gradient at every step and hide the decay) — recorded as ``horizon()`` (steps back the gradient
stays above 1 % of its peak) and ``decay_rate`` at init and along training.

Models are :class:`gradprobe.models.RecurrentNet` cells: ``tanh`` (``nn.RNN``, PyTorch's U(±1/√H)
init), ``irnn`` (ReLU, identity recurrent init; Le, Jaitly & Hinton 2015), ``lstm`` (forget-gate bias
0: PyTorch's default draws it near 0), ``lstm_fb1`` (forget bias 1; Gers et al. 2000, Jozefowicz et
al. 2015), ``gru`` and ``tanh_omega`` (the tanh RNN with Pascanu's Ω, α = 2, through
:class:`gradprobe.remedies.PascanuRegularizer`). All use Adam (lr 1e-3) with norm clipping at 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from gradprobe.errors import ConfigError
from gradprobe.experiments.reporting import longrange_report
from gradprobe.experiments.runner import Experiment, Job, JobContext, RunOutput, derive_seed
from gradprobe.experiments.tasks import Copying, make_task
from gradprobe.models import RecurrentNet
from gradprobe.monitor import Probe
from gradprobe.remedies import PascanuRegularizer

__all__ = ["LongRangePoint", "LongRange", "CELLS", "train_long_range", "baseline_loss"]

#: name -> RecurrentNet keyword arguments
CELLS = {
    "tanh": dict(cell="tanh"),
    "irnn": dict(cell="irnn"),
    "lstm": dict(cell="lstm", forget_bias=0.0),
    "lstm_fb1": dict(cell="lstm", forget_bias=1.0),
    "gru": dict(cell="gru"),
    "tanh_omega": dict(cell="tanh"),
}


@dataclass(frozen=True)
class LongRangePoint:
    task: str  # "adding_arjovsky" or "copying"
    length: int
    cell: str
    hidden: int = 64
    steps: int = 2000
    batch: int = 32
    lr: float = 1e-3
    clip: float = 1.0
    alpha: float = 2.0  # Ω weight for tanh_omega
    eval_every: int = 250

    def __post_init__(self):
        if self.task not in ("adding_arjovsky", "copying"):
            raise ConfigError(f"long-range task must be 'adding_arjovsky' or 'copying'; got {self.task!r}")
        if self.cell not in CELLS:
            raise ConfigError(f"unknown cell {self.cell!r}; choose one of {sorted(CELLS)}")


def baseline_loss(task: str, length: int) -> float:
    """Loss of the best memoryless strategy: 1/6 (adding: predict 1), 10·ln 8/(T + 20) (copying)."""
    return 1.0 / 6.0 if task == "adding_arjovsky" else Copying.baseline(length)


def _loss(task, out, y):
    return task.loss(out, y)


def _memory_loss(task, out, y):
    # the part of the loss that needs memory: the last step (adding) or the 10 answer steps (copying)
    if task.output == "all":
        return F.cross_entropy(out[-10:].reshape(-1, out.shape[-1]), y[-10:].reshape(-1))
    return task.loss(out, y)


def train_long_range(point: LongRangePoint, seed: int) -> tuple[dict, list, list]:
    task = make_task(point.task)
    g_data = torch.Generator().manual_seed(derive_seed(seed, "data") % (2**63))
    torch.manual_seed(derive_seed(seed, "init") % (2**63))
    model = RecurrentNet(task.n_in, point.hidden, task.n_out, readout=task.output,
                         generator=torch.Generator().manual_seed(derive_seed(seed, "irnn") % (2**63)),
                         **CELLS[point.cell])
    opt = torch.optim.Adam(model.parameters(), lr=point.lr)
    reg = PascanuRegularizer(model.core) if point.cell == "tanh_omega" else None
    probe_batch = task.generate(point.batch, point.length, torch.Generator().manual_seed(derive_seed(seed, "probe") % (2**63)))
    metrics, arrays = [], []
    base = baseline_loss(point.task, point.length)

    def probe_view(step: int) -> tuple[int, float]:
        if reg is not None:
            reg.reset()
        model.zero_grad(set_to_none=True)
        with Probe(model, temporal=True, update_ratio=False, every=1) as probe:
            loss = _memory_loss(task, model(probe_batch.x), probe_batch.y)
            loss.backward()
            probe.step(loss)
            flow = next(iter(probe.temporal_flow().values()))
        if reg is not None:
            reg.reset()
        model.zero_grad(set_to_none=True)
        if not np.isfinite(flow.per_sequence).all():
            return -1, math.nan
        arrays.append((step, "temporal_profile", flow.grad_norm))
        return flow.horizon(), flow.decay_rate

    h0, r0 = probe_view(0)
    losses, diverged = [], None
    horizons = [h0]
    try:
        for step in range(1, point.steps + 1):
            b = task.generate(point.batch, point.length, g_data)
            opt.zero_grad(set_to_none=True)
            loss = _loss(task, model(b.x), b.y)
            if not torch.isfinite(loss):
                diverged = step
                break
            loss.backward()
            if reg is not None:
                (point.alpha * reg.penalty()).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), point.clip)
            opt.step()
            losses.append(loss.item())
            if step % point.eval_every == 0 or step == point.steps:
                h, r = probe_view(step)
                horizons.append(h)
                metrics += [(step, "train_loss", float(np.mean(losses[-point.eval_every:]))),
                            (step, "loss_over_baseline", float(np.mean(losses[-point.eval_every:])) / base),
                            (step, "horizon", h), (step, "decay_rate", r)]
    finally:
        if reg is not None:
            reg.close()
    tail = float(np.mean(losses[-max(1, len(losses) // 10):])) if losses else math.nan
    return dict(loss_end=tail, baseline=base, loss_over_baseline=tail / base, beats_baseline=bool(tail < 0.5 * base),
                horizon_init=h0, decay_rate_init=r0, horizon_end=horizons[-1], horizon_max=max(horizons),
                diverged_at=diverged, steps=point.steps), metrics, arrays


_BASE = LongRangePoint("adding_arjovsky", 100, "tanh")


class LongRange(Experiment):
    name = "longrange"
    title = "Remedies on the adding and copying problems: tanh RNN, IRNN, LSTM (forget bias 0, 1), GRU, RNN + Ω"
    version = "2"  # 2: the probe records every evaluation (fixed schedule)
    paper = ("Arjovsky, Shah & Bengio 2016 (tasks); Le, Jaitly & Hinton 2015 (IRNN); Hochreiter & Schmidhuber 1997; "
             "Gers et al. 2000; Cho et al. 2014; Pascanu et al. 2013")
    PROFILES = {
        "smoke": ([replace(_BASE, task=t, length=10, cell=c, hidden=8, steps=6, eval_every=3)
                   for t in ("adding_arjovsky", "copying") for c in CELLS], 1),
        "quick": ([replace(_BASE, task="adding_arjovsky", length=100, cell=c, steps=2000) for c in CELLS]
                  + [replace(_BASE, task="copying", length=50, cell=c, steps=2000) for c in CELLS], 2),
        "paper": ([replace(_BASE, task="adding_arjovsky", length=T, cell=c, hidden=128, steps=20_000, eval_every=500)
                   for T in (100, 200, 400) for c in CELLS]
                  + [replace(_BASE, task="copying", length=T, cell=c, hidden=128, steps=20_000, eval_every=500)
                     for T in (100, 200) for c in CELLS], 3),
    }

    def config(self, profile: str):
        self._check_profile(profile)
        return self.PROFILES[profile]

    def jobs(self, config) -> list[Job]:
        points, seeds = config
        return [Job(tuple(self.spec(p, s) for s in range(seeds)), f"{p.task} T={p.length} {p.cell}") for p in points]

    def run_job(self, job: Job, ctx: JobContext) -> dict[str, RunOutput]:
        point = LongRangePoint(**job.config)
        out = {}
        for i, r in enumerate(job.runs):
            out[r.key] = RunOutput(*train_long_range(point, r.seed))
            ctx.progress((i + 1) / len(job.runs))
        return out

    def report(self, runs, store, out_dir):
        return longrange_report(self, runs, store, out_dir)
