"""Run-level notes: what a probe notes is in the live run and in the run log alike; Run.note adds one after
the probe closed (into the log too); header keys and non-JSON values are refused; appending keeps 'created'."""
from __future__ import annotations

import json
import time

import pytest
import torch
from torch import nn

import gradprobe
from gradprobe import ConfigError, RunLogError, load_run
from gradprobe.runlog import HEADER_KEYS, add_note, read_run
from reference.sqlite_edit import execute_and_commit


def _record(probe, net, steps=2):
    for _ in range(steps):
        net.zero_grad()
        net(torch.randn(8, 4)).pow(2).mean().backward()
        probe.step()


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def test_notes_are_in_the_live_run_and_in_the_run_log(tmp_path):
    net = _net()
    with gradprobe.Probe(net, log_dir=tmp_path, run_name="n") as probe:
        _record(probe, net)
        probe.note("summary", {"accuracy": 0.75, "settings": (1, 2), "nan": float("nan")})
        probe.diagnose()
        assert probe.notes["summary"]["settings"] == [1, 2]  # as the log gives it back
    live = probe.run()  # also after close: facts are the final ones
    back = load_run(tmp_path / "n.sqlite")
    for key in ("summary", "diagnosis", "diagnosis_step", "diagnosis_config", "facts", "model", "layers", "config",
                "torch", "gradprobe"):
        assert json.dumps(live.meta[key], sort_keys=True) == json.dumps(back.meta[key], sort_keys=True), key
    assert back.meta["summary"]["accuracy"] == 0.75


def test_run_note_after_close_writes_the_log(tmp_path):
    net = _net()
    with gradprobe.Probe(net, log_dir=tmp_path, run_name="n") as probe:
        _record(probe, net)
    live = probe.run()
    live.note("test accuracy", 0.5)
    live.note("trials", [{"remedy": "baseline", "ratio_end": 1e-5}])
    live.note("test accuracy", 0.625)  # a later note replaces an earlier one
    assert live.meta["test accuracy"] == 0.625
    back = load_run(tmp_path)
    assert back.meta["test accuracy"] == 0.625 and back.meta["trials"] == [{"remedy": "baseline", "ratio_end": 1e-5}]
    assert len(back.meta["sessions"]) == 1  # a note adds no session
    # a run without a run log keeps the note in memory only
    with gradprobe.Probe(net) as p2:
        _record(p2, net, 1)
    mem = p2.run()
    mem.note("x", {"a": 1})
    assert mem.meta["x"] == {"a": 1} and mem.path is None


@pytest.mark.parametrize("key", sorted(HEADER_KEYS))
def test_header_keys_cannot_be_noted(tmp_path, key):
    net = _net()
    with gradprobe.Probe(net, log_dir=tmp_path, run_name="h") as probe:
        _record(probe, net, 1)
        with pytest.raises(ConfigError, match="header"):
            probe.note(key, 1)
    with pytest.raises(ConfigError, match="header"):
        probe.run().note(key, 1)
    assert read_run(tmp_path).meta["model"] == "Sequential"


def test_non_json_notes_are_refused_naming_the_key(tmp_path):
    net = _net()
    with gradprobe.Probe(net, log_dir=tmp_path, run_name="j") as probe:
        with pytest.raises(ConfigError, match="'acc'.*plain JSON"):
            probe.note("acc", torch.tensor(0.5))
        with pytest.raises(ConfigError, match="non-empty string key"):
            probe.note("", 1)
        _record(probe, net, 1)
    assert "acc" not in probe.notes and "acc" not in read_run(tmp_path).meta


def test_add_note_while_a_probe_still_writes_says_so(tmp_path):
    net = _net()
    with gradprobe.Probe(net, log_dir=tmp_path, run_name="busy", commit_every=100, fetch_every=1) as probe:
        _record(probe, net, 1)  # an open write transaction holds the file
        with pytest.raises(RunLogError, match="probe.note"):
            add_note(tmp_path / "busy.sqlite", "k", 1)
    add_note(tmp_path / "busy.sqlite", "k", 1)
    assert read_run(tmp_path).meta["k"] == 1


def test_add_note_refuses_a_schema_1_log(tmp_path):
    from tests.reference.runlog_v1 import write_v1

    path = tmp_path / "old.sqlite"
    nan = float("nan")
    write_v1(path, [{"step": 0, "loss": 1.0, "names": ["a"], "kinds": ["Linear"], "grad_norm": [1.0],
                     "output_grad_norm": [1.0], "activation_norm": [1.0], "weight_norm": [1.0], "update_ratio": [nan],
                     "has_grad": [1.0], "has_output_grad": [1.0], "has_output": [1.0], "backward_rank": [0]}])
    with pytest.raises(RunLogError, match="upgrade"):
        add_note(path, "k", 1)


def test_appending_keeps_the_creation_time(tmp_path):
    net = _net()
    with gradprobe.Probe(net, log_dir=tmp_path, run_name="a") as probe:
        _record(probe, net, 1)
    execute_and_commit(tmp_path / "a.sqlite",
                       ("UPDATE meta SET value=? WHERE key='created'", (json.dumps("2000-01-01T00:00:00"),)))
    time.sleep(0.01)
    with gradprobe.Probe(net, log_dir=tmp_path, run_name="a", mode="append") as probe:
        _record(probe, net, 1)
    meta = read_run(tmp_path).meta
    assert meta["created"] == "2000-01-01T00:00:00" and len(meta["sessions"]) == 2
