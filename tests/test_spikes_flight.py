"""The full flight recorder (issue 12 §2): every quantity the probe can take, at every step, for the steps
before a spike, without touching the schedule's records.

Oracles: float64 brute force per step, independent of the probe: copies of the parameters at every
``probe.step()`` (weight norms and the one-step update ratio ‖θ_l(t) − θ_l(t−1)‖/‖θ_l(t−1)‖), the test's
own hooks on every layer's output (‖h_l‖, ‖∂L/∂h_l‖) and on the activations (dead and saturated units by
their definitions); the records of the same run without the flight recorder (bit for bit); the memory
bound's formula against the bytes of the tensors held.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradprobe import Probe, load_run
from gradprobe.errors import ConfigError
from gradprobe.models import DeepMLP
from gradprobe.probe import SpikeWatch
from gradprobe.probe.schedule import FixedSchedule
from gradprobe.trace import FlightRecord, FlightTable, SpikeEvent, SpikeLog

SPIKE = 70  # the corrupted batch
STEPS = 90
SATURATION = 0.05


def _net(dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 1)).to(dtype)


class Brute:
    """float64 per-step values of the layers (the Linear modules) and activations, by the test's own hooks."""

    def __init__(self, net: nn.Sequential):
        self.net = net
        self.linears = [m for m in net if isinstance(m, nn.Linear)]
        self.acts = [m for m in net if not isinstance(m, nn.Linear)]
        self.out_grad, self.act_norm, self.units = {}, {}, {}
        self.weights: list[list[torch.Tensor]] = []
        for i, m in enumerate(self.linears):
            m.register_forward_hook(self._layer_hook(i))
        for j, m in enumerate(self.acts):
            m.register_forward_hook(self._act_hook(j))

    def _layer_hook(self, i):
        def hook(m, args, out):
            self.act_norm[i] = float(out.detach().double().norm())
            out.register_hook(lambda g: self.out_grad.__setitem__(i, float(g.double().norm())))
        return hook

    def _act_hook(self, j):
        def hook(m, args, out):
            o = out.detach().double()
            if isinstance(m, nn.Tanh):  # 1 − t² < ε: the local derivative below ε of its maximum
                self.units[j] = ("saturated", float(((1 - o ** 2) < SATURATION).double().mean()))
            else:  # a unit whose output is ≤ 0 on every sample
                self.units[j] = ("dead", float((o.amax(0) <= 0).double().mean()))
        return hook

    def take(self) -> dict:
        """Called at probe.step(): this step's values (and the parameters, for the update ratios)."""
        self.weights.append([torch.cat([p.detach().double().reshape(-1) for p in m.parameters()]) for m in self.linears])
        rec = {"output_grad_norm": [self.out_grad.get(i, math.nan) for i in range(len(self.linears))],
               "activation_norm": [self.act_norm[i] for i in range(len(self.linears))],
               "weight_norm": [float(w.norm()) for w in self.weights[-1]],
               "units": dict(self.units)}
        self.out_grad, self.act_norm, self.units = {}, {}, {}
        return rec

    def update_ratio(self, t: int, span: int = 1) -> list[float]:
        if t < span:
            return [math.nan] * len(self.linears)
        return [float((a - b).norm() / b.norm()) for a, b in zip(self.weights[t], self.weights[t - span])]


def _run(spikes, *, cadence=None, log_dir=None, name="run", brute=False, steps=STEPS, guard=None, schedule=None):
    net = _net()
    b = Brute(net) if brute else None
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 1, generator=g, dtype=torch.float64)
    recs = []
    kw = dict(cadence=cadence) if cadence is not None else dict(budget=None)
    with Probe(net, spikes=spikes, on_spike=guard, saturation=SATURATION, log_dir=log_dir, run_name=name, **kw) as probe:
        if schedule is not None:
            probe.schedule = schedule(probe.schedule)
        for t in range(steps):
            x = torch.randn(16, 6, generator=g, dtype=torch.float64)
            y = torch.sin(x @ w)
            opt.zero_grad(set_to_none=True)
            loss = F.mse_loss(net(x), y) * (1000.0 if t == SPIKE else 1.0)  # a mis-scaled batch
            loss.backward()
            if b is not None:
                recs.append(b.take())
            probe.step(loss)
            if t != SPIKE:  # (the corrupted batch does no lasting harm)
                opt.step()
        log = probe.spike_log()
        flows = list(probe.trace)
        names = list(flows[0].names)
        full = probe.spikes._full
        if full is not None:
            b = b or Brute.__new__(Brute)
            b.counts = (dict(full.ran), dict(full.reused))
    return log, flows, names, b, recs


CADENCE = {"weights": 4, "outputs": 2, "units": 8}


@pytest.fixture(scope="module")
def full_run():
    return _run("full", cadence=CADENCE, brute=True)


def test_every_quantity_at_every_flight_step_equals_the_float64_brute_force(full_run):
    log, flows, names, b, recs = full_run
    assert log.steps == [SPIKE]
    f = log.events[0].flight
    assert f.full and f.steps == tuple(range(SPIKE - 31, SPIKE + 1))
    assert f.layers == tuple(names) == ("0", "2", "4")  # discovery order = forward order here
    assert set(f.quantities) == {"output_grad_norm", "activation_norm", "weight_norm", "update_ratio"}
    for q in ("output_grad_norm", "activation_norm", "weight_norm"):
        np.testing.assert_allclose(np.array(f.quantities[q]), [recs[t][q] for t in f.steps], rtol=1e-12, err_msg=q)
    # the update ratio of every flight step spans that one step, although the session's own spans 4
    np.testing.assert_allclose(np.array(f.quantities["update_ratio"]), [b.update_ratio(t) for t in f.steps], rtol=1e-10)
    units = f.tables["units"]
    assert units.sites == ("1", "3") and units.kinds == ("Tanh", "ReLU")
    sat = np.array(units.columns["saturated_fraction"])
    dead = np.array(units.columns["dead_fraction"])
    np.testing.assert_allclose(sat[:, 0], [recs[t]["units"][0][1] for t in f.steps], rtol=1e-12)
    np.testing.assert_allclose(dead[:, 1], [recs[t]["units"][1][1] for t in f.steps], rtol=1e-12)
    assert np.isnan(sat[:, 1]).all() and np.isnan(dead[:, 0]).all()  # (a ReLU has no saturation here, a tanh no dead units)
    # at the spike itself every output gradient jumps ×1000 (the loss is scaled), the forward does not
    og, act = np.array(f.quantities["output_grad_norm"]), np.array(f.quantities["activation_norm"])
    assert (og[-1] > 300 * np.median(og[:-1], axis=0)).all() and (act[-1] < 3 * np.median(act[:-1], axis=0)).all()


def test_the_session_records_are_exactly_those_without_the_flight_recorder(full_run, tmp_path):
    """Same run, same schedule (weights every 4 steps, outputs every 2, units every 8): the trace and the
    run log are the same bit for bit with and without the full flight recorder, and the session's update
    ratio still spans its 4 steps."""
    log, flows, names, b, recs = full_run
    base_log, base_flows, _, _, _ = _run(True, cadence=CADENCE, log_dir=tmp_path, name="watch")
    full_log, _, _, _, _ = _run("full", cadence=CADENCE, log_dir=tmp_path, name="full")
    assert [f.step for f in flows] == [f.step for f in base_flows] == list(range(STEPS))
    for a, c in zip(flows, base_flows):
        assert a.recorders == c.recorders and a.names == c.names
        assert np.array_equal(a.backward_rank, c.backward_rank)
        assert set(a.values) == set(c.values)
        for q in a.values:
            assert np.array_equal(a.values[q], c.values[q], equal_nan=True), (a.step, q)
            assert np.array_equal(a.measured[q], c.measured[q])
        assert set(a.tables) == set(c.tables)
        for k in a.tables:
            for col, v in a.tables[k].columns.items():
                assert np.array_equal(np.asarray(v), np.asarray(c.tables[k].columns[col]), equal_nan=True)
    recorded = [f for f in flows if "weights" in f.recorders]
    assert [f.step for f in recorded] == list(range(0, STEPS, 4))
    for f in recorded[1:]:
        np.testing.assert_allclose(f["update_ratio"], b.update_ratio(f.step, span=4), rtol=1e-10)
    # the run logs: the same records; the spike log the same but for the flight record's extra quantities
    ra, rb = load_run(tmp_path / "full.sqlite"), load_run(tmp_path / "watch.sqlite")
    assert len(ra.trace) == len(rb.trace) == STEPS
    for a, c in zip(ra.trace, rb.trace):
        assert a.recorders == c.recorders
        for q in a.values:
            assert np.array_equal(a.values[q], c.values[q], equal_nan=True)
    ea, eb = ra.spikes.events[0].as_dict(), rb.spikes.events[0].as_dict()
    assert ea["flight"].pop("quantities") and ea["flight"].pop("tables")
    assert eb["flight"].pop("quantities") == {} and eb["flight"].pop("tables") == {}
    assert SpikeEvent.from_dict(ea) == SpikeEvent.from_dict(eb)
    # load_run returns the full flight record exactly as the live watch made it
    assert ra.spikes == full_log and ra.spikes.events[0].flight.full
    assert ra.spikes.config["full_flight"] and ra.spikes.config["flight_recorders"] == ["weights", "outputs", "units"]


class Runs(FixedSchedule):
    """The weights recorded in runs: 4 steps on, 3 off (its update ratio then spans one step on the last 3 of
    each run, 4 steps on the first); the other recorders at the session's fixed periods."""

    def __init__(self, base: FixedSchedule):
        self._period = base.cadence

    def armed(self, name, t):
        return t % 7 < 4 if name == "weights" else super().armed(name, t)


def test_the_weights_twin_reuses_the_sessions_one_step_update_ratio_bit_for_bit():
    """Where the session records the weights on a step and the one before (its update ratio spans that one
    step) the flight takes its numbers, bit for bit; elsewhere the twin runs, and after such a run of steps
    it continues from the session's snapshot: every flight step is the float64 brute force, and the flight is
    the one whose twins ran on every step."""
    log, flows, _, b, recs = _run("full", cadence=CADENCE, brute=True, schedule=Runs)
    own, *_ = _run(SpikeWatch(full_flight=True, flight_reuse=False), cadence=CADENCE, schedule=Runs)
    by_step = {f.step: f for f in flows}
    session = [t for t in range(STEPS) if "weights" in by_step[t].recorders]
    assert session == [t for t in range(STEPS) if t % 7 < 4]
    one_step = [t for t in session if t == 0 or t - 1 in session]  # (step 0: neither has a ratio yet)
    ran, reused = b.counts
    assert reused["weights"] == len(one_step) == 1 + 3 * len(range(0, STEPS, 7))  # (STEPS = 90: 13 runs of 4)
    assert ran["weights"] == STEPS - len(one_step)
    f = log.events[0].flight
    for i, t in enumerate(f.steps):
        np.testing.assert_allclose(f.quantities["weight_norm"][i], recs[t]["weight_norm"], rtol=1e-12)
        np.testing.assert_allclose(f.quantities["update_ratio"][i], b.update_ratio(t), rtol=1e-10)
        if t in one_step:
            for q in ("weight_norm", "update_ratio"):  # the session's own numbers
                assert np.array_equal(np.array(f.quantities[q][i]), np.asarray(by_step[t][q])), (t, q)
    assert sum(t in one_step for t in f.steps) == 12 and sum(t not in one_step for t in f.steps) == 20  # (steps 39–70)
    g = own.events[0].flight
    for q in ("weight_norm", "update_ratio"):
        assert np.array_equal(np.array(f.quantities[q]), np.array(g.quantities[q])), q


def test_the_weights_twin_sits_out_every_step_of_a_session_recording_every_step():
    log, flows, _, b, _ = _run("full", cadence={"weights": 1, "outputs": 2, "units": 8})
    ran, reused = b.counts
    assert reused["weights"] == STEPS and "weights" not in ran
    f = log.events[0].flight
    by_step = {fl.step: fl for fl in flows}
    for q in ("weight_norm", "update_ratio"):
        assert np.array_equal(np.array(f.quantities[q]), np.array([by_step[t][q] for t in f.steps])), q
    with pytest.raises(ConfigError, match=r"flight_reuse=\['wieghts'\]\): \['wieghts'\] have no flight twin"):
        Probe(_net(), spikes=SpikeWatch(full_flight=True, flight_reuse=["wieghts"]))


def test_the_flight_mirrors_the_session_options():
    """hooks=False: no output or unit hooks to mirror; update_ratio=False: no snapshot."""
    net = _net()
    with Probe(net, spikes="full", hooks=False, update_ratio=False, budget=None) as probe:
        assert probe.spikes.config()["flight_recorders"] == ["weights"]
        for t in range(3):
            net(torch.randn(4, 6, dtype=torch.float64)).sum().backward()
            probe.step()
        assert probe.spikes.flight_nbytes()["snapshot"] == 0
    assert not any(m._forward_hooks for m in net.modules())  # every twin hook is gone with the probe
    with Probe(_net(), spikes=SpikeWatch(full_flight=["outputs"]), budget=None) as probe:
        assert probe.spikes.config()["flight_recorders"] == ["outputs"]
    with pytest.raises(ConfigError, match=r"\['units'\] have no flight twin"):
        Probe(_net(), hooks=False, spikes=SpikeWatch(full_flight=["units"]))
    w = SpikeWatch(full_flight=True, on_spike="skip")
    assert SpikeWatch.from_options(w, "skip") is w
    with pytest.raises(ConfigError, match="'full'"):
        SpikeWatch.from_options("fulll")


def _train_mlp(net, probe, steps: int) -> None:
    """``steps`` SGD steps of the 20-layer MLP on one fixed batch of 8 (seeded), the probe stepping after each backward."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 256, generator=g), torch.randint(0, 10, (8,), generator=g)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        probe.step()
        opt.step()


def test_the_memory_bound_is_the_bytes_held():
    """The formula of gradprobe.probe.flight on the 20-layer MLP of BENCHMARKS.md (and its docstring's numbers):
    K·(8·(P_w + P_u) + 2·4·C + 8·S) + 8·(P_w + P_u) bytes of norms in the ring, Σ numel·itemsize of snapshot."""
    torch.manual_seed(0)
    net = DeepMLP(256, 10, width=256, depth=18, activation="relu", init="he")
    with Probe(net, spikes="full", budget=None, every=1000) as probe:
        _train_mlp(net, probe, 70)
        got = probe.spikes.flight_nbytes()
        K = probe.spikes.flight + probe.spikes.check_every - 1
    P = len(list(net.parameters()))
    L, S = 20, sum(isinstance(m, nn.ReLU) for m in net.modules())
    assert (K, P, S) == (63, 40, 19)
    per_step = 8 * (P + P) + 2 * 4 * L + 8 * S
    assert per_step == 952 and got["ring"] == K * per_step + 8 * 2 * P == 60_616
    assert got["snapshot"] == 4 * sum(p.numel() for p in net.parameters()) == 5_010_472
    C, W, R = L + 2, 128, 128 // 8 + 2
    assert got["watch"] == 9 * W * C + 24 * R * C + 3 * W + 33 * C + 8 * R + 9 == 36_111


def test_the_memory_bound_of_per_unit_flags_is_the_bytes_held(monkeypatch):
    """A guarded data-parallel flight (here: the watch told it is one of 2 combining ranks when it installs) keeps one
    bool per unit of every rectifier call instead of one int64 count per call: on the 20-layer MLP
    K·(8·(P_w + P_u) + 2·4·C + U) + 8·(P_w + P_u) bytes with U = 19·256."""
    torch.manual_seed(0)
    net = DeepMLP(256, 10, width=256, depth=18, activation="relu", init="he")
    mirror = SpikeWatch.mirror
    monkeypatch.setattr(SpikeWatch, "_world", lambda self: (0, 2))
    monkeypatch.setattr(SpikeWatch, "mirror", lambda self, recorders, combine=True: mirror(self, recorders, True))
    probe = Probe(net, spikes="full", on_spike="skip", budget=None, every=1000)
    monkeypatch.undo()
    with probe:
        assert all(t.per_unit for t in probe.spikes._full.twins if t.name == "units")
        _train_mlp(net, probe, 70)
        got = probe.spikes.flight_nbytes()
        K = probe.spikes.flight + probe.spikes.check_every - 1
    P, L, U = 40, 20, 19 * 256
    per_step = 8 * (P + P) + 2 * 4 * L + U
    assert per_step == 5_664 and got["ring"] == K * per_step + 8 * 2 * P == 357_472


def test_flight_records_round_trip_through_json():
    t = FlightTable(("a",), ("ReLU",), {"dead_fraction": ((0.5,), (math.nan,))})
    f = FlightRecord(steps=(1, 2), layers=("x",), grad_norm=((1.0,), (2.0,)), total=(1.0, 2.0), loss=(1.0, 1.0),
                     total_median=(1.0, 1.0), total_threshold=(3.0, 3.0), loss_median=(1.0, 1.0),
                     loss_threshold=(3.0, 3.0), flagged=(False, True), quantities={"update_ratio": ((math.nan,), (0.1,))},
                     tables={"units": t})
    log = SpikeLog((SpikeEvent(2, flight=f, confirmed=False),), 2, {"window": 8})
    back = SpikeLog.from_dict(log.as_dict())
    assert back == log and back.events[0].flight.tables["units"] == t and back.alarms == ()
    old = log.as_dict()
    del old["events"][0]["flight"]["quantities"], old["events"][0]["flight"]["tables"], old["events"][0]["confirmed"]
    assert SpikeLog.from_dict(old).events[0].confirmed and not SpikeLog.from_dict(old).events[0].flight.full


class Branches(nn.Module):
    """Two branches whose call order flips at every call (a data-dependent route): the forward order of a
    step, and its backward order, depend on the step."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(8, 1)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls % 2:
            h = torch.tanh(self.a(x)) + self.b(x)
        else:
            h = self.b(x) + torch.tanh(self.a(x))
        return self.head(h)


def test_the_session_layer_order_is_its_own_on_a_branching_model():
    """On steps where the session's output hooks are idle it keeps the last order it saw; the twins' hooks,
    which see every step's order, must not change the session's records (names, backward ranks)."""
    runs = []
    for spikes in (True, "full"):
        torch.manual_seed(0)
        net = Branches()
        with Probe(net, spikes=spikes, cadence={"outputs": 4}) as probe:
            for t in range(12):
                net(torch.randn(8, 4)).pow(2).mean().backward()
                probe.step()
            runs.append([(f.names, f.backward_rank.tolist(), f.recorders) for f in probe.trace])
    assert runs[0] == runs[1]
    assert len({names for names, _, _ in runs[0]}) == 1  # (odd steps, idle, keep the order of the even ones)


class Branchy(nn.Module):
    """A ReLU called twice, a conv ReLU6 (saturating and rectifying), a sigmoid: every kind of call."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.a, self.b = nn.Linear(5, 7).double(), nn.Linear(7, 7).double()
        self.conv = nn.Conv2d(1, 3, 3).double()
        self.relu, self.relu6, self.sig = nn.ReLU(), nn.ReLU6(), nn.Sigmoid()
        with torch.no_grad():
            self.a.bias.sub_(0.8)  # (some units dead on part of the batch)

    def forward(self, x, img):
        h = self.relu(self.b(self.relu(self.a(x))))
        return self.sig(h).sum() + self.relu6(self.conv(img) * 4).sum()


def test_per_unit_tables_of_batch_halves_combine_to_the_whole_batch_bit_for_bit():
    """combine_unit_tables: two UnitRecorder(per_unit=True) on the halves of a batch give the table of one
    UnitRecorder on the whole batch exactly (saturation counts summed, dead flags ANDed); and a per-unit
    recorder's own fractions are the counting recorder's."""
    from gradprobe.probe.recorder import Context, LayerOrder
    from gradprobe.probe.units import UnitRecorder, combine_unit_tables, is_per_unit
    from gradprobe.functional.transfer import to_host

    net = Branchy()
    g = torch.Generator().manual_seed(0)
    x, img = torch.randn(12, 5, generator=g, dtype=torch.float64), torch.randn(12, 1, 6, 6, generator=g, dtype=torch.float64)

    def table(rows, per_unit):
        rec = UnitRecorder(saturation=0.2, per_unit=per_unit)
        rec.install(Context(net, (), LayerOrder(0), deferred=True))
        net(x[rows], img[rows])
        c = rec.collect(True)
        rec.remove()
        return c.finish(to_host(c.tensors)).tables["units"]

    whole, halves = table(slice(None), False), [table(slice(0, 6), True), table(slice(6, 12), True)]
    own = table(slice(None), True)
    both = combine_unit_tables(halves)
    assert both.sites == whole.sites == ("relu", "sig", "relu6") and "dead_flags" in both.transient
    for col in ("saturated_fraction", "dead_fraction", "n_units"):
        assert np.array_equal(both.columns[col], whole.columns[col], equal_nan=True), col
        assert np.array_equal(own.columns[col], whole.columns[col], equal_nan=True), col
    dead = [h.columns["dead_fraction"][0] for h in halves]
    assert whole.columns["dead_fraction"][0] < min(dead)  # dead on a half is not dead on the batch
    assert 0 < whole.columns["saturated_fraction"][2] < 1 and 0 < whole.columns["dead_fraction"][0]
    assert np.asarray(both.columns["dead_flags"][0]).shape == (14,)  # two calls of 7 units
    # tables that do not allow it: no per-unit columns, or different calls
    assert [is_per_unit(t) for t in (whole, *halves, own, both)] == [False, True, True, True, True]
    assert combine_unit_tables([whole, halves[0]]) is None
    assert combine_unit_tables([halves[0], _one_call(halves[1])]) is None


def _one_call(t):
    from gradprobe.trace import Table
    flags = list(t.columns["dead_flags"])
    flags[0] = np.asarray(flags[0])[:7]
    return Table(t.sites, t.kinds, {**t.columns, "dead_flags": tuple(flags)}, t.transient)


@pytest.mark.parametrize("reuse", [True, False])
def test_a_weight_norm_that_overflows_float32_is_unmeasured_in_the_flight_whoever_measured_it(reuse):
    """‖θ‖ of a float32 layer above 3.4e38 is re-read from the parameter when the numbers are finished: the
    session does it at once, the flight when a spike is found, steps later, when the parameter has changed;
    the flight leaves that layer's weight norm unmeasured whether its twin ran or it reused the session's."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    with torch.no_grad():
        net[2].weight.fill_(3e19)  # ‖W‖ = √8·3e19: its square overflows float32
    with Probe(net, spikes=SpikeWatch(full_flight=True, flight_reuse=reuse), budget=None) as probe:
        for t in range(40):
            net.zero_grad()
            net(torch.randn(16, 4)).pow(2).mean().backward()
            probe.step()
            with torch.no_grad():
                net[2].weight.mul_(1.0001)  # (changes the parameter after every step)
        f = probe.spike_log().events[0].flight
        trace = {fl.step: fl for fl in probe.trace}
        assert probe.spikes._full.reused.get("weights", 0) == (40 if reuse else 0)
    s = f.steps[-1]
    assert math.isclose(trace[s]["weight_norm"][1], math.sqrt(8) * 3e19 * 1.0001 ** s, rel_tol=1e-6)  # the session's, re-read
    assert math.isnan(f.quantities["weight_norm"][-1][1])
    assert f.quantities["weight_norm"][-1][0] == trace[s]["weight_norm"][0]
