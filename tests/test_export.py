"""Exports: TensorBoard (live sink and ``gradprobe export --tensorboard``), CSV (``--csv``) and ``Trace.to_pandas()``.

Oracle: the run log itself, read back with :func:`gradprobe.runlog.read_run`; the event files are read
with TensorBoard's own ``EventAccumulator`` and the CSV with the ``csv`` module. Every number must be the
run log's, bit for bit (float64 tensor summaries; floats written with ``repr``), for built-in
quantities, a user recorder's quantity and table, units, totals and temporal profiles.
"""
import csv
import sys

import numpy as np
import pytest
import torch
from torch import nn

import gradprobe
from gradprobe.cli import main
from gradprobe.errors import MissingExtraError
from gradprobe.integrations.tensorboard import TensorBoardSink, export_tensorboard
from gradprobe.probe import Contribution, Recorder
from gradprobe.runlog import read_run
from gradprobe.trace import Table

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.util import tensor_util  # noqa: E402


class MeanAbsGrad(Recorder):
    """A user recorder: a per-layer quantity and a one-site table."""

    name = "mean_abs_grad"

    def install(self, ctx):
        self.layers = ctx.layers

    def collect(self, advance):
        v = np.array([np.mean([p.grad.abs().mean().item() for p in l.params]) for l in self.layers])
        return Contribution(layers={"mean_abs_grad": v},
                            tables={"user": Table(("all",), ("",), {"peak": np.array([v.max()])})})


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.RNN(3, 8)
        self.fc = nn.Linear(8, 8)
        self.act = nn.Tanh()
        self.head = nn.Linear(8, 2)

    def forward(self, x):  # (T, B, 3)
        out, _ = self.rnn(x)
        return self.head(self.act(self.fc(out[-1])))


def _run(tmp_path, steps=4):
    torch.manual_seed(0)
    net = Net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    live = tmp_path / "tb_live"
    with gradprobe.Probe(net, temporal=True, recorders=[MeanAbsGrad()], sinks=[TensorBoardSink(live)],
                         log_dir=tmp_path / "runs", run_name="net") as probe:
        for _ in range(steps):
            opt.zero_grad()
            loss = net(torch.randn(12, 5, 3)).pow(2).mean()
            loss.backward()
            probe.step(loss)
            opt.step()
        probe.diagnose()
        trace = probe.trace
    return tmp_path / "runs" / "net.sqlite", live, trace


def _expected_scalars(records):
    """{tag: [(step, value)]} computed from the records directly (not through the export code)."""
    out = {}
    for f in records:
        out.setdefault("gradprobe/loss", []).append((f.step, f.loss))
        for q in f.values:
            for i, name in enumerate(f.names):
                if f.measured[q][i]:
                    out.setdefault(f"gradprobe/{q}/{name}", []).append((f.step, f.values[q][i]))
        for tname, t in f.tables.items():
            for c, col in t.columns.items():
                if isinstance(col, tuple) or c in t.transient:
                    continue
                for site, x in zip(t.sites, col):
                    if not np.isnan(float(x)):
                        out.setdefault(f"gradprobe/{tname}.{c}/{site}", []).append((f.step, float(x)))
    return out


def _read_events(path):
    ea = EventAccumulator(str(path), size_guidance={"tensors": 0})
    ea.Reload()
    return {tag: [(e.step, tensor_util.make_ndarray(e.tensor_proto).item()) for e in ea.Tensors(tag)]
            for tag in ea.Tags()["tensors"] if not tag.endswith("text_summary")}, ea


def test_tensorboard_live_and_exported_hold_the_run_logs_numbers(tmp_path):
    log, live, _ = _run(tmp_path)
    records = read_run(log).records
    want = _expected_scalars(records)
    assert {"gradprobe/mean_abs_grad/fc", "gradprobe/user.peak/all", "gradprobe/units.saturated_fraction/act",
            "gradprobe/totals.grad_norm/model", "gradprobe/output_grad_norm/rnn"} <= set(want)
    got_live, _ = _read_events(live)
    assert got_live == want
    assert export_tensorboard(log, tmp_path / "tb_export") == len(records) == 4
    got_export, ea = _read_events(tmp_path / "tb_export")
    assert got_export == want
    assert any(t.startswith("gradprobe/diagnosis") for t in ea.Tags()["tensors"])


def test_cli_export_csv_is_tidy_and_exact(tmp_path):
    log, _, trace = _run(tmp_path)
    out = tmp_path / "flow.csv"
    assert main(["export", str(log), "--csv", str(out), "--tensorboard", str(tmp_path / "tb")]) == 0
    with out.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["step", "table", "layer", "quantity", "index", "value"]
    records = {f.step: f for f in read_run(log).records}
    seen = set()
    for r in rows:
        f = records[int(r["step"])]
        v, k = float(r["value"]), int(r["index"])
        if r["table"] == "":
            want = f.loss if r["quantity"] == "loss" else f[r["quantity"]][f.index(r["layer"])]
        else:
            t = f.tables[r["table"]]
            want = np.asarray(t.columns[r["quantity"]][t.index(r["layer"])]).reshape(-1)[k]
        assert v == want or (np.isnan(v) and np.isnan(want)), r
        seen.add((r["table"], r["quantity"]))
    # every kind of number is there: per-layer (built-in and user), units, totals, user table, BPTT profiles
    assert {("", "loss"), ("", "grad_norm"), ("", "mean_abs_grad"), ("units", "saturated_fraction"),
            ("totals", "grad_norm"), ("user", "peak"), ("temporal", "h")} <= seen
    n_temporal = sum(r["table"] == "temporal" and r["quantity"] == "h" for r in rows)
    assert n_temporal == 4 * 12  # one row per time step of each step's profile
    # per-layer rows: exactly the measured values
    n_layer = sum(r["table"] == "" and r["quantity"] != "loss" for r in rows)
    assert n_layer == sum(int(m.sum()) for f in records.values() for m in f.measured.values())


def test_trace_to_pandas_matches_the_csv_and_the_matrix(tmp_path):
    pd = pytest.importorskip("pandas")
    log, _, trace = _run(tmp_path)
    df = trace.to_pandas()
    assert list(df.columns) == ["step", "table", "layer", "quantity", "index", "value"]
    out = tmp_path / "flow.csv"
    assert main(["export", str(log), "--csv", str(out)]) == 0
    from_csv = pd.read_csv(out, keep_default_na=False, dtype={"table": str, "layer": str})
    np.testing.assert_array_equal(df["value"].to_numpy(), from_csv["value"].astype(float).to_numpy())
    g = df[(df.table == "") & (df.quantity == "grad_norm")].pivot_table(index="step", columns="layer", values="value")
    np.testing.assert_array_equal(g[list(trace.names)].to_numpy(), trace.matrix("grad_norm"))


def test_missing_extras_name_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(MissingExtraError, match=r"gradprobe\[pandas\]"):
        gradprobe.Trace().to_pandas()
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(MissingExtraError, match=r"gradprobe\[tensorboard\]"):
        TensorBoardSink(tmp_path)


def test_cli_export_usage_errors(tmp_path, capsys):
    log, _, _ = _run(tmp_path, steps=1)
    assert main(["export", str(log)]) == 2
    assert "--csv" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "missing.sqlite"), "--csv", str(tmp_path / "x.csv")]) == 2
