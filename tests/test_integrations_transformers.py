"""``gradprobe.integrations.transformers.GradProbeCallback`` on a real ``transformers.Trainer`` (CPU).

Models are built from configs with random weights (a 2-layer GPT-2 and a 2-layer BERT; nothing is
downloaded). Oracles: the ``grad_norm`` and ``loss`` the Trainer itself logs at every step (it computes
the norm before clipping), and a naive callback of the test's own in ``on_pre_optimizer_step``, which
sees the clipped gradient: the reason this callback records elsewhere.
"""
import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import gradprobe  # noqa: E402
from gradprobe.errors import ConfigError  # noqa: E402
from gradprobe.integrations.transformers import GradProbeCallback  # noqa: E402

CLIP = 0.01


class ClippedNorm(transformers.TrainerCallback):
    """What a hand-written callback sees in the only hook before the optimizer step: the clipped norm."""

    def __init__(self):
        self.norms = []

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.model = model

    def on_pre_optimizer_step(self, args, state, control, **kw):
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        self.norms.append(torch.nn.utils.get_total_norm(grads).item())


def _gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (24, 12), generator=g)]
    return transformers.GPT2LMHeadModel(cfg), data


def _bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16, num_labels=3)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (24, 10), generator=g)
    labels = torch.randint(0, 3, (24,), generator=g)
    return transformers.BertForSequenceClassification(cfg), [{"input_ids": i, "labels": y} for i, y in zip(ids, labels)]


def _train(model, data, tmp_path, callbacks, accumulate, steps=3, **kw):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, gradient_accumulation_steps=accumulate,
        max_grad_norm=CLIP, max_steps=steps, logging_steps=1, report_to=kw.pop("report_to", "none"), use_cpu=True,
        save_strategy="no", learning_rate=1e-3, disable_tqdm=True, seed=0, **kw)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)
    trainer.train()
    return [h for h in trainer.state.log_history if "grad_norm" in h]


@pytest.mark.parametrize("make,accumulate", [(_gpt2, 2), (_bert, 3)], ids=["gpt2", "bert"])
def test_total_gradient_norm_equals_the_pre_clip_norm_the_trainer_logs(make, accumulate, tmp_path):
    model, data = make()
    cb, naive = GradProbeCallback(log_dir=tmp_path / "runs", run_name="hf"), ClippedNorm()
    logged = _train(model, data, tmp_path, [naive, cb], accumulate)
    trace = list(cb.trace)
    assert len(trace) == len(logged) == 3  # once per optimizer step, not per micro-batch
    totals = [f.tables["totals"].column("grad_norm")[0] for f in trace]
    np.testing.assert_allclose(totals, [h["grad_norm"] for h in logged], rtol=1e-6)  # float32 rounding of HF's norm
    assert min(totals) > 10 * CLIP
    np.testing.assert_allclose(naive.norms, CLIP, rtol=1e-3)  # the hook after clipping sees the clip value
    np.testing.assert_allclose([f.loss for f in trace], [h["loss"] for h in logged], rtol=1e-6)
    # per-layer norms add up to the total (each distinct parameter once: GPT-2's lm_head shares wte's weight)
    for f in trace:
        g = {n: v for n, v, m in zip(f.names, f.grad_norm, f.has_grad) if m}
        shared = g.pop("lm_head", 0.0) if "lm_head" in g and np.isclose(g["lm_head"], g.get("transformer.wte", -1)) else 0.0
        assert np.sqrt(sum(v * v for v in g.values())) == pytest.approx(f.tables["totals"].column("grad_norm")[0], rel=1e-9)
        assert (shared > 0) == (make is _gpt2)
    # the diagnosis reads the last recorded step, with its back-propagated signal
    last = cb.run.last
    assert last.step == 2 and last.has_output_grad.sum() >= len(last) - 1
    assert cb.diagnosis is not None
    run = gradprobe.load_run(tmp_path / "runs")
    assert run.diagnose() == cb.diagnosis == run.diagnosis


def test_per_layer_scalars_go_to_tensorboard_beside_the_trainers(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    model, data = _gpt2()
    cb = GradProbeCallback()
    _train(model, data, tmp_path, [cb], 1, steps=2, report_to="tensorboard")
    ea = EventAccumulator(str(tmp_path / "out" / "runs" / "gradprobe"), size_guidance={"tensors": 0})
    ea.Reload()
    tag = "gradprobe/grad_norm/transformer.h.0.attn.c_attn"
    events = ea.Tensors(tag)
    got = [tensor_util.make_ndarray(e.tensor_proto).item() for e in events]
    want = [f.grad_norm[f.index("transformer.h.0.attn.c_attn")] for f in cb.trace]
    assert [e.step for e in events] == [0, 1] and got == want


def test_bad_options_fail_at_construction():
    with pytest.raises(ConfigError, match="not Probe options"):
        GradProbeCallback(log=True)
    with pytest.raises(gradprobe.ProbeStateError, match="not started"):
        GradProbeCallback().trace
