"""Reading every supported source and format into the same normalised messages."""

import json

import pytest

from sft_space import data
from sft_space.errors import DataSourceError

HELLO = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]


def rows_of(loaded):
    return [(e.row, e.messages if e.messages is not None else e.text) for e in loaded.examples]


@pytest.mark.parametrize("record, expected_format, expected_messages", [
    pytest.param({"messages": HELLO}, data.OPENAI, HELLO, id="openai"),
    pytest.param(
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "H"}, {"type": "text", "text": "i"}]},
                      {"role": "assistant", "content": "Hello!", "weight": 1, "name": "bot"}]},
        data.OPENAI,
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!", "weight": 1, "name": "bot"}],
        id="openai-text-parts-weight-name",
    ),
    pytest.param({"conversations": HELLO}, data.OPENAI, HELLO, id="openai-under-conversations"),
    pytest.param(
        {"conversations": [{"from": "system", "value": "Be kind."}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]},
        data.SHAREGPT, [{"role": "system", "content": "Be kind."}] + HELLO, id="sharegpt",
    ),
    pytest.param(
        {"conversations": [{"from": "human", "value": "Weather?"}, {"from": "function_call", "value": '{"name": "weather"}'},
                           {"from": "observation", "value": "sunny"}, {"from": "gpt", "value": "Sunny."}]},
        data.SHAREGPT,
        [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": '{"name": "weather"}'},
         {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}],
        id="sharegpt-tools",
    ),
    pytest.param({"instruction": "Hi", "input": "", "output": "Hello!"}, data.ALPACA, HELLO, id="alpaca"),
    pytest.param(
        {"instruction": "Translate", "input": "chat", "output": "cat", "system": "You translate.", "history": [["Hi", "Hello!"]]},
        data.ALPACA,
        [{"role": "system", "content": "You translate."}] + HELLO
        + [{"role": "user", "content": "Translate\n\nchat"}, {"role": "assistant", "content": "cat"}],
        id="alpaca-input-system-history",
    ),
    pytest.param({"prompt": "Hi", "completion": "Hello!"}, data.PROMPT_COMPLETION, HELLO, id="prompt-completion"),
    pytest.param(
        {"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Hello!"}]},
        data.PROMPT_COMPLETION, HELLO, id="prompt-completion-conversational",
    ),
])
def test_each_format_normalises_to_messages(write_jsonl, record, expected_format, expected_messages):
    loaded = data.load_data(str(write_jsonl([record, record])))
    assert loaded.format == expected_format
    assert loaded.rows == 2 and not loaded.problems
    assert rows_of(loaded) == [(1, expected_messages), (2, expected_messages)]


def test_plain_text_format(write_jsonl):
    loaded = data.load_data(str(write_jsonl([{"text": "Once upon a time."}])))
    assert loaded.format == data.TEXT
    assert rows_of(loaded) == [(1, "Once upon a time.")]


def test_column_mapping(write_jsonl):
    path = write_jsonl([{"q": "Hi", "a": "Hello!", "sys": "Be kind."}, {"q": "Hi", "a": "Hello!", "sys": ""}])
    loaded = data.load_data(str(path), columns="prompt=q,response=a,system=sys")
    assert loaded.format == data.MAPPED
    assert rows_of(loaded) == [(1, [{"role": "system", "content": "Be kind."}] + HELLO), (2, HELLO)]
    assert rows_of(data.load_data(str(write_jsonl([{"dialog": HELLO}], "m.jsonl")), columns="messages=dialog")) == [(1, HELLO)]


def test_unknown_columns_without_mapping_says_how_to_map(write_jsonl):
    with pytest.raises(DataSourceError, match=r"'answer', 'question'.*--columns prompt="):
        data.load_data(str(write_jsonl([{"question": "Hi", "answer": "Hello!"}])))


@pytest.mark.parametrize("spec", ["prompt=q", "nonsense", "colour=q,response=a"])
def test_bad_column_mapping_is_explained(spec):
    with pytest.raises(DataSourceError, match="mapping"):
        data.ColumnMapping.parse(spec)


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
    assert loaded.format == data.ALPACA
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
    assert loaded.format == data.OPENAI and rows_of(loaded) == [(1, HELLO), (2, HELLO)]


def test_local_dataset_folder(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"instruction": "Hi", "input": "", "output": "Hello!"}]).save_to_disk(tmp_path / "ds")
    loaded = data.load_data(str(tmp_path / "ds"))
    assert loaded.format == data.ALPACA and rows_of(loaded) == [(1, HELLO)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"messages": HELLO}])}).save_to_disk(tmp_path / "dd")
    with pytest.raises(DataSourceError, match="no split 'test'; it has train"):
        data.load_data(str(tmp_path / "dd"), hub_split="test")


def test_hub_dataset_offline_is_a_clear_error():
    with pytest.raises(DataSourceError, match="Could not reach the Hugging Face Hub.*'someone/chats'"):
        data.load_data("someone/chats")


def test_hub_dataset_reads_rows_through_datasets(monkeypatch):
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
    examples = [data.Example(i, data.OPENAI, messages=HELLO) for i in range(1, 101)]
    train, validation = data.split_train_validation(examples, 0.1, seed=7)
    again = data.split_train_validation(examples, 0.1, seed=7)
    other = data.split_train_validation(examples, 0.1, seed=8)
    assert len(train) == 90 and len(validation) == 10
    assert {e.row for e in train} | {e.row for e in validation} == set(range(1, 101))
    assert [e.row for e in validation] == [e.row for e in again[1]]
    assert [e.row for e in validation] != [e.row for e in other[1]]
    assert data.split_train_validation(examples[:3], 0.01, seed=1)[1]  # a tiny fraction still holds one out
    assert data.split_train_validation(examples, 0.0, seed=1) == (examples, [])
