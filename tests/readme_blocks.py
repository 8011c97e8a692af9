"""The README's code blocks that tests run (imported by those tests; pytest puts tests/ on sys.path)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_python_block(marker: str) -> str:
    """The one python block between ``<!-- <marker>: start ... -->`` and ``<!-- <marker>: end -->`` in the README."""
    readme = README.read_text()
    start = readme.index(f"<!-- {marker}: start")
    end = readme.index(f"<!-- {marker}: end -->", start)
    blocks = re.findall(r"```python\n(.*?)```", readme[start:end], flags=re.DOTALL)
    assert len(blocks) == 1, f"the README's {marker} markers must hold exactly one python block"
    return blocks[0]
