"""Property tests (hypothesis) over randomly built architectures and randomly damaged run logs.

Architectures: a chain of blocks on ``(T, B, F)`` sequences, each a dense block (Linear, an activation
as a module or a function, optional LayerNorm, optional residual) or a recurrent one (RNN/GRU/LSTM,
1-2 layers, maybe bidirectional); some blocks are reused (shared modules), some frozen, some
checkpointed; the input may require grad, a side ``autograd.grad`` pass may run before the step, a
deep copy may be taken while probing. Properties:

* every recorded norm equals the brute-force float64 twin (``reference.brute``);
* after close the model is unchanged: hook dicts, attributes, patched methods, and a fresh forward and
  backward give bit-identical outputs and gradients to those before the probe opened.

Run logs: one cell of a valid log is replaced by a random value; reading it either works or raises
:class:`~gradprobe.errors.RunLogError`, never anything else.

The fast suite runs a small, derandomized budget; ``make test-slow`` runs a larger random one.
"""
from __future__ import annotations

import copy
import math
import shutil
import sqlite3

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.checkpoint import checkpoint

from gradprobe import Probe
from gradprobe.errors import RunLogError
from gradprobe.run import load_run
from reference.brute import brute_flow, layer_modules
from reference.modelstate import bitwise_equal, hooks_and_attributes, values

FAST = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SLOW = settings(max_examples=300, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

ACTIVATIONS = {"tanh": (nn.Tanh, torch.tanh), "relu": (nn.ReLU, torch.relu), "sigmoid": (nn.Sigmoid, torch.sigmoid),
               "gelu": (nn.GELU, F.gelu), "none": (None, None)}


class Dense(nn.Module):
    def __init__(self, d_in, d_out, act, act_module, norm, residual):
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)
        module, fn = ACTIVATIONS[act]
        self.act = module() if (act_module and module is not None) else None
        self.fn = None if act_module else fn
        self.norm = nn.LayerNorm(d_out) if norm else None
        self.residual = residual and d_in == d_out

    def forward(self, h):
        y = self.lin(h)
        if self.act is not None:
            y = self.act(y)
        elif self.fn is not None:
            y = self.fn(y)
        if self.norm is not None:
            y = self.norm(y)
        return h + y if self.residual else y


class Recurrent(nn.Module):
    def __init__(self, kind, d_in, hidden, layers, bidirectional):
        super().__init__()
        self.rnn = getattr(nn, kind)(d_in, hidden, num_layers=layers, bidirectional=bidirectional)

    def forward(self, h):
        return self.rnn(h)[0]


class RandomNet(nn.Module):
    def __init__(self, blocks, plan):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.plan = plan  # (block index, checkpointed?) in call order
        self.checkpointing = True

    def forward(self, x):
        h = x
        for i, ckpt in self.plan:
            blk = self.blocks[i]
            h = checkpoint(blk, h, use_reentrant=False) if ckpt and self.checkpointing else blk(h)
        return h


@st.composite
def architectures(draw):
    width = draw(st.integers(1, 4))
    d_in = width
    blocks, plan, dims = [], [], []  # dims[i] = (in, out) of block i
    for _ in range(draw(st.integers(1, 5))):
        reusable = [i for i, (a, b) in enumerate(dims) if a == b == width]
        if reusable and draw(st.booleans()):
            i = draw(st.sampled_from(reusable))  # a shared module, called again
        elif draw(st.integers(0, 3)) == 0:
            hidden = draw(st.integers(1, 4))
            bi = draw(st.booleans())
            blocks.append(Recurrent(draw(st.sampled_from(["RNN", "GRU", "LSTM"])), width, hidden,
                                    draw(st.integers(1, 2)), bi))
            dims.append((width, hidden * (2 if bi else 1)))
            i = len(blocks) - 1
        else:
            out = draw(st.integers(1, 5))
            blocks.append(Dense(width, out, draw(st.sampled_from(sorted(ACTIVATIONS))), draw(st.booleans()),
                                draw(st.booleans()), draw(st.booleans())))
            dims.append((width, out))
            i = len(blocks) - 1
        plan.append((i, not isinstance(blocks[i], Recurrent) and draw(st.integers(0, 4)) == 0))
        width = dims[i][1]
    frozen = draw(st.lists(st.booleans(), min_size=len(blocks), max_size=len(blocks)))
    seed = draw(st.integers(0, 2**16))
    options = {"input_grad": draw(st.booleans()), "side_pass": draw(st.booleans()), "deepcopy": draw(st.booleans()),
               "temporal": draw(st.booleans())}
    return d_in, blocks, plan, frozen, seed, options


def build(d_in, blocks, plan, frozen, seed):
    torch.manual_seed(seed)
    net = RandomNet([copy.deepcopy(b) for b in blocks], plan)
    for blk in net.blocks:  # fresh weights for this seed
        for m in blk.modules():
            if hasattr(m, "reset_parameters") and m is not blk:
                m.reset_parameters()
    net = net.double()
    for blk, f in zip(net.blocks, frozen):
        blk.requires_grad_(not f)
    x = torch.randn(3, 2, d_in, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return net, x


def loss_of(net, x):
    out = net(x)
    return (out * torch.linspace(-1.0, 2.0, out.shape[-1], dtype=out.dtype)).pow(2).mean() + out.mean()


def forward_backward(net, x):
    """Output and every gradient of one plain step (the bits the probe must not change)."""
    for p in net.parameters():
        p.grad = None
    xx = x.detach().clone().requires_grad_(True)
    out = net(xx)
    loss = out.pow(2).sum()
    if loss.requires_grad:
        loss.backward()
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in net.named_parameters()}
    for p in net.parameters():
        p.grad = None
    return out.detach().clone(), grads, None if xx.grad is None else xx.grad.clone()


def check_architecture(arch):
    d_in, blocks, plan, frozen, seed, opt = arch
    net, x = build(d_in, blocks, plan, frozen, seed)
    if opt["input_grad"]:
        x.requires_grad_(True)
    before_hooks, before_bits = hooks_and_attributes(net), forward_backward(net, x)
    before_values = values(net)
    if not any(p.requires_grad for p in net.parameters()) and not opt["input_grad"]:
        return  # nothing to differentiate: no backward to probe
    with Probe(net, temporal=opt["temporal"], budget=None) as probe:
        twin = copy.deepcopy(net) if opt["deepcopy"] else None
        loss = loss_of(net, x)
        if opt["side_pass"] and x.requires_grad:
            torch.autograd.grad(loss, x, retain_graph=True)
        if twin is not None:
            loss_of(twin, x).backward()
        loss.backward()
        flow = probe.step(loss)
        layers = probe.layers
    # the model is exactly as before: hooks, attributes, patched methods, values, then bits of a new step
    assert hooks_and_attributes(net) == before_hooks
    for p in net.parameters():
        p.grad = None
    assert bitwise_equal(values(net), before_values)
    assert bitwise_equal(forward_backward(net, x), before_bits)
    # every recorded norm equals the brute-force twin (the probe is closed; its step ran unchanged weights)
    net.checkpointing = False
    b = brute_flow(net, lambda: loss_of(net, x))
    twin_name = {id(m): n for n, m in layer_modules(net)}
    for layer in layers:
        i, n = flow.index(layer.name), twin_name[id(layer.module)]
        for q in ("grad_norm", "output_grad_norm", "activation_norm", "weight_norm"):
            want, got, measured = getattr(b, q)[n], flow[q][i], flow.mask(q)[i]
            if math.isnan(want):
                assert not measured, (q, layer.name, got)
            else:
                assert measured, (q, layer.name, want)
                assert got == pytest.approx(want, rel=1e-9, abs=1e-300), (q, layer.name, got, want)
    assert "unmeasured" not in flow.tables


@FAST
@given(architectures())
def test_random_architectures_match_brute_force_and_are_restored(arch):
    check_architecture(arch)


@pytest.mark.slow
@SLOW
@given(architectures())
def test_random_architectures_match_brute_force_and_are_restored_large_budget(arch):
    check_architecture(arch)


# ------------------------------------------------------------------ damaged run logs: RunLogError only
@pytest.fixture(scope="module")
def valid_log(tmp_path_factory):
    d = tmp_path_factory.mktemp("valid")
    torch.manual_seed(0)
    net = RandomNet([Dense(3, 4, "tanh", True, False, False), Recurrent("GRU", 4, 3, 1, False)], [(0, False), (1, False)])
    with Probe(net, log_dir=d, run_name="r", temporal=True, budget=None) as probe:
        for _ in range(3):
            loss = net(torch.randn(4, 2, 3)).pow(2).mean()
            loss.backward()
            probe.step(loss)
        probe.diagnose()
    return d / "r.sqlite"


CELL_VALUES = st.one_of(
    st.none(), st.integers(-2**63, 2**63 - 1), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
    st.binary(max_size=64), st.sampled_from(["[]", "{}", "null", "nan", "1e999", '{"a": 1}', '["f", "<f8", [3]]',
                                              '["nan", "<f8", [1e300]]', '["bits", [-1]]']),
)


def _damage_json(value: str, data) -> str | None:
    import json

    try:
        obj = json.loads(value)
    except ValueError:
        return None

    def mutate(o, depth=0):
        if isinstance(o, dict) and o and depth < 6:
            k = data.draw(st.sampled_from(sorted(o)))
            if data.draw(st.booleans()):
                o = {**o}
                del o[k]
                return o
            return {**o, k: mutate(o[k], depth + 1)}
        if isinstance(o, list) and o and depth < 6:
            k = data.draw(st.integers(0, len(o) - 1))
            return o[:k] + [mutate(o[k], depth + 1)] + o[k + 1:]
        return data.draw(st.sampled_from([None, 0, -5, 1e300, "q", [], {}, [1], True, [-1, 2]]))

    return json.dumps(mutate(obj))


def check_damage(valid_log, tmp_path_factory, data):
    d = tmp_path_factory.mktemp("damaged")
    p = d / "r.sqlite"
    shutil.copy(valid_log, p)
    con = sqlite3.connect(p)
    table = data.draw(st.sampled_from(["meta", "layouts", "steps"]))
    cols = [r[1] for r in con.execute(f"PRAGMA table_info({table})")]
    rowids = [r[0] for r in con.execute(f"SELECT rowid FROM {table}")]
    rowid, col = data.draw(st.sampled_from(rowids)), data.draw(st.sampled_from(cols))
    old = con.execute(f"SELECT {col} FROM {table} WHERE rowid = ?", (rowid,)).fetchone()[0]
    new = _damage_json(old, data) if isinstance(old, str) and data.draw(st.booleans()) else None
    if new is None:
        new = data.draw(CELL_VALUES)
    try:
        con.execute(f"UPDATE {table} SET {col} = ? WHERE rowid = ?", (new, rowid))
        con.commit()
    except (sqlite3.Error, OverflowError):
        return  # the damage is not even storable
    finally:
        con.close()
    try:
        run = load_run(p)
    except RunLogError:
        return
    assert len(run.trace) >= 0 and run.meta is not None  # what a report reads first


@FAST
@given(data=st.data())
def test_damaged_run_log_is_read_or_a_run_log_error(valid_log, tmp_path_factory, data):
    check_damage(valid_log, tmp_path_factory, data)


@pytest.mark.slow
@SLOW
@given(data=st.data())
def test_damaged_run_log_is_read_or_a_run_log_error_large_budget(valid_log, tmp_path_factory, data):
    check_damage(valid_log, tmp_path_factory, data)
