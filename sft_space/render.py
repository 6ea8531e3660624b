"""Render an example through the model's chat template and work out exactly which tokens are trained.

Assistant-only loss needs to know where each assistant reply sits in the rendered text. TRL can take that
from `{% generation %}` markers, but most templates (ChatML, the embedded default's among them) have none.
Instead we use a property nearly every template has: a conversation cut after message k renders as a prefix
of the whole conversation. The text between "history + generation prompt" and "history + the reply" is the
reply itself plus its end-of-turn marker; the tokens that overlap it are the trained tokens. Training uses
this same function, so what the preview highlights is what the loss sees.
"""

from __future__ import annotations

import bisect
import html
from dataclasses import dataclass
from typing import Any

from .errors import UserError

# For models that ship no chat template. The tokenizer gets matching special tokens (see ensure_chat_template).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>"]

ROLE_COLOURS = {
    "system": "#7c3aed",
    "user": "#2563eb",
    "assistant": "#15803d",
    "tool": "#c2410c",
    "text": "inherit",
}
TRAINED_OPEN, TRAINED_CLOSE = "⟦", "⟧"


class TemplateError(UserError):
    """The model's chat template cannot render this conversation, or hides where the replies are."""


@dataclass
class Rendered:
    """One example as the model sees it: text, tokens, and which tokens carry loss."""

    text: str
    input_ids: list[int]
    offsets: list[tuple[int, int]]
    trained: list[bool]
    # (start, end, role) character spans covering the text, for colouring by role.
    segments: list[tuple[int, int, str]]

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def n_trained(self) -> int:
        return sum(self.trained)

    def trained_spans(self) -> list[tuple[int, int]]:
        """Character spans of consecutive trained tokens."""
        spans: list[tuple[int, int]] = []
        for (start, end), trained in zip(self.offsets, self.trained):
            if not trained:
                continue
            if spans and start <= spans[-1][1]:
                spans[-1] = (spans[-1][0], max(end, spans[-1][1]))
            else:
                spans.append((start, end))
        return spans


def ensure_chat_template(tokenizer: Any) -> list[str]:
    """Give a template-less tokenizer ChatML and its special tokens; return the tokens it had to add.

    The caller that trains must resize the model's embeddings when tokens were added.
    """
    if tokenizer.chat_template:
        return []
    vocab = tokenizer.get_vocab()
    missing = [t for t in CHATML_SPECIAL_TOKENS if t not in vocab]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    tokenizer.chat_template = CHATML_TEMPLATE
    # Generation must stop at the end of the assistant's turn, which ChatML marks with <|im_end|>.
    tokenizer.eos_token = "<|im_end|>"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return missing


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as the template should see them: our own `weight` field is not the template's business."""
    return [{k: v for k, v in m.items() if k != "weight"} for m in messages]


def render_chat(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
    if not messages and not add_generation_prompt:
        return ""
    try:
        return tokenizer.apply_chat_template(
            template_messages(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as err:  # jinja's raise_exception and template bugs surface as many types
        raise TemplateError(f"the model's chat template rejected this conversation: {err}") from None


def _end_of_turn_marker(tokenizer: Any) -> str:
    """What the template writes after an assistant reply (e.g. '<|im_end|>'), trailing whitespace dropped."""
    probe = "SFTSPACEPROBE"
    text = render_chat(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}])
    after = text[text.rindex(probe) + len(probe):]
    return after.rstrip()


def assistant_spans(tokenizer: Any, messages: list[dict[str, Any]], full: str) -> list[tuple[int, int]]:
    """Character spans of trained assistant replies (content plus end-of-turn marker) in `full`."""
    spans = []
    cursor = 0
    end_marker: str | None = None
    for i, message in enumerate(messages):
        if message.get("role") != "assistant" or message.get("weight", 1) == 0:
            continue
        before = render_chat(tokenizer, messages[:i], add_generation_prompt=True)
        through = render_chat(tokenizer, messages[: i + 1])
        if full.startswith(through) and through.startswith(before) and len(before) >= cursor:
            start, end = len(before), len(through.rstrip())
        else:
            # Templates that rewrite earlier turns (e.g. dropping reasoning) break the prefix property;
            # find the reply's own text instead and extend it over the end-of-turn marker.
            content = message.get("content") or ""
            start = full.find(content, cursor) if content else -1
            if start < 0:
                raise TemplateError(
                    f"the chat template does not reproduce assistant message {i + 1} verbatim, so the tokens to "
                    "train cannot be located; use a model whose template renders replies as written"
                )
            end = start + len(content)
            end_marker = _end_of_turn_marker(tokenizer) if end_marker is None else end_marker
            if end_marker and full.startswith(end_marker, end):
                end += len(end_marker)
        if end > start:
            spans.append((start, end))
        cursor = max(cursor, end)
    return spans


def _role_segments(tokenizer: Any, messages: list[dict[str, Any]], full: str) -> list[tuple[int, int, str]]:
    """Split the text into per-message pieces; a message whose prefix is not stable merges into the next."""
    segments = []
    start = 0
    for k in range(1, len(messages) + 1):
        prefix = full if k == len(messages) else render_chat(tokenizer, messages[:k])
        if full.startswith(prefix) and len(prefix) > start:
            segments.append((start, len(prefix), str(messages[k - 1].get("role"))))
            start = len(prefix)
    if start < len(full):
        segments.append((start, len(full), segments[-1][2] if segments else "text"))
    return segments


def _tokenize(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    if not getattr(tokenizer, "is_fast", True):
        raise TemplateError("this tokenizer has no character offsets (not a 'fast' tokenizer); pick another model")
    # The template already wrote any BOS it wants; adding special tokens again would double it.
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(encoding["input_ids"]), [tuple(o) for o in encoding["offset_mapping"]]


def render_conversation(tokenizer: Any, messages: list[dict[str, Any]]) -> Rendered:
    full = render_chat(tokenizer, messages)
    spans = assistant_spans(tokenizer, messages, full)
    input_ids, offsets = _tokenize(tokenizer, full)
    # A token is trained when it overlaps a reply: a token that merges the template's space with the
    # reply's first word still has to be predicted to produce the reply.
    trained = [any(start < span_end and end > span_start for span_start, span_end in spans) for start, end in offsets]
    return Rendered(full, input_ids, offsets, trained, _role_segments(tokenizer, messages, full))


def render_text(tokenizer: Any, text: str) -> Rendered:
    """Language-model data: every token is trained, and an end-of-sequence token closes the document."""
    input_ids, offsets = _tokenize(tokenizer, text)
    if tokenizer.eos_token_id is not None:
        input_ids.append(tokenizer.eos_token_id)
        offsets.append((len(text), len(text)))
    return Rendered(text, input_ids, offsets, [True] * len(input_ids), [(0, len(text), "text")])


def render_example(tokenizer: Any, example: Any) -> Rendered:
    """Render a `data.Example` (chat messages or plain text)."""
    if example.messages is not None:
        return render_conversation(tokenizer, example.messages)
    return render_text(tokenizer, example.text)


# ------------------------------------------------------------------------------------------------ output


def to_marked_text(rendered: Rendered, colour: bool = False) -> str:
    """The rendered text with trained spans between ⟦ ⟧ (and green on a terminal)."""
    open_mark, close_mark = (TRAINED_OPEN + "\x1b[32m", "\x1b[0m" + TRAINED_CLOSE) if colour else (TRAINED_OPEN, TRAINED_CLOSE)
    pieces, cursor = [], 0
    for start, end in rendered.trained_spans():
        pieces += [rendered.text[cursor:start], open_mark, rendered.text[start:end], close_mark]
        cursor = end
    pieces.append(rendered.text[cursor:])
    return "".join(pieces)


def _token_pieces(rendered: Rendered) -> list[tuple[str, str, bool]]:
    """(text, role, trained) runs, merging neighbouring tokens that look the same."""
    segment_starts = [start for start, _, _ in rendered.segments]

    def role_at(position: int) -> str:
        index = bisect.bisect_right(segment_starts, position) - 1
        return rendered.segments[index][2] if index >= 0 else "text"

    runs: list[tuple[str, str, bool]] = []
    cursor = 0
    for (start, end), trained in zip(rendered.offsets, rendered.trained):
        if end <= cursor:
            continue
        start = max(start, cursor)
        if start > cursor:  # text no token covers (rare): show it untrained
            runs.append((rendered.text[cursor:start], role_at(cursor), False))
        runs.append((rendered.text[start:end], role_at(start), trained))
        cursor = end
    if cursor < len(rendered.text):
        runs.append((rendered.text[cursor:], role_at(cursor), False))
    merged: list[tuple[str, str, bool]] = []
    for text, role, trained in runs:
        if merged and merged[-1][1:] == (role, trained):
            merged[-1] = (merged[-1][0] + text, role, trained)
        else:
            merged.append((text, role, trained))
    return merged


def to_html(rendered: Rendered) -> str:
    """The rendered text as HTML: roles coloured, trained tokens highlighted, with a legend."""
    body = []
    for text, role, trained in _token_pieces(rendered):
        style = f"color:{ROLE_COLOURS.get(role, 'inherit')}"
        escaped = html.escape(text)
        if trained:
            body.append(
                f'<mark class="sft-trained" style="{style};background:rgba(250,204,21,.45);'
                f'border-radius:2px;padding:0">{escaped}</mark>'
            )
        else:
            body.append(f'<span class="sft-role-{html.escape(role)}" style="{style}">{escaped}</span>')
    legend = " ".join(
        f'<span style="color:{ROLE_COLOURS[r]}">■ {r}</span>' for r in ("system", "user", "assistant", "tool")
    )
    return (
        '<div class="sft-render">'
        f'<div class="sft-legend" style="font-size:.85em;margin-bottom:.4em">{legend} '
        '<mark style="background:rgba(250,204,21,.45)">trained</mark> '
        f"· {rendered.n_tokens} tokens, {rendered.n_trained} trained</div>"
        '<pre style="white-space:pre-wrap;word-break:break-word;margin:0;font-size:.9em">'
        + "".join(body)
        + "</pre></div>"
    )
