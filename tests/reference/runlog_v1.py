"""An independent writer of schema-1 run logs (gradprobe 0.1: one row per number), for compatibility tests.

Written from the 0.1 schema definition, not from gradprobe's reader, so reading such a file back checks
the reader against the format as it was shipped.
"""
from __future__ import annotations

import json
import math
import sqlite3

import numpy as np

DDL = """
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE sites(id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL, kind TEXT);
CREATE TABLE steps(step INTEGER PRIMARY KEY, loss REAL, wall REAL);
CREATE TABLE scalars(step INTEGER NOT NULL, site INTEGER NOT NULL, quantity TEXT NOT NULL, value,
    PRIMARY KEY (step, site, quantity)) WITHOUT ROWID;
CREATE TABLE units(step INTEGER NOT NULL, position INTEGER NOT NULL, name TEXT NOT NULL, kind TEXT,
    saturated_fraction, dead_fraction, n_units INTEGER, PRIMARY KEY (step, position)) WITHOUT ROWID;
CREATE TABLE temporal(step INTEGER NOT NULL, series TEXT NOT NULL, reverse INTEGER NOT NULL,
    h BLOB NOT NULL, c BLOB, lengths BLOB, PRIMARY KEY (step, series)) WITHOUT ROWID;
"""
QUANTITIES = ("grad_norm", "output_grad_norm", "activation_norm", "weight_norm", "update_ratio")
MASKS = ("has_grad", "has_output_grad", "has_output")


def _enc(x: float):
    return "nan" if math.isnan(x) else float(x)


def write_v1(path, steps: list[dict]) -> None:
    """``steps``: dicts with ``step, loss, names, kinds``, the five quantities and three masks as lists,
    ``backward_rank``, and optionally ``units`` = (names, kinds, sat, dead, n) and
    ``temporal`` = {series: (reverse, h, c)}."""
    con = sqlite3.connect(path)
    con.executescript(DDL)
    con.executemany("INSERT INTO meta VALUES (?, ?)", [("schema_version", "1"), ("gradprobe", json.dumps("0.1.0")),
                                                      ("layers", json.dumps(steps[0]["names"]))])
    sites: dict[str, int] = {}
    for s in steps:
        con.execute("INSERT INTO steps VALUES (?, ?, ?)", (s["step"], None if s["loss"] is None else _enc(s["loss"]), 0.0))
        for pos, (name, kind) in enumerate(zip(s["names"], s["kinds"])):
            if name not in sites:
                sites[name] = con.execute("INSERT INTO sites(name, kind) VALUES (?, ?)", (name, kind)).lastrowid
            sid = sites[name]
            rows = [(s["step"], sid, q, _enc(float(s[q][pos]))) for q in QUANTITIES + MASKS]
            rows += [(s["step"], sid, "backward_rank", int(s["backward_rank"][pos])), (s["step"], sid, "position", pos)]
            con.executemany("INSERT INTO scalars VALUES (?, ?, ?, ?)", rows)
        if "units" in s:
            names, kinds, sat, dead, n = s["units"]
            con.executemany("INSERT INTO units VALUES (?, ?, ?, ?, ?, ?, ?)",
                            [(s["step"], i, names[i], kinds[i], _enc(sat[i]), _enc(dead[i]), int(n[i])) for i in range(len(names))])
        for series, (reverse, h, c) in s.get("temporal", {}).items():
            con.execute("INSERT INTO temporal VALUES (?, ?, ?, ?, ?, ?)",
                        (s["step"], series, int(reverse), np.asarray(h, "<f8").tobytes(),
                         None if c is None else np.asarray(c, "<f8").tobytes(), None))
    con.commit()
    con.close()
