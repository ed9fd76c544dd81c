"""``gradprobe export RUN_LOG (--csv PATH | --tensorboard DIR)``: a run log as a tidy CSV table or TensorBoard events.

The CSV has one row per number (columns ``step, table, layer, quantity, index, value``; see
:mod:`gradprobe.trace.tidy`): per-layer quantities, the loss, and every table with its site. The
TensorBoard export writes the tags of the live ``TensorBoardSink``, one point per recorded step. Both
hold exactly the run log's numbers (floats written with ``repr``: they read back bit-identical).
"""
from __future__ import annotations

import csv
from pathlib import Path

from gradprobe.errors import ConfigError, RunLogError
from gradprobe.integrations.tensorboard import export_tensorboard
from gradprobe.runlog import read_run
from gradprobe.trace.tidy import COLUMNS, tidy_rows


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="write a run log (*.sqlite) as a tidy CSV table or as TensorBoard event files")
    p.add_argument("log", metavar="RUN_LOG", help="a run-log file, or a directory holding exactly one")
    p.add_argument("--csv", metavar="PATH", help="write a long table: step, table, layer, quantity, index, value")
    p.add_argument("--tensorboard", metavar="DIR", help="write TensorBoard event files (tags gradprobe/<quantity>/<layer>)")
    p.set_defaults(run=run)


def write_csv(run_log, path) -> int:
    """Write the tidy table of every recorded step of ``run_log`` to ``path``; returns the number of rows."""
    run = read_run(run_log)
    out = Path(path)
    n = 0
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(COLUMNS)
            for f in run.records:
                for row in tidy_rows(f):
                    w.writerow(row[:-1] + (repr(row[-1]),))
                    n += 1
    except OSError as exc:
        raise RunLogError(f"cannot write the CSV file {out}: {exc}") from exc
    return n


def run(args) -> int:
    if not args.csv and not args.tensorboard:
        raise ConfigError("say what to write: --csv PATH and/or --tensorboard DIR")
    if args.csv:
        rows = write_csv(args.log, args.csv)
        print(f"csv: {args.csv} ({rows} rows)")
    if args.tensorboard:
        steps = export_tensorboard(args.log, args.tensorboard)
        print(f"tensorboard: {args.tensorboard} ({steps} steps)")
    return 0
