"""The Gradio app: one module per tab, each a thin skin over the core."""

from __future__ import annotations

import gradio as gr

from .. import models
from . import data_tab

TITLE = "SFT Space"
INTRO = (
    "Turn your own prompt/response data into your assistant. "
    "**Data** → see every problem and what the model will be trained on."
)


def build_app() -> gr.Blocks:
    with gr.Blocks(title=TITLE) as app:
        gr.Markdown(f"# {TITLE}\n{INTRO}")
        model = gr.Textbox(
            label="Model",
            value=models.default_model(),
            info=f"{models.EMBEDDED_MODEL} (built in), a local folder, or a Hub id such as {models.HUB_DEFAULT_MODEL}",
            elem_id="model-name",
        )
        with gr.Tabs():
            with gr.Tab("Data", id="data"):
                data_tab.build(model)
    return app


def launch(app: gr.Blocks, **kwargs) -> None:
    # server name and port come from GRADIO_SERVER_NAME / GRADIO_SERVER_PORT when not given.
    app.queue(default_concurrency_limit=4).launch(theme=gr.themes.Soft(), **kwargs)
