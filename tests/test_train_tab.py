"""The Train and Runs tabs' words: the estimate replaced by the speed the run trains at, a refusal that clears on
the next action, what to do after a run, no command-line words outside the command box, and runs shown without
the server's paths or a visitor's id."""

import os
import re
from dataclasses import asdict

import gradio as gr
import pytest
from builders import SAMPLE_DATA, step_event, write_events
from test_jobs import wait_until

from sft_space import access, checks, child, compare, estimate, jobs, models, runs
from sft_space.hardware import Hardware
from sft_space.settings import DataSettings, RunSettings
from sft_space.ui import runs_tab, train_tab

TWO_CORES = Hardware("cpu", "CPU", 24.0, None, 2)
PLAN = {"device": "cpu", "precision": "fp32", "four_bit": False, "gradient_checkpointing": False, "batch_size": 4,
        "sequence_length": 512, "packing": True, "estimated_peak_gib": 1.2, "fits": True,
        "reasons": ["fp32 on CPU (without bf16 instructions mixed precision is slower there)"]}
OWNER = "f3a9c2e4b1d0visitorhash"
RUN_ID = "20261203-101500-captain_byte-a1b2"
# Command-line words: a flag, an operator's variable, a documentation file.
CODE_WORDS = re.compile(r"(?<![\w-])--[a-z]|SFT_SPACE_|\.md\b|python -m")


def run_folder(runs_dir, run_id=RUN_ID, status=runs.RUNNING, metrics=(), **record):
    folder = runs.RunFolder.create(runs_dir, run_id)
    upload = f"{runs_dir}/{access.UPLOADS_DIR}/{OWNER}/captain.jsonl"
    settings = RunSettings(source=upload, output_dir=str(runs_dir), model=models.EMBEDDED_MODEL)
    folder.write({"run_id": run_id, "status": status, "owner": OWNER, "created_at": runs.timestamp(),
                  "base_model": models.EMBEDDED_MODEL, "settings": asdict(settings), "plan": PLAN,
                  "data": {"source": upload, "format": "openai", "rows": 48, "train_examples": 43,
                           "validation_examples": 5},
                  **record})
    write_events(folder, *metrics)
    return folder


def measured(step, tokens_per_second, max_steps=100, seconds_per_step=18.0):
    return step_event(step, 2.0, max_steps, elapsed_seconds=step * seconds_per_step,
                      eta_seconds=(max_steps - step) * seconds_per_step, tokens_per_second=tokens_per_second)


def job_of(folder, state, message="Training…", error=None):
    return jobs.Job(folder.run_id, OWNER, RunSettings(source="a.jsonl"), state=state, message=message,
                    run_dir=folder.path, error=error)


def test_the_estimate_becomes_the_runs_measured_speed_and_warns_when_the_machine_is_much_slower(tmp_path):
    slow = run_folder(tmp_path, "slow", metrics=[measured(1, 9.0)])
    assert train_tab.live_markdown(TWO_CORES, slow.path) is None  # one step says little: the estimate stands
    write_events(slow, measured(5, 12.3))
    text = train_tab.live_markdown(TWO_CORES, slow.path)
    assert text == (
        "This app trains on **CPU, 2 cores, 24 GiB memory**. At this speed: about 30m 00s in all, 28m 30s left "
        "(12 tokens/s measured over 5 steps).\n\n⚠️ This machine trains about 10× slower than its usual figure for "
        "this model (12 vs ~125 tokens/s): it is busy with other work, so the run takes that much longer than "
        "estimated. It goes on; Stop keeps what it has learned so far.")
    usual = run_folder(tmp_path, "usual", metrics=[measured(5, 120.0, seconds_per_step=2.0)])
    assert "At this speed: about 3m 20s in all" in train_tab.live_markdown(TWO_CORES, usual.path)
    assert "slower" not in train_tab.live_markdown(TWO_CORES, usual.path)
    # A record that does not say its plan: the speed, without a comparison.
    bare = run_folder(tmp_path, "bare", metrics=[measured(5, 12.3)], plan=None)
    assert "At this speed" in train_tab.live_markdown(TWO_CORES, bare.path)
    assert "slower" not in train_tab.live_markdown(TWO_CORES, bare.path)


def test_a_refusal_stands_until_a_new_job_or_a_new_state_of_the_one_shown(tmp_path):
    folder = run_folder(tmp_path)
    nothing = train_tab.refusal_notice("You have no run to stop.", None)
    assert train_tab.standing_refusal(nothing, None) == "You have no run to stop."
    job = job_of(folder, jobs.JobState.RUNNING)
    assert train_tab.standing_refusal(nothing, job) == ""  # a run started since: the refusal is old news
    refused = train_tab.refusal_notice("Check your data in the Data tab first.", job)
    assert train_tab.standing_refusal(refused, job) == "Check your data in the Data tab first."
    job.state = jobs.JobState.FINISHED
    assert train_tab.standing_refusal(refused, job) == ""
    assert train_tab.standing_refusal("", job) == "" and train_tab.standing_refusal(None, None) == ""


@pytest.fixture
def app(tmp_path, monkeypatch, tiny_model_dir):
    """The app with a stand-in job runner: a run that records itself as training, then finishes when told."""
    from sft_space.ui import build_app

    def train_until_told(job, on_status, on_folder, on_running):
        folder = runs.RunFolder.create(job.settings.output_dir, job.job_id)
        folder.write({"run_id": job.job_id, "status": runs.RUNNING, "owner": job.owner, "plan": PLAN,
                      "base_model": models.EMBEDDED_MODEL, "settings": asdict(job.settings)})
        write_events(folder, measured(5, 12.3))
        on_folder(folder.path)
        on_running()
        job.stop_event.wait(60)
        folder.update(status=runs.FINISHED)
        return folder.path

    monkeypatch.setenv("SFT_SPACE_RUNS", str(tmp_path / "runs"))
    manager = jobs.JobManager(train_until_told)
    blocks = build_app(manager, default_model=str(tiny_model_dir))
    handlers = {f.fn.__name__: f.fn for f in blocks.fns.values() if f.fn is not None}
    yield blocks, handlers, manager
    for job in list(manager._jobs.values()):
        job.stop_event.set()


def advanced(**values):
    return [values.get(spec.name, spec.default) for spec in train_tab.advanced_fields()]


def tab_texts(blocks, tab_id):
    """Every text a tab shows (Markdown, labels, help, choices), except the command box's command line."""
    tab = next(block for block in blocks.blocks.values() if isinstance(block, gr.Tab) and block.id == tab_id)
    texts, todo = [], list(tab.children)
    while todo:
        block = todo.pop()
        todo.extend(getattr(block, "children", []) or [])
        if isinstance(block, gr.Code):
            continue
        for name in ("label", "info", "placeholder"):
            if isinstance(getattr(block, name, None), str):
                texts.append(getattr(block, name))
        if isinstance(block, (gr.Markdown, gr.Button)) and isinstance(block.value, str):
            texts.append(block.value)
        for choice in getattr(block, "choices", None) or []:
            texts.append(str(choice[0] if isinstance(choice, tuple) else choice))
    return texts


def test_a_refusal_line_clears_once_a_run_starts_and_the_estimate_follows_the_run(app, embedded_tokenizer,
                                                                                   tiny_model_dir):
    blocks, handlers, manager = app
    token = handlers["on_load"]("")
    with pytest.warns(UserWarning, match="Check your data"):
        _, status, _, notice = handlers["on_start"](None, token, "", None, None, False, str(tiny_model_dir), "quick",
                                                    *advanced())
    assert status.startswith("**Refused** · Check your data")
    assert handlers["refresh"](token, "", notice)[1] == status  # it stays while nothing else happened
    data_settings = DataSettings(source=str(SAMPLE_DATA))
    report = checks.check_data(data_settings, embedded_tokenizer)
    job_id = handlers["on_start"](None, token, "", report, data_settings, False, str(tiny_model_dir), "quick",
                                  *advanced())[0]
    job = manager.get(job_id, access.Identity.for_runs(os.environ["SFT_SPACE_RUNS"]).visitor(token))
    assert wait_until(lambda: job.state == jobs.JobState.RUNNING)
    # Even a page that still holds the old refusal (its Start's answer and a refresh crossing) shows it no more.
    running = handlers["refresh"](token, job_id, notice)[1]
    assert "Refused" not in running and running.startswith("**Running**")
    speed, speed_of = handlers["on_speed"](None, token, job_id, "")
    assert "At this speed" in speed and speed_of == job_id
    job.stop_event.set()
    assert wait_until(lambda: job.done)
    finished = handlers["refresh"](token, job_id, notice)[1]
    assert "Refused" not in finished and "Finished · Finished" not in finished
    assert "**Chat**" in finished and "**Publish**" in finished
    # Once ended, the box says once what the run trained at, for the runs to come; then it is left as it is.
    speed, speed_of = handlers["on_speed"](None, token, job_id, job_id)
    assert speed.endswith("so runs take that much longer than estimated.") and "The last run trained at 12" in speed
    assert speed_of == "" and "Stop" not in speed
    assert all(isinstance(value, type(gr.skip())) for value in handlers["on_speed"](None, token, job_id, ""))


def test_the_train_and_runs_tabs_speak_no_code_outside_the_command_box(app, tmp_path, embedded_tokenizer):
    blocks, _, _ = app
    runs_dir = tmp_path / "server-runs"
    texts = tab_texts(blocks, "train") + tab_texts(blocks, "runs")
    # The status line and the estimate in the states a visitor meets.
    running = run_folder(runs_dir, "running", metrics=[measured(5, 12.3)])
    finished = run_folder(runs_dir, "finished", status=runs.FINISHED, metrics=[measured(100, 120.0)])
    stopped = run_folder(runs_dir, "stopped", status=runs.RUNNING)
    (stopped.path / "checkpoint-4").mkdir()
    for name in (runs.ADAPTER_CONFIG, runs.ADAPTER_WEIGHTS, "trainer_state.json"):
        (stopped.path / "checkpoint-4" / name).write_text("{}")
    child.settle(stopped, None, [], killed_after_stop=True)
    failed = run_folder(runs_dir, "failed")
    child.settle(failed, -9, ["step 3\n"], killed_after_stop=False)
    texts += [train_tab.progress_markdown(None), train_tab.progress_markdown(None, "You have no run to stop."),
              train_tab.progress_markdown(job_of(running, jobs.JobState.RUNNING)),
              train_tab.progress_markdown(job_of(finished, jobs.JobState.FINISHED, "Finished.")),
              train_tab.progress_markdown(job_of(stopped, jobs.JobState.STOPPED, stopped.read()["error"])),
              train_tab.progress_markdown(job_of(failed, jobs.JobState.FAILED, failed.read()["error"],
                                                 failed.read()["error"])),
              train_tab.live_markdown(TWO_CORES, running.path),
              train_tab.jobs_progress_markdown(None),
              access.describe_who_may_train("auto", {}), access.describe_who_may_train("anyone", {}),
              runs_tab.run_details(str(runs_dir), "finished", OWNER)[0]]
    settings = RunSettings(source=str(SAMPLE_DATA), model=models.EMBEDDED_MODEL)
    texts.append(train_tab.estimate_markdown(TWO_CORES, settings, checks.check_data(settings, embedded_tokenizer)))
    for text in texts:
        assert not CODE_WORDS.search(text), text
        assert str(runs_dir) not in text and OWNER not in text, text
    assert "adapter of step 4" in stopped.read()["error"]
    # Steps in plain numbers on every loss plot: with "~g" the plot gives the format the precision of its tick
    # spacing, and ticks 100, 110 read "1e+2 1.1e+2"; "r" keeps them whole.
    plots = [block for block in blocks.blocks.values() if isinstance(block, gr.LinePlot) and block.x == "step"]
    # The Train tab's (a run here, a run on Jobs), the Runs tab's and the comparison's.
    assert len(plots) == 5 and {plot.x_axis_format for plot in plots} == {train_tab.STEP_AXIS_FORMAT}
    assert train_tab.STEP_AXIS_FORMAT.endswith("r")


def test_run_details_are_a_readable_summary_without_the_servers_paths_or_the_visitors_id(tmp_path):
    folder = run_folder(tmp_path, status=runs.FINISHED, final_metrics={"step": 100, "loss_smoothed": 1.234})
    text, _ = runs_tab.run_details(str(tmp_path), RUN_ID, OWNER)
    assert text.startswith(f"**{RUN_ID}** · finished")
    assert "| data | captain.jsonl |" in text and "| train loss (smoothed) | 1.234 |" in text
    assert "| preset | balanced |" in text and "Plan: fp32 on CPU" in text
    assert "{" not in text and str(tmp_path) not in text and OWNER not in text and "output_dir" not in text
    # The settings its preset chose go without saying; one chosen otherwise is listed.
    assert "learning_rate" not in text and "lora_r" not in text
    folder.update(settings={**folder.read()["settings"], "lora_r": 32})
    assert "| lora_r | 32 |" in runs_tab.run_details(str(tmp_path), RUN_ID, OWNER)[0]


def test_compare_plots_name_each_run_within_the_legend(tmp_path):
    assert compare.legend_name(RUN_ID) == "10:15 captain_byte-a1b2"
    long = "20261203-101500-my_customer_support_conversations_v2-a1b2"
    assert compare.legend_name(long) == "10:15 my_customer…2-a1b2" and len(compare.legend_name(long)) <= 24
    names = compare.legend_names([long, long.replace("a1b2", "c3d4")])
    assert names[long].endswith("a1b2") and len(set(names.values())) == 2
    # Two runs whose shortened names would be one: numbered.
    twins = ["x" * 30 + "-a1b2", "y" * 30 + "-a1b2"]
    assert len(set(compare.legend_names(twins).values())) == 2
    for folder_id in ("20261203-101500-captain_byte-a1b2", "20261203-111500-captain_byte-c3d4"):
        run_folder(tmp_path, folder_id, status=runs.FINISHED, metrics=[measured(100, 120.0), measured(110, 120.0)])
    _, train_plot, _, _ = runs_tab.compare_view(str(tmp_path), ["20261203-101500-captain_byte-a1b2",
                                                                "20261203-111500-captain_byte-c3d4"], True, OWNER)
    assert set(train_plot.value["data"] and [row[2] for row in train_plot.value["data"]]) == {
        "10:15 captain_byte-a1b2", "11:15 captain_byte-c3d4"}
