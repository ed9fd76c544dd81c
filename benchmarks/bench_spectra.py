"""Matrix-free top-k Jacobian singular values against dense ``jacrev`` + ``svdvals``.

DeepMLP(2048 → 2048, width 2048, depth 20, ReLU, He init), float32, one thread, k = 8, one example
unless a case says otherwise. Each example's Jacobian is 2048 × 2048. "Dense" is
``torch.func.jacrev`` per example followed by ``torch.linalg.svdvals``; "matrix-free" is
:func:`gradprobe.analysis.spectra.jacobian_spectrum` (no Hutchinson probes) with the given method and
block. Rounds are interleaved (dense, then every matrix-free case, repeat) so drift in machine load
hits all; the speed-up is the median over rounds of the paired ratio dense / matrix-free. Every time
is process CPU time (``time.process_time``; one thread, so it counts only this process's work: the
wall clock of a shared machine is not worth comparing). The error
column is the largest relative deviation of the k values from the dense ones (float32 SVD of the
float32 ``jacrev`` Jacobian; it agrees with a float64 SVD to ~1e-6).

    PYTHONPATH=src python benchmarks/bench_spectra.py [--cases krylov:1:24 lanczos:1:16] [--rounds 5]
    PYTHONPATH=src python benchmarks/bench_spectra.py --oracle --widths 1024 2048 4096 --cases krylov:1:16 krylov:1:32

A case ``method:B:block[:tol]`` analyses ``B`` examples at once with ``block`` vectors per pass
(``tol`` omitted: the method's default; "krylov" 1e-5 on the estimated relative error of σ,
"lanczos" 1e-5 on Ritz residuals relative to σ_max²). ``--sgemm`` first times the building block,
a 2048×2048 @ 2048×b float32 matmul, for the cost model in the module docstring of
:mod:`gradprobe.analysis.spectra`; ``--oracle`` adds the floor of any block-Krylov run (fewest
passes to 1e-5 with an oracle stopping rule × pure matmul time; see :func:`oracle_floor`), and each
case's share of that ceiling (ceiling time / case time: 100 % is the oracle at pure matmul cost; the
ceiling's matmuls are re-timed in every round beside the cases, and the share is the median of the
per-round paired ratios, with a 95 % bootstrap interval).

Why not 20× on this CPU: every matrix-free pass (one application of J or Jᵀ to a block) streams all
22 weight matrices (369 MB) and multiplies a 2048×b block; single-threaded MKL runs that at
~25–85 GFLOP/s for b = 8–64 against ~155 GFLOP/s for the dense 2048×2048 @ 2048×2048, so one pass
costs 60–110 ms whatever b ≤ 64. Dense jacrev + SVD takes ~4–6 s, so 20× allows ~4 passes, while
block Krylov needs 2 passes per step and 5 steps to certify 1e-5 on the top 8 of this spectrum
(σ₈/σ₉ = 1.01): 10 passes; even an oracle stopping rule needs ≥ 9 (b = 16) or ≥ 5 (b = 64).

``--split`` also measures where the first case's time goes beside the matmuls:
setup (forward + the backward that builds the double-backward graph), the passes themselves against
their matmuls alone, and the solver's own arithmetic (orthogonalisation, Ritz values, bounds).
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Callable

import numpy as np
import torch

from gradprobe.analysis.spectra import jacobian_spectrum
from gradprobe.models import DeepMLP


def median_ci(values: list[float], reps: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Median and its 95 % bootstrap interval (percentiles of the medians of resamples)."""
    v = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    meds = np.median(rng.choice(v, size=(reps, v.size), replace=True), axis=1)
    return float(np.median(v)), float(np.percentile(meds, 2.5)), float(np.percentile(meds, 97.5))


def dense_topk(net: torch.nn.Module, x: torch.Tensor, k: int) -> np.ndarray:
    out = []
    for b in range(x.shape[0]):
        J = torch.func.jacrev(lambda z: net(z.unsqueeze(0)).squeeze(0))(x[b])  # (2048, 2048)
        out.append(torch.linalg.svdvals(J)[:k])
    return torch.stack(out).double().numpy()


clock = time.process_time  # CPU seconds of this process (one thread)


def sgemm_table(w: int, blocks=(1, 8, 16, 24, 32, 64)) -> dict[int, float]:
    """Median CPU time (s) of one ``(b × w) @ (w × w)`` float32 matmul per ``b``, printed as a table."""
    print(f"| b | {w}×{w} @ {w}×b matmul (CPU ms, median of 20) | GFLOP/s |")
    print("|---:|---:|---:|")
    W = torch.randn(w, w)
    out = {}
    for b in (*blocks, w):
        X = torch.randn(b, w)
        ts = []
        for _ in range(20 if b < w else 5):
            t0 = clock()
            X @ W.T
            ts.append(clock() - t0)
        t = statistics.median(ts)
        out[b] = t
        print(f"| {b} | {t * 1e3:.2f} | {2 * w * w * b / t / 1e9:.0f} |")
    print()
    return out


def _matmul_passes(X: torch.Tensor, weights: list[torch.Tensor]) -> tuple[float, float]:
    """CPU seconds of one J pass's matmuls (``X @ Wᵀ`` per layer, forward order) and one Jᵀ pass's
    (``X @ W``, reverse order) for a block ``X`` of shape (b, w)."""
    t0 = clock()
    for W in weights:
        X @ W.T
    t1 = clock()
    for W in reversed(weights):
        X @ W
    return t1 - t0, clock() - t1


def pass_times(net: torch.nn.Module, blocks=(1, 8, 16, 24, 32, 64), reps: int = 7) -> dict[int, tuple[float, float]]:
    """``{b: (t_J, t_Jᵀ)}``: median CPU seconds of the matmuls alone of one pass over the network's own
    weight matrices, each read once per pass as a real pass does (so the weights stream from memory,
    369 MB at width 2048, not one hot 16 MB matrix): ``V @ Wᵀ`` per layer for ``J`` (forward order) and
    ``U @ W`` for ``Jᵀ`` (the layout autograd's input gradient uses)."""
    weights = [m.weight.detach() for m in net.modules() if isinstance(m, torch.nn.Linear)]
    w = weights[0].shape[1]
    out = {}
    print(f"| b | one J pass, matmuls only (CPU ms, {len(weights)} layers) | one Jᵀ pass (CPU ms) |")
    print("|---:|---:|---:|")
    for b in blocks:
        X = torch.randn(b, w)
        tj, tt = zip(*(_matmul_passes(X, weights) for _ in range(reps)))
        out[b] = (statistics.median(tj), statistics.median(tt))
        print(f"| {b} | {out[b][0] * 1e3:.1f} | {out[b][1] * 1e3:.1f} |")
    print()
    return out


def _oracle_passes(J: torch.Tensor, X: torch.Tensor, k: int, tol: float = 1e-5, max_steps: int = 40) -> tuple[int, int]:
    """``(q, passes)``: the fewest passes after which *some* Rayleigh–Ritz estimate from the block-Krylov
    space of start block ``X (n × b)`` is within ``tol`` relative of the exact top-k singular values.

    An independent block Arnoldi on the dense float64 ``J`` (no stopping rule: it knows the answer). After
    ``J`` on ``q`` blocks and ``Jᵀ`` on ``q − 1`` (``2q − 1`` passes) the plain Ritz values ``σ(J V)`` are
    available; after the ``q``-th ``Jᵀ`` pass (``2q``) also the left Ritz values ``σ(UᵀJ)``, ``U`` an orthonormal
    basis of ``J V`` (what :func:`block_krylov_svd` returns). The first of these to reach ``tol`` counts.
    """
    exact = torch.linalg.svdvals(J)[:k]
    ok = lambda vals: bool(torch.all((exact - vals).abs() <= tol * exact))  # noqa: E731
    basis = [torch.linalg.qr(X)[0]]
    for q in range(1, max_steps + 1):
        V = torch.cat(basis, 1)
        JV = J @ V
        if ok(torch.linalg.svdvals(JV)[:k]):
            return q, 2 * q - 1
        AVq = J.T @ (J @ basis[-1])  # the q-th Jᵀ pass
        U = torch.linalg.qr(JV)[0]
        if ok(torch.linalg.svdvals(J.T @ U)[:k]):
            return q, 2 * q
        for _ in range(2):
            AVq = AVq - V @ (V.T @ AVq)
        basis.append(torch.linalg.qr(AVq)[0])
    raise RuntimeError("the oracle did not reach the tolerance")


def oracle_floor(net: torch.nn.Module, x: torch.Tensor, k: int, t_pass: dict[int, tuple[float, float]]) -> tuple[float, tuple, Callable[[float], None]]:
    """Fewest passes any block-Krylov run could use, and the time they would take at pure matmul cost.

    For each block size ``b``, :func:`_oracle_passes` finds on the dense float64 Jacobian the fewest passes
    after which a Rayleigh–Ritz estimate of the block-Krylov space is within 1e-5 relative of the exact
    SVD (an *oracle* stopping rule: no practical method knows the answer): ``2q − 1`` passes (``J`` on ``q``
    blocks, ``Jᵀ`` on ``q − 1``) or ``2q``. Floor = those passes' matmul time over the network's own weights
    (:func:`pass_times`) plus one forward (b = 1), with no autograd, orthogonalisation or stopping-rule
    overhead. Returns the smallest floor over ``b`` (the ceiling) and its ``(b, J passes, Jᵀ passes)``. Also shows the steps the solver's
    a-posteriori estimate needs to certify 1e-5 (it needs the ``Jᵀ`` pass of its last step: ``2q`` passes).
    """
    from gradprobe.functional.lanczos import block_krylov_svd

    J = torch.func.jacrev(lambda z: net(z.unsqueeze(0)).squeeze(0))(x[0]).double()
    exact = torch.linalg.svdvals(J)[:k].numpy()
    layers = sum(1 for m in net.modules() if isinstance(m, torch.nn.Linear))
    fwd, adj = (lambda V: V @ J.T), (lambda U: U @ J)
    lines = ["| b | oracle: steps q (passes) to 1e-5 | floor (ms) | max speed-up "
          "| steps the a-posteriori estimate needs to certify 1e-5 (passes 2q) | its estimate / true error there |",
             "|---:|---:|---:|---:|---:|---:|"]
    best, best_cfg = math.inf, None
    for b in sorted(t for t in t_pass if 1 < t < J.shape[1]):
        X = torch.randn(b, J.shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float64).T
        q_or, passes = _oracle_passes(J, X, k)
        q_est, ratio = None, math.nan
        for q in range(1, 40):
            r = block_krylov_svd(fwd, adj, J.shape[1], k=k, block=b, tol=1e-300, max_iter=q * b)
            est = r.error_bounds[0] / r.values[0]
            if np.max(est) <= 1e-5:
                q_est = q
                ratio = float(np.max(r.error_bounds[0]) / max(np.max(np.abs(r.values[0] - exact)), 1e-300))
                break
        n_j, n_t = -(-passes // 2), passes // 2
        floor = n_j * t_pass[b][0] + n_t * t_pass[b][1] + t_pass[1][0]
        if floor < best:
            best, best_cfg = floor, (b, n_j, n_t)
        lines.append((f"| {b} | {q_or} ({passes}) | {floor * 1e3:.0f} | ", floor, f" | {q_est} ({2 * q_est}) | {ratio:.0f}× |"))

    def show(dense_s: float) -> None:
        """Print the table, speed-ups against the dense time ``dense_s`` of the rounds."""
        print(f"Oracle floor ({layers} linear layers; 20× needs <= {dense_s / 20 * 1e3:.0f} ms):")
        print()
        for ln in lines:
            print(ln if isinstance(ln, str) else f"{ln[0]}{dense_s / ln[1]:.1f}×{ln[2]}")
        print()

    return best, best_cfg, show


def floor_time(weights: list[torch.Tensor], cfg: tuple[int, int, int]) -> float:
    """CPU seconds of the ceiling's work, timed afresh: ``n_j`` J and ``n_t`` Jᵀ passes' matmuls on a block
    of ``b`` plus one forward's (b = 1); each round of the benchmark times it beside the cases, so every
    share is a paired ratio measured at the same load."""
    b, n_j, n_t = cfg
    X, x1 = torch.randn(b, weights[0].shape[1]), torch.randn(1, weights[0].shape[1])
    t0 = clock()
    for i in range(max(n_j, n_t)):
        for W in weights if i < n_j else ():
            X @ W.T
        for W in reversed(weights) if i < n_t else ():
            X @ W
    for W in weights:
        x1 @ W.T
    return clock() - t0


def split_times(net: torch.nn.Module, x: torch.Tensor, k: int, block: int, tol: float, reps: int = 5) -> None:
    """Where one matrix-free run's CPU time goes: setup, passes (against their matmuls alone), solver arithmetic.

    Calls what ``jacobian_spectrum(method="krylov")`` calls (the operators, :func:`chain_operators` for
    this MLP, then :func:`block_krylov_svd`) with the two operators wrapped in timers; medians over ``reps`` runs.
    """
    from gradprobe.analysis.spectra import _block_operators
    from gradprobe.functional.lanczos import block_krylov_svd

    weights = [m.weight.detach() for m in net.modules() if isinstance(m, torch.nn.Linear)]
    w = x[0].numel()
    rows = defaultdict(list)
    for _ in range(reps + 1):  # the first is a warm-up
        t0 = clock()
        _, _, fwd, adj = _block_operators(net, x)
        t_setup = clock() - t0
        tf, ta = [], []

        def F(V, tf=tf, fwd=fwd):
            t = clock()
            out = fwd(V)
            tf.append(clock() - t)
            return out

        def A(U, ta=ta, adj=adj):
            t = clock()
            out = adj(U)
            ta.append(clock() - t)
            return out

        t0 = clock()
        r = block_krylov_svd(F, A, w, k=k, block=block, tol=tol, eps=float(torch.finfo(x.dtype).eps),
                             generator=torch.Generator().manual_seed(0))
        t_solve = clock() - t0
        t_j, t_t = _matmul_passes(torch.randn(block, w), weights)
        for key, val in (("setup", t_setup), ("J passes", sum(tf)), ("Jᵀ passes", sum(ta)),
                         ("their matmuls alone", len(tf) * t_j + len(ta) * t_t),
                         ("solver arithmetic", t_solve - sum(tf) - sum(ta)), ("total", t_setup + t_solve)):
            rows[key].append(val)
    print(f"Split of one run (block {block}, tol {tol:g}, {len(tf)} J + {len(ta)} Jᵀ passes, {r.n_iter} vectors; "
          f"CPU ms, median of {reps}):")
    print()
    print("| part | CPU ms |")
    print("|---|---:|")
    for key, vals in rows.items():
        print(f"| {key} | {statistics.median(vals[1:]) * 1e3:.0f} |")
    print()
    # One J + Jᵀ pass against its bare matmuls, paired and interleaved (the split above times them apart).
    V, X = torch.randn(1, block, w, dtype=torch.float64), torch.randn(block, w)
    ratios = []
    for _ in range(12):
        t0 = clock()
        adj(fwd(V))
        t1 = clock()
        for W in weights:
            X @ W.T
        for W in reversed(weights):
            X @ W
        ratios.append((t1 - t0) / (clock() - t1))
    med, lo, hi = median_ci(ratios)
    print(f"One J + Jᵀ pass / its bare matmuls (block {block}, 12 paired repetitions): {med:.3f} [{lo:.3f}, {hi:.3f}], "
          f"range {min(ratios):.2f}–{max(ratios):.2f}")
    print()


def run_width(w: int, args, g: torch.Generator) -> list:
    net = DeepMLP(w, w, width=w, depth=args.depth, activation="relu", init="he", generator=g)
    for p in net.parameters():
        p.requires_grad_(False)
    print(f"## width {w}: load average at start: {os.getloadavg()}", flush=True)
    if args.sgemm:
        sgemm_table(w)
    t_pass = pass_times(net) if args.oracle else {}

    cases = []
    for case in args.cases:
        parts = case.split(":")
        method, B, b = parts[0], int(parts[1]), int(parts[2])
        tol = float(parts[3]) if len(parts) > 3 else None
        cases.append((method, B, b, tol))
    by_batch: dict[int, list] = defaultdict(list)
    for c in cases:
        by_batch[c[1]].append(c)

    rows = []
    for B, group in by_batch.items():
        x = torch.randn(B, w, generator=g)
        # Warm-up (not timed): first calls pay one-off costs (vmap/autograd set-up, allocator growth).
        dense_topk(net, x[:1], args.k)
        ceiling, cfg, show = math.nan, None, None
        if args.oracle and B == 1:
            ceiling, cfg, show = oracle_floor(net, x, args.k, t_pass)
        weights = [m.weight.detach() for m in net.modules() if isinstance(m, torch.nn.Linear)]
        floor_t: list[float] = []
        for method, _, b, tol in group:
            jacobian_spectrum(net, x, k=args.k, method=method, tol=tol, n_probes=0, block=b, max_iter=300)
        dense_t: list[float] = []
        mf_t: dict[tuple, list[float]] = defaultdict(list)
        ratios: dict[tuple, list[float]] = defaultdict(list)
        err: dict[tuple, float] = defaultdict(float)
        info: dict[tuple, tuple] = {}
        for _ in range(args.rounds):
            t0 = clock()
            ref = dense_topk(net, x, args.k)
            td = clock() - t0
            dense_t.append(td)
            if cfg is not None:
                floor_t.append(floor_time(weights, cfg))
            for c in group:
                method, _, b, tol = c
                t0 = clock()
                spec = jacobian_spectrum(net, x, k=args.k, method=method, tol=tol, n_probes=0, block=b, max_iter=300)
                tm = clock() - t0
                mf_t[c].append(tm)
                ratios[c].append(td / tm)
                err[c] = max(err[c], float(np.max(np.abs(spec.singular_values - ref) / ref)))
                bound = np.nan if spec.error_bounds is None else float(np.max(spec.error_bounds / spec.singular_values))
                info[c] = (spec.n_iter, spec.converged, bound)
            print(f"B={B}: dense {td:.2f}s; " + ", ".join(f"{c[0]}/{c[2]}: {mf_t[c][-1]:.2f}s" for c in group), flush=True)
        if show is not None:
            show(statistics.median(dense_t))
        if floor_t:
            print(f"ceiling re-timed each round (b = {cfg[0]}, {cfg[1]} J + {cfg[2]} Jᵀ passes + one forward): "
                  + ", ".join(f"{t * 1e3:.0f}" for t in floor_t) + " ms", flush=True)
            ceiling = statistics.median(floor_t)
        if args.split and B == 1:
            method, _, b, tol = group[0]
            split_times(net, x, args.k, b, 1e-5 if tol is None else tol)
        for c in group:
            pure = math.nan
            if t_pass and c[2] in t_pass and B == 1 and c[0] == "krylov":
                nb = -(-info[c][0] // c[2])  # blocks: each one J pass and one Jᵀ pass
                pure = nb * sum(t_pass[c[2]]) + t_pass[1][0]
            shares = [f / t for f, t in zip(floor_t, mf_t[c])]  # paired: the ceiling of the same round
            rows.append((w, c, statistics.median(dense_t), statistics.median(mf_t[c]), median_ci(ratios[c]), info[c], err[c], ceiling, pure,
                         median_ci(shares) if shares else None))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--widths", type=int, nargs="+", help="several widths in turn (overrides --width)")
    ap.add_argument("--depth", type=int, default=20)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--cases", nargs="+", default=["krylov:1:16", "krylov:1:32", "krylov:1:16:1e-5", "lanczos:1:1", "lanczos:1:16"],
                    help="method:B:block[:tol]")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--sgemm", action="store_true", help="time the matmul building block first")
    ap.add_argument("--split", action="store_true", help="where the first case's time goes (setup, passes, solver)")
    ap.add_argument("--oracle", action="store_true", help="the fewest-passes ceiling (needs the dense Jacobian; implies --sgemm)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    rows = []
    for w in args.widths or [args.width]:
        rows += run_width(w, args, g)

    print()
    print(f"Top-{args.k} singular values of per-example Jacobians: DeepMLP depth {args.depth}, ReLU/He, "
          f"float32, 1 thread, CPU time, {args.rounds} interleaved rounds; load average at end: {os.getloadavg()}")
    print()
    print("| width | method | examples | block | tol | dense jacrev + svdvals (CPU s) | matrix-free (CPU s) | speed-up (median paired [95 % CI]) "
          "| share of the oracle ceiling (median [95 % CI]) | vectors applied per example | its passes at matmul cost (CPU s) | converged | est. rel. error | max rel. error vs dense |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|")
    for w, (method, B, b, tol), d, m, (r, rlo, rhi), (it, conv, bound), e, ceiling, pure, sh in rows:
        share = f"{100 * sh[0]:.0f} % (ceiling {d / ceiling:.1f}×; CI [{100 * sh[1]:.0f}, {100 * sh[2]:.0f}] %)" if sh else ""
        print(f"| {w} | {method} | {B} | {b} | {'default' if tol is None else f'{tol:g}'} | {d:.2f} | {m:.2f} | {r:.1f}× [{rlo:.1f}, {rhi:.1f}] | {share} | {it} "
              f"| {pure:.2f} | {conv} | {bound:.1e} | {e:.1e} |")


if __name__ == "__main__":
    main()
