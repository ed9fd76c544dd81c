"""A zoo of sick and healthy models with the verdicts the doctor must give (issue 5 §4)."""
import torch
import torch.nn.functional as F
from torch import nn

import gradprobe
from gradprobe.models import DeepMLP


def batch(n=128, d=32, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)


X, Y = batch()


def verdicts(model, **kw):
    return gradprobe.diagnose(model, X, F.cross_entropy, target=Y, **kw)


def test_saturated_deep_sigmoid_mlp_is_vanishing_and_saturated():
    torch.manual_seed(0)
    net = DeepMLP(32, 10, width=64, depth=10, activation="sigmoid", init="gaussian", sigma_w2=1.0, sigma_b2=100.0,
                  generator=torch.Generator().manual_seed(0))
    d = verdicts(net)
    assert d.verdict == "vanishing"
    assert "saturated_units" in d
    sat = next(v for v in d.verdicts if v.kind == "saturated_units")
    # independent count on the first hidden activation: 4·s(1−s) < 0.05
    with torch.no_grad():
        s = torch.sigmoid(net.input(X))
        expect = (4 * s * (1 - s) < 0.05).double().mean().item()
    assert abs(sat.data["saturated_fraction"]["input_act"] - expect) < 1e-6 and expect > 0.5


def test_tanh_with_large_weights_explodes():
    net = DeepMLP(32, 10, width=128, depth=20, activation="tanh", init="gaussian", sigma_w2=9.0,
                  generator=torch.Generator().manual_seed(0))
    assert verdicts(net).verdict == "exploding"


def test_relu_with_large_negative_bias_has_dead_units():
    net = DeepMLP(32, 10, width=64, depth=6, activation="relu", init="he", generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        net.blocks[2].linear.bias.fill_(-100.0)
    d = verdicts(net)
    assert "dead_units" in d and d.verdict == "vanishing"  # nothing flows below a dead layer
    dead = next(v for v in d.verdicts if v.kind == "dead_units")
    assert dead.layer == "blocks.2.act" and dead.data["dead_fraction"]["blocks.2.act"] == 1.0


class SeqClassifier(nn.Module):
    def __init__(self, rnn, hidden=32, classes=4):
        super().__init__()
        self.rnn, self.head = rnn, nn.Linear(hidden, classes)

    def forward(self, x):  # x: (T, B, C)
        out, _ = self.rnn(x)
        return self.head(out[-1])  # (B, classes): loss at the last step


def test_vanilla_rnn_on_a_long_sequence_vanishes_in_time():
    torch.manual_seed(0)
    net = SeqClassifier(nn.RNN(6, 32))
    x, y = torch.randn(300, 16, 6), torch.randint(0, 4, (16,))
    d = gradprobe.diagnose(net, x, F.cross_entropy, target=y, temporal=True)
    assert d.verdict == "vanishing_in_time" and d.primary.layer == "rnn.l0"
    assert d.primary.data["horizon"] < 150


def test_rnn_with_recurrent_weight_scaled_by_three_explodes_in_time():
    # ReLU units: a tanh RNN scaled x3 saturates, which bounds the growth (measured 8.7x over 100 steps:
    # Pascanu's lambda_1 > 1/gamma is necessary for explosion, not sufficient)
    torch.manual_seed(0)
    rnn = nn.RNN(6, 32, nonlinearity="relu")
    with torch.no_grad():
        rnn.weight_hh_l0.mul_(3.0)
    net = SeqClassifier(rnn)
    x, y = torch.randn(100, 16, 6), torch.randint(0, 4, (16,))
    d = gradprobe.diagnose(net, x, F.cross_entropy, target=y, temporal=True)
    assert d.verdict == "exploding_in_time" and d.primary.data["growth"] > 1e6


def test_converged_small_model_is_converged_not_vanishing():
    torch.manual_seed(0)
    x = torch.randn(64, 5, dtype=torch.float64)
    y = x @ torch.randn(5, 1, dtype=torch.float64)
    net = nn.Sequential(nn.Linear(5, 8), nn.Linear(8, 1)).double()
    opt = torch.optim.LBFGS(net.parameters(), max_iter=500, tolerance_grad=1e-14, tolerance_change=1e-16)

    def closure():
        opt.zero_grad()
        loss = F.mse_loss(net(x), y)
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    d = gradprobe.diagnose(net, x, F.mse_loss, target=y, curvature=True, loss_floor=0.0)
    assert d.verdict == "converged" and d.ok and "vanishing" not in d


def test_saddle_is_named():
    class Saddle(nn.Module):  # f(w) = w0² − w1² at the origin, as two one-parameter layers
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False)
            with torch.no_grad():
                self.a.weight.zero_(), self.b.weight.zero_()

        def forward(self, x):
            return self.a(x) ** 2 - self.b(x) ** 2

    d = gradprobe.diagnose(Saddle().double(), torch.ones(1, 1, dtype=torch.float64), lambda y: y.sum(), curvature=True)
    assert d.verdict == "saddle"


def test_deep_sigmoid_mlp_small_gradient_is_not_an_optimum():
    net = DeepMLP(32, 10, width=64, depth=10, activation="sigmoid", init="standard",
                  generator=torch.Generator().manual_seed(0))
    d = verdicts(net, curvature=True)
    assert d.verdict == "vanishing"
    assert any("not an optimum" in e for e in d.evidence)


def test_healthy_baselines():
    res = DeepMLP(32, 10, width=64, depth=12, activation="relu", init="he", residual=True, residual_scale=12**-0.5,
                  generator=torch.Generator().manual_seed(0))
    assert verdicts(res).verdict == "healthy"
    # an LSTM whose forget gates start open (bias 3) carries the gradient across 40 steps; with
    # PyTorch's default init (forget bias 0, gate ≈ 0.5) the same LSTM loses it within ~5 steps
    # (seed 002: "even in an LSTM the gradients do tend to vanish")
    x, y = torch.randn(40, 16, 6, generator=torch.Generator().manual_seed(1)), torch.randint(0, 4, (16,))
    verdict = {}
    for forget_bias in (0.0, 3.0):
        torch.manual_seed(0)
        lstm = nn.LSTM(6, 32)
        with torch.no_grad():
            lstm.bias_hh_l0[32:64].fill_(forget_bias)  # gate order i, f, g, o
        d = gradprobe.diagnose(SeqClassifier(lstm), x, F.cross_entropy, target=y, temporal=True)
        verdict[forget_bias] = d.verdict
    assert verdict == {0.0: "vanishing_in_time", 3.0: "healthy"}
