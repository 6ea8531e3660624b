"""Each run in its own supervised process: stop by signal, kill after a grace period, crashes isolated, and a
restarted app re-attaching to a child that is still training.

Most tests run a stand-in child (a few lines of Python that keep a run folder as the command line does), so the
supervisor is tested fast and exactly; the last ones run the real command line on the tiny model."""

import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from sft_space import child, events, jobs, runs
from sft_space.jobs import JobState
from sft_space.settings import RunSettings

# What `python -m sft_space train` does, as far as the supervisor can see: a run folder with its owner and its
# lock (a resume finds the folder there and marks it running again), its events on stdout, and on SIGINT a stopped
# run (exit 130). Modes: "train" (stops on SIGINT), "finish", "refuse" (fails before any folder, as bad data does),
# "on-go" (says "Training…", then records the run only once the test creates the file <run>.go), "slow-save" (on
# SIGINT says "Saving…" until the test creates <run>.saving, then "Still saving…" until it creates <run>.saved,
# then records the stop: a save that takes as long as the test wants, unless a kill cuts it short).
STAND_IN = r"""
import os, signal, sys, time
from sft_space import events, runs
runs_dir, run_id, owner, mode = sys.argv[1:5]
log = events.EventLog(echo=True)

def say(message):
    log.emit(events.Status(message=message))

def wait_for(name, saying):
    # Said again and again: the page shows it whatever else set the job's message meanwhile.
    while not os.path.exists(os.path.join(runs_dir, f"{run_id}.{name}")):
        say(saying)
        time.sleep(0.05)

if mode == "refuse":
    say("Checking the data…")
    print("error: row 3: the last message is from the user.", flush=True)  # for people: never read
    log.emit(events.Failed(reason="row 3: the last message is from the user."))
    sys.exit(1)
stop = []
signal.signal(signal.SIGINT, lambda *_: stop.append(1))
say("Checking the data…")
if mode == "on-go":
    say("Training…")
    wait_for("go", "Waiting for the go…")
folder = runs.RunFolder(os.path.join(runs_dir, run_id))
if folder.record_path.is_file():
    folder.update(status=runs.RUNNING)
else:
    folder = runs.RunFolder.create(runs_dir, run_id)
    folder.write({"run_id": run_id, "status": runs.RUNNING, "owner": owner or None, "created_at": runs.timestamp()})
log.attach(folder.path)
with folder.locked():
    say("Loading the model…")
    say("Training…")
    for step in range(1, 100000):
        print(f"█████··· step {step}/100000", flush=True)  # for people: never read
        log.emit(events.Step(step=step, max_steps=100000, epoch=0.0, loss=2.0, loss_smoothed=2.0,
                             elapsed_seconds=step * 0.05))
        if stop and mode == "slow-save":
            wait_for("saving", "Saving…")
            wait_for("saved", "Still saving…")
        if stop:
            log.emit(events.Stopping(step=step))
            folder.update(status=runs.STOPPED, error=None)
            log.emit(events.Stopped(reason="Stopped.", run_dir=folder.path.as_posix()))
            sys.exit(130)
        if mode == "finish" and step == 30:
            folder.update(status=runs.FINISHED)
            log.emit(events.Finished(run_dir=folder.path.as_posix(), final_metrics={}))
            sys.exit(0)
        time.sleep(0.05)
"""


# The process started ahead (`python -m sft_space.standby`), as far as the supervisor can see: it waits for its
# order with the real `standby.take_order`, then becomes the stand-in child for the run the order names.
STANDBY_STAND_IN = r"""
import json, sys
from sft_space import standby
line = sys.stdin.readline()
if not line.strip():
    sys.exit(0)
arguments = standby.take_order(line)
options = dict(zip(arguments[1::2], arguments[2::2]))
with open(options["--config"]) as settings:
    output_dir = json.load(settings)["output_dir"]
sys.argv = ["stand-in", output_dir, options["--run-name"], options["--owner"], "finish"]
""" + f"exec({STAND_IN!r})"


def stand_in(mode):
    def command(job, settings_path):
        return [sys.executable, "-c", STAND_IN, job.settings.output_dir, job.job_id, job.owner, mode]
    return command


def wait_until(condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def manager_for(mode, grace=30.0):
    return jobs.JobManager(supervisor=child.Supervisor(grace_seconds=grace, command=stand_in(mode)))


def start(manager, tmp_path, owner="alice"):
    job = manager.submit(RunSettings(source="a.jsonl", output_dir=str(tmp_path / "runs")), owner=owner)
    assert wait_until(lambda: job.state == JobState.RUNNING and job.run_dir is not None), job.message
    return job


def said_steps(tmp_path, job):
    """The steps the run's events on its output said."""
    log = child.log_file(tmp_path / "runs", job.job_id).read_text().splitlines()
    return [event["step"] for event in events.read_lines(log) if event["event"] == "step"]


def test_a_run_trains_in_its_own_process_group_and_its_events_reach_the_page(tmp_path):
    manager = manager_for("finish")
    job = start(manager, tmp_path)
    assert job.pid != os.getpid() and os.getpgid(job.pid) == job.pid  # its own group, not the app's
    assert wait_until(lambda: job.done)
    assert job.state == JobState.FINISHED and runs.RunFolder(job.run_dir).read()["owner"] == "alice"
    assert said_steps(tmp_path, job)[-1] == 30


def test_the_page_hears_what_the_events_say_and_never_a_printed_line(tmp_path):
    """The supervisor reads the child's output through the events' reader: its status is what the status events
    say, a failure's reason is its failed event's; the command line's lines for people, its progress bars, its
    `error:` line and a library's noise are never the page's words."""
    folder = runs.RunFolder.create(tmp_path, "r1")
    folder.write({"run_id": "r1", "status": runs.RUNNING})
    output = tmp_path / "r1.log"
    log = events.EventLog()
    lines = ["python -m sft_space train --config x.json", "Loading checkpoint shards: 100%",
             events.PREFIX + json.dumps(log.emit(events.Status(message="Loading the model…"))),
             "█████··· step 3 of 10 · train loss 2.400 (smoothed)", "  adapter: /srv/runs/r1/adapter",
             events.PREFIX + json.dumps(log.emit(events.Stopping(step=3))),
             "Continue with: python -m sft_space train --resume runs/r1", "error: row 3 is bad",
             events.PREFIX + json.dumps(log.emit(events.Failed(reason="Out of memory.")))]
    output.write_text("\n".join(lines) + "\n", encoding="utf-8")
    heard = []
    job = jobs.Job("r1", "alice", RunSettings())
    errors, tail = child.Supervisor()._follow(job, folder, output, 0, lambda: False,
                                              child.Listeners(heard.append, lambda path: None, lambda: None))
    assert heard == ["Loading the model…", "Stopping at step 3: saving a checkpoint and the adapter…"]
    assert errors == ["Out of memory."] and tail == [line + "\n" for line in lines]


def test_with_warm_start_a_run_is_the_process_started_ahead_and_the_next_one_starts_after_it(tmp_path):
    supervisor = child.Supervisor(command=stand_in("refuse"), warm=True,
                                  standby_command=[sys.executable, "-c", STANDBY_STAND_IN])
    waiting = supervisor.standby
    assert waiting is not None and waiting.poll() is None
    job = start(jobs.JobManager(supervisor=supervisor), tmp_path)
    assert job.pid == waiting.pid and os.getpgid(job.pid) == job.pid  # not a new process, and its own group
    assert wait_until(lambda: job.done)
    assert job.state == JobState.FINISHED, job.error  # ("refuse" would have been a new process, not the one ahead)
    assert said_steps(tmp_path, job)[-1] == 30  # its output went to the run's log
    following = supervisor.standby
    assert following is not None and following.pid != waiting.pid and following.poll() is None
    supervisor.close()
    assert following.wait(timeout=10) == 0  # ended by its closed input, quietly


def test_a_process_started_ahead_ends_quietly_when_its_input_closes_before_an_order(monkeypatch):
    """The app went away (or closed its supervisor) before a run: `python -m sft_space.standby`'s main, its
    libraries loaded, finds its input closed and ends with status 0, taking no order. In this process: the real
    process loads its libraries and becomes the run in the real child-process test below."""
    import gc

    from sft_space import standby

    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    thresholds = gc.get_threshold()
    try:
        assert standby.main() == 0
    finally:
        gc.set_threshold(*thresholds)  # a process's start-up tuning (startup.begin), not this test process's
    assert set(standby.PRELOADED) <= set(sys.modules)


def test_a_process_started_ahead_that_died_is_replaced_by_a_new_one(tmp_path):
    supervisor = child.Supervisor(command=stand_in("finish"), warm=True, standby_command=[sys.executable, "-c", "pass"])
    dead = supervisor.standby
    dead.wait(timeout=10)
    job = start(jobs.JobManager(supervisor=supervisor), tmp_path)
    assert job.pid != dead.pid
    assert wait_until(lambda: job.done) and job.state == JobState.FINISHED, job.error
    supervisor.close()


def test_stop_is_a_signal_the_run_answers_by_stopping_at_its_next_step(tmp_path):
    manager = manager_for("train", grace=600.0)
    job = start(manager, tmp_path)
    manager.stop(job.job_id, "alice")
    assert wait_until(lambda: job.done, timeout=10)
    record = runs.RunFolder(job.run_dir).read()
    # Stopped by its own hand (its SIGINT handler), not killed: the record says so without an error.
    assert job.state == JobState.STOPPED and record["status"] == runs.STOPPED and record["error"] is None
    kinds = [event["event"] for event in runs.RunFolder(job.run_dir).read_events()]
    assert kinds[-2:] == ["stopping", "stopped"]
    assert manager.current() is None


def touch(tmp_path, job, name):
    (tmp_path / "runs" / f"{job.job_id}.{name}").touch()


def test_one_stop_waits_for_the_child_to_save(tmp_path):
    """The supervisor looks at a Stop every time it reads the child's output: once the child has said "Still
    saving…" (which it says only after the page showed "Saving…", said after the signal), the supervisor has
    looked again since the signal and let the child be; the save then ends as the child's own."""
    manager = manager_for("slow-save", grace=600.0)
    job = start(manager, tmp_path)
    manager.stop(job.job_id, "alice")
    assert wait_until(lambda: job.message == "Saving…", timeout=10), job.message
    touch(tmp_path, job, "saving")
    assert wait_until(lambda: job.message == "Still saving…", timeout=10), job.message
    touch(tmp_path, job, "saved")
    assert wait_until(lambda: job.done, timeout=10)
    record = runs.RunFolder(job.run_dir).read()
    assert job.state == JobState.STOPPED and record["status"] == runs.STOPPED and record["error"] is None


def test_the_grace_after_stop_covers_the_slowest_step_the_run_has_taken(tmp_path):
    """On a busy machine a step can outlast any fixed grace: a run whose metrics show a 5 s step is given more
    than the supervisor's own grace (here 0.5 s) to save, and its save ends as its own, not in a kill."""
    manager = manager_for("slow-save", grace=0.5)
    job = start(manager, tmp_path)
    events.append(job.run_dir, events.Step(step=1, max_steps=10, epoch=0.1, loss=2.0, loss_smoothed=2.0,
                                           elapsed_seconds=5.0, slowest_step_seconds=5.0))
    manager.stop(job.job_id, "alice")
    assert wait_until(lambda: job.message == "Saving…", timeout=10), job.message
    time.sleep(1.5)  # three times the supervisor's grace
    assert not job.done, job.error
    touch(tmp_path, job, "saving")
    touch(tmp_path, job, "saved")
    assert wait_until(lambda: job.done, timeout=10)
    record = runs.RunFolder(job.run_dir).read()
    assert job.state == JobState.STOPPED and record["error"] is None


def test_the_slowest_step_is_read_from_the_metrics_also_as_the_mean_between_two_entries():
    assert child.slowest_step_seconds([]) == 0.0
    entries = [{"step": 1, "elapsed_seconds": 2.0, "slowest_step_seconds": 2.0},
               {"step": 11, "elapsed_seconds": 402.0}]  # ten steps of 40 s, none recorded alone
    assert child.slowest_step_seconds(entries) == 40.0


def test_a_run_killed_after_stop_keeps_the_adapter_of_its_last_checkpoint(tmp_path):
    manager = manager_for("slow-save", grace=0.2)
    job = start(manager, tmp_path)
    folder = runs.RunFolder(job.run_dir)
    checkpoint = folder.path / "checkpoint-4"
    checkpoint.mkdir()
    for name in (runs.ADAPTER_CONFIG, runs.ADAPTER_WEIGHTS, "tokenizer.json", "optimizer.pt", "trainer_state.json"):
        (checkpoint / name).write_text("{}")
    manager.stop(job.job_id, "alice")
    assert wait_until(lambda: job.done, timeout=15)
    record = folder.read()
    assert record["status"] == runs.STOPPED and folder.has_adapter
    assert "adapter of step 4" in record["error"] and "chat with it or publish it" in record["error"]
    assert folder.read_events()[-1]["event"] == "stopped", "the supervisor ends the stream the child could not"
    kept = sorted(path.name for path in folder.adapter_path.iterdir())
    assert kept == sorted([runs.ADAPTER_CONFIG, runs.ADAPTER_WEIGHTS, "tokenizer.json"])  # no trainer state
    assert job.state == JobState.STOPPED and "adapter of step 4" in job.message


@pytest.mark.slow
def test_a_child_that_ignores_stop_is_killed_after_the_grace_period_or_a_second_stop(tmp_path):
    manager = manager_for("slow-save", grace=1.0)
    job = start(manager, tmp_path)
    manager.stop(job.job_id, "alice")
    assert wait_until(lambda: job.done, timeout=10)
    record = runs.RunFolder(job.run_dir).read()
    assert job.state == JobState.STOPPED and record["status"] == runs.STOPPED
    assert "did not exit in time" in record["error"] and "start it again" in record["error"]

    patient = manager_for("slow-save", grace=600.0)
    second = start(patient, tmp_path / "again")
    patient.stop(second.job_id, "alice")
    assert wait_until(lambda: second.message == "Saving…", timeout=10), second.message  # it has the signal
    patient.stop(second.job_id, "alice")
    assert wait_until(lambda: second.done, timeout=10)
    record = runs.RunFolder(second.run_dir).read()
    assert record["status"] == runs.STOPPED and "did not exit in time" in record["error"]


def test_a_job_is_running_once_its_run_record_says_so_never_from_the_words_of_a_status_line(tmp_path):
    """A resumed run's folder is there from the start, and the child says "Training…" before its record says
    `running` again: neither makes the job running; the record does."""
    runs_dir = tmp_path / "runs"
    folder = runs.RunFolder.create(runs_dir, "stopped-run")
    folder.write({"run_id": "stopped-run", "status": runs.STOPPED, "owner": "alice",
                  "settings": {"source": "a.jsonl"}})
    manager = manager_for("on-go")
    job = manager.resume(runs_dir, "stopped-run", "alice")
    assert wait_until(lambda: job.message == "Waiting for the go…", timeout=10), job.message
    assert job.state == JobState.PREPARING and job.run_dir == folder.path
    touch(tmp_path, job, "go")
    assert wait_until(lambda: job.state == JobState.RUNNING, timeout=10), job.message
    manager.stop(job.job_id, "alice")
    assert wait_until(lambda: job.done, timeout=10) and job.state == JobState.STOPPED


@pytest.mark.parametrize("sig, named", [(signal.SIGKILL, "SIGKILL"), (signal.SIGSEGV, "SIGSEGV")])
def test_a_child_that_dies_fails_its_run_and_the_app_goes_on(tmp_path, sig, named):
    """The kernel's OOM killer or a crash inside a kernel ends the child, never the app."""
    manager = manager_for("train")
    job = start(manager, tmp_path)
    os.kill(job.pid, sig)
    assert wait_until(lambda: job.done, timeout=10)
    folder = runs.RunFolder(job.run_dir)
    record = folder.read()
    assert job.state == JobState.FAILED and record["status"] == runs.FAILED
    assert named in record["error"] and named in job.error
    tail = (folder.path / "failure.txt").read_text().splitlines()  # the tail of its output
    assert any(event["event"] == "step" for event in events.read_lines(tail))
    ending = folder.read_events()[-1]
    assert ending["event"] == "failed" and named in ending["reason"]
    assert manager.current() is None
    following = start(manager, tmp_path, owner="bob")  # the next run starts normally
    manager.stop(following.job_id, "bob")
    assert wait_until(lambda: following.done)


def test_a_run_refused_before_it_starts_says_why(tmp_path):
    manager = manager_for("refuse")
    job = manager.submit(RunSettings(source="a.jsonl", output_dir=str(tmp_path / "runs")), owner="alice")
    assert wait_until(lambda: job.done)
    assert job.state == JobState.REFUSED and job.error == "row 3: the last message is from the user."
    assert not any((tmp_path / "runs").glob("*/run.json"))


def test_a_restarted_app_re_attaches_to_a_child_still_training_and_marks_dead_ones(tmp_path):
    first_app = manager_for("train")
    job = start(first_app, tmp_path)
    dead = runs.RunFolder.create(tmp_path / "runs", "left-running")
    dead.write({"run_id": "left-running", "status": runs.RUNNING, "owner": "bob", "created_at": runs.timestamp()})

    restarted = manager_for("train")  # a new app process: it knows no jobs, only run folders
    adopted = restarted.adopt(tmp_path / "runs")
    assert [j.job_id for j in adopted] == [job.job_id]
    assert restarted.latest_for("alice").job_id == job.job_id and restarted.current() is adopted[0]
    record = dead.read()
    assert record["status"] == runs.FAILED and "ended without recording an outcome" in record["error"]
    assert [event["event"] for event in dead.read_events()] == ["failed"]
    with pytest.raises(Exception, match="No such run of yours"):
        restarted.stop(job.job_id, "mallory")
    restarted.stop(job.job_id, "alice")
    assert wait_until(lambda: adopted[0].done, timeout=10)
    assert adopted[0].state == JobState.STOPPED and runs.RunFolder(job.run_dir).read()["status"] == runs.STOPPED
    assert wait_until(lambda: job.done)


def test_the_app_builds_the_command_line_that_the_cli_parses(tmp_path):
    from sft_space import cli

    job = jobs.Job("20261125-0000-a-1234", "visitor", RunSettings(source="a.jsonl", output_dir=str(tmp_path)))
    settings_path = tmp_path / "settings.json"
    settings_path.write_text(json.dumps({"source": "a.jsonl", "max_steps": 3}))
    arguments = child.command(job, settings_path)
    assert arguments[:3] == [sys.executable, "-m", "sft_space"]
    parsed = cli.build_parser().parse_args(arguments[3:])
    assert parsed.run_name == job.job_id and parsed.owner == "visitor" and parsed.config == str(settings_path)
    resume = jobs.Job("r", "visitor", RunSettings(), resume=str(tmp_path / "r"))
    assert cli.build_parser().parse_args(child.command(resume, None)[3:]).resume == str(tmp_path / "r")


@pytest.mark.slow
def test_the_app_trains_stops_and_resumes_a_real_run_in_a_child_process(tmp_path, tiny_model_dir, write_jsonl):
    """The job manager with its real supervisor and the real command line, on the tiny model."""
    from builders import distinct_chats

    data = write_jsonl(distinct_chats(40))
    # No checkpoint but the Stop's and the last step's: the one found after Stop can only be the Stop's own.
    settings = RunSettings(source=str(data), model=str(tiny_model_dir), max_steps=40, save_every=1000,
                           sample_prompts=0, output_dir=str(tmp_path / "runs"))
    # Warm, as the app runs it: the run is the real `python -m sft_space.standby`, started ahead.
    supervisor = child.Supervisor(warm=True)
    waiting = supervisor.standby
    manager = jobs.JobManager(supervisor=supervisor)
    job = manager.submit(settings, owner="alice")
    assert wait_until(lambda: job.run_dir is not None and runs.RunFolder(job.run_dir).read_metrics(), timeout=300), \
        job.message
    assert job.state == JobState.RUNNING and job.pid == waiting.pid
    pressed = time.monotonic()
    manager.stop(job.job_id, "alice")
    assert wait_until(lambda: job.done, timeout=60)
    stopped_after = time.monotonic() - pressed
    folder = runs.RunFolder(job.run_dir)
    record = folder.read()
    assert job.state == JobState.STOPPED and record["status"] == runs.STOPPED and record["owner"] == "alice"
    assert folder.has_adapter and folder.last_checkpoint() is not None
    assert stopped_after < 20, stopped_after

    # The resume is the process started ahead after the stop. None is started after it: a third would load its
    # libraries only to be closed (a waiting process's quiet end when its input closes is tested above, the
    # supervisor's with a stand-in and standby.main's own in this process).
    following = supervisor.standby
    assert following is not None and following.pid != waiting.pid and following.poll() is None
    supervisor.warm = False
    resumed = manager.resume(settings.output_dir, folder.path, "alice")
    assert wait_until(lambda: resumed.done, timeout=300), resumed.message
    assert resumed.state == JobState.FINISHED, resumed.error
    assert resumed.pid == following.pid and following.returncode == 0
    steps = [m["step"] for m in folder.read_metrics() if "loss" in m]
    assert steps[-1] == 40 and len(steps) == len(set(steps)), steps
    assert supervisor.standby is None


def test_a_command_line_run_keeps_the_gpu_busy_for_the_app_and_no_visitor_may_stop_it(tmp_path):
    runs_dir = tmp_path / "runs"
    process = subprocess.Popen([sys.executable, "-c", STAND_IN, str(runs_dir), "from-cli", "", "train"],
                               stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        folder = runs.RunFolder(runs_dir / "from-cli")
        assert wait_until(lambda: folder.lock_holder() is not None)
        manager = manager_for("train")
        [adopted] = manager.adopt(runs_dir)
        assert manager.current() is adopted and adopted.owner == ""
        with pytest.raises(Exception, match="No such run of yours"):
            manager.stop(adopted.job_id, "alice")
        queued = manager.submit(RunSettings(source="a.jsonl", output_dir=str(runs_dir)), owner="alice")
        assert queued.state == JobState.QUEUED
    finally:
        os.killpg(process.pid, signal.SIGINT)
        process.wait(timeout=30)
    assert wait_until(lambda: adopted.done) and folder.read()["status"] == runs.STOPPED
    assert wait_until(lambda: queued.state == JobState.RUNNING)  # the GPU went to the waiting visitor
    manager.stop(queued.job_id, "alice")
    assert wait_until(lambda: queued.done)
