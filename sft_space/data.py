"""Read a data source into numbered rows, within the limits set for it: a local `.jsonl`, `.json` (an array, one
object per line, or one object: a conversation, or the rows listed under one of its keys), `.csv`, `.parquet`, a
local dataset folder, or a Hugging Face Hub dataset id (streamed). Each row keeps its row number (the 1-based line
for JSONL and line-per-object JSON, the 1-based record index otherwise) so that every later problem can name it.

Bounded: a file over its size limit is not read, a row over its limit is reported unparsed (a JSON row is never
held whole), and files that are not what their name says are refused by their first bytes. What a row means is
formats.py's; `load_data` reads a source and hands its rows to `formats.load_records`.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import hub
from .errors import DataSourceError, Message, Setting
from .formats import ROWS_LIMIT, USED_COLUMNS, ColumnMapping, LoadedData, Problem, detect_row_format, load_records, shown
from .settings import DataSettings

FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
# The limit a refusal or problem names, the setting in each skin's words (errors.Setting): on the command line
# "(the max_file_mb setting, --max-file-mb)", "(max_row_kb, --max-row-kb)".
OVER_FILE_LIMIT = ("(the max_file_mb setting", Setting("max_file_mb", after_its_name=True),
                   "); use a smaller sample or raise the limit.")
ROW_LIMIT = ("(max_row_kb", Setting("max_row_kb", after_its_name=True), ")")


# ---------------------------------------------------------------------------------------------- reading


def check_source_exists(source: str) -> None:
    """Refuse, at once, a source named as a file that is not there, before a tokenizer or model is loaded for it
    (which takes seconds). Anything else is left to the reader."""
    path = Path(source).expanduser()
    if not path.exists() and (path.suffix.lower() in FILE_SUFFIXES or source.startswith((".", "/", "~"))):
        raise DataSourceError(f"{source}: no such file; check the path.")


def is_hub_dataset(source: str) -> bool:
    """Whether `source` names a Hub dataset (streamed, so its size is unknown until the end), not a file or
    folder here (`hub.is_hub_name`)."""
    return hub.is_hub_name(source)


def read_records(source: str, hub_config: str | None = None, hub_split: str = "train",
                 max_file_mb: float | None = None, max_row_kb: float | None = None,
                 max_rows: int | None = None) -> Iterator[tuple[int | None, Any]]:
    """Yield (row number, record) for every row; a record is a parsed value or a Problem.

    A row over `max_row_kb` becomes a `row_too_large` problem: a JSONL line is measured as it is read and never
    held whole, and so is a JSON array's item whose text is over twice the limit; a Parquet row is measured from the
    file's metadata and its Arrow buffers before it is made (see _read_parquet); other sources are measured as each
    record arrives (as compact JSON), before anything else sees it.
    A Problem with a code of READING_WARNINGS (row None) says what of the source was left out: data after a JSON array,
    files of another format in a folder, the rows of a Hub dataset past `max_rows` (a Hub dataset is streamed,
    so only the rows read are downloaded).
    """
    path = Path(source).expanduser()
    if path.is_dir():
        yield from _bounded(_read_dataset_folder(path, hub_split), max_row_kb)
        return
    if path.is_file():
        size_mb = path.stat().st_size / 2**20
        if max_file_mb is not None and size_mb > max_file_mb:
            raise DataSourceError(Message(f"{path.name}: {size_mb:,.1f} MB, over the limit of {max_file_mb:,g} MB ",
                                          *OVER_FILE_LIMIT))
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".json", ".csv"):
            _refuse_binary(path)
        if suffix == ".jsonl":
            yield from _read_json_lines(path, max_row_kb)
        elif suffix == ".json":
            yield from _read_json(path, max_row_kb)
        elif suffix == ".csv":
            yield from _bounded(_read_csv(path, max_row_kb), max_row_kb)
        elif suffix == ".parquet":
            yield from _bounded(_read_parquet(path, max_row_kb, max_file_mb, max_rows), max_row_kb)
        else:
            raise DataSourceError(
                f"{path.name}: unsupported file type {path.suffix or '(none)'!r}. "
                f"Use one of {', '.join(FILE_SUFFIXES)}."
            )
        return
    check_source_exists(source)
    if is_hub_dataset(source):
        yield from _bounded(_read_hub_dataset(source, hub_config, hub_split, max_rows), max_row_kb)
        return
    raise DataSourceError(
        f"{source!r} is neither a file nor a folder here, nor a Hub dataset id of the form owner/name."
    )


# What a file named .jsonl/.json/.csv really is when its first bytes say so.
BINARY_SIGNATURES = (
    (b"\x1f\x8b", "a gzip archive; decompress it first (gunzip FILE)"),
    (b"PK\x03\x04", "a zip archive (or an Excel/Office file); extract it, or export the sheet as .csv"),
    (b"PAR1", "a Parquet file; name it .parquet"),
    (b"\x89PNG", "a PNG image"),
    (b"%PDF", "a PDF document"),
    (b"\xff\xfe", "UTF-16 text; save it as UTF-8"),
    (b"\xfe\xff", "UTF-16 text; save it as UTF-8"),
)


def _refuse_binary(path: Path) -> None:
    with path.open("rb") as f:
        head = f.read(4096)
    for signature, what in BINARY_SIGNATURES:
        if head.startswith(signature):
            raise DataSourceError(f"{path.name}: this file is {what}, not {path.suffix} text.")
    if b"\x00" in head:
        raise DataSourceError(f"{path.name}: this file holds binary data (zero bytes), not {path.suffix} text; "
                              "check that you picked the right file.")


def _decode_line(raw: bytes, row: int, strip_bom: bool) -> tuple[int, Any]:
    try:
        text = raw.decode("utf-8-sig" if strip_bom else "utf-8")
    except UnicodeDecodeError as err:
        return row, Problem(
            row, "unreadable_row", f"row {row}: not valid UTF-8 (byte {err.start + 1}); save the file as UTF-8."
        )
    try:
        return row, json.loads(text)
    except json.JSONDecodeError as err:
        if _cut_short(err):
            return row, Problem(row, "unreadable_row", f"row {row}: this line ends before its JSON is complete (cut "
                                                          "short?); complete the line or remove it.")
        return row, Problem(
            row, "unreadable_row", f"row {row}: not valid JSON ({err.msg} at column {err.colno}); fix or remove the line."
        )
    except RecursionError:
        return row, Problem(row, "unreadable_row", f"row {row}: JSON nested too deeply to read; a training "
                                                      "example needs a few levels at most.")
    except ValueError as err:  # Python refuses integers of over 4,300 digits
        return row, Problem(row, "unreadable_row", f"row {row}: {_number_too_long(err)}; write it as text.")


def _number_too_long(err: ValueError) -> str:
    if "digits" not in str(err):
        raise err
    return "holds a number of over 4,300 digits, more than Python reads as a number"


def _row_bytes(max_row_kb: float | None) -> int | None:
    return None if max_row_kb is None else max(0, int(max_row_kb * 1024))


def _row_too_large(row: int, size: int, max_row_kb: float) -> Problem:
    return Problem(row, "row_too_large", Message(f"row {row} is {_size_shown(size)}, over the limit of {max_row_kb:,g} "
                                                 "KB per row ", *ROW_LIMIT, "; split it or raise the limit."))


def _size_shown(size: float) -> str:
    # Rounded up, so that a row just over the limit never reads as the limit itself.
    return f"{size / 2**20:,.1f} MB" if size >= 10 * 2**20 else f"{math.ceil(size / 1024):,} KB"


def _bounded(records: Iterator[tuple[int, Any]], max_row_kb: float | None) -> Iterator[tuple[int, Any]]:
    """Records over the row limit, measured as compact JSON, replaced by a row_too_large problem.

    For readers that hand over whole records (JSON arrays, CSV, Parquet, datasets): the record is already in
    memory, but it goes no further, so nothing downstream (normalising, the chat template, the tokenizer) sees it.
    """
    limit = _row_bytes(max_row_kb)
    for row, record in records:
        if limit is not None and not isinstance(record, Problem):
            try:
                size = len(json.dumps(record, ensure_ascii=False, separators=(",", ":"), default=str).encode("utf-8"))
            except RecursionError:
                record = Problem(row, "unreadable_row", f"row {row}: nested too deeply to read; a training "
                                                           "example needs a few levels at most.")
            else:
                if size > limit:
                    record = _row_too_large(row, size, max_row_kb)
        yield row, record


def _lines(handle: Any, limit: int | None) -> Iterator[tuple[bytes | None, int]]:
    """(line, size without its line end) for every line of a binary file; a line over `limit` bytes comes as
    (None, size). It is read and dropped piece by piece, so it is never in memory whole."""
    def line_end(raw: bytes) -> int:
        return len(raw) - len(raw.removesuffix(b"\n").removesuffix(b"\r"))

    if limit is None:
        for raw in handle:
            yield raw, len(raw) - line_end(raw)
        return
    while raw := handle.readline(limit + 2):  # room for the longest line allowed and its "\r\n"
        if raw.endswith(b"\n") or len(raw) < limit + 2:  # the whole line (the last one may have no "\n")
            size = len(raw) - line_end(raw)
            yield (raw if size <= limit else None), size
            continue
        size = len(raw)
        while not raw.endswith(b"\n") and (raw := handle.readline(max(limit + 2, JSON_CHUNK))):
            size += len(raw)
        yield None, size - line_end(raw)


def _read_json_lines(path: Path, max_row_kb: float | None = None) -> Iterator[tuple[int, Any]]:
    with path.open("rb") as f:
        for line_number, (raw, size) in enumerate(_lines(f, _row_bytes(max_row_kb)), start=1):
            if raw is None:
                yield line_number, _row_too_large(line_number, size, max_row_kb)
            elif raw.strip():
                yield _decode_line(raw, line_number, strip_bom=line_number == 1)


def _read_json(path: Path, max_row_kb: float | None = None) -> Iterator[tuple[int | None, Any]]:
    """A .json file as what it holds: an array of rows; rows one object per line (as many tools write "JSON"); or
    one object, which is one row (one conversation) unless it wraps the list of rows under a key (then that list is
    read). A warning says which, when it is one object.

    An array's item (or a wrapped list's) whose text is over twice `max_row_kb` is skipped unparsed, read in
    pieces, and reported as row_too_large; a smaller one is decoded and measured as compact JSON. Twice: the text
    as written holds a pretty-printed file's indentation, which the compact form does not.
    """
    limit = _row_bytes(max_row_kb)
    hold = None if limit is None else 2 * limit
    with path.open("rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith(b"["):
        records = _numbered(_json_array_items(path, hold))
    elif head.startswith(b"{") and not _one_object_per_line(path, limit):
        records = _one_object(path, hold)
    else:
        yield from _read_json_lines(path, max_row_kb)
        return
    try:
        yield from _bounded(_measured(records, max_row_kb), max_row_kb)
    except UnicodeDecodeError:
        raise DataSourceError(f"{path.name}: not valid UTF-8; save the file as UTF-8.") from None
    except json.JSONDecodeError as err:
        where = "" if err.msg == _ENDS_EARLY else f", line {err.lineno:,} column {err.colno:,}"
        raise DataSourceError(
            f"{path.name}: not valid JSON ({err.msg}{where}); fix the file, or save it as JSONL (one object per line) "
            "so one bad row does not spoil the rest."
        ) from None
    except RecursionError:
        raise DataSourceError(f"{path.name}: JSON nested too deeply to read; a training example needs a few "
                              "levels at most.") from None
    except TooIntricate as err:
        raise DataSourceError(f"{path.name}: the record at line {err.line:,} is over the limit of {max_row_kb:,g} KB "
                              "per row and built of so many small nested parts that skipping it would take too long; "
                              "the file was not read further. Split or remove that record, or save the file as JSONL "
                              "(one object per line), where a line over the limit is skipped at once.") from None
    except ValueError as err:
        raise DataSourceError(f"{path.name}: {_number_too_long(err)}; write it as text.") from None


@dataclass(slots=True)
class _Skipped:
    """A JSON value skipped unparsed (see _JsonText.value): its text is over the size held, or it is nested too
    deeply to decode. Its size in bytes."""

    size: int
    too_deep: bool = False


def _numbered(items: Iterable[Any]) -> Iterator[tuple[int | None, Any]]:
    """Records numbered from 1 (the record index); a Problem, a warning about the whole file, gets no number."""
    row = 0
    for item in items:
        if isinstance(item, Problem):
            yield None, item
        else:
            row += 1
            yield row, item


def _measured(records: Iterable[tuple[int | None, Any]], max_row_kb: float | None) -> Iterator[tuple[int | None, Any]]:
    """Skipped values as the row problems they are."""
    for row, record in records:
        if isinstance(record, _Skipped):
            record = Problem(row, "unreadable_row", f"row {row}: JSON nested too deeply to read; a training example "
                                                    "needs a few levels at most.") if record.too_deep else \
                _row_too_large(row, record.size, max_row_kb)
        yield row, record


def _one_object_per_line(path: Path, limit: int | None) -> bool:
    """Whether a .json file that starts with '{' is written one object per line: it has two lines or more, and its
    first or second line is a whole object, or a line over the row limit (an object spread over many lines has
    neither)."""
    lines = []
    with path.open("rb") as f:
        for raw, _size in _lines(f, limit):
            if raw is None or raw.strip():
                lines.append(raw)
                if len(lines) == 2:
                    break
    for raw in lines if len(lines) == 2 else []:
        try:
            if raw is None or isinstance(json.loads(raw.removeprefix(b"\xef\xbb\xbf")), dict):
                return True
        except (ValueError, RecursionError):  # ValueError: invalid JSON or invalid UTF-8
            continue
    return False


def _one_object(path: Path, hold: int | None) -> Iterator[tuple[int | None, Any]]:
    """The rows of a .json file that holds one object (see _read_json), with the warning that says how it was read."""
    with path.open("r", encoding="utf-8-sig") as handle:
        text = _JsonText(handle, hold)
        text.peek()
        whole = text.value()
        text.peek()
        trailing = list(_trailing_data(path, handle, text.buffer[text.at:], array=False))
    if isinstance(whole, _Skipped):
        yield from _rows_under_a_key(path, hold, whole)
    elif (key := _rows_key(whole)) is None:
        yield None, Problem(None, "one_json_object", f"{path.name}: holds one JSON object, read as one row (one "
                                                     "conversation); for more rows, write a JSON array of objects, or "
                                                     "one object per line (JSONL).")
        yield 1, whole
    else:
        yield None, _wrapped_rows_warning(path, key, len(whole[key]), [k for k in whole if k != key])
        yield from enumerate(whole[key], start=1)
    for problem in trailing:
        yield None, problem


def _row_keys() -> set[str]:
    """Keys that make an object one row in a known format (see USED_COLUMNS): such an object never wraps rows."""
    return set().union(*USED_COLUMNS.values())


def _rows_key(record: Any) -> str | None:
    """The key of the first list of objects in an object that is not itself a row; None when there is none."""
    if not isinstance(record, dict) or detect_row_format(record) is not None:
        return None
    return next((key for key, value in record.items()
                 if isinstance(value, list) and value and isinstance(value[0], dict)), None)


def _wrapped_rows_warning(path: Path, key: str, rows: int, others: list[str]) -> Problem:
    not_read = (f"; its other key(s) {', '.join(shown(k, 40) for k in others[:5])}{', …' if len(others) > 5 else ''} "
                "were not read") if others else ""
    return Problem(None, "one_json_object", f"{path.name}: holds one JSON object; the {rows:,} rows listed under its "
                                            f"key {shown(key, 40)} were read{not_read}.")


def _rows_under_a_key(path: Path, hold: int | None, whole: _Skipped) -> Iterator[tuple[int | None, Any]]:
    """The rows of a .json file's one object that was skipped whole (too large to hold, or too deep), read from the
    first key (not of a row's) whose value is a list of objects, item by item as in an array; the other keys' values
    are skipped unparsed. An object with no such key is one row, skipped."""
    with path.open("r", encoding="utf-8-sig") as handle:
        text = _JsonText(handle, hold)
        text.peek()
        text.at += 1  # the '{'
        key, others, rows, row_keys = None, [], 0, _row_keys()
        while (char := text.peek()) not in ("}", ""):
            if others or key is not None:
                if char != ",":
                    raise text.broken("expected ',' or '}' after a value", text.at)
                text.at += 1
                char = text.peek()
            if char != '"' or not isinstance(name := text.value(), str):
                raise text.broken("expected a key in double quotes, within the row limit", text.at)
            if text.peek() != ":":
                raise text.broken("expected ':' after a key", text.at)
            text.at += 1
            text.peek()
            if key is None and not row_keys.intersection(others) and name not in row_keys and text.objects_follow():
                key = name
                text.at += 1  # the '['
                for item in text.items():
                    rows += 1
                    yield rows, item
            else:
                others.append(name)
                text.scan()
        if not char:
            raise text.broken(_ENDS_EARLY, text.at)
        text.at += 1
        text.peek()
        trailing = list(_trailing_data(path, handle, text.buffer[text.at:], array=False))
    if key is None:
        yield 1, whole
    else:
        yield None, _wrapped_rows_warning(path, key, rows, [k for k in others if k != key])
    for problem in trailing:
        yield None, problem


JSON_CHUNK = 1 << 20
_SPACE = re.compile(r"\s*")
_DECODER = json.JSONDecoder()
_ENDS_EARLY = "the file ends before its JSON is complete: cut short?"
# How a value skipped unparsed is scanned (see _JsonText.scan): in one step, a run of strings, what lies between
# them, and containers holding no container (a messages list's messages); then runs of opening or closing
# brackets; the body of a string that goes on past what is read; the end of a bare number or literal. Possessive
# (Python 3.11): with backtracking kept, one match over 1 MB of short strings takes 142 MB.
_STRING = r'"[^"\\]*+(?:\\.[^"\\]*+)*+"'
_FLAT = rf'(?:[^"\[\]{{}}]++|{_STRING})*+'
_PLAIN_RUN = re.compile(rf"(?:[^\"\[\]{{}}]++|{_STRING}|\[{_FLAT}\]|\{{{_FLAT}\}})*+", re.DOTALL)
_OPENERS = re.compile(r"[\[{]+")
_CLOSERS = re.compile(r"[\]}]+")
_STRING_BODY = re.compile(r'[^"\\]*+(?:\\.[^"\\]*+)*+', re.DOTALL)
_SCALAR_END = re.compile(r"[\s,\]}]")
_NUMBER_TAIL = re.compile(r"[-+.eE0-9]*")


def _cut_short(err: json.JSONDecodeError) -> bool:
    """Whether JSON failed to decode only because its text ends too early (more text could complete it)."""
    if err.msg.startswith("Unterminated string"):
        return True
    rest = err.doc[err.pos:].strip()
    if err.msg.startswith("Invalid \\uXXXX escape"):
        return len(rest) < 6
    # Nothing left, or the start of a literal, or a number's tail ("1." or "1e+" stops the number at the "1").
    return _NUMBER_TAIL.fullmatch(rest) is not None or any(
        word.startswith(rest) for word in ("true", "false", "null", "NaN", "Infinity", "-Infinity"))


# Hand-written rather than ijson (3.6.0, its C backend), measured on the 2-core machine: ijson read a 70 MB array of
# 60,000 chats in 0.11 s against 0.20 s here, but it builds every nesting level's path prefix, so one row nested
# 30,000 levels deep (60 KB, far under the row limit) takes it 5.9 s and 2.2 GB, and 100,000 levels (200 KB) are
# killed for memory; here the decoder's RecursionError refuses any such file in under 5 ms.
# A value is scanned past in steps of one regular expression each (see _JsonText.scan). Ordinary data takes one
# step per run of strings and flat objects (chat messages with nested tool calls: a step per 20 to 30 characters, 16 MB
# in 1.1 s); text built so that every few characters need a step of their own ("[[1]]," repeated: 16 MB takes 6 s)
# is given up once past SCAN_STEPS_FREE steps at under SCAN_CHARACTERS_PER_STEP characters a step.
SCAN_STEPS_FREE = 10_000
SCAN_CHARACTERS_PER_STEP = 8


class TooIntricate(Exception):
    """A value over the row limit whose shape makes scanning past it cost a step every few characters."""

    def __init__(self, line: int) -> None:
        super().__init__(f"line {line}")
        self.line = line


class _JsonText:
    """JSON text read from a file in pieces and walked with a position, one value at a time: memory stays bounded
    by the largest value held, not the file.

    The buffer is walked with a position rather than sliced after every value (slicing copies what is left:
    quadratic in the values per read), and a value that does not fit is read on by as much again as is held, so
    that decoding a large value is retried a logarithmic number of times, not once per read. With `hold`, a value
    whose text grows past `hold` characters is not decoded but scanned past in pieces (see `scan`).
    """

    def __init__(self, handle: Any, hold: int | None = None) -> None:
        self.handle, self.hold = handle, hold
        self.buffer, self.at, self.at_end = "", 0, False
        self.lines_dropped = 0  # line ends in the text already dropped from the buffer: errors name the file's line

    def read_more(self) -> bool:
        more = self.handle.read(max(JSON_CHUNK, len(self.buffer) - self.at))
        self.at_end = not more
        self.lines_dropped += self.buffer.count("\n", 0, self.at)
        self.buffer, self.at = self.buffer[self.at:] + more, 0
        return not self.at_end

    def peek(self) -> str:
        """The next character that is not white space ("" at the end of the file); the position moves onto it."""
        while True:
            self.at = _SPACE.match(self.buffer, self.at).end()
            if self.at < len(self.buffer) or not self.read_more():
                return self.buffer[self.at:self.at + 1]

    def broken(self, message: str, position: int) -> json.JSONDecodeError:
        """An error naming the file's line (the buffer holds only part of the file)."""
        err = json.JSONDecodeError(message, self.buffer, position)
        err.lineno += self.lines_dropped
        return err

    def value(self) -> Any:
        """The value at the position, decoded (the position moves past it); or a _Skipped when its text is over
        `hold` characters or it is nested too deeply to decode (then it is scanned past, never held)."""
        scanned = False
        while True:
            try:
                item, end = _DECODER.raw_decode(self.buffer, self.at)
            except json.JSONDecodeError as err:
                if not _cut_short(err) or scanned:
                    raise self.broken(err.msg, err.pos) from None
                if self.at_end:
                    raise self.broken(_ENDS_EARLY, err.pos) from None
                if self.hold is None:
                    self.read_more()
                    continue
                # The value goes on past what is read: find its end first, so that it is decoded once, whole, and
                # only when it is within `hold`.
                if self.scan(self.hold) is None:
                    return _Skipped(self.scan())
                scanned = True
                continue
            except RecursionError:
                return _Skipped(self.scan(), too_deep=True)
            # A value ending where the text read ends may be a number cut short (also "1." or "1e"): read on.
            if not self.at_end and not scanned and _NUMBER_TAIL.fullmatch(self.buffer, end):
                if self.hold is not None and len(self.buffer) - self.at > self.hold:
                    return _Skipped(self.scan())
                self.read_more()
                continue
            self.at = end
            return item

    def scan(self, hold: int | None = None) -> int | None:
        """Scan the value at the position to its end without decoding it, reading on as needed.

        With `hold`: keep what is read, and give the value's end in the buffer, or None once the value is over
        `hold` characters (the position stays). Without: drop what is scanned as it goes (only the nesting depth and
        whether the scan is inside a string are kept), move past the value, and give its size in bytes.

        Each step is one regular expression over as much as it can take (a run of strings and separators, of
        brackets, or a string's body with its escapes), so that no shape of text makes the scan one step per
        character."""
        size, depth, in_string, position = 0, 0, False, self.at
        scalar = self.buffer[position] not in '[{"'
        steps, dropped = 0, 0
        while True:
            steps += 1
            if steps > SCAN_STEPS_FREE and steps * SCAN_CHARACTERS_PER_STEP > dropped + position - self.at:
                raise TooIntricate(self.lines_dropped + self.buffer.count("\n", 0, position) + 1)
            if scalar:
                found = _SCALAR_END.search(self.buffer, position)
                if found:
                    position = found.start()
                    break
                position = len(self.buffer)
            elif in_string:
                position = _STRING_BODY.match(self.buffer, position).end()
                if self.buffer.startswith('"', position):
                    in_string, position = False, position + 1
                    if depth == 0:
                        break
                    continue
                # At the end of what is read (a backslash there waits for the character it escapes).
            else:
                if depth:  # (at depth 0 the position is on the value's own first bracket or quote)
                    position = _PLAIN_RUN.match(self.buffer, position).end()
                char = self.buffer[position:position + 1]
                if char == '"':  # a string that goes on past what is read
                    in_string, position = True, position + 1
                    continue
                if char in ("[", "{"):
                    run = _OPENERS.match(self.buffer, position).end() - position
                    depth, position = depth + run, position + run
                    continue
                if char in ("]", "}"):
                    run = _CLOSERS.match(self.buffer, position).end() - position
                    if run >= depth:
                        position += depth
                        break
                    depth, position = depth - run, position + run
                    continue
            if hold is not None:
                if position - self.at > hold:
                    return None
            else:
                size += len(self.buffer[self.at:position].encode("utf-8"))
                dropped += position - self.at
                self.at = position
            kept = self.at
            if not self.read_more():
                if scalar:
                    break
                raise self.broken(_ENDS_EARLY, len(self.buffer))
            position -= kept
        if hold is not None:
            return position
        size += len(self.buffer[self.at:position].encode("utf-8"))
        self.at = position
        return size

    def objects_follow(self) -> bool:
        """Whether the value at the position is an array whose first item is an object."""
        while len(self.buffer) - self.at < 4096 and not self.at_end:
            self.read_more()
        return re.match(r"\[\s*\{", self.buffer[self.at:self.at + 4096]) is not None

    def items(self) -> Iterator[Any]:
        """The items of the array whose '[' was just passed, each as `value` gives it; the position ends past ']'."""
        expecting_item = True
        while True:
            char = self.peek()
            if char == "]":
                self.at += 1
                return
            if char == ",":
                if expecting_item:
                    raise self.broken("unexpected ','", self.at)
                self.at, expecting_item = self.at + 1, True
                continue
            if not char:
                raise self.broken("the array is not closed with ']'", self.at)
            if not expecting_item:
                raise self.broken("expected ',' or ']' between records", self.at)
            yield self.value()
            expecting_item = False


def _json_array_items(path: Path, hold: int | None = None) -> Iterator[Any]:
    """The items of a top-level JSON array, decoded one at a time (see _JsonText), then any trailing-data warning."""
    with path.open("r", encoding="utf-8-sig") as handle:
        text = _JsonText(handle, hold)
        if text.peek() != "[":
            raise text.broken("the file does not start with '['", text.at)
        text.at += 1
        yield from text.items()
        text.peek()
        yield from _trailing_data(path, handle, text.buffer[text.at:])


def _trailing_data(path: Path, handle: Any, rest: str, array: bool = True) -> Iterator[Problem]:
    """A warning when anything but whitespace follows the closing ']' of the array (or '}' of the one object) that
    the file holds; read in pieces, never kept."""
    head = rest.strip()[:40]
    size = len(rest.strip())
    while more := handle.read(JSON_CHUNK):
        head = head or more.strip()[:40]
        size += len(more)
    if head:
        closing, fix = ("']' of the JSON array", "put every record inside the one array") if array else \
            ("'}' of the JSON object", "write the rows as a JSON array, or one object per line (JSONL)")
        yield Problem(None, "trailing_data", f"{path.name}: about {size:,} characters after the closing {closing} "
                                                f"were not read (they start {head!r}); remove them, or {fix}.")


def _read_csv(path: Path, max_row_kb: float | None = None) -> Iterator[tuple[int, Any]]:
    # Python's csv refuses cells over 128 KB, under the row limit: let it read cells up to the row limit (only ever
    # raised, as the setting is the whole process's), so that such rows are measured and reported like any other.
    limit = _row_bytes(max_row_kb)
    if limit is not None:
        csv.field_size_limit(max(csv.field_size_limit(), limit))
    # Read row by row from the file, not as one string: memory stays bounded by the rows kept.
    with path.open("r", encoding="utf-8-sig", newline="") as handle:
        index = 0
        try:
            reader = csv.DictReader(handle)
            if not reader.fieldnames:
                raise DataSourceError(f"{path.name}: empty CSV file; the first line must name the columns.")
            _refuse_repeated_columns(path, reader.fieldnames)
            for index, record in enumerate(reader, start=1):
                if None in record or None in record.values():
                    more_or_fewer = "more" if None in record else "fewer"
                    yield index, Problem(
                        index, "unreadable_row",
                        f"row {index}: has {more_or_fewer} values than the {len(reader.fieldnames)} columns in the "
                        "header; quote cells that contain commas, and give every row one value per column.",
                    )
                    continue
                yield index, {key: _maybe_json_list(value) for key, value in record.items()}
        except UnicodeDecodeError:
            raise DataSourceError(f"{path.name}: not valid UTF-8; save it as UTF-8 (in Excel: Save As, "
                                  "\"CSV UTF-8\").") from None
        except csv.Error as err:
            if "field larger than field limit" in str(err) and max_row_kb is not None:
                # The csv module cannot skip the cell and carry on, so the file stops here, naming the row.
                raise DataSourceError(Message(f"{path.name}: row {index + 1} has a cell over the limit of "
                                              f"{max_row_kb:,g} KB per row ", *ROW_LIMIT,
                                              "; split it or raise the limit.")) from None
            raise DataSourceError(f"{path.name}: not a readable CSV file ({err}).") from None


def _refuse_repeated_columns(path: Path, header: list[str]) -> None:
    """A header naming a column twice is refused: a row can keep only one of the two values."""
    repeated = next((name for name, n in Counter(header).items() if n > 1), None)
    if repeated is not None:
        places = [str(index) for index, name in enumerate(header, start=1) if name == repeated]
        raise DataSourceError(f"{path.name}: the header names the column {shown(repeated)} "
                              f"{'twice' if len(places) == 2 else f'{len(places)} times'} "
                              f"(columns {', '.join(places)}); rename or remove all but one, so that no column's "
                              "values are lost.")


def _maybe_json_list(value: str) -> Any:
    """CSV cannot nest, so conversations in CSV cells are JSON strings; decode those, leave the rest."""
    stripped = value.strip()
    if stripped.startswith("[") and stripped.endswith("]"):
        try:
            return json.loads(stripped)
        except (ValueError, RecursionError):  # not JSON after all, or a number Python does not read
            return value
    return value


# Rows per batch are chosen so that a batch holds about this much decompressed data. Up to 16,384 rows: text read
# as dictionaries costs per batch (measured: 30,000 chats of 1 KB read in 1.9 s in batches of 1,024, 0.2 s of 16,384).
PARQUET_BATCH_BYTES = 16 * 2**20
PARQUET_BATCH_ROWS = 16_384
# Bytes of a column chunk that are Parquet's own, not the rows' (measured: 40 to 100 for a chunk of a few values).
PARQUET_COLUMN_OVERHEAD = 256
# Parquet's byte-array columns read as Arrow dictionaries: text and bytes (not decimals stored as bytes).
TEXT_LOGICAL_TYPES = ("STRING", "NONE", "JSON", "BSON", "ENUM")


def _read_parquet(path: Path, max_row_kb: float | None = None, max_file_mb: float | None = None,
                  max_rows: int | None = None) -> Iterator[tuple[int, Any]]:
    """The rows of a Parquet file, bounded before they are decoded.

    A few KB of Parquet can decompress to GBs (one long repeated value compresses to almost nothing, and a value in a
    column's dictionary is stored once for any number of rows), so the sizes are judged from the file's metadata
    first: more rows than `max_rows`, or more data decompressed than `max_file_mb`, refuse the file; a row group
    whose rows average over `max_row_kb` is not read (its rows are row_too_large). The rest is read batch by batch,
    text columns as dictionaries, and each row is measured from the Arrow arrays (a dictionary value once per row
    that uses it) before a Python object is made of it: a row over the limit is row_too_large and never made, and
    the rows made add up to at most `max_file_mb`.
    """
    import numpy as np
    import pyarrow.parquet as pq

    try:
        metadata = pq.read_metadata(path)
        columns = [metadata.schema.column(i) for i in range(metadata.num_columns)]
        text_columns = [column.path for column in columns if column.physical_type == "BYTE_ARRAY"
                        and column.logical_type.type in TEXT_LOGICAL_TYPES]
        parquet = pq.ParquetFile(path, read_dictionary=text_columns)
    except Exception as err:  # pyarrow raises several unrelated types for damaged files
        raise DataSourceError(f"{path.name}: not a readable Parquet file ({err}).") from None
    if max_rows is not None and metadata.num_rows > max_rows:
        raise DataSourceError(Message(f"{path.name}: more than {max_rows:,} rows, the limit ", *ROWS_LIMIT,
                                      f": it holds {metadata.num_rows:,}; train on a sample, or raise the limit."))
    groups = [metadata.row_group(i) for i in range(metadata.num_row_groups)]
    # Decompressed size per row group, less what Parquet itself adds per column (page headers, a dictionary page's,
    # levels); a column of many values is at least a byte per value whatever its pages say.
    sizes = [sum(max(chunk.total_uncompressed_size - PARQUET_COLUMN_OVERHEAD, chunk.num_values, 0)
                 for chunk in map(group.column, range(group.num_columns))) for group in groups]
    file_limit = None if max_file_mb is None else max_file_mb * 2**20
    if file_limit is not None and sum(sizes) > file_limit:
        raise DataSourceError(Message(f"{path.name}: {sum(sizes) / 2**20:,.1f} MB of data once decompressed, over the "
                                      f"limit of {max_file_mb:,g} MB ", *OVER_FILE_LIMIT))
    limit = _row_bytes(max_row_kb)
    row, made = 0, 0
    try:
        for index, (group, size) in enumerate(zip(groups, sizes)):
            if group.num_rows and limit is not None and size / group.num_rows > limit:
                first = row + 1
                for row in range(first, first + group.num_rows):
                    yield row, _group_too_large(row, first, group.num_rows, size, max_row_kb)
                continue
            batch_size = max(1, min(PARQUET_BATCH_ROWS, PARQUET_BATCH_BYTES * group.num_rows // max(size, 1)))
            for batch in parquet.iter_batches(batch_size=batch_size, row_groups=[index]):
                if limit is None:
                    over, row_sizes = [False] * batch.num_rows, None
                else:
                    row_sizes = sum((_value_sizes(column) for column in batch.columns),
                                    np.zeros(batch.num_rows, np.int64))
                    made += int(row_sizes[row_sizes <= limit].sum())
                    over = (row_sizes > limit).tolist()
                    if file_limit is not None and made > file_limit:
                        raise DataSourceError(Message(
                            f"{path.name}: its rows add up to more than {max_file_mb:,g} MB once read (a value "
                            "stored once in the file's dictionary counts for every row that uses it), over the "
                            "limit ", *OVER_FILE_LIMIT))
                # Rows made one by one when some are too large (slices, not RecordBatch.filter: that imports
                # pyarrow.compute, ~40 MB of memory in each process that reads).
                records = iter(batch.to_pylist()) if not any(over) else None
                for position, too_large in enumerate(over):
                    row += 1
                    if too_large:
                        yield row, _row_too_large(row, int(row_sizes[position]), max_row_kb)
                    else:
                        yield row, next(records) if records else batch.slice(position, 1).to_pylist()[0]
    except DataSourceError:
        raise
    except Exception as err:  # a damaged row group
        raise DataSourceError(f"{path.name}: could not read the Parquet file after row {row} ({err}).") from None


def _group_too_large(row: int, first: int, rows: int, size: int, max_row_kb: float) -> Problem:
    if rows == 1:
        return _row_too_large(row, size, max_row_kb)
    last = first + rows - 1
    return Problem(row, "row_too_large", Message(f"row {row} is in a Parquet row group (rows {first:,} to {last:,}) "
                                                 f"of {_size_shown(size)} decompressed, {_size_shown(size / rows)} per "
                                                 f"row on average, over the limit of {max_row_kb:,g} KB per row ",
                                                 *ROW_LIMIT, "; the group was not read: split its large rows or raise "
                                                 "the limit."))


def _value_sizes(array: Any) -> Any:
    """Per value of an Arrow array, the least its compact JSON can take in bytes, from the Arrow buffers alone (no
    Python objects are made): text and bytes by their length, a dictionary's values by their indices (once per value
    that uses them), lists and structs as the sum of their parts, a null as 0, anything else as 1. A numpy array.

    Read from the buffers rather than with pyarrow.compute: importing that takes ~40 MB in each process that reads."""
    import numpy as np
    import pyarrow as pa

    kind, count = array.type, len(array)
    if isinstance(array, pa.ExtensionArray):
        return _value_sizes(array.storage)
    if pa.types.is_null(kind):
        return np.zeros(count, np.int64)
    if pa.types.is_dictionary(kind):
        values = _value_sizes(array.dictionary)
        indices = _buffer_numbers(array.indices, array.indices.type.to_pandas_dtype(), count)
        sizes = values[np.clip(indices, 0, len(values) - 1)] if len(values) else np.zeros(count, np.int64)
    elif pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind) \
            or pa.types.is_large_binary(kind):
        wide = pa.types.is_large_string(kind) or pa.types.is_large_binary(kind)
        sizes = np.diff(_buffer_numbers(array, np.int64 if wide else np.int32, count + 1)).astype(np.int64)
    elif pa.types.is_fixed_size_binary(kind):
        sizes = np.full(count, kind.byte_width, np.int64)
    elif pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_map(kind):
        offsets = _buffer_numbers(array, np.int64 if pa.types.is_large_list(kind) else np.int32, count + 1)
        total = np.concatenate(([0], np.cumsum(_value_sizes(array.values))))
        sizes = total[offsets[1:]] - total[offsets[:-1]]
    elif pa.types.is_fixed_size_list(kind):
        width = kind.list_size
        parts = _value_sizes(array.values.slice(array.offset * width, count * width))
        sizes = parts.reshape(count, width).sum(axis=1) if width else np.zeros(count, np.int64)
    elif pa.types.is_struct(kind):
        sizes = sum((_value_sizes(array.field(i)) for i in range(kind.num_fields)), np.zeros(count, np.int64))
    else:
        sizes = np.ones(count, np.int64)
    bitmap = array.buffers()[0]
    if array.null_count == 0 or bitmap is None:
        return sizes
    valid = np.unpackbits(np.frombuffer(bitmap, np.uint8), bitorder="little")[array.offset:array.offset + count]
    return np.where(valid.astype(bool), sizes, 0)


def _buffer_numbers(array: Any, dtype: Any, count: int) -> Any:
    """The first `count` numbers of an array's second buffer (its offsets, or a dictionary's indices), from its own
    offset on: zero-copy."""
    import numpy as np

    return np.frombuffer(array.buffers()[1], dtype)[array.offset:array.offset + count]


def _read_dataset_folder(path: Path, split: str) -> Iterator[tuple[int, Any]]:
    import datasets

    try:
        if (path / "dataset_info.json").exists() or (path / "state.json").exists() or (path / "dataset_dict.json").exists():
            dataset = datasets.load_from_disk(str(path))
            if isinstance(dataset, datasets.DatasetDict):
                dataset = _pick_split(dataset, split, str(path))
        else:
            ignored = _other_files(path)
            dataset = datasets.load_dataset(str(path), split=split)
            if ignored:
                yield None, Problem(None, "ignored_files", f"{path.name}: {len(ignored):,} file(s) of another "
                                       f"format were not read: {', '.join(ignored[:5])}"
                                       f"{', …' if len(ignored) > 5 else ''}; convert them to the folder's format, "
                                       "or point at one file.")
    except DataSourceError:
        raise
    except Exception as err:
        raise DataSourceError(
            f"{path}: could not read it as a dataset folder ({err}). Point at one data file instead."
        ) from None
    yield from enumerate(dataset, start=1)


# What the datasets library reads in a plain folder (one format: the most common of these); other files are named.
FOLDER_DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt", ".tsv", ".arrow")
NOT_DATA = re.compile(r"^(readme|license|licence|changelog)(\.|$)|\.(md|gitattributes|lock)$", re.IGNORECASE)


def _other_files(folder: Path) -> list[str]:
    files = [f for f in sorted(folder.rglob("*")) if f.is_file()
             and not any(part.startswith(".") for part in f.relative_to(folder).parts) and not NOT_DATA.search(f.name)]
    suffixes = Counter(f.suffix.lower() for f in files if f.suffix.lower() in FOLDER_DATA_SUFFIXES)
    if not suffixes:
        return []
    read = suffixes.most_common(1)[0][0]
    return [str(f.relative_to(folder)) for f in files if f.suffix.lower() != read]


def _pick_split(dataset_dict: Any, split: str, name: str) -> Any:
    if split not in dataset_dict:
        raise DataSourceError(f"{name}: has no split {split!r}; it has {', '.join(dataset_dict)}.")
    return dataset_dict[split]


def _read_hub_dataset(dataset_id: str, config: str | None, split: str,
                      max_rows: int | None = None) -> Iterator[tuple[int | None, Any]]:
    """The dataset streamed row by row (nothing is downloaded whole), stopping after `max_rows` rows with a
    warning: the report starts from the first rows, whatever the dataset's size."""
    import datasets

    def failed(err: Exception) -> DataSourceError:
        if hub.unreachable(err):
            return DataSourceError(
                f"Could not reach the Hugging Face Hub to load the dataset {dataset_id!r}: {UNREACHABLE}. "
                "Check the network connection and try again, or download the data and use the file instead.")
        return DataSourceError(
            f"Could not load the Hub dataset {dataset_id!r} (config {config or 'default'}, split {split!r}): {err}. "
            "Check the id, config and split on its Hub page; for a gated dataset accept its terms and log in.")

    if not hub.reachable():  # a stream cannot come from the cache: refused at once, not after 24 s of retries
        raise failed(ConnectionError("no answer from the Hub"))
    try:
        rows = iter(datasets.load_dataset(dataset_id, name=config, split=split, streaming=True))
    except Exception as err:
        raise failed(err) from None
    row = 0
    while True:
        try:
            record = next(rows)
        except StopIteration:
            return
        except Exception as err:  # streaming reads as it goes: a dropped connection surfaces here
            raise failed(err) from None
        row += 1
        if max_rows is not None and row > max_rows:
            yield None, Problem(None, "rows_not_read", Message(
                f"{dataset_id}: only its first {max_rows:,} rows were read (max_rows",
                Setting("max_rows", after_its_name=True), "); the rest of the dataset is not checked or trained on."))
            return
        yield row, record


# One short request answers "is the Hub there, and is this dataset on it" before `datasets` is asked: offline,
# `datasets` retries for about 25 s before it gives up, and a page waiting that long looks broken.
HUB_LOOKUP_TIMEOUT = 5.0


@dataclass
class HubChoices:
    """A Hub dataset's configs, and the splits of one of them (`config`), as the Hub lists them."""

    dataset_id: str
    configs: list[str]
    config: str
    splits: list[str]


def hub_dataset_choices(dataset_id: str, config: str | None = None,
                        timeout: float = HUB_LOOKUP_TIMEOUT) -> HubChoices:
    """The configs of the Hub dataset `dataset_id` and the splits of `config` (of its first config when `config`
    is not one of them). `dataset_id` must already be a checked Hub id (`access.hub_id`): `datasets` reads a
    local folder of the same name first. A DataSourceError says what to do when the Hub does not answer."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if not hub.is_repo_id(dataset_id):
        raise DataSourceError(f"{dataset_id!r} is not a Hub dataset id; write it as owner/name.")
    type_them = "Type the config and split yourself; they are checked when the data is read."
    try:
        info = HfApi().dataset_info(dataset_id, timeout=timeout)
    except GatedRepoError:
        raise DataSourceError(_gated(dataset_id)) from None
    except RepositoryNotFoundError:
        raise DataSourceError(f"The Hub has no dataset {dataset_id!r} (or it is private to its owner): check the "
                              "id on the dataset's Hub page.") from None
    except Exception as err:  # offline mode, no network, a timeout, a Hub error: all "no answer" to the visitor
        raise DataSourceError(f"{_no_answer(dataset_id, err)} {type_them}") from None
    import datasets

    try:
        configs = [str(name) for name in datasets.get_dataset_config_names(dataset_id)]
        chosen = config if config in configs else configs[0]
        splits = [str(name) for name in datasets.get_dataset_split_names(dataset_id, chosen)]
    except Exception as err:
        if getattr(info, "gated", False):
            raise DataSourceError(_gated(dataset_id)) from None
        raise DataSourceError(f"{_no_answer(dataset_id, err)} {type_them}") from None
    return HubChoices(dataset_id, configs, chosen, splits)


UNREACHABLE = "the network or the Hub did not answer (offline, or the Hub's address could not be found)"


def _no_answer(dataset_id: str, err: Exception) -> str:
    if hub.unreachable(err):
        return f"Could not reach the Hugging Face Hub for {dataset_id!r}: {UNREACHABLE}."
    return f"The Hub did not list the configs and splits of {dataset_id!r} ({type(err).__name__}: {err})."


def _gated(dataset_id: str) -> str:
    return (f"{dataset_id} is gated: accept its terms on https://huggingface.co/datasets/{dataset_id} and log in "
            "(HF_TOKEN) to read it.")


def load_data(
    source: str,
    columns: str | ColumnMapping | None = None,
    hub_config: str | None = None,
    hub_split: str = "train",
    max_rows: int | None = None,
    max_file_mb: float | None = None,
    max_row_kb: float | None = DataSettings.max_row_kb,
    max_messages: int | None = DataSettings.max_messages,
    on_progress: Callable[[int, int | None], None] | None = None,
) -> LoadedData:
    """Read a source and normalise every row; rows that cannot be read become problems, never exceptions.

    Reading stops at `max_rows` (and a file over `max_file_mb` is not read), so memory stays bounded; a Hub
    dataset is streamed and its first `max_rows` rows are read (a warning says so). A row over `max_row_kb` is
    reported unparsed, and a row of more than `max_messages` messages is reported before anything renders it:
    the cost of checking a row is bounded too. These two default to the settings' defaults, as one upload must
    not be able to exhaust the Space whichever caller reads it. `on_progress(rows read, None)` is called every
    `formats.PROGRESS_EVERY` rows.
    """
    mapping = ColumnMapping.parse(columns) if isinstance(columns, str) or columns is None else columns
    records = read_records(source, hub_config, hub_split, max_file_mb, max_row_kb, max_rows=max_rows)
    return load_records(records, _display_name(source), mapping, max_rows, max_messages, on_progress)


def _display_name(source: str) -> str:
    path = Path(source)
    return path.name if path.exists() else source
