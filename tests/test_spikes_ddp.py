"""The guard across ranks (issue 12): the decision is the OR over the ranks of torch.distributed, so a
spike on one rank makes every rank skip (or stop) at the same step. Two gloo ranks on CPU; each trains
its own copy of the model on its own data (no DDP wrapper, so the ranks' gradients differ and only
rank 0 sees the spike: the OR is the only way rank 1 can know)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from gradprobe import GradientSpikeError, Probe
from gradprobe.models import DeepMLP
from gradprobe.probe import SpikeWatch
from tests._ddp import spawn_ranks

SPIKE_AT = 40


def _train(rank: int, world: int, action: str) -> dict:
    torch.manual_seed(0)
    model = DeepMLP(8, 1, width=16, depth=2, activation="relu", init="he")
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(1 + rank)
    w = torch.randn(8, 1, generator=torch.Generator().manual_seed(0))
    result: dict = {"rank": rank}
    skipped, same = [], None
    try:
        confirm = action.endswith("_confirm")
        action = action.removesuffix("_confirm")
        with Probe(model, spikes=SpikeWatch(confirm="loss" if confirm else None), on_spike=action, hooks=False) as probe:
            for t in range(60):
                x = torch.randn(32, 8, generator=g)
                y = torch.sin(x @ w)
                if t == SPIKE_AT and rank == 0:
                    x = x * 100.0  # only rank 0's batch is corrupted
                opt.zero_grad(set_to_none=True)
                pred = model(x)
                if confirm and t == SPIKE_AT and rank == 1:  # a gradient-only spike: the loss is unchanged
                    pred.register_hook(lambda grad: grad * 1e4)
                loss = F.mse_loss(pred, y)
                loss.backward()
                before = copy.deepcopy(model.state_dict())
                probe.step(loss)
                opt.step()
                if probe.skipped:
                    skipped.append(t)
                    same = all(torch.equal(a, b) for a, b in zip(before.values(), model.state_dict().values()))
            result["events"] = [(e.step, e.kind, e.action) for e in probe.spike_log().events]
            result["confirmed"] = [e.confirmed for e in probe.spike_log().events]
    except GradientSpikeError as exc:
        result["raised"] = [exc.event.step, exc.event.kind]
    result.update(skipped=skipped, unchanged=same)
    return result


@pytest.mark.slow
def test_every_rank_skips_together(tmp_path):
    r0, r1 = spawn_ranks(tmp_path, _train, "skip")
    assert r0["skipped"] == r1["skipped"] == [SPIKE_AT]
    assert r0["unchanged"] and r1["unchanged"]  # neither rank's parameters moved at that step
    assert r0["events"] == [[SPIKE_AT, "jump", "skipped"]]
    assert r1["events"] == [[SPIKE_AT, "remote", "skipped"]]  # rank 1 saw nothing itself


@pytest.mark.slow
def test_every_rank_stops_together(tmp_path):
    r0, r1 = spawn_ranks(tmp_path, _train, "raise")
    assert r0["raised"] == [SPIKE_AT, "jump"] and r1["raised"] == [SPIKE_AT, "remote"]


@pytest.mark.slow
def test_another_ranks_alarm_confirms_a_local_gradient_only_spike(tmp_path):
    """confirm="loss": rank 0's corrupted batch is an alarm; rank 1's own spike at that step is gradient
    only (not an alarm by itself), but the OR makes both skip, and rank 1 records it as an alarm it acted on."""
    r0, r1 = spawn_ranks(tmp_path, _train, "skip_confirm")
    assert r0["skipped"] == r1["skipped"] == [SPIKE_AT]
    assert r0["events"] == r1["events"] == [[SPIKE_AT, "jump", "skipped"]]
    assert r0["confirmed"] == r1["confirmed"] == [True]
