"""The trained-token mask: exactly the assistant replies plus their end-of-turn token, for any template."""

from pathlib import Path

import pytest

from sft_space import render
from sft_space.formats import Example

LLAMA3_STYLE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
# Gemma-style: no system role; the system text is folded into the first user turn, which breaks the
# "each message is its own prefix" property for the system message.
GEMMA_STYLE = (
    "{{ bos_token }}{% set sys = '' %}{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] + '\n\n' %}"
    "{% set messages = messages[1:] %}{% endif %}{% for m in messages %}"
    "{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "<start_of_turn>{{ role }}\n{% if loop.first %}{{ sys }}{% endif %}{{ m['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
# Rewrites earlier assistant turns (like reasoning templates that drop <think> blocks from history).
REWRITING = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' and not loop.last %}{{ m['content'].split('</think>')[-1] | trim }}"
    "{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CONVERSATIONS = {
    "multi-turn, no system": [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris is the capital of France."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome, a city on the Tiber."},
    ],
    "multi-turn, with system": [
        {"role": "system", "content": "You answer in one sentence."},
        {"role": "user", "content": "Why is the sky blue?"},
        {"role": "assistant", "content": "Air scatters blue light more than red light."},
        {"role": "user", "content": "Is it blue on Mars?"},
        {"role": "assistant", "content": "No, Martian skies are butterscotch by day."},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You are welcome."},
    ],
}


def trained_ids(rendered):
    return [token for token, trained in zip(rendered.input_ids, rendered.trained) if trained]


def expected_ids(tokenizer, messages, end_of_turn):
    end_id = tokenizer.convert_tokens_to_ids(end_of_turn)
    ids = []
    for m in messages:
        if m["role"] == "assistant" and m.get("weight", 1):
            ids += tokenizer(m["content"], add_special_tokens=False)["input_ids"] + [end_id]
    return ids


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_mask_is_assistant_content_plus_end_of_turn_on_embedded_chatml(embedded_tokenizer, name):
    messages = CONVERSATIONS[name]
    rendered = render.render_conversation(embedded_tokenizer, messages)
    assert rendered.text.startswith("<|im_start|>system\n")
    assert trained_ids(rendered) == expected_ids(embedded_tokenizer, messages, "<|im_end|>")
    # Nothing of the prompts, role headers or the system message is trained.
    for start, end in rendered.trained_spans():
        assert "<|im_start|>" not in rendered.text[start:end]


@pytest.mark.parametrize("template", [LLAMA3_STYLE, GEMMA_STYLE, REWRITING], ids=["llama3", "gemma", "rewriting"])
@pytest.mark.parametrize("name", CONVERSATIONS)
def test_mask_works_for_templates_without_generation_markers(embedded_tokenizer, template, name):
    tokenizer = _with_template(embedded_tokenizer, template)
    end_of_turn = {LLAMA3_STYLE: "<|eot_id|>", GEMMA_STYLE: "<end_of_turn>", REWRITING: "<|im_end|>"}[template]
    tokenizer.add_special_tokens({"additional_special_tokens": [end_of_turn, "<|start_header_id|>", "<|end_header_id|>",
                                                                "<start_of_turn>"]})
    rendered = render.render_conversation(tokenizer, CONVERSATIONS[name])
    assert trained_ids(rendered) == expected_ids(tokenizer, CONVERSATIONS[name], end_of_turn)


def test_weight_zero_turn_is_context_not_trained(embedded_tokenizer):
    messages = [dict(m) for m in CONVERSATIONS["multi-turn, no system"]]
    messages[1]["weight"] = 0
    rendered = render.render_conversation(embedded_tokenizer, messages)
    assert "Paris" in rendered.text
    assert trained_ids(rendered) == expected_ids(embedded_tokenizer, messages, "<|im_end|>")
    assert "Paris" not in render.to_marked_text(rendered).split("⟦", 1)[1].split("⟧")[0]


def test_template_less_tokenizer_gets_chatml(embedded_tokenizer):
    tokenizer = _with_template(embedded_tokenizer, None)
    assert render.ensure_chat_template(tokenizer) == []  # SmolLM's vocabulary already has the ChatML tokens
    assert tokenizer.chat_template == render.CHATML_TEMPLATE
    assert tokenizer.eos_token == "<|im_end|>"
    rendered = render.render_conversation(tokenizer, CONVERSATIONS["multi-turn, no system"])
    assert rendered.text.startswith("<|im_start|>user\nWhat is the capital")
    assert trained_ids(rendered) == expected_ids(tokenizer, CONVERSATIONS["multi-turn, no system"], "<|im_end|>")


def test_plain_text_trains_every_token_and_ends_with_eos(embedded_tokenizer):
    rendered = render.render_example(embedded_tokenizer, Example(1, "text", text="Once upon a time."))
    assert all(rendered.trained)
    assert rendered.input_ids[-1] == embedded_tokenizer.eos_token_id


def test_pieces_say_which_text_is_trained_and_whose_it_is(embedded_tokenizer):
    rendered = render.render_conversation(embedded_tokenizer, [
        {"role": "user", "content": "Say <b>hi</b> & bye"},
        {"role": "assistant", "content": "hi & bye"},
    ])
    pieces = render.pieces(rendered)
    assert "".join(piece.text for piece in pieces) == rendered.text
    assert "".join(piece.text for piece in pieces if piece.trained) == "hi & bye<|im_end|>"
    assert {piece.role for piece in pieces if piece.trained} == {"assistant"}
    assert any(piece.role == "user" and "Say <b>hi</b> & bye" in piece.text for piece in pieces)
    # Neighbours with the same role and flag are one piece.
    assert all((a.role, a.trained) != (b.role, b.trained) for a, b in zip(pieces, pieces[1:]))


def test_render_writes_no_html():
    """The core says what is trained and whose text it is; drawing it as HTML is the app's (ui/chatml_html.py)."""
    source = Path(render.__file__).read_text(encoding="utf-8")
    assert "import html" not in source
    assert not any(tag in source for tag in ("<span", "<mark", "<div", "<pre", "style="))


def _with_template(tokenizer, template):
    import copy

    clone = copy.deepcopy(tokenizer)
    clone.chat_template = template
    return clone


# ------------------------------------------------------------- the linear layout gives the prefix method's answer

U, A = "user", "assistant"
EQUIVALENCE = {
    **CONVERSATIONS,
    "one pair": [{"role": U, "content": "Hi"}, {"role": A, "content": "Hello!"}],
    "weight 0 turns": [{"role": U, "content": "a"}, {"role": A, "content": "b", "weight": 0},
                       {"role": U, "content": "c"}, {"role": A, "content": "d"},
                       {"role": U, "content": "e"}, {"role": A, "content": "f", "weight": 0},
                       {"role": U, "content": "g"}, {"role": A, "content": "h"}],
    "tool turns": [{"role": "system", "content": "Use tools."}, {"role": U, "content": "Weather?"},
                   {"role": A, "content": '{"name": "weather"}'}, {"role": "tool", "content": "sunny, 21 °C"},
                   {"role": "tool", "content": "wind 3 m/s"}, {"role": A, "content": "Sunny and calm."}],
    "unicode": [{"role": U, "content": "Wie heißt 東京 auf Ελληνικά? 🙂"},
                {"role": A, "content": "Τόκιο — 東京 🗼\u200d"}, {"role": U, "content": "Danke ✓"},
                {"role": A, "content": "Bitte schön."}],
    "identical contents": [{"role": U, "content": "same"}, {"role": A, "content": "same"},
                           {"role": U, "content": "same"}, {"role": A, "content": "same"}],
    "contents that look like the template": [
        {"role": U, "content": "<|im_end|>\n<|im_start|>assistant\nfake"},
        {"role": A, "content": "<|im_start|>user\nnot a turn<|im_end|>"}],
    "whitespace around contents": [{"role": U, "content": "  padded\n"}, {"role": A, "content": "\n reply \n\n"},
                                   {"role": U, "content": "\t"}, {"role": A, "content": " ok"}],
    "two user turns": [{"role": U, "content": "Hello?"}, {"role": U, "content": "Anyone?"},
                       {"role": A, "content": "Here."}],
    "ends with a weight 0 reply": [{"role": U, "content": "x"}, {"role": A, "content": "y"},
                                   {"role": U, "content": "z"}, {"role": A, "content": "w", "weight": 0}],
    "reasoning in an earlier turn": [{"role": U, "content": "2+2?"}, {"role": A, "content": "<think>add</think>4"},
                                     {"role": U, "content": "3+3?"}, {"role": A, "content": "<think>add</think>6"}],
}
TEMPLATES = {"embedded": None, "chatml": render.CHATML_TEMPLATE, "llama3": LLAMA3_STYLE, "gemma": GEMMA_STYLE,
             "rewriting": REWRITING}


@pytest.fixture(scope="module")
def tokenizers(embedded_tokenizer):
    made = {"embedded": embedded_tokenizer}
    for name, template in TEMPLATES.items():
        if template is not None:
            made[name] = _with_template(embedded_tokenizer, template)
            made[name].add_special_tokens({"additional_special_tokens": [
                "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<start_of_turn>", "<end_of_turn>"]})
    return made


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("name", EQUIVALENCE)
def test_linear_rendering_equals_rendering_every_prefix(tokenizers, template, name):
    tokenizer, messages = tokenizers[template], EQUIVALENCE[name]
    try:
        expected = render.render_conversation(tokenizer, messages, by_prefixes=True)
    except render.TemplateError as err:
        with pytest.raises(render.TemplateError, match=str(err)[:40]):
            render.render_conversation(tokenizer, messages)
        return
    assert render.render_conversation(tokenizer, messages) == expected  # text, ids, offsets, mask and segments


@pytest.mark.parametrize("name", [n for n in EQUIVALENCE if n not in ("two user turns",)])
def test_the_linear_layout_is_used_for_chatml(embedded_tokenizer, name):
    """Not a vacuous comparison above: for the embedded ChatML template the linear path is the one taken."""
    messages = EQUIVALENCE[name]
    full = render.render_chat(embedded_tokenizer, messages)
    layout = render._block_layout(embedded_tokenizer, messages, full)
    assert layout is not None and render._layout_spans(layout, messages, full) is not None


@pytest.mark.parametrize("template, name", [
    ("rewriting", "reasoning in an earlier turn"),  # rewrites an earlier reply
    ("llama3", "whitespace around contents"),  # trims contents
    ("gemma", "multi-turn, with system"),  # folds the system message into the first user turn
])
def test_templates_that_break_the_layout_fall_back_to_every_prefix(tokenizers, template, name):
    tokenizer, messages = tokenizers[template], EQUIVALENCE[name]
    assert render._block_layout(tokenizer, messages, render.render_chat(tokenizer, messages)) is None


def test_the_mask_equals_checking_every_span_for_every_token():
    import random

    rng = random.Random(0)
    for _ in range(300):
        cuts = sorted(rng.sample(range(200), 2 * rng.randint(0, 6)))
        spans = [(cuts[i], cuts[i + 1]) for i in range(0, len(cuts), 2) if cuts[i + 1] > cuts[i]]
        offsets = []
        for _ in range(rng.randint(0, 60)):
            start = rng.randint(0, 210)
            offsets.append((start, start + rng.randint(0, 5)))
        reference = [any(s < span_end and e > span_start for span_start, span_end in spans) for s, e in offsets]
        assert render.trained_mask(offsets, spans) == reference


def _turns(n):
    return [{"role": role, "content": f"{role} turn {i}"} for i in range(n // 2) for role in ("user", "assistant")]


def test_rendering_time_grows_linearly_with_the_turns(embedded_tokenizer):
    """A conversation is rendered once, not prefix by prefix: rendering every prefix makes time grow with the
    square of the turns (4,000 short turns: over a minute)."""
    import time

    # This process's CPU time, not the wall clock: on a machine busy with other tests (two or more workers on two
    # cores) the wall clock counts the time spent waiting for a core, and the ratio below failed.
    def seconds(n):
        messages = _turns(n)
        start = time.process_time()
        rendered = render.render_conversation(embedded_tokenizer, messages)
        took = time.process_time() - start
        assert len(rendered.segments) == n + 1  # one per turn, after SmolLM's default system message
        return took

    seconds(200)  # warm up the template cache
    small, large = min(seconds(2000) for _ in range(2)), min(seconds(4000) for _ in range(2))
    assert large < 3.0, f"{large:.2f} s for 4,000 turns"
    assert large < 2.5 * small + 0.05, f"{small:.3f} s for 2,000 turns, {large:.3f} s for 4,000"


def test_pieces_of_a_long_example_take_linear_time(embedded_tokenizer):
    """Neighbouring tokens are merged in one join: adding to a string token by token takes 2.4 s for 200,000."""
    import time

    rendered = render.render_text(embedded_tokenizer, "wave " * 200_000)
    start = time.process_time()  # CPU time: waiting for a busy machine does not count (see above)
    pieces = render.pieces(rendered)
    assert time.process_time() - start < 1.0
    assert "".join(piece.text for piece in pieces).count("wave") == 200_000


# ------------------------------------------------------------------- many examples at once (what the check uses)


@pytest.mark.parametrize("template", TEMPLATES)
def test_rendering_many_at_once_equals_rendering_each(tokenizers, template):
    """One template render per conversation and one tokenizer call per batch give render_example's answer."""
    tokenizer = tokenizers[template]
    names = list(EQUIVALENCE)
    # Each conversation twice over (the second time its shape's layout is reused, not verified), plus text.
    examples = [Example(i, "openai", messages=EQUIVALENCE[n]) for i, n in enumerate(names * 4)]
    examples += [Example(0, "text", text="Once upon a time."), Example(0, "text", text="A piece.", ends_document=False)]
    expected = []
    for example in examples:
        try:
            expected.append(render.render_example(tokenizer, example))
        except render.TemplateError as err:
            expected.append(str(err))
    measured = render.Renderer(tokenizer).measure_many(examples)
    assert [m if isinstance(m, tuple) else str(m) for m in measured] == [
        e if isinstance(e, str) else (e.n_tokens, e.n_trained) for e in expected]
    # What the check keeps for training is exactly what render_example gives (ids and mask, token by token).
    kept = render.Renderer(tokenizer).measure_many(examples, keep_tokens=True)
    assert [(list(k.ids), [bool(b) for b in k.trained]) if isinstance(k, render.Tokens) else str(k)
            for k in kept] == [e if isinstance(e, str) else (e.input_ids, e.trained) for e in expected]


def test_an_opening_assistant_turn_is_trained_when_the_template_allows_it(embedded_tokenizer):
    """No prompt is rendered for an empty history, which templates refuse ('Cannot apply chat template to an empty
    conversation')."""
    messages = [{"role": "assistant", "content": "Welcome aboard!"}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Ahoy."}]
    rendered = render.render_conversation(embedded_tokenizer, messages)
    assert trained_ids(rendered) == expected_ids(embedded_tokenizer, messages, "<|im_end|>")
    kept = render.Renderer(embedded_tokenizer).measure_many([Example(1, "openai", messages=messages)], keep_tokens=True)
    assert (list(kept[0].ids), [bool(on) for on in kept[0].trained]) == (rendered.input_ids, rendered.trained)


def test_a_text_piece_that_does_not_end_the_document_has_no_eos(embedded_tokenizer):
    rendered = render.render_example(embedded_tokenizer, Example(1, "text", text="Once upon", ends_document=False))
    assert rendered.input_ids[-1] != embedded_tokenizer.eos_token_id and all(rendered.trained)


def test_counting_overlapping_tokens_equals_the_mask_on_any_text(embedded_tokenizer):
    """measure_many counts trained tokens from a few look-ups per span; trained_mask checks every token."""
    import random

    rng = random.Random(1)
    alphabet = ["a", "b", " ", "  ", "\n", "é", "東", "🙂", "🗼\u200d", "<|im_end|>", "12", "."]
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
        encoding = embedded_tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, 2 * rng.randint(1, 3))))
        spans = [(cuts[i], cuts[i + 1]) for i in range(0, len(cuts) - 1, 2) if cuts[i + 1] > cuts[i]]
        mask = render.trained_mask(encoding.offsets, spans)
        counted = render._trained_count(encoding, spans, len(encoding))
        assert counted == sum(mask), (text, spans)
        kept = render.Renderer(embedded_tokenizer)._tokens(encoding, spans, len(encoding), add_eos=False)
        assert [bool(b) for b in kept.trained] == mask and list(kept.ids) == encoding.ids, (text, spans)


def test_the_check_learns_each_shape_once_for_the_embedded_template(embedded_tokenizer):
    """Not a vacuous comparison above: conversations of one shape take the one-render way."""
    renderer = render.Renderer(embedded_tokenizer)
    examples = [Example(i, "openai", messages=[{"role": U, "content": f"q{i}"}, {"role": A, "content": f"a{i}"}])
                for i in range(20)]
    expected = [render.render_example(embedded_tokenizer, e) for e in examples]
    assert renderer.measure_many(examples) == [(r.n_tokens, r.n_trained) for r in expected]
    assert list(renderer._shapes.values()) != [None] and len(renderer._shapes) == 1


# --------------------------------------------------------------- roles of the text the template writes by itself

# What a template writes before the first message when the conversation has no system message.
DEFAULT_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
QWEN_STYLE = (  # a default system message, as Qwen2.5's template writes it
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are Qwen, a helpful assistant.<|im_end|>\n"
    "{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA31_STYLE = (  # a system turn always, with dates before any system content (Llama 3.1's template)
    "{{ bos_token }}<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n\n"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{% set messages = messages[1:] %}"
    "{% endif %}<|eot_id|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def _role_texts(rendered):
    return [(role, rendered.text[start:end]) for start, end, role in rendered.segments]


def test_the_default_system_message_the_template_inserts_is_coloured_as_system(embedded_tokenizer):
    """SmolLM2's own system message, which its template writes when the data has none, is a system piece (purple, as
    the legend says), not part of the first user turn."""
    messages = CONVERSATIONS["multi-turn, no system"]
    rendered = render.render_conversation(embedded_tokenizer, messages)
    roles = _role_texts(rendered)
    assert roles[0] == ("system", DEFAULT_SYSTEM)
    assert roles[1] == ("user", "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n")
    assert [role for role, _ in roles] == ["system", "user", "assistant", "user", "assistant"]
    # Every way of rendering agrees: every prefix, and (in what it trains) the check's one render per shape, learned
    # then reused.
    assert render.render_conversation(embedded_tokenizer, messages, by_prefixes=True).segments == rendered.segments
    examples = [Example(i, "openai", messages=messages) for i in range(4)]
    kept = render.Renderer(embedded_tokenizer).measure_many(examples, keep_tokens=True)
    assert [[bool(on) for on in tokens.trained] for tokens in kept] == [rendered.trained] * 4
    assert [piece.role for piece in render.pieces(rendered) if "You are a helpful AI assistant" in piece.text] \
        == ["system"]
    # A system message of the data's own is one segment, as before: the template inserts nothing then.
    with_system = render.render_conversation(embedded_tokenizer, CONVERSATIONS["multi-turn, with system"])
    assert [role for role, _ in _role_texts(with_system)][:2] == ["system", "user"]
    assert "SmolLM" not in with_system.text


@pytest.mark.parametrize("template, inserted", [
    (QWEN_STYLE, "<|im_start|>system\nYou are Qwen, a helpful assistant.<|im_end|>\n"),
    (LLAMA31_STYLE, "<|im_start|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December "
                    "2023\n\n<|eot_id|>"),
    (render.CHATML_TEMPLATE, None),  # nothing inserted
    (LLAMA3_STYLE, None),  # only a BOS token before the first turn: it stays with that turn, as with a system one
    (GEMMA_STYLE, None),  # no system turn of its own (it folds a system message into the first user turn)
], ids=["qwen", "llama3.1", "chatml", "llama3", "gemma"])
def test_text_a_template_inserts_before_the_first_message_gets_its_real_role(tokenizers, template, inserted):
    tokenizer = _with_template(tokenizers["chatml"], template)
    assert tokenizer.bos_token == "<|im_start|>"  # the embedded tokenizer's, written by {{ bos_token }}
    for messages in (EQUIVALENCE["one pair"], EQUIVALENCE["multi-turn, no system"]):
        rendered = render.render_conversation(tokenizer, messages)
        roles = _role_texts(rendered)
        if inserted is None:
            assert roles[0][0] == "user" and len(roles) == len(messages)
        else:
            assert roles[0] == ("system", inserted) and roles[1][0] == "user" and len(roles) == len(messages) + 1
            assert roles[1][1].endswith(f"{messages[0]['content']}<|eot_id|>" if "eot" in inserted
                                        else f"{messages[0]['content']}<|im_end|>\n")
        assert render.render_conversation(tokenizer, messages, by_prefixes=True).segments == rendered.segments
        kept = render.Renderer(tokenizer).measure_many([Example(i, "openai", messages=messages) for i in range(3)],
                                                       keep_tokens=True)
        assert [[bool(on) for on in tokens.trained] for tokens in kept] == [rendered.trained] * 3
