"""The fixed Python cost of ``probe.step()`` per step (issue 9 §2: target < 100 µs), paired and interleaved.

On the narrow MLP 20 × 64 (``peers.make_cases()["mlp_narrow"]``), every configuration owns a copy of the
model and runs the same training step; only the call after ``loss.backward()`` is timed, on the thread
CPU clock (``time.thread_time_ns``: this thread's work only), and the figure per configuration is the
median over steps, interleaved in blocks of 8 steps:

* ``floor``: one fused ``torch._foreach_norm`` over the gradients, one ``torch.stack`` and one host copy,
  the least any reader of every gradient norm does;
* ``recorded``: ``Probe(model, budget=None, cadence={weights/outputs/units: 1024})``: a recorded step
  with only the gradient norms armed (measure, fetch, build the record, write it to the trace);
* ``unrecorded``: ``Probe(model, every=1024)``: a step that records nothing.

fixed cost of a recorded step = recorded − floor; of an unrecorded step = unrecorded (nothing to
measure). ``--profile`` prints a cProfile of the recorded configuration's ``step()`` calls instead.

Run::

    python benchmarks/bench_step_fixed.py                  # 2000 steps per configuration
    python benchmarks/bench_step_fixed.py --steps 400 --profile
    python benchmarks/bench_step_fixed.py --alt main=/path/to/main/src   # A/B against another source tree
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
from peers import make_cases  # noqa: E402

from gradprobe import Probe  # noqa: E402

GRADS_ONLY = {"weights": 1024, "outputs": 1024, "units": 1024}
BLOCK = 8


def _floor(model):
    params = [p for p in model.parameters() if p.requires_grad]
    return lambda loss: torch.stack(torch._foreach_norm([p.grad for p in params])).cpu().numpy()


def configs(proto, probes):
    out = {}
    m = copy.deepcopy(proto)
    out["floor"] = (m, _floor(m), None)
    for label, cls in probes.items():
        pre = "" if label == "" else f"{label}:"
        m = copy.deepcopy(proto)
        p = cls(m, budget=None, cadence=GRADS_ONLY)
        out[pre + "recorded"] = (m, p.step, p)
        m = copy.deepcopy(proto)
        p = cls(m, every=1024)
        out[pre + "unrecorded"] = (m, p.step, p)
    return out


def run(steps: int, probes, profile: bool = False) -> str:
    case = make_cases()["mlp_narrow"]
    torch.manual_seed(0)
    proto = case.make_model()
    cfg = configs(proto, probes)
    opts = {k: torch.optim.SGD(m.parameters(), lr=1e-3) for k, (m, _, _) in cfg.items()}
    times = {k: [] for k in cfg}
    clock = time.thread_time_ns
    prof = None
    if profile:
        import cProfile

        prof = cProfile.Profile()
    warm = 2 * BLOCK
    for b in range(-(-(steps + warm) // BLOCK)):
        for k, (model, after, _) in cfg.items():
            opt = opts[k]
            for j in range(BLOCK):
                opt.zero_grad(set_to_none=True)
                loss = case.loss_fn(model(case.x), case.y)
                loss.backward()
                on = prof is not None and k == "recorded"
                if on:
                    prof.enable()
                t0 = clock()
                after(loss)
                t1 = clock()
                if on:
                    prof.disable()
                if b * BLOCK + j >= warm:
                    times[k].append(t1 - t0)
                opt.step()
    for _, _, p in cfg.values():
        if p is not None:
            p.close()
    med = {k: float(np.median(v)) / 1e3 for k, v in times.items()}
    lines = [f"narrow MLP 20 × 64, batch 128; {steps} steps per configuration (blocks of {BLOCK}); "
             f"thread CPU µs of the after-backward call (median); load average {os.getloadavg()[0]:.1f}", "",
             "| config | µs per call (median) | [25 %, 75 %] | fixed cost (µs) |", "|---|---:|---|---:|"]
    for k, v in times.items():
        q1, q3 = np.percentile(np.asarray(v) / 1e3, [25, 75])
        fixed = med[k] - med["floor"] if k.endswith("recorded") and not k.endswith("unrecorded") else med[k]
        lines.append(f"| `{k}` | {med[k]:.1f} | [{q1:.1f}, {q3:.1f}] | {'' if k == 'floor' else f'{fixed:.1f}'} |")
    if prof is not None:
        import io
        import pstats

        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(30)
        lines += ["", "```", s.getvalue(), "```"]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--profile", action="store_true", help="also cProfile the recorded configuration's step() calls")
    ap.add_argument("--alt", action="append", metavar="LABEL=SRC", help="also time the Probe under SRC as LABEL:* (repeatable)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    probes = {"": Probe}
    if args.alt:
        from bench_probe_overhead import load_alt_probe

        for spec in args.alt:
            label, _, src = spec.partition("=")
            probes[label] = load_alt_probe(Path(src), label)
    print(run(args.steps, probes, args.profile))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
