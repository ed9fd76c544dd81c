"""Contracts of small helpers that serve two call sites each (folded copies): the run log's JSON columns,
the block Krylov methods' argument checks and start block, and the layers a time verdict may speak of."""
from __future__ import annotations

import sqlite3

import numpy as np
import pytest
import torch
from torch import nn

from gradprobe import Probe, RunLogError
from gradprobe.diagnosis import DiagnosisConfig
from gradprobe.diagnosis.findings import Findings
from gradprobe.diagnosis.rules_time import rule_exploding_in_time, rule_vanishing_in_time
from gradprobe.errors import ConfigError
from gradprobe.functional.lanczos import block_krylov_svd, block_lanczos
from gradprobe.runlog import read_run
from gradprobe.trace import LayerFlow, TemporalFlow


# ------------------------------------------------------------------ run log: a value that is not JSON
def _log(tmp_path):
    net = nn.Linear(3, 2)
    with Probe(net, log_dir=tmp_path, run_name="r") as probe:
        for _ in range(2):
            loss = net(torch.randn(4, 3)).pow(2).mean()
            loss.backward()
            probe.step(loss)
    return tmp_path / "r.sqlite"


@pytest.mark.parametrize("table, key_col, col, named", [
    ("meta", "key", "value", "meta value 'created'"),
    ("layouts", "id", "spec", "layout {id}"),
])
def test_a_run_log_value_that_is_not_json_is_a_damaged_log_naming_it(tmp_path, table, key_col, col, named):
    p = _log(tmp_path)
    read_run(p)  # intact: reads
    con = sqlite3.connect(p)
    key = "created" if table == "meta" else con.execute("SELECT min(id) FROM layouts").fetchone()[0]
    con.execute(f"UPDATE {table} SET {col} = ? WHERE {key_col} = ?", ("{not json", key))
    con.commit()
    con.close()
    with pytest.raises(RunLogError, match=f"the run log .* is damaged: {named.format(id=key)} is not JSON"):
        read_run(p)


# ------------------------------------------------------------------ block Krylov methods: arguments and start
A5 = torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64))  # eigen- and singular values 1 … 5


def _lanczos(**kw):
    return block_lanczos(lambda X: X @ A5, 5, k=2, **kw).top


def _svd(**kw):
    return block_krylov_svd(lambda X: X @ A5, lambda U: U @ A5, 5, k=2, **kw).values


@pytest.mark.parametrize("method", [_lanczos, _svd])
@pytest.mark.parametrize("bad", [dict(block=0), dict(tol=0.0), dict(tol=-1e-3)])
def test_block_methods_reject_a_non_positive_block_or_tolerance(method, bad):
    with pytest.raises(ConfigError, match="need block >= 1 and tol > 0"):
        method(**bad)


@pytest.mark.parametrize("method", [_lanczos, _svd])
def test_block_methods_cap_the_block_at_n_and_default_to_a_generator_seeded_with_0(method):
    # block > n: one block of n vectors spans R^5, so the two largest values are exact
    np.testing.assert_allclose(method(block=50), [[5.0, 4.0]], rtol=0, atol=1e-12)
    # no generator: the same start as torch.Generator().manual_seed(0), so the same result bit for bit
    assert np.array_equal(method(block=2), method(block=2, generator=torch.Generator().manual_seed(0)))
    assert not np.array_equal(method(block=2, max_iter=2), method(block=2, max_iter=2, generator=torch.Generator().manual_seed(1)))


# ------------------------------------------------------------------ time rules: which layers count
CFG = DiagnosisConfig()
EMPTY = LayerFlow.from_arrays([])


def _flow(back, name="rnn"):
    """A layer whose ‖∂E/∂h‖ is ``back`` steps back from the loss end (time order is the reverse)."""
    return TemporalFlow(name, None, profile=np.asarray(back, dtype=np.float64)[::-1].copy())


@pytest.mark.parametrize("rule, end", [(rule_vanishing_in_time, 1e-6), (rule_exploding_in_time, 1e6)])
def test_a_time_verdict_needs_min_layers_steps_between_the_first_and_farthest_measured(rule, end):
    n = CFG.min_layers
    enough = np.geomspace(1.0, end, n + 1)  # far − first = min_layers: counts
    too_few = np.geomspace(1.0, end, n)  # far − first = min_layers − 1: does not
    assert rule(Findings(EMPTY, temporal={"a": _flow(enough, "a")}), CFG).layer == "a"
    assert rule(Findings(EMPTY, temporal={"a": _flow(too_few, "a")}), CFG) is None
    # zeros where the gradient has not yet entered do not count as steps; an all-zero layer is skipped
    lead = np.concatenate([[0.0, 0.0], too_few])
    assert rule(Findings(EMPTY, temporal={"a": _flow(lead, "a"), "z": _flow(np.zeros(8), "z")}), CFG) is None
    both = {"a": _flow(np.concatenate([[0.0, 0.0], enough]), "a"), "z": _flow(np.zeros(8), "z")}
    assert rule(Findings(EMPTY, temporal=both), CFG).layer == "a"
