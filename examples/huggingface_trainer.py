"""Hugging Face Trainer: the callback's total gradient norm is the pre-clip grad_norm the Trainer logs.

    python examples/huggingface_trainer.py [OUT_DIR]

A 2-layer GPT-2 built from a config (random weights: nothing is downloaded).
"""
import sys
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from gradprobe.integrations.transformers import GradProbeCallback

out = Path(sys.argv[1] if len(sys.argv) > 1 else "gradprobe-example")
torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_positions=32, n_embd=32, n_layer=2, n_head=2))
tokens = torch.randint(0, 128, (64, 24))
data = [{"input_ids": t, "labels": t} for t in tokens]

probe = GradProbeCallback(log_dir=out / "runs", run_name="hf", mode="overwrite")
args = TrainingArguments(output_dir=str(out / "hf"), per_device_train_batch_size=8, gradient_accumulation_steps=2,
                         max_grad_norm=1.0, max_steps=4, logging_steps=1, learning_rate=1e-3, report_to="none",
                         use_cpu=True, save_strategy="no", disable_tqdm=True)
trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[probe])
trainer.train()

logged = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
recorded = [f.tables["totals"].column("grad_norm")[0] for f in probe.trace]
for a, b in zip(logged, recorded):
    print(f"Trainer's grad_norm {a:.6g}   gradprobe's total {b:.6g}")
print(probe.diagnosis)
