"""One training job per GPU: queueing, refusal, ownership and re-attaching, with a stand-in job runner."""

import dataclasses
import threading
from pathlib import Path

import pytest

from sft_space import jobs, runs
from sft_space.errors import UserError
from sft_space.jobs import JobState
from sft_space.settings import RunSettings, run_settings


class GatedRunner:
    """Trains nothing: writes a run folder, then waits until the test (or a stop) lets it finish."""

    def __init__(self, root: Path):
        self.root = root
        self.release = {}
        self.started = []

    def __call__(self, job, on_status, on_folder, on_running):
        if job.resume:
            folder = runs.RunFolder.open(job.resume)
            folder.update(status=runs.RUNNING)
        else:
            folder = runs.RunFolder.create(self.root, job.job_id)
            # As the command line does with --owner: the owner is in the record from the start.
            folder.write({"run_id": job.job_id, "status": runs.RUNNING, "owner": job.owner})
        on_folder(folder.path)
        on_running()
        self.started.append(job.job_id)
        gate = self.release.setdefault(job.job_id, threading.Event())
        while not gate.wait(0.02):
            if job.stop_event.is_set():
                folder.update(status=runs.STOPPED)
                return folder.path
        folder.update(status=runs.FINISHED)
        return folder.path

    def finish(self, job):
        self.release.setdefault(job.job_id, threading.Event()).set()


def wait_until(condition, timeout=30.0):
    """Whether `condition` holds within `timeout` seconds (it is looked at every 20 ms; a long timeout costs
    nothing when it holds, and a loaded machine does not fail the test)."""
    event = threading.Event()
    for _ in range(int(timeout / 0.02)):
        if condition():
            return True
        event.wait(0.02)
    return condition()


@pytest.fixture
def manager(tmp_path):
    runner = GatedRunner(tmp_path / "runs")
    return jobs.JobManager(runner, max_queued=1), runner


def test_second_visitor_is_queued_then_refused_and_never_disturbs_the_first(manager):
    manager, runner = manager
    first = manager.submit(RunSettings(source="a.jsonl"), owner="alice")
    assert wait_until(lambda: first.state == JobState.RUNNING)
    second = manager.submit(RunSettings(source="b.jsonl"), owner="bob")
    assert second.state == JobState.QUEUED and "position 1" in second.message
    with pytest.raises(UserError, match="A run is training and 1 runs are already waiting"):
        manager.submit(RunSettings(source="c.jsonl"), owner="carol")
    assert first.state == JobState.RUNNING and runner.started == [first.job_id]

    runner.finish(first)
    assert wait_until(lambda: first.state == JobState.FINISHED)
    assert wait_until(lambda: second.state == JobState.RUNNING), "the queued job starts when the GPU is free"
    runner.finish(second)
    assert wait_until(lambda: second.state == JobState.FINISHED)


def test_only_the_owner_can_stop_a_job_and_stopping_keeps_the_run(manager):
    manager, runner = manager
    job = manager.submit(RunSettings(source="a.jsonl"), owner="alice")
    assert wait_until(lambda: job.state == JobState.RUNNING)
    with pytest.raises(UserError, match="No such run"):
        manager.stop(job.job_id, owner="mallory")
    assert job.state == JobState.RUNNING
    manager.stop(job.job_id, owner="alice")
    assert wait_until(lambda: job.state == JobState.STOPPED)
    assert runs.RunFolder(job.run_dir).read()["status"] == runs.STOPPED


def test_a_reloaded_page_finds_its_job_and_one_job_per_visitor(manager):
    manager, runner = manager
    job = manager.submit(RunSettings(source="a.jsonl"), owner="alice")
    assert manager.latest_for("alice") is job and manager.latest_for("bob") is None
    with pytest.raises(UserError, match="already have a run"):
        manager.submit(RunSettings(source="again.jsonl"), owner="alice")
    runner.finish(job)
    assert wait_until(lambda: job.done)


def test_a_failing_job_frees_the_gpu_for_the_next_and_a_refusal_is_not_called_a_failure(tmp_path):
    def refused(job, on_status, on_folder, on_running):
        raise UserError("data went missing")

    manager = jobs.JobManager(refused)
    job = manager.submit(RunSettings(source="a.jsonl"), owner="alice")
    assert wait_until(lambda: job.done)
    assert job.state == JobState.REFUSED and job.error == "data went missing"
    assert manager.current() is None

    def broken(job, on_status, on_folder, on_running):
        folder = runs.RunFolder.create(tmp_path, job.job_id)
        folder.write({"run_id": job.job_id, "status": runs.FAILED, "owner": job.owner, "error": "out of memory"})
        on_folder(folder.path)
        raise UserError("out of memory")

    manager = jobs.JobManager(broken)
    job = manager.submit(RunSettings(source="a.jsonl"), owner="alice")
    assert wait_until(lambda: job.done)
    assert job.state == JobState.FAILED and job.error == "out of memory"
    assert manager.current() is None
    assert manager.submit(RunSettings(source="b.jsonl"), owner="alice").job_id != job.job_id


def test_a_run_from_before_a_restart_is_resumed_only_by_its_owner_and_once(manager, tmp_path):
    manager, runner = manager
    job = manager.submit(RunSettings(source="a.jsonl"), owner="alice")
    assert wait_until(lambda: job.state == JobState.RUNNING)
    manager.stop(job.job_id, owner="alice")
    assert wait_until(lambda: job.state == JobState.STOPPED)
    assert runs.RunFolder(job.run_dir).read()["owner"] == "alice"

    restarted = jobs.JobManager(runner)  # a new process: it knows no jobs, only run folders
    with pytest.raises(UserError, match=f"no run {job.job_id} of yours"):
        restarted.resume(runner.root, job.job_id, "mallory")
    # By its folder, as the Train tab names it (the Runs tab names it by its id).
    resumed = restarted.resume(runner.root, str(job.run_dir), "alice")
    assert wait_until(lambda: resumed.state == JobState.RUNNING) and resumed.run_dir == job.run_dir
    restarted.stop(resumed.job_id, owner="alice")
    assert wait_until(lambda: resumed.done)
    again = restarted.resume(runner.root, job.job_id, "alice")
    with pytest.raises(UserError, match="already have a run"):
        restarted.resume(runner.root, job.job_id, "alice")
    restarted.stop(again.job_id, owner="alice")
    assert wait_until(lambda: again.done)


def test_no_visitor_resumes_a_command_line_run(manager):
    """A run started from the command line has no owner: it is the operator's, and no visitor of the app sees
    or resumes it, nor becomes its owner."""
    manager, runner = manager
    folder = runs.RunFolder.create(runner.root, "from-cli")
    folder.write({"run_id": "from-cli", "status": runs.STOPPED, "owner": None})
    for visitor in ("alice", "bob"):
        with pytest.raises(UserError, match="no run from-cli of yours"):
            manager.resume(runner.root, "from-cli", visitor)
        assert runs.visible_runs(runner.root, visitor) == []
    assert folder.read()["owner"] is None and manager.current() is None


def test_a_resume_trains_on_with_the_runs_own_settings(manager, tmp_path):
    """The settings of a resumed job are read from the run's run.json (its preset's values under its own), never
    taken from a form; the runs folder is the one the run is in now, wherever it was made."""
    manager, runner = manager
    folder = runs.RunFolder.create(runner.root, "moved")
    folder.write({"run_id": "moved", "status": runs.STOPPED, "owner": "alice",
                  "settings": {"source": "a.jsonl", "preset": "quick", "lora_r": 4,
                               "output_dir": str(tmp_path / "where-it-was-made")}})
    resumed = manager.resume(runner.root, "moved", "alice")
    quick = run_settings("quick")
    assert resumed.settings == dataclasses.replace(quick, source="a.jsonl", lora_r=4, output_dir=str(runner.root))
    assert resumed.resume == str(folder.path) and resumed.job_id == "moved"
    manager.stop(resumed.job_id, owner="alice")
    assert wait_until(lambda: resumed.done)


def test_a_job_is_running_when_its_runner_says_so_never_from_the_words_of_a_status_line(tmp_path):
    said, go, end = threading.Event(), threading.Event(), threading.Event()

    def runner(job, on_status, on_folder, on_running):
        folder = runs.RunFolder.create(tmp_path, job.job_id)
        folder.write({"run_id": job.job_id, "status": runs.STOPPED, "owner": job.owner})
        on_folder(folder.path)
        on_status("Training…")
        said.set()
        go.wait(30)
        on_running()
        end.wait(30)
        folder.update(status=runs.FINISHED)
        return folder.path

    manager = jobs.JobManager(runner)
    job = manager.submit(RunSettings(source="a.jsonl"), owner="alice")
    assert said.wait(30)
    assert job.state == JobState.PREPARING and job.message == "Training…"
    go.set()
    assert wait_until(lambda: job.state == JobState.RUNNING)
    end.set()
    assert wait_until(lambda: job.done) and job.state == JobState.FINISHED


def test_a_run_another_process_trains_is_not_resumed_by_the_app(manager):
    """The command line (or an app from before a restart) holds the run's lock: the app refuses to resume it."""
    manager, runner = manager
    folder = runs.RunFolder.create(runner.root, "busy")
    folder.write({"run_id": "busy", "status": runs.RUNNING, "owner": "alice"})
    with folder.locked():
        with pytest.raises(UserError, match="already training in another process"):
            manager.resume(runner.root, "busy", "alice")
    assert manager.latest_for("alice") is None


def test_runs_per_visitor_are_capped_and_a_visitor_deletes_only_their_own_idle_runs(tmp_path):
    runner = GatedRunner(tmp_path / "runs")
    manager = jobs.JobManager(runner, runs_per_owner=2)
    settings = RunSettings(source="a.jsonl", output_dir=str(runner.root))
    first = manager.submit(settings, owner="alice")
    assert wait_until(lambda: first.state == JobState.RUNNING)
    with pytest.raises(UserError, match="stop it before deleting"):
        manager.delete(str(runner.root), first.job_id, "alice")
    runner.finish(first)
    assert wait_until(lambda: first.done)
    second = manager.submit(settings, owner="alice")
    runner.finish(second)
    assert wait_until(lambda: second.done)
    with pytest.raises(UserError, match="most this app keeps per visitor"):
        manager.submit(settings, owner="alice")
    bobs = manager.submit(settings, owner="bob")  # the cap is per visitor
    runner.finish(bobs)
    assert wait_until(lambda: bobs.done)
    with pytest.raises(UserError, match="no run"):
        manager.delete(str(runner.root), first.job_id, "bob")
    cli = runs.RunFolder.create(runner.root, "from-cli")
    cli.write({"run_id": "from-cli", "status": runs.FINISHED, "owner": None})
    with pytest.raises(UserError, match="no run from-cli of yours"):
        manager.delete(str(runner.root), "from-cli", "alice")
    assert manager.delete(str(runner.root), first.job_id, "alice") == first.job_id
    assert not Path(first.run_dir).exists() and cli.path.exists()
    third = manager.submit(settings, owner="alice")
    runner.finish(third)
    assert wait_until(lambda: third.done)
