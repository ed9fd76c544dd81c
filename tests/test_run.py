"""The run log holds the whole result (issue 8): a reloaded run diagnoses exactly as the live probe did;
user recorders and sinks plug in without any change inside gradprobe; schema, append, overwrite, size."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradprobe
from gradprobe import Contribution, Deferred, Probe, Recorder, RunLogError, Sink, Table, load_run, load_trace
from gradprobe.models import DeepMLP
from gradprobe.runlog import SCHEMA_VERSION, RunLog, read_run, upgrade
from tests.reference.runlog_v1 import write_v1
from tests.reference.sqlite_edit import execute_and_commit


# ----------------------------------------------------------------------------------- a user's recorder
class MaxAbsGrad(Recorder):
    """max |∂L/∂θ| over each layer's parameters, and the batch-mean of each layer's grad norm as a table."""

    name = "max_abs_grad"

    def install(self, ctx):
        self.layers = ctx.layers
        self.calls = 0

    def collect(self, advance):
        self.calls += 1
        peaks = [torch.stack([p.grad.abs().max() for p in l.params if p.grad is not None]).max()
                 if any(p.grad is not None for p in l.params) else torch.tensor(float("nan")) for l in self.layers]

        def finish(host):
            vals = np.array([float(h) for h in host])
            table = Table(("total",), ("",), {"peak": np.array([np.nanmax(vals)]), "per_layer": (vals,)})
            return Contribution(layers={"max_abs_grad": vals}, tables={"grad_peaks": table})

        return Deferred(peaks, finish)


def _train(model, steps, x, y, probe, lr=0.1):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    flows = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        flows.append(probe.step(loss))
        opt.step()
    return flows


X = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
Y = torch.randint(0, 4, (64,), generator=torch.Generator().manual_seed(1))


def test_user_recorder_reaches_trace_run_log_and_load_run(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))
    rec = MaxAbsGrad()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    want = []
    with Probe(net, recorders=[rec], log_dir=tmp_path, run_name="u", fetch_every=1) as probe:
        for _ in range(4):
            opt.zero_grad()
            F.cross_entropy(net(X), Y).backward()
            # oracle: the same maximum computed here, directly from .grad
            want.append([max(p.grad.abs().max().item() for p in m.parameters()) for m in (net[0], net[2], net[4])])
            flow = probe.step()
            opt.step()
        live = probe.trace
    assert rec.calls == 4
    np.testing.assert_array_equal(flow["max_abs_grad"], want[-1])
    np.testing.assert_array_equal(live.matrix("max_abs_grad"), want)
    back = load_run(tmp_path / "u.sqlite")
    np.testing.assert_array_equal(back.trace.matrix("max_abs_grad"), want)
    assert "max_abs_grad" in back.trace.quantities
    t = back.trace.last.tables["grad_peaks"]
    assert t.sites == ("total",) and t.column("peak")[0] == max(want[-1])
    np.testing.assert_array_equal(t.column("per_layer")[0], want[-1])
    recs = {r["name"]: r for r in back.config["recorders"]}
    assert recs["max_abs_grad"]["class"].endswith("MaxAbsGrad")


def test_recorder_errors_are_clear():
    net = nn.Linear(3, 1)

    class Bad(Recorder):
        name = "bad"

        def collect(self, advance):
            return Contribution(layers={"x": np.ones(5)})

    class Clash(Recorder):
        name = "clash"

        def collect(self, advance):
            return Contribution(layers={"grad_norm": np.ones(1)})

    with pytest.raises(gradprobe.ConfigError, match="unique"):
        Probe(net, recorders=[Bad(), Bad()], fetch_every=1)
    with pytest.raises(gradprobe.ConfigError, match="Recorder instances"):
        Probe(net, recorders=[object()], fetch_every=1)
    for rec, msg in ((Bad(), "shape \\(5,\\)"), (Clash(), "both measure the per-layer quantity 'grad_norm'")):
        with Probe(net, recorders=[rec], fetch_every=1) as probe:
            net(torch.randn(2, 3)).sum().backward()
            with pytest.raises(gradprobe.ConfigError, match=msg):
                probe.step()


class Recording(Sink):
    def __init__(self):
        self.events = []

    def open(self, header):
        self.events.append(("open", header.model, header.layers, header.first_step))

    def write(self, record):
        self.events.append(("write", record.step))

    def note(self, key, value):
        self.events.append(("note", key))

    def close(self):
        self.events.append(("close",))


def test_user_sink_sees_header_records_notes_and_close():
    net = nn.Sequential(nn.Linear(16, 8), nn.Sigmoid(), nn.Linear(8, 4))
    sink = Recording()
    with Probe(net, sinks=[sink], every=2) as probe:
        _train(net, 5, X, Y, probe)
        probe.diagnose()
    kinds = [e[0] for e in sink.events]
    assert sink.events[0] == ("open", "Sequential", ("0", "2"), 0)
    assert [e[1] for e in sink.events if e[0] == "write"] == [0, 2, 4]
    assert {e[1] for e in sink.events if e[0] == "note"} >= {"facts", "diagnosis", "diagnosis_config"}
    assert kinds[-1] == "close" and kinds.count("close") == 1
    with pytest.raises(gradprobe.ConfigError, match="Sink instances"):
        Probe(net, sinks=[object()])


# ------------------------------------------------------------------------------ whole result, exactly
def _live_and_loaded(tmp_path, model, *, steps, x, y, lr=0.1, **probe_kw):
    with Probe(model, log_dir=tmp_path, run_name="r", **probe_kw) as probe:
        _train(model, steps, x, y, probe, lr=lr)
        live = probe.diagnose()
        live_run = probe.run()
    return live, live_run, load_run(tmp_path / "r.sqlite")


def test_sigmoid_mlp_rediagnosed_from_its_run_log_says_exactly_the_same(tmp_path):
    """The issue's case: remedies, their order, every evidence line (mean-field included) are equal."""
    torch.manual_seed(0)
    net = DeepMLP(16, 4, width=32, depth=10, activation="sigmoid", init="standard",
                  generator=torch.Generator().manual_seed(0))
    live, live_run, run = _live_and_loaded(tmp_path, net, steps=6, x=X, y=Y)
    assert live.verdict == "vanishing"
    assert any("mean-field" in e for e in live.evidence)  # the saved facts carry the expectation
    assert run.diagnose() == live and str(run.diagnose()) == str(live)
    assert run.diagnosis == live  # the saved one, too
    assert [r.id for r in run.diagnose().remedies] == [r.id for r in live.remedies]
    assert run.facts == live_run.facts
    assert run.meta["diagnosis_step"] == 5


def test_thinned_trace_and_history_rules_are_replayed(tmp_path):
    """A bounded live trace (max_steps) is thinned; the run log keeps every step; the reloaded run
    replays the bound so rules over history (stagnation) see the same records."""
    torch.manual_seed(0)
    net = DeepMLP(16, 4, width=16, depth=6, activation="sigmoid", init="standard",
                  generator=torch.Generator().manual_seed(0))
    live, live_run, run = _live_and_loaded(tmp_path, net, steps=70, x=X, y=Y, lr=0.01, max_steps=16,
                                           every=3)
    assert len(run.trace) == 24 and live_run.trace.stride > 1  # every recorded step vs the bounded live trace
    assert run.trace.thinned(16).steps.tolist() == live_run.trace.steps.tolist()
    assert run.trace.last.step == 69 and live_run.trace.last.step != 69  # the bound dropped the last step
    assert run.diagnose() == live == live_run.diagnose()


def test_temporal_run_rediagnosed_identically(tmp_path):
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.head = nn.RNN(3, 16), nn.Linear(16, 4)

        def forward(self, x):
            out, _ = self.rnn(x)
            return self.head(out[-1])

    net = Net()
    x = torch.randn(60, 8, 3)
    y = torch.randint(0, 4, (8,))
    live, _, run = _live_and_loaded(tmp_path, net, steps=2, x=x, y=y, temporal=True)
    assert "vanishing_in_time" in live
    assert run.diagnose() == live
    back = run.trace.last.temporal["rnn.l0"]
    assert back.per_sequence.shape == (1, 60)  # per-sequence profiles stay in memory only


def test_saved_configuration_and_overrides_on_a_loaded_run(tmp_path):
    """The run log keeps the configuration of the last diagnosis; overrides apply on top of it."""
    torch.manual_seed(0)
    net = DeepMLP(16, 4, width=32, depth=6, activation="tanh", init="xavier", generator=torch.Generator().manual_seed(0))
    with Probe(net, log_dir=tmp_path, run_name="r") as probe:
        _train(net, 2, X, Y, probe)
        default = probe.diagnose()
        strict = probe.diagnose(vanish_ratio=0.99, explode_ratio=1.01)
    assert strict != default
    run = load_run(tmp_path)
    assert run.diagnose() == strict == run.diagnosis
    assert run.diagnose(vanish_ratio=1e-2, explode_ratio=1e2) == default


def test_a_run_never_diagnosed_has_no_saved_diagnosis(tmp_path):
    net = nn.Sequential(nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 4))
    with Probe(net, log_dir=tmp_path, run_name="r") as probe:
        _train(net, 2, X, Y, probe)
    run = load_run(tmp_path)
    assert run.diagnosis is None and run.facts is not None
    assert run.diagnose().verdict in ("healthy", "vanishing", "exploding")
    empty = tmp_path / "e"
    RunLog(empty / "e.sqlite").close()
    with pytest.raises(gradprobe.ProbeStateError, match="no recorded step"):
        load_run(empty).diagnose()


# ------------------------------------------------------------------------------------ schema and modes
def test_newer_or_unknown_schema_is_a_clear_error(tmp_path):
    for version, msg in ((SCHEMA_VERSION + 1, "newer gradprobe"), ("'banana'", "unknown schema version")):
        p = tmp_path / f"s{len(str(version))}.sqlite"
        RunLog(p).close()
        execute_and_commit(p, ("UPDATE meta SET value=? WHERE key='schema_version'", (json.dumps(version),)))
        with pytest.raises(RunLogError, match=msg):
            load_run(p)
        with pytest.raises(RunLogError, match=msg):
            RunLog(p, mode="append")


def test_append_continues_and_overwrite_replaces(tmp_path):
    net = nn.Sequential(nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 4))
    with Probe(net, log_dir=tmp_path, run_name="r", fetch_every=1) as probe:
        first = _train(net, 3, X, Y, probe)
    with Probe(net, log_dir=tmp_path, run_name="r", mode="append", fetch_every=1) as probe:
        assert probe.current_step == 3 and probe.step_count == 0
        more = _train(net, 2, X, Y, probe)
    assert [f.step for f in more] == [3, 4]
    back = load_run(tmp_path)
    assert back.trace.steps.tolist() == [0, 1, 2, 3, 4]
    for a, b in zip(first + more, back.trace):
        np.testing.assert_array_equal(a.grad_norm, b.grad_norm)
    assert [s["first_step"] for s in back.meta["sessions"]] == [0, 3]
    with Probe(net, log_dir=tmp_path, run_name="r", mode="overwrite", fetch_every=1) as probe:
        _train(net, 1, X, Y, probe)
    assert load_trace(tmp_path).steps.tolist() == [0]
    with pytest.raises(RunLogError, match="mode='append'"):
        Probe(net, log_dir=tmp_path, run_name="r", fetch_every=1)
    with pytest.raises(gradprobe.ConfigError, match="mode"):
        Probe(net, log_dir=tmp_path, run_name="r", mode="merge", fetch_every=1)


def test_two_open_writers_on_one_run_log_are_refused_with_the_reason(tmp_path):
    net = nn.Linear(16, 4)
    with Probe(net, log_dir=tmp_path, run_name="r"):
        with pytest.raises(RunLogError, match="another open probe"):
            Probe(net, log_dir=tmp_path, run_name="r")
    assert not net._forward_hooks


def _v1_steps():
    return [
        {"step": s, "loss": [0.5, math.inf][s], "names": ["b", "a"], "kinds": ["Linear", "Linear"],
         "grad_norm": [1.0 + s, 2.0], "output_grad_norm": [0.25, math.nan], "activation_norm": [3.0, 4.0],
         "weight_norm": [5.0, 6.0], "update_ratio": [math.nan, 0.1], "has_grad": [1, 1], "has_output_grad": [1, 0],
         "has_output": [1, 1], "backward_rank": [1, 0],
         "units": (["act"], ["Tanh"], [0.75], [math.nan], [8]), "temporal": {"rnn.l0": (0, [1.0, 0.5, 0.25], None)}}
        for s in range(2)
    ]


def test_schema1_run_logs_still_load_and_upgrade_converts_them(tmp_path):
    p = tmp_path / "old.sqlite"
    write_v1(p, _v1_steps())
    def check(trace):
        assert trace.steps.tolist() == [0, 1]
        f = trace[1]
        assert f.names == ("b", "a") and f.loss == math.inf
        np.testing.assert_array_equal(f.grad_norm, [2.0, 2.0])
        assert f.has_output_grad.tolist() == [True, False] and np.isnan(f.output_grad_norm[1])
        assert f.units.saturated_fraction.tolist() == [0.75] and f.units.n_units.tolist() == [8]
        np.testing.assert_array_equal(f.temporal["rnn.l0"].grad_norm, [1.0, 0.5, 0.25])
    check(load_trace(p))
    assert read_run(p).schema == 1
    with pytest.raises(RunLogError, match="upgrade"):
        RunLog(p, mode="append")
    upgrade(p)
    assert read_run(p).schema == SCHEMA_VERSION
    check(load_trace(p))
    log = RunLog(p, mode="append")
    assert log.next_step == 2
    log.close()


def test_damaged_step_data_is_a_run_log_error_naming_the_step(tmp_path):
    net = nn.Linear(16, 4)
    with Probe(net, log_dir=tmp_path, run_name="r") as probe:
        _train(net, 3, X, Y, probe)
    execute_and_commit(tmp_path / "r.sqlite", "UPDATE steps SET data = substr(data, 1, 5) WHERE step = 1",
                       "UPDATE steps SET loss = 'lots' WHERE step = 2")
    with pytest.raises(RunLogError, match="damaged at step 1"):
        load_run(tmp_path)


def test_storage_is_compact_for_a_20_layer_mlp(tmp_path):
    """≤ 1.5 KB per recorded step (file size) for the benchmark's MLP of 20 Linear layers, units included."""
    torch.manual_seed(0)
    net = DeepMLP(64, 10, width=64, depth=18, activation="relu", init="he", generator=torch.Generator().manual_seed(0))
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    n = 300
    with Probe(net, log_dir=tmp_path, run_name="r", commit_every=100, budget=None) as probe:  # every step, all
        flows = _train(net, n, x, y, probe, lr=0.01)
    assert len(flows[-1]) == 20
    size = os.path.getsize(tmp_path / "r.sqlite")
    assert size / n <= 1536, f"{size / n:.0f} bytes per step"


def test_old_probe_location_warns_and_gives_the_session():
    import gradprobe.probe as old

    with pytest.warns(DeprecationWarning, match="gradprobe.probe.Probe"):
        cls = old.Probe
    assert cls is gradprobe.probe.Session and issubclass(gradprobe.Probe, cls)
