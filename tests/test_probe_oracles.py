"""Closed-form oracle: seed 004's chain of single-neuron sigmoid layers.

o_1 = w_1,  o_i = σ(w_i·o_{i−1}) (i = 2…L),  F = o_L. With s_i = σ'(w_i o_{i−1}) = σ(1−σ):

    ∂F/∂o_k = Π_{i=k+1..L} w_i s_i                                  (the back-propagated signal)
    dF/dw_k = ∂F/∂o_k · do_k/dw_k,  do_1/dw_1 = 1,  do_k/dw_k = s_k o_{k−1}

so dF/dw_1 = Π_{i=2..L} w_i · Π_{i=2..L} s_i, the seed's formula. The closed form is evaluated in
plain Python floats (``math.exp``), independently of torch; float64 on both sides, so rtol 1e-12
(a chain of ≤ 3L multiplications accumulates ≲ 3L ulps ≈ 1e-14).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from gradprobe import Probe


class First(nn.Module):
    """o_1 = w_1: the module returns its own parameter (a leaf tensor) as its output."""

    def __init__(self, w: float):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w, dtype=torch.float64))

    def forward(self):
        return self.w


class Neuron(nn.Module):
    def __init__(self, w: float):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w, dtype=torch.float64))

    def forward(self, o):
        return torch.sigmoid(self.w * o)


class SigmoidChain(nn.Module):
    def __init__(self, ws):
        super().__init__()
        self.first = First(ws[0])
        self.rest = nn.ModuleList(Neuron(w) for w in ws[1:])

    def forward(self):
        o = self.first()
        for m in self.rest:
            o = m(o)
        return o


def closed_form(ws):
    """(o, ∂F/∂o, dF/dw) as Python float lists, from the formulas in the module docstring."""
    sig = lambda t: 1.0 / (1.0 + math.exp(-t))
    L = len(ws)
    o, s = [ws[0]], [None]
    for i in range(1, L):
        z = ws[i] * o[i - 1]
        o.append(sig(z))
        s.append(sig(z) * (1.0 - sig(z)))
    dFdo = []
    for k in range(L):
        prod = 1.0
        for i in range(k + 1, L):
            prod *= ws[i] * s[i]
        dFdo.append(prod)
    dFdw = [dFdo[0]] + [dFdo[k] * s[k] * o[k - 1] for k in range(1, L)]
    return o, dFdo, dFdw


def _weights(L, seed):
    g = np.random.default_rng(seed)
    w = g.uniform(0.5, 3.0, L) * g.choice([-1.0, 1.0], L)
    return [float(v) for v in w]


@pytest.mark.parametrize("L,seed", [(2, 0), (5, 1), (12, 2), (30, 3)])
def test_seed004_chain_matches_closed_form(L, seed):
    ws = _weights(L, seed)
    o, dFdo, dFdw = closed_form(ws)
    # the seed's formula for k = 1, written as the seed writes it
    s = [None] + [(1 / (1 + math.exp(-ws[i] * o[i - 1]))) * (1 - 1 / (1 + math.exp(-ws[i] * o[i - 1]))) for i in range(1, L)]
    seed_formula = math.prod(ws[1:]) * math.prod(s[1:])
    assert math.isclose(dFdw[0], seed_formula, rel_tol=1e-12)

    model = SigmoidChain(ws)
    with Probe(model, fetch_every=1) as probe:
        for _ in range(3):  # several steps: a leaf output must not collect one hook per step
            model.zero_grad(set_to_none=True)
            F = model()
            F.backward()
            flow = probe.step(F)
    names = ("first",) + tuple(f"rest.{i}" for i in range(L - 1))
    assert flow.names == names
    np.testing.assert_allclose(flow.grad_norm, np.abs(dFdw), rtol=1e-12, atol=0)
    np.testing.assert_allclose(flow.output_grad_norm, np.abs(dFdo), rtol=1e-12, atol=0)
    np.testing.assert_allclose(flow.activation_norm, np.abs(o), rtol=1e-12, atol=0)
    np.testing.assert_allclose(flow.weight_norm, np.abs(ws), rtol=0, atol=0)
    assert flow.loss == pytest.approx(o[-1], rel=1e-15)
    assert flow.backward_rank.tolist() == list(range(L))[::-1]


def test_seed004_signal_vanishes_geometrically():
    """With every w_i = 1, s_i ≤ 1/4: the signal at layer 1 is at most 4^−(L−1) of the last layer's."""
    L = 10
    ws = [1.0] * L
    o, dFdo, _ = closed_form(ws)
    model = SigmoidChain(ws)
    with Probe(model, fetch_every=1) as probe:
        model().backward()
        flow = probe.step()
    ratio = flow.output_grad_norm[0] / flow.output_grad_norm[-1]
    assert ratio == pytest.approx(dFdo[0] / dFdo[-1], rel=1e-12)
    assert ratio <= 0.25 ** (L - 1)
