"""The full flight recorder under data parallelism (issue 12 §2): two gloo ranks training one
DistributedDataParallel model, each on its half of the global batch, against one process on the global batch.

Convention (gradprobe.probe.flight.combine_ranks): rank r back-propagates L_r, the mean loss over its own
samples; DDP averages the gradients, so the optimizer sees the gradient of L = (1/W) Σ_r L_r, the mean loss
over the global batch. When the guard's decision is collective (on_spike set: every rank is in a collective at
the spike step) the flight's hook quantities are combined at the spike: ‖∂L/∂h_l‖ = √(Σ_r ‖∂L_r/∂h_l^(r)‖²)/W,
‖h_l‖ = √(Σ_r ‖h_l^(r)‖²). Oracle: the same numbers of one process on the global batch (float64). Without a
guard the host decides alone on each rank, the flight holds each rank's own numbers and says so (rank_local),
and the test combines them by the convention to the same oracle."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradprobe import Probe
from gradprobe.probe import SpikeWatch
from tests._ddp import spawn_ranks

SPIKE, STEPS, BATCH = 40, 46, 16


class Recurrent(nn.Module):
    """An Elman RNN over 10 time steps and a linear read-out of every step (batch first)."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.RNN(6, 8, batch_first=True)
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        return self.head(self.rnn(x)[0])


def _net(kind="mlp"):
    torch.manual_seed(0)
    if kind == "rnn":
        return Recurrent().double()
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 1)).double()


def _train(model, guard, rows, kind="mlp", distributed=None) -> dict:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 1, generator=g, dtype=torch.float64)
    shape = (BATCH, 10, 6) if kind == "rnn" else (BATCH, 6)
    with Probe(model, spikes=SpikeWatch(full_flight=True), on_spike=guard, budget=None, temporal=kind == "rnn",
               cadence={"temporal": 5} if kind == "rnn" else None, distributed=distributed) as probe:
        for t in range(STEPS):
            x = torch.randn(*shape, generator=g, dtype=torch.float64)[rows]
            opt.zero_grad(set_to_none=True)
            loss = F.mse_loss(model(x), torch.sin(x @ w)) * (1000.0 if t == SPIKE else 1.0)
            loss.backward()
            probe.step(loss)
            if not probe.skipped and t != SPIKE:
                opt.step()
        log = probe.spike_log()
    return log.as_dict()


def _train_rank(rank: int, world: int, guard, kind) -> dict:
    half = BATCH // world
    rows = slice(rank * half, (rank + 1) * half)
    if kind == "separate":  # each rank its own model: no DDP, and the probe told not to combine
        return {"log": _train(_net(), guard, rows, "mlp", distributed=False)}
    return {"log": _train(nn.parallel.DistributedDataParallel(_net(kind)), guard, rows, kind)}


def _flights(tmp_path, guard, kind="mlp"):
    from gradprobe.trace import SpikeLog
    out = []
    for res in spawn_ranks(tmp_path, _train_rank, guard, kind):
        log = SpikeLog.from_dict(res["log"])
        assert log.steps == [SPIKE]
        out.append(log.events[0].flight)
    return out


@pytest.fixture(scope="module")
def single():
    from gradprobe.trace import SpikeLog
    log = SpikeLog.from_dict(_train(_net(), "skip", slice(None)))
    assert log.steps == [SPIKE]
    return log.events[0].flight


@pytest.mark.slow
def test_a_collective_spike_combines_the_ranks_flights_to_the_global_batch(tmp_path, single):
    f0, f1 = _flights(tmp_path, "skip")
    for r, f in enumerate((f0, f1)):
        assert (f.world_size, f.rank) == (2, r) and f.steps == single.steps
        assert f.rank_local == ()  # the units table too: the ranks' per-unit dead flags are combined
        np.testing.assert_allclose(np.array(f.grad_norm), np.array(single.grad_norm), rtol=1e-10)
        for q in ("output_grad_norm", "activation_norm", "weight_norm", "update_ratio"):
            np.testing.assert_allclose(np.array(f.quantities[q]), np.array(single.quantities[q]), rtol=1e-9,
                                       err_msg=q, equal_nan=True)
        # saturated entries summed, a unit dead over the global batch iff dead on both halves: exactly the
        # fractions of one process on the global batch (integer counts)
        u, want = f.tables["units"], single.tables["units"]
        assert (u.sites, u.kinds) == (tuple(f"module.{s}" for s in want.sites), want.kinds)
        for col in ("saturated_fraction", "dead_fraction"):
            np.testing.assert_array_equal(np.array(u.columns[col]), np.array(want.columns[col]), err_msg=col)
    assert f0.quantities == f1.quantities  # every rank holds the same combined record


@pytest.mark.slow
def test_without_a_collective_decision_each_rank_keeps_and_labels_its_own(tmp_path, single):
    f0, f1 = _flights(tmp_path, None)
    for f in (f0, f1):
        assert f.rank_local == ("activation_norm", "output_grad_norm", "units")
    g = [np.array(f.quantities["output_grad_norm"]) for f in (f0, f1)]
    a = [np.array(f.quantities["activation_norm"]) for f in (f0, f1)]
    assert not np.allclose(g[0], g[1])  # each rank's own samples
    np.testing.assert_allclose(np.sqrt(g[0] ** 2 + g[1] ** 2) / 2, np.array(single.quantities["output_grad_norm"]),
                               rtol=1e-9)
    np.testing.assert_allclose(np.sqrt(a[0] ** 2 + a[1] ** 2), np.array(single.quantities["activation_norm"]), rtol=1e-9)
    for q in ("weight_norm", "update_ratio"):  # the parameters are the same on every rank
        np.testing.assert_allclose(np.array(f0.quantities[q]), np.array(single.quantities[q]), rtol=1e-9,
                                   equal_nan=True)
    # each rank's own units: a unit dead on the global batch is dead on each half, not conversely (so the
    # combination above is not the ranks' fractions averaged or either rank's own)
    dead = [np.array(f.tables["units"].columns["dead_fraction"])[:, 1] for f in (f0, f1)]
    one = np.array(single.tables["units"].columns["dead_fraction"])[:, 1]
    assert (one <= np.minimum(*dead)).all() and (one < np.minimum(*dead)).any() and (one < (dead[0] + dead[1]) / 2).any()


@pytest.mark.slow
def test_the_temporal_profiles_of_a_collective_spike_combine_to_the_global_batch(tmp_path):
    """An RNN under DDP with temporal=True: the flight's ‖∂E/∂h_k‖ (twin-measured on most steps, the session
    recorder's reused every 5th) is √(Σ_r ‖∂E_r/∂h_k^(r)‖²)/W at every time step, that of one process."""
    from gradprobe.trace import SpikeLog
    one = SpikeLog.from_dict(_train(_net("rnn"), "skip", slice(None), "rnn")).events[0].flight
    f0, f1 = _flights(tmp_path, "skip", "rnn")
    want = np.array(one.profiles["temporal.h"]["rnn.l0"])
    assert want.shape == (32, 10)
    for f in (f0, f1):
        assert f.rank_local == ()  # (no activation module: no units table)
        np.testing.assert_allclose(np.array(f.profiles["temporal.h"]["module.rnn.l0"]), want, rtol=1e-9)
        np.testing.assert_allclose(np.array(f.quantities["output_grad_norm"]), np.array(one.quantities["output_grad_norm"]),
                                   rtol=1e-9)


@pytest.mark.slow
def test_a_probe_told_not_to_combine_keeps_every_key_rank_local(tmp_path):
    """Probe(distributed=False), each rank training its own model (no DDP): the guard still decides for all
    ranks together, but nothing is combined, and the record lists every key, the weights' too, as its own."""
    f0, f1 = _flights(tmp_path, "skip", "separate")
    for f in (f0, f1):
        assert f.world_size == 2
        assert f.rank_local == ("activation_norm", "output_grad_norm", "units", "update_ratio", "weight_norm")
    assert not np.allclose(np.array(f0.quantities["update_ratio"][-5:]), np.array(f1.quantities["update_ratio"][-5:]))
