"""Jacobian spectra against dense ``torch.func.jacrev`` + ``torch.linalg.svdvals`` in float64."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from gradprobe.analysis.spectra import between_layers, isometry_summary, jacobian_spectrum
from gradprobe.errors import ConfigError
from gradprobe.functional.init import init_weight_
from gradprobe.models import DeepMLP


@pytest.fixture(autouse=True)
def _one_thread():
    """Small products run fastest (and time reproducibly on a shared machine) on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _net(activation, init, *, in_f=6, out=5, width=8, depth=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return DeepMLP(in_f, out, width=width, depth=depth, activation=activation, init=init, generator=g).double()


def _dense_svals(fn, x):
    """Per-example singular values from the dense Jacobian (the slow, obviously correct twin)."""
    out = []
    for b in range(x.shape[0]):
        J = torch.func.jacrev(lambda z: fn(z.unsqueeze(0)).squeeze(0))(x[b])  # (n_out, n_in)
        out.append(torch.linalg.svdvals(J.detach().reshape(J.shape[0], -1)))
    return torch.stack(out).numpy()  # (B, min(n_out, n_in)), descending


# Lanczos in float64 with full reorthogonalization to a 1e-10 residual: the brief's 1e-5 relative
# is a loose bound here (σ² errors are ≤ the residual, and √ halves the relative error).
@pytest.mark.parametrize("block", [1, 3])
@pytest.mark.parametrize(
    "activation,init", [("tanh", "xavier"), ("relu", "he"), ("tanh", "orthogonal"), ("sigmoid", "standard")]
)
def test_top_k_matches_dense_svd(activation, init, block):
    net = _net(activation, init)
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    dense = _dense_svals(net, x)
    spec = jacobian_spectrum(net, x, k=4, tol=1e-10, block=block)
    assert spec.singular_values.shape == (3, 4)
    # Relative 1e-5 on every value that JᵀJ can resolve; a (near-)zero σ (dead ReLUs make J rank
    # deficient) is only known to ~√eps·σ_max because Lanczos sees σ², hence the absolute floor.
    atol = 1e-7 * dense[:, :1]
    assert np.all(np.abs(spec.singular_values - dense[:, :4]) <= 1e-5 * dense[:, :4] + atol)
    assert spec.converged and spec.n_in == 6 and spec.n_out == 5


def test_bottom_k_matches_dense_svd_on_square_jacobian():
    net = _net("tanh", "orthogonal", in_f=7, out=7)
    x = torch.randn(2, 7, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    dense = _dense_svals(net, x)
    spec = jacobian_spectrum(net, x, k=3, which="bottom", tol=1e-12)
    np.testing.assert_allclose(spec.singular_values, dense[:, ::-1][:, :3], rtol=1e-5)


def test_mean_squared_singular_value_by_hutchinson():
    net = _net("tanh", "xavier", in_f=10, out=10, width=16)
    x = torch.randn(2, 10, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    dense = _dense_svals(net, x)
    exact = (dense**2).sum(1) / 10  # tr(JᵀJ)/n_in
    for block in (1, 4):
        spec = jacobian_spectrum(net, x, k=1, n_probes=400, block=block)
        # An unbiased estimator: within 4 standard errors (fails by chance with probability ~6e-5).
        assert np.all(np.abs(spec.mean_sq - exact) < 4 * spec.mean_sq_stderr)
        assert np.all(spec.mean_sq_stderr < 0.1 * exact)  # and the error bar is informative
    assert np.isnan(jacobian_spectrum(net, x, k=1, n_probes=0).mean_sq).all()


@pytest.mark.parametrize("sigma_w", [0.9, 1.0, 1.3])
def test_linear_orthogonal_net_is_a_scaled_isometry(sigma_w):
    # References: orthogonal weights in a linear net ⇒ every singular value is σ_w^L exactly.
    net = _net("linear", "orthogonal", in_f=8, out=8, width=8, depth=4)
    g = torch.Generator().manual_seed(11)
    for m in net.linears:  # orthogonal in float64 (DeepMLP stored them in float32 first)
        init_weight_(m.weight, "orthogonal", gain=sigma_w, generator=g)
    L = len(net.linears)  # 6 matrices
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    spec = jacobian_spectrum(net, x, k=8, tol=1e-12)
    np.testing.assert_allclose(spec.singular_values, np.full((2, 8), sigma_w**L), rtol=1e-12)
    np.testing.assert_allclose(spec.mean_sq, np.full(2, sigma_w ** (2 * L)), rtol=1e-12)  # every probe exact
    summary = isometry_summary(spec, band=1e-9)
    assert summary.is_isometric == (sigma_w == 1.0)
    assert summary.mean_log == pytest.approx(L * np.log(sigma_w), abs=1e-12)


def test_between_two_layers_matches_dense_subnetwork():
    net = _net("tanh", "xavier", width=9, depth=3)
    x = torch.randn(2, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    a, b = net.input_act, net.blocks[1].act

    def sub(h):  # what lies between: blocks 0 and 1, written out by hand
        for blk in net.blocks[:2]:
            h = blk.act(blk.linear(h))
        return h

    h = torch.tanh(net.input(x))
    dense = _dense_svals(sub, h)
    for block in (1, 2):
        spec = jacobian_spectrum(net, x, k=3, between=(a, b), tol=1e-12, block=block)
        np.testing.assert_allclose(spec.singular_values, dense[:, :3], rtol=1e-8)
    # The hooks are gone afterwards and the model is unchanged.
    assert not net.input_act._forward_hooks and not net.blocks[1].act._forward_hooks
    h_a, g = between_layers(net, x, a, b)
    torch.testing.assert_close(g(h_a), sub(h), rtol=0, atol=1e-14)


def test_batch_is_per_example():
    net = _net("tanh", "xavier", seed=6)
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    together = jacobian_spectrum(net, x, k=2, tol=1e-12).singular_values
    alone = np.concatenate([jacobian_spectrum(net, x[i : i + 1], k=2, tol=1e-12).singular_values for i in range(3)])
    np.testing.assert_allclose(together, alone, rtol=1e-10)


def test_plain_callable_and_multidimensional_input():
    W = torch.randn(12, 12, generator=torch.Generator().manual_seed(7), dtype=torch.float64)

    def f(z):  # (B, 3, 4) -> (B, 12)
        return torch.tanh(z.reshape(z.shape[0], 12) @ W.T)

    x = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    dense = _dense_svals(f, x)
    spec = jacobian_spectrum(f, x, k=5, tol=1e-12)
    np.testing.assert_allclose(spec.singular_values, dense[:, :5], rtol=1e-8)


def test_isometry_summary_numbers():
    sv = np.array([0.5, 0.95, 1.0, 1.08, 2.0])
    s = isometry_summary(sv, band=0.1)
    assert s.mean == pytest.approx(sv.mean())
    assert s.std == pytest.approx(sv.std())
    assert s.mean_log == pytest.approx(np.log(sv).mean())
    assert s.std_log == pytest.approx(np.log(sv).std())
    assert (s.max, s.min, s.condition) == (2.0, 0.5, 4.0)
    assert s.frac_within_band == pytest.approx(3 / 5)
    assert s.mean_sq == pytest.approx(np.mean(sv**2))
    assert not s.is_isometric
    zero = isometry_summary(torch.tensor([0.0, 1.0]))
    assert zero.condition == float("inf") and zero.std_log == float("inf")


def test_bad_inputs_raise_config_error():
    net = _net("tanh", "xavier")
    x = torch.randn(2, 6, dtype=torch.float64)
    with pytest.raises(ConfigError, match="k=9"):
        jacobian_spectrum(net, x, k=9)
    with pytest.raises(ConfigError, match="batch"):
        jacobian_spectrum(net, x[0], k=1)
    with pytest.raises(ConfigError, match="which"):
        jacobian_spectrum(net, x, k=1, which="both")
    with pytest.raises(ConfigError, match="nn.Module"):
        jacobian_spectrum(lambda z: z, x, k=1, between=(net.input, net.output))
    with pytest.raises(ConfigError, match="not part of the model"):
        jacobian_spectrum(net, x, k=1, between=(nn.Linear(2, 2), net.output))
    with pytest.raises(ConfigError, match="forward order"):
        jacobian_spectrum(net, x, k=1, between=(net.output, net.input))
    bn = DeepMLP(6, 5, width=8, depth=2, norm="batch").double()
    with pytest.raises(ConfigError, match="eval"):
        jacobian_spectrum(bn, x, k=1)
    jacobian_spectrum(bn.eval(), x, k=1)  # fine once the statistics are frozen
    with pytest.raises(ConfigError, match="does not depend on the input"):
        jacobian_spectrum(lambda z: net.output.bias.expand(z.shape[0], 5) * 1.0, x, k=1)
    with pytest.raises(ConfigError, match="block"):
        jacobian_spectrum(net, x, k=1, block=0)
    with pytest.raises(ConfigError, match="n_probes"):
        jacobian_spectrum(net, x, k=1, n_probes=1)
    with pytest.raises(ConfigError, match="band"):
        isometry_summary(np.ones(3), band=-1)
    with pytest.raises(ConfigError, match="non-negative"):
        isometry_summary(np.array([-1.0]))


def test_jvp_vjp_and_gram_operator_match_dense_jacobian():
    from gradprobe.functional.products import gram_operator, jvp, vjp

    W = torch.randn(5, 4, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    f = lambda z: torch.tanh(z @ W.T)  # noqa: E731  (B, 4) -> (B, 5), examples independent
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    v = torch.randn(2, 4, generator=torch.Generator().manual_seed(14), dtype=torch.float64)
    u = torch.randn(2, 5, generator=torch.Generator().manual_seed(15), dtype=torch.float64)
    J = [torch.func.jacrev(lambda z: f(z.unsqueeze(0)).squeeze(0))(x[b]) for b in range(2)]  # (5, 4) each
    torch.testing.assert_close(jvp(f, x, v), torch.stack([J[b] @ v[b] for b in range(2)]), rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(vjp(f, x, u), torch.stack([J[b].T @ u[b] for b in range(2)]), rtol=1e-13, atol=1e-14)
    _, n_out, gram, forward = gram_operator(f, x)
    assert n_out == 5
    torch.testing.assert_close(forward(v), torch.stack([J[b] @ v[b] for b in range(2)]), rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(gram(v), torch.stack([J[b].T @ J[b] @ v[b] for b in range(2)]), rtol=1e-13, atol=1e-14)
