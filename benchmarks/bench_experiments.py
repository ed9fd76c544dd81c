"""Cost of the experiment suite's RNN trainers (issue 13 §1): one run, Ω, and K seeds vectorized.

Pascanu's 50-unit tanh RNN on temporal order, batch 20, float32, one thread, data generated once
(the same work in every configuration, so it is left out of the clock).

Part 1, one plain SGD step at L = 50 and 200 (baseline ``handwritten``: autograd through the loop
the issue describes, the input projection for all steps at once and one ``addmm`` + ``tanh`` per
step): ``fast`` (the suite's ``RNNTrainer``, K = 1), ``fast_omega`` (clipping + Ω, α = 2), ``fused``
(``nn.RNN`` + ``nn.Linear`` and autograd), ``fast_numpy_loop`` (``RNNTrainer(loop_backend="numpy")``, K = 1:
every per-step kernel in NumPy/OpenBLAS on views of the torch storage). Budgets: ``fast`` ≤ 1.3×
``handwritten``; ``fast_omega`` ≤ 1.5× ``fast``.

Part 2, 16 seeds at L = 50 and 200, like for like: 16 steps of the fast single-run trainer, one per
model (``sequential16*``), against one ``RNNTrainer`` step with K = 16 (``batched16*``), with the *same*
activation on both sides — ``torch.tanh``; NumPy's ``tanh`` (``tanh_backend="numpy"``, exact to
1.4 ulp); tanh as 2σ(2z) − 1 (``fast_tanh``); and the whole step loop in NumPy (``loop_backend="numpy"``,
``sequential16_np_loop`` vs ``batched16_np_loop``). All eight interleaved in one run; each pair's ratio is the
median over rounds of its two blocks' paired ratio. Budget: throughput ≥ 2× sequential, i.e. a
paired ratio ≤ 0.5. At both lengths the K = 16 states exceed ``stream_bytes`` (2 MiB), so the batched
side takes the trainer's streaming path (printed with each table); ``batched16_in_memory`` is the same
torch-tanh step forced onto the in-memory path (``stream_bytes=inf``), timed in the same rounds;
``batched16_kernel_floor`` is that step's kernels alone on cache-hot operands (:func:`kernel_floor`):
if even it is above half the sequential time, 2× cannot be had with these kernels on this CPU;
``batched16_np_kernel_floor`` is the same for the NumPy loop (:func:`kernel_floor_numpy`, against
``sequential16_np_loop``); ``batched16_np_products`` / ``sequential16_np_products`` are the two sides' matrix
products alone (:func:`products_floor`), what batching can gain on them. Also printed: the K = 16 NumPy loop
against 16 runs of the suite's default single-run trainer (the torch loop), paired in the same rounds.

    PYTHONPATH=src python benchmarks/bench_experiments.py [--rounds 15] [--quick] [--lengths 50 200]
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys

# NumPy's OpenBLAS (loop_backend="numpy") picks its own thread count, which torch.set_num_threads does not
# control; the loop's products are below its threading threshold anyway, but pin it so every row is one thread.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from _harness import markdown_table, measure, paired_between  # noqa: E402

from gradprobe.experiments.rnn_trainer import RNNTrainer, init_params  # noqa: E402
from gradprobe.experiments.tasks import make_task  # noqa: E402

H, B = 50, 20


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def handwritten(x, y):
    g = torch.Generator().manual_seed(0)
    W_in = (torch.randn(H, 6, generator=g) * 0.1).requires_grad_()
    W = (torch.randn(H, H, generator=g) * 0.1).requires_grad_()
    b = torch.zeros(H, requires_grad=True)
    Wo = (torch.randn(4, H, generator=g) * 0.1).requires_grad_()
    bo = torch.zeros(4, requires_grad=True)
    ps = [W_in, W, b, Wo, bo]

    def step():
        T = x.shape[0]
        P = torch.addmm(b, x.reshape(T * B, 6), W_in.t()).view(T, B, H)
        h = x.new_zeros(B, H)
        Wt = W.t()
        for t in range(T):
            h = torch.tanh(torch.addmm(P[t], h, Wt))
        loss = F.cross_entropy(torch.addmm(bo, h, Wo.t()), y)
        grads = torch.autograd.grad(loss, ps)
        with torch.no_grad():
            for p, gr in zip(ps, grads):
                p.sub_(0.01 * gr)

    return step


def fused(x, y):
    torch.manual_seed(0)
    rnn, head = nn.RNN(6, H), nn.Linear(H, 4)
    opt = torch.optim.SGD(list(rnn.parameters()) + list(head.parameters()), lr=0.01)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(head(rnn(x)[0][-1]), y).backward()
        opt.step()

    return step


def part1(L, rounds, steps):
    task = make_task("temporal_order")
    bt = task.generate(B, L, torch.Generator().manual_seed(1))
    p = init_params(6, H, 4, "basic_tanh", [torch.Generator().manual_seed(0)])
    plain = RNNTrainer(p.clone())
    omega = RNNTrainer(p.clone(), clip=1.0, alpha=2.0)
    x1, y1 = bt.x[:, None], bt.y[None]
    np_loop = RNNTrainer(p.clone(), loop_backend="numpy")
    fns = {"handwritten": handwritten(bt.x, bt.y), "fast": lambda: plain.step(x1, y1),
           "fast_omega": lambda: omega.step(x1, y1), "fused": fused(bt.x, bt.y),
           "fast_numpy_loop": lambda: np_loop.step(x1, y1)}
    return measure(fns, baseline="handwritten", rounds=rounds, steps_per_round=steps)


#: part 2's like-for-like pairs: (sequential baseline, batched candidate, trainer options of both)
PAIRS = {"torch tanh": ("sequential16", "batched16", {}),
         "NumPy tanh": ("sequential16_np_tanh", "batched16_np_tanh", {"tanh_backend": "numpy"}),
         "NumPy loop (every per-step kernel in NumPy)": ("sequential16_np_loop", "batched16_np_loop",
                                                         {"loop_backend": "numpy"}),
         "fast tanh 2σ(2z) − 1": ("sequential16_fast_tanh", "batched16_fast_tanh", {"fast_tanh": True})}


def kernel_floor(K: int, L: int, n_in: int = 6):
    """The batched step's kernels alone, each run ``L`` times in a row on cache-hot (K, B, H) operands, with no
    storage and no bookkeeping: per time step the forward's input and recurrent products and ``torch.tanh``, the backward's
    φ′ = 1 − h², a = δ ⊙ φ′, δ ← a·W_recᵀ and the weight-gradient products ∂E/∂W_rec += hᵀa and
    [∂E/∂W_in; ∂E/∂b] += [u 1]ᵀa. What the streaming path could reach if its 12 MiB of states cost nothing."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(K, B, H, generator=g) * 0.5
    u1 = torch.randn(K, B, n_in + 1, generator=g)
    w_rec, w_in = torch.randn(K, H, H, generator=g) * 0.1, torch.randn(K, n_in + 1, H, generator=g) * 0.1
    w_rec_t, h_t, u1_t = w_rec.transpose(1, 2), h.transpose(1, 2), u1.transpose(1, 2)
    # fixed inputs every step (δ from d0 into d1): the same kernels on the same shapes, with no value drifting
    # toward denormals over L steps (which would time the FPU's slow path, not the step)
    d0 = torch.randn(K, B, H, generator=g)
    z, d1, a, hh, phi = (torch.zeros(K, B, H) for _ in range(5))
    g_rec, g_in = torch.zeros(K, H, H), torch.zeros(K, n_in + 1, H)

    ops = (lambda: torch.bmm(u1, w_in, out=z), lambda: z.baddbmm_(h, w_rec), lambda: torch.tanh(z, out=z),
           lambda: torch.mul(h, h, out=hh), lambda: torch.mul(hh, -1.0, out=phi).add_(1.0), lambda: torch.mul(d0, phi, out=a),
           lambda: torch.bmm(a, w_rec_t, out=d1), lambda: g_rec.baddbmm_(h_t, a), lambda: g_in.baddbmm_(u1_t, a))

    def step():  # each kernel L times in a row: every one at its best (hot operands, hot code, one shape)
        for op in ops:
            for _ in range(L):
                op()
    step.checks = (h, u1, d0, g_rec, g_in)  # after one call: g_rec = L·hᵀ(d0 ⊙ (1 − h²)), g_in = L·[u 1]ᵀ(…)
    return step


def kernel_floor_numpy(K: int, L: int, n_in: int = 6):
    """:func:`kernel_floor` for the NumPy loop (``loop_backend="numpy"``, streaming path): the K-model step's
    NumPy kernels, each run ``L`` times in a row on cache-hot ``(K, B, H)`` operands, no storage and no
    bookkeeping. Per time step: forward ``z = [u 1]·[W_inᵀ; b]``, ``tmp = h W_recᵀ``, ``z += tmp``,
    ``tanh``; backward φ′ = 1 − h² (two kernels, into separate buffers so that repeating one changes nothing), a = δ ⊙ φ′, ``tmp = [u 1]ᵀ a`` and its accumulation,
    δ ← a·W_recᵀ, ``tmp = hᵀ a`` and its accumulation (NumPy has no accumulating matmul)."""
    import numpy as np

    rng = np.random.default_rng(0)
    f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    h, u1, d0 = f32(K, B, H) * 0.5, f32(K, B, n_in + 1), f32(K, B, H)
    w_rec, w_in = f32(K, H, H) * 0.1, f32(K, n_in + 1, H) * 0.1
    w_rec_t = np.ascontiguousarray(w_rec.transpose(0, 2, 1))
    h_t, u1_t = h.transpose(0, 2, 1), u1.transpose(0, 2, 1)
    z, tmp, hh, phi, a, d1 = (np.zeros((K, B, H), np.float32) for _ in range(6))
    g_rec, t_rec = np.zeros((K, H, H), np.float32), np.zeros((K, H, H), np.float32)
    g_in, t_in = np.zeros((K, n_in + 1, H), np.float32), np.zeros((K, n_in + 1, H), np.float32)
    mm, add, mul, sub, tanh = np.matmul, np.add, np.multiply, np.subtract, np.tanh
    ops = (lambda: mm(u1, w_in, out=z), lambda: mm(h, w_rec, out=tmp), lambda: add(z, tmp, out=z),
           lambda: tanh(z, out=z), lambda: mul(h, h, out=hh), lambda: sub(1.0, hh, out=phi),
           lambda: mul(phi, d0, out=a), lambda: mm(u1_t, a, out=t_in), lambda: add(g_in, t_in, out=g_in),
           lambda: mm(a, w_rec_t, out=d1), lambda: mm(h_t, a, out=t_rec), lambda: add(g_rec, t_rec, out=g_rec))

    def step():
        for op in ops:
            for _ in range(L):
                op()
    step.checks = (h, u1, d0, g_rec, g_in)  # after one call: g_rec = L·hᵀ(d0 ⊙ (1 − h²)), g_in = L·[u 1]ᵀ(…)
    return step


def products_floor(K: int, L: int, n_in: int = 6, batched: bool = True):
    """The matrix products alone, on cache-hot operands, each run ``L`` times in a row (as :func:`kernel_floor`).

    ``batched``: the K-model NumPy-loop step's five ``np.matmul`` per time step (streaming path: the input
    projection ``[u 1]·[W_inᵀ; b]``, ``h W_recᵀ``, ``a W_rec``, ``hᵀa`` and ``[u 1]ᵀa``, each over the K models in
    one call). Otherwise 16 single runs' products, one model after another, as the K = 1 NumPy loop computes
    them: the input projection of all steps as one torch ``addmm``, the two per-step ``np.matmul`` (forward
    ``h W_recᵀ``, backward ``a W_rec``) and the two weight-gradient products over all T·B rows (torch ``mm``).
    The pair's ratio is what batching gains on the products alone: the like-for-like ratio of whole steps can
    only fall below it as far as the rest of the step (elementwise kernels, calls) is cheaper batched."""
    import numpy as np

    rng = np.random.default_rng(0)
    f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    mm = np.matmul
    if batched:
        h, u1, a = f32(K, B, H) * 0.5, f32(K, B, n_in + 1), f32(K, B, H)
        w_rec, w_in = f32(K, H, H) * 0.1, f32(K, n_in + 1, H) * 0.1
        w_rec_t = np.ascontiguousarray(w_rec.transpose(0, 2, 1))
        h_t, u1_t = h.transpose(0, 2, 1), u1.transpose(0, 2, 1)
        z, d = np.empty((K, B, H), np.float32), np.empty((K, B, H), np.float32)
        t_rec, t_in = np.empty((K, H, H), np.float32), np.empty((K, n_in + 1, H), np.float32)
        ops = (lambda: mm(u1, w_in, out=z), lambda: mm(h, w_rec, out=z), lambda: mm(a, w_rec_t, out=d),
               lambda: mm(h_t, a, out=t_rec), lambda: mm(u1_t, a, out=t_in))

        def step():
            for op in ops:
                for _ in range(L):
                    op()
        step.checks = (h, a, w_rec_t, d, t_rec)  # after one call: d = a·W_rec, t_rec = hᵀa (each model)
        return step
    models = []
    for _ in range(K):
        m = dict(h=f32(B, H) * 0.5, a=f32(B, H), w_rec=f32(H, H) * 0.1, z=np.empty((B, H), np.float32),
                 d=np.empty((B, H), np.float32), x=torch.from_numpy(f32(L * B, n_in)), w_in=torch.from_numpy(f32(n_in, H)),
                 b=torch.zeros(H), hs=torch.from_numpy(f32(L * B, H)), A=torch.from_numpy(f32(L * B, H)))
        m["w_rec_t"] = np.ascontiguousarray(m["w_rec"].T)
        models.append(m)

    def step():
        for m in models:
            torch.addmm(m["b"], m["x"], m["w_in"])  # W_in u_t + b, every t
            h, w, z = m["h"], m["w_rec"], m["z"]
            for _ in range(L):
                mm(h, w, out=z)
            a, wt, d = m["a"], m["w_rec_t"], m["d"]
            for _ in range(L):
                mm(a, wt, out=d)
            m["g_rec"] = torch.mm(m["hs"].T, m["A"])  # ∂E/∂W_rec over all T·B rows
            torch.mm(m["x"].T, m["A"])  # ∂E/∂W_in
    step.checks = models[0]  # after one call: z = h·W_recᵀ, g_rec = hsᵀA
    return step


def part2(L, rounds, steps):
    """Every pair of ``PAIRS`` in one interleaved run; the ratio of a pair pairs its two blocks of a round."""
    task = make_task("temporal_order")
    K = 16
    gens = [torch.Generator().manual_seed(s) for s in range(K)]
    batches = [task.generate(B, L, g) for g in gens]
    p = init_params(6, H, 4, "basic_tanh", [torch.Generator().manual_seed(s) for s in range(K)])
    xs = [b.x[:, None] for b in batches]
    ys = [b.y[None] for b in batches]
    X, Y = torch.stack([b.x for b in batches], 1), torch.stack([b.y for b in batches])
    fns = {}
    for seq_name, bat_name, opts in PAIRS.values():
        singles = [RNNTrainer(p.select(k), **opts) for k in range(K)]
        batched = RNNTrainer(p.clone(), **opts)

        def sequential(singles=singles):
            for k in range(K):
                singles[k].step(xs[k], ys[k])

        fns[seq_name] = sequential
        fns[bat_name] = lambda batched=batched: batched.step(X, Y)
        if not opts:  # the same K = 16 step forced onto the in-memory path: what streaming gains, same run
            in_memory = RNNTrainer(p.clone(), stream_bytes=float("inf"))
            fns["batched16_in_memory"] = lambda: in_memory.step(X, Y)
    fns["batched16_kernel_floor"] = kernel_floor(K, L)
    fns["batched16_np_kernel_floor"] = kernel_floor_numpy(K, L)
    fns["sequential16_np_products"] = products_floor(K, L, batched=False)
    fns["batched16_np_products"] = products_floor(K, L, batched=True)
    print(f"K = 16, L = {L}: states {(L + 1) * K * B * H * 4 / 2**20:.1f} MiB, "
          f"{'streaming' if batched._streams(X) else 'in-memory'} path (stream_bytes = {batched.stream_bytes / 2**20:g} MiB)")
    return measure(fns, baseline="sequential16", rounds=rounds, steps_per_round=steps)


def pair_table(st) -> str:
    lines = ["| activation (both sides) | sequential16 CPU ms/step | batched16 CPU ms/step | batched / sequential, paired median [95 % CI] | throughput |",
             "|---|---|---|---|---|"]
    for label, (seq_name, bat_name, _) in PAIRS.items():
        med, ci = paired_between(st[bat_name], st[seq_name])
        ok = "✅" if med <= 0.5 else "❌"
        lines.append(f"| {label} | {st[seq_name].median_ms:.2f} | {st[bat_name].median_ms:.2f} | "
                     f"**{med:.3f}** [{ci[0]:.3f}, {ci[1]:.3f}] | {1 / med:.2f}× {ok} |")
    if "batched16_np_loop" in st:  # against the suite's default single-run trainer (the torch loop), paired in the same rounds
        med, ci = paired_between(st["batched16_np_loop"], st["sequential16"])
        lines.append(f"\n`batched16_np_loop` (K = 16, NumPy loop) / `sequential16` (16 runs of the suite's default single-run trainer, "
                     f"the torch loop), paired median: **{med:.3f}** [{ci[0]:.3f}, {ci[1]:.3f}] ({1 / med:.2f}× the throughput)")
    if "batched16_in_memory" in st:
        med, ci = paired_between(st["batched16"], st["batched16_in_memory"])
        lines.append(f"\n`batched16` (streaming path) / `batched16_in_memory` (the same step, `stream_bytes=inf`), "
                     f"paired median: **{med:.3f}** [{ci[0]:.3f}, {ci[1]:.3f}]")
    if "batched16_kernel_floor" in st:
        med, ci = paired_between(st["batched16_kernel_floor"], st["sequential16"])
        lines.append(f"\nkernel floor of the K = 16 step (`kernel_floor`: its kernels on cache-hot operands, torch tanh) / "
                     f"`sequential16`, paired median: **{med:.3f}** [{ci[0]:.3f}, {ci[1]:.3f}] "
                     f"({'2× is out of reach with these kernels' if ci[0] > 0.5 else 'leaves room for 2×' if ci[1] < 0.5 else 'at the 2× line'})")
    if "batched16_np_kernel_floor" in st:
        med, ci = paired_between(st["batched16_np_kernel_floor"], st["sequential16_np_loop"])
        lines.append(f"\nkernel floor of the K = 16 NumPy-loop step (`kernel_floor_numpy`: its NumPy kernels on cache-hot operands) / "
                     f"`sequential16_np_loop`, paired median: **{med:.3f}** [{ci[0]:.3f}, {ci[1]:.3f}] "
                     f"({'2× is out of reach with these kernels' if ci[0] > 0.5 else 'leaves room for 2×' if ci[1] < 0.5 else 'at the 2× line'})")
    if "batched16_np_products" in st:
        med, ci = paired_between(st["batched16_np_products"], st["sequential16_np_products"])
        lines.append(f"\nthe matrix products alone (`products_floor`, cache-hot): the K = 16 NumPy-loop step's / 16 single runs' "
                     f"(NumPy loop), paired median: **{med:.3f}** [{ci[0]:.3f}, {ci[1]:.3f}] ({1 / med:.2f}× on the products)")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=None, help="rounds (default 15; 5 with --quick)")
    ap.add_argument("--quick", action="store_true", help="5 rounds, fewer steps")
    ap.add_argument("--lengths", type=int, nargs="+", default=[50, 200], help="sequence lengths (default 50 200)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rounds = args.rounds or (5 if args.quick else 15)
    print(f"CPU: {cpu_model()}; torch {torch.__version__}; 1 thread; load average {os.getloadavg()[0]:.1f}")
    for L in args.lengths:
        steps = (10 if L == 50 else 3) if args.quick else (30 if L == 50 else 8)
        print(f"\n### One step, L = {L} (baseline: handwritten autograd loop)\n")
        st = part1(L, rounds, steps)
        print(markdown_table(st))
        import numpy as np

        pair = st["fast_omega"].ratio / st["fast"].ratio  # same rounds: a paired ratio Ω step / plain step
        print(f"\nΩ step / plain fast step (paired, median over rounds): {np.median(pair):.3f} "
              f"(IQR {np.percentile(pair, 25):.3f}–{np.percentile(pair, 75):.3f})")
        med, ci = paired_between(st["fast_numpy_loop"], st["fast"])
        print(f"\nNumPy loop / torch loop, one run (`fast_numpy_loop` / `fast`, paired): {med:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]")
    for L in args.lengths:
        steps = (2 if L == 50 else 1) if args.quick else (4 if L == 50 else 2)
        print(f"\n### 16 seeds, L = {L} (16 sequential fast single-run steps vs one K = 16 step, the same activation "
              "on both sides; ratio 0.5 = 2× throughput)\n")
        st = part2(L, rounds, steps)
        print(pair_table(st))
        print()
        print(markdown_table(st))
    print(f"\nload average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
