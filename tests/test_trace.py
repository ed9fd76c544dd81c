"""LayerFlow (one step) and Trace (bounded history): construction, validation and the thinning policy."""
from __future__ import annotations

import math

import numpy as np
import pytest

from gradprobe import ConfigError, LayerFlow, Trace


def _flow(step, names=("a", "b"), **kw):
    return LayerFlow.from_arrays(names, step=step, grad_norm=[float(step)] * len(names), **kw)


@pytest.mark.parametrize("max_steps", [2, 3, 5, 8])
def test_thinning_policy_matches_its_specification(max_steps):
    """Oracle: after n appends the trace holds exactly the steps j < n with j % stride == 0, for the
    smallest power-of-two stride that keeps at most max_steps of them (derived independently)."""
    t = Trace(max_steps=max_steps)
    for n in range(1, 300):
        t.append(_flow(n - 1))
        stride = 1
        while math.ceil(n / stride) > max_steps:
            stride *= 2
        assert t.stride == stride, n
        assert t.steps.tolist() == list(range(0, n, stride)), n
        assert len(t) <= max_steps and t.recorded == n
        assert t.last.step == (n - 1) // stride * stride


def test_memory_bound_on_a_long_run():
    t = Trace(max_steps=16)
    f = _flow(0)
    for _ in range(200_000):
        t.append(f)
    assert len(t) <= 16 and t.recorded == 200_000 and t.stride == 16_384


def test_unbounded_trace_keeps_all():
    t = Trace(max_steps=None)
    for s in range(50):
        t.append(_flow(s))
    assert t.steps.tolist() == list(range(50)) and t.stride == 1


@pytest.mark.parametrize("bad", [0, 1, -3])
def test_bad_max_steps(bad):
    with pytest.raises(ConfigError, match="max_steps"):
        Trace(max_steps=bad)


def test_matrix_aligns_changing_layer_sets():
    t = Trace(max_steps=None)
    t.append(LayerFlow.from_arrays(["a", "b"], step=0, grad_norm=[1.0, 2.0], loss=0.5))
    t.append(LayerFlow.from_arrays(["b", "c"], step=1, grad_norm=[3.0, 4.0]))
    assert t.names == ("a", "b", "c")
    m = t.matrix("grad_norm")
    np.testing.assert_array_equal(m, [[1.0, 2.0, np.nan], [np.nan, 3.0, 4.0]])
    np.testing.assert_array_equal(t.losses, [0.5, np.nan])
    with pytest.raises(ConfigError, match="unknown quantity"):
        t.matrix("nope")


def test_empty_trace_last_raises():
    with pytest.raises(IndexError, match="empty"):
        Trace().last


def test_layerflow_defaults_masks_and_readonly():
    f = LayerFlow.from_arrays(["x", "y", "z"], grad_norm=[1.0, np.nan, np.inf])
    assert f.has_grad.tolist() == [True, False, True]
    assert not f.has_output_grad.any() and np.isnan(f.update_ratio).all()
    assert f.backward_rank.tolist() == [2, 1, 0]
    assert f.nonfinite().tolist() == [False, False, True]
    with pytest.raises(ValueError):
        f.grad_norm[0] = 5.0  # arrays are read-only: a recorded step cannot be edited by accident
    assert f.index("y") == 1
    with pytest.raises(ConfigError, match="no layer named 'w'"):
        f.index("w")


def test_layerflow_nonfinite_respects_masks():
    # an unmeasured NaN is not a non-finite measurement; a measured NaN is
    f = LayerFlow.from_arrays(["x", "y"], grad_norm=[np.nan, np.nan], has_grad=[False, True])
    assert f.nonfinite().tolist() == [False, True]


def test_layerflow_validation():
    with pytest.raises(ConfigError, match="shape"):
        LayerFlow.from_arrays(["x", "y"], grad_norm=[1.0])
    with pytest.raises(ConfigError, match="unknown LayerFlow fields"):
        LayerFlow.from_arrays(["x"], gradnorm=[1.0])


def test_table_and_as_dict():
    f = LayerFlow.from_arrays([f"l{i}" for i in range(10)], step=3, grad_norm=np.arange(10.0))
    assert len(f.table(max_rows=4).splitlines()) == 2 + 4 + 1
    d = f.as_dict()
    assert d["step"] == 3 and d["grad_norm"] == list(np.arange(10.0)) and math.isnan(d["update_ratio"][0])
