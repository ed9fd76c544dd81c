"""GeometricRNN (Pascanu et al. 2013 Fig. 6; seed 003 eq. 11–13) against closed forms and float64 autograd."""
import numpy as np
import pytest
import torch

from gradprobe.errors import ConfigError
from gradprobe.models.geometric import GeometricRNN, error_surface, linear_closed_form, wall_curve


@pytest.mark.parametrize("w", [0.5, 0.9, 1.0, 1.1, -1.3, 2.0])
@pytest.mark.parametrize("t", [1, 2, 5, 20])
def test_linear_case_closed_form_first_and_second_derivative(w, t):
    # Seed 003 eq. 12-13; autograd (double backward) through t float64 multiplications: 1e-12 relative.
    m = GeometricRNN(w=w, b=0.0, x0=0.7, T=t, activation="linear")
    x_t = m()[-1]
    (d1,) = torch.autograd.grad(x_t, m.w, create_graph=True)
    cf = linear_closed_form(w, 0.7, t)
    assert float(x_t.detach()) == pytest.approx(cf[0], rel=1e-12)
    assert float(d1.detach()) == pytest.approx(cf[1], rel=1e-12)
    if t >= 2:  # for t = 1, ∂x_1/∂w = x_0 does not depend on w (no graph to differentiate)
        (d2,) = torch.autograd.grad(d1, m.w)
        assert float(d2) == pytest.approx(cf[2], rel=1e-12)


def test_linear_closed_form_values_are_the_seed_formulas():
    assert linear_closed_form(3.0, 2.0, 4) == (2.0 * 81.0, 4 * 2.0 * 27.0, 12 * 2.0 * 9.0)
    assert linear_closed_form(3.0, 2.0, 0) == (2.0, 0.0, 0.0)


def test_surface_forward_mode_equals_autograd_on_every_grid_point():
    # The surface uses a hand-written forward-mode recursion; the oracle is reverse-mode autograd on
    # the same grid (E.sum() separates, since grid points do not interact). Both float64, 1e-10 relative
    # on entries above 1e-300 (they differ by summation order over 50 steps).
    ws = np.linspace(-2.0, 12.0, 29)
    bs = np.linspace(-8.0, 4.0, 25)
    s = error_surface(ws, bs)
    W, B = torch.meshgrid(torch.tensor(ws), torch.tensor(bs), indexing="xy")
    W.requires_grad_(True)
    B.requires_grad_(True)
    x = torch.full_like(W, 0.5)
    for _ in range(50):
        x = W * torch.sigmoid(x) + B
    E = (torch.sigmoid(x) - 0.7) ** 2
    gw, gb = torch.autograd.grad(E.sum(), (W, B))
    np.testing.assert_allclose(s.loss, E.detach().numpy(), rtol=1e-12, atol=0)
    np.testing.assert_allclose(s.grad_w, gw.numpy(), rtol=1e-10, atol=1e-300)
    np.testing.assert_allclose(s.grad_b, gb.numpy(), rtol=1e-10, atol=1e-300)


@pytest.mark.parametrize("w,b", [(3.0, -1.0), (6.0, -3.4), (-1.5, 0.8)])
def test_module_loss_and_gradient_match_surface(w, b):
    m = GeometricRNN(w=w, b=b)
    E = m.loss()
    gw, gb = torch.autograd.grad(E, (m.w, m.b))
    s = m.surface([w], [b])
    assert s.loss[0, 0] == pytest.approx(float(E.detach()), rel=1e-12)
    assert s.grad_w[0, 0] == pytest.approx(float(gw), rel=1e-10)
    assert s.grad_b[0, 0] == pytest.approx(float(gb), rel=1e-10)


@pytest.mark.parametrize("w", [5.0, 8.0, 10.0])
def test_exact_explosion_on_the_wall(w):
    # x0 = 0 makes σ(x0) = 1/2 exact, so b = −w/2 keeps x_t = 0 exactly: ∂x_T/∂θ are geometric sums of
    # a = w/4 > 1 and ‖∇E‖ ~ a^T (2^50 ≈ 1e15 at w = 8).
    m = GeometricRNN(w=w, b=-w / 2.0, x0=0.0, T=50)
    E = m.loss()
    gw, gb = torch.autograd.grad(E, (m.w, m.b))
    cw, cb = m.on_wall_gradient()
    a = w / 4.0
    geo = (a**50 - 1.0) / (a - 1.0)
    assert cb == pytest.approx(2 * (0.5 - 0.7) * 0.25 * geo, rel=1e-14)
    assert float(gw) == pytest.approx(cw, rel=1e-12)
    assert float(gb) == pytest.approx(cb, rel=1e-12)
    with pytest.raises(ConfigError):
        GeometricRNN(w=w, b=0.0, x0=0.0).on_wall_gradient()


def test_cliff_follows_the_closed_form_wall():
    # Pascanu Fig. 6 setting (x0 = 0.5, T = 50). For b <= −3 the wall lies where w σ′(1/2) > 1 and the
    # grid's steepest column per row must sit within two grid steps of b = x0 − wσ(x0).
    ws = np.linspace(4.0, 12.0, 801)  # step 0.01
    bs = np.linspace(-6.0, -3.0, 7)
    s = GeometricRNN(w=1.0, b=0.0).surface(ws, bs)
    wall_b, valid = wall_curve(ws)
    for row, b in enumerate(bs):
        w_cliff = s.cliff_per_b()[row]
        w_wall = ws[np.argmin(np.abs(wall_b - b))]
        assert abs(w_cliff - w_wall) <= 2 * 0.01 + 1e-12
        assert valid[np.argmin(np.abs(wall_b - b))]


def test_gradient_explodes_approaching_the_wall():
    # Row b = −4 (Pascanu Fig. 6 setting): the wall is at w* = (x0 − b)/σ(x0) (a = w*σ′(x0) ≈ 1.70).
    # The wall is only ~a^−T ≈ 1e−11 wide: ‖∇E‖ stays O(0.05) at distance 1e−2…1e−6, then climbs.
    b = -4.0
    w_star = (0.5 - b) * (1.0 + np.exp(-0.5))
    deltas = [1e-2, 1e-4, 1e-6, 1e-7, 1e-8]
    g = error_surface([w_star + d for d in deltas] + [w_star], [b]).grad_norm[0]
    assert np.all(np.diff(g) > 0)
    assert g[-2] > 100 * g[0] and g[-1] > 1e9


def test_global_cliff_on_a_coarse_grid_sits_on_the_wall():
    # Where the wall meets the cusp (a → 1) it is widest, so a coarse grid catches it there.
    ws = np.linspace(-2.0, 12.0, 281)  # step 0.05
    bs = np.linspace(-8.0, 4.0, 241)   # step 0.05
    s = error_surface(ws, bs)
    g = s.grad_norm
    w_c, b_c, g_c = s.cliff()
    assert g_c == g.max() and g_c > 1e3 * np.median(g)  # a wall, not a slope
    wall_b, valid = wall_curve(np.array([w_c]))
    assert valid[0] and abs(wall_b[0] - b_c) < 0.05 * (1 + 1 / (1 + np.exp(-0.5)))  # one grid cell


def test_bad_config():
    with pytest.raises(ConfigError):
        GeometricRNN(w=1.0, b=0.0, T=0)
    with pytest.raises(ConfigError):
        GeometricRNN(w=1.0, b=0.0, activation="relu6")
    with pytest.raises(ConfigError):
        error_surface([1.0], [0.0], T=0)
