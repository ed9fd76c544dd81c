"""Lightning: one callback records every optimizer step (after accumulation, before clipping).

    python examples/lightning_fit.py [OUT_DIR]
"""
import sys
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gradprobe.integrations.lightning import GradProbeCallback

out = Path(sys.argv[1] if len(sys.argv) > 1 else "gradprobe-example")


class Regressor(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(*[m for _ in range(6) for m in (nn.Linear(16, 16), nn.Tanh())], nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


torch.manual_seed(0)
data = DataLoader(TensorDataset(torch.randn(256, 16), torch.randn(256, 1)), batch_size=32)
probe = GradProbeCallback(log_dir=out / "runs", run_name="lightning", mode="overwrite")
trainer = L.Trainer(max_epochs=2, accumulate_grad_batches=2, gradient_clip_val=1.0, callbacks=[probe],
                    logger=L.pytorch.loggers.CSVLogger(out / "logs"), log_every_n_steps=4,
                    accelerator="cpu", enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
trainer.fit(Regressor(), data)

print(probe.trace.last.table())
print(probe.diagnosis)
