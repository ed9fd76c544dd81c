"""The benchmark harnesses run end to end at tiny sizes (no timing is asserted: timings belong in
BENCHMARKS.md, measured by ``make bench`` / ``make bench-spectra``, never in the test suite)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"


def _run(*args: str, timeout: float = 240) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_probe_overhead_harness_runs_and_reports_the_targets():
    out = _run(str(BENCH / "bench_probe_overhead.py"), "--quick", "--case", "mlp_narrow", "--rounds", "2",
               "--block-seconds", "0.001", "--config", "gp_default", "--config", "floor_grads")
    for row in ("`plain`", "`plain_again`", "`gp_default`", "`floor_grads`"):
        assert row in out
    assert "default `Probe(model)` ≤ 1.05× plain" in out  # the narrow MLP's target row
    assert "ended the run on the cadence" in out


def test_probe_overhead_phases_attribute_the_step():
    out = _run(str(BENCH / "bench_probe_overhead.py"), "--phases", "8", "--case", "mlp_narrow",
               "--config", "gp_grad_norms_only")
    assert "| `gp_grad_norms_only` |" in out and "forward+loss" in out


def test_spectra_harness_runs_at_a_tiny_width():
    out = _run(str(BENCH / "bench_spectra.py"), "--widths", "32", "--depth", "2", "--k", "2", "--rounds", "1",
               "--cases", "krylov:1:4", "--oracle")
    assert "| 32 | krylov | 1 | 4 |" in out
    assert "% (ceiling" in out  # the case's share of the oracle's fewest-passes ceiling


def test_everything_bench_runs_with_its_floors():
    out = _run(str(BENCH / "bench_everything.py"), "--case", "mlp_narrow", "--rounds", "2", "--block-seconds", "0.001")
    for row in ("`plain_again`", "`gp_everything`", "`floor_everything`", "`floor_params`", "`floor_kernels_hooks`"):
        assert row in out
    assert "paired t(gp_everything) / t(floor_everything)" in out


def test_step_fixed_harness_runs_both_modes_with_an_alternative_tree():
    out = _run(str(BENCH / "bench_step_fixed.py"), "--steps", "16", "--alt", f"self={ROOT / 'src'}")
    assert "| `recorded` |" in out and "| `self:unrecorded` |" in out
    assert "fixed cost of `recorded` ÷ `self:recorded`" in out
    out = _run(str(BENCH / "bench_step_fixed.py"), "--params", "--steps", "8", "--case", "mlp_narrow")
    assert "| `floor_grads+weights` |" in out and "| `params_every_step` |" in out



def test_seeds_kernel_floor_does_the_batched_steps_work():
    """The floor row of bench_experiments runs every kernel of a K-model time step, L times each: after one
    call its weight gradients are L·hᵀa and L·[u 1]ᵀa with a = δ ⊙ (1 − h²), computed here in float64."""
    sys.path.insert(0, str(BENCH))
    try:
        from bench_experiments import kernel_floor, kernel_floor_numpy
    finally:
        sys.path.remove(str(BENCH))
    K, L = 3, 4
    for floor in (kernel_floor, kernel_floor_numpy):  # torch's kernels, and the NumPy loop's
        step = floor(K, L)
        step()
        h, u1, d0, g_rec, g_in = (torch.as_tensor(t).double() for t in step.checks)
        a = d0 * (1 - h * h)
        assert torch.allclose(g_rec, L * h.transpose(1, 2) @ a, rtol=1e-5, atol=1e-5), floor.__name__
        assert torch.allclose(g_in, L * u1.transpose(1, 2) @ a, rtol=1e-5, atol=1e-5), floor.__name__


def test_products_floor_computes_the_steps_products():
    """products_floor times the products each side of the like-for-like pair computes: the K-model step's
    a·W_rec and hᵀa, and one single run's h·W_recᵀ and hsᵀA (checked against float64 products)."""
    sys.path.insert(0, str(BENCH))
    try:
        from bench_experiments import products_floor
    finally:
        sys.path.remove(str(BENCH))
    K, L = 3, 4
    step = products_floor(K, L, batched=True)
    step()
    h, a, w_rec_t, d, t_rec = (torch.as_tensor(t).double() for t in step.checks)
    assert torch.allclose(d, a @ w_rec_t, rtol=1e-5, atol=1e-5)
    assert torch.allclose(t_rec, h.transpose(1, 2) @ a, rtol=1e-5, atol=1e-5)
    step = products_floor(K, L, batched=False)
    step()
    m = step.checks
    assert torch.allclose(torch.as_tensor(m["z"]).double(), torch.as_tensor(m["h"] @ m["w_rec"]).double(), rtol=1e-5, atol=1e-5)
    assert torch.allclose(m["g_rec"].double(), m["hs"].double().T @ m["A"].double(), rtol=1e-4, atol=1e-4)


def test_experiments_bench_runs_every_row_at_a_tiny_length():
    """bench_experiments end to end at L = 10, two rounds: every part-1 row (the NumPy-loop single run
    included) and every like-for-like part-2 pair (the NumPy loop included) is timed and reported."""
    out = _run(str(BENCH / "bench_experiments.py"), "--quick", "--rounds", "2", "--lengths", "10")
    for row in ("`fast`", "`fast_omega`", "`fused`", "`fast_numpy_loop`", "`sequential16_np_loop`", "`batched16_np_loop`",
                "`batched16_in_memory`", "`batched16_kernel_floor`", "`batched16_np_kernel_floor`",
                "`sequential16_np_products`", "`batched16_np_products`"):
        assert f"| {row} |" in out, row
    assert "`fast_numpy_loop` / `fast`, paired" in out and "`kernel_floor_numpy`" in out
    assert "the matrix products alone (`products_floor`" in out
    assert "16 runs of the suite's default single-run trainer" in out
    for pair in ("| torch tanh |", "| NumPy tanh |", "| NumPy loop (every per-step kernel in NumPy) |", "| fast tanh"):
        assert pair in out, pair
