"""The documentation site's examples are executed: on every page, the ```python blocks run top to bottom in
one namespace, and every ``gradprobe ...`` line of a ```bash block runs through the CLI (exit 0 or 1: a
usage error, exit 2, is a broken example), in a fresh working directory per page."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from gradprobe.cli import main

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(p.name for p in DOCS.glob("*.md"))
CAPABILITIES = ("measure", "time", "theory", "doctor", "remedies", "report", "integrations", "experiments")


def test_a_page_per_capability_and_every_page_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    for name in CAPABILITIES:
        assert f"{name}.md" in PAGES, name
    for page in PAGES:
        assert page in nav, f"{page} is not in mkdocs.yml's nav"


@pytest.mark.parametrize("page", PAGES)
def test_page_examples_run(page, tmp_path, monkeypatch, capsys):
    text = (DOCS / page).read_text(encoding="utf-8")
    blocks = re.findall(r"```(python|bash)\n(.*?)```", text, flags=re.S)
    monkeypatch.chdir(tmp_path)
    ns: dict = {"__name__": f"docs_{page[:-3]}"}
    for lang, block in blocks:
        if lang == "python":
            exec(compile(block, str(DOCS / page), "exec"), ns)
            continue
        for line in block.splitlines():
            if line.startswith("gradprobe "):
                code = main(shlex.split(line.split("#")[0])[1:])
                assert code in (0, 1), f"{page}: `{line}` exited {code}: {capsys.readouterr().err}"


def test_what_users_read_cites_sources_by_name():
    """The seed documents' file numbers mean something only inside the team: the library (docstrings,
    evidence, CLI text), the documentation, the examples and the repository's Markdown cite papers by
    name ("Pascanu et al. 2013"), never "seed 003"."""
    pattern = re.compile(r"\bseeds? ?0\d\d\b|shared/seeds", re.IGNORECASE)
    files = [*(ROOT / "src").rglob("*.py"), *DOCS.glob("*.md"), *(ROOT / "examples").glob("*.py"),
             *(ROOT / "benchmarks").glob("*.py"), *ROOT.glob("*.md")]
    hits = [f"{path.relative_to(ROOT)}:{n}: {line.strip()}" for path in files
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if pattern.search(line)]
    assert not hits, "\n".join(hits)
