"""Opt-in experiment tracking: off by default; trackio logs each run locally, tested with the package
installed; a tracker whose package is missing is refused before anything starts."""

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from builders import persona_chats

from sft_space import runs, trainer
from sft_space.errors import UserError
from sft_space.settings import run_settings

ROOT = Path(__file__).resolve().parent.parent


def test_tracking_is_off_by_default_and_names_the_run_when_on(tmp_path):
    folder = runs.RunFolder(tmp_path / "my-run")
    assert run_settings("balanced", source="x").report_to == "none"
    assert trainer.tracker_arguments(run_settings("balanced", source="x"), folder) == {"report_to": "none"}
    on = trainer.tracker_arguments(run_settings("balanced", source="x", report_to="trackio"), folder)
    assert on == {"report_to": ["trackio"], "run_name": "my-run", "project": "sft-space",
                  "trackio_static_space_id": False}


def test_a_tracker_without_its_package_is_refused_before_the_run(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("tensorboard", "tensorboardX") else real(name, *a))
    with pytest.raises(UserError, match="report_to=tensorboard needs the tensorboard package: pip install tensorboard"):
        trainer.check_tracker(run_settings("balanced", source="x", report_to="tensorboard"))
    trainer.check_tracker(run_settings("balanced", source="x"))  # none needs nothing


@pytest.mark.slow
def test_a_run_with_trackio_logs_its_losses_to_a_local_trackio_project(tmp_path, tiny_model_dir):
    pytest.importorskip("trackio")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in persona_chats(24)))
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio"), "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "sft_space", "train", str(data), "--model", str(tiny_model_dir),
                    "--max-steps", "2", "--sample-prompts", "0", "--report-to", "trackio",
                    "--output-dir", str(tmp_path / "runs"), "--run-name", "tracked"],
                   cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    with sqlite3.connect(tmp_path / "trackio" / "sft-space.db") as db:
        logged = [json.loads(m) for run, m in db.execute("select run_name, metrics from metrics") if run == "tracked"]
    assert [m["train/global_step"] for m in logged if "train/loss" in m] == [1, 2]
    assert any("eval/loss" in m for m in logged)
