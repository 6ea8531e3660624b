"""Run records from disk are outside input: one validated schema, a lock per run, and a free-disk check.

A run.json may be cut off, hand-edited or written by an older version; whatever it holds, listing runs never
fails and never hides one, and every command that opens it says what is wrong instead of a traceback.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest

from builders import persona_chats, step_event, write_events
from sft_space import cli, planning, runs
from sft_space.errors import UserError
from sft_space.runs import RunFolder, RunLocked, UnreadableRun
from sft_space.settings import RunSettings, run_settings
from sft_space.train import TrainRequest, TrainingFailed, train

GOOD = {"run_id": "good", "status": "finished", "created_at": "2026-01-02T10:00:00+0000", "owner": "alice",
        "settings": {}, "final_metrics": {"loss": 1.5, "loss_smoothed": 1.25, "step": 3}, "error": None}
BROKEN = {
    # run id: (what run.json holds, what the reason must say)
    "a-list": ("[]", "should be a JSON object, not a list"),
    "int-created": (json.dumps({**GOOD, "created_at": 1700000000}), "'created_at' should be text, not a number"),
    "text-loss": (json.dumps({**GOOD, "final_metrics": {"loss": "x"}}), "'final_metrics' should hold numbers"),
    "null-settings": (json.dumps({**GOOD, "settings": None}), "'settings' should be an object, not null"),
    "bad-status": (json.dumps({**GOOD, "status": 3}), "'status' should be one of running, stopped, finished"),
    "owned": (json.dumps({**GOOD, "owner": "alice", "plan": []}), "'plan' should be an object, not a list"),
    "truncated": (json.dumps(GOOD)[:40], "is not valid JSON (it may have been cut off)"),
}


def write_run(runs_dir, run_id, content, adapter=False):
    folder = Path(runs_dir) / run_id
    folder.mkdir(parents=True)
    (folder / runs.RUN_FILE).write_text(content, encoding="utf-8")
    if adapter:
        (folder / runs.ADAPTER_DIR).mkdir()
        (folder / runs.ADAPTER_DIR / "adapter_config.json").write_text("{}")
        (folder / runs.ADAPTER_DIR / "adapter_model.safetensors").write_bytes(b"weights")
    return RunFolder(folder)


@pytest.fixture
def broken_runs(tmp_path):
    runs_dir = tmp_path / "runs"
    write_run(runs_dir, "good", json.dumps(GOOD), adapter=True)
    for run_id, (content, _) in BROKEN.items():
        write_run(runs_dir, run_id, content, adapter=True)
    return runs_dir


@pytest.mark.parametrize("run_id", sorted(BROKEN))
def test_reading_a_broken_record_names_the_run_and_what_is_wrong(broken_runs, run_id):
    with pytest.raises(UnreadableRun) as caught:
        RunFolder(broken_runs / run_id).read()
    message = str(caught.value)
    assert message.startswith(f"run.json of run {run_id} ") and BROKEN[run_id][1] in message
    assert isinstance(caught.value, UserError)


def test_every_run_is_listed_and_broken_ones_read_as_unreadable(broken_runs):
    listed = runs.list_runs(broken_runs)  # sorting mixed records must not fail
    by_id = {folder.run_id: record for folder, record in listed}
    assert set(by_id) == {"good", *BROKEN}, "no run disappears from the list"
    assert by_id["good"] == GOOD
    for run_id in BROKEN:
        record = by_id[run_id]
        assert record["status"] == runs.UNREADABLE and BROKEN[run_id][1] in record["error"]
        assert record["run_id"] == run_id and record["settings"] == {} and record["final_metrics"] == {}
        assert isinstance(record["created_at"], str) and record["created_at"][:2] == "20"
    assert by_id["owned"]["owner"] == "alice", "an object's owner is kept, so only its owner sees it"
    assert by_id["a-list"]["owner"] is None and by_id["truncated"]["owner"] is None
    created = [record["created_at"] for _, record in listed]
    assert created == sorted(created, reverse=True)
    assert [f.run_id for f, _ in runs.visible_runs(broken_runs, "bob")].count("owned") == 0


def test_the_apps_run_pickers_survive_broken_records(broken_runs):
    from sft_space.ui.common import adapter_run_choices

    labels = [label for label, _ in adapter_run_choices(str(broken_runs), "alice")]
    assert "good · finished · train loss 1.250 (smoothed)" in labels


def test_opening_a_broken_run_says_why_and_only_to_whoever_may_see_it(broken_runs):
    with pytest.raises(UnreadableRun, match="'created_at' should be text"):
        runs.open_visible(broken_runs, "int-created", "alice")
    with pytest.raises(UnreadableRun, match="'plan' should be an object"):
        runs.open_visible(broken_runs, "owned", "alice")
    with pytest.raises(UserError, match="There is no run owned of yours here"):
        runs.open_visible(broken_runs, "owned", "bob")
    with pytest.raises(UnreadableRun, match="not valid JSON"):
        RunFolder.open(broken_runs / "truncated")


def test_a_command_line_run_is_shown_to_no_visitor_readable_or_not(broken_runs):
    """Runs without an owner were started from the command line: the operator's. No visitor lists or opens one,
    and a broken one's reason is not told to them either."""
    write_run(broken_runs, "from-cli", json.dumps({**GOOD, "owner": None}), adapter=True)
    for visitor in ("alice", "bob", None):
        visible = [folder.run_id for folder, _ in runs.visible_runs(broken_runs, visitor)]
        assert not {"from-cli", "a-list", "truncated"} & set(visible)
        for run_id in ("from-cli", "a-list", "truncated"):
            with pytest.raises(UserError, match=f"There is no run {run_id} of yours here"):
                runs.open_visible(broken_runs, run_id, visitor)
    assert RunFolder.open(broken_runs / "from-cli").read()["owner"] is None  # the command line still opens it


def test_a_broken_run_cannot_be_resumed_and_says_why(broken_runs):
    for run_id in ("good", "int-created"):
        checkpoint = broken_runs / run_id / "checkpoint-2"
        checkpoint.mkdir()
        (checkpoint / "trainer_state.json").write_text("{}")
    (broken_runs / "good" / runs.RUN_FILE).write_text(json.dumps({**GOOD, "status": "stopped",
                                                                  "settings": {"source": "data.jsonl"}}))
    assert runs.check_resumable(RunFolder(broken_runs / "good")) == broken_runs / "good" / "checkpoint-2"
    with pytest.raises(UnreadableRun, match="'created_at' should be text"):
        runs.check_resumable(RunFolder(broken_runs / "int-created"))


@pytest.mark.parametrize("command", [
    ["chat", "{run}", "--prompt", "hi"],
    ["export", "{run}", "--zip", "{tmp}/out.zip"],
    ["export", "{run}", "--merged", "{tmp}/merged"],
    ["export", "{run}", "--adapter", "{tmp}/adapter"],
    ["push", "{run}", "--repo", "alice/x"],
    ["train", "--resume", "{run}"],
])
@pytest.mark.parametrize("run_id", ["a-list", "text-loss", "null-settings", "truncated"])
def test_commands_on_a_broken_run_exit_1_with_the_reason(broken_runs, tmp_path, capsys, command, run_id,
                                                         monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_NotARealToken")
    argv = [part.format(run=broken_runs / run_id, tmp=tmp_path) for part in command]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert f"error: run.json of run {run_id} " in err and BROKEN[run_id][1] in err
    assert not (tmp_path / "out.zip").exists() and not (tmp_path / "merged").exists()


# ---- one training process per run ----------------------------------------------------------------------------


def stopped_run(runs_dir, run_id="held"):
    """A run folder as a stop leaves it: a record, metrics and a complete checkpoint."""
    settings = run_settings("quick", source=str(Path(runs_dir) / "no-such-data.jsonl"), output_dir=str(runs_dir))
    folder = RunFolder.create(runs_dir, run_id)
    from dataclasses import asdict

    folder.write({"run_id": run_id, "status": runs.STOPPED, "created_at": runs.timestamp(),
                  "settings": asdict(settings), "final_metrics": {"loss": 2.0, "step": 3}, "error": None})
    write_events(folder, step_event(3, 2.0))
    (folder.path / "checkpoint-3").mkdir()
    (folder.path / "checkpoint-3" / "trainer_state.json").write_text("{}")
    return folder


def snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.path.iterdir() if p.is_file() and p.name != runs.LOCK_FILE}


def test_a_second_resume_of_a_locked_run_is_refused_before_anything_is_read_or_written(tmp_path):
    folder = stopped_run(tmp_path / "runs")
    before = snapshot(folder)
    with folder.locked():
        holder = folder.lock_holder()
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        # The data file does not exist: the refusal comes before the (slow) data checks.
        with pytest.raises(RunLocked, match=rf"Run held is already training \(process {os.getpid()} on host "):
            train(TrainRequest(RunSettings(), resume=folder.path))
        with pytest.raises(RunLocked, match="wait for it to end or stop it"):
            with folder.locked():
                pass
    assert snapshot(folder) == before, "nothing was written to the run folder"
    assert folder.lock_holder() is None and not (folder.path / runs.LOCK_FILE).exists()


def test_the_command_line_prints_the_refusal(tmp_path, capsys):
    folder = stopped_run(tmp_path / "runs")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (folder.path / runs.LOCK_FILE).write_text(json.dumps(
            {"pid": sleeper.pid, "host": socket.gethostname(), "started_at": runs.timestamp()}))
        assert folder.lock_holder()["pid"] == sleeper.pid
        assert cli.main(["train", "--resume", str(folder.path)]) == 1
        err = capsys.readouterr().err
        assert f"error: Run held is already training (process {sleeper.pid} on host" in err
    finally:
        sleeper.kill()
        sleeper.wait()
    assert [(point["step"], point["loss"]) for point in folder.read_metrics()] == [(3, 2.0)]


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    folder = stopped_run(tmp_path / "runs")
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
    dead = int(finished.stdout)
    (folder.path / runs.LOCK_FILE).write_text(json.dumps(
        {"pid": dead, "host": socket.gethostname(), "started_at": "2026-01-01T00:00:00+0000"}))
    assert folder.lock_holder() is None
    with folder.locked():
        assert json.loads((folder.path / runs.LOCK_FILE).read_text())["pid"] == os.getpid()
    assert not (folder.path / runs.LOCK_FILE).exists()


def test_a_lock_held_on_another_host_is_honoured_and_named(tmp_path):
    folder = stopped_run(tmp_path / "runs")
    (folder.path / runs.LOCK_FILE).write_text(json.dumps(
        {"pid": 1, "host": "gpu-box-7", "started_at": "2026-01-01T00:00:00+0000"}))
    assert folder.lock_holder()["host"] == "gpu-box-7"
    with pytest.raises(RunLocked, match=r"process 1 on host gpu-box-7 since 2026-01-01.*delete .*\.lock"):
        with folder.locked():
            pass
    assert (folder.path / runs.LOCK_FILE).exists()


@pytest.fixture
def tiny_settings(tiny_model_dir, tmp_path, write_jsonl):
    source = write_jsonl(persona_chats(12))
    return run_settings("quick", source=str(source), model=str(tiny_model_dir), output_dir=str(tmp_path / "runs"),
                        max_steps=4, save_every=2, sample_prompts=0, validation_fraction=0.0, seed=0)


@pytest.mark.slow
def test_training_holds_the_lock_until_it_returns_in_every_path(tiny_settings):
    from transformers import TrainerCallback

    held = []

    class FailAtStep3(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            held.append(RunFolder(Path(tiny_settings.output_dir) / "locked").lock_holder())
            if state.global_step == 3:
                raise RuntimeError("a bug at step 3")

    with pytest.raises(TrainingFailed, match="a bug at step 3"):
        train(TrainRequest(tiny_settings, run_id="locked", extra_callbacks=[FailAtStep3()]))
    assert held and all(holder and holder["pid"] == os.getpid() for holder in held)
    folder = RunFolder(Path(tiny_settings.output_dir) / "locked")
    assert folder.lock_holder() is None and not (folder.path / runs.LOCK_FILE).exists()

    held.clear()
    resumed = train(TrainRequest(RunSettings(), resume=folder.path, extra_callbacks=[
        type("Watch", (TrainerCallback,), {"on_step_end": lambda self, *a, **k: held.append(folder.lock_holder())})()]))
    assert resumed.read()["status"] == runs.FINISHED
    assert held and all(holder and holder["pid"] == os.getpid() for holder in held)
    assert folder.lock_holder() is None


# ---- room on the disk -----------------------------------------------------------------------------------------


def test_the_disk_a_run_needs_grows_with_the_adapter_and_the_checkpoints_kept():
    small = planning.disk_needed(1_000_000)
    # Weights and two fp32 AdamW moments per trainable parameter, in every checkpoint kept, plus the saving
    # one, plus the final adapter, plus a margin.
    at_least = (planning.KEEP_CHECKPOINTS + 1) * 1_000_000 * 12 + 1_000_000 * 4
    assert at_least < small < at_least + 500 * 2**20
    assert planning.disk_needed(2_000_000) - small == (planning.KEEP_CHECKPOINTS + 1) * 12_000_000 + 4_000_000
    assert planning.disk_needed(1_000_000, checkpoints=1) < small


def test_a_run_is_refused_before_its_folder_exists_when_the_disk_is_too_small(tiny_settings, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 * 2**20, 9 * 2**20, 2**20))
    with pytest.raises(UserError, match=r"Not enough free disk space .*1 MB free.* needs about \d+ MB.*[Ff]ree"):
        train(TrainRequest(tiny_settings, run_id="no-room"))
    assert not (Path(tiny_settings.output_dir) / "no-room").exists()


def test_a_runs_held_out_answers_are_read_in_one_place_and_never_fail_a_reader(tmp_path):
    """samples.json is an extra (the card's table, the chat tab's suggestions): missing, cut off or of the wrong
    shape, the run has no answers to show; otherwise its answers, as train wrote them."""
    folder = RunFolder.create(tmp_path, "answers")
    assert folder.samples() == []
    answers = [{"row": 3, "prompt": [{"role": "user", "content": "Ahoy?"}], "reference": "Arr.", "before": "Hi.",
                "after": "Arr!"}]
    runs.write_json_atomic(folder.samples_path, answers)
    assert folder.samples() == answers
    for broken in ('[{"row": 3, "prom', '{"row": 3}', '[3, "x", null]', "\xff\xfe"):
        folder.samples_path.write_bytes(broken.encode("latin-1"))
        assert folder.samples() == [], broken
    folder.samples_path.write_text(json.dumps([*answers, "not an answer"]))
    assert folder.samples() == answers
    assert folder.held_out_prompts() == ["Ahoy?"]
    # Messages of another shape inside a prompt are left out, so no reader trips on them (the chat tab's suggestion,
    # the card's table): a prompt that is not a list, a message that is not a dict, without content, or not text.
    odd = [{"prompt": "Ahoy?"}, {"prompt": [3, {"role": "user"}, {"role": "user", "content": ["x"]}]},
           {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Arr?"}]}]
    folder.samples_path.write_text(json.dumps(odd))
    assert [sample["prompt"] for sample in folder.samples()][:2] == [[], []]
    assert folder.held_out_prompts() == ["", "", "Arr?"]
