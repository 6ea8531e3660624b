"""One training job at a time on this machine, shared by every visitor of the app: a run trains on every GPU the
machine has (one process each, see distributed.py), so a second run would find none free.

A job trains in a child process (`child.Supervisor`), so closing the browser tab does not stop it and a crash of
the run cannot take the app down; its run folder is the source of truth, so a reloaded page re-attaches by reading
it, and a restarted app finds a child that is still training through the run's lock (`adopt`). A second
visitor's Start waits in a short queue (and is told its position) or is refused when the queue is full; it never
disturbs the running job. Only the visitor who started a job can stop or resume it.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Callable, Iterator

from . import child, runs
from .access import SIGNED_IN
from .errors import UserError
from .settings import RunSettings

MAX_QUEUED_JOBS = 3


def anonymous(owner: str) -> bool:
    """Whether a job's owner is a visitor who is not signed in: their ids cost nothing, so their share is also
    counted by client address, and their runs may be limited in time."""
    return not owner.startswith(SIGNED_IN)


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
    """One visitor's place in the app's queue for the machine's training, and what the page shows of it: its state, its latest
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
    message: str = "Waiting for the run in training to end."
    run_dir: Path | None = None
    error: str | None = None
    submitted_at: float = field(default_factory=time.time)
    stop_event: threading.Event = field(default_factory=threading.Event)
    # How many times Stop was pressed: the second one kills the training process at once.
    stop_requests: int = 0
    pid: int | None = None
    killed_after_stop: bool = False
    # The address the job was asked from (`access.client_address`; None: not asked through the app), and the
    # seconds it may take from its start before the manager stops it (0: no limit).
    client: str | None = None
    time_limit: float = 0.0
    out_of_time: bool = False

    @property
    def done(self) -> bool:
        return self.state.done


# Runs one job to its end and returns its run folder (None: stopped before it had one); UserError when it fails.
# While it runs it reports each status line, the run folder once it exists, and the moment the run is training
# (its run.json says `running`). `child.Supervisor.run` is the app's; tests pass a stand-in that needs no model.
JobRunner = Callable[["Job", Callable[[str], None], Callable[[Path], None], Callable[[], None]], "Path | None"]


class JobManager:
    def __init__(self, runner: JobRunner | None = None, max_queued: int = MAX_QUEUED_JOBS, runs_per_owner: int = 0,
                 supervisor: child.Supervisor | None = None, anonymous_run_seconds: float = 0.0,
                 one_anonymous_job_per_client: bool = False):
        """`max_queued`: jobs that may wait behind the running one, for everyone; `runs_per_owner`: runs kept per
        visitor (0: no limit). For visitors who are not signed in (where strangers reach the app, a Space):
        `anonymous_run_seconds`, how long such a job may take from its start before it is stopped (0: no limit),
        and `one_anonymous_job_per_client`, one such job waiting or running per client address."""
        self._supervisor = supervisor or child.Supervisor()
        self._runner = runner or self._supervisor.run
        self._max_queued = max_queued
        self._runs_per_owner = runs_per_owner
        self._anonymous_run_seconds = anonymous_run_seconds
        self._one_anonymous_job_per_client = one_anonymous_job_per_client
        self._lock = threading.Lock()
        self._queue: list[Job] = []
        self._current: Job | None = None
        self._jobs: dict[str, Job] = {}
        self._held_because: str | None = None

    @contextlib.contextmanager
    def machine_held(self, why: str, refused: str) -> Iterator[None]:
        """Keep runs off the machine while other work trains on it (the hardware check): meanwhile a Start or a
        Resume is refused with `why`. Refused itself with `refused` (UserError) while a run trains or waits."""
        with self._lock:
            if self._held_because is not None or any(not job.done for job in self._jobs.values()):
                raise UserError(refused)
            self._held_because = why
        try:
            yield
        finally:
            with self._lock:
                self._held_because = None

    def submit(self, settings: RunSettings, owner: str, client: str | None = None) -> Job:
        """Start a new run of `settings` for `owner`, or queue it while another run trains. `client`: the address
        the app was asked from, which bounds what visitors who are not signed in may queue."""
        with self._lock:
            self._check_may_queue(owner, client)
            self._check_quota(settings.output_dir, owner)
            job_id = runs.new_run_id(settings.source) + "-" + uuid.uuid4().hex[:4]
            return self._enqueue(Job(job_id, owner, settings, client=client, time_limit=self._time_limit(owner)))

    def resume(self, runs_dir: str | Path, run_ref: str | Path, visitor: str, client: str | None = None) -> Job:
        """Resume the visitor's run named by `run_ref` (its id or its folder, as a page sends it) from its last
        checkpoint, or queue the resume. The run trains on with the settings in its own run.json, whatever a form
        shows now; refused (UserError) when the visitor may not see the run, it finished, or it is training."""
        folder = runs.open_visible(runs_dir, run_ref, visitor)
        with self._lock:
            self._check_may_queue(visitor, client)
            self._check_resumable(folder)
            job = Job(folder.run_id, visitor, folder.settings(), resume=str(folder.path), run_dir=folder.path,
                      client=client, time_limit=self._time_limit(visitor))
            return self._enqueue(job)

    def _time_limit(self, owner: str) -> float:
        return self._anonymous_run_seconds if anonymous(owner) else 0.0

    def _check_may_queue(self, owner: str, client: str | None) -> None:
        if self._held_because is not None:
            raise UserError(self._held_because)
        if any(j.owner == owner and not j.done for j in self._jobs.values()):
            raise UserError("You already have a run in progress or waiting; stop it before starting another.")
        # A new anonymous id is free, so one address gets one place for all of its anonymous ids.
        if self._one_anonymous_job_per_client and client is not None and anonymous(owner) and any(
                j.client == client and anonymous(j.owner) and not j.done for j in self._jobs.values()):
            raise UserError("A run from your address is already training or waiting, and visitors who are not "
                            "signed in get one at a time each; wait for it to end (or sign in).")
        if self._current is not None and len(self._queue) >= self._max_queued:
            raise UserError(f"A run is training and {len(self._queue)} runs are already waiting; "
                            "try again when one finishes.")

    def _enqueue(self, job: Job) -> Job:
        self._jobs[job.job_id] = job
        if self._current is None:
            self._start(job)
        else:
            self._queue.append(job)
            job.message = f"Waiting for the run in training to end: position {len(self._queue)} in the queue."
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
                # Command-line runs have no owner: the machine is training, and no visitor may stop them.
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
        deadline = None
        if job.time_limit:
            deadline = threading.Timer(job.time_limit, self._out_of_time, (job,))
            deadline.daemon = True
            deadline.start()
        try:
            job.run_dir = (runner or self._runner)(job, on_status, on_folder, on_running)
            outcome = self._outcome(job)
        except UserError as err:
            outcome = (JobState.FAILED if self._run_failed(job) else JobState.REFUSED, str(err), str(err))
        except Exception as err:  # a bug, not the user's doing: still end the job and free the machine
            reason = f"{type(err).__name__}: {err}"
            outcome = (JobState.FAILED, f"The run failed unexpectedly: {reason}", reason)
        finally:
            if deadline is not None:
                deadline.cancel()
        if job.out_of_time and outcome[0] == JobState.STOPPED:
            outcome = (JobState.STOPPED, self._out_of_time_message(job), None)
        with self._lock:
            # The machine is released before the job reads as done, so whoever sees it done can start another.
            self._current = None
            job.state, job.message, job.error = outcome
            if self._queue:
                self._start(self._queue.pop(0))
            for position, waiting in enumerate(self._queue, start=1):
                waiting.message = f"Waiting for the run in training to end: position {position} in the queue."

    @staticmethod
    def _out_of_time(job: Job) -> None:
        """A job past its time limit is stopped as its owner's Stop would (a checkpoint and the adapter are
        saved; one that does not stop within the supervisor's grace period is killed)."""
        if job.done or job.stop_event.is_set():
            return
        job.out_of_time = True
        job.stop_requests += 1
        job.stop_event.set()
        job.message = JobManager._out_of_time_message(job, stopping=True)

    @staticmethod
    def _out_of_time_message(job: Job, stopping: bool = False) -> str:
        limit = f"{job.time_limit / 60:,.3g} minutes"
        done = "stopping it: saving a checkpoint and the adapter…" if stopping else "it was stopped; the adapter " \
            "so far is saved, and Resume trains on from its checkpoint"
        return (f"This run reached {limit}, the longest a run of a visitor who is not signed in may take on this "
                f"shared app; {done}. Sign in, or duplicate the Space, to train longer.")

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
