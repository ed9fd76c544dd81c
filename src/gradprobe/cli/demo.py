"""``gradprobe demo``: the main job on built-in data.

Trains two networks of the same depth on scikit-learn's digits: a deep sigmoid MLP with the
"standard" init U[±1/√fan_in] (Glorot & Bengio 2010 show its back-propagated gradients vanish toward
the input), and the same depth with a remedy (ReLU, He init, residual branches scaled by 1/√depth).
Prints per-layer flow tables and verdicts, writes run logs (SQLite), PNG plots and report.html.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from gradprobe.cli._console import Progress
from gradprobe.diagnosis import Diagnosis
from gradprobe.experiments.data import digits
from gradprobe.models import DeepMLP
from gradprobe.report import build_report
from gradprobe.run import Run
from gradprobe.trace import Trace
from gradprobe.training import train


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="train a vanishing and a remedied deep MLP on digits; write a report")
    p.add_argument("--out", default="gradprobe-demo", help="output directory (default: %(default)s)")
    p.add_argument("--depth", type=int, default=10, help="hidden layers / residual blocks (default: %(default)s)")
    p.add_argument("--width", type=int, default=64, help="hidden width (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=30, help="training epochs per model (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.1, help="SGD learning rate (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-plots", action="store_true", help="skip PNG plots and the HTML report")
    p.set_defaults(run=run)


@dataclass
class RunResult:
    label: str
    trace: Trace
    first: Diagnosis
    last: Diagnosis
    test_accuracy: float
    seconds: float
    log_path: Path
    run: Run  # the live result (probe.run()), which the report is built from


def _accuracy(model, x, y) -> float:
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return acc


def _epoch_batches(data, batch_size: int, generator: torch.Generator):
    """``batches(step)`` over shuffled epochs: a new permutation at the start of every epoch (steps are
    asked for in order, so the permutations follow the generator exactly as a nested loop would)."""
    n = data.x_train.shape[0]
    per_epoch = math.ceil(n / batch_size)
    perm = {}

    def batches(step: int):
        epoch, b = divmod(step, per_epoch)
        if epoch not in perm:
            perm.clear()
            perm[epoch] = torch.randperm(n, generator=generator)
        idx = perm[epoch][b * batch_size : (b + 1) * batch_size]
        return data.x_train[idx], data.y_train[idx]

    return batches, per_epoch


def train_one(label: str, model: torch.nn.Module, data, args, log_dir: Path) -> RunResult:
    batches, per_epoch = _epoch_batches(data, args.batch_size, torch.Generator().manual_seed(args.seed))
    steps = args.epochs * per_epoch
    first = []
    t0 = time.perf_counter()
    with Progress(steps, label) as bar:
        def on_step(view):
            if view.step == 0:
                first.append(view.diagnose())
            bar.update(view.step + 1, loss=view.loss, epoch=view.step // per_epoch + 1)

        run = train(model, batches, F.cross_entropy, steps=steps, lr=args.lr,
                    probe={"log_dir": log_dir, "run_name": label}, on_step=on_step, diagnose=True)
    return RunResult(label, run.trace, first[0], run.diagnosis, _accuracy(model, data.x_test, data.y_test),
                     time.perf_counter() - t0, run.log_path, run.result)


def _print_run(r: RunResult) -> None:
    print(f"\n=== {r.label} ===")
    print(f"step {r.trace[0].step} (at init): verdict {r.first.verdict}")
    print(r.trace[0].table())
    for e in r.first.evidence:
        print(f"  - {e}")
    print(f"\nstep {r.trace.last.step} (end of training): verdict {r.last.verdict}; test accuracy {r.test_accuracy:.1%}")
    print(str(r.last))
    print(f"run log: {r.log_path}")


def _report(results: list[RunResult], out: Path, args) -> Path:
    """The report, from the live runs only; what it shows beyond the trace is noted into each run (and so
    into its run log), so ``gradprobe report out/runs/*.sqlite`` rebuilds exactly this page."""
    page = {"title": "gradprobe demo: vanishing gradients in a deep MLP, and a fix",
            "intro": [f"Both networks have {args.depth} hidden layers of width {args.width}, trained with SGD "
                      f"(lr {args.lr}, batch {args.batch_size}, {args.epochs} epochs) on scikit-learn's digits. "
                      "The first uses sigmoid units with the 'standard' init U[±1/√fan_in], whose back-propagated "
                      "gradient shrinks toward the input (Glorot & Bengio 2010); the second ReLU units with He init "
                      "(He et al. 2015) and residual branches scaled by 1/√depth."]}
    for r in results:
        r.run.note("report", page)
        r.run.note("summary", {"test accuracy": round(r.test_accuracy, 4), "epochs": args.epochs, "lr": args.lr,
                               "batch": args.batch_size})
    return build_report({r.label: r.run for r in results}, out)


def run(args) -> int:
    torch.manual_seed(args.seed)
    data = digits(seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_dir = out / "runs"
    for stale in log_dir.glob("*.sqlite*"):
        stale.unlink()
    common = dict(width=args.width, depth=args.depth, generator=torch.Generator().manual_seed(args.seed))
    models = {
        "sigmoid-standard": DeepMLP(data.n_features, data.n_classes, activation="sigmoid", init="standard", **common),
        "relu-he-residual": DeepMLP(data.n_features, data.n_classes, activation="relu", init="he", residual=True,
                                    residual_scale=args.depth ** -0.5, **common),
    }
    print(f"gradprobe demo: digits ({data.x_train.shape[0]} train / {data.x_test.shape[0]} test), "
          f"depth {args.depth}, width {args.width}, {args.epochs} epochs")
    results = [train_one(label, m, data, args, log_dir) for label, m in models.items()]
    for r in results:
        _print_run(r)
    if not args.no_plots:
        report = _report(results, out, args)
        print(f"\nreport: {report}")
    return 0
