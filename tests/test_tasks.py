"""Task generators against their published definitions (Pascanu et al. 2013; Arjovsky et al. 2016)."""
import pytest
import torch

from gradprobe.errors import ConfigError
from gradprobe.experiments.tasks import TASKS, Copying, make_task

G = lambda seed=0: torch.Generator().manual_seed(seed)  # noqa: E731


@pytest.mark.parametrize("bits, windows", [(2, [(0.1, 0.2), (0.5, 0.6)]), (3, [(0.1, 0.2), (0.3, 0.4), (0.6, 0.7)])])
def test_temporal_order_definition(bits, windows):
    task = make_task("temporal_order" if bits == 2 else "temporal_order_3bit")
    L, B = 100, 2000
    b = task.generate(B, L, G())
    assert b.x.shape == (L, B, 6) and torch.all(b.x.sum(-1) == 1)
    sym = b.x.argmax(-1)  # (L, B)
    is_ab = sym < 2
    assert torch.all(is_ab.sum(0) == bits)  # exactly one A/B per window, distractors elsewhere
    pos = [torch.nonzero(is_ab[:, j]).flatten() for j in range(5)]
    for p in pos:
        for k, (lo, hi) in enumerate(windows):
            assert int(lo * L) <= p[k] < int(hi * L)
    # class = Σ v_i 2^i read back from the sequence
    for j in range(50):
        vals = sym[is_ab[:, j], j]
        assert int(b.y[j]) == sum(int(v) << i for i, v in enumerate(vals))
    # all classes roughly equally likely: chance error 1 - 1/n_out
    freq = torch.bincount(b.y, minlength=task.n_out).float() / B
    assert torch.all((freq - 1 / task.n_out).abs() < 0.05)


@pytest.mark.parametrize("name, const, mse", [("addition", 0.5, 1 / 24), ("multiplication", 0.25, 7 / 144)])
def test_addition_and_multiplication(name, const, mse):
    task = make_task(name)
    b = task.generate(20000, 100, G())
    l = b.x.shape[0]
    assert 100 <= l < 110
    markers = b.x[:, :, 0]
    assert torch.all(markers.sum(0) == 2)
    p0, p1 = b.meta["positions"]
    assert torch.all(p0 < int(0.1 * l)) and torch.all((p1 >= int(0.1 * l)) & (p1 < int(0.5 * l)))
    a, c = b.x[p0, torch.arange(20000), 1], b.x[p1, torch.arange(20000), 1]
    expect = (a + c) / 2 if name == "addition" else a * c
    assert torch.equal(b.y.flatten(), expect)
    # the best constant prediction's MSE is the target variance; with 20k samples the estimate's
    # relative standard error is below 1.5% (bounded targets), so 5% is > 3 s.e.
    got = float(((b.y - const) ** 2).mean())
    assert abs(got - mse) < 0.05 * mse
    # error rule: squared error > 0.04 counts as wrong
    assert task.wrong(b.y + 0.1, b.y).sum() == 0 and task.wrong(b.y + 0.3, b.y).all()


def test_permutation():
    task = make_task("permutation")
    b = task.generate(500, 60, G())
    sym = b.x.argmax(-1)
    assert torch.equal(sym[0], b.y) and torch.all(b.y < 2) and torch.all(sym[1:] >= 2)
    assert b.x.shape == (60, 500, 100)


@pytest.mark.parametrize("n_values, n_pos", [(2, 5), (5, 10)])
def test_memorization(n_values, n_pos):
    task = make_task("memorization") if n_values == 5 else make_task("memorization_5bit")
    length, B = 50, 64
    b = task.generate(B, length, G())
    T = length + 2 * n_pos
    assert b.x.shape == (T, B, n_values + 2) and torch.all(b.x.sum(-1) == 1)
    sym = b.x.argmax(-1)
    assert torch.all(sym[:n_pos] < n_values)
    go = torch.nonzero(sym[:, 0] == n_values + 1).flatten().tolist()
    assert go == [length + n_pos]  # after `length` blanks
    assert torch.equal(b.y[-n_pos:], sym[:n_pos]) and torch.all(b.y[:-n_pos] == n_values)
    perfect = torch.nn.functional.one_hot(b.y, n_values + 1).float()
    assert task.wrong(perfect, b.y).sum() == 0
    perfect[-1, 0] = perfect[-1, 0].roll(1)
    assert task.wrong(perfect, b.y).tolist() == [True] + [False] * (B - 1)


def test_copying_and_adding_arjovsky():
    task = make_task("copying")
    b = task.generate(32, 100, G())
    sym = b.x.argmax(-1)
    assert b.x.shape == (120, 32, 10)
    assert torch.all((sym[:10] >= 1) & (sym[:10] <= 8)) and torch.all(sym[109] == 9)
    assert torch.all(sym[10:109] == 0) and torch.all(sym[110:] == 0)
    assert torch.equal(b.y[-10:], sym[:10]) and torch.all(b.y[:-10] == 0)
    # the memoryless baseline: predict blank until the delimiter, then uniform over 1..8
    logits = torch.full((120, 32, 10), -1e9)
    logits[:110, :, 0] = 0.0
    logits[110:, :, 1:9] = 0.0
    assert abs(float(task.loss(logits, b.y)) - Copying.baseline(100)) < 1e-6
    add = make_task("adding_arjovsky").generate(20000, 50, G())
    p0, p1 = add.meta["positions"]
    assert torch.all(p0 < 25) and torch.all(p1 >= 25)
    assert abs(float(((add.y - 1.0) ** 2).mean()) - 1 / 6) < 0.01


def test_bad_arguments_are_named():
    with pytest.raises(ConfigError, match="unknown task"):
        make_task("nope")
    with pytest.raises(ConfigError, match="length >= 10"):
        make_task("addition").generate(4, 5, G())
    assert set(TASKS) >= {"temporal_order", "addition", "multiplication", "permutation", "memorization"}


def test_generation_is_reproducible():
    t = make_task("temporal_order")
    a, b = t.generate(8, 40, G(3)), t.generate(8, 40, G(3))
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
