"""Every malformed input of the corpus gets a clear answer, never a traceback: in the CLI and in the app."""

import json

import gradio as gr
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from malformed_corpus import cases, write_corpus
from sft_space import checks, cli
from sft_space.errors import UserError
from sft_space.settings import DataSettings
from sft_space.ui import data_tab

NAMES = [name for name, _, _ in cases()]


def test_the_corpus_has_at_least_fifty_inputs():
    assert len(NAMES) >= 50 and len(set(NAMES)) == len(NAMES)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return dict(write_corpus(tmp_path_factory.mktemp("malformed")))


@pytest.fixture(scope="module")
def small_tokenizer_dir(tmp_path_factory, embedded_tokenizer):
    """A model folder holding a byte-level tokenizer of 256 tokens with the embedded default's control tokens and
    chat template: the command line loads it in a millisecond, the real 49,152-token one in ~0.3 s of CPU (once per
    input here). What the corpus tries is the reading of the file, which is the same whatever the tokenizer."""
    from tokenizers import Tokenizer, decoders, models as bpe, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(bpe.BPE(vocab={c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}, merges=[]))
    core.pre_tokenizer, core.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    named = (embedded_tokenizer.bos_token, embedded_tokenizer.eos_token, embedded_tokenizer.pad_token)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=named[0], eos_token=named[1], pad_token=named[2],
        additional_special_tokens=[t for t in embedded_tokenizer.all_special_tokens if t not in named])
    tokenizer.chat_template = embedded_tokenizer.chat_template
    folder = tmp_path_factory.mktemp("small-tokenizer")
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("name", NAMES)
def test_cli_answers_every_malformed_input_with_one_json_report(name, corpus, small_tokenizer_dir, capsys):
    status = cli.main(["validate", str(corpus[name]), "--model", str(small_tokenizer_dir), "--json"])
    out = capsys.readouterr().out
    report = json.loads(out)  # exactly one JSON document, even for an unusable file
    assert status in (0, 1)
    if status == 1:
        assert report["errors"], "a failing file names its problems"
        for problem in report["errors"]:
            assert problem["message"] and "Traceback" not in problem["message"]
    else:
        assert report["valid_rows"] >= 1


@pytest.fixture(scope="module")
def gate(tmp_path_factory, tiny_model_dir):
    from sft_space import access
    from sft_space.ui.common import Gate

    runs_dir = tmp_path_factory.mktemp("app") / "runs"
    return Gate(str(runs_dir), access.Identity.for_runs(runs_dir), offered_models={str(tiny_model_dir)})


@pytest.mark.parametrize("name", NAMES)
def test_app_answers_every_malformed_input_with_a_report_or_a_message(name, corpus, gate, tiny_model_dir, tmp_path):
    import shutil

    uploaded = tmp_path / "gradio" / corpus[name].name  # the app keeps (moves) an upload: give it a copy
    uploaded.parent.mkdir()
    shutil.copyfile(corpus[name], uploaded)
    try:
        handle = data_tab.keep_upload(gate, "visitor", str(uploaded))
        outputs = data_tab.check_source(gate, "visitor", handle, "", False, str(tiny_model_dir), "", "", "train", 2048)
    except gr.Error as err:
        assert str(err).strip() and "Traceback" not in str(err)
    else:
        assert isinstance(outputs[0], checks.Report)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.binary(max_size=2000) | st.text(max_size=2000).map(str.encode))
def test_any_bytes_give_a_report_or_a_user_error(content, tmp_path, embedded_tokenizer):
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(content)
    try:
        report = checks.check_data(DataSettings(source=str(path)), embedded_tokenizer)
    except UserError as err:
        assert str(err)
    else:
        assert report.rows == report.valid_rows + report.invalid_rows


@pytest.mark.parametrize("name, says", [
    ("gzip renamed .jsonl", "gzip archive"), ("zip renamed .jsonl", "zip archive"), ("UTF-16 with BOM", "UTF-16"),
    ("CSV in UTF-16", "UTF-16"), ("PNG renamed .jsonl", "PNG image"), ("zero bytes", "binary data"),
    ("random binary", "binary data"), ("deeply nested JSON", "nested too deeply"),
    ("image parts in content", "text-only"), ("unsupported suffix", "unsupported file type"),
    ("surrogate escapes", "not valid Unicode"), ("CSV header repeats a column", "the column 'prompt' twice"),
    ("pretty-printed JSON cut short", "cut short?"), ("a number of 5,000 digits", "over 4,300 digits"),
])
def test_the_message_says_what_the_file_really_is(name, says, corpus, embedded_tokenizer):
    try:
        report = checks.check_data(DataSettings(source=str(corpus[name])), embedded_tokenizer)
        messages = [problem.message for problem in report.errors]
    except UserError as err:
        messages = [str(err)]
    assert any(says in message for message in messages), messages


def test_prompt_response_columns_are_read_as_prompt_and_reply(write_jsonl, embedded_tokenizer):
    path = write_jsonl([{"prompt": "Hi", "response": "Hello!"}, {"prompt": "Bye", "response": "Farewell!"}])
    report = checks.check_data(DataSettings(source=str(path)), embedded_tokenizer)
    assert report.valid_rows == 2
    assert report.valid_examples[0].messages == [{"role": "user", "content": "Hi"},
                                                 {"role": "assistant", "content": "Hello!"}]


def test_row_and_file_size_limits_are_named_in_the_error(write_jsonl, embedded_tokenizer, tiny_model_dir, capsys):
    from builders import distinct_chats

    path = write_jsonl(distinct_chats(12))
    with pytest.raises(UserError, match=r"more than 10 rows, the limit \(the max_rows setting, --max-rows\)"):
        checks.check_data(DataSettings(source=str(path), max_rows=10), embedded_tokenizer)
    assert checks.check_data(DataSettings(source=str(path), max_rows=12), embedded_tokenizer).valid_rows == 12
    with pytest.raises(UserError, match=r"over the limit of 0.001 MB \(the max_file_mb setting"):
        checks.check_data(DataSettings(source=str(path), max_file_mb=0.001), embedded_tokenizer)
    assert cli.main(["validate", str(path), "--model", str(tiny_model_dir), "--max-rows", "5"]) == 1
    assert "--max-rows" in capsys.readouterr().err


def test_reading_stops_at_the_row_limit(tmp_path, embedded_tokenizer):
    """A file far over the limit is not read to its end: memory stays bounded by the limit."""
    from sft_space import data

    served = []

    def endless(*args, **kwargs):
        for row in range(1, 10**9):
            served.append(row)
            yield row, {"text": "x"}

    import unittest.mock

    with unittest.mock.patch.object(data, "read_records", endless):
        with pytest.raises(UserError, match="more than 100 rows"):
            data.load_data("anything.jsonl", max_rows=100)
    assert len(served) == 101


def test_json_arrays_are_read_item_by_item_across_chunk_boundaries(tmp_path, monkeypatch):
    """A .json array is decoded one record at a time from small reads, so a huge file never sits in memory."""
    from sft_space import data

    monkeypatch.setattr(data, "JSON_CHUNK", 7)  # every record straddles several reads
    records = [item for i in range(3) for item in ({"prompt": f"q{i}" * 5, "response": "r" * 40}, 123456789, "t")]
    path = tmp_path / "array.json"
    path.write_text(json.dumps(records, indent=1))
    assert list(data._json_array_items(path)) == records
    # Past `hold`, an item is skipped unparsed, in pieces as small as the reads, escapes and nesting followed.
    escaped, long = 'x\\"]}' * 20, "w" * 100
    more = f', "{escaped}", [[{{"s": "]}}]"}}], "{{[[", "{long}", 7777777777777777], 8]'
    path.write_text(json.dumps(records, indent=1)[:-2] + more)
    items = list(data._json_array_items(path, hold=30))
    assert [type(item).__name__ for item in items] == ["_Skipped", "int", "str"] * 3 + ["_Skipped"] * 2 + ["int"]
    assert items[0].size == len(json.dumps(records[0], indent=1).replace("\n", "\n ")) and items[-1] == 8
    for broken, says in (('[{"a": 1}, {"b": 2', "cut short"), ('[{"a": 1}', "not closed"),
                         ('[{"a": 1} {"b": 2}]', "expected ','")):
        path.write_text(broken)
        with pytest.raises(json.JSONDecodeError, match=says):
            list(data._json_array_items(path))


# ---------------------------------------------------------------------- one row cannot exhaust the Space


def _check_within_budget(path, tokenizer, seconds=2.0, megabytes=300, **limits):
    """check_data's report, asserting it took under `seconds` and allocated under `megabytes` at its peak."""
    import time
    import tracemalloc

    settings = DataSettings(source=str(path), **limits)
    # CPU time of this process: on a machine busy with other tests the wall clock also counts waiting for a core.
    start = time.process_time()
    report = checks.check_data(settings, tokenizer)
    took = time.process_time() - start
    # Memory in a second pass: tracemalloc slows Python down, so it would blur the time above.
    tracemalloc.start()
    try:
        checks.check_data(settings, tokenizer)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert took < seconds, f"{took:.1f} s"
    assert peak < megabytes * 2**20, f"{peak / 2**20:.0f} MB"
    return report


def test_a_50_mb_row_is_answered_in_seconds_without_reading_it_whole(tmp_path, embedded_tokenizer):
    """The row limit is why: checked whole, a 50 MB row (far under the 1 GB file limit) takes 176 s and 13 GB."""
    from builders import distinct_chats

    path = tmp_path / "huge_row.jsonl"
    huge = {"messages": [{"role": "user", "content": "Summarise:" + "x" * 50 * 2**20},
                         {"role": "assistant", "content": "Too long."}]}
    with path.open("w") as f:
        for row in distinct_chats(3) + [huge] + distinct_chats(14)[3:]:
            f.write(json.dumps(row) + "\n")
    report = _check_within_budget(path, embedded_tokenizer)
    assert [(p.row, p.code) for p in report.errors] == [(4, "row_too_large")]
    assert report.errors[0].message == ("row 4 is 50.0 MB, over the limit of 1,024 KB per row (max_row_kb, "
                                        "--max-row-kb); split it or raise the limit.")
    assert report.valid_rows == 14  # the rest of the file is still checked


def test_a_row_of_4000_messages_is_answered_in_seconds(tmp_path, embedded_tokenizer):
    """The message limit is why: checked whole, one 160 KB row of 4,000 short messages takes 87 s."""
    path = tmp_path / "many_turns.jsonl"
    turns = [{"role": role, "content": f"{role} turn {i}"} for i in range(2000) for role in ("user", "assistant")]
    path.write_text(json.dumps({"messages": turns}) + "\n")
    report = _check_within_budget(path, embedded_tokenizer)
    assert [(p.row, p.code) for p in report.errors] == [(1, "too_many_messages")]
    assert report.errors[0].message.startswith("row 1 has 4,000 messages, over the limit of 512 per row")
    # With the limit raised, the same row is rendered and checked, still in seconds (rendering is linear).
    report = _check_within_budget(path, embedded_tokenizer, seconds=5.0, max_messages=4000, max_length=100_000)
    assert report.valid_rows == 1 and report.token_counts[0][0] == 4000
