"""The fixed Python cost of ``probe.step()`` per step (issue 9 §2: target < 100 µs), paired and interleaved.

On the narrow MLP 20 × 64 (``peers.make_cases()["mlp_narrow"]``), every configuration owns a copy of the
model and runs the same training step; only the call after ``loss.backward()`` is timed, on the thread
CPU clock (``time.thread_time_ns``: this thread's work only), one thread (``torch.set_num_threads(1)``),
interleaved in blocks of 8 steps:

* ``floor``: one fused ``torch._foreach_norm`` over the gradients, one ``torch.stack`` and one host copy,
  the least any reader of every gradient norm does;
* ``recorded``: ``Probe(model, budget=None, cadence={weights/outputs/units: 1024})``: a recorded step
  with only the gradient norms armed (measure, fetch, build the record, write it to the trace);
* ``unrecorded``: ``Probe(model, every=1024)``: a step that records nothing.

fixed cost of a recorded step = recorded − floor; of an unrecorded step = unrecorded (nothing to
measure). ``--profile`` adds a cProfile of the recorded configuration's ``step()`` calls.

Statistics: configurations run in rounds (one block of 8 steps each, the order rotated every round);
per round each configuration's figure is the median of its block, differences and ratios are taken
within a round (paired), and the tables give the median over rounds with its 95 % percentile-bootstrap
CI. ``--alt LABEL=SRC`` adds the Probe of another source tree (e.g. ``main``'s) to the same run, with
the paired ratio of the fixed costs.

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
BLOCK = 8


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
        m = copy.deepcopy(proto)
        p = cls(m, budget=None, cadence=GRADS_ONLY)
        out[pre + "recorded"] = (m, p.step, p)
        m = copy.deepcopy(proto)
        p = cls(m, every=1024)
        out[pre + "unrecorded"] = (m, p.step, p)
    return out


def _ci(x) -> str:
    lo, hi = bootstrap_median_ci(np.asarray(x, dtype=float))
    return f"{np.median(x):.1f} [{lo:.1f}, {hi:.1f}]"


def _ci_ratio(x) -> str:
    lo, hi = bootstrap_median_ci(np.asarray(x, dtype=float))
    return f"{np.median(x):.3f} [{lo:.3f}, {hi:.3f}]"


def run(steps: int, probes, profile: bool = False, case_name: str = "mlp_narrow", params_mode: bool = False) -> str:
    case = make_cases()[case_name]
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
    profiled = "params_every_step" if params_mode else "recorded"
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
                rounds[k].append(float(np.median(block)) / 1e3)
    for _, _, p in cfg.values():
        if p is not None:
            p.close()
    r = {k: np.asarray(v) for k, v in rounds.items()}
    what = "params every step (`Probe(model, hooks=False, update_ratio=False, budget=None)`)" if params_mode else \
        "gradient norms only (`recorded`) / nothing (`unrecorded`)"
    lines = [f"{case.description}; {what}; {n_rounds} rounds of {BLOCK} steps per configuration, interleaved and "
             f"rotated; thread CPU µs of the after-backward call (per round: the block's median; then the median "
             f"over rounds [95 % bootstrap CI]); load average {os.getloadavg()[0]:.1f}; "
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
        lines += ["| config | µs per call | fixed cost (µs) |", "|---|---:|---:|"]
        fixed = {}
        for k, v in r.items():
            if k == "floor":
                lines.append(f"| `{k}` | {_ci(v)} |  |")
                continue
            fixed[k] = v - r["floor"] if k.endswith("recorded") and not k.endswith("unrecorded") else v
            lines.append(f"| `{k}` | {_ci(v)} | {_ci(fixed[k])} |")
        alts = [lab for lab in probes if lab]
        if alts:
            lines += ["", "| paired, per round | ratio [95 % CI] |", "|---|---:|"]
            for lab in alts:
                for kind in ("recorded", "unrecorded"):
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
