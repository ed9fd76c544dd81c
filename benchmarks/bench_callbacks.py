"""Do the framework callbacks cost more than the probe itself? (issue 10, "Done when")

For Lightning and for the Hugging Face Trainer, three fits of the same model run in every round, in a
rotating order: ``plain`` (no probe), ``handwritten`` (a minimal callback of a few lines that opens a
``gradprobe.Probe`` and calls ``probe.step()`` in the framework's pre-optimizer hook: the probe's own
cost) and ``callback`` (gradprobe's ``GradProbeCallback``). A timing callback measures the CPU time of
every training step (batch start to batch end: forward, backward, probe, optimizer); a fit's time is the
median over its steps after the first five, and a round's ratios pair the fits of that round (see
``_harness.py`` for why). Reported: median paired ratios ``callback / handwritten`` (the callback's
extra cost; ≈ 1 means none) and ``handwritten / plain`` (the probe's cost), with 95 % bootstrap CIs.
Both probes use the same defaults (the overhead budget included).

Run::

    python benchmarks/bench_callbacks.py --quick      # about 2 minutes
    python benchmarks/bench_callbacks.py              # the numbers in BENCHMARKS.md
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import bootstrap_median_ci  # noqa: E402

import gradprobe  # noqa: E402

WIDTH, DEPTH, BATCH = 256, 8, 64


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    layers = [nn.Linear(64, WIDTH), nn.Tanh()]
    for _ in range(DEPTH - 2):
        layers += [nn.Linear(WIDTH, WIDTH), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(WIDTH, 10))


def _data(steps: int) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(steps * BATCH, 64, generator=g), torch.randint(0, 10, (steps * BATCH,), generator=g))


# ------------------------------------------------------------------------------------------ Lightning
def lightning_configs():
    import lightning as L

    from gradprobe.integrations.lightning import GradProbeCallback

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _mlp()

        def training_step(self, batch, i):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    class Handwritten(L.Callback):
        def on_fit_start(self, trainer, pl_module):
            self.probe = gradprobe.Probe(pl_module)

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.probe.step()

        def on_train_end(self, trainer, pl_module):
            self.probe.close()

    class Timer(L.Callback):
        def __init__(self):
            self.t = []

        def on_train_batch_start(self, *a):
            self._t0 = time.process_time_ns()

        def on_train_batch_end(self, *a):
            self.t.append(time.process_time_ns() - self._t0)

    def fit(extra, steps):
        timer = Timer()
        trainer = L.Trainer(max_steps=steps, callbacks=[timer, *extra], logger=False, accelerator="cpu",
                            enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
        trainer.fit(Module(), DataLoader(_data(steps), batch_size=BATCH))
        return np.array(timer.t[5:]) / 1e9

    return {"plain": lambda s: fit([], s), "handwritten": lambda s: fit([Handwritten()], s),
            "callback": lambda s: fit([GradProbeCallback()], s)}


# -------------------------------------------------------------------------------------- Hugging Face
def transformers_configs():
    import transformers

    from gradprobe.integrations.transformers import GradProbeCallback

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _mlp()

        def forward(self, x, labels=None):
            logits = self.net(x)
            return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}

    class Handwritten(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            self.probe = gradprobe.Probe(model)

        def on_pre_optimizer_step(self, args, state, control, **kw):
            self.probe.step()  # sees the clipped gradient: only its cost is compared here

        def on_train_end(self, args, state, control, **kw):
            self.probe.close()

    class Timer(transformers.TrainerCallback):
        def __init__(self):
            self.t = []

        def on_step_begin(self, *a, **k):
            self._t0 = time.process_time_ns()

        def on_step_end(self, *a, **k):
            self.t.append(time.process_time_ns() - self._t0)

    def fit(extra, steps):
        d = _data(steps)
        timer = Timer()
        with tempfile.TemporaryDirectory() as out:
            args = transformers.TrainingArguments(output_dir=out, per_device_train_batch_size=BATCH, max_steps=steps,
                                                  report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True,
                                                  logging_strategy="no", dataloader_num_workers=0)
            data = [{"x": x, "labels": y} for x, y in zip(d.tensors[0], d.tensors[1])]
            transformers.Trainer(model=Model(), args=args, train_dataset=data, callbacks=[timer, *extra]).train()
        return np.array(timer.t[5:]) / 1e9

    return {"plain": lambda s: fit([], s), "handwritten": lambda s: fit([Handwritten()], s),
            "callback": lambda s: fit([GradProbeCallback()], s)}


def run(name, configs, rounds, steps):
    names = list(configs)
    per = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            per[n].append(float(np.median(configs[n](steps))))
        print(f"  {name} round {r + 1}/{rounds}: " + ", ".join(f"{n} {per[n][-1] * 1e3:.2f} ms" for n in names),
              file=sys.stderr)
    t = {n: np.array(v) for n, v in per.items()}
    rows = []
    for label, a, b in (("callback / handwritten", "callback", "handwritten"), ("handwritten / plain", "handwritten", "plain")):
        ratio = t[a] / t[b]
        lo, hi = bootstrap_median_ci(ratio)
        rows.append(f"| {name} | {label} | {np.median(ratio):.3f} [{lo:.3f}, {hi:.3f}] | "
                    f"{np.median(t[a]) * 1e3:.2f} vs {np.median(t[b]) * 1e3:.2f} |")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="5 rounds of 30 steps")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    args = p.parse_args()
    rounds = args.rounds or (5 if args.quick else 15)
    steps = args.steps or (30 if args.quick else 60)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    rows = run("Lightning", lightning_configs(), rounds, steps) + run("Hugging Face", transformers_configs(), rounds, steps)
    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout.strip()
    print(f"\n{cpu}; torch {torch.__version__}, python {platform.python_version()}, torch.set_num_threads(1); "
          f"MLP {DEPTH}×{WIDTH}, batch {BATCH}; {rounds} rounds × {steps} steps; load average "
          f"{os.getloadavg()[0]:.1f}\n")
    print("| framework | ratio (median, 95 % CI) | CPU ms/step (medians) |\n|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
