"""Chat tab: the fine-tuned model and its base side by side, from one copy of the weights.

Generation is wrapped with `spaces.GPU`, so on ZeroGPU hardware a GPU is attached for each reply; elsewhere
the decorator does nothing.
"""

from __future__ import annotations

import random
from typing import Any, Iterator

import gradio as gr
import spaces

from .. import access, runs
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
SLIDER_STEPS = {"temperature": 0.05, "top_p": 0.05, "max_new_tokens": 1}


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
    """A chat message's text: Gradio hands earlier turns back as a list of parts ({"type": "text", "text": …})."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", ""))
    if isinstance(content, (list, tuple)):
        return "".join(message_text(part) for part in content)
    return ""


def _as_messages(history: list[dict[str, Any]]) -> list[dict[str, str]]:
    return [{"role": m["role"], "content": message_text(m["content"])} for m in history]


def generation_settings(system_prompt: str | None, temperature: float, top_p: float,
                        max_new_tokens: float) -> GenerationSettings:
    """The sliders' values as settings (the sliders send numbers as floats)."""
    return GenerationSettings(max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                              top_p=float(top_p), system_prompt=system_prompt or "")


def checked_message(message: str | None, settings: GenerationSettings, tuned_history: list | None,
                    base_history: list | None) -> str:
    """The message to answer, or UserError: none typed, or a conversation too long for the shared hardware (a page
    can send any history). Checked before `respond`, so that a refusal attaches no GPU on ZeroGPU."""
    message = (message or "").strip()
    if not message:
        raise UserError("Type a message first.")
    earlier = [*(tuned_history or []), *(base_history or [])]
    access.check_conversation([message, settings.system_prompt]
                              + [message_text(m.get("content") if isinstance(m, dict) else m) for m in earlier])
    return message


@spaces.GPU
def respond(message: str, tuned_history: list, base_history: list, run_dir: str | None, base_model: str,
            settings: GenerationSettings) -> Iterator[tuple[list, list, str]]:
    """Stream the fine-tuned reply, then the base model's reply to the same conversation. `message` and `run_dir`
    are checked already (`checked_message`, `own_run_dir`). A model that cannot load is refused with gr.Error: on
    ZeroGPU the worker passes only gr.Error on with its message (anything else reads "ZeroGPU worker error"),
    and the app shows it as a message (ui/common.py `refusals_as_messages`)."""
    try:
        model = chat_models.get(run_dir, base_model)
    except UserError as err:
        raise gr.Error(str(err)) from None
    tuned_history = list(tuned_history or []) + [{"role": "user", "content": message}]
    base_history = list(base_history or []) + [{"role": "user", "content": message}]
    targets = [(tuned_history, True)] if model.has_adapter else []
    targets.append((base_history, False))
    if not model.has_adapter:
        tuned_history.append({"role": "assistant", "content": NO_RUN_CHOSEN})
    for history, use_adapter in targets:
        conversation = _as_messages(history)
        history.append({"role": "assistant", "content": ""})
        for partial in model.stream(conversation, settings, use_adapter=use_adapter):
            history[-1]["content"] = partial
            yield tuned_history, base_history, ""
    yield tuned_history, base_history, ""


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

    # top_p last: the chat API's other values keep their places for clients written before it had one.
    inputs = [message, tuned, base, run, model, system_prompt, temperature, max_new_tokens, session, top_p]

    def on_send(message, tuned, base, run, model_name, system_prompt, temperature, max_new_tokens, token, top_p):
        visitor, base_model = gate.visitor(token), gate.model(model_name)
        settings = generation_settings(system_prompt, temperature, top_p, max_new_tokens)
        message = checked_message(message, settings, tuned, base)
        yield from respond(message, tuned, base, own_run_dir(runs_dir, run, visitor), base_model, settings)

    send.click(on_send, inputs=inputs, outputs=[tuned, base, message], api_name="chat")
    message.submit(on_send, inputs=inputs, outputs=[tuned, base, message])
    suggest.click(lambda r, token: suggestion(runs_dir, r, gate.visitor(token)), inputs=[run, session],
                  outputs=message)
    clear.click(lambda: ([], []), outputs=[tuned, base])
    def on_refresh(current, token):
        return keep_choice(run_choices(runs_dir, gate.known_visitor(token)), current)

    refresh.click(on_refresh, inputs=[run, session], outputs=run)
    return RunPicker(run, on_refresh)
