"""The run log: every recorded step in an SQLite database (stdlib ``sqlite3``, WAL journal).

Schema (long format, one row per number; no pickle anywhere)::

    meta(key TEXT PRIMARY KEY, value TEXT)                  -- versions, start time, config (JSON)
    sites(id INTEGER PRIMARY KEY, name TEXT UNIQUE, kind TEXT)
    steps(step INTEGER PRIMARY KEY, loss REAL, wall REAL)
    scalars(step INTEGER, site INTEGER, quantity TEXT, value REAL,
            PRIMARY KEY (step, site, quantity)) WITHOUT ROWID

    units(step, position, name, kind, saturated_fraction, dead_fraction, n_units)   -- Probe(units=True)
    temporal(step, series, reverse, h, c, lengths)   -- Probe(temporal=True): the batch profiles
            ‖∂E/∂h_k‖ (and ‖∂E/∂c_k‖ for LSTMs) over k as little-endian float64 arrays (raw bytes)

``value`` keeps ±Inf; NaN is stored as the text ``'nan'`` (SQLite would turn a NaN REAL into NULL).
Temporal profiles are stored for the whole batch (norm over sequences); the per-sequence ``(B, T)``
arrays stay in memory only, so a reloaded :class:`TemporalFlow` has ``B = 1``.
Durability: WAL with ``synchronous=NORMAL``; a transaction is committed every ``commit_every`` steps
and at :meth:`RunLog.close`. A process killed with SIGKILL loses at most the steps after the last
commit, and the file opens cleanly with every committed step intact (SQLite's WAL recovery).
"""
from __future__ import annotations

import json
import math
import os
import platform
import sqlite3
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from gradprobe.errors import ConfigError, RunLogError
from gradprobe.trace import MASKS, QUANTITIES, LayerFlow, TemporalFlow, Trace, UnitStats

__all__ = ["RunLog", "load_trace", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1
_SUFFIX = ".sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS sites(id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL, kind TEXT);
CREATE TABLE IF NOT EXISTS steps(step INTEGER PRIMARY KEY, loss REAL, wall REAL);
CREATE TABLE IF NOT EXISTS scalars(
    step INTEGER NOT NULL, site INTEGER NOT NULL, quantity TEXT NOT NULL, value,
    PRIMARY KEY (step, site, quantity)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS units(
    step INTEGER NOT NULL, position INTEGER NOT NULL, name TEXT NOT NULL, kind TEXT,
    saturated_fraction, dead_fraction, n_units INTEGER,
    PRIMARY KEY (step, position)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS temporal(
    step INTEGER NOT NULL, series TEXT NOT NULL, reverse INTEGER NOT NULL,
    h BLOB NOT NULL, c BLOB, lengths BLOB,
    PRIMARY KEY (step, series)) WITHOUT ROWID;
"""


def _encode(x: float):
    return "nan" if math.isnan(x) else float(x)


def _blob(a) -> bytes:
    return np.ascontiguousarray(a, dtype="<f8").tobytes()


def _unblob(b: bytes | None) -> np.ndarray | None:
    return None if b is None else np.frombuffer(b, dtype="<f8").copy()


def _decode(v) -> float:
    return float("nan") if v is None or v == "nan" else float(v)


class RunLog:
    """Append-only writer of one run's steps.

    >>> import tempfile, os
    >>> d = tempfile.mkdtemp()
    >>> log = RunLog(os.path.join(d, "run.sqlite"))
    >>> log.write(LayerFlow.from_arrays(["fc"], grad_norm=[0.5], step=0, loss=1.0))
    >>> log.close()
    >>> load_trace(d).last.grad_norm.tolist()
    [0.5]
    """

    def __init__(self, path: str | os.PathLike, *, commit_every: int = 50, meta: dict | None = None):
        if commit_every < 1:
            raise ConfigError(f"commit_every={commit_every} must be >= 1")
        self.path = Path(path)
        self.commit_every = commit_every
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._con = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
            self._con.execute("PRAGMA journal_mode=WAL")
            self._con.execute("PRAGMA synchronous=NORMAL")
            self._con.executescript(_SCHEMA)
            held = self._con.execute("SELECT count(*) FROM steps").fetchone()[0]
        except (sqlite3.Error, OSError) as exc:
            raise RunLogError(f"cannot create the run log at {self.path}: {exc}") from exc
        if held:
            # steps are keyed by number: writing a new run here would silently interleave two runs
            self._con.close()
            raise RunLogError(
                f"{self.path} already holds a run ({held} steps); choose another run_name or remove the file"
            )
        self._sites: dict[str, int] = {
            name: i for i, name in self._con.execute("SELECT id, name FROM sites")
        }
        self._uncommitted = 0
        self._in_txn = False
        base = {
            "schema_version": SCHEMA_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "python": platform.python_version(),
        }
        try:
            import torch

            base["torch"] = torch.__version__
        except ImportError:  # pragma: no cover
            pass
        from gradprobe._version import __version__

        base["gradprobe"] = __version__
        base.update(meta or {})
        self._begin()
        self._con.executemany(
            "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
            [(k, json.dumps(v)) for k, v in base.items()],
        )
        self.commit()

    def _begin(self) -> None:
        if not self._in_txn:
            self._con.execute("BEGIN")
            self._in_txn = True

    def _site_ids(self, flow: LayerFlow) -> list[int]:
        ids = []
        for name, kind in zip(flow.names, flow.kinds):
            sid = self._sites.get(name)
            if sid is None:
                cur = self._con.execute("INSERT INTO sites(name, kind) VALUES (?, ?)", (name, kind))
                sid = self._sites[name] = int(cur.lastrowid)
            ids.append(sid)
        return ids

    def write(self, flow: LayerFlow) -> None:
        """Queue one step; it is durable after the next commit (every ``commit_every`` writes)."""
        if flow.step is None:
            raise ConfigError("a LayerFlow written to a run log needs a step number")
        try:
            self._begin()
            ids = self._site_ids(flow)
            self._con.execute(
                "INSERT OR REPLACE INTO steps(step, loss, wall) VALUES (?, ?, ?)",
                (int(flow.step), None if flow.loss is None else _encode(flow.loss), time.time()),
            )
            rows = []
            for q in QUANTITIES + MASKS:
                vals = getattr(flow, q)
                rows.extend((int(flow.step), sid, q, _encode(float(v))) for sid, v in zip(ids, vals))
            rows.extend((int(flow.step), sid, "backward_rank", int(r)) for sid, r in zip(ids, flow.backward_rank))
            rows.extend((int(flow.step), sid, "position", i) for i, sid in enumerate(ids))
            self._con.executemany(
                "INSERT OR REPLACE INTO scalars(step, site, quantity, value) VALUES (?, ?, ?, ?)", rows
            )
            if flow.units is not None:
                u = flow.units
                self._con.executemany(
                    "INSERT OR REPLACE INTO units VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [(int(flow.step), i, u.names[i], u.kinds[i], _encode(float(u.saturated_fraction[i])),
                      _encode(float(u.dead_fraction[i])), int(u.n_units[i])) for i in range(len(u))],
                )
            for series, tf in (flow.temporal or {}).items():
                c = tf.cell_norm
                self._con.execute(
                    "INSERT OR REPLACE INTO temporal VALUES (?, ?, ?, ?, ?, ?)",
                    (int(flow.step), series, int(tf.reverse), _blob(tf.grad_norm),
                     None if c is None else _blob(c), None if tf.lengths is None else _blob(tf.lengths)),
                )
        except sqlite3.Error as exc:
            raise RunLogError(f"cannot write step {flow.step} to the run log {self.path}: {exc}") from exc
        self._uncommitted += 1
        if self._uncommitted >= self.commit_every:
            self.commit()

    def set_meta(self, key: str, value) -> None:
        self._begin()
        self._con.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, json.dumps(value)))

    def commit(self) -> None:
        if self._in_txn:
            self._con.execute("COMMIT")
            self._in_txn = False
        self._uncommitted = 0

    def close(self) -> None:
        if self._con is None:
            return
        self.commit()
        self._con.close()
        self._con = None


def resolve_log_path(path: str | os.PathLike) -> Path:
    """A run-log file from a file path or a directory holding exactly one ``*.sqlite`` run log."""
    p = Path(path)
    if p.is_dir():
        found = sorted(p.glob(f"*{_SUFFIX}"))
        if not found:
            raise RunLogError(f"no run log (*{_SUFFIX}) in the directory {p}")
        if len(found) > 1:
            raise RunLogError(
                f"the directory {p} holds {len(found)} run logs; pass one of: " + ", ".join(f.name for f in found)
            )
        return found[0]
    if not p.exists():
        raise RunLogError(f"no run log at {p}")
    return p


def load_meta(path: str | os.PathLike) -> dict:
    """The ``meta`` table of a run log as a dict."""
    con = _open_ro(resolve_log_path(path))
    try:
        return {k: json.loads(v) for k, v in con.execute("SELECT key, value FROM meta")}
    finally:
        con.close()


def _open_ro(p: Path) -> sqlite3.Connection:
    try:
        con = sqlite3.connect(str(p))
        con.execute("SELECT count(*) FROM steps").fetchone()
        return con
    except sqlite3.Error as exc:
        raise RunLogError(f"{p} is not a readable gradprobe run log: {exc}") from exc


def load_trace(path: str | os.PathLike) -> Trace:
    """Read a run log back into an unbounded :class:`~gradprobe.trace.Trace` (every committed step).

    ``path`` is the ``.sqlite`` file or the ``log_dir`` that holds exactly one.
    """
    p = resolve_log_path(path)
    con = _open_ro(p)
    try:
        sites = {i: (n, k) for i, n, k in con.execute("SELECT id, name, kind FROM sites")}
        losses = {s: l for s, l in con.execute("SELECT step, loss FROM steps ORDER BY step")}
        per_step: dict[int, dict[int, dict[str, float]]] = {s: {} for s in losses}
        for step, site, q, v in con.execute("SELECT step, site, quantity, value FROM scalars ORDER BY step"):
            per_step.setdefault(step, {}).setdefault(site, {})[q] = v
        units: dict[int, list] = {}
        temporal: dict[int, dict] = {}
        if _has_table(con, "units"):  # logs written before schema additions have no such tables
            for row in con.execute("SELECT * FROM units ORDER BY step, position"):
                units.setdefault(row[0], []).append(row[2:])
            for step, series, reverse, h, c, lengths in con.execute("SELECT * FROM temporal ORDER BY step"):
                temporal.setdefault(step, {})[series] = TemporalFlow(
                    series, _unblob(h)[None, :], None if c is None else _unblob(c)[None, :], bool(reverse),
                    None if lengths is None else _unblob(lengths).astype(np.int64))
    except sqlite3.Error as exc:
        raise RunLogError(f"cannot read the run log {p}: {exc}") from exc
    finally:
        con.close()
    trace = Trace(max_steps=None)
    for step in sorted(per_step):
        by_site = per_step[step]
        order = _forward_order(by_site)
        arrays = {q: [_decode(by_site[s].get(q)) for s in order] for q in QUANTITIES}
        masks = {m: [bool(_decode(by_site[s].get(m, 0.0))) for s in order] for m in MASKS}
        rank = [int(_decode(by_site[s].get("backward_rank", 0))) for s in order]
        loss = losses.get(step)
        flow = LayerFlow.from_arrays(
                [sites[s][0] for s in order],
                [sites[s][1] or "" for s in order],
                step=step,
                loss=None if loss is None else _decode(loss),
                backward_rank=rank,
                **arrays,
                **masks,
            )
        if step in units:
            rows = units[step]
            flow = replace(flow, units=UnitStats(
                tuple(r[0] for r in rows), tuple(r[1] or "" for r in rows),
                np.array([_decode(r[2]) for r in rows]), np.array([_decode(r[3]) for r in rows]),
                np.array([int(r[4]) for r in rows])))
        if step in temporal:
            flow = replace(flow, temporal=temporal[step])
        trace.append(flow)
    return trace


def _has_table(con: sqlite3.Connection, name: str) -> bool:
    return con.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (name,)).fetchone() is not None


def _forward_order(by_site: dict) -> list[int]:
    # Each row set carries its layer's forward position in that step ("position").
    return sorted(by_site, key=lambda s: _decode(by_site[s].get("position", s)))
