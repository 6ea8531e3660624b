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


def test_every_numeric_setting_has_bounds_that_are_enforced():
    """RELIABILITY.md's claim: a number from a flag, a config file, the environment or the page is checked against
    bounds declared once, in every settings class."""
    import dataclasses

    import pytest

    from sft_space import settings
    from sft_space.errors import UserError

    classes = [value for value in vars(settings).values()
               if isinstance(value, type) and dataclasses.is_dataclass(value) and value.__module__ == settings.__name__]
    assert len(classes) >= 7
    for settings_class in classes:
        for spec in dataclasses.fields(settings_class):
            if settings.field_type(spec) not in (int, float):
                continue
            assert "bounds" in spec.metadata, f"{settings_class.__name__}.{spec.name} has no bounds"
            low, _ = spec.metadata["bounds"]
            with pytest.raises(UserError, match="out of range"):
                settings_class(**{spec.name: low - 1})


def test_comments_name_no_issue_of_a_tracker_outside_the_repository():
    """History is git's: the code and its tests explain why, and point at docs/ for measurements."""
    tests = {path.relative_to(ROOT).as_posix(): path.read_text(encoding="utf-8")
             for path in sorted((ROOT / "tests").glob("*.py"))}
    assert [name for name, text in {**SOURCES, **tests}.items() if re.search(r"\b[Ii]ssues? #?\d+", text)] == []


def test_a_hub_id_rather_than_a_path_and_waiting_on_a_thread_have_one_home_each():
    """hub.is_hub_name decides whether a name is the Hub's or a path here; threads.wait_for is the one way to wait
    on work with a deadline or a stop."""
    both = r"is_repo_id\(.*\b(exists|is_dir)\(|\b(exists|is_dir)\(.*is_repo_id\("
    assert holders(both) == ["sft_space/hub.py"]
    assert holders(r"outcome\[\"error\"\]|\.join\(\w*seconds\w*\)") == ["sft_space/threads.py"]
