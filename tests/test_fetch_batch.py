"""Batched records (``Probe(fetch_every=N)``, the default under a budget on the CPU) are the records built
one by one, field by field; every public reader fetches what is pending; the budget charges a batch's work.

Oracle: the same model trained twice from the same state on the same data, probed with ``fetch_every=1``
(the validated path, itself checked against float64 brute-force twins elsewhere) and with batches: every
record equal bitwise (values, masks, backward ranks, tables, dtypes, read-only flags, owned arrays).
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from gradprobe import Probe, load_run
from gradprobe.probe import session as session_mod
from gradprobe.probe.params import GradRecorder
from gradprobe.probe.schedule import BudgetSchedule
from tests.test_probe_fast_records import Tied, _same_flow, checked_records  # noqa: F401 (a fixture)
from tests.test_schedule import burn


class Skipper(nn.Module):
    """Calls ``mid`` only on odd steps (and the layers in another order on steps divisible by 3): the
    forward order, the backward ranks and the layers with a gradient change from step to step."""

    def __init__(self):
        super().__init__()
        self.a, self.mid, self.b = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)
        self.t = 0

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if self.t % 2:
            h = torch.relu(self.mid(h))
        h = self.b(h)
        self.t += 1
        return self.head(h)


class Recurrent(nn.Module):
    """An LSTM (four parameters in one layer) and a head."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(6, 8, num_layers=2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.rnn(x.reshape(x.shape[0], 2, 3).repeat(1, 1, 2))[0][:, -1])


class Burning(nn.Module):
    """The MLP with a training step of at least 5 ms of CPU: a budget of 50 % keeps every recorder on."""

    def __init__(self):
        super().__init__()
        self.net = _mlp()

    def forward(self, x):
        burn(0.005)
        return self.net(x)


def _mlp():
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


def _inputs(model, g):
    if isinstance(model, Tied):
        return torch.randint(0, 7, (16, 4), generator=g), torch.randint(0, 7, (16,), generator=g)
    return torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)


def _loss(model, x, y):
    out = model(x)
    if out.dim() == 3:  # (Tied: per-token logits)
        out = out.mean(1)
    return nn.functional.cross_entropy(out, y)


def _train(model, probe, steps, seed=0, set_to_none=True):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    returned = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=set_to_none)
        x, y = _inputs(model, g)
        loss = _loss(model, x, y)
        loss.backward()
        returned.append(probe.step(loss))
        opt.step()
    return returned


def _twins(make):
    torch.manual_seed(0)
    model = make()
    return model, copy.deepcopy(model)


def _assert_owned(flow):
    for q, v in flow.values.items():
        assert v.base is None and not v.flags.writeable, q
        assert not flow.measured[q].flags.writeable, q


@pytest.mark.parametrize("make", [_mlp, Tied, Recurrent, Skipper])
@pytest.mark.parametrize("options", [
    {"budget": None},
    {"budget": None, "cadence": {"weights": 4, "outputs": 2, "units": 4}},
    {"budget": None, "hooks": False},
    {"budget": None, "hooks": False, "update_ratio": False},
])
def test_batched_records_equal_the_records_built_one_by_one(checked_records, make, options):
    """Every record of both probes also equals the one the validating constructors build from its fields
    (``checked_records``); a batch's grads-only records skip the merge (``Session._finish``)."""
    one, batched = _twins(make)
    with Probe(one, fetch_every=1, **options) as p1, Probe(batched, fetch_every=8, **options) as p8:
        assert p8.fetch_every == 8 and p1.fetch_every == 1
        merged = []
        merge = p8._merge
        p8._merge = lambda *a: merged.append(a[0]) or merge(*a)
        got = _train(batched, p8, 21)
        want = _train(one, p1, 21)
        # a record every step (grads every step): the batch's last record at every 8th step, else None
        assert [f is not None for f in got] == [(k + 1) % 8 == 0 for k in range(21)]
        for k, f in enumerate(got):
            if f is not None:
                _same_flow(f, want[k])
        a, b = list(p1.trace), list(p8.trace)  # (reading the trace fetched the last 5)
        assert len(a) == len(b) == 21
        for x, y in zip(a, b):
            _same_flow(y, x)
            _assert_owned(y)
        _same_flow(p8.last_full(), p1.last_full())
        grads_only = [f.step for f in b if f.recorders == ("grads",) and not f.has_output_grad.any()]
        if "cadence" in options:  # (steps 1, 3, 5, ...: only the gradient norms, no hook fired)
            assert grads_only and not set(grads_only) & set(merged)


def test_the_batched_gradient_finish_is_the_per_step_finish_bitwise():
    """GradRecorder's batch finish against its per-step finish on random norms of many widths, tied
    parameters (a sum over distinct parameters only), NaN and Inf rows (those fall back per step)."""
    rng = np.random.default_rng(0)
    for model in (_mlp(), Tied(), Recurrent()):
        with Probe(model, budget=None, hooks=False, fetch_every=4) as probe:
            rec = next(r for r in probe.recorders if isinstance(r, GradRecorder))
            _loss(model, *_inputs(model, torch.Generator().manual_seed(1))).backward()
            n_params = len(rec._p.params)
            ds = [rec.collect(True) for _ in range(5)]
            assert all(d.batch is not None for d in ds)
            hosts = [[rng.lognormal(0, 20, n_params)] for _ in ds]
            hosts[1][0][0] = np.nan
            hosts[3][0][-1] = np.inf  # an overflowed norm: its gradient is rechecked in float64
            for steps in (1, 2, 5):
                batch = rec._finish_batch(ds[:steps], hosts[:steps])
                for d, h, c in zip(ds, hosts, batch):
                    single = d.finish(h)
                    for q in single.layers:
                        np.testing.assert_array_equal(c.layers[q], single.layers[q])
                        np.testing.assert_array_equal(c.measured[q], single.measured[q])
                    np.testing.assert_array_equal(c.tables["totals"].columns["grad_norm"],
                                                  single.tables["totals"].columns["grad_norm"])


def test_numpy_row_sums_equal_one_row_sums():
    """The batch finish relies on a row of ``np.add.reduce((N, P), axis=1)`` being ``(P,).sum()`` bitwise (numpy's
    pairwise sum runs along each contiguous row alike); checked here for the widths that matter."""
    rng = np.random.default_rng(1)
    for p in (1, 2, 3, 7, 8, 9, 40, 127, 128, 129, 1000, 4097):
        a = rng.lognormal(0, 5, (6, p))
        rows = np.add.reduce(a, axis=1)
        assert all(rows[i] == a[i].sum() for i in range(6)), p


def test_defaults_batch_under_a_budget_only():
    net = _mlp()
    with Probe(net) as probe:
        assert isinstance(probe.schedule, BudgetSchedule)
        assert probe.fetch_every == session_mod.BUDGET_FETCH_EVERY == probe.config["fetch_every"] > 1
    for options in ({"budget": None}, {"every": 2}, {"cadence": {"weights": 4}}):
        with Probe(net, **options) as probe:
            assert probe.fetch_every == 1, options


def test_every_reader_fetches_what_is_pending(tmp_path):
    """Default Probe: records arrive in batches; flow(), trace, last_full(), diagnose(), run() and
    close() see every recorded step."""
    net = _mlp()
    with Probe(net, log_dir=tmp_path, run_name="r") as probe:
        _train(net, probe, 5)
        assert len(probe._pending) == 5
        assert [f.step for f in probe.trace] == [0, 1, 2, 3, 4] and not probe._pending
        _train(net, probe, 3)
        assert probe.flow().step == 7 and not probe._pending
        _train(net, probe, 2)
        assert probe.last_full().step == 8 and probe._last.step == 9  # (the calibration: step 9 records the grads only)
        _train(net, probe, 2)
        assert probe.diagnose().basis is not None and probe._last.step == 11
        _train(net, probe, 2)
        assert len(probe.run().trace) == 14
        _train(net, probe, 3)
    logged = load_run(tmp_path / "r.sqlite").trace.steps.tolist()
    assert logged[:14] == list(range(14)) and logged == [f.step for f in probe.trace]  # (the plan may thin the last)


def test_an_exception_inside_the_with_block_still_logs_every_step(tmp_path):
    net = _mlp()
    with pytest.raises(RuntimeError, match="user"):
        with Probe(net, log_dir=tmp_path, run_name="r") as probe:
            _train(net, probe, 6)
            assert probe._pending
            raise RuntimeError("user code failed")
    assert load_run(tmp_path / "r.sqlite").trace.steps.tolist() == list(range(6))


def test_an_overflowed_norm_is_rechecked_or_reported_unmeasured_in_a_batch():
    """A float32 gradient norm that overflows for finite entries: rechecked in float64 from the gradient
    it was measured from while that still exists unchanged (the batch's last step); an earlier step's
    gradient was freed (``set_to_none``) or zeroed in place since: not measured, never a wrong value."""
    for set_to_none in (True, False):
        net = nn.Sequential(nn.Linear(3, 2))
        with Probe(net, budget=None, hooks=False, update_ratio=False, fetch_every=3) as probe:
            flows = []
            for _ in range(3):
                net.zero_grad(set_to_none=set_to_none)
                (net(torch.ones(1, 3)) * 1e30).sum().backward()
                flows.append(probe.step())
            want = float(torch.cat([p.grad.double().flatten() for p in net.parameters()]).norm())
        last = flows[-1]
        assert last.has_grad[0] and last.grad_norm[0] == pytest.approx(want, rel=1e-7)
        for f in list(probe.trace)[:2]:
            assert not f.has_grad[0] and np.isnan(f.grad_norm[0])


def test_the_budget_charges_a_batched_finish_per_step_it_finished():
    """``Schedule.observe(finished=...)``: a batch's finish time is charged to its recorder per step
    (``c_r`` = median collect + median finish per step, though only one step in 8 pays it), a record's
    cost is the batch's per record, and the training step excludes both."""
    s = BudgetSchedule(["grads", "w"], 0.5, essential=["grads"], warmup=2)
    collect, fixed, record, finish = 1e-4, 1e-5, 8e-5, 8 * 2e-4
    for t in range(64):
        batch = t % 8 == 7
        interval = 0.010 + collect + fixed + (record + finish if batch else 0.0)
        s.observe(t, interval, {"grads": collect}, ["grads"], fixed=fixed, record=record if batch else 0.0,
                  records=8 if batch else 0, finished={"grads": (finish, 8)} if batch else None)
    cost, f, r = s._costs()
    assert cost["grads"] == pytest.approx(collect + 2e-4) and cost["w"] == 0.0
    assert f == pytest.approx(fixed) and r == pytest.approx(record / 8)
    assert s.base_seconds == pytest.approx(0.010, rel=1e-9)  # batch steps included (the median of all)


def test_a_budgeted_probe_plans_with_a_measured_record_cost():
    """With batches longer than the warm-up and the calibration, the step the first plan is made at
    still fetches, so the plan knows what a record costs."""
    net = Burning()
    with Probe(net, fetch_every=64, budget=0.5) as probe:
        sched = probe.schedule
        first_plan = sched.warmup + sched.calibration
        _train(net, probe, first_plan)
        assert len(probe._pending) == 0 and sched._record and sched._finish["grads"]
        _train(net, probe, 3)
        assert len(probe._pending) == 3
