"""Train tab: model, preset, advanced settings generated from RunSettings, Start/Stop/Resume, live plot.

The job runs in the shared JobManager; this tab only submits it and re-reads its run folder every second, so a
reloaded page (same browser) re-attaches to the visitor's running (or latest) job: its curve, and the preset,
settings, command line and data of that run, read from its run.json.
"""

from __future__ import annotations

import dataclasses
import hashlib
import html
import logging
from pathlib import Path
from typing import Any, Callable

import gradio as gr
import pandas as pd
from huggingface_hub import JobHardware

from .. import access, checks, estimate, events, formats, hub_jobs, isolation, jobs, models, runs, storage
from ..errors import UserError
from ..hardware import Hardware, detect_hardware
from ..settings import (DEFAULT_PRESET, PRESET_NAMES, DataSettings, DoctorSettings, RunSettings, field_help, field_type,
                         run_settings, train_command)
from .common import Gate, markdown_text, refusal_words, refused_markdown, settings_component
from .model_choices import picker_choices

log = logging.getLogger(__name__)

ADVANCED_GROUPS = (("lora", "LoRA"), ("schedule", "Schedule"), ("hardware", "Speed and memory"))
# No data is None, not an empty frame: a plot first drawn from an empty frame never shows its lines later.
EMPTY_CURVE = None
RAW, SMOOTHED, VALIDATION = "train (raw)", "train (smoothed)", "validation"
# The raw points faint, the smoothed loss (the headline) strong.
CURVE_COLOURS = {RAW: "#a5b4fc", SMOOTHED: "#4f46e5", VALIDATION: "#f97316"}
# gr.LinePlot options of every loss plot (the Runs tab's too). No height: with a fixed height the plot's box clips
# the legend below it to its title. No legend title: the series names say it all ("split" alone said nothing).
# Axis labels rounded: 3 significant digits of loss ("3.49", not "3.489136"), whole steps ("1", not "1.000000").
# Steps are rounded to significant digits in plain notation ("r"): the plot gives a format the precision its tick
# spacing needs, and with "g" ticks 100, 110 at precision 2 read "1e+2 1.1e+2".
STEP_AXIS_FORMAT = "~r"
LOSS_PLOT = {"x": "step", "y": "loss", "color": "split", "color_map": CURVE_COLOURS, "color_title": "",
             "x_title": "step", "y_title": "loss", "x_axis_format": STEP_AXIS_FORMAT, "y_axis_format": ".3~r"}
# gr.LinePlot draws lines only (a point shows on hover): a series of one point would draw nothing, so a lone point
# is drawn as a short level dash around its step, this share of the run's steps wide.
LONE_POINT_WIDTH = 0.02
# How often (seconds) the page reads a training run's measured speed.
SPEED_EVERY_SECONDS = 3.0
UPLOAD_NOTE = ("# {name} was uploaded to this app: run this where your copy of the file is (give its path on "
               "your machine).")


def advanced_fields() -> list[dataclasses.Field]:
    """The settings of the Advanced panel, in the order it shows them (group by group)."""
    return [f for group, _ in ADVANCED_GROUPS for f in dataclasses.fields(RunSettings)
            if f.metadata.get("group") == group]


def settings_from_form(data_settings: DataSettings | None, skip_invalid: bool, model: str, preset: str,
                       runs_dir: str, advanced: dict[str, Any], report: checks.Report | None = None) -> RunSettings:
    if data_settings is None or not data_settings.source:
        raise UserError("Check your data in the Data tab first: there is no checked data.")
    if report is not None and report.errors and not skip_invalid:
        # Said here, before a run is started only to be refused.
        raise UserError(f"{report.invalid_rows} of {report.rows} rows have errors (see the Data tab). "
                        + checks.invalid_rows_advice(report.valid_rows))
    values = {f.name: getattr(data_settings, f.name) for f in dataclasses.fields(DataSettings)}
    values.update(skip_invalid_rows=bool(skip_invalid), model=model or "", output_dir=runs_dir)
    for spec in advanced_fields():
        value = advanced[spec.name]
        values[spec.name] = field_type(spec)(value)
    return run_settings(preset, **values)


def _run_length(entries: list[dict[str, Any]]) -> int:
    """The run's steps, as its metrics say (the last step logged before it said)."""
    lengths = [entry["max_steps"] for entry in entries if isinstance(entry.get("max_steps"), int)]
    return max(lengths[-1] if lengths else 0, *(entry.get("step") or 0 for entry in entries), 1)


def _curve(folder: runs.RunFolder, entries: list[dict[str, Any]]) -> pd.DataFrame | None:
    steps = [entry for entry in entries if entry["event"] == "step"]
    series: dict[str, list[tuple[float, float]]] = {
        RAW: [(entry["step"], entry["loss"]) for entry in steps],
        SMOOTHED: [(entry["step"], entry["loss_smoothed"]) for entry in steps],
        VALIDATION: [(entry["step"], entry["eval_loss"]) for entry in entries if entry["event"] == "evaluation"]}
    if not series[RAW] and not series[VALIDATION]:
        return EMPTY_CURVE
    half = LONE_POINT_WIDTH * _run_length(entries) / 2
    points = []
    for split, values in series.items():
        if len(values) == 1:
            (step, loss), = values
            values = [(step - half, loss), (step + half, loss)]
        points += [(step, loss, split) for step, loss in values]
    try:
        validates = (folder.read().get("data") or {}).get("validation_examples", 0) > 0
    except UserError:
        validates = False
    if validates and not series[VALIDATION]:
        # The plot fixes its series at the first draw: name the validation series with an empty point now, so
        # its line appears when the first validation loss arrives.
        points.append((points[0][0], float("nan"), VALIDATION))
    return pd.DataFrame(points, columns=["step", "loss", "split"])


def loss_curve(run_dir: str | Path | None) -> pd.DataFrame | None:
    """Training loss (raw points and their smoothed line) and validation loss by step, long format for
    gr.LinePlot (see LOSS_PLOT)."""
    if not run_dir:
        return EMPTY_CURVE
    folder = runs.RunFolder(Path(run_dir))
    return _curve(folder, folder.read_metrics())


def loss_plot(run_dir: str | Path | None) -> Any:
    """The Train tab's plot of a run: its curve over the run's whole length (the line grows as it trains, and a
    first point is not the whole width)."""
    if not run_dir:
        return gr.update(value=EMPTY_CURVE)
    folder = runs.RunFolder(Path(run_dir))
    entries = folder.read_metrics()
    curve = _curve(folder, entries)
    if curve is None:
        return gr.update(value=EMPTY_CURVE)
    length = _run_length(entries)
    return gr.update(value=curve, x_lim=[0, length * (1 + LONE_POINT_WIDTH / 2)])


def curve_signature(plot: Any) -> str:
    """What tells one of `loss_plot`'s curves from another (its points and its width), short enough to keep per
    page."""
    value = plot.get("value") if isinstance(plot, dict) else None
    if value is None:
        return "empty"
    # Row hashes in order, a few bytes a point: cheaper than writing the points out, every second of every page.
    rows = pd.util.hash_pandas_object(value, index=False).values.tobytes()
    digest = hashlib.blake2b(rows, digest_size=16).hexdigest()
    return f"{digest} {plot.get('x_lim')}"


def data_line(summary: dict[str, Any]) -> str:
    """What a run trains on, from its record's data summary."""
    source = str(summary.get("source") or "")
    name = Path(source).name if Path(source).is_absolute() else source
    parts = [f"Data: **{name}**"]
    if summary.get("format") in formats.FORMAT_NAMES:
        parts.append(formats.FORMAT_NAMES[summary["format"]])
    if isinstance(summary.get("rows"), int):
        parts.append(f"{summary['rows']:,} rows")
    if isinstance(summary.get("train_examples"), int):
        parts.append(f"{summary['train_examples']:,} examples to train on, {summary.get('validation_examples') or 0:,} "
                     "held out for validation")
    return " · ".join(parts)


def refusal_notice(message: str, job: jobs.Job | None) -> dict[str, str]:
    """What the status line keeps of a refused action: its message, and the job the page showed then, in its state
    then (see `standing_refusal`)."""
    return {"text": message, "job": job.job_id if job else "", "state": str(job.state) if job else ""}


def standing_refusal(notice: Any, job: jobs.Job | None) -> str:
    """The refusal the status line still shows: until the next action, which is a new job or a new state of the
    job shown (a run that starts, trains, finishes), or a successful Start, Stop or Resume (which clears it)."""
    if not isinstance(notice, dict):
        return ""
    shown = (job.job_id if job else "", str(job.state) if job else "")
    return str(notice.get("text") or "") if (notice.get("job"), notice.get("state")) == shown else ""


def next_step(job: jobs.Job, folder: runs.RunFolder) -> str:
    """What to do with a run that has ended, in the page's words."""
    if job.state == jobs.JobState.FINISHED:
        return ("Next: talk to it in the **Chat** tab (beside the base model), or share it from the **Publish** tab. "
                "The **Runs** tab compares it with your other runs.")
    if job.state == jobs.JobState.STOPPED and folder.has_adapter:
        return ("What it learned so far is saved: talk to it in the **Chat** tab, share it from the **Publish** tab, "
                "or press **Resume** to train on.")
    if job.state in (jobs.JobState.STOPPED, jobs.JobState.FAILED) and folder.last_checkpoint() is not None:
        return "Press **Resume** to train on from its last checkpoint."
    return ""


def preparation_line() -> str:
    """Said while the app prepares the built-in model (once, at start-up): a run started meanwhile waits for it."""
    if not models.embedded_model_preparing():
        return ""
    return (f"**{models.PREPARATION_MESSAGE}**: it happens once, when the app starts; a run started now begins "
            "once it is done.")


def progress_markdown(job: jobs.Job | None, notice: str = "") -> str:
    """The status line: what this page's last action was refused for (`notice`), then the job it follows: its
    state, step, headline losses (the smoothed training loss and the validation loss), data and plan, and what to
    do next once it has ended."""
    lines = [f"**Refused** · {notice}"] if notice else []
    if preparing := preparation_line():
        lines.append(preparing)
    if job is None:
        return "\n\n".join(lines + ["No run yet. Check your data, pick a model and press **Start**."])
    # A failure's reason is shown once, below; the first line then says only what happened. A message that only
    # repeats the state ("Finished." after **Finished**) is left out.
    state = job.state.capitalize()
    repeats = job.message.rstrip(".").lower() == state.lower()
    lines.append(f"**{state}**" + ("" if (job.error and job.message == job.error) or repeats else f" · {job.message}"))
    if job.run_dir is not None and (Path(job.run_dir) / runs.RUN_FILE).is_file():
        folder = runs.RunFolder(Path(job.run_dir))
        if entries := folder.read_metrics():
            lines.append(events.progress_text(entries[-1], events.headline_of(entries), ended=job.done))
        try:
            record = folder.read()
        except UserError:
            record = {}
        if record.get("data"):
            lines.append(data_line(record["data"]))
        plan = record.get("plan") or {}
        if plan.get("reasons"):
            lines.append("Plan: " + "; ".join(plan["reasons"]))
        # The run by its name, as the Runs tab lists it (its folder is the server's).
        lines.append(f"Run: **{folder.run_id}**")
        if job.done and (step := next_step(job, folder)):
            lines.append(step)
    if job.error:
        lines.append(f"❌ {job.error}")
    return "\n\n".join(lines)


def command_text(settings: RunSettings, runs_dir: str | Path) -> str:
    """The command line of a run, for the visitor to run on their own machine: the runs folder left at its
    default (this server's is no use there), and data they uploaded named by its file name, with a note."""
    shown = dataclasses.replace(settings, output_dir=RunSettings.output_dir)
    source = Path(settings.source)
    uploads = (Path(runs_dir) / access.UPLOADS_DIR).resolve()
    if source.is_absolute() and source.resolve().is_relative_to(uploads):
        return UPLOAD_NOTE.format(name=source.name) + "\n" + train_command(shown, source.name)
    return train_command(shown)


def job_settings(job: jobs.Job) -> RunSettings | None:
    """The settings of the run `job` trains: from its run.json once the run has one, else as submitted."""
    if job.run_dir is not None and (Path(job.run_dir) / runs.RUN_FILE).is_file():
        try:
            return runs.RunFolder(Path(job.run_dir)).settings()
        except UserError:
            return None
    return job.settings if job.settings.source else None


def form_values(job: jobs.Job, runs_dir: str | Path) -> dict[str, Any] | None:
    """What the Train tab's form shows for the run `job` trains (after a reload): its model, preset, every
    Advanced setting and its command line. None when the run's settings cannot be read."""
    settings = job_settings(job)
    if settings is None:
        return None
    values = {"model": settings.model, "preset": settings.preset, "command": command_text(settings, runs_dir)}
    values.update((spec.name, getattr(settings, spec.name)) for spec in advanced_fields())
    return values


def refusal(action: str, err: Exception) -> str:
    """A refused action of this tab: one line in the server's log, a toast, and the message, which the status
    line then keeps showing (a toast fades). Raising would leave a red "Error" badge on every output."""
    message = refusal_words(err)
    log.warning("refused %s: %s", action, " ".join(message.split()))
    gr.Warning(html.escape(message, quote=False))  # a toast renders HTML; a refusal may quote a visitor's typing
    return message


def estimate_markdown(hardware: Hardware, settings: RunSettings | None, report: checks.Report | None,
                      limits: isolation.Limits | None = None) -> str:
    """What a run costs the Space's owner, said before Start: the hardware, and how long a run of these settings
    on this data would take here, with where its tokens/s figure comes from."""
    line = f"This app trains on **{hardware.describe()}**."
    if settings is None or report is None or not report.token_counts:
        return line + " No checked data: check your data (Data tab) to see how long a run of it would take here."
    stats = report.stats()
    try:
        plan, length = estimate.estimate_run(settings, hardware, stats["total_tokens"],
                                             stats["tokens_per_example"]["max"], stats["examples"], limits)
    except UserError as err:
        return f"{line} No estimate of the run's length: {err}"
    if plan.sharded:
        line += (f" The model is sharded across the {hardware.device_count} GPUs (FSDP): about "
                 f"**{plan.estimated_peak_gib:.1f} GiB on each GPU**.")
    if length is None:
        return f"{line} No estimate of the run's length: no speed was measured or derived for this GPU."
    passes = (f"{settings.max_steps:,} steps" if settings.max_steps > 0 else
              f"{settings.epochs:g} epoch{'' if settings.epochs == 1 else 's'}")
    first = " (the first look at the data: the whole of it takes longer)" if report.first_look else ""
    return (f"{line} This run: about **{events.duration(length.seconds)}** of training{first} ({passes}, "
            f"{length.tokens:,} tokens at ~{length.throughput.tokens_per_second:,.0f} tokens/s; "
            f"{length.throughput.source}), plus loading and the held-out answers.")


def live_markdown(hardware: Hardware, run_dir: str | Path | None, ended: bool = False,
                  limits: isolation.Limits | None = None) -> str | None:
    """The estimate replaced by the run's measured speed once its first steps are done, with a warning when the
    machine trains much slower than its usual figure; None before (the estimate then stands). Once the run has
    `ended`, the speed it trained at, for the runs to come."""
    if not run_dir:
        return None
    folder = runs.RunFolder(Path(run_dir))
    entries = folder.read_metrics()
    if estimate.live_estimate(entries, None) is None:
        return None
    key = (str(folder.path), hardware)
    if key not in _USUAL_SPEEDS:
        try:
            record = folder.read()
        except UserError:
            record = {}
        _USUAL_SPEEDS[key] = estimate.usual_throughput(hardware, record, limits)
    live = estimate.live_estimate(entries, _USUAL_SPEEDS[key])
    said = estimate.describe_ended(live) if ended else estimate.describe_live(live)
    text = f"This app trains on **{hardware.describe()}**. {said}"
    if warning := estimate.slower_warning(live, ended):
        text += f"\n\n⚠️ {warning}"
    return text


# The usual tokens/s figure of each run followed (run folder, hardware → Throughput): read from its record once.
_USUAL_SPEEDS: dict[tuple[str, Hardware], estimate.Throughput | None] = {}


def hardware_check_access(gate: Gate, profile: Any) -> access.TrainingAccess:
    """Who may check the hardware: on a Space only its owner (a check trains on the GPU the owner pays for, for
    minutes), whoever may train elsewhere."""
    level = access.OWNER if gate.environ.get("SPACE_ID") else gate.settings.who_may_train
    return access.training_access(level, gate.environ, profile)


# The check and a run would share the machine's memory and slow each other: one waits for the other.
RUN_ON_THE_MACHINE = ("A run is training or waiting on this machine: check the hardware once it has ended (the check "
                      "trains too, and would slow the run or take the memory it needs).")
CHECKING_HARDWARE = "This machine's hardware is being checked (a few minutes): start the run once the check has ended."


def check_hardware(gate: Gate, manager: jobs.JobManager, profile: Any,
                   run_check: Callable[[], Any] | None = None) -> Any:
    """The "Check this hardware" button: the doctor's quick pass in a child process, its progress as it comes,
    then its table; a refusal (not the owner, a run training, a check already running) is a message."""
    from .. import doctor

    decision = hardware_check_access(gate, profile)
    if not decision.allowed:
        raise gr.Error(decision.reason.replace("may train or publish here", "may check this hardware"))
    lines: list[str] = []
    with manager.machine_held(CHECKING_HARDWARE, RUN_ON_THE_MACHINE):
        for item in (run_check or (lambda: doctor.check_in_child(DoctorSettings(quick=True))))():
            if isinstance(item, dict):
                counts = {status: sum(row["status"] == status for row in item["rows"])
                          for status in (doctor.PASSED, doctor.FAILED, doctor.SKIPPED)}
                yield (f"**Checked** · {counts[doctor.PASSED]} passed, {counts[doctor.FAILED]} failed, "
                       f"{counts[doctor.SKIPPED]} skipped\n\n" + doctor.markdown_table(item))
                return
            lines = [*lines[-5:], f"- {markdown_text(item)}"]
            yield "**Checking this hardware** (a few minutes)…\n\n" + "\n".join(lines)


def visitor_job(manager: jobs.JobManager, owner: str, job_id: str) -> jobs.Job | None:
    """The job this page shows: the one it started, else the visitor's latest (after a reload)."""
    return manager.get(job_id, owner) if job_id else manager.latest_for(owner)


def model_picker(default: str | None = None, render: bool = True, local_paths: bool = False) -> gr.Dropdown:
    """The model dropdown shared by every tab: each entry says its size and whether it fits this machine."""
    hardware = detect_hardware()
    choices = picker_choices(hardware)
    if default and default not in [value for _, value in choices]:
        choices.insert(0, (default, default))
    return gr.Dropdown(choices, value=default or choices[0][1], allow_custom_value=True, label="Model",
                       elem_id="model-picker", render=render,
                       info=f"Hardware: {hardware.describe()}. Pick a listed model (size · whether it fits), "
                            "or type any Hub model id (owner/name)" + (" or local folder." if local_paths else "."))


@dataclasses.dataclass(frozen=True)
class TrainTab:
    """What the rest of the app uses of the Train tab."""

    job_id: gr.State  # the job the page follows: the Runs tab's Resume sets it
    on_access: Callable[[gr.OAuthProfile | None], tuple]  # the page's load event: refusal or cost, per visitor
    access_outputs: list[gr.components.Component]  # what `on_access` updates, in its order


THIS_SPACE, ON_JOBS = "This Space", "Hugging Face Jobs"
# The flavors offered: huggingface_hub's list of Jobs hardware with a GPU (their prices come from the Hub).
JOBS_FLAVORS = [flavor.value for flavor in JobHardware if not flavor.value.startswith("cpu")]


def jobs_progress_markdown(run: hub_jobs.LaunchedRun | None, notice: str = "") -> str:
    """The status of the visitor's Jobs run: what it says it does, where its curve is, its job and what it cost."""
    lines = [f"**Refused** · {notice}"] if notice else []
    if run is None:
        return "\n\n".join(lines + ["No Jobs run yet. Check your data, pick a model and a GPU, and press **Start "
                                      "on Jobs**."])
    lines.append(f"**{'Ended' if run.done else 'Running'}** · {run.status}")
    folder = runs.RunFolder(run.run_dir)
    if folder.record_path.is_file():
        if points := events.curve(events.read_file(folder.events_path)):
            lines.append(events.progress_text(points[-1], events.headline_of(points), ended=run.done))
        try:
            record = folder.read()
        except UserError:
            record = {}
        if isinstance(record.get("job"), dict):
            lines.append(hub_jobs.describe_job(record["job"]))
        if run.done and record.get("error"):
            lines.append(f"❌ {record['error']}")
        lines.append(f"Run: **{folder.run_id}**")
    return "\n\n".join(lines)


def build_jobs(gate: Gate, session: gr.BrowserState, where: gr.Radio, local: list[gr.components.Component],
               report: gr.State, data_settings: gr.State, skip_invalid: gr.Checkbox, model: gr.Dropdown,
               preset: gr.Radio, advanced: list[gr.components.Component], names: list[str]) -> None:
    """The Train tab's Hugging Face Jobs part: a GPU flavor, the run's cost beside Start, Start / Stop / Resume, the
    status and the curve of the visitor's Jobs run. On a Space, only a visitor signed in with the `jobs` scope
    starts one, billed to them (the Space's owner and who may train here are not involved); off a Space, only when
    the operator allows runs billed to their own token (`hub_jobs.page_token`). Choosing Jobs says why a visitor
    cannot start one, and what to do, before they try."""
    launcher = hub_jobs.JobsLauncher(gate.runs_dir)
    on_space = bool(gate.environ.get("SPACE_ID"))
    with gr.Column(visible=False) as group:
        with gr.Row(visible=False, elem_id="jobs-unavailable") as unavailable_row:
            unavailable = gr.Markdown(elem_id="jobs-access")
            if access.sign_in_available(gate.environ):
                gr.LoginButton(size="md", scale=0, min_width=240)
        with gr.Row():
            flavor = gr.Dropdown(JOBS_FLAVORS, value="t4-small", label="GPU", elem_id="jobs-flavor", scale=1)
            jobs_cost = gr.Markdown(elem_id="jobs-cost")
        with gr.Row():
            start = gr.Button("Start on Jobs", variant="primary", elem_id="start-jobs")
            stop = gr.Button("Stop", variant="stop", elem_id="stop-jobs")
            resume = gr.Button("Resume on Jobs", elem_id="resume-jobs")
        status = gr.Markdown(jobs_progress_markdown(None), elem_id="jobs-progress")
        curve = gr.LinePlot(EMPTY_CURVE, label="Loss", elem_id="jobs-loss-plot", **LOSS_PLOT)
    # Polls the visitor's Jobs run only while the page shows Jobs: a page that never chose it asks nothing.
    timer = gr.Timer(2.0, active=False)

    def token_of(profile: gr.OAuthProfile | None, oauth_token: gr.OAuthToken | None) -> str | None:
        """Who pays for this visitor's Jobs run: from this server's settings and Gradio's session, never from a
        value the page sends; a refusal says why and what to do."""
        from ..publish import resolve_token

        token = hub_jobs.page_token(gate.environ, oauth_token, resolve_token)
        if not on_space:
            gate.may_train(profile)
        return token

    def on_where(profile: gr.OAuthProfile | None, oauth_token: gr.OAuthToken | None, chosen):
        on_jobs = chosen == ON_JOBS
        reason = ""
        if on_jobs:
            try:
                token_of(profile, oauth_token)
            except (gr.Error, UserError) as err:
                reason = refusal_words(err)
        return [gr.update(visible=on_jobs), gr.Timer(active=on_jobs), gr.update(visible=bool(reason)),
                f"**Not available** · {markdown_text(reason)}" if reason else "",
                gr.update(interactive=not reason), gr.update(interactive=not reason)] + \
            [gr.update(visible=not on_jobs) for _ in local]

    where.change(on_where, inputs=where, outputs=[group, timer, unavailable_row, unavailable, start, resume, *local],
                 show_progress="hidden")

    def settings_of(report_value, data_value, skip, model_name, preset_name, advanced_values) -> RunSettings:
        return settings_from_form(data_value, skip, gate.model(model_name), preset_name, gate.runs_dir,
                                  dict(zip(names, advanced_values)), report_value)

    def on_start_jobs(profile: gr.OAuthProfile | None, oauth_token: gr.OAuthToken | None, token, report_value,
                 data_value, skip, model_name, preset_name, flavor_name, *advanced_values):
        owner_id = gate.visitor(token)
        try:
            if flavor_name not in JOBS_FLAVORS:
                raise UserError(f"Choose one of the GPUs offered, not {flavor_name!r}.")
            visitor_token = token_of(profile, oauth_token)  # who pays comes first
            settings = settings_of(report_value, data_value, skip, model_name, preset_name, advanced_values)
            run = launcher.start(owner_id, visitor_token, flavor_name, settings)
        except (gr.Error, UserError) as err:
            return jobs_progress_markdown(launcher.latest(owner_id), refusal("on_start_jobs", err))
        return jobs_progress_markdown(run)

    start.click(on_start_jobs, inputs=[session, report, data_settings, skip_invalid, model, preset, flavor, *advanced],
                outputs=status)

    def on_stop_jobs(token):
        owner_id = gate.visitor(token)
        try:
            run = launcher.stop(owner_id)
        except UserError as err:
            return jobs_progress_markdown(launcher.latest(owner_id), refusal("on_stop_jobs", err))
        return jobs_progress_markdown(run)

    stop.click(on_stop_jobs, inputs=session, outputs=status)

    def on_resume_jobs(profile: gr.OAuthProfile | None, oauth_token: gr.OAuthToken | None, token, flavor_name):
        owner_id = gate.visitor(token)
        latest = launcher.latest(owner_id)
        try:
            if latest is None or not latest.done or flavor_name not in JOBS_FLAVORS:
                raise UserError("Nothing to resume: resume your stopped or failed Jobs run once it has ended.")
            run = launcher.start(owner_id, token_of(profile, oauth_token), flavor_name, resume=latest.run_dir)
        except (gr.Error, UserError) as err:
            return jobs_progress_markdown(latest, refusal("on_resume_jobs", err))
        return jobs_progress_markdown(run)

    resume.click(on_resume_jobs, inputs=[session, flavor], outputs=status)

    def refresh_jobs(token, chosen):
        if chosen != ON_JOBS:
            return gr.skip(), gr.skip()
        owner_id = gate.known_visitor(token)
        run = launcher.latest(owner_id) if owner_id else None
        return jobs_progress_markdown(run), loss_plot(run.run_dir if run else None)

    timer.tick(refresh_jobs, inputs=[session, where], outputs=[status, curve], show_progress="hidden")

    def on_jobs_cost(oauth_token: gr.OAuthToken | None, chosen, report_value, data_value, model_name, preset_name,
                flavor_name, *advanced_values):
        if chosen != ON_JOBS:
            return gr.skip()
        if report_value is None or not report_value.token_counts:
            return "No checked data: check your data (Data tab) to see what a run costs on Jobs."
        try:
            settings = settings_of(report_value, data_value, True, model_name, preset_name, advanced_values)
            return hub_jobs.cost_line(gate.runs_dir, getattr(oauth_token, "token", None), settings, flavor_name,
                                      report_value.stats(), gate.environ, isolation.Limits.of(gate.settings))
        except (gr.Error, UserError) as err:
            return f"No cost yet: {err}"

    gr.on([where.change, flavor.change, report.change, model.change, preset.change,
           *(component.change for component in advanced)], on_jobs_cost,
          inputs=[where, report, data_settings, model, preset, flavor, *advanced], outputs=jobs_cost,
          show_progress="hidden", trigger_mode="always_last")


def build(manager: jobs.JobManager, gate: Gate, session: gr.BrowserState, model: gr.Dropdown,
          report: gr.State, data_settings: gr.State, skip_invalid: gr.Checkbox) -> TrainTab:
    """Lay out the Train tab; returns what other tabs use."""
    if note := storage.runs_note(gate.runs_dir):
        gr.Markdown(note, elem_id="train-storage-note")
    gr.Markdown(access.describe_who_may_train(gate.settings.who_may_train, gate.environ), elem_id="train-access")
    # Shown by the page's load event, to each visitor as the setting decides for them: a visitor who may not
    # train sees why (and how to get a GPU of their own), one who may sees what a run will cost.
    with gr.Row(visible=False, elem_id="train-refused") as refused_row:
        refused_text = gr.Markdown(elem_id="train-refusal")
        if access.sign_in_available(gate.environ):
            gr.LoginButton(size="md", scale=0, min_width=240)
        if access.duplicable(gate.environ):
            gr.DuplicateButton("Duplicate this Space", size="md", min_width=200, elem_id="duplicate-train")
    hardware = detect_hardware()
    cost = gr.Markdown(visible=False, elem_id="train-estimate")
    job_id = gr.State("")
    preset = gr.Radio(list(PRESET_NAMES), value=DEFAULT_PRESET, label="Preset",
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
    where = gr.Radio([THIS_SPACE, ON_JOBS], value=THIS_SPACE, label="Where to train", elem_id="train-where",
                     info="Hugging Face Jobs: a GPU you choose, billed by the second to your Hugging Face account.")
    with gr.Row() as local_controls:
        start = gr.Button("Start", variant="primary", elem_id="start-training")
        stop = gr.Button("Stop", variant="stop", elem_id="stop-training")
        resume = gr.Button("Resume", elem_id="resume-training")
    progress = gr.Markdown(progress_markdown(None), elem_id="train-progress")
    curve = gr.LinePlot(EMPTY_CURVE, label="Loss", elem_id="loss-plot", **LOSS_PLOT)
    build_jobs(gate, session, where, [local_controls, progress, curve, cost], report, data_settings, skip_invalid,
               model, preset, [advanced[n] for n in names], names)
    # Below the run's controls and curve wherever it trains.
    command = gr.Code(label="The same run from the command line", language="shell", interactive=False,
                      elem_id="train-command")
    # What this page's last Start, Stop or Resume was refused for (`refusal_notice`), shown in the status line
    # until the next action.
    notice = gr.State("")
    timer = gr.Timer(1.0, active=True)
    # The estimate becomes the run's measured speed once its first steps are done; less often than the status.
    speed_timer = gr.Timer(SPEED_EVERY_SECONDS, active=True)

    def on_preset(name: str) -> list[Any]:
        values = run_settings(name)
        return [gr.update(value=getattr(values, n)) for n in names]

    # Only when the visitor picks a preset: a reload's restore sets the preset and the run's own settings at once.
    preset.input(on_preset, inputs=preset, outputs=[advanced[n] for n in names])

    def shown_job(owner_id: str, current: str) -> jobs.Job | None:
        try:
            return visitor_job(manager, owner_id, current)
        except UserError:
            return manager.latest_for(owner_id)

    # `profile` comes first in each handler that trains or publishes: Gradio fills it from its own session cookie
    # (None when signed out or without sign-in), and it must precede the *args of the form's values.
    def on_start(profile: gr.OAuthProfile | None, token, current, report_value, data_value, skip, model_name,
                 preset_name, *advanced_values):
        owner_id = gate.visitor(token)
        try:
            gate.may_train(profile)
            settings = settings_from_form(data_value, skip, gate.model(model_name), preset_name, gate.runs_dir,
                                          dict(zip(names, advanced_values)), report_value)
            job = manager.submit(settings, owner_id, client=gate.client())
        except (gr.Error, UserError) as err:
            shown = shown_job(owner_id, current)
            refused = refusal("on_start", err)
            return gr.skip(), progress_markdown(shown, refused), gr.skip(), refusal_notice(refused, shown)
        return job.job_id, progress_markdown(job), command_text(settings, gate.runs_dir), ""

    start.click(on_start, inputs=[session, job_id, report, data_settings, skip_invalid, model, preset,
                                  *advanced.values()], outputs=[job_id, progress, command, notice])

    def on_stop(token, current):
        owner_id = gate.visitor(token)
        try:
            job = visitor_job(manager, owner_id, current)
            if job is None:
                raise UserError("You have no run to stop.")
            manager.stop(job.job_id, owner_id)
        except UserError as err:
            shown = shown_job(owner_id, current)
            refused = refusal("on_stop", err)
            return progress_markdown(shown, refused), refusal_notice(refused, shown)
        return progress_markdown(job), ""

    stop.click(on_stop, inputs=[session, job_id], outputs=[progress, notice])

    def on_resume(profile: gr.OAuthProfile | None, token, current):
        owner_id = gate.visitor(token)
        try:
            gate.may_train(profile)
            job = visitor_job(manager, owner_id, current)
            if job is None or job.run_dir is None or not job.done:
                raise UserError("Nothing to resume: resume a stopped or failed run of yours once it has stopped.")
            resumed = manager.resume(gate.runs_dir, job.run_dir, owner_id, client=gate.client())
        except (gr.Error, UserError) as err:
            shown = shown_job(owner_id, current)
            refused = refusal("on_resume", err)
            return gr.skip(), progress_markdown(shown, refused), refusal_notice(refused, shown)
        return resumed.job_id, progress_markdown(resumed), ""

    resume.click(on_resume, inputs=[session, job_id], outputs=[job_id, progress, notice])

    form = [model, preset, *(advanced[n] for n in names), command]

    # The signature of the curve this page was last sent (`curve_signature`).
    curve_shown = gr.State(None)

    def refresh(token, current, refused, progress_shown=None, curve_shown_before=None):
        """Every second: the page's run, its status line and its curve. What the page already shows (the status
        line it sends, the curve it was last sent) is not sent again: an open page costs the server and the browser
        nothing while nothing changes."""
        owner_id = gate.known_visitor(token)
        job = shown_job(owner_id, current) if owner_id else None
        # A page that follows no job yet (just loaded, or reloaded) re-attaches to the visitor's running or latest
        # job: the form then shows that run's model, preset, settings and command line.
        restored = form_values(job, gate.runs_dir) if job is not None and not current else None
        shown = [gr.update(value=restored[name]) for name in ("model", "preset", *names, "command")] if restored \
            else [gr.skip() for _ in form]
        status = progress_markdown(job, standing_refusal(refused, job))
        plot = loss_plot(job.run_dir if job else None)
        signature = curve_signature(plot)
        unchanged = signature == curve_shown_before
        return ((job.job_id if job else current), gr.skip() if status == progress_shown else status,
                gr.skip() if unchanged else plot, *shown, gr.skip() if unchanged else signature)

    timer.tick(refresh, inputs=[session, job_id, notice, progress, curve_shown],
               outputs=[job_id, progress, curve, *form, curve_shown], show_progress="hidden")
    # A new check of the data is a next action too: a refusal for the data it had is no longer the news.
    report.change(lambda: "", outputs=notice, show_progress="hidden")

    # A model a visitor named is laid out from its config in a worker process (estimate.model_shape).
    limits = isolation.Limits.of(gate.settings)

    def on_speed(profile: gr.OAuthProfile | None, token, current, speed_of):
        """The run's measured speed in place of the estimate while the run the page follows trains (`speed_of`:
        the job whose speed the box shows); once it has ended, once, the speed it trained at."""
        owner_id = gate.known_visitor(token)
        job = shown_job(owner_id, current) if owner_id else None
        if job is None or not gate.training_access(profile).allowed:
            return gr.skip(), gr.skip()
        if not job.done:
            live = live_markdown(hardware, job.run_dir, limits=limits)
            return (live, job.job_id) if live else (gr.skip(), gr.skip())
        if speed_of == job.job_id:
            return live_markdown(hardware, job.run_dir, ended=True, limits=limits) or gr.skip(), ""
        return gr.skip(), gr.skip()

    speed_of = gr.State("")
    speed_timer.tick(on_speed, inputs=[session, job_id, speed_of], outputs=[cost, speed_of], show_progress="hidden")

    def on_access(profile: gr.OAuthProfile | None):
        """The page's load event: the refusal or the cost, as the setting decides for this visitor."""
        decision = gate.training_access(profile)
        return (gr.update(visible=not decision.allowed), decision.reason,
                gr.update(visible=decision.allowed, value=estimate_markdown(hardware, None, None)))

    def on_estimate(profile: gr.OAuthProfile | None, token, current, report_value, data_value, model_name,
                    preset_name, *advanced_values):
        if not gate.training_access(profile).allowed:
            return gr.skip()
        owner_id = gate.known_visitor(token)
        job = shown_job(owner_id, current) if owner_id else None
        if job is not None and not job.done and (live := live_markdown(hardware, job.run_dir, limits=limits)):
            return live  # a form that changes while the run trains (a reload's restore) keeps its measured speed
        try:
            settings = settings_from_form(data_value, True, gate.model(model_name), preset_name, gate.runs_dir,
                                          dict(zip(names, advanced_values)))
        except (gr.Error, UserError):
            settings = None
        return estimate_markdown(hardware, settings, report_value, limits)

    gr.on([report.change, model.change, preset.change, *(advanced[n].change for n in names)], on_estimate,
          inputs=[session, job_id, report, data_settings, model, preset, *advanced.values()], outputs=cost,
          show_progress="hidden",
          trigger_mode="always_last")
    with gr.Accordion("Check this hardware", open=False):
        gr.Markdown("A few short trainings of each plan this machine supports, with their speed, memory and loss: "
                    "whether it trains, and how fast. A few minutes; on a Space, for its owner.")
        check_button = gr.Button("Check this hardware", elem_id="check-hardware")
        hardware_report = gr.Markdown(elem_id="hardware-report")

    def on_check_hardware(profile: gr.OAuthProfile | None):
        try:
            yield from check_hardware(gate, manager, profile)
        except (gr.Error, UserError) as err:
            yield refused_markdown("on_check_hardware", err)

    check_button.click(on_check_hardware, outputs=hardware_report, concurrency_limit=1)
    return TrainTab(job_id=job_id, on_access=on_access, access_outputs=[refused_row, refused_text, cost])
