"""Judge every row before any GPU time is spent: per-row problems with codes and fixes, and statistics.

Each problem names the row (see `data.py` for how rows are numbered), a stable code from PROBLEM_CODES,
and a message that says how to fix it. A row with an error is invalid: it is never trained on silently;
the user sees it and chooses to skip it. Warnings do not invalidate a row.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from . import data
from .render import Rendered, TemplateError, render_chat, render_example

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
    "invalid_weight": "a weight other than 0 or 1, or on a message that is not the assistant's",
    "tool_turn_unsupported": "a tool turn, and the model's chat template cannot show tool turns",
    "system_not_first": "a system message after the first message",
    "no_assistant_turn": "no assistant message, so nothing to learn",
    "last_turn_not_assistant": "the conversation ends with a turn that is not the assistant's",
    "roles_not_alternating": "two user or two assistant turns in a row (an error when the template requires "
    "alternation, a warning otherwise)",
    "template_error": "the model's chat template cannot render the conversation",
    "too_long": "longer than the maximum length in the model's tokens",
    "nothing_to_train": "zero tokens would be trained (e.g. every assistant turn has weight 0)",
    "duplicate": "an exact copy of an earlier row",
    "unusable_source": "the source as a whole cannot be used (missing, unreadable, unrecognised); row is null",
    # warnings: worth knowing, the row is still trained on
    "few_examples": "fewer than 10 valid examples in the whole file",
    "all_tokens_trained": "plain text data: every token is trained, there is no assistant mask",
}


@dataclass
class Problem:
    row: int | None
    code: str
    message: str


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
    """The validation report: what the CLI prints, the app shows, and training trusts."""

    source: str
    format: str
    rows: int
    max_length: int
    valid_examples: list[data.Example] = field(default_factory=list)
    errors: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    # Per valid example, in order: (messages or 1 for text, tokens, trained tokens).
    token_counts: list[tuple[int, int, int]] = field(default_factory=list)
    rows_over_max_length: int = 0

    @property
    def valid_rows(self) -> int:
        return len(self.valid_examples)

    @property
    def invalid_rows(self) -> int:
        return len({p.row for p in self.errors if p.row is not None})

    def error_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for problem in self.errors:
            counts[problem.code] = counts.get(problem.code, 0) + 1
        return counts

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
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "rows": self.rows,
            "valid_rows": self.valid_rows,
            "errors": [asdict(p) for p in self.errors],
            "warnings": [asdict(p) for p in self.warnings],
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
        kinds = sorted({str(p.get("type")) if isinstance(p, dict) else type(p).__name__ for p in content})
        return Problem(
            row, "non_string_content",
            f"row {row}, {where}: content is a list of {', '.join(kinds)} parts; SFT Space trains text-only "
            "models, so keep only text parts (or describe the image in words).",
        )
    if not isinstance(content, str):
        return Problem(
            row, "non_string_content",
            f"row {row}, {where}: content is a {type(content).__name__}, not text; write it as a string.",
        )
    if not content.strip():
        return Problem(row, "empty_content", f"row {row}, {where}: content is empty; write the text or remove the message.")
    return _invalid_text_problem(row, where, content)


def _invalid_text_problem(row: int, where: str, text: str) -> Problem | None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return Problem(row, "invalid_text", f"row {row}, {where}: character {err.start + 1} is not valid Unicode "
                                            f"({text[err.start]!r}, a lone surrogate escape); remove or fix it.")
    return None


def structure_problems(row: int, messages: Any, rules: TemplateRules) -> tuple[list[Problem], list[Problem]]:
    """(errors, warnings) about the shape of one conversation, before any rendering."""
    if not isinstance(messages, list):
        return [Problem(row, "no_messages", f"row {row}: has no list of messages (found {type(messages).__name__}); "
                        'write it as "messages": [{"role": "user", "content": ...}, ...].')], []
    if not messages:
        return [Problem(row, "empty_messages", f"row {row}: the list of messages is empty; add the conversation or remove the row.")], []
    errors: list[Problem] = []
    warnings: list[Problem] = []
    for index, message in enumerate(messages, start=1):
        where = f"message {index}"
        if not isinstance(message, dict):
            errors.append(Problem(row, "message_not_an_object", f"row {row}, {where}: is a {type(message).__name__}, "
                                  'not an object; write it as {"role": ..., "content": ...}.'))
            continue
        role = message.get("role")
        if role not in ROLES:
            guess = difflib.get_close_matches(str(role).lower(), ROLES, n=1)
            hint = f"did you mean {guess[0]!r}?" if guess else f"use one of {', '.join(ROLES)}."
            errors.append(Problem(row, "unknown_role", f"row {row}, {where}: role {role!r} is not one of "
                                  f"{', '.join(ROLES)}; {hint}"))
        content_problem = _content_problem(row, where, message)
        if content_problem:
            errors.append(content_problem)
        if "weight" in message and (role != "assistant" or message["weight"] not in (0, 1) or isinstance(message["weight"], bool)):
            errors.append(Problem(row, "invalid_weight", f"row {row}, {where}: weight {message['weight']!r} on a "
                                  f"{role} message; weight is 0 or 1, and only on assistant messages (0 = shown as "
                                  "context, not trained)."))
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
    dialogue = [r for r in roles if r in ("user", "assistant")]
    repeat = next((i for i in range(1, len(dialogue)) if dialogue[i] == dialogue[i - 1]), None)
    starts_with_reply = bool(dialogue) and dialogue[0] == "assistant"
    if repeat is not None or starts_with_reply:
        what = (f"two {dialogue[repeat]} turns in a row" if repeat is not None
                else "the conversation starts with the assistant")
        if rules.requires_alternation:
            errors.append(Problem(row, "roles_not_alternating", f"row {row}: {what}, and this model's chat template "
                                  "requires user and assistant turns to alternate; merge or reorder the turns."))
        else:
            warnings.append(Problem(row, "roles_not_alternating", f"row {row}: {what}; this is allowed by the "
                                    "template but usually a data mistake (merge the turns if so)."))
    return errors, warnings


def _text_problems(row: int, text: Any) -> list[Problem]:
    if not isinstance(text, str):
        return [Problem(row, "non_string_content", f"row {row}: 'text' is a {type(text).__name__}, not text; write it as a string.")]
    if not text.strip():
        return [Problem(row, "empty_content", f"row {row}: 'text' is empty; write the text or remove the row.")]
    invalid = _invalid_text_problem(row, "'text'", text)
    return [invalid] if invalid else []


# ------------------------------------------------------------------------------------------- report


def build_report(loaded: data.LoadedData, tokenizer: Any, max_length: int) -> Report:
    """Check every normalised example against structure, the model's template and tokenizer, and duplicates."""
    rules = TemplateRules.probe(tokenizer)
    report = Report(loaded.source, loaded.format, loaded.rows, max_length)
    report.errors += [Problem(p.row, p.code, p.message) for p in loaded.problems]
    first_seen: dict[str, int] = {}
    for example in loaded.examples:
        row = example.row
        if example.messages is not None or example.text is None:
            errors, warnings = structure_problems(row, example.messages, rules)
        else:
            errors, warnings = _text_problems(row, example.text), []
        report.warnings += warnings
        if errors:
            report.errors += errors
            continue
        key = json.dumps(example.messages if example.messages is not None else example.text, sort_keys=True)
        if key in first_seen:
            report.errors.append(Problem(row, "duplicate", f"row {row}: an exact copy of row {first_seen[key]}; "
                                         "remove it (repeated examples are memorised, not learned)."))
            continue
        first_seen[key] = row
        try:
            rendered: Rendered = render_example(tokenizer, example)
        except TemplateError as err:
            report.errors.append(Problem(row, "template_error", f"row {row}: {err}."))
            continue
        if rendered.n_tokens > max_length:
            report.rows_over_max_length += 1
            report.errors.append(Problem(row, "too_long", f"row {row}: {rendered.n_tokens} tokens, over the maximum "
                                         f"length of {max_length}; shorten or split the conversation, or raise the "
                                         "maximum length."))
            continue
        if rendered.n_trained == 0:
            report.errors.append(Problem(row, "nothing_to_train", f"row {row}: no token of this row would be trained; "
                                         "check that the assistant replies are not empty."))
            continue
        turns = len(example.messages) if example.messages is not None else 1
        report.valid_examples.append(example)
        report.token_counts.append((turns, rendered.n_tokens, rendered.n_trained))
    report.errors.sort(key=lambda p: (p.row or 0))
    report.warnings.sort(key=lambda p: (p.row or 0))
    if loaded.format in (data.TEXT,) or any(e.text is not None for e in report.valid_examples):
        report.warnings.insert(0, Problem(None, "all_tokens_trained", "plain text data: every token is trained "
                                          "(language-model style); there are no assistant turns to single out."))
    if report.valid_rows < FEW_EXAMPLES:
        report.warnings.insert(0, Problem(None, "few_examples", f"only {report.valid_rows} valid example(s); LoRA "
                                          f"needs at least {FEW_EXAMPLES}, and a few hundred good ones work best."))
    return report


def check_data(settings: Any, tokenizer: Any) -> Report:
    """Read the source named by `settings` (a DataSettings) and build its report."""
    loaded = data.load_data(settings.source, settings.columns or None, settings.hub_config or None, settings.hub_split,
                            max_rows=settings.max_rows, max_file_mb=settings.max_file_mb,
                            max_row_kb=settings.max_row_kb, max_messages=settings.max_messages)
    return build_report(loaded, tokenizer, settings.max_length)
