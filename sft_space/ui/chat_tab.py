"""Chat tab: the fine-tuned model and its base side by side, from one copy of the weights.

Generation is wrapped with `spaces.GPU`, so on ZeroGPU hardware a GPU is attached for each reply; elsewhere
the decorator does nothing.
"""

from __future__ import annotations

import random
from typing import Any, Iterator, NamedTuple

import gradio as gr
import spaces

from .. import access, card, chat, formats, isolation, runs
from ..chat import chat_models
from ..errors import UserError
from ..settings import GenerationSettings, field_help
from .common import Gate, RunPicker, adapter_run_choices, keep_choice, own_run

BASE_ONLY = "(base model only)"
# Each chat's label and toolbar icons float over the top of its message list, so a question scrolled up (or the
# first one, under a wide toolbar) slid beneath them and was cut off. The list starts below them instead. Gradio
# takes page CSS only at launch; a style element in the tab keeps the fix with the tab it fixes.
CHAT_CSS = """
#chat-tuned [role=log], #chat-base [role=log] { margin-top: 36px; height: calc(100% - 36px); }
#chat-style { display: none; }
"""
NO_RUN_CHOSEN = "No fine-tuned run chosen: pick one under *Chat with* to compare."
# Slider steps: the ranges and defaults are GenerationSettings'.
SLIDER_STEPS = {"temperature": 0.05, "top_p": 0.05, "max_new_tokens": 1, "compare_max_new_tokens": 1}
# A chat's history comes back from the page, where any client can write anything into it. What the chats here
# write: the user's and the model's turns, as text, at most this many of them per chat (a system prompt has its
# own box). The tokens of the whole prompt are bounded too (GenerationSettings.max_prompt_tokens).
HISTORY_ROLES = ("user", "assistant")
MAX_HISTORY_MESSAGES = 100
MAX_MESSAGE_PARTS = 8
# Replies on the shared hardware at once, whoever asks: a reply takes every core of a CPU Space or a share of the
# GPU's memory, and one page could otherwise start as many as the queue's default lets it.
CHAT_CONCURRENCY = 2


def run_choices(runs_dir: str, visitor: str | None) -> list[tuple[str, str]]:
    """The visitor's runs that have an adapter to chat with, newest first, then the base model alone."""
    return adapter_run_choices(runs_dir, visitor) + [(BASE_ONLY, BASE_ONLY)]


def own_run_dir(runs_dir: str, run_dir: str | None, visitor: str | None) -> str | None:
    """The chosen run's folder, checked to be the visitor's (a page can send any value); None for the base."""
    if not run_dir or run_dir == BASE_ONLY:
        return None
    return str(own_run(runs_dir, run_dir, visitor).path)


def suggestion(runs_dir: str, run_dir: str | None, visitor: str | None) -> str:
    """A random held-out prompt of the run (what it was not trained on)."""
    run_dir = own_run_dir(runs_dir, run_dir, visitor)
    if run_dir is None:
        return "Tell me something interesting about the sea."
    prompts = [prompt for prompt in runs.RunFolder(run_dir).held_out_prompts() if prompt]
    return random.choice(prompts) if prompts else "Hello! Who are you?"


def message_text(content: Any) -> str:
    """A chat message's text, or UserError when it is not all text: Gradio hands earlier turns back as a list of
    parts ({"type": "text", "text": …}); a file, a component or anything else is not what these chats write."""
    parts = content if isinstance(content, (list, tuple)) else [content]
    if len(parts) > MAX_MESSAGE_PARTS:
        raise UserError(f"A message of this chat has {len(parts):,} parts; the chat writes one. Press Clear to start "
                        "a new chat.")
    texts = []
    for part in parts:
        if isinstance(part, dict) and set(part) <= {"type", "text"} and part.get("type", "text") == "text":
            part = part.get("text")
        if not isinstance(part, str):
            raise UserError(f"A message of this chat holds {formats.shown(part, 40)}, not text; the chat answers text "
                            "only. Press Clear to start a new chat.")
        texts.append(part)
    return "".join(texts)


def page_history(history: Any, chat_name: str) -> list[dict[str, str]]:
    """A chat's history as the page sent it, as messages of text (role and content), or UserError: a list of at most
    MAX_HISTORY_MESSAGES user and assistant turns, each with nothing but its role and text (Gradio's empty
    metadata and options aside)."""
    if history is None:
        return []
    if not isinstance(history, (list, tuple)):
        raise UserError(f"The {chat_name} chat's history is a {formats.type_name(history)}, not a list of messages; "
                        "reload the page.")
    if len(history) > MAX_HISTORY_MESSAGES:
        raise UserError(f"The {chat_name} chat holds {len(history):,} messages, more than the "
                        f"{MAX_HISTORY_MESSAGES} the chat answers; press Clear to start a new one.")
    messages = []
    for number, message in enumerate(history, start=1):
        where = f"Message {number} of the {chat_name} chat"
        if not isinstance(message, dict):
            raise UserError(f"{where} is a {formats.type_name(message)}, not a message; press Clear.")
        extra = [key for key, value in message.items()
                 if key not in ("role", "content") and value not in (None, {}, [])]
        if extra:
            raise UserError(f"{where} carries {formats.shown(extra[0], 40)}, which this chat never writes; "
                            "press Clear.")
        role = message.get("role")
        if not isinstance(role, str) or role not in HISTORY_ROLES:
            raise UserError(f"{where} has the role {formats.shown(role, 40)}; a chat's turns are the user's and the "
                            "assistant's. Press Clear.")
        messages.append({"role": role, "content": message_text(message.get("content"))})
    return messages


def generation_settings(system_prompt: str | None, temperature: float, top_p: float, max_new_tokens: float,
                        compare_max_new_tokens: float | None = None) -> GenerationSettings:
    """The sliders' values as settings (the sliders send numbers as floats), or UserError for values of another
    kind (any client can send anything; the sliders' bounds are Gradio's to enforce)."""
    if system_prompt is not None and not isinstance(system_prompt, str):
        raise UserError("The system prompt is not text; reload the page.")
    try:
        values = {"max_new_tokens": int(max_new_tokens), "temperature": float(temperature), "top_p": float(top_p)}
        if compare_max_new_tokens is not None:
            values["compare_max_new_tokens"] = int(compare_max_new_tokens)
    except (TypeError, ValueError, OverflowError):
        raise UserError("A generation setting is not a number; reload the page.") from None
    return GenerationSettings(**values, system_prompt=system_prompt or "")


def checked_conversation(message: Any, settings: GenerationSettings, tuned_history: Any,
                         base_history: Any) -> tuple[str, list[dict[str, str]], list[dict[str, str]]]:
    """(the message to answer, both chats' histories as messages of text), or UserError: no message, a history
    that is not what the chats write (`page_history`), or a conversation over the characters the app answers.
    Checked before any tokenizer or model is loaded and before `respond`, so a refusal costs nothing and attaches
    no GPU on ZeroGPU."""
    if not isinstance(message, str) or not message.strip():
        raise UserError("Type a message first.")
    message = message.strip()
    tuned, base = page_history(tuned_history, "fine-tuned"), page_history(base_history, "base model's")
    access.check_conversation([message, settings.system_prompt] + [m["content"] for m in tuned + base])
    return message, tuned, base


class Prompts(NamedTuple):
    """The prompt ids of the fine-tuned chat's conversation and of the base model's."""

    tuned: list[int]
    base: list[int]


def conversation_prompts(tokenizer: Any, message: str, tuned: list[dict[str, str]], base: list[dict[str, str]],
                         settings: GenerationSettings) -> Prompts:
    """The prompt ids of both chats with the new message, or UserError when either is over the tokens the app
    answers."""
    return Prompts(*(chat.checked_prompt_ids(tokenizer, [*history, {"role": "user", "content": message}], settings)
                     for history in (tuned, base)))


# What the visitor reads when a chat template the app does not ship needs more than a worker may take.
PROMPT_TASK = isolation.Task("Reading this conversation with the model's chat template",
                             "choose a model the app offers, or one whose chat template is simpler.")


def ships_template(gate: Gate, run_dir: str | None, base_model: str) -> bool:
    """Whether the chat template the chat would run is one the app ships: that of an offered model (a run's is its
    base model's)."""
    if run_dir is not None:
        base_model = card.base_model_of(runs.RunFolder.open(run_dir).read()) or ""
    return base_model in gate.offered_models


def conversation_prompts_bounded(gate: Gate, tokenizer_of: Any, shipped: bool, message: str,
                                 tuned: list[dict[str, str]], base: list[dict[str, str]],
                                 settings: GenerationSettings) -> Prompts:
    """`conversation_prompts` with the tokenizer `tokenizer_of()` gives. A template the app does not ship (a
    stranger's program) runs only in a worker process under the operator's limits (isolation.py): one that loops
    or takes gigabytes is refused there, and the reply is generated from the ids the worker rendered, so the web
    server never runs that template. (The app still loads that tokenizer to decode the reply: the worker has just
    loaded the same files within its limits.)"""
    if shipped:
        return conversation_prompts(tokenizer_of(), message, tuned, base, settings)
    return isolation.run_in_worker(lambda: conversation_prompts(tokenizer_of(), message, tuned, base, settings),
                                   PROMPT_TASK, isolation.Limits.of(gate.settings))


@spaces.GPU
def respond(message: str, tuned_history: list[dict[str, str]], base_history: list[dict[str, str]],
            run_dir: str | None, base_model: str, settings: GenerationSettings,
            prompts: Prompts | None = None) -> Iterator[tuple[Any, Any, Any]]:
    """Stream the fine-tuned reply, then the base model's reply to the same conversation. The message, histories
    and `run_dir` are checked already (`checked_conversation`, `conversation_prompts`, `own_run_dir`), and
    `prompts` are their prompt ids when rendered already. The message
    box is left alone (`sent` emptied it): what the visitor types meanwhile is their next message. A model that
    cannot load is refused with gr.Error: on ZeroGPU the worker passes only gr.Error on with its message (anything
    else reads "ZeroGPU worker error"), and the app shows it as a message (ui/common.py `refusals_as_messages`)."""
    try:
        model = chat_models.get(run_dir, base_model)
    except UserError as err:
        yield tuned_history, base_history, message  # the page as before Send: the message is not lost
        raise gr.Error(str(err)) from None
    tuned_history = [*tuned_history, {"role": "user", "content": message}]
    base_history = [*base_history, {"role": "user", "content": message}]
    targets = [(tuned_history, True)] if model.has_adapter else []
    targets.append((base_history, False))
    if not model.has_adapter:
        tuned_history.append({"role": "assistant", "content": NO_RUN_CHOSEN})
    yield tuned_history, base_history, gr.skip()
    for history, use_adapter in targets:
        conversation = [dict(m) for m in history]
        history.append({"role": "assistant", "content": ""})
        prompt = None if prompts is None else (prompts.tuned if use_adapter else prompts.base)
        for partial in model.stream(conversation, settings, use_adapter=use_adapter, prompt=prompt):
            history[-1]["content"] = partial
            yield tuned_history, base_history, gr.skip()
    yield tuned_history, base_history, gr.skip()


def sent(message: str, tuned_history: list[dict[str, str]],
         base_history: list[dict[str, str]]) -> tuple[list[dict[str, str]], list[dict[str, str]], str]:
    """The page's first update for a message that passed the checks, before any model loads: the message shown in
    both chats, and the box emptied at once (emptied later, it would take what the visitor typed meanwhile)."""
    turn = {"role": "user", "content": message}
    return [*tuned_history, turn], [*base_history, turn], ""


def settings_slider(name: str, label: str) -> gr.Slider:
    """A slider for a GenerationSettings field: its range is the field's bounds for the app (`app_bounds` where the
    shared app offers less than the command line; Gradio enforces it for any client), its value the field's
    default, its help the field's."""
    spec = GenerationSettings.__dataclass_fields__[name]
    low, high = spec.metadata.get("app_bounds") or spec.metadata["bounds"]
    return gr.Slider(low, high, value=spec.default, step=SLIDER_STEPS[name], label=label, info=spec.metadata["help"])


def build(gate: Gate, model: gr.Dropdown, session: gr.BrowserState) -> RunPicker:
    runs_dir = gate.runs_dir
    with gr.Row():
        run = gr.Dropdown(run_choices(runs_dir, None), value=None, label="Chat with", elem_id="chat-run", scale=3,
                          info="A run's adapter on its base model, or the base model alone (the model picker above).")
        refresh = gr.Button("↻ Runs", size="sm", scale=0)
    with gr.Accordion("Generation", open=False):
        defaults = GenerationSettings()
        system_prompt = gr.Textbox(label="System prompt", value=defaults.system_prompt,
                                   info=field_help(GenerationSettings, "system_prompt"))
        with gr.Row():
            temperature = settings_slider("temperature", "Temperature")
            top_p = settings_slider("top_p", "Top-p")
            max_new_tokens = settings_slider("max_new_tokens", "Max new tokens")
            compare_max_new_tokens = settings_slider("compare_max_new_tokens", "Base model's max new tokens")
    gr.HTML(f"<style>{CHAT_CSS}</style>", elem_id="chat-style", padding=False, container=False)
    with gr.Row():
        tuned = gr.Chatbot(label="Fine-tuned", elem_id="chat-tuned", height=360)
        base = gr.Chatbot(label="Base model", elem_id="chat-base", height=360)
    with gr.Row():
        message = gr.Textbox(placeholder="Message…", show_label=False, scale=5, elem_id="chat-message")
        send = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
    with gr.Row():
        suggest = gr.Button("💡 Try a held-out prompt", size="sm", elem_id="chat-suggest")
        clear = gr.Button("Clear", size="sm")

    # top_p, then the base model's length, last: the chat API's other values keep their places for clients written
    # before it had them.
    inputs = [message, tuned, base, run, model, system_prompt, temperature, max_new_tokens, session, top_p,
              compare_max_new_tokens]

    def on_send(message, tuned, base, run, model_name, system_prompt, temperature, max_new_tokens, token, top_p,
                compare_max_new_tokens=None):
        visitor, base_model = gate.visitor(token), gate.model(model_name)
        settings = generation_settings(system_prompt, temperature, top_p, max_new_tokens, compare_max_new_tokens)
        message, tuned, base = checked_conversation(message, settings, tuned, base)
        run_dir = own_run_dir(runs_dir, run, visitor)
        prompts = conversation_prompts_bounded(gate, lambda: chat_models.tokenizer(run_dir, base_model),
                                               ships_template(gate, run_dir, base_model), message, tuned, base,
                                               settings)
        yield sent(message, tuned, base)
        yield from respond(message, tuned, base, run_dir, base_model, settings, prompts)

    # Send and Enter are one event, so a page runs one reply at a time; a message sent during a reply waits for it
    # and is answered next (Gradio's "always_last": the newest one, read from the box when its turn comes) instead
    # of being dropped. Every page's replies share CHAT_CONCURRENCY places on the hardware.
    gr.on([send.click, message.submit], on_send, inputs=inputs, outputs=[tuned, base, message], api_name="chat",
          trigger_mode="always_last", concurrency_id="chat", concurrency_limit=CHAT_CONCURRENCY)
    suggest.click(lambda r, token: suggestion(runs_dir, r, gate.visitor(token)), inputs=[run, session],
                  outputs=message)
    clear.click(lambda: ([], []), outputs=[tuned, base])
    def on_refresh(current, token):
        return keep_choice(run_choices(runs_dir, gate.known_visitor(token)), current)

    refresh.click(on_refresh, inputs=[run, session], outputs=run)
    return RunPicker(run, on_refresh)
