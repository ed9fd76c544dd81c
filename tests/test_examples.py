"""The scripts in examples/ run as a user would run them (tiny models, a few steps) and say what they claim.

The framework examples start Lightning, a Trainer or two processes (tens of seconds each on a shared
2-core machine) and repeat what tests/test_integrations_*.py and test_probe_distributed.py check in the
fast suite: they run in the slow target."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

import gradprobe

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(name, out):
    r = subprocess.run([sys.executable, str(EXAMPLES / name), str(out)], capture_output=True, text=True, timeout=600,
                       cwd=out.parent)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def test_every_example_is_tested():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(
        ["plain_loop.py", "lightning_fit.py", "huggingface_trainer.py", "ddp.py"])


def test_plain_loop(tmp_path):
    out = _run("plain_loop.py", tmp_path / "out")
    assert "vanishing" in out
    run = gradprobe.load_run(tmp_path / "out" / "runs")
    assert len(run.trace) == 20 and run.diagnosis.verdict == "vanishing"
    assert list((tmp_path / "out" / "tb").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_lightning(tmp_path):
    pytest.importorskip("lightning")
    out = _run("lightning_fit.py", tmp_path / "out")
    run = gradprobe.load_run(tmp_path / "out" / "runs")
    assert len(run.trace) == 8  # 2 epochs × 8 batches / accumulate 2: once per optimizer step
    assert run.diagnosis.verdict in out


@pytest.mark.slow
def test_huggingface(tmp_path):
    pytest.importorskip("transformers")
    out = _run("huggingface_trainer.py", tmp_path / "out")
    pairs = re.findall(r"Trainer's grad_norm (\S+)\s+gradprobe's total (\S+)", out)
    assert len(pairs) == 4 and all(a == b for a, b in pairs), out


@pytest.mark.slow
def test_ddp(tmp_path):
    out = _run("ddp.py", tmp_path / "out")
    assert "run logs: ['ddp.sqlite']" in out
    trace = gradprobe.load_trace(tmp_path / "out" / "runs")
    # the default probe keeps its overhead budget: it records some of the 10 steps (how many depends on
    # the machine's speed), each once, from rank 0 only
    steps = [r.step for r in trace]
    assert 0 < len(steps) <= 10 and steps == sorted(set(steps)) and set(steps) <= set(range(10))
