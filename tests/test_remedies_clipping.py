"""Clipping against torch.nn.utils (the reference implementation) and numpy.percentile (AutoClip)."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from gradprobe.errors import ConfigError
from gradprobe.remedies import AutoClip, GradClipper, NonFiniteGradientError, clip_grad_norm_, clip_grad_value_


def _params(seed=0, scale=1.0, dtype=torch.float64):
    """Parameters of several shapes with random float64 grads (one without grad)."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(5, 3), (7,), (2, 3, 4), (1,)]
    ps = []
    for s in shapes:
        p = nn.Parameter(torch.zeros(s, dtype=dtype))
        p.grad = scale * torch.randn(s, generator=g, dtype=dtype)
        ps.append(p)
    ps.append(nn.Parameter(torch.zeros(3, dtype=dtype)))  # no .grad: must be skipped
    return ps


def _clone(ps):
    out = []
    for p in ps:
        q = nn.Parameter(p.detach().clone())
        q.grad = None if p.grad is None else p.grad.clone()
        out.append(q)
    return out


@pytest.mark.parametrize("norm_type", [1.0, 2.0, 3.0, 0.5, math.inf])
@pytest.mark.parametrize("max_norm", [0.1, 1.0, 1e3])
def test_clip_norm_equals_torch(norm_type, max_norm):
    ps = _params()
    ref = _clone(ps)
    r = clip_grad_norm_(ps, max_norm, norm_type)
    ref_total = torch.nn.utils.clip_grad_norm_(ref, max_norm, norm_type)
    # float64, same per-tensor-then-total reduction: equal up to a few ulps
    assert r.pre_norm == pytest.approx(float(ref_total), rel=1e-14)
    for p, q in zip(ps, ref):
        if p.grad is None:
            assert q.grad is None
        else:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-14, atol=0)
    # the pre-clip norm is the norm of all grads concatenated (Algorithm 1), computed independently
    flat = torch.cat([q.grad.flatten() for q in _params() if q.grad is not None])
    assert r.pre_norm == pytest.approx(float(torch.linalg.vector_norm(flat, norm_type)), rel=1e-12)
    # post_norm is the actual norm of the clipped gradient
    flat_after = torch.cat([p.grad.flatten() for p in ps if p.grad is not None])
    assert r.post_norm == pytest.approx(float(torch.linalg.vector_norm(flat_after, norm_type)), rel=1e-12)
    assert r.clipped == (r.pre_norm > max_norm)
    if r.clipped:
        # Algorithm 1: the clipped norm is the threshold (up to torch's eps = 1e-6 guard)
        assert r.post_norm == pytest.approx(max_norm, rel=2e-6 / r.pre_norm + 1e-14)
    else:
        assert r.scale == 1.0 and r.post_norm == r.pre_norm


def test_clip_direction_unchanged():
    ps = _params(scale=10.0)
    before = torch.cat([p.grad.flatten() for p in ps if p.grad is not None])
    clip_grad_norm_(ps, 1.0)
    after = torch.cat([p.grad.flatten() for p in ps if p.grad is not None])
    cos = torch.dot(before, after) / (before.norm() * after.norm())
    assert float(cos) == pytest.approx(1.0, abs=1e-14)


def test_clip_nonfinite():
    ps = _params()
    ps[0].grad[0, 0] = float("nan")
    saved = ps[1].grad.clone()
    with pytest.raises(NonFiniteGradientError):
        clip_grad_norm_(ps, 1.0, error_if_nonfinite=True)
    assert torch.equal(ps[1].grad, saved)  # untouched when refusing
    with pytest.raises(RuntimeError):  # also a RuntimeError, like torch's
        clip_grad_norm_(ps, 1.0, error_if_nonfinite=True)
    r = clip_grad_norm_(ps, 1.0)
    assert math.isnan(r.pre_norm)


def test_clip_no_grads_and_bad_args():
    p = nn.Parameter(torch.zeros(3))
    r = clip_grad_norm_([p], 1.0)
    assert (r.pre_norm, r.post_norm, r.clipped, r.scale) == (0.0, 0.0, False, 1.0)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError):
            clip_grad_norm_([p], bad)
    with pytest.raises(ConfigError):
        clip_grad_norm_([p], 1.0, norm_type=0)
    with pytest.raises(ValueError):
        clip_grad_value_([p], -1.0)


def test_clip_value_equals_torch():
    ps = _params(scale=2.0)
    ref = _clone(ps)
    flat = torch.cat([p.grad.flatten() for p in ps if p.grad is not None])
    expected_fraction = float((flat.abs() > 1.5).double().mean())
    frac = clip_grad_value_(ps, 1.5)
    torch.nn.utils.clip_grad_value_(ref, 1.5)
    for p, q in zip(ps, ref):
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad)
    assert frac == expected_fraction and 0 < frac < 1


def test_grad_clipper_counts():
    norms = [0.5, 3.0, 0.9, 7.0, 1.5, 0.2]
    clipper = GradClipper(max_norm=1.0, history=4)
    p = nn.Parameter(torch.zeros(4, dtype=torch.float64))
    for n in norms:
        p.grad = torch.full((4,), n / 2.0, dtype=torch.float64)  # ‖g‖ = n
        clipper([p])
    assert clipper.steps == 6
    assert clipper.clipped_steps == sum(n > 1.0 for n in norms)
    assert clipper.clip_rate == pytest.approx(3 / 6)
    assert list(clipper.pre_norms) == pytest.approx(norms[-4:], rel=1e-14)  # bounded history
    assert list(clipper.post_norms) == pytest.approx([min(n, 1.0) for n in norms[-4:]], rel=1e-5)
    assert math.isnan(GradClipper(1.0).clip_rate)


@pytest.mark.parametrize("percentile,history", [(10, None), (50, 5), (90, 3)])
def test_autoclip_matches_numpy_percentile(percentile, history):
    g = torch.Generator().manual_seed(1)
    p = nn.Parameter(torch.zeros(6, dtype=torch.float64))
    clip = AutoClip(percentile=percentile, history=history)
    seen = []
    for step in range(25):
        p.grad = torch.randn(6, generator=g, dtype=torch.float64) * float(torch.rand(1, generator=g) * 10)
        pre = float(p.grad.norm())
        seen.append(pre)
        ref = nn.Parameter(torch.zeros(6, dtype=torch.float64))
        ref.grad = p.grad.clone()
        r = clip([p])
        window = seen if history is None else seen[-history:]
        thr = np.percentile(window, percentile)
        assert list(clip.pre_norms) == pytest.approx(window, rel=1e-14)
        assert r.max_norm == pytest.approx(thr, rel=1e-14)
        torch.nn.utils.clip_grad_norm_([ref], thr)
        torch.testing.assert_close(p.grad, ref.grad, rtol=1e-13, atol=0)
        assert r.pre_norm == pytest.approx(pre, rel=1e-14)
    assert 0 < clip.clip_rate < 1


def test_autoclip_nonfinite_kept_out_of_history():
    p = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    clip = AutoClip(percentile=50)
    p.grad = torch.tensor([3.0, 4.0], dtype=torch.float64)
    clip([p])
    p.grad = torch.tensor([float("inf"), 0.0], dtype=torch.float64)
    clip([p])
    assert list(clip.pre_norms) == [5.0]
    with pytest.raises(ConfigError):
        AutoClip(percentile=101)
