"""Edit a run log's SQLite file behind gradprobe's back (to damage it on purpose), with plain sqlite3."""
from __future__ import annotations

import os
import sqlite3


def execute_and_commit(path: str | os.PathLike, *statements) -> None:
    """Run ``statements`` on the database at ``path`` in one transaction, commit and close.

    Each statement is an SQL string or an ``(sql, parameters)`` pair, as ``sqlite3.Connection.execute`` takes.
    """
    con = sqlite3.connect(path)
    try:
        for st in statements:
            con.execute(*((st,) if isinstance(st, str) else st))
        con.commit()
    finally:
        con.close()
