"""The trained-token mask: exactly the assistant replies plus their end-of-turn token, for any template."""

import pytest

from sft_space import render
from sft_space.data import Example

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


def test_html_highlights_trained_tokens_and_colours_roles(embedded_tokenizer):
    rendered = render.render_conversation(embedded_tokenizer, [
        {"role": "user", "content": "Say <b>hi</b> & bye"},
        {"role": "assistant", "content": "hi & bye"},
    ])
    page = render.to_html(rendered)
    marked = [piece.split(">", 1)[1] for piece in page.split("<mark class=\"sft-trained\"")[1:]]
    assert "".join(m.split("</mark>")[0] for m in marked) == "hi &amp; bye&lt;|im_end|&gt;"
    assert "Say &lt;b&gt;hi&lt;/b&gt; &amp; bye" in page  # user text escaped, never interpreted
    assert f"color:{render.ROLE_COLOURS['user']}" in page
    assert f"{rendered.n_tokens} tokens, {rendered.n_trained} trained" in page


def _with_template(tokenizer, template):
    import copy

    clone = copy.deepcopy(tokenizer)
    clone.chat_template = template
    return clone
