"""`validate` on the command line: --keep-duplicates, and the progress line on larger sources (stderr only)."""

import io
import json
import sys

import pytest
from builders import chat, distinct_chats

from sft_space import cli

PROGRESS_ROWS = cli.PROGRESS_FROM_ROWS + 100


def validate(*args):
    return cli.main(["validate", *map(str, args)])


@pytest.fixture
def with_repeats(write_jsonl):
    # Rows 13 and 14 repeat rows 1 and 2 exactly.
    return write_jsonl(distinct_chats(12) + distinct_chats(2))


def test_duplicates_are_dropped_unless_kept(with_repeats, tiny_model_dir, capsys):
    assert validate(with_repeats, "--model", tiny_model_dir, "--json") == 0
    dropped = json.loads(capsys.readouterr().out)
    assert dropped["stats"]["duplicates_dropped"] == 2 and dropped["stats"]["examples"] == 12
    assert dropped["problem_counts"]["duplicate"] == 2 and dropped["valid_rows"] == 14
    assert all("dropped before training" in w["message"] for w in dropped["warnings"] if w["code"] == "duplicate")

    assert validate(with_repeats, "--model", tiny_model_dir, "--json", "--keep-duplicates") == 0
    kept = json.loads(capsys.readouterr().out)
    assert kept["stats"]["duplicates_dropped"] == 0 and kept["stats"]["examples"] == 14
    assert kept["problem_counts"]["duplicate"] == 2 and kept["valid_rows"] == 14
    assert all("kept" in w["message"] for w in kept["warnings"] if w["code"] == "duplicate")


def test_the_readable_report_says_whether_duplicates_are_kept(with_repeats, tiny_model_dir, capsys):
    assert validate(with_repeats, "--model", tiny_model_dir) == 0
    assert "exact duplicates: 2 repeat(s) dropped before training" in capsys.readouterr().out
    assert validate(with_repeats, "--model", tiny_model_dir, "--keep-duplicates") == 0
    assert "exact duplicates: 2 repeat(s) kept for training (--keep-duplicates)" in capsys.readouterr().out


def test_keep_duplicates_is_the_settings_field_and_still_reports_errors(write_jsonl, tiny_model_dir, capsys):
    args = cli.build_parser().parse_args(["validate", "x.jsonl", "--keep-duplicates"])
    assert cli.from_arguments(cli.DataSettings, args).keep_duplicates is True
    # Kept repeats do not hide real errors: the exit status still says some rows are invalid.
    path = write_jsonl(distinct_chats(12) + distinct_chats(1) + [chat(("Hi", ""))])
    assert validate(path, "--model", tiny_model_dir, "--json", "--keep-duplicates") == 1
    report = json.loads(capsys.readouterr().out)
    assert report["stats"]["duplicates_dropped"] == 0 and report["problem_counts"]["duplicate"] == 1


@pytest.fixture(scope="module")
def many_rows(tmp_path_factory):
    path = tmp_path_factory.mktemp("progress") / "many.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in distinct_chats(PROGRESS_ROWS)), encoding="utf-8")
    return path


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_is_redrawn_in_place_on_a_terminal_and_json_stays_one_object(many_rows, tiny_model_dir,
                                                                               capsys, monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert validate(many_rows, "--model", tiny_model_dir, "--json") == 0
    out = capsys.readouterr().out
    report = json.loads(out)  # fails unless stdout is exactly one JSON document
    assert report["rows"] == PROGRESS_ROWS and "Checking" not in out
    shown = terminal.getvalue()
    assert shown.count("\r") >= 2 and f"\rChecking: {PROGRESS_ROWS:,} of {PROGRESS_ROWS:,} rows (100%)" in shown
    # Redrawn, not scrolled: the only line break is the one that ends the line for what follows.
    assert shown.endswith("\n") and shown.count("\n") == 1


def test_progress_off_a_terminal_is_plain_lines(many_rows, tiny_model_dir, capsys):
    assert validate(many_rows, "--model", tiny_model_dir) == 0
    captured = capsys.readouterr()
    assert "\r" not in captured.err
    lines = captured.err.splitlines()
    assert lines[-1] == f"Checking: {PROGRESS_ROWS:,} of {PROGRESS_ROWS:,} rows (100%)"
    assert all(line.startswith(("Reading: ", "Checking: ")) for line in lines)
    assert "Checking" not in captured.out and f"{PROGRESS_ROWS} rows" in captured.out


def test_a_small_source_has_no_progress_line(write_jsonl, tiny_model_dir, capsys, monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert validate(write_jsonl(distinct_chats(12)), "--model", tiny_model_dir, "--json") == 0
    assert terminal.getvalue() == "" and json.loads(capsys.readouterr().out)["rows"] == 12


def test_the_progress_line_writes_plain_lines_now_and_then(monkeypatch, capsys):
    """Off a terminal, a line at most every PLAIN_PROGRESS_SECONDS, and always the last."""
    clock = iter([0.0, 1.0, 6.0, 7.0])
    monkeypatch.setattr(cli.time, "monotonic", lambda: next(clock))
    progress = cli.ProgressLine()
    for done in (5000, 10000, 15000):
        progress(done, None)
    progress(20000, 20000)
    progress.close()
    assert capsys.readouterr().err.splitlines() == ["Reading: 5,000 rows", "Reading: 15,000 rows",
                                                    "Checking: 20,000 of 20,000 rows (100%)"]


@pytest.mark.parametrize("command", ["validate", "preview", "train"])
def test_a_missing_file_is_refused_before_any_model_loads(command, tmp_path, monkeypatch, capsys):
    """'No such file' is said before the model's tokenizer loads, which takes seconds."""
    from sft_space import models

    monkeypatch.setattr(models, "load_tokenizer", lambda *a, **k: pytest.fail("a tokenizer was loaded"))
    missing = tmp_path / "nope.jsonl"
    extra = ["--output-dir", str(tmp_path / "runs")] if command == "train" else []
    assert cli.main([command, str(missing), *extra]) == 1
    assert f"{missing}: no such file" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
