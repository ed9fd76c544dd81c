"""Jacobian spectra against dense ``torch.func.jacrev`` + ``torch.linalg.svdvals`` in float64."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from gradprobe.analysis.spectra import (
    between_layers,
    isometry_summary,
    jacobian_spectrum,
)
from gradprobe.errors import ConfigError
from gradprobe.functional.init import init_weight_
from gradprobe.models import DeepMLP


pytestmark = pytest.mark.usefixtures("one_thread")


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
@pytest.mark.parametrize("method", ["krylov", "lanczos"])
@pytest.mark.parametrize("block", [1, 3])
@pytest.mark.parametrize(
    "activation,init", [("tanh", "xavier"), ("relu", "he"), ("tanh", "orthogonal"), ("sigmoid", "standard")]
)
def test_top_k_matches_dense_svd(activation, init, block, method):
    net = _net(activation, init)
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    dense = _dense_svals(net, x)
    spec = jacobian_spectrum(net, x, k=4, tol=1e-10, block=block, method=method)
    assert spec.singular_values.shape == (3, 4) and spec.method == method
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
    with pytest.raises(ConfigError, match="method"):
        jacobian_spectrum(net, x, k=1, method="svd")
    with pytest.raises(ConfigError, match="lanczos"):
        jacobian_spectrum(net, x, k=1, method="krylov", which="bottom")
    with pytest.raises(ConfigError, match="band"):
        isometry_summary(np.ones(3), band=-1)
    with pytest.raises(ConfigError, match="non-negative"):
        isometry_summary(np.array([-1.0]))


def test_jvp_vjp_and_gram_operator_match_dense_jacobian():
    from gradprobe.functional.products import gram_operator, jvp, vjp

    W = torch.randn(5, 4, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    f = lambda z: torch.tanh(z @ W.T)
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


# ---- block Krylov (the default for the top of the spectrum) on problems where it must iterate ------


def _clustered_fn(n=60, seed=21):
    """``f(z) = tanh(z Wᵀ)·0.1`` near 0 (Jacobian ≈ 0.1·W·diag(tanh')) with W's top singular values 1e-4 apart."""
    rng = np.random.default_rng(seed)
    qu, _ = np.linalg.qr(rng.standard_normal((n, n)))
    qv, _ = np.linalg.qr(rng.standard_normal((n, n)))
    s = 3.0 * 0.95 ** np.arange(n)
    s[:4] = 3.0 * (1 - 1e-4 * np.arange(4))  # a cluster of four
    W = torch.from_numpy((qu * s) @ qv.T)
    return lambda z: torch.tanh(0.1 * z @ W.T)


@pytest.mark.parametrize(
    "arch", ["relu_he", "tanh_xavier", "tanh_orthogonal", "gelu_residual", "clustered", "conv"]
)
def test_krylov_matches_dense_svd_when_iterating(arch):
    g = torch.Generator().manual_seed(30)
    if arch == "clustered":
        fn, x = _clustered_fn(), torch.randn(2, 60, generator=g, dtype=torch.float64) * 0.1
    elif arch == "conv":  # a non-MLP: conv → tanh → conv on (B, 2, 80) inputs, flattened output
        conv = nn.Sequential(nn.Conv1d(2, 4, 5, padding=2), nn.Tanh(), nn.Conv1d(4, 3, 3, padding=1), nn.Flatten()).double()
        fn, x = conv, torch.randn(2, 2, 80, generator=g, dtype=torch.float64)
    else:
        act, init = {"relu_he": ("relu", "he"), "tanh_xavier": ("tanh", "xavier"),
                     "tanh_orthogonal": ("tanh", "orthogonal"), "gelu_residual": ("gelu", "he")}[arch]
        fn = DeepMLP(64, 48, width=64, depth=6, activation=act, init=init, residual=arch == "gelu_residual",
                     residual_scale=0.4, generator=g).double()
        x = torch.randn(2, 64, generator=g, dtype=torch.float64)
    dense = _dense_svals(fn, x)[:, :6]
    spec = jacobian_spectrum(fn, x, k=6, block=8, tol=1e-10, n_probes=0, max_iter=152)
    assert spec.method == "krylov" and spec.converged
    assert spec.n_iter < spec.n_in  # stopped by its error estimate, with the space not yet full
    # Estimated relative error <= 1e-10 ⇒ the brief's 1e-5 relative holds with five digits to spare;
    # checked at 1e-8 (float64 products), plus the √eps·σ_max floor for numerically zero σ.
    assert np.all(np.abs(spec.singular_values - dense) <= 1e-8 * dense + 1e-7 * dense[:, :1])
    assert np.all(spec.error_bounds <= 1e-10 * spec.singular_values + 1e-7 * dense[:, :1])


def test_krylov_float32_products_meet_1e5_relative():
    # The benchmark's setting in miniature: float32 model and input, default tolerance (1e-6 estimated).
    g = torch.Generator().manual_seed(31)
    net = DeepMLP(96, 96, width=96, depth=8, activation="relu", init="he", generator=g)
    x = torch.randn(1, 96, generator=g)
    dense = _dense_svals(net.double(), x.double())[:, :8]  # float64 oracle of the same weights
    spec = jacobian_spectrum(net.float(), x, k=8, n_probes=0)
    assert spec.converged and spec.n_iter < 96
    assert np.max(np.abs(spec.singular_values - dense) / dense) < 1e-5


def test_krylov_rejects_a_wrong_adjoint(monkeypatch):
    # Sabotage the operator pair: Jᵀ replaced by 1.01·Jᵀ. Rayleigh–Ritz only uses J, so the values
    # alone would look plausible; the residual check must refuse to call them converged.
    import gradprobe.analysis.spectra as spectra_mod

    make = spectra_mod._block_operators  # the operators jacobian_spectrum uses (here the matmul chain)

    def broken(fn, x):
        y, n_out, fwd, adj = make(fn, x)
        return y, n_out, fwd, lambda U: 1.01 * adj(U)

    net = _net("tanh", "xavier", in_f=40, out=30, width=40, depth=4, seed=9)
    x = torch.randn(1, 40, generator=torch.Generator().manual_seed(32), dtype=torch.float64)
    assert jacobian_spectrum(net, x, k=4, block=8, tol=1e-6, max_iter=32).converged
    monkeypatch.setattr(spectra_mod, "_block_operators", broken)
    spec = jacobian_spectrum(net, x, k=4, block=8, tol=1e-6, max_iter=32)
    assert not spec.converged and np.max(spec.error_bounds / spec.singular_values) > 1e-6


def test_jacobian_block_operators_match_dense_jacobian():
    from gradprobe.functional.products import jacobian_block_operators

    W = torch.randn(5, 4, generator=torch.Generator().manual_seed(16), dtype=torch.float64)
    f = lambda z: torch.tanh(z @ W.T)
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(17), dtype=torch.float64)
    J = torch.stack([torch.func.jacrev(lambda z: f(z.unsqueeze(0)).squeeze(0))(x[b]) for b in range(2)])  # (2, 5, 4)
    V = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(18), dtype=torch.float64)
    U = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(19), dtype=torch.float64)
    _, n_out, fwd, adj = jacobian_block_operators(f, x)
    assert n_out == 5
    torch.testing.assert_close(fwd(V), torch.einsum("boi,bki->bko", J, V), rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(adj(U), torch.einsum("boi,bko->bki", J, U), rtol=1e-13, atol=1e-14)
    with pytest.raises(ConfigError, match="block"):
        fwd(V[0])


# ---- the matmul chain of a plain MLP (chain_operators) against autograd's operators ------------------


def _chain_models():
    g = torch.Generator().manual_seed(40)
    nets = {f"deepmlp_{a}": DeepMLP(7, 5, width=9, depth=3, activation=a, init="he", generator=g)
            for a in ("relu", "tanh", "sigmoid", "leaky_relu", "prelu", "elu", "selu", "gelu", "linear")}
    prelu = nn.PReLU(9)
    with torch.no_grad():
        prelu.weight.uniform_(0.1, 0.9, generator=g)
    nets["sequential"] = nn.Sequential(
        nn.Linear(7, 9), nn.ReLU(inplace=True), nn.Dropout(0.5), nn.Linear(9, 9), prelu, nn.Identity(),
        nn.Softplus(), nn.Tanh(), nn.Linear(9, 9, bias=False), nn.SiLU(), nn.Linear(9, 5)).eval()
    shared = nn.Tanh()  # one activation instance called at two places
    nets["shared_activation"] = nn.Sequential(nn.Linear(7, 9), shared, nn.Linear(9, 9), shared, nn.Linear(9, 5))
    return nets


@pytest.mark.parametrize("name", list(_chain_models()))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_chain_operators_equal_the_autograd_operators(name, dtype):
    # The fast path must compute the same J and Jᵀ as autograd through the model: to rounding, i.e.
    # 1e-12 relative in float64 and 1e-5 in float32 (the two sum the same products in other orders).
    from gradprobe.analysis.spectra import chain_operators
    from gradprobe.functional.products import jacobian_block_operators

    net = _chain_models()[name].to(dtype)
    gen = torch.Generator().manual_seed(41)
    x = torch.randn(3, 7, generator=gen, dtype=dtype)
    V = torch.randn(3, 4, 7, generator=gen, dtype=torch.float64)
    U = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64)
    fast, slow = chain_operators(net, x), jacobian_block_operators(net, x)
    assert fast is not None
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    for a, b in ((fast[2](V), slow[2](V)), (fast[3](U), slow[3](U))):
        assert a.dtype == torch.float64 and a.shape == b.shape
        assert float((a - b).abs().max()) <= rtol * float(b.abs().max())
    torch.testing.assert_close(fast[0], net(x).detach(), rtol=0, atol=0)
    assert fast[1] == 5
    with pytest.raises(ConfigError, match="block"):
        fast[2](V[0])


class _Doubling(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.b(2 * self.a(x))  # an operation outside the leaves


class _InPlace(_Doubling):
    def forward(self, x):
        h = self.a(x)
        h.mul_(2)  # same tensor object, modified in place
        return self.b(h)


class _Skip(_Doubling):
    def forward(self, x):
        return self.b(self.a(x) + x)


class _MyLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 3


def _not_chains():
    hooked = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3))
    hooked[1].register_forward_hook(lambda m, i, o: o * 2)
    return {
        "residual": DeepMLP(4, 3, width=4, depth=2, residual=True),
        "layer_norm": DeepMLP(4, 3, width=4, depth=2, norm="layer"),
        "doubling": _Doubling(), "in_place": _InPlace(), "skip": _Skip(),
        "linear_subclass": nn.Sequential(_MyLinear(4, 4), nn.ReLU(), nn.Linear(4, 3)),
        "dropout_training": nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 3)).train(),
        "user_hook": hooked,
        "softmax": nn.Sequential(nn.Linear(4, 4), nn.Softmax(dim=1), nn.Linear(4, 3)),  # not elementwise
    }


@pytest.mark.parametrize("name", list(_not_chains()))
def test_chain_operators_refuse_what_is_not_a_plain_chain(name):
    # Each of these computes something the matmul chain would get wrong; they fall back to autograd,
    # and jacobian_spectrum still agrees with the dense SVD through the fallback.
    from gradprobe.analysis.spectra import chain_operators

    net = _not_chains()[name].double()
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(42), dtype=torch.float64)
    assert chain_operators(net, x) is None
    if name != "dropout_training":  # random: no fixed Jacobian
        spec = jacobian_spectrum(net, x, k=2, tol=1e-10, n_probes=0)
        dense = _dense_svals(net, x)[:, :2]
        assert np.all(np.abs(spec.singular_values - dense) <= 1e-8 * dense + 1e-7 * dense[:, :1])
    assert chain_operators(lambda z: z[:, :3], x) is None  # not a module
    assert chain_operators(nn.Sequential(nn.Linear(4, 3)).double(), x[:, None]) is None  # not (B, n)


def test_fast_and_generic_paths_give_the_same_spectrum(monkeypatch):
    # The whole krylov solve through the chain and through autograd: the same values to 1e-12
    # (float64), the same number of products.
    import gradprobe.analysis.spectra as spectra_mod

    net = _net("tanh", "orthogonal", in_f=40, out=30, width=40, depth=5, seed=43)
    x = torch.randn(2, 40, generator=torch.Generator().manual_seed(44), dtype=torch.float64)
    fast = jacobian_spectrum(net, x, k=5, block=10, tol=1e-10, n_probes=8)
    monkeypatch.setattr(spectra_mod, "chain_operators", lambda fn, x: None)
    slow = jacobian_spectrum(net, x, k=5, block=10, tol=1e-10, n_probes=8)
    np.testing.assert_allclose(fast.singular_values, slow.singular_values, rtol=1e-12)
    np.testing.assert_allclose(fast.mean_sq, slow.mean_sq, rtol=1e-12)
    assert fast.n_iter == slow.n_iter and fast.converged and slow.converged


def test_a_plain_mlp_takes_the_matmul_chain(monkeypatch):
    # DeepMLP without residual or norm layers must not touch autograd's operators (the fast path is
    # what the benchmark's numbers rest on; a silent fallback would only show there).
    import gradprobe.analysis.spectra as spectra_mod

    def refuse(fn, x):
        raise AssertionError("fell back to autograd")

    monkeypatch.setattr(spectra_mod, "jacobian_block_operators", refuse)
    net = _net("relu", "he", in_f=20, out=20, width=20, depth=4, seed=45)
    x = torch.randn(1, 20, generator=torch.Generator().manual_seed(46), dtype=torch.float64)
    spec = jacobian_spectrum(net, x, k=3, tol=1e-10, n_probes=4)
    dense = _dense_svals(net, x)[:, :3]
    assert spec.converged and np.all(np.abs(spec.singular_values - dense) <= 1e-8 * dense)
    with pytest.raises(AssertionError, match="fell back"):
        jacobian_spectrum(_not_chains()["skip"].double(), torch.zeros(1, 4, dtype=torch.float64), k=2)
