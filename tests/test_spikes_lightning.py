"""gradprobe's SpikeWatch beside Lightning's ``SpikeDetection`` on the same runs (issue 12).

Lightning's detector (``lightning.fabric.utilities.spike.SpikeDetection``, which the
``lightning.pytorch.callbacks.SpikeDetection`` callback wraps; default settings: running mean of the loss
over 10 batches, a spike when the loss is ≥ 3× it, or non-finite) watches the loss in
``on_train_batch_end``, after the optimizer step; gradprobe watches the gradient norms (and the loss) at
``probe.step()``, before it. One trajectory feeds both; Lightning's ``TrainingSpikeException`` is caught and
counted so the run goes on. Oracles by construction: a batch ×100 raises both the loss and the gradient
at its step; a layer whose backward is multiplied by 10⁴ changes the gradient but not the loss (its
forward is the identity), so a loss-only detector cannot see it; a learning-rate jump shows in the next
step's loss and gradient.
"""
from __future__ import annotations

import pytest
import torch

from gradprobe import Probe
from tests.test_spikes import Poisoner, mlp, regression

spike = pytest.importorskip("lightning.fabric.utilities.spike",
                            reason="Lightning is not installed (the 'lightning' extra, pinned in constraints.txt)")


class _Strategy:
    root_device = torch.device("cpu")

    def barrier(self):
        pass

    def reduce_boolean_decision(self, decision, all=True):  # one process: the decision is its own
        return decision


class _Fabric:
    """The two attributes ``SpikeDetection.on_train_batch_end`` uses of a Fabric (one process)."""

    strategy = _Strategy()
    global_rank = 0


def _both(injection, tmp_path, at=120, steps=170):
    model = mlp(depth=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    poison = Poisoner(model.blocks[0].linear, 1e4)
    loss_of = regression(model, scale_at={at} if injection == "scaled_batch" else ())
    lightning = spike.SpikeDetection(exclude_batches_path=str(tmp_path / "skip.json"))
    seen, before_update = [], {}
    with Probe(model, spikes=True) as probe:
        for t in range(steps):
            poison.armed = injection == "poisoned_layer" and t == at
            opt.param_groups[0]["lr"] = 3.0 if (injection == "lr_jump" and t == at) else 0.01
            opt.zero_grad(set_to_none=True)
            loss = loss_of(t)
            loss.backward()
            probe.step(loss)
            if t == at:
                before_update[t] = probe.spike_log().steps  # what gradprobe knew before this step's update
            opt.step()
            try:
                lightning.on_train_batch_end(_Fabric(), loss.detach(), None, t)
            except spike.TrainingSpikeException:
                seen.append(t)
        log = probe.spike_log()
    return log, seen, before_update


def test_a_scaled_batch_both_see_it_but_only_gradprobe_before_the_update(tmp_path):
    log, seen, before_update = _both("scaled_batch", tmp_path)
    assert log.steps == [120] and seen and seen[0] == 120
    assert 120 in before_update[120]  # the guard could have skipped this update; Lightning saw it after it
    assert log.events[0].layer == "output"  # where the backward pass started; Lightning names no layer


def test_a_poisoned_layer_only_gradprobe_sees_and_names_it(tmp_path):
    log, seen, _ = _both("poisoned_layer", tmp_path)
    assert log.steps == [120] and log.events[0].first_layer == "blocks.0.linear"
    assert 120 not in seen and not log.events[0].loss.spiked  # the loss did not move: a loss-only check is blind


def test_a_learning_rate_jump_both_see_it_at_the_next_step(tmp_path):
    log, seen, _ = _both("lr_jump", tmp_path)
    assert log.steps[0] == 121 and seen and seen[0] == 121
    assert log.events[0].total.spiked
