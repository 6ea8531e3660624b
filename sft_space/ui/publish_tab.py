"""Publish tab: push a run to the Hub with its model card (and a GGUF file, a demo Space), or download it as a
zip or a GGUF file.

On a Space with `hf_oauth`, visitors sign in with the LoginButton and push with their own OAuth token; a token
can also be pasted for one push. The token is used for that push only: it is not kept in any state, file or
page output.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import gradio as gr

from .. import access, publish
from ..errors import UserError
from ..settings import PublishSettings
from .common import Gate, RunPicker, adapter_run_choices, keep_choice, own_run, refusal_said, settings_component

# The settings the form's controls set, in the order the push handler receives them (the repo has a box of its own).
FORM_FIELDS = tuple(spec.name for spec in dataclasses.fields(PublishSettings) if spec.name != "repo_id")


def oauth_enabled() -> bool:
    """Sign-in with Hugging Face is wired only where it works (access.sign_in_available); elsewhere Gradio would
    demand a logged-in machine."""
    return access.sign_in_available(os.environ)


def publish_run(runs_dir: str, run_dir: str | None, visitor: str | None, repo_id: str, typed_token: str,
                signed_in_token: str | None, values: dict[str, Any], progress: Any = None, api: Any = None) -> str:
    """Push and describe the outcome in Markdown; every failure becomes a readable gr.Error."""
    run_dir = str(own_run(runs_dir, run_dir, visitor).path)
    settings = PublishSettings(repo_id=(repo_id or "").strip(), **values)
    token = publish.resolve_token(typed_token, signed_in_token)

    def on_progress(fraction: float, message: str) -> None:
        if progress is not None:
            progress(fraction, desc=message)

    try:
        result = publish.push(run_dir, settings, token, api=api, on_progress=on_progress, in_app=True)
    except UserError as err:
        raise gr.Error(str(err)) from None
    lines = [f"✅ Published **[{settings.repo_id}]({result.model_url})**"
             + (" (private)" if settings.private else "")]
    if settings.gguf:
        tag = settings.gguf_quant.upper()
        lines.append(f"💻 Run it locally: `ollama run hf.co/{settings.repo_id}:{tag}` or "
                     f"`llama-cli -hf {settings.repo_id}:{tag}`")
    if result.space_url:
        lines.append(f"💬 Chat demo: **[{result.space_url}]({result.space_url})** (it takes a few minutes to build)")
    lines += [f"ℹ️ {note}" for note in result.notes]
    return "\n\n".join(lines)


def downloads_for(gate: Gate) -> publish.Downloads:
    """The app's downloads folder, capped by the operator's setting (for all visitors together)."""
    return publish.Downloads.in_temporary_folder(int(gate.settings.downloads_gb * 10**9))


def offered(path: Path) -> Any:
    """The download button for a file made for the visitor, labelled with its name and size. Not a gr.File: its
    preview counts 1,048,576 bytes as an "MB", so a GGUF file the README calls 145 MB would read 138.6 MB."""
    return gr.update(value=str(path), label=f"Save {path.name} ({publish.size_text(path.stat().st_size)})",
                     visible=True)


def zip_run(runs_dir: str, run_dir: str | None, visitor: str | None, downloads: publish.Downloads) -> Any:
    folder = own_run(runs_dir, run_dir, visitor)
    try:
        return offered(downloads.zip(folder, visitor))
    except UserError as err:
        raise gr.Error(str(err)) from None


def gguf_run(runs_dir: str, run_dir: str | None, visitor: str | None, quant: str, downloads: publish.Downloads,
             progress: Any = None) -> Any:
    """The visitor's run (adapter merged in) as a GGUF file to download: made once per quantization while the
    run's adapter is unchanged, then handed out again."""
    folder = own_run(runs_dir, run_dir, visitor)

    def on_progress(fraction: float, message: str) -> None:
        if progress is not None:
            progress(fraction, desc=message)

    try:
        return offered(downloads.gguf(folder, quant, visitor, on_progress=on_progress))
    except UserError as err:
        raise gr.Error(str(err)) from None


def build(gate: Gate, session: gr.BrowserState) -> RunPicker:
    runs_dir = gate.runs_dir
    specs = {f.name: f for f in dataclasses.fields(PublishSettings)}
    with gr.Row():
        run = gr.Dropdown(adapter_run_choices(runs_dir, None), value=None, label="Run", scale=3, elem_id="publish-run",
                          info="A finished run, or a stopped one (its adapter so far).")
        refresh = gr.Button("↻ Runs", size="sm", scale=0)
    with gr.Group():
        if oauth_enabled():
            gr.LoginButton()
        token = gr.Textbox(label="Hugging Face token", type="password", elem_id="publish-token",
                           placeholder="hf_…", info=("Sign in above, or paste a token with write access. It is used "
                                                     "for this push only and never saved."
                                                     if oauth_enabled() else
                                                     "A token with write access, used for this push only and never "
                                                     "saved. Leave empty to use HF_TOKEN or your saved login."))
        repo_id = gr.Textbox(label="Repo", placeholder="your-name/my-assistant", elem_id="publish-repo",
                             info=specs["repo_id"].metadata["help"])
    with gr.Row():
        form = {name: settings_component(specs[name]) for name in ("private", "update_existing", "merged",
                                                                   "demo_space")}
        form["merged_dtype"] = settings_component(specs["merged_dtype"], visible=False)
    with gr.Row():
        form["gguf"] = settings_component(specs["gguf"], label="GGUF")
        form["gguf_quant"] = settings_component(specs["gguf_quant"], label="GGUF quantization")
    for name in FORM_FIELDS:  # the description, and any setting without a place above, one below another
        if name not in form:
            form[name] = settings_component(specs[name])
    with gr.Row():
        push = gr.Button("Publish to the Hub", variant="primary", elem_id="publish-push")
        make_zip = gr.Button("Download the adapter (.zip)", elem_id="publish-zip")
        make_gguf = gr.Button("Download a GGUF file", elem_id="publish-gguf")
    outcome = gr.Markdown(elem_id="publish-outcome")
    download = gr.DownloadButton("Save", visible=False, elem_id="publish-file")
    downloads = downloads_for(gate)

    if oauth_enabled():
        # Gradio fills an OAuthToken parameter with the signed-in visitor's token (None when signed out); it finds
        # such parameters by their annotation among the leading positional ones, so they come before the inputs.
        def on_push(oauth_token: gr.OAuthToken | None, profile: gr.OAuthProfile | None, progress=gr.Progress(),
                    *inputs):
            gate.may_train(profile)  # publishing from the Space is for those who may train on it
            run_dir, token, repo, typed, *values = inputs
            return publish_run(runs_dir, run_dir, gate.visitor(token), repo, typed,
                               oauth_token.token if oauth_token else None, dict(zip(FORM_FIELDS, values)), progress)
    else:
        def on_push(run_dir, token, repo, typed, *values, progress=gr.Progress()):
            gate.may_train(None)
            return publish_run(runs_dir, run_dir, gate.visitor(token), repo, typed, None,
                               dict(zip(FORM_FIELDS, values)), progress)

    form["merged"].change(lambda merged: gr.update(visible=merged), inputs=form["merged"], outputs=form["merged_dtype"])
    # A push that merges (merged, GGUF) waits for another visitor's merge in the core (publish.one_merge_at_a_time);
    # a push of the adapter alone does not wait.
    # A refusal stays said in the outcome line until the next action (a toast fades).
    push.click(refusal_said(on_push, lambda refused: refused),
               inputs=[run, session, repo_id, token, *(form[name] for name in FORM_FIELDS)], outputs=outcome)
    # Downloads ask what a push asks: on a Space, a visitor who may not train may not take a run's files away.
    def on_zip(profile: gr.OAuthProfile | None, run_dir, token):
        gate.may_train(profile)
        return zip_run(runs_dir, run_dir, gate.visitor(token), downloads), ""

    def on_gguf(profile: gr.OAuthProfile | None, run_dir, token, quant, progress=gr.Progress()):
        gate.may_train(profile)
        return gguf_run(runs_dir, run_dir, gate.visitor(token), quant, downloads, progress), ""

    def download_refused(refused: str) -> tuple:
        return gr.update(visible=False), refused

    make_zip.click(refusal_said(on_zip, download_refused), inputs=[run, session], outputs=[download, outcome])
    # One merge at a time for all visitors (publish.one_merge_at_a_time): merging loads the whole model in float32.
    make_gguf.click(refusal_said(on_gguf, download_refused), inputs=[run, session, form["gguf_quant"]],
                    outputs=[download, outcome])
    # A file made for another run or quantization is not offered once the pick changes.
    for picker in (run, form["gguf_quant"]):
        picker.change(lambda: gr.update(visible=False), outputs=download, show_progress="hidden")

    def on_refresh(current, token):
        return keep_choice(adapter_run_choices(runs_dir, gate.known_visitor(token)), current)

    refresh.click(on_refresh, inputs=[run, session], outputs=run)
    return RunPicker(run, on_refresh)
