"""Issue 3 §2: the Lyapunov spectrum along an actual input sequence, beside the probe's measured decay."""
import math

import torch
from torch import nn

import gradprobe
from gradprobe.analysis import compare_time
from gradprobe.functional import lyapunov_spectrum
from gradprobe.theory import rnn_jacobians


def test_linear_rnn_lyapunov_equals_measured_temporal_decay():
    # relu RNN with W = α·I (Q = I keeps the states positive) and positive inputs is linear:
    # ∂h_t/∂h_k = α^(t−k)·I, so every Lyapunov exponent is ln α and the measured decay is ln α
    torch.manual_seed(0)
    alpha, T = 0.9, 40
    rnn = nn.RNN(4, 16, nonlinearity="relu", bias=False).double()
    with torch.no_grad():
        rnn.weight_hh_l0.copy_(alpha * torch.eye(16, dtype=torch.float64))
        rnn.weight_ih_l0.abs_()
    x = torch.rand(T, 1, 4, dtype=torch.float64) + 0.1
    J, _ = rnn_jacobians(rnn, x[:, 0])
    lyap = lyapunov_spectrum(J, k=3)
    assert torch.allclose(lyap, torch.full((3,), math.log(alpha), dtype=torch.float64), atol=1e-12)
    with gradprobe.Probe(rnn, temporal=True) as probe:
        out, _ = rnn(x)
        out[-1].sum().backward()
        tf = probe.temporal_flow()["RNN.l0"]
    c = compare_time(tf.grad_norm, float(lyap[0]))
    assert abs(c.measured_rate - math.log(alpha)) < 1e-10 and abs(c.difference) < 1e-10
    assert abs(tf.decay_rate - math.log(alpha)) < 1e-10


def test_tanh_rnn_decay_is_bounded_by_the_top_lyapunov_exponent_estimate():
    torch.manual_seed(1)
    rnn = nn.RNN(4, 64).double()  # default init: contracting, λ₁ < 0
    x = torch.randn(200, 1, 4, dtype=torch.float64)
    J, _ = rnn_jacobians(rnn, x[:, 0])
    lam1 = float(lyapunov_spectrum(J, k=1, transient=20)[0])
    with gradprobe.Probe(rnn, temporal=True) as probe:
        out, _ = rnn(x)
        out[-1].sum().backward()
        tf = probe.temporal_flow()["RNN.l0"]
    # along one sequence ‖∂E/∂h_k‖ decays like e^{λ₁ s}; the fit over the decaying side agrees to
    # within the finite-time fluctuation (here ~10%)
    assert lam1 < 0 and abs(tf.decay_rate - lam1) < 0.15 * abs(lam1)
