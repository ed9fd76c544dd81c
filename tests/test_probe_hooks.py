"""The probe owns its hooks: it leaves the model exactly as it found it and never alters training."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from gradprobe import Probe, ProbeStateError
from gradprobe.probe import outputs
from reference.brute import brute_flow
from reference.models import RunsBackwards


def snapshot(model: nn.Module) -> list:
    """Every hook dict and attribute name of every module, and every parameter's hook state."""
    out = []
    for name, m in model.named_modules():
        out.append((
            name,
            dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks),
            dict(m._backward_pre_hooks), dict(m._forward_hooks_with_kwargs),
            dict(m._forward_pre_hooks_with_kwargs), dict(m._forward_hooks_always_called),
            sorted(vars(m)),
        ))
    for name, p in model.named_parameters():
        out.append((name, p._backward_hooks, dict(p._post_accumulate_grad_hooks or {}), sorted(vars(p))))
    return out


class ReturnsParam(nn.Module):
    """A module whose output is its own parameter (a leaf), like seed 004's first layer or a CLS token."""

    def __init__(self):
        super().__init__()
        self.token = nn.Parameter(torch.randn(4))

    def forward(self, x):
        return self.token


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = ReturnsParam()
        self.a = nn.Linear(4, 8)
        self.bn = nn.BatchNorm1d(8)
        self.b = nn.Linear(8, 8)
        self.c = nn.Linear(8, 1)
        self.a.register_forward_hook(lambda m, i, o: None)  # the user's own hooks must survive
        self.c.weight.register_hook(lambda g: None)

    def forward(self, x):
        h = x + self.tok(x)
        h = torch.relu(self.bn(self.a(h)))
        h = torch.relu(self.b(h) + h)  # skip
        return self.c(h)


def _train(model, probe_kwargs=None, steps=3, raise_at=None):
    """SGD steps; returns outputs and grads per step. With probe_kwargs, runs under a Probe."""
    torch.manual_seed(123)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    outs, grads = [], []
    probe = Probe(model, **probe_kwargs) if probe_kwargs is not None else None
    try:
        for s in range(steps):
            x = torch.randn(6, 4)
            opt.zero_grad()
            y = model(x)
            loss = y.pow(2).mean()
            loss.backward()
            if s == raise_at:
                raise RuntimeError("boom")
            g = [p.grad.clone() for p in model.parameters()]
            if probe is not None:
                ids = [id(p.grad) for p in model.parameters()]
                probe.step(loss)
                probe.flow()
                probe.diagnose()
                # .grad is neither replaced nor changed by the probe
                assert [id(p.grad) for p in model.parameters()] == ids
                assert all(torch.equal(a, p.grad) for a, p in zip(g, model.parameters()))
            outs.append(y.detach().clone())
            grads.append(g)
            opt.step()
    finally:
        if probe is not None:
            probe.close()
    return outs, grads


@pytest.mark.parametrize("kwargs", [{}, {"hooks": False}, {"every": 2}, {"update_ratio": False}])
def test_probe_leaves_model_identical(kwargs):
    torch.manual_seed(0)
    model = Net()
    plain = copy.deepcopy(model)
    before = snapshot(model)
    outs_p, grads_p = _train(model, kwargs)
    outs_0, grads_0 = _train(plain, None)
    assert snapshot(model) == before
    for a, b in zip(outs_p, outs_0):
        assert torch.equal(a, b)  # bit-identical
    for ga, gb in zip(grads_p, grads_0):
        assert all(torch.equal(a, b) for a, b in zip(ga, gb))
    for p, q in zip(model.parameters(), plain.parameters()):
        assert torch.equal(p, q)


def test_hooks_removed_after_exception_inside_with():
    torch.manual_seed(0)
    model = Net()
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        with Probe(model) as probe:
            _train(model, None, raise_at=1)  # forward+backward with hooks live, then an exception
    assert probe.closed
    assert snapshot(model) == before


def test_hooks_removed_when_closed_between_forward_and_backward():
    torch.manual_seed(0)
    model = Net()
    before = snapshot(model)
    probe = Probe(model)
    loss = model(torch.randn(5, 4)).sum()
    probe.close()
    assert snapshot(model) == before
    loss.backward()  # the graph built under the probe still back-propagates, without our hooks
    with pytest.raises(ProbeStateError):
        probe.flow()


def test_parameter_returned_as_output_gets_one_hook_per_step_regression():
    """Regression: the probe hooked a module's output tensor every forward and only forgot the
    handles at step(); when that output is a parameter (a leaf that lives on), hooks piled up on it,
    each firing on every backward, so ‖∂L/∂h‖ grew as √(steps) and hooks stayed after close."""
    torch.manual_seed(0)
    m = ReturnsParam()
    head = nn.Linear(4, 1)
    model = nn.ModuleDict({"m": m, "head": head})
    with Probe(model, fetch_every=1) as probe:
        for s in range(4):
            model.zero_grad()
            loss = head(m(None)).sum() + 0.0 * s
            loss.backward()
            f = probe.step()
            # ∂L/∂token = head.weight, exactly
            assert f.output_grad_norm[f.index("m")] == pytest.approx(float(head.weight.detach().norm()), rel=1e-6)
            assert len(m.token._backward_hooks or {}) == 0  # nothing left on the parameter between steps
    assert m.token._backward_hooks is None


def test_step_and_flow_and_diagnose_after_close_raise():
    model = Net()
    probe = Probe(model)
    probe.close()
    probe.close()  # idempotent
    for call in (probe.step, probe.flow, probe.diagnose):
        with pytest.raises(ProbeStateError, match="closed"):
            call()


def test_flow_before_any_backward_raises():
    model = Net()
    with Probe(model) as probe:
        with pytest.raises(ProbeStateError, match="backward"):
            probe.flow()
        model(torch.randn(3, 4))  # a forward alone is not a backward (regression: it returned all-NaN)
        with pytest.raises(ProbeStateError, match="backward"):
            probe.flow()
        model(torch.randn(3, 4)).sum().backward()
        assert probe.flow().has_output_grad.all()


def test_every_n_records_every_nth_step_and_matches_every_1():
    torch.manual_seed(0)
    base = Net()
    flows = {}
    for every in (1, 3):
        model = copy.deepcopy(base)
        torch.manual_seed(5)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        with Probe(model, every=every) as probe:
            rec = []
            for s in range(7):
                opt.zero_grad()
                loss = model(torch.randn(6, 4)).pow(2).mean()
                loss.backward()
                r = probe.step(loss)
                assert (r is not None) == (s % every == 0)
                rec.append(r)
                opt.step()
            assert probe.trace.steps.tolist() == list(range(0, 7, every))
            assert probe.step_count == 7
        flows[every] = rec
    for s in (0, 3, 6):
        a, b = flows[1][s], flows[3][s]
        assert a.names == b.names
        for q in ("grad_norm", "output_grad_norm", "activation_norm", "weight_norm"):
            # nothing from the skipped steps leaks into a recorded one
            np.testing.assert_array_equal(getattr(a, q), getattr(b, q), err_msg=q)
    # update ratio spans the recorded interval (3 SGD steps), so it is larger than a 1-step ratio
    moved = flows[1][3].update_ratio > 0  # (the token feeds a BatchNorm'd layer: its gradient is ~0)
    assert moved.sum() >= 3 and np.all(flows[3][3].update_ratio[moved] > flows[1][3].update_ratio[moved])


class Backwards(RunsBackwards):
    """Registration order z, y, x; execution order x, y, z."""

    def __init__(self):
        super().__init__(names=("x", "y", "z"), n_in=3, act=torch.tanh)


def test_hooks_false_gives_order_and_parameter_norms():
    torch.manual_seed(0)
    model = Backwards().double()
    twin_model = copy.deepcopy(model)
    x = torch.randn(5, 3, dtype=torch.float64)
    before = snapshot(model)
    with Probe(model, hooks=False, fetch_every=1) as probe:
        for s in range(3):
            twin_model.load_state_dict(model.state_dict())
            twin = brute_flow(twin_model, lambda: twin_model(x).pow(2).sum())
            model.zero_grad()
            model(x).pow(2).sum().backward()
            f = probe.step()
            assert f.names == ("x", "y", "z")
            np.testing.assert_allclose(f.grad_norm, [twin.grad_norm[n] for n in f.names], rtol=1e-10)
            np.testing.assert_allclose(f.weight_norm, [twin.weight_norm[n] for n in f.names], rtol=1e-10)
            assert not f.has_output_grad.any() and np.isnan(f.output_grad_norm).all()
            assert not f.has_output.any()
            # once the order is known, not even the order hooks stay on the model
            assert all(not m._forward_hooks for m in model.modules())
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.1 * p.grad
    assert snapshot(model) == before


def test_accumulator_and_handles_stay_bounded_without_step(monkeypatch):
    """flow() used without step(): pending hook data is folded into per-layer sums and dead tensor
    handles are pruned, so memory stays bounded; the folded numbers are still exact:
    output_grad_norm = √(Σ over every backward since the last step of ‖∂L/∂h‖²)."""
    monkeypatch.setattr(outputs, "COMPACT_AT", 16)
    torch.manual_seed(0)
    model = Backwards().double()
    twin_model = copy.deepcopy(model)
    sq = {n: 0.0 for n in ("x", "y", "z")}
    with Probe(model, update_ratio=False, fetch_every=1) as probe:
        for it in range(60):
            x = torch.randn(4, 3, dtype=torch.float64)
            twin = brute_flow(twin_model, lambda: twin_model(x).pow(2).sum())
            for n in sq:
                sq[n] += twin.output_grad_norm[n] ** 2
            model(x).pow(2).sum().backward()
            f = probe.flow()
            out = next(r for r in probe.recorders if r.name == "outputs")
            assert len(out._grad.vals) <= 16 and len(out._act.vals) <= 16
            assert len(out._tensor_handles) <= 2 * 16
        np.testing.assert_allclose(f.output_grad_norm, [np.sqrt(sq[n]) for n in f.names], rtol=1e-10)
        # and step() starts a fresh window
        model.zero_grad()
        x = torch.randn(4, 3, dtype=torch.float64)
        twin = brute_flow(twin_model, lambda: twin_model(x).pow(2).sum())
        model(x).pow(2).sum().backward()
        probe.step()
        model.zero_grad()
        model(x).pow(2).sum().backward()
        f = probe.step()
        np.testing.assert_allclose(f.output_grad_norm, [twin.output_grad_norm[n] for n in f.names], rtol=1e-10)


def test_no_grad_forward_is_ignored():
    model = Backwards()
    with Probe(model) as probe:
        with torch.no_grad():
            model(torch.randn(2, 3))
        with pytest.raises(ProbeStateError):
            probe.flow()


def test_bad_arguments_raise_config_error():
    from gradprobe import ConfigError

    with pytest.raises(ConfigError, match="every"):
        Probe(Backwards(), every=0)
    with pytest.raises(ConfigError, match="nn.Module"):
        Probe(lambda x: x)
    with pytest.raises(ConfigError, match="no parameters"):
        Probe(nn.ReLU())


def test_failed_construction_leaves_model_untouched_regression(tmp_path):
    """Regression: hooks were installed before the run log was opened, so a Probe whose run log
    could not be created raised but left its forward hooks on the model for good."""
    from gradprobe import ConfigError, RunLogError

    model = Net()
    before = snapshot(model)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(RunLogError):
        Probe(model, log_dir=a_file)  # a file where a directory should be
    with pytest.raises(ConfigError):
        Probe(model, log_dir=tmp_path, commit_every=0)
    assert snapshot(model) == before


def test_zero_gradient_layer_stays_measured_after_folding_regression(monkeypatch):
    """Regression: once pending hook data was folded into per-layer sums, a layer whose output
    gradient was exactly 0 (a dead layer: the vanishing case itself) was reported as unmeasured
    (NaN) instead of 0, because "measured" was inferred from a non-zero sum."""
    monkeypatch.setattr(outputs, "COMPACT_AT", 8)
    model = Backwards()
    with Probe(model) as probe:
        for _ in range(10):
            out = model(torch.randn(4, 3))
            (out * 0.0).sum().backward()  # every output gradient is exactly zero
            f = probe.flow()
            assert f.has_output_grad.all() and (f.output_grad_norm == 0).all()
            assert (f.grad_norm == 0).all()


def test_two_probes_on_one_model_are_independent():
    torch.manual_seed(0)
    model = Backwards().double()
    before = snapshot(model)
    x = torch.randn(5, 3, dtype=torch.float64)
    with Probe(model, fetch_every=1) as outer:
        inner = Probe(model, fetch_every=1)
        model(x).pow(2).sum().backward()
        a, b = outer.step(), inner.step()
        inner.close()
        for q in ("grad_norm", "output_grad_norm", "activation_norm", "weight_norm"):
            np.testing.assert_array_equal(getattr(a, q), getattr(b, q))
        model.zero_grad()
        model(x).pow(2).sum().backward()
        c = outer.step()  # the outer probe still works after the inner one closed
        np.testing.assert_array_equal(a.output_grad_norm, c.output_grad_norm)
    assert snapshot(model) == before


@pytest.mark.parametrize("set_to_none", [True, False])
def test_hooks_false_flow_reflects_the_latest_backward_regression(set_to_none):
    """Regression: with hooks=False nothing marked a new backward pass, so after the first step()
    flow() kept returning that step's numbers instead of the current ``.grad``'s."""
    torch.manual_seed(0)
    model = Backwards().double()
    with Probe(model, hooks=False, fetch_every=1) as probe:
        model(torch.randn(5, 3, dtype=torch.float64)).pow(2).sum().backward()
        first = probe.step()
        assert probe.flow() is first  # nothing new yet: the recorded step
        model.zero_grad(set_to_none=set_to_none)
        model(torch.randn(5, 3, dtype=torch.float64)).pow(2).sum().backward()
        f = probe.flow()
        want = [float(torch.cat([p.grad.flatten() for p in getattr(model, n).parameters()]).norm()) for n in f.names]
        np.testing.assert_allclose(f.grad_norm, want, rtol=1e-12)
        assert not np.allclose(f.grad_norm, first.grad_norm)


def test_gradient_accumulation_over_micro_batches():
    """Two backward passes before one step(): ‖∂L/∂h‖ is √(Σ_passes ‖·‖²) (the documented convention
    for several calls), ‖∇θ‖ is the norm of the accumulated ``.grad`` (what the optimizer sees)."""
    torch.manual_seed(0)
    model = Backwards().double()
    twin_model = copy.deepcopy(model)
    xs = [torch.randn(4, 3, dtype=torch.float64) for _ in range(2)]
    twins = [brute_flow(twin_model, lambda x=x: twin_model(x).pow(2).sum()) for x in xs]
    for x in xs:
        twin_model(x).pow(2).sum().backward()
    with Probe(model, update_ratio=False, max_steps=4, budget=None) as probe:
        for x in xs:
            model(x).pow(2).sum().backward()
        f = probe.step()
        want = [np.hypot(twins[0].output_grad_norm[n], twins[1].output_grad_norm[n]) for n in f.names]
        np.testing.assert_allclose(f.output_grad_norm, want, rtol=1e-10)
        acc = [float(torch.cat([p.grad.flatten() for p in getattr(twin_model, n).parameters()]).norm()) for n in f.names]
        np.testing.assert_allclose(f.grad_norm, acc, rtol=1e-10)
        assert np.isnan(f.update_ratio).all()  # update_ratio=False
        for _ in range(20):
            model(xs[0]).sum().backward()
            probe.step()
        assert len(probe.trace) <= 4 and probe.trace.recorded == 21  # max_steps reaches the Trace
        assert np.isnan(probe.trace.matrix("update_ratio")).all()
