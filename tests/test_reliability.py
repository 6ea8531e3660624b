"""Faults and safety: a killed training process resumes, a full disk ends in a clear failure, run ids cannot
escape the runs folder, remote code and pickled weights are refused unless asked for."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from builders import persona_chats
from sft_space import cli, models, runs
from sft_space import train as train_module
from sft_space.errors import UserError
from sft_space.settings import RunSettings, run_settings
from sft_space.planning import DISK_FULL_ADVICE
from sft_space.train import TrainRequest, TrainingFailed, train

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_a_killed_run_resumes_losing_at_most_one_save_interval(tiny_model_dir, tmp_path, write_jsonl):
    """SIGKILL between two saves (no chance to clean up), then `train --resume` finishes the run."""
    # Killed once step 7 is logged, one step past the save at 6: the same step on every run of the test.
    save_every, max_steps, kill_at = 3, 16, 7
    source = write_jsonl(persona_chats(24))
    runs_dir = tmp_path / "runs"
    command = [sys.executable, "-m", "sft_space", "train", str(source), "--model", str(tiny_model_dir),
               "--output-dir", str(runs_dir), "--run-name", "killed", "--preset", "quick", "--max-steps",
               str(max_steps), "--save-every", str(save_every), "--sample-prompts", "0"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    folder = runs.RunFolder(runs_dir / "killed")
    deadline = time.time() + 240
    while time.time() < deadline:
        steps = [m["step"] for m in folder.read_metrics() if "loss" in m] if folder.events_path.exists() else []
        if steps and steps[-1] >= kill_at:
            break
        assert process.poll() is None, "training ended before it could be killed"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    killed_at = max(m["step"] for m in folder.read_metrics() if "loss" in m)
    assert folder.read()["status"] == runs.RUNNING  # what a dead process leaves behind
    assert runs.check_resumable(folder) == folder.last_checkpoint() and folder.lock_holder() is None
    checkpoint = int(folder.last_checkpoint().name.split("-")[1])
    assert killed_at - checkpoint <= save_every, "at most one save interval is lost"

    # The command line again, in this process (the kill needed a process of its own; the resume does not).
    assert cli.main(["train", "--resume", str(folder.path)]) == 0
    record = folder.read()
    assert record["status"] == runs.FINISHED and record["final_metrics"]["step"] == max_steps
    assert record["resumed_from"] == f"checkpoint-{checkpoint}"


def test_run_ids_cannot_name_a_path_outside_the_runs_folder(tmp_path):
    for bad in ("../escape", "a/b", "/etc", "..", ".", "", "x" * 200, "name with space", "evil\x00"):
        with pytest.raises(UserError):
            runs.RunFolder.create(tmp_path / "runs", bad)
    assert not (tmp_path / "escape").exists()
    # Uploaded file names only ever become a sanitised part of a run id.
    run_id = runs.new_run_id("/tmp/gradio/abc/../../etc/passwd; rm -rf ~.jsonl")
    assert runs.validate_run_id(run_id) == run_id and "/" not in run_id and ".." not in run_id


def test_remote_code_is_off_unless_asked_for_and_named_as_a_risk():
    spec = RunSettings.__dataclass_fields__["trust_remote_code"]
    assert spec.default is False and "code" in spec.metadata["help"].lower()


def test_pickled_weights_are_never_loaded(tmp_path, tiny_model_dir):
    """A checkpoint that has only a pickle (.bin) file is refused: unpickling can run arbitrary code."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    pickled = tmp_path / "pickled-model"
    pickled.mkdir()
    model.config.save_pretrained(pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(UserError):
        models.load_causal_lm(str(pickled))


def test_hub_ids_are_validated_before_use():
    for bad in ("../../etc", "owner/name/extra", "owner/../x", "-owner/name", "owner/ name"):
        with pytest.raises(UserError):
            models.resolve_model(bad)
    assert models.resolve_model("owner/name") == "owner/name"


def test_run_record_is_replaced_atomically(tmp_path, monkeypatch):
    """A crash while writing run.json leaves the previous record readable, never half of one."""
    folder = runs.RunFolder.create(tmp_path, "atomic")
    folder.write({"status": "running", "step": 1})

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(json, "dump", crash)
    with pytest.raises(OSError):
        folder.update(status="finished")
    monkeypatch.undo()
    assert folder.read() == {"status": "running", "step": 1}
    assert [p.name for p in folder.path.iterdir()] == ["run.json"], "no temporary file is left behind"


@pytest.fixture
def small_disk(tmp_path):
    """A real 6 MB filesystem (tmpfs), where the machine lets the tests mount one (as root); skipped elsewhere."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small filesystem needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here: {mounted.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(disk, leave):
    """Write a file that leaves about `leave` bytes free on `disk` (none when `leave` is 0)."""
    with open(disk / "filler", "wb") as handle:
        try:
            while shutil.disk_usage(disk).free > leave:
                handle.write(b"\0" * min(1 << 20, max(4096, shutil.disk_usage(disk).free - leave)))
                handle.flush()
        except OSError as err:
            assert err.errno == errno.ENOSPC


def small_run(tiny_model_dir, write_jsonl, output_dir, **values):
    settings = run_settings("quick", source=str(write_jsonl(persona_chats(12))), model=str(tiny_model_dir),
                            output_dir=str(output_dir), max_steps=6, save_every=2, sample_prompts=0,
                            validation_fraction=0.0, seed=0)
    return TrainRequest(settings, run_id="full", **values)


@pytest.mark.parametrize("room", [100_000, 0], ids=["room-for-the-record", "no-room-at-all"])
def test_a_really_full_disk_ends_in_the_advice_not_a_traceback(small_disk, room, tiny_model_dir, write_jsonl,
                                                             monkeypatch):
    # The check before a run would refuse a 6 MB disk; this is about a disk that fills once the run has started.
    monkeypatch.setattr(train_module, "check_free_disk", lambda runs_dir, needed: None)
    job = small_run(tiny_model_dir, write_jsonl, small_disk / "runs", on_folder=lambda folder: fill(small_disk, room))
    with pytest.raises(TrainingFailed, match="The disk is full"):
        train(job)
    folder = runs.RunFolder(small_disk / "runs" / "full")
    record = folder.read()  # never half a record: the old one or the new one
    if room:
        # The partial checkpoint took the last free bytes; it is never resumed from, so it made way for the record.
        assert record["status"] == runs.FAILED and record["error"] == DISK_FULL_ADVICE
        assert folder.incomplete_checkpoints() == []
    else:
        assert record["status"] in (runs.RUNNING, runs.FAILED)
    assert not folder.lock_path.exists(), "the lock is released whatever happened"


def test_when_no_write_succeeds_after_the_start_the_failure_is_still_reported(tiny_model_dir, write_jsonl, tmp_path,
                                                                            monkeypatch):
    import torch

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    def no_more_writes(folder):
        monkeypatch.setattr(os, "fsync", disk_full)  # run.json, replaced atomically
        monkeypatch.setattr(Path, "write_text", disk_full)  # failure.txt
        monkeypatch.setattr(torch, "save", disk_full)  # checkpoints

    with pytest.raises(TrainingFailed, match="The disk is full"):
        train(small_run(tiny_model_dir, write_jsonl, tmp_path / "runs", on_folder=no_more_writes))
    monkeypatch.undo()
    folder = runs.RunFolder(tmp_path / "runs" / "full")
    assert folder.read()["status"] == runs.RUNNING, "the record that could not be replaced is still whole"
    assert not (folder.path / train_module.FAILURE_FILE).exists() and not folder.lock_path.exists()
