"""gradprobe's per-step overhead against its peers, in one interleaved run per model (issue 9 §4–§5).

Every configuration (``peers.PEERS``: plain, the A/A control, four gradprobe modes, Lightning's
``grad_norm``, wandb.watch-style hooks and histograms, Cockpit, and two floors) owns an identical copy
of the model (same initial weights) and its own SGD optimizer, and runs the *same* :func:`train_step`;
only the instrumentation differs. Timing is paired and interleaved (``_harness.py``): the figure is the
median over rounds of ``t_config / t_plain`` in the same round, CPU time, one thread.

Per model the report also gives peak RSS per configuration (a fresh subprocess each), the run log's
bytes and write time per step, the probe's fixed Python cost per step, and the targets of issue 9 §5
with what limits a missed one.

Run::

    python benchmarks/bench_probe_overhead.py --quick              # smoke test, a few minutes
    python benchmarks/bench_probe_overhead.py --out report.md      # the numbers in BENCHMARKS.md
    python benchmarks/bench_probe_overhead.py --case mlp --config gp_default --config lightning_grad_norm
    python benchmarks/bench_probe_overhead.py --phases 150 --case mlp   # CPU ms per phase of the step
    python benchmarks/bench_probe_overhead.py --profile gp_default --case mlp   # cProfile vs plain
    python benchmarks/bench_probe_overhead.py --case mlp --alt new=/path/to/patched/src   # A/B a patch
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import PairedStats, measure, paired_between  # noqa: E402
from peers import PEERS, Instr, make_cases, instrument, probe  # noqa: E402

import gradprobe  # noqa: E402
from gradprobe import Probe  # noqa: E402

#: least consecutive steps of one configuration per timed block (heavy ones: 1), see run_case
MIN_BLOCK = 4
#: consecutive warm-up steps of a budgeted probe before timing: past its plan (16: warm-up and calibration) and first replan (64)
BUDGET_WARMUP = 72

# issue 9 §5: the default probe's ratio to a plain step
DEFAULT_TARGET = {"mlp_narrow": 1.05}
DEFAULT_TARGET_OTHER = 1.03
EVERYTHING_TARGET = {"mlp": 1.15}


def _quiet_warnings() -> None:
    # peers' own warnings (BackPACK on BatchNorm in train mode, full backward hooks on the first layer,
    # pkg_resources) would flood the report; gradprobe's tests run with warnings as errors instead
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


# --------------------------------------------------------------------------- one training step
class Config:
    """One instrumented model copy; :meth:`step` is :func:`train_step` on it."""

    def __init__(self, name, case, proto):
        self.name = name
        self.case = case
        self.model, self.opt, self.ins = instrument(name, proto, case)
        self.loss_fn = self.ins.loss_fn or case.loss_fn
        self.timer: list[int] = []

    def step(self) -> None:
        train_step(self.model, self.opt, self.case.x, self.case.y, self.loss_fn, self.ins, self.timer)


def _backward(loss, out) -> None:
    loss.backward()


def train_step(model, opt, x, y, loss_fn, ins: Instr, timer) -> None:
    """The one step every configuration runs: zero_grad → forward → loss → backward → ``ins.after(loss)``
    (timed: where ``probe.step()`` and Lightning's ``on_before_optimizer_step`` go) → ``opt.step()``."""
    opt.zero_grad(set_to_none=True)
    out = model(x)
    loss = loss_fn(out, y)
    (ins.backward or _backward)(loss, out)
    t0 = time.process_time_ns()
    ins.after(loss)
    timer.append(time.process_time_ns() - t0)
    opt.step()


def build_configs(case, which=None, alt_probes=None, log=print):
    """``({name: Config}, {name: why it could not run})``. A configuration that fails to build or to run
    two trial steps is left out, with the exception's text as the reason."""
    torch.manual_seed(0)
    proto = case.make_model()
    names = [n for n in PEERS if not which or n in which or n in ("plain", "plain_again")]
    for label, cls in (alt_probes or {}).items():
        only = ALT_ONLY.get(label)
        for n in [n for n in names if n.startswith("gp_") and (only is None or n in only)]:
            PEERS[f"{label}:{n}"] = (f"{n} with the Probe from --alt {label}", _alt_probe(cls, n))
            names.append(f"{label}:{n}")
    configs, failed = {}, {}
    for name in names:
        try:
            c = Config(name, case, proto)
            for _ in range(2):
                c.step()
        except Exception as exc:  # noqa: BLE001 - a peer that cannot run is reported, not fatal
            failed[name] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            log(f"[{case.name}] {name} cannot run: {failed[name]}")
            continue
        configs[name] = c
    return configs, failed


def _alt_probe(cls, name):
    import peers

    kw = {"gp_default": {}, "gp_params_every_step": dict(hooks=False, update_ratio=False, budget=None),
          "gp_grad_norms_only": dict(cadence=peers.GRAD_NORMS_ONLY), "gp_everything": dict(budget=None)}[name]
    return peers.probe(cls, **kw)


#: alt labels timed for a subset of the gp_* configurations only
ALT_ONLY: dict[str, list[str]] = {}
#: ``--cpu-clock-default``: every ``time.perf_counter`` of the probe replaced by the process CPU clock.
#: (Before the budget kept its own clock, this was how the default looked timed on the CPU clock; the
#: budget now reads the thread CPU clock itself, ``Probe(budget_clock="thread")``, and times only short
#: sections with perf_counter, so the row now differs from ``gp_default`` only in those sections.)
CPU_CLOCK = ("from time import perf_counter", "from time import process_time as perf_counter")


def load_alt_probe(src: Path, label: str = "alt", replace: tuple[str, str] | None = None):
    """``Probe`` from another gradprobe source tree, importable next to the installed one (copied as
    ``gradprobe_<label>`` with its absolute imports rewritten; ``replace=(old, new)``: a text
    substitution in every file too)."""
    import importlib
    import re
    import shutil

    pkg = Path(src) / "gradprobe"
    if not (pkg / "__init__.py").is_file():
        raise SystemExit(f"--alt {src}: no gradprobe package there (expected {pkg}/__init__.py)")
    tmp = Path(tempfile.mkdtemp(prefix="gradprobe_alt_"))
    mod = f"gradprobe_{label}"
    shutil.copytree(pkg, tmp / mod, ignore=shutil.ignore_patterns("__pycache__"))
    for f in (tmp / mod).rglob("*.py"):
        text = re.sub(r"\bgradprobe\b(?=[.\s])", mod, f.read_text())
        if replace is not None:
            text = text.replace(*replace)
        f.write_text(text)
    sys.path.insert(0, str(tmp))
    return importlib.import_module(mod).Probe


# --------------------------------------------------------------------------- the paired run
def run_case(case, *, rounds, block_s, warmup, which=None, alt_probes=None, log=print):
    configs, failed = build_configs(case, which, alt_probes, log)
    plain = configs["plain"].step
    for _ in range(warmup):
        plain()
    t0 = time.process_time()  # CPU time: a wall-clock estimate on a busy machine would shrink the blocks
    for _ in range(3):
        plain()
    est = (time.process_time() - t0) / 3
    steps = max(MIN_BLOCK, round(block_s / est))
    per = {k: (1 if c.ins.heavy else steps) for k, c in configs.items()}
    # a budgeted probe plans from the intervals between its step() calls: it must run consecutive
    # steps past its first plan (step 8) and replan (step 64) before the timed rounds, and the blocks
    # must be long enough (MIN_BLOCK) that most intervals it sees are its own training steps, not the
    # other configurations' blocks run in between
    for k, c in configs.items():
        p = getattr(c.ins, "probe", None)
        if p is not None and hasattr(p.schedule, "budget"):
            for _ in range(BUDGET_WARMUP):
                c.step()
    log(f"[{case.name}] plain ≈ {est * 1e3:.1f} ms/step → {steps} steps/block ({', '.join(k for k in per if per[k] == 1 and steps > 1) or 'no'} heavy: 1), {rounds} rounds")
    for c in configs.values():
        c.timer.clear()
    t_start = time.perf_counter()
    stats = measure({k: c.step for k, c in configs.items()}, baseline="plain", rounds=rounds,
                    steps_per_round=per, warmup_steps=warmup)
    elapsed = time.perf_counter() - t_start
    call_ms = {k: float(np.median(c.timer)) / 1e6 for k, c in configs.items()}
    # the mean as well: a probe that records one step in p pays its recorded steps' cost on 1/p of the calls,
    # which the median passes over (Lightning's grad_norm, with no hooks, pays all of its cost in this call)
    call_mean_ms = {k: float(np.mean(c.timer)) / 1e6 if c.timer else float("nan") for k, c in configs.items()}
    info = {}
    for k, c in configs.items():
        p = getattr(c.ins, "probe", None)
        if p is not None:
            sched = p.schedule
            info[k] = {"cadence": p.cadence, "kappa": getattr(sched, "kappa", None),
                       "expected": sched.expected_overhead() if hasattr(sched, "expected_overhead") else None,
                       "limit": getattr(sched, "limit", None), "peer": getattr(sched, "peer_seconds", None),
                       "base": getattr(sched, "base_seconds", None)}
        c.ins.close()
    return dict(stats=stats, call_ms=call_ms, call_mean_ms=call_mean_ms, steps=steps, per=per, failed=failed, info=info,
                seconds=elapsed)


# --------------------------------------------------------------------------- memory, run log
def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def rss_child(case_name: str, config: str, steps: int) -> None:
    """(subprocess) Peak resident memory that building and training one configuration adds; prints JSON.

    The configuration's libraries are imported, the prototype model built and three plain steps run on a
    throw-away copy (code pages, allocator pools) first; then the peak-RSS
    mark is reset (``echo 5 > /proc/self/clear_refs``, Linux) and the current RSS noted; the configuration
    is built and trained for ``steps`` steps; the result is the new peak (``VmHWM``) minus that RSS."""
    _quiet_warnings()
    if config.startswith("cockpit"):
        import backpack, cockpit  # noqa: F401,E401
    if config.startswith("lightning"):
        import lightning.pytorch.utilities  # noqa: F401
    torch.set_num_threads(1)
    case = make_cases()[case_name]
    torch.manual_seed(0)
    proto = case.make_model()
    warm = Config("plain", case, proto)  # code pages and allocator pools of a plain step are not the config's
    for _ in range(3):
        warm.step()
    del warm
    import gc

    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kb("VmRSS")
    c = Config(config, case, proto)
    for _ in range(steps if not c.ins.heavy else min(steps, 3)):
        c.step()
    print(json.dumps({"peak_kb": _status_kb("VmHWM"), "before_kb": before}))


def peak_rss(case_name: str, names: list[str], steps: int) -> dict[str, dict]:
    """``{config: {"peak_mb", "delta_mb"}}``: one fresh process per configuration (see :func:`rss_child`);
    ``peak_mb`` is what training adds to the process's resident memory at its peak (model copy, gradients,
    activations, the instrumentation's buffers), ``delta_mb`` that minus the plain configuration's."""
    out = {}
    for name in names:
        if ":" in name:
            continue
        r = subprocess.run([sys.executable, __file__, "--rss-child", case_name, name, str(steps)],
                           capture_output=True, text=True, timeout=1800)
        try:
            d = json.loads(r.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            out[name] = {"error": (r.stderr.strip().splitlines() or ["?"])[-1][:200]}
            continue
        out[name] = {"peak_mb": (d["peak_kb"] - d["before_kb"]) / 1024}
    base = out.get("plain", {}).get("peak_mb")
    for v in out.values():
        if "peak_mb" in v and base is not None:
            v["delta_mb"] = v["peak_mb"] - base
    return out


def runlog_cost(case, steps: int) -> dict[str, dict]:
    """Bytes and CPU time the SQLite run log costs per step, for the default and the everything-every-step
    probe: ``RunLog.write`` (commits included, every 50 writes and at close) timed with the process CPU
    clock; bytes = file size after close / steps, and the step rows' payload alone."""
    import sqlite3

    from gradprobe.runlog import RunLog

    spent = [0]
    orig_write, orig_commit = RunLog.write, RunLog.commit

    def timed(fn):
        def wrapper(self, *a, **k):
            t0 = time.process_time_ns()
            try:
                return fn(self, *a, **k)
            finally:
                spent[0] += time.process_time_ns() - t0

        return wrapper

    out = {}
    torch.manual_seed(0)
    proto = case.make_model()
    for label, kw in (("gp_default", {}), ("gp_everything", {"budget": None})):
        with tempfile.TemporaryDirectory() as d:
            RunLog.write, RunLog.commit = timed(orig_write), timed(orig_commit)
            try:
                import copy

                model = copy.deepcopy(proto)
                opt = torch.optim.SGD(model.parameters(), lr=1e-3)
                p = Probe(model, log_dir=d, run_name="bench", **kw)
                spent[0] = 0  # the header is written at open: per-step cost only from here
                ins = Instr(after=p.step, close=p.close)
                timer = []
                for _ in range(steps):
                    train_step(model, opt, case.x, case.y, case.loss_fn, ins, timer)
                p.close()
            finally:
                RunLog.write, RunLog.commit = orig_write, orig_commit
            f = Path(d) / "bench.sqlite"
            con = sqlite3.connect(str(f))
            n, payload = con.execute("SELECT count(*), sum(length(data)) FROM steps").fetchone()
            con.close()
            out[label] = {"steps": steps, "records": n, "file_bytes_per_step": f.stat().st_size / steps,
                          "payload_bytes_per_record": payload / max(n, 1), "write_ms_per_step": spent[0] / 1e6 / steps}
    return out


# --------------------------------------------------------------------------- report
def environment() -> str:
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=Path(gradprobe.__file__).parent, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except Exception:  # noqa: BLE001 - best effort for the report header
            return "?"

    cpu = "?"
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
                   if l.startswith("Model name"))
    except Exception:  # noqa: BLE001
        pass
    vers = []
    for mod in ("lightning", "backpack", "cockpit"):
        try:
            from importlib.metadata import version

            dist = {"backpack": "backpack-for-pytorch", "cockpit": "cockpit-for-pytorch"}.get(mod, mod)
            vers.append(f"{mod} {version(dist)}")
        except Exception:  # noqa: BLE001
            vers.append(f"{mod} not installed")
    return "\n".join([
        f"- date (UTC): {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M}; load average at start {os.getloadavg()[0]:.1f}",
        f"- CPU (`lscpu`): {cpu}; {platform.machine()}, nproc={os.cpu_count()}, torch threads={torch.get_num_threads()}",
        f"- python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, {', '.join(vers)}",
        f"- gradprobe {gradprobe.__version__} (git {git('rev-parse', '--short', 'HEAD')}{' + local changes' if git('status', '--porcelain', '.') else ''})",
        f"- command: `{' '.join(['python', 'benchmarks/bench_probe_overhead.py', *sys.argv[1:]])}`",
    ])


def _pct(r: float) -> str:
    return f"{100 * (r - 1):+.1f} %"


def _verdict(ci: tuple[float, float], target: float) -> str:
    if ci[1] <= target:
        return "✅"
    if ci[0] > target:
        return "❌"
    return "≈ (CI straddles)"


def case_report(case, res, rss=None, rlog=None) -> str:
    st: dict[str, PairedStats] = res["stats"]
    call = res["call_ms"]
    plain_ms = st["plain"].median_ms
    lines = [f"### {case.name}: {case.description}", "",
             f"{len(st['plain'].ratio)} rounds; blocks of {res['steps']} steps (heavy configurations: 1 step); "
             f"{res['seconds']:.0f} s; load average at the end {os.getloadavg()[0]:.1f}", "",
             "| config | CPU ms/step | ratio to plain (median) | 95 % CI | IQR | overhead | after-backward call (ms, median / mean) | peak RSS added (MB) | Δ vs plain (MB) |",
             "|---|---:|---:|---|---|---:|---:|---:|---:|"]
    for name, s in st.items():
        q1, q3 = s.iqr
        mem = (rss or {}).get(name, {})
        lines.append(
            f"| `{name}` | {s.median_ms:.2f} | {s.median_ratio:.3f} | [{s.ci[0]:.3f}, {s.ci[1]:.3f}] | [{q1:.3f}, {q3:.3f}] "
            f"| {_pct(s.median_ratio)} | {call[name]:.3f} / {res.get('call_mean_ms', {}).get(name, float('nan')):.3f} "
            f"| {mem.get('peak_mb', float('nan')):.1f} | {mem.get('delta_mb', float('nan')):+.1f} |")
    for name, why in res["failed"].items():
        lines.append(f"| `{name}` | cannot run: {why} |  |  |  |  |  |  |  |")
    lines.append("")
    for k, v in res["info"].items():
        if k.endswith("gp_default") and v.get("cadence") is not None:
            exp, peer, base = v["expected"], v.get("peer"), v.get("base")
            bound = ""
            if v.get("limit") and peer is not None and base and np.isfinite(peer):
                # the default's peer cap (budget="auto"): what one norm per parameter gradient cost, per step
                bound = (f"; bound held: {v['limit']}, per-parameter gradient norms timed at {1e3 * peer:.3f} ms = "
                         f"{100 * peer / base:.2f} % of the step")
            lines.append(f"`{k}` ended the run on the cadence {v['cadence']} (κ = {v['kappa']:.2f}, planned overhead "
                         f"{100 * exp:.1f} % of the step{bound})." if exp is not None and np.isfinite(exp) else f"`{k}` cadence {v['cadence']}.")
    # fixed Python cost per step: probe.step() with only the gradient norms armed, minus the norm kernel
    if "gp_grad_norms_only" in call and "floor_grads" in call:
        fixed = call["gp_grad_norms_only"] - call["floor_grads"]
        lines.append(f"Fixed Python cost of `probe.step()` per step: {1e3 * call['gp_grad_norms_only']:.0f} µs with only the "
                     f"gradient norms armed − {1e3 * call['floor_grads']:.0f} µs for the fused norm kernel + host copy = "
                     f"**{1e3 * fixed:.0f} µs** ({100 * fixed / plain_ms:.1f} % of the plain step; target < 100 µs).")
    if rlog:
        for k, v in rlog.items():
            lines.append(f"Run log (`{k}`, {v['steps']} steps, {v['records']} records): {v['file_bytes_per_step']:.0f} B of file per "
                         f"step ({v['payload_bytes_per_record']:.0f} B payload per record), write {1e3 * v['write_ms_per_step']:.0f} µs "
                         f"per step = {100 * v['write_ms_per_step'] / plain_ms:.2f} % of the plain step.")
    lines += ["", targets(case, st), ""]
    return "\n".join(lines)


def targets(case, st: dict[str, PairedStats]) -> str:
    rows = ["| target (issue 9 §5) | measured | verdict |", "|---|---|---|"]
    d = st.get("gp_default")
    if d is not None:
        t = DEFAULT_TARGET.get(case.name, DEFAULT_TARGET_OTHER)
        rows.append(f"| default `Probe(model)` ≤ {t:.2f}× plain | {d.median_ratio:.3f} [{d.ci[0]:.3f}, {d.ci[1]:.3f}] | {_verdict(d.ci, t)} |")
        if "lightning_grad_norm" in st:
            m, ci = paired_between(d, st["lightning_grad_norm"])
            rows.append(f"| default ≤ Lightning `grad_norm` (paired t_default / t_lightning) | {m:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] | {_verdict(ci, 1.0)} |")
        if "cockpit_gradnorm" in st:
            c = st["cockpit_gradnorm"]
            ov_d, ov_c = d.median_ratio - 1, c.median_ratio - 1
            ok = ov_d <= ov_c / 5
            rows.append(f"| default overhead ≤ 1/5 of Cockpit GradNorm's | {_pct(d.median_ratio)} vs {_pct(c.median_ratio)} / 5 = "
                        f"{100 * ov_c / 5:+.1f} % | {'✅' if ok else '❌'} |")
    e = st.get("gp_everything")
    if e is not None and case.name in EVERYTHING_TARGET:
        t = EVERYTHING_TARGET[case.name]
        rows.append(f"| everything every step ≤ {t:.2f}× plain | {e.median_ratio:.3f} [{e.ci[0]:.3f}, {e.ci[1]:.3f}] | {_verdict(e.ci, t)} |")
    aa = st.get("plain_again")
    if aa is not None:
        rows.append(f"| A/A control (`plain_again`) ≈ 1 | {aa.median_ratio:.3f} [{aa.ci[0]:.3f}, {aa.ci[1]:.3f}] | resolution of this run |")
    return "\n".join(rows)


# --------------------------------------------------------------------------- attribution
def phases(case, steps: int, which=None, alt_probes=None, warmup: int = 140) -> str:
    """Median thread-CPU time of each phase of the step, configurations interleaved in blocks, after
    ``warmup`` steps (the budgeted probe plans after 8 steps and replans every 64)."""
    configs, failed = build_configs(case, which, alt_probes, log=lambda *a: None)
    configs = {k: c for k, c in configs.items() if not c.ins.heavy}
    clock = time.thread_time_ns  # this thread only: autograd on CPU runs backward on the caller
    rec = {k: [] for k in configs}
    # configurations interleaved in blocks of MIN_BLOCK steps: a budgeted probe then sees (mostly) its own
    # step intervals, not its neighbours' steps
    for b in range(-(-(steps + warmup) // MIN_BLOCK)):
        for name, c in configs.items():
            for j in range(MIN_BLOCK):
                i = b * MIN_BLOCK + j
                model, opt, ins = c.model, c.opt, c.ins
                t0 = clock()
                opt.zero_grad(set_to_none=True)
                out = model(case.x)
                loss = c.loss_fn(out, case.y)
                t1 = clock()
                (ins.backward or _backward)(loss, out)
                t2 = clock()
                ins.after(loss)
                t3 = clock()
                opt.step()
                t4 = clock()
                if i >= warmup:
                    rec[name].append((t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0))
    for c in configs.values():
        c.ins.close()
    base = np.median(np.asarray(rec["plain"]) / 1e6, axis=0)
    lines = [f"#### {case.name}: CPU ms per phase (median of {steps} interleaved steps after {warmup}; Δ vs plain in parentheses)", "",
             "| config | forward+loss | backward | after_backward | optimizer | total |", "|---|---|---|---|---|---|"]
    for name, r in rec.items():
        med = np.median(np.asarray(r) / 1e6, axis=0)
        cells = [f"{m:.2f} ({m - b:+.2f})" if name != "plain" else f"{m:.2f}" for m, b in zip(med, base)]
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def profile(case, config: str, steps: int) -> None:
    """cProfile of ``steps`` steps of one configuration, then of the plain step, top functions by own time."""
    import cProfile
    import pstats

    configs, _ = build_configs(case, [config], log=print)
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


# --------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cases = make_cases()
    ap.add_argument("--quick", action="store_true", help="few short rounds, no RSS/run-log extras unless asked")
    ap.add_argument("--case", action="append", choices=list(cases), help="repeatable; default all")
    ap.add_argument("--rounds", type=int, help="rounds per case (default 8 quick / 30 full)")
    ap.add_argument("--block-seconds", type=float, help="target CPU seconds of one timed block (default 0.05 quick / 0.25 full)")
    ap.add_argument("--config", action="append", help="only these configs (plus plain, plain_again); repeatable")
    ap.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    ap.add_argument("--no-runlog", action="store_true", help="skip the run-log cost")
    ap.add_argument("--rss-only", action="store_true", help="only the peak-RSS table of every configuration (no timing)")
    ap.add_argument("--rss-steps", type=int, default=10, help="training steps per RSS subprocess (heavy configurations: at most 3)")
    ap.add_argument("--profile", metavar="CONFIG", help="cProfile CONFIG vs plain instead of timing")
    ap.add_argument("--alt", action="append", metavar="LABEL=SRC", help="also time the Probe under SRC as LABEL:gp_* (repeatable)")
    ap.add_argument("--cpu-clock-default", action="store_true",
                    help="also time the default Probe with every perf_counter replaced by the process CPU clock (row cpuclock:gp_default)")
    ap.add_argument("--phases", type=int, metavar="STEPS", help="per-phase CPU time over STEPS interleaved steps instead")
    ap.add_argument("--out", type=Path, help="also write the markdown report here")
    ap.add_argument("--rss-child", nargs=3, metavar=("CASE", "CONFIG", "STEPS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    _quiet_warnings()
    torch.set_num_threads(1)  # one core per run: the machine has 2 and timings must not fight for them
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    if args.rss_child:
        rss_child(args.rss_child[0], args.rss_child[1], int(args.rss_child[2]))
        return 0
    chosen = args.case or list(cases)
    alt = {}
    for spec in args.alt or []:
        label, sep, src = spec.partition("=")
        if not sep or not label.isidentifier():
            raise SystemExit(f"--alt wants LABEL=SRC with LABEL an identifier; got {spec!r}")
        alt[label] = load_alt_probe(Path(src), label)
    if args.cpu_clock_default:
        alt["cpuclock"] = load_alt_probe(Path(gradprobe.__file__).resolve().parent.parent, "cpuclock", replace=CPU_CLOCK)
        ALT_ONLY["cpuclock"] = ["gp_default"]
    if args.phases:
        out = "\n\n".join(phases(cases[c], args.phases, args.config, alt) for c in chosen)
        print(out)
        if args.out:
            args.out.write_text(out + "\n")
        return 0
    if args.profile:
        for c in chosen:
            profile(cases[c], args.profile, steps=100 if c not in ("transformer", "resnet") else 20)
        return 0
    rounds = args.rounds or (8 if args.quick else 30)
    block = args.block_seconds or (0.05 if args.quick else 0.25)
    warmup = 3 if args.quick else 12  # the budgeted probe plans after 8 steps
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    t_start = time.perf_counter()
    parts = ["## Environment", environment(), ""]
    if args.rss_only:
        for c in chosen:
            names = [n for n in PEERS if ":" not in n and (not args.config or n in args.config or n == "plain")]
            rss = peak_rss(c, names, steps=args.rss_steps)
            rows = [f"### {c}: peak resident memory added by training ({args.rss_steps} steps, a fresh process per configuration)", "",
                    "| config | peak RSS added (MB) | Δ vs plain (MB) |", "|---|---:|---:|"]
            for n, v in rss.items():
                rows.append(f"| `{n}` | {v['peak_mb']:.1f} | {v.get('delta_mb', float('nan')):+.1f} |" if "peak_mb" in v
                            else f"| `{n}` | failed: {v['error']} |  |")
            parts.append("\n".join(rows) + "\n")
            print(parts[-1], flush=True)
        if args.out:
            args.out.write_text("\n".join(parts) + "\n")
        return 0
    for c in chosen:
        case = cases[c]
        res = run_case(case, rounds=rounds, block_s=block, warmup=warmup, which=args.config, alt_probes=alt, log=log)
        rss = None if args.no_rss or args.quick else peak_rss(c, list(res["stats"]), steps=args.rss_steps)
        rlog = None
        if not (args.no_runlog or args.quick):
            rlog = runlog_cost(case, steps=200 if c in ("mlp", "mlp_narrow", "lstm") else 30)
        parts.append(case_report(case, res, rss, rlog))
        print(parts[-1], flush=True)
    parts.append(f"_total wall time {time.perf_counter() - t_start:.0f} s_")
    report = "\n".join(parts)
    if args.out:
        args.out.write_text(report + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
