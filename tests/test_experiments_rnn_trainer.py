"""The fast RNN trainer against autograd, the public Ω, the probe's temporal profile and the authors' clipping rule."""
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradprobe import Probe
from gradprobe.experiments.pascanu import PascanuPoint, train_point
from gradprobe.experiments.rnn_trainer import RNNParams, RNNTrainer, head_for, init_params
from gradprobe.experiments.tasks import make_task
from gradprobe.remedies import pascanu_omega, rnn_vjp

pytestmark = pytest.mark.usefixtures("one_thread")  # small products: one thread, as in training


def _sigmoid_vjp(w, d, prev, nxt):  # δ·∂h_{k+1}/∂h_k for sigmoid units, from the output h_{k+1}
    return (d * nxt * (1 - nxt)) @ w


def reference(p: RNNParams, x, y, activation, head, alpha):
    """Autograd through a plain loop of h_t = φ(W_in u_t + W_rec h_{t−1} + b) (float64), Ω by the public function."""
    act = torch.tanh if activation == "tanh" else torch.sigmoid
    W = {k: v.clone().requires_grad_() for k, v in p.torch_layout(0).items()}
    T, B, _ = x.shape
    h, hs = x.new_zeros(B, W["W_rec"].shape[0]), []
    for t in range(T):
        h = act(x[t] @ W["W_in"].T + h @ W["W_rec"].T + W["b"])
        hs.append(h)
    if head == "softmax_last":
        loss = F.cross_entropy(hs[-1] @ W["W_out"].T + W["b_out"], y)
    elif head == "linear_last":
        loss = ((hs[-1] @ W["W_out"].T + W["b_out"] - y) ** 2).sum(-1).mean()
    else:
        o = torch.stack(hs) @ W["W_out"].T + W["b_out"]
        loss = F.cross_entropy(o.reshape(-1, o.shape[-1]), y.reshape(-1))
    names = list(W)
    gs = torch.autograd.grad(loss, [W[n] for n in names] + hs)
    g, deltas = dict(zip(names, gs[:5])), torch.stack(gs[5:])
    omega = torch.zeros((), dtype=x.dtype)
    if alpha > 0:
        hst = torch.stack(hs).detach()
        vjp = rnn_vjp("tanh") if activation == "tanh" else _sigmoid_vjp
        omega = pascanu_omega(W["W_rec"], deltas, torch.cat([torch.zeros_like(hst[:1]), hst[:-1]]), hst, vjp)
        g["W_rec"] = g["W_rec"] + alpha * torch.autograd.grad(omega, W["W_rec"])[0]
    valid = float((deltas.pow(2).sum(-1) >= 1e-20).double().mean())
    return loss.detach(), g, deltas, omega.detach(), valid


CASES = [("temporal_order", "tanh"), ("addition", "sigmoid"), ("memorization_5bit", "tanh"), ("permutation", "sigmoid")]


def _batches(task, K, T=25, B=6):
    xs, ys = [], []
    for k in range(K):
        b = task.generate(B, T, torch.Generator().manual_seed(100 + k))
        xs.append(b.x.double()[:T] if task.output == "last" else b.x.double())
        ys.append(b.y.double() if task.kind == "regression" else b.y)
    head = head_for(task)
    return torch.stack(xs, 1), torch.stack(ys, 1 if head == "softmax_all" else 0)


@pytest.mark.parametrize("task_name,activation", CASES)
@pytest.mark.parametrize("K", [1, 3])
def test_gradients_equal_autograd_and_public_omega(task_name, activation, K):
    task = make_task(task_name)
    head = head_for(task)
    p = init_params(task.n_in, 20, task.n_out, "basic_tanh", [torch.Generator().manual_seed(s) for s in range(K)],
                    dtype=torch.float64)
    x, y = _batches(task, K)
    tr = RNNTrainer(p.clone(), activation=activation, head=head, alpha=2.0, keep_state_grads=True)
    loss, g, omega, valid = tr.gradients(x, y)
    for k in range(K):
        yk = y[:, k] if head == "softmax_all" else y[k]
        l0, g0, d0, o0, v0 = reference(p.select(k), x[:, k], yk, activation, head, 2.0)
        assert abs(float(loss[k] - l0)) < 1e-14
        assert abs(float(omega[k] - o0)) < 1e-13 and float(o0) > 0
        got = g.torch_layout(k)
        for name in g0:
            torch.testing.assert_close(got[name], g0[name], rtol=1e-11, atol=1e-14)
        torch.testing.assert_close(tr.last_state_grads[:, k], d0, rtol=1e-11, atol=1e-16)
        assert float(valid[k]) == v0 and v0 > 0.2


@pytest.mark.parametrize("task_name,activation", CASES)
@pytest.mark.parametrize("opts", [{}, {"keep_state_grads": True}, {"tanh_backend": "numpy"}, {"fast_tanh": True}])
def test_streaming_path_equals_autograd(task_name, activation, opts):
    """The streaming K > 1 path (time-major, φ′ step by step, weight gradients accumulated inside the
    backward loop; forced here with ``stream_bytes=0``) gives each model what autograd gives it (float64)."""
    task = make_task(task_name)
    head = head_for(task)
    K = 3
    p = init_params(task.n_in, 20, task.n_out, "basic_tanh", [torch.Generator().manual_seed(s) for s in range(K)],
                    dtype=torch.float64)
    x, y = _batches(task, K)
    if opts.get("tanh_backend") or opts.get("fast_tanh"):
        activation = "tanh"  # the tanh variants apply to tanh units only
    tr = RNNTrainer(p.clone(), activation=activation, head=head, stream_bytes=0, **opts)
    assert tr._streams(x)
    loss, g, omega, valid = tr.gradients(x, y)
    assert not bool(omega.any()) and not bool(valid.any())
    assert (tr.last_state_grads is not None) == bool(opts.get("keep_state_grads"))
    tol = {"rtol": 1e-9, "atol": 1e-13} if opts.get("fast_tanh") else {"rtol": 1e-11, "atol": 1e-14}
    for k in range(K):
        yk = y[:, k] if head == "softmax_all" else y[k]
        l0, g0, d0, _, _ = reference(p.select(k), x[:, k], yk, activation, head, 0.0)
        assert abs(float(loss[k] - l0)) < (1e-11 if opts.get("fast_tanh") else 1e-14)
        for name, v in g.torch_layout(k).items():
            torch.testing.assert_close(v, g0[name], **tol)
        if tr.last_state_grads is not None:
            torch.testing.assert_close(tr.last_state_grads[:, k], d0, rtol=1e-11, atol=1e-16)
    torch.testing.assert_close(tr._states_batched(x), tr.states(x), rtol=1e-13, atol=1e-15)  # = the in-memory states


def test_which_path_runs():
    """Streaming only for K > 1, no Ω, and states beyond ``stream_bytes`` (2 MiB by default); K = 1 never."""
    p16 = init_params(6, 50, 4, "basic_tanh", [torch.Generator().manual_seed(s) for s in range(16)])
    p5 = RNNParams(**{n: v[:5] for n, v in p16.tensors().items()})
    x = lambda T, K: torch.zeros(T, K, 20, 6)  # noqa: E731
    assert RNNTrainer(p16)._streams(x(200, 16)) and RNNTrainer(p16)._streams(x(50, 16))  # 12.3 / 3.1 MiB
    assert not RNNTrainer(p5)._streams(x(50, 5))  # 0.97 MiB: in memory (the quick profile's runs)
    assert not RNNTrainer(p16, alpha=2.0)._streams(x(200, 16))  # Ω needs every a_t and δ_t: in memory
    assert not RNNTrainer(p16, stream_bytes=float("inf"))._streams(x(200, 16))
    p1 = RNNParams(**{n: v[:1] for n, v in p16.tensors().items()})
    assert not RNNTrainer(p1, stream_bytes=0)._streams(x(200, 1))
    with pytest.raises(ValueError, match="stream_bytes"):
        RNNTrainer(p16, stream_bytes=-1)


def test_fast_tanh_equals_tanh_in_float64():
    task = make_task("temporal_order")
    p = init_params(6, 50, 4, "basic_tanh", [torch.Generator().manual_seed(s) for s in range(2)], dtype=torch.float64)
    x, y = _batches(task, 2, T=40)
    exact = RNNTrainer(p.clone()).gradients(x, y)
    fast = RNNTrainer(p.clone(), fast_tanh=True).gradients(x, y)
    for a, b in zip(exact[1].tensors().values(), fast[1].tensors().values()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("K", [1, 3])
def test_numpy_tanh_backend_equals_autograd(K):
    """tanh_backend="numpy" (NumPy's tanh written through array views of the state buffer) gives the
    same gradients, Ω and ∂E/∂h_t as autograd through torch.tanh (float64, both forward paths)."""
    task = make_task("temporal_order")
    p = init_params(6, 20, 4, "smart_tanh", [torch.Generator().manual_seed(s) for s in range(K)], dtype=torch.float64)
    x, y = _batches(task, K, T=30)
    tr = RNNTrainer(p.clone(), alpha=2.0, keep_state_grads=True, tanh_backend="numpy")
    loss, g, omega, _ = tr.gradients(x, y)
    for k in range(K):
        l0, g0, d0, o0, _ = reference(p.select(k), x[:, k], y[k], "tanh", "softmax_last", 2.0)
        assert abs(float(loss[k] - l0)) < 1e-14 and abs(float(omega[k] - o0)) < 1e-13
        for name, v in g.torch_layout(k).items():
            torch.testing.assert_close(v, g0[name], rtol=1e-11, atol=1e-14)
        torch.testing.assert_close(tr.last_state_grads[:, k], d0, rtol=1e-11, atol=1e-16)
    # float32: the states are tanh to rounding (NumPy's tanh is within 1.4 ulp, torch's within 0.51)
    x32 = x.float()
    p32 = RNNParams(**{n: v.float() for n, v in p.tensors().items()})
    h_np = RNNTrainer(p32, tanh_backend="numpy").states(x32)
    h_t = RNNTrainer(p32).states(x32)
    torch.testing.assert_close(h_np, h_t, rtol=5e-6, atol=1e-7)
    assert not torch.equal(h_np, h_t)  # a different implementation, not an alias of torch.tanh


@pytest.mark.parametrize("activation", ["tanh", "sigmoid"])
def test_dphi_is_bitwise_the_plain_formula(activation):
    """φ′ from ``out=`` products is bit for bit ``1 − h²`` / ``h(1 − h)`` (float32, tiny values included),
    so the faster form changes no run."""
    g = torch.Generator().manual_seed(0)
    h = torch.rand(4, 31, 7, 50, generator=g) * 2 - 1
    h = (h * torch.rand(h.shape, generator=g) ** 6)[:, 1:]  # strided, as in the trainer; values down to 1e-12
    p = init_params(6, 5, 4, "basic_tanh", [torch.Generator().manual_seed(0)])
    got = RNNTrainer(p, activation=activation)._dphi(h)
    want = 1.0 - h * h if activation == "tanh" else h * (1.0 - h)
    assert torch.equal(got, want)


def test_temporal_profile_is_the_probes():
    """The horizon we record is the one Probe(temporal=True).temporal_flow() reports on the same nn.RNN."""
    task = make_task("temporal_order")
    p = init_params(6, 50, 4, "smart_tanh", [torch.Generator().manual_seed(3)], dtype=torch.float64)
    b = task.generate(8, 150, torch.Generator().manual_seed(4))
    tr = RNNTrainer(p.clone(), keep_state_grads=True)
    tr.gradients(b.x.double()[:, None], b.y[None])
    ours = tr.temporal_flows()[0]

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.RNN(6, 50, dtype=torch.float64)
            self.out = nn.Linear(50, 4, dtype=torch.float64)

        def forward(self, u):
            return self.out(self.rnn(u)[0][-1])

    net = Net()
    w = p.torch_layout(0)
    with torch.no_grad():
        net.rnn.weight_ih_l0.copy_(w["W_in"]), net.rnn.weight_hh_l0.copy_(w["W_rec"])
        net.rnn.bias_ih_l0.copy_(w["b"]), net.rnn.bias_hh_l0.zero_()
        net.out.weight.copy_(w["W_out"]), net.out.bias.copy_(w["b_out"])
    with Probe(net, temporal=True) as probe:
        loss = F.cross_entropy(net(b.x.double()), b.y)
        loss.backward()
        probe.step(loss)
        theirs = probe.temporal_flow()["rnn.l0"]
    np.testing.assert_allclose(ours.per_sequence, theirs.per_sequence, rtol=1e-10, atol=1e-300)
    assert ours.horizon() == theirs.horizon() and 20 < ours.horizon() < 149


def _one_step(clip, fallback=None, scale_out=1.0):
    task = make_task("temporal_order")
    p = init_params(6, 10, 4, "basic_tanh", [torch.Generator().manual_seed(0)], dtype=torch.float64)
    p.V.mul_(scale_out)
    b = task.generate(5, 20, torch.Generator().manual_seed(1))
    x, y = b.x.double()[:, None], b.y[None]
    tr = RNNTrainer(p.clone(), clip=clip, fallback=fallback, lr=0.5)
    _, g, _, _ = RNNTrainer(p.clone()).gradients(x, y)
    st = tr.step(x, y)
    return p, g, tr, st


def test_clipping_follows_the_authors_rule():
    p, g, tr, st = _one_step(clip=1e-3)
    norm = math.sqrt(sum(float(v.pow(2).sum()) for v in g.tensors().values()))
    assert abs(float(st.norm[0]) - norm) < 1e-12 and norm > 1e-3
    step = [(getattr(p, n) - getattr(tr.p, n)) / 0.5 for n in ("U", "R", "b", "V", "c")]
    assert abs(math.sqrt(sum(float(s.pow(2).sum()) for s in step)) - 1e-3) < 1e-15  # c·g/‖g‖, no epsilon
    p2, g2, tr2, st2 = _one_step(clip=1e6)  # below the threshold: the plain gradient
    torch.testing.assert_close(p2.R - tr2.p.R, 0.5 * g2.R, rtol=1e-12, atol=1e-16)


def test_fallback_on_a_non_finite_norm():
    p, g, tr, st = _one_step(clip=1.0, scale_out=1e12)  # ‖g‖ > 1e10: the authors do not trust it
    assert bool(st.fallback[0]) and float(st.norm[0]) > 1e10
    torch.testing.assert_close(tr.p.R, p.R - 0.5 * 0.02 * p.R)  # ∂W_rec ← 0.02·W_rec
    for n in ("U", "b", "V", "c"):
        assert torch.equal(getattr(tr.p, n), getattr(p, n))  # every other gradient 0
    p, g, tr, st = _one_step(clip=None, scale_out=1e12)  # plain SGD: no guard, as in the code
    assert not bool(st.fallback[0])
    torch.testing.assert_close(p.R - tr.p.R, 0.5 * g.R, rtol=1e-9, atol=0)
    nan_grads = RNNParams(**{n: torch.full_like(v, math.nan) for n, v in p.tensors().items()})
    tr = RNNTrainer(p.clone(), clip=1.0)
    tr.gradients = lambda x, y: (torch.zeros(1), nan_grads.clone(), torch.zeros(1), torch.zeros(1))
    st = tr.step(None, None)  # NaN everywhere: the guard still gives a finite step (where, not ×0)
    assert bool(st.fallback[0]) and bool(torch.isfinite(tr.p.R).all())
    torch.testing.assert_close(tr.p.R, p.R - 0.01 * 0.02 * p.R)


def test_vectorized_seeds_equal_runs_trained_alone():
    """K seeds in one batched computation give each run exactly what it gives trained alone (float64)."""
    point = PascanuPoint(task="temporal_order", init="smart_tanh", method="sgd_cr", min_length=10, max_length=16,
                         max_updates=60, val_every=20, val_size=100, val_chunk=50, dtype="float64")
    together = train_point(point, [0, 1, 2])
    for i, seed in enumerate([0, 1, 2]):
        alone = train_point(point, [seed])
        assert together[0][i].keys() == alone[0][0].keys()
        for (s1, n1, v1), (s2, n2, v2) in zip(together[1][i], alone[1][0], strict=True):
            assert (s1, n1) == (s2, n2)
            assert v1 == pytest.approx(v2, rel=1e-9, abs=1e-12), (n1, s1)
        for k, v in alone[0][0].items():
            assert together[0][i][k] == (pytest.approx(v, rel=1e-9) if isinstance(v, float) else v), k
    assert len({tuple(m[-1] for m in metrics) for metrics in together[1]}) == 3  # the seeds do differ


def test_bad_configuration_is_refused():
    p = init_params(6, 5, 4, "basic_tanh", [torch.Generator().manual_seed(0)])
    with pytest.raises(ValueError, match="tanh or sigmoid"):
        RNNTrainer(p, activation="relu")
    with pytest.raises(ValueError, match="clip"):
        RNNTrainer(p, clip=0.0)
    with pytest.raises(ValueError, match="unknown tanh_backend"):
        RNNTrainer(p, tanh_backend="mkl")
    with pytest.raises(ValueError, match="cannot be combined"):
        RNNTrainer(p, fast_tanh=True, tanh_backend="numpy")
    with pytest.raises(ValueError, match="unknown method"):
        PascanuPoint(task="temporal_order", init="basic_tanh", method="adam", min_length=5, max_length=5, max_updates=1)
    with pytest.raises(ValueError, match="own length"):
        train_point(replace(PascanuPoint(task="addition", init="basic_tanh", method="sgd", min_length=10, max_length=10,
                                         max_updates=1, val_size=10, val_chunk=10)), [0, 1])


# ---------------------------------------------------------------------- loop_backend="numpy"
_LOOP_OPTS = [{}, {"clip": 1.0, "alpha": 2.0}, {"stream_bytes": 0}, {"stream_bytes": 0, "keep_state_grads": False}]


def _params(task, K, dtype=torch.float64, init="basic_tanh", H=20):
    return init_params(task.n_in, H, task.n_out, init, [torch.Generator().manual_seed(s) for s in range(K)], dtype=dtype)


@pytest.mark.parametrize("task_name,activation", CASES)
@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("opts", _LOOP_OPTS)
def test_numpy_loop_equals_torch_loop(task_name, activation, K, opts):
    """loop_backend="numpy" (every per-step kernel in NumPy on views of the torch storage) gives what the
    torch loop gives, to 1e-12 in float64: loss, gradients, Ω, ∂E/∂h_t and three clipped SGD updates, on
    both the in-memory path (K = 1, Ω) and the streaming one (K > 1 with ``stream_bytes=0``)."""
    task = make_task(task_name)
    head = head_for(task)
    p = _params(task, K)
    x, y = _batches(task, K)
    kw = {"activation": activation, "head": head, "keep_state_grads": True, **opts}
    ref, got = RNNTrainer(p.clone(), **kw), RNNTrainer(p.clone(), loop_backend="numpy", **kw)
    assert got._streams(x) == ref._streams(x) == (K > 1 and "stream_bytes" in opts)
    assert got.tanh_backend == "numpy" and got.loop_backend == "numpy"
    tight = {"rtol": 1e-12, "atol": 1e-15}
    for _ in range(3):
        (l0, g0, o0, v0), (l1, g1, o1, v1) = ref.gradients(x, y), got.gradients(x, y)
        torch.testing.assert_close(l1, l0, **tight)
        torch.testing.assert_close(o1, o0, **tight)
        assert torch.equal(v1, v0)
        for name, v in g1.tensors().items():
            torch.testing.assert_close(v, g0.tensors()[name], **tight)
        if kw["keep_state_grads"]:
            torch.testing.assert_close(got.last_state_grads, ref.last_state_grads, rtol=1e-12, atol=1e-18)
        s0, s1 = ref.step(x, y), got.step(x, y)
        torch.testing.assert_close(s1.norm, s0.norm, **tight)
        assert torch.equal(s1.fallback, s0.fallback)
        for name, v in got.p.tensors().items():
            torch.testing.assert_close(v, ref.p.tensors()[name], **tight)
    if opts.get("alpha"):
        assert float(o0.min()) > 0  # Ω did contribute
    torch.testing.assert_close(got.states(x), ref.states(x), **tight)
    if K > 1:
        torch.testing.assert_close(got._states_batched(x), ref._states_batched(x), **tight)


@pytest.mark.parametrize("K,opts", [(1, {"alpha": 2.0}), (3, {"alpha": 2.0}), (3, {"stream_bytes": 0})])
@pytest.mark.parametrize("activation", ["tanh", "sigmoid"])
def test_numpy_loop_equals_autograd(K, opts, activation):
    """The NumPy loop against brute-force autograd through a plain float64 loop, Ω by the public function."""
    task = make_task("temporal_order")
    p = _params(task, K, init="smart_tanh")
    x, y = _batches(task, K, T=30)
    alpha = opts.get("alpha", 0.0)
    tr = RNNTrainer(p.clone(), activation=activation, keep_state_grads=True, loop_backend="numpy", **opts)
    loss, g, omega, _ = tr.gradients(x, y)
    for k in range(K):
        l0, g0, d0, o0, _ = reference(p.select(k), x[:, k], y[k], activation, "softmax_last", alpha)
        assert abs(float(loss[k] - l0)) < 1e-14 and abs(float(omega[k] - o0)) < 1e-13
        for name, v in g.torch_layout(k).items():
            torch.testing.assert_close(v, g0[name], rtol=1e-11, atol=1e-14)
        torch.testing.assert_close(tr.last_state_grads[:, k], d0, rtol=1e-11, atol=1e-16)


@pytest.mark.parametrize("opts", [{}, {"clip": 1.0, "alpha": 2.0}])
def test_numpy_loop_seeds_equal_runs_trained_alone(opts):
    """Each of K models trained together with the NumPy loop (streaming path without Ω, in-memory with Ω)
    ends where the same model trained alone ends (float64, 4 updates)."""
    task = make_task("memorization_5bit")
    head = head_for(task)
    K = 3
    p = _params(task, K)
    kw = {"head": head, "loop_backend": "numpy", "stream_bytes": 0, **opts}
    together = RNNTrainer(p.clone(), **kw)
    alone = [RNNTrainer(p.select(k), **kw) for k in range(K)]
    for step in range(4):
        x, y = _batches(task, K, T=12 + step)
        assert together._streams(x) == (not opts)
        st = together.step(x, y)
        for k in range(K):
            s1 = alone[k].step(x[:, k : k + 1], y[:, k : k + 1])
            torch.testing.assert_close(s1.loss[0], st.loss[k], rtol=1e-12, atol=1e-15)
    for k in range(K):
        for name, v in alone[k].p.tensors().items():
            torch.testing.assert_close(v[0], together.p.tensors()[name][k], rtol=1e-12, atol=1e-15)


def test_numpy_loop_float32_rounds_differently_but_close():
    """float32: the NumPy loop is the torch loop to rounding (OpenBLAS sums in another order, NumPy's tanh is
    within 1.4 ulp), not bit for bit."""
    task = make_task("temporal_order")
    p = _params(task, 3, dtype=torch.float32, H=50)
    x, y = (v.float() if v.is_floating_point() else v for v in _batches(task, 3, T=50))
    for opts in ({}, {"stream_bytes": 0}):
        (l0, g0, _, _), (l1, g1, _, _) = (RNNTrainer(p.clone(), loop_backend=lb, **opts).gradients(x, y)
                                          for lb in ("torch", "numpy"))
        torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
        for name, v in g1.tensors().items():
            torch.testing.assert_close(v, g0.tensors()[name], rtol=1e-3, atol=1e-6)
    h0, h1 = (RNNTrainer(p.clone(), loop_backend=lb).states(x) for lb in ("torch", "numpy"))
    torch.testing.assert_close(h1, h0, rtol=5e-6, atol=1e-6)
    assert not torch.equal(h1, h0)  # really NumPy's kernels, not an alias of the torch loop


def test_numpy_loop_saturation_and_overflow_are_silent_as_in_torch():
    """Huge weights: sigmoid's e^{−z} overflows (σ = 0 exactly, as torch.sigmoid gives) and the exploding
    backward reaches ∞/NaN; the NumPy loop raises no floating-point warning (warnings are errors here) and
    the step's guard reacts as it does with the torch loop."""
    task = make_task("temporal_order")
    p = _params(task, 1, dtype=torch.float32, H=20)
    p.U.mul_(1e3), p.R.mul_(1e3), p.V.mul_(1e30)
    x, y = (v.float() if v.is_floating_point() else v for v in _batches(task, 1, T=40))
    for activation in ("sigmoid", "tanh"):
        ref = RNNTrainer(p.clone(), activation=activation, clip=1.0)
        got = RNNTrainer(p.clone(), activation=activation, clip=1.0, loop_backend="numpy")
        h0, h1 = ref.states(x), got.states(x)
        torch.testing.assert_close(h1, h0, rtol=0, atol=1e-6)  # saturated: 0 and ±1 to float32 rounding
        assert torch.equal(h1 == 0, h0 == 0)
        if activation == "sigmoid":
            assert bool((h1 == 0).any())
        s0, s1 = ref.step(x, y), got.step(x, y)
        assert bool(s0.fallback[0]) and torch.equal(s1.fallback, s0.fallback)
        torch.testing.assert_close(got.p.R, ref.p.R)


def test_numpy_loop_refuses_what_it_cannot_run():
    task = make_task("temporal_order")
    p = _params(task, 1, dtype=torch.float32)
    with pytest.raises(ValueError, match="unknown loop_backend"):
        RNNTrainer(p, loop_backend="cuda")
    with pytest.raises(ValueError, match="tanh_backend='torch'"):
        RNNTrainer(p, loop_backend="numpy", tanh_backend="torch")
    with pytest.raises(ValueError, match="fast_tanh"):
        RNNTrainer(p, loop_backend="numpy", fast_tanh=True)
    with pytest.raises(ValueError, match="float32 or float64"):
        RNNTrainer(RNNParams(**{n: v.to(torch.bfloat16) for n, v in p.tensors().items()}), loop_backend="numpy")
    meta = RNNParams(**{n: torch.empty_like(v, device="meta") for n, v in p.tensors().items()})
    with pytest.raises(ValueError, match="needs CPU tensors.*meta"):
        RNNTrainer(meta, loop_backend="numpy")
    RNNTrainer(meta)  # the torch loop is device-agnostic
    tr = RNNTrainer(p, loop_backend="numpy")
    with pytest.raises(ValueError, match="needs CPU tensors.*meta"):
        tr.gradients(torch.empty(5, 1, 4, 6, device="meta"), torch.empty(1, 4, dtype=torch.long, device="meta"))
    # tanh_backend keeps working as before (its default now means "torch" for the torch loop)
    assert RNNTrainer(p).tanh_backend == "torch" and RNNTrainer(p, tanh_backend="numpy").loop_backend == "torch"


def test_train_point_numpy_loop_equals_torch_loop():
    """train_point(loop_backend="numpy") trains the same runs as the torch loop (float64, SGD-CR with Ω and
    clipping, 3 seeds vectorized): every metric and result agrees to rounding."""
    point = PascanuPoint(task="temporal_order", init="smart_tanh", method="sgd_cr", min_length=10, max_length=16,
                         max_updates=40, val_every=20, val_size=100, val_chunk=50, dtype="float64")
    ref, got = (train_point(point, [0, 1, 2], loop_backend=lb) for lb in ("torch", "numpy"))
    for i in range(3):
        for (s1, n1, v1), (s2, n2, v2) in zip(got[1][i], ref[1][i], strict=True):
            assert (s1, n1) == (s2, n2) and v1 == pytest.approx(v2, rel=1e-9, abs=1e-12), (n1, s1)
        for k, v in ref[0][i].items():
            assert got[0][i][k] == (pytest.approx(v, rel=1e-9) if isinstance(v, float) else v), k
    with pytest.raises(ValueError, match="fast_tanh"):
        train_point(replace(point, fast_tanh=True, dtype="float32"), [0], loop_backend="numpy")


@pytest.mark.parametrize("T", [1, 2])
def test_numpy_loop_equals_torch_loop_on_the_shortest_sequences(T):
    """T = 1 (no recurrent step back) and T = 2, every head, both activations, both paths and Ω (float64)."""
    g = torch.Generator().manual_seed(5)
    for K in (1, 3):
        for activation in ("tanh", "sigmoid"):
            for head, O in (("softmax_last", 4), ("softmax_all", 4), ("linear_last", 2)):
                for opts in ({}, {"stream_bytes": 0}, {"alpha": 2.0, "clip": 1.0}):
                    p = init_params(6, 10, O, "basic_tanh", [torch.Generator().manual_seed(s) for s in range(K)],
                                    dtype=torch.float64)
                    x = torch.randn(T, K, 5, 6, generator=g, dtype=torch.float64)
                    y = {"softmax_last": lambda: torch.randint(0, O, (K, 5), generator=g),
                         "softmax_all": lambda: torch.randint(0, O, (T, K, 5), generator=g),
                         "linear_last": lambda: torch.randn(K, 5, O, generator=g, dtype=torch.float64)}[head]()
                    kw = {"activation": activation, "head": head, "keep_state_grads": True, **opts}
                    (l0, g0, _, _), (l1, g1, _, _) = (RNNTrainer(p.clone(), loop_backend=lb, **kw).gradients(x, y)
                                                      for lb in ("torch", "numpy"))
                    torch.testing.assert_close(l1, l0, rtol=1e-12, atol=1e-15)
                    for name, v in g1.tensors().items():
                        torch.testing.assert_close(v, g0.tensors()[name], rtol=1e-12, atol=1e-15)
