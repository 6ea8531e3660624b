"""One training job per GPU, shared by every visitor of the app.

A job trains in a child process (`child.Supervisor`), so closing the browser tab does not stop it and a crash of
the run cannot take the app down; its run folder is the source of truth, so a reloaded page re-attaches by reading
it, and a restarted app finds a child that is still training through the run's lock (`adopt`). A second
visitor's Start waits in a short queue (and is told its position) or is refused when the queue is full; it never
disturbs the running job. Only the visitor who started a job can stop or resume it.
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Callable

from . import child, runs
from .errors import UserError
from .settings import RunSettings

MAX_QUEUED_JOBS = 3


class JobState(StrEnum):
    """Where a job is: waiting or being prepared, then its run's own status (runs.py's words) once the run says
    it is training, or refused before anything was trained."""

    QUEUED = "queued"
    PREPARING = "preparing"
    RUNNING = runs.RUNNING
    FINISHED = runs.FINISHED
    STOPPED = runs.STOPPED
    FAILED = runs.FAILED
    # Refused before anything was trained (bad data, a finished run to resume, ...): not a failure of a run.
    REFUSED = "refused"

    @property
    def done(self) -> bool:
        return self in (JobState.FINISHED, JobState.STOPPED, JobState.FAILED, JobState.REFUSED)


@dataclass
class Job:
    """One visitor's place in the app's queue for the GPU, and what the page shows of it: its state, its latest
    status line, its run folder once there is one.

    Not `train.TrainRequest`, which is the input of one call to `train` inside the training process: a Job lives
    in the app's process, which never trains; its run happens in a child process (`child.Supervisor`) that builds
    its own TrainRequest from the command line. For a resume, `settings` are the run's own (`RunFolder.settings`),
    never a form's; the child (`train --resume`) is given none and reads them from the run folder itself.
    """

    job_id: str
    owner: str
    settings: RunSettings
    resume: str | None = None
    state: JobState = JobState.QUEUED
    message: str = "Waiting for the GPU."
    run_dir: Path | None = None
    error: str | None = None
    submitted_at: float = field(default_factory=time.time)
    stop_event: threading.Event = field(default_factory=threading.Event)
    # How many times Stop was pressed: the second one kills the training process at once.
    stop_requests: int = 0
    pid: int | None = None
    killed_after_stop: bool = False

    @property
    def done(self) -> bool:
        return self.state.done


# Runs one job to its end and returns its run folder (None: stopped before it had one); UserError when it fails.
# While it runs it reports each status line, the run folder once it exists, and the moment the run is training
# (its run.json says `running`). `child.Supervisor.run` is the app's; tests pass a stand-in that needs no model.
JobRunner = Callable[["Job", Callable[[str], None], Callable[[Path], None], Callable[[], None]], "Path | None"]


class JobManager:
    def __init__(self, runner: JobRunner | None = None, max_queued: int = MAX_QUEUED_JOBS, runs_per_owner: int = 0,
                 supervisor: child.Supervisor | None = None):
        self._supervisor = supervisor or child.Supervisor()
        self._runner = runner or self._supervisor.run
        self._max_queued = max_queued
        self._runs_per_owner = runs_per_owner
        self._lock = threading.Lock()
        self._queue: list[Job] = []
        self._current: Job | None = None
        self._jobs: dict[str, Job] = {}

    def submit(self, settings: RunSettings, owner: str) -> Job:
        """Start a new run of `settings` for `owner`, or queue it while the GPU is busy."""
        with self._lock:
            self._check_may_queue(owner)
            self._check_quota(settings.output_dir, owner)
            job_id = runs.new_run_id(settings.source) + "-" + uuid.uuid4().hex[:4]
            return self._enqueue(Job(job_id, owner, settings))

    def resume(self, runs_dir: str | Path, run_ref: str | Path, visitor: str) -> Job:
        """Resume the visitor's run named by `run_ref` (its id or its folder, as a page sends it) from its last
        checkpoint, or queue the resume. The run trains on with the settings in its own run.json, whatever a form
        shows now; refused (UserError) when the visitor may not see the run, it finished, or it is training."""
        folder = runs.open_visible(runs_dir, run_ref, visitor)
        with self._lock:
            self._check_may_queue(visitor)
            self._check_resumable(folder)
            job = Job(folder.run_id, visitor, folder.settings(), resume=str(folder.path), run_dir=folder.path)
            return self._enqueue(job)

    def _check_may_queue(self, owner: str) -> None:
        if any(j.owner == owner and not j.done for j in self._jobs.values()):
            raise UserError("You already have a run in progress or waiting; stop it before starting another.")
        if self._current is not None and len(self._queue) >= self._max_queued:
            raise UserError(f"The GPU is busy and {len(self._queue)} runs are already waiting; "
                            "try again when one finishes.")

    def _enqueue(self, job: Job) -> Job:
        self._jobs[job.job_id] = job
        if self._current is None:
            self._start(job)
        else:
            self._queue.append(job)
            job.message = f"Waiting for the GPU: position {len(self._queue)} in the queue."
        return job

    def _check_resumable(self, folder: runs.RunFolder) -> None:
        if self._active_on(folder.path):
            raise UserError(f"Run {folder.run_id} is already training or waiting to; it cannot be resumed twice.")
        runs.check_unfinished(folder)
        if folder.lock_holder() is not None:
            # Another process (the command line, or an app before a restart) is training it right now.
            raise UserError(f"Run {folder.run_id} is already training in another process; it cannot be resumed "
                            "twice at once.")

    def _active_on(self, run_dir: Path) -> bool:
        """Whether a job of this process is training, or waiting to train, the run in `run_dir`."""
        target = run_dir.resolve()
        return any(j.run_dir is not None and Path(j.run_dir).resolve() == target and not j.done
                   for j in self._jobs.values())

    def _check_quota(self, runs_dir: str, owner: str) -> None:
        if not self._runs_per_owner:
            return
        kept = sum(1 for _, record in runs.list_runs(runs_dir) if record.get("owner") == owner)
        if kept >= self._runs_per_owner:
            raise UserError(f"You have {kept} runs here, the most this app keeps per visitor; delete one in the "
                            "Runs tab (publish or download it first if you want to keep it), then start again.")

    def delete(self, runs_dir: str, run_ref: str, owner: str) -> str:
        """Delete a run of the owner's that is not training; returns its id. Command-line runs are not theirs."""
        folder = runs.open_visible(runs_dir, run_ref, owner)
        if folder.read().get("owner") != owner:
            raise UserError(f"Run {folder.run_id} was started from the command line; delete it there.")
        with self._lock:
            if self._active_on(folder.path):
                raise UserError(f"Run {folder.run_id} is training or waiting to; stop it before deleting it.")
            shutil.rmtree(folder.path)
        return folder.run_id

    def adopt(self, runs_dir: str | Path) -> list[Job]:
        """After a restart: follow every run a child of an earlier app process is still training (found through
        the run's lock), and mark a run left `running` by a process that is gone as failed, saying why."""
        adopted = []
        for folder, record in runs.list_runs(runs_dir):
            if record.get("status") != runs.RUNNING:
                continue
            holder = folder.lock_holder()
            if holder is None:
                child.settle(folder, None, [], killed_after_stop=False)
                continue
            if holder.get("host") != socket.gethostname() or not holder.get("pid"):
                continue  # trained elsewhere (a shared disk): nothing here can follow or stop it
            with self._lock:
                if folder.run_id in self._jobs:
                    continue
                # Command-line runs have no owner: the GPU is busy, and no visitor may stop them.
                job = Job(folder.run_id, record.get("owner") or "", RunSettings(output_dir=str(folder.path.parent)),
                          state=JobState.RUNNING, message="Training (re-attached after the app restarted)…",
                          run_dir=folder.path, pid=holder["pid"])
                self._jobs[job.job_id] = job
                self._current = job
                threading.Thread(target=self._run, args=(job, self._supervisor.follow), name=f"follow-{job.job_id}",
                                 daemon=True).start()
            adopted.append(job)
        return adopted

    def _start(self, job: Job) -> None:
        self._current = job
        job.state = JobState.PREPARING
        job.message = "Starting…"
        threading.Thread(target=self._run, args=(job,), name=f"train-{job.job_id}", daemon=True).start()

    def _run(self, job: Job, runner: JobRunner | None = None) -> None:
        def on_status(message: str) -> None:
            job.message = message

        def on_folder(path: Path) -> None:
            job.run_dir = path

        def on_running() -> None:
            job.state = JobState.RUNNING

        outcome: tuple[JobState, str, str | None]
        try:
            job.run_dir = (runner or self._runner)(job, on_status, on_folder, on_running)
            outcome = self._outcome(job)
        except UserError as err:
            outcome = (JobState.FAILED if self._run_failed(job) else JobState.REFUSED, str(err), str(err))
        except Exception as err:  # a bug, not the user's doing: still end the job and free the GPU
            reason = f"{type(err).__name__}: {err}"
            outcome = (JobState.FAILED, f"The run failed unexpectedly: {reason}", reason)
        with self._lock:
            # The GPU is released before the job reads as done, so whoever sees it done can start another.
            self._current = None
            job.state, job.message, job.error = outcome
            if self._queue:
                self._start(self._queue.pop(0))
            for position, waiting in enumerate(self._queue, start=1):
                waiting.message = f"Waiting for the GPU: position {position} in the queue."

    @staticmethod
    def _run_failed(job: Job) -> bool:
        """Whether the job's run itself failed (its record says so), rather than being refused before it ran."""
        if job.run_dir is None:
            return False
        try:
            return runs.RunFolder(job.run_dir).read().get("status") == runs.FAILED
        except UserError:
            return False

    @staticmethod
    def _outcome(job: Job) -> tuple[JobState, str, str | None]:
        if job.run_dir is None:
            return JobState.STOPPED, "Stopped before the run started; nothing was saved.", None
        record = runs.RunFolder(job.run_dir).read()
        if record.get("status") == runs.STOPPED:
            return JobState.STOPPED, record.get("error") or "Stopped; the adapter so far is saved.", None
        return JobState.FINISHED, "Finished.", None

    def stop(self, job_id: str, owner: str) -> Job:
        """Ask the job to stop (it saves a checkpoint and the adapter first); a second Stop kills it at once."""
        job = self.get(job_id, owner)
        with self._lock:
            if job in self._queue:
                self._queue.remove(job)
                job.state, job.message = JobState.STOPPED, "Removed from the queue before it started."
                return job
        if job.done:
            return job
        job.stop_requests += 1
        job.stop_event.set()
        job.message = ("Stopping: saving a checkpoint and the adapter at this step…" if job.stop_requests == 1
                       else "Stopping now: the training process is being killed (the last checkpoint is kept).")
        return job

    def get(self, job_id: str, owner: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None or job.owner != owner:
            raise UserError("No such run of yours.")
        return job

    def latest_for(self, owner: str) -> Job | None:
        """The owner's most recent job: what a reloaded page re-attaches to."""
        mine = [j for j in self._jobs.values() if j.owner == owner]
        return max(mine, key=lambda j: j.submitted_at) if mine else None

    def current(self) -> Job | None:
        return self._current
