"""The spike watch under FSDP2 (``fully_shard``) on 2 gloo ranks, against one process on the global batch.

FSDP2 leaves each rank one shard of every gradient (a ``DTensor``); a layer's gradient norm is
√(Σ_r ‖shard_r‖²). The watch must see the norms of the unsharded model on every rank, on the steps
the schedule records gradients and on those it does not (the watch then takes the norms itself).
Oracle: the same model trained by one process on the concatenation of the ranks' batches with the mean
loss (FSDP2 averages the ranks' gradients, so the gradients are the same up to float32 rounding).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradprobe import Probe
from tests._ddp import spawn_ranks

WORLD = 2
STEPS = 48
SPIKE_AT = 40


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))


def _train(model, probe, rank, world):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 1, generator=torch.Generator().manual_seed(0))
    for t in range(STEPS):
        x = torch.randn(16 * WORLD, 8, generator=g)
        y = torch.sin(x @ w)
        if t == SPIKE_AT:
            y = y * 100.0  # a corrupted batch: targets 100× off
        n = len(x) // world
        xs, ys = x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]
        opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(model(xs), ys)
        loss.backward()
        probe.step(loss)
        opt.step()


def _flight(probe):
    events = probe.spike_log().events
    e = events[0]
    return {"steps": list(e.flight.steps), "grad_norm": [list(r) for r in e.flight.grad_norm],
            "total": list(e.flight.total), "event_step": e.step, "n_events": len(events),
            "layer": e.first_layer}


def _rank(rank, world):
    from torch.distributed.fsdp import fully_shard

    model = _model()
    for m in model:
        if isinstance(m, nn.Linear):
            fully_shard(m)
    fully_shard(model)
    # gradients recorded every 4th step: the watch takes the other steps' norms itself
    with Probe(model, spikes=True, hooks=False, every=4) as probe:
        _train(model, probe, rank, world)
    return _flight(probe)


@pytest.mark.slow
def test_fsdp2_watch_sees_the_unsharded_norms_on_every_rank(tmp_path):
    ranks = spawn_ranks(tmp_path, _rank, world=WORLD)
    model = _model()
    with Probe(model, spikes=True, hooks=False, every=4) as probe:
        _train(model, probe, 0, 1)
    want = _flight(probe)
    assert want["event_step"] == SPIKE_AT
    for r in ranks:
        assert (r["event_step"], r["n_events"], r["steps"]) == (want["event_step"], want["n_events"], want["steps"])
        assert r["layer"] == want["layer"]
        np.testing.assert_allclose(r["grad_norm"], want["grad_norm"], rtol=1e-4)
        np.testing.assert_allclose(r["total"], want["total"], rtol=1e-4)
