"""The docstring examples of the model modules run and print what they claim."""
import doctest
import importlib
import os

import pytest

from reference.fresh import run_python

MODULES = ["chain", "doya", "geometric", "rnn", "plots"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name, monkeypatch):
    if name == "plots":
        pytest.importorskip("matplotlib")
        monkeypatch.setenv("MPLBACKEND", os.environ.get("MPLBACKEND", "Agg"))
    module = importlib.import_module(f"gradprobe.models.{name}")
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0
    if name == "plots":
        import matplotlib.pyplot as plt

        plt.close("all")


def test_models_package_imports_only_torch_and_numpy():
    # Core rule: optional extras are imported lazily. A fresh interpreter shows what the import pulls in.
    import sys

    code = ("import sys, gradprobe.models as m; "
            "print(sorted(k for k in ('matplotlib', 'scipy', 'sklearn') if k in sys.modules)); "
            "print(all(getattr(m, n).__module__.startswith('gradprobe.models.') for n in m.__all__))")
    out = run_python(code, timeout=None, check=True,
                     env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}).stdout.split("\n")
    assert out[0] == "[]" and out[1] == "True"


def test_every_model_survives_torch_save_and_load(tmp_path):
    # Whole-module pickling (torch.save(model)) needs picklable attributes: no lambdas on modules.
    import torch

    from gradprobe.models import DoyaNeuron, GeometricRNN, RecurrentNet, SigmoidChain, SigmoidRNN

    g = torch.Generator().manual_seed(0)
    models = [SigmoidChain(3), SigmoidRNN(2, 4, 1, init="smart_tanh", generator=g), DoyaNeuron(),
              GeometricRNN(w=5.0, b=-2.0, activation="tanh")]
    models += [RecurrentNet(2, 4, 1, cell=c, generator=g) for c in ("tanh", "irnn", "lstm", "gru", "leaky", "esn")]
    for i, m in enumerate(models):
        torch.save(m, tmp_path / f"m{i}.pt")
        back = torch.load(tmp_path / f"m{i}.pt", weights_only=False)
        for (n1, p1), (n2, p2) in zip(m.state_dict().items(), back.state_dict().items()):
            assert n1 == n2 and torch.equal(p1, p2)
