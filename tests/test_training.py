"""The one training loop: every step equals a hand-written loop (the oracle), under a probe that leaves
the model as it found it."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradprobe.errors import ConfigError
from gradprobe.remedies import PascanuRegularizer, TrainingChange, clip_grad_norm_
from gradprobe.training import call_model, evaluate, train
from reference.models import LastStepReadout

G = torch.Generator().manual_seed(0)
X, Y = torch.randn(8, 5, generator=G), torch.randint(0, 3, (8,), generator=G)


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 7), nn.Tanh(), nn.Linear(7, 3))


def batches(s):
    i = torch.arange(s, s + 4) % 8
    return X[i], Y[i]


def hand_loop(model, steps, lr, *, update_last=True, clip=None, momentum=0.0):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    losses = []
    for s in range(steps):
        x, y = batches(s)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        losses.append(loss.item())
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        if update_last or s < steps - 1:
            opt.step()
    return losses


@pytest.mark.parametrize("update_last", [True, False])
def test_train_equals_a_hand_written_loop(update_last):
    a, b = net(), net()
    run = train(a, batches, F.cross_entropy, steps=6, lr=0.3, update_last=update_last)
    want = hand_loop(b, 6, 0.3, update_last=update_last)
    np.testing.assert_array_equal(run.losses, want)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    assert len(run.trace) == 6 and run.first is run.trace[0] and run.last is run.trace.last
    assert run.facts.saturating == ("Tanh",)


def test_training_change_equals_the_hand_written_change():
    a, b = net(), net()
    run = train(a, batches, F.cross_entropy, steps=5, lr=1.0,
                change=TrainingChange(lr_scale=0.5, clip_norm=0.1, optimizer="momentum"))
    np.testing.assert_allclose(run.losses, hand_loop(b, 5, 0.5, clip=0.1, momentum=0.9), rtol=1e-6)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


def test_omega_is_added_after_the_probe_and_before_clipping_as_pascanu_code_does():
    class Net(LastStepReadout):
        def __init__(self):
            torch.manual_seed(1)
            super().__init__(nn.RNN, 2, 5)

    x, y = torch.randn(12, 3, 2, generator=G), torch.randn(3, 1, generator=G)
    a, b = Net(), Net()
    run = train(a, lambda s: (x, y), F.mse_loss, steps=3, lr=0.5, change=TrainingChange(clip_norm=0.5, omega=2.0))
    opt = torch.optim.SGD(b.parameters(), lr=0.5)
    reg = PascanuRegularizer(b)
    grads_seen = []
    for _ in range(3):
        opt.zero_grad()
        loss = F.mse_loss(b(x), y)
        loss.backward()
        grads_seen.append(float(torch.cat([q.grad.flatten() for q in b.rnn.parameters()]).norm()))
        (2.0 * reg.penalty()).backward()
        clip_grad_norm_(b.parameters(), 0.5)
        opt.step()
    reg.close()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
    # the probe recorded the task loss's gradient, before Ω and clipping
    i = run.trace[0].names.index("rnn")
    np.testing.assert_allclose([f.grad_norm[i] for f in run.trace], grads_seen, rtol=1e-5)
    assert not a.rnn._forward_hooks and not a.rnn._forward_pre_hooks  # Ω and the probe removed their hooks


def test_on_step_sees_every_step_and_diagnoses_it():
    views = []
    run = train(net(), batches, F.cross_entropy, steps=4, lr=0.1, probe={"every": 2},
                on_step=lambda v: views.append((v.step, v.flow is not None, v.last, v.loss)))
    assert [v[:3] for v in views] == [(0, True, False), (1, False, False), (2, True, False), (3, False, True)]
    np.testing.assert_array_equal([v[3] for v in views], run.losses)
    got = []

    def diagnose_in_callback(v):  # the probe is open only during training
        if v.flow is None:
            with pytest.raises(ConfigError, match="not recorded"):
                v.diagnose()
        else:
            got.append(v.diagnose())

    run = train(net(), batches, F.cross_entropy, steps=2, probe={"every": 2}, on_step=diagnose_in_callback)
    assert len(got) == 1 and got[0].kinds == run.diagnose(run.first).kinds


def test_the_model_is_left_as_it_was_apart_from_training():
    model = net().eval()
    before = copy.deepcopy(model)
    train(model, batches, F.cross_entropy, steps=1, lr=0.0)
    assert not model.training  # train() leaves the mode to the caller
    for m, n in zip(model.modules(), before.modules()):
        assert not m._forward_hooks and not m._forward_pre_hooks and type(m) is type(n)
    for p, q in zip(model.parameters(), before.parameters()):
        assert torch.equal(p, q)


def test_bad_arguments_are_config_errors():
    with pytest.raises(ConfigError, match="scalar"):
        train(net(), batches, lambda out, y: out, steps=1)
    with pytest.raises(ConfigError, match="steps=0"):
        train(net(), batches, F.cross_entropy, steps=0)
    m = net()
    with pytest.raises(ConfigError, match="either an optimizer"):
        train(m, batches, F.cross_entropy, steps=1, optimizer=torch.optim.SGD(m.parameters(), lr=0.1),
              change=TrainingChange(lr_scale=0.1))


def test_evaluate_is_a_no_grad_eval_mode_loss():
    model = nn.Sequential(nn.Linear(5, 3), nn.Dropout(0.9))
    loss = evaluate(model, (X, Y), F.cross_entropy)
    assert model.training  # restored
    with torch.no_grad():
        assert loss == pytest.approx(F.cross_entropy(model.eval()(X), Y).item())
    assert call_model(lambda a, b: a + b, (1, 2)) == 3 and call_model(lambda *, a: a, {"a": 4}) == 4
