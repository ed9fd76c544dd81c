"""Data-parallel training on 2 gloo (CPU) processes: DDP and FSDP2 against one process on the global batch.

Oracle: a single process training the same model on the whole batch (the concatenation of the ranks'
shards) with the mean loss. DDP and FSDP2 average gradients, so every recorded number of every rank must
equal the single-process one: ``grad_norm`` (all-reduced or sharded gradients), ``output_grad_norm``
(√(Σ_r ‖·‖²)/W), ``activation_norm`` (√(Σ_r ‖·‖²)), the loss (mean over ranks) and the total gradient
norm. Only rank 0 writes the run log and the sinks.
"""
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import gradprobe

WORLD = 2
STEPS = 3
QUANTITIES = ("grad_norm", "output_grad_norm", "activation_norm", "weight_norm", "update_ratio")


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def _data():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16 * WORLD, 8, generator=g), torch.randn(16 * WORLD, 3, generator=g)) for _ in range(STEPS)]


class _Count(gradprobe.Sink):
    def __init__(self):
        self.n = 0

    def write(self, record):
        self.n += 1


def _train(model, probe, rank, world, wrapped=None):
    run = wrapped if wrapped is not None else model
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in _data():
        n = len(x) // world
        xs, ys = x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]
        opt.zero_grad()
        loss = (run(xs) - ys).pow(2).mean()
        loss.backward()
        probe.step(loss)
        opt.step()


def _numbers(trace):
    out = {q: np.stack([f[q] for f in trace]) for q in QUANTITIES}
    out["loss"] = trace.losses
    out["total"] = np.array([f.tables["totals"].column("grad_norm")[0] for f in trace])
    return out


def _worker(rank, mode, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{out_dir}/store", rank=rank, world_size=WORLD)
    try:
        model = _model()
        wrapped = None
        if mode == "ddp":
            wrapped = nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.fsdp import fully_shard

            for m in model:
                if isinstance(m, nn.Linear):
                    fully_shard(m)
            fully_shard(model)
        count = _Count()
        with gradprobe.Probe(model, log_dir=os.path.join(out_dir, "runs"), run_name=mode, sinks=[count]) as probe:
            _train(model, probe, rank, WORLD, wrapped)
            d = probe.diagnose()
        np.savez(os.path.join(out_dir, f"rank{rank}.npz"), sink_writes=count.n, verdict=d.verdict,
                 **_numbers(probe.trace))
    finally:
        dist.destroy_process_group()


class _Slow(gradprobe.Recorder):
    """A recorder that costs 50 ms of CPU per recorded step on rank 1 only: the ranks' budgets plan apart
    (a busy loop: the budget runs on the thread CPU clock, on which a sleep costs nothing)."""

    name = "slow"

    def collect(self, advance):
        import time

        import torch.distributed as dist

        if dist.get_rank() == 1:
            end = time.thread_time() + 0.05
            while time.thread_time() < end:
                pass
        return None


def _budget_worker(rank, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{out_dir}/store", rank=rank, world_size=WORLD)
    try:
        model = _model()
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        x, y = torch.randn(64, 8), torch.randn(64, 3)
        with gradprobe.Probe(model, budget=0.01, recorders=[_Slow()]) as probe:
            for _ in range(24):
                opt.zero_grad()
                (ddp(x) - y).pow(2).mean().backward()
                probe.step()
                opt.step()
            steps = {r: [f.step for f in probe.trace if r in f.recorders] for r in ("slow", "outputs")}
        np.savez(os.path.join(out_dir, f"budget{rank}.npz"), slow=steps["slow"], outputs=steps["outputs"],
                 period=probe.cadence["slow"])
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ranks_with_a_budget_record_the_same_steps(tmp_path):
    """With an overhead budget each rank times itself; they must still record the same steps (else the
    collectives of the step would pair different steps or hang): they adopt the slowest plan."""
    mp.start_processes(_budget_worker, args=(str(tmp_path),), nprocs=WORLD, start_method="spawn")
    r0, r1 = (np.load(tmp_path / f"budget{r}.npz") for r in range(WORLD))
    assert int(r0["period"]) == int(r1["period"]) > 1  # rank 1's cost slowed the recorder on both ranks
    for key in ("slow", "outputs"):
        np.testing.assert_array_equal(r0[key], r1[key])


def _single_process():
    model = _model()
    with gradprobe.Probe(model) as probe:
        _train(model, probe, 0, 1)
        return _numbers(probe.trace), probe.diagnose().verdict


@pytest.mark.parametrize("mode", ["ddp", pytest.param("fsdp", marks=pytest.mark.slow)])
def test_data_parallel_numbers_equal_the_single_process_run(mode, tmp_path):
    mp.start_processes(_worker, args=(mode, str(tmp_path)), nprocs=WORLD, start_method="spawn")
    ref, verdict = _single_process()
    for rank in range(WORLD):
        got = np.load(tmp_path / f"rank{rank}.npz")
        for key, want in ref.items():
            np.testing.assert_allclose(got[key], want, rtol=1e-5, atol=1e-12, err_msg=f"rank {rank}: {key}")
        assert str(got["verdict"]) == verdict
        assert int(got["sink_writes"]) == (STEPS if rank == 0 else 0)
    logs = sorted((tmp_path / "runs").glob("*.sqlite"))
    assert [p.name for p in logs] == [f"{mode}.sqlite"]  # rank 0 alone wrote a run log
    saved = _numbers(gradprobe.load_trace(logs[0]))
    for key, want in ref.items():
        np.testing.assert_allclose(saved[key], want, rtol=1e-5, atol=1e-12, err_msg=key)


def test_distributed_option_outside_a_process_group():
    """Without torch.distributed a probe is one rank of one; asking for distributed=True is an error."""
    model = _model()
    with gradprobe.Probe(model, distributed=False) as probe:
        assert probe.world_size == 1
    with pytest.raises(gradprobe.ConfigError, match="init_process_group"):
        gradprobe.Probe(model, distributed=True)
