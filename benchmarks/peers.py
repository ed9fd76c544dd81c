"""The workloads and the instrumentations ("peers") that ``bench_probe_overhead.py`` times side by side.

Each peer is a function ``make(model, case, opt) -> Instr`` that instruments *its own* copy of the
model the way a user of that tool would, and returns what the shared training step needs:

* ``after(loss)`` — called between ``loss.backward()`` and ``opt.step()`` (where ``probe.step()``,
  Lightning's ``on_before_optimizer_step`` and the floors run);
* ``backward(loss, out)`` — how the step runs backward (default ``loss.backward()``; Cockpit wraps it
  in its context, which is where it computes);
* ``loss_fn`` — the loss module to use (Cockpit needs a BackPACK-extended one);
* ``close()`` — remove every hook.

The wandb rows are stand-ins written from what ``wandb.watch`` does (wandb's
``integration/torch/wandb_torch.py``, 0.2x): with ``log="gradients"`` (its default) it registers one
tensor hook per parameter (``param.register_hook``) that counts backward passes and, on every
``log_freq``-th one (default 1000), computes a 64-bin histogram of that gradient: a detached copy, a
check that some entry is finite (``.item()``), removal of non-finite entries if any, ``min().item()``
and ``max().item()``, ``histc(bins=64, min, max)``, a host copy, ``linspace`` of the 65 bin edges and
``tolist()`` of both, handed to the run's history (``commit=False``). What happens after that
(serialising and sending the history from wandb's service process) is not reproduced: wandb is not
installed (it needs ``wandb.init`` and a background service; see BENCHMARKS.md). ``wandb.watch`` has no
norm-only mode; the "norm hooks" row is the same hook placement with the cheapest statistic (a norm
per parameter, ``.item()`` each when logging), a lower bound of any hook-based logger.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from gradprobe import Probe
from gradprobe.models import DeepMLP


# --------------------------------------------------------------------------- workloads
@dataclass
class Case:
    name: str
    description: str
    make_model: Callable[[], nn.Module]
    x: torch.Tensor
    y: torch.Tensor
    loss: str  # "ce" (cross-entropy over classes) or "mse"
    pick: Callable[[object], torch.Tensor] = lambda out: out  # the tensor the loss reads from the model output

    def loss_fn(self, out, y):
        out = self.pick(out)
        return F.cross_entropy(out, y) if self.loss == "ce" else F.mse_loss(out, y)

    def individual_losses(self, out, y):
        """``(B,)`` per-example losses (what Cockpit's ``info["individual_losses"]`` wants)."""
        out = self.pick(out)
        if self.loss == "ce":
            return F.cross_entropy(out, y, reduction="none")
        return F.mse_loss(out, y, reduction="none").flatten(1).mean(1)


class BasicBlock(nn.Module):
    """He et al. 2016's two-convolution residual block: ``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu2 = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:  # 1×1 projection (He et al.'s option B)
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        h = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(h)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 (He et al. 2016: 4 stages × 2 BasicBlocks, 64–128–256–512 channels) with the 3×3,
    stride-1 stem used for 32×32 inputs (no max-pool); 11.2 M parameters, 62 parameter tensors.
    Built here because PyPI's torchvision does not import beside torch 2.13.0."""

    def __init__(self, n_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        blocks, c = [], 64
        for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [BasicBlock(c, c_out, stride), BasicBlock(c_out, c_out, 1)]
            c = c_out
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(512, n_classes)

    def forward(self, x):
        return self.fc(self.flatten(self.pool(self.layers(self.stem(x)))))


def make_cases() -> dict[str, Case]:
    g = torch.Generator().manual_seed(0)
    cases = {}
    cases["mlp"] = Case(
        "mlp", "DeepMLP(256→10, width 256, depth 18 ⇒ 20 Linear layers, ReLU, He), batch 128, cross-entropy",
        lambda: DeepMLP(256, 10, width=256, depth=18, activation="relu", init="he"),
        torch.randn(128, 256, generator=g), torch.randint(0, 10, (128,), generator=g), "ce",
    )
    cases["mlp_narrow"] = Case(
        "mlp_narrow", "DeepMLP(64→10, width 64, depth 18 ⇒ 20 Linear layers, ReLU, He), batch 128, cross-entropy",
        lambda: DeepMLP(64, 10, width=64, depth=18, activation="relu", init="he"),
        torch.randn(128, 64, generator=g), torch.randint(0, 10, (128,), generator=g), "ce",
    )
    cases["lstm"] = Case(
        "lstm", "nn.LSTM(32, 128, batch_first), 100 time steps, batch 32, MSE on the output sequence",
        lambda: nn.LSTM(32, 128, batch_first=True),
        torch.randn(32, 100, 32, generator=g), torch.randn(32, 100, 128, generator=g), "mse",
        pick=lambda out: out[0],
    )
    cases["transformer"] = Case(
        "transformer",
        "nn.TransformerEncoder(4 × TransformerEncoderLayer(d=128, nhead=4, ff=512, dropout=0.1)), seq 64, batch 16, MSE",
        lambda: nn.TransformerEncoder(
            nn.TransformerEncoderLayer(128, 4, dim_feedforward=512, batch_first=True), num_layers=4, enable_nested_tensor=False
        ),
        torch.randn(16, 64, 128, generator=g), torch.randn(16, 64, 128, generator=g), "mse",
    )
    cases["resnet"] = Case(
        "resnet", "ResNet-18 (BasicBlock, 11.2 M parameters, built locally), 3×32×32 inputs, batch 16, 10 classes, cross-entropy",
        ResNet18, torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g), "ce",
    )
    return cases


# --------------------------------------------------------------------------- instrumentations
def _noop(loss) -> None:
    return None


@dataclass
class Instr:
    after: Callable = _noop
    close: Callable[[], None] = lambda: None
    backward: Callable | None = None  # (loss, out) -> None; None: loss.backward()
    loss_fn: Callable | None = None  # (out, y) -> loss; None: the case's
    info: dict = field(default_factory=dict)  # shown in the report (e.g. the budgeted probe's cadence)
    heavy: bool = False  # orders of magnitude slower than a step: one step per timed block


class PeerUnavailable(RuntimeError):
    """The peer cannot run on this model (the message says why, in the report)."""


def probe(cls=None, **kw):
    """A gradprobe configuration: ``cls(model, **kw)`` (``cls``: ``Probe``, or another checkout's ``Probe``
    for an A/B run), stepped after backward."""
    def make(model, case, opt):
        p = (cls or Probe)(model, **kw)
        inst = Instr(after=p.step, close=p.close)
        inst.probe = p
        return inst

    return make


def lightning_grad_norm(model, case, opt):
    from lightning.pytorch.utilities import grad_norm

    # what a LightningModule's on_before_optimizer_step calls (self.log_dict of the result not included)
    return Instr(after=lambda loss: grad_norm(model, norm_type=2))


class WandbNormHooks:
    """One tensor hook per parameter storing that gradient's norm; ``.item()`` of each every step."""

    def __init__(self, model: nn.Module):
        self.norms: dict[str, torch.Tensor] = {}
        self.logged: dict[str, float] = {}
        self.handles = [p.register_hook(self._hook(n)) for n, p in model.named_parameters() if p.requires_grad]

    def _hook(self, name):
        def hook(grad):
            self.norms[name] = grad.detach().norm()

        return hook

    def log(self, loss) -> None:
        self.logged = {n: v.item() for n, v in self.norms.items()}
        self.norms.clear()

    def close(self) -> None:
        for h in self.handles:
            h.remove()


class WandbHistograms:
    """Stand-in of ``wandb.watch(model, log="gradients", log_freq=N)`` (see the module docstring)."""

    BINS = 64

    def __init__(self, model: nn.Module, log_freq: int):
        self.log_freq = int(log_freq)
        self.history: dict[str, dict] = {}
        self.handles = []
        for name, p in model.named_parameters():
            if p.requires_grad:
                count = [0]  # backward passes seen by this parameter since it last logged
                self.handles.append(p.register_hook(self._hook("gradients/" + name, count)))

    def _hook(self, key, count):
        def hook(grad):
            count[0] += 1
            if count[0] < self.log_freq:
                return
            count[0] = 0
            self._histogram(grad, key)

        return hook

    def _histogram(self, grad: torch.Tensor, key: str) -> None:
        flat = grad.detach().clone().reshape(-1)
        if flat.dtype not in (torch.float32, torch.float64):
            flat = flat.float()
        finite = torch.isfinite(flat)
        if flat.numel() == 0 or not finite.any().item():
            return
        if not finite.all():
            flat = flat[finite]
        lo, hi = flat.min().item(), flat.max().item()
        if lo == hi:
            counts, edges = torch.tensor([float(flat.numel())]), torch.tensor([lo, hi])
        else:
            counts = flat.histc(bins=self.BINS, min=lo, max=hi).cpu().clone()
            edges = torch.linspace(lo, hi, steps=self.BINS + 1)
        self.history[key] = {"values": counts.tolist(), "bins": edges.tolist()}

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def wandb_norm_hooks(model, case, opt):
    w = WandbNormHooks(model)
    return Instr(after=w.log, close=w.close)


def wandb_histograms(log_freq: int):
    def make(model, case, opt):
        w = WandbHistograms(model, log_freq)
        return Instr(close=w.close)

    return make


def _cockpit(quantities: str):
    """Cockpit (Schneider, Dangel & Hennig 2021) as its README trains: the model and the loss extended
    by BackPACK, ``with cockpit(step, info=...)`` around ``loss.backward()``, every quantity tracked
    every step (``schedules.linear(1)``)."""

    def make(model, case, opt):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # cockpit imports pkg_resources (deprecated)
            from backpack import extend
            from cockpit import Cockpit, quantities as q
            from cockpit.utils import schedules
            from cockpit.utils.configuration import configuration

        every = schedules.linear(interval=1)
        if quantities == "gradnorm":
            quants = [q.GradNorm(track_schedule=every)]
        else:
            quants = configuration(quantities, track_schedule=every)
        clash = [n for n, _ in model.named_children() if n == "output" or n.startswith("input")]
        if clash:
            # BackPACK stores a module's forward input/output as its attributes `input0`/`output`,
            # which clashes with children of those names (DeepMLP's `input`/`output` layers are fine,
            # its root's attribute is not): extend the children, as the root owns no parameter
            for child in model.children():
                extend(child)
        else:
            extend(model)
        loss_mod = extend(nn.CrossEntropyLoss() if case.loss == "ce" else nn.MSELoss())
        cp = Cockpit(model.parameters(), quantities=quants)
        state = {"step": 0}

        def loss_fn(out, y):
            return loss_mod(case.pick(out), y)

        def backward(loss, out):
            t = state["step"]
            info = {"batch_size": case.x.shape[0], "loss": loss, "optimizer": opt}
            if quantities != "gradnorm":
                info["individual_losses"] = case.individual_losses(out, case.y)
            with cp(t, info=info):
                loss.backward(create_graph=cp.create_graph(t))
            state["step"] = t + 1

        def close():
            for m in model.modules():  # extend() registered a forward and a full backward hook on each
                m._forward_hooks.clear()
                m._backward_hooks.clear()
                if hasattr(m, "_backpack_extend"):
                    del m._backpack_extend

        return Instr(backward=backward, loss_fn=loss_fn, close=close, heavy=quantities != "gradnorm")

    return make


def floor_grads(model, case, opt):
    """The least a post-backward reader of ``.grad`` can do: one fused norm kernel, one host copy."""
    params = [p for p in model.parameters() if p.requires_grad]

    def after(loss):
        return torch.stack(torch._foreach_norm([p.grad for p in params])).cpu().numpy()

    return Instr(after=after)


def floor_grads_weights10(model, case, opt):
    """Gradient norms every step and weight norms every 10th, each one fused kernel + one host copy."""
    params = [p for p in model.parameters() if p.requires_grad]
    state = {"t": 0}

    def after(loss):
        ts = [p.grad for p in params]
        if state["t"] % 10 == 0:
            ts = ts + [p.detach() for p in params]
        state["t"] += 1
        return torch.stack(torch._foreach_norm(ts)).cpu().numpy()

    return Instr(after=after)


#: every configuration, in report order: name -> (description, make)
GRAD_NORMS_ONLY = {"weights": 1024, "outputs": 1024, "units": 1024}
PEERS: dict[str, tuple[str, Callable]] = {
    "plain": ("no instrumentation (the baseline)", lambda m, c, o: Instr()),
    "plain_again": ("a second uninstrumented copy: the A/A control", lambda m, c, o: Instr()),
    "gp_default": ("gradprobe `Probe(model)`: the 3 % overhead budget", probe()),
    "gp_params_every_step": ("`Probe(model, hooks=False, update_ratio=False, budget=None)`: gradient and weight norms every step",
                             probe(hooks=False, update_ratio=False, budget=None)),
    "gp_grad_norms_only": ("`Probe(model, cadence={weights/outputs/units: 1024})`: gradient norms every step",
                           probe(cadence=GRAD_NORMS_ONLY)),
    "gp_everything": ("`Probe(model, budget=None)`: every recorder every step", probe(budget=None)),
    "lightning_grad_norm": ("Lightning `grad_norm(model, norm_type=2)` every step (logging not included)", lightning_grad_norm),
    "wandb_norm_hooks": ("wandb-style: a tensor hook per parameter, its norm, `.item()` each step", wandb_norm_hooks),
    "wandb_hist_freq1": ("wandb.watch stand-in, 64-bin gradient histograms, `log_freq=1`", wandb_histograms(1)),
    "wandb_hist_freq1000": ("wandb.watch stand-in, 64-bin gradient histograms, `log_freq=1000` (its default)", wandb_histograms(1000)),
    "cockpit_gradnorm": ("Cockpit with only `GradNorm` (BackPACK-extended model and loss)", _cockpit("gradnorm")),
    "cockpit_economy": ("Cockpit `configuration(\"economy\")` every step", _cockpit("economy")),
    "floor_grads": ("floor: one `_foreach_norm` over the gradients + one host copy", floor_grads),
    "floor_grads+weights/10": ("floor: that, plus the weights' norms every 10th step", floor_grads_weights10),
}


def instrument(name: str, proto: nn.Module, case: Case, lr: float = 1e-3):
    """``(model, opt, Instr)``: a fresh copy of ``proto`` instrumented by peer ``name``."""
    model = copy.deepcopy(proto)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    return model, opt, PEERS[name][1](model, case, opt)
