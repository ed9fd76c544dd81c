"""``gradprobe doctor MODEL``: probe a model at init and after ``--steps`` SGD steps (default 5) on one
batch; print the per-layer flow, the verdicts and the remedies that fit the model, and with
``--try-remedies`` the measured effect of the top remedies in short equal-budget trials.

Recurrent models are also looked at through time (``--temporal``, on by default when the model has
recurrent layers): the loss then reads only the output's last time step, so the gradient must travel
back through every step (Pascanu, Mikolov & Bengio 2013; Hochreiter & Schmidhuber 1997).

Exit codes: 0 healthy, 1 a problem found, 2 a usage error, including an exception raised by the
user's own code (factory, data function, forward, loss): one message naming it, ``--traceback`` for
the traceback.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from gradprobe.cli._console import print_flow_table
from gradprobe.diagnosis import Diagnosis
from gradprobe.errors import ConfigError, GradprobeError
from gradprobe.experiments.trials import TrialResult, format_trials, rank_trials, run_trials, trialable
from gradprobe.probe.layers import find_layers, model_facts
from gradprobe.report import build_report
from gradprobe.specs import (
    LOSSES,
    at_last_step,
    load_data,
    load_model,
    loss_function,
    output_tensor,
    parse_kwargs,
    parse_shape,
    synthetic_target,
)
from gradprobe.trace import QUANTITIES, LayerFlow
from gradprobe.training import call_model, train

DEFAULT_STEPS = 5
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_parser(sub) -> None:
    p = sub.add_parser(
        "doctor",
        help=f"diagnose a model's gradient flow at init and after --steps SGD steps (default {DEFAULT_STEPS})",
        description=(
            "Probe MODEL's back-propagated gradient per layer (and, for recurrent models, per time step) at "
            f"init and after --steps SGD steps on one batch (default {DEFAULT_STEPS}); name what is wrong "
            "(vanishing or exploding with depth, Glorot & Bengio 2010; in time, Pascanu et al. 2013) and the "
            "remedies that fit the model. MODEL is package.module:factory or path/to/file.py:factory (called "
            "with -k name=value arguments), e.g. gradprobe.models:DeepMLP -k in_features=64 -k out_features=10 "
            "-k activation=sigmoid. Exit codes: 0 healthy, 1 a problem found, 2 a usage error."),
    )
    p.add_argument("model", metavar="MODEL")
    p.add_argument("-k", "--kwarg", action="append", metavar="NAME=VALUE", help="argument for the factory (repeatable)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--input", metavar="SHAPE", help="synthetic N(0,1) input of this shape, e.g. 64,128 (floats; "
                     "for token ids use --data)")
    src.add_argument("--data", metavar="MODULE:FN", help="function returning x or (x, y), e.g. token ids for a "
                     "model that starts with nn.Embedding")
    p.add_argument("--loss", choices=LOSSES, default=None,
                   help="loss of the output (default: cross_entropy when --data gives labels, else mean_square)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                   help="SGD steps on the batch before the second diagnosis (default: %(default)s; 0: at init only)")
    p.add_argument("--lr", type=float, default=0.01, help="SGD learning rate (default: %(default)s)")
    p.add_argument("--temporal", action=argparse.BooleanOptionalAction, default=None,
                   help="also measure the gradient through time in recurrent layers, with the loss on the last "
                   "time step (default: on when the model has recurrent layers)")
    p.add_argument("--device", default="cpu", help="torch device for the model and the data (default: %(default)s)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="floating-point type of the model and the inputs (default: %(default)s)")
    p.add_argument("--state", help="state dict to load into the model (read with weights_only=True)")
    p.add_argument("--allow-pickle", action="store_true", help="allow MODEL to be a whole pickled model (runs its code)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true",
                   help="print one JSON document (verdicts, evidence, remedies, the per-layer flow) instead of text")
    p.add_argument("--traceback", action="store_true", help="on an error, also print the traceback of its cause")
    p.add_argument("--report", metavar="DIR", help="also write the HTML report (report.html, PNG plots) and the run "
                   "log (DIR/runs/doctor.sqlite) of the diagnosis and the trials")
    p.add_argument("--try-remedies", action="store_true",
                   help="run short equal-budget A/B trials of the top remedies; rank them by restored flow, then "
                   "by the loss on a held-out batch")
    p.add_argument("--trials", type=int, default=3, help="how many remedies to try (default: %(default)s)")
    p.add_argument("--trial-steps", type=int, default=100, help="training steps per trial (default: %(default)s)")
    p.set_defaults(run=run)


# ------------------------------------------------------------------------------------------ set-up
def _device_dtype(args) -> tuple[torch.device, torch.dtype]:
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        raise ConfigError(f"--device {args.device!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps): {exc}") from None
    return device, DTYPES[args.dtype]


def _to(t: torch.Tensor | None, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
    if t is None:
        return None
    return t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)


def _sequence_axes(model: nn.Module) -> tuple[int, int] | None:
    """``(batch_dim, time_dim)`` of the first recurrent module's input, or ``None`` without one."""
    for m in model.modules():
        # nn.RNN/LSTM/GRU, and recurrent modules that follow their convention (e.g. gradprobe's LeakyRNN)
        first = getattr(m, "batch_first", None)
        if isinstance(first, bool) and (isinstance(m, nn.RNNBase) or any(True for _ in m.parameters())):
            return (0, 1) if first else (1, 0)
    return None


def _split(x: torch.Tensor, y: torch.Tensor | None, batch_dim: int):
    """(train, held-out): the last quarter of the batch is held out (``None`` for fewer than 4 samples)."""
    n = x.shape[batch_dim] if x.dim() > batch_dim else 0
    if n < 4:
        return (x, y), None
    k = max(1, n // 4)

    def part(t, a, b, dim):
        if t is None:
            return None
        dim = dim if t.dim() > dim and t.shape[dim] == n else 0
        return t.narrow(dim, a, b - a)

    return (part(x, 0, n - k, batch_dim), part(y, 0, n - k, batch_dim)), (part(x, n - k, n, batch_dim),
                                                                           part(y, n - k, n, batch_dim))


def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


class _Problem:
    """The model, the batches and the loss of one doctor run (targets are the user's, or random ones
    drawn at the first forward of each batch, when the output's shape is known)."""

    def __init__(self, args, model: nn.Module, device, dtype):
        self.spec = args.model
        gen = torch.Generator().manual_seed(args.seed)
        held_gen = torch.Generator().manual_seed(args.seed + 1)  # the held-out batch: drawn the same way
        axes = _sequence_axes(model)
        if args.data:
            x, y = load_data(args.data)
            x, y = _to(x, device, dtype), _to(y, device, dtype)
            train_part, held = _split(x, y, axes[0] if axes and x.dim() >= 3 else 0)
            self.held_out_note = ("the last quarter of --data, never trained on" if held is not None
                                  else "none: --data has fewer than 4 samples")
        elif args.input:
            shape = parse_shape(args.input)
            x = _to(torch.randn(shape, generator=gen), device, dtype)
            y = None
            train_part = (x, None)
            held = (_to(torch.randn(shape, generator=held_gen), device, dtype), None)
            self.held_out_note = "a second synthetic batch drawn the same way"
        else:
            raise ConfigError("give the input: --input SHAPE (synthetic data) or --data MODULE:FN")
        self.x = x
        self.batches = {"whole": (x, y), "train": train_part}
        if held is not None:
            self.batches["held"] = held
        self.generators = {"whole": gen, "train": gen, "held": held_gen}
        self.loss_name = args.loss or ("cross_entropy" if y is not None and not y.is_floating_point() else "mean_square")
        facts = model_facts(model)
        self.temporal = bool(facts.recurrent) if args.temporal is None else bool(args.temporal)
        self.auto_temporal = args.temporal is None and self.temporal
        self.recurrent = facts.recurrent
        self.time_dim = self.steps_in_time = None
        if self.temporal and axes is not None and x.dim() > axes[1]:
            self.time_dim, self.steps_in_time = axes[1], x.shape[axes[1]]
        self._loss = loss_function(self.loss_name, time_dim=self.time_dim, steps=self.steps_in_time)
        self._targets: dict = {}
        first = find_layers(model)[0].module if find_layers(model) else None
        self.hint = ""
        if isinstance(first, nn.Embedding) and x.is_floating_point():
            self.hint = ("; the model starts with nn.Embedding, which takes integer token ids: give them with "
                         "--data MODULE:FN (a function returning a LongTensor of ids, or (ids, targets))")

    def batch(self, key: str) -> Callable[[int], tuple]:
        x = self.batches[key][0]
        return lambda step: (x, key)

    def held_out(self) -> tuple | None:
        return (self.batches["held"][0], "held") if "held" in self.batches else None

    def forward(self, model: nn.Module, inputs):
        try:
            return call_model(model, inputs)
        except GradprobeError:
            raise
        except Exception as exc:  # the user's model rejected the input: a usage error
            raise ConfigError(f"the model's forward failed on an input of shape {_shape(inputs)} (model "
                              f"{self.spec}): {type(exc).__name__}: {exc}{self.hint}") from exc

    def loss(self, out, key: str):
        if key not in self._targets:
            y = self.batches[key][1]
            if y is not None and self.time_dim is not None:
                y = at_last_step(y, self.time_dim, self.steps_in_time)
            if y is None:
                y = synthetic_target(self.loss_name, self._read(out), self.generators[key])
            self._targets[key] = y
        target = self._targets[key]
        try:
            return self._loss(out, target)
        except GradprobeError:
            raise
        except Exception as exc:
            raise ConfigError(
                f"the loss {self.loss_name} failed on the model's output of shape {_shape(self._read(out))} and the "
                f"target of shape {_shape(target)}: {type(exc).__name__}: {exc}; choose another --loss "
                f"({', '.join(LOSSES)}) or give targets that fit the output") from exc

    def _read(self, out):
        return output_tensor(out, time_dim=self.time_dim, steps=self.steps_in_time)


# ------------------------------------------------------------------------------------------ output
def _num(v: float, measured: bool = True):
    """JSON value: None where not measured; measured NaN/Inf as the strings "NaN", "Infinity", "-Infinity"."""
    if not measured:
        return None
    v = float(v)
    if math.isfinite(v):
        return v
    return "NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")


def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, np.ndarray)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return _num(v)
    return v if v is None or isinstance(v, str) else str(v)


def flow_json(flow: LayerFlow) -> dict:
    """The per-layer table of one step: layer names and kinds, every quantity (None where not measured)."""
    mask = {"grad_norm": "has_grad", "output_grad_norm": "has_output_grad", "activation_norm": "has_output"}
    layers = []
    for i, name in enumerate(flow.names):
        row = {"layer": name, "kind": flow.kinds[i]}
        for q in QUANTITIES:
            v = getattr(flow, q)[i]
            measured = bool(getattr(flow, mask[q])[i]) if q in mask else not (q == "update_ratio" and np.isnan(v))
            row[q] = _num(v, measured)
        layers.append(row)
    out = {"step": flow.step, "loss": _num(flow.loss, flow.loss is not None), "layers": layers}
    if flow.temporal:
        out["temporal"] = {name: {"steps": tf.steps, "grad_norm": [_num(v) for v in tf.grad_norm],
                                  "decay_rate": _num(tf.decay_rate), "horizon": tf.horizon()}
                           for name, tf in flow.temporal.items()}
    return out


def diagnosis_json(d: Diagnosis) -> dict:
    return {
        "verdict": d.verdict,
        "ok": d.ok,
        "verdicts": [{"kind": v.kind, "severity": v.severity, "layer": v.layer, "evidence": list(v.evidence),
                      "remedies": [r.as_dict() for r in v.remedies], "data": _jsonable(v.data)} for v in d.verdicts],
    }


def _trial_json(r: TrialResult) -> dict:
    if not r.ok:
        return {"remedy": r.remedy.id, "applied": False, "error": r.error}
    return {"remedy": r.remedy.id, "applied": True, "call": r.remedy.call, "signal_ratio": [_num(r.ratio_init), _num(r.ratio_end)],
            "time_ratio": [_num(r.time_ratio_init), _num(r.time_ratio_end)],
            "train_loss": [_num(r.loss_init), _num(r.loss_end)], "held_out_loss": _num(r.held_out_loss, math.isfinite(r.held_out_loss)),
            "verdict": [r.verdict_init, r.verdict_end], "restored": r.restored}


def _say(args, *lines) -> None:
    if not args.json:
        print(*lines, sep="\n")


# ------------------------------------------------------------------------------------------ run
def run(args) -> int:
    if args.steps < 0:
        raise ConfigError(f"--steps {args.steps} must be >= 0")
    if args.try_remedies and (args.trials < 1 or args.trial_steps < 1):
        raise ConfigError("--trials and --trial-steps must be >= 1")
    device, dtype = _device_dtype(args)
    torch.manual_seed(args.seed)
    model = load_model(args.model, parse_kwargs(args.kwarg), args.state, args.allow_pickle)
    try:
        model.to(device=device, dtype=dtype)
    except Exception as exc:
        raise ConfigError(f"cannot move the model to --device {device} --dtype {args.dtype}: {exc}") from exc
    problem = _Problem(args, model, device, dtype)
    model.train()
    pristine = copy.deepcopy(model) if args.try_remedies else None
    report = {"model": type(model).__name__, "spec": args.model, "input_shape": list(problem.x.shape),
              "loss": problem.loss_name, "steps": args.steps, "lr": args.lr, "device": str(device),
              "dtype": args.dtype, "temporal": problem.temporal, "diagnoses": []}
    _say(args, f"gradprobe doctor: {type(model).__name__}, input {tuple(problem.x.shape)}, loss {problem.loss_name}, "
               f"{args.steps} SGD steps (lr {args.lr:g}) on {device}/{args.dtype}")
    if problem.temporal:
        why = f"the model has recurrent layers ({', '.join(problem.recurrent)})" if problem.auto_temporal else "--temporal"
        where = (f"the loss reads the last of {problem.steps_in_time} time steps" if problem.time_dim is not None
                 else "the loss reads the whole output")
        _say(args, f"through time ({why}): {where}, so its gradient must travel back through every step "
                   "(Pascanu et al. 2013); --no-temporal to skip")
    worst = 0
    diagnoses: list[Diagnosis] = []

    def on_step(view):
        nonlocal worst
        if view.step != 0 and not view.last:
            return
        d = view.diagnose()
        diagnoses.append(d)
        worst = max(worst, 0 if d.ok else 1)
        title = "at init" if view.step == 0 else f"after {view.step} steps"
        report["diagnoses"].append({"when": title, **diagnosis_json(d), "flow": flow_json(view.flow)})
        if not args.json:
            print(f"\n== {title}: {d.verdict} ==")
            print_flow_table(view.flow, max_rows=40)
            print()
            print(d)

    probe = {"temporal": problem.temporal}
    if args.report:
        probe.update(log_dir=Path(args.report) / "runs", run_name="doctor", mode="overwrite")
    result = train(model, problem.batch("whole"), problem.loss, steps=args.steps + 1, lr=args.lr, update_last=False,
                   probe=probe, on_step=on_step, forward=problem.forward).result
    for p in model.parameters():
        p.grad = None
    if args.try_remedies:
        report["trials"] = _try_remedies(pristine, problem, diagnoses[0], args)
    report["exit_code"] = worst
    if args.report:
        page = _write_report(result, report, args)
        _say(args, f"\nreport: {page}  (rebuild with: gradprobe report {Path(args.report) / 'runs' / 'doctor.sqlite'})")
    if args.json:
        print(json.dumps(report, indent=2, allow_nan=False))
    return worst


def _write_report(result, report: dict, args) -> Path:
    """The HTML report of the doctor's run, from its live result; the settings and the trials are noted
    into the run (and so its run log), so ``gradprobe report DIR/runs/doctor.sqlite`` rebuilds the page."""
    result.note("report", {"title": f"gradprobe doctor: {report['model']}",
                           "intro": [f"{report['model']} ({report['spec']}), input {tuple(report['input_shape'])}, "
                                     f"loss {report['loss']}, diagnosed at init and after {report['steps']} SGD steps "
                                     f"(lr {report['lr']:g}) on {report['device']}/{report['dtype']}."]})
    result.note("summary", {"input": "×".join(map(str, report["input_shape"])), "loss": report["loss"],
                            "steps": report["steps"], "lr": report["lr"]})
    trials = report.get("trials")
    if trials and trials["results"]:
        rows = [{"remedy": t["remedy"], "call": t.get("call", ""), "verdict_end": t["verdict"][1] if t["applied"] else "—",
                 "ratio_init": t["signal_ratio"][0] if t["applied"] else None,
                 "ratio_end": t["signal_ratio"][1] if t["applied"] else None,
                 "held_out_loss": t["held_out_loss"] if t["applied"] else None,
                 "loss_end": t["train_loss"][1] if t["applied"] else None,
                 "restored": t["restored"] if t["applied"] else t["error"]} for t in trials["results"]]
        result.note("trials", {"rows": rows, "caption": f"{args.trial_steps} steps each, same seed and batch; ranking: "
                                                         f"{', '.join(trials['ranking']) or '—'}; held-out batch: "
                                                         f"{trials['held_out']}"})
    return build_report({"doctor": result}, Path(args.report))


def _try_remedies(pristine: nn.Module, problem: _Problem, diagnosis: Diagnosis, args) -> dict:
    remedies = trialable(r for v in diagnosis.verdicts for r in v.remedies)[: args.trials]
    if not remedies:
        _say(args, "\n--try-remedies: the diagnosis names no remedy that a short trial can apply")
        return {"results": [], "ranking": [], "held_out": problem.held_out_note}
    _say(args, f"\n== remedy trials: {args.trial_steps} steps each, same seed, same batch, lr {args.lr:g}; "
               f"held-out batch: {problem.held_out_note} ==")
    results = run_trials(lambda: copy.deepcopy(pristine), problem.batch("train"), problem.loss, remedies,
                         steps=args.trial_steps, lr=args.lr, seed=args.seed, held_out=problem.held_out(),
                         probe={"temporal": problem.temporal}, forward=problem.forward)
    ranked = rank_trials(results)
    _say(args, format_trials(results))
    if problem.loss_name == "mean_square":
        _say(args, "(mean_square has no target, so a constant output scores best on any batch: give targets "
                   "with --data for a held-out loss that measures learning)")
    base = results[0]
    if ranked:
        lines = ["\nranked by restored flow (the diagnosis at the end of the trial), then by held-out loss:"]
        for k, r in enumerate(ranked, 1):
            lines.append(f"  {k}. {r.remedy.id:<18} {r.verdict_end:<18} held-out {r.held_out_loss:<10.4g} "
                         f"train {r.loss_end:<10.4g} [{r.remedy.call}]")
        best = ranked[0]
        flow = "restored the flow" if best.restored else "did not restore the flow"
        lines.append(f"\nbest: {best.remedy.id} ({flow}: {best.verdict_end} at the end, baseline {base.verdict_end}; "
                     f"held-out loss {best.held_out_loss:.4g} vs {base.held_out_loss:.4g} without; "
                     f"training loss {best.loss_end:.4g} vs {base.loss_end:.4g})")
        _say(args, *lines)
    return {"results": [_trial_json(r) for r in results], "ranking": [r.remedy.id for r in ranked],
            "held_out": problem.held_out_note}
