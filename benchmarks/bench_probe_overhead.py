"""Overhead of gradprobe's per-step recording vs a plain training step (issue 2 §5).

Budgets (issue 2): per-layer parameter-gradient statistics every step ≤ 3% of a plain training step
(``Probe(model, hooks=False, update_ratio=False)``; ``update_ratio=True`` reported separately);
with the back-propagated signal ‖∂L/∂h_l‖ (``hooks=True``) ≤ 10%.

Every configuration owns an identical copy of the model (same initial weights) and its own SGD
optimizer, and runs the *same* :func:`train_step`; the only difference is the ``after_backward``
callback and whatever hooks the instrumentation installed. Timing is paired and interleaved (see
``_harness.py``): we report the median over rounds of ``t_config / t_plain`` within the same round.
``plain_again`` is a second, identical, uninstrumented copy: its ratio is the noise floor (an A/A
test) and should be ≈ 1.000.

Run::

    python benchmarks/bench_probe_overhead.py --quick     # < 2 min
    python benchmarks/bench_probe_overhead.py             # < 10 min (the numbers in BENCHMARKS.md)
    python benchmarks/bench_probe_overhead.py --profile probe_full --case mlp   # where the time goes
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import PairedStats, markdown_table, measure  # noqa: E402

import gradprobe  # noqa: E402
from gradprobe import Probe  # noqa: E402
from gradprobe.models import DeepMLP  # noqa: E402

# Issue 2 §5 budgets. ``probe_params+ur`` (update ratio on, hooks off) has no budget of its own:
# it is reported next to ``probe_params`` so the price of the update ratio is visible.
BUDGET = {"probe_params": 3.0, "probe_hooks": 10.0, "probe_full": 10.0}


# --------------------------------------------------------------------------- the three workloads
@dataclass
class Case:
    name: str
    description: str
    make_model: Callable[[], nn.Module]
    x: torch.Tensor
    y: torch.Tensor
    loss_fn: Callable[[object, torch.Tensor], torch.Tensor]


def _lstm_loss(out, y):
    seq, _ = out  # (B, T, H); the loss is on every output of the sequence
    return F.mse_loss(seq, y)


def make_cases() -> dict[str, Case]:
    g = torch.Generator().manual_seed(0)
    cases = {}
    # (a) 20 Linear layers of width 256 (input projection + 18 hidden + output), ReLU, He init
    cases["mlp"] = Case(
        "mlp",
        "DeepMLP(256→10, width 256, depth 18 ⇒ 20 Linear layers, ReLU, He), batch 128, cross-entropy",
        lambda: DeepMLP(256, 10, width=256, depth=18, activation="relu", init="he"),
        torch.randn(128, 256, generator=g),
        torch.randint(0, 10, (128,), generator=g),
        F.cross_entropy,
    )
    # (b) one nn.LSTM layer, hidden 128, 100 time steps, batch 32, input 32, MSE on all outputs
    cases["lstm"] = Case(
        "lstm",
        "nn.LSTM(32, 128, batch_first), 100 time steps, batch 32, MSE on the output sequence",
        lambda: nn.LSTM(32, 128, batch_first=True),
        torch.randn(32, 100, 32, generator=g),
        torch.randn(32, 100, 128, generator=g),
        _lstm_loss,
    )
    # (c) 4 post-norm encoder layers, d_model 128, 4 heads, FFN 512 (4·d), seq 64, batch 16
    cases["transformer"] = Case(
        "transformer",
        "nn.TransformerEncoder(4 × TransformerEncoderLayer(d=128, nhead=4, ff=512, dropout=0.1)), seq 64, batch 16, MSE",
        lambda: nn.TransformerEncoder(
            nn.TransformerEncoderLayer(128, 4, dim_feedforward=512, batch_first=True),
            num_layers=4,
            enable_nested_tensor=False,
        ),
        torch.randn(16, 64, 128, generator=g),
        torch.randn(16, 64, 128, generator=g),
        F.mse_loss,
    )
    return cases


# --------------------------------------------------------------------------- one training step
def train_step(model, opt, x, y, loss_fn, after_backward, timer) -> None:
    """The one step every configuration runs; ``after_backward(loss)`` is the instrumentation point
    (where Lightning's ``on_before_optimizer_step`` and ``probe.step()`` go). Its duration is recorded
    in ``timer`` for every configuration alike, so the two clock reads cost everyone the same."""
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), y)
    loss.backward()
    t0 = time.process_time_ns()
    after_backward(loss)
    timer.append(time.process_time_ns() - t0)
    opt.step()


def _noop(loss) -> None:
    return None


class WandbStyleWatch:
    """What ``wandb.watch(model, log="gradients")`` does with histograms off: one tensor hook per
    parameter computing that gradient's norm during backward, and ``.item()`` per parameter when
    logging (here: every step)."""

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


def load_alt_probe(src: Path, label: str = "alt"):
    """``Probe`` from another gradprobe source tree (e.g. a patch under review), importable next to
    the installed one: the package is copied to a temporary directory as ``gradprobe_<label>`` with
    its absolute imports rewritten, so several versions can be timed in the same interleaved run."""
    import importlib
    import re
    import shutil
    import tempfile

    pkg = Path(src) / "gradprobe"
    if not (pkg / "__init__.py").is_file():
        raise SystemExit(f"--alt {src}: no gradprobe package there (expected {pkg}/__init__.py)")
    tmp = Path(tempfile.mkdtemp(prefix="gradprobe_alt_"))
    mod = f"gradprobe_{label}"
    shutil.copytree(pkg, tmp / mod, ignore=shutil.ignore_patterns("__pycache__"))
    for f in (tmp / mod).rglob("*.py"):
        f.write_text(re.sub(r"\bgradprobe\b(?=[.\s])", mod, f.read_text()))
    sys.path.insert(0, str(tmp))
    return importlib.import_module(mod).Probe


@dataclass
class Config:
    """One instrumented copy of the model: ``step()`` runs :func:`train_step` on it."""

    model: nn.Module
    opt: torch.optim.Optimizer
    after: Callable[[torch.Tensor], object]  # called between backward() and opt.step()
    cleanup: Callable[[], None]
    timer: list  # CPU ns of each ``after`` call

    def step(self) -> None:
        train_step(self.model, self.opt, self.x, self.y, self.loss_fn, self.after, self.timer)


def build_configs(case: Case, which: list[str] | None = None, alt_probes=None) -> dict[str, Config]:
    """``{name: Config}``; each config gets its own identical model copy.

    With ``alt_probes = {label: Probe class}`` (see :func:`load_alt_probe`) every ``probe_*`` config
    also runs as ``label:probe_*`` with that implementation."""
    from lightning.pytorch.utilities import grad_norm

    torch.manual_seed(0)
    proto = case.make_model()
    specs: dict[str, Callable[[nn.Module], tuple[Callable, Callable]]] = {
        "plain": lambda m: (_noop, lambda: None),
        "plain_again": lambda m: (_noop, lambda: None),
    }

    def probe(cls=Probe, **kw):
        def make(m):
            p = cls(m, **kw)
            return p.step, p.close

        return make

    specs["probe_params"] = probe(hooks=False, update_ratio=False)
    specs["probe_params+ur"] = probe(hooks=False, update_ratio=True)
    specs["probe_hooks"] = probe(hooks=True, update_ratio=False)
    specs["probe_full"] = probe(hooks=True, update_ratio=True)
    for label, cls in (alt_probes or {}).items():
        for name in [k for k in specs if k.startswith("probe_") and "@" not in k]:
            kw = dict(hooks="hooks" in name or "full" in name, update_ratio="ur" in name or "full" in name)
            specs[f"{label}:{name}"] = probe(cls, **kw)
    # the unit statistics (saturated / dead units) that hooks=True records by default, switched off
    specs["probe_hooks@nounits"] = probe(hooks=True, update_ratio=False, units=False)
    # sampling: the same recording on one step in 4 (hooks idle on the others)
    specs["probe_params@every4"] = probe(hooks=False, update_ratio=False, every=4)
    specs["probe_full@every4"] = probe(hooks=True, update_ratio=True, every=4)
    specs["lightning_grad_norm"] = lambda m: ((lambda loss: grad_norm(m, norm_type=2)), lambda: None)

    def wandb(m):
        w = WandbStyleWatch(m)
        return w.log, w.close

    specs["wandb_style_hooks"] = wandb

    def floor(m):
        # the least a post-backward reader of .grad can do: one batched norm kernel, one host copy
        params = [p for p in m.parameters() if p.requires_grad]

        def grad_norms(loss):
            return torch.stack(torch._foreach_norm([p.grad for p in params])).cpu().numpy()

        return grad_norms, lambda: None

    specs["floor_foreach_grad_norms"] = floor

    def floor_gw(m):
        params = [p for p in m.parameters() if p.requires_grad]

        def grad_weight_norms(loss):
            ts = [p.grad for p in params] + [p.detach() for p in params]
            return torch.stack(torch._foreach_norm(ts)).cpu().numpy()

        return grad_weight_norms, lambda: None

    specs["floor_foreach_grad+weight_norms"] = floor_gw
    if which:
        specs = {k: v for k, v in specs.items() if k.split(":")[-1] in which or k in ("plain", "plain_again")}
    configs = {}
    for name, make in specs.items():
        model = copy.deepcopy(proto)
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        after, cleanup = make(model)
        cfg = Config(model, opt, after, cleanup, [])
        cfg.x, cfg.y, cfg.loss_fn = case.x, case.y, case.loss_fn
        configs[name] = cfg
    return configs


# --------------------------------------------------------------------------- running
def run_case(case: Case, *, rounds: int, block_s: float, warmup: int, which=None, alt_probes=None, verbose=True):
    configs = build_configs(case, which, alt_probes)
    plain = configs["plain"].step
    for _ in range(warmup):
        plain()
    t0 = time.process_time()  # CPU time: a wall-clock estimate on a busy machine would shrink the blocks
    for _ in range(3):
        plain()
    est = (time.process_time() - t0) / 3
    steps = max(1, round(block_s / est))
    if verbose:
        print(f"[{case.name}] plain ≈ {est * 1e3:.1f} ms/step → {steps} steps/block, {rounds} rounds", file=sys.stderr)
    for c in configs.values():
        c.timer.clear()
    stats = measure(
        {k: c.step for k, c in configs.items()},
        baseline="plain",
        rounds=rounds,
        steps_per_round=steps,
        warmup_steps=warmup,
    )
    call_ms = {k: float(np.median(c.timer)) / 1e6 for k, c in configs.items()}
    for c in configs.values():
        c.cleanup()
    return stats, call_ms, steps


def _verdict(name: str, s: PairedStats) -> str:
    b = BUDGET.get(name.split(":")[-1])
    if b is None:
        return ""
    lo, hi = (100 * (c - 1) for c in s.ci)
    if hi <= b:
        return f"≤ {b:g}% ✅"
    if lo > b:
        return f"> {b:g}% ❌"
    return f"≈ {b:g}% (CI straddles)"


def environment() -> str:
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=Path(gradprobe.__file__).parent, capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:  # noqa: BLE001 - best effort for the report header
            return "?"

    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import lightning

    return "\n".join(
        [
            f"- date (UTC): {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M}",
            f"- machine: {platform.machine()}, {cpu}, nproc={os.cpu_count()}, torch threads={torch.get_num_threads()}",
            f"- python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, lightning {lightning.__version__}",
            f"- gradprobe {gradprobe.__version__} from {Path(gradprobe.__file__).parent} (git {git('rev-parse', '--short', 'HEAD')}{' + local changes' if git('status', '--porcelain', '.') else ''})",
            f"- command: `{' '.join([Path(sys.executable).name, *sys.argv])}`",
        ]
    )


def phases(case: Case, steps: int, which=None, alt_probes=None) -> str:
    """Median CPU time of each phase of the step (forward, backward, after_backward, optimizer),
    configurations interleaved step by step: attributes an overhead to the phase that pays it."""
    configs = build_configs(case, which, alt_probes)
    clock = time.thread_time_ns  # this thread only: autograd on CPU runs backward on the caller
    rec = {k: [] for k in configs}
    for i in range(steps + 10):
        for name, c in configs.items():
            # the operations of train_step, with a clock read between phases
            model, opt, after = c.model, c.opt, c.after
            t0 = clock()
            opt.zero_grad(set_to_none=True)
            loss = case.loss_fn(model(case.x), case.y)
            t1 = clock()
            loss.backward()
            t2 = clock()
            after(loss)
            t3 = clock()
            opt.step()
            t4 = clock()
            if i >= 10:
                rec[name].append((t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0))
    for c in configs.values():
        c.cleanup()
    base = np.median(np.asarray(rec["plain"]) / 1e6, axis=0)
    lines = [
        f"#### {case.name}: CPU ms per phase (median of {steps} interleaved steps; Δ vs plain in parentheses)",
        "",
        "| config | forward+loss | backward | after_backward | optimizer | total |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in rec.items():
        med = np.median(np.asarray(r) / 1e6, axis=0)
        cells = [f"{m:.2f} ({m - b:+.2f})" if name != "plain" else f"{m:.2f}" for m, b in zip(med, base)]
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def profile(case: Case, config: str, steps: int) -> None:
    """cProfile of ``steps`` steps of one configuration, then the plain step, top functions by own time."""
    import cProfile
    import pstats

    configs = build_configs(case, [config])
    for name in (config, "plain"):
        step = configs[name].step
        for _ in range(10):
            step()
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(steps):
            step()
        pr.disable()
        print(f"\n===== {case.name} / {name}: {steps} steps =====")
        pstats.Stats(pr).sort_stats("tottime").print_stats(25)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer, shorter rounds (< 2 min)")
    ap.add_argument("--case", action="append", choices=["mlp", "lstm", "transformer"], help="repeatable; default all")
    ap.add_argument("--rounds", type=int, help="rounds per case (default 12 quick / 30 full)")
    ap.add_argument("--block-seconds", type=float, help="target CPU seconds of one timed block (default 0.06 quick / 0.2 full)")
    ap.add_argument("--config", action="append", help="only these configs (plus plain); repeatable")
    ap.add_argument("--profile", metavar="CONFIG", help="cProfile CONFIG vs plain instead of timing")
    ap.add_argument(
        "--alt", action="append", metavar="LABEL=SRC",
        help="also time the Probe of the gradprobe package under SRC, as LABEL:probe_* (repeatable)",
    )
    ap.add_argument("--phases", type=int, metavar="STEPS", help="per-phase CPU time over STEPS interleaved steps instead of the paired timing")
    ap.add_argument("--out", type=Path, help="also write the markdown report here")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)  # one core per run: the machine has 2 and timings must not fight for them
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    cases = make_cases()
    chosen = args.case or list(cases)
    if args.phases:
        alt = {}
        for spec in args.alt or []:
            label, _, src = spec.partition("=")
            alt[label] = load_alt_probe(Path(src), label)
        out = [phases(cases[c], args.phases, args.config, alt) for c in chosen]
        print("\n\n".join(out))
        if args.out:
            args.out.write_text("\n\n".join(out) + "\n")
        return 0
    if args.profile:
        for c in chosen:
            profile(cases[c], args.profile, steps=100 if c != "transformer" else 40)
        return 0
    rounds = args.rounds or (12 if args.quick else 30)
    block = args.block_seconds or (0.06 if args.quick else 0.2)
    warmup = 3 if args.quick else 10
    alt_probes = {}
    for spec in args.alt or []:
        label, sep, src = spec.partition("=")
        if not sep or not label.isidentifier():
            raise SystemExit(f"--alt wants LABEL=SRC with LABEL an identifier; got {spec!r}")
        alt_probes[label] = load_alt_probe(Path(src), label)
    t_start = time.perf_counter()
    parts = ["## Environment", environment(), ""]
    for spec in args.alt or []:
        label, _, src = spec.partition("=")
        parts[-1:-1] = [f"- `{label}:probe_*` rows: Probe from the gradprobe package under `{src}`"]
    for c in chosen:
        case = cases[c]
        stats, call_ms, steps = run_case(
            case, rounds=rounds, block_s=block, warmup=warmup, which=args.config, alt_probes=alt_probes
        )
        plain_ms = stats["plain"].median_ms
        table = markdown_table(
            stats,
            {
                "after_backward CPU ms (median)": lambda s: f"{call_ms[s.name]:.3f}",
                "call as % of plain step": lambda s: f"{100 * call_ms[s.name] / plain_ms:.1f}%",
                "budget": lambda s: _verdict(s.name, s),
            },
        )
        parts += [f"### {case.name}: {case.description}", f"{rounds} rounds × {steps} steps per config per round", "", table, ""]
        print("\n".join(parts[-5:]), flush=True)
    parts.append(f"_total wall time {time.perf_counter() - t_start:.0f} s_")
    report = "\n".join(parts)
    print(report)
    if args.out:
        args.out.write_text(report + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
