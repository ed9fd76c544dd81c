"""``gradprobe experiment list | run NAME | status | report``: the classic experiments, resumable.

    gradprobe experiment list
    gradprobe experiment run pascanu2013 --profile quick --store runs.sqlite [--executor local|ray] [--workers 2]
    gradprobe experiment status --store runs.sqlite [--json]
    gradprobe experiment report --store runs.sqlite [--out DIR]

A sweep killed at any point resumes on the next ``run`` with the same store: finished runs are
skipped, interrupted ones continue from their last checkpoint, nothing is written twice.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from gradprobe.cli._console import Progress
from gradprobe.errors import ConfigError
from gradprobe.experiments.registry import EXPERIMENTS, get_experiment
from gradprobe.experiments.runner import PROFILES, jobs_for
from gradprobe.experiments.store import Store
from gradprobe.experiments.sweep import run_sweep
from gradprobe.report.html import Section, write_html

DEFAULT_STORE = "gradprobe-experiments.sqlite"


def add_parser(sub) -> None:
    p = sub.add_parser("experiment", help="run the classic experiments (Pascanu 2013, Glorot 2010, ...) into a store")
    esub = p.add_subparsers(dest="experiment_command", metavar="ACTION")
    esub.add_parser("list", help="the experiments and their profiles").set_defaults(run=run_list)
    r = esub.add_parser("run", help="run (or resume) one experiment's sweep")
    r.add_argument("name", help="experiment name (see `gradprobe experiment list`)")
    r.add_argument("--profile", choices=("smoke", "quick", "paper"), default="quick",
                   help="smoke: seconds; quick: <= 15 min on 2 cores; paper: the authors' protocol (default: %(default)s)")
    r.add_argument("--store", default=DEFAULT_STORE, help="SQLite store (default: %(default)s)")
    r.add_argument("--executor", choices=("local", "ray"), default="local", help="where jobs run (default: %(default)s)")
    r.add_argument("--ray-address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    r.add_argument("--checkpoint-every", type=float, default=60.0, metavar="SECONDS",
                   help="checkpoint long jobs this often (default: %(default)s)")
    r.add_argument("--workers", type=int, default=1,
                   help="local executor: jobs run at once, one process each (default: %(default)s; 2 on a 2-core machine)")
    r.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default: %(default)s; the models are small, one thread per job is fastest)")
    r.set_defaults(run=run_run)
    s = esub.add_parser("status", help="runs total / done / failed / pending in a store")
    s.add_argument("--store", default=DEFAULT_STORE)
    s.add_argument("--json", action="store_true", help="machine-readable counts")
    s.set_defaults(run=run_status)
    rep = esub.add_parser("report", help="tables (published numbers beside ours) and figures from a store")
    rep.add_argument("--store", default=DEFAULT_STORE)
    rep.add_argument("--out", default="gradprobe-experiments", help="output directory (default: %(default)s)")
    rep.set_defaults(run=run_report)
    p.set_defaults(run=lambda args: (p.print_help(), 2)[1])


def run_list(args) -> int:

    for name, cls in EXPERIMENTS.items():
        exp = cls()
        counts = []
        for prof in PROFILES:
            jobs = jobs_for(exp, prof)
            counts.append(f"{prof}: {sum(len(j.runs) for j in jobs)} runs")
        print(f"{name:<16} {exp.title}\n{'':<16} {'; '.join(counts)}")
    return 0


def run_run(args) -> int:

    if args.threads < 1:
        raise ConfigError(f"--threads must be >= 1; got {args.threads}")
    exp = get_experiment(args.name)
    total = sum(len(j.runs) for j in jobs_for(exp, args.profile))
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        with Progress(total, f"{exp.name}/{args.profile}") as bar:
            def on_progress(done, total, label, frac, eta):
                bar.update(done, job=label[:40], job_done=f"{100 * frac:.0f}%", eta=eta)

            status = run_sweep(exp, args.profile, args.store, executor=args.executor,
                               checkpoint_every=args.checkpoint_every, on_progress=on_progress,
                               ray_address=args.ray_address, workers=args.workers)
    finally:
        torch.set_num_threads(threads)
    print(_status_line(status.as_dict()))
    return 0 if status.failed == 0 else 1


def _status_line(d: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in d.items())


def run_status(args) -> int:

    if not Path(args.store).exists():
        raise ConfigError(f"no store at {args.store}; run `gradprobe experiment run NAME --store {args.store}` first")
    with Store(args.store) as store:
        total = store.status().as_dict()
        sweeps = {s: store.status(s).as_dict() for s in store.sweeps()}
    if args.json:
        print(json.dumps({**total, "sweeps": sweeps}, sort_keys=True))
    else:
        print(f"{args.store}: {_status_line(total)}")
        for s, d in sweeps.items():
            print(f"  {s:<28} {_status_line(d)}")
    return 0


def run_report(args) -> int:

    if not Path(args.store).exists():
        raise ConfigError(f"no store at {args.store}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parts, sections = [], []
    with Store(args.store) as store:
        names = sorted({r.experiment for r in store.runs()})
        for name in names:
            exp = get_experiment(name)
            rep = exp.report(store.runs(experiment=name, status="done"), store, out)
            parts.append(rep.markdown())
            tables = [line for line in rep.lines if line.startswith("|")]
            sections.append(Section(rep.title, [line for line in rep.lines if line and not line.startswith("|")],
                                    preformatted=["\n".join(tables)] if tables else [],
                                    images=[(f.stem, f.read_bytes()) for f in rep.figures]))
            for f in rep.figures:
                print(f"figure: {f}")
    path = out / "EXPERIMENTS.md"
    path.write_text("# Experiments (from " + str(args.store) + ")\n\n" + "\n".join(parts))
    html_path = write_html(out / "report.html", f"gradprobe experiments ({args.store})", sections)
    sys.stdout.write("\n".join(parts) + "\n")
    print(f"report: {path}, {html_path}")
    return 0
