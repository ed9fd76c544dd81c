"""Run-log encoding cost of one full 20-layer record (DeepMLP 256 → 10, width 256, depth 18), paired
against another version of ``gradprobe/runlog.py`` in the same interleaved run (CPU time, one thread).

    git show <rev>:src/gradprobe/runlog.py > /tmp/runlog_old.py
    python benchmarks/bench_runlog_encode.py --old /tmp/runlog_old.py
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import gradprobe
from gradprobe.models import DeepMLP
from gradprobe.runlog import encode as new


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", required=True, help="path of the runlog.py to compare with")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--calls", type=int, default=300)
    args = ap.parse_args()
    spec = importlib.util.spec_from_file_location("runlog_old", args.old)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["runlog_old"] = mod
    spec.loader.exec_module(mod)
    old = mod.encode
    torch.set_num_threads(1)
    net = DeepMLP(256, 10, width=256, depth=18)
    x, y = torch.randn(128, 256), torch.randint(0, 10, (128,))
    with gradprobe.Probe(net, budget=None) as probe:
        for _ in range(3):
            net.zero_grad()
            F.cross_entropy(net(x), y).backward()
            flow = probe.step()
    assert old(flow) == new(flow), "the two versions encode differently"
    ratios, seconds = [], {"old": [], "new": []}
    for r in range(args.rounds):
        order = (("old", old), ("new", new)) if r % 2 else (("new", new), ("old", old))
        t = {}
        for name, fn in order:
            start = time.process_time()
            for _ in range(args.calls):
                fn(flow)
            t[name] = (time.process_time() - start) / args.calls
            seconds[name].append(t[name])
        ratios.append(t["new"] / t["old"])
    q = np.percentile(ratios, [25, 50, 75])
    print(f"encode, one full 20-layer record: new/old median {q[1]:.3f} (IQR {q[0]:.3f}–{q[2]:.3f}); "
          f"median old {1e6 * np.median(seconds['old']):.0f} µs, new {1e6 * np.median(seconds['new']):.0f} µs")


if __name__ == "__main__":
    main()
