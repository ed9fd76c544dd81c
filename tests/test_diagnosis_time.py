"""Verdicts in time: vanilla RNNs on long sequences vanish; a recurrent weight scaled ×3 explodes."""
import math

import numpy as np
import torch
from torch import nn

from gradprobe.diagnosis.findings import Findings
from gradprobe.diagnosis import DiagnosisConfig
from gradprobe.diagnosis.rules_time import rule_exploding_in_time, rule_vanishing_in_time
from gradprobe.probe.temporal import TemporalRecorder
from gradprobe.trace import LayerFlow

CFG = DiagnosisConfig()
EMPTY = LayerFlow.from_arrays([])


def temporal_of(rnn, T=200, B=8, scale=1.0, seed=0, positive=False):
    torch.manual_seed(seed)
    if scale != 1.0:
        with torch.no_grad():
            rnn.weight_hh_l0.mul_(scale)
    x = torch.randn(T, B, rnn.input_size)
    x = x.abs() if positive else x
    with TemporalRecorder(rnn) as rec:
        out, _ = rnn(x)
        out[-1].pow(2).sum().backward()  # loss at the last step only
        flows = rec.flows()
    return flows


def test_vanilla_rnn_long_sequence_vanishes_in_time():
    torch.manual_seed(0)
    rnn = nn.RNN(16, 64)  # PyTorch default init: U(±1/√64), spectral radius well below 1
    flows = temporal_of(rnn)
    v = rule_vanishing_in_time(Findings(EMPTY, temporal=flows), CFG)
    (name,) = flows
    assert v is not None and v.kind == "vanishing_in_time" and v.layer == name == "RNN.l0"
    tf = flows[name]
    p = tf.steps_back()
    # evidence numbers are the recorded ones
    last = np.flatnonzero(p > 0)[-1]  # float32 underflows to exactly 0 beyond this step
    assert math.isclose(v.data["ratio"], p[last] / p.max(), rel_tol=1e-12)
    assert "exactly 0" in " ".join(v.evidence)
    assert v.data["decay_rate"] < 0 and v.data["horizon"] < 100
    assert "horizon at 1e-2 of the peak" in v.evidence[1]
    assert rule_exploding_in_time(Findings(EMPTY, temporal=flows), CFG) is None


def test_recurrent_weight_scaled_by_three_explodes_in_time():
    torch.manual_seed(0)
    rnn = nn.RNN(16, 64, nonlinearity="relu")
    with torch.no_grad():
        q, _ = torch.linalg.qr(torch.randn(64, 64))
        rnn.weight_hh_l0.copy_(q)  # orthogonal: norm-preserving ...
    flows = temporal_of(rnn, T=60, scale=3.0)  # ... then scaled ×3
    v = rule_exploding_in_time(Findings(EMPTY, temporal=flows), CFG)
    assert v is not None and v.kind == "exploding_in_time"
    assert v.data["growth"] > 1e2 and v.data["decay_rate"] > 0


def test_orthogonal_linear_recurrence_is_neither():
    torch.manual_seed(0)
    rnn = nn.RNN(8, 32, nonlinearity="relu", bias=False)
    with torch.no_grad():
        rnn.weight_hh_l0.copy_(torch.eye(32))
        rnn.weight_ih_l0.abs_()  # positive inputs keep ReLU in its linear regime: ∂h_t/∂h_k = I
    flows = temporal_of(rnn, T=50, positive=True)
    f = Findings(EMPTY, temporal={k: v for k, v in flows.items()})
    assert rule_vanishing_in_time(f, CFG) is None and rule_exploding_in_time(f, CFG) is None
    (tf,) = flows.values()
    np.testing.assert_allclose(tf.grad_norm, tf.grad_norm[-1], rtol=1e-5)


def test_an_lstm_whose_cell_state_carries_the_error_is_not_vanishing():
    """A trained LSTM's ‖∂E/∂h_k‖ can fall far below its peak (the readout's direct term) while ‖∂E/∂c_k‖
    keeps its size: the carousel carries the error, so no verdict; when c decays too, the verdict says so."""
    from gradprobe.trace import TemporalFlow

    T = 100
    h = 0.5 ** np.arange(T)[::-1]  # time order: the loss end (step T−1) holds the peak
    flat = np.ones(T)
    carried = {"lstm.l0": TemporalFlow("lstm.l0", None, profile=h, cell_profile=flat)}
    assert rule_vanishing_in_time(Findings(EMPTY, temporal=carried), CFG) is None
    lost = {"lstm.l0": TemporalFlow("lstm.l0", None, profile=h, cell_profile=0.7 ** np.arange(T)[::-1])}
    v = rule_vanishing_in_time(Findings(EMPTY, temporal=lost), CFG)
    assert v is not None and v.layer == "lstm.l0"
    assert f"{0.7 ** 99:.3g}× its peak" in v.evidence[-1] and "Hochreiter & Schmidhuber 1997" in v.evidence[-1]
    # a vanilla profile without a cell state is judged on h alone, as before
    vanilla = {"rnn.l0": TemporalFlow("rnn.l0", None, profile=h)}
    assert rule_vanishing_in_time(Findings(EMPTY, temporal=vanilla), CFG) is not None


def test_real_lstm_forget_bias_decides_the_cell_state_horizon():
    """nn.LSTM at init, T = 100: torch's default forget bias (f ≈ 1/2) loses the cell-state gradient
    (≈ 0.5^99 of its peak), a forget bias of ln T (f = T/(T+1), f^T ≈ 1/e) keeps it: vanishing, then not."""
    from gradprobe.remedies import forget_bias_

    torch.manual_seed(0)
    closed = nn.LSTM(4, 16)
    flows = temporal_of(closed, T=100)
    assert rule_vanishing_in_time(Findings(EMPTY, temporal=flows), CFG) is not None
    torch.manual_seed(0)
    opened = forget_bias_(nn.LSTM(4, 16), math.log(100))
    flows = temporal_of(opened, T=100)
    (tf,) = flows.values()
    c = tf.steps_back("c")
    assert c[-1] / c.max() > 1e-2
    assert rule_vanishing_in_time(Findings(EMPTY, temporal=flows), CFG) is None
