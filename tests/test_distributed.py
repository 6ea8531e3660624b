"""Training on several processes: the path a multi-GPU machine takes, run here as 2 CPU processes (gloo)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from builders import persona_chats

from sft_space import distributed, runs
from sft_space.train import accumulation_per_process, processes_reason

FAST = ["--learning-rate", "5e-3", "--warmup-ratio", "0", "--lr-scheduler", "constant_with_warmup", "--seed", "0"]


def train_command(data, model, runs_dir, *flags):
    return [sys.executable, "-m", "sft_space", "train", str(data), "--model", str(model), "--output-dir",
            str(runs_dir), "--processes", "2", *FAST, *flags]


def test_the_batch_of_a_step_stays_what_the_settings_make_it(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert accumulation_per_process(8) == 2 and accumulation_per_process(1) == 1
    assert processes_reason(8, 2) == ("4 processes, one per device: 4 × batch 2 × accumulation 2 = 16 examples per "
                                      "step (on one device: 2 × 8)")
    monkeypatch.delenv("WORLD_SIZE")
    assert accumulation_per_process(8) == 8 and distributed.is_main() and not distributed.launched()


def test_processes_default_to_one_per_gpu_and_can_be_asked_for(monkeypatch):
    monkeypatch.delenv(distributed.PROCESSES_VARIABLE, raising=False)
    assert distributed.processes_wanted() == 1  # no GPU here
    assert distributed.processes_wanted(3) == 3
    monkeypatch.setenv(distributed.PROCESSES_VARIABLE, "2")
    assert distributed.processes_wanted() == 2


@pytest.mark.slow
def test_two_processes_train_one_run_and_stop_and_resume_together(tmp_path, tiny_model_dir, write_jsonl):
    """One run folder, one adapter, every step once; a stop reaches both processes, which save the same step, and
    a resume on two processes finishes the run. (One run stopped and resumed: each launch of two processes costs
    seconds of start-up, so a separate uninterrupted run would prove nothing more.)"""
    data = write_jsonl(persona_chats(48))
    runs_dir = tmp_path / "runs"
    # Stopped with one signal to the group, as the app's supervisor (or Ctrl+C in a terminal) does.
    process = subprocess.Popen(train_command(data, tiny_model_dir, runs_dir, "--max-steps", "24", "--save-every",
                                             "4", "--sample-prompts", "0", "--run-name", "two"),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    for line in process.stdout:
        if "step 6/" in line:
            break
    pressed = time.monotonic()
    os.killpg(process.pid, signal.SIGINT)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == distributed.EXIT_STOPPED, output[-3000:]
    assert time.monotonic() - pressed < 30
    assert [p.name for p in runs_dir.iterdir() if not p.name.startswith(".")] == ["two"]
    folder = runs.RunFolder(runs_dir / "two")
    assert folder.read()["status"] == runs.STOPPED and folder.has_adapter
    step = int(folder.last_checkpoint().name.removeprefix("checkpoint-"))
    assert json.loads((folder.last_checkpoint() / "trainer_state.json").read_text())["global_step"] == step

    resumed = subprocess.run([sys.executable, "-m", "sft_space", "train", "--resume", str(folder.path),
                              "--processes", "2"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    record = folder.read()
    assert record["status"] == runs.FINISHED and folder.has_adapter
    assert any("2 processes, one per device" in reason for reason in record["plan"]["reasons"])
    # Each process keeps its own random state in a checkpoint: proof that two trained.
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in folder.last_checkpoint().iterdir()}
    losses = [m for m in folder.read_metrics() if "loss" in m]
    steps = [m["step"] for m in losses]
    assert steps == sorted(set(steps)) and steps[-1] == 24, steps
    assert sum(m["loss"] for m in losses[-3:]) / 3 < losses[0]["loss"]
    assert resumed.stderr.count("Training…") == 1  # the main process speaks for both
