"""Judge every row before any GPU time is spent: per-row problems with codes and fixes, and statistics.

Each problem names the row (see `data.py` for how rows are numbered), a stable code from PROBLEM_CODES,
and a message that says how to fix it. A row with an error is invalid: it is never trained on silently;
the user sees it and chooses to skip it. Warnings do not invalidate a row.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from . import data, formats, isolation
from .errors import Setting
from .formats import Problem
from .render import Rendered, Renderer, TemplateError, Tokens, render_chat, render_example

ROLES = ("system", "user", "assistant", "tool")
FEW_EXAMPLES = 10

# Every code the report can carry, with what it means. Tests cover each one with a file that triggers it.
PROBLEM_CODES = {
    # errors: the row is not trained on
    "unreadable_row": "the row is not valid JSON, not valid UTF-8, or a ragged CSV line",
    "row_too_large": "the row is over the size limit per row (max_row_kb); it is not parsed",
    "too_many_messages": "the row has more messages than the limit per row (max_messages); it is not rendered",
    "not_an_object": "the row is a JSON value other than an object",
    "unknown_format": "the row's keys match no known format (and no column mapping covers it)",
    "mixed_formats": "the row is in another format than most of the file",
    "no_messages": "there is no list of messages",
    "empty_messages": "the list of messages is empty",
    "message_not_an_object": "a message is not an object with role and content",
    "unknown_role": "a message's role is not system, user, assistant or tool",
    "missing_content": "a message has no content",
    "empty_content": "a message's content is empty or only whitespace",
    "non_string_content": "a message's content is not text (a number, an image part, ...)",
    "invalid_text": "the text holds a character that is not valid Unicode (a lone surrogate escape such as \\ud800)",
    "wrong_type": "a field holds a value of a type its place does not allow (e.g. 'history' that is not a list of "
    "[question, answer] pairs)",
    "invalid_weight": "a weight (weight, loss_weight or train) other than 0 or 1 (as a number, a float or a boolean), "
    "or 1 on a message that is not the assistant's",
    "tool_turn_unsupported": "a tool turn, and the model's chat template cannot show tool turns",
    "system_not_first": "a system message after the first message",
    "no_assistant_turn": "no assistant message, so nothing to learn",
    "last_turn_not_assistant": "the conversation ends with a turn that is not the assistant's",
    "roles_not_alternating": "two user or two assistant turns in a row with no tool turn between (an error when "
    "the template requires alternation, a warning otherwise)",
    "template_error": "the model's chat template cannot render the conversation",
    "too_long": "longer than the maximum length in the model's tokens",
    "nothing_to_train": "zero tokens would be trained (e.g. every assistant turn has weight 0)",
    "unusable_source": "the source as a whole cannot be used (missing, unreadable, unrecognised); row is null",
    # warnings: worth knowing, the row is still trained on
    "few_examples": "fewer than 10 valid examples in the whole file",
    "all_tokens_trained": "plain text data: every token is trained, there is no assistant mask",
    "duplicate": "an exact copy of an earlier row; dropped before training unless keep_duplicates is set",
    "same_prompt_different_answers": "rows with the same prompt and different answers",
    "same_answer_many_prompts": "one answer given to many different prompts",
    "text_split": "plain text over the maximum length, split into chunks of the maximum length",
    "ignored_column": "a column (or ShareGPT turn field) the format does not read; it was ignored",
    "trailing_data": "data after the closing ']' of a JSON array; it was not read",
    "one_json_object": "a .json file holding one object: read as one row, or as the list of rows under the key named",
    "ignored_files": "files of another format in a dataset folder; they were not read",
    "rows_not_read": "a Hub dataset has more rows than max_rows; only the first max_rows were read",
    "control_token_in_text": "a message's text holds a control token of the model (e.g. <|im_end|>); it is trained "
    "as plain text, never as the token that ends or opens a turn",
}
WARNING_CODES = {"few_examples", "all_tokens_trained", "duplicate", "same_prompt_different_answers",
                 "same_answer_many_prompts", "text_split", "control_token_in_text", *formats.READING_WARNINGS}

# Rows with errors stop a run unless the person chooses to train on the valid ones: the app's checkbox, the command
# line's flag (DataSettings.skip_invalid_rows), each named in its own skin's words.
SKIP_INVALID_LABEL = "Skip invalid rows"
SKIP_IN_APP = f"tick {SKIP_INVALID_LABEL}"
SKIP_ON_COMMAND_LINE = "add " + Setting("skip_invalid_rows").flag


def invalid_rows_advice(valid_rows: int, skip: str = SKIP_IN_APP) -> str:
    """What to do about rows with errors, `skip` naming the skin's way to train on the `valid_rows` valid ones."""
    return f"Fix them in your file, or {skip} to train on the {valid_rows} valid ones."


@dataclass
class TemplateRules:
    """What the model's chat template accepts, found by rendering probes once per tokenizer."""

    requires_alternation: bool
    supports_tool_turns: bool

    @classmethod
    def probe(cls, tokenizer: Any) -> TemplateRules:
        def renders(messages: list[dict[str, str]], marker: str) -> bool:
            try:
                return marker in render_chat(tokenizer, messages)
            except TemplateError:
                return False

        user, assistant = {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}
        return cls(
            requires_alternation=not renders([user, {"role": "user", "content": "q2"}, assistant], "q2"),
            supports_tool_turns=renders(
                [user, assistant, {"role": "tool", "content": "TOOLPROBE"}, {"role": "assistant", "content": "b"}],
                "TOOLPROBE",
            ),
        )


def _distribution(values: list[int]) -> dict[str, float]:
    if not values:
        return {"min": 0, "p10": 0, "median": 0, "p90": 0, "max": 0}
    ordered = sorted(values)

    def percentile(q: float) -> int:
        return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]

    return {"min": ordered[0], "p10": percentile(0.1), "median": percentile(0.5), "p90": percentile(0.9), "max": ordered[-1]}


@dataclass
class Report:
    """The validation report: what the CLI prints, the app shows, and training trusts.

    `valid_examples` is what training uses: the valid rows, exact duplicates dropped (unless kept), long plain
    texts as their pieces. Counts per code are complete however many rows there are; `sample_rows` gives a few
    rows of one code for a view that cannot list tens of thousands.
    """

    source: str
    format: str
    rows: int
    max_length: int
    valid_examples: list[formats.Example] = field(default_factory=list)
    errors: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    # Per valid example, in order: (messages or 1 for text, tokens, trained tokens).
    token_counts: list[tuple[int, int, int]] = field(default_factory=list)
    rows_over_max_length: int = 0
    # Rows that passed every check (a split text counts once), counted as they pass: valid_examples may keep
    # only a preview of them.
    valid_row_count: int = 0
    duplicates_dropped: int = 0
    text_rows_split: int = 0
    # A first look at a streamed source's first rows, shown while the whole source is checked (see
    # check_data_in_stages); never what training uses.
    first_look: bool = False

    @classmethod
    def unusable(cls, source: str, message: str) -> Report:
        """The report of a source that cannot be used as a whole (missing, unreadable, unrecognised): no rows, one
        unusable_source error saying why. Its JSON has the shape of every report's, so a script reads a refusal
        where it reads a result."""
        return cls(source, None, 0, 0, errors=[Problem(None, "unusable_source", message)])

    @property
    def valid_rows(self) -> int:
        """Rows without errors: the rows trained on, and the duplicates of them dropped (a repeat is not broken)."""
        return self.valid_row_count + self.duplicates_dropped

    @property
    def invalid_rows(self) -> int:
        return len({p.row for p in self.errors if p.row is not None})

    def error_counts(self) -> dict[str, int]:
        return dict(Counter(problem.code for problem in self.errors))

    def problem_counts(self) -> dict[str, int]:
        """How many problems of each code, errors and warnings: complete, whatever the size of the data."""
        return dict(Counter(problem.code for problem in self.errors + self.warnings))

    def sample_rows(self, code: str, n: int = 5) -> list[Problem]:
        """Up to n problems of one code, spread evenly over the data (the first and the last included)."""
        found = [p for p in self.errors + self.warnings if p.code == code]
        if len(found) <= n:
            return found
        if n <= 1:
            return found[:max(n, 0)]
        return [found[round(i * (len(found) - 1) / (n - 1))] for i in range(n)]

    def stats(self) -> dict[str, Any]:
        turns = [t for t, _, _ in self.token_counts]
        tokens = [n for _, n, _ in self.token_counts]
        trained = [n for _, _, n in self.token_counts]
        return {
            "examples": len(self.token_counts),
            "turns_per_example": _distribution(turns),
            "tokens_per_example": _distribution(tokens),
            "trained_tokens_per_example": _distribution(trained),
            "rows_over_max_length": self.rows_over_max_length,
            "max_length": self.max_length,
            "total_tokens": sum(tokens),
            "total_trained_tokens": sum(trained),
            "duplicates_dropped": self.duplicates_dropped,
            "text_rows_split": self.text_rows_split,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "rows": self.rows,
            "valid_rows": self.valid_rows,
            "errors": [asdict(p) for p in self.errors],
            "warnings": [asdict(p) for p in self.warnings],
            "problem_counts": self.problem_counts(),
            "stats": self.stats(),
        }


# ---------------------------------------------------------------------------------------- structure


def _content_problem(row: int, where: str, message: dict[str, Any]) -> Problem | None:
    if "content" not in message or message["content"] is None:
        if message.get("role") == "assistant" and message.get("tool_calls"):
            return None  # a tool call carries no text; the template renders the call itself
        return Problem(row, "missing_content", f"row {row}, {where}: has no content; add the text or remove the message.")
    content = message["content"]
    if isinstance(content, list):
        # Text parts were joined when the data was read (formats._joined_parts); what is left here is not all text.
        kinds = sorted({_part_kind(p) for p in content}) or ["no"]
        return Problem(
            row, "non_string_content",
            f"row {row}, {where}: content is a list of {', '.join(kinds)} parts; SFT Space trains text-only "
            "models, so write the content as text (parts of type 'text' with their text under 'text', 'value' or "
            "'content' are joined; describe an image in words).",
        )
    if not isinstance(content, str):
        return Problem(
            row, "non_string_content",
            f"row {row}, {where}: content is a {formats.type_name(content)}, not text; write it as a string.",
        )
    if not content.strip():
        return Problem(row, "empty_content", f"row {row}, {where}: content is empty; write the text or remove the message.")
    return _invalid_text_problem(row, where, content)


def _part_kind(part: Any) -> str:
    if not isinstance(part, dict):
        return f"{formats.type_name(part)} (not an object)"
    kind = part.get("type", "text")
    if kind == "text":
        return "text (without one string under 'text', 'value' or 'content')"
    return str(kind) if isinstance(kind, str) else formats.shown(kind, 20)


def _invalid_text_problem(row: int, where: str, text: str) -> Problem | None:
    if text.isascii():
        return None  # no surrogate can hide in ASCII (and this skips encoding every text)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return Problem(row, "invalid_text", f"row {row}, {where}: character {err.start + 1} is not valid Unicode "
                                            f"({text[err.start]!r}, a lone surrogate escape); remove or fix it.")
    return None


def _weight_problem(row: int, where: str, message: dict[str, Any], role: Any) -> Problem | None:
    """Weights were read as our 0/1 `weight` when valid (formats._weighted); any weight key left is not 0/1."""
    present = [key for key in formats.WEIGHT_KEYS if key in message]
    if not present:
        return None
    if len(present) > 1:
        return Problem(row, "invalid_weight", f"row {row}, {where}: both {present[0]!r} and {present[1]!r}; give "
                       "one weight per message.")
    key, value = present[0], message[present[0]]
    if key != "weight" or type(value) not in (bool, int, float) or value not in (0, 1):
        return Problem(row, "invalid_weight", f"row {row}, {where}: {key} {formats.shown(value)} on a "
                       f"{formats.shown(role)} message; a weight is 0 or 1 (also 0.0/1.0 or false/true), 0 = shown "
                       "as context, not trained.")
    if value == 1 and role != "assistant":
        return Problem(row, "invalid_weight", f"row {row}, {where}: weight 1 on a {formats.shown(role)} message; only "
                       "assistant messages are trained, so put the weight on a reply.")
    return None


def structure_problems(row: int, messages: Any, rules: TemplateRules) -> tuple[list[Problem], list[Problem]]:
    """(errors, warnings) about the shape of one conversation, before any rendering."""
    if not isinstance(messages, list):
        return [Problem(row, "no_messages", f"row {row}: has no list of messages (found "
                        f"{formats.type_name(messages)}); "
                        'write it as "messages": [{"role": "user", "content": ...}, ...].')], []
    if not messages:
        return [Problem(row, "empty_messages", f"row {row}: the list of messages is empty; add the conversation or remove the row.")], []
    errors: list[Problem] = []
    warnings: list[Problem] = []
    for index, message in enumerate(messages, start=1):
        where = f"message {index}"
        if not isinstance(message, dict):
            errors.append(Problem(row, "message_not_an_object", f"row {row}, {where}: is a "
                                  f"{formats.type_name(message)}, "
                                  'not an object; write it as {"role": ..., "content": ...}.'))
            continue
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            alias = formats.ROLE_ALIASES.get(role.lower()) if isinstance(role, str) else None
            guess = [alias] if alias else difflib.get_close_matches(role.lower(), ROLES, n=1) if isinstance(role, str) else []
            hint = f"did you mean {guess[0]!r}?" if guess else f"use one of {', '.join(ROLES)}."
            errors.append(Problem(row, "unknown_role", f"row {row}, {where}: role {formats.shown(role)} is not one of "
                                  f"{', '.join(ROLES)}; {hint}"))
        content_problem = _content_problem(row, where, message)
        if content_problem:
            errors.append(content_problem)
        weight_problem = _weight_problem(row, where, message, role)
        if weight_problem:
            errors.append(weight_problem)
        if message.get("tool_calls") is not None and not (role == "assistant"
                                                           and isinstance(message["tool_calls"], list)):
            errors.append(Problem(row, "wrong_type", f"row {row}, {where}: tool_calls is a "
                                  f"{formats.type_name(message['tool_calls'])} on a {formats.shown(role)} message; "
                                  "tool calls are a list on an assistant message."))
        if role == "tool" and not rules.supports_tool_turns:
            errors.append(Problem(row, "tool_turn_unsupported", f"row {row}, {where}: a tool turn, but this model's "
                                  "chat template cannot show tool results; remove tool turns or pick a model with "
                                  "tool support."))
        if role == "system" and index > 1:
            errors.append(Problem(row, "system_not_first", f"row {row}, {where}: a system message must be the first "
                                  "message; move it to the start or merge it into the first one."))
    if errors:
        return errors, warnings
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        errors.append(Problem(row, "no_assistant_turn", f"row {row}: has no assistant message, so there is nothing "
                              "to learn; add the reply the model should give."))
    elif roles[-1] != "assistant":
        errors.append(Problem(row, "last_turn_not_assistant", f"row {row}: the last message is from the {roles[-1]}; "
                              "a training example must end with the assistant's reply (add it, or remove the "
                              "trailing turn)."))
    elif all(m.get("weight", 1) == 0 for m in messages if m["role"] == "assistant"):
        errors.append(Problem(row, "nothing_to_train", f"row {row}: every assistant message has weight 0, so no "
                              "token would be trained; set weight 1 on at least one reply."))
    # A tool turn sits between a call and the reply that uses its result (assistant -> tool -> assistant), so only
    # two user or two assistant turns directly after one another are out of order.
    turns = [r for r in roles if r != "system"]
    repeat = next((i for i in range(1, len(turns)) if turns[i] == turns[i - 1] and turns[i] != "tool"), None)
    starts_with_reply = bool(turns) and turns[0] == "assistant"
    if repeat is not None:
        what = f"two {turns[repeat]} turns in a row"
        if rules.requires_alternation:
            errors.append(Problem(row, "roles_not_alternating", f"row {row}: {what}, and this model's chat template "
                                  "requires user and assistant turns to alternate; merge or reorder the turns."))
        else:
            warnings.append(Problem(row, "roles_not_alternating", f"row {row}: {what}; this is allowed by the "
                                    "template but usually a data mistake (merge the turns if so)."))
    elif starts_with_reply and rules.requires_alternation:
        # A greeting before the user speaks is a real pattern; only a template that forbids it makes it an error.
        errors.append(Problem(row, "roles_not_alternating", f"row {row}: the conversation starts with the assistant, "
                              "and this model's chat template requires it to start with the user; add the user's "
                              "turn first."))
    return errors, warnings


def _text_problems(row: int, text: Any) -> list[Problem]:
    if not isinstance(text, str):
        return [Problem(row, "non_string_content", f"row {row}: 'text' is a {formats.type_name(text)}, not text; write it as a string.")]
    if not text.strip():
        return [Problem(row, "empty_content", f"row {row}: 'text' is empty; write the text or remove the row.")]
    invalid = _invalid_text_problem(row, "'text'", text)
    return [invalid] if invalid else []


# ------------------------------------------------------------------------------------------- report


BATCH_ROWS = 1024
MANY_PROMPTS = 5  # one answer given to this many different prompts is reported
LISTED_ROWS = 5


_DIGEST_BITS = (1 << 64) - 1


def _digest(value: Any) -> int | None:
    """A 64-bit fingerprint of a JSON-like value (rows are compared by it, not kept whole: a chance collision among
    a million rows is about 1 in 30 million); None if the value has none.

    Text, and messages whose every field is text (nearly every row), are fingerprinted with Python's own string
    hash, which each string caches (a JSON dump and a digest of every row was a tenth of the check's time); other
    values by a digest of their JSON. The two never meet: which one a value takes depends on the value alone."""
    if type(value) is str:
        return hash(("text", value)) & _DIGEST_BITS
    if type(value) is dict and all(type(v) is str for v in value.values()):
        return hash(("message", *sorted(value.items()))) & _DIGEST_BITS
    if type(value) is list and all(type(m) is dict and all(type(v) is str for v in m.values()) for m in value):
        return hash(("messages", *(tuple(sorted(m.items())) for m in value))) & _DIGEST_BITS
    try:
        text = json.dumps(value, sort_keys=True, ensure_ascii=False, default=repr)
    except (TypeError, ValueError, RecursionError):
        return None
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def _rows_named(rows: list[int], total: int) -> str:
    shown = ", ".join(map(str, rows[:LISTED_ROWS]))
    return shown + (f" and {total - LISTED_ROWS:,} more" if total > LISTED_ROWS else "")


class _Group:
    """Rows that share a prompt (or an answer): the first few rows, how many, and the distinct partners."""

    __slots__ = ("rows", "count", "partners", "words")

    def __init__(self, row: int, partner: int, words: str = "") -> None:
        self.rows, self.count, self.partners, self.words = [row], 1, {partner}, words

    def add(self, row: int, partner: int) -> None:
        self.count += 1
        self.partners.add(partner)
        if len(self.rows) < LISTED_ROWS:
            self.rows.append(row)


class _Repeats:
    """Exact duplicates, the same prompt with different answers, and one answer to many prompts, by fingerprint.

    Memory stays small per row: a row seen once is one int per map ((partner << 32) | row); only prompts and answers
    that repeat become a `_Group`.
    """

    def __init__(self) -> None:
        self.first_seen: dict[int, int] = {}
        self.prompts: dict[int, int | _Group] = {}
        self.answers: dict[int, int | _Group] = {}

    def duplicate_of(self, example: formats.Example) -> int | None:
        """The row this example repeats exactly, or None (and it is remembered)."""
        if example.messages is None:
            key = _digest(example.text)
            prompt = answer = None
        else:
            # The checks passed, so the last message is the assistant's: it stands for the answer.
            prompt, answer = _digest(example.messages[:-1]), _digest(example.messages[-1])
            key = hash((prompt, answer)) & _DIGEST_BITS if prompt is not None and answer is not None else None
        if key is None:
            return None
        if key in self.first_seen:
            return self.first_seen[key]
        self.first_seen[key] = example.row
        if prompt is not None and answer is not None:
            self._note(self.prompts, prompt, answer, example.row, "")
            self._note(self.answers, answer, prompt, example.row, str(example.messages[-1]["content"])[:40])
        return None

    @staticmethod
    def _note(groups: dict[int, int | _Group], key: int, partner: int, row: int, words: str) -> None:
        seen = groups.get(key)
        if seen is None:
            groups[key] = (partner << 32) | row
        elif isinstance(seen, _Group):
            seen.add(row, partner)
        else:
            group = _Group(seen & 0xFFFFFFFF, seen >> 32, words)
            group.add(row, partner)
            groups[key] = group

    def warnings(self) -> list[Problem]:
        found = []
        for group in self.prompts.values():
            if isinstance(group, _Group) and len(group.partners) > 1:
                found.append(Problem(group.rows[0], "same_prompt_different_answers", f"rows "
                                     f"{_rows_named(group.rows, group.count)} have the same prompt and "
                                     f"{len(group.partners)} different answers; if only one is right, keep that one "
                                     "(the model learns to answer either way)."))
        for group in self.answers.values():
            if isinstance(group, _Group) and len(group.partners) >= MANY_PROMPTS:
                found.append(Problem(group.rows[0], "same_answer_many_prompts", f"rows "
                                     f"{_rows_named(group.rows, group.count)} give the same answer ({group.words!r}…) "
                                     f"to {len(group.partners):,} different prompts; the model may learn to give it "
                                     "to anything (check that it fits each prompt)."))
        return found


def build_report(loaded: formats.LoadedData, tokenizer: Any, max_length: int, keep_duplicates: bool = False,
                 on_progress: Callable[[int, int | None], None] | None = None, keep_tokens: bool = False,
                 keep_examples: int | None = None) -> Report:
    """Check every normalised example against structure, the model's template and tokenizer, and repeats.

    Examples are rendered and measured BATCH_ROWS at a time (one template render each, the tokenizer once per
    batch: `render.Renderer`). Exact duplicates are dropped from the examples (the first kept) unless
    `keep_duplicates`; `on_progress(rows checked, rows)` is called after every batch. With `keep_tokens` each
    valid example carries its `render.Tokens`, which training uses instead of rendering again. `keep_examples`
    keeps only the first that many valid examples (a preview, or none for a report alone): every count and
    statistic still covers all of them, and memory stays that of the counts.
    """
    rules = TemplateRules.probe(tokenizer)
    renderer = Renderer(tokenizer)
    report = Report(loaded.source, loaded.format, loaded.rows, max_length)
    report.errors += loaded.problems
    report.warnings += loaded.warnings
    repeats = _Repeats()
    split_rows: list[int] = []
    pieces_made = 0

    def keep(example: formats.Example, counts: tuple[int, int, int], tokens: Tokens | None) -> None:
        if keep_examples is None or len(report.valid_examples) < keep_examples:
            if tokens is not None:
                example.tokens = tokens
            report.valid_examples.append(example)
        report.token_counts.append(counts)

    def measured(examples: list[formats.Example], results: list[Any]) -> None:
        nonlocal pieces_made
        for example, result in zip(examples, results):
            row = example.row
            if isinstance(result, TemplateError):
                report.errors.append(Problem(row, "template_error", f"row {row}: {result}."))
                continue
            tokens = result if isinstance(result, Tokens) else None
            n_tokens, n_trained = _measures(result)
            if n_tokens > max_length and example.text is not None:
                pieces = _split_text(tokenizer, renderer, example, max_length, keep_tokens)
                if pieces:
                    split_rows.append(row)
                    pieces_made += len(pieces)
                    report.valid_row_count += 1
                    for piece, piece_result in pieces:
                        keep(piece, (1, *_measures(piece_result)),
                             piece_result if isinstance(piece_result, Tokens) else None)
                    continue
            if n_tokens > max_length:
                report.rows_over_max_length += 1
                report.errors.append(Problem(row, "too_long", f"row {row}: {n_tokens} tokens, over the maximum "
                                             f"length of {max_length}; shorten or split the conversation, or raise the "
                                             "maximum length (a conversation is not cut: that would cut the reply)."))
                continue
            if n_trained == 0:
                report.errors.append(Problem(row, "nothing_to_train", f"row {row}: no token of this row would be "
                                             "trained; check that the assistant replies are not empty."))
                continue
            turns = len(example.messages) if example.messages is not None else 1
            report.valid_row_count += 1
            keep(example, (turns, n_tokens, n_trained), tokens)

    def batches() -> Iterator[list[formats.Example]]:
        """The examples that pass the structure checks, BATCH_ROWS at a time (a repeat of an earlier row is left
        out unless kept)."""
        batch: list[formats.Example] = []
        done = len(loaded.problems)
        # Taken from `loaded` one at a time, so an example not kept is freed once checked: a report alone
        # (keep_examples=0) never holds more than the loaded data.
        pending = loaded.examples
        loaded.examples = []
        pending.reverse()
        while pending:
            example = pending.pop()
            row = example.row
            if example.messages is not None or example.text is None:
                errors, warnings = structure_problems(row, example.messages, rules)
            else:
                errors, warnings = _text_problems(row, example.text), []
            report.warnings += warnings
            if errors:
                report.errors += errors
            else:
                report.warnings += _control_token_warnings(renderer, example)
                first = repeats.duplicate_of(example)
                if first is not None:
                    kept = " (kept: keep_duplicates is set)" if keep_duplicates else (
                        "; it is dropped before training (set keep_duplicates to keep repeats)")
                    report.warnings.append(Problem(row, "duplicate", f"row {row}: an exact copy of row {first}{kept}."))
                    if not keep_duplicates:
                        report.duplicates_dropped += 1
                if first is None or keep_duplicates:
                    batch.append(example)
            done += 1
            if len(batch) >= BATCH_ROWS:
                yield batch
                batch = []
                if on_progress is not None:
                    on_progress(done, loaded.rows)
        if batch:
            yield batch

    # One batch is tokenized while the next is checked and rendered (render.Renderer.measure_batches).
    for examples, results in renderer.measure_batches(batches(), keep_tokens):
        measured(examples, results)
    report.warnings += repeats.warnings()
    if split_rows:
        report.text_rows_split = len(split_rows)
        report.warnings.append(Problem(None, "text_split", f"{len(split_rows):,} plain-text row(s) longer than the "
                                       f"maximum length ({max_length} tokens) were split into {pieces_made:,} pieces "
                                       f"of at most {max_length} tokens each (rows {_rows_named(split_rows, len(split_rows))}); "
                                       "only the last piece of each ends with the end-of-text token."))
    report.errors.sort(key=lambda p: (p.row or 0))
    report.warnings.sort(key=lambda p: (p.row or 0))
    if loaded.format in (formats.TEXT,) or any(e.text is not None for e in report.valid_examples):
        report.warnings.insert(0, Problem(None, "all_tokens_trained", "plain text data: every token is trained "
                                          "(language-model style); there are no assistant turns to single out."))
    if report.valid_rows < FEW_EXAMPLES:
        report.warnings.insert(0, Problem(None, "few_examples", f"only {report.valid_rows} valid example(s); LoRA "
                                          f"needs at least {FEW_EXAMPLES}, and a few hundred good ones work best."))
    if on_progress is not None:
        on_progress(loaded.rows, loaded.rows)
    return report


def _control_token_warnings(renderer: Renderer, example: formats.Example) -> list[Problem]:
    """One warning for an example whose text holds any of the model's control tokens (the messages named): the
    renderer tokenizes it as text, but a rendered chat pasted into the data is usually a mistake."""
    holding = renderer.control_strings(example)
    if not holding:
        return []
    numbers = [number for number, _ in holding if number is not None]
    where = f"row {example.row}" + (f", message{'s' if len(numbers) > 1 else ''} "
                                    f"{_rows_named(numbers, len(numbers))}" if numbers else "")
    strings = list(dict.fromkeys(string for _, found in holding for string in found))
    shown = ", ".join(formats.shown(string, 40) for string in strings[:LISTED_ROWS])
    return [Problem(example.row, "control_token_in_text", f"{where}: the text holds {shown}, this model's control "
                    "token(s) that mark where a turn begins or ends; it is trained as plain text, never as the "
                    "token itself (remove it if it was not meant to be there, e.g. a rendered chat pasted into the "
                    "data).")]


def _measures(result: tuple[int, int] | Tokens) -> tuple[int, int]:
    """(tokens, trained tokens) of what `Renderer.measure_many` gave for an example: counts, or its Tokens."""
    return (result.n_tokens, result.n_trained) if isinstance(result, Tokens) else result


def _split_text(tokenizer: Any, renderer: Renderer, example: formats.Example, max_length: int,
                keep_tokens: bool = False) -> list[tuple[formats.Example, tuple[int, int] | Tokens]] | None:
    """A long plain text as pieces of at most `max_length` tokens, cut at token boundaries (the pieces joined are
    the text); only the last piece ends the document. None when a piece re-tokenizes over the limit."""
    offsets = tokenizer(example.text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    step = max_length - 1  # room for the end-of-text token on the last piece (and the same size for every piece)
    cuts = [0] + [offsets[i][0] for i in range(step, len(offsets), step)] + [len(example.text)]
    cuts = sorted(set(cuts))
    pieces = [formats.Example(example.row, example.format, text=example.text[a:b], ends_document=b == len(example.text))
              for a, b in zip(cuts, cuts[1:]) if b > a]
    measured = renderer.measure_many(pieces, keep_tokens)
    counts = [m if isinstance(m, TemplateError) else _measures(m) for m in measured]
    if any(isinstance(m, TemplateError) or m[0] > max_length or m[1] == 0 for m in counts):
        return None
    return list(zip(pieces, measured))


def check_data(settings: Any, tokenizer: Any, on_progress: Callable[[int, int | None], None] | None = None,
               keep_tokens: bool = False, keep_examples: int | None = None) -> Report:
    """Read the source named by `settings` (a DataSettings) and build its report (`build_report` says what
    `keep_tokens` and `keep_examples` keep).

    `on_progress(rows done, total or None)`, when given, is called every few thousand rows: while reading (rows
    read, None), then while checking (rows checked, rows), last with (rows, rows).
    """
    loaded = data.load_data(settings.source, settings.columns or None, settings.hub_config or None, settings.hub_split,
                            max_rows=settings.max_rows, max_file_mb=settings.max_file_mb,
                            max_row_kb=settings.max_row_kb, max_messages=settings.max_messages,
                            on_progress=on_progress)
    return build_report(loaded, tokenizer, settings.max_length, getattr(settings, "keep_duplicates", False),
                        on_progress, keep_tokens, keep_examples)


FIRST_LOOK_ROWS = 2000  # ~0.5 s of checking: the first look at a streamed source comes within seconds


def check_data_in_stages(settings: Any, tokenizer: Any,
                         on_progress: Callable[[int, int | None], None] | None = None,
                         keep_examples: int | None = None) -> Iterator[Report]:
    """`check_data`'s report, preceded, for a streamed Hub dataset larger than FIRST_LOOK_ROWS, by a report of its
    first rows (`first_look` set): the first problems show within seconds, however large the dataset. The whole
    check then streams the dataset again from its start (the first rows twice: a fraction of a second)."""
    if data.is_hub_dataset(settings.source) and settings.max_rows > FIRST_LOOK_ROWS:
        first = check_data(replace(settings, max_rows=FIRST_LOOK_ROWS), tokenizer, None, keep_examples=keep_examples)
        if not any(w.code == "rows_not_read" for w in first.warnings):
            yield first  # the whole dataset fitted in the first look
            return
        first.first_look = True
        yield first
    yield check_data(settings, tokenizer, on_progress, keep_examples=keep_examples)


CHECK_TASK = isolation.Task("This check", "check a smaller file or a part of it (fewer or shorter rows), or choose a "
                                          "model with a simpler chat template; on a machine of your own, `python -m "
                                          "sft_space validate` checks it without these limits.")
PREVIEW_TASK = isolation.Task("This preview", "choose a model with a simpler chat template, or one the app offers.")


def check_data_in_worker(settings: Any, tokenizer_of: Callable[[], Any], limits: isolation.Limits,
                         on_progress: Callable[[int, int | None], None] | None = None,
                         keep_examples: int | None = None) -> Iterator[Report]:
    """`check_data_in_stages` in a worker process under `limits` (see isolation.py): the visitor's data is read and
    the model's template runs there, and `tokenizer_of()` is called there, so a tokenizer a visitor named loads
    there too. The reports come back as they are made (a first look first); progress is relayed. A check that
    needs more memory or time than `limits` allow is a UserError, and the app goes on."""
    def work(progress: Callable[[int, int | None], None] | None) -> Iterator[Report]:
        return check_data_in_stages(settings, tokenizer_of(), progress, keep_examples)

    return isolation.stream_in_worker(work, CHECK_TASK, limits, on_progress)


def render_in_worker(tokenizer_of: Callable[[], Any], example: formats.Example, limits: isolation.Limits) -> Rendered:
    """One checked example as the model sees it (`render.render_example`), rendered in a worker process under
    `limits`: the template may be a stranger's."""
    return isolation.run_in_worker(lambda: render_example(tokenizer_of(), example), PREVIEW_TASK, limits)
