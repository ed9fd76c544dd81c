"""The Ray executor against a local Ray (``ray.init(num_cpus=2)``): the store ends up exactly as with ``local``."""
import pytest

from gradprobe.experiments.pascanu import Pascanu2013
from gradprobe.experiments.sweep import run_sweep
from gradprobe.experiments.store import Store

def _content(path):
    with Store(path) as s:
        return {r.key: (r.status, r.result, {n: (st.tolist(), v.tolist()) for n, (st, v) in s.metrics(r.key).items()})
                for r in s.runs()}


@pytest.mark.slow
def test_ray_executor_writes_what_the_local_one_writes(tmp_path):
    ray = pytest.importorskip("ray")
    local = tmp_path / "local.sqlite"
    run_sweep(Pascanu2013(), "smoke", local)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        remote = tmp_path / "ray.sqlite"
        status = run_sweep(Pascanu2013(), "smoke", remote, executor="ray")
        assert status.as_dict() == dict(total=6, done=6, failed=0, pending=0, running=0, duplicates=0)
        assert _content(remote) == _content(local)
        again = run_sweep(Pascanu2013(), "smoke", remote, executor="ray")  # nothing left to do
        assert again.done == 6 and again.duplicates == 0
    finally:
        ray.shutdown()


def test_missing_ray_names_the_extra(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ImportError, match=r"gradprobe\[ray\]"):
        run_sweep(Pascanu2013(), "smoke", tmp_path / "s.sqlite", executor="ray")
