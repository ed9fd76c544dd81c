"""Feed-forward depth experiments (Glorot 2010, He 2015, Schoenholz 2017) on digits: smoke profiles and oracles."""
import math

import numpy as np
import pytest
import torch

from gradprobe.experiments.feedforward import Glorot2010, He2015, MLPPoint, Schoenholz2017, mean_field_profile, train_mlp, xi_c
from gradprobe.experiments.sweep import run_sweep
from gradprobe.experiments.store import Store
from gradprobe.theory import mean_field

pytestmark = pytest.mark.usefixtures("one_thread")  # small products: one thread, as in training


def test_mean_field_profile_matches_the_fixed_point_theory_at_the_fixed_point():
    """Started at q*, the layer-wise recursion is the fixed-point one: every layer contributes ln χ₁."""
    mf = mean_field("tanh", 2.0, 0.05)
    prof = mean_field_profile("tanh", 2.0, mf.q_star, 6, sigma_b2=0.05)
    np.testing.assert_allclose(np.diff(prof), -math.log(mf.chi1), rtol=1e-8)
    relu = mean_field_profile("relu", 1.0, 0.7, 30)  # ReLU with Xavier on square layers: χ = 1/2 exactly
    assert relu[0] == pytest.approx(29 * math.log(0.5), rel=1e-9)


def test_he_xavier_relu_gradient_ratio_at_init_matches_theory():
    res, _, arrays = train_mlp(MLPPoint("relu", "xavier", 30, width=256, steps=0), seed=0)
    measured_norm_ratio = math.exp(0.5 * res["grad_log_ratio_first"])
    theory = 0.5 ** (29 / 2)  # (σ_w²/2)^((D−1)/2) with σ_w² = 1
    # finite width: s.d. of the log squared ratio ≈ √(1.25·29·(3r−1)/N), r = 2 → ≈ 0.84 at N = 256
    assert abs(math.log(measured_norm_ratio / theory) * 2) < 3 * math.sqrt(1.25 * 29 * 5 / 256)
    he, _, _ = train_mlp(MLPPoint("relu", "he", 30, width=256, steps=0), seed=0)
    assert abs(he["grad_log_ratio_first"]) < 3 * math.sqrt(1.25 * 29 * 5 / 256)


def test_glorot_standard_init_shrinks_gradients_towards_the_input_xavier_does_not():
    std, _, _ = train_mlp(MLPPoint("tanh", "standard", 5, width=200, steps=0), seed=1)
    xav, _, _ = train_mlp(MLPPoint("tanh", "xavier", 5, width=200, steps=0), seed=1)
    assert std["grad_log_ratio_first"] < -3 and abs(xav["grad_log_ratio_first"]) < 1.5
    for r in (std, xav):  # measured beside layer-wise mean field: within the finite-width spread
        assert abs(r["grad_log_ratio_first"] - r["grad_log_ratio_predicted"]) < 0.6


@pytest.mark.parametrize("exp", [Glorot2010, He2015, Schoenholz2017])
def test_smoke_profile_runs_and_reports(exp, tmp_path):
    status = run_sweep(exp(), "smoke", tmp_path / "s.sqlite")
    assert status.failed == 0 and status.done == status.total > 0 and status.duplicates == 0
    with Store(tmp_path / "s.sqlite") as store:
        runs = store.runs(status="done")
        rep = exp().report(runs, store, tmp_path)
        assert any(line.startswith("|") for line in rep.lines)
        assert rep.figures and all(f.exists() for f in rep.figures)
        steps, vals = store.metrics(runs[0].key)["train_loss"]
        assert len(steps) >= 1 and np.isfinite(vals).all()


def test_xi_c_diverges_at_the_critical_line():
    assert xi_c(1.0) < xi_c(1.5) < xi_c(1.7)
    assert xi_c(4.0) < xi_c(2.5) < xi_c(1.9)


def test_gradient_ratio_is_recorded_at_every_evaluation():
    """The probe runs on a fixed schedule: every evaluation over training has ‖∂L/∂h¹‖/‖∂L/∂hᴰ‖ (a budgeted
    schedule would thin the signal recorder out after its warm-up and leave NaN)."""
    _, metrics, _ = train_mlp(MLPPoint("tanh", "xavier", 3, width=16, steps=24, eval_every=2), seed=0)
    ratios = [v for _, name, v in metrics if name == "grad_ratio"]
    assert len(ratios) == 12
    assert all(math.isfinite(r) and r > 0 for r in ratios)
