"""The recorded step's fast paths give exactly what the checked, general paths give.

* ``LayerFlow.trusted`` / ``Table.trusted`` (the session builds every record without re-validating it):
  every record a probe makes, in several modes, equals field by field (bitwise, dtype, read-only flags)
  the record the validating constructors build from the same fields.
* ``GradRecorder``'s common case (every ``.grad`` present, dense, float32/64): bitwise the general path
  (``_collect_general``), also with tied weights and with an overflowed (Inf) float32 norm, which
  falls back to the float64 recheck.
* ``to_host`` of one host tensor: bitwise the general single-device copy, never aliasing the tensor.
* The parameter-replacement check (cached parameter dicts) still follows a replaced parameter.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import gradprobe
from gradprobe import Probe
from gradprobe.functional import transfer
from gradprobe.probe.params import GradRecorder
from gradprobe.trace import LayerFlow, Table
from reference.loops import train_cross_entropy
from reference.models import TiedEmbedding


def _same_array(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert not a.flags.writeable and not b.flags.writeable
    assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f")


def _same_table(a: Table, b: Table) -> None:
    assert a.sites == b.sites and a.kinds == b.kinds and a.transient == b.transient
    assert type(a.columns) is type(b.columns) and list(a.columns) == list(b.columns)
    for name in a.columns:
        x, y = a.columns[name], b.columns[name]
        if isinstance(x, tuple):
            assert isinstance(y, tuple) and len(x) == len(y)
            for u, v in zip(x, y):
                assert (u is None) == (v is None)
                if u is not None:
                    _same_array(u, v)
        else:
            _same_array(x, y)


def _same_flow(a: LayerFlow, b: LayerFlow) -> None:
    assert type(a.names) is tuple and a.names == b.names and a.kinds == b.kinds
    assert a.step == b.step and a.recorders == b.recorders and type(a.recorders) is tuple
    assert (a.loss is None and b.loss is None) or (type(a.loss) is float and a.loss == b.loss)
    for field in ("values", "measured", "tables"):
        assert type(getattr(a, field)) is type(getattr(b, field))
    assert list(a.values) == list(b.values) and list(a.measured) == list(b.measured)
    for q in a.values:
        _same_array(a.values[q], b.values[q])
        _same_array(a.measured[q], b.measured[q])
    _same_array(a.backward_rank, b.backward_rank)
    assert list(a.tables) == list(b.tables)
    for name in a.tables:
        _same_table(a.tables[name], b.tables[name])


@pytest.fixture
def checked_records(monkeypatch):
    """Every LayerFlow.trusted / Table.trusted call also builds the validated twin and compares them."""
    seen = {"flows": 0, "tables": 0}
    flow_fast, table_fast = LayerFlow.trusted.__func__, Table.trusted.__func__

    def flow(cls, names, kinds, values, measured, backward_rank, step, loss, tables, recorders):
        checked = LayerFlow(names, kinds, dict(values), dict(measured), backward_rank, step=step, loss=loss,
                            tables=dict(tables), recorders=recorders)
        fast = flow_fast(cls, names, kinds, values, measured, backward_rank, step, loss, tables, recorders)
        _same_flow(fast, checked)
        seen["flows"] += 1
        return fast

    def table(cls, sites, kinds, columns, transient=frozenset()):
        checked = Table(sites, kinds, dict(columns), transient)
        fast = table_fast(cls, sites, kinds, columns, transient)
        _same_table(fast, checked)
        seen["tables"] += 1
        return fast

    monkeypatch.setattr(LayerFlow, "trusted", classmethod(flow))
    monkeypatch.setattr(Table, "trusted", classmethod(table))
    return seen


class Tied(TiedEmbedding):
    """An embedding whose weight the output layer reuses: one parameter listed under two layers."""

    def __init__(self):
        super().__init__(vocab=7, width=5, head="out")


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


@pytest.mark.parametrize("options", [
    {},                                          # the default: a budget
    {"budget": None},                            # everything every step
    {"hooks": False, "update_ratio": False, "budget": None},
    {"budget": None, "cadence": {"weights": 4, "outputs": 2, "units": 4}},
    {"every": 2, "temporal": False},
])
def test_every_record_equals_the_validated_one(checked_records, options):
    model = _mlp()
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Probe(model, **options) as probe:
        train_cross_entropy(probe, model, opt, x, y, steps=10)
        probe.flow()
    assert checked_records["flows"] >= 5 and checked_records["tables"] >= 5


def test_records_of_tied_weights_an_lstm_and_a_users_recorder(checked_records):
    class Peak(gradprobe.Recorder):
        name = "peak"

        def collect(self, advance):
            return gradprobe.Contribution(layers={"peak": np.arange(3.0)}, measured={"peak": np.array([True, False, True])},
                                          tables={"extra": Table(("a",), ("k",), {"v": np.array([1.5])})})

    model = Tied()
    with Probe(model, budget=None, recorders=[Peak()]) as probe:
        for _ in range(3):
            model.zero_grad()
            model(torch.tensor([[1, 2, 3], [4, 5, 6]])).sum().backward()
            flow = probe.step()
        assert flow["peak"][1] == 1.0 and not flow.mask("peak")[1]
    lstm = nn.LSTM(3, 4)
    with Probe(lstm, budget=None, temporal=True) as probe:
        out, _ = lstm(torch.randn(5, 2, 3))
        out.sum().backward()
        probe.step()
    assert checked_records["flows"] >= 4


def test_a_users_mask_of_the_wrong_shape_is_an_error():
    class Bad(gradprobe.Recorder):
        name = "bad"

        def collect(self, advance):
            return gradprobe.Contribution(layers={"bad": np.zeros(2)}, measured={"bad": np.ones(3, dtype=bool)})

    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    with Probe(model, budget=None, recorders=[Bad()]) as probe:
        model(torch.randn(4, 2)).sum().backward()
        with pytest.raises(gradprobe.ConfigError, match="mask of 'bad' with shape"):
            probe.step()


def _finished(rec: GradRecorder, general: bool):
    grads = [p.grad for p in rec._p.params]
    d = rec._collect_general(grads) if general else rec.collect(True)
    return d.finish(transfer.to_host(d.tensors))


def _same_contribution(a, b) -> None:
    assert list(a.layers) == list(b.layers) == ["grad_norm"]
    assert np.array_equal(a.layers["grad_norm"], b.layers["grad_norm"], equal_nan=True)
    assert np.array_equal(a.measured["grad_norm"], b.measured["grad_norm"])
    _same_table(a.tables["totals"], b.tables["totals"])


@pytest.mark.parametrize("make", [_mlp, Tied])
def test_grad_norms_fast_path_is_the_general_path_bitwise(make):
    model = make()
    x = torch.randn(9, 6) if isinstance(model, nn.Sequential) else torch.tensor([[1, 2, 3], [0, 6, 2]])
    with Probe(model, budget=None) as probe:
        rec = next(r for r in probe.recorders if isinstance(r, GradRecorder))
        model(x).pow(2).sum().backward()
        fast, general = _finished(rec, False), _finished(rec, True)
        _same_contribution(fast, general)
        # an oracle beside the twin: per-layer √Σ‖g‖² in float64, the total over distinct parameters
        want = [np.sqrt(sum(float(torch.linalg.vector_norm(p.grad)) ** 2 for p in layer.params))
                for layer in probe.layers]
        assert np.allclose(fast.layers["grad_norm"], want, rtol=1e-6)
        total = np.sqrt(sum(float(torch.linalg.vector_norm(p.grad)) ** 2 for p in set(model.parameters())))
        assert np.isclose(fast.tables["totals"].columns["grad_norm"][0], total, rtol=1e-6)
        # a gradient too large for a float32 norm (finite entries): Inf from the fused kernel, rechecked in float64
        first = rec._p.params[0]
        first.grad.fill_(3e30)
        fast, general = _finished(rec, False), _finished(rec, True)
        _same_contribution(fast, general)
        assert np.isfinite(fast.layers["grad_norm"][0]) and fast.layers["grad_norm"][0] > 3e30
        # a missing gradient takes the general path (measured False there)
        for p in probe.layers[-1].params:
            p.grad = None
        fast = _finished(rec, False)
        assert not fast.measured["grad_norm"][-1] and np.isnan(fast.layers["grad_norm"][-1])


def test_the_fast_check_follows_a_replaced_parameter():
    model = _mlp()
    with Probe(model, budget=None) as probe:
        model(torch.randn(3, 6)).sum().backward()
        probe.step()
        model[0].weight = nn.Parameter(torch.full((8, 6), 2.0))  # replaced under the same name
        model.zero_grad()
        model(torch.randn(3, 6)).sum().backward()
        flow = probe.step()
        g = model[0].weight.grad
        want = np.sqrt(float(torch.linalg.vector_norm(g)) ** 2 + float(torch.linalg.vector_norm(model[0].bias.grad)) ** 2)
        assert np.isclose(flow.grad_norm[0], want, rtol=1e-6)
        assert np.isclose(flow.weight_norm[0], np.sqrt(8 * 6 * 4.0 + float(model[0].bias.detach().norm()) ** 2), rtol=1e-6)
        del model[2].bias  # a layer losing a parameter is still an error, on every step
        for _ in range(2):
            with pytest.raises(gradprobe.ProbeStateError, match="lost"):
                probe.step()
        for rec in probe.recorders[:2]:  # each recorder's own check, not only the first one to run
            for _ in range(2):
                with pytest.raises(gradprobe.ProbeStateError, match="lost"):
                    rec._p.refresh()


@pytest.mark.parametrize("t", [
    torch.tensor([1.5, -2.25, 3e38], dtype=torch.float32),
    torch.arange(12, dtype=torch.float64).reshape(3, 4).t(),  # not contiguous
    torch.tensor(7.0),
    torch.ones(3, requires_grad=True) * 2,
])
def test_to_host_of_one_host_tensor_is_the_general_copy(t):
    fast = transfer.to_host([t])[0]
    general = t.detach().reshape(-1).cpu().numpy().astype(np.float64).reshape(t.shape)
    assert fast.dtype == np.float64 and fast.shape == tuple(t.shape) and np.array_equal(fast, general)
    assert not np.shares_memory(fast, t.detach().numpy())


def test_weight_norms_whole_model_path_is_the_general_finish_bitwise():
    """WeightRecorder without update ratios, every weight present: its shortcut finish equals the
    general one (also when a float32 norm overflows and the float64 recheck runs), and both match
    √Σ‖θ‖² per layer in float64."""
    from gradprobe.probe.params import WeightRecorder

    model = _mlp()
    with Probe(model, hooks=False, update_ratio=False, budget=None) as probe:
        rec = next(r for r in probe.recorders if isinstance(r, WeightRecorder))
        for huge in (False, True):
            if huge:
                with torch.no_grad():
                    model[2].weight.fill_(1e30)  # ‖θ‖ = 8e30: beyond float32, finite entries
            d = rec.collect(True)
            assert rec._whole and d.finish.__name__ == "finish_whole"
            host = transfer.to_host(d.tensors)
            fast = d.finish(host)
            rec._whole = False
            general = rec.collect(True)
            rec._whole = True
            assert general.finish.__name__ == "finish"
            slow = general.finish(transfer.to_host(general.tensors))
            assert np.array_equal(fast.layers["weight_norm"], slow.layers["weight_norm"])
            assert np.array_equal(fast.measured["weight_norm"], slow.measured["weight_norm"])
            want = [np.sqrt(sum(float(torch.linalg.vector_norm(p.detach(), dtype=torch.float64)) ** 2 for p in layer.params))
                    for layer in probe.layers]
            assert np.allclose(fast.layers["weight_norm"], want, rtol=1e-6)
            assert np.isinf(host[0]).any() == huge


def test_to_host_of_several_host_tensors_is_the_batched_copy():
    ts = [torch.tensor([1.5, 3e38], dtype=torch.float32), torch.arange(6, dtype=torch.float64).reshape(2, 3)[:, 1:],
          torch.tensor(-0.0)]
    fast = transfer.to_host(ts)
    general = transfer._one_device(ts)  # the concatenated single copy accelerators take
    for a, b, t in zip(fast, general, ts):
        assert a.dtype == b.dtype == np.float64 and a.shape == b.shape == tuple(t.shape)
        assert np.array_equal(a, b) and np.signbit(a).tolist() == np.signbit(b).tolist()
        assert not np.shares_memory(a, t.numpy())
