"""Executors: where a sweep's jobs run. ``local`` (this process, one job after another) and ``ray``.

Both write results the same way: the driver (this process) writes each finished job to the store in
one transaction, so the store's content does not depend on the executor.

Ray (optional extra ``ray``): every job is a Ray task; ``ray_address`` (or ``RAY_ADDRESS``) names a
running cluster, otherwise a local Ray is started. Workers do not open the store: a job interrupted
on a cluster restarts from scratch on the next ``run`` (finished jobs are never repeated).
"""
from __future__ import annotations

import time

from gradprobe.errors import require
from gradprobe.experiments.registry import get_experiment
from gradprobe.experiments.runner import JobContext, execute_job, format_error, store_outputs

__all__ = ["EXECUTORS", "run_local", "run_ray"]


def _eta(start: float, done_now: int, done_before: int, total: int) -> str:
    made = done_now - done_before
    if made <= 0:
        return "?"
    left = (time.monotonic() - start) / made * (total - done_now)
    return f"{int(left // 60)}m{int(left % 60):02d}s"


def run_local(experiment, jobs, store, *, total, n_done, checkpoint_every, on_progress=None, ray_address=None):
    start = time.monotonic()
    done = n_done
    for job in jobs:
        def progress(frac, job=job, done=done):
            if on_progress is not None:
                on_progress(done, total, job.label, frac, _eta(start, done, n_done, total))

        resume = store.claim(job.keys)
        ctx = JobContext(job.keys, store, checkpoint_every=checkpoint_every, on_progress=progress,
                         resume_step=resume)
        progress(0.0)
        try:
            outputs = execute_job(experiment, job, ctx)
        except Exception as exc:  # a failed job is recorded; the sweep goes on (KeyboardInterrupt stops it)
            store.fail(job.keys, format_error(exc))
            done += len(job.runs)
            continue
        store_outputs(store, outputs)
        done += len(job.runs)
        if on_progress is not None:
            on_progress(done, total, job.label, 1.0, _eta(start, done, n_done, total))


def _remote_job(experiment_name: str, job):
    exp = get_experiment(experiment_name)
    return execute_job(exp, job, JobContext(job.keys, None))


def run_ray(experiment, jobs, store, *, total, n_done, checkpoint_every, on_progress=None, ray_address=None):
    ray = require("ray", "ray")
    started_here = False
    if not ray.is_initialized():
        ray.init(address=ray_address, include_dashboard=False, log_to_driver=False)
        started_here = True
    try:
        remote = ray.remote(num_cpus=1)(_remote_job)
        pending = {}
        for job in jobs:
            store.claim(job.keys)
            pending[remote.remote(experiment.name, job)] = job
        start = time.monotonic()
        done = n_done
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            ref = ready[0]
            job = pending.pop(ref)
            try:
                outputs = ray.get(ref)
            except Exception as exc:  # the task raised: recorded as failed, like the local executor
                store.fail(job.keys, format_error(exc))
            else:
                store_outputs(store, outputs)
            done += len(job.runs)
            if on_progress is not None:
                on_progress(done, total, job.label, 1.0, _eta(start, done, n_done, total))
    finally:
        if started_here:
            ray.shutdown()


EXECUTORS = {"local": run_local, "ray": run_ray}
