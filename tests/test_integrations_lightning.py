"""``gradprobe.integrations.lightning.GradProbeCallback`` on a real ``lightning.Trainer`` (CPU, tiny models).

Oracles: (1) a plain PyTorch loop doing what Lightning does (same init, batches, loss divided by the
accumulation factor, one ``probe.step()`` per optimizer step before clipping): every recorded number
must equal the callback's; (2) a callback of the test's own computing the pre-clip total gradient norm
in the same hook, and the post-clip norm after it; (3) a float32 run for the mixed-precision runs.
"""
import copy
import csv
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

L = pytest.importorskip("lightning")

import gradprobe  # noqa: E402
from gradprobe.errors import ConfigError  # noqa: E402
from gradprobe.integrations.lightning import GradProbeCallback  # noqa: E402

pytestmark = [
    # Lightning's advice about CPU workers, logging intervals and small data sets is not ours to act on
    pytest.mark.filterwarnings("ignore::UserWarning:lightning"),
    pytest.mark.filterwarnings("ignore::UserWarning:pytorch_lightning"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning"),  # Lightning 2.6 on torch 2.13's pytree
]
QUANTITIES = ("grad_norm", "output_grad_norm", "activation_norm", "weight_norm", "update_ratio")
N, BATCH = 96, 16


def _net(depth=6, act=nn.Sigmoid):
    torch.manual_seed(0)
    layers = [nn.Linear(8, 32), act()]
    for _ in range(depth - 2):
        layers += [nn.Linear(32, 32), act()]
    return nn.Sequential(*layers, nn.Linear(32, 4))


def _data():
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(N, 8, generator=g), torch.randn(N, 4, generator=g))


class Module(L.LightningModule):
    def __init__(self, net, lr=0.5):
        super().__init__()
        self.net = net
        self.lr = lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, i):
        x, y = batch
        return (self(x) - y).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class _Sharded(Module):
    """Deals each rank its samples without the shuffling Lightning's own distributed sampler does."""

    def train_dataloader(self):
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(_data(), num_replicas=self.trainer.world_size, rank=self.global_rank, shuffle=False)
        return DataLoader(_data(), batch_size=BATCH, sampler=sampler)


class PreClipNorm(L.Callback):
    """The test's own oracle: total gradient norm in on_before_optimizer_step, and after clipping."""

    def __init__(self):
        self.pre, self.post = [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.pre.append(torch.nn.utils.get_total_norm([p.grad for p in pl_module.parameters()]).item())

    def on_before_zero_grad(self, trainer, pl_module, optimizer):
        if len(self.post) < len(self.pre):
            self.post.append(torch.nn.utils.get_total_norm([p.grad for p in pl_module.parameters()]).item())


def _fit(net, callbacks, batch=BATCH, **trainer_kw):
    kw = dict(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    kw.update(trainer_kw)
    trainer = L.Trainer(callbacks=callbacks, **kw)
    trainer.fit(Module(net), DataLoader(_data(), batch_size=batch, shuffle=False))
    return trainer


def _plain_loop(net, accumulate=1, clip=None):
    """What Lightning does, written out: the reference trace."""
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    batches = list(DataLoader(_data(), batch_size=BATCH, shuffle=False))
    with gradprobe.Probe(net) as probe:
        for k in range(0, len(batches), accumulate):
            loss_sum = 0.0
            for x, y in batches[k : k + accumulate]:
                loss = (net(x) - y).pow(2).mean() / accumulate
                loss.backward()
                loss_sum = loss_sum + loss.detach()
            probe.step(loss_sum)
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
            opt.step()
            opt.zero_grad()
        return list(probe.trace)


def test_records_once_per_optimizer_step_after_accumulation_before_clipping(tmp_path):
    net = _net()
    ref = _plain_loop(copy.deepcopy(net), accumulate=2, clip=0.01)
    cb, oracle = GradProbeCallback(log_dir=tmp_path, run_name="fit"), PreClipNorm()
    _fit(net, [oracle, cb], accumulate_grad_batches=2, gradient_clip_val=0.01)
    got = list(cb.trace)
    assert len(got) == len(ref) == N // BATCH // 2
    for a, b in zip(ref, got):
        assert a.names == tuple(n.removeprefix("net.") for n in b.names)
        for q in QUANTITIES:
            np.testing.assert_array_equal(a.mask(q), b.mask(q), err_msg=q)
            np.testing.assert_allclose(b[q][b.mask(q)], a[q][a.mask(q)], rtol=1e-6, err_msg=q)
        assert b.loss == pytest.approx(a.loss, rel=1e-6)
    totals = [f.tables["totals"].column("grad_norm")[0] for f in got]
    np.testing.assert_allclose(totals, oracle.pre, rtol=1e-6)
    assert min(oracle.pre) > 0.01 and max(oracle.post) == pytest.approx(0.01, rel=1e-3)  # it did clip, after us
    # the diagnosis of the last recorded step sees the back-propagated signal of every layer
    assert cb.run.last.has_output_grad.all()
    assert cb.diagnosis.verdict == "vanishing"
    assert any("mean-field expectation" in e for v in cb.diagnosis.verdicts for e in v.evidence)
    run = gradprobe.load_run(tmp_path)
    assert run.diagnosis == cb.diagnosis == run.diagnose()
    assert len(run.trace) == len(got)


def test_logs_per_layer_scalars_through_the_trainers_logger(tmp_path):
    net = _net(depth=3, act=nn.Tanh)
    cb = GradProbeCallback()
    trainer = _fit(net, [cb], logger=L.pytorch.loggers.CSVLogger(tmp_path, name="csv"), log_every_n_steps=2)
    with open(trainer.logger.log_dir + "/metrics.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("gradprobe/grad_norm/net.0")]
    # recorded at global steps 0..5, logged at 0, 2, 4 (and the last step)
    steps = [int(r["step"]) for r in rows]
    assert steps[:3] == [0, 2, 4]
    by_step = {f.step: f for f in cb.trace}
    for r in rows:
        f = by_step[int(r["step"])]
        for q in ("grad_norm", "output_grad_norm", "weight_norm"):
            for i, name in enumerate(f.names):
                assert float(r[f"gradprobe/{q}/{name}"]) == pytest.approx(f[q][i], rel=1e-6)


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_numbers_are_unscaled(precision):
    net = _net(depth=4, act=nn.Tanh)
    ref = GradProbeCallback()
    _fit(copy.deepcopy(net), [ref], precision="32-true", limit_train_batches=2)
    cb = GradProbeCallback()
    # on CPU, Trainer(precision="16-mixed") falls back to bf16; the plugin itself runs fp16 with a GradScaler
    kw = ({"plugins": [L.pytorch.plugins.precision.MixedPrecision("16-mixed", "cpu")]} if precision == "16-mixed"
          else {"precision": precision})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*autocast.*")
        _fit(net, [cb], limit_train_batches=2, **kw)
    a, b = ref.trace[0], cb.trace[0]
    for q in ("grad_norm", "output_grad_norm", "activation_norm"):
        np.testing.assert_allclose(b[q], a[q], rtol=5e-2, err_msg=q)  # half-precision rounding, not ×65536
    if precision == "16-mixed":
        assert b.tables["scaler"].column("scale")[0] == 2.0**16 and not b.skipped
    else:
        assert "scaler" not in b.tables
    assert cb.diagnosis is not None


def test_bad_options_fail_at_construction():
    with pytest.raises(ConfigError, match="not Probe options"):
        GradProbeCallback(hook=False)
    with pytest.raises(ConfigError, match="log_every_n_steps"):
        GradProbeCallback(log_every_n_steps=0)
    with pytest.raises(gradprobe.ProbeStateError, match="not started"):
        GradProbeCallback().trace


@pytest.mark.slow
def test_ddp_two_ranks_equal_one_process_on_the_global_batch(tmp_path):
    """Trainer(strategy="ddp_spawn", devices=2) on CPU/gloo: rank 0's run log holds the numbers of a
    single-process fit with the global batch (a DistributedSampler without shuffling deals rank r the
    samples r, r+2, ...: each step's two local batches are the single process's batch)."""
    net = _net(depth=4, act=nn.Tanh)
    ref = GradProbeCallback()
    _fit(copy.deepcopy(net), [ref], batch=2 * BATCH)
    cb = GradProbeCallback(log_dir=tmp_path / "runs", run_name="ddp")
    trainer = L.Trainer(callbacks=[cb], accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False)
    trainer.fit(_Sharded(net))
    logs = sorted((tmp_path / "runs").glob("*.sqlite"))
    assert [p.name for p in logs] == ["ddp.sqlite"]
    got = list(gradprobe.load_trace(logs[0]))
    assert len(got) == len(ref.trace) == N // (2 * BATCH)
    for a, b in zip(ref.trace, got):
        for q in QUANTITIES:
            np.testing.assert_allclose(b[q], a[q], rtol=1e-5, err_msg=q)
        assert b.loss == pytest.approx(a.loss, rel=1e-6)
