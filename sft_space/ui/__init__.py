"""The Gradio app: one module per tab, each a thin skin over the core.

Data → Train → Chat, plus Runs. Every visitor gets an id kept in their browser (localStorage), so a page
reload re-attaches to their job and nobody else can stop it.
"""

from __future__ import annotations

import os
import uuid

import gradio as gr

from .. import jobs, models
from . import chat_tab, data_tab, runs_tab, train_tab

TITLE = "SFT Space"
INTRO = (
    "Turn your own prompt/response data into your assistant. "
    "**Data** → see every problem and what the model will be trained on · **Train** a LoRA adapter and watch "
    "the loss · **Chat** with it beside the base model."
)


def runs_dir() -> str:
    return os.environ.get("SFT_SPACE_RUNS", "runs")


def build_app(manager: jobs.JobManager | None = None, default_model: str | None = None) -> gr.Blocks:
    manager = manager or jobs.JobManager()
    folder = runs_dir()
    default_model = default_model or os.environ.get("SFT_SPACE_DEFAULT_MODEL") or models.default_model()
    with gr.Blocks(title=TITLE) as app:
        owner = gr.BrowserState("", storage_key="sft-space-visitor")
        gr.Markdown(f"# {TITLE}\n{INTRO}")
        model = train_tab.model_picker(default_model)
        with gr.Tabs() as tabs:
            with gr.Tab("Data", id="data"):
                _, data_settings, skip_invalid = data_tab.build(model)
            with gr.Tab("Train", id="train"):
                train_tab.build(manager, folder, owner, model, data_settings, skip_invalid)
            with gr.Tab("Chat", id="chat") as chat_item:
                chat = chat_tab.build(folder, model)
            with gr.Tab("Runs", id="runs") as runs_item:
                past = runs_tab.build(folder)
        # Runs finish while the page is open: the lists are read again whenever their tab is opened.
        chat_item.select(chat["on_refresh"], inputs=chat["run"], outputs=chat["run"])
        runs_item.select(past["on_refresh"], outputs=past["refresh_outputs"])

        def open_in_chat(run_id):
            choices = chat_tab.run_choices(folder)
            value = next((v for _, v in choices if os.path.basename(v) == run_id), None)
            return gr.update(choices=choices, value=value), gr.Tabs(selected="chat")

        past["open_chat"].click(open_in_chat, inputs=past["run_id"], outputs=[chat["run"], tabs])
        app.load(lambda visitor: visitor or uuid.uuid4().hex, inputs=owner, outputs=owner)
    return app


def launch(app: gr.Blocks, **kwargs) -> None:
    # server name and port come from GRADIO_SERVER_NAME / GRADIO_SERVER_PORT when not given.
    app.queue(default_concurrency_limit=4).launch(theme=gr.themes.Soft(), **kwargs)
