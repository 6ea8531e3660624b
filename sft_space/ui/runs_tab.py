"""Runs tab: past runs with their settings, final loss and curve; open one to chat with, resume or publish."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from .. import jobs, runs
from ..errors import UserError
from .common import Gate, keep_choice
from .train_tab import CURVE_COLOURS, EMPTY_CURVE, loss_curve


def _rounded(value: float | None) -> float | None:
    return round(value, 4) if isinstance(value, (int, float)) else None


def runs_table(runs_dir: str, visitor: str | None) -> pd.DataFrame:
    """The visitor's runs (and those started from the command line), newest first."""
    rows = []
    for folder, record in runs.visible_runs(runs_dir, visitor):
        final = record.get("final_metrics") or {}
        data = record.get("data") or {}
        status = record.get("status")
        if status == runs.UNREADABLE:
            status = f"{status}: {record.get('error')}"
        source = str(data.get("source") or "")
        rows.append((folder.run_id, status, record.get("base_model"), Path(source).name if Path(source).is_absolute() else source,
                     data.get("train_examples"), final.get("step"), _rounded(final.get("loss")), _rounded(final.get("eval_loss")),
                     record.get("created_at")))
    return pd.DataFrame(rows, columns=["run", "status", "model", "data", "examples", "steps", "train loss",
                                       "validation loss", "started"])


def run_details(runs_dir: str, run_id: str | None, visitor: str | None) -> tuple[str, pd.DataFrame]:
    if not run_id:
        return "Pick a run.", EMPTY_CURVE
    try:
        folder = runs.open_visible(runs_dir, run_id, visitor)
    except UserError as err:
        return f"❌ {err}", EMPTY_CURVE
    record = folder.read()
    settings = json.dumps(record.get("settings", {}), indent=2)
    text = (f"**{folder.run_id}** · {record.get('status')}"
            + (f" · {record['error']}" if record.get("error") else "")
            + f"\n\nPlan: {'; '.join((record.get('plan') or {}).get('reasons', []))}"
            + f"\n\n```json\n{settings}\n```")
    return text, loss_curve(folder.path)


def build(manager: jobs.JobManager, gate: Gate, session: gr.BrowserState) -> dict[str, Any]:
    runs_dir = gate.runs_dir
    refresh = gr.Button("↻ Refresh", size="sm")
    initial = runs_table(runs_dir, None)
    table = gr.Dataframe(initial, interactive=False, elem_id="runs-table")
    with gr.Row():
        run_id = gr.Dropdown(list(initial["run"]), label="Run", allow_custom_value=False, scale=3,
                             elem_id="runs-run")
        open_chat = gr.Button("Chat with it", scale=1, elem_id="open-in-chat")
        resume = gr.Button("Resume it", scale=1, elem_id="runs-resume")
        publish = gr.Button("Publish it", scale=1, elem_id="open-in-publish")
        delete = gr.Button("Delete it", scale=1, variant="stop", elem_id="runs-delete")
    with gr.Row():
        details = gr.Markdown(elem_id="runs-details")
        curve = gr.LinePlot(EMPTY_CURVE, x="step", y="loss", color="split", label="Loss", height=220,
                            color_map=CURVE_COLOURS)

    def on_refresh(current, token):
        frame = runs_table(runs_dir, gate.known_visitor(token))
        return frame, keep_choice([(name, name) for name in frame["run"]], current)

    def on_delete(current, token):
        if not current:
            raise gr.Error("Pick a run first.")
        try:
            deleted = manager.delete(runs_dir, current, gate.visitor(token))
        except UserError as err:
            raise gr.Error(str(err)) from None
        gr.Info(f"Deleted run {deleted}.")
        return on_refresh(None, token)

    refresh.click(on_refresh, inputs=[run_id, session], outputs=[table, run_id])
    delete.click(on_delete, inputs=[run_id, session], outputs=[table, run_id])
    run_id.change(lambda r, token: run_details(runs_dir, r, gate.known_visitor(token)), inputs=[run_id, session],
                  outputs=[details, curve])
    return {"run_id": run_id, "open_chat": open_chat, "resume": resume, "publish": publish, "on_refresh": on_refresh,
            "refresh_outputs": [table, run_id]}
