"""Reading a stranger's file is bounded before the work happens, and a file is read as what it holds.

The memory tests read a small file that expands to far more, in a fresh Python process, and bound how much that
process's peak memory grows while it reads: the file's sizes are judged (Parquet's metadata, a JSON item's text)
before anything large is decoded.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from builders import chat, distinct_chats
from hypothesis import HealthCheck, given, settings, strategies as st

from sft_space import checks, data, formats
from sft_space.errors import DataSourceError

HELLO = chat(("Hi", "Hello!"))
REPO = Path(data.__file__).resolve().parent.parent

# Peak memory from /proc (VmHWM), not getrusage: a child's ru_maxrss starts from its parent's at the fork.
READ_IN_A_CHILD = """
import json, sys
import numpy, pyarrow.parquet  # loaded before the baseline: the libraries are not the read
from sft_space import data, formats

def peak_mb():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024

before = peak_mb()
try:
    loaded = data.load_data(sys.argv[1], **json.loads(sys.argv[2]))
    answer = {"problems": [[p.row, p.code] for p in loaded.problems], "rows": [e.row for e in loaded.examples]}
except Exception as err:
    answer = {"error": f"{type(err).__name__}: {err}"}
answer["grew_mb"] = peak_mb() - before
print(json.dumps(answer))
"""


def read_in_a_child(path, **limits):
    """load_data(path, **limits) in a fresh Python: its answer, and by how many MB its peak memory grew."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", READ_IN_A_CHILD, str(path), json.dumps(limits)], env=env,
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_parquet(path, columns, **options):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path, **options)
    return path


def long_text(n_bytes):
    """One Arrow string of n_bytes "x", made without a second copy."""
    import pyarrow as pa

    return pa.StringArray.from_buffers(1, pa.array([0, n_bytes], pa.int32()).buffers()[1], pa.py_buffer(b"x" * n_bytes))


# ---------------------------------------------------------------------------------------------- Parquet


def test_a_long_value_compressed_into_a_few_kb_of_parquet_is_refused_from_the_metadata(tmp_path):
    """48 MB of one repeated character compresses to a few KB; the row is judged from its row group's decompressed
    size and never decoded (decoding it into a Python string to measure it as JSON grows the peak by 300 MB)."""
    import pyarrow as pa

    small = pa.array(["Hi", "Hi"])
    prompts = pa.concat_arrays([small.slice(0, 1), long_text(48 * 2**20), small.slice(1, 1)])
    path = write_parquet(tmp_path / "bomb.parquet", {"prompt": prompts, "completion": ["Hello!"] * 3},
                         compression="zstd", row_group_size=1)
    assert path.stat().st_size < 100_000
    answer = read_in_a_child(path, max_row_kb=1024)
    assert answer["problems"] == [[2, "row_too_large"]] and answer["rows"] == [1, 3]
    assert answer["grew_mb"] < 30, answer


def test_a_value_shared_through_a_parquet_dictionary_is_measured_per_row_and_never_made(tmp_path):
    """One 2 MB value stored once in a column's dictionary and used by 100 rows is 200 MB once decoded. Each row is
    measured from the dictionary's value lengths and its indices, and no row over the limit is made into Python
    (making every row grows the peak by 670 MB)."""
    import pyarrow as pa

    shared = pa.DictionaryArray.from_arrays(pa.array([0] * 100, pa.int32()), long_text(2 * 2**20))
    path = write_parquet(tmp_path / "dictionary.parquet", {"prompt": shared, "completion": ["Hello!"] * 100},
                         compression="zstd", store_schema=False)
    assert path.stat().st_size < 200_000
    answer = read_in_a_child(path, max_row_kb=1024)
    assert answer["problems"] == [[row, "row_too_large"] for row in range(1, 101)]
    assert answer["grew_mb"] < 60, answer


def test_rows_made_from_a_parquet_dictionary_add_up_to_at_most_max_file_mb(tmp_path):
    import pyarrow as pa

    shared = pa.DictionaryArray.from_arrays(pa.array([0] * 2000, pa.int32()), pa.array(["y" * 100_000]))
    path = write_parquet(tmp_path / "many.parquet", {"prompt": shared, "completion": ["Hello!"] * 2000},
                         store_schema=False)
    with pytest.raises(DataSourceError, match=r"many.parquet: its rows add up to more than 50 MB once read "
                                              r".*max_file_mb"):
        data.load_data(str(path), max_file_mb=50)
    assert len(data.load_data(str(path), max_file_mb=500).examples) == 2000


def test_parquet_is_refused_from_its_metadata_over_max_rows_and_max_file_mb_decompressed(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    path = write_parquet(tmp_path / "d.parquet", {"prompt": [f"{i:04} " + "x" * 1000 for i in range(3000)],
                                                  "completion": ["y"] * 3000}, compression="zstd")
    decoded = []
    monkeypatch.setattr(pq.ParquetFile, "iter_batches", lambda *args, **kwargs: decoded.append(1) or iter(()))
    with pytest.raises(DataSourceError, match=r"more than 2,000 rows, the limit \(the max_rows setting, --max-rows\): "
                                              "it holds 3,000"):
        data.load_data(str(path), max_rows=2000)
    assert path.stat().st_size < 0.1 * 2**20
    with pytest.raises(DataSourceError, match=r"d.parquet: \d.\d MB of data once decompressed, over the limit of 1 MB"):
        data.load_data(str(path), max_file_mb=1)
    assert decoded == []


def test_a_parquet_row_group_whose_rows_average_over_the_limit_is_not_read(tmp_path):
    path = write_parquet(tmp_path / "d.parquet", {"text": ["a", "b" * 9000, "c", "d"]}, row_group_size=2)
    loaded = data.load_data(str(path), max_row_kb=4)
    assert [(p.row, p.code) for p in loaded.problems] == [(1, "row_too_large"), (2, "row_too_large")]
    assert loaded.problems[0].message.startswith("row 1 is in a Parquet row group (rows 1 to 2) of ")
    assert "over the limit of 4 KB per row" in loaded.problems[0].message
    assert [e.row for e in loaded.examples] == [3, 4]


def test_row_sizes_from_arrow_never_exceed_the_rows_compact_json():
    """Rows measured from the Arrow arrays are judged before they are made: the measure may be lower than the
    compact JSON (which then measures the row exactly), never higher, or a row under the limit would be refused."""
    import pyarrow as pa

    rows = [{"messages": chat(("Hi" * i, "Hello!"))["messages"] * i, "n": i, "tags": ["a" * i, None],
             "pair": [1.5, 2.5], "meta": {"k": "é" * i, "v": None}, "big": "b" * i} for i in range(1, 6)]
    rows[3].update(n=None, tags=None, pair=None, meta=None)
    table = pa.Table.from_pylist(rows)
    table = table.set_column(3, "pair", pa.array([row["pair"] for row in rows], pa.list_(pa.float64(), 2)))
    table = table.append_column("shared", pa.array(["s" * 10] * 5).dictionary_encode())
    table = table.append_column("none", pa.nulls(5))
    table = table.set_column(5, "big", pa.array([row["big"] for row in rows], pa.large_string()))
    batch = table.combine_chunks().to_batches()[0].slice(1, 4)  # a slice: every array starts at an offset
    measured = sum(data._value_sizes(column) for column in batch.columns)
    exact = [len(json.dumps(row, ensure_ascii=False, separators=(",", ":")).encode()) for row in batch.to_pylist()]
    assert all(0 < m <= e for m, e in zip(measured, exact)), (measured, exact)

    def values_only(value):  # the bytes of its texts, 1 per other value, 0 per null: no keys, quotes or commas
        if isinstance(value, dict | list):
            return sum(map(values_only, value.values() if isinstance(value, dict) else value))
        return len(value.encode()) if isinstance(value, str) else int(value is not None)

    assert list(measured) == [values_only(row) for row in batch.to_pylist()]


PARQUET_ROWS = st.lists(st.fixed_dictionaries({
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]),
                                                "content": st.sampled_from(["Hi", "x" * 300, "é" * 50]) | st.text()}),
                         max_size=3) | st.none(),
    "tags": st.lists(st.none() | st.sampled_from(["a", "b" * 100]), max_size=3) | st.none(),
    "n": st.none() | st.integers(-5, 5),
}), min_size=1, max_size=12)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=PARQUET_ROWS, group=st.integers(1, 5), batch=st.sampled_from([1, 3, 1024]), limit_kb=st.sampled_from(
    [None, 0.2, 1, 64]))
def test_parquet_rows_read_back_as_written_or_as_too_large(rows, group, batch, limit_kb, tmp_path_factory,
                                                           monkeypatch):
    """Against pyarrow's own reading: every row the reader makes equals the row written (dictionaries, row groups,
    batches of any size), and a row it refuses is over the limit as compact JSON or in a row group over it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setattr(data, "PARQUET_BATCH_ROWS", batch)
    path = tmp_path_factory.mktemp("parquet") / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=group)
    read = list(data._read_parquet(path, limit_kb))
    assert [row for row, _ in read] == list(range(1, len(rows) + 1))
    for written, (row, record) in zip(rows, read):
        if isinstance(record, formats.Problem):
            assert record.code == "row_too_large" and limit_kb is not None
            if "row group" not in record.message:
                assert len(json.dumps(written, ensure_ascii=False, separators=(",", ":")).encode()) > limit_kb * 1024
        else:
            assert record == written


# ------------------------------------------------------------------------------------------- JSON arrays


# A 32 MB item in three shapes (head, piece repeated, tail, the row's problem): one string full of escapes, many
# short strings, brackets nested a million deep.
HUGE_ITEM_SHAPES = {
    "escapes": ('{"messages": [{"role": "user", "content": "', 'x\\"y', '"}, {"role": "assistant", "content": "ok"}]}',
                "row_too_large"),
    "short strings": ('{"messages": [], "tags": [', '"ab",', '"ab"]}', "row_too_large"),
    "deep brackets": ('{"messages": ' + "[" * 2**20, "[], ", "[]" + "]" * 2**20 + "}", "unreadable_row"),
}


@pytest.mark.parametrize("shape", HUGE_ITEM_SHAPES)
def test_a_huge_item_of_a_json_array_is_skipped_unparsed_while_streaming(tmp_path, shape):
    """An item over the row limit (or nested too deeply to decode) is scanned in pieces and never held whole,
    whatever its shape, and the items after it are read (reading it whole to decode and measure it grows the peak
    by 120 MB for escapes, 595 MB for short strings)."""
    head, piece, tail, problem = HUGE_ITEM_SHAPES[shape]
    path = tmp_path / "array.json"
    with path.open("w") as f:
        f.write("[" + json.dumps(HELLO) + ", " + head)
        for _ in range(32):
            f.write(piece * (2**20 // len(piece)))
        f.write(tail + ", " + json.dumps(HELLO) + "]")
    answer = read_in_a_child(path, max_row_kb=1024)
    assert answer.get("problems") == [[2, problem]] and answer["rows"] == [1, 3], answer
    assert answer["grew_mb"] < 24, answer


def test_an_item_built_to_make_skipping_it_slow_stops_the_file_at_once(tmp_path):
    """Text where every few characters need a scanning step of their own ("[[1]]," repeated: 16 MB takes 6 s) is
    given up after a few thousand steps, naming its line; ordinary shapes take one step per run of values."""
    path = tmp_path / "d.json"
    path.write_text("[\n" + json.dumps(HELLO) + ',\n{"messages": [' + "[[1]]," * 2_000_000 + "1]}]")
    with pytest.raises(DataSourceError, match=r"d.json: the record at line 3 is over the limit of 1,024 KB per row "
                                              "and built of so many small nested parts"):
        data.load_data(str(path))


def test_array_items_over_the_limit_are_row_too_large_with_their_record_number(tmp_path):
    items = [HELLO, chat(("Hi", "z" * 9000)), 5, "s" * 9000, {"messages": HELLO["messages"], "note": "\\" * 9000},
             12345678901234567890, HELLO]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(items, indent=2))
    loaded = data.load_data(str(path), max_row_kb=2)
    assert [(p.row, p.code) for p in loaded.problems] == [(2, "row_too_large"), (3, "not_an_object"),
                                                          (4, "row_too_large"), (5, "row_too_large"),
                                                          (6, "not_an_object")]
    assert loaded.problems[0].message.startswith("row 2 is 9 KB, over the limit of 2 KB per row")
    assert [e.row for e in loaded.examples] == [1, 7]


def test_a_json_array_cut_short_or_broken_says_where(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "JSON_CHUNK", 16)
    path = tmp_path / "d.json"
    path.write_text(json.dumps([HELLO] * 3, indent=2)[:-30])
    with pytest.raises(DataSourceError, match=r"d.json: not valid JSON \(the file ends before its JSON is complete: "
                                              r"cut short\?\)"):
        data.load_data(str(path))
    path.write_text(json.dumps([HELLO] * 3, indent=2).replace('"Hello!"\n', '"Hello!",\n', 2))
    with pytest.raises(DataSourceError, match=r"not valid JSON \(Expecting property name enclosed in double quotes, "
                                              r"line 11 column 7\)"):
        data.load_data(str(path))


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet=st.sampled_from('ab "\\[]{},:\n\u00e9\u4e2d'), max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=12)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(items=st.lists(JSON_VALUES, max_size=6), indent=st.sampled_from([None, 0, 2]), chunk=st.integers(3, 40),
       hold=st.integers(1, 60))
def test_items_are_decoded_or_skipped_with_their_exact_size_whatever_the_reads(items, indent, chunk, hold,
                                                                                tmp_path_factory, monkeypatch):
    """Against Python's own decoder: every item comes back equal, or skipped with the size of its text as written
    (strings full of quotes, backslashes and brackets; multi-byte characters; reads of a few characters)."""
    monkeypatch.setattr(data, "JSON_CHUNK", chunk)
    texts = [json.dumps(item, indent=indent, ensure_ascii=False) for item in items]
    path = tmp_path_factory.mktemp("array") / "d.json"
    path.write_text("[" + ",\n".join(texts) + "]", encoding="utf-8")
    for item, text, read in zip(items, texts, data._json_array_items(path, hold=hold), strict=True):
        if isinstance(read, data._Skipped):
            assert read.size == len(text.encode()) and not read.too_deep
        else:
            assert read == item or (isinstance(item, float) and read == pytest.approx(item))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.dictionaries(st.text(max_size=3), JSON_VALUES, max_size=3), min_size=1, max_size=5),
       meta=JSON_VALUES.filter(lambda value: not isinstance(value, list)), indent=st.sampled_from([None, 2]),
       chunk=st.integers(3, 40), hold=st.integers(10, 200))
def test_rows_wrapped_under_a_key_stream_as_an_array_would(rows, meta, indent, chunk, hold, tmp_path_factory,
                                                            monkeypatch):
    """The rows under a key of one object too large to hold come back as from an array: equal, or skipped with the
    size of their text as written; the key before them is scanned past, the one after named as not read."""
    monkeypatch.setattr(data, "JSON_CHUNK", chunk)
    whole = {"meta": meta, "rows": rows, "after": meta}
    path = tmp_path_factory.mktemp("wrapped") / "d.json"
    path.write_text(json.dumps(whole, indent=indent, ensure_ascii=False), encoding="utf-8")
    records = list(data._one_object(path, hold))
    warnings = [record.message for row, record in records if row is None]
    assert warnings == [f"d.json: holds one JSON object; the {len(rows)} rows listed under its key 'rows' were read; "
                        "its other key(s) 'meta', 'after' were not read."]
    records = [(row, record) for row, record in records if row is not None]
    assert [row for row, _ in records] == list(range(1, len(rows) + 1))
    for row, (_, read) in zip(rows, records):
        if isinstance(read, data._Skipped):  # as written: indented one level deeper than on its own
            text = json.dumps(row, indent=indent, ensure_ascii=False).replace("\n", "\n" + " " * (indent or 0) * 2)
            assert read.size == len(text.encode())
        else:
            assert read == row


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.binary(max_size=600) | JSON_VALUES.map(lambda v: json.dumps(v, indent=1).encode())
       | st.text(alphabet=st.sampled_from('{}[]",: \n\\ab1'), max_size=200).map(str.encode))
def test_any_bytes_as_a_json_file_give_rows_or_a_data_source_error(content, tmp_path_factory):
    path = tmp_path_factory.mktemp("json") / "fuzz.json"
    path.write_bytes(content)
    for max_row_kb in (None, 0.05):
        try:
            loaded = data.load_data(str(path), max_row_kb=max_row_kb)
        except DataSourceError as err:
            assert str(err)
        else:
            assert loaded.rows == len(loaded.examples) + len({p.row for p in loaded.problems})


# -------------------------------------------------------------------------------- .json read as what it is


def test_a_json_file_holding_one_pretty_printed_conversation_is_one_row_with_a_warning(tmp_path, embedded_tokenizer):
    path = tmp_path / "one.json"
    path.write_text(json.dumps(chat(("Hi", "Hello!"), ("Bye", "Farewell!")), indent=2))
    report = checks.build_report(data.load_data(str(path)), embedded_tokenizer, 2048)
    assert report.rows == 1 and report.valid_rows == 1 and not report.errors
    warning = next(p for p in report.warnings if p.code == "one_json_object")
    assert warning.message.startswith("one.json: holds one JSON object, read as one row (one conversation)")


@pytest.mark.parametrize("key", ["data", "rows", "examples"])
def test_a_json_object_wrapping_the_rows_under_a_key_reads_them_and_names_the_key(tmp_path, key):
    path = tmp_path / "wrapped.json"
    path.write_text(json.dumps({"version": "1.0", key: distinct_chats(4)}, indent=2))
    loaded = data.load_data(str(path))
    assert [e.row for e in loaded.examples] == [1, 2, 3, 4] and not loaded.problems
    assert [(p.code, p.message) for p in loaded.warnings] == [(
        "one_json_object", f"wrapped.json: holds one JSON object; the 4 rows listed under its key {key!r} were read; "
                           "its other key(s) 'version' were not read.")]


def test_a_wrapping_object_too_large_to_hold_is_read_row_by_row(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "JSON_CHUNK", 64)
    rows = distinct_chats(3) + [chat(("Hi", "z" * 9000))] + distinct_chats(5)[3:]
    path = tmp_path / "big.json"
    path.write_text(json.dumps({"meta": {"notes": "n" * 9000, "list": [{"a": 1}]}, "train": rows}))
    loaded = data.load_data(str(path), max_row_kb=2)
    assert [(p.row, p.code) for p in loaded.problems] == [(4, "row_too_large")]
    assert [e.row for e in loaded.examples] == [1, 2, 3, 5, 6]
    assert [p.message for p in loaded.warnings] == ["big.json: holds one JSON object; the 6 rows listed under its "
                                                    "key 'train' were read; its other key(s) 'meta' were not read."]
    # One conversation too large to hold is one row over the limit, not a list of rows.
    path.write_text(json.dumps(chat(("Hi", "z" * 9000)), indent=2))
    assert [(p.row, p.code) for p in data.load_data(str(path), max_row_kb=2).problems] == [(1, "row_too_large")]


def test_json_with_one_object_per_line_is_still_read_line_by_line(tmp_path):
    path = tmp_path / "lines.json"
    path.write_text(json.dumps(HELLO) + "\n" + json.dumps(HELLO)[:30] + "\n" + json.dumps(HELLO) + "\n")
    loaded = data.load_data(str(path))
    assert [e.row for e in loaded.examples] == [1, 3] and [(p.row, p.code) for p in loaded.problems] == [
        (2, "unreadable_row")]
    assert loaded.warnings == []
    # Lines over the row limit are rows of their own too, even the first two.
    path.write_text((json.dumps(chat(("Hi", "z" * 9000))) + "\n") * 2 + json.dumps(HELLO) + "\n")
    loaded = data.load_data(str(path), max_row_kb=2)
    assert [(p.row, p.code) for p in loaded.problems] == [(1, "row_too_large"), (2, "row_too_large")]
    assert [e.row for e in loaded.examples] == [3] and loaded.warnings == []


def test_a_csv_header_naming_a_column_twice_is_an_error_naming_it(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,completion,prompt\nHi,Hello!,Hey\n")
    with pytest.raises(DataSourceError, match=r"d.csv: the header names the column 'prompt' twice \(columns 1, 3\)"):
        data.load_data(str(path))


# ------------------------------------------------------------------------------------ reports bounded in bytes


def test_columns_not_read_are_one_warning_however_many_distinct_keys(tmp_path):
    """100,000 distinct extra keys (1,000 on each of 100 rows) are one warning of a few hundred characters, not one
    per key (a million keys would make a 179 MB report)."""
    path = tmp_path / "keys.jsonl"
    with path.open("w") as f:
        for row in range(100):
            f.write(json.dumps({**HELLO, **{f"k{row}_{i}": 1 for i in range(1000)}}) + "\n")
    loaded = data.load_data(str(path))
    assert len(loaded.examples) == 100 and [p.code for p in loaded.warnings] == ["ignored_column"]
    assert len(json.dumps([p.message for p in loaded.warnings])) < 10_000
    assert loaded.warnings[0].message.startswith("10,000 or more columns or turn fields are not read in the OpenAI "
                                                 "chat (messages) format and were ignored, among them column 'k0_0' "
                                                 "(1 row(s), the first row 1), column 'k0_1'")
    # A few extra columns are still named one by one, with their exact count.
    path.write_text("".join(json.dumps({**HELLO, **{f"c{i}": 1 for i in range(6)}}) + "\n" for _ in range(3)))
    assert data.load_data(str(path)).warnings[0].message.startswith("6 columns or turn fields are not read")


# ---------------------------------------------------------------------------------- messages people understand


def test_a_json_line_cut_short_says_so(write_jsonl):
    path = write_jsonl([])
    path.write_text(json.dumps(HELLO) + "\n" + json.dumps(HELLO)[:-3] + "\n")
    loaded = data.load_data(str(path))
    assert [p.message for p in loaded.problems] == ["row 2: this line ends before its JSON is complete (cut short?); "
                                                    "complete the line or remove it."]
    path.write_text('{"messages": [] "x": 1}\n')
    assert "not valid JSON (Expecting ',' delimiter at column 17)" in data.load_data(str(path)).problems[0].message


@pytest.mark.parametrize("role, meant", [("bot", "assistant"), ("AI", "assistant"), ("model", "assistant"),
                                         ("gpt", "assistant"), ("human", "user"), ("developer", "system"),
                                         ("asistant", "assistant")])
def test_a_role_as_other_tools_write_it_gets_a_did_you_mean(write_jsonl, embedded_tokenizer, role, meant):
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": role, "content": "Hello!"}]}]
    report = checks.build_report(data.load_data(str(write_jsonl(rows))), embedded_tokenizer, 2048)
    assert [(p.row, p.code) for p in report.errors] == [(1, "unknown_role")]
    assert report.errors[0].message.endswith(f"did you mean {meant!r}?")


def test_a_number_python_cannot_read_is_a_row_error_not_a_traceback(tmp_path):
    line = '{"prompt": ' + "7" * 5000 + ', "response": "x"}'
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n" + line + "\n")
    loaded = data.load_data(str(path))
    assert [(p.row, p.code) for p in loaded.problems] == [(2, "unreadable_row")]
    assert "over 4,300 digits" in loaded.problems[0].message
    (tmp_path / "d.json").write_text("[" + line + "]")
    with pytest.raises(DataSourceError, match="over 4,300 digits"):
        data.load_data(str(tmp_path / "d.json"))
    (tmp_path / "d.csv").write_text('prompt,response\n"[' + "7" * 5000 + ']",x\n')
    assert data.load_data(str(tmp_path / "d.csv")).examples[0].messages[0]["content"] == "[" + "7" * 5000 + "]"


def test_a_hub_dataset_with_no_network_is_said_in_words(monkeypatch, hub_online):
    import datasets
    from huggingface_hub import HfApi

    def no_network(*args, **kwargs):
        raise httpx.ConnectError("[Errno -2] Name or service not known")

    monkeypatch.setattr(datasets, "load_dataset", no_network)
    with pytest.raises(DataSourceError) as refused:
        data.load_data("someone/chats")
    monkeypatch.setattr(HfApi, "dataset_info", no_network)
    with pytest.raises(DataSourceError) as refused_choices:
        data.hub_dataset_choices("someone/chats")
    for message in (str(refused.value), str(refused_choices.value)):
        assert "Could not reach the Hugging Face Hub" in message and "the network or the Hub did not answer" in message
        assert "Errno" not in message and "ConnectError" not in message
