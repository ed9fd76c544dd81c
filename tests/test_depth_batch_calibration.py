"""compare_depth's finite-width error bar for batch-summed norms: z-scores of random networks ~ N(0, 1).

Oracle: many independent random networks, each measured once with a batch; if the error bar is
right, their z-scores have mean 0 and standard deviation 1. The per-example formula alone (effective
batch 1) gives a spread 2–3× too small, i.e. a test that rarely rejects; the test shows that too.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gradprobe.analysis import compare_depth, effective_batch
from gradprobe.models import DeepMLP
from gradprobe.theory import mean_field

pytestmark = pytest.mark.usefixtures("one_thread")  # small products: one thread, as in training


def _zscores(act, init, width, depth, batch, n_nets, inputs="gauss"):
    """z with the measured effective batch and with the one-example formula, over n_nets random networks."""
    mf = mean_field(act, 2.0 if init == "he" else 1.0)
    new, old = [], []
    if inputs == "digits":
        from gradprobe.experiments.data import digits

        d = digits()
        xd, yd = d.x_train[:batch].double(), d.y_train[:batch]
    for s in range(n_nets):
        g = torch.Generator().manual_seed(1000 + s)
        net = DeepMLP(64, 10, width=width, depth=depth, activation=act, init=init, generator=g).double()
        if inputs == "digits":
            x, y = xd, yd
        else:
            x, y = torch.randn(batch, 64, generator=g, dtype=torch.float64), torch.randint(0, 10, (batch,), generator=g)
        hs = []

        def keep(module, args, out):  # returns None: the output is left as it is
            out.retain_grad()
            hs.append(out)

        hooks = [m.register_forward_hook(keep) for m in [net.input] + [b.linear for b in net.blocks]]
        F.cross_entropy(net(x), y).backward()
        for h in hooks:
            h.remove()
        norms = np.array([float(h.grad.norm()) for h in hs])  # batch-summed, as the probe reports them
        n_eff = effective_batch(hs[-1].grad)
        new.append(compare_depth(norms, mf.chi1, width, r=mf.r, effective_batch=n_eff).z)
        old.append(compare_depth(norms, mf.chi1, width, r=mf.r).z)
    return np.array(new), np.array(old)


def test_effective_batch_limits():
    assert effective_batch(torch.randn(1, 7)) == pytest.approx(1.0)
    q, _ = torch.linalg.qr(torch.randn(20, 5, dtype=torch.float64))
    assert effective_batch(q.T * 3.0) == pytest.approx(5.0)  # 5 orthogonal gradients of equal norm
    with pytest.raises(ValueError, match="per-example"):
        effective_batch(torch.ones(3))
    with pytest.raises(ValueError, match=">= 1"):
        compare_depth([1.0, 1.0, 1.0], 1.0, 100, r=1.0, effective_batch=0.5)


def test_calibration_linear_nets_fast():
    # 80 nets: the sample s.d. of N(0, 1) z-scores has a standard error of 1/√160 ≈ 0.08; tolerance ±0.25 (3 s.e.)
    new, old = _zscores("linear", "xavier", 128, 8, 32, 80)
    assert abs(new.mean()) < 3 / math.sqrt(80) + 0.1
    assert 0.75 < new.std(ddof=1) < 1.25
    assert old.std(ddof=1) < 0.55  # the one-example error bar is 2–3× too wide for batch sums


@pytest.mark.slow
@pytest.mark.parametrize("act,init,inputs", [("linear", "xavier", "gauss"), ("relu", "he", "gauss"),
                                             ("relu", "he", "digits"), ("linear", "xavier", "digits")])
def test_calibration_many_networks(act, init, inputs):
    """300 networks of width 256, depth 10, batch 64. Tolerances: |mean z| < 0.4 and 0.8 < s.d. < 1.35
    (measured: s.d. 0.99 linear, 1.04 ReLU on Gaussian inputs, 1.28 ReLU on digits, where the batch's
    gradient Gram at the top layer understates the averaging of the ReLU masks lower down; mean
    0.2–0.35 for ReLU: the first-order bias). Linear nets also pass a KS test against N(0, 1)."""
    new, old = _zscores(act, init, 256, 10, 64, 300, inputs)
    assert abs(new.mean()) < 0.4
    assert 0.8 < new.std(ddof=1) < 1.35
    assert old.std(ddof=1) < 0.5
    if act == "linear":
        stats = pytest.importorskip("scipy.stats")
        assert stats.kstest(new, "norm").pvalue > 1e-3
