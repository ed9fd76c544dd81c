"""Sweeps of runs, keyed by what they compute, resumable after any crash.

* A :class:`RunSpec` is everything that determines one run: experiment, the experiment's code
  version, its point configuration (a JSON object) and the seed. Its :attr:`~RunSpec.key` is a hash
  of all of them, so the same run is never computed twice and a changed config or code version is
  a new run.
* A :class:`Job` is the runs trained together (the seeds of one point, vectorized as one batched
  computation); a job is the unit an executor schedules.
* An :class:`Experiment` turns a profile (``smoke``, ``quick``, ``paper``) into jobs, runs a job, and
  reports on stored results.
* :func:`gradprobe.experiments.sweep.run_sweep` registers a profile's runs in the :class:`~gradprobe.experiments.store.Store`,
  skips those already done, and runs the rest with an executor (``local`` or ``ray``), writing each
  job's results in one transaction. Long jobs checkpoint their state through :class:`JobContext`
  (every ``checkpoint_every`` seconds) and continue from it after a crash.
"""
from __future__ import annotations

import hashlib
import json
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path

import numpy as np

from gradprobe.errors import ConfigError
from gradprobe.experiments.store import RunRecord, Store

__all__ = ["PROFILES", "RunSpec", "Job", "RunOutput", "JobContext", "Experiment", "Report", "derive_seed", "jobs_for"]

PROFILES = ("smoke", "quick", "paper")


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def derive_seed(*parts) -> int:
    """A 63-bit seed from any JSON-able parts (a run's seed and a purpose such as ``"init"``)."""
    return int(hashlib.sha256(_canonical(list(parts)).encode()).hexdigest()[:15], 16)


@dataclass(frozen=True)
class RunSpec:
    """What determines one run. ``config`` is a JSON object (a dataclass is converted)."""

    experiment: str
    version: str
    config: Mapping
    seed: int

    def __post_init__(self):
        cfg = asdict(self.config) if is_dataclass(self.config) else dict(self.config)
        try:
            _canonical(cfg)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"a run's config must be plain JSON (numbers, strings, lists, dicts); {exc}") from None
        object.__setattr__(self, "config", cfg)

    def as_dict(self) -> dict:
        return {"experiment": self.experiment, "version": self.version, "config": dict(self.config), "seed": int(self.seed)}

    @property
    def key(self) -> str:
        return hashlib.sha256(_canonical(self.as_dict()).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Job:
    """Runs trained together; ``label`` names the point for progress lines."""

    runs: tuple[RunSpec, ...]
    label: str = ""

    @property
    def keys(self) -> list[str]:
        return [r.key for r in self.runs]

    @property
    def config(self) -> dict:
        return dict(self.runs[0].config)


@dataclass
class RunOutput:
    """What a run hands to the store: a JSON ``result``, ``metrics`` rows ``(step, name, value)`` and
    ``arrays`` rows ``(step, name, array)`` not yet written by a checkpoint."""

    result: dict
    metrics: list = field(default_factory=list)
    arrays: list = field(default_factory=list)


class JobContext:
    """What a running job may ask of the runner: resume state, checkpoints, progress.

    ``store`` is ``None`` where the job cannot reach the store (a remote Ray worker): checkpoints are
    then skipped and an interrupted job restarts from scratch.
    """

    def __init__(self, keys: list[str], store: Store | None = None, *, checkpoint_every: float = 60.0,
                 on_progress: Callable[[float], None] | None = None, resume_step: int | None = None):
        self.keys = keys
        self.store = store
        self.checkpoint_every = float(checkpoint_every)
        self._on_progress = on_progress
        self._last = time.monotonic()
        self._resume_step = resume_step
        self.checkpoints_written = 0

    def resume(self) -> tuple[int, dict[str, np.ndarray]] | None:
        """``(step, tensors)`` of the last checkpoint of this job, or ``None``."""
        if self.store is None or self._resume_step is None:
            return None
        return self.store.load_checkpoint(self.keys)

    def due(self) -> bool:
        """A checkpoint is due (``checkpoint_every`` seconds since the last one; never without a store)."""
        return self.store is not None and time.monotonic() - self._last >= self.checkpoint_every

    def checkpoint(self, step: int, tensors: Mapping[str, object], metrics: Mapping[str, list] | None = None,
                   arrays: Mapping[str, list] | None = None) -> None:
        """Save the job's state at ``step`` with the rows produced since the last checkpoint (the caller
        then clears its buffers). Atomic; a no-op without a store."""
        if self.store is None:
            return
        self.store.checkpoint(self.keys, step, tensors, metrics, arrays)
        self._last = time.monotonic()
        self.checkpoints_written += 1

    def progress(self, fraction: float) -> None:
        if self._on_progress is not None:
            self._on_progress(float(fraction))


@dataclass
class Report:
    """An experiment's account of stored results: markdown lines and the figures written."""

    title: str
    lines: list[str]
    figures: list[Path] = field(default_factory=list)

    def markdown(self) -> str:
        out = [f"## {self.title}", ""] + self.lines
        for f in self.figures:
            out += ["", f"![{f.stem}]({f.name})"]
        return "\n".join(out) + "\n"


class Experiment:
    """Base of every experiment: subclasses set ``name``, ``title``, ``version`` and implement the hooks.

    ``version`` is part of every run key: bump it when a change to the code changes results, so old
    results are not mixed with new ones.
    """

    name: str = ""
    title: str = ""
    version: str = "1"
    paper: str = ""  # the publication it reproduces, by name

    def config(self, profile: str):
        """The configuration dataclass of ``profile`` (one of ``PROFILES``)."""
        raise NotImplementedError

    def jobs(self, config) -> list[Job]:
        raise NotImplementedError

    def run_job(self, job: Job, ctx: JobContext) -> dict[str, RunOutput]:
        """Train the job's runs; returns ``{run key: RunOutput}``."""
        raise NotImplementedError

    def report(self, runs: list[RunRecord], store: Store, out_dir: Path | None) -> Report:
        raise NotImplementedError

    # helpers for subclasses
    def spec(self, config, seed: int) -> RunSpec:
        return RunSpec(self.name, self.version, config, int(seed))

    def _check_profile(self, profile: str) -> None:
        if profile not in PROFILES:
            raise ConfigError(f"unknown profile {profile!r}; choose one of {PROFILES}")


def jobs_for(experiment: Experiment, profile: str) -> list[Job]:
    experiment._check_profile(profile)
    jobs = experiment.jobs(experiment.config(profile))
    keys = [k for j in jobs for k in j.keys]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"experiment {experiment.name!r} ({profile}) lists the same run twice")
    return jobs


def execute_job(experiment: Experiment, job: Job, ctx: JobContext) -> dict[str, RunOutput]:
    """Run one job and check that it returned one output per run."""
    out = experiment.run_job(job, ctx)
    if set(out) != set(job.keys):
        raise ConfigError(f"{experiment.name}: run_job returned outputs for {sorted(out)}, expected {sorted(job.keys)}")
    return out


def store_outputs(store: Store, outputs: dict[str, RunOutput]) -> None:
    store.finish_job({k: o.result for k, o in outputs.items()}, {k: o.metrics for k, o in outputs.items()},
                     {k: o.arrays for k, o in outputs.items()})


def format_error(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-4000:]
