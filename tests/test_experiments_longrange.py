"""Long-range remedies (adding, copying): smoke profile, and the probe's horizon ordering the remedies at init."""
import pytest
import torch

from gradprobe.experiments.longrange import LongRange, LongRangePoint, baseline_loss, train_long_range
from gradprobe.experiments.sweep import run_sweep
from gradprobe.experiments.store import Store
from gradprobe.experiments.tasks import Copying

pytestmark = pytest.mark.usefixtures("one_thread")


def test_baselines_are_the_memoryless_losses():
    assert baseline_loss("adding_arjovsky", 100) == pytest.approx(1 / 6)
    assert baseline_loss("copying", 50) == pytest.approx(10 * torch.log(torch.tensor(8.0)).item() / 70)
    assert Copying.baseline(50) == baseline_loss("copying", 50)


def test_forget_bias_and_identity_init_lengthen_the_horizon_at_init():
    """Gers et al. 2000 / Le et al. 2015: a forget bias of 1 and an identity recurrence make the gradient
    decay slower going back in time than a forget bias of 0 and a random tanh recurrence (T = 60, no training)."""
    rates = {}
    for cell in ("tanh", "irnn", "lstm", "lstm_fb1"):
        res, _, _ = train_long_range(LongRangePoint("adding_arjovsky", 60, cell, steps=0), seed=0)
        rates[cell] = res["decay_rate_init"]
    assert rates["lstm_fb1"] > rates["lstm"] and rates["irnn"] > rates["tanh"]
    assert abs(rates["irnn"]) < 0.1 < abs(rates["tanh"])


def test_smoke_profile_runs_and_reports(tmp_path):
    status = run_sweep(LongRange(), "smoke", tmp_path / "s.sqlite")
    assert status.failed == 0 and status.done == status.total == 12 and status.duplicates == 0
    with Store(tmp_path / "s.sqlite") as store:
        rep = LongRange().report(store.runs(status="done"), store, tmp_path)
    assert sum(line.startswith("| copying") for line in rep.lines) == 6
    assert all(f.exists() for f in rep.figures)
