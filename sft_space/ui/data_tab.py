"""Data tab: pick a source, see every problem, and see examples as the model sees them.

The functions above `build` take and return plain values (tests call them directly); `build` only lays out
widgets and wires them to those functions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from .. import access, catalog, checks, data, isolation
from ..errors import UserError
from ..settings import DataSettings, field_help
from .chatml_html import to_html
from .common import Gate, settings_component

SAMPLE_DATA = Path(__file__).resolve().parent.parent / "samples" / "captain_byte.jsonl"
HISTOGRAM_BINS = 20
HISTOGRAM_COLOURS = {"all tokens": "#64748b", "trained tokens": "#ca8a04"}  # trained: the preview's highlight
PROBLEM_ROWS_PER_CODE = 20
PREVIEW_EXAMPLES = 1000  # examples a session keeps to show; every count covers all of them
HELP = {f.name: field_help(DataSettings, f.name) for f in dataclasses.fields(DataSettings)}


def summary_markdown(report: checks.Report) -> str:
    stats = report.stats()
    verdict = (
        f"✅ All {report.valid_rows} rows are valid." if not report.errors
        else f"⚠️ {report.invalid_rows} of {report.rows} rows have errors; {report.valid_rows} are valid. "
        "Fix them in your file, or tick *Skip invalid rows* to train on the valid ones."
    )
    lines = [
        f"**{report.source}** · {data.FORMAT_NAMES[report.format]} · {report.rows} rows",
        "",
        verdict,
        "",
        f"Trained tokens: **{stats['total_trained_tokens']:,}** of {stats['total_tokens']:,} · "
        f"median example {stats['tokens_per_example']['median']} tokens · "
        f"rows over the maximum length ({report.max_length}): {stats['rows_over_max_length']}",
    ]
    lines += [f"- ⚠️ {w.message}" for w in report.warnings if w.row is None]
    return "\n".join(lines)


def _severity(code: str) -> str:
    return "warning" if code in checks.WARNING_CODES else "error"


def problem_counts_table(report: checks.Report) -> pd.DataFrame:
    """Every problem code with its complete count, errors first."""
    counts = sorted(report.problem_counts().items(), key=lambda item: (_severity(item[0]) != "error", item[0]))
    rows = [(code, _severity(code), n, checks.PROBLEM_CODES[code]) for code, n in counts]
    return pd.DataFrame(rows, columns=["code", "severity", "rows", "meaning"])


def problem_rows_table(report: checks.Report) -> pd.DataFrame:
    """Up to PROBLEM_ROWS_PER_CODE rows of each code, spread over the data: a file with tens of thousands of
    problems stays readable (the counts above are complete)."""
    problems = [p for code in report.problem_counts() for p in report.sample_rows(code, PROBLEM_ROWS_PER_CODE)
                if p.row is not None]
    rows = [(p.row, _severity(p.code), p.code, p.message) for p in sorted(problems, key=lambda p: p.row)]
    return pd.DataFrame(rows, columns=["row", "severity", "code", "what to do"])


def statistics_table(report: checks.Report) -> pd.DataFrame:
    stats = report.stats()
    keys = ("min", "p10", "median", "p90", "max")
    rows = [
        (label, *(stats[name][k] for k in keys))
        for label, name in (("turns per example", "turns_per_example"), ("tokens per example", "tokens_per_example"),
                            ("trained tokens per example", "trained_tokens_per_example"))
    ]
    return pd.DataFrame(rows, columns=["", *keys])


def token_histogram(report: checks.Report) -> pd.DataFrame | None:
    """Examples per token-count bin, for all tokens and trained tokens: one frame of both, long format, the same
    bins for both, every bin from zero to the longest example (empty ones too, so each line drops to zero where no
    example is). Drawn as lines, one per kind: Gradio's bar plot stacks bars that share a position, which would
    add the two counts up."""
    if not report.token_counts:
        return None
    all_tokens = pd.Series([counts[1] for counts in report.token_counts], dtype="int64")
    width = max(1, -(-(int(all_tokens.max()) + 1) // HISTOGRAM_BINS))  # trained tokens are never more than all
    starts = range(0, int(all_tokens.max()) + 1, width)
    frames = []
    for index, label in ((1, "all tokens"), (2, "trained tokens")):
        values = pd.Series([counts[index] for counts in report.token_counts], dtype="int64")
        counted = (values // width * width).value_counts().reindex(starts, fill_value=0)
        # Each bin at its middle, as a histogram's bar would stand.
        frames.append(pd.DataFrame({"tokens": counted.index + width / 2, "examples": counted.values, "kind": label}))
    return pd.concat(frames, ignore_index=True)


def preview_html(report: checks.Report | None, model: str, number: int, gate: Gate | None = None) -> str:
    """Example `number` (1-based, among the examples kept for the preview) rendered with trained tokens
    highlighted, in a worker process (the template may be a stranger's) under the limits of `gate`'s settings,
    which also names the models whose tokenizers the app keeps loaded (the defaults and none without a gate)."""
    if report is None or not report.valid_examples:
        return "<p>No valid example to show yet.</p>"
    shown = len(report.valid_examples)
    number = min(max(int(number), 1), shown)
    example = report.valid_examples[number - 1]
    rendered = checks.render_in_worker(catalog.tokenizer_loader(model, gate.offered_models if gate else ()), example,
                                       isolation.Limits.of(gate.settings if gate else None))
    of = f"{shown:,}" if shown == len(report.token_counts) else f"the first {shown:,} of {len(report.token_counts):,}"
    return f"<p><b>Example {number} of {of}</b> (row {example.row} of the file)</p>" + to_html(rendered)


# ----------------------------------------------------------------------------------------------- layout


def check_source_in_stages(gate: Gate, visitor: str, upload: str | None, hub_id: str, use_sample: bool, model: str,
                           columns: str, hub_config: str, hub_split: str, max_length: int,
                           progress: Any = None, limits: Mapping[str, Any] | None = None) -> Iterator[tuple]:
    """Check what the visitor chose: the sample, their own upload (the handle its upload returned), or a Hub id.
    Yields the tab's outputs: for a large Hub dataset first a first look at its first rows, then the whole report
    (`checks.check_data_in_stages`). `limits`: the operator's data limits (`access.data_limits`), which the
    checked settings carry on to training."""
    if not (use_sample or upload or (hub_id or "").strip()):
        raise gr.Error("Upload a file, name a Hub dataset, or pick the sample dataset first.")
    kind = "sample" if use_sample else "upload" if upload else "hub"
    model = gate.model(model)
    try:
        source = access.data_source(kind, upload if upload else hub_id, visitor, gate.runs_dir, gate.settings,
                                    SAMPLE_DATA)
        settings = DataSettings(source=source, columns=columns or "", hub_config=hub_config or "",
                                hub_split=hub_split or "train", max_length=int(max_length), **(limits or {}))
        # The report lives in the visitor's session: it keeps a preview of the examples, not all of them (training
        # reads the data again in its own process).
        # Checked in a worker process, under the operator's limits: the data and the template are strangers'.
        for report in checks.check_data_in_worker(settings, catalog.tokenizer_loader(model, gate.offered_models),
                                                  isolation.Limits.of(gate.settings),
                                                  on_progress=_progress_bar(progress), keep_examples=PREVIEW_EXAMPLES):
            yield _outputs(report, settings, model, gate)
    except UserError as err:
        raise gr.Error(str(err)) from None


def check_source(*args: Any, **kwargs: Any) -> tuple:
    """`check_source_in_stages`'s last outputs: the whole report."""
    *_, outputs = check_source_in_stages(*args, **kwargs)
    return outputs


def _outputs(report: checks.Report, settings: DataSettings, model: str, gate: Gate | None = None) -> tuple:
    summary = summary_markdown(report)
    if report.first_look:
        summary = (f"⏳ **A first look at the first {report.rows:,} rows**; the whole dataset is being checked "
                   "(the counts below will grow).\n\n" + summary)
    return (
        report,
        settings,
        summary,
        problem_counts_table(report),
        problem_rows_table(report),
        statistics_table(report),
        token_histogram(report),
        gr.Number(value=1, minimum=1, maximum=max(len(report.valid_examples), 1),
                  label=f"Example (1–{max(len(report.valid_examples), 1):,})"),
        preview_html(report, model, 1, gate),
    )


def _progress_bar(progress: Any) -> Any:
    """The check's progress, as Gradio's progress bar shows it (rows read, then rows checked of all)."""
    if progress is None:
        return None

    def show(done: int, total: int | None) -> None:
        if total:
            progress((done, total), desc="Checking rows", unit="rows")
        else:
            progress(None, desc=f"Reading: {done:,} rows")
    return show


def hub_choices(value: str, config: str, split: str, local_paths: bool = False) -> tuple[Any, Any, str]:
    """The configs and splits of the Hub dataset the visitor typed, offered in the config and split boxes (which
    still take a typed value), and a note: what was found, or why nothing was (the Hub did not answer, the id is
    not one). Never an error: the boxes stay usable whatever the Hub says."""
    unchanged = gr.update(), gr.update()
    if not (value or "").strip():
        return *unchanged, ""
    try:
        # The trust boundary first: only a Hub id is looked up, never a file or folder of this machine.
        dataset_id = access.hub_id(value, "dataset")
    except UserError as err:
        # With local access on, the box also takes a path on this machine, which has no configs to offer.
        return *unchanged, "" if local_paths else f"⚠️ {err}"
    try:
        found = data.hub_dataset_choices(dataset_id, config or None)
    except UserError as err:
        # Choices of another dataset would mislead; the values typed stay.
        return gr.update(choices=[]), gr.update(choices=[]), f"⚠️ {err}"
    if found.splits and split not in found.splits:
        split = DataSettings.hub_split if DataSettings.hub_split in found.splits else found.splits[0]
    note = (f"**{dataset_id}** · configs: {', '.join(found.configs)} · splits of *{found.config}*: "
            f"{', '.join(found.splits) or 'none listed'}")
    return gr.update(choices=found.configs, value=found.config), gr.update(choices=found.splits, value=split), note


def keep_upload(gate: Gate, visitor: str, uploaded: str | None) -> str | None:
    """The handle of the visitor's own copy of what they uploaded (None when the file was removed)."""
    if not uploaded:
        return None
    try:
        return str(access.keep_upload(gate.runs_dir, visitor, uploaded, gate.settings))
    except UserError as err:
        raise gr.Error(str(err)) from None


@dataclasses.dataclass(frozen=True)
class DataTab:
    """What the Train tab uses of the Data tab."""

    report: gr.State  # the checked data's report (None until a check)
    settings: gr.State  # the settings the data was checked with, the operator's limits included
    skip_invalid: gr.Checkbox  # train on the valid rows only, leaving the invalid ones out


def build(gate: Gate, model: gr.Dropdown, session: gr.BrowserState) -> DataTab:
    """Lay out the Data tab; returns what the Train tab uses."""
    limits = access.data_limits()
    # The report can be large and raw clients never close their page: it is kept a while after the check.
    report_state = gr.State(None, time_to_live=gate.settings.session_minutes * 60)
    settings_state = gr.State(None)
    # Server-side: the handle of this page's upload. The page cannot set it; only the upload handler does.
    upload_handle = gr.State(None)
    with gr.Row():
        with gr.Column(scale=2):
            upload = gr.File(label="Your data (.jsonl, .json, .csv, .parquet)", file_types=list(data.FILE_SUFFIXES),
                             type="filepath", elem_id="data-upload")
            hub_id = gr.Textbox(label="…or a Hub dataset id", placeholder="owner/name",
                                info=("a Hub id, or a file or folder on this machine" if gate.settings.local_paths
                                      else None))
            with gr.Row():
                # Filled from the Hub when an id is typed; a typed value is taken too (the Hub may not answer).
                hub_config = gr.Dropdown(choices=[], value=DataSettings.hub_config, allow_custom_value=True,
                                         label="Hub config", info=HELP["hub_config"], elem_id="hub-config")
                hub_split = gr.Dropdown(choices=[DataSettings.hub_split], value=DataSettings.hub_split,
                                        allow_custom_value=True, label="Split", info=HELP["hub_split"],
                                        elem_id="hub-split")
            hub_note = gr.Markdown(elem_id="hub-note")
            use_sample = gr.Checkbox(label="Use the sample dataset (Captain Byte, 160 pirate-flavoured conversations)")
        with gr.Column(scale=1):
            max_length = settings_component(DataSettings.__dataclass_fields__["max_length"],
                                            label="Maximum length (tokens)")
            with gr.Accordion("Column mapping", open=False):
                columns = gr.Textbox(label="Column mapping", info=HELP["columns"])
            check = gr.Button("Check data", variant="primary", elem_id="check-data")
    summary = gr.Markdown(elem_id="data-summary")
    skip_invalid = gr.Checkbox(label="Skip invalid rows", value=DataSettings.skip_invalid_rows,
                               info=HELP["skip_invalid_rows"])
    with gr.Row():
        counts = gr.Dataframe(label="Problems by code", interactive=False, elem_id="problem-counts")
        statistics = gr.Dataframe(label="Statistics (valid examples)", interactive=False)
    # Both axes from zero; no fixed height, which would cut off the legend below the plot.
    histogram = gr.LinePlot(x="tokens", y="examples", color="kind", label="Tokens per example", x_lim=[0, None],
                            y_lim=[0, None], color_map=HISTOGRAM_COLOURS, elem_id="token-histogram")
    problems = gr.Dataframe(label="Problem rows", interactive=False, wrap=True, elem_id="problem-rows", max_height=320)
    gr.Markdown("### Preview: what the model sees (trained tokens highlighted)")
    with gr.Row():
        previous_example = gr.Button("◀ Previous", size="sm", scale=0)
        example_number = gr.Number(label="Example", value=1, minimum=1, precision=0, scale=1)
        next_example = gr.Button("Next ▶", size="sm", scale=0)
    preview = gr.HTML(elem_id="chatml-preview")

    def on_upload(path, token):
        visitor, token = gate.upload_from(token, path)
        return keep_upload(gate, visitor, path), token

    def on_hub_id(value, config, split):
        return hub_choices(value, config, split, gate.settings.local_paths)

    # Asked when the id is entered or left, and again when another config is picked (its splits differ). A page
    # event only: the app keeps it off the API (see ui/__init__.py).
    gr.on([hub_id.submit, hub_id.blur, hub_config.input], on_hub_id, inputs=[hub_id, hub_config, hub_split],
          outputs=[hub_config, hub_split, hub_note], api_name="hub_choices")
    upload.upload(on_upload, inputs=[upload, session], outputs=[upload_handle, session])
    upload.clear(lambda: None, outputs=upload_handle)
    def on_check(token, upload, hub, sample, model_name, columns, hub_config, hub_split, length,
                 progress=gr.Progress()):
        yield from check_source_in_stages(gate, gate.visitor(token), upload, hub, sample, model_name, columns,
                                          hub_config, hub_split, length, progress, limits)

    check.click(
        on_check,
        inputs=[session, upload_handle, hub_id, use_sample, model, columns, hub_config, hub_split, max_length],
        outputs=[report_state, settings_state, summary, counts, problems, statistics, histogram, example_number, preview],
        api_name="check_data",
    )
    example_number.change(lambda report, name, n: preview_html(report, gate.model(name), n, gate),
                          inputs=[report_state, model, example_number], outputs=preview)
    previous_example.click(lambda n: max(int(n or 1) - 1, 1), inputs=example_number, outputs=example_number)
    next_example.click(lambda report, n: min(int(n or 1) + 1, max(len(report.valid_examples) if report else 1, 1)),
                       inputs=[report_state, example_number], outputs=example_number)
    return DataTab(report_state, settings_state, skip_invalid)
