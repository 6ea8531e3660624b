"""Reading every supported source and format into the same normalised messages."""

import json

import pytest

from sft_space import data, formats, training_data
from sft_space.errors import DataSourceError

HELLO = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]


def rows_of(loaded):
    return [(e.row, e.messages if e.messages is not None else e.text) for e in loaded.examples]


@pytest.mark.parametrize("record, expected_format, expected_messages", [
    pytest.param({"messages": HELLO}, formats.OPENAI, HELLO, id="openai"),
    pytest.param(
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "H"}, {"type": "text", "text": "i"}]},
                      {"role": "assistant", "content": "Hello!", "weight": 1, "name": "bot"}]},
        formats.OPENAI,
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!", "weight": 1, "name": "bot"}],
        id="openai-text-parts-weight-name",
    ),
    pytest.param({"conversations": HELLO}, formats.OPENAI, HELLO, id="openai-under-conversations"),
    pytest.param(
        {"conversations": [{"from": "system", "value": "Be kind."}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]},
        formats.SHAREGPT, [{"role": "system", "content": "Be kind."}] + HELLO, id="sharegpt",
    ),
    pytest.param(
        {"conversations": [{"from": "human", "value": "Weather?"}, {"from": "function_call", "value": '{"name": "weather"}'},
                           {"from": "observation", "value": "sunny"}, {"from": "gpt", "value": "Sunny."}]},
        formats.SHAREGPT,
        [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": '{"name": "weather"}'},
         {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}],
        id="sharegpt-tools",
    ),
    pytest.param({"instruction": "Hi", "input": "", "output": "Hello!"}, formats.ALPACA, HELLO, id="alpaca"),
    pytest.param(
        {"instruction": "Translate", "input": "chat", "output": "cat", "system": "You translate.", "history": [["Hi", "Hello!"]]},
        formats.ALPACA,
        [{"role": "system", "content": "You translate."}] + HELLO
        + [{"role": "user", "content": "Translate\n\nchat"}, {"role": "assistant", "content": "cat"}],
        id="alpaca-input-system-history",
    ),
    pytest.param({"prompt": "Hi", "completion": "Hello!"}, formats.PROMPT_COMPLETION, HELLO, id="prompt-completion"),
    pytest.param(
        {"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Hello!"}]},
        formats.PROMPT_COMPLETION, HELLO, id="prompt-completion-conversational",
    ),
])
def test_each_format_normalises_to_messages(write_jsonl, record, expected_format, expected_messages):
    loaded = data.load_data(str(write_jsonl([record, record])))
    assert loaded.format == expected_format
    assert loaded.rows == 2 and not loaded.problems
    assert rows_of(loaded) == [(1, expected_messages), (2, expected_messages)]


def test_plain_text_format(write_jsonl):
    loaded = data.load_data(str(write_jsonl([{"text": "Once upon a time."}])))
    assert loaded.format == formats.TEXT
    assert rows_of(loaded) == [(1, "Once upon a time.")]


def test_column_mapping(write_jsonl):
    path = write_jsonl([{"q": "Hi", "a": "Hello!", "sys": "Be kind."}, {"q": "Hi", "a": "Hello!", "sys": ""}])
    loaded = data.load_data(str(path), columns="prompt=q,response=a,system=sys")
    assert loaded.format == formats.MAPPED
    assert rows_of(loaded) == [(1, [{"role": "system", "content": "Be kind."}] + HELLO), (2, HELLO)]
    assert rows_of(data.load_data(str(write_jsonl([{"dialog": HELLO}], "m.jsonl")), columns="messages=dialog")) == [(1, HELLO)]


def test_a_row_without_a_mapped_column_is_a_row_error_naming_it(write_jsonl):
    mapping = formats.ColumnMapping.parse("prompt=q,response=a")
    with pytest.raises(formats.RowError) as caught:
        formats.normalise({"q": "Hi"}, formats.MAPPED, mapping)
    assert caught.value.code == "unknown_format" and "no column 'a'" in caught.value.detail
    loaded = data.load_data(str(write_jsonl([{"q": "Hi", "a": "Hello!"}, {"q": "Hi"}])), columns=mapping)
    assert [(p.row, p.code, p.message) for p in loaded.problems] == [
        (2, "unknown_format", "row 2: has no column 'a' named in the column mapping (it has 'q').")]


def test_reading_warnings_and_errors_are_one_kind_of_problem(tmp_path):
    """What reading finds and what the checks find are the same class; a reading warning is told by its code."""
    from sft_space import checks

    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"messages": HELLO}, 7]) + " trailing")
    loaded = data.load_data(str(path))
    assert [(type(p), p.code) for p in loaded.warnings] == [(formats.Problem, "trailing_data")]
    assert [(type(p), p.code) for p in loaded.problems] == [(formats.Problem, "not_an_object")]
    assert checks.Problem is formats.Problem and formats.READING_WARNINGS <= checks.WARNING_CODES


def test_a_missing_file_is_named_and_the_skin_says_what_to_do():
    """The core says what is wrong; uploading again is the app's advice (access.py), not the reader's."""
    with pytest.raises(DataSourceError) as caught:
        data.check_source_exists("missing.jsonl")
    assert str(caught.value) == "missing.jsonl: no such file; check the path."


def test_unknown_columns_without_mapping_says_how_to_map(write_jsonl):
    with pytest.raises(DataSourceError, match=r"'answer', 'question'.*--columns prompt="):
        data.load_data(str(write_jsonl([{"question": "Hi", "answer": "Hello!"}])))


@pytest.mark.parametrize("spec", ["prompt=q", "nonsense", "colour=q,response=a"])
def test_bad_column_mapping_is_explained(spec):
    with pytest.raises(DataSourceError, match="mapping"):
        formats.ColumnMapping.parse(spec)


def test_json_array_rows_are_record_indexes(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"messages": HELLO}, 7, {"messages": HELLO[:1]}], indent=2))
    loaded = data.load_data(str(path))
    assert [e.row for e in loaded.examples] == [1, 3]
    assert [(p.row, p.code) for p in loaded.problems] == [(2, "not_an_object")]


def test_json_one_object_per_line_rows_are_line_numbers(tmp_path):
    path = tmp_path / "d.json"
    path.write_text("\ufeff" + json.dumps({"messages": HELLO}) + "\n\n" + json.dumps({"messages": HELLO}) + "\n")
    assert [e.row for e in data.load_data(str(path)).examples] == [1, 3]


def test_csv_with_prompt_response_and_json_messages(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('instruction,input,output\nHi,,Hello!\n"Say ""a, b""",,"a, b"\n', encoding="utf-8")
    loaded = data.load_data(str(path))
    assert loaded.format == formats.ALPACA
    assert rows_of(loaded)[1] == (2, [{"role": "user", "content": 'Say "a, b"'}, {"role": "assistant", "content": "a, b"}])
    path2 = tmp_path / "m.csv"
    path2.write_text("messages\n" + '"' + json.dumps(HELLO).replace('"', '""') + '"\n')
    assert rows_of(data.load_data(str(path2))) == [(1, HELLO)]


def test_csv_ragged_row_is_a_row_problem(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,completion\nHi,Hello!\nHi,Hello,again\nonly-one\n")
    loaded = data.load_data(str(path))
    assert [(p.row, p.code) for p in loaded.problems] == [(2, "unreadable_row"), (3, "unreadable_row")]
    assert "more values" in loaded.problems[0].message and "fewer values" in loaded.problems[1].message


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([{"messages": HELLO}, {"messages": HELLO}]), path)
    loaded = data.load_data(str(path))
    assert loaded.format == formats.OPENAI and rows_of(loaded) == [(1, HELLO), (2, HELLO)]


def test_local_dataset_folder(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"instruction": "Hi", "input": "", "output": "Hello!"}]).save_to_disk(tmp_path / "ds")
    loaded = data.load_data(str(tmp_path / "ds"))
    assert loaded.format == formats.ALPACA and rows_of(loaded) == [(1, HELLO)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"messages": HELLO}])}).save_to_disk(tmp_path / "dd")
    with pytest.raises(DataSourceError, match="no split 'test'; it has train"):
        data.load_data(str(tmp_path / "dd"), hub_split="test")


def test_hub_dataset_offline_is_a_clear_error():
    with pytest.raises(DataSourceError, match="Could not reach the Hugging Face Hub.*'someone/chats'"):
        data.load_data("someone/chats")


def test_hub_dataset_reads_rows_through_datasets(monkeypatch, hub_online):
    """The Hub path with `datasets.load_dataset` replaced at its boundary (no Hub here)."""
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        return datasets.Dataset.from_list([{"messages": HELLO}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    loaded = data.load_data("someone/chats", hub_config="en", hub_split="validation")
    assert calls == [("someone/chats", "en", "validation")]
    assert rows_of(loaded) == [(1, HELLO)]


@pytest.mark.parametrize("source, message", [
    ("missing.jsonl", "no such file"),
    ("not a dataset", "neither a file nor a folder"),
])
def test_unusable_sources(source, message):
    with pytest.raises(DataSourceError, match=message):
        data.load_data(source)


def test_unsupported_and_empty_files(tmp_path):
    (tmp_path / "d.txt").write_text("hello")
    with pytest.raises(DataSourceError, match="unsupported file type '.txt'"):
        data.load_data(str(tmp_path / "d.txt"))
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(DataSourceError, match="contains no rows"):
        data.load_data(str(tmp_path / "e.jsonl"))


def test_split_is_deterministic_and_disjoint(write_jsonl):
    examples = [formats.Example(i, formats.OPENAI, messages=HELLO) for i in range(1, 101)]
    train, validation = training_data.split_train_validation(examples, 0.1, seed=7)
    again = training_data.split_train_validation(examples, 0.1, seed=7)
    other = training_data.split_train_validation(examples, 0.1, seed=8)
    assert len(train) == 90 and len(validation) == 10
    assert {e.row for e in train} | {e.row for e in validation} == set(range(1, 101))
    assert [e.row for e in validation] == [e.row for e in again[1]]
    assert [e.row for e in validation] != [e.row for e in other[1]]
    assert training_data.split_train_validation(examples[:3], 0.01, seed=1)[1]  # a tiny fraction still holds one out
    assert training_data.split_train_validation(examples, 0.0, seed=1) == (examples, [])


# ------------------------------------------------------------------------------------- per-row bounds


def big_row(n_bytes):
    """A valid chat row of exactly `n_bytes` bytes as compact JSON (what JSONL and the other readers measure)."""
    row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]}
    row["messages"][1]["content"] = "x" * (n_bytes - len(json.dumps(row, separators=(",", ":"))))
    return row


def compact(row):
    return json.dumps(row, separators=(",", ":"))


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_a_jsonl_row_over_max_row_kb_is_reported_and_the_rest_is_read(tmp_path, newline):
    path = tmp_path / "d.jsonl"
    rows = [compact({"messages": HELLO}), compact(big_row(2048)), compact(big_row(2049)), compact(big_row(10_000)),
            compact({"messages": HELLO[:1]})]
    path.write_text(newline.join(rows) + newline, encoding="utf-8", newline="")
    loaded = data.load_data(str(path), max_row_kb=2)
    assert [(p.row, p.code) for p in loaded.problems] == [(3, "row_too_large"), (4, "row_too_large")]
    assert [e.row for e in loaded.examples] == [1, 2, 5]  # exactly at the limit is fine; the rows after are read
    # Sizes round up, so a row just over the limit never reads as equal to it.
    assert loaded.problems[0].message == ("row 3 is 3 KB, over the limit of 2 KB per row (max_row_kb, "
                                          "--max-row-kb); split it or raise the limit.")
    assert loaded.problems[1].message.startswith("row 4 is 10 KB, over the limit of 2 KB per row")


def test_a_jsonl_row_over_the_limit_is_never_held_whole(tmp_path, monkeypatch):
    """The reader asks for the limit (plus a line end) at a time, and skips the rest of a longer line in pieces."""
    path = tmp_path / "d.jsonl"
    path.write_text(compact(big_row(3 * data.JSON_CHUNK + 300_000)) + "\n" + compact({"messages": HELLO}) + "\n")
    asked = []
    real_open = type(path).open

    def spying_open(self, mode="r", *args, **kwargs):
        handle = real_open(self, mode, *args, **kwargs)
        real_readline = handle.readline

        class Spy:
            def __getattr__(self, name):
                return getattr(handle, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                handle.close()

            def readline(self, size=-1):
                asked.append(size)
                return real_readline(size)

        return Spy()

    monkeypatch.setattr(type(path), "open", spying_open)
    loaded = data.load_data(str(path), max_row_kb=4)
    assert [(p.row, p.code) for p in loaded.problems] == [(1, "row_too_large")]
    assert "3,365 KB" in loaded.problems[0].message and [e.row for e in loaded.examples] == [2]
    assert asked and all(0 < size <= data.JSON_CHUNK for size in asked)  # never the 3.3 MB line at once


def test_rows_over_max_row_kb_in_json_arrays_csv_parquet_and_datasets(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [{"messages": HELLO}, big_row(5000), {"messages": HELLO}]
    (tmp_path / "d.json").write_text(json.dumps(records, indent=2))
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "d.parquet")
    datasets.Dataset.from_list(records).save_to_disk(tmp_path / "ds")
    with (tmp_path / "d.csv").open("w", newline="") as f:
        f.write("prompt,completion\nHi,Hello!\n")
        f.write("Hi," + "y" * 5000 + "\nHi,Hello!\n")
    for name in ("d.json", "d.parquet", "ds", "d.csv"):
        loaded = data.load_data(str(tmp_path / name), max_row_kb=4)
        assert [(p.row, p.code) for p in loaded.problems] == [(2, "row_too_large")], name
        assert loaded.problems[0].message.startswith("row 2 is 5 KB, over the limit of 4 KB per row"), name
        assert [e.row for e in loaded.examples] == [1, 3], name


def test_a_csv_cell_larger_than_the_csv_module_default_is_read_when_under_max_row_kb(tmp_path):
    """Python's csv refuses cells over 128 KB by default; a 200 KB reasoning trace is a real row under the limit."""
    path = tmp_path / "d.csv"
    with path.open("w", newline="") as f:
        f.write("prompt,completion\nHi," + "y" * 200_000 + "\n")
    loaded = data.load_data(str(path), max_row_kb=1024)
    assert not loaded.problems and len(loaded.examples[0].messages[1]["content"]) == 200_000


def test_a_row_over_max_messages_is_reported_after_normalising(write_jsonl):
    long_chat = {"messages": [HELLO[i % 2] for i in range(6)]}
    sharegpt = {"conversations": [{"from": "human" if i % 2 == 0 else "gpt", "value": "x"} for i in range(6)]}
    loaded = data.load_data(str(write_jsonl([{"messages": HELLO * 2}, long_chat])), max_messages=4)
    assert [(p.row, p.code) for p in loaded.problems] == [(2, "too_many_messages")]
    assert loaded.problems[0].message == ("row 2 has 6 messages, over the limit of 4 per row (max_messages, "
                                          "--max-messages); split the conversation or raise the limit.")
    assert [e.row for e in loaded.examples] == [1]
    # Counted on the normalised messages, whatever the format (ShareGPT, Alpaca history, ...).
    loaded = data.load_data(str(write_jsonl([sharegpt], "s.jsonl")), max_messages=5)
    assert [(p.row, p.code) for p in loaded.problems] == [(1, "too_many_messages")]
