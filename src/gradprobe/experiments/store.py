"""One SQLite file for a suite of experiments: runs, results, metrics over training, probe traces, checkpoints.

Standard library ``sqlite3`` only, and no pickle: specs and results are JSON, arrays are raw
little-endian bytes with their dtype and shape beside them.

Crash safety. Every state change is one transaction (WAL journal), so a sweep killed at any
instant (SIGKILL included) leaves the file consistent: a run is ``done`` together with its result,
metrics and arrays, or it is not done at all. A run that was ``running`` when its process died is
simply not done: the next ``run`` claims it again, first deleting whatever rows it had written after
its last checkpoint, then continues from that checkpoint (or from scratch). Nothing is written
twice; :meth:`Store.status` counts ``duplicates`` (runs with more than one result, metric points
written twice) to prove it.

Tables::

    runs(key, experiment, sweep, spec, status, attempts, started, finished, error, host)
    results(key, result)                       one JSON object per finished run
    metrics(key, step, name, value)            scalar series over training
    arrays(key, step, name, dtype, shape, data)  probe traces and other arrays
    checkpoints(job, step, created)            one per running job; its tensors in checkpoint_arrays
    checkpoint_arrays(job, name, dtype, shape, data)
    sweeps(sweep, key)                         which runs a sweep (experiment + profile) holds
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import sqlite3
import time
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gradprobe.errors import ConfigError, RunLogError

__all__ = ["Store", "RunRecord", "StoreStatus", "encode_array", "decode_array"]

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS runs(
    key TEXT PRIMARY KEY, experiment TEXT NOT NULL, spec TEXT NOT NULL, status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, started REAL, finished REAL, error TEXT, host TEXT);
CREATE TABLE IF NOT EXISTS sweeps(sweep TEXT NOT NULL, key TEXT NOT NULL, PRIMARY KEY(sweep, key));
CREATE TABLE IF NOT EXISTS results(id INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL, result TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS metrics(key TEXT NOT NULL, step INTEGER NOT NULL, name TEXT NOT NULL, value REAL);
CREATE INDEX IF NOT EXISTS metrics_key ON metrics(key, name, step);
CREATE TABLE IF NOT EXISTS arrays(key TEXT NOT NULL, step INTEGER NOT NULL, name TEXT NOT NULL,
    dtype TEXT NOT NULL, shape TEXT NOT NULL, data BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS arrays_key ON arrays(key, name, step);
CREATE TABLE IF NOT EXISTS checkpoints(job TEXT PRIMARY KEY, step INTEGER NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS checkpoint_arrays(job TEXT NOT NULL, name TEXT NOT NULL, dtype TEXT NOT NULL,
    shape TEXT NOT NULL, data BLOB NOT NULL, PRIMARY KEY(job, name));
"""

_DTYPES = {"float64", "float32", "int64", "int32", "uint8", "bool", "float16"}


def encode_array(a) -> tuple[str, str, bytes]:
    """``(dtype, shape-json, bytes)`` of an array or tensor (little-endian; no pickle)."""
    if hasattr(a, "detach"):  # a torch tensor, on any device
        a = a.detach().cpu().numpy()
    a = np.ascontiguousarray(a)
    if a.dtype.name not in _DTYPES:
        raise ConfigError(f"cannot store an array of dtype {a.dtype}; use one of {sorted(_DTYPES)}")
    return a.dtype.name, json.dumps(list(a.shape)), a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()


def decode_array(dtype: str, shape: str, data: bytes) -> np.ndarray:
    if dtype not in _DTYPES:
        raise RunLogError(f"the store holds an array of unknown dtype {dtype!r}")
    return np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder("<")).astype(dtype).reshape(json.loads(shape))


def _json(obj) -> str:
    def default(o):
        if isinstance(o, (np.floating, np.integer)):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        raise TypeError(f"not JSON serialisable: {type(o).__name__}")

    return json.dumps(obj, sort_keys=True, default=default, allow_nan=True)


@dataclass(frozen=True)
class RunRecord:
    """One run as stored: its spec, status and (when done) result."""

    key: str
    experiment: str
    spec: dict
    status: str
    attempts: int
    result: dict | None
    error: str | None

    @property
    def config(self) -> dict:
        return self.spec["config"]

    @property
    def seed(self) -> int:
        return self.spec["seed"]


@dataclass(frozen=True)
class StoreStatus:
    total: int
    done: int
    failed: int
    pending: int  # not done and not failed (never started, or interrupted)
    running: int  # marked running (by a live process, or by one that died: it is also pending)
    duplicates: int

    def as_dict(self) -> dict:
        return dict(total=self.total, done=self.done, failed=self.failed, pending=self.pending,
                    running=self.running, duplicates=self.duplicates)


class Store:
    """The experiment store at ``path`` (created if missing). Use as a context manager or call :meth:`close`.

    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "s.sqlite")
    >>> with Store(path) as s:
    ...     s.register("demo/smoke", [("k1", "demo", {"config": {}, "seed": 0})])
    ...     s.claim(["k1"]) and None
    ...     s.finish("k1", {"ok": True}, metrics=[(0, "loss", 1.0)])
    ...     s.status().as_dict()
    {'total': 1, 'done': 1, 'failed': 0, 'pending': 0, 'running': 0, 'duplicates': 0}
    """

    def __init__(self, path: str | os.PathLike, *, timeout: float = 60.0):
        self.path = Path(path)
        if self.path.is_dir():
            raise ConfigError(f"--store {self.path} is a directory; give a file name such as {self.path / 'store.sqlite'}")
        if self.path.parent and not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(str(self.path), timeout=timeout, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            row = self._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        except sqlite3.DatabaseError as exc:
            raise RunLogError(f"{self.path} is not a gradprobe experiment store ({exc})") from exc
        if row is None:
            self._db.execute("INSERT OR IGNORE INTO meta VALUES('schema', ?)", (str(SCHEMA_VERSION),))
        elif int(row[0]) != SCHEMA_VERSION:
            raise RunLogError(f"{self.path} has store schema {row[0]}; this gradprobe reads schema {SCHEMA_VERSION}")

    # ------------------------------------------------------------------ plumbing
    @contextmanager
    def transaction(self):
        """``BEGIN IMMEDIATE`` … ``COMMIT`` (rolled back on error): all or nothing."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ runs
    def register(self, sweep: str, runs: Iterable[tuple[str, str, dict]]) -> None:
        """Add ``(key, experiment, spec)`` runs (``pending``) to ``sweep``; already known keys are kept as they are."""
        with self.transaction() as db:
            for key, experiment, spec in runs:
                db.execute("INSERT OR IGNORE INTO runs(key, experiment, spec, status) VALUES(?, ?, ?, 'pending')",
                           (key, experiment, _json(spec)))
                db.execute("INSERT OR IGNORE INTO sweeps VALUES(?, ?)", (sweep, key))

    def claim(self, keys: list[str]) -> int | None:
        """Mark the runs ``keys`` running (one job). Returns the step of the job's checkpoint to resume from
        (rows written after it are deleted), or ``None`` when the job starts from scratch (its partial
        rows, if any, are deleted). Raises if one of them is already done."""
        job = job_key(keys)
        with self.transaction() as db:
            marks = ",".join("?" * len(keys))
            done = db.execute(f"SELECT key FROM runs WHERE status='done' AND key IN ({marks})", keys).fetchall()
            if done:
                raise ConfigError(f"runs already done cannot be claimed again: {[d[0] for d in done]}")
            ck = db.execute("SELECT step FROM checkpoints WHERE job=?", (job,)).fetchone()
            step = None if ck is None else int(ck[0])
            limit = -1 if step is None else step
            db.execute(f"DELETE FROM metrics WHERE step > ? AND key IN ({marks})", (limit, *keys))
            db.execute(f"DELETE FROM arrays WHERE step > ? AND key IN ({marks})", (limit, *keys))
            db.execute(f"DELETE FROM results WHERE key IN ({marks})", keys)
            db.execute(f"UPDATE runs SET status='running', attempts=attempts+1, started=?, error=NULL, host=? "
                       f"WHERE key IN ({marks})", (time.time(), f"{socket.gethostname()}:{os.getpid()}", *keys))
        return step

    def checkpoint(self, keys: list[str], step: int, tensors: Mapping[str, object],
                   metrics: Mapping[str, list[tuple[int, str, float]]] | None = None,
                   arrays: Mapping[str, list[tuple[int, str, object]]] | None = None) -> None:
        """Atomically: the job's state at ``step`` and the rows its runs produced since the last checkpoint."""
        job = job_key(keys)
        with self.transaction() as db:
            self._write_rows(db, metrics or {}, arrays or {})
            db.execute("INSERT OR REPLACE INTO checkpoints VALUES(?, ?, ?)", (job, int(step), time.time()))
            db.execute("DELETE FROM checkpoint_arrays WHERE job=?", (job,))
            for name, t in tensors.items():
                db.execute("INSERT INTO checkpoint_arrays VALUES(?, ?, ?, ?, ?)", (job, name, *encode_array(t)))

    def load_checkpoint(self, keys: list[str]) -> tuple[int, dict[str, np.ndarray]] | None:
        job = job_key(keys)
        row = self._db.execute("SELECT step FROM checkpoints WHERE job=?", (job,)).fetchone()
        if row is None:
            return None
        rows = self._db.execute("SELECT name, dtype, shape, data FROM checkpoint_arrays WHERE job=?", (job,)).fetchall()
        return int(row[0]), {n: decode_array(d, s, b) for n, d, s, b in rows}

    def finish_job(self, results: Mapping[str, dict], metrics: Mapping[str, list[tuple[int, str, float]]] | None = None,
                   arrays: Mapping[str, list[tuple[int, str, object]]] | None = None) -> None:
        """Atomically: every run of a job done, with its result and remaining rows; the checkpoint goes."""
        keys = list(results)
        with self.transaction() as db:
            self._write_rows(db, metrics or {}, arrays or {})
            for key, result in results.items():
                db.execute("INSERT INTO results(key, result) VALUES(?, ?)", (key, _json(result)))
                db.execute("UPDATE runs SET status='done', finished=?, error=NULL WHERE key=?", (time.time(), key))
            job = job_key(keys)
            db.execute("DELETE FROM checkpoints WHERE job=?", (job,))
            db.execute("DELETE FROM checkpoint_arrays WHERE job=?", (job,))

    def finish(self, key: str, result: dict, metrics: list[tuple[int, str, float]] | None = None,
               arrays: list[tuple[int, str, object]] | None = None) -> None:
        """One run done (a job of one run)."""
        self.finish_job({key: result}, {key: metrics or []}, {key: arrays or []})

    def fail(self, keys: list[str], error: str) -> None:
        with self.transaction() as db:
            for key in keys:
                db.execute("UPDATE runs SET status='failed', finished=?, error=? WHERE key=?", (time.time(), error, key))

    @staticmethod
    def _write_rows(db, metrics, arrays) -> None:
        for key, rows in metrics.items():
            db.executemany("INSERT INTO metrics VALUES(?, ?, ?, ?)",
                           [(key, int(s), n, None if math.isnan(float(v)) else float(v))
                            for s, n, v in rows])
        for key, rows in arrays.items():
            db.executemany("INSERT INTO arrays VALUES(?, ?, ?, ?, ?, ?)",
                           [(key, int(s), n, *encode_array(a)) for s, n, a in rows])

    # ------------------------------------------------------------------ reading
    def status(self, sweep: str | None = None) -> StoreStatus:
        """Counts over the runs of ``sweep`` (all runs when ``None``)."""
        where, args = ("WHERE key IN (SELECT key FROM sweeps WHERE sweep=?)", (sweep,)) if sweep else ("", ())
        rows = self._db.execute(f"SELECT status, COUNT(*) FROM runs {where} GROUP BY status", args).fetchall()
        by = dict(rows)
        total = sum(by.values())
        keyset = "AND key IN (SELECT key FROM sweeps WHERE sweep=?)" if sweep else ""
        dup_results = self._db.execute(
            f"SELECT COUNT(*) FROM (SELECT key FROM results WHERE 1 {keyset} GROUP BY key HAVING COUNT(*) > 1)", args
        ).fetchone()[0]
        dup_metrics = self._db.execute(
            f"SELECT COUNT(*) FROM (SELECT 1 FROM metrics WHERE 1 {keyset} GROUP BY key, name, step HAVING COUNT(*) > 1)", args
        ).fetchone()[0]
        dup_arrays = self._db.execute(
            f"SELECT COUNT(*) FROM (SELECT 1 FROM arrays WHERE 1 {keyset} GROUP BY key, name, step HAVING COUNT(*) > 1)", args
        ).fetchone()[0]
        done, failed = by.get("done", 0), by.get("failed", 0)
        return StoreStatus(total=total, done=done, failed=failed, pending=total - done - failed,
                           running=by.get("running", 0), duplicates=int(dup_results + dup_metrics + dup_arrays))

    def sweeps(self) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT DISTINCT sweep FROM sweeps ORDER BY sweep")]

    def runs(self, *, experiment: str | None = None, sweep: str | None = None, status: str | None = None) -> list[RunRecord]:
        """Stored runs (with their results), filtered."""
        q = ("SELECT r.key, r.experiment, r.spec, r.status, r.attempts, r.error, "
             "(SELECT result FROM results WHERE results.key = r.key ORDER BY id DESC LIMIT 1) FROM runs r WHERE 1")
        args: list = []
        if experiment:
            q += " AND r.experiment=?"
            args.append(experiment)
        if sweep:
            q += " AND r.key IN (SELECT key FROM sweeps WHERE sweep=?)"
            args.append(sweep)
        if status:
            q += " AND r.status=?"
            args.append(status)
        out = []
        for key, exp, spec, st, att, err, res in self._db.execute(q + " ORDER BY r.rowid", args):
            out.append(RunRecord(key, exp, json.loads(spec), st, int(att), None if res is None else json.loads(res), err))
        return out

    def metrics(self, key: str, name: str | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """``{name: (steps, values)}`` for one run (NaN for values stored as NULL)."""
        q, args = "SELECT name, step, value FROM metrics WHERE key=?", [key]
        if name:
            q += " AND name=?"
            args.append(name)
        out: dict[str, list] = {}
        for n, s, v in self._db.execute(q + " ORDER BY name, step", args):
            out.setdefault(n, []).append((s, math.nan if v is None else v))
        return {n: (np.array([s for s, _ in rows], dtype=np.int64), np.array([v for _, v in rows])) for n, rows in out.items()}

    def arrays(self, key: str, name: str | None = None) -> list[tuple[int, str, np.ndarray]]:
        q, args = "SELECT step, name, dtype, shape, data FROM arrays WHERE key=?", [key]
        if name:
            q += " AND name=?"
            args.append(name)
        return [(s, n, decode_array(d, sh, b)) for s, n, d, sh, b in self._db.execute(q + " ORDER BY step", args)]


def job_key(keys: Iterable[str]) -> str:
    """The key of a job (the runs trained together): stable in the order of its runs."""
    return hashlib.sha256("|".join(keys).encode()).hexdigest()[:20]
