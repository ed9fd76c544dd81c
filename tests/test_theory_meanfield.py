"""Mean-field theory against closed forms, SciPy's adaptive quadrature, and wide random networks (float64)."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from gradprobe.analysis.theory_vs_measurement import compare_depth, finite_width_error
from gradprobe.errors import ConfigError
from gradprobe.functional.gauss import gauss_expect, gauss_rule
from gradprobe.theory import critical_line, critical_sigma_w2, mean_field, residual_growth

quad = pytest.importorskip("scipy.integrate").quad


def _quad_expect(f, q):
    """Independent oracle: adaptive quadrature of f(u)·N(u; 0, q) over ±40 s.d., split at the kinks."""
    s = math.sqrt(q)
    dens = lambda u: math.exp(-0.5 * u * u / q) / math.sqrt(2 * math.pi * q)  # noqa: E731
    pts = sorted({-40 * s, -1.0, 0.0, 1.0, 40 * s} | {k * s for k in (-8, -4, -2, 2, 4, 8)})
    pts = [p for p in pts if -40 * s <= p <= 40 * s]
    return sum(
        quad(lambda u: float(f(np.array([u]))[0]) * dens(u), a, b, epsabs=1e-17, epsrel=1e-12, limit=400)[0]
        for a, b in zip(pts[:-1], pts[1:])
    )


# ---------------------------------------------------------------- quadrature
@pytest.mark.parametrize("q", [0.01, 0.5, 2.0, 10.0, 50.0])
@pytest.mark.parametrize(
    "name,f",
    [
        ("tanh'^2", lambda u: (1 - np.tanh(u) ** 2) ** 2),
        ("sigmoid^2", lambda u: (1 / (1 + np.exp(-u))) ** 2),
        ("relu'", lambda u: (u > 0).astype(float)),
        ("hardtanh^2", lambda u: np.clip(u, -1, 1) ** 2),
        ("softplus^2", lambda u: np.logaddexp(0, u) ** 2),
    ],
)
def test_graded_rule_matches_scipy_quad(name, f, q):
    # 1e-10 relative: the oracle is converged to ~1e-12; the graded rule to ~1e-14 (kinks are panel edges).
    assert gauss_expect(f, q) == pytest.approx(_quad_expect(f, q), rel=1e-10, abs=1e-300)


def test_graded_rule_moments_and_weights():
    for q in (1e-6, 1.0, 1e4):
        u, w = gauss_rule(q, mean=0.3)
        assert w.sum() == pytest.approx(1.0, abs=1e-14)
        assert w @ (u - 0.3) ** 2 == pytest.approx(q, rel=1e-13)
        assert w @ (u - 0.3) ** 4 == pytest.approx(3 * q * q, rel=1e-12)
    with pytest.raises(ConfigError):
        gauss_rule(-1.0)


def test_graded_rule_agrees_with_gauss_hermite_where_that_is_accurate():
    z, w = np.polynomial.hermite_e.hermegauss(201)
    w = w / w.sum()
    gh = w @ (1 - np.tanh(z) ** 2) ** 2  # q = 1: GH is accurate to 1e-14 here (references.md)
    assert gauss_expect(lambda u: (1 - np.tanh(u) ** 2) ** 2, 1.0) == pytest.approx(gh, rel=1e-13)


# ---------------------------------------------------------------- closed forms
@pytest.mark.parametrize("sw,sb", [(0.5, 0.0), (1.0, 0.2), (1.9, 0.05), (2.0, 0.0), (3.0, 1.0)])
def test_relu_linear_leaky_closed_forms(sw, sb):
    mf = mean_field("relu", sw, sb)
    assert mf.chi1 == pytest.approx(sw / 2, abs=1e-12)
    assert mf.r == pytest.approx(2.0, abs=1e-12)
    if sw < 2:
        assert mf.q_star == pytest.approx(sb / (1 - sw / 2), abs=1e-12)
        assert mf.depth_scale == pytest.approx(-1 / math.log(sw / 2), rel=1e-12)
    lin = mean_field("linear", sw, sb)
    assert lin.chi1 == pytest.approx(sw, abs=1e-12) and lin.r == 1.0
    a = 0.2
    leaky = mean_field("leaky_relu", sw, sb, slope=a)
    assert leaky.chi1 == pytest.approx(sw * (1 + a * a) / 2, abs=1e-12)
    assert leaky.r == pytest.approx((1 + a**4) / 2 / ((1 + a * a) / 2) ** 2, abs=1e-12)


def test_relu_critical_and_phases():
    assert mean_field("relu", 2.0).phase == "critical"
    assert mean_field("relu", 1.0).phase == "ordered"
    assert mean_field("relu", 2.5).phase == "chaotic"
    assert critical_sigma_w2("relu") == 2.0 and critical_sigma_w2("linear") == 1.0
    assert critical_line("leaky_relu", [0.0, 1.0], slope=0.5).tolist() == pytest.approx([1 / 0.625] * 2, abs=1e-12)


def test_tanh_edge_of_chaos_at_unit_weight_variance():
    mf = mean_field("tanh", 1.0, 0.0)
    assert mf.q_star == 0.0
    assert mf.chi1 == pytest.approx(1.0, abs=1e-12)
    assert mf.phase == "critical" and math.isinf(mf.depth_scale)
    assert mean_field("tanh", 0.5).phase == "ordered"
    assert mean_field("tanh", 2.0).phase == "chaotic"


@pytest.mark.parametrize("sw,sb", [(0.5, 0.1), (1.0, 0.0), (2.0, 0.0), (3.0, 0.5), (20.0, 0.0)])
def test_erf_against_williams_closed_forms(sw, sb):
    # φ = erf, u ~ N(0, q): E[φ²] = (2/π)·asin(2q/(1+2q)),  E[φ'²] = (4/π)/√(1+4q)  (Williams 1997).
    mf = mean_field("erf", sw, sb)
    q = mf.q_star
    assert q == pytest.approx(sw * 2 / math.pi * math.asin(2 * q / (1 + 2 * q)) + sb, rel=1e-12, abs=1e-12)
    assert mf.chi1 == pytest.approx(sw * 4 / math.pi / math.sqrt(1 + 4 * q), rel=1e-12)


def test_erf_critical_point_and_chaotic_correlation_slope():
    # χ₁ = σ_w²·4/π at q* = 0. 1e-7: at σ_b = 0, q* leaves 0 continuously at the critical point and
    # χ₁ − 1 is second order there, so root finding resolves σ_w² only to ~√(rounding of F(q) − q).
    assert critical_sigma_w2("erf") == pytest.approx(math.pi / 4, rel=1e-7)
    # Odd φ, σ_b = 0, chaotic: c* = 0 and χ_c = σ_w² E[φ']² = σ_w²·(4/π)/(1 + 2q*) (closed form).
    mf = mean_field("erf", 2.0, 0.0)
    assert mf.phase == "chaotic" and mf.c_star == pytest.approx(0.0, abs=1e-12)
    assert mf.chi_c == pytest.approx(2.0 * 4 / math.pi / (1 + 2 * mf.q_star), rel=1e-9)
    assert mf.depth_scale == pytest.approx(-1 / math.log(mf.chi_c), rel=1e-9)


def test_chaotic_correlation_fixed_point_with_bias_against_gauss_hermite_2d():
    # Independent oracle: a 2-D tensor-product Gauss–Hermite rule (accurate for smooth tanh at q* < 2).
    sw, sb = 2.0, 0.05
    mf = mean_field("tanh", sw, sb)
    assert mf.phase == "chaotic" and mf.q_star < 2 and 0 < mf.c_star < 1
    z, w = np.polynomial.hermite_e.hermegauss(120)
    w = w / w.sum()
    z1, z2, ww = z[:, None], z[None, :], w[:, None] * w[None, :]
    s, c = math.sqrt(mf.q_star), mf.c_star
    u1, u2 = s * z1, s * (c * z1 + math.sqrt(1 - c * c) * z2)
    assert (sw * np.sum(ww * np.tanh(u1) * np.tanh(u2)) + sb) / mf.q_star == pytest.approx(c, abs=1e-10)
    dchi = sw * np.sum(ww * (1 - np.tanh(u1) ** 2) * (1 - np.tanh(u2) ** 2))
    assert mf.chi_c == pytest.approx(dchi, rel=1e-10)
    assert mf.chi_c < 1 < mf.chi1


def test_hard_tanh_chaotic_correlation_slope_closed_form():
    # Kinked φ: odd, σ_b = 0 ⇒ c* = 0 and χ_c = σ_w²·E[φ']² = σ_w²·erf(1/√(2q*))² (regression: a
    # tensor-product 2-D rule gave 1–2% error here; the iterated graded rule is exact to rounding).
    for sw in (2.0, 5.0):
        mf = mean_field("hard_tanh", sw, 0.0)
        assert mf.c_star == 0.0
        assert mf.chi_c == pytest.approx(sw * math.erf(1 / math.sqrt(2 * mf.q_star)) ** 2, rel=1e-12)
    assert 0 < mean_field("hard_tanh", 3.0, 0.1).c_star < 1  # with bias: bracketed and found


def test_hard_tanh_closed_form_matches_quadrature():
    for q in (0.05, 1.0, 30.0):
        mf = mean_field("hard_tanh", 1.0, q)  # any point; compare the length map at q* below
        qs = mf.q_star
        ref = _quad_expect(lambda u: np.clip(u, -1, 1) ** 2, qs) + q
        assert qs == pytest.approx(ref, rel=1e-11)
        assert mf.chi1 == pytest.approx(math.erf(1 / math.sqrt(2 * qs)), rel=1e-13)


_BOUNDED = [(a, sw, sb) for a in ("tanh", "sigmoid") for sw, sb in [(0.8, 0.05), (1.5, 0.3), (3.0, 0.5)]]
_UNBOUNDED = [(a, sw, sb) for a in ("elu", "selu", "gelu", "softplus") for sw, sb in [(0.8, 0.05), (1.5, 0.3)]]


@pytest.mark.parametrize("act,sw,sb", _BOUNDED + _UNBOUNDED)
def test_fixed_point_and_chi1_against_scipy_quad(act, sw, sb):
    torch_f = {
        "tanh": torch.tanh, "sigmoid": torch.sigmoid, "elu": nn.functional.elu, "selu": torch.selu,
        "gelu": nn.functional.gelu, "softplus": nn.functional.softplus,
    }[act]
    mf = mean_field(act, sw, sb)
    assert 0 < mf.q_star < math.inf
    # Oracle: φ and φ' from torch (φ' by autograd), integrated by SciPy's adaptive quadrature.
    phi = lambda u: torch_f(torch.as_tensor(u)).numpy()  # noqa: E731

    def dphi(u):
        x = torch.as_tensor(u).clone().requires_grad_(True)
        return torch.autograd.grad(torch_f(x).sum(), x)[0].numpy()

    assert mf.q_star == pytest.approx(sw * _quad_expect(lambda u: phi(u) ** 2, mf.q_star) + sb, rel=1e-10)
    assert mf.chi1 == pytest.approx(sw * _quad_expect(lambda u: dphi(u) ** 2, mf.q_star), rel=1e-10)
    e4 = _quad_expect(lambda u: dphi(u) ** 4, mf.q_star)
    assert mf.r == pytest.approx(e4 / (mf.chi1 / sw) ** 2, rel=1e-9)


def test_diverging_variance_uses_the_limits_of_phi_prime():
    # Unbounded φ with σ_w²·E[φ'²] > 1 far out: q* = inf and E[φ'²] → (φ'(−∞)² + φ'(+∞)²)/2.
    assert mean_field("elu", 4.0).q_star == math.inf
    assert mean_field("elu", 4.0).chi1 == pytest.approx(2.0, abs=1e-12)
    lam = 1.0507009873554804934193349852946
    assert mean_field("selu", 4.0, 0.1).chi1 == pytest.approx(4.0 * lam**2 / 2, rel=1e-12)
    assert mean_field("linear", 1.5).q_star == math.inf


def test_callable_activation_equals_named():
    a = mean_field(torch.tanh, 1.7, 0.1)
    b = mean_field("tanh", 1.7, 0.1)
    assert a.chi1 == pytest.approx(b.chi1, rel=1e-13) and a.q_star == pytest.approx(b.q_star, rel=1e-12)
    silu = mean_field(nn.SiLU(), 2.0, 0.1)
    assert 0 < silu.chi1 < 10


def test_xi_q_is_the_slope_of_the_length_map():
    # Oracle: central finite difference of F(q) = σ_w² E[φ(√q z)²] + σ_b² at q* (no integration by parts).
    sw, sb = 1.5, 0.2
    mf = mean_field("tanh", sw, sb)
    F = lambda q: sw * _quad_expect(lambda u: np.tanh(u) ** 2, q) + sb  # noqa: E731
    h = 1e-4 * mf.q_star
    slope = (F(mf.q_star + h) - F(mf.q_star - h)) / (2 * h)
    assert mf.xi_q == pytest.approx(-1 / math.log(slope), rel=1e-6)  # FD truncation ~h²


@pytest.mark.parametrize("act", ["tanh", "erf", "hard_tanh"])
def test_critical_line_points_have_unit_chi1(act):
    b = [0.0, 0.01, 0.05, 0.3]
    line = critical_line(act, b)
    assert np.all(np.diff(line) > 0)  # more bias needs more weight variance to reach chaos
    for sw, sb in zip(line, b):
        assert mean_field(act, sw, sb).chi1 == pytest.approx(1.0, abs=1e-9)


def test_bad_arguments_raise_config_error():
    with pytest.raises(ConfigError):
        mean_field("tanh", -1.0)
    with pytest.raises(ConfigError):
        mean_field("swishy", 1.0)
    with pytest.raises(ConfigError):
        mean_field(lambda x: x.sum(), 1.0)  # not elementwise
    with pytest.raises(ConfigError):
        residual_growth("relu", 2.0, depth=0)


# ---------------------------------------------------------------- residual MLPs
def test_residual_relu_growth_closed_form():
    g = residual_growth("relu", 2.0, 1.0, branch_scale=1.0, depth=4)
    assert g.log_grad_growth.tolist() == pytest.approx([math.log(2.0)] * 4, abs=1e-12)  # ≈ 0.69 per block
    assert g.q.tolist() == pytest.approx([2.0**l for l in range(5)], rel=1e-12)
    s = 0.25  # branch scaling: 1 + s²σ_v²σ_w²/2
    assert residual_growth("relu", 2.0, 1.0, s, depth=1).grad_growth[0] == pytest.approx(1 + s * s, abs=1e-12)


def _residual_grad_ratio(N, depth, s, seed):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(N, generator=g, dtype=torch.float64).requires_grad_(True)
    x = x0
    for _ in range(depth):
        W = torch.randn(N, N, generator=g, dtype=torch.float64) * math.sqrt(2.0 / N)
        V = torch.randn(N, N, generator=g, dtype=torch.float64) * math.sqrt(1.0 / N)
        x = x + s * V @ torch.relu(W @ x)
    d = torch.randn(N, generator=g, dtype=torch.float64)
    (gx,) = torch.autograd.grad(d @ x, x0)
    return float(gx.norm() ** 2 / d.norm() ** 2)


def test_residual_growth_against_random_residual_nets():
    # Mean of 8 nets, width 500: the per-net log ratio has s.d. ≲ 0.1 here; compare the log of the mean.
    depth, s = 5, 0.5
    pred = residual_growth("relu", 2.0, 1.0, s, depth=depth).total_grad_growth
    meas = np.mean([_residual_grad_ratio(500, depth, s, seed) for seed in range(8)])
    assert math.log(meas) == pytest.approx(math.log(pred), abs=0.1)


# ---------------------------------------------------------------- wide random networks
def _delta_profile(act, sw, sb, N, L, seed):
    """‖δ^l‖ (pre-activation gradients) of one random float64 MLP with h¹ ~ N(0, q*), l = 1…L."""
    phi = {"tanh": torch.tanh, "relu": torch.relu, "linear": lambda x: x}[act]
    mf = mean_field(act, sw, sb)
    q = mf.q_star if (math.isfinite(mf.q_star) and mf.q_star > 0) else 1.0
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(N, generator=g, dtype=torch.float64) * math.sqrt(q)).requires_grad_(True)
    hs = [h]
    for _ in range(L - 1):
        W = torch.randn(N, N, generator=g, dtype=torch.float64) * math.sqrt(sw / N)
        b = torch.randn(N, generator=g, dtype=torch.float64) * math.sqrt(sb)
        h = W @ phi(h) + b
        h.retain_grad()
        hs.append(h)
    (torch.randn(N, generator=g, dtype=torch.float64) @ h).backward()
    return mf, np.array([float(x.grad.norm()) for x in hs])


@pytest.mark.parametrize("act,sw,sb", [("relu", 2.0, 0.0), ("relu", 1.5, 0.0), ("tanh", 1.5, 0.05), ("tanh", 2.0, 0.0), ("linear", 0.9, 0.0)])
def test_wide_networks_match_theory_within_finite_width_error(act, sw, sb):
    N, L, seeds = 1000, 10, 3
    zs = []
    for seed in range(seeds):
        mf, prof = _delta_profile(act, sw, sb, N, L, seed)
        c = compare_depth(prof, mf.chi1, N, r=mf.r, k=3.0)
        assert c.within, c.summary()
        zs.append(c.z)
    assert abs(np.mean(zs)) * math.sqrt(seeds) < 3.0


@pytest.mark.parametrize("act,sw,exact", [("linear", 1.3, lambda sw, L: sw ** (L - 1)), ("relu", 2.6, lambda sw, L: (sw / 2) ** (L - 1))])
def test_exact_expected_ratio_at_small_width(act, sw, exact):
    # E[‖δ¹‖²/‖δᴸ‖²] is exact at any width (references.md); 300 nets of width 40: test the sample mean
    # within 4 standard errors (estimated from the same sample).
    N, L = 40, 8
    r = np.array([(p[0] / p[-1]) ** 2 for p in (_delta_profile(act, sw, 0.0, N, L, s)[1] for s in range(300))])
    se = r.std(ddof=1) / math.sqrt(len(r))
    assert abs(r.mean() - exact(sw, L)) < 4 * se


def test_finite_width_bias_is_visible_and_predicted():
    # At N = 40, L = 10 (ReLU critical) the log ratio's mean is −n(3r−1)/(2N) ≈ −0.56, not 0.
    N, L = 40, 10
    logs = np.array([2 * math.log(p[0] / p[-1]) for p in (_delta_profile("relu", 2.0, 0.0, N, L, s)[1] for s in range(300))])
    bias, sd = finite_width_error(L - 1, N, 2.0)
    se = logs.std(ddof=1) / math.sqrt(len(logs))
    assert abs(logs.mean() - bias) < 4 * se + 0.1 * abs(bias)  # first-order formula: allow 10% model error
    assert logs.mean() < -4 * se  # the bias is real: zero is excluded
    assert logs.std() == pytest.approx(sd, rel=0.25)


def test_compare_depth_flags_a_wrong_chi1():
    mf, prof = _delta_profile("relu", 2.0, 0.0, 1000, 10, 0)
    assert not compare_depth(prof, 0.5, 1000, r=2.0).within  # predicts 9·ln(0.5) = −6.2 vs ≈ 0


def test_compare_depth_reads_a_probe_layerflow():
    # End to end: a float64 DeepMLP at the ReLU edge of chaos (σ_w² = 2), width 1000, one sample;
    # the probe's output_grad_norm profile (readout excluded: its width differs) agrees with χ₁ = 1.
    from gradprobe import Probe
    from gradprobe.models.mlp import DeepMLP

    zs = []
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        net = DeepMLP(1000, 10, width=1000, depth=8, activation="relu", init="gaussian", sigma_w2=2.0, generator=g).double()
        x = torch.randn(1, 1000, dtype=torch.float64, generator=g)
        with Probe(net) as probe:
            (net(x) @ torch.randn(10, dtype=torch.float64, generator=g)).sum().backward()
            flow = probe.flow()
        mf = mean_field("relu", 2.0)
        c = compare_depth(flow, mf.chi1, 1000, r=mf.r, exclude_last=1)
        assert c.n_steps == 8 and c.within, c.summary()
        zs.append(c.z)
    assert abs(np.mean(zs)) * math.sqrt(3) < 3.0
