"""Equal-budget remedy trials: same seed and data; the measured effect is the remedy's alone."""
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gradprobe.cli import main
from gradprobe.diagnosis.remedies import CATALOGUE
from gradprobe.experiments.trials import Treatment, run_trials, treatment_for

G = torch.Generator().manual_seed(0)
X = torch.randn(128, 32, generator=G)
Y = (X @ torch.randn(32, 10, generator=G)).argmax(1)  # a learnable labelling


def build():
    return nn.Sequential(*[m for _ in range(10) for m in (nn.Linear(32, 32), nn.Sigmoid())], nn.Linear(32, 10))


def batches(step):
    i = torch.arange(step * 32, step * 32 + 32) % 128
    return X[i], Y[i]


def test_identity_treatment_reproduces_baseline_exactly():
    res = run_trials(build, batches, F.cross_entropy, [Treatment("same", "identity", transform=lambda m: m)], steps=20)
    assert np.array_equal(res[0].losses, res[1].losses)
    assert res[0].ratio_end == res[1].ratio_end


def test_relu_remedy_fixes_vanishing_and_lowers_loss():
    res = run_trials(build, batches, F.cross_entropy,
                     [treatment_for(CATALOGUE["relu_activation"]), treatment_for(CATALOGUE["residual"])],
                     steps=60, lr=0.1)
    base, relu, resid = res
    assert base.verdict_init == "vanishing" and base.ratio_init < 1e-6
    assert relu.verdict_init == "healthy" and 0.1 < relu.ratio_init < 10
    assert relu.loss_end < 0.7 * base.loss_end
    assert resid.ok and resid.ratio_init > 1e3 * base.ratio_init  # skip paths carry the signal


class FlatMLP(nn.Module):
    """Linear layers held as attributes, not inside an nn.Sequential: insert_normalization cannot reach them
    (gradprobe's DeepMLP keeps its blocks in nn.Sequentials, so the transforms do apply to it)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(32, 32), nn.Linear(32, 10)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def test_treatment_that_cannot_apply_is_reported_not_raised():
    res = run_trials(FlatMLP, batches, F.cross_entropy, [treatment_for(CATALOGUE["normalization"])], steps=2)
    assert not res[1].ok and "normalise" in res[1].error
    assert treatment_for(CATALOGUE["pretraining"]) is None


def test_doctor_try_remedies_prints_measured_trials(capsys):
    code = main(["doctor", "gradprobe.models:DeepMLP", "-k", "in_features=32", "-k", "out_features=10", "-k", "depth=8",
                 "-k", "width=32", "-k", "activation=sigmoid", "-k", "init=standard", "--input", "64,32",
                 "--loss", "cross_entropy", "--lr", "0.1", "--try-remedies", "--trials", "2", "--trial-steps", "40"])
    out = capsys.readouterr().out
    assert code == 1
    assert "== remedy trials: 40 steps each" in out
    assert "\nbaseline " in out and "\nrelu_activation " in out
    assert "best: relu_activation" in out
