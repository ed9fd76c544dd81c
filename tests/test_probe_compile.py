"""torch.compile under the default probe: no recompile storm, and the same numbers as eager mode.

Oracle: the same model, seed and batches run eagerly under the same probe. The probe's hooks run as
plain Python at graph breaks (``gradprobe.probe.eager_hook``), so Dynamo never traces their
bookkeeping; before that fix the unit recorder's growing lists recompiled the model at every step
until Dynamo's recompile limit (issue 10).
"""
import copy

import numpy as np
import pytest
import torch
from torch import nn

import gradprobe
from gradprobe.models import DeepMLP

# Dynamo reads ``.grad`` of the tensors it passes to the eager hook and hides the resulting warning itself
# (through warnings.showwarning); only an "error" warnings filter, as in this suite, turns it into an error
pytestmark = pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")


def _train(net, run, steps=6, every=1, after_step=lambda: None):
    torch.manual_seed(1)
    batches = [torch.randn(32, 16) for _ in range(steps)]
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    with gradprobe.Probe(net, every=every) as probe:
        for x in batches:
            opt.zero_grad()
            loss = run(x).pow(2).mean()
            loss.backward()
            probe.step(loss)
            opt.step()
            after_step()
        return list(probe.trace)


def _compiled_vs_eager(backend, activation, every=1):
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = DeepMLP(16, 4, width=32, depth=8, activation=activation)
    twin = copy.deepcopy(net)
    eager = _train(twin, twin, every=every)
    from torch._dynamo.utils import counters

    counters.clear()
    compiled = torch.compile(net, backend=backend)
    frames = []  # frames Dynamo has compiled after each step
    # hitting the recompile limit (hook bookkeeping traced into the graph: a failing guard per call) raises
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        rec = _train(net, compiled, every=every, after_step=lambda: frames.append(counters["frames"]["total"]))
    return eager, rec, frames


@pytest.mark.parametrize("activation,every", [("tanh", 1), ("relu", 2)])
def test_compiled_model_matches_eager_without_recompiling(activation, every):
    eager, rec, frames = _compiled_vs_eager("aot_eager", activation, every)
    # graph breaks at the hooks make a fixed set of frames, compiled in the first (armed and, with every=2,
    # idle) steps; nothing is compiled again after that
    assert frames[2] == frames[-1], frames
    assert len(rec) == len(eager) > 0
    for a, b in zip(eager, rec):
        assert a.names == b.names and a.step == b.step
        for q in a.quantities:
            np.testing.assert_array_equal(a.mask(q), b.mask(q), err_msg=q)
            np.testing.assert_allclose(b[q][b.mask(q)], a[q][a.mask(q)], rtol=1e-5, err_msg=q)
        assert a.has_output_grad.all()
        ua, ub = a.units, b.units
        np.testing.assert_allclose(ub.saturated_fraction, ua.saturated_fraction)
        np.testing.assert_allclose(ub.dead_fraction, ua.dead_fraction)


@pytest.mark.slow
def test_inductor_compiled_model_matches_eager():
    eager, rec, frames = _compiled_vs_eager("inductor", "tanh")
    assert frames[2] == frames[-1], frames
    for a, b in zip(eager, rec):
        for q in a.quantities:
            np.testing.assert_allclose(b[q][b.mask(q)], a[q][a.mask(q)], rtol=1e-4, err_msg=q)


def test_model_compiled_before_the_probe_warns_that_hooks_are_unseen():
    """Dynamo does not guard on module hooks: code compiled before the probe opened never calls them.
    The probe says so instead of silently reporting nothing."""
    torch._dynamo.reset()
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    compiled = torch.compile(net, backend="aot_eager")
    compiled(torch.randn(5, 4)).sum().backward()
    with gradprobe.Probe(net, fetch_every=1) as probe:
        compiled(torch.randn(5, 4)).sum().backward()
        with pytest.warns(UserWarning, match="compile"):
            flow = probe.step()
    assert not flow.has_output_grad.any() and flow.has_grad.all()
    torch._dynamo.reset()
    with gradprobe.Probe(net, fetch_every=1) as probe:  # the advice works
        compiled(torch.randn(5, 4)).sum().backward()
        assert probe.step().has_output_grad.all()


def test_compiled_first_on_an_idle_step_warns_instead_of_reporting_nothing():
    """Idle output hooks are off the model (gradprobe.probe.owned.ForwardHooks). A model first compiled on
    a step the probe does not record is traced without them, and Dynamo does not guard on hooks added
    later: the next recorded step must say that ‖∂L/∂h‖ was not measured (NaN, a warning), not stay silent;
    after torch._dynamo.reset() the hooks (now kept on: something was compiled) measure again."""
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    run, got = net, {}
    with gradprobe.Probe(net, budget=None, cadence={"outputs": 4, "units": 4}) as probe:
        for t in range(9):
            if t == 1:
                run = torch.compile(net, backend="eager")
            if t == 5:
                torch._dynamo.reset()
            run(torch.randn(2, 4)).sum().backward()
            if t == 4:
                with pytest.warns(UserWarning, match="first called on a step the probe did not record"):
                    flow = probe.step()
            else:
                flow = probe.step()
            if flow is not None and "outputs" in flow.recorders:
                got[t] = flow.output_grad_norm
            net.zero_grad()
    assert np.isfinite(got[0]).all() and np.isnan(got[4]).all() and np.isfinite(got[8]).all(), got
