"""Data as other tools write it, and at real scale: formats, repeats, long texts, streamed Hub
datasets, values of any type in any place, and a report that stays readable for tens of thousands of rows."""

import datetime
import decimal
import json

import pytest
from builders import chat, distinct_chats
from hypothesis import HealthCheck, given, settings, strategies as st

from sft_space import checks, data, formats, render
from sft_space.settings import DataSettings

U = {"role": "user", "content": "What is the weather in Paris?"}
A = {"role": "assistant", "content": "Sunny, 21 °C."}
ALTERNATING_ONLY = (
    "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def report_for(write_jsonl, tokenizer, rows, max_length=2048, template=None, **kwargs):
    if template is not None:
        import copy

        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.chat_template = template
    return checks.build_report(data.load_data(str(write_jsonl(rows))), tokenizer, max_length, **kwargs)


def codes(problems):
    return [(p.row, p.code) for p in problems]


# ------------------------------------------------------------------------------------ formats of other tools


@pytest.mark.parametrize("key", ["text", "value", "content"])
def test_content_parts_keyed_text_value_or_content_are_joined(write_jsonl, embedded_tokenizer, key):
    """LLaMA-Factory's newer format keys text parts 'value': every such row was rejected, with a message that
    contradicted itself ('a list of text parts; ... keep only text parts')."""
    row = {"messages": [{"role": "user", "content": [{"type": "text", key: "Hi "}, {key: "there"}]},
                        {"role": "assistant", "content": [{"type": "text", key: "Hello!"}]}]}
    loaded = data.load_data(str(write_jsonl([row])))
    assert loaded.examples[0].messages == [{"role": "user", "content": "Hi there"},
                                           {"role": "assistant", "content": "Hello!"}]
    sharegpt = {"conversations": [{"from": "human", "value": [{"type": "text", key: "Hi"}]},
                                  {"from": "gpt", "value": "Hello!"}]}
    assert data.load_data(str(write_jsonl([sharegpt], "s.jsonl"))).examples[0].messages[0]["content"] == "Hi"
    report = report_for(write_jsonl, embedded_tokenizer, [row])
    assert not report.errors and report.valid_rows == 1


def test_parts_that_are_not_text_are_named_without_contradiction(write_jsonl, embedded_tokenizer):
    row = {"messages": [{"role": "user", "content": [{"type": "text", "value": "Look:"}, {"type": "image", "image": "x"}]},
                        A]}
    report = report_for(write_jsonl, embedded_tokenizer, [row])
    assert codes(report.errors) == [(1, "non_string_content")]
    assert "image, text" in report.errors[0].message and "keep only text parts" not in report.errors[0].message
    broken = {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}, A]}
    message = report_for(write_jsonl, embedded_tokenizer, [broken]).errors[0].message
    assert "text (without one string under 'text', 'value' or 'content')" in message


@pytest.mark.parametrize("key", ["weight", "loss_weight", "train"])
@pytest.mark.parametrize("zero, one", [(0, 1), (False, True), (0.0, 1.0)])
def test_weights_as_other_trainers_write_them(write_jsonl, embedded_tokenizer, key, zero, one):
    row = {"messages": [U, {**A, key: zero}, {"role": "user", "content": "And Rome?"},
                        {"role": "assistant", "content": "Rainy.", key: one}]}
    loaded = data.load_data(str(write_jsonl([row])))
    assert [m.get("weight") for m in loaded.examples[0].messages] == [None, 0, None, 1]
    report = report_for(write_jsonl, embedded_tokenizer, [row])
    assert not report.errors
    # "Rainy.<|im_end|>" only: the first reply is context.
    assert report.token_counts[0][2] == len(embedded_tokenizer("Rainy.", add_special_tokens=False)["input_ids"]) + 1


@pytest.mark.parametrize("weight", [0.5, 2, "1", None, [1]])
def test_a_weight_that_is_not_0_or_1_is_invalid_and_named(write_jsonl, embedded_tokenizer, weight):
    report = report_for(write_jsonl, embedded_tokenizer, [{"messages": [U, {**A, "loss_weight": weight}]}])
    assert codes(report.errors) == [(1, "invalid_weight")] and "loss_weight" in report.errors[0].message


def tool_calling_rows(n):
    """OpenAI tool calls: assistant (with a call) -> tool -> assistant, as in a real function-calling file."""
    rows = []
    for i in range(n):
        call = {"id": f"c{i}", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}
        rows.append({"messages": [{"role": "user", "content": f"Weather in city {i}?"},
                                  {"role": "assistant", "content": "Let me look.", "tool_calls": [call]},
                                  {"role": "tool", "tool_call_id": f"c{i}", "content": f"sunny, {i} °C"},
                                  {"role": "assistant", "content": f"It is sunny, {i} °C."}]})
    return rows


def test_tool_calls_and_tool_turns_are_legal_sequences(write_jsonl, embedded_tokenizer):
    """assistant -> tool -> assistant is a legal sequence: no roles_not_alternating warning."""
    report = report_for(write_jsonl, embedded_tokenizer, tool_calling_rows(30))
    assert not report.errors and report.valid_rows == 30
    assert [p.code for p in report.warnings] == []
    sharegpt = [{"conversations": [{"from": "human", "value": f"Weather {i}?"},
                                   {"from": "function_call", "value": '{"name": "weather"}'},
                                   {"from": "observation", "value": "sunny"}, {"from": "gpt", "value": f"Sunny {i}."}]}
                for i in range(12)]
    report = report_for(write_jsonl, embedded_tokenizer, sharegpt)
    assert not report.errors and not report.warnings
    # Two assistant turns with no tool turn between are still reported.
    report = report_for(write_jsonl, embedded_tokenizer, distinct_chats(10) + [{"messages": [U, A, A]}])
    assert codes(report.warnings) == [(11, "roles_not_alternating")]


def test_tool_calls_in_the_wrong_place_are_a_row_error(write_jsonl, embedded_tokenizer):
    report = report_for(write_jsonl, embedded_tokenizer, [{"messages": [U, {**A, "tool_calls": {"name": "x"}}]}])
    assert codes(report.errors) == [(1, "wrong_type")] and "tool_calls is a dict" in report.errors[0].message


def test_a_conversation_may_open_with_the_assistant_when_the_template_allows_it(write_jsonl, embedded_tokenizer):
    """No template_error ('Cannot apply chat template to an empty conversation') for an opening assistant turn."""
    row = {"messages": [{"role": "assistant", "content": "Welcome! Ask me anything."}, U, A]}
    report = report_for(write_jsonl, embedded_tokenizer, [row])
    assert not report.errors and not report.warnings[1:] and report.valid_rows == 1
    report = report_for(write_jsonl, embedded_tokenizer, [row], template=ALTERNATING_ONLY)
    assert codes(report.errors) == [(1, "roles_not_alternating")]
    assert "starts with the assistant" in report.errors[0].message


def test_columns_and_turn_fields_not_read_are_a_warning_naming_them(write_jsonl, embedded_tokenizer):
    rows = [{**chat((f"q{i}", f"a{i}")), "id": i, "tools": "[]"} for i in range(12)]
    report = report_for(write_jsonl, embedded_tokenizer, rows)
    assert not report.errors
    ignored = [p.message for p in report.warnings if p.code == "ignored_column"]
    assert len(ignored) == 2 and "column 'id'" in ignored[0] and "12 row(s), the first row 1" in ignored[0]
    sharegpt = [{"conversations": [{"from": "human", "value": "Hi", "markdown": True}, {"from": "gpt", "value": "Yo"}],
                 "system": "Be brief."}]
    loaded = data.load_data(str(write_jsonl(sharegpt, "s.jsonl")))
    assert loaded.examples[0].messages[0] == {"role": "system", "content": "Be brief."}  # the system column is read
    assert [p.message.split(" is not")[0] for p in loaded.warnings] == ["turn field 'markdown'"]


def test_data_after_a_json_array_is_a_warning(tmp_path, embedded_tokenizer):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(distinct_chats(10)) + "\n" + json.dumps(distinct_chats(2)))
    loaded = data.load_data(str(path))
    assert len(loaded.examples) == 10
    assert [(p.row, p.code) for p in loaded.warnings] == [(None, "trailing_data")]
    assert "d.json" in loaded.warnings[0].message and "[{" in loaded.warnings[0].message
    path.write_text(json.dumps(distinct_chats(10)) + "\n \n")
    assert data.load_data(str(path)).warnings == []


def test_files_of_another_format_in_a_folder_are_named(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    for name in ("a.jsonl", "b.jsonl"):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in distinct_chats(3)))
    (folder / "extra.csv").write_text("prompt,completion\nHi,Hello\n")
    (folder / "README.md").write_text("# about")
    loaded = data.load_data(str(folder))
    assert len(loaded.examples) == 6
    assert [(p.code, "extra.csv" in p.message, "README" in p.message) for p in loaded.warnings] == [
        ("ignored_files", True, False)]


# ------------------------------------------------------------------------- any value, anywhere: never an exception

ARROW_LIKE = st.one_of(
    st.dates(), st.datetimes(), st.binary(max_size=8), st.decimals(allow_nan=False, places=2),
    st.times(), st.timedeltas(max_value=datetime.timedelta(days=3)),
)
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.builds(pow, st.just(10), st.just(5000)), st.floats(allow_nan=True), st.text(max_size=12),
    ARROW_LIKE,
)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.sampled_from(["role", "content", "type", "text", "value", "from", "weight",
                                                         "loss_weight", "train", "tool_calls", "x"]), inner, max_size=4),
                      max_leaves=8)
TEXT = st.sampled_from(["Hi", "Hello!", " ", ""])


def _message(draw_value):
    return st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "tool", "system"]) | draw_value,
                                  "content": TEXT | draw_value},
                                 optional={"weight": draw_value, "loss_weight": draw_value, "train": draw_value,
                                           "tool_calls": draw_value, "name": draw_value})


MESSAGES = st.lists(_message(VALUES) | VALUES, max_size=4) | VALUES
RECORDS = st.one_of(
    st.fixed_dictionaries({"messages": MESSAGES}, optional={"tools": VALUES, "id": VALUES}),
    st.fixed_dictionaries({"conversations": st.lists(st.fixed_dictionaries(
        {"from": st.sampled_from(["human", "gpt", "observation"]) | VALUES, "value": TEXT | VALUES},
        optional={"loss_weight": VALUES}) | VALUES, max_size=4) | VALUES}, optional={"system": VALUES}),
    st.fixed_dictionaries({"instruction": TEXT | VALUES, "output": TEXT | VALUES},
                          optional={"input": TEXT | VALUES, "system": VALUES, "history": VALUES}),
    st.fixed_dictionaries({"prompt": TEXT | VALUES | MESSAGES, "completion": TEXT | VALUES | MESSAGES}),
    st.fixed_dictionaries({"text": TEXT | VALUES}),
    VALUES,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@pytest.mark.slow
@given(records=st.lists(RECORDS, min_size=1, max_size=4))
def test_any_value_of_any_type_anywhere_gives_per_row_answers(records, embedded_tokenizer):
    """JSON values of every kind, and what Parquet and datasets hand over (dates, bytes, decimals), in every place a
    format defines: a report whose rows add up, or a DataSourceError for the whole source, never an exception."""
    from sft_space.errors import DataSourceError

    try:
        loaded = formats.load_records(enumerate(records, start=1), "fuzz")
    except DataSourceError as err:
        assert "could not recognise the format" in str(err)
        return
    report = checks.build_report(loaded, embedded_tokenizer, 256)
    assert report.rows == len(records) == report.valid_rows + report.invalid_rows
    json.dumps(report.to_dict())  # every message is text


def test_arrow_values_in_a_parquet_file_are_row_errors(tmp_path, embedded_tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    for value, name in ((datetime.date(2024, 1, 1), "date"), (b"bytes", "bytes"), (decimal.Decimal("1.5"), "Decimal"),
                        (datetime.datetime(2024, 1, 1, 12), "datetime")):
        path = tmp_path / f"{name}.parquet"
        pq.write_table(pa.table({"prompt": ["Hi", "Bye"], "completion": [value, value]}), path)
        report = checks.check_data(DataSettings(source=str(path)), embedded_tokenizer)
        assert codes(report.errors) == [(1, "non_string_content"), (2, "non_string_content")], name
        assert f"content is a {name}, not text" in report.errors[0].message


# ----------------------------------------------------------------------------------------------- repeats


def test_duplicates_are_a_warning_and_dropped_before_training(write_jsonl, embedded_tokenizer):
    rows = distinct_chats(12)
    rows += [rows[2], rows[5], rows[2]]
    report = report_for(write_jsonl, embedded_tokenizer, rows)
    assert not report.errors
    assert [(p.row, p.code) for p in report.warnings] == [(13, "duplicate"), (14, "duplicate"), (15, "duplicate")]
    assert report.warnings[0].message.startswith("row 13: an exact copy of row 3; it is dropped before training")
    assert [e.row for e in report.valid_examples] == list(range(1, 13))  # what training takes, the first kept
    assert report.duplicates_dropped == 3 and report.stats()["duplicates_dropped"] == 3
    assert report.valid_rows == 15 and report.invalid_rows == 0
    kept = report_for(write_jsonl, embedded_tokenizer, rows, keep_duplicates=True)
    assert [e.row for e in kept.valid_examples] == list(range(1, 16)) and kept.duplicates_dropped == 0
    assert "(kept: keep_duplicates is set)" in kept.warnings[0].message


def test_check_data_reads_keep_duplicates_from_the_settings(write_jsonl, embedded_tokenizer):
    path = write_jsonl(distinct_chats(11) + distinct_chats(1))
    assert DataSettings().keep_duplicates is False
    assert checks.check_data(DataSettings(source=str(path)), embedded_tokenizer).duplicates_dropped == 1
    report = checks.check_data(DataSettings(source=str(path), keep_duplicates=True), embedded_tokenizer)
    assert report.duplicates_dropped == 0 and len(report.valid_examples) == 12


def test_the_same_prompt_with_different_answers_and_one_answer_to_many_prompts(write_jsonl, embedded_tokenizer):
    rows = distinct_chats(10)
    rows += [chat(("What is 3 plus 3?", "Seven.")), chat(("What is 3 plus 3?", "Eight."))]  # row 4 says 6
    rows += [chat((f"Tell me about topic {i}.", "I cannot help with that.")) for i in range(6)]
    report = report_for(write_jsonl, embedded_tokenizer, rows)
    found = {p.code: p for p in report.warnings}
    assert found["same_prompt_different_answers"].row == 4
    assert found["same_prompt_different_answers"].message.startswith("rows 4, 11, 12 have the same prompt and 3 "
                                                                     "different answers")
    assert found["same_answer_many_prompts"].row == 13
    assert "rows 13, 14, 15, 16, 17 and 1 more give the same answer ('I cannot help with that.'…) to 6 different" \
        in found["same_answer_many_prompts"].message
    assert report.valid_rows == 18  # warnings: every row is still trained on


# -------------------------------------------------------------------------------------- long plain texts


def test_plain_text_over_the_maximum_length_is_split_into_pieces(write_jsonl, embedded_tokenizer):
    long_text = " ".join(f"word{i}" for i in range(400))
    rows = [{"text": "A short one."}, {"text": long_text}] + [{"text": f"Doc {i}."} for i in range(10)]
    report = report_for(write_jsonl, embedded_tokenizer, rows, max_length=100)
    assert not report.errors
    pieces = [e for e in report.valid_examples if e.row == 2]
    assert len(pieces) > 1 and "".join(p.text for p in pieces) == long_text
    assert [p.ends_document for p in pieces] == [False] * (len(pieces) - 1) + [True]
    assert all(tokens <= 100 for _, tokens, _ in report.token_counts)
    split = [p for p in report.warnings if p.code == "text_split"]
    assert len(split) == 1 and split[0].message.startswith(f"1 plain-text row(s) longer than the maximum length "
                                                           f"(100 tokens) were split into {len(pieces)} pieces")
    assert report.valid_rows == 12 and report.stats()["text_rows_split"] == 1
    # The tokens kept for training are the pieces' own, exactly as rendering each piece gives them.
    path = write_jsonl(rows)
    kept = checks.build_report(data.load_data(str(path)), embedded_tokenizer, 100, keep_tokens=True)
    for example in kept.valid_examples:
        rendered = render.render_example(embedded_tokenizer, example)
        assert list(example.tokens.ids) == rendered.input_ids
        assert [bool(b) for b in example.tokens.trained] == rendered.trained
    assert [e.text for e in kept.valid_examples] == [e.text for e in report.valid_examples]
    # A report that keeps a preview of the examples still counts all of them.
    preview = checks.build_report(data.load_data(str(path)), embedded_tokenizer, 100, keep_examples=3)
    assert len(preview.valid_examples) == 3 and preview.valid_rows == 12
    assert preview.stats() == report.stats()
    # A conversation over the limit is still an error: cutting it would cut the reply.
    report = report_for(write_jsonl, embedded_tokenizer, [chat(("Hi", long_text))], max_length=100)
    assert codes(report.errors) == [(1, "too_long")]


# ------------------------------------------------------------------------------------ Hub datasets, streamed


def test_a_hub_dataset_is_streamed_and_capped_at_max_rows(monkeypatch, embedded_tokenizer, hub_online):
    """The stand-in is endless: only the first rows are read, then the report starts."""
    import datasets

    served, calls = [], []

    def endless():
        for i in range(10**9):
            served.append(i)
            yield chat((f"Question {i}?", f"Answer {i}."))

    def fake_load_dataset(path, name=None, split=None, streaming=False, **kwargs):
        calls.append((path, name, split, streaming))
        return endless()

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    report = checks.check_data(DataSettings(source="someone/huge", max_rows=50), embedded_tokenizer)
    assert calls == [("someone/huge", None, "train", True)]
    assert len(served) == 51 and report.rows == 50 and report.valid_rows == 50
    assert [(p.row, p.code) for p in report.warnings] == [(None, "rows_not_read")]
    assert "only its first 50 rows were read" in report.warnings[0].message


def test_a_large_hub_dataset_gives_a_first_look_within_seconds_then_the_whole_report(monkeypatch,
                                                                                     embedded_tokenizer, hub_online):
    """Target: the first report rows within 5 s whatever the dataset's size (the stand-in is endless: without a
    first look, the report waits for all max_rows rows)."""
    import time

    import datasets

    def endless(path, name=None, split=None, streaming=False, **kwargs):
        return (chat((f"Question {i}?", f"Answer {i}.")) for i in range(10**9))

    monkeypatch.setattr(datasets, "load_dataset", endless)
    started = time.monotonic()
    stages = checks.check_data_in_stages(DataSettings(source="someone/huge", max_rows=5000), embedded_tokenizer)
    first = next(stages)
    assert time.monotonic() - started < 5
    assert first.first_look and first.rows == checks.FIRST_LOOK_ROWS == first.valid_rows
    whole = next(stages)
    assert not whole.first_look and whole.rows == 5000 and whole.valid_rows == 5000
    assert next(stages, None) is None
    # A dataset the first look covers whole is reported once; a local file too.
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: iter(distinct_chats(30)))
    only = list(checks.check_data_in_stages(DataSettings(source="someone/small"), embedded_tokenizer))
    assert len(only) == 1 and not only[0].first_look and only[0].rows == 30


def test_a_hub_connection_lost_while_streaming_is_a_clear_error(monkeypatch):
    import datasets

    from sft_space.errors import DataSourceError

    def flaky():
        yield chat(("Hi", "Hello"))
        raise ConnectionError("connection reset")

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: flaky())
    with pytest.raises(DataSourceError, match="Could not reach the Hugging Face Hub"):
        data.load_data("someone/chats")


# ---------------------------------------------------------------------------------- large reports, progress


def test_counts_per_code_are_complete_and_sample_rows_spreads_over_the_data(write_jsonl, embedded_tokenizer):
    rows = distinct_chats(20) + [{"messages": [U]} for _ in range(30)]
    report = report_for(write_jsonl, embedded_tokenizer, rows)
    assert report.problem_counts() == {"no_assistant_turn": 30}
    sample = report.sample_rows("no_assistant_turn", 4)
    assert [p.row for p in sample] == [21, 31, 40, 50]
    assert report.sample_rows("duplicate") == [] and len(report.sample_rows("no_assistant_turn", 100)) == 30
    assert report.to_dict()["problem_counts"] == {"no_assistant_turn": 30}


def test_on_progress_is_called_while_reading_and_checking(write_jsonl, embedded_tokenizer, monkeypatch):
    monkeypatch.setattr(formats, "PROGRESS_EVERY", 100)
    monkeypatch.setattr(checks, "BATCH_ROWS", 64)
    calls = []
    path = write_jsonl(distinct_chats(300))
    report = checks.check_data(DataSettings(source=str(path)), embedded_tokenizer,
                               on_progress=lambda done, total: calls.append((done, total)))
    assert report.valid_rows == 300
    assert calls[:3] == [(100, None), (200, None), (300, None)]
    checking = calls[3:]
    assert checking[0] == (64, 300) and checking[-1] == (300, 300)
    assert [done for done, _ in checking] == sorted(done for done, _ in checking)
