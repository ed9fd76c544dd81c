"""One LeakyRNN (the old remedies name warns and maps its arguments), to_leaky keeps the nn.RNN's own
parameters, and add_residual works on gradprobe's own DeepMLP: the transformed net computes the
residual equation (checked against a hand-written float64 forward with autograd) and its gradient no
longer vanishes with depth."""
import warnings

import pytest
import torch
from torch import nn

from gradprobe.errors import ConfigError
from gradprobe.models import DeepMLP
from gradprobe.models import LeakyRNN as ModelLeakyRNN
from gradprobe.remedies import Leaky, Residual, add_residual, to_gated, to_leaky
from gradprobe.remedies import LeakyRNN as OldLeakyRNN

F64 = torch.float64


def test_old_remedies_leaky_rnn_warns_and_maps_its_arguments():
    torch.manual_seed(0)
    with pytest.warns(DeprecationWarning, match="gradprobe.models.LeakyRNN"):
        old = OldLeakyRNN(3, 5, alpha=0.3, nonlinearity="relu", bias=False, batch_first=True, dtype=F64)
    assert isinstance(old, Leaky) and old.alpha == 0.3 and old.batch_first
    assert old.rnn.nonlinearity == "relu" and not old.rnn.bias and old.rnn.weight_hh_l0.dtype == F64
    x = torch.randn(2, 6, 3, dtype=F64)  # batch-first
    out, h = old(x)
    s = torch.zeros(2, 5, dtype=F64)
    for t in range(6):  # the defining equation, with the mapped arguments
        s = 0.7 * s + 0.3 * torch.relu(x[:, t] @ old.rnn.weight_ih_l0.T + s @ old.rnn.weight_hh_l0.T)
        torch.testing.assert_close(out[:, t], s, rtol=1e-12, atol=1e-14)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ModelLeakyRNN(3, 5, leak=0.3)  # the one LeakyRNN does not warn
        Leaky(nn.RNN(3, 5), 0.3)


def test_to_leaky_inplace_keeps_the_parameters_and_is_not_applied_twice():
    rnn = nn.RNN(3, 4)
    net = nn.Sequential(rnn)
    params = list(net.parameters())
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    leaky = to_leaky(net, 0.5, inplace=True)
    assert leaky is net and isinstance(net[0], Leaky) and net[0].rnn is rnn
    assert [id(p) for p in leaky.parameters()] == [id(p) for p in params]  # the optimiser still holds them
    out, _ = leaky(torch.randn(5, 2, 3))
    out.sum().backward()
    before = rnn.weight_hh_l0.detach().clone()
    opt.step()
    assert not torch.equal(before, rnn.weight_hh_l0)
    with pytest.raises(ConfigError, match="no nn.RNN"):
        to_leaky(net, 0.5)  # the only nn.RNN is already leaky
    with pytest.raises(ConfigError, match="no nn.RNN"):
        to_gated(net)  # and swapping the cell under the wrapper would break it
    with pytest.raises(ConfigError, match="alpha"):
        to_leaky(nn.RNN(3, 4), alpha=1.5)


def _block_grad_norms(net):
    return [float(torch.cat([p.grad.flatten() for p in b.parameters()]).norm()) for b in net.blocks]


@pytest.mark.parametrize("activation", ["sigmoid", "tanh"])
def test_add_residual_on_deep_mlp_restores_gradient_flow(activation):
    torch.manual_seed(0)
    depth, width = 24, 16
    # the "commonly used heuristic" init of Glorot & Bengio 2010, under which sigmoid and tanh nets vanish
    net = DeepMLP(8, 3, width=width, depth=depth, activation=activation, init="standard").double()
    x, y = torch.randn(32, 8, dtype=F64), torch.randn(32, 3, dtype=F64)

    def loss_of(model):
        model.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        return loss

    loss_of(net)
    plain = _block_grad_norms(net)
    res = add_residual(net, scale=None)  # s = 1/√depth
    assert res is not net and all(isinstance(b[0], Residual) for b in res.blocks)
    assert [type(m).__name__ for m in res.blocks[0][0].branch] == ["Linear", "Identity", type(net.blocks[0].act).__name__]
    s = depth**-0.5
    assert res.blocks[0][0].scale == pytest.approx(s)
    loss = loss_of(res)
    flow = _block_grad_norms(res)

    # brute force: the residual equation written out with the same parameters, autograd in float64
    act = torch.sigmoid if activation == "sigmoid" else torch.tanh
    W = [(lin.weight.detach().clone().requires_grad_(True), lin.bias.detach().clone().requires_grad_(True))
         for lin in res.linears]
    h = act(x @ W[0][0].T + W[0][1])
    for Wl, bl in W[1:-1]:
        h = h + s * act(h @ Wl.T + bl)  # x + s·φ(W x + b), every block
    ref = (h @ W[-1][0].T + W[-1][1] - y).pow(2).mean()
    ref.backward()
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-13)
    for lin, (Wl, bl) in zip(res.linears, W):
        torch.testing.assert_close(lin.weight.grad, Wl.grad, rtol=1e-11, atol=1e-15)
        torch.testing.assert_close(lin.bias.grad, bl.grad, rtol=1e-11, atol=1e-15)

    # the flow: first block / last block gradient ratio, before and after
    ratio_plain, ratio_res = plain[0] / plain[-1], flow[0] / flow[-1]
    # measured: sigmoid 2e-20 → 0.27, tanh 3e-6 → 1.1 (first block's ‖∂L/∂θ‖ over the last block's)
    assert ratio_plain < 1e-4, ratio_plain  # vanishing before
    assert ratio_res > 0.1, ratio_res  # the identity path carries the gradient down
    # the original model is untouched (a copy by default) and keeps its plain blocks
    assert all(isinstance(b, nn.Sequential) and isinstance(b.linear, nn.Linear) for b in net.blocks)


def test_add_residual_on_deep_mlp_inplace_and_on_an_already_residual_one():
    net = DeepMLP(4, 2, width=8, depth=3)
    same = add_residual(net, scale=0.5, inplace=True)
    assert same is net and all(isinstance(b[0], Residual) and b[0].scale == 0.5 for b in net.blocks)
    assert len(net.linears) == 5 and net(torch.randn(2, 4)).shape == (2, 2)
    with pytest.raises(ConfigError, match="no \\[Linear\\(d, d\\), activation\\] run"):
        add_residual(DeepMLP(4, 2, width=8, depth=3, residual=True))


def test_insert_normalization_and_swap_activations_reach_inside_deep_mlp():
    from gradprobe.remedies import insert_normalization, swap_activations

    net = DeepMLP(4, 2, width=8, depth=3, activation="sigmoid")
    normed = insert_normalization(net, "layer")
    assert all([type(m).__name__ for m in b] == ["Linear", "LayerNorm", "Identity", "Sigmoid"] for b in normed.blocks)
    relu = swap_activations(net)
    assert all(isinstance(b.act, nn.ReLU) for b in relu.blocks)
    assert normed(torch.randn(3, 4)).shape == relu(torch.randn(3, 4)).shape == (3, 2)
