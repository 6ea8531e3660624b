"""Compare runs: their loss curves on one frame and their settings side by side, the differences marked.

A page names runs by id; each is opened through `runs.open_visible`, so a visitor compares only runs they may see
(their own), and a name that is not one of them is refused before anything of it is read.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from . import card, runs
from .errors import UserError
from .settings import RunSettings, is_number

MIN_RUNS, MAX_RUNS = 2, 6
LONE_POINT = 0.04  # a run's only point on a plot is drawn this share of the steps wide
# One colour per run, told apart also by colour-blind readers (Okabe and Ito's palette, without its yellow).
COLOURS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#56B4E9", "#E69F00")
# Settings every run of one app shares by construction, which say nothing about the run.
NOT_COMPARED = {"output_dir"}
# The table's first column (what each row is) and its flag column: names no run id can have (a space, a '?').
ROW, DIFFERS = "run →", "differs?"
# The plots' legend cuts a label past about 160 px where it likes ("20261203-1015…"): a run is named there by at
# most this many characters, its start time first, shortened in the middle by us.
LEGEND_CHARACTERS = 24
LEGEND_TAIL = 6  # characters kept at a shortened label's end (an app run's id ends in 4 letters of its own)
# A run id as new runs get it (runs.new_run_id): date, time, then the data's name (and the app's suffix).
DATED_RUN_ID = re.compile(r"\d{8}-(\d{2})(\d{2})\d{2}-(.+)")


def legend_name(run_id: str) -> str:
    """A run as the plots' legend names it: "10:15 captain_byte-a1b2" for 20261203-101500-captain_byte-a1b2, shortened
    in the middle to LEGEND_CHARACTERS."""
    dated = DATED_RUN_ID.fullmatch(run_id)
    name = f"{dated[1]}:{dated[2]} {dated[3]}" if dated else run_id
    if len(name) > LEGEND_CHARACTERS:
        name = name[:LEGEND_CHARACTERS - LEGEND_TAIL - 1] + "…" + name[-LEGEND_TAIL:]
    return name


def legend_names(run_ids: list[str]) -> dict[str, str]:
    """Each run's legend name (`legend_name`); numbered when two would read the same."""
    names = {run_id: legend_name(run_id) for run_id in run_ids}
    if len(set(names.values())) < len(names):
        names = {run_id: f"{number}. {legend_name(run_id)[:LEGEND_CHARACTERS - 3]}"
                 for number, run_id in enumerate(run_ids, start=1)}
    return names


@dataclass
class Comparison:
    """Runs side by side: `curves` (step, loss, run, split) in long format for a line plot, `table` one row per
    result or setting with a column per run and DIFFERS (whether the runs' values differ), `colours` a colour
    per run, `names` each run's name in the plots' legend."""

    run_ids: list[str]
    curves: pd.DataFrame
    table: pd.DataFrame
    colours: dict[str, str]
    names: dict[str, str] = field(default_factory=dict)

    @property
    def legend_colours(self) -> dict[str, str]:
        """The colours by legend name, as the plots (`split`) name the runs."""
        return {self.names.get(run_id, run_id): colour for run_id, colour in self.colours.items()}

    def split(self, name: str) -> pd.DataFrame | None:
        """The curves of one split ("train" or "validation") for a line plot, or None when no run has a point of
        it. A line through one point draws nothing, so a run's lone point (one evaluation) becomes a short flat
        stroke around its step."""
        frame = self.curves[self.curves["split"] == name]
        if frame.empty:
            return None
        frame = frame.assign(run=frame["run"].map(lambda run_id: self.names.get(run_id, run_id)))
        alone = frame["run"].map(frame["run"].value_counts()) == 1
        if alone.any():
            half = max(float(self.curves["step"].max()) * LONE_POINT / 2, 0.5)
            lone = frame[alone]
            frame = pd.concat([frame[~alone], lone.assign(step=lone["step"] - half),
                               lone.assign(step=lone["step"] + half)]).sort_values(["run", "step"], kind="stable")
        return frame.reset_index(drop=True)

    def rows(self, only_differences: bool) -> pd.DataFrame:
        """The table for a reader: the rows whose values differ (or all of them), without the DIFFERS column."""
        rows = self.table[self.table[DIFFERS]] if only_differences else self.table
        return rows.drop(columns=DIFFERS).reset_index(drop=True)


def open_runs(runs_dir: str | Path, run_refs: list[str] | None, visitor: str | None) -> list[runs.RunFolder]:
    """The runs a page named, in its order and each once, checked to be `visitor`'s to see: UserError (the same
    'no run of yours' for another visitor's run as for none) otherwise."""
    names = list(dict.fromkeys(str(ref) for ref in run_refs or []))
    if len(names) > MAX_RUNS:
        raise UserError(f"Pick at most {MAX_RUNS} runs to compare ({len(names)} were picked).")
    return [runs.open_visible(runs_dir, name, visitor) for name in names]


def curves(folders: list[runs.RunFolder]) -> pd.DataFrame:
    """Every run's logged training and validation loss by step, one frame: step, loss, run, split."""
    points = []
    for folder in folders:
        for entry in folder.read_metrics():
            for key, split in (("loss", "train"), ("eval_loss", "validation")):
                value = entry.get(key)
                if is_number(value) and is_number(entry.get("step")):
                    points.append((entry["step"], float(value), folder.run_id, split))
    return pd.DataFrame(points, columns=["step", "loss", "run", "split"])


def shown(value: Any) -> str:
    """A value as the table shows it: numbers in their shortest form (2e-4 and 0.0002 read the same), nothing as
    an em dash."""
    if value is None or value == "":
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3g}"
    if isinstance(value, list):
        return ", ".join(map(shown, value))
    return str(value)


def _file_name(source: Any) -> Any:
    # A source on this machine (an upload) is shown by its file name: its folder is the server's, not the visitor's.
    return Path(source).name if isinstance(source, str) and Path(source).is_absolute() else source


def run_rows(folder: runs.RunFolder, record: dict[str, Any]) -> dict[str, Any]:
    """What one run's column holds, row name -> value: results, data, settings, then what the plan resolved."""
    final = record.get("final_metrics") or {}
    headline = folder.headline(record)
    data = record.get("data") or {}
    plan = record.get("plan") or {}
    settings = dict(record.get("settings") or {})
    rows: dict[str, Any] = {
        "status": record.get("status"),
        "steps": final.get("step"),
        "train loss (smoothed)": headline.train_loss,
        "validation loss": headline.validation_loss,
        "data": _file_name(data.get("source") or settings.get("source")),
        "data fingerprint": str(data.get("fingerprint") or "")[:12],
        "train examples": data.get("train_examples"),
        "validation examples": data.get("validation_examples"),
        "model": card.base_model_of(record),
    }
    declared = [spec.name for spec in dataclasses.fields(RunSettings)]
    # Declared order first (the Train tab's), then what another version of the app wrote.
    for name in declared + sorted(set(settings) - set(declared)):
        if name in settings and name not in NOT_COMPARED and name not in ("source", "model"):
            rows[name] = settings[name]
    for name in ("precision", "four_bit", "gradient_checkpointing", "batch_size", "sequence_length"):
        if name in plan:
            rows[f"plan: {name}"] = plan[name]
    return rows


def settings_table(folders: list[runs.RunFolder], records: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per result, data fact, setting or resolved plan value, one column per run, and DIFFERS."""
    columns = [run_rows(folder, record) for folder, record in zip(folders, records)]
    names = list(dict.fromkeys(name for column in columns for name in column))
    table = pd.DataFrame({ROW: names})
    for folder, column in zip(folders, columns):
        table[folder.run_id] = [shown(column.get(name)) for name in names]
    values = table[[folder.run_id for folder in folders]]
    table[DIFFERS] = values.nunique(axis=1) > 1
    return table


def compare(folders: list[runs.RunFolder]) -> Comparison:
    """The runs (opened with `open_runs`) compared; fewer than two is a UserError saying so."""
    if len(folders) < MIN_RUNS:
        raise UserError(f"Pick at least {MIN_RUNS} runs to compare.")
    records = [folder.read() for folder in folders]
    colours = {folder.run_id: COLOURS[i % len(COLOURS)] for i, folder in enumerate(folders)}
    run_ids = [folder.run_id for folder in folders]
    return Comparison(run_ids, curves(folders), settings_table(folders, records), colours, legend_names(run_ids))
