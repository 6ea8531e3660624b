"""Every problem code, each triggered by a file, with the exact row; and the statistics."""

import copy
import json
import re

import pytest
from builders import chat, distinct_chats

from sft_space import checks, data

ALTERNATING_ONLY = (
    "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
NO_TOOLS = (
    "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('tool role not supported') }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PICKY = (
    "{% for m in messages %}{% if 'FORBIDDEN' in m['content'] %}{{ raise_exception('no forbidden words') }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

U = {"role": "user", "content": "Hi"}
A = {"role": "assistant", "content": "Hello!"}
T = {"role": "tool", "content": "42"}

# code -> (the bad row written as line 4 after three valid rows, template override or None, max_length)
ERROR_CASES = {
    "unreadable_row": ('{"messages": [', None, 2048),
    "not_an_object": ("[1, 2]", None, 2048),
    "unknown_format": ({"question": "Hi", "answer": "Hello!"}, None, 2048),
    "mixed_formats": ({"instruction": "Hi", "input": "", "output": "Hello!"}, None, 2048),
    "no_messages": ({"messages": None}, None, 2048),
    "empty_messages": ({"messages": []}, None, 2048),
    "message_not_an_object": ({"messages": ["Hi", A]}, None, 2048),
    "unknown_role": ({"messages": [U, {"role": "asistant", "content": "Hello!"}]}, None, 2048),
    "missing_content": ({"messages": [{"role": "user"}, A]}, None, 2048),
    "empty_content": ({"messages": [U, {"role": "assistant", "content": "  \n"}]}, None, 2048),
    "non_string_content": ({"messages": [U, {"role": "assistant", "content": 42}]}, None, 2048),
    # Written as the JSON escape it arrives as (a lone surrogate cannot be stored as UTF-8).
    "invalid_text": (json.dumps({"messages": [U, {"role": "assistant", "content": "ok \ud800"}]}), None, 2048),
    "invalid_weight": ({"messages": [U, {**A, "weight": 2}]}, None, 2048),
    "tool_turn_unsupported": ({"messages": [U, A, T, A]}, NO_TOOLS, 2048),
    "system_not_first": ({"messages": [U, {"role": "system", "content": "Be kind."}, A]}, None, 2048),
    "no_assistant_turn": ({"messages": [{"role": "system", "content": "Be kind."}, U]}, None, 2048),
    "last_turn_not_assistant": ({"messages": [U, A, {"role": "user", "content": "Bye"}]}, None, 2048),
    "roles_not_alternating": ({"messages": [U, {"role": "user", "content": "Hello?"}, A]}, ALTERNATING_ONLY, 2048),
    "template_error": ({"messages": [U, {"role": "assistant", "content": "FORBIDDEN"}]}, PICKY, 2048),
    "too_long": (chat(("Hi", "word " * 200)), None, 120),
    "nothing_to_train": ({"messages": [U, {**A, "weight": 0}]}, None, 2048),
    "wrong_type": ({"messages": [{**U, "tool_calls": "lookup"}, A]}, None, 2048),
    # Over the default limits of DataSettings (1,024 KB and 512 messages per row).
    "row_too_large": (chat(("Hi", "x" * 1_100_000)), None, 2048),
    "too_many_messages": (chat(*[(f"q{i}", f"a{i}") for i in range(257)]), None, 2048),
}
WARNING_CASES = {"few_examples", "all_tokens_trained", "roles_not_alternating", "duplicate",
                 "same_prompt_different_answers", "same_answer_many_prompts", "text_split", "ignored_column",
                 "trailing_data", "ignored_files", "rows_not_read", "one_json_object",
                 "control_token_in_text"}
# Source-level problems, tested in test_cli.py::test_unusable_source_exits_1_without_traceback.
SOURCE_CASES = {"unusable_source"}


def report_for(write_jsonl, tokenizer, rows, template=None, max_length=2048, **load_kwargs):
    if template is not None:
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.chat_template = template
    return checks.build_report(data.load_data(str(write_jsonl(rows)), **load_kwargs), tokenizer, max_length)


def test_every_code_has_a_test():
    assert set(ERROR_CASES) | WARNING_CASES | SOURCE_CASES == set(checks.PROBLEM_CODES)


@pytest.mark.parametrize("code", ERROR_CASES)
def test_error_code_names_the_row(write_jsonl, embedded_tokenizer, code):
    bad_row, template, max_length = ERROR_CASES[code]
    report = report_for(write_jsonl, embedded_tokenizer, distinct_chats(3) + [bad_row], template, max_length)
    assert [(p.row, p.code) for p in report.errors] == [(4, code)]
    assert report.errors[0].message.startswith("row 4")
    assert report.rows == 4 and report.valid_rows == 3 and report.invalid_rows == 1
    assert [e.row for e in report.valid_examples] == [1, 2, 3]


def test_bad_utf8_is_unreadable_row(tmp_path, embedded_tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"messages": []}\n{"text": "caf\xe9"}\n')
    loaded = data.load_data(str(path))
    assert [(p.row, p.code) for p in loaded.problems] == [(2, "unreadable_row")]
    assert "UTF-8" in loaded.problems[0].message


def test_image_parts_are_named(write_jsonl, embedded_tokenizer):
    row = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}, A]}
    report = report_for(write_jsonl, embedded_tokenizer, distinct_chats(3) + [row])
    assert report.errors[0].code == "non_string_content" and "image_url" in report.errors[0].message


def test_weight_on_a_user_message_is_invalid(write_jsonl, embedded_tokenizer):
    report = report_for(write_jsonl, embedded_tokenizer, [{"messages": [{**U, "weight": 1}, A]}])
    assert [p.code for p in report.errors] == ["invalid_weight"]


def test_tool_turns_are_kept_when_the_template_shows_them(write_jsonl, embedded_tokenizer):
    report = report_for(write_jsonl, embedded_tokenizer, [{"messages": [U, A, T, A]}])
    assert not report.errors and report.valid_examples[0].messages[2] == T


def test_non_alternating_roles_are_a_warning_when_the_template_allows_them(write_jsonl, embedded_tokenizer):
    report = report_for(write_jsonl, embedded_tokenizer, distinct_chats(10) + [{"messages": [U, U, A]}])
    assert not report.errors
    assert [(p.row, p.code) for p in report.warnings] == [(11, "roles_not_alternating")]


def test_few_examples_and_plain_text_warnings(write_jsonl, embedded_tokenizer):
    report = report_for(write_jsonl, embedded_tokenizer, [{"text": "One."}, {"text": "Two."}])
    assert [p.code for p in report.warnings] == ["few_examples", "all_tokens_trained"]
    assert report.valid_rows == 2 and not report.errors
    report = report_for(write_jsonl, embedded_tokenizer, distinct_chats(10))
    assert report.warnings == []


def test_a_row_with_several_problems_reports_each(write_jsonl, embedded_tokenizer):
    row = {"messages": [{"role": "human", "content": ""}, {"role": "assistant", "content": None}]}
    report = report_for(write_jsonl, embedded_tokenizer, [row])
    assert [(p.row, p.code) for p in report.errors] == [(1, "unknown_role"), (1, "empty_content"), (1, "missing_content")]


def test_statistics(write_jsonl, embedded_tokenizer):
    rows = [chat(("Hi", "Hello!")), chat(("Hi", "Yes."), ("And?", "No."), system="Short."), chat(("Q", "word " * 300))]
    report = report_for(write_jsonl, embedded_tokenizer, rows, max_length=200)
    stats = report.stats()
    assert stats["examples"] == 2 and stats["rows_over_max_length"] == 1
    assert stats["turns_per_example"] == {"min": 2, "p10": 2, "median": 5, "p90": 5, "max": 5}
    # "Hello!<|im_end|>" is 3 trained tokens; "Yes.<|im_end|>" + "No.<|im_end|>" is 6.
    assert stats["trained_tokens_per_example"]["min"] == 3 and stats["trained_tokens_per_example"]["max"] == 6
    assert stats["total_trained_tokens"] == 9
    assert stats["total_tokens"] == sum(n for _, n, _ in report.token_counts)
    assert report.to_dict()["valid_rows"] == 2


def test_a_refusal_of_the_whole_source_has_the_shape_of_every_report(write_jsonl, embedded_tokenizer):
    """validate --json prints one object whatever happens: a source it cannot use gives the keys a report has
    (problem_counts included), from the one place that makes them (Report.to_dict)."""
    from sft_space import cli

    checked = checks.check_data(data.DataSettings(source=str(write_jsonl([chat(("Hi", "Hello!"))]))),
                                embedded_tokenizer).to_dict()
    args = cli.build_parser().parse_args(["validate", "missing.jsonl", "--json"])
    refused = cli.json_refusal(args, "missing.jsonl: no such file; check the path.")
    assert refused.keys() == checked.keys() and refused["stats"].keys() == checked["stats"].keys()
    assert refused["errors"] == [{"row": None, "code": "unusable_source",
                                  "message": "missing.jsonl: no such file; check the path."}]
    assert refused["problem_counts"] == {"unusable_source": 1} and refused["valid_rows"] == 0


def test_the_advice_about_invalid_rows_is_written_once():
    """The app's two tabs, the run and the command line say what to do about invalid rows with one sentence
    (checks.invalid_rows_advice), each naming its own way to skip them."""
    from pathlib import Path

    package = Path(checks.__file__).parent
    writers = sorted(path.name for path in package.rglob("*.py")
                     if re.search(r"\bvalid ones", path.read_text(encoding="utf-8")))
    assert writers == ["checks.py"]
    assert checks.invalid_rows_advice(10, checks.SKIP_ON_COMMAND_LINE) == (
        "Fix them in your file, or add --skip-invalid-rows to train on the 10 valid ones.")
