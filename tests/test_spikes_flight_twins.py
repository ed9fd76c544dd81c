"""The full flight recorder's twins of the temporal (BPTT) recorder and of users' own recorders, and the
reuse of a session recorder's numbers on the steps it records (issue 12 §2).

Oracles: float64 brute force by autograd, independent of the probe: at every ``probe.step()`` the test
re-runs the step's forward by hand (the Elman recurrence h_k = tanh(W_ih x_k + b_ih + W_hh h_{k−1} + b_hh)
with the module's parameters of that step), keeps every h_k (``retain_grad``) and back-propagates the
same loss: ``‖∂E/∂h_k‖`` over the batch and the hidden units is the temporal profile; the session's own
temporal recorder on the steps it records (the same numbers; bit for bit where the flight reuses them);
the largest |gradient| entry per layer read from ``.grad`` at each step for the user recorder.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from gradprobe import Probe, load_run
from gradprobe.errors import ConfigError
from gradprobe.probe import Contribution, Deferred, Recorder, SpikeWatch

SPIKE, STEPS, T, B = 60, 70, 12, 4


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.rnn = nn.RNN(3, 8).double()
        self.head = nn.Linear(8, 1).double()

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out)


def _loss(net_out, y, scale):
    return (net_out - y).pow(2).mean() * scale


def brute_profile(net: Net, x, y, scale) -> np.ndarray:
    """(T,) ‖∂E/∂h_k‖₂ over batch and hidden units, by a hand-written float64 recurrence and autograd."""
    r = net.rnn
    w_ih, w_hh, b_ih, b_hh = (p.detach().clone().requires_grad_(True)
                              for p in (r.weight_ih_l0, r.weight_hh_l0, r.bias_ih_l0, r.bias_hh_l0))
    wo, bo = net.head.weight.detach().clone(), net.head.bias.detach().clone()
    h = torch.zeros(x.shape[1], 8, dtype=torch.float64)
    hs = []
    for k in range(x.shape[0]):
        h = torch.tanh(x[k] @ w_ih.T + b_ih + h @ w_hh.T + b_hh)
        h.retain_grad()
        hs.append(h)
    out = torch.stack(hs) @ wo.T + bo
    _loss(out, y, scale).backward()
    return np.array([float(hk.grad.norm()) for hk in hs])


class MaxAbsGrad(Recorder):
    """A user's recorder: the largest |gradient| entry of each layer, with a flight twin (itself, fresh)."""

    name = "max_abs_grad"
    norm_of = {"max_abs_grad": "param_grad"}  # read from .grad: a loss scaler's scale is divided out

    def install(self, ctx):
        self.layers = ctx.layers

    def collect(self, advance):
        peaks = [torch.stack([p.grad.abs().max() for p in l.params if p.grad is not None]).max() for l in self.layers]
        name = self.name
        return Deferred(peaks, lambda host: Contribution(layers={name: np.array([float(h) for h in host])}))

    def flight_twin(self):
        return MaxAbsGrad()


class NoTwin(MaxAbsGrad):
    name = "no_twin"

    def collect(self, advance):
        return None

    def flight_twin(self):
        return None


def _run(spikes, *, cadence, log_dir=None, recorders=(), brute=False, name="run", scaler=None):
    net = Net()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    profiles, peaks = [], []
    with Probe(net, temporal=True, spikes=spikes, cadence=cadence, recorders=list(recorders), log_dir=log_dir,
               run_name=name, scaler=scaler) as probe:
        for t in range(STEPS):
            x = torch.randn(T, B, 3, generator=g, dtype=torch.float64)
            y = torch.randn(T, B, 1, generator=g, dtype=torch.float64)
            scale = 1000.0 if t == SPIKE else 1.0
            if brute:
                profiles.append(brute_profile(net, x, y, scale))
            opt.zero_grad(set_to_none=True)
            loss = _loss(net(x), y, scale)
            (loss if scaler is None else scaler.scale(loss)).backward()
            peaks.append([max(float(p.grad.abs().max()) for p in m.parameters()) for m in (net.rnn, net.head)])
            probe.step(loss)
            if t != SPIKE:
                if scaler is None:
                    opt.step()
                else:
                    scaler.step(opt)
                    scaler.update()
        log = probe.spike_log()
        trace = list(probe.trace)
        full = probe.spikes._full
        counts = (dict(full.ran), dict(full.reused))
    return log, trace, profiles, peaks, counts


CADENCE = {"temporal": 4, "outputs": 3, "weights": 5, "units": 7, "max_abs_grad": 6}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("twins")
    reused = _run("full", cadence=CADENCE, brute=True, log_dir=d, recorders=[MaxAbsGrad(), NoTwin()], name="reuse")
    own = _run(SpikeWatch(full_flight=True, flight_reuse=False), cadence=CADENCE, recorders=[MaxAbsGrad(), NoTwin()])
    return reused, own, d


def _session_profiles(trace) -> dict[int, np.ndarray]:
    return {f.step: np.asarray(f.tables["temporal"].columns["h"][0]) for f in trace if "temporal" in f.tables}


def test_the_temporal_flight_is_the_float64_brute_force_at_every_step(runs):
    (log, trace, profiles, _, _), _, _ = runs
    assert log.steps == [SPIKE]
    f = log.events[0].flight
    assert f.steps == tuple(range(SPIKE - 31, SPIKE + 1))
    assert list(f.profiles) == ["temporal.h"] and list(f.profiles["temporal.h"]) == ["rnn.l0"]
    got = np.array(f.profiles["temporal.h"]["rnn.l0"])
    assert got.shape == (32, T)
    np.testing.assert_allclose(got, [profiles[t] for t in f.steps], rtol=1e-10)
    assert (got[-1] > 300 * np.median(got[:-1], axis=0)).all()  # the ×1000 loss at the spike, at every time step


def test_on_steps_both_record_the_twin_equals_the_session_recorder(runs):
    """flight_reuse=False: the twin ran on every step; where the session recorded too, the numbers agree."""
    _, (log, trace, _, _, (ran, reused)), _ = runs
    assert reused == {} and ran["temporal"] == STEPS
    f = log.events[0].flight
    session = _session_profiles(trace)
    both = [t for t in f.steps if t in session]
    assert both == [t for t in f.steps if t % 4 == 0] and len(both) == 8
    got = np.array(f.profiles["temporal.h"]["rnn.l0"])
    for t in both:
        np.testing.assert_allclose(got[f.steps.index(t)], session[t], rtol=1e-12)


def test_the_flight_reuses_the_session_numbers_bit_for_bit_on_its_recorded_steps(runs):
    (log, trace, _, _, (ran, reused)), (log_own, _, _, _, _), _ = runs
    # the reusing twins sat out exactly the session's recorded steps; the weights twin only where the session's
    # update ratio spans one step: with weights every 5th step, only the first (neither has a ratio yet)
    # (cadences 4, 3, 7 over 70 steps: 18, 24, 10 recorded steps)
    assert reused == {"temporal": 18, "outputs": 24, "units": 10, "weights": 1}
    assert ran == {"temporal": STEPS - 18, "outputs": STEPS - 24, "units": STEPS - 10, "weights": STEPS - 1,
                   "max_abs_grad": STEPS}  # a user twin reuses only with Recorder.flight_reuse = True
    f = log.events[0].flight
    session = _session_profiles(trace)
    got = np.array(f.profiles["temporal.h"]["rnn.l0"])
    by_step = {fl.step: fl for fl in trace}
    for i, t in enumerate(f.steps):
        if t in session:
            assert np.array_equal(got[i], session[t])
        if "outputs" in by_step[t].recorders:
            fl = by_step[t]
            order = [fl.names.index(n) for n in f.layers]
            for q in ("output_grad_norm", "activation_norm"):
                assert np.array_equal(np.array(f.quantities[q][i]), np.asarray(fl[q])[order]), (t, q)
    # and the whole flight is that of the run whose twins ran on every step (to rounding)
    g = log_own.events[0].flight
    np.testing.assert_allclose(got, np.array(g.profiles["temporal.h"]["rnn.l0"]), rtol=1e-12)
    for q in f.quantities:
        np.testing.assert_allclose(np.array(f.quantities[q]), np.array(g.quantities[q]), rtol=1e-12, err_msg=q)


def test_a_user_recorder_twin_round_trips_through_the_run_log(runs):
    (log, _, _, peaks, _), _, d = runs
    f = log.events[0].flight
    np.testing.assert_allclose(np.array(f.quantities["max_abs_grad"]), [peaks[t] for t in f.steps], rtol=1e-15)
    assert f.not_recorded == ("no_twin",)  # a recorder without a twin is listed, not silently missing
    back = load_run(d / "reuse.sqlite").spikes
    assert back == log
    fb = back.events[0].flight
    assert fb.quantities["max_abs_grad"] == f.quantities["max_abs_grad"] and fb.not_recorded == ("no_twin",)
    assert fb.profiles == f.profiles and fb.world_size == 1 and fb.rank_local == ()
    assert back.config["flight_recorders"] == ["weights", "outputs", "units", "temporal", "max_abs_grad"]
    assert back.config["flight_not_recorded"] == ["no_twin"]


def test_the_built_in_recorders_give_fresh_twins_with_their_settings():
    """Every built-in recorder gives its twin through Recorder.flight_twin (as a user's does): a new,
    uninstalled recorder of its class and settings, which a twin's own flight_twin need not repeat."""
    from gradprobe.probe import GradRecorder, OutputRecorder, TemporalRecorder, UnitRecorder, WeightRecorder
    from gradprobe.probe.flight import flight_twins
    from gradprobe.probe.temporal import TemporalFlightTwin

    session = [GradRecorder(), WeightRecorder(update_ratio=False), WeightRecorder(), OutputRecorder(),
               UnitRecorder(saturation=0.2), TemporalRecorder()]
    session[2].name = "weights_u"
    pairs, missing = flight_twins(session)
    assert missing == [] and [src for src, _ in pairs] == session[1:]  # the watch keeps the gradient norms
    for src, twin in pairs:
        assert twin is not src and twin.name == src.name and src.flight_reuse
    kinds = [type(twin) for _, twin in pairs]
    assert kinds == [WeightRecorder, WeightRecorder, OutputRecorder, UnitRecorder, TemporalFlightTwin]
    assert [pairs[0][1].track_updates, pairs[1][1].track_updates, pairs[3][1].saturation] == [False, True, 0.2]
    assert not pairs[3][1].per_unit  # (the flight sets it for a guarded data-parallel run)
    assert pairs[4][1].flight_twin() is None


def test_a_twin_must_be_a_recorder():
    class Bad(MaxAbsGrad):
        name = "bad"

        def flight_twin(self):
            return "twin"

    with pytest.raises(ConfigError, match="'bad': flight_twin\\(\\) must return a gradprobe.probe.Recorder"):
        Probe(Net(), spikes="full", recorders=[Bad()])


def test_the_report_tables_the_temporal_flight_and_says_what_is_missing(runs, tmp_path):
    import html as html_lib

    from gradprobe.report import build_report

    (log, _, _, _, _), _, d = runs
    run = load_run(d / "reuse.sqlite")
    text = html_lib.unescape(build_report({"rnn": run}, tmp_path / "r").read_text(encoding="utf-8"))
    f = log.events[0].flight
    assert (f"Full flight record before the spike at step {SPIKE}: ‖∂E/∂h_k‖ through time (BPTT) of rnn.l0 "
            f"({len(f)} steps, every step)") in text
    assert "not in the full flight record (recorders without a flight twin): no_twin" in text
    head = "<th>step</th>" + "".join(f"<th>k = {k}</th>" for k in range(T))
    assert head in text


def test_a_loss_scalers_scale_is_divided_out_of_the_temporal_flight(runs):
    """Probe(scaler=GradScaler): the twin's hooks see ∂(scale·E)/∂h_k; the flight divides the scale out. The
    scale is a power of two, so the scaled run takes exactly the steps of the plain one: equal profiles."""
    (log, _, _, _, _), _, _ = runs
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=10 ** 9)
    scaled = _run("full", cadence=CADENCE, scaler=scaler, recorders=[MaxAbsGrad(), NoTwin()])[0]
    assert scaled.steps == [SPIKE]
    a, b = log.events[0].flight, scaled.events[0].flight
    np.testing.assert_allclose(np.array(b.profiles["temporal.h"]["rnn.l0"]), np.array(a.profiles["temporal.h"]["rnn.l0"]),
                               rtol=1e-12)
    for q in ("output_grad_norm", "max_abs_grad"):  # (a user twin that declares norm_of "param_grad" is unscaled too)
        np.testing.assert_allclose(np.array(b.quantities[q]), np.array(a.quantities[q]), rtol=1e-12, err_msg=q)


class Reusing(MaxAbsGrad):
    """A user's recorder whose own numbers on its recorded steps are what its twin would measure."""

    name = "reusing"
    flight_reuse = True

    def flight_twin(self):
        return Reusing()


def test_a_user_recorder_that_declares_flight_reuse_is_reused_bit_for_bit():
    cadence = {k: v for k, v in CADENCE.items() if k != "max_abs_grad"}
    log, trace, _, peaks, (ran, reused) = _run("full", cadence={**cadence, "reusing": 5}, recorders=[Reusing()])
    assert reused["reusing"] == 14 and ran["reusing"] == STEPS - 14
    f = log.events[0].flight
    by_step = {fl.step: fl for fl in trace}
    for i, t in enumerate(f.steps):
        if "reusing" in by_step[t].recorders:
            fl = by_step[t]
            order = [fl.names.index(n) for n in f.layers]
            assert np.array_equal(np.array(f.quantities["reusing"][i]), np.asarray(fl["reusing"])[order])
    np.testing.assert_allclose(np.array(f.quantities["reusing"]), [peaks[t] for t in f.steps], rtol=1e-15)


def test_the_temporal_twins_ring_holds_one_float64_per_state_and_time_step():
    """The memory bound of TemporalFlightTwin: 8·T·(1 + has_c) bytes per flight step (an LSTM: h and c), K =
    flight + check_every − 1 = 63 steps in the ring; the session's temporal recorder idle (every=2**20)."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm, self.head = nn.LSTM(3, 5, batch_first=True), nn.Linear(5, 1)

        def forward(self, x):
            return self.head(self.lstm(x)[0])

    torch.manual_seed(0)
    m, x = M(), torch.randn(6, T, 3)
    with Probe(m, temporal=True, spikes=SpikeWatch(full_flight=["temporal"]), every=2**20) as probe:
        for _ in range(70):
            m.zero_grad()
            m(x).pow(2).mean().backward()
            probe.step()
        assert probe.spikes.flight_nbytes()["ring"] == 63 * 8 * T * 2 == 12_096
        assert probe.spikes.config()["flight_not_recorded"] == ["weights", "outputs", "units"]


def test_the_report_says_which_numbers_are_one_ranks_own():
    from gradprobe.report.build import _full_flight_tables
    from gradprobe.trace import FlightRecord, SpikeEvent

    f = FlightRecord(steps=(1, 2), layers=("a",), grad_norm=((1.0,), (2.0,)), total=(1.0, 2.0), loss=(1.0, 1.0),
                     total_median=(1.0, 1.0), total_threshold=(3.0, 3.0), loss_median=(1.0, 1.0),
                     loss_threshold=(3.0, 3.0), flagged=(False, True), quantities={"output_grad_norm": ((1.0,), (9.0,))},
                     world_size=2, rank=1, rank_local=("units",), not_recorded=("mine",))
    import html as html_lib

    text = html_lib.unescape("".join(_full_flight_tables(SpikeEvent(2, flight=f))))
    assert "not in the full flight record (recorders without a flight twin): mine" in text
    assert ("data parallel over 2 ranks, written by rank 1: the global batch's numbers but for those of rank 1's "
            "own samples only: units") in text


def test_a_reused_weights_recorder_is_left_as_it_was_when_the_probe_closes():
    """The full flight marks a weights recorder it reuses (``late_finish``: its overflow re-read checks the
    parameter's version, as the flight finishes its numbers after the optimizer step) and unmarks it on close."""
    from gradprobe.probe import WeightRecorder

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(net.parameters(), lr=1e-2)
    with Probe(net, spikes="full", budget=None, every=1) as probe:
        (weights,) = [r for r in probe.recorders if isinstance(r, WeightRecorder)]
        assert weights.late_finish
        for _ in range(3):
            opt.zero_grad()
            net(torch.randn(5, 4)).pow(2).mean().backward()
            probe.step()
            opt.step()
    assert "late_finish" not in vars(weights) and WeightRecorder.late_finish is False
