"""What a row means: the formats a row may be written in (OpenAI chat, ShareGPT, Alpaca, prompt/completion, plain
text, or any columns through an explicit mapping), which one a row is in, and the row normalised to chat messages.
`load_records` does this for a whole source's rows as data.py reads them, numbered, and judges the file as a whole
(its majority format, rows in another, columns no format reads).

This module only reshapes; judging the result (roles, content, length, ...) is `checks.py`'s job, so a
row with a misspelled role is carried through as it is and reported there. It never reads a file.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .errors import DataSourceError, Message, Setting
from .settings import DataSettings

OPENAI = "openai"
SHAREGPT = "sharegpt"
ALPACA = "alpaca"
PROMPT_COMPLETION = "prompt_completion"
TEXT = "text"
MAPPED = "mapped"

FORMAT_NAMES = {
    OPENAI: "OpenAI chat (messages)",
    SHAREGPT: "ShareGPT (conversations)",
    ALPACA: "Alpaca (instruction/input/output)",
    PROMPT_COMPLETION: "prompt/completion",
    TEXT: "plain text",
    MAPPED: "mapped columns",
}

# ShareGPT speakers as seen in the wild, mapped to chat roles. Anything else is kept as written so that
# the report can point at it.
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "system": "system",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
}
# Roles as other tools and people write them, for the checks' "did you mean" (data keeps roles as written).
ROLE_ALIASES = {
    "human": "user", "person": "user", "customer": "user",
    "bot": "assistant", "ai": "assistant", "gpt": "assistant", "chatgpt": "assistant", "chatbot": "assistant",
    "model": "assistant", "agent": "assistant",
    "developer": "system",
}


@dataclass
class ColumnMapping:
    """Which columns hold what, for files whose format is not recognised.

    Either `messages` (a list of chat turns), or `text`, or `prompt` + `response` (+ optional `system`).
    """

    messages: str | None = None
    text: str | None = None
    prompt: str | None = None
    response: str | None = None
    system: str | None = None

    @classmethod
    def parse(cls, spec: str | None) -> ColumnMapping | None:
        """Parse "prompt=question,response=answer" into a mapping; None or "" means no mapping."""
        if not spec or not spec.strip():
            return None
        mapping = cls()
        for part in spec.split(","):
            key, sep, column = part.partition("=")
            key, column = key.strip(), column.strip()
            if not sep or not column or key not in cls.__dataclass_fields__:
                raise DataSourceError(
                    f"Column mapping {spec!r}: {part.strip()!r} is not of the form FIELD=COLUMN with FIELD one of "
                    f"{', '.join(cls.__dataclass_fields__)} (for example 'prompt=question,response=answer')."
                )
            setattr(mapping, key, column)
        if not (mapping.messages or mapping.text or (mapping.prompt and mapping.response)):
            raise DataSourceError(
                f"Column mapping {spec!r} names no conversation: map 'messages', or 'text', "
                "or both 'prompt' and 'response'."
            )
        return mapping

    def columns(self) -> list[str]:
        return [c for c in (self.messages, self.text, self.prompt, self.response, self.system) if c]


@dataclass
class Problem:
    """A problem with one row, or (`row` None) with the whole source, named by its code (`checks.PROBLEM_CODES`
    explains each). Found while reading and reshaping here, and while checking in checks.py."""

    row: int | None
    code: str
    message: str  # an errors.Message where it names a setting


# The limit on rows as a refusal names it, the setting in each skin's words (errors.Setting): on the command line
# "(the max_rows setting, --max-rows)".
ROWS_LIMIT = ("(the max_rows setting", Setting("max_rows", after_its_name=True), ")")
# Problems reading finds that leave the rows valid: what of the source was left out or ignored, never silently.
READING_WARNINGS = frozenset({"trailing_data", "ignored_files", "rows_not_read", "ignored_column", "one_json_object"})


@dataclass(slots=True)
class Example:
    """One normalised row: chat `messages` (OpenAI style), or `text` for language-model data. Slotted: a large
    dataset holds one per row."""

    row: int
    format: str
    messages: list[dict[str, Any]] | None = None
    text: str | None = None
    # A plain text split at the maximum length (see checks.py) is several examples; only the last ends the document
    # (gets the end-of-sequence token).
    ends_document: bool = True
    # The example's `render.Tokens`, when the check kept them for training (see checks.build_report).
    tokens: Any = field(default=None, compare=False, repr=False)


@dataclass
class LoadedData:
    """Everything read from a source: the normalised examples and the rows that could not be read."""

    source: str
    format: str
    rows: int
    examples: list[Example] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)


# Which keys each format reads; any other column is reported once per file (ignored_column), never dropped silently.
USED_COLUMNS = {
    OPENAI: {"messages"},
    SHAREGPT: {"conversations", "system"},
    ALPACA: {"instruction", "input", "output", "system", "history"},
    PROMPT_COMPLETION: {"prompt", "completion", "response"},
    TEXT: {"text"},
}
# ShareGPT turns: what a turn may carry besides its speaker and text.
SHAREGPT_TURN_KEYS = {"from", "value"}
# Per-message weights as other trainers write them (LLaMA-Factory's loss_weight, "train" flags): 0 or 1, as
# numbers, floats or booleans. Read into our own `weight` (0 = context only).
WEIGHT_KEYS = ("weight", "loss_weight", "train")
# Keys of a content part that hold its text: OpenAI's "text", LLaMA-Factory's newer "value", and "content".
PART_TEXT_KEYS = ("text", "value", "content")


class RowError(Exception):
    """A row whose shape cannot be read: becomes a per-row error with this code and detail."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code, self.detail = code, detail


def type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def shown(value: Any, limit: int = 60) -> str:
    """A short repr for messages, whatever the value: a 10,000-digit int has no repr in Python 3.11."""
    try:
        text = repr(value)
    except (ValueError, RecursionError):
        text = f"a {type_name(value)}"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def detect_row_format(record: dict[str, Any]) -> str | None:
    """The format one record is written in, judged by its keys; None when nothing matches."""
    if "messages" in record:
        return OPENAI
    if "conversations" in record:
        turns = record["conversations"]
        if isinstance(turns, list) and turns and isinstance(turns[0], dict) and "role" in turns[0]:
            return OPENAI  # OpenAI-style turns stored under ShareGPT's key, common on the Hub
        return SHAREGPT
    if "instruction" in record and "output" in record:
        return ALPACA
    if "prompt" in record and ("completion" in record or "response" in record):
        return PROMPT_COMPLETION
    if "text" in record:
        return TEXT
    return None


def used_columns(record: dict[str, Any], row_format: str, mapping: ColumnMapping | None = None) -> set[str]:
    if row_format == MAPPED:
        return set(mapping.columns()) if mapping else set()
    if row_format == OPENAI:
        return {"messages"} if "messages" in record else {"conversations"}
    if row_format == PROMPT_COMPLETION:
        return {"prompt", "completion" if "completion" in record else "response"}
    return USED_COLUMNS[row_format]


def normalise(record: dict[str, Any], row_format: str, mapping: ColumnMapping | None = None) -> Example:
    """Reshape one record into an Example.

    A record whose shape cannot be read (a value of a type its place does not allow, a mapped column it lacks)
    raises RowError, a per-row error; values the checks judge (roles, contents, weights) are carried through as
    written.
    """
    if row_format == OPENAI:
        messages = record.get("messages", record.get("conversations"))
        return Example(0, OPENAI, messages=_openai_messages(messages))
    if row_format == SHAREGPT:
        messages = _sharegpt_messages(record.get("conversations"))
        return Example(0, SHAREGPT, messages=_with_system(record.get("system"), messages, "'system'"))
    if row_format == ALPACA:
        return Example(0, ALPACA, messages=_alpaca_messages(record))
    if row_format == PROMPT_COMPLETION:
        reply = record["completion"] if "completion" in record else record["response"]
        return Example(0, PROMPT_COMPLETION, messages=_prompt_completion_messages(record["prompt"], reply))
    if row_format == TEXT:
        return Example(0, TEXT, text=record["text"])
    if row_format == MAPPED and mapping is not None:
        missing = [c for c in mapping.columns() if c not in record]
        if missing:
            raise RowError("unknown_format", f"has no column {', '.join(map(repr, missing))} named in the column "
                                             f"mapping (it has {', '.join(map(shown, record))})")
        if mapping.messages:
            turns = record[mapping.messages]
            if isinstance(turns, list) and turns and isinstance(turns[0], dict) and "from" in turns[0]:
                return Example(0, MAPPED, messages=_sharegpt_messages(turns))
            return Example(0, MAPPED, messages=_openai_messages(turns))
        if mapping.text:
            return Example(0, MAPPED, text=record[mapping.text])
        messages = [{"role": "user", "content": record[mapping.prompt]},
                    {"role": "assistant", "content": record[mapping.response]}]
        system = record[mapping.system] if mapping.system else None
        return Example(0, MAPPED, messages=_with_system(system, messages, repr(mapping.system)))
    raise ValueError(f"unknown format {row_format!r}")


def _with_system(system: Any, messages: Any, name: str) -> Any:
    """A system column prepended as the first message; empty means none."""
    if system is None or (isinstance(system, str) and not system.strip()):
        return messages
    if not isinstance(system, str):
        raise RowError("non_string_content", f"{name} is a {type_name(system)}, not text; write it as a string")
    return [{"role": "system", "content": system}] + messages if isinstance(messages, list) else messages


def _joined_parts(content: Any) -> Any:
    """A list of text parts (OpenAI's {"type": "text", "text": ...}, LLaMA-Factory's {"type": "text", "value": ...})
    becomes one string; anything else is kept as written for the checks to name."""
    if not isinstance(content, list) or not content:
        return content
    texts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type", "text") != "text":
            return content
        text = [part[key] for key in PART_TEXT_KEYS if isinstance(part.get(key), str)]
        if len(text) != 1:
            return content
        texts.append(text[0])
    return "".join(texts)


def _weighted(message: dict[str, Any]) -> dict[str, Any]:
    """The message with its weight, under any of WEIGHT_KEYS, read as our 0/1 `weight`; a value that is not 0/1
    (in any of its spellings) is left under its own key for the checks to report."""
    present = [key for key in WEIGHT_KEYS if key in message]
    if not present:
        return message
    value = message[present[0]]
    if len(present) == 1 and type(value) in (bool, int, float) and value in (0, 1):
        message = {k: v for k, v in message.items() if k != present[0]}
        message["weight"] = int(value)
    return message


def _openai_messages(messages: Any) -> Any:
    """Text-part lists become one string, weights are read; everything else is kept as written for the checks."""
    if not isinstance(messages, list):
        return messages
    result = []
    for message in messages:
        if isinstance(message, dict):
            message = _weighted(message)
            if type(message.get("role")) is str:
                # One "user" string for every row, not one per row (a large dataset holds every message).
                message["role"] = sys.intern(message["role"])
            if isinstance(message.get("content"), list):
                message = {**message, "content": _joined_parts(message["content"])}
        result.append(message)
    return result


def _sharegpt_messages(turns: Any) -> Any:
    if not isinstance(turns, list):
        return turns
    messages = []
    for turn in turns:
        if not isinstance(turn, dict):
            messages.append(turn)
            continue
        speaker = turn.get("from")
        role = SHAREGPT_ROLES.get(speaker.lower(), speaker) if isinstance(speaker, str) else speaker
        message = {"role": role, "content": _joined_parts(turn.get("value"))}
        message.update({key: turn[key] for key in WEIGHT_KEYS if key in turn})
        messages.append(_weighted(message))
    return messages


def _text_field(record: dict[str, Any], key: str) -> Any:
    """An optional text column: None, or text; another type is an error rather than silently left out."""
    value = record.get(key)
    if value is not None and not isinstance(value, str):
        raise RowError("non_string_content", f"{key!r} is a {type_name(value)}, not text; write it as a string")
    return value


def _alpaca_messages(record: dict[str, Any]) -> list[dict[str, Any]]:
    instruction, extra = record.get("instruction"), _text_field(record, "input")
    prompt = instruction
    if isinstance(instruction, str) and extra and extra.strip():
        prompt = f"{instruction}\n\n{extra}"
    messages: list[dict[str, Any]] = _with_system(_text_field(record, "system"), [], "'system'")
    # LLaMA-Factory's Alpaca variant carries earlier turns as [[question, answer], ...].
    history = record.get("history")
    if history is not None and not isinstance(history, list):
        raise RowError("wrong_type", f"'history' is a {type_name(history)}; write it as a list of "
                                     "[question, answer] pairs")
    for index, pair in enumerate(history or [], start=1):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise RowError("wrong_type", f"'history' item {index} is {shown(pair, 40)}, not a [question, answer] "
                                         "pair; fix or remove it")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": record.get("output")}]
    return messages


def _prompt_completion_messages(prompt: Any, completion: Any) -> Any:
    """Strings become a user/assistant pair; message lists (TRL's conversational form) are joined."""
    if isinstance(prompt, list) or isinstance(completion, list):
        prompt_turns = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        completion_turns = completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
        return _openai_messages(prompt_turns + completion_turns)
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]


PROGRESS_EVERY = 5000


def load_records(records: Iterable[tuple[int | None, Any]], name: str, mapping: ColumnMapping | None = None,
                 max_rows: int | None = None, max_messages: int | None = DataSettings.max_messages,
                 on_progress: Callable[[int, int | None], None] | None = None) -> LoadedData:
    """Normalise (row number, record) pairs as `data.read_records` gives them; see `data.load_data`.

    Each record is reshaped as it arrives and only its normalised form is kept (memory stays near the size of the
    data); whether a row is in the file's majority format is judged once every row has been seen.
    """
    seen: list[tuple[int, str | None, Any]] = []  # (row, its format, Example | RowError | its keys)
    problems: list[Problem] = []
    warnings: list[Problem] = []
    ignored: dict[tuple[str, str], list[int]] = {}  # (format, column) -> [rows that have it, the first row]
    unknown_keys: set[str] = set()
    unknown_seen = 0
    counts: Counter[str] = Counter()
    row_count = 0
    for row, record in records:
        if isinstance(record, Problem) and record.code in READING_WARNINGS:
            warnings.append(record)
            continue
        row_count += 1
        if max_rows is not None and row_count > max_rows:
            raise DataSourceError(Message(f"{name}: more than {max_rows:,} rows, the limit ", *ROWS_LIMIT,
                                          "; train on a sample, or raise the limit."))
        if on_progress is not None and row_count % PROGRESS_EVERY == 0:
            on_progress(row_count, None)
        if isinstance(record, Problem):
            problems.append(record)
            continue
        if not isinstance(record, dict):
            problems.append(Problem(
                row, "not_an_object",
                f"row {row}: is a JSON {type(record).__name__}, not an object; each row must be an object such as "
                '{"messages": [...]}.',
            ))
            continue
        row_format = MAPPED if mapping else detect_row_format(record)
        if row_format is None:
            if unknown_seen < 50:
                unknown_keys.update(map(str, record))
            unknown_seen += 1
            seen.append((row, None, list(map(shown, record))))
            continue
        counts[row_format] += 1
        _count_ignored(record, row_format, mapping, row, ignored)
        try:
            result: Any = normalise(record, row_format, mapping)
        except RowError as err:
            result = err
        seen.append((row, row_format, result))
    if row_count == 0:
        raise DataSourceError(f"{name}: contains no rows.")
    if not counts and seen:
        raise DataSourceError(Message(
            f"{name}: could not recognise the format from the columns {', '.join(map(repr, sorted(unknown_keys)))}. "
            "Expected 'messages' (OpenAI chat), 'conversations' (ShareGPT), 'instruction'+'output' (Alpaca), "
            "'prompt'+'completion' (or 'response'), or 'text'. Map your columns, e.g. ",
            Setting("columns", "prompt=question,response=answer"), "."
        ))
    file_format = counts.most_common(1)[0][0] if counts else OPENAI

    examples = []
    for row, row_format, result in seen:
        if row_format is None:
            problems.append(Problem(
                row, "unknown_format",
                f"row {row}: its keys {', '.join(result) or '(none)'} match no known format while the file is "
                f"{FORMAT_NAMES[file_format]}; rewrite the row in that format or remove it.",
            ))
        elif row_format != file_format:
            problems.append(Problem(
                row, "mixed_formats",
                f"row {row}: is {FORMAT_NAMES[row_format]} but most of the file is {FORMAT_NAMES[file_format]}; "
                "convert it so the whole file uses one format, or skip it.",
            ))
        elif isinstance(result, RowError):
            problems.append(Problem(row, result.code, f"row {row}: {result.detail}."))
        elif max_messages is not None and isinstance(result.messages, list) and len(result.messages) > max_messages:
            problems.append(Problem(
                row, "too_many_messages",
                Message(f"row {row} has {len(result.messages):,} messages, over the limit of {max_messages:,} per row "
                        "(max_messages", Setting("max_messages", after_its_name=True),
                        "); split the conversation or raise the limit."),
            ))
        else:
            result.row = row
            examples.append(result)
    warnings += _ignored_warnings(ignored, file_format)
    problems.sort(key=lambda p: p.row or 0)
    return LoadedData(name, file_format, row_count, examples, problems, warnings)


# Columns (and turn fields) not read are named one warning each up to IGNORED_SHOWN; more are one warning that names
# the first few and counts the rest (a file whose rows carry a million distinct keys made a report of 179 MB), and
# past IGNORED_KEPT distinct names the rest are not even counted.
IGNORED_SHOWN = 5
IGNORED_KEPT = 10_000


def _ignored_warnings(ignored: dict[tuple[str, str], list[int]], file_format: str) -> list[Problem]:
    names = sorted(((column, n, first) for (row_format, column), (n, first) in ignored.items()
                    if row_format == file_format), key=lambda item: item[2])
    format_name = FORMAT_NAMES[file_format]
    if len(names) <= IGNORED_SHOWN:
        return [Problem(None, "ignored_column", Message(f"{column} is not read in the {format_name} format and was "
                                                        f"ignored ({n:,} row(s), the first row {first}); remove it, or "
                                                        "map your columns (", Setting("columns"),
                                                        ") if it holds the data."))
                for column, n, first in names]
    counted = f"{len(names):,} or more" if len(ignored) >= IGNORED_KEPT else f"{len(names):,}"
    shown_names = ", ".join(f"{column} ({n:,} row(s), the first row {first})"
                            for column, n, first in names[:IGNORED_SHOWN])
    return [Problem(None, "ignored_column", Message(f"{counted} columns or turn fields are not read in the "
                                                    f"{format_name} format and were ignored, among them {shown_names}; "
                                                    "remove them, or map your columns (", Setting("columns"),
                                                    ") if one of them holds the data."))]


def _count_ignored(record: dict[str, Any], row_format: str, mapping: ColumnMapping | None, row: int,
                   ignored: dict[tuple[str, str], list[int]]) -> None:
    """Count the columns (and ShareGPT turn fields) that this row's format does not read (up to IGNORED_KEPT
    distinct names)."""
    used = used_columns(record, row_format, mapping)
    names = [f"column {shown(key)}" for key in record if key not in used]
    if row_format == SHAREGPT and isinstance(record.get("conversations"), list):
        fields = {key for turn in record["conversations"] if isinstance(turn, dict) for key in turn}
        names += [f"turn field {shown(key)}" for key in fields if key not in SHAREGPT_TURN_KEYS
                  and key not in WEIGHT_KEYS]
    for name in names:
        entry = ignored.get((row_format, name))
        if entry is None:
            if len(ignored) >= IGNORED_KEPT:
                continue
            entry = ignored[(row_format, name)] = [0, row]
        entry[0] += 1
