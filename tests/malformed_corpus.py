"""The malformed-input corpus: files people really upload by mistake, each as (name, file name, contents).

Written by `write_corpus` into a folder at test time (a 10 MB line and binary junk do not belong in git).
Every one must give a clear error or per-row errors, never a traceback (tests/test_malformed.py).
"""

import gzip
import io
import json
import zipfile

GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
GOOD_LINE = json.dumps(GOOD)


def _parquet(columns):
    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.table(columns), buffer)
    return buffer.getvalue()


def _zip_bytes():
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("data.jsonl", GOOD_LINE + "\n")
    return buffer.getvalue()


def _nested(depth):
    return "[" * depth + "]" * depth


def cases():
    text = lambda s: s.encode("utf-8")  # noqa: E731
    lines = lambda *rows: ("\n".join(rows) + "\n").encode("utf-8")  # noqa: E731
    return [
        ("empty file", "empty.jsonl", b""),
        ("only whitespace", "blank.jsonl", b"\n\n   \n\t\n"),
        ("zero bytes", "zeros.jsonl", b"\x00" * 4096),
        ("random binary", "binary.jsonl", bytes(range(256)) * 64),
        ("PNG renamed .jsonl", "image.jsonl", b"\x89PNG\r\n\x1a\n" + bytes(200)),
        ("gzip renamed .jsonl", "packed.jsonl", gzip.compress(lines(GOOD_LINE, GOOD_LINE))),
        ("zip renamed .jsonl", "archive.jsonl", _zip_bytes()),
        ("UTF-16 with BOM", "utf16.jsonl", (GOOD_LINE + "\n").encode("utf-16")),
        ("UTF-8 byte-order mark", "bom.jsonl", b"\xef\xbb\xbf" + lines(GOOD_LINE, GOOD_LINE)),
        ("Latin-1 bytes", "latin1.jsonl", ('{"prompt": "caf\u00e9", "response": "ol\u00e9"}\n').encode("latin-1")),
        ("truncated JSON line", "truncated.jsonl", lines(GOOD_LINE, GOOD_LINE[:30])),
        ("truncated JSON array", "truncated.json", text("[" + GOOD_LINE + ", " + GOOD_LINE[:20])),
        ("one row only", "one.jsonl", lines(GOOD_LINE)),
        ("a 10 MB single line", "long.jsonl", lines(json.dumps({"prompt": "x" * 10_000_000, "response": "y"}))),
        ("4,000 messages in one row", "turns.jsonl", lines(json.dumps({"messages": [
            {"role": role, "content": f"turn {i}"} for i in range(2000) for role in ("user", "assistant")]}))),
        ("deeply nested JSON", "nested.jsonl", lines(_nested(100_000))),
        ("deeply nested object in content", "nested2.jsonl",
         lines(json.dumps({"prompt": "hi", "response": "ok", "extra": json.loads(_nested(500))}))),
        ("a bare string per line", "strings.jsonl", lines('"hello"', '"world"')),
        ("a number per line", "numbers.jsonl", lines("1", "2", "3")),
        ("null per line", "nulls.jsonl", lines("null", "null")),
        ("array of arrays", "arrays.json", text(json.dumps([[1, 2], [3, 4]]))),
        ("JSON object, not rows", "object.json", text(json.dumps({"data": "nothing here"}))),
        ("one conversation pretty-printed", "conversation.json", text(json.dumps(GOOD, indent=2))),
        ("rows wrapped under a key", "wrapped.json", text(json.dumps({"version": 2, "rows": [GOOD, GOOD]}, indent=2))),
        ("pretty-printed JSON cut short", "cut.json", text(json.dumps({"rows": [GOOD, GOOD]}, indent=2)[:-12])),
        ("a number of 5,000 digits", "digits.jsonl",
         lines(GOOD_LINE, '{"prompt": ' + "9" * 5000 + ', "response": "x"}')),
        ("messages is a string", "msgstring.jsonl", lines(json.dumps({"messages": "hi there"}))),
        ("messages is empty", "msgempty.jsonl", lines(json.dumps({"messages": []}))),
        ("message without role", "norole.jsonl", lines(json.dumps({"messages": [{"content": "hi"}]}))),
        ("role misspelled", "role.jsonl", lines(json.dumps({"messages": [{"role": "usr", "content": "hi"},
                                                                        {"role": "assistant", "content": "yo"}]}))),
        ("role is a number", "rolenum.jsonl", lines(json.dumps({"messages": [{"role": 1, "content": "hi"}]}))),
        ("null content", "nullcontent.jsonl", lines(json.dumps({"messages": [{"role": "user", "content": None},
                                                                            {"role": "assistant", "content": "x"}]}))),
        ("content is a number", "numcontent.jsonl",
         lines(json.dumps({"messages": [{"role": "user", "content": 42}, {"role": "assistant", "content": 7}]}))),
        ("image parts in content", "image_parts.jsonl", lines(json.dumps({"messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]},
            {"role": "assistant", "content": "A cat."}]}))),
        ("no assistant turn", "noassistant.jsonl", lines(json.dumps({"messages": [{"role": "user", "content": "hi"}]}))),
        ("ends with a user turn", "enduser.jsonl", lines(json.dumps({"messages": [
            {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}, {"role": "user", "content": "?"}]}))),
        ("empty assistant reply", "emptyreply.jsonl", lines(json.dumps({"messages": [
            {"role": "user", "content": "hi"}, {"role": "assistant", "content": "   "}]}))),
        ("two system messages", "twosystem.jsonl", lines(json.dumps({"messages": [
            {"role": "system", "content": "a"}, {"role": "system", "content": "b"},
            {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}))),
        ("prompt is a list", "promptlist.jsonl", lines(json.dumps({"prompt": ["a", "b"], "response": "c"}))),
        ("response missing", "noresponse.jsonl", lines(json.dumps({"prompt": "a"}))),
        ("unknown columns", "unknown.jsonl", lines(json.dumps({"foo": "a", "bar": "b"}))),
        ("mixed formats per row", "mixed.jsonl", lines(GOOD_LINE, json.dumps({"prompt": "a", "response": "b"}),
                                                      json.dumps({"text": "plain"}))),
        ("alpaca with wrong types", "alpaca.jsonl", lines(json.dumps({"instruction": 5, "input": None, "output": []}))),
        ("sharegpt with unknown speaker", "sharegpt.jsonl", lines(json.dumps({"conversations": [
            {"from": "alien", "value": "hi"}, {"from": "gpt", "value": "yo"}]}))),
        ("text column empty", "text.jsonl", lines(json.dumps({"text": ""}))),
        ("surrogate escapes", "surrogates.jsonl", lines('{"prompt": "\\ud800", "response": "ok"}')),
        ("control characters", "control.jsonl", lines(json.dumps({"prompt": "a\x07b\x1b[31m", "response": "ok"}))),
        ("NaN and Infinity", "nan.jsonl", lines('{"prompt": NaN, "response": Infinity}')),
        ("duplicate keys", "dupkeys.jsonl", lines('{"prompt": "a", "prompt": "b", "response": "c"}')),
        ("trailing commas", "trailing.jsonl", lines('{"prompt": "a", "response": "b",}')),
        ("single quotes", "quotes.jsonl", lines("{'prompt': 'a', 'response': 'b'}")),
        ("CRLF line endings", "crlf.jsonl", (GOOD_LINE + "\r\n" + GOOD_LINE + "\r\n").encode()),
        ("CSV with ragged rows", "ragged.csv", text("prompt,response\na,b\nc\nd,e,f,g\n")),
        ("CSV header only", "header.csv", text("prompt,response\n")),
        ("CSV without a header", "noheader.csv", text("a,b\nc,d\n")),
        ("CSV with an unclosed quote", "quote.csv", text('prompt,response\n"a,b\nc,d\n')),
        ("CSV in UTF-16", "utf16.csv", "prompt,response\na,b\n".encode("utf-16")),
        ("CSV of binary", "binary.csv", bytes(range(256)) * 16),
        ("CSV header repeats a column", "repeated.csv", text("prompt,response,prompt\na,b,c\n")),
        ("Parquet with the wrong columns", "wrong.parquet", _parquet({"foo": [1, 2], "bar": ["a", "b"]})),
        ("Parquet with messages as numbers", "numbers.parquet", _parquet({"messages": [1, 2]})),
        ("Parquet with no rows", "norows.parquet", _parquet({"prompt": [], "response": []})),
        ("text renamed .parquet", "fake.parquet", lines(GOOD_LINE)),
        ("JSON renamed .csv", "json.csv", lines(GOOD_LINE, GOOD_LINE)),
        ("unsupported suffix", "data.xlsx", b"PK\x03\x04" + bytes(100)),
        ("no suffix at all", "data", lines(GOOD_LINE)),
    ]


def write_corpus(folder):
    """Write every case into `folder`; returns [(name, path)]."""
    written = []
    for index, (name, file_name, contents) in enumerate(cases()):
        case_dir = folder / f"{index:02d}"
        case_dir.mkdir(parents=True)
        path = case_dir / file_name
        path.write_bytes(contents)
        written.append((name, path))
    return written
