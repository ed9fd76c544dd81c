"""Equal-budget remedy trials: same seed and data; the measured effect is the remedy's alone."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradprobe.cli import main
from gradprobe.experiments.trials import BASELINE, rank_trials, run_trials, trialable
from gradprobe.remedies import CATALOGUE, Call, Remedy, TrainingChange
from gradprobe.remedies.catalogue import MODEL
from reference.models import LastStepReadout

G = torch.Generator().manual_seed(0)
X = torch.randn(128, 32, generator=G)
Y = (X @ torch.randn(32, 10, generator=G)).argmax(1)  # a learnable labelling


def build():
    return nn.Sequential(*[m for _ in range(10) for m in (nn.Linear(32, 32), nn.Sigmoid())], nn.Linear(32, 10))


def batches(step):
    i = torch.arange(step * 32, step * 32 + 32) % 128
    return X[i], Y[i]


def test_identity_remedy_reproduces_baseline_exactly():
    same = Remedy("same", "identity", "", calls=(Call(lambda m: m, (MODEL,)),))
    res = run_trials(build, batches, F.cross_entropy, [same], steps=20)
    assert res[0].remedy is BASELINE
    assert np.array_equal(res[0].losses, res[1].losses)
    assert res[0].ratio_end == res[1].ratio_end


def test_relu_remedy_fixes_vanishing_and_lowers_loss():
    res = run_trials(build, batches, F.cross_entropy, [CATALOGUE["relu_activation"], CATALOGUE["residual"]],
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


def test_remedy_that_cannot_apply_is_reported_not_raised():
    res = run_trials(FlatMLP, batches, F.cross_entropy,
                     [CATALOGUE["normalization"], CATALOGUE["pascanu_omega"]], steps=2)
    assert not res[1].ok and "normalise" in res[1].error
    assert not res[2].ok and "nn.RNN" in res[2].error
    assert trialable([CATALOGUE["pretraining"], CATALOGUE["clip_norm"], CATALOGUE["clip_norm"]]) == [CATALOGUE["clip_norm"]]


def test_training_change_is_applied_like_a_hand_written_loop():
    """Oracle: clipping at 0.05 and lr × 0.1 written out by hand, with torch's own clip_grad_norm_."""
    remedy = Remedy("r", "t", "", training=TrainingChange(lr_scale=0.1, clip_norm=0.05))
    res = run_trials(build, batches, F.cross_entropy, [remedy], steps=5, lr=0.5, seed=1)
    torch.manual_seed(1)
    net = build()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    losses = []
    for s in range(5):
        x, y = batches(s)
        opt.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 0.05)
        opt.step()
        losses.append(loss.item())
    np.testing.assert_allclose(res[1].losses, losses, rtol=1e-6)


def test_ranking_puts_restored_flow_before_a_lower_loss():
    """The held-out loss only breaks ties between equally restored flows."""
    base = run_trials(build, batches, F.cross_entropy, [CATALOGUE["relu_activation"], CATALOGUE["he_init"]],
                      steps=30, lr=0.1, held_out=(X[:64] + 0.1, Y[:64]))
    _, relu, he = base
    assert relu.restored and not he.restored and he.verdict_end == "vanishing"
    assert np.isfinite(relu.held_out_loss) and np.isfinite(he.held_out_loss)
    assert [r.remedy.id for r in rank_trials(base)][0] == "relu_activation"
    # same severity: the lower held-out loss wins, whatever the order given
    he.severity_end = relu.severity_end
    best = min((relu, he), key=lambda r: r.held_out_loss)
    assert rank_trials([base[0], he, relu])[0] is best


def test_omega_and_clipping_train_a_vanilla_rnn_through_time():
    class Net(LastStepReadout):
        def __init__(self):
            super().__init__(nn.RNN, 2, 8)

    x, y = torch.randn(30, 4, 2, generator=G), torch.randn(4, 1, generator=G)
    res = run_trials(Net, lambda s: (x, y), F.mse_loss, [CATALOGUE["pascanu_omega"], CATALOGUE["gated_cells"]],
                     steps=3, probe={"temporal": True})
    assert all(r.ok for r in res), [r.error for r in res]
    assert not np.array_equal(res[0].losses, res[1].losses)  # Ω and clipping changed the updates
    assert res[1].diagnosis_end.primary.kind in {"healthy", "vanishing_in_time", "exploding_in_time"}


def test_time_ratio_equals_a_hand_unrolled_bptt_profile():
    """Oracle: the same nn.RNN weights unrolled by hand with nn.RNNCell; ‖∂E/∂h_k‖ for every k from autograd
    on the retained states, E read at the last step. The trial's time ratio is farthest/peak of that profile."""
    torch.manual_seed(0)
    rnn = nn.RNN(3, 6)
    x = torch.randn(25, 2, 3, generator=G)

    class Last(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = rnn

        def forward(self, x):
            return self.rnn(x)[0][-1]

    res = run_trials(Last, lambda s: (x, None), lambda out, _: out.pow(2).mean(), [], steps=1,
                     probe={"temporal": True})
    cell = nn.RNNCell(3, 6)
    with torch.no_grad():
        for a, b in (("weight_ih", "weight_ih_l0"), ("weight_hh", "weight_hh_l0"), ("bias_ih", "bias_ih_l0"),
                     ("bias_hh", "bias_hh_l0")):
            getattr(cell, a).copy_(getattr(rnn, b))
    h, hs = torch.zeros(2, 6), []
    for t in range(25):
        h = cell(x[t], h)
        h.retain_grad()
        hs.append(h)
    h.pow(2).mean().backward()
    profile = np.array([float(s.grad.norm()) for s in hs])[::-1]  # steps back from the end
    assert res[0].time_ratio_init == pytest.approx(profile[-1] / profile.max(), rel=1e-4)


def test_deprecated_names_still_work_and_warn():
    from gradprobe.experiments import trials

    with pytest.warns(DeprecationWarning):
        t = trials.Treatment("same", "identity", transform=lambda m: m)
    with pytest.warns(DeprecationWarning):
        assert trials.treatment_for(CATALOGUE["pretraining"]) is None
    with pytest.warns(DeprecationWarning):
        assert "clip_norm" in trials.TREATABLE
    res = run_trials(build, batches, F.cross_entropy, [t], steps=3)
    with pytest.warns(DeprecationWarning):
        assert res[1].treatment is t


def test_doctor_try_remedies_prints_measured_trials(capsys):
    code = main(["doctor", "gradprobe.models:DeepMLP", "-k", "in_features=32", "-k", "out_features=10", "-k", "depth=8",
                 "-k", "width=32", "-k", "activation=sigmoid", "-k", "init=standard", "--input", "64,32",
                 "--loss", "cross_entropy", "--lr", "0.1", "--try-remedies", "--trials", "2", "--trial-steps", "40"])
    out = capsys.readouterr().out
    assert code == 1
    assert "== remedy trials: 40 steps each" in out
    assert "\nbaseline " in out and "\nrelu_activation " in out
    assert "best: relu_activation" in out
