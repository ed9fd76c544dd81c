"""Lanczos, power iteration and Hutchinson against dense ``numpy.linalg.eigh`` / exact traces (float64)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from gradprobe.errors import ConfigError
from gradprobe.functional.lanczos import (
    block_krylov_svd,
    block_lanczos,
    hutchinson_trace,
    lanczos,
    power_iteration,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def _sym(eigs: np.ndarray, seed: int) -> np.ndarray:
    """Symmetric matrix with the given eigenvalues in a Haar-random orthonormal basis."""
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.standard_normal((len(eigs), len(eigs))))
    q = q * np.sign(np.diag(r))
    return (q * eigs) @ q.T


def _op(A: np.ndarray):
    At = torch.from_numpy(A)
    return lambda V: V @ At  # rows of V times symmetric A


def _rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return np.max(np.abs(a - b)) / np.max(np.abs(b))


# Full reorthogonalization in float64 keeps the Ritz values exact to rounding once the residual test
# passes: a residual r bounds the eigenvalue error by r (and by r²/gap for isolated ones), so with
# tol = 1e-10 relative we ask for 1e-8 relative agreement (two digits of slack for clusters).
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_symmetric_both_ends_match_eigh(seed):
    rng = np.random.default_rng(seed)
    M = rng.standard_normal((120, 120))
    A = (M + M.T) / 2
    exact = np.linalg.eigvalsh(A)
    r = lanczos(_op(A), 120, k=4, which="both", tol=1e-10, max_iter=120)
    assert r.converged
    assert _rel(r.top[0], exact[::-1][:4]) < 1e-8
    assert _rel(r.bottom[0], exact[:4]) < 1e-8
    assert r.top.shape == (1, 4) and r.bottom.shape == (1, 4)


def test_well_separated_spectrum_converges_early():
    eigs = np.concatenate([[100.0, 50.0, 25.0], np.linspace(-1, 1, 397)])
    A = _sym(eigs, 3)
    r = lanczos(_op(A), 400, k=3, which="top", tol=1e-10)
    assert r.converged and r.n_iter < 80  # far fewer products than n = 400
    assert _rel(r.top[0], [100.0, 50.0, 25.0]) < 1e-10


def test_clustered_eigenvalues_are_resolved():
    # Distinct but 1e-6 apart: Lanczos separates them (residual test, not gap, decides convergence).
    eigs = np.concatenate([[5.0, 4.999999, 4.999998, 4.999997], np.linspace(-3, 3, 96)])
    A = _sym(eigs, 4)
    r = lanczos(_op(A), 100, k=4, which="top", tol=1e-12, max_iter=100)
    np.testing.assert_allclose(r.top[0], eigs[:4], rtol=1e-10)


def test_repeated_eigenvalues_keep_multiplicity_when_run_to_n():
    # A single Krylov space holds one eigenvector per distinct eigenvalue; the copies of a triple
    # eigenvalue come from the restarts after the space becomes invariant (β = 0), so they are all
    # found once the iteration is allowed to exhaust R^n (min_iter = n).
    eigs = np.concatenate([[5.0, 5.0, 5.0, 4.999999], np.linspace(-3, 3, 56)])
    A = _sym(eigs, 4)
    r = lanczos(_op(A), 60, k=4, which="top", min_iter=60, max_iter=60)
    np.testing.assert_allclose(r.top[0], [5.0, 5.0, 5.0, 4.999999], rtol=1e-12)
    # Stopping at the residual test instead still gets the distinct extreme value right.
    early = lanczos(_op(A), 60, k=1, which="top", tol=1e-10)
    assert early.top[0, 0] == pytest.approx(5.0, rel=1e-12)


def test_negative_definite_spectrum():
    eigs = -np.geomspace(1e-3, 1e3, 60)
    A = _sym(eigs, 5)
    r = lanczos(_op(A), 60, k=3, which="both", tol=1e-12, max_iter=60)
    np.testing.assert_allclose(r.top[0], np.sort(eigs)[::-1][:3], rtol=1e-8)
    np.testing.assert_allclose(r.bottom[0], np.sort(eigs)[:3], rtol=1e-10)


def test_identity_operator_restarts_on_invariant_subspace():
    # Every start vector is an eigenvector: β = 0 after one product; restarts must find k copies.
    r = lanczos(lambda V: 3.0 * V, 50, k=6, which="both")
    np.testing.assert_allclose(r.top[0], np.full(6, 3.0), rtol=1e-14)
    np.testing.assert_allclose(r.bottom[0], np.full(6, 3.0), rtol=1e-14)
    assert r.converged


def test_zero_operator():
    r = lanczos(lambda V: torch.zeros_like(V), 7, k=2, which="both")
    assert np.all(r.top == 0) and np.all(r.bottom == 0)


def test_batched_lockstep_equals_separate_runs():
    mats = [_sym(np.random.default_rng(s).standard_normal(40), s) for s in range(3)]
    stack = torch.from_numpy(np.stack(mats))  # (B, n, n)
    r = lanczos(lambda V: torch.einsum("bij,bj->bi", stack, V), 40, k=3, which="both", batch=3, tol=1e-11, max_iter=40)
    for b, A in enumerate(mats):
        exact = np.linalg.eigvalsh(A)
        assert _rel(r.top[b], exact[::-1][:3]) < 1e-8
        assert _rel(r.bottom[b], exact[:3]) < 1e-8


def test_reported_residuals_bound_true_error():
    A = _sym(np.linspace(-1, 1, 300) ** 3, 6)
    r = lanczos(_op(A), 300, k=2, which="top", max_iter=30, tol=1e-14)  # stopped early on purpose
    assert not r.converged
    exact = np.linalg.eigvalsh(A)[::-1][:2]
    # Kahan's bound: a Ritz value is within its residual of some eigenvalue of A.
    err = np.abs(r.top[0] - exact)
    assert np.all(err <= r.top_residuals[0] + 1e-12)


def test_deterministic_given_generator():
    A = _sym(np.random.default_rng(7).standard_normal(30), 7)
    r1 = lanczos(_op(A), 30, k=2, max_iter=10, generator=torch.Generator().manual_seed(3))
    r2 = lanczos(_op(A), 30, k=2, max_iter=10, generator=torch.Generator().manual_seed(3))
    np.testing.assert_array_equal(r1.top, r2.top)


def test_power_iteration_matches_eigh_and_is_slow_on_a_small_gap():
    A = _sym(np.concatenate([[2.0, -1.0], np.linspace(-0.5, 0.5, 48)]), 8)
    p = power_iteration(_op(A), 50, tol=1e-13, max_iter=2000)
    assert p.converged and abs(p.eigenvalue[0] - 2.0) < 1e-10
    # Gap 1 − 0.999: power iteration is nowhere near after 100 products, Lanczos is exact in < 60.
    B = _sym(np.concatenate([[1.0, 0.999], np.linspace(0, 0.5, 198)]), 9)
    slow = power_iteration(_op(B), 200, tol=1e-12, max_iter=100)
    assert not slow.converged
    fast = lanczos(_op(B), 200, k=1, tol=1e-10)
    assert fast.converged and fast.n_iter <= 60 and abs(fast.top[0, 0] - 1.0) < 1e-10


def test_hutchinson_exact_on_diagonal_and_unbiased_on_dense():
    d = torch.arange(1.0, 11.0, dtype=torch.float64)
    est = hutchinson_trace(lambda Z: (Z * Z * d).sum(1), 10, n_probes=5)
    assert est.value[0] == pytest.approx(55.0, abs=1e-12) and est.stderr[0] == 0.0
    A = _sym(np.random.default_rng(10).standard_normal(30), 10)
    At = torch.from_numpy(A)
    est = hutchinson_trace(lambda Z: ((Z @ At) * Z).sum(1), 30, n_probes=400)
    assert abs(est.value[0] - np.trace(A)) < 4 * est.stderr[0]
    # The standard error estimates the true one: Var(zᵀAz) = 2 Σ_{i≠j} A_ij² for Rademacher z.
    true_se = np.sqrt(2 * (np.sum(A**2) - np.sum(np.diag(A) ** 2)) / 400)
    assert est.stderr[0] == pytest.approx(true_se, rel=0.2)


def test_bad_arguments_raise_config_error():
    op = lambda V: V
    with pytest.raises(ConfigError, match="k=5"):
        lanczos(op, 4, k=5)
    with pytest.raises(ConfigError, match="which"):
        lanczos(op, 4, k=1, which="middle")
    with pytest.raises(ConfigError, match="shape"):
        lanczos(lambda V: V[:, :2], 4, k=1)
    with pytest.raises(ConfigError, match="n_probes"):
        hutchinson_trace(lambda Z: Z.sum(1), 4, n_probes=1)
    with pytest.raises(ConfigError, match="max_iter"):
        lanczos(op, 40, k=5, max_iter=3)


# ---- block Lanczos ---------------------------------------------------------------------------


@pytest.mark.parametrize("block", [1, 3, 8])
def test_block_lanczos_matches_eigh(block):
    rng = np.random.default_rng(20 + block)
    M = rng.standard_normal((150, 150))
    A = (M + M.T) / 2
    At = torch.from_numpy(A)
    exact = np.linalg.eigvalsh(A)
    r = block_lanczos(lambda V: V @ At, 150, k=4, which="both", block=block, tol=1e-10, max_iter=150)
    assert r.converged
    assert _rel(r.top[0], exact[::-1][:4]) < 1e-8
    assert _rel(r.bottom[0], exact[:4]) < 1e-8


def test_block_lanczos_finds_multiplicity_up_to_block_size():
    # Unlike single-vector Lanczos, a block of 4 sees a triple eigenvalue's whole eigenspace.
    eigs = np.concatenate([[5.0, 5.0, 5.0, 4.5], np.linspace(-3, 3, 196)])
    At = torch.from_numpy(_sym(eigs, 21))
    r = block_lanczos(lambda V: V @ At, 200, k=4, block=4, tol=1e-10, max_iter=200)
    assert r.converged and r.n_iter < 200
    np.testing.assert_allclose(r.top[0], [5.0, 5.0, 5.0, 4.5], rtol=1e-9)


def test_block_lanczos_identity_small_n_and_batch():
    r = block_lanczos(lambda V: 2.0 * V, 10, k=10, which="both", block=4)
    np.testing.assert_allclose(r.top[0], np.full(10, 2.0), rtol=1e-14)
    assert r.n_iter == 10
    mats = np.stack([_sym(np.random.default_rng(s).standard_normal(30), s) for s in range(3)])
    stack = torch.from_numpy(mats)
    r = block_lanczos(lambda V: torch.einsum("bij,bkj->bki", stack, V), 30, k=3, which="both", block=3, batch=3,
                      tol=1e-11, max_iter=30)
    for b in range(3):
        exact = np.linalg.eigvalsh(mats[b])
        assert _rel(r.top[b], exact[::-1][:3]) < 1e-8 and _rel(r.bottom[b], exact[:3]) < 1e-8


def test_block_lanczos_residuals_are_true_residual_norms():
    A = _sym(np.linspace(-1, 1, 200) ** 3, 22)
    At = torch.from_numpy(A)
    r = block_lanczos(lambda V: V @ At, 200, k=2, block=2, max_iter=12, tol=1e-14)
    assert not r.converged
    err = np.abs(r.top[0] - np.linalg.eigvalsh(A)[::-1][:2])
    assert np.all(err <= r.top_residuals[0] + 1e-12)  # Kahan's bound


@pytest.mark.parametrize("solver", ["lanczos", "block"])
def test_each_batch_row_is_judged_on_its_own_scale(solver):
    # Row 1 is row 0 times 1e-9 (a vanishing Jacobian next to a healthy one): both must come out
    # relative-accurate, not "converged" on the big row's scale.
    A = _sym(np.concatenate([[3.0, 2.9], np.linspace(0, 1, 58)]), 23)
    stack = torch.from_numpy(np.stack([A, 1e-9 * A]))
    exact = np.linalg.eigvalsh(A)[::-1][:2]
    if solver == "lanczos":
        r = lanczos(lambda V: torch.einsum("bij,bj->bi", stack, V), 60, k=2, batch=2, tol=1e-10)
    else:
        r = block_lanczos(lambda V: torch.einsum("bij,bkj->bki", stack, V), 60, k=2, batch=2, block=2, tol=1e-10)
    assert r.converged
    np.testing.assert_allclose(r.top[0], exact, rtol=1e-9)
    np.testing.assert_allclose(r.top[1], 1e-9 * exact, rtol=1e-9)


# ---- block Krylov SVD ------------------------------------------------------------------------


def _rect(svals: np.ndarray, n_out: int, n_in: int, seed: int) -> np.ndarray:
    """``n_out × n_in`` matrix with the given singular values in Haar-random bases."""
    rng = np.random.default_rng(seed)
    qu, _ = np.linalg.qr(rng.standard_normal((n_out, n_out)))
    qv, _ = np.linalg.qr(rng.standard_normal((n_in, n_in)))
    r = len(svals)
    return (qu[:, :r] * svals) @ qv[:, :r].T


def _jops(J: np.ndarray):
    Jt = torch.from_numpy(J)
    return (lambda V: V @ Jt.T), (lambda U: U @ Jt)  # V (B, b, n_in) -> J v per row; U -> Jᵀ u per row


def _svd_cases():
    rng = np.random.default_rng(40)
    # A spectrum decaying like a deep net's (σ_i ≈ 5·0.97^i, jittered): gaps of a few per cent at the top.
    decay = np.sort(5.0 * 0.97 ** np.arange(150) * rng.uniform(0.95, 1.05, 150))[::-1]
    cluster = decay.copy()
    cluster[:4] = 5.0 * (1 - np.array([0.0, 1e-4, 2e-4, 3e-4]))  # four top values 1e-4 apart
    repeated = decay.copy()
    repeated[:3] = 5.0  # an exactly triple top singular value
    return {
        "tall": _rect(decay, 180, 150, 0),
        "wide": _rect(decay[:120], 120, 200, 1),
        "clustered": _rect(cluster, 150, 150, 2),
        "repeated": _rect(repeated, 150, 150, 3),
        "rank_deficient": _rect(decay[:5], 150, 150, 4),  # only 5 non-zero σ: k = 6 includes a zero
    }


@pytest.mark.parametrize("name", list(_svd_cases()))
def test_block_krylov_svd_matches_dense_svd(name):
    J = _svd_cases()[name]
    dense = np.linalg.svd(J, compute_uv=False)[:6]
    fwd, adj = _jops(J)
    r = block_krylov_svd(fwd, adj, J.shape[1], k=6, block=8, tol=1e-10)
    assert r.converged and r.values.shape == (1, 6)
    assert r.n_iter < J.shape[1]  # stopped by the error estimate, not by filling R^n (that would be exact anyway)
    # Stopping at an estimated relative error 1e-10 ⇒ 1e-8 relative (two digits of slack); a zero σ
    # is only known to √eps·σ_max (the Rayleigh quotient sees σ²), hence the absolute floor.
    assert np.all(np.abs(r.values[0] - dense) <= 1e-8 * dense + 1.5e-7 * dense[0])
    # The error estimates the solver stopped on meet the tolerance it was given.
    zero = r.values <= 1.5e-7 * r.values[:, :1]  # numerically zero σ: judged on the absolute level 10√eps·σ₁
    assert np.all(np.where(zero, r.error_bounds <= 1.5e-7 * r.values[:, :1], r.error_bounds <= 1e-10 * r.values))
    assert zero.sum() == (name == "rank_deficient")


def test_block_krylov_error_bounds_bound_the_true_error_before_convergence():
    J = _svd_cases()["tall"]
    dense = np.linalg.svd(J, compute_uv=False)[:4]
    fwd, adj = _jops(J)
    for steps in (2, 3, 4, 5):  # stopped early by max_iter: bounds must still cover the actual error
        r = block_krylov_svd(fwd, adj, 150, k=4, block=6, tol=1e-14, max_iter=6 * steps)
        assert not r.converged and r.n_blocks == steps
        assert np.all(np.abs(r.values[0] - dense) <= r.error_bounds[0] * (1 + 1e-6) + 1e-12)
        assert np.all(r.values[0] <= dense * (1 + 1e-12))  # Ritz values are lower bounds (interlacing)


def test_block_krylov_wrong_adjoint_never_converges():
    # An adjoint that is not Jᵀ (here: Jᵀ of a slightly different matrix) leaves residuals of the size
    # of the error, so the solver must refuse to report convergence instead of returning wrong values.
    J = _svd_cases()["tall"]
    wrong = J.copy()
    wrong[0, :] *= 1.01
    fwd, _ = _jops(J)
    _, bad_adj = _jops(wrong)
    r = block_krylov_svd(fwd, bad_adj, 150, k=4, block=8, tol=1e-8, max_iter=96)
    assert not r.converged
    assert np.max(r.error_bounds / r.values) > 1e-8
    good = block_krylov_svd(fwd, _jops(J)[1], 150, k=4, block=8, tol=1e-8, max_iter=96)
    assert good.converged  # same budget, right adjoint: fine


def test_block_krylov_batch_rows_are_independent_and_deterministic():
    Js = [_svd_cases()["tall"], 3.0 * _svd_cases()["tall"][::-1].copy()]
    stack = torch.from_numpy(np.stack(Js))  # (2, 180, 150)
    fwd = lambda V: torch.einsum("boi,bki->bko", stack, V)
    adj = lambda U: torch.einsum("boi,bko->bki", stack, U)
    r = block_krylov_svd(fwd, adj, 150, k=3, block=6, batch=2, tol=1e-10)
    for b in range(2):
        np.testing.assert_allclose(r.values[b], np.linalg.svd(Js[b], compute_uv=False)[:3], rtol=1e-8)
    again = block_krylov_svd(fwd, adj, 150, k=3, block=6, batch=2, tol=1e-10)
    np.testing.assert_array_equal(r.values, again.values)


def test_block_krylov_small_space_and_bad_arguments():
    J = np.diag([4.0, 2.0, 1.0])
    fwd, adj = _jops(J)
    r = block_krylov_svd(fwd, adj, 3, k=3, block=2)  # second block only fills what is left of R³
    np.testing.assert_allclose(r.values[0], [4.0, 2.0, 1.0], rtol=1e-13)
    assert r.converged and r.n_iter == 3
    with pytest.raises(ConfigError, match="k=4"):
        block_krylov_svd(fwd, adj, 3, k=4)
    with pytest.raises(ConfigError, match="block"):
        block_krylov_svd(fwd, adj, 3, k=1, block=0)
    with pytest.raises(ConfigError, match="forward returned"):
        block_krylov_svd(lambda V: V[:, :, :2].reshape(-1), adj, 3, k=1)
    with pytest.raises(ConfigError, match="adjoint returned"):
        block_krylov_svd(fwd, lambda U: U[:, :, :2], 3, k=1)
