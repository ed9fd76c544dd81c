"""The README's examples are executed: every ```python block runs top to bottom in one namespace."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    assert blocks, "README has no python example"
    ns: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), ns)
