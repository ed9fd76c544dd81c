"""Architecture transforms: the structure changes as claimed, numbers are preserved where they must be,
and (swap + He) removes the deep-MLP vanishing verdict."""
import pytest
import torch
from torch import nn

import gradprobe
from gradprobe.errors import ConfigError
from gradprobe.remedies import (
    Leaky,
    LSTMAsRNN,
    Residual,
    add_residual,
    initialize_,
    insert_normalization,
    swap_activations,
    to_gated,
    to_leaky,
)


def deep_sigmoid(depth=12, width=32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(*[m for _ in range(depth) for m in (nn.Linear(width, width), nn.Sigmoid())], nn.Linear(width, 1))


def _types(model):
    return [type(m).__name__ for m in model.modules()]


def test_swap_activations_copy_and_inplace():
    net = deep_sigmoid(depth=3)
    out = swap_activations(net, new=lambda: nn.LeakyReLU(0.1))
    assert _types(out).count("LeakyReLU") == 3 and "Sigmoid" not in _types(out)
    assert _types(net).count("Sigmoid") == 3  # input untouched
    torch.testing.assert_close(out[0].weight, net[0].weight)  # weights copied, not re-drawn
    assert out[0].weight is not net[0].weight
    same = swap_activations(net, inplace=True)
    assert same is net and "Sigmoid" not in _types(net)
    with pytest.raises(ConfigError):
        swap_activations(net)  # nothing left to swap


def test_swap_and_he_cures_vanishing():
    """Issue 5 §2: the deep sigmoid MLP is diagnosed 'vanishing'; after swap + He it is not."""
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
    loss = lambda y: y.pow(2).mean()  # noqa: E731
    sick = deep_sigmoid()
    before = gradprobe.diagnose(sick, x, loss)
    assert before.verdict == "vanishing"  # measured: first/last signal ratio 2.4e-11 before, 1.04 after
    cured = initialize_(swap_activations(sick), "he", generator=torch.Generator().manual_seed(2))
    after = gradprobe.diagnose(cured, x, loss)
    assert "vanishing" not in after.kinds and "exploding" not in after.kinds, str(after)
    # the sick model itself was not changed by the transform
    assert gradprobe.diagnose(sick, x, loss).verdict == "vanishing"


def test_insert_normalization_structure_and_forward():
    net = deep_sigmoid(depth=3).double()
    bn = insert_normalization(net, "batch")
    kinds = [type(m).__name__ for m in bn]
    assert kinds == ["Linear", "BatchNorm1d", "Sigmoid"] * 3 + ["Linear"]  # output layer skipped
    assert bn[1].weight.dtype == torch.float64
    ln = insert_normalization(net, "layer", skip_last=False)
    assert [type(m).__name__ for m in ln][-2:] == ["Linear", "LayerNorm"]
    # LayerNorm at init (γ=1, β=0) standardises each row: check against the formula
    x = torch.randn(5, 32, dtype=torch.float64)
    z = ln[0](x)
    ref = (z - z.mean(-1, keepdim=True)) / torch.sqrt(z.var(-1, unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(ln[1](z), ref, rtol=1e-12, atol=1e-12)
    conv = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    assert [type(m).__name__ for m in insert_normalization(conv, "batch")] == ["Conv2d", "BatchNorm2d", "ReLU", "Conv2d"]
    assert type(insert_normalization(conv, "layer")[1]).__name__ == "GroupNorm"
    with pytest.raises(ConfigError, match="skip_last"):
        insert_normalization(nn.Sequential(nn.Linear(3, 3)))
    with pytest.raises(ConfigError):
        insert_normalization(net, "group")


def test_add_residual_structure_and_equation():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.LayerNorm(8),
                        nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 2)).double()
    res = add_residual(net, scale=0.5)
    assert [type(m).__name__ for m in res] == ["Linear", "ReLU", "Residual", "Residual", "Linear", "Linear"]
    assert isinstance(res[2], Residual) and res[2].scale == 0.5
    assert [type(m).__name__ for m in res[3].branch] == ["Linear", "LayerNorm", "ReLU"]
    x = torch.randn(4, 8, dtype=torch.float64)
    # x + s·f(x) with f the original modules (same weights)
    f = lambda h: net[6](net[5](net[4](h)))  # noqa: E731
    torch.testing.assert_close(res[3](x), x + 0.5 * f(x), rtol=1e-14, atol=1e-14)
    auto = add_residual(net, scale=None)
    assert auto[2].scale == pytest.approx(2**-0.5)
    with pytest.raises(ConfigError):
        add_residual(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)))


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.RNN(3, 16, batch_first=True)
        self.fc = nn.Linear(16, 2)

    def forward(self, x):
        out, h = self.rnn(x)
        return self.fc(h[-1])


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_to_gated(cell):
    model = Classifier().double()
    gated = to_gated(model, cell)
    rnn = gated.rnn if cell == "gru" else gated.rnn.lstm
    assert type(rnn) is (nn.GRU if cell == "gru" else nn.LSTM)
    assert (rnn.input_size, rnn.hidden_size, rnn.batch_first, rnn.num_layers) == (3, 16, True, 1)
    assert rnn.weight_hh_l0.dtype == torch.float64
    assert gated(torch.randn(4, 9, 3, dtype=torch.float64)).shape == (4, 2)  # forward still works
    assert type(model.rnn) is nn.RNN  # original untouched
    if cell == "lstm":
        assert isinstance(gated.rnn, LSTMAsRNN)
        b = rnn.bias_ih_l0 + rnn.bias_hh_l0
        assert torch.all(b[16:32] == 1.0)  # forget gate bias
        bare = to_gated(model, "lstm", keep_interface=False)
        assert type(bare.rnn) is nn.LSTM
    with pytest.raises(ConfigError):
        to_gated(nn.Sequential(nn.Linear(2, 2)), cell)
    with pytest.raises(ConfigError):
        to_gated(model, "transformer")


def test_leaky_rnn_equations():
    torch.manual_seed(0)
    rnn = nn.RNN(3, 6, batch_first=True).double()
    x = torch.randn(2, 10, 3, dtype=torch.float64)
    h0 = torch.randn(1, 2, 6, dtype=torch.float64)
    same = to_leaky(nn.Sequential(rnn), alpha=1.0)[0]
    assert isinstance(same, Leaky) and same.rnn.weight_hh_l0 is not rnn.weight_hh_l0  # a copy by default
    ref_out, ref_h = rnn(x, h0)
    out, h = same(x, h0)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)  # α = 1 is nn.RNN
    torch.testing.assert_close(h, ref_h, rtol=1e-12, atol=1e-12)
    leaky = to_leaky(rnn, alpha=0.3)
    out, h = leaky(x, h0)
    W_ih, W_hh, b = rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0 + rnn.bias_hh_l0
    s = h0[0]
    for t in range(10):  # the defining equation, written out
        s = 0.7 * s + 0.3 * torch.tanh(x[:, t] @ W_ih.T + s @ W_hh.T + b)
        torch.testing.assert_close(out[:, t], s, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h[0], s)
    u_out, u_h = leaky(x[0])  # unbatched (T, I): with batch_first the module still takes (T, I)
    assert u_out.shape == (10, 6) and u_h.shape == (1, 6)
    with pytest.raises(ConfigError):
        Leaky(nn.RNN(3, 4), alpha=0.0)
    with pytest.raises(ConfigError):
        to_leaky(nn.RNN(3, 4, num_layers=2))


def test_leaky_units_slow_the_temporal_decay():
    """∂h_T/∂h_0 through (1−α)I + α·diag(φ')W decays slower than through diag(φ')W (contractive W)."""
    torch.manual_seed(0)
    rnn = nn.RNN(4, 32).double()
    with torch.no_grad():
        rnn.weight_hh_l0.mul_(0.5)
    x = torch.randn(40, 1, 4, dtype=torch.float64)

    def sensitivity(module):
        h0 = torch.zeros(1, 1, 32, dtype=torch.float64, requires_grad=True)
        _, h = module(x, h0)
        (g,) = torch.autograd.grad(h.sum(), h0)
        return float(g.norm())

    assert sensitivity(to_leaky(rnn, 0.2)) > 1e3 * sensitivity(rnn)
