"""SigmoidRNN (Pascanu, Mikolov & Bengio 2013 and their inits) and the task recurrent models, against NumPy
loops of the published equations, float64 autograd and dense linear algebra."""
import numpy as np
import pytest
import torch
from torch.func import jacrev

from gradprobe.errors import ConfigError
from gradprobe.models.rnn import (
    CELLS,
    EchoStateReservoir,
    LeakyRNN,
    RecurrentClassifier,
    RecurrentNet,
    RecurrentRegressor,
    SigmoidRNN,
    pascanu_weights,
    spectral_radius,
)
from gradprobe.probe.layers import find_layers

F64 = torch.float64


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---- Pascanu's inits -------------------------------------------------------------------------
@pytest.mark.parametrize("init,std", [("sigmoid", 0.01), ("basic_tanh", 0.1)])
def test_dense_inits_have_the_published_std_and_zero_biases(init, std):
    # 50 hidden units (Pascanu): W_rec has 2500 N(0, std²) entries, so the sample std has relative
    # standard error 1/√5000 ≈ 1.4%; 6% is > 4 standard errors.
    ws = pascanu_weights(6, 50, 4, init, generator=gen(1), dtype=F64)
    for name in ("W_in", "W_rec", "W_out"):
        assert float(ws[name].std()) == pytest.approx(std, rel=0.06 if name == "W_rec" else 0.25)
        assert abs(float(ws[name].mean())) < 4 * std / ws[name].numel() ** 0.5
    assert not ws["b"].any() and not ws["b_out"].any()


def test_smart_tanh_is_sparse_with_15_incoming_weights_and_radius_095():
    net = SigmoidRNN(6, 50, 4, init="smart_tanh", generator=gen(2), dtype=F64)
    w = net.W_rec.detach()
    assert ((w != 0).sum(dim=1) == 15).all()  # 15 incoming (row) weights per unit
    assert spectral_radius(w) == pytest.approx(0.95, rel=1e-12)  # eigvals of the float64 matrix
    assert float(net.input.weight.detach().std()) == pytest.approx(0.01, rel=0.25)  # 300 samples
    assert net.activation == "tanh" and SigmoidRNN(2, 5, 1).activation == "sigmoid"
    small = SigmoidRNN(2, 10, 1, init="smart_tanh", generator=gen(3), dtype=F64)  # fewer than 15 units: dense
    assert (small.W_rec != 0).all() and spectral_radius(small.W_rec) == pytest.approx(0.95, rel=1e-12)


def test_smart_tanh_code_layout_keeps_15_outgoing_weights_as_the_authors_rnn_py():
    """The authors' RNN.py computes h_t = tanh(h_{t−1}·W_hh + …) (row vectors) and zeroes all but 15
    entries of each *row of W_hh*: in our column form W_rec = W_hhᵀ, so each column of W_rec (a unit's
    outgoing weights) keeps 15. The paper's layout keeps 15 per row (incoming): the transposed pattern."""
    code = SigmoidRNN(6, 50, 4, init="smart_tanh", layout="code", generator=gen(2), dtype=F64).W_rec.detach()
    paper = SigmoidRNN(6, 50, 4, init="smart_tanh", generator=gen(2), dtype=F64).W_rec.detach()
    W_hh = code.T  # the authors' matrix
    assert ((W_hh != 0).sum(dim=1) == 15).all()  # their W_hh[dx][perm[15:]] = 0 for every unit dx
    assert not ((code != 0).sum(dim=1) == 15).all()  # incoming counts vary in the code's layout
    assert torch.equal(code != 0, (paper != 0).T)  # same draws: transposed sparsity patterns
    assert spectral_radius(code) == pytest.approx(0.95, rel=1e-12)
    # the recurrence in the authors' row-vector form equals SigmoidRNN's (h_t = σ(x_t))
    net = SigmoidRNN(3, 50, 2, init="smart_tanh", layout="code", generator=gen(4), dtype=F64)
    u = torch.randn(12, 2, 3, generator=gen(5), dtype=F64)
    _, x = net(u)
    W_uh, b = net.input.weight.detach().T, net.input.bias.detach()
    h = torch.zeros(2, 50, dtype=F64)
    for t in range(12):
        h = torch.tanh(h @ net.W_rec.detach().T + u[t] @ W_uh + b)
    torch.testing.assert_close(torch.tanh(x[-1]).detach(), h, rtol=1e-12, atol=1e-14)
    with pytest.raises(ConfigError, match="layout='rows'.*'paper'.*'code'"):
        pascanu_weights(2, 20, 1, "smart_tanh", layout="rows")


# ---- SigmoidRNN forward and Jacobians ----------------------------------------------------------
def numpy_pascanu(net, u, act):
    # Pascanu's own form: h_t = σ(W_rec h_{t−1} + W_in u_t + b), h_0 = 0, y_t = W_out h_t + b_out.
    W_in, b = net.input.weight.detach().numpy(), net.input.bias.detach().numpy()
    W_rec = net.W_rec.detach().numpy()
    W_out, b_out = net.output.weight.detach().numpy(), net.output.bias.detach().numpy()
    h = np.zeros((u.shape[1], W_rec.shape[0]))
    ys = []
    for t in range(u.shape[0]):
        h = act(h @ W_rec.T + u[t] @ W_in.T + b)
        ys.append(h @ W_out.T + b_out)
    return np.stack(ys)


@pytest.mark.parametrize("init", ["sigmoid", "basic_tanh", "smart_tanh"])
def test_forward_equals_pascanus_h_form(init):
    net = SigmoidRNN(3, 12, 2, init=init, generator=gen(4), dtype=F64)
    with torch.no_grad():  # larger weights than the init so the test exercises the nonlinearity
        net.recurrent.weight.mul_(50.0)
        net.input.bias.normal_(generator=gen(5))
    u = torch.randn(15, 4, 3, generator=gen(6), dtype=F64)
    y, x = net(u)
    act = (lambda z: 1 / (1 + np.exp(-z))) if init == "sigmoid" else np.tanh
    np.testing.assert_allclose(y.detach().numpy(), numpy_pascanu(net, u.numpy(), act), rtol=1e-12, atol=1e-14)
    assert x.shape == (15, 4, 12)


@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu"])
def test_step_jacobian_matches_autograd(activation):
    net = SigmoidRNN(3, 8, 2, init="basic_tanh", activation=activation, generator=gen(7), dtype=F64)
    with torch.no_grad():
        net.recurrent.weight.mul_(10.0)
    x_prev = torch.randn(5, 8, generator=gen(8), dtype=F64)
    u_t = torch.randn(5, 3, generator=gen(9), dtype=F64)

    def step(xp, ut):  # one example: x_t = W_rec σ(x_{t−1}) + W_in u_t + b
        return net.recurrent(net.act(xp)) + net.input(ut)

    auto = torch.stack([jacrev(step)(x_prev[i], u_t[i]) for i in range(5)])
    torch.testing.assert_close(net.jacobian(x_prev), auto.detach(), rtol=1e-12, atol=1e-15)


def test_jacobian_product_matches_autograd_through_time():
    # ∂x_t/∂x_k (seed 003 eq. 7) vs autograd of x_t w.r.t. x_k, re-running the recurrence from x_k.
    net = SigmoidRNN(2, 6, 1, init="basic_tanh", generator=gen(10), dtype=F64)
    with torch.no_grad():
        net.recurrent.weight.mul_(12.0)
    u = torch.randn(9, 1, 2, generator=gen(11), dtype=F64)
    _, x = net(u)
    t, k = 9, 3

    def run_from(xk):  # x_{k+1} … x_t from x_k (1-based)
        for i in range(k + 1, t + 1):
            xk = net.recurrent(net.act(xk)) + net.input(u[i - 1, 0])
        return xk

    auto = jacrev(run_from)(x[k - 1, 0].detach())
    torch.testing.assert_close(net.jacobian_product(x.detach(), t, k)[0], auto.detach(), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(net.jacobian_product(x.detach(), 4, 4)[0], torch.eye(6, dtype=F64))
    with pytest.raises(ConfigError):
        net.jacobian_product(x, 3, 4)


def test_jacobian_norms_equal_products_and_the_orthogonal_closed_form():
    # Linear units with W_rec = c·Q (Q orthogonal): ∂x_T/∂x_{T−s} = (cQ)^s, whose spectral norm is c^s.
    net = SigmoidRNN(2, 6, 1, activation="linear", generator=gen(30), dtype=F64)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen(31), dtype=F64))
    with torch.no_grad():
        net.recurrent.weight.copy_(0.8 * q)
    _, x = net(torch.randn(12, 3, 2, generator=gen(32), dtype=F64))
    norms = net.jacobian_norms(x.detach())
    assert norms.shape == (12, 3)
    expected = 0.8 ** torch.arange(12, dtype=F64)
    torch.testing.assert_close(norms, expected[:, None].expand(12, 3), rtol=1e-12, atol=0)
    # tanh, against the explicit product of eq. 7 (same matrices, different association: 1e-12).
    net = SigmoidRNN(2, 6, 1, init="basic_tanh", generator=gen(33), dtype=F64)
    with torch.no_grad():
        net.recurrent.weight.mul_(15.0)
    _, x = net(torch.randn(10, 2, 2, generator=gen(34), dtype=F64))
    norms = net.jacobian_norms(x.detach())
    for s in (1, 4, 9):
        direct = torch.linalg.matrix_norm(net.jacobian_product(x.detach(), 10, 10 - s), ord=2)
        torch.testing.assert_close(norms[s], direct, rtol=1e-12, atol=1e-300)


def test_sigmoid_init_gradient_vanishes_through_time():
    # Pascanu's "sigmoid" init: ‖W_rec‖ ≈ 0.01·(2√50) ≈ 0.14 and σ′ ≤ 1/4, so each step shrinks the
    # Jacobian product by at least ~0.035: after 10 steps its norm is below 0.04^10.
    net = SigmoidRNN(2, 50, 1, init="sigmoid", generator=gen(12), dtype=F64)
    _, x = net(torch.randn(11, 2, 2, generator=gen(13), dtype=F64))
    bound = (torch.linalg.matrix_norm(net.W_rec.detach(), ord=2) / 4) ** 10
    got = torch.linalg.matrix_norm(net.jacobian_product(x.detach(), 11, 1), ord=2)
    assert (got <= bound * (1 + 1e-12)).all() and float(bound) < 0.04**10


def test_three_layers_visible_to_a_probe_and_bad_input():
    net = SigmoidRNN(2, 5, 1)
    assert [layer.name for layer in find_layers(net)] == ["input", "recurrent", "output"]
    with pytest.raises(ConfigError, match="time-major"):
        net(torch.randn(4, 2))
    with pytest.raises(ConfigError):
        SigmoidRNN(2, 5, 1, init="xavier")


# ---- task models -----------------------------------------------------------------------------
@pytest.mark.parametrize("cell", CELLS)
def test_shapes_readouts_and_batch_first(cell):
    torch.manual_seed(0)
    net = RecurrentNet(3, 7, 2, cell=cell, readout="all", dtype=F64)
    u = torch.randn(11, 4, 3, dtype=F64)
    y_all = net(u)
    assert y_all.shape == (11, 4, 2)
    net.readout_mode = "last"
    torch.testing.assert_close(net(u), y_all[-1], rtol=0, atol=0)
    net.batch_first, net.readout_mode = True, "all"
    torch.testing.assert_close(net(u.transpose(0, 1)), y_all.transpose(0, 1), rtol=1e-15, atol=1e-15)


def test_vanilla_tanh_matches_the_textbook_recurrence():
    net = RecurrentNet(3, 5, 1, cell="tanh", dtype=F64)
    u = torch.randn(8, 2, 3, generator=gen(14), dtype=F64)
    c = net.core
    h = torch.zeros(2, 5, dtype=F64)
    for t in range(8):
        h = torch.tanh(u[t] @ c.weight_ih_l0.T + c.bias_ih_l0 + h @ c.weight_hh_l0.T + c.bias_hh_l0)
    torch.testing.assert_close(net.states(u)[-1], h, rtol=1e-12, atol=1e-14)


def test_irnn_is_identity_initialised_and_remembers_exactly():
    net = RecurrentNet(2, 6, 1, cell="irnn", generator=gen(15), dtype=F64)
    c = net.core
    assert torch.equal(c.weight_hh_l0, torch.eye(6, dtype=F64)) and not c.bias_ih_l0.any() and not c.bias_hh_l0.any()
    assert float(c.weight_ih_l0.detach().std()) < 5e-3  # N(0, 0.001²) (Le et al. 2015)
    # One input at t = 1, zeros after: h_t = relu(h_{t−1}) = h_1 for every t, exactly (W_hh = I, b = 0).
    u = torch.zeros(30, 3, 2, dtype=F64)
    u[0] = torch.randn(3, 2, generator=gen(16), dtype=F64)
    h = net.states(u)
    assert torch.equal(h[-1], h[0]) and (h[0] >= 0).all()


def test_leaky_with_leak_one_is_the_vanilla_rnn():
    leaky = LeakyRNN(3, 5, leak=1.0, dtype=F64)
    ref = torch.nn.RNN(3, 5, dtype=F64)
    with torch.no_grad():
        ref.weight_ih_l0.copy_(leaky.input.weight)
        ref.bias_ih_l0.copy_(leaky.input.bias)
        ref.weight_hh_l0.copy_(leaky.recurrent.weight)
        ref.bias_hh_l0.zero_()
    u = torch.randn(10, 2, 3, generator=gen(17), dtype=F64)
    torch.testing.assert_close(leaky(u), ref(u)[0], rtol=1e-12, atol=1e-14)


def test_leaky_recurrence_and_jacobian():
    net = LeakyRNN(3, 5, leak=0.2, dtype=F64)
    u = torch.randn(6, 2, 3, generator=gen(18), dtype=F64)
    W, Win, b = (p.detach().numpy() for p in (net.recurrent.weight, net.input.weight, net.input.bias))
    x = np.zeros((2, 5))
    for t in range(6):
        x = 0.8 * x + 0.2 * np.tanh(x @ W.T + u[t].numpy() @ Win.T + b)
    np.testing.assert_allclose(net(u)[-1].detach().numpy(), x, rtol=1e-12, atol=1e-14)
    x_prev = torch.randn(2, 5, generator=gen(19), dtype=F64)

    def step(xp, ut):
        return 0.8 * xp + 0.2 * torch.tanh(net.recurrent(xp) + net.input(ut))

    auto = torch.stack([jacrev(step)(x_prev[i], u[0, i]) for i in range(2)])
    torch.testing.assert_close(net.jacobian(x_prev, u[0]), auto.detach(), rtol=1e-12, atol=1e-15)
    with pytest.raises(ConfigError):
        LeakyRNN(3, 5, leak=0.0)
    with pytest.raises(ConfigError, match="time-major"):
        net(torch.randn(6, 3))
    with pytest.raises(ConfigError):
        LeakyRNN(0, 5)


def test_esn_reservoir_is_fixed_and_scaled_and_only_the_readout_trains():
    net = RecurrentRegressor(1, 100, cell="esn", radius=0.9, density=0.1, generator=gen(20), dtype=F64)
    res = net.core
    assert isinstance(res, EchoStateReservoir)
    assert spectral_radius(res.recurrent.weight) == pytest.approx(0.9, rel=1e-12)
    assert [n for n, p in net.named_parameters() if p.requires_grad] == ["readout.weight", "readout.bias"]
    # At the zero state with no input the Jacobian is W_rec itself (tanh′(0) = 1, leak 1).
    J = res.jacobian(torch.zeros(1, 100, dtype=F64), torch.zeros(1, 1, dtype=F64))[0]
    torch.testing.assert_close(J, res.recurrent.weight, rtol=0, atol=0)


def test_sparse_small_reservoirs_are_never_nilpotent():
    # Regression: 16 units at density 0.1 drew an all-zero-spectrum matrix for some seeds (a doctest
    # failed in the full suite); the reservoir now redraws, and always has the requested radius.
    for seed in range(200):
        res = EchoStateReservoir(2, 16, radius=0.9, density=0.1, generator=gen(seed), dtype=F64)
        assert spectral_radius(res.recurrent.weight) == pytest.approx(0.9, rel=1e-9)
    with pytest.raises(ConfigError, match="raise the density"):
        EchoStateReservoir(2, 3, density=1e-9, generator=gen(0))


def test_fit_readout_equals_dense_ridge_and_solves_a_delay_task():
    # Task: y_t = u_{t−3} (a 3-step memory), readout at every step after a washout of 20.
    torch.manual_seed(0)
    net = RecurrentNet(1, 80, 1, cell="esn", readout="all", radius=0.9, density=0.2, generator=gen(21), dtype=F64)
    u = torch.rand(200, 4, 1, generator=gen(22), dtype=F64) - 0.5
    y = torch.zeros_like(u)
    y[3:] = u[:-3]
    mse = net.fit_readout(u, y, ridge=1e-8, washout=20)
    # Oracle: ridge via an augmented least-squares problem (NumPy lstsq), bias as an extra column.
    H = net.states(u)[20:].reshape(-1, 80).numpy()
    Y = y[20:].reshape(-1, 1).numpy()
    Hc = H - H.mean(0)  # centred features + a constant column: the ridge penalises W, not the bias
    Xa = np.vstack([np.hstack([Hc, np.ones((H.shape[0], 1))]), np.hstack([np.sqrt(1e-8) * np.eye(80), np.zeros((80, 1))])])
    Ya = np.vstack([Y, np.zeros((80, 1))])
    coef = np.linalg.lstsq(Xa, Ya, rcond=None)[0]
    W_ref, b_ref = coef[:80, 0], coef[80, 0] - H.mean(0) @ coef[:80, 0]
    # normal equations (solve) vs QR least squares on an ill-conditioned state matrix: agree to ~cond·eps, 1e-6
    np.testing.assert_allclose(net.readout.weight.detach().numpy()[0], W_ref, rtol=1e-6, atol=1e-6 * np.abs(W_ref).max())
    assert float(net.readout.bias.detach()) == pytest.approx(b_ref, abs=1e-6)
    assert float(mse) < 1e-2 * float(y[20:].var())  # R² > 0.99: the reservoir remembers 3 steps back


def test_lstm_forget_bias_and_classifier_predict():
    net = RecurrentClassifier(6, 8, 4, cell="lstm", forget_bias=1.0)
    for name in ("bias_ih_l0", "bias_hh_l0"):
        b = getattr(net.core, name)
        assert torch.equal(b[8:16], torch.full((8,), 0.5))
    assert net.predict(torch.randn(5, 3, 6)).shape == (3,)
    assert RecurrentRegressor(2, 4)(torch.randn(5, 3, 2)).shape == (3, 1)


@pytest.mark.parametrize("bad", [dict(cell="transformer"), dict(readout="mean"), dict(cell="leaky", num_layers=2),
                                 dict(cell="gru", forget_bias=1.0), dict(cell="lstm", leak=0.3)])
def test_bad_config(bad):
    with pytest.raises(ConfigError):
        RecurrentNet(2, 4, 1, **bad)
    with pytest.raises(ConfigError):
        RecurrentNet(2, 4, 1)(torch.randn(5, 2))
