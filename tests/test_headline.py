"""What a newcomer reads first: the headline losses (smoothed training loss and validation loss, never
one step's raw loss), the loss plot, a reloaded Train tab, and status words that are true."""

import math
from dataclasses import asdict

import gradio as gr
import pandas as pd
import pytest

from builders import SAMPLE_DATA, distinct_chats, evaluation_event, step_event, write_events
from sft_space import access, checks, events, jobs, runs
from sft_space.settings import DataSettings, RunSettings
from sft_space.ui import train_tab

# A noisy run: the last step's raw loss (3.9) is far above where the run is.
LOSSES = [3.0, 2.6, 2.4, 2.2, 2.1, 2.0, 1.9, 3.9]


def tensorboard_smoothing(values, weight):
    """TensorBoard's smoothing as its front end computes it (an EMA from 0, divided by the weight gathered)."""
    last, out = 0.0, []
    for i, value in enumerate(values, start=1):
        last = last * weight + (1 - weight) * value
        out.append(last / (1 - weight**i))
    return out


def noisy_run(tmp_path, record=None):
    folder = runs.RunFolder.create(tmp_path, "noisy")
    folder.write(record or {"run_id": "noisy", "status": runs.RUNNING, "data": {"validation_examples": 2}})
    smoother = runs.LossSmoother()
    for step, loss in enumerate(LOSSES, start=1):
        write_events(folder, step_event(step, loss, loss_smoothed=smoother.add(loss), eta_seconds=1.0))
        if step == 4:
            write_events(folder, evaluation_event(4, 2.3))
    return folder


def test_the_smoothed_loss_is_tensorboards_bias_corrected_ema():
    smoother = runs.LossSmoother()
    smoothed = [smoother.add(loss) for loss in LOSSES]
    assert smoothed == pytest.approx(tensorboard_smoothing(LOSSES, runs.SMOOTHING))
    # Bias-corrected: the first point is itself (not pulled to 0), a constant loss stays that constant.
    assert smoothed[0] == pytest.approx(3.0)
    constant = runs.LossSmoother()
    assert [constant.add(2.0) for _ in range(5)] == pytest.approx([2.0] * 5)
    # One bad batch moves it a little, not to its own value; a NaN is shown as it is and poisons nothing after it.
    assert smoothed[-2] < smoothed[-1] < 2.7
    assert math.isnan(smoother.add(float("nan"))) and smoother.add(2.0) == pytest.approx(
        tensorboard_smoothing(LOSSES + [2.0], runs.SMOOTHING)[-1])


def test_the_headline_is_the_smoothed_and_validation_loss_never_the_last_raw_step(tmp_path):
    folder = noisy_run(tmp_path)
    headline = folder.headline()
    assert headline.train_loss == pytest.approx(tensorboard_smoothing(LOSSES, runs.SMOOTHING)[-1])
    assert headline.validation_loss == 2.3
    assert headline.text() == f"train loss {headline.train_loss:.3f} (smoothed) · validation loss 2.300"
    # A finished run's record holds it (the raw loss beside it); a record without it, its curve.
    folder.update(status=runs.FINISHED, final_metrics={"loss": 3.9, "loss_smoothed": 2.25, "eval_loss": 2.1})
    assert folder.headline() == events.Headline(2.25, 2.1)
    folder.update(final_metrics={"loss": 3.9, "step": 8})
    assert folder.headline() == headline
    # The Train tab's status line shows the same, and not the raw 3.9.
    job = jobs.Job("noisy", "alice", RunSettings(source="a.jsonl"), state=jobs.JobState.RUNNING, message="Training…",
                   run_dir=folder.path)
    status = train_tab.progress_markdown(job)
    assert headline.text() in status and "3.9" not in status


def test_the_plot_draws_raw_points_faint_the_smoothed_line_and_validation_and_a_lone_point_visibly(tmp_path):
    folder = noisy_run(tmp_path)
    curve = train_tab.loss_curve(folder.path)
    by_split = {split: frame for split, frame in curve.groupby("split")}
    assert list(by_split[train_tab.RAW]["loss"]) == LOSSES
    assert list(by_split[train_tab.SMOOTHED]["loss"]) == pytest.approx(tensorboard_smoothing(LOSSES, runs.SMOOTHING))
    # The one validation loss so far is drawn as a short level dash around its step (a line of one point shows
    # nothing), as is the first training point of a run.
    assert list(by_split[train_tab.VALIDATION]["loss"]) == [2.3, 2.3]
    assert list(by_split[train_tab.VALIDATION]["step"]) == pytest.approx([4 - 0.1, 4 + 0.1])
    first = runs.RunFolder.create(tmp_path, "first")
    first.write({"run_id": "first", "status": runs.RUNNING, "data": {"validation_examples": 2}})
    write_events(first, step_event(1, 3.489136, max_steps=100))
    curve = train_tab.loss_curve(first.path)
    drawn = curve[curve["split"] == train_tab.SMOOTHED]
    assert list(drawn["step"]) == [0.0, 2.0] and set(drawn["loss"]) == {3.489136}
    assert curve[curve["split"] == train_tab.VALIDATION]["loss"].isna().all(), "named before its first point"
    # Over the run's whole length, so that the first point is a mark at the start, not the whole width.
    assert train_tab.loss_plot(first.path)["x_lim"] == [0, pytest.approx(101)]
    # Faint raw points, a strong smoothed line; the legend shows its labels (no fixed height clips it to its
    # title, and there is no title "split"); axis labels are rounded.
    assert set(train_tab.CURVE_COLOURS) == {train_tab.RAW, train_tab.SMOOTHED, train_tab.VALIDATION}
    assert "height" not in train_tab.LOSS_PLOT and train_tab.LOSS_PLOT["color_title"] == ""
    assert train_tab.LOSS_PLOT["y_axis_format"] == ".3~r" and train_tab.LOSS_PLOT["x_axis_format"] == "~r"


@pytest.fixture
def app(tmp_path, monkeypatch, tiny_model_dir):
    """The app with a stand-in trainer: a run that finishes at once, recording the settings it was given."""
    from sft_space.ui import build_app

    def finish_at_once(job, on_status, on_folder, on_running):
        folder = runs.RunFolder.create(job.settings.output_dir, job.job_id)
        folder.write({"run_id": job.job_id, "status": runs.FINISHED, "owner": job.owner,
                      "settings": asdict(job.settings), "final_metrics": {"step": 1},
                      "data": {"source": job.settings.source, "format": "openai", "rows": 160,
                               "train_examples": 144, "validation_examples": 16}})
        on_folder(folder.path)
        return folder.path

    monkeypatch.setenv("SFT_SPACE_RUNS", str(tmp_path / "runs"))
    manager = jobs.JobManager(finish_at_once)
    blocks = build_app(manager, default_model=str(tiny_model_dir))
    handlers = {f.fn.__name__: f.fn for f in blocks.fns.values() if f.fn is not None}
    return handlers, manager, tmp_path / "runs"


def advanced(**values):
    return [values.get(spec.name, spec.default) for spec in train_tab.advanced_fields()]


def test_a_reloaded_train_tab_shows_the_runs_preset_settings_command_line_and_data(app, tiny_model_dir, embedded_tokenizer):
    handlers, manager, runs_dir = app
    token = handlers["on_load"]("")
    data_settings = DataSettings(source=str(SAMPLE_DATA))
    report = checks.check_data(data_settings, embedded_tokenizer)
    job_id, _, command, notice = handlers["on_start"](None, token, "", report, data_settings, False, str(tiny_model_dir),
                                                      "quick", *advanced(max_steps=30, lora_r=4))
    assert notice == "" and "--max-steps 30" in command
    job = manager.get(job_id, access.Identity.for_runs(runs_dir).visitor(token))
    assert wait_until(lambda: job.done)

    # A reload: a new page, which follows no job yet. Its first refresh re-attaches and fills the form.
    job_shown, status, _, model, preset, *rest, _ = handlers["refresh"](token, "", "")
    fields = dict(zip([spec.name for spec in train_tab.advanced_fields()], rest[:-1]))
    assert job_shown == job_id and model["value"] == str(tiny_model_dir) and preset["value"] == "quick"
    assert fields["max_steps"]["value"] == 30 and fields["lora_r"]["value"] == 4
    assert rest[-1]["value"] == command
    assert ("Data: **captain_byte.jsonl** · OpenAI chat (messages) · 160 rows · 144 examples to train on, 16 held "
            "out for validation") in status
    # Once it follows that job, the visitor's own edits stay.
    assert all(isinstance(value, type(gr.skip())) for value in handlers["refresh"](token, job_id, "")[3:-1])
    # What the page already shows is not sent again, each second: an open page costs the server and the browser
    # nothing while nothing changes; a page that shows something else gets the run's status line and curve.
    _, status, curve, *_, signature = handlers["refresh"](token, job_id, "")
    assert signature == train_tab.curve_signature(curve)
    again = handlers["refresh"](token, job_id, "", status, signature)
    assert [isinstance(again[i], type(gr.skip())) for i in (1, 2, -1)] == [True, True, True]
    other = handlers["refresh"](token, job_id, "", "an older status line", "an older curve")
    assert other[1] == status and train_tab.curve_signature(other[2]) == signature == other[-1]
    # Another visitor's reload shows nothing of it.
    stranger = handlers["on_load"]("")
    assert "No run yet" in handlers["refresh"](stranger, "", "")[1]


def test_a_curve_is_told_from_another_by_its_points_and_its_width():
    points = pd.DataFrame({"step": [1, 2], "loss": [2.5, 2.1], "series": ["train (raw)"] * 2})
    signature = train_tab.curve_signature(gr.update(value=points, x_lim=[0, 10]))
    assert signature == train_tab.curve_signature(gr.update(value=points.copy(), x_lim=[0, 10]))
    moved = points.assign(loss=[2.5, 2.0])
    assert len({signature, train_tab.curve_signature(gr.update(value=moved, x_lim=[0, 10])),
                train_tab.curve_signature(gr.update(value=points, x_lim=[0, 20])),
                train_tab.curve_signature(train_tab.loss_plot(None))}) == 4


def test_refusals_read_refused_once_never_failed(app, tiny_model_dir, embedded_tokenizer, write_jsonl):
    handlers, manager, runs_dir = app
    token = handlers["on_load"]("")
    visitor = access.Identity.for_runs(runs_dir).visitor(token)
    bad = write_jsonl(distinct_chats(10) + [{"messages": [{"role": "user", "content": "Hi"}]}])
    data_settings = DataSettings(source=str(bad))
    report = checks.check_data(data_settings, embedded_tokenizer)
    with pytest.warns(UserWarning, match="rows have errors"):
        _, status, _, notice = handlers["on_start"](None, token, "", report, data_settings, False, str(tiny_model_dir),
                                                    "quick", *advanced())
    assert status.startswith("**Refused** · 1 of 11 rows have errors") and status.count("rows have errors") == 1
    assert "Failed" not in status and "❌" not in status
    # The status line keeps saying it (a toast fades) until the next action.
    assert handlers["refresh"](token, "", notice)[1] == status

    # Resume on a finished run is refused at once, in the app: not a "Failed" run, and no job is started for it.
    data_settings = DataSettings(source=str(SAMPLE_DATA))
    job_id = handlers["on_start"](None, token, "", None, data_settings, False, str(tiny_model_dir), "quick", *advanced())[0]
    assert wait_until(lambda: manager.get(job_id, visitor).done)
    with pytest.warns(UserWarning, match="already finished"):
        _, status, notice = handlers["on_resume"](None, token, job_id)
    assert status.startswith(f"**Refused** · Run {job_id} already finished") and "Failed" not in status
    assert status.count("already finished") == 1 and "**Finished**" in status
    assert manager.latest_for(visitor).job_id == job_id and manager.get(job_id, visitor).state == jobs.JobState.FINISHED


def test_a_run_from_an_upload_shows_its_file_name_and_says_to_give_it_locally(app, tiny_model_dir, tmp_path):
    handlers, _, runs_dir = app
    token = handlers["on_load"]("")
    visitor = access.Identity.for_runs(runs_dir).visitor(token)
    uploaded = tmp_path / "gradio" / "0123abcd" / "captain_byte.jsonl"
    uploaded.parent.mkdir(parents=True)
    uploaded.write_bytes(SAMPLE_DATA.read_bytes())
    handle = access.keep_upload(runs_dir, visitor, uploaded, access.AccessSettings())
    _, _, command, _ = handlers["on_start"](None, token, "", None, DataSettings(source=str(handle)), False,
                                            str(tiny_model_dir), "quick", *advanced())
    note, line = command.splitlines()
    assert note.startswith("# captain_byte.jsonl was uploaded") and "your machine" in note
    assert line.startswith("python -m sft_space train captain_byte.jsonl --preset quick")
    # No path of this server: not the upload's copy, not the runs folder, not Gradio's temporary folder.
    assert access.UPLOADS_DIR not in command and str(runs_dir) not in command and "0123abcd" not in command


def wait_until(condition, timeout=10.0):
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True
