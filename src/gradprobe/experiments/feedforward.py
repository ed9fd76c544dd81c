"""Deep feed-forward experiments on scikit-learn's digits (a stand-in for the papers' data sets, said so).

* :class:`Glorot2010` — Glorot & Bengio 2010: sigmoid and tanh MLPs with the "standard" init
  U[±1/√n] (n·Var W = 1/3) and the normalized (Xavier) init U[±√6/√(n_in+n_out)], depths 1–8.
  Per-layer back-propagated gradient variance at init (measured by the probe) beside the mean-field
  prediction, the top hidden layer's saturation, and test error after a fixed budget.
* :class:`He2015` — He et al. 2015: a 30-layer ReLU MLP, Xavier vs He init: first/last-layer gradient
  ratio at init (theory: (σ_w²/2)^{29/2} for the norm) and whether training stalls.
* :class:`Schoenholz2017` — Schoenholz et al. 2017: tanh, σ_b² = 0.05, σ_w² ∈ [1, 4], depth up to a
  few hundred: training accuracy after a fixed budget over the (σ_w², depth) plane, with the
  mean-field 6·ξ_c line (``gradprobe.theory.mean_field(...).depth_scale``) beside the measured
  boundary.

The papers use MNIST/CIFAR-10 (Glorot: Shapeset, MNIST, CIFAR-10; He: ImageNet conv nets; Schoenholz:
MNIST and CIFAR-10) and widths of 1000 (Glorot), convolutional nets (He) and 300 units (Schoenholz).
Here: 1,797 8×8 digits (1,437 train / 360 test), widths 100–128, budgets of a few thousand updates.
The *gradient* statements at init do not depend on the data; the training statements are checked
on a smaller, easier problem and say so in the report.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gradprobe.errors import ConfigError
from gradprobe.experiments.data import digits
from gradprobe.experiments.reporting import glorot_report, he_report, schoenholz_report, xi_c
from gradprobe.experiments.runner import Experiment, Job, JobContext, RunOutput, derive_seed
from gradprobe.functional.gauss import gauss_expect
from gradprobe.models import DeepMLP
from gradprobe.monitor import Probe

__all__ = ["MLPPoint", "Glorot2010", "He2015", "Schoenholz2017", "train_mlp", "mean_field_profile", "INIT_SIGMA_W2", "xi_c"]

#: n·Var(W) of a square layer for each init (uniform U[±a] has variance a²/3)
INIT_SIGMA_W2 = {"standard": 1.0 / 3.0, "xavier": 1.0, "he": 2.0}
_PHI = {"tanh": (np.tanh, lambda u: 1.0 - np.tanh(u) ** 2),
        "sigmoid": (lambda u: 0.5 * (1 + np.tanh(0.5 * u)), lambda u: 0.25 * (1 - np.tanh(0.5 * u) ** 2)),
        "relu": (lambda u: np.maximum(u, 0.0), lambda u: (u > 0).astype(float))}


@dataclass(frozen=True)
class MLPPoint:
    """One network and training budget (every seed of a point shares it)."""

    activation: str
    init: str
    hidden_layers: int  # number of hidden width×width pre-activations h^1 … h^D
    width: int = 100
    sigma_w2: float | None = None  # init="gaussian"
    sigma_b2: float = 0.0
    steps: int = 2000
    batch: int = 32
    lr: float = 0.1
    optimizer: str = "sgd"
    eval_every: int = 250

    def __post_init__(self):
        if self.hidden_layers < 1:
            raise ConfigError(f"hidden_layers must be >= 1; got {self.hidden_layers}")
        if self.optimizer not in ("sgd", "rmsprop"):
            raise ConfigError(f"optimizer must be 'sgd' or 'rmsprop'; got {self.optimizer!r}")

    def build(self, generator: torch.Generator) -> DeepMLP:
        return DeepMLP(64, 10, width=self.width, depth=self.hidden_layers - 1, activation=self.activation,
                       init=self.init, sigma_w2=self.sigma_w2, sigma_b2=self.sigma_b2, generator=generator)


@lru_cache(maxsize=1)
def _data():
    return digits(test_fraction=0.2, seed=0)


def mean_field_profile(activation: str, sigma_w2: float, q1: float, n: int, sigma_b2: float = 0.0) -> np.ndarray:
    """Predicted ``ln(E‖δ^l‖²/E‖δ^D‖²)`` for hidden layers l = 1 … D = n (forward order; last entry 0).

    Mean field (Poole et al. 2016; Schoenholz et al. 2017) with the *layer-wise* variances, not the
    fixed point: ``q^{l+1} = σ_w² E[φ(√q^l z)²] + σ_b²`` from the first layer's measured ``q^1``, and
    ``E‖δ^l‖² = χ_l E‖δ^{l+1}‖²`` with ``χ_l = σ_w² E[φ'(√q^l z)²]`` (square layers, weight variance
    σ_w²/n). Glorot & Bengio's uniform inits enter through their variance only (``INIT_SIGMA_W2``).
    """
    phi, dphi = _PHI[activation]
    qs = [q1]
    for _ in range(n - 1):
        qs.append(sigma_w2 * gauss_expect(lambda u: phi(u) ** 2, qs[-1]) + sigma_b2)
    chis = [sigma_w2 * gauss_expect(lambda u: dphi(u) ** 2, q) for q in qs[:-1]]
    logs = np.concatenate([np.cumsum(np.log(chis)[::-1])[::-1], [0.0]])
    return logs


def _optimizer(point: MLPPoint, params):
    if point.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=point.lr)
    return torch.optim.SGD(params, lr=point.lr)


@torch.no_grad()
def _accuracy(model, x, y) -> float:
    model.eval()
    acc = float((model(x).argmax(-1) == y).double().mean())
    model.train()
    return acc


def train_mlp(point: MLPPoint, seed: int) -> tuple[dict, list, list]:
    """Measure the network at init with the probe, then train it for ``point.steps`` updates.

    Returns ``(result, metrics, arrays)``: the result holds the gradient profile at init (``ln`` of
    the squared-norm ratio of every hidden layer to the top one, measured and predicted), the top
    hidden layer's mean activation and saturated fraction at init and at the end, train/test
    accuracy and loss at the end; metrics are ``train_loss``, ``test_error`` and ``grad_ratio``
    (first/last hidden-layer ‖∂L/∂h‖ from the probe) every ``eval_every`` updates.
    """
    data = _data()
    g = torch.Generator().manual_seed(derive_seed(seed, "init") % (2**63))
    torch.manual_seed(derive_seed(seed, "torch") % (2**63))
    model = point.build(g)
    batches = torch.Generator().manual_seed(derive_seed(seed, "batches") % (2**63))
    opt = _optimizer(point, model.parameters())
    hidden = [model.input] + [b.linear for b in model.blocks]  # the D hidden pre-activations h^1 … h^D
    top_act = model.blocks[-1].act if len(model.blocks) else model.input_act
    captured = {}
    handle = top_act.register_forward_hook(lambda m, i, o: captured.__setitem__("top", o.detach()))
    metrics, arrays = [], []
    n_train = data.x_train.shape[0]
    x_probe, y_probe = data.x_train[:256], data.y_train[:256]
    result: dict = {}
    try:
        with Probe(model, update_ratio=False, every=1) as probe:  # fixed schedule: every measure() is recorded
            wanted = _qualnames(model, hidden)

            def measure(step: int, x, y) -> dict:
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                flow = probe.step(loss)
                idx = [flow.names.index(n) for n in wanted]  # the flow lists layers in forward order
                sq = flow.output_grad_norm[idx] ** 2
                top = captured["top"]
                sat = _saturated(point.activation, top)
                return dict(loss=loss.item(), sq=sq, top_mean=float(top.mean()), top_saturated=sat)

            model.zero_grad(set_to_none=True)
            m0 = measure(0, x_probe, y_probe)
            with torch.no_grad():
                q1 = float(model.input(x_probe).pow(2).mean())
            sw2 = point.sigma_w2 if point.init == "gaussian" else INIT_SIGMA_W2.get(point.init, math.nan)
            measured = np.log(m0["sq"] / m0["sq"][-1])
            predicted = mean_field_profile(point.activation, sw2, q1, point.hidden_layers, point.sigma_b2) \
                if point.activation in _PHI and math.isfinite(sw2) else np.full(point.hidden_layers, math.nan)
            arrays += [(0, "log_grad_sq_ratio_measured", measured), (0, "log_grad_sq_ratio_predicted", predicted)]
            result.update(grad_log_ratio_first=float(measured[0]), grad_log_ratio_predicted=float(predicted[0]),
                          top_mean_init=m0["top_mean"], top_saturated_init=m0["top_saturated"], loss_init=m0["loss"],
                          q1=q1, sigma_w2=sw2)
            model.zero_grad(set_to_none=True)
            diverged = None
            losses = []
            for step in range(1, point.steps + 1):
                i = torch.randint(0, n_train, (point.batch,), generator=batches)
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(data.x_train[i]), data.y_train[i])
                if not torch.isfinite(loss):
                    diverged = step
                    break
                loss.backward()
                opt.step()
                losses.append(loss.item())
                if step % point.eval_every == 0 or step == point.steps:
                    opt.zero_grad(set_to_none=True)
                    m = measure(step, x_probe, y_probe)
                    model.zero_grad(set_to_none=True)
                    ratio = math.sqrt(m["sq"][0] / m["sq"][-1]) if m["sq"][-1] > 0 else math.nan
                    metrics += [(step, "train_loss", float(np.mean(losses[-point.eval_every:]))),
                                (step, "test_error", 1.0 - _accuracy(model, data.x_test, data.y_test)),
                                (step, "grad_ratio", ratio), (step, "top_mean", m["top_mean"]),
                                (step, "top_saturated", m["top_saturated"])]
            tail = losses[-max(1, len(losses) // 10):] if losses else [math.nan]
            result.update(
                diverged_at=diverged, steps=point.steps,
                train_loss_end=float(np.mean(tail)), loss_chance=math.log(10.0),
                train_accuracy=_accuracy(model, data.x_train, data.y_train) if diverged is None else 0.1,
                test_error=1.0 - _accuracy(model, data.x_test, data.y_test) if diverged is None else 0.9,
                top_mean_end=float(captured["top"].mean()) if diverged is None else math.nan,
                top_saturated_end=_saturated(point.activation, captured["top"]) if diverged is None else math.nan,
            )
    finally:
        handle.remove()
    return result, metrics, arrays


def _qualnames(model: nn.Module, mods) -> list[str]:
    names = {id(m): n for n, m in model.named_modules()}
    return [names[id(m)] for m in mods]


def _saturated(activation: str, out: torch.Tensor, eps: float = 0.05) -> float:
    """Fraction of units within ``eps`` of a saturation value (sigmoid 0 or 1, tanh ±1, ReLU: dead = 0)."""
    if activation == "sigmoid":
        return float(((out < eps) | (out > 1 - eps)).double().mean())
    if activation == "tanh":
        return float((out.abs() > 1 - eps).double().mean())
    if activation == "relu":
        return float((out <= 0).double().mean())
    return math.nan


class _MLPExperiment(Experiment):
    """Shared plumbing: one job per point, seeds trained one after another."""

    version = "2"  # 2: the probe records every evaluation (1 lost the gradient-ratio series after 8)
    PROFILES: dict = {}

    def config(self, profile: str):
        self._check_profile(profile)
        return self.PROFILES[profile]

    def jobs(self, config) -> list[Job]:
        points, seeds = config
        out = []
        for p in points:
            out.append(Job(tuple(self.spec(p, s) for s in range(seeds)), self._label(p)))
        return out

    def _label(self, p: MLPPoint) -> str:
        return f"{p.activation} {p.init} D={p.hidden_layers}"

    def run_job(self, job: Job, ctx: JobContext) -> dict[str, RunOutput]:
        point = MLPPoint(**job.config)
        out = {}
        for i, r in enumerate(job.runs):
            res, m, a = train_mlp(point, r.seed)
            out[r.key] = RunOutput(res, m, a)
            ctx.progress((i + 1) / len(job.runs))
        return out


def _grid(base: MLPPoint, **axes) -> list[MLPPoint]:
    pts = [base]
    for name, values in axes.items():
        pts = [replace(p, **{name: v}) for p in pts for v in values]
    return pts


class Glorot2010(_MLPExperiment):
    name = "glorot2010"
    title = "Glorot & Bengio 2010: standard vs normalized init, sigmoid and tanh, depths 1–8 (digits stand-in)"
    paper = "Glorot & Bengio 2010, Understanding the difficulty of training deep feedforward neural networks"
    PROFILES = {
        "smoke": (_grid(MLPPoint("tanh", "standard", 2, width=32, steps=20, eval_every=10),
                        init=("standard", "xavier")), 1),
        "quick": (_grid(MLPPoint("tanh", "standard", 1, width=100, steps=2000, lr=0.1),
                        activation=("sigmoid", "tanh"), init=("standard", "xavier"), hidden_layers=(1, 2, 4, 5, 8)), 3),
        "paper": (_grid(MLPPoint("tanh", "standard", 1, width=1000, steps=20_000, lr=0.1),
                        activation=("sigmoid", "tanh"), init=("standard", "xavier"),
                        hidden_layers=tuple(range(1, 9))), 5),
    }

    def report(self, runs, store, out_dir):
        return glorot_report(self, runs, store, out_dir)


class He2015(_MLPExperiment):
    name = "he2015"
    title = "He et al. 2015: a 30-layer ReLU MLP, Xavier vs He init (digits stand-in)"
    paper = "He, Zhang, Ren & Sun 2015, Delving deep into rectifiers"
    PROFILES = {
        "smoke": (_grid(MLPPoint("relu", "he", 30, width=32, steps=20, eval_every=10, lr=0.01), init=("xavier", "he")), 1),
        "quick": (_grid(MLPPoint("relu", "he", 30, width=128, steps=3000, lr=0.01), init=("xavier", "he")), 3),
        "paper": (_grid(MLPPoint("relu", "he", 30, width=512, steps=30_000, lr=0.01), init=("xavier", "he")), 5),
    }

    def report(self, runs, store, out_dir):
        return he_report(self, runs, store, out_dir)


class Schoenholz2017(_MLPExperiment):
    name = "schoenholz2017"
    title = "Schoenholz et al. 2017: trainable depth of tanh nets vs 6·ξ_c (σ_b² = 0.05; digits stand-in)"
    paper = "Schoenholz, Gilmer, Ganguli & Sohl-Dickstein 2017, Deep information propagation"
    # RMSProp lr 1e-5: at 1e-3 (the first quick sweep) every net of depth ≥ 40 collapsed to the class prior
    # (loss 2.317 > ln 10) whatever σ_w², so the budget, not signal propagation, set the boundary; at 1e-5 a
    # critical 160-layer net trains within 600 updates (measured, EXPERIMENTS.md).
    _base = MLPPoint("tanh", "gaussian", 10, width=100, sigma_w2=1.0, sigma_b2=0.05, steps=600, lr=1e-5,
                     optimizer="rmsprop", eval_every=200)
    PROFILES = {
        "smoke": (_grid(replace(_base, width=16, steps=10, eval_every=5), sigma_w2=(1.0, 2.5), hidden_layers=(4, 12)), 1),
        "quick": (_grid(_base, sigma_w2=(1.0, 1.5, 1.76, 2.0, 2.5, 3.0, 4.0), hidden_layers=(10, 20, 40, 80, 160)), 1),
        "paper": (_grid(replace(_base, width=300, steps=5000),
                        sigma_w2=tuple(np.round(np.linspace(1.0, 4.0, 13), 3).tolist()),
                        hidden_layers=(10, 20, 40, 60, 80, 120, 160, 200, 250, 300)), 1),
    }

    def _label(self, p: MLPPoint) -> str:
        return f"σw²={p.sigma_w2} D={p.hidden_layers}"

    def report(self, runs, store, out_dir):
        return schoenholz_report(self, runs, store, out_dir)
