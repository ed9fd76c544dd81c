"""Every docstring example in the package runs (docstrings give a runnable example)."""
import doctest
import importlib
import pkgutil

import pytest

import gradprobe

MODULES = sorted(
    m.name for m in pkgutil.walk_packages(gradprobe.__path__, prefix="gradprobe.") if not m.name.endswith("__main__")
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} doctest failure(s) in {name}"
