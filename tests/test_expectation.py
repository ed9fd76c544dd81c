"""Mean-field expectation beside the measured depth profile (issue 5: thresholds vs the architecture)."""
import math

import torch
import torch.nn.functional as F
from torch import nn

import gradprobe
from gradprobe.analysis.depth import signal_profile
from gradprobe.analysis.expectation import depth_expectation
from gradprobe.models import DeepMLP
from gradprobe.theory import mean_field

X, Y = torch.randn(128, 64, generator=torch.Generator().manual_seed(0)), torch.randint(0, 10, (128,))


def measured(net):
    with gradprobe.Probe(net) as probe:
        F.cross_entropy(net(X), Y).backward()
        return signal_profile(probe.flow())


def test_expectation_reads_variances_off_the_weights_and_matches_theory():
    net = DeepMLP(64, 10, width=256, depth=16, activation="tanh", init="gaussian", sigma_w2=4.0, sigma_b2=0.05,
                  generator=torch.Generator().manual_seed(0))
    prof = measured(net)
    e = depth_expectation(net, prof)
    hidden = [b.linear for b in net.blocks]
    sw = sorted(256 * m.weight.double().pow(2).mean().item() for m in hidden)[len(hidden) // 2 - 1 : len(hidden) // 2 + 1]
    assert min(sw) <= e.sigma_w2 <= max(sw) and abs(e.sigma_w2 - 4.0) < 0.1
    assert math.isclose(e.chi1, mean_field("tanh", e.sigma_w2, e.sigma_b2).chi1, rel_tol=1e-12)
    assert abs(e.z) < 3 and abs(e.measured_gain / e.gain - 1) < 0.05
    assert "consistent with it" in e.sentence()


def test_residual_net_gets_no_plain_mlp_expectation():
    net = DeepMLP(64, 10, width=256, depth=16, activation="relu", init="he", residual=True,
                  generator=torch.Generator().manual_seed(0))
    assert depth_expectation(net, measured(net)) is None  # two Linear layers per activation: not plain
    d = gradprobe.diagnose(net, X, F.cross_entropy, target=Y)
    assert d.verdict == "exploding" and not any("mean-field" in e for e in d.evidence)


def test_sentence_says_when_the_measurement_departs():
    from dataclasses import replace

    net = DeepMLP(64, 10, width=256, depth=8, activation="relu", init="he", generator=torch.Generator().manual_seed(0))
    e = depth_expectation(net, measured(net))
    assert "consistent with it" in e.sentence()
    assert "far from it" in replace(e, z=5.0).sentence() and "near-critical" in e.sentence()


def test_no_expectation_for_models_that_are_not_plain_mlps():
    conv = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    assert depth_expectation(conv, signal_profile(gradprobe.LayerFlow.from_arrays(["0", "3"], output_grad_norm=[1, 2]))) is None
    mixed = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    assert depth_expectation(mixed, measured_any(mixed)) is None


def measured_any(net):
    with gradprobe.Probe(net) as probe:
        net(torch.randn(4, 8)).sum().backward()
        return signal_profile(probe.flow())
