"""A run's events: the schema every kind keeps, the one reader (a file or a log stream, noise and torn lines
skipped), one terminal event per stream, and no module reading another's human output."""

import ast
import dataclasses
import json
from pathlib import Path

import pytest

from sft_space import events

PACKAGE = Path(events.__file__).resolve().parent

# One event of each kind with every field it may have: the schema test covers each kind the writer knows.
EXAMPLES = {
    "started": events.Started(run_id="r1", processes=2, resumed_from="checkpoint-4"),
    "status": events.Status(message="Loading the model…"),
    "plan": events.Plan(plan={"batch_size": 4, "reasons": ["fp32 on CPU"]}, from_step=4),
    "step": events.Step(step=5, max_steps=10, epoch=0.5, loss=2.5, loss_smoothed=2.4, elapsed_seconds=3.2,
                        learning_rate=2e-4, grad_norm=1.1, tokens_per_second=120.5, eta_seconds=3.0,
                        slowest_step_seconds=0.7, peak_gpu_memory_gib=1.5),
    "evaluation": events.Evaluation(step=5, max_steps=10, epoch=0.5, eval_loss=2.3, eval_seconds=1.2,
                                    elapsed_seconds=4.4, tokens_per_second=120.5, eta_seconds=3.0,
                                    slowest_step_seconds=0.7, peak_gpu_memory_gib=1.5),
    "checkpoint": events.Checkpoint(step=5, name="checkpoint-5"),
    "stopping": events.Stopping(step=5),
    "samples": events.Samples(answers=3),
    "finished": events.Finished(run_dir="/runs/r1", final_metrics={"step": 10, "loss_smoothed": 2.0}),
    "stopped": events.Stopped(reason="Stopped at step 5 of 10.", run_dir="/runs/r1", final_metrics={"step": 5}),
    "failed": events.Failed(reason="Out of memory.", run_dir="/runs/r1"),
}


def said(*examples):
    return [events.EventLog().emit(example) for example in examples]


def test_every_kind_has_its_fields_with_their_types_and_a_time():
    assert set(EXAMPLES) == set(events.KINDS), "each kind of event has an example here"
    for kind, example in EXAMPLES.items():
        [record] = said(example)
        assert record["event"] == kind and isinstance(record["time"], float)
        assert events.problem(record) is None and events.problem(json.loads(json.dumps(record))) is None
        for spec in dataclasses.fields(example):
            required = spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING
            without = {key: value for key, value in record.items() if key != spec.name}
            assert (events.problem(without) is None) != required, (kind, spec.name)
            wrong = {**record, spec.name: [] if not isinstance(record[spec.name], list) else "text"}
            assert events.problem(wrong) is not None, (kind, spec.name)
        assert events.problem({**record, "time": None}) == "no time"
    assert events.problem({"event": "step", "time": 1.0, **dataclasses.asdict(EXAMPLES["step"]), "step": True}), \
        "true is no step number"
    assert events.problem({"event": "shouting", "time": 1.0}) == "unknown kind 'shouting'"
    with pytest.raises(TypeError, match="step's loss"):
        said(dataclasses.replace(EXAMPLES["step"], loss="low"))


def test_the_writer_says_each_event_to_the_file_stdout_and_listeners_and_keeps_early_ones_for_the_folder(
        tmp_path, capsys):
    heard = []
    log = events.EventLog(echo=True, listeners=[heard.append])
    log.emit(events.Status(message="Checking the data…"))  # before the run folder exists
    log.attach(tmp_path)
    log.emit(EXAMPLES["step"])
    written = events.read_file(tmp_path / events.EVENTS_FILE)
    assert [e["event"] for e in written] == ["status", "step"] and written == heard
    printed = capsys.readouterr().out.splitlines()
    assert all(line.startswith(events.PREFIX) for line in printed) and events.read_lines(printed) == written


def test_a_stream_ends_with_exactly_one_terminal_event(tmp_path):
    log = events.EventLog()
    log.attach(tmp_path)
    log.emit(EXAMPLES["started"])
    assert log.emit(events.Stopped(reason="Interrupted.")) is not None
    assert log.emit(events.Failed(reason="a second ending")) is None
    events.append(tmp_path, events.Started(run_id="r1"))  # a resume: the next attempt, its own ending
    events.append(tmp_path, EXAMPLES["finished"])
    kinds = [event["event"] for event in events.read_file(tmp_path / events.EVENTS_FILE)]
    assert kinds == ["started", "stopped", "started", "finished"]


def test_the_reader_skips_noise_and_a_torn_line_in_a_log_and_in_the_file(tmp_path):
    step = said(EXAMPLES["step"])[0]
    line = events.PREFIX + json.dumps(step)
    log = ["Loading checkpoint shards: 100%|██████████| 2/2", "{'loss': 2.5, 'grad_norm': 1.1}",
           line, "warning: something" + line + " and more",  # another writer's text around ours
           events.PREFIX + '{"event": "step", "time": 1.0}',  # no step's fields: not an event of the schema
           json.dumps(step),  # an event without the prefix, in a log: not said by the run
           line[:-7]]  # cut off while it was written
    assert events.read_lines(log) == [step, step]
    path = tmp_path / events.EVENTS_FILE
    path.write_text(json.dumps(step) + "\nnot json\n[1, 2]\n" + json.dumps(step)[:-5], encoding="utf-8")
    assert events.read_file(path) == [step]
    assert events.read_file(tmp_path / "missing.jsonl") == []


def point(kind, step, **fields):
    values = dataclasses.replace(EXAMPLES[kind], step=step, **fields)
    return said(values)[0]


def test_the_curve_starts_over_from_the_step_a_plan_trains_from():
    stream = [point("step", 1), point("step", 2), point("evaluation", 2), point("step", 3),
              said(events.Plan(plan={}, from_step=2))[0], point("step", 3, loss_smoothed=1.5)]
    assert [(p["event"], p["step"]) for p in events.curve(stream)] == [("step", 1), ("step", 2), ("evaluation", 2),
                                                                        ("step", 3)]
    assert events.curve(stream)[-1]["loss_smoothed"] == 1.5
    retried = events.curve(stream + [said(events.Plan(plan={}))[0]])
    assert retried == [], "a retry after running out of memory starts its curve again"
    final = events.final_metrics(events.curve(stream))
    assert final["step"] == 3 and final["loss_smoothed"] == 1.5 and final["eval_loss"] == 2.3
    assert final["evaluation_seconds"] == 1.2


def test_a_step_is_formatted_once_for_the_page_and_the_command_line():
    step = said(dataclasses.replace(EXAMPLES["step"], step=30, max_steps=60, loss=3.9, loss_smoothed=2.2512,
                                    elapsed_seconds=75.0, eta_seconds=40.0, tokens_per_second=1234.5,
                                    peak_gpu_memory_gib=None))[0]
    text = events.progress_text(step, events.Headline(2.2512, 2.37))
    assert text == ("step 30 of 60 · train loss 2.251 (smoothed) · validation loss 2.370 · elapsed 1m 15s · "
                    "ETA 0m 40s · 1,234 tokens/s")
    assert "3.9" not in text, "one step's raw loss is never the headline"
    assert "ETA" not in events.progress_text(step, events.Headline(), ended=True)
    evaluation = point("evaluation", 30, eval_seconds=4.26)
    assert "validation loss 2.300 · evaluated in 4.3 s" in events.progress_text(
        evaluation, events.headline_of([evaluation]))


# Words of the lines the command line and the training process print for people. A module that compares a line
# with them (a prefix to filter, a pattern to match) reads human output, which any rewording breaks silently.
HUMAN_WORDS = ("█", "·", "python -m", "error: ", "Run ", "Continue with", "Stopping", "Interrupted", "Training…",
               "Loading", "Checking the data", "step ")
TEXT_MATCHING = {"startswith", "endswith", "removeprefix", "removesuffix", "match", "search", "fullmatch",
                 "findall", "compile", "sub", "split", "partition"}


def _strings(node, constants):
    """The string literals in `node`, module-level constants it names included."""
    found = []
    for part in ast.walk(node):
        if isinstance(part, ast.Constant) and isinstance(part.value, str):
            found.append(part.value)
        elif isinstance(part, ast.Name) and part.id in constants:
            found += _strings(constants[part.id], {})
    return found


def human_text_readers(source, human_words=HUMAN_WORDS):
    """Where `source` compares text with the words of printed lines (or others, `human_words`): (line number, the
    words)."""
    tree = ast.parse(source)
    constants = {target.id: node.value for node in tree.body if isinstance(node, ast.Assign)
                 for target in node.targets if isinstance(target, ast.Name)}
    found = []
    for node in ast.walk(tree):
        compared = []
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in TEXT_MATCHING:
            compared = [text for argument in node.args for text in _strings(argument, constants)]
        elif isinstance(node, ast.Compare) and any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops):
            compared = _strings(node.left, constants)
        words = [text for text in compared if any(word in text for word in human_words)]
        if words:
            found.append((node.lineno, words))
    return found


def test_no_module_reads_the_human_output_of_another():
    """The page's status, the command line's lines, the Runs table and run.json come from events: no module
    filters or matches printed lines (as the app once took every line not starting with one of ("█", "·",
    "python -m", …) for its status)."""
    offenders = {str(path.relative_to(PACKAGE)): found for path in sorted(PACKAGE.rglob("*.py"))
                 if (found := human_text_readers(path.read_text(encoding="utf-8")))}
    assert offenders == {}
    old = 'NOT_STATUS = ("█", "python -m")\ndef is_status(text):\n    return not text.startswith(NOT_STATUS)\n'
    assert human_text_readers(old) and human_text_readers('if text.startswith("error: "): pass')
    # Only events.py knows how an event is marked in a process's output; everyone else asks its reader.
    marked = [path.name for path in PACKAGE.rglob("*.py") if events.PREFIX.strip() in path.read_text(encoding="utf-8")]
    assert marked == ["events.py"]


def test_no_page_rewrites_the_flags_in_the_cores_messages():
    """A page says a setting that a message of the core names in its own words by asking the message
    (errors.Message.said), never by matching the command line's flags in its text (as the Data tab once rewrote
    `--columns` with a regular expression)."""
    offenders = {str(path.relative_to(PACKAGE)): found for path in sorted((PACKAGE / "ui").rglob("*.py"))
                 if (found := human_text_readers(path.read_text(encoding="utf-8"), ("--",)))}
    assert offenders == {}
    assert human_text_readers('FLAG = re.compile(r"(, )?--([a-z][a-z-]*)")\n', ("--",))


@pytest.mark.parametrize("terminal, asked", [(False, False), (True, False), (True, True)])
def test_train_prints_its_event_lines_for_a_program_and_not_on_a_persons_terminal(tmp_path, monkeypatch, capsys,
                                                                                  terminal, asked):
    """On a terminal a person reads the lines for people (stderr) alone; a program reading stdout (a pipe, or
    `--events`, which the app's supervisor and a Job's script pass, a container's log being maybe a terminal) gets
    the event lines too. A refusal before the run says its `failed` event there."""
    import sys

    from sft_space import child, cli, hub_jobs

    monkeypatch.setattr(sys.stdout, "isatty", lambda: terminal, raising=False)
    code = cli.main(["train", str(tmp_path / "missing.jsonl"), "--output-dir", str(tmp_path / "runs")]
                    + (["--events"] if asked else []))
    out, err = capsys.readouterr()
    assert code == 1 and "no such file" in err
    shown = asked or not terminal
    assert [event["event"] for event in events.read_lines(out.splitlines())][-1:] == (["failed"] if shown else [])
    assert (events.PREFIX in out) == shown
    # Those who read a run's events from its stdout ask for them.
    job = type("Job", (), {"resume": None, "job_id": "j", "owner": "o"})()
    assert "--events" in child.arguments(job, tmp_path / "settings.json")
    assert 'train "$@" --events' in hub_jobs.JOB_SCRIPT
