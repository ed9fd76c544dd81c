"""Each model figure is drawn from the model's own numbers (checked here against the data)."""
import os

os.environ.setdefault("MPLBACKEND", "Agg")  # headless; must precede the first pyplot import

import numpy as np  # noqa: E402
import pytest  # noqa: E402

plt = pytest.importorskip("matplotlib.pyplot")
from matplotlib.collections import PathCollection, QuadMesh  # noqa: E402

from gradprobe.models.chain import SigmoidChain  # noqa: E402
from gradprobe.models.doya import doya_bifurcation_diagram  # noqa: E402
from gradprobe.models.geometric import error_surface  # noqa: E402
import torch  # noqa: E402

from gradprobe.models.doya import DoyaNeuron  # noqa: E402
from gradprobe.models.plots import (  # noqa: E402
    plot_bifurcation_diagram,
    plot_chain_gradients,
    plot_doya_sensitivity,
    plot_error_surface,
    plot_rnn_jacobian_norms,
)
from gradprobe.models.rnn import SigmoidRNN  # noqa: E402
from reference.fresh import run_python  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def test_chain_plot_shows_the_closed_form_gradient_per_layer(tmp_path):
    chain = SigmoidChain(8, [1.5, -0.7, 2.0, 1.0, 0.3, -2.2, 1.1, 0.9])
    fig = plot_chain_gradients(chain, path=tmp_path / "chain.png")
    (line,) = fig.axes[0].get_lines()
    np.testing.assert_array_equal(line.get_xdata(), np.arange(1, 9))
    np.testing.assert_allclose(line.get_ydata(), np.abs(chain.closed_form_grad().numpy()), rtol=0, atol=0)
    assert fig.axes[0].get_yscale() == "log"
    assert (tmp_path / "chain.png").stat().st_size > 1000


def test_bifurcation_plot_marks_the_window_and_all_fixed_points(tmp_path):
    d = doya_bifurcation_diagram(5.0, np.linspace(-3.0, -2.0, 41))
    fig = plot_bifurcation_diagram(d, path=tmp_path / "doya.png")
    ax = fig.axes[0]
    stable_pts, unstable_pts = (np.asarray(c.get_offsets()) for c in ax.collections if isinstance(c, PathCollection))
    assert len(stable_pts) + len(unstable_pts) == d.b.size
    assert len(unstable_pts) == int(np.sum(~d.stable)) > 0
    assert np.all((unstable_pts[:, 0] > d.window[0]) & (unstable_pts[:, 0] < d.window[1]))
    assert (tmp_path / "doya.png").stat().st_size > 1000


def test_error_surface_plot_draws_loss_and_log_gradient(tmp_path):
    s = error_surface(np.linspace(0.0, 10.0, 21), np.linspace(-6.0, 0.0, 13))
    fig = plot_error_surface(s, path=tmp_path / "surface.png")
    meshes = [c for ax in fig.axes[:2] for c in ax.collections if isinstance(c, QuadMesh)]  # not the colorbars
    assert len(meshes) == 2
    np.testing.assert_allclose(np.asarray(meshes[0].get_array()).reshape(s.loss.shape), s.loss)
    np.testing.assert_allclose(np.asarray(meshes[1].get_array()).reshape(s.loss.shape), np.log10(s.grad_norm))
    assert (tmp_path / "surface.png").stat().st_size > 1000


def test_doya_sensitivity_plot_jumps_at_the_unstable_point(tmp_path):
    neuron = DoyaNeuron(w=5.0, b=-2.5, eps=0.1)
    x0s = np.linspace(0.0, 1.0, 21)  # contains 0.5, the unstable point
    fig = plot_doya_sensitivity(neuron, x0s, T=300, path=tmp_path / "sens.png")
    a1, a2 = fig.axes
    xT = a1.get_lines()[0].get_ydata()
    lo, _, hi = neuron.fixed_points()
    np.testing.assert_allclose(xT[x0s < 0.5], lo.x, atol=1e-4)  # settled into the low basin
    np.testing.assert_allclose(xT[x0s > 0.5], hi.x, atol=1e-4)
    d = a2.get_lines()[0].get_ydata()
    assert np.nanargmax(d) == 10 and d[10] == pytest.approx(1.025**300, rel=1e-12)  # (1 + ε/4)^T at x0 = 1/2
    assert [ln.get_xdata()[0] for ln in a1.get_lines()[1:]] == pytest.approx([0.5], abs=1e-15)  # one unstable point
    assert (tmp_path / "sens.png").stat().st_size > 1000


def test_rnn_jacobian_norm_plot_draws_one_curve_per_sequence(tmp_path):
    net = SigmoidRNN(2, 10, 1, init="smart_tanh", generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    u = torch.randn(15, 3, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    fig = plot_rnn_jacobian_norms(net, u, path=tmp_path / "rnn.png")
    lines = fig.axes[0].get_lines()
    assert len(lines) == 3
    _, x = net(u)
    np.testing.assert_allclose(np.stack([ln.get_ydata() for ln in lines], 1), net.jacobian_norms(x.detach()).numpy())
    assert (tmp_path / "rnn.png").stat().st_size > 1000


def test_plot_without_matplotlib_names_the_extra():
    import sys

    code = (
        "import sys\nsys.modules['matplotlib'] = None\n"
        "from gradprobe.models.plots import plot_chain_gradients\nfrom gradprobe.models import SigmoidChain\n"
        "try:\n    plot_chain_gradients(SigmoidChain(3))\nexcept ImportError as e:\n    print(type(e).__name__, e)\n"
    )
    r = run_python(code, timeout=120, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert "MissingExtraError" in r.stdout and "pip install 'gradprobe[plot]'" in r.stdout, r.stdout + r.stderr
