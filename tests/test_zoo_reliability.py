"""The bad-input and unusual-architecture zoo (issue "no silent wrong numbers"): one regression test per
case that was once silently wrong, raised a raw error, or broke the user's model.

Every number is checked against the brute-force float64 twin (``reference.brute``: one
``torch.autograd.grad`` per tensor, after the probe closed), and every probe must leave the model
exactly as it was (``reference.modelstate``). Slow cases (compile, million-step runs) are marked slow.
"""
from __future__ import annotations

import copy
import io
import math
import os
import subprocess
import sys
import textwrap
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.checkpoint import checkpoint

from gradprobe import Probe
from gradprobe.errors import ConfigError, GradprobeError, ProbeStateError, RunLogError
from gradprobe.probe import TemporalRecorder, mark_state
from gradprobe.runlog import read_run
from reference.brute import brute_flow, layer_modules
from reference.modelstate import bitwise_equal, hooks_and_attributes, values
from reference.ops import ScaleGrad
from reference.sqlite_edit import execute_and_commit

QUANTITIES = ("grad_norm", "output_grad_norm", "activation_norm", "weight_norm")
ROOT = Path(__file__).resolve().parents[1]


def assert_is_brute(flow, layers, model, run, rtol=1e-10, quantities=QUANTITIES):
    """Every layer's recorded quantities equal the brute-force twin's (matched by module object, not by
    name); NaN in the twin means "not reached": the probe must say "not measured" there."""
    b = brute_flow(model, run)
    twin_name = {id(m): n for n, m in layer_modules(model)}
    for layer in layers:
        i, n = flow.index(layer.name), twin_name[id(layer.module)]
        for q in quantities:
            want, got, measured = getattr(b, q)[n], flow[q][i], flow.mask(q)[i]
            if math.isnan(want):
                assert not measured, f"{q} of {layer.name}: measured {got}, but the twin reaches nothing"
            else:
                assert measured, f"{q} of {layer.name} not measured; the twin gives {want}"
                assert got == pytest.approx(want, rel=rtol, abs=0), f"{q} of {layer.name}: {got} vs twin {want}"


def mlp(seed=0, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2)).to(dtype)


def one_probed_step(model, loss_of):
    """``loss_of().backward()`` once under a fresh ``Probe(model, budget=None)``; returns the recorded
    flow and ``probe.layers`` (the probe is closed on return)."""
    with Probe(model, budget=None) as probe:
        loss_of().backward()
        return probe.step(), probe.layers


def snapshot(model):
    return hooks_and_attributes(model), values(model)


def assert_restored(model, before):
    hooks, vals = snapshot(model)
    assert hooks == before[0]
    assert bitwise_equal(vals, before[1])


# ------------------------------------------------------------------- 1. copies of a probed model
def test_deepcopy_of_a_probed_model_is_not_counted_regression():
    """Was: ``copy.deepcopy`` (an EMA or teacher copy) copied the probe's hooks, so the copy's forward and
    backward were added to the original's output_grad_norm and activation_norm, and stayed after close."""
    net = mlp()
    x = torch.randn(7, 3, dtype=torch.float64)
    plain_copy = copy.deepcopy(net)
    before = snapshot(net)
    with Probe(net, budget=None) as probe:
        ema = copy.deepcopy(net)
        never_called = copy.deepcopy(net)
        loss = net(x).pow(2).sum()
        loss.backward()
        ema(x).pow(2).sum().backward()  # the copy trains too
        flow = probe.step(loss)
        layers = probe.layers
    net.zero_grad(set_to_none=True)
    assert_restored(net, (before[0], values(net)))
    assert_is_brute(flow, layers, net, lambda: net(x).pow(2).sum())
    # the copies hold no hook of ours (the called one dropped its ghost at once, the other at close)
    for twin in (ema, never_called):
        assert [dict(m._forward_hooks) for m in twin.modules()] == [dict(m._forward_hooks) for m in plain_copy.modules()]
    assert torch.equal(ema(x), plain_copy(x))


def test_shallow_copy_of_a_probed_model_is_not_counted():
    net = mlp()
    x = torch.randn(4, 3, dtype=torch.float64)
    with Probe(net, budget=None) as probe:
        twin = copy.copy(net[0])  # shares the layer's hook dict and parameters
        loss = net(x).sum()
        loss.backward()
        twin(x).sum().backward()
        flow = probe.step()
        layers = probe.layers
    assert_is_brute(flow, layers, net, lambda: net(x).sum(), quantities=("output_grad_norm", "activation_norm"))


def test_torch_save_of_a_probed_model_works_and_the_copy_is_clean():
    """A whole-model ``torch.save`` while probing (a checkpoint) failed on the hooks' closures."""
    net = mlp()
    x = torch.randn(4, 3, dtype=torch.float64)
    with Probe(net, temporal=True, budget=None):
        buf = io.BytesIO()
        torch.save(net, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert torch.equal(loaded(x), net(x))
    assert all(not m._forward_hooks for m in loaded.modules())


class RNNNet(nn.Module):
    def __init__(self, cell="LSTM"):
        super().__init__()
        torch.manual_seed(1)
        self.rnn = getattr(nn, cell)(3, 5, num_layers=2)
        self.head = nn.Linear(5, 1)

    def forward(self, x):
        return self.head(self.rnn(x)[0])


def test_deepcopy_of_a_temporally_probed_rnn_runs_its_own_weights_regression():
    """Was: the copy kept the override, a closure over the *original* module: the copy's forward ran
    the original's weights, silently, even after the probe closed."""
    net = RNNNet().double()
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    with Probe(net, temporal=True, budget=None) as probe:
        twin = copy.deepcopy(net)
        with torch.no_grad():
            for p in twin.parameters():
                p.add_(0.5)
        out = twin(x)
        net(x).sum().backward()
        flows = probe.temporal_flow()
        reference = type(twin.rnn).forward(twin.rnn, x)[0]
    assert torch.equal(out, twin.head(reference))
    assert "forward" not in vars(twin.rnn) and "forward" not in vars(net.rnn)
    assert sorted(flows) == ["rnn.l0", "rnn.l1"]  # the copy's call was not recorded


# -------------------------------------------------------------------------- 2. side gradient passes
def test_autograd_grad_side_pass_is_not_counted_regression():
    """Was: a saliency map (``autograd.grad`` w.r.t. the input) was added to the step's output_grad_norm."""
    net = mlp()
    x = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    with Probe(net, budget=None) as probe:
        out = net(x)
        torch.autograd.grad(out[:, 0].sum(), x, retain_graph=True)  # saliency
        torch.autograd.grad(out.sum(), list(net.parameters()), retain_graph=True)  # a side look at ∇θ
        loss = out.pow(2).mean()
        loss.backward()
        flow = probe.step(loss)
        layers = probe.layers
    assert_is_brute(flow, layers, net, lambda: net(x).pow(2).mean())


def gradient_penalty_loss(net, x):
    """WGAN-GP style: the loss plus (‖∂out/∂x‖ − 1)², the input gradient taken with create_graph=True."""
    out = net(x)
    (g,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    return out.pow(2).mean() + (g.norm(dim=1) - 1).pow(2).mean()


def test_gradient_penalty_with_create_graph_counts_the_whole_loss_regression():
    """Was: ``create_graph=True`` made probe.step() crash ("Can't call numpy() on Tensor that requires
    grad") or counted the penalty's side pass; now the final backward's gradients are those of the whole
    loss, penalty included."""
    net = mlp()
    x = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    with Probe(net, budget=None) as probe:
        loss = gradient_penalty_loss(net, x)
        loss.backward()
        flow = probe.step(loss)
        layers = probe.layers
    assert_is_brute(flow, layers, net, lambda: gradient_penalty_loss(net, x))


def test_backward_with_create_graph_does_not_crash_the_step():
    net = mlp()
    x = torch.randn(7, 3, dtype=torch.float64)
    with Probe(net, budget=None) as probe:
        loss = net(x).pow(2).mean()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch: create_graph=True makes a reference cycle
            loss.backward(create_graph=True)
        flow = probe.step(loss)
        layers = probe.layers
    for p in net.parameters():
        p.grad = None  # break the cycle
    assert_is_brute(flow, layers, net, lambda: net(x).pow(2).mean())


def test_side_pass_through_a_frozen_model_is_not_counted_regression():
    """Found by the property tests: a fully frozen model (no parameter accumulates anything) probed for
    its input gradient counted an ``autograd.grad`` side pass too (×√2); the training pass is the one
    that accumulates into the input's ``.grad``."""
    net = RNNNet("RNN").double().requires_grad_(False)
    x = torch.randn(6, 2, 3, dtype=torch.float64, requires_grad=True)
    with Probe(net, budget=None) as probe:
        loss = net(x).pow(2).sum()
        torch.autograd.grad(loss, x, retain_graph=True)
        loss.backward()
        flow = probe.step(loss)
        layers = probe.layers
    assert x._post_accumulate_grad_hooks is None  # the user's input is left as it was
    assert_is_brute(flow, layers, net, lambda: net(x).pow(2).sum())


def test_many_passes_with_side_passes_without_step_stay_bounded(monkeypatch):
    """Side passes are kept apart from training passes until the step, but finished passes share two
    buckets: memory does not grow with the number of backward passes (here 120, folded every 8 entries)."""
    from gradprobe.probe import outputs

    monkeypatch.setattr(outputs, "COMPACT_AT", 8)
    net = mlp()
    x = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    n = 120
    with Probe(net, budget=None) as probe:
        rec = next(r for r in probe.recorders if isinstance(r, outputs.OutputRecorder))
        for _ in range(n):
            out = net(x)
            torch.autograd.grad(out.sum(), x, retain_graph=True)
            out.pow(2).mean().backward()
            assert len(rec._grad.folded) <= 3
        flow = probe.step()
        layers = probe.layers
    b = brute_flow(net, lambda: net(x).pow(2).mean())
    for layer in layers:
        got = flow.output_grad_norm[flow.index(layer.name)]
        assert got == pytest.approx(math.sqrt(n) * b.output_grad_norm[layer.name], rel=1e-10)


def test_temporal_side_pass_is_not_counted():
    x = torch.randn(6, 2, 3, dtype=torch.float64, requires_grad=True)

    def profile(side: bool):
        net = RNNNet("GRU").double()
        with Probe(net, temporal=True, budget=None) as probe:
            out = net(x)
            if side:
                torch.autograd.grad(out.sum(), x, retain_graph=True)
            out.pow(2).sum().backward()
            return {k: v.per_sequence for k, v in probe.temporal_flow().items()}

    clean, with_side = profile(False), profile(True)
    assert clean.keys() == with_side.keys()
    for k in clean:
        np.testing.assert_array_equal(with_side[k], clean[k])


# ------------------------------------------------------------------- 3. parameters replaced
def test_load_state_dict_assign_is_followed_regression():
    """Was: after ``load_state_dict(..., assign=True)`` the probe read the old parameter objects: stale
    (NaN) grad_norm and the old weight_norm."""
    net, other = mlp(0), mlp(1)
    x = torch.randn(7, 3, dtype=torch.float64)
    with Probe(net, budget=None) as probe:
        net(x).sum().backward()
        probe.step()
        old = {n: p.detach().clone() for n, p in net.named_parameters()}
        net.load_state_dict(other.state_dict(), assign=True)
        net(x).pow(2).sum().backward()
        flow = probe.step()
        layers = probe.layers
    assert_is_brute(flow, layers, net, lambda: net(x).pow(2).sum())
    for layer in layers:
        m = layer.module
        prev = torch.cat([old[f"{layer.name}.{k}"].flatten() for k, _ in m.named_parameters(recurse=False)])
        now = torch.cat([p.detach().flatten() for p in m.parameters(recurse=False)])
        assert flow.update_ratio[flow.index(layer.name)] == pytest.approx(float((now - prev).norm() / prev.norm()), rel=1e-12)


@pytest.mark.parametrize("hooks", [True, False])
def test_a_replaced_parameter_dict_is_followed(hooks):
    """A module whose ``_parameters`` dict is replaced by another one (same names, new Parameter objects)
    is read anew on the next step: grad_norm and weight_norm are the new parameters' (brute force)."""
    net, other = mlp(0), mlp(1)
    x = torch.randn(7, 3, dtype=torch.float64)
    with Probe(net, budget=None, hooks=hooks) as probe:
        net(x).sum().backward()
        probe.step()
        for mine, theirs in zip(net, other):
            if mine._parameters:
                mine._parameters = OrderedDict((k, nn.Parameter(v.detach().clone())) for k, v in theirs._parameters.items())
        net.zero_grad(set_to_none=True)
        net(x).pow(2).sum().backward()
        flow = probe.step()
        layers = probe.layers
    assert_is_brute(flow, layers, net, lambda: net(x).pow(2).sum(),
                    quantities=QUANTITIES if hooks else ("grad_norm", "weight_norm"))  # (no hooks: no ∂L/∂h)


def test_model_moved_to_meta_is_not_measured_regression():
    """Was: moving the model to ``meta`` made probe.step() raise a raw "Tensor.item() cannot be called
    on meta tensors"; now every quantity is "not measured", with the reason."""
    net = mlp()
    x = torch.randn(4, 3, dtype=torch.float64)
    with Probe(net, budget=None) as probe:
        net(x).sum().backward()
        probe.step()
        net.to("meta")
        loss = net(x.to("meta")).sum()
        loss.backward()
        flow = probe.step(loss)
    assert flow.loss is None
    for q in flow.quantities:
        assert not flow.mask(q).any(), q
    assert set(flow.tables["unmeasured"].kinds) == {"a meta tensor (no data)"}
    assert all(not m._forward_hooks for m in net.modules())


def test_parametrization_added_while_probing_is_a_clear_error():
    net = mlp()
    x = torch.randn(4, 3, dtype=torch.float64)

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    with Probe(net, budget=None) as probe:
        net(x).sum().backward()
        probe.step()
        parametrize.register_parametrization(net[2], "weight", Double())
        net(x).sum().backward()
        with pytest.raises(ProbeStateError, match=r"at step 1: layer '2' \(\w*Linear\) lost \['weight'\].*open a new one"):
            probe.step()
    assert all(not m._forward_hooks for m in net.modules())


# -------------------------------------------------------------------- 4. overlapping probes
def temporal_profiles(probe):
    return {k: (v.per_sequence, v.cell_per_sequence) for k, v in probe.temporal_flow().items()}


@pytest.mark.parametrize("close_outer_first", [True, False])
def test_nested_temporal_probes_both_record_and_restore_in_any_order_regression(close_outer_first):
    """Was: with two ``temporal=True`` probes the outer one's temporal data was silently empty, and
    closing them out of order left ``nn.LSTM.forward`` patched on the instance for good."""
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    single = RNNNet().double()
    with Probe(single, temporal=True, budget=None) as probe:
        single(x).pow(2).sum().backward()
        want = temporal_profiles(probe)

    net = RNNNet().double()
    before = hooks_and_attributes(net)
    outer, inner = Probe(net, temporal=True, budget=None), Probe(net, temporal=True, budget=None)
    net(x).pow(2).sum().backward()
    got = [temporal_profiles(p) for p in (outer, inner)]
    for p in (outer, inner) if close_outer_first else (inner, outer):
        p.close()
    assert hooks_and_attributes(net) == before
    for g in got:
        assert g.keys() == want.keys()
        for k in want:
            np.testing.assert_array_equal(g[k][0], want[k][0])
            np.testing.assert_array_equal(g[k][1], want[k][1])


def test_nested_mark_state_recorders_both_record_and_unwind_in_any_order():
    cell = nn.RNNCell(3, 4).double()
    x = torch.randn(5, 2, 3, dtype=torch.float64)

    def run():
        h = torch.zeros(2, 4, dtype=torch.float64)
        for t in range(5):
            h = mark_state(cell(x[t], h), "dec", t)
        h.pow(2).sum().backward()

    a, b = TemporalRecorder(cell).install(), TemporalRecorder(cell).install()
    run()
    fa, fb = a.flows(), b.flows()
    a.remove()
    b.remove()
    np.testing.assert_array_equal(fa["dec"].per_sequence, fb["dec"].per_sequence)
    assert fa["dec"].per_sequence.shape == (2, 5)
    c = TemporalRecorder(cell).install()
    c.remove()
    run()  # no recorder left: mark_state is the identity and records nowhere
    assert not a.flows() or a.flows()["dec"].per_sequence.shape == (2, 5)


# -------------------------------------------------------------------------- 5. huge finite values
Amplify = ScaleGrad  # identity forward; backward multiplies the gradient by a huge but finite factor


def test_huge_finite_output_gradient_is_not_reported_as_inf_regression():
    """Was: a finite output gradient of 1e37 per entry (norm beyond float32's range) was reported as Inf,
    a false non-finite verdict. The float64 twin of the same float32 model is the oracle."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 50), nn.Tanh(), nn.Linear(50, 2000))
    x = torch.randn(1, 3)

    def loss_of(model, xx):
        return Amplify.apply(model(xx), 1e37).sum()

    flow, layers = one_probed_step(net, lambda: loss_of(net, x))
    assert not flow.nonfinite().any()
    assert flow.output_grad_norm[flow.index("2")] > 3.4e38  # beyond float32
    twin = copy.deepcopy(net).double()
    b = brute_flow(twin, lambda: loss_of(twin, x.double()))
    for layer in layers:
        for q in ("grad_norm", "output_grad_norm"):
            assert flow[q][flow.index(layer.name)] == pytest.approx(getattr(b, q)[layer.name], rel=1e-4)


def test_huge_finite_weights_and_activations_are_finite():
    net = nn.Sequential(nn.Linear(100, 100), nn.Linear(100, 1))
    with torch.no_grad():
        net[0].weight.fill_(3e37)
        net[0].bias.zero_()
        net[1].weight.fill_(1e-30)
    x = torch.ones(1, 100) * 1e-1
    with Probe(net, budget=None) as probe:
        net(x).sum().backward()
        flow = probe.step()
    assert flow.weight_norm[0] == pytest.approx(3e37 * 100, rel=1e-6)
    assert flow.activation_norm[0] == pytest.approx(3e37 * 100 * 0.1 * 10, rel=1e-5)  # 100 outputs of 3e38
    assert not flow.nonfinite().any()


# --------------------------------------------------------------------- 6. loss scaling (integrations)
@pytest.mark.parametrize("unscaled_first", [True, False])
def test_grad_scaler_record_is_in_one_scale(unscaled_first):
    """With ``Probe(scaler=...)`` every quantity is of the unscaled loss, whether or not the user called
    ``scaler.unscale_`` before ``probe.step`` (parameter gradients and hook gradients in one scale)."""
    net = mlp(dtype=torch.float32)
    x = torch.randn(7, 3)
    scaler = torch.amp.GradScaler("cpu", init_scale=65536.0)
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    with Probe(net, budget=None, scaler=scaler) as probe:
        loss = net(x).pow(2).mean()
        scaler.scale(loss).backward()
        if unscaled_first:
            scaler.unscale_(opt)
        flow = probe.step(loss)
        layers = probe.layers
    assert_is_brute(flow, layers, net, lambda: net(x).pow(2).mean(), rtol=1e-5, quantities=("grad_norm", "output_grad_norm"))


# --------------------------------------------------------- 7. checkpointing with shared layers
class _Checkpointing(nn.Module):
    """Seeds its weights; ``checkpointing = False`` turns its checkpoints into plain calls (for the twin)."""

    def __init__(self, seed: int, reentrant: bool):
        super().__init__()
        torch.manual_seed(seed)
        self.reentrant = reentrant
        self.checkpointing = True

    def call(self, block, h, checkpointed: bool):
        if self.checkpointing and checkpointed:
            return checkpoint(block, h, use_reentrant=self.reentrant)
        return block(h)


class SharedInAndOutOfCheckpoint(_Checkpointing):
    def __init__(self, reentrant: bool):
        super().__init__(2, reentrant)
        self.inp, self.shared, self.out = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 1)

    def block(self, h):
        return torch.tanh(self.shared(h))

    def forward(self, x):
        h = self.block(torch.tanh(self.inp(x)))  # outside the checkpoint
        h = self.call(self.block, h, checkpointed=True)  # inside
        return self.out(h)


class Albert(_Checkpointing):
    """One shared block (Linear + LayerNorm) applied four times, checkpointed on uses 1 and 3."""

    def __init__(self, reentrant: bool):
        super().__init__(3, reentrant)
        self.emb = nn.Linear(4, 8)
        self.block = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.LayerNorm(8))
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        h = self.emb(x)
        for use in range(4):
            h = h + self.call(self.block, h, checkpointed=use in (1, 3))
        return self.head(h)


@pytest.mark.parametrize("model", [SharedInAndOutOfCheckpoint, Albert])
@pytest.mark.parametrize("reentrant", [True, False])
def test_shared_layer_inside_and_outside_a_checkpoint_counts_every_call_regression(model, reentrant):
    """Was: a layer called both outside and inside a checkpointed region lost every checkpointed call
    (0.063 where brute force gives 0.674): the skip of recomputed forwards was decided per layer."""
    net = model(reentrant).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    before = snapshot(net)
    with Probe(net, budget=None) as probe:
        loss = net(x).pow(2).sum()
        loss.backward()
        flow = probe.step(loss)
        layers = probe.layers
    net.zero_grad(set_to_none=True)
    assert_restored(net, before)
    net.checkpointing = False  # the same function: the twin needs no recomputation
    assert_is_brute(flow, layers, net, lambda: net(x).pow(2).sum())


# ------------------------------------------------------------------------ 8. torch.func transforms
def test_torch_func_side_passes_are_not_counted_regression():
    """Was: a ``torch.func.grad(functional_call(...))`` side pass was counted into the step (×√2), and
    per-sample gradients with ``vmap(grad(...))`` made probe.step() fail inside functorch."""
    from torch.func import functional_call, grad, vmap

    net = mlp()
    x = torch.randn(7, 3, dtype=torch.float64)
    params = {k: v.detach() for k, v in net.named_parameters()}

    def loss_fn(p, xx):
        return functional_call(net, p, (xx,)).pow(2).sum()

    with Probe(net, budget=None) as probe:
        grad(loss_fn)(params, x)
        per_sample = vmap(grad(loss_fn), in_dims=(None, 0))(params, x)
        loss = net(x).pow(2).sum()
        loss.backward()
        flow = probe.step(loss)
        layers = probe.layers
    assert per_sample["0.weight"].shape == (7, 6, 3)
    assert_is_brute(flow, layers, net, lambda: net(x).pow(2).sum())
    reasons = set(flow.tables["unmeasured"].kinds)
    assert len(reasons) == 1 and "torch.func" in reasons.pop()


# ------------------------------------------------------------------- 9. values silently "not measured"
@dataclass
class Hidden:
    h: torch.Tensor
    note: str = "x"


class ReturnsDataclass(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 4, dtype=torch.float64))

    def forward(self, x):
        return Hidden(torch.tanh(x @ self.w))


class DataclassNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.enc = ReturnsDataclass()
        self.head = nn.Linear(4, 1).double()

    def forward(self, x):
        return self.head(self.enc(x).h)


def test_dataclass_output_is_measured_regression():
    """Was: a layer returning a ``@dataclass`` got NaN and a False mask although the value exists."""
    net = DataclassNet()
    x = torch.randn(5, 3, dtype=torch.float64)
    flow, layers = one_probed_step(net, lambda: net(x).pow(2).sum())
    assert flow.has_output_grad.all() and flow.has_output.all()
    assert_is_brute(flow, layers, net, lambda: net(x).pow(2).sum())


# ------------------------------------------------- 10. the probe never breaks a model that runs without it
@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")  # torch's own, in its encoder
def test_frozen_transformer_on_nested_tensors_runs_and_is_measured_regression():
    """Was: a frozen ``nn.TransformerEncoder`` in eval mode, grad enabled, with a padding mask runs on
    nested tensors; the probe's forward hook raised NotImplementedError and killed the user's forward."""
    torch.manual_seed(5)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 2, enable_nested_tensor=True)
    enc.eval().requires_grad_(False)
    src = torch.randn(3, 5, 8)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[0, 3:] = True
    mask[2, 4:] = True
    want = enc(src, src_key_padding_mask=mask)
    seen, nested = {}, set()

    def keep(name):  # the oracle: Σ over every output tensor, a nested one component by component
        def hook(m, args, out):
            for t in out if isinstance(out, tuple) else (out,):
                if not isinstance(t, torch.Tensor):
                    continue
                if t.is_nested:
                    nested.add(name)
                parts = t.unbind() if t.is_nested else [t]
                seen[name] = seen.get(name, 0.0) + sum(float(p.double().pow(2).sum()) for p in parts)
        return hook

    oracle = [m.register_forward_hook(keep(n)) for n, m in enc.named_modules() if any(True for _ in m.parameters(recurse=False))]
    before = hooks_and_attributes(enc)
    with Probe(enc, budget=None) as probe:
        got = enc(src, src_key_padding_mask=mask)
        flow = probe.step()
    assert hooks_and_attributes(enc) == before
    for h in oracle:
        h.remove()
    assert torch.equal(got, want)
    assert nested  # the case: some layer's output is a nested tensor
    for name, sq in seen.items():
        assert flow.activation_norm[flow.index(name)] == pytest.approx(math.sqrt(sq), rel=1e-6), name
    assert not flow.has_output_grad.any()  # frozen: no gradient to measure
    assert "unmeasured" not in flow.tables


def test_integer_and_bool_parameters_regression():
    """Was: integer or bool parameters (quantized weights, masks) made probe.step() raise a raw
    ``linalg.vector_norm`` error."""
    net = mlp()
    net[0].register_parameter("q", nn.Parameter(torch.arange(-9, 9, dtype=torch.int8), requires_grad=False))
    net[2].register_parameter("mask", nn.Parameter(torch.tensor([True, False, True]), requires_grad=False))
    x = torch.randn(4, 3, dtype=torch.float64)
    with Probe(net, budget=None) as probe:
        for _ in range(2):
            net(x).sum().backward()
            flow = probe.step()
            with torch.no_grad():
                for p in net.parameters():
                    if p.is_floating_point():
                        p.mul_(1.1)
    # exact oracle at the step it was recorded (before the last ×1.1): integers unscaled, floats /1.1
    exp = math.sqrt(sum((float(p.detach().double().pow(2).sum()) / (1.21 if p.is_floating_point() else 1.0))
                        for p in net[0].parameters(recurse=False)))
    assert flow.weight_norm[0] == pytest.approx(exp, rel=1e-12)
    assert list(flow.mask("update_ratio")) == [False, False, True]  # layers with integer/bool parameters
    assert flow.update_ratio[2] == pytest.approx(0.1, rel=1e-12)


class Stubborn(torch.Tensor):
    """An output tensor type whose norm raises (a library subclass the probe cannot measure)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.linalg.vector_norm:
            raise RuntimeError("no norms for me")
        return super().__torch_function__(func, types, args, kwargs or {})


class EmitsStubborn(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 3, dtype=torch.float64))

    def forward(self, x):
        return (x @ self.w).as_subclass(Stubborn)


def test_a_hook_failure_never_reaches_the_users_forward():
    net = EmitsStubborn()
    x = torch.randn(2, 3, dtype=torch.float64)
    want = net(x)
    with Probe(net, budget=None) as probe:
        got = net(x)
        got.sum().backward()
        flow = probe.step()
    assert torch.equal(got.as_subclass(torch.Tensor), want.as_subclass(torch.Tensor))
    assert not flow.has_output[0]
    (reason,) = flow.tables["unmeasured"].kinds
    assert "no norms for me" in reason and "forward hook" in reason


# -------------------------------------------------------------------------------- 11. unique names
class Root(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(6)
        self.scale = nn.Parameter(torch.rand(3, dtype=torch.float64) + 0.5)
        self.Root = nn.Linear(3, 2).double()  # a child with the root's class name

    def forward(self, x):
        return self.Root(x * self.scale)


def test_root_and_child_never_share_a_layer_name_regression():
    """Was: a root module owning a parameter was named after its class, so a child attribute of the
    same name gave two layers one name and ``flow.index(name)`` silently returned the wrong one."""
    net = Root()
    x = torch.randn(4, 3, dtype=torch.float64)
    flow, layers = one_probed_step(net, lambda: net(x).pow(2).sum())
    assert len(set(flow.names)) == len(flow.names) == 2
    assert {l.name: l.module for l in layers} == {"Root": net.Root, "Root#2": net}
    assert flow.weight_norm[flow.index("Root#2")] == pytest.approx(float(net.scale.detach().norm()), rel=1e-12)
    assert flow.weight_norm[flow.index("Root")] == pytest.approx(
        float(torch.cat([net.Root.weight.flatten(), net.Root.bias]).detach().norm()), rel=1e-12)


# ------------------------------------------------------------------------ 12. run log on a full disk
FULL_DISK = textwrap.dedent("""
    import json, resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, like a full disk
    import torch
    from torch import nn
    from gradprobe import Probe
    log_dir, limit, commit_every, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    torch.manual_seed(0)
    net = nn.Sequential(*[nn.Linear(8, 8) for _ in range(20)])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    report = {"errors": []}
    try:
        probe = Probe(net, log_dir=log_dir, run_name="r", commit_every=commit_every, budget=None)
    except Exception as exc:
        report["open"] = [type(exc).__name__, str(exc)]
        report["hooks"] = sum(len(m._forward_hooks) for m in net.modules())
        print(json.dumps(report)); sys.exit(0)
    for s in range(steps):
        net(torch.randn(4, 8)).sum().backward()
        try:
            probe.step()
        except Exception as exc:
            report["errors"].append([s, type(exc).__name__, str(exc)])
            if len(report["errors"]) == 2:
                break
    try:
        probe.close()
    except Exception as exc:
        report["close"] = [type(exc).__name__, str(exc)]
    report["trace"] = [f.step for f in probe.trace]
    report["grad_norm"] = {f.step: f.grad_norm.tolist() for f in probe.trace}
    report["hooks"] = sum(len(m._forward_hooks) for m in net.modules())
    print(json.dumps(report))
""")


def run_full_disk(tmp_path, limit, commit_every, steps):
    import json

    out = subprocess.run([sys.executable, "-c", FULL_DISK, str(tmp_path), str(limit), str(commit_every), str(steps)],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_full_disk_at_open_is_a_run_log_error_naming_the_path_regression(tmp_path):
    """Was: a raw ``sqlite3.OperationalError`` without the path."""
    rep = run_full_disk(tmp_path, 0, 5, 1)
    kind, msg = rep["open"]
    assert kind == "RunLogError" and str(tmp_path / "r.sqlite") in msg
    assert rep["hooks"] == 0


def test_full_disk_mid_run_names_the_last_committed_step_and_keeps_every_committed_step_regression(tmp_path):
    """Was: the failed COMMIT was masked by close()'s second COMMIT ("cannot commit - no transaction is
    active") and the steps in flight were lost without a word."""
    rep = run_full_disk(tmp_path, 120_000, 5, 10_000)
    (step, kind, msg), *_ = rep["errors"]
    assert kind == "RunLogError" and str(tmp_path / "r.sqlite") in msg and "disk" in msg
    last = int(msg.split("every step up to ")[1].split(" ")[0])
    if "close" in rep:  # close() writes the final facts: on a full disk that fails too, and says so itself
        kind, close_msg = rep["close"]
        assert kind == "RunLogError" and f"every step up to {last} (committed)" in close_msg
        assert "no transaction" not in close_msg  # the old mask
    assert rep["hooks"] == 0
    records = read_run(tmp_path).records
    assert [f.step for f in records] == list(range(last + 1))
    assert last < step
    for f in records:  # every committed step intact, bit for bit
        assert f.grad_norm.tolist() == rep["grad_norm"][str(f.step)]
    assert rep["trace"][: step + 1] == list(range(step + 1))  # the in-memory trace kept every step


def test_full_disk_at_the_final_commit_is_raised_by_close(tmp_path):
    rep = run_full_disk(tmp_path, 60_000, 10_000, 40)
    assert not rep["errors"]
    kind, msg = rep["close"]
    assert kind == "RunLogError" and "cannot commit" in msg and "no transaction" not in msg
    assert rep["hooks"] == 0


# ------------------------------------------------------------------------ 13. damaged run logs
def test_non_numeric_value_in_a_schema1_table_is_a_run_log_error_regression(tmp_path, capsys):
    """Was: a raw ValueError, and ``gradprobe report`` exited 1 with a traceback."""
    from gradprobe.cli import main
    from reference.runlog_v1 import write_v1

    p = tmp_path / "old.sqlite"
    step = {"step": 0, "loss": 1.0, "names": ["a"], "kinds": ["Linear"], "backward_rank": [0],
            **{q: [0.5] for q in ("grad_norm", "output_grad_norm", "activation_norm", "weight_norm", "update_ratio")},
            **{m: [True] for m in ("has_grad", "has_output_grad", "has_output")},
            "units": (["act"], ["Tanh"], [0.1], [float("nan")], [4])}
    write_v1(p, [step])
    execute_and_commit(p, "UPDATE units SET saturated_fraction = 'lots'")
    with pytest.raises(RunLogError, match="damaged"):
        read_run(p)
    assert main(["report", str(p), "--out", str(tmp_path / "rep")]) == 2
    err = capsys.readouterr().err
    assert "damaged" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- 14. two writers
def test_second_writer_is_refused_with_the_reason_regression(tmp_path):
    """Was: two writers were refused only because their layer names happened to collide, and the
    message did not say why. Now any second writer (any mode) is refused while the first is open."""
    a_net, b_net = mlp(0), nn.Linear(2, 2)  # different layers: nothing collides but the file
    with Probe(a_net, log_dir=tmp_path, run_name="r", budget=None) as a:
        a_net(torch.randn(2, 3, dtype=torch.float64)).sum().backward()
        a.step()
        for mode in ("new", "append", "overwrite"):
            with pytest.raises(RunLogError, match=rf"being written by another open probe \(process {os.getpid()} .*\).*two writers"):
                Probe(b_net, log_dir=tmp_path, run_name="r", mode=mode, budget=None)
            assert not b_net._forward_hooks
        a_net(torch.randn(2, 3, dtype=torch.float64)).sum().backward()
        a.step()
    assert [f.step for f in read_run(tmp_path).records] == [0, 1]  # overwrite did not delete a's file
    assert not (tmp_path / "r.sqlite.lock").exists()
    with Probe(b_net, log_dir=tmp_path, run_name="r", mode="overwrite", budget=None):  # once a is closed, it may
        pass


def test_a_header_without_steps_is_named_for_what_it_is(tmp_path):
    net = mlp()
    Probe(net, log_dir=tmp_path, run_name="r", budget=None).close()  # opened, never stepped
    with pytest.raises(RunLogError, match="a run's header but no step: a run that stopped before its first recorded step"):
        Probe(net, log_dir=tmp_path, run_name="r", budget=None)


# --------------------------------------------------------------- loading never unpickles untrusted data
class Bomb:
    """Unpickling this creates a file: the proof that untrusted code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_model_spec_and_state_dict_never_unpickle_untrusted_data(tmp_path):
    from gradprobe.cli.loading import load_model

    marker = tmp_path / "pwned"
    evil = tmp_path / "model.pt"
    torch.save({"weight": Bomb(marker)}, evil)
    with pytest.raises(ConfigError, match="allow-pickle"):
        load_model(str(evil), {})
    with pytest.raises(ConfigError, match="weights_only=True"):
        load_model("torch.nn:Linear", {"in_features": 2, "out_features": 2}, state=str(evil))
    assert not marker.exists()


def test_run_log_never_unpickles_untrusted_data(tmp_path):
    import pickle

    net = mlp()
    with Probe(net, log_dir=tmp_path, run_name="r", budget=None) as probe:
        net(torch.randn(2, 3, dtype=torch.float64)).sum().backward()
        probe.step()
    marker = tmp_path / "pwned"
    blob = pickle.dumps(Bomb(marker))
    execute_and_commit(tmp_path / "r.sqlite", ("UPDATE steps SET data = ?", (blob,)),
                       ("UPDATE meta SET value = ? WHERE key = 'facts'", (blob,)),
                       ("INSERT INTO layouts(spec) VALUES (?)", (blob,)))
    with pytest.raises(RunLogError):
        read_run(tmp_path)
    assert not marker.exists()


def test_no_unpickling_reader_in_the_source():
    """Static guard: the only ``torch.load`` without ``weights_only=True`` is the one behind --allow-pickle."""
    src = ROOT / "src" / "gradprobe"
    unsafe = []
    for path in src.rglob("*.py"):
        text = path.read_text()
        for bad in ("pickle.load", "pickle.loads", "allow_pickle=True", "dill", "shelve", "marshal.load"):
            if bad in text:
                unsafe.append(f"{path.relative_to(src)}: {bad}")
        for line in text.splitlines():
            if "torch.load(" in line and "weights_only=True" not in line:
                unsafe.append(f"{path.relative_to(src)}: {line.strip()}")
    assert unsafe == ["specs.py: model = torch.load(spec, weights_only=False, map_location=\"cpu\")"]


# ------------------------------------------------------------------------------- torch.compile (slow)
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")  # dynamo's own
@pytest.mark.parametrize("compile_first", [False, True])
def test_compiled_model_is_measured_exactly_and_restored(compile_first):
    """``torch.compile`` traces the probe's hooks (no functorch query, no host read, no backward id
    inside a traced graph); the numbers still equal the twin's and every hook is gone after close."""
    net = mlp()
    x = torch.randn(5, 3, dtype=torch.float64)
    # dynamo marks what it compiles (_is_torch_compile, _dynamo_*), and once Lightning is imported (another
    # test did) its wrapper of torch.compile stores _compile_kwargs on the module: not ours
    def without_torch_marks(state):
        def clean(entry):
            return tuple(sorted(a for a in x if not a.startswith(("_dynamo", "_is_torch_compile", "_compile_kwargs")))
                         if isinstance(x, list) else x for x in entry)
        return [clean(e) for e in state]

    before = without_torch_marks(hooks_and_attributes(net))
    compiled = torch.compile(net, backend="aot_eager") if compile_first else None
    with Probe(compiled if compile_first else net, budget=None) as probe:
        run = compiled if compile_first else torch.compile(net, backend="aot_eager")
        loss = run(x).pow(2).sum()
        loss.backward()
        flow = probe.step(loss)
        layers = probe.layers
    torch._dynamo.reset()
    net.zero_grad(set_to_none=True)
    assert without_torch_marks(hooks_and_attributes(net)) == before
    assert_is_brute(flow, layers, net, lambda: net(x).pow(2).sum())


def test_a_deep_copy_every_step_keeps_the_probe_bounded():
    """An EMA or SAM loop that deep-copies the model every step: the probe remembers only the copies
    that still hold one of its ghosts."""
    net = mlp()
    x = torch.randn(3, 3, dtype=torch.float64)
    with Probe(net, budget=None) as probe:
        hooks = next(r for r in probe.recorders if type(r).__name__ == "OutputRecorder")._hooks
        for _ in range(700):  # 3 hooks per copy: past the pruning threshold
            twin = copy.deepcopy(net)
            twin(x)
            del twin
        assert len(hooks._ghosts) <= 1024 + 3
        net(x).sum().backward()
        probe.step()
