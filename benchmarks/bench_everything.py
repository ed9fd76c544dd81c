"""Everything every step (issue 9 §5: ≤ 1.15× a plain step on the MLP 20 × 256): gradprobe against the
least any hook-based recorder of the same quantities can do in eager PyTorch, in one interleaved run.

Configurations (each its own copy of the model, the same training step as ``bench_probe_overhead.py``):

* ``plain`` / ``plain_again``: no instrumentation, and the A/A control;
* ``gp_everything``: ``Probe(model, budget=None)``, every recorder every step (gradient norms, weight
  norms, update ratios, ‖∂L/∂h‖ and ‖h‖ of every layer, dead/saturated units);
* ``floor_everything``: the bare work those numbers need, with no bookkeeping: a forward hook per Linear
  taking ``‖h‖`` (one norm) and registering a tensor hook that takes ``‖∂L/∂h‖`` (one norm), a forward
  hook per ReLU taking the per-unit peak (one ``amax``), and after backward one fused ``_foreach_norm``
  over the gradients, the weights and ``θ_prev − θ`` (one in-place ``_foreach_sub_``), the snapshot copy
  (``_foreach_copy_``), the dead counts of every ReLU call at once and one host copy of everything;
* ``floor_params``: only the after-backward part of that floor (gradient and weight norms, update ratio);
* ``floor_kernels_hooks``: only the hook part (forward and tensor hooks with their norms and peaks).

The floor's overhead is what these numbers cost on this CPU before any Python bookkeeping: when it is
above the target, the target is out of reach for any recorder built on module and tensor hooks here.

Run::

    python benchmarks/bench_everything.py                       # 30 rounds, blocks of ≈ 0.25 s
    python benchmarks/bench_everything.py --alt base=/path/to/other/src   # A/B another gradprobe
    python benchmarks/bench_everything.py --phases 300          # CPU ms per phase instead
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_probe_overhead as b  # noqa: E402
import peers  # noqa: E402
from _harness import paired_between  # noqa: E402


class FloorEverything:
    """The bare kernels and hooks of everything-every-step (see the module docstring)."""

    def __init__(self, model: nn.Module, hooks: bool = True, params: bool = True):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.snap = [p.detach().clone() for p in self.params] if params else None
        self.do_params = params
        self.act, self.grad, self.peaks = [], [], []
        self.handles = []
        if hooks:
            for m in model.modules():
                if isinstance(m, nn.Linear):
                    self.handles.append(m.register_forward_hook(self._linear))
                elif isinstance(m, nn.ReLU):
                    self.handles.append(m.register_forward_hook(self._relu))

    def _grad_hook(self, g):
        self.grad.append(torch.linalg.vector_norm(g))

    def _linear(self, m, args, out):
        self.act.append(torch.linalg.vector_norm(out.detach()))
        out.register_hook(self._grad_hook)

    def _relu(self, m, args, out):
        self.peaks.append(out.detach().amax(0))

    def after(self, loss) -> None:
        parts = []
        with torch.no_grad():
            if self.do_params:
                torch._foreach_sub_(self.snap, self.params)
                grads = [p.grad for p in self.params]
                parts.append(torch.stack(torch._foreach_norm(grads + self.params + self.snap)))
                torch._foreach_copy_(self.snap, self.params)
            if self.act:
                parts += [torch.stack(self.act), torch.stack(self.grad), (torch.stack(self.peaks) <= 0).sum(1).float()]
        if parts:
            torch.cat(parts).numpy()
        self.act, self.grad, self.peaks = [], [], []

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _floor(**kw):
    def make(model, case, opt):
        f = FloorEverything(model, **kw)
        return peers.Instr(after=f.after, close=f.close)

    return make


FLOORS = {
    "floor_everything": ("bare kernels + hooks of everything every step", _floor()),
    "floor_params": ("bare gradient/weight norms + update ratio (after backward only)", _floor(hooks=False)),
    "floor_kernels_hooks": ("bare forward/tensor hooks with their norms and peaks only", _floor(params=False)),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", default="mlp", choices=list(peers.make_cases()))
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--block-seconds", type=float, default=0.25)
    ap.add_argument("--alt", action="append", metavar="LABEL=SRC", help="also time Probe(budget=None) from SRC as LABEL:gp_everything")
    ap.add_argument("--phases", type=int, metavar="STEPS", help="CPU ms per phase over STEPS interleaved steps instead")
    args = ap.parse_args(argv)
    b._quiet_warnings()
    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    for k, v in FLOORS.items():
        peers.PEERS[k] = v
    alt = {}
    for spec in args.alt or []:
        label, _, src = spec.partition("=")
        alt[label] = b.load_alt_probe(Path(src), label)
    case = peers.make_cases()[args.case]
    which = ["gp_everything", *FLOORS]
    env = b.environment().replace("benchmarks/bench_probe_overhead.py", "benchmarks/bench_everything.py")
    print("## Environment\n" + env + "\n")
    if args.phases:
        print(b.phases(case, args.phases, which, alt))
        return 0
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    res = b.run_case(case, rounds=args.rounds, block_s=args.block_seconds, warmup=12, which=which, alt_probes=alt, log=log)
    st = res["stats"]
    print(f"### {case.name}: {case.description}\n\n{args.rounds} rounds, blocks of {res['steps']} steps, {res['seconds']:.0f} s; "
          f"load average at the end {os.getloadavg()[0]:.1f}\n")
    print("| config | CPU ms/step | ratio to plain (median) | 95 % CI | IQR | after-backward call (ms) |\n|---|---:|---:|---|---|---:|")
    for name, s in st.items():
        q1, q3 = s.iqr
        print(f"| `{name}` | {s.median_ms:.2f} | {s.median_ratio:.3f} | [{s.ci[0]:.3f}, {s.ci[1]:.3f}] | [{q1:.3f}, {q3:.3f}] | {res['call_ms'][name]:.3f} |")
    print()
    for label in alt:
        other = st.get(f"{label}:gp_everything")
        if other is not None:
            m, ci = paired_between(st["gp_everything"], other)
            print(f"paired t(gp_everything) / t({label}:gp_everything): {m:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]")
    m, ci = paired_between(st["gp_everything"], st["floor_everything"])
    print(f"paired t(gp_everything) / t(floor_everything): {m:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
