"""One training job per GPU, shared by every visitor of the app.

A job trains in a child process (`child.Supervisor`), so closing the browser tab does not stop it and a crash of
the run cannot take the app down; its run folder is the source of truth, so a reloaded page re-attaches by reading
it, and a restarted app finds a child that is still training through the run's lock (`adopt`). A second visitor's Start waits in a short
queue (and is told its position) or is refused when the queue is full; it never disturbs the running job.
Only the visitor who started a job can stop it.
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import child, runs
from .errors import UserError
from .settings import RunSettings

# A job's states: a run's own (runs.py) once it has one, and before it, waiting or being prepared.
QUEUED, PREPARING = "queued", "preparing"
RUNNING, FINISHED, STOPPED, FAILED = runs.RUNNING, runs.FINISHED, runs.STOPPED, runs.FAILED
# Refused before anything was trained (bad data, a finished run to resume, ...): not a failure of a run.
REFUSED = "refused"
DONE = (FINISHED, STOPPED, FAILED, REFUSED)
MAX_QUEUED_JOBS = 3


@dataclass
class Job:
    job_id: str
    owner: str
    settings: RunSettings
    resume: str | None = None
    state: str = QUEUED
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
        return self.state in DONE


# Trains one job to its end and returns its run folder (None: stopped before it had one); UserError when it
# fails. Replaced in tests by a stand-in that needs no model.
Trainer = Callable[["Job", Callable[[str], None], Callable[[Path], None]], "Path | None"]


class JobManager:
    def __init__(self, trainer: Trainer | None = None, max_queued: int = MAX_QUEUED_JOBS, runs_per_owner: int = 0,
                 supervisor: child.Supervisor | None = None):
        self._supervisor = supervisor or child.Supervisor()
        self._trainer = trainer or self._supervisor.run
        self._max_queued = max_queued
        self._runs_per_owner = runs_per_owner
        self._lock = threading.Lock()
        self._queue: list[Job] = []
        self._current: Job | None = None
        self._jobs: dict[str, Job] = {}

    def submit(self, settings: RunSettings, owner: str, resume: str | None = None) -> Job:
        with self._lock:
            if any(j.owner == owner and not j.done for j in self._jobs.values()):
                raise UserError("You already have a run in progress or waiting; stop it before starting another.")
            if self._current is not None and len(self._queue) >= self._max_queued:
                raise UserError(f"The GPU is busy and {len(self._queue)} runs are already waiting; "
                                "try again when one finishes.")
            if resume:
                self._check_resumable(resume, owner)
            else:
                self._check_quota(settings.output_dir, owner)
            job_id = Path(resume).name if resume else runs.new_run_id(settings.source) + "-" + uuid.uuid4().hex[:4]
            job = Job(job_id, owner, settings, resume=resume)
            if resume:
                job.run_dir = Path(resume)
            self._jobs[job.job_id] = job
            if self._current is None:
                self._start(job)
            else:
                self._queue.append(job)
                job.message = f"Waiting for the GPU: position {len(self._queue)} in the queue."
            return job

    def _check_resumable(self, run_dir: str, owner: str) -> None:
        folder = runs.RunFolder.open(run_dir)
        if self._active_on(folder.path):
            raise UserError(f"Run {folder.run_id} is already training or waiting to; it cannot be resumed twice.")
        if not runs.visible_to(folder.read(), owner):
            raise UserError(f"Run {folder.run_id} was started by another visitor; only they can resume it.")
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
                          state=RUNNING, message="Training (re-attached after the app restarted)…",
                          run_dir=folder.path, pid=holder["pid"])
                self._jobs[job.job_id] = job
                self._current = job
                threading.Thread(target=self._run, args=(job, self._supervisor.follow), name=f"follow-{job.job_id}",
                                 daemon=True).start()
            adopted.append(job)
        return adopted

    def _start(self, job: Job) -> None:
        self._current = job
        job.state = PREPARING
        job.message = "Starting…"
        threading.Thread(target=self._run, args=(job,), name=f"train-{job.job_id}", daemon=True).start()

    def _run(self, job: Job, trainer: Trainer | None = None) -> None:
        def on_status(message: str) -> None:
            job.message = message
            if message.startswith("Training"):
                job.state = RUNNING

        def on_folder(path: Path) -> None:
            job.run_dir = path

        outcome: tuple[str, str, str | None]
        try:
            job.run_dir = (trainer or self._trainer)(job, on_status, on_folder)
            outcome = self._outcome(job)
        except UserError as err:
            outcome = (FAILED if self._run_failed(job) else REFUSED, str(err), str(err))
        except Exception as err:  # a bug, not the user's doing: still end the job and free the GPU
            reason = f"{type(err).__name__}: {err}"
            outcome = (FAILED, f"The run failed unexpectedly: {reason}", reason)
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
    def _outcome(job: Job) -> tuple[str, str, str | None]:
        if job.run_dir is None:
            return STOPPED, "Stopped before the run started; nothing was saved.", None
        record = runs.RunFolder(job.run_dir).read()
        if record.get("status") == runs.STOPPED:
            return STOPPED, record.get("error") or "Stopped; the adapter so far is saved.", None
        return FINISHED, "Finished.", None

    def stop(self, job_id: str, owner: str) -> Job:
        """Ask the job to stop (it saves a checkpoint and the adapter first); a second Stop kills it at once."""
        job = self.get(job_id, owner)
        with self._lock:
            if job in self._queue:
                self._queue.remove(job)
                job.state, job.message = STOPPED, "Removed from the queue before it started."
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
