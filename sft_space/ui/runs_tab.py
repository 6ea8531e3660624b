"""Runs tab: past runs with their settings, final loss and curve; open one to chat with, resume or publish; compare
two or more (their curves overlaid, their settings side by side: `compare` does the work)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import gradio as gr
import pandas as pd

from .. import compare, events, hub_jobs, jobs, runs
from ..errors import UserError
from ..settings import PRESET_NAMES, run_settings
from .common import Gate, keep_choice
from .train_tab import EMPTY_CURVE, LOSS_PLOT, STEP_AXIS_FORMAT, loss_curve


def _rounded(value: float | None) -> float | None:
    return round(value, 4) if isinstance(value, (int, float)) else None


# Each column's width in px, in order: run, status, model, data, examples, steps, train loss, validation loss,
# started. Together 1,214 px: the table fits a 1,280 px window, and a narrower one scrolls it sideways. The status
# column is wide enough for a Jobs flavor's name, which its cell wraps onto a line of its own.
RUNS_COLUMNS = [262, 104, 205, 175, 88, 60, 80, 80, 160]


def _short_model(model: Any) -> str:
    """A model as the table names it: a folder by its name, 'embedded:' and a Hub owner left out (the run's details
    name it in full)."""
    text = str(model or "")
    return text.rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1] if text else ""


def runs_table(runs_dir: str, visitor: str | None) -> pd.DataFrame:
    """The visitor's runs, newest first; short enough to fit the page."""
    rows = []
    for folder, record in runs.visible_runs(runs_dir, visitor):
        # A run still training has no summary in its record yet: its events say how far it is.
        final = record.get("final_metrics") or events.final_metrics(folder.read_metrics())
        headline = folder.headline(record)
        data = record.get("data") or {}
        status = record.get("status")
        if status == runs.UNREADABLE:
            status = f"{status}: {record.get('error')}"
        elif isinstance(record.get("job"), dict):
            status = f"{status} {jobs_cell(record)}"
        source = str(data.get("source") or "")
        # To the minute, without the zone: the full time is in the run's details.
        started = str(record.get("created_at") or "")[:16].replace("T", " ")
        rows.append((folder.run_id, status, _short_model(record.get("base_model")),
                     Path(source).name if Path(source).is_absolute() else source, data.get("train_examples"),
                     final.get("step"), _rounded(headline.train_loss), _rounded(headline.validation_loss),
                     started))
    return pd.DataFrame(rows, columns=["run", "status", "model", "data", "examples", "steps", "train loss",
                                       "val. loss", "started"])


def jobs_cell(record: dict[str, Any]) -> str:
    """Where a Jobs run trained and what it cost, for its status cell: the flavor of its latest job and the billed
    cost of all its jobs (a resume is a new job), or, while its first job runs, the cost expected."""
    job = record["job"]
    cost = record.get("cost_usd")
    if cost is None and job.get("estimated_cost_usd") is not None:
        return f"on {job.get('flavor')}, about ${job['estimated_cost_usd']:.2f}"
    return f"on {job.get('flavor')}" + ("" if cost is None else f", ${cost:.2f}")


def jobs_markdown(record: dict[str, Any]) -> str:
    """A Jobs run's jobs for its details: each with its flavor and billed time and cost, then their total."""
    ended = [job for job in record.get("jobs") or [] if isinstance(job, dict)]
    current = record["job"]
    listed = ended + ([] if any(job.get("id") == current.get("id") for job in ended) else [current])
    lines = [f"- {hub_jobs.describe_job(job)}" for job in listed if job.get("id") and job.get("flavor")]
    total = "" if record.get("cost_usd") is None else f": ${record['cost_usd']:.2f} billed in all"
    return f"Trained on Hugging Face Jobs{total}\n" + "\n".join(lines)


def runs_summary(table: pd.DataFrame) -> str:
    """One line over the table: an empty table says why (no runs of the visitor's yet), not only that it is empty."""
    if table.empty:
        return "No runs of yours here yet: start one in the Train tab."
    return f"{len(table)} run{'s' if len(table) != 1 else ''}, newest first."


def run_details(runs_dir: str, run_id: str | None, visitor: str | None) -> tuple[str, pd.DataFrame]:
    if not run_id:
        return "Pick a run.", EMPTY_CURVE
    try:
        folder = runs.open_visible(runs_dir, run_id, visitor)
    except UserError as err:
        return f"❌ {err}", EMPTY_CURVE
    record = folder.read()
    return details_markdown(folder, record), loss_curve(folder.path)


def details_markdown(folder: runs.RunFolder, record: dict[str, Any]) -> str:
    """A run's details for a reader: its outcome, the plan's reasons, then its results, data and settings as a table
    (the comparison's rows: the data by its file name, nothing of the server's folders or of who started it)."""
    outcome = f" · {record['error']}" if record.get("error") else ""
    lines = [f"**{folder.run_id}** · {record.get('status')}{outcome}"]
    if started := str(record.get("created_at") or "")[:16].replace("T", " "):
        lines.append(f"Started {started}")
    if reasons := (record.get("plan") or {}).get("reasons"):
        lines.append("Plan: " + "; ".join(map(str, reasons)))
    if isinstance(record.get("job"), dict):
        lines.append(jobs_markdown(record))
    preset = str((record.get("settings") or {}).get("preset") or "")
    defaults = dataclasses.asdict(run_settings(preset)) if preset in PRESET_NAMES else {}
    rows = [(name, compare.shown(value)) for name, value in compare.run_rows(folder, record).items()
            # The settings its preset chose are said by the preset's name; the rest (results, data, plan) all.
            if name != "status" and not (name in defaults and name != "preset"
                                         and compare.shown(defaults[name]) == compare.shown(value))]
    lines.append("| result or setting | value |\n|---|---|\n" + "\n".join(
        f"| {name} | {_cell(value)} |" for name, value in rows if value != compare.shown(None)))
    if defaults:
        lines.append(f"Settings not listed are the **{preset}** preset's; compare runs below to see them all.")
    return "\n\n".join(lines)


def _cell(text: str) -> str:
    """Text as one Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


PICK_TWO = f"Pick {compare.MIN_RUNS} or more runs to compare their loss curves and settings."
DIFFERENT = "background-color: rgba(250, 204, 21, .35)"  # a row whose values differ, when every row is shown
NO_COMPARISON = pd.DataFrame({compare.ROW: []})  # an empty table (without a frame, Gradio shows columns "1 2 3")


def compare_view(runs_dir: str, run_refs: list[str] | None, only_differences: bool,
                 visitor: str | None) -> tuple[str, Any, Any, Any]:
    """(note, training-loss plot, validation-loss plot, settings table) for the runs a page picked; a run that is
    not the visitor's is refused (UserError) before anything of it is read."""
    if len(set(run_refs or [])) < compare.MIN_RUNS:
        return PICK_TWO, EMPTY_CURVE, EMPTY_CURVE, NO_COMPARISON
    comparison = compare.compare(compare.open_runs(runs_dir, run_refs, visitor))
    rows = comparison.rows(only_differences)
    if only_differences:
        note = (f"{len(rows)} of {len(comparison.table)} rows differ; untick *Only what differs* to see every "
                "setting.")
        table: Any = rows
    else:
        differs = list(comparison.table[compare.DIFFERS])
        note = f"{sum(differs)} of {len(rows)} rows differ (highlighted)."
        table = rows.style.apply(lambda row: [DIFFERENT if differs[row.name] else ""] * len(row), axis=1)
    plots = [gr.LinePlot(value=comparison.split(split), color_map=comparison.legend_colours)
             for split in ("train", "validation")]
    return note, *plots, table


def _kept(current: list[str] | None, names: list[str]) -> Any:
    """A refreshed list of runs to compare, keeping the picks that are still there."""
    return gr.update(choices=names, value=[name for name in current or [] if name in names])


@dataclass(frozen=True)
class RunsTab:
    """What the rest of the app uses of the Runs tab: the chosen run, the buttons that take it to another tab, and
    the refresh its tab's opening runs."""

    run_id: gr.Dropdown
    open_chat: gr.Button
    resume: gr.Button
    publish: gr.Button
    on_refresh: Callable[..., tuple]
    refresh_inputs: list[gr.components.Component]
    refresh_outputs: list[gr.components.Component]


def build(manager: jobs.JobManager, gate: Gate, session: gr.BrowserState) -> RunsTab:
    runs_dir = gate.runs_dir
    with gr.Row():
        # Empty until the tab's first refresh, which knows the visitor.
        summary = gr.Markdown(elem_id="runs-summary")
        refresh = gr.Button("↻ Refresh", size="sm", scale=0, min_width=110)
    initial = runs_table(runs_dir, None)
    # A value longer than its column (an unreadable run's reason, a long file name) wraps; wrapping alone would
    # squeeze the short columns (headers broken inside words), hence the widths.
    table = gr.Dataframe(initial, interactive=False, elem_id="runs-table", wrap=True, column_widths=RUNS_COLUMNS)
    with gr.Row():
        # No run chosen at first: the tab's first refresh picks one, and its details show (a run chosen here
        # would never change, so its details would not).
        run_id = gr.Dropdown(list(initial["run"]), value=None, label="Run", allow_custom_value=False, scale=3,
                             elem_id="runs-run")
        open_chat = gr.Button("Chat with it", scale=1, elem_id="open-in-chat")
        resume = gr.Button("Resume it", scale=1, elem_id="runs-resume")
        publish = gr.Button("Publish it", scale=1, elem_id="open-in-publish")
        delete = gr.Button("Delete it", scale=1, variant="stop", elem_id="runs-delete")
    with gr.Row():
        details = gr.Markdown(elem_id="runs-details")
        # No fixed height: the plot's legend sits below it, and a fixed height cuts it off.
        curve = gr.LinePlot(EMPTY_CURVE, label="Loss", **LOSS_PLOT)
    gr.Markdown("### Compare runs")
    with gr.Row():
        picked = gr.Dropdown(list(initial["run"]), value=[], multiselect=True, max_choices=compare.MAX_RUNS,
                             label="Runs to compare", scale=4, elem_id="runs-compare",
                             info=f"{compare.MIN_RUNS} to {compare.MAX_RUNS} of your runs: their loss curves on "
                                  "one plot, one colour per run, and their settings side by side.")
        only_differences = gr.Checkbox(True, label="Only what differs", scale=1, elem_id="compare-differences")
    compare_note = gr.Markdown(PICK_TWO, elem_id="compare-note")
    with gr.Row():
        # The legend names the runs (no title above it); axis labels rounded (never "3.000000").
        plot = dict(x="step", y="loss", color="run", color_title="", x_axis_format=STEP_AXIS_FORMAT,
                    y_axis_format=".3~r")
        train_curves = gr.LinePlot(EMPTY_CURVE, label="Training loss", elem_id="compare-train", **plot)
        validation_curves = gr.LinePlot(EMPTY_CURVE, label="Validation loss", elem_id="compare-validation", **plot)
    settings_table = gr.Dataframe(NO_COMPARISON, label="Results and settings side by side", interactive=False,
                                  wrap=True, elem_id="compare-settings")

    def on_refresh(current, token, current_picks=None):
        frame = runs_table(runs_dir, gate.known_visitor(token))
        names = list(frame["run"])
        return (runs_summary(frame), frame, keep_choice([(name, name) for name in names], current),
                _kept(current_picks, names))

    def on_delete(current, token, current_picks=None):
        if not current:
            raise gr.Error("Pick a run first.")
        try:
            deleted = manager.delete(runs_dir, current, gate.visitor(token))
        except UserError as err:
            raise gr.Error(str(err)) from None
        gr.Info(f"Deleted run {deleted}.")
        return on_refresh(None, token, current_picks)

    def on_compare(run_refs, only_differences, token):
        # A page event off the API (see ui/__init__.py); any client can still call it, so the visitor is checked
        # and every name must be one of their runs. Fewer than two picks read nothing: a page still loading (no
        # visitor id yet) gets the prompt, not a refusal.
        enough = len(set(run_refs or [])) >= compare.MIN_RUNS
        return compare_view(runs_dir, run_refs, bool(only_differences), gate.visitor(token) if enough else None)

    refresh_outputs = [summary, table, run_id, picked]
    refresh.click(on_refresh, inputs=[run_id, session, picked], outputs=refresh_outputs)
    delete.click(on_delete, inputs=[run_id, session, picked], outputs=refresh_outputs)
    run_id.change(lambda r, token: run_details(runs_dir, r, gate.known_visitor(token)), inputs=[run_id, session],
                  outputs=[details, curve])
    gr.on([picked.change, only_differences.change], on_compare, inputs=[picked, only_differences, session],
          outputs=[compare_note, train_curves, validation_curves, settings_table], api_name="compare_runs")
    return RunsTab(run_id=run_id, open_chat=open_chat, resume=resume, publish=publish, on_refresh=on_refresh,
                   refresh_inputs=[run_id, session, picked], refresh_outputs=refresh_outputs)
