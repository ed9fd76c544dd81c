"""The docstring examples of the model modules run and print what they claim."""
import doctest
import importlib
import os

import pytest

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
    import subprocess
    import sys

    code = ("import sys, gradprobe.models as m; "
            "print(sorted(k for k in ('matplotlib', 'scipy', 'sklearn') if k in sys.modules)); "
            "print(all(getattr(m, n).__module__.startswith('gradprobe.models.') for n in m.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}).stdout.split("\n")
    assert out[0] == "[]" and out[1] == "True"
