"""One training job per GPU: queueing, refusal, ownership and re-attaching, with a stand-in trainer."""

import threading
from pathlib import Path

import pytest

from sft_space import jobs, runs
from sft_space.errors import UserError
from sft_space.settings import RunSettings


class GatedTrainer:
    """Trains nothing: writes a run folder, then waits until the test (or a stop) lets it finish."""

    def __init__(self, root: Path):
        self.root = root
        self.release = {}
        self.started = []

    def __call__(self, job, on_status, on_folder):
        if job.resume:
            folder = runs.RunFolder.open(job.resume)
            folder.update(status=runs.RUNNING)
        else:
            folder = runs.RunFolder.create(self.root, job.job_id)
            folder.write({"run_id": job.job_id, "status": runs.RUNNING})
        on_folder(folder.path)
        on_status("Training…")
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


def wait_until(condition, timeout=5.0):
    event = threading.Event()
    for _ in range(int(timeout / 0.02)):
        if condition():
            return True
        event.wait(0.02)
    return condition()


@pytest.fixture
def manager(tmp_path):
    trainer = GatedTrainer(tmp_path / "runs")
    return jobs.JobManager(trainer, max_queued=1), trainer


def test_second_visitor_is_queued_then_refused_and_never_disturbs_the_first(manager):
    manager, trainer = manager
    first = manager.submit(RunSettings(source="a.jsonl"), owner="alice")
    assert wait_until(lambda: first.state == jobs.RUNNING)
    second = manager.submit(RunSettings(source="b.jsonl"), owner="bob")
    assert second.state == jobs.QUEUED and "position 1" in second.message
    with pytest.raises(UserError, match="busy"):
        manager.submit(RunSettings(source="c.jsonl"), owner="carol")
    assert first.state == jobs.RUNNING and trainer.started == [first.job_id]

    trainer.finish(first)
    assert wait_until(lambda: first.state == jobs.FINISHED)
    assert wait_until(lambda: second.state == jobs.RUNNING), "the queued job starts when the GPU is free"
    trainer.finish(second)
    assert wait_until(lambda: second.state == jobs.FINISHED)


def test_only_the_owner_can_stop_a_job_and_stopping_keeps_the_run(manager):
    manager, trainer = manager
    job = manager.submit(RunSettings(source="a.jsonl"), owner="alice")
    assert wait_until(lambda: job.state == jobs.RUNNING)
    with pytest.raises(UserError, match="No such run"):
        manager.stop(job.job_id, owner="mallory")
    assert job.state == jobs.RUNNING
    manager.stop(job.job_id, owner="alice")
    assert wait_until(lambda: job.state == jobs.STOPPED)
    assert runs.RunFolder(job.run_dir).read()["status"] == runs.STOPPED


def test_a_reloaded_page_finds_its_job_and_one_job_per_visitor(manager):
    manager, trainer = manager
    job = manager.submit(RunSettings(source="a.jsonl"), owner="alice")
    assert manager.latest_for("alice") is job and manager.latest_for("bob") is None
    with pytest.raises(UserError, match="already have a run"):
        manager.submit(RunSettings(source="again.jsonl"), owner="alice")
    trainer.finish(job)
    assert wait_until(lambda: job.done)


def test_a_failing_job_frees_the_gpu_for_the_next(tmp_path):
    def broken(job, on_status, on_folder):
        raise UserError("data went missing")

    manager = jobs.JobManager(broken)
    job = manager.submit(RunSettings(source="a.jsonl"), owner="alice")
    assert wait_until(lambda: job.done)
    assert job.state == jobs.FAILED and job.error == "data went missing"
    assert manager.current() is None
    assert manager.submit(RunSettings(source="b.jsonl"), owner="alice").job_id != job.job_id


def test_a_run_from_before_a_restart_is_resumed_only_by_its_owner_and_once(manager, tmp_path):
    manager, trainer = manager
    job = manager.submit(RunSettings(source="a.jsonl"), owner="alice")
    assert wait_until(lambda: job.state == jobs.RUNNING)
    manager.stop(job.job_id, owner="alice")
    assert wait_until(lambda: job.state == jobs.STOPPED)
    assert runs.RunFolder(job.run_dir).read()["owner"] == "alice"

    restarted = jobs.JobManager(trainer)  # a new process: it knows no jobs, only run folders
    with pytest.raises(UserError, match="started by another visitor"):
        restarted.submit(RunSettings(source="a.jsonl"), owner="mallory", resume=str(job.run_dir))
    resumed = restarted.submit(RunSettings(source="a.jsonl"), owner="alice", resume=str(job.run_dir))
    assert wait_until(lambda: resumed.state == jobs.RUNNING) and resumed.run_dir == job.run_dir
    restarted.stop(resumed.job_id, owner="alice")
    assert wait_until(lambda: resumed.done)
    again = restarted.submit(RunSettings(source="a.jsonl"), owner="alice", resume=str(job.run_dir))
    with pytest.raises(UserError, match="already training"):
        restarted.submit(RunSettings(source="a.jsonl"), owner="bob", resume=str(job.run_dir))
    restarted.stop(again.job_id, owner="alice")
    assert wait_until(lambda: again.done)
