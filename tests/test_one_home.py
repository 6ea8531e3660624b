"""Facts the package states once: a scan of its source for second copies."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = {path.relative_to(ROOT).as_posix(): path.read_text(encoding="utf-8")
           for path in [ROOT / "app.py", *sorted((ROOT / "sft_space").rglob("*.py"))]}


def holders(pattern: str) -> list[str]:
    return sorted(name for name, text in SOURCES.items() if re.search(pattern, text))


def test_a_number_but_not_a_bool_is_one_rule():
    """JSON's true is Python's 1: settings.is_number is the one test that tells them apart."""
    assert holders(r"isinstance\(\w+, \(int, float\)\) and not isinstance\(\w+, bool\)") == ["sft_space/settings.py"]
