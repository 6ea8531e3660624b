"""The operator's settings: every SFT_SPACE_* variable is a field of one class, read in one place, for the app and
the command line alike."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from sft_space import cli
from sft_space.errors import UserError
from sft_space.settings import (DEFAULT_RUNS_DIR, ENVIRONMENT, INTERNAL_VARIABLES, AccessSettings, DataSettings,
                                OperatorSettings, RunSettings, environment_variable, from_environment)

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [ROOT / "app.py", *sorted((ROOT / "sft_space").rglob("*.py"))]
VARIABLES = {environment_variable(spec.name, prefix) for prefix, settings_class in ENVIRONMENT.items()
             for spec in dataclasses.fields(settings_class)}


def test_every_variable_the_package_names_is_a_field_of_the_operators_settings():
    named = {(path.name, name) for path in SOURCES
             for name in re.findall(r"SFT_SPACE_[A-Z0-9_]*[A-Z0-9]", path.read_text(encoding="utf-8"))}
    assert named, "the package names its variables"
    known = VARIABLES | set(INTERNAL_VARIABLES)
    assert {name for _, name in named} <= known, sorted(pair for pair in named if pair[1] not in known)



def test_the_readmes_table_lists_every_variable():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme.split("| environment variable | what it sets |", 1)[1].split("\n\n", 1)[0]
    assert set(re.findall(r"`(SFT_SPACE_[A-Z0-9_]+)`", table)) == VARIABLES


def test_only_the_settings_module_reads_the_variables():
    reading = re.compile(r"environ(\.get\(|\[)\s*[\"']SFT_SPACE_")
    readers = [path.name for path in SOURCES if reading.search(path.read_text(encoding="utf-8"))]
    assert readers == []
    # Every field has help text, as the README's table and the operator's questions need.
    assert all(spec.metadata.get("help") for settings_class in ENVIRONMENT.values()
               for spec in dataclasses.fields(settings_class))


def test_the_variables_are_read_checked_and_named_in_refusals():
    settings = from_environment({"SFT_SPACE_RUNS": "/srv/runs", "SFT_SPACE_PROCESSES": "2",
                                 "SFT_SPACE_LOCAL_PATHS": "yes", "SFT_SPACE_WHO_MAY_TRAIN": " Owner ",
                                 "SFT_SPACE_MAX_ROWS": " ", "SFT_SPACE_SECRET": "k" * 40})
    assert (settings.runs, settings.processes, settings.local_paths, settings.who_may_train) == \
        ("/srv/runs", 2, True, "owner")
    assert settings.max_rows == DataSettings.max_rows  # blank: the default
    assert "k" * 40 not in repr(settings)  # the key that signs visitor ids is never shown
    assert isinstance(settings, AccessSettings)
    assert from_environment({}) == OperatorSettings()
    with pytest.raises(UserError, match=r"max_rows = 0 is out of range.*\(SFT_SPACE_MAX_ROWS\)"):
        from_environment({"SFT_SPACE_MAX_ROWS": "0"})
    with pytest.raises(UserError, match="SFT_SPACE_PROCESSES='two' is not a valid int"):
        from_environment({"SFT_SPACE_PROCESSES": "two"})


def test_the_command_line_keeps_runs_in_the_operators_runs_folder(monkeypatch, tmp_path):
    def settings_of(*flags: str) -> RunSettings:
        return cli.train_settings(cli.build_parser().parse_args(["train", "data.jsonl", *flags]))

    monkeypatch.delenv("SFT_SPACE_RUNS", raising=False)
    assert settings_of().output_dir == DEFAULT_RUNS_DIR == RunSettings.output_dir
    monkeypatch.setenv("SFT_SPACE_RUNS", str(tmp_path / "kept"))
    assert settings_of().output_dir == str(tmp_path / "kept")
    assert settings_of("--output-dir", "elsewhere").output_dir == "elsewhere"
