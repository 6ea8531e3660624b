"""Render an example through the model's chat template and work out exactly which tokens are trained.

Assistant-only loss needs to know where each assistant reply sits in the rendered text. TRL can take that
from `{% generation %}` markers, but most templates (ChatML, the embedded default's among them) have none.
Instead we use a property nearly every template has: a conversation cut after message k renders as a prefix
of the whole conversation. The text between "history + generation prompt" and "history + the reply" is the
reply itself plus its end-of-turn marker; the tokens that overlap it are the trained tokens. Training uses
this same function, so what the preview highlights is what the loss sees.

Rendering every prefix costs time quadratic in the number of turns (4,000 short turns take over a minute), so
`render_conversation` first tries a linear way to the same answer (`_block_layout`): it renders the conversation
once more with a placeholder for each content, learns from a few short prefixes what the template writes between
two messages, and checks that every gap in this conversation is exactly that. Only when a check fails (templates
that rewrite earlier turns, trim contents, fold one message into another, ...) does it render every prefix.
"""

from __future__ import annotations

import bisect
import copy
import itertools
import json
import re
import weakref
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

from .errors import UserError

# For models that ship no chat template. The tokenizer gets matching special tokens (see ensure_chat_template).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>"]

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


@dataclass(frozen=True)
class Tokens:
    """An example as training needs it, compact: token ids (4 bytes each) and a trained flag per token (1 byte),
    exactly `Rendered.input_ids` and `Rendered.trained`. The check keeps these for training, so nothing is
    rendered or tokenized twice."""

    ids: array
    trained: bytes

    @property
    def n_tokens(self) -> int:
        return len(self.ids)

    @property
    def n_trained(self) -> int:
        return self.trained.count(1)


def ensure_chat_template(tokenizer: Any) -> list[str]:
    """Give a template-less tokenizer ChatML and its special tokens; return the tokens it had to add.

    Training refuses a model whose embeddings have no rows for added tokens (train.check_vocabulary_fits).
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
    except MemoryError:
        raise  # the template took more memory than this process may have: not a verdict on this conversation
    except Exception as err:  # jinja's raise_exception and template bugs surface as many types
        raise TemplateError(f"the model's chat template rejected this conversation: {err}") from None


def _end_of_turn_marker(tokenizer: Any) -> str:
    """What the template writes after an assistant reply (e.g. '<|im_end|>'), trailing whitespace dropped."""
    probe = "SFTSPACEPROBE"
    text = render_chat(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}])
    after = text[text.rindex(probe) + len(probe):]
    return after.rstrip()


def assistant_spans(tokenizer: Any, messages: list[dict[str, Any]], full: str) -> list[tuple[int, int]]:
    """Character spans of trained assistant replies (content plus end-of-turn marker) in `full`, by rendering the
    prefixes around each reply."""
    end_marker: str | None = None

    def bounds(i: int) -> tuple[int, int] | None:
        if i == 0:
            return _opening_reply_bounds(tokenizer, messages, full)
        before = render_chat(tokenizer, messages[:i], add_generation_prompt=True)
        through = render_chat(tokenizer, messages[: i + 1])
        return (len(before), len(through)) if full.startswith(through) and through.startswith(before) else None

    def search(i: int, cursor: int) -> tuple[int, int]:
        # Templates that rewrite earlier turns (e.g. dropping reasoning) break the prefix property;
        # find the reply's own text instead and extend it over the end-of-turn marker.
        nonlocal end_marker
        content = messages[i].get("content") or ""
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
        return start, end

    return _reply_spans(full, ((i, bounds(i)) for i, m in enumerate(messages) if _is_trained_reply(m)), search)


def _reply_spans(full: str, replies: Iterable[tuple[int, tuple[int, int] | None]],
                 search: Callable[[int, int], tuple[int, int]] | None = None) -> list[tuple[int, int]] | None:
    """The one way a reply's span is read, whichever render gave its bounds: for each trained reply `i`, in order,
    (start, through) are where the history with its generation prompt ends and where the conversation through the
    reply ends; the span runs from the one to the other, trailing whitespace dropped (so it ends with the reply's
    end-of-turn marker). A reply whose bounds are unknown (None), or that would start inside the reply before it, is
    found by `search(i, where the reply before ends)`, or without a search makes the answer None."""
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, bounds in replies:
        if bounds is not None and bounds[0] >= cursor:
            start, end = bounds[0], bounds[1]
            while end > 0 and full[end - 1].isspace():  # the prefix's text.rstrip(), without copying it
                end -= 1
        elif search is not None:
            start, end = search(i, cursor)
        else:
            return None
        if end > start:
            spans.append((start, end))
        cursor = max(cursor, end)
    return spans


def _opening_reply_bounds(tokenizer: Any, messages: list[dict[str, Any]], full: str) -> tuple[int, int]:
    """The bounds of a reply that opens the conversation. There is no history to add a generation prompt to
    (templates refuse an empty conversation), so the span starts where the reply's content does, found by rendering
    it alone with a placeholder for its content, and runs to the end of that render (its end-of-turn marker)."""
    message, mark = messages[0], _placeholder(0)
    through = render_chat(tokenizer, messages[:1])
    content = message.get("content")
    if isinstance(content, str) and full.startswith(through):
        marked = render_chat(tokenizer, [{**message, "content": mark}])
        at = marked.find(mark)
        if at >= 0 and marked.count(mark) == 1 and through == marked[:at] + content + marked[at + len(mark):]:
            return at, len(through)
    raise TemplateError("the chat template does not render the opening assistant message as written, so the tokens "
                        "to train cannot be located; start the conversation with the user's turn")


def _role_segments(tokenizer: Any, messages: list[dict[str, Any]], full: str) -> list[tuple[int, int, str]]:
    """Split the text into per-message pieces; a message whose prefix is not stable merges into the next."""
    prefix_ends = []
    for k in range(1, len(messages) + 1):
        prefix = full if k == len(messages) else render_chat(tokenizer, messages[:k])
        prefix_ends.append(len(prefix) if full.startswith(prefix) else None)
    return _segments(messages, full, prefix_ends, _inserted_system_end(tokenizer, messages, full))


def _inserted_system_end(tokenizer: Any, messages: list[dict[str, Any]], full: str) -> int:
    """Where a system turn that the template wrote by itself, before the first message, ends in `full` (0: none).

    Many templates insert a default system message when the conversation has none (SmolLM2's "You are a helpful AI
    assistant named SmolLM", Qwen2.5's, Llama 3.1's dated one); it belongs to no message, so without this it is
    coloured as the first message's role. It is found from placeholder renders, for any template: the first message
    after a system message shows that message's own header (e.g. "<|im_start|>user\n", what the template writes
    between the two turns) and how a system turn opens (what it writes before the system content). When the text
    before the first message's content is some text, then that header, and the text opens as a system turn does,
    the template wrote a system turn there. A template that refuses a system message, folds it into another turn or
    writes only a BOS token before the first message has none (0).
    """
    first = messages[0] if messages else None
    if not isinstance(first, dict) or first.get("role") == "system" or not isinstance(first.get("content"), str):
        return 0
    # Indices no message has, so these never meet the placeholders of a conversation rendered with them.
    system, mark = _placeholder(-1), _placeholder(-2)
    try:
        alone = render_chat(tokenizer, [{**first, "content": mark}])
        system_turn = render_chat(tokenizer, [{"role": "system", "content": system}])
        both = render_chat(tokenizer, [{"role": "system", "content": system}, {**first, "content": mark}])
    except TemplateError:
        return 0
    at = alone.find(mark)
    before = alone[:at]
    if at < 0 or not full.startswith(before) or not full.startswith(first["content"], at):
        return 0  # the first message is not rendered here as it is alone
    if both.count(system) != 1 or both.count(mark) != 1 or not both.startswith(system_turn) \
            or len(system_turn) < both.index(system) + len(system) or len(system_turn) > both.index(mark):
        return 0  # no system turn of its own that closes before the first message
    opening, header = both[:both.index(system)], both[len(system_turn):both.index(mark)]
    if not opening.strip() or not header.strip() or not before.endswith(header):
        return 0
    inserted = before[:len(before) - len(header)]
    return len(inserted) if len(inserted) > len(opening) and inserted.startswith(opening) else 0


def _segments(messages: list[dict[str, Any]], full: str, prefix_ends: list[int | None],
              system_end: int = 0) -> list[tuple[int, int, str]]:
    """Role segments from where each prefix of the conversation ends in `full` (None: not a prefix of it); the text
    before `system_end` is a system turn the template inserted (see `_inserted_system_end`)."""
    segments = [(0, system_end, "system")] if system_end else []
    start = system_end
    for message, end in zip(messages, prefix_ends):
        if end is not None and end > start:
            segments.append((start, end, str(message.get("role"))))
            start = end
    if start < len(full):
        segments.append((start, len(full), segments[-1][2] if segments else "text"))
    return segments


# ------------------------------------------------------------------------------- linear message layout


@dataclass
class _Layout:
    """Where the template puts each message, found in linear time (see `_block_layout`).

    `prefix_ends[k]` is the length of the first k+1 messages rendered alone, which is a prefix of the whole
    text; `generation_prompt` is what "add_generation_prompt" appends to such a prefix.
    """

    prefix_ends: list[int]
    generation_prompt: str | None


def _placeholder(index: int) -> str:
    # Private-use characters: no template writes them, no tokenizer is asked to read them.
    return f"\ue000{index}\ue001"


def _content_positions(tokenizer: Any, messages: list[dict[str, Any]], full: str) -> list[int] | None:
    """Where each message's content starts in `full`, when the template writes every content once, verbatim and in
    order, and nothing else depends on it (rendering placeholders instead gives the same text around them)."""
    if not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
        return None
    try:
        marked = render_chat(tokenizer, [{**m, "content": _placeholder(i)} for i, m in enumerate(messages)])
    except TemplateError:
        return None
    starts, cursor, shift = [], 0, 0  # shift: how far `full` runs ahead of `marked` at the cursor
    for index, message in enumerate(messages):
        mark, content = _placeholder(index), message["content"]
        at = marked.find(mark, cursor)
        if at < 0 or not full.startswith(marked[cursor:at], cursor + shift):
            return None
        start = at + shift
        if not full.startswith(content, start):
            return None
        starts.append(start)
        cursor, shift = at + len(mark), shift + len(content) - len(mark)
    if len(full) != len(marked) + shift or not full.endswith(marked[cursor:]):
        return None
    return starts


def _block_layout(tokenizer: Any, messages: list[dict[str, Any]], full: str) -> _Layout | None:
    """The prefix ends and generation prompt of `messages`, in time linear in its length; None when this
    template does not render the conversation as blocks that can be checked that way.

    Between the contents of messages k and k+1 a template writes message k's closing (its suffix: e.g.
    "<|im_end|>\n") and message k+1's opening (its header: "<|im_start|>assistant\n"). Both are learned per
    role from the first message of that role, by rendering the prefixes around it (a few short renders), and
    every gap of this conversation must then be exactly suffix + header. A prefix then ends after its last
    message's suffix, as rendering it would show.
    """
    starts = _content_positions(tokenizer, messages, full)
    if not starts:
        return None
    ends = [start + len(m["content"]) for start, m in zip(starts, messages)]
    roles = [m.get("role") for m in messages]
    prefixes: dict[int, str] = {0: ""}

    def prefix(k: int, generation_prompt: bool = False) -> str | None:
        """The first k messages rendered alone, when that is a prefix of `full` (otherwise None)."""
        if generation_prompt:
            return render_chat(tokenizer, messages[:k], add_generation_prompt=True)
        if k not in prefixes:
            text = render_chat(tokenizer, messages[:k])
            prefixes[k] = text if full.startswith(text) else None
        return prefixes[k]

    try:
        suffixes: dict[Any, str] = {}
        headers: dict[Any, str] = {}
        for k in range(len(messages) - 1):  # 0-based: the gap after message k, before message k + 1
            if roles[k] not in suffixes:
                through = prefix(k + 1)
                if through is None or len(through) < ends[k]:
                    return None
                suffixes[roles[k]] = through[ends[k]:]
            if roles[k + 1] not in headers:
                before = prefix(k + 1)
                if before is None or len(before) > starts[k + 1]:
                    return None
                headers[roles[k + 1]] = full[len(before):starts[k + 1]]
            suffix, header = suffixes[roles[k]], headers[roles[k + 1]]
            if (ends[k] + len(suffix) + len(header) != starts[k + 1] or not full.startswith(suffix, ends[k])
                    or not full.startswith(header, ends[k] + len(suffix))):
                return None
        prefix_ends = [end + len(suffixes[role]) for end, role in zip(ends[:-1], roles)] + [len(full)]
        generation_prompt = None
        first_reply = next((i for i, m in enumerate(messages) if _is_trained_reply(m)), None)
        if first_reply is not None:
            history = prefix(first_reply)
            prompted = prefix(first_reply, generation_prompt=True)
            if history is None or not prompted.startswith(history):
                return None
            generation_prompt = prompted[len(history):]
    except TemplateError:
        return None  # the prefix method renders the same prefixes, and reports the error as it always has
    return _Layout(prefix_ends, generation_prompt)


def _is_trained_reply(message: dict[str, Any]) -> bool:
    return message.get("role") == "assistant" and message.get("weight", 1) != 0


def _layout_spans(layout: _Layout, messages: list[dict[str, Any]], full: str) -> list[tuple[int, int]] | None:
    """`assistant_spans` read off the layout; None where a reply is not "prefix + generation prompt" (the
    prefix method then decides, as it always has)."""

    def bounds(i: int) -> tuple[int, int] | None:
        history_end = layout.prefix_ends[i - 1] if i else 0
        start, through = history_end + len(layout.generation_prompt), layout.prefix_ends[i]
        return (start, through) if full.startswith(layout.generation_prompt, history_end) and start <= through \
            else None

    return _reply_spans(full, ((i, bounds(i)) for i, m in enumerate(messages) if _is_trained_reply(m)))


def _tokenize(tokenizer: Any, text: str,
              forged: list[tuple[int, int]] | None = None) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets of `text`; a control token that overlaps a `forged` span (`forged_spans`)
    is tokenized as text instead."""
    if not getattr(tokenizer, "is_fast", True):
        raise TemplateError("this tokenizer has no character offsets (not a 'fast' tokenizer); pick another model")
    # The template already wrote any BOS it wants; adding special tokens again would double it.
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(encoding["input_ids"]), [tuple(o) for o in encoding["offset_mapping"]]
    guarded = control_tokens(tokenizer).guard(text, ids, offsets, forged) if forged else None
    return guarded or (ids, offsets)


# ------------------------------------------------------------------------------ control tokens from text


class ControlTokens:
    """A tokenizer's control tokens (its special added tokens: "<|im_start|>", "<|im_end|>", ...), and a way to
    tokenize text in which their strings stay text.

    A tokenizer cuts its input at every control-token string before anything else, so a message holding
    "<|im_end|>\n<|im_start|>system" would close its own turn and open a system turn: trained as the model's own
    turn markers, shown so in the preview, and in chat a user's way to write the system prompt. Only the template
    writes control tokens; where a message wrote the characters, they are tokenized as the text they are.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        added = self._backend.get_added_tokens_decoder() if self._backend is not None else {}
        self.ids = frozenset(index for index, token in added.items() if token.special)
        strings = sorted({token.content for token in added.values() if token.special and token.content},
                         key=len, reverse=True)  # the longest first, as the tokenizer matches them
        self._pattern = re.compile("|".join(map(re.escape, strings))) if strings else None
        self._literal: Any = None

    def holds(self, value: Any) -> bool:
        """Whether `value` is text with a control-token string in it."""
        return isinstance(value, str) and self._pattern is not None and self._pattern.search(value) is not None

    def found_in(self, text: str) -> list[str]:
        """The control-token strings in `text`, each once, in the order they first appear."""
        if self._pattern is None or not self._pattern.search(text):
            return []
        return list(dict.fromkeys(self._pattern.findall(text)))

    def spans(self, text: str) -> list[tuple[int, int]]:
        """Where control-token strings are in `text`."""
        return [m.span() for m in self._pattern.finditer(text)] if self._pattern is not None else []

    def masked(self, text: str, mask: Any) -> str:
        """`text` with each control-token string replaced by `mask(match)`."""
        if self._pattern is None or not self._pattern.search(text):
            return text
        return self._pattern.sub(mask, text)

    def literal(self) -> Any:
        """A copy of the tokenizer's backend that reads control-token strings as text. A copy of its own: the
        tokenizer's `split_special_tokens` switches a flag on the backend it shares with every other caller."""
        if self._literal is None:
            literal = copy.deepcopy(self._backend)
            literal.encode_special_tokens = True
            literal.no_truncation()
            literal.no_padding()
            self._literal = literal
        return self._literal

    def guard(self, text: str, ids: list[int], offsets: list[tuple[int, int]],
              forged: list[tuple[int, int]]) -> tuple[list[int], list[tuple[int, int]]] | None:
        """`text`'s ids and offsets (from the tokenizer) with each control token that overlaps a forged span
        replaced by the tokens of its text; None when there is none to replace.

        The text is cut at the control tokens that remain, as the tokenizer cuts it; a piece between two of them
        that held a forged one is tokenized again, as text, and every other piece keeps its tokens."""
        controls = [i for i, token in enumerate(ids) if token in self.ids]
        overlaps = trained_mask([offsets[i] for i in controls], forged)
        if not any(overlaps):
            return None
        forged_at = [i for i, overlap in zip(controls, overlaps) if overlap]  # sorted
        kept = [i for i, overlap in zip(controls, overlaps) if not overlap]
        new_ids: list[int] = []
        new_offsets: list[tuple[int, int]] = []
        for before, after in zip([-1, *kept], [*kept, len(ids)]):
            if bisect.bisect_left(forged_at, after) > bisect.bisect_right(forged_at, before):
                start = offsets[before][1] if before >= 0 else 0
                end = offsets[after][0] if after < len(ids) else len(text)
                encoding = self.literal().encode(text[start:end], add_special_tokens=False)
                new_ids += encoding.ids
                new_offsets += [(a + start, b + start) for a, b in encoding.offsets]
            else:
                new_ids += ids[before + 1:after]
                new_offsets += offsets[before + 1:after]
            if after < len(ids):
                new_ids.append(ids[after])
                new_offsets.append(offsets[after])
        return new_ids, new_offsets


_control_tokens: weakref.WeakKeyDictionary[Any, tuple[int, ControlTokens]] = weakref.WeakKeyDictionary()


def control_tokens(tokenizer: Any) -> ControlTokens:
    """The tokenizer's `ControlTokens`, made once per tokenizer (and again when tokens were added to it)."""
    size = len(tokenizer)
    try:
        cached = _control_tokens.get(tokenizer)
    except TypeError:  # a tokenizer that cannot be weakly referenced
        return ControlTokens(tokenizer)
    if cached is None or cached[0] != size:
        cached = (size, ControlTokens(tokenizer))
        _control_tokens[tokenizer] = cached
    return cached[1]


def _control_placeholder(index: int) -> str:
    # Private-use characters, other than `_placeholder`'s: a conversation's content may be rendered as those.
    return f"\ue002{index}\ue003"


_CONTROL_PLACEHOLDER = re.compile("\ue002([0-9]{1,9})\ue003")


def forged_spans(tokenizer: Any, messages: list[dict[str, Any]], full: str, add_generation_prompt: bool = False,
                 control: ControlTokens | None = None) -> list[tuple[int, int]]:
    """Where the messages' own text put control-token strings into `full` (their render), sorted; [] when none.

    Found by rendering the conversation again with a placeholder for each such string in a message (any text field
    but the role, which checks and the chat allow only from a fixed set): every control token left is the
    template's. A template that does not write the strings as they are cannot be told apart from its own tokens,
    and is refused (TemplateError)."""
    control = control or control_tokens(tokenizer)
    if not any(control.holds(value) for message in messages if isinstance(message, dict)
               for key, value in message.items() if key != "role"):
        return []
    strings: list[str] = []

    def mask(match: re.Match) -> str:
        strings.append(match.group())
        return _control_placeholder(len(strings) - 1)

    masked = [{key: control.masked(value, mask) if key != "role" and isinstance(value, str) else value
               for key, value in message.items()} if isinstance(message, dict) else message
              for message in messages]
    if not strings:
        return []
    text = render_chat(tokenizer, masked, add_generation_prompt)
    spans, pieces, cursor, shift = [], [], 0, 0
    for match in _CONTROL_PLACEHOLDER.finditer(text):
        index = int(match.group(1))
        if index >= len(strings):
            break
        start = match.start() + shift
        spans.append((start, start + len(strings[index])))
        pieces += [text[cursor:match.start()], strings[index]]
        shift += len(strings[index]) - len(match.group())
        cursor = match.end()
    else:
        pieces.append(text[cursor:])
        if "".join(pieces) == full:
            return spans
    raise TemplateError(f"a message holds {strings[0]!r}, one of this model's control tokens, and the model's chat "
                        "template does not write messages exactly as they are, so it cannot be kept apart from the "
                        "template's own; remove it from the message")


def prompt_ids(tokenizer: Any, messages: list[dict[str, Any]]) -> list[int]:
    """The token ids a model continues to answer `messages`: their render with the generation prompt, control-token
    strings in the messages tokenized as text."""
    text = render_chat(tokenizer, messages, add_generation_prompt=True)
    forged = forged_spans(tokenizer, messages, text, add_generation_prompt=True)
    if not forged:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return _tokenize(tokenizer, text, forged)[0]


def trained_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """Whether each token overlaps a reply span: the one rule for which tokens a reply trains. A token overlaps a
    span when it starts before the span ends and ends after the span starts, so a token that merges the template's
    space with the reply's first word is trained: it still has to be predicted to produce the reply.

    The spans are sorted and do not overlap (each starts at or after the previous one's end), so their ends
    are sorted too: one binary search per token finds the only span that can overlap it.
    """
    span_ends = [end for _, end in spans]
    trained = []
    for start, end in offsets:
        index = bisect.bisect_right(span_ends, start)  # the first span ending after the token starts
        trained.append(index < len(spans) and spans[index][0] < end)
    return trained


def trained_token_ranges(spans: list[tuple[int, int]], n_tokens: int, token_chars: Callable[[int], tuple[int, int]],
                         char_token: Callable[[int], int | None]) -> Iterator[tuple[int, int]]:
    """The tokens `trained_mask` marks, as the (first, last) token overlapping each span (sorted, apart), for tokens
    in text order (a tokenizer's), whose starts and ends are then sorted: the first token that ends after the span
    starts and the last that starts before it ends. Found without reading every token's offsets: from the token
    holding the span's first (last) character, `char_token`, and its neighbours that still overlap the span (the
    bytes of one emoji are several tokens); by binary search over `token_chars` (a token's (start, end)) where no
    token holds that character (a space the tokenizer trimmed). The ranges of two spans may touch or share a token.
    """
    tokens = range(n_tokens)
    for start, end in spans:
        first = char_token(start)
        if first is None:
            first = bisect.bisect_right(tokens, start, key=lambda token: token_chars(token)[1])
        while first > 0 and token_chars(first - 1)[1] > start:
            first -= 1
        last = char_token(end - 1)
        if last is None:
            last = bisect.bisect_left(tokens, end, key=lambda token: token_chars(token)[0]) - 1
        while last + 1 < n_tokens and token_chars(last + 1)[0] < end:
            last += 1
        if first <= last:
            yield first, last


def render_conversation(tokenizer: Any, messages: list[dict[str, Any]], by_prefixes: bool = False) -> Rendered:
    """Render and mask a conversation. `by_prefixes` forces the quadratic method that renders every prefix (the
    linear one falls back to it by itself; tests compare the two)."""
    full = render_chat(tokenizer, messages)
    layout = None if by_prefixes else _block_layout(tokenizer, messages, full)
    spans = _layout_spans(layout, messages, full) if layout else None
    if spans is None:
        layout = None
        spans = assistant_spans(tokenizer, messages, full)
    input_ids, offsets = _tokenize(tokenizer, full, forged_spans(tokenizer, messages, full))
    segments = (_segments(messages, full, layout.prefix_ends, _inserted_system_end(tokenizer, messages, full))
                if layout else _role_segments(tokenizer, messages, full))
    return Rendered(full, input_ids, offsets, trained_mask(offsets, spans), segments)


def render_text(tokenizer: Any, text: str, ends_document: bool = True) -> Rendered:
    """Language-model data: every token is trained, and an end-of-sequence token closes the document (not a piece
    of a longer document split at the maximum length, which the next piece continues). The text is data: a
    control-token string in it is tokenized as text."""
    input_ids, offsets = _tokenize(tokenizer, text, control_tokens(tokenizer).spans(text))
    if ends_document and tokenizer.eos_token_id is not None:
        input_ids.append(tokenizer.eos_token_id)
        offsets.append((len(text), len(text)))
    return Rendered(text, input_ids, offsets, [True] * len(input_ids), [(0, len(text), "text")])


def render_example(tokenizer: Any, example: Any) -> Rendered:
    """Render a `formats.Example` (chat messages or plain text)."""
    if example.messages is not None:
        return render_conversation(tokenizer, example.messages)
    return render_text(tokenizer, example.text, getattr(example, "ends_document", True))


# ------------------------------------------------------------------------------------ many examples at once


@dataclass
class _Marked:
    """How the template lays out one shape of conversation (its roles and every field but the contents), found once
    by rendering it with placeholders for the contents, and reused for every conversation of that shape.

    `pieces` is the text between the placeholders (len(messages) + 1 pieces). Positions are in the placeholder
    text: `prefix_ends[k]` where the first k+1 messages rendered alone end (None: not a prefix of the whole),
    `replies[i]` the (start, end) of trained reply i as the prefix method finds it (end before stripping space).
    """

    pieces: list[str]
    prefix_ends: list[int | None]
    replies: dict[int, tuple[int, int]]
    system_end: int = 0  # a system turn the template inserted before the first message ends here


class Renderer:
    """Renders many examples for one tokenizer: one template render per conversation, the tokenizer once per batch.

    A conversation whose text is exactly its shape's placeholder render with the contents put in (checked for
    every conversation, in linear time) takes its prefix ends and reply spans from that render: the answer the
    prefix method gives (`render_conversation`), without rendering a prefix. The first conversations of each shape
    are also rendered the single-example way and compared, and any difference, or any conversation that does not
    fit, goes the single-example way: the result is always `render_example`'s.
    """

    VERIFY_FIRST = 2
    MAX_SHAPES = 4096
    # Learning a shape renders each of its prefixes (quadratic in its length): worth it for the short shapes that
    # repeat over a dataset; a longer conversation takes the linear single-example way (`_block_layout`).
    MAX_SHAPE_MESSAGES = 16

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.control = control_tokens(tokenizer)
        self._shapes: dict[str, _Marked | None] = {}
        self._verified: dict[str, int] = {}

    # --- one conversation: text, trained spans, role segments

    def _shape(self, messages: list[dict[str, Any]]) -> tuple[str, _Marked | None] | None:
        if len(messages) > self.MAX_SHAPE_MESSAGES or not all(
                isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
            return None
        if all(len(m) == 2 for m in messages):  # role and content only: the roles are the shape
            key = "\n".join(str(m.get("role")) for m in messages)
        else:
            try:
                key = json.dumps([{k: v for k, v in m.items() if k != "content"} for m in messages], sort_keys=True)
            except (TypeError, ValueError):
                return None
        if key not in self._shapes:
            if len(self._shapes) >= self.MAX_SHAPES:
                self._shapes.clear()
                self._verified.clear()
            self._shapes[key] = _marked_layout(self.tokenizer, messages)
        return key, self._shapes[key]

    def layout(self, messages: list[dict[str, Any]]) -> tuple[str, list[tuple[int, int]], list[tuple[int, int, str]]]:
        """(text, trained spans, segments) of a conversation; raises TemplateError as render_conversation does."""
        full = render_chat(self.tokenizer, messages)
        shape = self._shape(messages)
        fast = _apply_marked(shape[1], messages, full) if shape and shape[1] else None
        if fast is not None and self._verified.get(shape[0], 0) < self.VERIFY_FIRST:
            self._verified[shape[0]] = self._verified.get(shape[0], 0) + 1
            try:
                slow = _slow_layout(self.tokenizer, messages, full)
            except TemplateError:
                self._shapes[shape[0]] = None
                raise
            if fast != slow:
                self._shapes[shape[0]] = None  # this template's layout depends on more than the shape
                fast = None
        if fast is not None:
            return (full, *fast)
        return (full, *_slow_layout(self.tokenizer, messages, full))

    def _prepare(self, example: Any) -> tuple[str, list[tuple[int, int]] | None, list[tuple[int, int, str]], bool,
                                              list[tuple[int, int]]]:
        """(text, trained spans or None for every token, segments, add EOS, forged spans) for an example: the forged
        spans are where its own text wrote control-token strings (`forged_spans`), tokenized as text."""
        if example.messages is not None:
            text, spans, segments = self.layout(example.messages)
            forged = forged_spans(self.tokenizer, example.messages, text, control=self.control)
            return text, spans, segments, False, forged
        text = example.text
        ends = getattr(example, "ends_document", True) and self.tokenizer.eos_token_id is not None
        return text, None, [(0, len(text), "text")], ends, self.control.spans(text)

    def control_strings(self, example: Any) -> list[tuple[int | None, list[str]]]:
        """(message number from 1, or None for plain text; the control-token strings it holds) for each part of the
        example that holds any: what the check warns about."""
        if example.messages is None:
            found = self.control.found_in(example.text) if isinstance(example.text, str) else []
            return [(None, found)] if found else []
        holding = []
        for number, message in enumerate(example.messages, start=1):
            found = [string for key, value in message.items() if key != "role" and isinstance(value, str)
                     for string in self.control.found_in(value)] if isinstance(message, dict) else []
            if found:
                holding.append((number, list(dict.fromkeys(found))))
        return holding

    def _prepare_all(self, examples: list[Any]) -> list[Any]:
        prepared: list[Any] = []
        for example in examples:
            try:
                prepared.append(self._prepare(example))
            except TemplateError as err:
                prepared.append(err)
        return prepared

    def _encode(self, texts: list[str]) -> Any:
        if not getattr(self.tokenizer, "is_fast", True):
            raise TemplateError("this tokenizer has no character offsets (not a 'fast' tokenizer); pick another model")
        return self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)

    def measure_many(self, examples: list[Any], keep_tokens: bool = False
                     ) -> list[tuple[int, int] | Tokens | TemplateError]:
        """(tokens, trained tokens) of each example as `render_example` would give them (or its TemplateError);
        with `keep_tokens`, its `Tokens` instead."""
        return next(self.measure_batches([examples], keep_tokens))[1]

    def measure_batches(self, batches: Iterable[list[Any]], keep_tokens: bool = False
                        ) -> Iterator[tuple[list[Any], list[tuple[int, int] | Tokens | TemplateError]]]:
        """(batch, its measures) for each batch, in order: as `measure_many` gives them. The tokenizer (Rust,
        which lets go of Python's lock) encodes one batch in a thread while this thread renders the next, so the
        two overlap on two cores."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = None
            for batch in batches:
                prepared = self._prepare_all(batch)
                texts = [p[0] for p in prepared if not isinstance(p, TemplateError)]
                started = (batch, prepared, pool.submit(self._encodings, texts) if texts else None, keep_tokens)
                if pending is not None:
                    yield self._measured(*pending)
                pending = started
            if pending is not None:
                yield self._measured(*pending)

    def _encodings(self, texts: list[str]) -> list[Any]:
        """The backend's encodings, without converting every token's offsets to Python objects. The tokenizer's
        own call is made once first, so that the backend is set up exactly as that call sets it up."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None or not getattr(self.tokenizer, "is_fast", True):
            raise TemplateError("this tokenizer has no character offsets (not a 'fast' tokenizer); pick another model")
        self.tokenizer(texts[:1], add_special_tokens=False)
        if backend.truncation is not None or backend.padding is not None:
            return self._encode(texts).encodings
        return backend.encode_batch(texts, add_special_tokens=False)

    def _measured(self, batch: list[Any], prepared: list[Any], future: Any, keep_tokens: bool
                  ) -> tuple[list[Any], list[tuple[int, int] | Tokens | TemplateError]]:
        encodings = iter(future.result() if future is not None else [])
        results: list[tuple[int, int] | Tokens | TemplateError] = []
        for item in prepared:
            if isinstance(item, TemplateError):
                results.append(item)
                continue
            text, spans, _, add_eos, forged = item
            encoding = next(encodings)
            guarded = self.control.guard(text, encoding.ids, encoding.offsets, forged) if forged else None
            if guarded is not None:
                results.append(self._guarded_measure(guarded, spans, add_eos, keep_tokens))
                continue
            n_tokens = len(encoding)
            if keep_tokens:
                results.append(self._tokens(encoding, spans, n_tokens, add_eos))
                continue
            trained = n_tokens if spans is None else _trained_count(encoding, spans, n_tokens)
            eos = 1 if add_eos else 0
            results.append((n_tokens + eos, trained + eos))
        return batch, results

    def _guarded_measure(self, guarded: tuple[list[int], list[tuple[int, int]]], spans: list[tuple[int, int]] | None,
                         add_eos: bool, keep_tokens: bool) -> tuple[int, int] | Tokens:
        """`_measured`'s answer for an example whose tokens `ControlTokens.guard` gave (ids and offsets)."""
        ids, offsets = guarded
        trained = bytearray(b"\x01" * len(ids)) if spans is None else bytearray(map(int, trained_mask(offsets, spans)))
        if add_eos:
            ids = [*ids, self.tokenizer.eos_token_id]
            trained.append(1)
        if keep_tokens:
            return Tokens(array("i", ids), bytes(trained))
        return len(ids), trained.count(1)

    def _tokens(self, encoding: Any, spans: list[tuple[int, int]] | None, n_tokens: int, add_eos: bool) -> Tokens:
        ids = array("i", encoding.ids)
        if spans is None:
            trained = bytearray(b"\x01" * n_tokens)
        else:
            trained = bytearray(n_tokens)
            for first, last in trained_token_ranges(spans, n_tokens, encoding.token_to_chars, encoding.char_to_token):
                trained[first:last + 1] = b"\x01" * (last + 1 - first)
        if add_eos:
            ids.append(self.tokenizer.eos_token_id)
            trained.append(1)
        return Tokens(ids, bytes(trained))


def _trained_count(encoding: Any, spans: list[tuple[int, int]], n_tokens: int) -> int:
    """How many tokens overlap any of the spans: `sum(trained_mask(...))`, where a token that overlaps two spans
    counts once; from the encoding's own look-ups instead of every token's offsets."""
    count, counted_to = 0, -1
    for first, last in trained_token_ranges(spans, n_tokens, encoding.token_to_chars, encoding.char_to_token):
        first = max(first, counted_to + 1)
        count += max(0, last - first + 1)
        counted_to = max(counted_to, last)
    return count


def _slow_layout(tokenizer: Any, messages: list[dict[str, Any]],
                 full: str) -> tuple[list[tuple[int, int]], list[tuple[int, int, str]]]:
    """render_conversation's spans and segments for `full` (the linear layout, else every prefix)."""
    layout = _block_layout(tokenizer, messages, full)
    spans = _layout_spans(layout, messages, full) if layout else None
    if spans is None:
        return assistant_spans(tokenizer, messages, full), _role_segments(tokenizer, messages, full)
    return spans, _segments(messages, full, layout.prefix_ends, _inserted_system_end(tokenizer, messages, full))


def _marked_layout(tokenizer: Any, messages: list[dict[str, Any]]) -> _Marked | None:
    """The placeholder render of this conversation's shape, read the way the prefix method reads a real one; None
    when it cannot be (a placeholder written twice or cut by a prefix, a reply the prefix method would have to
    search for, a template error)."""
    marks = [_placeholder(i) for i in range(len(messages))]
    marked = [{**m, "content": mark} for m, mark in zip(messages, marks)]
    try:
        full = render_chat(tokenizer, marked)
        pieces, cursor = [], 0
        for mark in marks:
            at = full.find(mark, cursor)
            if at < 0 or full.count(mark) != 1:
                return None
            pieces.append(full[cursor:at])
            cursor = at + len(mark)
        pieces.append(full[cursor:])
        mark_spans = [(full.index(mark), full.index(mark) + len(mark)) for mark in marks]

        def clean(position: int) -> bool:  # not inside a placeholder
            return not any(start < position < end for start, end in mark_spans)

        prefix_ends: list[int | None] = []
        texts = {}
        for k in range(1, len(messages) + 1):
            text = full if k == len(messages) else render_chat(tokenizer, marked[:k])
            texts[k] = text
            end = len(text) if full.startswith(text) else None
            if end is not None and not clean(end):
                return None
            prefix_ends.append(end)
        replies, cursor = {}, 0
        for i, message in enumerate(messages):
            if not _is_trained_reply(message):
                continue
            through = texts[i + 1]
            if i == 0:
                start = mark_spans[0][0]
                if not full.startswith(through):
                    return None
            else:
                before = render_chat(tokenizer, marked[:i], add_generation_prompt=True)
                if not (full.startswith(through) and through.startswith(before)):
                    return None
                start = len(before)
            if not (clean(start) and clean(len(through))):
                return None
            replies[i] = (start, len(through))
    except TemplateError:
        return None
    return _Marked(pieces, prefix_ends, replies, _inserted_system_end(tokenizer, marked, full))


def _apply_marked(shape: _Marked, messages: list[dict[str, Any]],
                  full: str) -> tuple[list[tuple[int, int]], list[tuple[int, int, str]]] | None:
    """Spans and segments of `full` from its shape's placeholder render; None unless `full` is exactly that render
    with the contents put in, or where the prefix method would search for a reply."""
    # shifts[j]: how far `full` runs ahead of the placeholder text after placeholder j (0: before any).
    position, shifts, shift = 0, [0], 0
    for piece, message, index in zip(shape.pieces, messages, itertools.count()):
        content = message["content"]
        if not full.startswith(piece, position) or not full.startswith(content, position + len(piece)):
            return None
        position += len(piece) + len(content)
        shift += len(content) - len(_placeholder(index))
        shifts.append(shift)
    if len(full) != position + len(shape.pieces[-1]) or not full.endswith(shape.pieces[-1]):
        return None
    # Placeholder-text position -> position in `full`: add the shifts of every placeholder before it.
    mark_ends, cursor = [], 0
    for piece, index in zip(shape.pieces, itertools.count()):
        cursor += len(piece) + len(_placeholder(index))
        mark_ends.append(cursor)
        if index == len(messages) - 1:
            break

    def real(position: int) -> int:
        return position + shifts[bisect.bisect_right(mark_ends, position)]

    # A reply that would start inside the one before: the prefix method would search for it instead.
    spans = _reply_spans(full, ((i, (real(shape.replies[i][0]), real(shape.replies[i][1])))
                                for i in sorted(shape.replies)))
    if spans is None:
        return None
    ends = [None if end is None else real(end) for end in shape.prefix_ends]
    # The inserted system turn lies before the first placeholder, where both texts are the same.
    return spans, _segments(messages, full, ends, shape.system_end)


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


class Piece(NamedTuple):
    """A run of neighbouring tokens that look the same: their text, the role of the message they are in (or
    "text"), and whether they are trained."""

    text: str
    role: str
    trained: bool


def pieces(rendered: Rendered) -> list[Piece]:
    """The rendered text as runs of tokens with one role and one trained flag, in order: what a preview colours
    and highlights (the app draws its preview from these, in ui/)."""
    segment_starts = [start for start, _, _ in rendered.segments]

    def role_at(position: int) -> str:
        index = bisect.bisect_right(segment_starts, position) - 1
        return rendered.segments[index][2] if index >= 0 else "text"

    runs: list[Piece] = []
    cursor = 0
    for (start, end), trained in zip(rendered.offsets, rendered.trained):
        if end <= cursor:
            continue
        start = max(start, cursor)
        if start > cursor:  # text no token covers (rare): show it untrained
            runs.append(Piece(rendered.text[cursor:start], role_at(cursor), False))
        runs.append(Piece(rendered.text[start:end], role_at(start), trained))
        cursor = end
    if cursor < len(rendered.text):
        runs.append(Piece(rendered.text[cursor:], role_at(cursor), False))
    # Joined once per run of equal neighbours: adding text to the last run token by token would copy it each time.
    return [Piece("".join(piece.text for piece in group), role, trained)
            for (role, trained), group in itertools.groupby(runs, key=lambda piece: piece[1:])]
