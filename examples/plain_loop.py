"""A plain PyTorch loop under gradprobe: record every step, log to TensorBoard and a run log, diagnose.

    python examples/plain_loop.py [OUT_DIR]

Then: ``gradprobe report OUT_DIR/runs``, ``gradprobe export OUT_DIR/runs --csv flow.csv``,
``tensorboard --logdir OUT_DIR/tb``.
"""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import gradprobe
from gradprobe.integrations.tensorboard import TensorBoardSink
from gradprobe.models import DeepMLP

out = Path(sys.argv[1] if len(sys.argv) > 1 else "gradprobe-example")
torch.manual_seed(0)
x, y = torch.randn(256, 32), torch.randint(0, 4, (256,))
net = DeepMLP(32, 4, width=64, depth=10, activation="sigmoid", init="standard")
opt = torch.optim.SGD(net.parameters(), lr=0.1)

# every=1: a fixed schedule, every recorder on every step (the default keeps a 3 % overhead budget instead)
with gradprobe.Probe(net, every=1, log_dir=out / "runs", run_name="plain", mode="overwrite",
                     sinks=[TensorBoardSink(out / "tb")]) as probe:
    for step in range(20):
        opt.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        probe.step(loss)          # after backward, before the optimizer step (and before any clipping)
        opt.step()
    diagnosis = probe.diagnose()

print(probe.trace.last.table())
print(diagnosis)
