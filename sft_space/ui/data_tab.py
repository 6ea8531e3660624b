"""Data tab: pick a source, see every problem, and see examples as the model sees them.

The functions above `build` take and return plain values (tests call them directly); `build` only lays out
widgets and wires them to those functions.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Callable

import gradio as gr
import pandas as pd

from .. import access, catalog, checks, data, formats, isolation
from ..errors import UserError
from ..settings import DataSettings, field_help
from .chatml_html import to_html
from .common import BOX_NAMES, Gate, markdown_text, page_words, refused_markdown, settings_component

SAMPLE_DATA = Path(__file__).resolve().parent.parent / "samples" / "captain_byte.jsonl"
HISTOGRAM_BINS = 20
HISTOGRAM_COLOURS = {"all tokens": "#64748b", "trained tokens": "#ca8a04"}  # trained: the preview's highlight
PROBLEM_ROWS_PER_CODE = 20
PREVIEW_EXAMPLES = 1000  # examples a session keeps to show; every count covers all of them
HELP = {f.name: field_help(DataSettings, f.name) for f in dataclasses.fields(DataSettings)}
# The data a visitor checks and trains on: one of these, picked in the tab's source radio (the value the
# check_data endpoint takes).
UPLOAD, HUB, SAMPLE = "upload", "hub", "sample"
SOURCE_CHOICES = [("Your file", UPLOAD), ("A Hub dataset", HUB),
                  ("Use the sample dataset (Captain Byte, 160 pirate-flavoured conversations)", SAMPLE)]
TABLE_COLUMNS = {
    "counts": ["code", "severity", "rows", "meaning"],
    "problems": ["row", "severity", "code", "what to do"],
    "statistics": ["", "min", "p10", "median", "p90", "max"],
}


def summary_markdown(report: checks.Report) -> str:
    stats = report.stats()
    verdict = (
        f"✅ All {report.valid_rows} rows are valid." if not report.errors
        else f"⚠️ {report.invalid_rows} of {report.rows} rows have errors. "
        + checks.invalid_rows_advice(report.valid_rows, f"tick *{checks.SKIP_INVALID_LABEL}*")
    )
    lines = [
        f"**{markdown_text(report.source)}** · {formats.FORMAT_NAMES[report.format]} · {report.rows} rows",
        "",
        verdict,
        "",
        f"Trained tokens: **{stats['total_trained_tokens']:,}** of {stats['total_tokens']:,} · "
        f"median example {stats['tokens_per_example']['median']} tokens · "
        f"rows over the maximum length ({report.max_length}): {stats['rows_over_max_length']}",
    ]
    lines += [f"- ⚠️ {markdown_text(page_words(w.message))}" for w in report.warnings if w.row is None]
    return "\n".join(lines)


def _severity(code: str) -> str:
    return "warning" if code in checks.WARNING_CODES else "error"


def problem_counts_table(report: checks.Report) -> pd.DataFrame:
    """Every problem code with its complete count, errors first."""
    counts = sorted(report.problem_counts().items(), key=lambda item: (_severity(item[0]) != "error", item[0]))
    rows = [(code, _severity(code), n, checks.PROBLEM_CODES[code]) for code, n in counts]
    return pd.DataFrame(rows, columns=TABLE_COLUMNS["counts"])


def problem_rows_table(report: checks.Report) -> pd.DataFrame:
    """Up to PROBLEM_ROWS_PER_CODE rows of each code, spread over the data: a file with tens of thousands of
    problems stays readable (the counts above are complete)."""
    problems = [p for code in report.problem_counts() for p in report.sample_rows(code, PROBLEM_ROWS_PER_CODE)
                if p.row is not None]
    rows = [(p.row, _severity(p.code), p.code, page_words(p.message)) for p in sorted(problems, key=lambda p: p.row)]
    return pd.DataFrame(rows, columns=TABLE_COLUMNS["problems"])


def statistics_table(report: checks.Report) -> pd.DataFrame:
    stats = report.stats()
    keys = TABLE_COLUMNS["statistics"][1:]
    rows = [
        (label, *(stats[name][k] for k in keys))
        for label, name in (("turns per example", "turns_per_example"), ("tokens per example", "tokens_per_example"),
                            ("trained tokens per example", "trained_tokens_per_example"))
    ]
    return pd.DataFrame(rows, columns=TABLE_COLUMNS["statistics"])


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
        raise gr.Error(page_words(err.message)) from None


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
    # The names of configs and splits are the dataset's, written by whoever made it.
    note = (f"**{dataset_id}** · configs: {', '.join(map(markdown_text, found.configs))} · splits of "
            f"*{markdown_text(found.config)}*: {', '.join(map(markdown_text, found.splits)) or 'none listed'}")
    return gr.update(choices=found.configs, value=found.config), gr.update(choices=found.splits, value=split), note


def keep_upload(gate: Gate, visitor: str, uploaded: str | None) -> str | None:
    """The handle of the visitor's own copy of what they uploaded (None when the file was removed)."""
    if not uploaded:
        return None
    try:
        return str(access.keep_upload(gate.runs_dir, visitor, uploaded, gate.settings))
    except UserError as err:
        raise gr.Error(str(err)) from None


@dataclasses.dataclass
class DataChoice:
    """What a visitor chose in the Data tab, kept by the server for their signed id, so that a reload shows it again
    (and checks it again, when the last check of it succeeded)."""

    source: str = UPLOAD  # UPLOAD, HUB or SAMPLE
    upload: str | None = None  # the handle the upload handler kept; never a value a page sent
    hub_id: str = ""
    hub_config: str = DataSettings.hub_config
    hub_split: str = DataSettings.hub_split
    columns: str = DataSettings.columns
    max_length: int = DataSettings.max_length
    skip_invalid: bool = DataSettings.skip_invalid_rows
    checked: bool = False  # the last check of these values succeeded


FORM_FIELDS = ("source", "hub_id", "hub_config", "hub_split", "columns", "max_length")


def form_values(choice: DataChoice) -> dict[str, Any]:
    """The form's part of a DataChoice (what a check reads), by name."""
    return {name: getattr(choice, name) for name in FORM_FIELDS}


# Of each value typed in the form, what is kept: a Hub id or a column mapping is far shorter.
KEPT_CHARACTERS = 1000


def form_choice(source: str | None, hub_id: str | None, hub_config: str | None, hub_split: str | None,
                columns: str | None, max_length: Any) -> dict[str, Any]:
    """The form's values as a DataChoice keeps them: a page can send anything, so each is bounded (what they mean
    is decided again when they are checked)."""
    try:
        length = int(max_length)
        DataSettings(max_length=length)
    except (TypeError, ValueError, UserError):
        length = DataSettings.max_length
    return {"source": source if source in (UPLOAD, HUB, SAMPLE) else UPLOAD, "max_length": length,
            **{name: str(value or "")[:KEPT_CHARACTERS] for name, value in
               (("hub_id", hub_id), ("hub_config", hub_config), ("hub_split", hub_split or DataSettings.hub_split),
                ("columns", columns))}}


class DataChoices:
    """Every visitor's DataChoice, in the server's memory: those of the `capacity` visitors who acted last (ids
    are free, so what is kept is bounded; a visitor pushed out finds the tab as on a first visit)."""

    def __init__(self, capacity: int = 10_000):
        self._capacity = capacity
        self._choices: OrderedDict[str, DataChoice] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, visitor: str) -> DataChoice:
        with self._lock:
            return dataclasses.replace(self._choices.get(visitor) or DataChoice())

    def update(self, visitor: str, **changes: Any) -> DataChoice:
        with self._lock:
            choice = dataclasses.replace(self._choices.pop(visitor, None) or DataChoice(), **changes)
            self._choices[visitor] = choice
            while len(self._choices) > self._capacity:
                self._choices.popitem(last=False)
            return dataclasses.replace(choice)


def cleared_outputs(summary: str) -> tuple:
    """The check's outputs with no report: nothing checked (the Train tab then says so), and `summary` saying why."""
    return (None, None, summary, *(pd.DataFrame(columns=TABLE_COLUMNS[name])
                                   for name in ("counts", "problems", "statistics")),
            None, gr.Number(value=1, minimum=1, maximum=1, label="Example"), preview_html(None, "", 1))


def chosen_summary(choice: DataChoice) -> str:
    """The summary while the data chosen is not checked yet: which data Check will read."""
    if choice.source == SAMPLE:
        chosen = "**The sample dataset** is chosen"
        if choice.upload:
            chosen += (f" (your file {markdown_text(Path(choice.upload).name)} is set aside: choose *Your file* to "
                       "use it)")
    elif choice.source == HUB:
        chosen = (f"The Hub dataset **{markdown_text(choice.hub_id)}** is chosen" if choice.hub_id.strip()
                  else "Type a Hub dataset id")
    elif choice.upload:
        chosen = f"Your file **{markdown_text(Path(choice.upload).name)}** is chosen"
    else:
        return "Upload a file, type a Hub dataset id or choose the sample, then press **Check data**."
    return chosen + ". Press **Check data**: nothing is trained until it is checked."


def upload_note(handle: str | None) -> str:
    """The file the server keeps for this visitor (after a reload the upload box is empty, the file is not)."""
    return f"Kept on the server: **{markdown_text(Path(handle).name)}**" if handle else ""


def check_choice(gate: Gate, visitor: str, handle: str | None, source: str, hub_id: str, model: str, columns: str,
                 hub_config: str, hub_split: str, max_length: int, progress: Any = None,
                 limits: Mapping[str, Any] | None = None) -> Iterator[tuple]:
    """Check the data chosen in the source radio, and only that: the tab's outputs, stage by stage. A refusal
    clears them (no report, no checked settings) and says why in the summary."""
    try:
        if source == UPLOAD and not handle:
            raise gr.Error("Upload a file first, or choose a Hub dataset or the sample dataset.")
        yield from check_source_in_stages(gate, visitor, handle if source == UPLOAD else None,
                                          hub_id if source == HUB else "", source == SAMPLE, model, columns,
                                          hub_config, hub_split, max_length, progress, limits)
    except (gr.Error, UserError) as err:
        yield cleared_outputs(refused_markdown("check_data", err))


@dataclasses.dataclass(frozen=True)
class DataTab:
    """What the rest of the app uses of the Data tab: the Train tab its checked data, the page's load its restore."""

    report: gr.State  # the checked data's report (None until a check)
    settings: gr.State  # the settings the data was checked with, the operator's limits included
    skip_invalid: gr.Checkbox  # train on the valid rows only, leaving the invalid ones out
    # The page's load event: the visitor's choices again, checked again if they were (after a reload).
    on_load: Callable[..., Iterator[tuple]]
    load_inputs: list[gr.components.Component]
    load_outputs: list[gr.components.Component]


def build(gate: Gate, model: gr.Dropdown, session: gr.BrowserState) -> DataTab:
    """Lay out the Data tab; returns what the Train tab uses."""
    limits = access.data_limits()
    choices = DataChoices()
    # The report can be large and raw clients never close their page: it is kept a while after the check.
    report_state = gr.State(None, time_to_live=gate.settings.session_minutes * 60)
    settings_state = gr.State(None)
    # Server-side: the handle of this page's upload. The page cannot set it; only the upload handler does.
    upload_handle = gr.State(None)
    with gr.Row():
        with gr.Column(scale=2):
            # One source at a time, said by this radio: uploading a file or typing a Hub id picks it here, and
            # Check reads only what is picked.
            source = gr.Radio(SOURCE_CHOICES, value=UPLOAD, label="Data to check and train on", elem_id="data-source")
            upload = gr.File(label="Your data (.jsonl, .json, .csv, .parquet)", file_types=list(data.FILE_SUFFIXES),
                             type="filepath", elem_id="data-upload")
            kept_file = gr.Markdown(elem_id="upload-note")
            hub_id = gr.Textbox(label="Hub dataset id", placeholder="owner/name", elem_id="hub-id",
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
        with gr.Column(scale=1):
            max_length = settings_component(DataSettings.__dataclass_fields__["max_length"],
                                            label=f"{BOX_NAMES['max_length']} (tokens)")
            with gr.Accordion(BOX_NAMES["columns"], open=False):
                columns = gr.Textbox(label=BOX_NAMES["columns"], info=HELP["columns"])
            check = gr.Button("Check data", variant="primary", elem_id="check-data")
    summary = gr.Markdown(chosen_summary(DataChoice()), elem_id="data-summary")
    skip_invalid = gr.Checkbox(label=BOX_NAMES["skip_invalid_rows"], value=DataSettings.skip_invalid_rows,
                               info=HELP["skip_invalid_rows"])
    with gr.Row():
        # Empty tables with their headers until a check; widths that fit the headers ("severity" on one line).
        counts = gr.Dataframe(pd.DataFrame(columns=TABLE_COLUMNS["counts"]), label="Problems by code",
                              interactive=False, wrap=True, column_widths=["31%", "14%", "9%", "46%"],
                              elem_id="problem-counts")
        statistics = gr.Dataframe(pd.DataFrame(columns=TABLE_COLUMNS["statistics"]),
                                  label="Statistics (valid examples)", interactive=False, elem_id="data-statistics")
    # Both axes from zero; no fixed height, which would cut off the legend below the plot.
    histogram = gr.LinePlot(x="tokens", y="examples", color="kind", label="Tokens per example", x_lim=[0, None],
                            y_lim=[0, None], color_map=HISTOGRAM_COLOURS, elem_id="token-histogram")
    problems = gr.Dataframe(pd.DataFrame(columns=TABLE_COLUMNS["problems"]), label="Problem rows", interactive=False,
                            wrap=True, column_widths=["7%", "10%", "20%", "63%"], elem_id="problem-rows",
                            max_height=320)
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
    form = [source, hub_id, hub_config, hub_split, columns, max_length]
    check_outputs = [report_state, settings_state, summary, counts, problems, statistics, histogram, example_number,
                     preview]

    def on_new_file(path, token):
        try:
            handle, token = on_upload(path, token)
        except (gr.Error, UserError) as err:
            if visitor := gate.known_visitor(token):
                choices.update(visitor, source=UPLOAD, upload=None, checked=False)
            # The box is an output for this: a refused file leaves it (what it shows is what Check would read).
            return None, None, gr.skip(), UPLOAD, "", *cleared_outputs(refused_markdown("upload", err))
        choice = choices.update(gate.visitor(token), source=UPLOAD, upload=handle, checked=False)
        return gr.skip(), handle, token, UPLOAD, upload_note(handle), *cleared_outputs(chosen_summary(choice))

    upload.upload(on_new_file, inputs=[upload, session],
                  outputs=[upload, upload_handle, session, source, kept_file, *check_outputs])

    def on_file_removed(token, *values):
        choice = DataChoice(**form_choice(*values))
        if visitor := gate.known_visitor(token):
            choice = choices.update(visitor, upload=None, checked=False)
        return None, "", *cleared_outputs(chosen_summary(choice))

    upload.clear(on_file_removed, inputs=[session, *form], outputs=[upload_handle, kept_file, *check_outputs])

    def form_changed(token, handle, picked, values):
        """A change of what would be checked (`picked`: the source it picks): the last report no longer says what
        Start would train, so it goes, and the summary says what Check will read."""
        values = form_choice(picked, *values[1:])
        choice = DataChoice(**values, upload=handle)
        if visitor := gate.known_visitor(token):
            choice = choices.update(visitor, **values, checked=False)
        # The upload box is an output (left as it is) so that a change clears the red "Error" Gradio leaves on it
        # after a file of the wrong type.
        return gr.skip(), values["source"], *cleared_outputs(chosen_summary(choice))

    def on_form_change(token, handle, *values):
        return form_changed(token, handle, values[0], values)

    def on_hub_typed(token, handle, *values):
        return form_changed(token, handle, HUB, values)

    changes = dict(inputs=[session, upload_handle, *form], outputs=[upload, source, *check_outputs],
                   show_progress="hidden", trigger_mode="always_last")
    gr.on([source.input, hub_config.input, hub_split.input, columns.input, max_length.input], on_form_change,
          **changes)
    hub_id.input(on_hub_typed, **changes)

    def on_skip(token, skip):
        if visitor := gate.known_visitor(token):
            choices.update(visitor, skip_invalid=bool(skip))

    skip_invalid.input(on_skip, inputs=[session, skip_invalid], show_progress="hidden")

    def on_check(token, handle, source_value, hub, model_name, columns_value, config, split, length,
                 progress=gr.Progress()):
        try:
            visitor = gate.visitor(token)
        except gr.Error as err:
            yield cleared_outputs(refused_markdown("check_data", err))
            return
        yield from checked_and_kept(visitor, handle, model_name, progress,
                                    dict(zip(FORM_FIELDS, (source_value, hub, config, split, columns_value, length))))

    def checked_and_kept(visitor, handle, model_name, progress, values):
        """The check of the form's `values` (by name), stage by stage. The values are kept for the visitor, and
        whether the check succeeded; values too long to keep whole are never restored as checked."""
        outputs = None
        for outputs in check_choice(gate, visitor, handle, values["source"], values["hub_id"], model_name,
                                    values["columns"], values["hub_config"], values["hub_split"],
                                    values["max_length"], progress, limits):
            yield outputs
        report = outputs[0] if outputs else None
        whole = all(len(str(values[name] or "")) <= KEPT_CHARACTERS
                    for name in ("hub_id", "hub_config", "hub_split", "columns"))
        choices.update(visitor, **form_choice(**values),
                       checked=report is not None and not report.first_look and whole)

    check.click(
        on_check,
        inputs=[session, upload_handle, source, hub_id, model, columns, hub_config, hub_split, max_length],
        outputs=check_outputs,
        api_name="check_data",
    )

    def restore(token, model_name, progress=gr.Progress()):
        """The visitor's choices as they left them, their upload checked to be still theirs; checked again when the
        last check of them succeeded (the report lives in the page's session, which a reload ends)."""
        visitor = gate.known_visitor(token)
        if visitor is None:  # a first visit: nothing kept yet
            yield tuple(gr.skip() for _ in range(len(form) + 3 + len(check_outputs)))
            return
        choice = choices.get(visitor)
        try:
            handle = str(access.own_upload(gate.runs_dir, visitor, choice.upload)) if choice.upload else None
        except UserError:
            handle = None
        restored = (*form_values(choice).values(), choice.skip_invalid, handle, upload_note(handle))
        if choice.source == UPLOAD and choice.upload and handle is None:
            gone = (f"Your file {markdown_text(Path(choice.upload).name)} is not kept on the server any more (files "
                    "are kept for a while, a few per visitor): upload it again.")
            yield *restored, *cleared_outputs(gone)
            return
        if not choice.checked:
            yield *restored, *cleared_outputs(chosen_summary(dataclasses.replace(choice, upload=handle)))
            return
        for outputs in checked_and_kept(visitor, handle, model_name, progress, form_values(choice)):
            yield *restored, *outputs

    def on_model_change(token, handle, model_name, progress=gr.Progress()):
        """Another model picked: the preview and the token counts are its tokenizer's, so checked data is checked
        again with it (what the tab shows is what Start would train)."""
        visitor = gate.known_visitor(token)
        choice = choices.get(visitor) if visitor else None
        if choice is None or not choice.checked:
            yield tuple(gr.skip() for _ in check_outputs)
            return
        yield from checked_and_kept(visitor, handle, model_name, progress, form_values(choice))

    model.input(on_model_change, inputs=[session, upload_handle, model], outputs=check_outputs,
                trigger_mode="always_last")

    example_number.change(lambda report, name, n: preview_html(report, gate.model(name), n, gate),
                          inputs=[report_state, model, example_number], outputs=preview)
    previous_example.click(lambda n: max(int(n or 1) - 1, 1), inputs=example_number, outputs=example_number)
    next_example.click(lambda report, n: min(int(n or 1) + 1, max(len(report.valid_examples) if report else 1, 1)),
                       inputs=[report_state, example_number], outputs=example_number)
    return DataTab(report_state, settings_state, skip_invalid, restore, [session, model],
                   [*form, skip_invalid, upload_handle, kept_file, *check_outputs])
