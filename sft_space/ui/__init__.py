"""The Gradio app: one module per tab, each a thin skin over the core.

Data → Train → Chat → Publish, plus Runs. Every visitor gets an id signed by the server and kept in their browser
(localStorage), so a page reload re-attaches to their job and nobody else can act on it (see `access`).
"""

from __future__ import annotations

import gradio as gr
from starlette.middleware import Middleware

from .. import access, child, jobs, models
from ..settings import OperatorSettings
from . import chat_tab, data_tab, publish_tab, runs_tab, train_tab
from .common import Gate, RequestLimits, RunPicker, own_run, refusals_as_messages

TITLE = "SFT Space"
INTRO = (
    "Turn your own prompt/response data into your assistant. "
    "**Data** → see every problem and what the model will be trained on · **Train** a LoRA adapter and watch "
    "the loss · **Chat** with it beside the base model · **Publish** it to the Hub with a model card and a chat "
    "demo anyone can open."
)


# identify → a visitor token, which check_data takes as its first value (then the source: "hub" with a Hub dataset
# id, or "sample") and chat as its ninth (after the conversation, run, model and generation settings; top_p and the
# base model's max new tokens come last, so that clients sending fewer values keep working).
PUBLIC_API = ("identify", "check_data", "chat")
# (how often, how old) in seconds: Gradio's own sweep of its upload and download folder.
GRADIO_CACHE_SWEEP = (900, 3600)


def operator_default_model(settings: OperatorSettings) -> str:
    """The model the page preselects: the operator's SFT_SPACE_DEFAULT_MODEL, else the built-in one."""
    return settings.default_model or models.default_model()


def build_app(manager: jobs.JobManager | None = None, default_model: str | None = None) -> gr.Blocks:
    settings = access.access_settings()
    folder = settings.runs
    # On a Space visitors are strangers: one who is not signed in gets runs limited in time, and one at a time
    # per address.
    anonymous_run_seconds = settings.anonymous_run_minutes * 60 if access.running_on_space() else 0.0
    manager = manager or jobs.JobManager(runs_per_owner=settings.runs_per_visitor, max_queued=settings.queued_runs,
                                         supervisor=child.Supervisor(warm=settings.warm_start),
                                         anonymous_run_seconds=anonymous_run_seconds,
                                         one_anonymous_job_per_client=access.running_on_space())
    # Runs a child of an earlier app process still trains are followed again; ones left by a dead one are marked.
    manager.adopt(folder)
    default_model = default_model or operator_default_model(settings)
    picker = train_tab.model_picker(default_model, render=False, local_paths=settings.local_paths)
    # The models the page offers (and the operator's default) may be named without being Hub ids.
    gate = Gate(folder, access.Identity.for_runs(folder), settings, {value for _, value in picker.choices})
    # On the public Space that people duplicate, a visitor who may not train is offered their own copy first.
    original = access.is_original_space(settings, gate.environ) and access.duplicable(gate.environ)
    # Files posted to Gradio's upload route without a use (any client can) are deleted after an hour, so the
    # shared upload folder cannot fill the disk; a visitor's data is moved out of it as soon as it arrives.
    with gr.Blocks(title=TITLE, delete_cache=GRADIO_CACHE_SWEEP) as app:
        # The visitor's signed id, kept by their browser so that a reload re-attaches to their run.
        session = gr.BrowserState("", storage_key="sft-space-visitor")
        with gr.Row():
            gr.Markdown(f"# {TITLE}\n{INTRO}")
            top_duplicate = gr.DuplicateButton("Duplicate this Space", visible=False, size="lg", min_width=220,
                                               elem_id="duplicate-top") if original else None
        model = picker.render()
        with gr.Tabs() as tabs:
            with gr.Tab("Data", id="data"):
                data = data_tab.build(gate, model, session)
            with gr.Tab("Train", id="train"):
                training = train_tab.build(manager, gate, session, model, data.report, data.settings, data.skip_invalid)
            with gr.Tab("Chat", id="chat") as chat_item:
                chat = chat_tab.build(gate, model, session)
            with gr.Tab("Publish", id="publish") as publish_item:
                publishing = publish_tab.build(gate, session)
            with gr.Tab("Runs", id="runs") as runs_item:
                past = runs_tab.build(manager, gate, session)
        # The lists show only the visitor's own runs, so they are read when a tab opens (the visitor id is known
        # by then, and runs finish while the page is open).
        chat_item.select(chat.on_refresh, inputs=[chat.run, session], outputs=chat.run)
        publish_item.select(publishing.on_refresh, inputs=[publishing.run, session], outputs=publishing.run)
        runs_item.select(past.on_refresh, inputs=past.refresh_inputs, outputs=past.refresh_outputs)

        def open_in(tab_id: str, tab: RunPicker, purpose: str):
            def open_run(run_id, token):
                run = own_run(folder, run_id, gate.visitor(token), need_adapter=purpose)
                return tab.on_refresh(str(run.path), token), gr.Tabs(selected=tab_id)
            return open_run

        past.open_chat.click(open_in("chat", chat, "chat with"), inputs=[past.run_id, session],
                             outputs=[chat.run, tabs])
        past.publish.click(open_in("publish", publishing, "publish"), inputs=[past.run_id, session],
                           outputs=[publishing.run, tabs])

        def resume_run(profile: gr.OAuthProfile | None, token, run_id):
            # Any stopped or interrupted run, also one from before the app restarted; only its starter may, and
            # only while the access setting lets them train.
            visitor = gate.visitor(token)
            gate.may_train(profile)
            if not run_id:
                raise gr.Error("Pick a run first.")
            return manager.resume(folder, run_id, visitor, client=gate.client()).job_id, gr.Tabs(selected="train")

        past.resume.click(resume_run, inputs=[session, past.run_id], outputs=[training.job_id, tabs])
        app.load(identify(gate), inputs=session, outputs=session, api_name="identify")
        app.load(data.on_load, inputs=data.load_inputs, outputs=data.load_outputs)

        def show_access(profile: gr.OAuthProfile | None):
            shown = training.on_access(profile)
            # The top Duplicate button shows exactly when the Train tab's refusal does.
            return (*shown, shown[0]) if top_duplicate else shown

        app.load(show_access, outputs=training.access_outputs + ([top_duplicate] if top_duplicate else []))
    # Every event is also an HTTP endpoint. These are offered as an API, under stable names; the rest serve the
    # page only and are kept out of the API page and the Gradio clients (their handlers check the visitor anyway).
    for handler in app.fns.values():
        if handler.api_name not in PUBLIC_API:
            handler.api_visibility = "private"
        if handler.fn is not None:
            handler.fn = refusals_as_messages(handler.fn, len(handler.outputs))
    return app


def identify(gate: Gate):
    """The page-load handler that gives the browser its signed visitor id: on a Space with sign-in, the signed-in
    user's (Gradio fills the profile from its own session cookie, which a page cannot forge)."""
    if publish_tab.oauth_enabled():
        def on_load(token: str, profile: gr.OAuthProfile | None) -> str:
            gate.sweep_uploads()
            return gate.issue(token, profile.username if profile else None)
    else:
        def on_load(token: str) -> str:
            gate.sweep_uploads()
            return gate.issue(token)
    return on_load


def launch(app: gr.Blocks, **kwargs) -> None:
    # server name and port come from GRADIO_SERVER_NAME / GRADIO_SERVER_PORT when not given.
    # Uploads over the data limit are refused by Gradio before they fill the disk.
    kwargs.setdefault("max_file_size", access.max_upload_bytes())
    settings = access.access_settings()
    # Every page (and every raw client's session) keeps state in this process: the least recently used go first.
    kwargs.setdefault("state_session_capacity", settings.session_capacity)
    app_kwargs = kwargs.setdefault("app_kwargs", {})
    app_kwargs["middleware"] = [*app_kwargs.get("middleware", []), Middleware(RequestLimits, blocks=app,
                                                                              settings=settings)]
    # The built-in model's one-time conversion, done while nobody waits for it rather than in the first run; only
    # where it is the model the page preselects (another default leaves it to whoever picks it).
    if operator_default_model(settings) == models.EMBEDDED_MODEL:
        models.prepare_embedded_model_in_background()
    app.queue(default_concurrency_limit=4, max_size=settings.queue_size).launch(theme=gr.themes.Soft(), **kwargs)
