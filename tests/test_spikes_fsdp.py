"""The spike watch under FSDP2 (``fully_shard``) on 2 gloo ranks, against one process on the global batch.

FSDP2 leaves each rank one shard of every gradient (a ``DTensor``); a layer's gradient norm is
√(Σ_r ‖shard_r‖²). The watch must see the norms of the unsharded model on every rank, on the steps
the schedule records gradients and on those it does not (the watch then takes the norms itself).
Oracle: the same model trained by one process on the concatenation of the ranks' batches with the mean
loss (FSDP2 averages the ranks' gradients, so the gradients are the same up to float32 rounding).
"""
from __future__ import annotations

import json
import os
import traceback

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from gradprobe import Probe

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


def _rank(rank, out):
    result = {}
    try:
        dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=WORLD)
        from torch.distributed.fsdp import fully_shard

        model = _model()
        for m in model:
            if isinstance(m, nn.Linear):
                fully_shard(m)
        fully_shard(model)
        # gradients recorded every 4th step: the watch takes the other steps' norms itself
        with Probe(model, spikes=True, hooks=False, every=4) as probe:
            _train(model, probe, rank, WORLD)
        result = _flight(probe)
    except Exception:  # noqa: BLE001 - reported to the parent
        result = {"error": traceback.format_exc()}
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)


@pytest.mark.slow
def test_fsdp2_watch_sees_the_unsharded_norms_on_every_rank(tmp_path):
    mp.start_processes(_rank, args=(str(tmp_path),), nprocs=WORLD, start_method="spawn")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for r in ranks:
        assert "error" not in r, r["error"]
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
