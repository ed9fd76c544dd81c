"""``SpikeWatch(confirm="loss")``: only a spike the loss follows (or a non-finite one) is an alarm (issue 12,
false alarms on a converged AdamW transformer). The injected spikes of ``test_spikes.py`` again, guarded
with ``on_spike="skip"``: a corrupted batch and a learning-rate jump move the loss, so they are alarms at
the same step as with the default rule and their update is skipped; a layer whose backward blows up
without moving the loss is still found at its step and named, as an unconfirmed event the guard lets
through. The healthy transformer itself (3000 steps) is in ``test_spikes.py`` (slow)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gradprobe import Probe
from gradprobe.errors import ConfigError
from gradprobe.probe import SpikeWatch
from tests.test_spikes import Poisoner, TinyTransformer, _tokens, adding_lstm, mlp, regression

CASES = [("mlp", "scaled_batch"), ("mlp", "poisoned_layer"), ("mlp", "nan_layer"), ("mlp", "lr_jump"),
         ("lstm", "scaled_batch"), ("lstm", "poisoned_layer"), ("lstm", "lr_jump"),
         ("transformer", "scaled_batch"), ("transformer", "poisoned_layer"), ("transformer", "lr_jump")]
LAYER = {"mlp": "blocks.0.linear", "lstm": "core", "transformer": "enc.layers.1.linear1"}


def _setup(model, injection, at):
    """(net, opt, loss_of(t), before(t)) with the injection of test_spikes.py at step ``at``."""
    if model == "mlp":
        net = mlp(depth=3)
        opt = torch.optim.SGD(net.parameters(), lr=0.01)
        poison = Poisoner(net.blocks[1].linear if injection == "nan_layer" else net.blocks[0].linear,
                          math.nan if injection == "nan_layer" else 1e4)
        base = regression(net, scale_at={at} if injection == "scaled_batch" else ())
        loss_of, lr0, lr1 = base, 0.01, 3.0
    elif model == "lstm":
        task, net, g = adding_lstm()
        opt = torch.optim.SGD(net.parameters(), lr=0.1) if injection == "lr_jump" else torch.optim.Adam(net.parameters(), lr=1e-2)
        poison = Poisoner(net.core, 1e4)
        lr0, lr1 = opt.param_groups[0]["lr"], 30.0

        def loss_of(t):
            b = task.generate(16, 20, g)
            return task.loss(net(b.x), b.y * 100.0 if (injection == "scaled_batch" and t == at) else b.y)
    else:
        torch.manual_seed(0)
        net = TinyTransformer()
        opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
        poison = Poisoner(net.enc.layers[1].linear1, 1e4)
        g = torch.Generator().manual_seed(1)
        lr0, lr1 = 3e-3, 3.0

        def loss_of(t):
            x, y = _tokens(g)
            loss = F.cross_entropy(net(x).reshape(-1, 12), y.reshape(-1))
            return loss * 1000.0 if (injection == "scaled_batch" and t == at) else loss

    def before(t):
        poison.armed = injection in ("poisoned_layer", "nan_layer") and t == at
        opt.param_groups[0]["lr"] = lr1 if (injection == "lr_jump" and t == at) else lr0

    return net, opt, loss_of, before


@pytest.mark.parametrize("model,injection", CASES, ids=[f"{m}-{i}" for m, i in CASES])
def test_injected_spikes_with_loss_confirmation(model, injection):
    at = 80
    net, opt, loss_of, before = _setup(model, injection, at)
    skipped = []
    with Probe(net, spikes=SpikeWatch(confirm="loss"), on_spike="skip", hooks=False) as probe:
        for t in range(at + 20):
            before(t)
            opt.zero_grad(set_to_none=True)
            loss = loss_of(t)
            loss.backward()
            probe.step(loss)
            if probe.skipped:
                skipped.append(t)
            opt.step()
        log = probe.spike_log()
    first = log.events[0]
    step = at + 1 if injection == "lr_jump" else at  # a bad update shows in the next gradient
    assert first.step == step
    if injection == "poisoned_layer":  # the loss has not moved: found, named, not acted on
        assert not first.confirmed and first.action == "recorded" and not first.loss.spiked
        assert first.first_layer == LAYER[model]
        assert step not in skipped
    else:
        assert first.confirmed and first.action == "skipped" and skipped[0] == step
        assert first.kind == ("non_finite" if injection == "nan_layer" else "jump")
        if injection == "nan_layer":
            assert first.first_layer == "blocks.1.linear"
    assert all(e.action == "skipped" for e in log.alarms) and len(skipped) == sum(e.skipped_steps for e in log.alarms)


def test_confirm_needs_the_loss():
    with pytest.raises(ConfigError, match="confirm"):
        SpikeWatch(confirm="grad")
    with pytest.raises(ConfigError, match="loss=True"):
        SpikeWatch(confirm="loss", loss=False)


def test_a_gradient_only_spike_under_confirm_is_no_verdict_but_a_confirmed_one_is(tmp_path):
    """A poisoned layer alone: an event the diagnosis does not turn into exploding_in_training; a corrupted
    batch later: the verdict rests on it, and mentions the unconfirmed one."""
    net = mlp(depth=3)
    poison = Poisoner(net.blocks[0].linear, 1e4)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    loss_of = regression(net, scale_at={140})
    verdicts = []
    with Probe(net, spikes=SpikeWatch(confirm="loss"), hooks=False, budget=None) as probe:
        for t in range(160):
            poison.armed = t == 100
            opt.zero_grad(set_to_none=True)
            loss = loss_of(t)
            loss.backward()
            probe.step(loss)
            if t not in (100, 140):  # (applied, the poisoned update would make step 101's loss spike: an alarm)
                opt.step()
            if t == 120:
                verdicts.append(probe.diagnose().verdict)
        d = probe.diagnose()
        log = probe.spike_log()
    assert [(e.step, e.confirmed) for e in log.events] == [(100, False), (140, True)]
    # the report says which is which (the guard column) and what the rule was
    import html

    from gradprobe.report import build_report

    text = html.unescape(build_report({"run": probe.run()}, tmp_path).read_text(encoding="utf-8"))
    assert text.count("no alarm (not confirmed by the loss, confirm='loss')") == 1
    assert "an alarm only when the loss spikes too and rises by at least 0.1 of the progress" in text
    assert verdicts[0] != "exploding_in_training"
    assert d.verdict == "exploding_in_training" and d.primary.data["first_step"] == 140
    assert any("did not confirm" in line for line in d.primary.evidence)
