"""DoyaNeuron (seed 000; Doya 1993; Pascanu et al. 2013 Fig. 3) against closed forms, brute force and
float64 autograd / finite differences."""
import math

import numpy as np
import pytest
import torch

from gradprobe.errors import ConfigError
from gradprobe.models.doya import (
    DoyaNeuron,
    doya_bifurcation_diagram,
    doya_bifurcations,
    doya_fixed_point_curve,
    doya_fixed_points,
    doya_saddle_nodes,
    doya_sensitivity,
)


def sig(z):
    return 1.0 / (1.0 + math.exp(-z))


def brute_force_root_count(w, b, n=200_001):
    # Sign changes of g(x) = σ(wx+b) − x on a dense grid: an oracle independent of the bracketing.
    x = np.linspace(0.0, 1.0, n)
    g = 1.0 / (1.0 + np.exp(-(w * x + b))) - x
    pos = g > 0  # an exact zero on the grid (x = 1/2 at b = −w/2) then counts once, not twice
    return int(np.sum(pos[1:] != pos[:-1]))


@pytest.mark.parametrize("w,b", [(5.0, -2.5), (5.0, -2.0), (5.0, -3.0), (5.0, -2.4), (8.0, -4.0), (2.0, 0.3), (-3.0, 1.0)])
def test_fixed_points_solve_the_equation_and_match_brute_force_count(w, b):
    pts = doya_fixed_points(w, b)
    assert len(pts) == brute_force_root_count(w, b)
    for p in pts:
        # Bisection to float64 resolution: the residual is a few ulps of x.
        assert abs(sig(w * p.x + b) - p.x) < 1e-15
        assert p.multiplier == pytest.approx(w * p.x * (1 - p.x), rel=1e-15)  # eps = 1


@pytest.mark.parametrize("w,b,x_expected", [(5.0, 40.0, 1.0), (5.0, -800.0, 0.0), (-5.0, 800.0, 1.0)])
def test_saturated_fixed_points_at_the_ends_are_found(w, b, x_expected):
    # σ saturates to exactly 0 or 1 in float64, so the root is the endpoint itself (to within 1e-17).
    (p,) = doya_fixed_points(w, b)
    assert p.x == pytest.approx(x_expected, abs=1e-15) and p.stable


def test_seed000_window_for_w5_is_inside_minus3_minus2_with_1_3_1_fixed_points():
    b_lo, b_hi = doya_bifurcations(5.0)
    assert -3.0 < b_lo < b_hi < -2.0
    # Seed 000: as b decreases, 1 stable point, then 2 stable + 1 unstable, then 1 stable again.
    for b, expected in [(-2.0, [True]), (-2.5, [True, False, True]), (-3.0, [True])]:
        assert [p.stable for p in doya_fixed_points(5.0, b, eps=0.1)] == expected


@pytest.mark.parametrize("w", [4.5, 5.0, 8.0, 20.0])
def test_saddle_nodes_are_tangencies_and_bound_the_window(w):
    for b, x in doya_saddle_nodes(w):
        z = w * x + b
        assert abs(sig(z) - x) < 1e-14                      # a fixed point ...
        assert w * sig(z) * (1 - sig(z)) == pytest.approx(1.0, abs=1e-12)  # ... where w σ′ = 1
    b_lo, b_hi = doya_bifurcations(w)
    # Just inside the window there are three fixed points, just outside one (brute-force count).
    delta = 1e-5 * (b_hi - b_lo)
    assert brute_force_root_count(w, b_lo + delta, 2_000_001) == 3
    assert brute_force_root_count(w, b_hi - delta, 2_000_001) == 3
    assert len(doya_fixed_points(w, b_lo - delta)) == 1
    assert len(doya_fixed_points(w, b_hi + delta)) == 1
    assert len(doya_fixed_points(w, 0.5 * (b_lo + b_hi))) == 3


def test_no_window_for_w_at_most_4():
    with pytest.raises(ConfigError, match="w > 4"):
        doya_bifurcations(4.0)
    assert len(doya_fixed_points(4.0, -2.0)) == 1


def test_multiplier_equals_autograd_derivative_of_the_map_and_predicts_convergence():
    m = DoyaNeuron(w=5.0, b=-2.5, eps=0.1)
    for p in m.fixed_points():
        x = torch.tensor(p.x, dtype=torch.float64, requires_grad=True)
        (d,) = torch.autograd.grad(m.step(x), x)
        assert float(d) == pytest.approx(p.multiplier, rel=1e-14)
    lo, mid, hi = m.fixed_points()
    with torch.no_grad():
        assert float(m(lo.x + 0.05, T=2000)[-1]) == pytest.approx(lo.x, abs=1e-12)
        assert float(m(hi.x - 0.05, T=2000)[-1]) == pytest.approx(hi.x, abs=1e-12)
        assert abs(float(m(mid.x + 1e-6, T=2000)[-1]) - mid.x) > 0.3  # unstable: it leaves


def test_period_doubling_instability_with_large_step_and_negative_weight():
    # eps = 1, w = −10, b = 5: the only fixed point is x = 0.5 with multiplier −2.5 → |f′| > 1.
    (p,) = doya_fixed_points(-10.0, 5.0, eps=1.0)
    assert p.x == pytest.approx(0.5, abs=1e-15) and p.multiplier == pytest.approx(-2.5) and not p.stable
    with torch.no_grad():
        xs = DoyaNeuron(w=-10.0, b=5.0, eps=1.0)(0.51, T=200)
    assert abs(float(xs[-1] - xs[-2])) > 0.5  # a period-2 orbit, not convergence


def test_sensitivity_exact_at_the_unstable_point():
    # x0 = 0.5 is exactly the unstable point for w = 5, b = −2.5 (σ(0) = 1/2 is exact in float):
    # a = f′(1/2) = 1 + ε/4, dx_T/dx_0 = a^T and dx_T/db = Σ_k a^k ε/4 = a^T − 1.
    eps, T = 0.1, 200
    a = 1.0 + eps / 4.0
    m = DoyaNeuron(w=5.0, b=-2.5, eps=eps)
    s = m.sensitivity(0.5, T)
    assert s.x_T == 0.5
    assert s.dx0 == pytest.approx(a**T, rel=1e-12)      # ~1.4e2: explodes geometrically in T
    assert s.db == pytest.approx(a**T - 1.0, rel=1e-12)
    r = doya_sensitivity(5.0, -2.5, eps, 0.5, T)
    assert (r.dx0, r.db) == pytest.approx((s.dx0, s.db), rel=1e-12)


@pytest.mark.parametrize("x0", [0.05, 0.3, 0.7, 0.95])
def test_sensitivity_autograd_vs_recursion_vs_finite_differences_away_from_unstable_point(x0):
    m = DoyaNeuron(w=5.0, b=-2.5, eps=0.1)
    T = 60
    s = m.sensitivity(x0, T)
    r = doya_sensitivity(5.0, -2.5, 0.1, x0, T)
    # autograd and the forward recursion: same products, different order → 1e-12 relative.
    assert (s.x_T, s.dx0, s.db) == pytest.approx((r.x_T, r.dx0, r.db), rel=1e-12)
    # central differences, h = 1e-6: truncation O(h²) ~ 1e-12, rounding ~ 1e-16/h = 1e-10, so 1e-7 relative.
    h = 1e-6
    with torch.no_grad():
        fd_x = (m(x0 + h, T=T)[-1] - m(x0 - h, T=T)[-1]) / (2 * h)
        b0 = m.b.clone()
        m.b.copy_(b0 + h); up = m(x0, T=T)[-1]
        m.b.copy_(b0 - h); down = m(x0, T=T)[-1]
        m.b.copy_(b0)
    assert s.dx0 == pytest.approx(float(fd_x), rel=1e-7)
    assert s.db == pytest.approx(float((up - down) / (2 * h)), rel=1e-7)


def test_settled_sensitivity_equals_fixed_point_derivative():
    # Away from the boundary, after settling: dx_T/dx_0 → 0 and dx_T/db → dx*/db = σ′/(1 − wσ′).
    m = DoyaNeuron(w=5.0, b=-2.5, eps=0.1)
    lo = m.fixed_points()[0]
    s = m.sensitivity(0.1, 1500)
    q = lo.x * (1 - lo.x)
    assert abs(s.dx0) < 1e-20
    assert s.db == pytest.approx(q / (1 - 5.0 * q), rel=1e-10)


def test_crossing_the_basin_boundary_explodes_the_finite_ratios():
    m = DoyaNeuron(w=5.0, b=-2.5, eps=0.1)
    lo, mid, hi = m.fixed_points()
    gap = hi.x - lo.x
    T = 3000
    step = 1e-6
    # Near the unstable point, Δx(T)/Δx(0) ≈ gap/step (the perturbed run ends in the other basin).
    near = m.delta_ratio(mid.x - step / 2, T, dx0=step)
    assert near == pytest.approx(gap / step, rel=1e-6)
    away = m.delta_ratio(0.1, T, dx0=step)
    assert abs(away) < 1e-20
    # Δx(T)/Δb: x0 just below x_u(b); raising b moves x_u below x0 (dx_u/db = −1 here).
    near_b = m.delta_ratio(mid.x - 1e-7, T, db=step)
    assert near_b == pytest.approx(gap / step, rel=1e-5)
    away_b = m.delta_ratio(0.1, T, db=step)
    q = lo.x * (1 - lo.x)
    assert away_b == pytest.approx(q / (1 - 5.0 * q), rel=1e-4)  # forward difference: O(step) error
    assert near_b / away_b > 1e6
    assert float(m.b.detach()) == -2.5  # restored


def test_bifurcation_diagram_lies_on_the_closed_form_curve():
    bs = np.linspace(-3.0, -2.0, 101)
    d = doya_bifurcation_diagram(5.0, bs, eps=0.1)
    curve_b, curve_stable = doya_fixed_point_curve(5.0, d.x)
    np.testing.assert_allclose(curve_b, d.b, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(curve_stable, d.stable)
    b_lo, b_hi = d.window
    counts = {float(b): int(np.sum(d.b == b)) for b in bs}
    for b, c in counts.items():
        assert c == (3 if b_lo < b < b_hi else 1)
    assert DoyaNeuron(w=5.0, eps=0.1).bifurcation_diagram(bs).x.shape == d.x.shape


def test_forward_shapes_and_inputs():
    m = DoyaNeuron(w=5.0, b=-2.5, eps=0.1, w_in=2.0)
    u = torch.randn(7, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x0 = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    with torch.no_grad():
        xs = m(x0, u=u)
    assert xs.shape == (8, 3)
    for j in range(3):
        r = doya_sensitivity(5.0, -2.5, 0.1, float(x0[j]), 7, w_in=2.0, u=u[:, j].tolist())
        assert float(xs[-1, j]) == pytest.approx(r.x_T, rel=1e-14)
    with pytest.raises(ConfigError):
        m(x0)
    with pytest.raises(ConfigError):
        DoyaNeuron(eps=0.0)
    with pytest.raises(ConfigError):
        m.delta_ratio(0.5, 10, dx0=1e-3, db=1e-3)
