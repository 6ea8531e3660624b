"""Faults and safety: a killed training process resumes, run ids cannot escape the runs folder, remote code and
pickled weights are refused unless asked for."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from builders import persona_chats
from sft_space import models, runs
from sft_space.errors import UserError
from sft_space.settings import RunSettings

ROOT = Path(__file__).resolve().parent.parent


def test_a_killed_run_resumes_losing_at_most_one_save_interval(tiny_model_dir, tmp_path, write_jsonl):
    """SIGKILL at a random step (no chance to clean up), then `train --resume` finishes the run."""
    save_every, max_steps = 3, 16
    kill_at = random.Random(os.getpid()).randint(5, 11)
    source = write_jsonl(persona_chats(24))
    runs_dir = tmp_path / "runs"
    command = [sys.executable, "-m", "sft_space", "train", str(source), "--model", str(tiny_model_dir),
               "--output-dir", str(runs_dir), "--run-name", "killed", "--preset", "quick", "--max-steps",
               str(max_steps), "--save-every", str(save_every), "--sample-prompts", "0"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    folder = runs.RunFolder(runs_dir / "killed")
    deadline = time.time() + 240
    while time.time() < deadline:
        steps = [m["step"] for m in folder.read_metrics() if "loss" in m] if folder.metrics_path.exists() else []
        if steps and steps[-1] >= kill_at:
            break
        assert process.poll() is None, "training ended before it could be killed"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    killed_at = max(m["step"] for m in folder.read_metrics() if "loss" in m)
    assert folder.read()["status"] == runs.RUNNING  # what a dead process leaves behind
    assert runs.resumable_runs(runs_dir) == [folder]
    checkpoint = int(folder.last_checkpoint().name.split("-")[1])
    assert killed_at - checkpoint <= save_every, "at most one save interval is lost"

    resumed = subprocess.run([sys.executable, "-m", "sft_space", "train", "--resume", str(folder.path)], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
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
