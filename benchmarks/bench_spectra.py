"""Matrix-free top-k Jacobian singular values against dense ``jacrev`` + ``svdvals``.

DeepMLP(2048 → 2048, width 2048, depth 20, ReLU, He init), float32, one thread, k = 8. The Jacobian
of each example is 2048 × 2048. "Dense" is ``torch.func.jacrev`` per example followed by
``torch.linalg.svdvals``; "matrix-free" is :func:`gradprobe.analysis.spectra.jacobian_spectrum`
(Lanczos on JᵀJ with products through one retained graph; no Hutchinson probes). Rounds are
interleaved (dense, matrix-free, dense, ...) so drift in machine load hits both; the speed-up is the
median over rounds of the paired ratio dense / matrix-free. ``--batch`` sets how many examples are
analysed at once (matrix-free runs the per-example recurrences in lockstep and shares every pass).

    PYTHONPATH=src python benchmarks/bench_spectra.py [--batches 1 8] [--rounds 3]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from gradprobe.analysis.spectra import jacobian_spectrum
from gradprobe.models import DeepMLP


def dense_topk(net: torch.nn.Module, x: torch.Tensor, k: int) -> np.ndarray:
    out = []
    for b in range(x.shape[0]):
        J = torch.func.jacrev(lambda z: net(z.unsqueeze(0)).squeeze(0))(x[b])  # (2048, 2048)
        out.append(torch.linalg.svdvals(J)[:k])
    return torch.stack(out).double().numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--depth", type=int, default=20)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--rounds", type=int, nargs="+", default=[3, 2], help="rounds per batch size")
    ap.add_argument("--tol", type=float, default=1e-6)
    args = ap.parse_args()
    rounds = args.rounds + [args.rounds[-1]] * (len(args.batches) - len(args.rounds))
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    w = args.width
    net = DeepMLP(w, w, width=w, depth=args.depth, activation="relu", init="he", generator=g)
    for p in net.parameters():
        p.requires_grad_(False)

    rows = []
    for B, R in zip(args.batches, rounds):
        x = torch.randn(B, w, generator=g)
        dense_t, mf_t, ratios = [], [], []
        err, n_iter = 0.0, 0
        for _ in range(R):
            t0 = time.perf_counter()
            ref = dense_topk(net, x, args.k)
            t1 = time.perf_counter()
            spec = jacobian_spectrum(net, x, k=args.k, tol=args.tol, n_probes=0)
            t2 = time.perf_counter()
            dense_t.append(t1 - t0)
            mf_t.append(t2 - t1)
            ratios.append((t1 - t0) / (t2 - t1))
            err = max(err, float(np.max(np.abs(spec.singular_values - ref) / ref)))
            n_iter = spec.n_iter
        rows.append((B, statistics.median(dense_t), statistics.median(mf_t), statistics.median(ratios), n_iter, err, R))
        print(f"batch {B}: dense {dense_t}, matrix-free {mf_t}", flush=True)

    print()
    print(f"Top-{args.k} singular values of per-example Jacobians, DeepMLP width {w}, depth {args.depth}, ReLU/He, "
          f"float32, 1 thread, Lanczos tol {args.tol:g}")
    print()
    print("| examples | dense jacrev + svdvals (s) | matrix-free Lanczos (s) | speed-up (median paired) | products per example | max rel. error | rounds |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for B, d, m, r, it, e, R in rows:
        print(f"| {B} | {d:.2f} | {m:.2f} | {r:.1f}× | {it} | {e:.1e} | {R} |")


if __name__ == "__main__":
    main()
