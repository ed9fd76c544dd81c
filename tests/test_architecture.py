"""The house's floors, read off the source: every import runs downward (design.md), siblings never import
each other, and a function-level import is only ever an optional extra.

The floors, bottom to top (a module may import its own package and any lower floor)::

    0 errors, _version, _deprecation (keeps renamed public names working, warning), _display (how results read)
    1 functional                       pure tensor math
    2 trace, runlog                    the data contract
    3 probe | theory | remedies | models     siblings: none imports another
    4 analysis
    5 diagnosis
    6 run, monitor, oneshot, training, specs  the composition (may import each other)
    7 report
    8 experiments | integrations       siblings
    9 cli
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "gradprobe"

FLOORS = {
    "errors": 0, "_version": 0, "_deprecation": 0, "_display": 0,
    "functional": 1,
    "trace": 2, "runlog": 2,
    "probe": 3, "theory": 3, "remedies": 3, "models": 3,
    "analysis": 4,
    "diagnosis": 5,
    "run": 6, "monitor": 6, "oneshot": 6, "training": 6, "specs": 6,
    "report": 7,
    "experiments": 8, "integrations": 8,
    "cli": 9,
}
#: floors whose packages are siblings (may not import each other); other floors' members may
SIBLING_FLOORS = {3, 8}
#: third-party packages that are optional extras: the only ones a function may import lazily
EXTRAS = {"matplotlib", "scipy", "sklearn", "rich", "lightning", "pytorch_lightning", "transformers",
          "tensorboard", "torch.utils.tensorboard", "ray", "pandas", "accelerate", "tqdm", "hypothesis",
          "backpack", "cockpit"}


def _modules():
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).with_suffix("")
        parts = rel.parts
        if parts == ("__init__",) or parts[0] == "__main__":
            continue  # the package face re-exports from every floor
        yield path, parts[0]


def _imports(tree: ast.AST):
    """(module name, lineno, at top level?) for every import in the file."""
    top = set(map(id, tree.body))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, node.lineno, id(node) in top
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module, node.lineno, id(node) in top


def _top_level_nodes(tree: ast.Module) -> set[int]:
    """Imports at module level, including inside module-level if/try blocks (still eager)."""
    eager = set()
    for node in tree.body:
        for sub in ast.walk(node) if isinstance(node, (ast.If, ast.Try)) else [node]:
            if isinstance(sub, (ast.Import, ast.ImportFrom)):
                eager.add(id(sub))
    return eager


def _floor_of(module: str) -> tuple[str, int] | None:
    if not module.startswith("gradprobe.") and module != "gradprobe":
        return None
    parts = module.split(".")
    if len(parts) == 1:
        return "gradprobe", 99
    return parts[1], FLOORS[parts[1]]


def test_every_module_has_a_floor():
    missing = sorted({pkg for _, pkg in _modules() if pkg not in FLOORS})
    assert not missing, f"add these to FLOORS (and to the README's layout): {missing}"


def test_imports_run_downward_and_siblings_stay_apart():
    bad = []
    for path, pkg in _modules():
        here = FLOORS[pkg]
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for name, line, _ in _imports(tree):
            target = _floor_of(name)
            if target is None:
                continue
            tpkg, floor = target
            if tpkg == pkg:
                continue
            if floor > here or (floor == here and here in SIBLING_FLOORS) or tpkg == "gradprobe":
                bad.append(f"{path.relative_to(SRC)}:{line} ({pkg}, floor {here}) imports {name} (floor {floor})")
    assert not bad, "imports that run upward or sideways:\n" + "\n".join(bad)


@pytest.mark.parametrize("path", [p for p, _ in _modules()], ids=lambda p: str(p.relative_to(SRC)))
def test_no_lazy_import_except_optional_extras(path):
    """A function-level import of gradprobe or of a hard dependency protects nothing: it only hides an
    arrow of the import graph. Optional extras are imported where a feature needs them."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    eager = _top_level_nodes(tree)
    lazy = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in eager:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for n in names:
                if not any(n == e or n.startswith(e + ".") for e in EXTRAS):
                    lazy.append(f"line {node.lineno}: {n}")
    assert not lazy, f"{path.relative_to(SRC)} imports inside a function: {lazy}"
