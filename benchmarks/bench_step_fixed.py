"""The fixed Python cost of ``probe.step()`` per step (issue 9 §2: target < 100 µs), paired and interleaved.

On the narrow MLP 20 × 64 (``peers.make_cases()["mlp_narrow"]``), every configuration owns a copy of the
model and runs the same training step; only the call after ``loss.backward()`` is timed, on the thread
CPU clock (``time.thread_time_ns``: this thread's work only), one thread (``torch.set_num_threads(1)``),
interleaved in blocks of 8 steps:

* ``floor``: one fused ``torch._foreach_norm`` over the gradients, one ``torch.stack`` and one host copy,
  the least any reader of every gradient norm does;
* ``recorded``: ``Probe(model, budget=None, cadence={weights/outputs/units: 1024})``: a recorded step
  with only the gradient norms armed (measure, fetch, build the record, write it to the trace), one
  record per ``step()`` (``fetch_every=1``, the default of a fixed schedule on the CPU);
* ``recorded_fe16``: the same with ``fetch_every=16`` (the default under a budget): records built 16
  at a time;
* ``default``: ``Probe(model)``, the budgeted default (its own cadence: not every step is recorded);
* ``unrecorded``: ``Probe(model, every=1024)``: a step that records nothing.

fixed cost of a recorded step = recorded − floor (both every step); of the default = its call − floor ×
the fraction of steps on which it read the gradient norms (its fixed Python per step, amortized over
every step); of an unrecorded step = unrecorded (nothing to measure). ``--profile`` adds a cProfile of
the ``recorded_fe16`` configuration's ``step()`` calls.

Statistics: configurations run in rounds (one block of 32 steps each, the order rotated every round);
per round each configuration's figure is the *mean* of its block (32 is a multiple of every
``fetch_every`` timed, so a block holds its batches' fetch steps in their proportion: a median would
hide them), differences and ratios are taken within a round (paired), and the tables give the median
over rounds with its 95 % percentile-bootstrap CI. ``--alt LABEL=SRC`` adds the Probe of another
source tree (e.g. ``main``'s) to the same run, with the paired ratio of the fixed costs.

``--params``: parameter statistics every step instead, on the MLP 20 × 256: ``Probe(model,
hooks=False, update_ratio=False, budget=None)`` (gradient and weight norms every step) against
``floor`` (the gradients' fused norm + host copy) and ``floor_grads+weights`` (one fused norm over
gradients and weights + one host copy: the least that reads both every step).

Run::

    python benchmarks/bench_step_fixed.py                  # 2000 steps per configuration
    python benchmarks/bench_step_fixed.py --steps 400 --profile
    python benchmarks/bench_step_fixed.py --alt main=/path/to/main/src   # A/B against another source tree
    python benchmarks/bench_step_fixed.py --params --steps 600 --alt main=/path/to/main/src
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import bootstrap_median_ci  # noqa: E402
from peers import make_cases  # noqa: E402

from gradprobe import Probe  # noqa: E402

GRADS_ONLY = {"weights": 1024, "outputs": 1024, "units": 1024}
BLOCK = 32  # a multiple of every fetch_every timed (1, 16): each block holds its batches' fetch steps
KINDS = ("recorded", "recorded_fe16", "default", "unrecorded")


def _floor(model, weights: bool = False):
    params = [p for p in model.parameters() if p.requires_grad]
    if weights:  # gradients and weights every step: one fused kernel over both, one host copy
        return lambda loss: torch.stack(torch._foreach_norm([p.grad for p in params] + [p.detach() for p in params])).cpu().numpy()
    return lambda loss: torch.stack(torch._foreach_norm([p.grad for p in params])).cpu().numpy()


def configs(proto, probes, params_mode: bool = False):
    """``{label: (model, after, probe)}``: the floor(s) and, per Probe class, the configurations timed."""
    out = {}
    m = copy.deepcopy(proto)
    out["floor"] = (m, _floor(m), None)
    if params_mode:
        m = copy.deepcopy(proto)
        out["floor_grads+weights"] = (m, _floor(m, weights=True), None)
    for label, cls in probes.items():
        pre = "" if label == "" else f"{label}:"
        if params_mode:
            m = copy.deepcopy(proto)
            p = cls(m, hooks=False, update_ratio=False, budget=None)
            out[pre + "params_every_step"] = (m, p.step, p)
            continue
        for kind, options in (("recorded", {"budget": None, "cadence": GRADS_ONLY, "fetch_every": 1}),
                              ("recorded_fe16", {"budget": None, "cadence": GRADS_ONLY, "fetch_every": 16}),
                              ("default", {}),
                              ("unrecorded", {"every": 1024})):
            m = copy.deepcopy(proto)
            p = cls(m, **options)
            out[pre + kind] = (m, p.step, p)
    return out


def _kind(label: str) -> str:
    return label.rpartition(":")[2]


def _ci(x) -> str:
    lo, hi = bootstrap_median_ci(np.asarray(x, dtype=float))
    return f"{np.median(x):.1f} [{lo:.1f}, {hi:.1f}]"


def _ci_ratio(x) -> str:
    lo, hi = bootstrap_median_ci(np.asarray(x, dtype=float))
    return f"{np.median(x):.3f} [{lo:.3f}, {hi:.3f}]"


def run(steps: int, probes, profile: bool = False, case_name: str = "mlp_narrow", params_mode: bool = False) -> str:
    case = make_cases()[case_name]
    load_start = os.getloadavg()[0]
    torch.manual_seed(0)
    proto = case.make_model()
    cfg = configs(proto, probes, params_mode)
    opts = {k: torch.optim.SGD(m.parameters(), lr=1e-3) for k, (m, _, _) in cfg.items()}
    # per round (one block of every configuration, in a rotated order): the median of the block's calls
    rounds: dict[str, list[float]] = {k: [] for k in cfg}
    clock = time.thread_time_ns
    prof = None
    if profile:
        import cProfile

        prof = cProfile.Profile()
    profiled = "params_every_step" if params_mode else "recorded_fe16"
    keys = list(cfg)
    warm = 2
    n_rounds = -(-steps // BLOCK)
    for b in range(n_rounds + warm):
        shift = b % len(keys)
        for k in keys[shift:] + keys[:shift]:
            model, after, _ = cfg[k]
            opt = opts[k]
            block = []
            for _ in range(BLOCK):
                opt.zero_grad(set_to_none=True)
                loss = case.loss_fn(model(case.x), case.y)
                loss.backward()
                on = prof is not None and k == profiled
                if on:
                    prof.enable()
                t0 = clock()
                after(loss)
                t1 = clock()
                if on:
                    prof.disable()
                block.append(t1 - t0)
                opt.step()
            if b >= warm:
                rounds[k].append(float(np.mean(block)) / 1e3)
    load_end = os.getloadavg()[0]
    fetch_every, grads_share, cadence = {}, {}, {}
    for k, (_, _, p) in cfg.items():
        if p is not None:
            fetch_every[k] = p.fetch_every
            p.close()
            # the share of steps whose gradient norms were read (every record holds them)
            grads_share[k] = sum("grads" in f.recorders for f in p.trace) / max(p.step_count, 1)
            cadence[k] = p.cadence
    r = {k: np.asarray(v) for k, v in rounds.items()}
    what = "params every step (`Probe(model, hooks=False, update_ratio=False, budget=None)`)" if params_mode else \
        "gradient norms only (`recorded`, `recorded_fe16`), the budgeted default (`default`), nothing (`unrecorded`)"
    lines = [f"{case.description}; {what}; {n_rounds} rounds of {BLOCK} steps per configuration, interleaved and "
             f"rotated; thread CPU µs of the after-backward call (per round: the block's mean; then the median "
             f"over rounds [95 % bootstrap CI]); load average {load_start:.1f} at the start, {load_end:.1f} at the end; "
             f"torch threads {torch.get_num_threads()}", ""]
    if params_mode:
        lines += ["| config | µs per call | − `floor` (µs) | call ÷ `floor` | call ÷ `floor_grads+weights` |",
                  "|---|---:|---:|---:|---:|"]
        for k, v in r.items():
            extra = ["", "", ""] if k == "floor" else [_ci(v - r["floor"]), _ci_ratio(v / r["floor"]),
                                                       _ci_ratio(v / r["floor_grads+weights"])]
            lines.append(f"| `{k}` | {_ci(v)} | " + " | ".join(extra) + " |")
        lines += ["", "(the ratios are of the after-backward call: gradprobe's call ÷ the floor's, per round)"]
        alts = [lab for lab in probes if lab]
        if alts:
            lines += ["", "| paired, per round | ratio [95 % CI] |", "|---|---:|"]
            for lab in alts:
                a, b = r["params_every_step"], r[f"{lab}:params_every_step"]
                lines.append(f"| after-backward call, `params_every_step` ÷ `{lab}:params_every_step` | {_ci_ratio(a / b)} |")
                lines.append(f"| its overhead over `floor_grads+weights`, ÷ `{lab}:`'s | "
                             f"{_ci_ratio((a - r['floor_grads+weights']) / (b - r['floor_grads+weights']))} |")
    else:
        lines += ["| config | `fetch_every` | steps with gradient norms | µs per call | fixed cost (µs) |",
                  "|---|---:|---:|---:|---:|"]
        fixed = {}
        for k, v in r.items():
            if k == "floor":
                lines.append(f"| `{k}` |  | 1 | {_ci(v)} |  |")
                continue
            kind = _kind(k)
            fixed[k] = v if kind == "unrecorded" else v - grads_share[k] * r["floor"]
            extra = f" (cadence {cadence[k]})" if kind == "default" else ""
            lines.append(f"| `{k}` | {fetch_every[k]} | {grads_share[k]:.3f}{extra} | {_ci(v)} | {_ci(fixed[k])} |")
        alts = [lab for lab in probes if lab]
        lines += ["", "| paired, per round | ratio [95 % CI] |", "|---|---:|"]
        lines.append(f"| fixed cost of `recorded_fe16` ÷ `recorded` | {_ci_ratio(fixed['recorded_fe16'] / fixed['recorded'])} |")
        for lab in alts:
            for kind in KINDS:
                lines.append(f"| fixed cost of `{kind}` ÷ `{lab}:{kind}` | "
                             f"{_ci_ratio(fixed[kind] / fixed[f'{lab}:{kind}'])} |")
    if prof is not None:
        import io
        import pstats

        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(30)
        lines += ["", "```", s.getvalue(), "```"]
    return "\n".join(lines)


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--profile", action="store_true", help="also cProfile the recorded configuration's step() calls")
    ap.add_argument("--alt", action="append", metavar="LABEL=SRC", help="also time the Probe under SRC as LABEL:* (repeatable)")
    ap.add_argument("--params", action="store_true",
                    help="params every step on the MLP 20 × 256 (or --case) against the floors, instead")
    ap.add_argument("--case", default=None, help="workload of peers.make_cases() (default mlp_narrow; mlp with --params)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    probes = {"": Probe}
    if args.alt:
        from bench_probe_overhead import load_alt_probe

        for spec in args.alt:
            label, _, src = spec.partition("=")
            probes[label] = load_alt_probe(Path(src), label)
    case = args.case or ("mlp" if args.params else "mlp_narrow")
    print(f"CPU: {_cpu()}")
    print(run(args.steps, probes, args.profile, case, args.params))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
