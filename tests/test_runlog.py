"""The SQLite run log gives back exactly what was recorded, and survives SIGKILL."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from gradprobe import LayerFlow, Probe, RunLogError, load_trace
from gradprobe.runlog import RunLog, load_meta
from gradprobe.trace import MASKS, QUANTITIES
from reference.models import RunsBackwards
from reference.sqlite_edit import execute_and_commit

SRC = str(Path(__file__).resolve().parents[1] / "src")


def assert_same_flow(a: LayerFlow, b: LayerFlow):
    """Bit-exact equality of every field (NaN == NaN, ±Inf kept)."""
    assert a.names == b.names and a.kinds == b.kinds and a.step == b.step
    assert (a.loss is None and b.loss is None) or np.array_equal([a.loss], [b.loss], equal_nan=True)
    for q in QUANTITIES:
        x, y = getattr(a, q), getattr(b, q)
        assert np.array_equal(x, y, equal_nan=True), q
        assert np.array_equal(np.signbit(x), np.signbit(y)), q
    for m in MASKS:
        assert np.array_equal(getattr(a, m), getattr(b, m)), m
    assert np.array_equal(a.backward_rank, b.backward_rank)


class Odd(RunsBackwards):
    """Registration order ≠ execution order, an unused layer (NaN, masks False)."""

    def __init__(self):
        super().__init__(names=("first", "mid", "last"), n_in=3, act=torch.tanh, spare="spare")


def test_probe_log_roundtrip_is_exact(tmp_path):
    torch.manual_seed(0)
    model = Odd().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Probe(model, log_dir=tmp_path, run_name="r", commit_every=2, fetch_every=1) as probe:
        flows = []
        for _ in range(5):
            opt.zero_grad()
            loss = model(torch.randn(5, 3, dtype=torch.float64)).pow(2).mean()
            loss.backward()
            flows.append(probe.step(loss))
            opt.step()
    assert flows[0].names == ("first", "mid", "last", "spare")
    back = load_trace(tmp_path)
    assert back.steps.tolist() == [0, 1, 2, 3, 4] and len(back) == 5
    for a, b in zip(flows, back):
        assert_same_flow(a, b)
    assert load_meta(tmp_path / "r.sqlite")["layers"] == ["last", "spare", "mid", "first"]


def test_nonfinite_values_and_masks_roundtrip(tmp_path):
    inf, nan = float("inf"), float("nan")
    flows = [
        LayerFlow.from_arrays(
            ["b", "a", "c"], ["Linear", "Conv2d", "LSTM"], step=0, loss=nan,
            grad_norm=[nan, inf, -0.0], output_grad_norm=[1e-300, -inf, 5e-324],
            activation_norm=[1.0, 2.0, nan], weight_norm=[3.0, 0.1 + 0.2, 1e300],
            update_ratio=[nan, nan, nan], has_grad=[True, True, False], has_output_grad=[False, True, True],
            has_output=[True, False, True], backward_rank=[1, 2, 0],
        ),
        # (a layer's kind is stored once per name: it is a property of the module)
        LayerFlow.from_arrays(["b", "a", "c"], ["Linear", "Conv2d", "LSTM"], step=1, loss=inf, grad_norm=[1.0, 2.0, 3.0]),
        LayerFlow.from_arrays(["c", "b"], ["LSTM", "Linear"], step=2, loss=None, grad_norm=[7.0, np.pi]),  # order and set change
    ]
    log = RunLog(tmp_path / "x.sqlite", commit_every=100)
    for f in flows:
        log.write(f)
    log.close()
    back = load_trace(tmp_path / "x.sqlite")
    assert len(back) == 3
    for a, b in zip(flows, back):
        assert_same_flow(a, b)


def test_directory_with_two_logs_raises(tmp_path):
    for stem in ("one", "two"):
        RunLog(tmp_path / f"{stem}.sqlite").close()
    with pytest.raises(RunLogError, match="2 run logs.*one.sqlite.*two.sqlite"):
        load_trace(tmp_path)
    assert len(load_trace(tmp_path / "one.sqlite")) == 0


@pytest.mark.parametrize("content", [b"this is not a database" * 100, b"", b"SQLite format 3\x00" + b"\xff" * 200])
def test_corrupted_or_foreign_file_raises(tmp_path, content):
    p = tmp_path / "bad.sqlite"
    p.write_bytes(content)
    with pytest.raises(RunLogError, match="bad.sqlite"):
        load_trace(p)


def test_sqlite_file_that_is_not_a_run_log_raises(tmp_path):
    p = tmp_path / "other.sqlite"
    execute_and_commit(p, "CREATE TABLE t(x)")
    with pytest.raises(RunLogError, match="not a readable gradprobe run log"):
        load_trace(p)


def test_missing_path_and_empty_dir_raise(tmp_path):
    with pytest.raises(RunLogError, match="no run log"):
        load_trace(tmp_path / "nope.sqlite")
    with pytest.raises(RunLogError, match="no run log"):
        load_trace(tmp_path)
    assert not (tmp_path / "nope.sqlite").exists()  # reading never creates a file


CHILD = textwrap.dedent(
    """
    import sqlite3, sys, torch
    from torch import nn
    from gradprobe import Probe
    log_dir, k = sys.argv[1], int(sys.argv[2])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    probe = Probe(model, log_dir=log_dir, run_name="run", commit_every=k, budget=None)
    # an independent reader: counts what is durable in the file right now
    reader = sqlite3.connect(log_dir + "/run.sqlite")
    step = 0
    while True:
        opt.zero_grad()
        loss = model(torch.randn(32, 8)).pow(2).mean()
        loss.backward()
        flow = probe.step(loss)
        opt.step()
        print(f"step {step} {flow.grad_norm[0].hex()}", flush=True)
        committed = reader.execute("SELECT count(*) FROM steps").fetchone()[0]
        print(f"committed {committed}", flush=True)
        step += 1
    """
)


def test_sigkill_mid_run_keeps_every_committed_step(tmp_path):
    k = 3
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path), str(k)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    grad0: dict[int, float] = {}
    committed = 0
    deadline = time.monotonic() + 60
    try:
        for line in child.stdout:
            kind, *rest = line.split()
            if kind == "step":
                grad0[int(rest[0])] = float.fromhex(rest[1])
            elif kind == "committed":
                committed = int(rest[0])
                # kill at a step that is not a commit boundary, i.e. with a transaction open
                if committed >= 4 * k and len(grad0) % k == 1:
                    break
            assert time.monotonic() < deadline, "child too slow"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
        # steps the child printed between our last read and the kill (the file may hold them too)
        for line in child.stdout.read().splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[0] == "step":
                grad0[int(parts[1])] = float.fromhex(parts[2])
        child.stdout.close()
        err = child.stderr.read()
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL, err
    assert committed >= 4 * k and committed % k == 0
    trace = load_trace(tmp_path)  # opens cleanly (WAL recovery)
    steps = trace.steps.tolist()
    assert steps == list(range(len(steps))), "steps must be contiguous from 0"
    assert len(steps) >= committed
    assert len(steps) <= len(grad0)  # nothing the child did not record
    for f in trace:
        assert f.grad_norm[0] == grad0[f.step]  # exact numbers
        assert f.names == ("0", "2", "4")
    con = sqlite3.connect(tmp_path / "run.sqlite")
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()


def test_existing_run_is_never_mixed_with_a_new_one_regression(tmp_path):
    """Regression: reopening a run log by name wrote the new run's steps over the old run's steps
    with the same numbers (INSERT OR REPLACE) and kept the rest: two runs silently interleaved."""
    model = Odd()
    with Probe(model, log_dir=tmp_path, run_name="r") as probe:
        for _ in range(3):
            model(torch.randn(2, 3)).sum().backward()
            probe.step()
    with pytest.raises(RunLogError, match="already holds a run \\(3 steps\\)"):
        Probe(model, log_dir=tmp_path, run_name="r")
    assert all(not m._forward_hooks for m in model.modules())
    assert len(load_trace(tmp_path)) == 3
