"""Train tab: model, preset, advanced settings generated from RunSettings, Start/Stop/Resume, live plot.

The job runs in the shared JobManager; this tab only submits it and re-reads its run folder every second, so a
reloaded page (same browser) re-attaches to the running job's curve.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from .. import catalog, checks, jobs, runs, storage
from ..errors import UserError
from ..hardware import detect_hardware
from ..settings import PRESET_NAMES, DataSettings, RunSettings, field_help, field_type, run_settings, train_command
from .common import Gate, settings_component

ADVANCED_GROUPS = (("lora", "LoRA"), ("schedule", "Schedule"), ("hardware", "Speed and memory"))
# No data is None, not an empty frame: a plot first drawn from an empty frame never shows its lines later.
EMPTY_CURVE = None
CURVE_COLOURS = {"train": "#4f46e5", "validation": "#f97316"}


def advanced_fields() -> list[dataclasses.Field]:
    groups = {name for name, _ in ADVANCED_GROUPS}
    return [f for f in dataclasses.fields(RunSettings) if f.metadata.get("group") in groups]


def settings_from_form(data_settings: DataSettings | None, skip_invalid: bool, model: str, preset: str,
                       runs_dir: str, advanced: dict[str, Any], report: checks.Report | None = None) -> RunSettings:
    if data_settings is None or not data_settings.source:
        raise UserError("Check your data in the Data tab first.")
    if report is not None and report.errors and not skip_invalid:
        # Said here, before a run is started only to be refused.
        raise UserError(f"{report.invalid_rows} of {report.rows} rows have errors (see the Data tab): fix them in "
                        f"your file, or tick Skip invalid rows to train on the {report.valid_rows} valid ones.")
    values = {f.name: getattr(data_settings, f.name) for f in dataclasses.fields(DataSettings)}
    values.update(skip_invalid_rows=bool(skip_invalid), model=model or "", output_dir=runs_dir)
    for spec in advanced_fields():
        value = advanced[spec.name]
        values[spec.name] = field_type(spec)(value)
    return run_settings(preset, **values)


def loss_curve(run_dir: str | Path | None) -> pd.DataFrame | None:
    """Train and validation loss by step, long format for gr.LinePlot."""
    if not run_dir:
        return EMPTY_CURVE
    folder = runs.RunFolder(Path(run_dir))
    points = []
    for entry in folder.read_metrics():
        if "loss" in entry:
            points.append((entry["step"], entry["loss"], "train"))
        if "eval_loss" in entry:
            points.append((entry["step"], entry["eval_loss"], "validation"))
    if not points:
        return EMPTY_CURVE
    try:
        validates = (folder.read().get("data") or {}).get("validation_examples", 0) > 0
    except UserError:
        validates = False
    if validates and not any(split == "validation" for _, _, split in points):
        # The plot fixes its series at the first draw: name the validation series with an empty point now, so
        # its line appears when the first validation loss arrives.
        points.append((points[0][0], float("nan"), "validation"))
    return pd.DataFrame(points, columns=["step", "loss", "split"])


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "…"
    seconds = int(seconds)
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m {seconds % 60:02d}s"


def progress_markdown(job: jobs.Job | None) -> str:
    if job is None:
        return "No run yet. Check your data, pick a model and press **Start**."
    # A failure's reason is shown once, below; the first line then says only what happened.
    lines = [f"**{job.state.capitalize()}**" + ("" if job.error and job.message == job.error else f" · {job.message}")]
    if job.run_dir is not None and (Path(job.run_dir) / runs.RUN_FILE).is_file():
        folder = runs.RunFolder(Path(job.run_dir))
        metrics = [m for m in folder.read_metrics() if "loss" in m]
        if metrics:
            last = metrics[-1]
            parts = [f"step {last['step']} of {last['max_steps']}", f"loss {last['loss']:.3f}",
                     f"elapsed {_duration(last.get('elapsed_seconds'))}"]
            if not job.done:
                parts.append(f"ETA {_duration(last.get('eta_seconds'))}")
            if last.get("tokens_per_second"):
                parts.append(f"{last['tokens_per_second']:,.0f} tokens/s")
            if last.get("peak_gpu_memory_gib") is not None:
                parts.append(f"GPU memory {last['peak_gpu_memory_gib']:.1f} GiB")
            lines.append(" · ".join(parts))
        plan = folder.read().get("plan", {})
        if plan.get("reasons"):
            lines.append("Plan: " + "; ".join(plan["reasons"]))
        lines.append(f"Run folder: `{folder.path}`")
    if job.error:
        lines.append(f"❌ {job.error}")
    return "\n\n".join(lines)


def visitor_job(manager: jobs.JobManager, owner: str, job_id: str) -> jobs.Job | None:
    """The job this page shows: the one it started, else the visitor's latest (after a reload)."""
    return manager.get(job_id, owner) if job_id else manager.latest_for(owner)


def model_picker(default: str | None = None, render: bool = True, local_paths: bool = False) -> gr.Dropdown:
    """The model dropdown shared by every tab: each entry says its size and whether it fits this machine."""
    hardware = detect_hardware()
    choices = catalog.picker_choices(hardware)
    if default and default not in [value for _, value in choices]:
        choices.insert(0, (default, default))
    return gr.Dropdown(choices, value=default or choices[0][1], allow_custom_value=True, label="Model",
                       elem_id="model-picker", render=render,
                       info=f"Hardware: {hardware.describe()}. Pick a listed model (size · whether it fits), "
                            "or type any Hub model id (owner/name)" + (" or local folder." if local_paths else "."))


def build(manager: jobs.JobManager, gate: Gate, session: gr.BrowserState, model: gr.Dropdown,
          report: gr.State, data_settings: gr.State, skip_invalid: gr.Checkbox) -> dict[str, Any]:
    """Lay out the Train tab; returns components other tabs use."""
    if note := storage.runs_note(gate.runs_dir):
        gr.Markdown(note, elem_id="train-storage-note")
    job_id = gr.State("")
    preset = gr.Radio(list(PRESET_NAMES), value="balanced", label="Preset",
                      info=field_help(RunSettings, "preset"))
    advanced: dict[str, gr.components.Component] = {}
    with gr.Accordion("Advanced", open=False):
        for group, title in ADVANCED_GROUPS:
            gr.Markdown(f"**{title}**")
            with gr.Row():
                for spec in advanced_fields():
                    if spec.metadata.get("group") == group:
                        advanced[spec.name] = settings_component(spec)
    names = list(advanced)
    with gr.Row():
        start = gr.Button("Start", variant="primary", elem_id="start-training")
        stop = gr.Button("Stop", variant="stop", elem_id="stop-training")
        resume = gr.Button("Resume", elem_id="resume-training")
    progress = gr.Markdown(progress_markdown(None), elem_id="train-progress")
    curve = gr.LinePlot(EMPTY_CURVE, x="step", y="loss", color="split", label="Loss", height=280,
                        elem_id="loss-plot", x_title="step", y_title="loss", color_map=CURVE_COLOURS)
    command = gr.Code(label="The same run from the command line", language="shell", interactive=False)
    timer = gr.Timer(1.0, active=True)

    def on_preset(name: str) -> list[Any]:
        values = run_settings(name)
        return [gr.update(value=getattr(values, n)) for n in names]

    preset.change(on_preset, inputs=preset, outputs=[advanced[n] for n in names])

    def on_start(token, report_value, data_value, skip, model_name, preset_name, *advanced_values):
        owner_id = gate.visitor(token)
        try:
            settings = settings_from_form(data_value, skip, gate.model(model_name), preset_name, gate.runs_dir,
                                          dict(zip(names, advanced_values)), report_value)
            job = manager.submit(settings, owner_id)
        except UserError as err:
            raise gr.Error(str(err)) from None
        return job.job_id, progress_markdown(job), train_command(settings)

    start.click(on_start, inputs=[session, report, data_settings, skip_invalid, model, preset, *advanced.values()],
                outputs=[job_id, progress, command])

    def on_stop(token, current):
        owner_id = gate.visitor(token)
        try:
            job = visitor_job(manager, owner_id, current)
            if job is None:
                raise UserError("You have no run to stop.")
            manager.stop(job.job_id, owner_id)
        except UserError as err:
            raise gr.Error(str(err)) from None
        return progress_markdown(job)

    stop.click(on_stop, inputs=[session, job_id], outputs=progress)

    def on_resume(token, current):
        owner_id = gate.visitor(token)
        try:
            job = visitor_job(manager, owner_id, current)
        except UserError as err:
            raise gr.Error(str(err)) from None
        if job is None or job.run_dir is None or not job.done:
            raise gr.Error("Nothing to resume: resume a stopped or failed run of yours once it has stopped.")
        try:
            folder = runs.RunFolder.open(job.run_dir)
            settings = RunSettings(**folder.read()["settings"])
            resumed = manager.submit(settings, owner_id, resume=str(folder.path))
        except UserError as err:
            raise gr.Error(str(err)) from None
        return resumed.job_id, progress_markdown(resumed)

    resume.click(on_resume, inputs=[session, job_id], outputs=[job_id, progress])

    def refresh(token, current):
        owner_id = gate.known_visitor(token)
        job = None
        if owner_id:
            try:
                job = visitor_job(manager, owner_id, current)
            except UserError:
                job = manager.latest_for(owner_id)
        return (job.job_id if job else current), progress_markdown(job), loss_curve(job.run_dir if job else None)

    timer.tick(refresh, inputs=[session, job_id], outputs=[job_id, progress, curve], show_progress="hidden")
    return {"job_id": job_id}
