"""Verdicts on the classic deep-network regimes, with the evidence numbers checked independently.

Regimes (Glorot & Bengio 2010; He et al. 2015; Poole et al. 2016; references.md "Deep feed-forward"):
sigmoid + "standard" init vanishes; tanh with σ_w² = 9 (χ₁ > 1, chaotic) explodes; ReLU + He is
healthy; residual ReLU with branches scaled by 1/√depth is healthy; unscaled He residual blocks grow
the signal ≈ √2 per block (exploding). Widths/depths are chosen so each verdict sits orders of
magnitude from the thresholds (1e-2, 1e2) for every seed tried (see the printed ratios in the report).

The independent number: the ratio ‖∂L/∂h_first‖/‖∂L/∂h_last‖ from the brute-force twin
(``tests/reference/brute.py``), in float64, compared with the verdict's data at rtol 1e-9.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import gradprobe
from gradprobe.analysis.depth import signal_profile
from gradprobe.models import DeepMLP
from reference.brute import brute_flow

DEPTH = 24


def _net(seed, **kw):
    torch.manual_seed(seed)
    return DeepMLP(16, 4, width=64, depth=kw.pop("depth", DEPTH), **kw).double()


def _batch(seed):
    g = torch.Generator().manual_seed(100 + seed)
    return torch.randn(64, 16, generator=g, dtype=torch.float64)


def loss_fn(y):
    return y.pow(2).mean()


def _twin_ratio(net, x):
    twin = copy.deepcopy(net)
    b = brute_flow(twin, lambda: loss_fn(twin(x)), only={"input", "output"})
    first, last = b.order[0], b.order[-1]
    return b.output_grad_norm[first] / b.output_grad_norm[last], len(b.order)


CASES = [
    ("vanishing", dict(activation="sigmoid", init="standard")),
    ("exploding", dict(activation="tanh", init="gaussian", sigma_w2=9.0)),
    ("healthy", dict(activation="relu", init="he")),
    ("healthy", dict(activation="relu", init="he", residual=True, residual_scale=DEPTH**-0.5)),
    ("exploding", dict(activation="relu", init="he", residual=True)),
]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("expected,kw", CASES, ids=[f"{e}-{k['activation']}-{k['init']}-{k.get('residual', False)}" for e, k in CASES])
def test_verdicts(expected, kw, seed):
    net = _net(seed, **kw)
    x = _batch(seed)
    ratio, n = _twin_ratio(net, x)
    d = gradprobe.diagnose(net, x, loss_fn)
    assert d.verdict == expected, str(d)
    if expected == "healthy":
        assert 1e-2 <= ratio <= 1e2
        assert f"{ratio:.3g}" in d.evidence[0]
        return
    v = d.primary
    assert v.data["source"] == "output_grad_norm" and v.data["n_layers"] == n
    assert v.data["ratio"] == pytest.approx(ratio, rel=1e-9)
    assert v.data["factor"] == pytest.approx(ratio ** (1 / (n - 1)), rel=1e-9)
    text = " ".join(d.evidence)
    assert f"{ratio:.3g}×" in text and f"{ratio ** (1 / (n - 1)):.3g}" in text
    assert v.layer == "input"
    assert d.remedies, "a problem verdict must come with remedies"


def test_unscaled_residual_evidence_reports_growth_per_block():
    """Unscaled residual ReLU blocks x + V φ(W x): going backward, E‖J_blockᵀ g‖² = (1 + σ_w²σ_v²/2)‖g‖²
    (the identity path plus the branch, whose ReLU keeps half the variance). references.md's case
    σ_w² = 2, σ_v² = 1 gives 2 (ln 0.69, i.e. √2 per block in norm); DeepMLP He-initialises V too
    (σ_v² = 2), so the norm gain per block is √3. Finite width 64, depth 24: ±10%."""
    net = _net(0, activation="relu", init="he", residual=True)
    x = _batch(0)
    with gradprobe.Probe(net, fetch_every=1) as probe:
        loss_fn(net(x)).backward()
        f = probe.step()
        d = probe.diagnose()
    assert d.verdict == "exploding"
    text = " ".join(d.evidence)
    assert "larger" in text and "per-layer gain" in text
    # per block (each block holds two layers: linear, proj)
    blocks = [f.index(f"blocks.{i}.linear") for i in range(DEPTH)]
    s = f.output_grad_norm[blocks]
    per_block = np.exp(-np.polyfit(np.arange(DEPTH), np.log(s), 1)[0])
    sigma_w2 = sigma_v2 = 2.0  # He
    assert per_block == pytest.approx(np.sqrt(1 + sigma_w2 * sigma_v2 / 2), rel=0.1)
    # the evidence's per-layer gain is the per-block gain spread over the block's two layers
    assert d.primary.data["fit_factor"] == pytest.approx(np.sqrt(per_block), rel=0.1)
    assert "scale_residual" == d.remedies[0].id


def test_probe_diagnose_agrees_with_oneshot():
    net = _net(0, activation="sigmoid", init="standard")
    x = _batch(0)
    with gradprobe.Probe(copy.deepcopy(net)) as probe:
        loss_fn(probe.model(x)).backward()
        probe.step()
        a = probe.diagnose()
    b = gradprobe.diagnose(net, x, loss_fn)
    assert a.verdict == b.verdict == "vanishing"
    assert a.primary.data["ratio"] == pytest.approx(b.primary.data["ratio"], rel=1e-12)


# ----------------------------------------------------------------- non-finite
class NaNBackward(torch.autograd.Function):
    """Identity forward; backward turns the incoming gradient into NaN."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return torch.full_like(g, float("nan"))


class Poisoned(nn.Module):
    def __init__(self, n=8, poison_after=4):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(6, 6) for _ in range(n))
        self.poison_after = poison_after

    def forward(self, x):
        for i, m in enumerate(self.layers):
            x = torch.tanh(m(x))
            if i == self.poison_after:
                x = NaNBackward.apply(x)
        return x


def test_nan_in_backward_names_first_layer_in_backward_order():
    torch.manual_seed(0)
    net = Poisoned(poison_after=4)
    d = gradprobe.diagnose(net, torch.randn(5, 6), lambda y: y.pow(2).mean())
    assert d.verdict == "non_finite"
    # backward reaches layers 7, 6, 5 (finite), then the NaN enters layer 4's output gradient
    assert d.primary.layer == "layers.4"
    assert d.primary.data["nonfinite_layers"] == [f"layers.{i}" for i in range(5)]
    assert "layers.4" in " ".join(d.evidence)


def test_nan_weight_names_first_layer_in_forward_order():
    torch.manual_seed(0)
    net = Poisoned(poison_after=-1)
    with torch.no_grad():
        net.layers[3].weight[0, 0] = float("nan")
    with gradprobe.Probe(net, fetch_every=1) as probe:
        net(torch.randn(5, 6)).pow(2).mean().backward()
        f = probe.step()
        d = probe.diagnose()
    assert d.verdict == "non_finite" and d.primary.layer == "layers.3"
    assert "forward pass first produced a non-finite output at layer 'layers.3'" in d.evidence[0]
    # the measurements themselves: activations finite before layer 3, NaN from it on
    assert np.isfinite(f.activation_norm[:3]).all() and np.isnan(f.activation_norm[3:]).all()


def test_inf_gradient_is_non_finite_not_exploding():
    class InfBackward(NaNBackward):
        @staticmethod
        def backward(ctx, g):
            return torch.full_like(g, float("inf"))

    class M(Poisoned):
        def forward(self, x):
            for i, m in enumerate(self.layers):
                x = m(x)
                if i == 5:
                    x = InfBackward.apply(x)
            return x

    torch.manual_seed(0)
    d = gradprobe.diagnose(M(), torch.randn(5, 6), lambda y: y.sum())
    assert d.verdict == "non_finite" and d.primary.layer == "layers.5"


# -------------------------------------------------------------- depth profile
def test_signal_profile_against_hand_computation():
    vals = np.array([1e-6, 3e-5, np.nan, 2e-3, 0.0, 0.5])
    f = gradprobe.LayerFlow.from_arrays(list("abcdef"), output_grad_norm=vals,
                                        has_output_grad=[True, True, False, True, True, True])
    p = signal_profile(f)
    kept = np.array([1e-6, 3e-5, 2e-3, 0.5])  # unmeasured and zero entries are skipped
    assert p.names == ("a", "b", "d", "f")
    assert p.ratio == pytest.approx(1e-6 / 0.5, rel=1e-14)
    assert p.factor == pytest.approx((1e-6 / 0.5) ** (1 / 3), rel=1e-14)
    slope = np.polyfit(np.arange(4), np.log(kept), 1)[0]
    assert p.fit_factor == pytest.approx(np.exp(-slope), rel=1e-12)
    assert p.orders_of_magnitude == pytest.approx(np.log10(2e-6), rel=1e-14)


def test_signal_profile_falls_back_to_grad_norm_and_needs_two_layers():
    f = gradprobe.LayerFlow.from_arrays(["a", "b", "c"], grad_norm=[1.0, 10.0, 100.0])
    p = signal_profile(f)
    assert p.source == "grad_norm" and p.ratio == pytest.approx(0.01)
    assert signal_profile(gradprobe.LayerFlow.from_arrays(["a"], grad_norm=[1.0])) is None


def test_thresholds_are_configurable_and_validated():
    net = _net(0, activation="relu", init="he", residual=True)
    x = _batch(0)
    ratio, _ = _twin_ratio(net, x)
    d = gradprobe.diagnose(copy.deepcopy(net), x, loss_fn, explode_ratio=ratio * 1.01)
    assert d.verdict == "healthy"
    d = gradprobe.diagnose(copy.deepcopy(net), x, loss_fn, explode_ratio=ratio * 0.99)
    assert d.verdict == "exploding"
    with pytest.raises(gradprobe.ConfigError):
        gradprobe.DiagnosisConfig(vanish_ratio=2.0)


def _dead_net(dead_at=3, n=6):
    torch.manual_seed(0)
    layers = []
    for i in range(n):
        lin = nn.Linear(8, 8)
        if i == dead_at:
            nn.init.constant_(lin.bias, -100.0)  # every ReLU unit after it is dead on any input
        layers += [lin, nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(8, 1))


def test_signal_exactly_zero_at_early_layers_is_vanishing_regression():
    """Regression: the ratio profile skips zeros (it takes logarithms), so a net whose first layers
    receive exactly no gradient (all ReLUs after layer 3 dead) was diagnosed "healthy" from the
    three live layers alone."""
    net = _dead_net(dead_at=3)
    x = torch.randn(16, 8)
    with gradprobe.Probe(net) as probe:
        net(x).pow(2).mean().backward()
        probe.step()
        d = probe.diagnose()
    # independent check of the premise: autograd says the first four layers' outputs get exactly 0
    t = copy.deepcopy(net)
    b = brute_flow(t, lambda: t(x).pow(2).mean())
    assert [b.output_grad_norm[n] == 0 for n in ("0", "2", "4", "6", "8")] == [True] * 4 + [False]
    assert d.verdict == "vanishing" and d.primary.layer == "0"
    assert d.primary.data["ratio"] == 0.0 and d.primary.data["zero_layers"] == ["0", "2", "4", "6"]
    assert "exactly 0 at the first 4 of 7 layers" in d.evidence[0] and "'8'" in d.evidence[0]


def test_zero_initialised_residual_branches_are_healthy():
    """A zero-initialised last layer per residual branch (the remedy) makes the signal exactly 0 inside
    every branch, but the trunk carries it to the first layer: healthy, not vanishing."""
    net = _net(0, activation="relu", init="he", residual=True)
    with torch.no_grad():
        for b in net.blocks:
            b.proj.weight.zero_()
    x = _batch(0)
    d = gradprobe.diagnose(net, x, loss_fn)
    assert d.verdict == "healthy", str(d)
    with gradprobe.Probe(net, fetch_every=1) as probe:
        loss_fn(net(x)).backward()
        f = probe.step()
    assert (f.output_grad_norm[[f.index(f"blocks.{i}.linear") for i in range(DEPTH)]] == 0).all()
