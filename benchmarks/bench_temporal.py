"""Cost of the temporal profile (TemporalRecorder) against one plain fused training step.

nn.LSTM(128 → 128), T = 1000, batch 32, float32, one thread. A "plain step" is forward, MSE loss on
a linear read-out of every output, backward and an SGD step with the fused module; a "temporal step"
is the same with a TemporalRecorder installed (unrolled replica + one tensor hook per state) followed
by ``collect()``. Rounds are interleaved (plain, temporal, plain, ...) so that drift in machine load
hits both; the reported figure is the median over rounds of the paired ratio temporal / plain.

    PYTHONPATH=src python benchmarks/bench_temporal.py [--rounds 7] [--steps 1000]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from gradprobe.probe.temporal import TemporalRecorder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--input", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    lstm = nn.LSTM(args.input, args.hidden)
    head = nn.Linear(args.hidden, 1)
    params = list(lstm.parameters()) + list(head.parameters())
    opt = torch.optim.SGD(params, lr=1e-3)
    x = torch.randn(args.steps, args.batch, args.input)
    y = torch.randn(args.steps, args.batch, 1)

    def train_step() -> None:
        opt.zero_grad(set_to_none=True)
        out, _ = lstm(x)
        nn.functional.mse_loss(head(out), y).backward()
        opt.step()

    def plain() -> float:
        t0 = time.perf_counter()
        train_step()
        return time.perf_counter() - t0

    rec = TemporalRecorder(lstm)

    def temporal() -> float:
        t0 = time.perf_counter()
        rec.install()
        try:
            train_step()
            flows = rec.collect()
        finally:
            rec.remove()
            rec.reset()
        elapsed = time.perf_counter() - t0
        assert flows["LSTM.l0"].grad_norm.shape == (args.steps,)
        return elapsed

    plain(), temporal()  # warm-up (allocator, oneDNN primitive cache)
    rows = []
    for r in range(args.rounds):
        a = plain()
        b = temporal()
        rows.append((a, b, b / a))
        print(f"round {r}: plain {a * 1e3:8.1f} ms   temporal {b * 1e3:8.1f} ms   ratio {b / a:5.2f}")
    med = statistics.median(ratio for *_, ratio in rows)
    print(
        f"LSTM({args.input}->{args.hidden}) T={args.steps} B={args.batch} threads=1 torch {torch.__version__}: "
        f"plain median {statistics.median(a for a, _, _ in rows) * 1e3:.1f} ms, "
        f"temporal median {statistics.median(b for _, b, _ in rows) * 1e3:.1f} ms, "
        f"median paired ratio {med:.2f}x (target <= 2x)"
    )


if __name__ == "__main__":
    main()
