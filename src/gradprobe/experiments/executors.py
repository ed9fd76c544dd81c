"""Executors: where a sweep's jobs run. ``local`` (this machine) and ``ray``.

``local`` with ``workers=1`` runs one job after another in this process; with ``workers=N`` it runs up
to N jobs at once, each in its own worker process (``spawn``; every worker uses the driver's torch
thread count, one by default, so N workers use N cores). Workers open the store themselves only to
checkpoint and resume their job, exactly as a job in this process would; a worker whose driver died
(SIGKILL included) stops at its next progress call, so a rerun never races it.

Every executor writes results the same way: the driver (this process) writes each finished job to the
store in one transaction, so the store's content does not depend on the executor or on N (a job's
computation does not depend on where it runs; tested).

Ray (optional extra ``ray``): every job is a Ray task; ``ray_address`` (or ``RAY_ADDRESS``) names a
running cluster, otherwise a local Ray is started. Workers do not open the store: a job interrupted
on a cluster restarts from scratch on the next ``run`` (finished jobs are never repeated).
"""
from __future__ import annotations

import multiprocessing
import os
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

import torch

from gradprobe.errors import ConfigError, require
from gradprobe.experiments.registry import get_experiment
from gradprobe.experiments.runner import JobContext, execute_job, format_error, store_outputs
from gradprobe.experiments.store import Store

__all__ = ["EXECUTORS", "run_local", "run_ray"]


def _eta(start: float, done_now: int, done_before: int, total: int) -> str:
    made = done_now - done_before
    if made <= 0:
        return "?"
    left = (time.monotonic() - start) / made * (total - done_now)
    return f"{int(left // 60)}m{int(left % 60):02d}s"


def run_local(experiment, jobs, store, *, total, n_done, checkpoint_every, on_progress=None, ray_address=None,
              workers=1):
    if workers < 1:
        raise ConfigError(f"workers must be >= 1; got {workers}")
    if workers > 1:
        return _run_pool(experiment, jobs, store, total=total, n_done=n_done, checkpoint_every=checkpoint_every,
                         on_progress=on_progress, workers=workers)
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


class _WorkerContext(JobContext):
    """A worker's job context: its own store connection, and it stops when the driver is gone."""

    def __init__(self, *args, parent: int, **kw):
        super().__init__(*args, **kw)
        self._parent = parent

    def progress(self, fraction: float) -> None:
        if os.getppid() != self._parent:  # orphaned: the driver died; a rerun will claim this job again
            os._exit(3)


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def _settle(store, job, result, done: int, total: int, n_done: int, start: float, on_progress) -> int:
    """Write a job that ran elsewhere (a worker process or a Ray task) into the store: its outputs, or a
    failure if ``result()`` raises (recorded, like the one-process loop does); report progress. Returns
    the number of runs done."""
    try:
        outputs = result()
    except Exception as exc:  # the job raised: recorded as failed
        store.fail(job.keys, format_error(exc))
    else:
        store_outputs(store, outputs)
    done += len(job.runs)
    if on_progress is not None:
        on_progress(done, total, job.label, 1.0, _eta(start, done, n_done, total))
    return done


def _pool_job(experiment, job, store_path: str, resume_step, checkpoint_every: float, parent: int):
    with Store(store_path) as store:
        ctx = _WorkerContext(job.keys, store, checkpoint_every=checkpoint_every, resume_step=resume_step, parent=parent)
        return execute_job(experiment, job, ctx)


def _run_pool(experiment, jobs, store, *, total, n_done, checkpoint_every, on_progress, workers):
    start = time.monotonic()
    done = n_done
    todo = list(jobs)
    ctx = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init,
                               initargs=(torch.get_num_threads(),))
    try:
        running = {}

        def submit():
            job = todo.pop(0)
            resume = store.claim(job.keys)  # claimed when it starts, as in the one-process loop
            fut = pool.submit(_pool_job, experiment, job, str(store.path), resume, checkpoint_every, os.getpid())
            running[fut] = job

        while todo or running:
            while todo and len(running) < workers:
                submit()
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in finished:
                job = running.pop(fut)
                done = _settle(store, job, fut.result, done, total, n_done, start, on_progress)
    except BaseException:  # Ctrl-C or a store error: do not wait for the running jobs (they stop on their own)
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def _remote_job(experiment_name: str, job):
    exp = get_experiment(experiment_name)
    return execute_job(exp, job, JobContext(job.keys, None))


def run_ray(experiment, jobs, store, *, total, n_done, checkpoint_every, on_progress=None, ray_address=None,
            workers=1):
    if workers != 1:
        raise ConfigError("--workers is for the local executor; Ray runs as many jobs at once as its cluster has CPUs")
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
            done = _settle(store, job, lambda: ray.get(ref), done, total, n_done, start, on_progress)
    finally:
        if started_here:
            ray.shutdown()


EXECUTORS = {"local": run_local, "ray": run_ray}
