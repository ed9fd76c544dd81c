"""The run log: a whole run in one SQLite file (stdlib ``sqlite3``, WAL journal), one row per recorded step.

Schema version 2 (no pickle anywhere)::

    meta(key TEXT PRIMARY KEY, value TEXT)        -- JSON: versions, model, layers, probe config and
                                                  -- cadence, model facts, the diagnosis, sessions
    layouts(id INTEGER PRIMARY KEY, spec TEXT UNIQUE)   -- JSON: which arrays a step's blob holds
    steps(step INTEGER PRIMARY KEY, loss, wall REAL, layout INTEGER, data BLOB)

A step's ``data`` is the raw little-endian bytes of its arrays, in the order its layout lists them:
every per-layer quantity as ``float64[L]``, its measured mask as ``L`` packed bits, the backward rank,
then every table column (see :class:`gradprobe.trace.Table`; transient columns are not stored). The
layout (layer names and kinds, quantity names, table sites and column shapes) is stored once and
shared by every step that has the same one, so a 20-layer step costs about a kilobyte and any
quantity a user's recorder adds is stored without a schema change. ``loss`` keeps ±Inf; NaN is stored
as the text ``'nan'`` (SQLite turns a NaN REAL into NULL, which means "no loss").

Durability: WAL with ``synchronous=NORMAL``; a transaction is committed every ``commit_every`` steps
and at :meth:`RunLog.close`. A process killed with SIGKILL loses at most the steps after the last
commit, and the file opens cleanly with every committed step intact (SQLite's WAL recovery). A failed
commit (a full disk) raises :class:`~gradprobe.errors.RunLogError` naming the file and the last
committed step; it is never masked by a later one.

One writer at a time: an open :class:`RunLog` holds an advisory lock (``flock``) on the side file
``<log>.sqlite.lock``, which names the process that holds it and is removed at close. A second writer
(another probe with the same ``run_name``, in this process or another, in any mode) is refused with
a message saying so, instead of mixing two runs' steps in one file; a writer that was killed releases
the lock with its process. Readers (``read_run``, ``gradprobe report`` on a live run) take no lock.

Schema 1 run logs (gradprobe 0.1, one row per number) are still read; :func:`upgrade` rewrites one as
schema 2 (needed before appending to it).
"""
from __future__ import annotations

import json
import math
import os
import platform
import sqlite3
import time

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, two writers are not detected there
    fcntl = None
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from gradprobe._version import __version__
from gradprobe.errors import ConfigError, RunLogError
from gradprobe.trace import MASK_OF, QUANTITIES, LayerFlow, ModelFacts, RunHeader, Sink, Table, Trace

__all__ = ["RunLog", "RunRecord", "read_run", "load_trace", "load_meta", "add_note", "plain_json", "upgrade",
           "SCHEMA_VERSION", "MODES", "HEADER_KEYS"]

SCHEMA_VERSION = 2
_SUFFIX = ".sqlite"
#: how :class:`RunLog` treats an existing file: refuse it, add steps to it, or replace it
MODES = ("new", "append", "overwrite")
#: ``meta`` keys that describe the run itself (written once, by the header); a note may not replace them
HEADER_KEYS = frozenset({"schema_version", "created", "sessions", "model", "layers", "kinds", "config",
                         "python", "torch", "gradprobe", "upgraded_from_schema"})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS layouts(id INTEGER PRIMARY KEY, spec TEXT UNIQUE NOT NULL);
CREATE TABLE IF NOT EXISTS steps(
    step INTEGER PRIMARY KEY, loss, wall REAL, layout INTEGER NOT NULL, data BLOB NOT NULL);
"""


def _encode_loss(x: float | None):
    return None if x is None else ("nan" if math.isnan(x) else float(x))


def _decode_loss(v) -> float | None:
    if v is None:
        return None
    if v == "nan":
        return math.nan
    if isinstance(v, (int, float)):
        return float(v)
    raise ValueError(f"loss {v!r} is not a number")


def plain_json(key: str, value):
    """``value`` as the run log will give it back (a JSON round trip: tuples become lists, NaN/Inf kept);
    a :class:`~gradprobe.errors.ConfigError` naming ``key`` when it is not plain JSON or ``key`` is a header key."""
    if not isinstance(key, str) or not key:
        raise ConfigError(f"a run-level note needs a non-empty string key; got {key!r}")
    if key in HEADER_KEYS:
        raise ConfigError(f"note key {key!r} is part of the run's header and cannot be replaced; "
                          f"choose another key (reserved: {sorted(HEADER_KEYS)})")
    try:
        return json.loads(json.dumps(value, allow_nan=True))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"the note {key!r} must be plain JSON (dict, list, str, number, bool, None): {exc}") from exc


def versions() -> dict:
    """The versions a run log records: python, torch, gradprobe."""
    return {"python": platform.python_version(), "torch": torch.__version__, "gradprobe": __version__}


# ---------------------------------------------------------------------------------------------- layout
_INT_STORES = [np.dtype(t) for t in ("<u1", "<u2", "<u4", "<i1", "<i2", "<i4", "<i8")]
#: (store, min, max) of each: ``np.iinfo`` per array and step was most of the integer path's cost
_INT_RANGES = [(t, int(np.iinfo(t).min), int(np.iinfo(t).max)) for t in _INT_STORES]


def _entry(a: np.ndarray) -> tuple[tuple, bytes]:
    """How one array is stored: (its layout entry, its bytes). Entries are JSON-able tuples:

    ``("f", dtype, shape)`` raw little-endian; ``("nan", dtype, shape)`` every value NaN (no bytes);
    ``("bits", shape)`` booleans packed 8 per byte; ``("int", stored, dtype, shape)`` integers in the
    smallest type that holds them (ranks, unit counts)."""
    shape = a.shape  # (a tuple of Python ints already)
    kind = a.dtype.kind
    if kind == "b":
        return ("bits", shape), np.packbits(a.reshape(-1)).tobytes()
    if kind in "iu":
        store = np.dtype("<i8")
        if a.size:
            lo, hi = int(a.min()), int(a.max())
            store = next(t for t, tmin, tmax in _INT_RANGES if tmin <= lo and hi <= tmax)
        return ("int", store.str, a.dtype.str, shape), a.astype(store).tobytes()
    # (the first entry decides most arrays: only an all-NaN one needs the whole check)
    if kind == "f" and a.size and np.isnan(a.flat[0]) and np.isnan(a).all() and not np.signbit(a).any():
        return ("nan", a.dtype.str, shape), b""
    le = a.dtype.newbyteorder("<")
    return ("f", le.str, shape), a.astype(le, copy=False).tobytes()


def encode(flow: LayerFlow) -> tuple[tuple, bytes]:
    """``(layout key, data)`` of one step: every array's storage entry (see :func:`_entry`) and their bytes.

    The key holds everything but the numbers (names, kinds, quantity and table structure, entries);
    :func:`layout_of` turns it into the JSON layout stored once per distinct key."""
    parts, entries = [], []
    for q in flow.values:
        e, b = _entry(flow.values[q])
        entries.append(e)
        parts.append(b)
    for q in flow.values:
        e, b = _entry(flow.measured[q])
        entries.append(e)
        parts.append(b)
    e, b = _entry(flow.backward_rank)
    entries.append(e)
    parts.append(b)
    tables = []
    for name, t in flow.tables.items():
        cols = []
        for c, col in t.columns.items():
            if c in t.transient:
                continue
            if isinstance(col, tuple):
                ragged = []
                for a in col:
                    if a is None:
                        ragged.append(None)
                        continue
                    e, b = _entry(a)
                    ragged.append(e)
                    parts.append(b)
                cols.append((c, ("ragged", tuple(ragged))))
            else:
                e, b = _entry(col)
                cols.append((c, e))
                parts.append(b)
        tables.append((name, t.sites, t.kinds, tuple(cols)))
    key = (flow.names, flow.kinds, tuple(flow.values), tuple(entries), tuple(tables), flow.recorders)
    return key, b"".join(parts)


def layout_of(key: tuple) -> dict:
    """The JSON layout for an :func:`encode` key."""
    names, kinds, quantities, entries, tables, recorders = key
    n = len(quantities)
    return {"names": list(names), "kinds": list(kinds), "quantities": list(quantities), "recorders": list(recorders),
            "values": list(entries[:n]), "masks": list(entries[n : 2 * n]), "rank": entries[2 * n],
            "tables": [{"name": t, "sites": list(sites), "kinds": list(k), "columns": dict(cols)}
                       for t, sites, k, cols in tables]}


#: an all-NaN array is stored without bytes; a layout claiming more entries than this is damaged
_MAX_NAN_ENTRIES = 1 << 24


def _shape(shape) -> tuple[tuple[int, ...], int]:
    """A stored shape, checked (non-negative integers), and its number of entries."""
    if not isinstance(shape, (list, tuple)) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ValueError(f"{shape!r} is not an array shape")
    return tuple(shape), math.prod(shape)


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.pos = memoryview(data), 0

    def _raw(self, dtype, count: int) -> np.ndarray:
        dt = np.dtype(dtype)
        end = self.pos + dt.itemsize * count
        if end > len(self.data):
            raise ValueError("the step's data is shorter than its layout says")
        a = np.frombuffer(self.data[self.pos : end], dtype=dt)
        self.pos = end
        return a

    def take(self, entry) -> np.ndarray:
        tag = entry[0]
        if tag == "bits":
            shape, n = _shape(entry[1])
            raw = self._raw("u1", (n + 7) // 8)
            return np.unpackbits(raw, count=n).astype(bool).reshape(shape)
        if tag == "int":
            _, stored, dtype, shape = entry
            shape, n = _shape(shape)
            return self._raw(stored, n).astype(np.dtype(dtype).newbyteorder("=")).reshape(shape)
        if tag == "nan":
            _, dtype, shape = entry
            shape, n = _shape(shape)
            if n > _MAX_NAN_ENTRIES:
                raise ValueError(f"an all-NaN array claims the shape {shape}")
            return np.full(shape, np.nan, dtype=np.dtype(dtype).newbyteorder("="))
        if tag == "f":
            _, dtype, shape = entry
            shape, n = _shape(shape)
            dt = np.dtype(dtype)
            return self._raw(dt, n).astype(dt.newbyteorder("=")).reshape(shape)
        raise ValueError(f"unknown storage entry {entry!r}")


def decode(spec: dict, data: bytes, *, step: int | None, loss: float | None) -> LayerFlow:
    """Inverse of :func:`encode` for one step, given its JSON layout."""
    r = _Reader(data)
    for what in ("names", "kinds"):
        if not all(isinstance(x, str) for x in spec[what]):
            raise ValueError(f"its layout's {what} are not all text")
    qs = spec["quantities"]
    values = {q: r.take(e) for q, e in zip(qs, spec["values"])}
    measured = {q: r.take(e) for q, e in zip(qs, spec["masks"])}
    rank = r.take(spec["rank"])
    tables = {}
    for t in spec["tables"]:
        cols = {}
        for c, e in t["columns"].items():
            if e[0] == "ragged":
                cols[c] = tuple(None if x is None else r.take(x) for x in e[1])
            else:
                cols[c] = r.take(e)
        if not all(isinstance(x, str) for x in (t["name"], *t["sites"], *t["kinds"])):
            raise ValueError("its layout's table names are not all text")
        tables[t["name"]] = Table(tuple(t["sites"]), tuple(t["kinds"]), cols)
    if r.pos != len(r.data):
        raise ValueError("the step's data is longer than its layout says")
    return LayerFlow(tuple(spec["names"]), tuple(spec["kinds"]), values, measured, rank, step=step, loss=loss,
                     tables=tables, recorders=tuple(spec.get("recorders", ())))


# ---------------------------------------------------------------------------------------------- writer
class _WriterLock:
    """The advisory lock of one run log's writer: ``flock`` on ``<path>.lock`` (a side file, because
    closing any other descriptor of the database itself would drop SQLite's own POSIX locks)."""

    def __init__(self, db: Path):
        self.path = Path(str(db) + ".lock")
        self.fd: int | None = None

    def acquire(self) -> None:
        if fcntl is None:  # pragma: no cover
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "another probe"
            os.close(fd)
            db = str(self.path)[: -len(".lock")]
            raise RunLogError(
                f"{db} is being written by another open probe ({holder}); two writers on one run log would mix "
                "their steps. Close that probe first, or give this one another run_name"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {platform.node()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still holding it: a newcomer then makes a fresh file
        except OSError:  # pragma: no cover
            pass
        os.close(self.fd)
        self.fd = None


class RunLog(Sink):
    """Writes one run to an SQLite file: a :class:`~gradprobe.trace.Sink`.

    ``mode``: ``"new"`` (default) refuses a file that already holds a run, ``"append"`` adds steps to it
    (numbered on from its last step: :attr:`next_step`), ``"overwrite"`` replaces it.

    >>> import tempfile, os
    >>> d = tempfile.mkdtemp()
    >>> log = RunLog(os.path.join(d, "run.sqlite"))
    >>> log.write(LayerFlow.from_arrays(["fc"], grad_norm=[0.5], step=0, loss=1.0))
    >>> log.close()
    >>> load_trace(d).last.grad_norm.tolist()
    [0.5]
    """

    def __init__(self, path: str | os.PathLike, *, commit_every: int = 50, mode: str = "new", meta: dict | None = None):
        if int(commit_every) < 1:
            raise ConfigError(f"commit_every={commit_every} must be >= 1")
        if mode not in MODES:
            raise ConfigError(f"run log mode {mode!r} must be one of {MODES}")
        self.path = Path(path)
        self.commit_every = int(commit_every)
        self.mode = mode
        self._con = None
        self._in_txn = False
        self._uncommitted = 0
        self._last_committed: int | None = None
        self._pending_last: int | None = None
        self._layouts: dict[str, int] = {}
        self._layout_key: dict[tuple, int] = {}
        self._opened = False
        self._extra_meta = dict(meta or {})
        self._lock = _WriterLock(self.path)
        existing_steps = 0
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock.acquire()  # before looking at (or removing) the file: another writer may hold it
            if mode == "overwrite":
                for suffix in ("", "-wal", "-shm"):
                    Path(str(self.path) + suffix).unlink(missing_ok=True)
            fresh = not self.path.exists() or self.path.stat().st_size == 0
            self._con = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
            self._con.execute("PRAGMA journal_mode=WAL")
            self._con.execute("PRAGMA synchronous=NORMAL")
            if not fresh:
                schema = _schema_version(self._con, self.path)
                if schema != SCHEMA_VERSION:
                    raise RunLogError(
                        f"{self.path} is a schema-{schema} run log; gradprobe {__version__} writes schema {SCHEMA_VERSION}: "
                        f"convert it first with gradprobe.runlog.upgrade({str(self.path)!r})"
                    )
                existing_steps = self._con.execute("SELECT count(*) FROM steps").fetchone()[0]
                held = self._con.execute("SELECT value FROM meta WHERE key='model'").fetchone()
                if mode == "new" and (existing_steps or held):
                    # (no writer holds it: we have its lock) a header without steps is a run that stopped early
                    what = (f"{existing_steps} steps" if existing_steps else
                            "a run's header but no step: a run that stopped before its first recorded step")
                    raise RunLogError(
                        f"{self.path} already holds a run ({what}); choose another run_name, remove the file, or "
                        "open it with mode='append' (add steps) or mode='overwrite' (replace it)"
                    )
            self._con.executescript(_SCHEMA)
            if fresh:
                self._con.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('schema_version', ?)",
                                  (json.dumps(SCHEMA_VERSION),))
            for i, spec in self._con.execute("SELECT id, spec FROM layouts"):
                self._layouts[spec] = i
            last = self._con.execute("SELECT max(step) FROM steps").fetchone()[0]
        except sqlite3.Error as exc:
            self._abandon()
            raise RunLogError(f"cannot open the run log {self.path}: {exc}") from exc
        except (OSError, RunLogError) as exc:
            self._abandon()
            if isinstance(exc, RunLogError):
                raise
            raise RunLogError(f"cannot create the run log {self.path}: {exc}") from exc
        self._last_committed = None if last is None else int(last)
        #: the number the next step must have (0 for a new log; after the last step when appending)
        self.next_step = 0 if last is None else int(last) + 1
        self.existing_steps = existing_steps

    def _abandon(self) -> None:
        if self._con is not None:
            try:
                self._con.close()
            except sqlite3.Error:  # pragma: no cover
                pass
            self._con = None
        self._lock.release()

    # ------------------------------------------------------------------ sink
    def open(self, header: RunHeader) -> None:
        """Write the run's header (once; appending adds a session entry and keeps the first header)."""
        meta = {"schema_version": SCHEMA_VERSION, **header.versions, "model": header.model,
                "layers": list(header.layers), "kinds": list(header.kinds), "config": header.config}
        if header.facts is not None:
            meta["facts"] = header.facts.as_dict()
        session = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "first_step": header.first_step,
                   "config": header.config, "pid": os.getpid(), **header.versions}
        self._open_meta(meta, session)

    def _open_meta(self, meta: dict, session: dict) -> None:
        if self._opened:
            return
        self._opened = True
        held = dict(self._read_meta())
        sessions = held.get("sessions", [])
        if held.get("model") is not None:  # appending: keep the first session's header
            meta = {k: v for k, v in meta.items() if k not in held}
        if "created" not in held:
            meta.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        meta["sessions"] = sessions + [session]
        meta.update(self._extra_meta)
        self._put_meta(meta)
        self.commit()

    def _read_meta(self):
        return [(k, json.loads(v)) for k, v in self._con.execute("SELECT key, value FROM meta")]

    def _put_meta(self, items: dict) -> None:
        try:
            self._begin()
            self._con.executemany("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                                  [(k, json.dumps(v, allow_nan=True)) for k, v in items.items()])
        except sqlite3.Error as exc:
            raise RunLogError(f"cannot write to the run log {self.path}: {exc}") from exc

    def note(self, key: str, value) -> None:
        """Save a run-level result (``"diagnosis"``, ``"facts"``, ...) as JSON; committed with the next commit.

        ``key`` may not be one of :data:`HEADER_KEYS`; ``value`` must be plain JSON (see :func:`plain_json`)."""
        self._check_open()
        value = plain_json(key, value)
        if not self._opened:
            self._open_meta({"schema_version": SCHEMA_VERSION, **versions()}, {"first_step": self.next_step})
        self._put_meta({key: value})

    def _begin(self) -> None:
        if not self._in_txn:
            self._con.execute("BEGIN")
            self._in_txn = True

    def _check_open(self) -> None:
        if self._con is None:
            raise RunLogError(f"the run log {self.path} is closed")

    def _layout_id(self, key: tuple) -> int:
        lid = self._layout_key.get(key)
        if lid is None:
            spec = json.dumps(layout_of(key), separators=(",", ":"))
            lid = self._layouts.get(spec)
            if lid is None:
                cur = self._con.execute("INSERT INTO layouts(spec) VALUES (?)", (spec,))
                lid = self._layouts[spec] = int(cur.lastrowid)
            self._layout_key[key] = lid
        return lid

    def write(self, record: LayerFlow) -> None:
        """Queue one step; it is durable after the next commit (every ``commit_every`` writes)."""
        self._check_open()
        if record.step is None:
            raise ConfigError("a LayerFlow written to a run log needs a step number")
        if not self._opened:
            self._open_meta({"schema_version": SCHEMA_VERSION, **versions(), "layers": list(record.names),
                             "kinds": list(record.kinds)}, {"first_step": int(record.step)})
        key, data = encode(record)
        try:
            self._begin()
            self._con.execute(
                "INSERT INTO steps(step, loss, wall, layout, data) VALUES (?, ?, ?, ?, ?)",
                (int(record.step), _encode_loss(record.loss), time.time(), self._layout_id(key), data),
            )
        except sqlite3.IntegrityError as exc:
            raise RunLogError(
                f"{self.path} already holds step {record.step}: two writers on one run log, or a step number "
                "that goes backwards (steps are numbered on from the log's last step when appending)"
            ) from exc
        except sqlite3.Error as exc:
            raise RunLogError(self._failure(f"cannot write step {record.step}", exc)) from exc
        self._pending_last = int(record.step)
        self._uncommitted += 1
        if self._uncommitted >= self.commit_every:
            self.commit()

    def _failure(self, what: str, exc: Exception) -> str:
        last = "no step" if self._last_committed is None else f"every step up to {self._last_committed}"
        text = str(exc)
        hint = (" (is the disk full, or a file-size limit reached?)" if ("full" in text or "I/O" in text) else
                " (another process is writing to it)" if "locked" in text else "")
        return (f"{what} to the run log {self.path}: {text}{hint}. The file holds {last} (committed); later steps "
                "are lost")

    def commit(self) -> None:
        """Make every queued step durable."""
        if not self._in_txn:
            return
        try:
            self._con.execute("COMMIT")
        except sqlite3.Error as exc:
            # the transaction is gone (or must go): roll back so close() does not try to commit it again
            try:
                self._con.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            self._in_txn = False
            self._uncommitted = 0
            raise RunLogError(self._failure("cannot commit", exc)) from exc
        self._in_txn = False
        self._uncommitted = 0
        if self._pending_last is not None:
            self._last_committed = self._pending_last

    @property
    def last_committed_step(self) -> int | None:
        """The last step that is durable in the file (``None`` before the first commit of a step)."""
        return self._last_committed

    def close(self) -> None:
        """Commit and close; idempotent. A failed final commit raises :class:`RunLogError` (after closing)."""
        if self._con is None:
            return
        try:
            self.commit()
        finally:
            self._abandon()


# ---------------------------------------------------------------------------------------------- reading
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


def _has_table(con: sqlite3.Connection, name: str) -> bool:
    return con.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (name,)).fetchone() is not None


def _schema_version(con: sqlite3.Connection, p: Path) -> int:
    """The schema of an existing run log; a clear error for a newer one or a foreign file."""
    try:
        if not _has_table(con, "meta") or not _has_table(con, "steps"):
            raise RunLogError(f"{p} is not a readable gradprobe run log: it has no meta/steps tables")
        row = con.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    except sqlite3.Error as exc:
        raise RunLogError(f"{p} is not a readable gradprobe run log: {exc}") from exc
    try:
        v = json.loads(row[0]) if row is not None else (1 if _has_table(con, "scalars") else None)
    except (json.JSONDecodeError, TypeError):
        v = None
    if not isinstance(v, int) or v < 1:
        raise RunLogError(f"{p} is not a readable gradprobe run log: unknown schema version {row and row[0]!r}")
    if v > SCHEMA_VERSION:
        raise RunLogError(
            f"{p} was written with run-log schema {v} by a newer gradprobe; this gradprobe ({__version__}) reads "
            f"schemas 1 to {SCHEMA_VERSION}: upgrade gradprobe to read it"
        )
    return v


def _open_ro(p: Path) -> sqlite3.Connection:
    try:
        con = sqlite3.connect(f"file:{p}?mode=ro", uri=True)
        con.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.Error as exc:
        raise RunLogError(f"{p} is not a readable gradprobe run log: {exc}") from exc
    return con


@dataclass
class RunRecord:
    """Everything a run log holds, as plain data: ``meta`` (JSON values), ``facts``, every record, ``schema``."""

    path: Path
    meta: dict
    records: list[LayerFlow] = field(default_factory=list)
    facts: ModelFacts | None = None
    schema: int = SCHEMA_VERSION

    def trace(self, max_steps: int | None = None) -> Trace:
        return Trace.of(self.records, max_steps)


def read_run(path: str | os.PathLike) -> RunRecord:
    """Read a whole run log (either schema); ``path`` is the file or a directory holding exactly one."""
    p = resolve_log_path(path)
    con = _open_ro(p)
    try:
        schema = _schema_version(con, p)
        meta = _json_values(con.execute("SELECT key, value FROM meta"), p, "meta value {!r}")
        records = _read_v1(con, p) if schema == 1 else _read_v2(con, p)
    except sqlite3.Error as exc:
        raise RunLogError(f"cannot read the run log {p}: {exc}") from exc
    finally:
        con.close()
    try:
        facts = ModelFacts.from_dict(meta["facts"]) if isinstance(meta.get("facts"), dict) else None
    except (KeyError, IndexError, ValueError, TypeError, AttributeError, ConfigError) as exc:
        raise RunLogError(f"the run log {p} is damaged: its model facts cannot be read ({type(exc).__name__}: {exc})") from exc
    return RunRecord(p, meta, records, facts, schema)


def _json_values(rows, p: Path, what: str) -> dict:
    """``{key: decoded value}`` over ``rows`` of ``(key, JSON text)`` from a table of the run log ``p``; a value
    that is not JSON is a damaged log, named by ``what.format(key)`` (``"meta value {!r}"``)."""
    out = {}
    for k, v in rows:
        try:
            out[k] = json.loads(v)
        except (ValueError, TypeError) as exc:  # (UnicodeDecodeError is a ValueError)
            raise RunLogError(f"the run log {p} is damaged: {what.format(k)} is not JSON ({exc})") from exc
    return out


def _read_v2(con: sqlite3.Connection, p: Path) -> list[LayerFlow]:
    layouts = _json_values(con.execute("SELECT id, spec FROM layouts"), p, "layout {}")
    out = []
    for step, loss, layout, data in con.execute("SELECT step, loss, layout, data FROM steps ORDER BY step"):
        try:
            spec = layouts[layout]
            if not isinstance(data, bytes):
                raise ValueError(f"its data is a {type(data).__name__}, not bytes")
            out.append(decode(spec, data, step=int(step), loss=_decode_loss(loss)))
        except (KeyError, IndexError, ValueError, TypeError, AttributeError, ConfigError) as exc:
            raise RunLogError(f"the run log {p} is damaged at step {step}: {exc}") from exc
    return out


def _read_v1(con: sqlite3.Connection, p: Path) -> list[LayerFlow]:
    """Schema 1 (gradprobe 0.1): one row per (step, layer, quantity) number."""
    def num(v) -> float:
        if v is None or v == "nan":
            return math.nan
        if isinstance(v, (int, float)):
            return float(v)
        raise ValueError(f"{v!r} is not a number")

    try:
        sites = {i: (n, k) for i, n, k in con.execute("SELECT id, name, kind FROM sites")}
        losses = {s: _decode_loss(v) for s, v in con.execute("SELECT step, loss FROM steps ORDER BY step")}
        per_step: dict[int, dict[int, dict[str, float]]] = {s: {} for s in losses}
        for step, site, q, v in con.execute("SELECT step, site, quantity, value FROM scalars ORDER BY step"):
            per_step.setdefault(step, {}).setdefault(site, {})[q] = num(v)
        units: dict[int, list] = {}
        temporal: dict[int, list] = {}
        if _has_table(con, "units"):
            for row in con.execute("SELECT * FROM units ORDER BY step, position"):
                units.setdefault(row[0], []).append(row[2:])
            for step, series, reverse, h, c, lengths in con.execute("SELECT * FROM temporal ORDER BY step"):
                temporal.setdefault(step, []).append((series, reverse, h, c, lengths))
        return _build_v1(sites, losses, per_step, units, temporal, num)
    except (KeyError, IndexError, ValueError, TypeError, AttributeError, ConfigError) as exc:
        raise RunLogError(f"the run log {p} is damaged: {exc}") from exc


def _build_v1(sites, losses, per_step, units, temporal, num) -> list[LayerFlow]:
    blob = lambda b: None if b is None else np.frombuffer(b, dtype="<f8").astype(np.float64)  # noqa: E731
    out = []
    for step in sorted(per_step):
        by_site = per_step[step]
        order = sorted(by_site, key=lambda s: by_site[s].get("position", s))
        values = {q: [by_site[s].get(q, math.nan) for s in order] for q in QUANTITIES}
        measured = {q: [bool(by_site[s].get(m, 0.0)) for s in order] for q, m in MASK_OF.items()}
        tables = {}
        if step in units:
            rows = units[step]
            tables["units"] = Table(tuple(r[0] for r in rows), tuple(r[1] or "" for r in rows), {
                "saturated_fraction": np.array([num(r[2]) for r in rows]),
                "dead_fraction": np.array([num(r[3]) for r in rows]),
                "n_units": np.array([int(r[4]) for r in rows], dtype=np.int64)})
        if step in temporal:
            rows = temporal[step]
            tables["temporal"] = Table(tuple(r[0] for r in rows), ("",) * len(rows), {
                "h": tuple(blob(r[2]) for r in rows), "c": tuple(blob(r[3]) for r in rows),
                "lengths": tuple(None if r[4] is None else blob(r[4]).astype(np.int64) for r in rows),
                "reverse": np.array([bool(r[1]) for r in rows])})
        out.append(LayerFlow(
            tuple(sites[s][0] for s in order), tuple(sites[s][1] or "" for s in order), values, measured,
            [int(by_site[s].get("backward_rank", 0)) for s in order], step=step, loss=losses.get(step), tables=tables,
        ))
    return out


def load_trace(path: str | os.PathLike) -> Trace:
    """Read a run log back into an unbounded :class:`~gradprobe.trace.Trace` (every committed step).

    ``path`` is the ``.sqlite`` file or the ``log_dir`` that holds exactly one.
    """
    return read_run(path).trace()


def load_meta(path: str | os.PathLike) -> dict:
    """The ``meta`` table of a run log as a dict of JSON values."""
    return read_run(path).meta


def add_note(path: str | os.PathLike, key: str, value) -> None:
    """Add (or replace) one run-level note in a finished run log, e.g. a test accuracy measured after training.

    The same as ``probe.note(key, value)`` while the probe was open; it writes no session entry.
    ``path`` is the ``.sqlite`` file or a directory holding exactly one; the log must be schema 2 and not
    held open by a probe that is still writing (a :class:`~gradprobe.errors.RunLogError` says so).
    """
    value = plain_json(key, value)
    p = resolve_log_path(path)
    try:
        con = sqlite3.connect(str(p), timeout=2.0, isolation_level=None)
    except sqlite3.Error as exc:
        raise RunLogError(f"cannot open the run log {p}: {exc}") from exc
    try:
        schema = _schema_version(con, p)
        if schema != SCHEMA_VERSION:
            raise RunLogError(f"{p} is a schema-{schema} run log; convert it first with "
                              f"gradprobe.runlog.upgrade({str(p)!r}) to add notes to it")
        con.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, json.dumps(value, allow_nan=True)))
    except sqlite3.OperationalError as exc:
        raise RunLogError(f"cannot add the note {key!r} to the run log {p} ({exc}): if a probe still writes to it, "
                          "use probe.note(key, value) before it closes") from exc
    except sqlite3.Error as exc:
        raise RunLogError(f"cannot add the note {key!r} to the run log {p}: {exc}") from exc
    finally:
        con.close()


def upgrade(path: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Rewrite a schema-1 run log as schema 2 (in place unless ``out`` is given); returns the new file.

    Every step and the old ``meta`` entries are kept; the numbers are bit-identical.
    """
    run = read_run(path)
    if run.schema == SCHEMA_VERSION and out is None:
        return run.path
    dest = Path(out) if out is not None else run.path.with_name(run.path.stem + ".upgrading" + _SUFFIX)
    log = RunLog(dest, mode="overwrite", commit_every=10_000)
    meta = {k: v for k, v in run.meta.items() if k != "schema_version"}
    meta.setdefault("upgraded_from_schema", run.schema)
    log._open_meta({"schema_version": SCHEMA_VERSION, **meta}, {"upgraded": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    for f in run.records:
        log.write(f)
    log.close()
    if out is None:
        for suffix in ("-wal", "-shm"):
            Path(str(run.path) + suffix).unlink(missing_ok=True)
        os.replace(dest, run.path)
        return run.path
    return dest
