"""The experiment store and runner: keys, transactions, checkpoints, resume after a crash (SIGKILL included)."""
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest

from gradprobe.cli import main
from gradprobe.experiments.pascanu import Pascanu2013
from gradprobe.experiments.runner import JobContext, RunSpec
from gradprobe.experiments.sweep import run_sweep
from gradprobe.experiments.store import Store, decode_array, encode_array

pytestmark = pytest.mark.usefixtures("one_thread")  # small products: one thread, as in training


def test_run_key_is_a_hash_of_the_full_spec():
    a = RunSpec("e", "1", {"lr": 0.01, "task": "t"}, 0)
    assert a.key == RunSpec("e", "1", {"task": "t", "lr": 0.01}, 0).key  # key order does not matter
    others = [RunSpec("e", "2", a.config, 0), RunSpec("e", "1", a.config, 1), RunSpec("f", "1", a.config, 0),
              RunSpec("e", "1", {"lr": 0.02, "task": "t"}, 0)]
    assert len({a.key, *(o.key for o in others)}) == 5
    with pytest.raises(ValueError, match="plain JSON"):
        RunSpec("e", "1", {"x": object()}, 0)


def test_arrays_round_trip_without_pickle():
    for a in (np.arange(6, dtype=np.float64).reshape(2, 3), np.array([True, False]), np.zeros((0, 4), np.float32)):
        b = decode_array(*encode_array(a))
        assert b.dtype == a.dtype and b.shape == a.shape and np.array_equal(a, b)
    with pytest.raises(ValueError, match="dtype"):
        encode_array(np.array(["text"]))


def test_claim_finish_status_and_partial_rows_of_a_crashed_attempt(tmp_path):
    with Store(tmp_path / "s.sqlite") as s:
        s.register("x/smoke", [("a", "x", {"config": {}, "seed": 0}), ("b", "x", {"config": {}, "seed": 1})])
        s.register("x/smoke", [("a", "x", {"config": {}, "seed": 0})])  # registering again changes nothing
        assert s.claim(["a", "b"]) is None  # no checkpoint: from scratch
        s.checkpoint(["a", "b"], 20, {"w": np.ones(3)}, {"a": [(20, "loss", 1.0)]}, {"a": [(20, "prof", np.ones(2))]})
        # the process dies here; a metric written after the checkpoint would be lost with it
        assert s.status().as_dict() == dict(total=2, done=0, failed=0, pending=2, running=2, duplicates=0)
        assert s.claim(["a", "b"]) == 20  # resume from the checkpoint, rows up to it kept
        step, tensors = s.load_checkpoint(["a", "b"])
        assert step == 20 and np.array_equal(tensors["w"], np.ones(3))
        s.finish_job({"a": {"r": 1}, "b": {"r": 2}}, {"a": [(40, "loss", 0.5)]}, {})
        st = s.status("x/smoke")
        assert st.as_dict() == dict(total=2, done=2, failed=0, pending=0, running=0, duplicates=0)
        assert s.load_checkpoint(["a", "b"]) is None
        steps, vals = s.metrics("a")["loss"]
        assert steps.tolist() == [20, 40] and vals.tolist() == [1.0, 0.5]
        assert [r.result for r in s.runs(sweep="x/smoke")] == [{"r": 1}, {"r": 2}]
        with pytest.raises(ValueError, match="already done"):
            s.claim(["a"])
        s.register("x/smoke", [("c", "x", {"config": {}, "seed": 2})])
        s.claim(["c"])
        s.fail(["c"], "boom")
        assert s.status().failed == 1 and s.runs(status="failed")[0].error == "boom"


def test_store_rejects_foreign_files(tmp_path):
    bad = tmp_path / "not.sqlite"
    bad.write_text("hello")
    with pytest.raises(OSError, match="not a gradprobe experiment store"):
        Store(bad)
    with pytest.raises(ValueError, match="directory"):
        Store(tmp_path)


def _results(path):
    with Store(path) as s:
        return {r.key: r.result for r in s.runs()}, {r.key: s.metrics(r.key) for r in s.runs()}


def test_resume_from_a_checkpoint_gives_the_uninterrupted_results(tmp_path, monkeypatch):
    exp = Pascanu2013()
    clean = tmp_path / "clean.sqlite"
    assert run_sweep(exp, "smoke", clean).done == 6
    crashed = tmp_path / "crashed.sqlite"
    calls = {"n": 0}
    real = JobContext.checkpoint

    def dying_checkpoint(self, *a, **k):
        real(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 3:  # first job done (2 checkpoints), second job checkpointed once: die mid-job
            raise KeyboardInterrupt

    monkeypatch.setattr(JobContext, "checkpoint", dying_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(exp, "smoke", crashed, checkpoint_every=0.0)
    monkeypatch.setattr(JobContext, "checkpoint", real)
    with Store(crashed) as s:
        mid = s.status()
        assert mid.done == 2 and mid.running == 2
        assert s.load_checkpoint([r.key for r in s.runs(status="running")])[0] == 20
    status = run_sweep(exp, "smoke", crashed, checkpoint_every=0.0)
    assert status.as_dict() == dict(total=6, done=6, failed=0, pending=0, running=0, duplicates=0)
    r1, m1 = _results(clean)
    r2, m2 = _results(crashed)
    assert r1 == r2
    assert {k: {n: (s.tolist(), v.tolist()) for n, (s, v) in d.items()} for k, d in m1.items()} == \
           {k: {n: (s.tolist(), v.tolist()) for n, (s, v) in d.items()} for k, d in m2.items()}


def _cli(*args, **kw):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.Popen([sys.executable, "-m", "gradprobe.cli", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, **kw)


def test_sigkill_at_any_point_resumes_without_duplicates(tmp_path):
    store = tmp_path / "killed.sqlite"
    proc = _cli("experiment", "run", "pascanu2013", "--profile", "smoke", "--store", str(store), "--checkpoint-every", "0")
    deadline = time.monotonic() + 120
    killed_at = None
    while time.monotonic() < deadline and proc.poll() is None:
        if store.exists():
            try:
                db = sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=1)
                done = db.execute("SELECT COUNT(*) FROM runs WHERE status='done'").fetchone()[0]
                ck = db.execute("SELECT COUNT(*) FROM checkpoints").fetchone()[0]
                db.close()
            except sqlite3.OperationalError:
                done = ck = 0
            if done >= 2 and ck >= 1:  # one job finished, the next one checkpointed mid-way
                os.kill(proc.pid, signal.SIGKILL)
                killed_at = done
                break
        time.sleep(0.005)
    proc.wait(30)
    assert killed_at is not None and killed_at < 6, "the sweep finished before it could be killed mid-way"
    assert proc.returncode == -signal.SIGKILL
    out = subprocess.run([sys.executable, "-m", "gradprobe.cli", "experiment", "run", "pascanu2013", "--profile",
                          "smoke", "--store", str(store)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    st = subprocess.run([sys.executable, "-m", "gradprobe.cli", "experiment", "status", "--store", str(store), "--json"],
                        capture_output=True, text=True, timeout=120)
    d = json.loads(st.stdout)
    assert {k: d[k] for k in ("total", "done", "failed", "pending", "duplicates")} == \
           dict(total=6, done=6, failed=0, pending=0, duplicates=0)
    clean = tmp_path / "clean.sqlite"
    run_sweep(Pascanu2013(), "smoke", clean)
    assert _results(clean)[0] == _results(store)[0]


def test_cli_list_status_report(tmp_path, capsys):
    assert main(["experiment", "list"]) == 0
    assert "pascanu2013" in capsys.readouterr().out
    store = tmp_path / "s.sqlite"
    assert main(["experiment", "run", "pascanu2013", "--profile", "smoke", "--store", str(store)]) == 0
    capsys.readouterr()
    assert main(["experiment", "status", "--store", str(store), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert (d["total"], d["done"], d["duplicates"]) == (6, 6, 0)
    assert main(["experiment", "run", "pascanu2013", "--profile", "smoke", "--store", str(store)]) == 0  # all skipped
    assert main(["experiment", "report", "--store", str(store), "--out", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr().out
    assert "| temporal_order | basic_tanh | 10 | SGD-CR |" in out
    assert (tmp_path / "rep" / "EXPERIMENTS.md").exists() and (tmp_path / "rep" / "pascanu2013_success.png").exists()
    html = (tmp_path / "rep" / "report.html").read_text()
    assert "SGD-CR" in html and "data:image/png;base64" in html
    assert main(["experiment", "status", "--store", str(tmp_path / "none.sqlite")]) == 2
    assert main(["experiment", "run", "nope", "--store", str(store)]) == 2
    assert main(["experiment", "run", "pascanu2013", "--profile", "smoke", "--store", str(tmp_path / "w.sqlite"),
                 "--workers", "0"]) == 2  # a clear error, not a hang


def _content(path):
    with Store(path) as s:
        return {r.key: (r.status, r.result, {n: (st.tolist(), v.tolist()) for n, (st, v) in s.metrics(r.key).items()},
                        [(st, n, a.tolist()) for st, n, a in s.arrays(r.key)])
                for r in s.runs()}


def test_local_workers_write_what_one_process_writes(tmp_path):
    """``workers=2`` (two spawned processes, jobs in parallel) leaves the store exactly as the one-process loop."""
    serial, pooled = tmp_path / "serial.sqlite", tmp_path / "pooled.sqlite"
    run_sweep(Pascanu2013(), "smoke", serial)
    seen = []
    status = run_sweep(Pascanu2013(), "smoke", pooled, workers=2, on_progress=lambda *a: seen.append(a[0]))
    assert status.as_dict() == dict(total=6, done=6, failed=0, pending=0, running=0, duplicates=0)
    assert sorted(seen) == [2, 4, 6]
    assert _content(pooled) == _content(serial)
    assert run_sweep(Pascanu2013(), "smoke", pooled, workers=2).done == 6  # nothing left to do
    with pytest.raises(ValueError, match="workers must be >= 1"):
        run_sweep(Pascanu2013(), "smoke", tmp_path / "x.sqlite", workers=0)
    with pytest.raises(ValueError, match="local executor"):
        run_sweep(Pascanu2013(), "smoke", tmp_path / "y.sqlite", executor="ray", workers=2)
