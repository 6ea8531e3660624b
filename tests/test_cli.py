"""The command line: exit codes, exactly one JSON object, and never a traceback for bad data."""

import json
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from builders import SAMPLE_DATA, chat, distinct_chats, evaluation_event, persona_chats, step_event

from sft_space import cli, events, runs

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "sft_space", *map(str, args)], capture_output=True, text=True, timeout=300)


def test_validate_json_is_one_object_with_rows_codes_and_stats(write_jsonl, tiny_model_dir, capfd):
    """In this process (`cli.main`), its output read at the file descriptors, as a program reading the command's
    stdout reads it (anything a library wrote there too); the real process's exit status is
    test_a_missing_file_exits_1_without_traceback_from_the_real_process's."""
    path = write_jsonl(distinct_chats(10) + ['{"messages": [', {"messages": [{"role": "user", "content": "Hi"}]}])
    assert cli.main(["validate", str(path), "--model", str(tiny_model_dir), "--json"]) == 1
    result = capfd.readouterr()
    report = json.loads(result.out)  # fails unless stdout is exactly one JSON document
    assert report["format"] == "openai" and report["rows"] == 12 and report["valid_rows"] == 10
    assert [(e["row"], e["code"]) for e in report["errors"]] == [(11, "unreadable_row"), (12, "no_assistant_turn")]
    assert report["warnings"] == []
    assert set(report["stats"]) >= {"examples", "turns_per_example", "tokens_per_example",
                                     "trained_tokens_per_example", "rows_over_max_length", "total_trained_tokens"}
    assert "Traceback" not in result.err


def test_validate_exit_zero_and_readable_report(write_jsonl, tiny_model_dir, capsys):
    path = write_jsonl(distinct_chats(12))
    assert cli.main(["validate", str(path), "--model", str(tiny_model_dir)]) == 0
    out = capsys.readouterr().out
    assert "12 rows, 12 valid, 0 with errors" in out
    assert "tokens per example" in out and "total trained tokens" in out


def test_validate_human_report_lists_rows_and_fixes(write_jsonl, tiny_model_dir, capsys):
    path = write_jsonl(distinct_chats(3) + [{"messages": [{"role": "user", "content": "Hi"}, {"role": "asistant", "content": "x"}]}])
    assert cli.main(["validate", str(path), "--model", str(tiny_model_dir), "--max-length", "512"]) == 1
    out = capsys.readouterr().out
    assert "[unknown_role] row 4, message 2: role 'asistant'" in out and "did you mean 'assistant'?" in out


@pytest.mark.parametrize("args", [[], ["validate"], ["validate", "x.jsonl", "--max-length", "many"], ["frobnicate"]])
def test_bad_usage_exits_2(args):
    result = run_cli(*args)
    assert result.returncode == 2 and "usage:" in result.stderr


def test_a_missing_file_exits_1_without_traceback_from_the_real_process(tiny_model_dir):
    """The process itself, once (`python -m sft_space`): the tests below call `cli.main` in this process, which
    answers the same way in a fraction of the time."""
    result = run_cli("validate", "missing.jsonl", "--model", tiny_model_dir)
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr


@pytest.mark.parametrize("source", ["missing.jsonl", "no such thing"])
def test_unusable_source_exits_1_without_traceback(source, tiny_model_dir, capsys):
    assert cli.main(["validate", source, "--model", str(tiny_model_dir)]) == 1
    assert capsys.readouterr().err.startswith("error: ")
    assert cli.main(["validate", source, "--model", str(tiny_model_dir), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["errors"][0]["code"] == "unusable_source"


def test_unknown_model_is_a_clear_error(write_jsonl, capsys):
    assert cli.main(["validate", str(write_jsonl(distinct_chats(2))), "--model", "not a model"]) == 1
    assert "neither a folder here nor a Hub model id" in capsys.readouterr().err
    assert cli.main(["validate", str(write_jsonl(distinct_chats(2))), "--model", "someone/some-model"]) == 1
    assert "Could not reach the Hugging Face Hub" in capsys.readouterr().err


@pytest.mark.slow  # seconds: the GGUF file's tokenizer, read again
def test_preview_on_embedded_default_marks_assistant_spans(write_jsonl, capsys):
    """In this process (`cli.main`): a process of its own would load the libraries again and read the GGUF file's
    tokenizer at Python speed (conftest has this process read it at C speed), seconds more for the same output."""
    path = write_jsonl([chat(("What is 2+2?", "Four."), ("And 3+3?", "Six.")), chat(("Hi", "Hello!"), system="Be brief.")])
    assert cli.main(["preview", str(path), "-n", "2"]) == 0
    out = capsys.readouterr().out
    assert "── example 1 of 2 (row 1)" in out and "── example 2 of 2 (row 2)" in out
    assert "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n⟦Four.<|im_end|>⟧\n" in out
    assert "<|im_start|>assistant\n⟦Six.<|im_end|>⟧" in out
    assert "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>" in out
    assert out.count("⟦") == 3 + 2  # three replies, plus the "⟦marked⟧" legend in each header


def test_sample_dataset_is_clean(tiny_model_dir, capsys):
    assert cli.main(["validate", str(SAMPLE_DATA), "--model", str(tiny_model_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert 100 <= report["rows"] <= 300 and report["valid_rows"] == report["rows"]
    assert report["warnings"] == [] and report["stats"]["turns_per_example"]["max"] >= 4


def test_train_then_chat_from_the_command_line(write_jsonl, tiny_model_dir, tmp_path, capsys):
    """In this process (`cli.main`): the Ctrl+C test below runs `train` as its own process."""
    path = write_jsonl(distinct_chats(12))
    runs_dir = tmp_path / "runs"
    assert cli.main(["train", str(path), "--model", str(tiny_model_dir), "--output", str(runs_dir), "--preset",
                     "quick", "--max-steps", "3", "--lora-r", "4", "--sample-prompts", "0", "--run-name",
                     "cli-run"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("python -m sft_space train ")
    assert "--max-steps 3" in out and "--lora-r 4" in out
    assert "Run finished" in out
    assert "{'loss'" not in out, "the trainer's raw log dicts stay out of the output"
    assert "step 3 of 3" in err  # our progress lines instead
    # What it said is the run's events, in its folder and on stdout alike, ending once.
    said = events.read_lines(out.splitlines())
    assert said == runs.RunFolder(runs_dir / "cli-run").read_events()
    kinds = [event["event"] for event in said]
    assert kinds[0] == "started" and "plan" in kinds and kinds.count("step") == 3 and kinds[-1] == "finished"
    assert [kind for kind in kinds if kind in events.TERMINAL] == ["finished"]
    record = json.loads((runs_dir / "cli-run" / "run.json").read_text())
    assert record["settings"]["lora_r"] == 4 and record["status"] == "finished"
    # The headline at the end is the smoothed training loss and the validation loss, not the last step's loss.
    final = record["final_metrics"]
    assert f"train loss {final['loss_smoothed']:.3f} (smoothed) · validation loss {final['eval_loss']:.3f}" in out

    assert cli.main(["chat", str(runs_dir / "cli-run"), "--prompt", "What is 2 plus 2?", "--compare",
                     "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "base:" in out and "fine-tuned:" in out


def test_the_command_line_renders_each_event_and_its_progress_line_is_the_pages():
    """The lines for people are the events rendered: a status event's words, a bar and the progress text the Train
    tab shows (`events.progress_text`) for each step or evaluation, its headline over the steps so far."""
    said, speeds = [], []
    rendering = cli.Rendering(said.append, speeds.append)
    log = events.EventLog(listeners=[rendering])
    log.emit(events.Status(message="Loading the model…"))
    log.emit(step_event(30, 3.9, 60, loss_smoothed=2.2512, eta_seconds=40.0, tokens_per_second=1234.5))
    log.emit(evaluation_event(30, 2.37, 60, eval_seconds=4.26))
    log.emit(events.Stopped(reason="Stopped at step 30 of 60."))
    assert said[0] == "Loading the model…" and [event["step"] for event in speeds] == [30]
    assert said[1].startswith("██████████·········· step 30 of 60 · train loss 2.251 (smoothed) · elapsed")
    assert said[2].endswith(events.progress_text(rendering.points[-1], events.Headline(2.2512, 2.37)))
    assert "3.9" not in said[1], "one step's raw loss is never the headline"
    assert len(said) == 3 and rendering.end["reason"] == "Stopped at step 30 of 60.", "the ending is the summary's"


def test_train_reports_bad_data_and_missing_runs_without_traceback(write_jsonl, tiny_model_dir, tmp_path, capsys):
    path = write_jsonl(distinct_chats(10) + [{"messages": [{"role": "user", "content": "Hi"}]}])
    assert cli.main(["train", str(path), "--model", str(tiny_model_dir), "--output", str(tmp_path / "runs")]) == 1
    assert "row 11" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    assert cli.main(["train", "--resume", str(tmp_path / "nowhere")]) == 1
    assert "not a run folder" in capsys.readouterr().err
    assert cli.main(["chat", str(tmp_path / "nowhere"), "--prompt", "hi"]) == 1
    assert "not a run folder" in capsys.readouterr().err


def test_validate_takes_the_row_limits_its_messages_name(write_jsonl, tiny_model_dir, capsys):
    """The messages of row_too_large and too_many_messages tell the person to raise --max-row-kb and
    --max-messages: validate must accept both."""
    row = chat(*[(f"question {i}", f"answer {i}") for i in range(4)])
    path = write_jsonl(distinct_chats(10) + [row, {"text": "x" * 3000}])
    assert cli.main(["validate", str(path), "--model", str(tiny_model_dir), "--json", "--max-messages", "6",
                     "--max-row-kb", "2"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert [(e["row"], e["code"]) for e in report["errors"]] == [(11, "too_many_messages"), (12, "row_too_large")]


class Training:
    """`python -m sft_space train ...` as its own process, its stderr read line by line as it comes."""

    def __init__(self, *args):
        self.process = subprocess.Popen([sys.executable, "-m", "sft_space", "train", *map(str, args)], cwd=ROOT,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.process.stderr:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, predicate, timeout=240):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=1)
            except queue.Empty:
                continue
            assert line is not None, "the run ended first:\n" + "\n".join(self.lines)
            self.lines.append(line)
            if predicate(line):
                return line
        raise AssertionError("no such line:\n" + "\n".join(self.lines))

    def finish(self, timeout=120):
        """Exit status, stdout and every stderr line."""
        returncode = self.process.wait(timeout=timeout)
        stdout = self.process.stdout.read()
        while (line := self._queue.get(timeout=10)) is not None:
            self.lines.append(line)
        return returncode, stdout, self.lines


def is_progress(line):
    return " step " in line and "█" in line


@pytest.mark.slow  # about 15 s: two processes
def test_ctrl_c_saves_a_checkpoint_and_the_adapter_and_the_printed_resume_finishes(write_jsonl, tiny_model_dir,
                                                                                tmp_path):
    runs_dir = tmp_path / "runs"
    # No checkpoint but the Ctrl+C's and the last step's: the one found after Ctrl+C can only be the Ctrl+C's own.
    training = Training(write_jsonl(persona_chats(24)), "--model", tiny_model_dir, "--output-dir", runs_dir,
                        "--run-name", "ctrl-c", "--owner", "visitor-7", "--preset", "quick", "--max-steps", 16,
                        "--save-every", 1000, "--sample-prompts", 0)
    training.wait_for(is_progress)
    training.process.send_signal(signal.SIGINT)
    sent = time.monotonic()
    returncode, stdout, lines = training.finish()
    assert time.monotonic() - sent < 20
    assert returncode == 130, "\n".join(lines)
    assert cli.STOPPING_MESSAGE in lines and "Traceback" not in "\n".join(lines)

    folder = runs.RunFolder(runs_dir / "ctrl-c")
    record = folder.read()
    stopped_at = record["final_metrics"]["step"]
    assert record["status"] == runs.STOPPED and 1 <= stopped_at < 16
    assert record["owner"] == "visitor-7" and record["run_id"] == "ctrl-c"
    assert folder.last_checkpoint().name == f"checkpoint-{stopped_at}"
    assert (folder.adapter_path / runs.ADAPTER_WEIGHTS).is_file()
    assert f"Run stopped: {folder.path}" in stdout
    resume = [line.removeprefix("Continue with: ") for line in lines if line.startswith("Continue with: ")]
    assert resume == [f"python -m sft_space train --resume {folder.path}"]

    # The printed command, run as printed (in this process: only the Ctrl-C needed one of its own).
    command = shlex.split(resume[0])
    assert command[:3] == ["python", "-m", "sft_space"]
    assert cli.main(command[3:]) == 0
    record = folder.read()
    assert record["status"] == runs.FINISHED and record["final_metrics"]["step"] == 16
    assert record["owner"] == "visitor-7", "a resume keeps the run's owner"
    steps = [entry["step"] for entry in folder.read_metrics() if "loss" in entry]
    assert steps == sorted(set(steps)) and steps[-1] == 16, "no step is logged twice"


@pytest.mark.slow
def test_sigterm_before_the_run_folder_exists_stops_and_writes_nothing(write_jsonl, tiny_model_dir, tmp_path):
    training = Training(write_jsonl(distinct_chats(12)), "--model", tiny_model_dir, "--output-dir",
                        tmp_path / "runs", "--run-name", "early")
    training.wait_for(lambda line: line.startswith("Checking the data"))
    training.process.send_signal(signal.SIGTERM)
    returncode, stdout, lines = training.finish()
    assert returncode == 130, "\n".join(lines)
    assert "Stopped before the run started; nothing was written." in lines
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_ctrl_c_before_the_first_step_leaves_a_stopped_run_to_start_again(write_jsonl, tiny_model_dir, tmp_path):
    training = Training(write_jsonl(persona_chats(24)), "--model", tiny_model_dir, "--output-dir", tmp_path / "runs",
                        "--run-name", "unstarted", "--preset", "quick", "--max-steps", 8, "--sample-prompts", 3)
    training.wait_for(lambda line: line.startswith("Loading "))
    training.process.send_signal(signal.SIGINT)
    returncode, stdout, lines = training.finish()
    assert returncode == 130, "\n".join(lines)
    folder = runs.RunFolder(tmp_path / "runs" / "unstarted")
    record = folder.read()
    assert record["status"] == runs.STOPPED and "stopped before its first step; start it again" in record["error"]
    assert not folder.has_adapter and folder.checkpoints() == []
    assert not any(line.startswith("Continue with") for line in lines), "nothing to resume"


@pytest.mark.slow
def test_a_second_ctrl_c_aborts_at_once(write_jsonl, tiny_model_dir, tmp_path):
    training = Training(write_jsonl(persona_chats(24)), "--model", tiny_model_dir, "--output-dir", tmp_path / "runs",
                        "--run-name", "twice", "--preset", "quick", "--max-steps", 200, "--sample-prompts", 0)
    training.wait_for(is_progress)
    training.process.send_signal(signal.SIGINT)
    training.wait_for(lambda line: line == cli.STOPPING_MESSAGE)
    training.process.send_signal(signal.SIGINT)
    returncode, stdout, lines = training.finish()
    assert returncode == 130, "\n".join(lines)
    assert "Interrupted." in lines and "Traceback" not in "\n".join(lines)
    record = runs.RunFolder(tmp_path / "runs" / "twice").read()
    assert record["status"] == runs.STOPPED


def test_train_refuses_a_taken_run_name_before_checking_the_data(write_jsonl, tiny_model_dir, tmp_path, capsys):
    (tmp_path / "runs" / "taken").mkdir(parents=True)
    assert cli.main(["train", str(write_jsonl(distinct_chats(12))), "--model", str(tiny_model_dir), "--output-dir",
                     str(tmp_path / "runs"), "--run-name", "taken"]) == 1
    error = capsys.readouterr().err
    assert "A run named taken already exists" in error
    assert "Checking the data" not in error


def test_train_takes_its_data_from_the_config_file_unless_named(tmp_path):
    """The app's supervisor runs `train --config SETTINGS.json` with no DATA: the file's data stands."""
    config = tmp_path / "settings.json"
    config.write_text(json.dumps({"source": "chats.jsonl", "max_steps": 7, "lora_r": 4}))
    settings = cli.train_settings(cli.build_parser().parse_args(["train", "--config", str(config), "--max-steps", "9"]))
    assert settings.source == "chats.jsonl" and settings.max_steps == 9 and settings.lora_r == 4
    named = cli.train_settings(cli.build_parser().parse_args(["train", "other.jsonl", "--config", str(config)]))
    assert named.source == "other.jsonl"
    with pytest.raises(cli.UserError, match="Name the data"):
        cli.train_settings(cli.build_parser().parse_args(["train"]))


def test_train_refuses_invalid_rows_naming_the_flag_that_skips_them(write_jsonl, tiny_model_dir, tmp_path, capsys):
    path = write_jsonl(distinct_chats(10) + [{"messages": [{"role": "user", "content": "no reply"}]}])
    code = cli.main(["train", str(path), "--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "runs")])
    error = capsys.readouterr().err
    assert code == 1 and "1 of 11 rows have errors" in error
    assert "add --skip-invalid-rows to train on the 10 valid ones" in error and "choose to skip" not in error
    assert not (tmp_path / "runs").exists()


def test_train_says_the_speed_after_the_first_steps_and_warns_on_a_slow_machine(tmp_path, monkeypatch):
    from sft_space import estimate, hardware

    monkeypatch.setattr(hardware, "detect_hardware", lambda: hardware.Hardware("cpu", "CPU", 24.0, None, 2))
    folder = runs.RunFolder.create(tmp_path, "r")
    folder.write({"run_id": "r", "status": runs.RUNNING, "base_model": "embedded:SmolLM2-135M-Instruct",
                  "plan": {"device": "cpu", "precision": "fp32", "four_bit": False, "gradient_checkpointing": False,
                           "batch_size": 4, "sequence_length": 512, "packing": True, "estimated_peak_gib": 1.0,
                           "fits": True}})
    said = []
    report = cli.SpeedReport(said.append, lambda: folder)
    for step in (1, 2, 3, 4):
        report({"step": step, "max_steps": 100, "loss": 2.0, "elapsed_seconds": 18.0 * step,
                "eta_seconds": 18.0 * (100 - step), "tokens_per_second": 12.3})
    assert said == [
        f"  At this speed: about 30m 00s in all, 29m 06s left (12 tokens/s measured over {estimate.MEASURED_AFTER_STEPS} "
        "steps).",
        "  Warning: This machine trains about 10× slower than its usual figure for this model (12 vs ~125 tokens/s): "
        "it is busy with other work, so the run takes that much longer than estimated. It goes on; Stop keeps what "
        "it has learned so far."]
    # A run whose first measurement comes at its last step has nothing left to say it of.
    short = []
    report = cli.SpeedReport(short.append, lambda: folder)
    for step in (1, 2, 3):
        report({"step": step, "max_steps": 3, "loss": 2.0, "elapsed_seconds": 18.0 * step,
                "eta_seconds": 18.0 * (3 - step), "tokens_per_second": 12.3})
    assert short == []
