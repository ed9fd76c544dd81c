"""Gradient spikes (issue 12): what gradprobe's SpikeWatch sees against Lightning's ``SpikeDetection``,
and what the watch costs per training step.

``compare``: the same runs watched by both. Each run trains a model with one injected spike at step
``S`` (a scaled batch, a layer whose backward is multiplied by 10⁴ or made NaN, a learning-rate jump)
or none (healthy runs, for false alarms). gradprobe watches the gradient norms (and the loss) at
``probe.step()``, *before* ``optimizer.step()``; Lightning's ``SpikeDetection`` (the Fabric class the
``lightning.pytorch.callbacks.SpikeDetection`` callback wraps, default settings: running mean of the
loss over 10 batches, a spike when the loss rises to ≥ 3× it, or is non-finite) sees the loss in
``on_train_batch_end``, *after* the optimizer step. Both run in detection mode on one trajectory
(Lightning's exception is caught and counted, the run goes on), so they see the same numbers.
Reported: the first step each flags relative to the injection, whether the injected step's update
could still be skipped, the layer gradprobe names, and the alarms on the healthy runs.

``cost``: paired, interleaved timing (``_harness.py``) on the three models of
``bench_probe_overhead.py``: the parameter-gradient recorder alone, with the watch (detection; it
reuses the recorder's norms), with the guard (one host sync per step), the watch with the recorder
off (it computes the norms itself), the watch and the full flight recorder (``spikes="full"``) beside
the probe's default recorders kept all but idle (``every=2**20``; also the full flight without the
weights' twin, ``full_flight=["outputs", "units"]``), and Lightning's ``SpikeDetection``
on the loss. ``plain_again`` is the A/A control (the baseline against itself).

Run::

    python benchmarks/bench_spikes.py compare            # a few minutes on an idle 2-core machine
    python benchmarks/bench_spikes.py compare --quick    # shorter healthy runs
    python benchmarks/bench_spikes.py cost --rounds 20   # timing; only on a quiet machine (load < 3)
    python benchmarks/bench_spikes.py reuse --rounds 15  # the flight's reuse of recorded steps, the temporal twin

``reuse``: the session's recorders at a fixed period (every step, every 4th) with the watch alone, the full
flight recorder reusing the session recorders' numbers on their recorded steps (the default), and without
reuse (``SpikeWatch(full_flight=True, flight_reuse=False)``: every twin runs every step), and reuse by every twin
but the weights' (``flight_reuse=["outputs", "units", ...]``: the weights twin runs every step); on the LSTM also
the temporal twin's cost with the session's recorders all but idle (``temporal=True``, ``every=2**20``).
"""
from __future__ import annotations

import argparse
import copy
import math
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import markdown_table, measure, paired_between  # noqa: E402

from gradprobe import Probe  # noqa: E402
from gradprobe.probe import SpikeWatch  # noqa: E402
from gradprobe.experiments.tasks import make_task  # noqa: E402
from gradprobe.models import DeepMLP, RecurrentNet  # noqa: E402


# ----------------------------------------------------------------------------------------- Lightning
class _Strategy:
    root_device = torch.device("cpu")

    def barrier(self):
        pass

    def reduce_boolean_decision(self, decision, all=True):  # one process: the decision is ours
        return decision


class _Fabric:
    """What ``lightning.fabric.utilities.spike.SpikeDetection.on_train_batch_end`` uses of a Fabric."""

    strategy = _Strategy()
    global_rank = 0


class LightningWatch:
    """Lightning's SpikeDetection fed every batch's loss after the optimizer step; spikes are counted."""

    def __init__(self, **kw):
        from lightning.fabric.utilities.spike import SpikeDetection, TrainingSpikeException

        self._exc = TrainingSpikeException
        self.det = SpikeDetection(exclude_batches_path=str(Path(tempfile.mkdtemp()) / "skip.json"), **kw)
        self.fabric = _Fabric()
        self.steps: list[int] = []

    def after_step(self, loss: torch.Tensor, t: int) -> None:
        try:
            self.det.on_train_batch_end(self.fabric, loss.detach(), None, t)
        except self._exc:
            self.steps.append(t)


# ----------------------------------------------------------------------------------------- runs
class _Poison(torch.autograd.Function):
    """Identity forward, backward × factor: the same op as the tests' ``tests/reference/ops.py::ScaleGrad``
    (benchmarks do not import the tests, and gradprobe itself has no business shipping a fault injector)."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.factor, None


def poison(module: nn.Module, factor: float, when: Callable[[], bool]):
    def hook(m, inputs, out):
        if not when():
            return None
        if isinstance(out, tuple):
            return (_Poison.apply(out[0], factor),) + out[1:]
        return _Poison.apply(out, factor)

    return module.register_forward_hook(hook)


class TinyTransformer(nn.Module):
    def __init__(self, vocab=12, d=16, heads=2, layers=2, T=8):
        super().__init__()
        self.emb, self.pos = nn.Embedding(vocab, d), nn.Embedding(T, d)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(d, heads, 32, dropout=0.0, batch_first=True), layers,
                                         enable_nested_tensor=False)
        self.out = nn.Linear(d, vocab)

    def forward(self, x):
        return self.out(self.enc(self.emb(x) + self.pos(torch.arange(x.shape[1]))))


@dataclass
class Scenario:
    model: str
    injection: str
    note: str = ""


SCENARIOS = [
    Scenario("mlp", "scaled_batch", "one batch's inputs ×100"),
    Scenario("mlp", "poisoned_layer", "backward of blocks.0.linear ×10⁴"),
    Scenario("mlp", "nan_layer", "backward of blocks.1.linear NaN"),
    Scenario("mlp", "lr_jump", "SGD lr ×300 for one update"),
    Scenario("lstm", "scaled_batch", "one batch's targets ×100"),
    Scenario("lstm", "scaled_inputs", "one batch's inputs ×100 (the gates saturate)"),
    Scenario("lstm", "poisoned_layer", "backward of the LSTM ×10⁴"),
    Scenario("lstm", "lr_jump", "SGD lr ×300 for one update"),
    Scenario("transformer", "scaled_batch", "one batch's loss ×1000"),
    Scenario("transformer", "poisoned_layer", "backward of enc.layers.1.linear1 ×10⁴"),
    Scenario("transformer", "lr_jump", "AdamW lr ×1000 for one update"),
    Scenario("mlp", "healthy", "x ~ U[−1, 1]⁸, y = sin(x·w) + 0.05 noise, batch 16, SGD+momentum"),
    Scenario("mlp", "healthy_heavy_tailed", "x ~ N(0, 1)⁸: rare extreme rows give single batches ×100 the median loss"),
    Scenario("lstm", "healthy", "adding task (T = 20), batch 32, Adam 3e-3"),
    Scenario("transformer", "healthy", "sequence reversal, batch 8, AdamW 1e-3"),
]


def build(s: Scenario, at: int):
    """(model, optimizer, loss_of(t), before(t)) for a scenario; the injection happens at step ``at``."""
    state = {"t": -1}
    armed = lambda: state["t"] == at  # noqa: E731
    if s.model == "mlp":
        torch.manual_seed(0)
        net = DeepMLP(8, 1, width=32, depth=3, activation="relu", init="he")
        g = torch.Generator().manual_seed(1)
        w = torch.randn(8, 1, generator=g)
        healthy = s.injection == "healthy"
        lr = 0.02 if healthy else 0.01
        opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9 if healthy else 0.0)
        if s.injection == "poisoned_layer":
            poison(net.blocks[0].linear, 1e4, armed)
        if s.injection == "nan_layer":
            poison(net.blocks[1].linear, math.nan, armed)

        def loss_of(t):
            B = 16 if healthy else 32
            x = (2 * torch.rand(B, 8, generator=g) - 1) if healthy else torch.randn(B, 8, generator=g)
            y = torch.sin(x @ w) + (0.05 * torch.randn(B, 1, generator=g) if healthy else 0.0)
            if s.injection == "scaled_batch" and t == at:
                x = x * 100.0
            return F.mse_loss(net(x), y)
    elif s.model == "lstm":
        torch.manual_seed(0)
        task = make_task("adding_arjovsky")
        net = RecurrentNet(2, 16, 1, cell="lstm")
        g = torch.Generator().manual_seed(1)
        opt = torch.optim.SGD(net.parameters(), lr=0.1) if s.injection == "lr_jump" else \
            torch.optim.Adam(net.parameters(), lr=3e-3 if s.injection == "healthy" else 1e-2)
        if s.injection == "poisoned_layer":
            poison(net.core, 1e4, armed)

        def loss_of(t):
            b = task.generate(32 if s.injection == "healthy" else 16, 20, g)
            x, y = b.x, b.y
            if t == at and s.injection == "scaled_batch":
                y = y * 100.0
            if t == at and s.injection == "scaled_inputs":
                x = x * 100.0
            return task.loss(net(x), y)
    else:
        torch.manual_seed(0)
        net = TinyTransformer()
        g = torch.Generator().manual_seed(1)
        base = 1e-3 if s.injection == "healthy" else 3e-3
        opt = torch.optim.AdamW(net.parameters(), lr=base)
        if s.injection == "poisoned_layer":
            poison(net.enc.layers[1].linear1, 1e4, armed)

        def loss_of(t):
            x = torch.randint(0, 12, (8, 8), generator=g)
            loss = F.cross_entropy(net(x).reshape(-1, 12), torch.flip(x, [1]).reshape(-1))
            return loss * 1000.0 if (s.injection == "scaled_batch" and t == at) else loss

    lr0 = opt.param_groups[0]["lr"]
    jump = 1000.0 if s.model == "transformer" else 300.0

    def before(t):
        state["t"] = t
        if s.injection == "lr_jump":
            opt.param_groups[0]["lr"] = lr0 * jump if t == at else lr0

    return net, opt, loss_of, before


def run_scenario(s: Scenario, at: int, steps: int) -> dict:
    net, opt, loss_of, before = build(s, at)
    light = LightningWatch()
    t0 = time.perf_counter()
    # confirm="loss" flags exactly the steps the default rule flags (its events are all of them) and marks
    # which are alarms under loss confirmation (SpikeEvent.confirmed): one run gives both columns
    with Probe(net, spikes=SpikeWatch(confirm="loss"), hooks=False, update_ratio=False, budget=None) as probe:
        for t in range(steps):
            before(t)
            opt.zero_grad(set_to_none=True)
            loss = loss_of(t)
            loss.backward()
            probe.step(loss)  # before the update: a guard could still skip it
            opt.step()
            light.after_step(loss, t)  # Lightning's on_train_batch_end: after the update
        log = probe.spike_log()
    first = log.events[0] if log.events else None
    return {"scenario": s, "seconds": time.perf_counter() - t0, "steps": steps,
            "ours": [e.step for e in log.events], "ours_flagged": sum(e.flagged_steps for e in log.events),
            "confirmed": [e.step for e in log.alarms],
            "layer": None if first is None else first.layer, "kind": None if first is None else first.kind,
            "light": light.steps}


def _delay(steps: list[int], at: int) -> str:
    after = [s for s in steps if s >= at]
    if not after:
        return "missed"
    d = after[0] - at
    return "same step" if d == 0 else f"+{d} step{'s' if d != 1 else ''}"


def compare(args) -> str:
    rows = ["| model | injection | gradprobe SpikeWatch | layer named | with confirm=\"loss\": first alarm | Lightning SpikeDetection | note |",
            "|---|---|---|---|---|---|---|"]
    healthy = ["| model | run | steps | gradprobe events (flagged steps) | alarms with confirm=\"loss\" | Lightning alarms | note |",
               "|---|---|---|---|---|---|---|"]
    for s in SCENARIOS:
        if args.model and s.model not in args.model:
            continue
        if s.injection.startswith("healthy"):
            r = run_scenario(s, -1, args.healthy_steps)
            healthy.append(f"| {s.model} | {s.injection} | {r['steps']} | {len(r['ours'])} ({r['ours_flagged']}) "
                           f"{r['ours'][:6]} | {len(r['confirmed'])} {r['confirmed'][:6]} | {len(r['light'])} {r['light'][:6]} "
                           f"| {s.note} |")
        else:
            r = run_scenario(s, args.at, args.at + 40)
            ours = _delay(r["ours"], args.at)
            ours += "" if ours == "missed" else (", before the update" if ours == "same step" else ", after the bad update")
            light = _delay(r["light"], args.at)
            light += "" if light == "missed" else ", after the update (the callback runs post-step)"
            early = [x for x in r["ours"] if x < args.at] + [x for x in r["light"] if x < args.at]
            extra = f"; earlier alarms: {sorted(set(early))}" if early else ""
            conf = _delay(r["confirmed"], args.at)
            conf += " (the loss did not confirm; the event is recorded)" if conf == "missed" and r["ours"] else ""
            rows.append(f"| {s.model} | {s.injection} | {ours} ({r['kind']}) | {r['layer'] or '—'} | {conf} | {light} "
                        f"| {s.note}{extra} |")
        print(f"  {s.model}/{s.injection}: {r['seconds']:.1f}s ours={r['ours'][:5]} lightning={r['light'][:5]}", file=sys.stderr)
    return "\n".join(rows) + "\n\n" + "\n".join(healthy)


# ----------------------------------------------------------------------------------------- cost
def cost(args) -> str:
    from bench_probe_overhead import make_cases

    cases = make_cases()
    out = []
    for name in args.case or list(cases):
        case = cases[name]
        torch.manual_seed(0)
        proto = case.make_model()

        def probe(**kw):
            def make(m):
                p = Probe(m, hooks=False, update_ratio=False, **kw)
                return p.step, p.close
            return make

        def full_probe(spikes):  # the default recorders installed (hooks, units, update ratio), all but idle
            def make(m):
                p = Probe(m, every=2**20, spikes=spikes() if callable(spikes) else spikes)
                return p.step, p.close
            return make

        def lightning(m):
            w = LightningWatch()
            count = [0]

            def after(loss):
                w.after_step(loss, count[0])
                count[0] += 1

            return after, lambda: None

        specs = {
            "plain": lambda m: ((lambda loss: None), lambda: None),
            "plain_again": lambda m: ((lambda loss: None), lambda: None),
            "grads": probe(budget=None),
            "grads+watch": probe(budget=None, spikes=True),
            "grads+guard": probe(budget=None, on_spike="skip"),
            "watch_alone": probe(every=2**20, spikes=True),
            "idle_recorders+watch": full_probe(spikes=True),
            "idle_recorders+full_flight": full_probe(spikes="full"),
            "idle_recorders+flight_hooks_only": full_probe(spikes=lambda: SpikeWatch(full_flight=["outputs", "units"])),
            "lightning_spike_detection": lightning,
        }
        stats, per_block = _measure_specs(specs, proto, case, args)
        w = stats["grads+watch"].ratio / stats["grads"].ratio
        g = stats["grads+guard"].ratio / stats["grads"].ratio
        ff = stats["idle_recorders+full_flight"].ratio / stats["idle_recorders+watch"].ratio
        fh = stats["idle_recorders+flight_hooks_only"].ratio / stats["idle_recorders+watch"].ratio
        out.append(f"#### {name}: {case.description} ({per_block} steps per block, {args.rounds} rounds)\n\n"
                   + markdown_table(stats)
                   + f"\n\nthe watch on top of the gradient recorder: median paired ratio {np.median(w):.4f} "
                     f"(+{100 * (np.median(w) - 1):.2f} % of the step); the guard: {np.median(g):.4f} "
                     f"(+{100 * (np.median(g) - 1):.2f} %); the full flight recorder on top of the watch: "
                     f"{np.median(ff):.4f} (+{100 * (np.median(ff) - 1):.2f} %), without the weights' twin "
                     f"(full_flight=[\"outputs\", \"units\"]): {np.median(fh):.4f} (+{100 * (np.median(fh) - 1):.2f} %)")
    return "\n\n".join(out)


def _measure_specs(specs: dict, proto, case, args):
    """Each configuration ``{name: make(model) -> (after_backward, cleanup)}`` on its own copy of ``proto``
    with its own SGD, interleaved against ``"plain"`` (blocks of ≈ ``args.block_seconds`` CPU seconds,
    ``args.rounds`` rounds); returns the paired statistics and the steps per block."""
    from bench_probe_overhead import train_step
    from peers import Instr

    steps_fns, cleanups = {}, []
    for cname, make in specs.items():
        model = copy.deepcopy(proto)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        after, cleanup = make(model)
        cleanups.append(cleanup)
        steps_fns[cname] = (lambda model=model, opt=opt, after=after:
                            train_step(model, opt, case.x, case.y, case.loss_fn, Instr(after=after), []))
    est0 = time.process_time()
    for _ in range(3):
        steps_fns["plain"]()
    est = (time.process_time() - est0) / 3
    per_block = max(1, round(args.block_seconds / est))
    stats = measure(steps_fns, baseline="plain", rounds=args.rounds, steps_per_round=per_block, warmup_steps=5)
    for c in cleanups:
        c()
    return stats, per_block


def reuse(args) -> str:
    """The full flight recorder's reuse of the session recorders' numbers (``SpikeWatch(flight_reuse=...)``)
    and the temporal twin's cost: paired, interleaved, CPU time."""
    from bench_probe_overhead import make_cases

    cases = make_cases()
    out = []
    for name in args.case or ["mlp", "lstm"]:
        case = cases[name]
        torch.manual_seed(0)
        proto = case.make_model()
        temporal = name == "lstm"

        def probe(every, spikes):
            def make(m):
                p = Probe(m, every=every, temporal=temporal, spikes=spikes() if callable(spikes) else spikes)
                return p.step, p.close
            return make

        specs = {"plain": lambda m: ((lambda loss: None), lambda: None),
                 "plain_again": lambda m: ((lambda loss: None), lambda: None)}
        for every in args.every:
            specs[f"every{every}+watch"] = probe(every, True)
            specs[f"every{every}+full_reuse"] = probe(every, lambda: SpikeWatch(full_flight=True))
            specs[f"every{every}+full_no_reuse"] = probe(every, lambda: SpikeWatch(full_flight=True, flight_reuse=False))
            # every twin but the weights' reuses (the flight before the weights twin reused one-step update ratios)
            specs[f"every{every}+full_reuse_no_weights"] = probe(every, lambda: SpikeWatch(
                full_flight=True, flight_reuse=["outputs", "units"] + (["temporal"] if temporal else [])))
        if temporal:  # the temporal twin alone: the session's recorders all but idle
            specs["idle+full_flight"] = probe(2**20, lambda: SpikeWatch(full_flight=True))
            specs["idle+full_flight_no_temporal"] = probe(
                2**20, lambda: SpikeWatch(full_flight=["weights", "outputs", "units"]))
        stats, per_block = _measure_specs(specs, proto, case, args)
        lines = []
        for every in args.every:
            r = np.median(stats[f"every{every}+full_reuse"].ratio / stats[f"every{every}+full_no_reuse"].ratio)
            a = np.median(stats[f"every{every}+full_reuse"].ratio / stats[f"every{every}+watch"].ratio)
            b = np.median(stats[f"every{every}+full_no_reuse"].ratio / stats[f"every{every}+watch"].ratio)
            lines.append(f"session recorders every {every} step(s): the full flight on top of the watch {b:.4f} without "
                         f"reuse, {a:.4f} with it; reuse / no reuse: median paired ratio {r:.4f} "
                         f"({100 * (1 - r):+.2f} % of the step saved)")
            w, (lo, hi) = paired_between(stats[f"every{every}+full_reuse"], stats[f"every{every}+full_reuse_no_weights"])
            lines.append(f"session recorders every {every} step(s): reuse / reuse by every twin but the weights': median "
                         f"paired ratio {w:.4f}, 95 % CI [{lo:.4f}, {hi:.4f}] ({100 * (1 - w):+.2f} % of the step saved)")
        if temporal:
            t = np.median(stats["idle+full_flight"].ratio / stats["idle+full_flight_no_temporal"].ratio)
            lines.append(f"the temporal twin (session recorders idle): median paired ratio {t:.4f} "
                         f"(+{100 * (t - 1):.2f} % of the step)")
        out.append(f"#### {name}: {case.description} ({per_block} steps per block, {args.rounds} rounds)\n\n"
                   + markdown_table(stats) + "\n\n" + "; ".join(lines))
    return "\n\n".join(out)


def environment() -> str:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    import lightning
    import os

    return (f"CPU: {cpu}; torch {torch.__version__}, threads {torch.get_num_threads()}; lightning {lightning.__version__}; "
            f"python {platform.python_version()}; load average {os.getloadavg()[0]:.1f}; command `{' '.join(sys.argv)}`")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    c = sub.add_parser("compare", help="gradprobe SpikeWatch vs Lightning SpikeDetection on the same runs")
    c.add_argument("--at", type=int, default=300, help="the injection step (default 300)")
    c.add_argument("--healthy-steps", type=int, default=3000)
    c.add_argument("--quick", action="store_true", help="healthy runs of 600 steps, injection at 150")
    c.add_argument("--model", action="append", choices=["mlp", "lstm", "transformer"])
    k = sub.add_parser("cost", help="per-step cost (paired interleaved timing)")
    k.add_argument("--case", action="append", choices=["mlp", "mlp_narrow", "lstm", "transformer", "resnet"])
    k.add_argument("--rounds", type=int, default=20)
    k.add_argument("--block-seconds", type=float, default=0.2)
    u = sub.add_parser("reuse", help="the full flight recorder's reuse of recorded steps, and the temporal twin's cost")
    u.add_argument("--case", action="append", choices=["mlp", "mlp_narrow", "lstm", "transformer", "resnet"])
    u.add_argument("--rounds", type=int, default=20)
    u.add_argument("--block-seconds", type=float, default=0.2)
    u.add_argument("--every", type=int, action="append", help="the session recorders' period (default 1 and 4)")
    ap.add_argument("--out", type=Path, help="also write the markdown here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.what == "compare" and args.quick:
        args.healthy_steps, args.at = 600, 150
    if args.what == "reuse" and not args.every:
        args.every = [1, 4]
    text = environment() + "\n\n" + {"compare": compare, "cost": cost, "reuse": reuse}[args.what](args)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
