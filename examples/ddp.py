"""DDP on 2 CPU processes (gloo): every rank measures, numbers are those of the global batch, rank 0 writes.

    python examples/ddp.py [OUT_DIR]

With torchrun instead: put the body of ``train`` in a script and run ``torchrun --nproc-per-node 2 script.py``.
"""
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import gradprobe


def train(rank: int, world: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(rank)  # each rank its own samples
    with gradprobe.Probe(model, log_dir=Path(out) / "runs", run_name="ddp", mode="overwrite") as probe:
        for step in range(10):
            x, y = torch.randn(32, 16, generator=g), torch.randn(32, 1, generator=g)
            opt.zero_grad()
            loss = nn.functional.mse_loss(ddp(x), y)
            loss.backward()              # DDP all-reduces .grad here
            probe.step(loss)             # a collective: every rank calls it
            opt.step()
        diagnosis = probe.diagnose()
    if rank == 0:
        print(probe.trace.last.table())  # the global batch's numbers (identical on every rank)
        print(diagnosis)
        print("run logs:", sorted(p.name for p in (Path(out) / "runs").glob("*.sqlite")))
    dist.destroy_process_group()


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "gradprobe-example"
    store = os.path.join(tempfile.mkdtemp(), "store")
    mp.start_processes(train, args=(2, store, out), nprocs=2, start_method="spawn")
