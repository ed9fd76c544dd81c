"""Run a profile of an experiment into a store: the entry point of ``gradprobe experiment run``."""
from __future__ import annotations

from collections.abc import Callable

from gradprobe.errors import ConfigError
from gradprobe.experiments.executors import EXECUTORS
from gradprobe.experiments.runner import Experiment, jobs_for
from gradprobe.experiments.store import Store, StoreStatus

__all__ = ["run_sweep"]


def run_sweep(experiment: Experiment, profile: str, store_path, *, executor: str = "local",
              checkpoint_every: float = 60.0, on_progress: Callable[..., None] | None = None,
              max_jobs: int | None = None, ray_address: str | None = None, workers: int = 1) -> StoreStatus:
    """Run every not-yet-done run of ``experiment``'s ``profile`` into the store at ``store_path``.

    ``on_progress(done, total, label, fraction)`` is called as jobs advance (runs done / total).
    ``max_jobs`` stops after that many jobs (for tests). ``workers``: jobs run at once by the local
    executor, each in its own process (the results do not depend on it). Returns the sweep's status afterwards.
    """
    if executor not in EXECUTORS:
        raise ConfigError(f"unknown executor {executor!r}; choose one of {sorted(EXECUTORS)}")
    jobs = jobs_for(experiment, profile)
    sweep = f"{experiment.name}/{profile}"
    with Store(store_path) as store:
        store.register(sweep, [(r.key, experiment.name, r.as_dict()) for j in jobs for r in j.runs])
        done = {r.key for r in store.runs(sweep=sweep, status="done")}
        todo = [j for j in jobs if not all(k in done for k in j.keys)]
        for j in todo:
            if any(k in done for k in j.keys):  # a partly done job (its grouping changed): redo only the rest
                raise ConfigError(f"job {j.label!r} is partly done in {store_path}; its runs were grouped differently "
                                  "before. Use a new store or the old grouping")
        if max_jobs is not None:
            todo = todo[: int(max_jobs)]
        total = sum(len(j.runs) for j in jobs)
        EXECUTORS[executor](experiment, todo, store, total=total, n_done=len(done), checkpoint_every=checkpoint_every,
                            on_progress=on_progress, ray_address=ray_address, workers=workers)
        return store.status(sweep)
