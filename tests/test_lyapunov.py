"""QR-iteration Lyapunov spectrum against exact oracles (orthogonal maps, contracting tanh maps, log-det)."""
import math

import pytest
import torch
from torch import nn

from gradprobe.errors import ConfigError
from gradprobe.functional.lyapunov import lyapunov_spectrum
from gradprobe.theory import mean_field
from gradprobe.theory.rnn import rnn_jacobians, tanh_map_jacobians


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _orthogonal(n, seed):
    q, r = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=_gen(seed)))
    return q * torch.sign(torch.diagonal(r))


@pytest.mark.parametrize("alpha", [0.5, 1.0, 1.7])
def test_scaled_orthogonal_linear_rnn_has_all_exponents_ln_alpha(alpha):
    # J_t = α·Q: every QR step gives |R_ii| = α exactly, so every exponent is ln α to rounding.
    W = alpha * _orthogonal(12, 0)
    lam = lyapunov_spectrum(W.expand(40, 12, 12), 12)
    assert torch.allclose(lam, torch.full((12,), math.log(alpha), dtype=torch.float64), rtol=0, atol=1e-12)


def test_full_spectrum_sums_to_mean_log_det():
    N, T = 10, 200
    W = torch.randn(N, N, dtype=torch.float64, generator=_gen(1)) * 1.5 / math.sqrt(N)
    J, _ = tanh_map_jacobians(W, torch.randn(N, dtype=torch.float64, generator=_gen(2)), T)
    lam = lyapunov_spectrum(J, N)
    logdet = torch.linalg.slogdet(J)[1].mean()
    assert float(lam.sum()) == pytest.approx(float(logdet), abs=1e-10)


def test_contracting_tanh_map_gives_log_eigenvalue_moduli():
    # x_{t+1} = W tanh(x_t), W ~ N(0, g²/N), g < 1: x → 0, J_t → W, so λ_i = ln|μ_i(W)|.
    N, g = 40, 0.7
    W = torch.randn(N, N, dtype=torch.float64, generator=_gen(3)) * g / math.sqrt(N)
    J, x = tanh_map_jacobians(W, torch.randn(N, dtype=torch.float64, generator=_gen(4)), 1000)  # 0.7^1000: no subnormals (slow)
    assert float(x[-1].abs().max()) < 1e-50
    lam = lyapunov_spectrum(J, 6, transient=200)
    mu = torch.linalg.eigvals(W).abs().sort(descending=True).values[:6].log()
    # Tolerance 2e-3: the frame converges at the rate of the gaps between |μ_i| (complex pairs share a
    # modulus, so within-pair separation is what limits it); measured deviation is ~1e-4.
    assert torch.allclose(lam, mu, rtol=0, atol=2e-3)


def test_chaotic_tanh_map_top_exponent_near_mean_field():
    # g > 1: λ₁ ≈ ½ ln χ₁ with χ₁ from mean field at σ_w² = g², σ_b = 0 (finite N: loose, 25%).
    N, g = 200, 2.5
    W = torch.randn(N, N, dtype=torch.float64, generator=_gen(5)) * g / math.sqrt(N)
    x = [torch.randn(N, dtype=torch.float64, generator=_gen(6))]
    for _ in range(1500):
        x.append(W @ torch.tanh(x[-1]))
    # J_t built on demand (a stored (1500, 200, 200) stack would be 480 MB).
    lam1 = float(lyapunov_spectrum(lambda t: W * (1 - torch.tanh(x[t]) ** 2)[None, :], 1, steps=1500, transient=300)[0])
    pred = 0.5 * math.log(mean_field("tanh", g * g).chi1)
    assert lam1 > 0
    print(f"chaotic tanh map N={N} g={g}: lambda1 = {lam1:.4f}, mean field 0.5 ln chi1 = {pred:.4f}")
    assert lam1 == pytest.approx(pred, rel=0.25)


def test_callable_iterable_and_tensor_agree():
    W = torch.randn(6, 6, dtype=torch.float64, generator=_gen(7))
    J, _ = tanh_map_jacobians(W, torch.randn(6, dtype=torch.float64, generator=_gen(8)), 50)
    a = lyapunov_spectrum(J, 3)
    b = lyapunov_spectrum(list(J), 3)
    c = lyapunov_spectrum(lambda t: J[t], 3, steps=50)
    assert torch.equal(a, b) and torch.equal(a, c)


def test_nn_rnn_spectrum_from_its_jacobians():
    # Linear-regime nn.RNN (tiny weights): J_t ≈ W_hh, so λ_i ≈ ln|μ_i(W_hh)|; checks the module path end to end.
    torch.manual_seed(0)
    m = nn.RNN(2, 8, nonlinearity="tanh", bias=False).double()
    with torch.no_grad():
        m.weight_hh_l0.copy_(0.6 * _orthogonal(8, 9))
        m.weight_ih_l0.mul_(1e-6)
    J, _ = rnn_jacobians(m, torch.randn(300, 2, dtype=torch.float64, generator=_gen(10)))
    lam = lyapunov_spectrum(J, 8)
    assert torch.allclose(lam, torch.full((8,), math.log(0.6), dtype=torch.float64), atol=1e-6)


def test_bad_arguments():
    J = torch.eye(3, dtype=torch.float64).expand(5, 3, 3)
    with pytest.raises(ConfigError):
        lyapunov_spectrum(J, 4)
    with pytest.raises(ConfigError):
        lyapunov_spectrum(J, 2, transient=5)
    with pytest.raises(ConfigError):
        lyapunov_spectrum(lambda t: J[t], 2)
    with pytest.raises(ConfigError):
        lyapunov_spectrum(torch.ones(3, 3), 1)


def test_temporal_decay_rate_beside_lyapunov_exponent():
    # Oracle from issue 3: linear RNN h_t = α·Q h_{t−1} + u_t, loss on h_T: ‖∂E/∂h_k‖ = α^(T−k)·‖∂E/∂h_T‖
    # exactly (Q orthogonal), and every Lyapunov exponent is ln α, so the fitted rate equals λ₁.
    from gradprobe.analysis.theory_vs_measurement import compare_time

    alpha, N, T = 0.9, 16, 40
    W = alpha * _orthogonal(N, 11)
    hs = [torch.zeros(N, dtype=torch.float64, requires_grad=True)]
    u = torch.randn(T, N, dtype=torch.float64, generator=_gen(12))
    for t in range(T):
        h = W @ hs[-1] + u[t]
        h.retain_grad()
        hs.append(h)
    (torch.randn(N, dtype=torch.float64, generator=_gen(13)) @ hs[-1]).backward()
    prof = [float(h.grad.norm()) for h in hs[1:]]
    lam1 = float(lyapunov_spectrum(W.expand(T, N, N), 1)[0])
    c = compare_time(prof, lam1)
    assert c.measured_rate == pytest.approx(math.log(alpha), abs=1e-12)
    assert abs(c.difference) < 1e-12


def test_pascanu_bound_is_exact_but_loose_for_a_sigmoid_rnn():
    # references.md: sigmoid, λ₁ = 3.5, T = 60: the bound ln η^T = 60·ln(3.5/4) = −8.0 holds, while the
    # actual ‖Π J‖ is far smaller (the Lyapunov exponent is well below ln η).
    from gradprobe.theory import rnn_condition

    N, T = 50, 60
    W = torch.randn(N, N, dtype=torch.float64, generator=_gen(14))
    W = W * (3.5 / torch.linalg.matrix_norm(W, ord=2))
    c = rnn_condition(W, "sigmoid")
    x = torch.randn(N, dtype=torch.float64, generator=_gen(15))
    P = torch.eye(N, dtype=torch.float64)
    for _ in range(T):
        s = torch.sigmoid(x)
        P = (W * (s * (1 - s))[None, :]) @ P  # J = W·diag(σ'(x))
        x = W @ s
    log_norm = math.log(float(torch.linalg.matrix_norm(P, ord=2)))
    assert math.log(c.bound(T)) == pytest.approx(60 * math.log(3.5 / 4), rel=1e-12)
    assert log_norm <= math.log(c.bound(T))
    assert log_norm < 2 * math.log(c.bound(T))  # loose by more than a factor e^8


@pytest.mark.slow
@pytest.mark.parametrize("g", [2.5, 4.0])
def test_chaotic_tanh_map_top_exponent_at_larger_width(g):
    # N = 500: the finite-size gap to mean field shrinks (measured 0.2304 vs 0.2372 at g = 2.5,
    # 0.4268 vs 0.4329 at g = 4); 6% tolerance.
    N, T = 500, 1200
    W = torch.randn(N, N, dtype=torch.float64, generator=_gen(5)) * g / math.sqrt(N)
    x = [torch.randn(N, dtype=torch.float64, generator=_gen(6))]
    for _ in range(T):
        x.append(W @ torch.tanh(x[-1]))
    lam1 = float(lyapunov_spectrum(lambda t: W * (1 - torch.tanh(x[t]) ** 2)[None, :], 1, steps=T, transient=200)[0])
    assert lam1 == pytest.approx(0.5 * math.log(mean_field("tanh", g * g).chi1), rel=0.06)
