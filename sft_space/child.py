"""One run as a child process of our own command line, supervised.

The app never trains in its own process: a crash inside a kernel, the kernel's OOM killer or a leak in one run
would take the whole Space down for every visitor. Each run is `python -m sft_space train …` in a process group
of its own; the run folder is the channel between the two (run.json for the outcome, events.jsonl for the
curve), and the events on the child's output (events.py) are its live status: no line of its human output is read.

Stop is a signal: SIGINT asks the child to save a checkpoint and the adapter at the current step and exit. The
grace it has for that covers the slowest step the run has taken so far (its events say), twice, on top of
STOP_GRACE_SECONDS for the save itself: on a busy machine a step can take longer than any fixed grace. If it has
not exited by then, or on a second Stop, the whole group is killed, the run is `stopped` at its last checkpoint,
and that checkpoint's adapter is copied out as the run's adapter, to chat with or publish. A child that dies
otherwise (SIGKILL, SIGSEGV, the OOM killer) leaves its run `failed` with the signal and the tail of its output in
failure.txt. Either way the supervisor writes the terminal event the child could not.

With `warm`, the next run's process is started ahead, its libraries loaded (see standby.py): Start then costs no
library loading, about 5 s on two CPU cores.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from . import events, runs
from .errors import UserError

log = logging.getLogger(__name__)

JOBS_DIR = ".jobs"
STOP_GRACE_SECONDS = 30.0
# The grace after Stop covers this many of the run's slowest step (the step under way when Stop came, then the save).
SLOWEST_STEPS_OF_GRACE = 2
LOG_TAIL_LINES = 40
PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)
# What a checkpoint holds besides the adapter: the trainer's state (pickles among them), not part of an adapter.
TRAINER_STATE_FILES = ("trainer_state.json",)
ADAPTER_SUFFIXES = (".json", ".safetensors", ".jinja", ".txt", ".model", ".md")
SIGNAL_MEANING = {
    signal.SIGKILL: "SIGKILL (killed: often the kernel's out-of-memory killer)",
    signal.SIGSEGV: "SIGSEGV (a crash inside native code)",
    signal.SIGABRT: "SIGABRT (aborted inside native code)",
    signal.SIGBUS: "SIGBUS (a crash inside native code)",
    signal.SIGTERM: "SIGTERM (terminated from outside)",
}


def arguments(job: Any, settings_path: Path | None) -> list[str]:
    """The command line's arguments that run `job`: a resume, or a new run with its settings file, name and owner."""
    if job.resume:
        return ["train", "--resume", str(job.resume), "--events"]
    return ["train", "--config", str(settings_path), "--run-name", job.job_id, "--owner", job.owner, "--events"]


def command(job: Any, settings_path: Path | None) -> list[str]:
    return [sys.executable, "-m", "sft_space", *arguments(job, settings_path)]


def child_environment() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(p for p in (PACKAGE_PARENT, os.environ.get("PYTHONPATH")) if p)}


def signal_group(pid: int, sig: int) -> None:
    """Signal the child's whole process group (it leads its own session, so the group id is its pid)."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        number = -returncode
        try:
            meaning = SIGNAL_MEANING.get(signal.Signals(number), signal.Signals(number).name)
        except ValueError:
            meaning = f"signal {number}"
        return f"The training process was killed by {meaning}"
    return f"The training process ended with exit code {returncode}"


def says_running(folder: runs.RunFolder) -> bool:
    """Whether the run's record says it is training (a new run's from its first write, a resumed run's once its
    checks have passed)."""
    try:
        return folder.read().get("status") == runs.RUNNING
    except UserError:
        return False


@dataclass(frozen=True)
class Listeners:
    """What the job manager is told while a child runs: what its events say (`events.said`), the run folder once it
    exists, and the moment the run is training."""

    on_status: Callable[[str], None]
    on_folder: Callable[[Path], None]
    on_running: Callable[[], None]


def slowest_step_seconds(entries: list[dict[str, Any]]) -> float:
    """The longest a step of the run took, as its metrics say: each entry's slowest step so far, and the mean step
    between two entries (which a run that did not record its slowest step still has)."""
    slowest = 0.0
    previous = None
    for entry in entries:
        if isinstance(entry.get("slowest_step_seconds"), (int, float)):
            slowest = max(slowest, float(entry["slowest_step_seconds"]))
        step, elapsed = entry.get("step"), entry.get("elapsed_seconds")
        if isinstance(step, int) and isinstance(elapsed, (int, float)):
            if previous is not None and step > previous[0] and elapsed >= previous[1]:
                slowest = max(slowest, (elapsed - previous[1]) / (step - previous[0]))
            previous = (step, float(elapsed))
    return slowest


def stop_grace(folder: runs.RunFolder, base_seconds: float) -> float:
    """Seconds a stopped run has to save and exit before it is killed: `base_seconds` for the save, and its slowest
    step so far twice over (the step under way may be as slow again)."""
    return base_seconds + SLOWEST_STEPS_OF_GRACE * slowest_step_seconds(folder.read_metrics())


def adapter_from_checkpoint(folder: runs.RunFolder, checkpoint: Path) -> bool:
    """Make the checkpoint's adapter (and tokenizer) the run's adapter, as a save at that step would have; False
    when the checkpoint holds no whole adapter."""
    if not ((checkpoint / runs.ADAPTER_CONFIG).is_file() and (checkpoint / runs.ADAPTER_WEIGHTS).is_file()):
        return False
    staging = folder.path / ".adapter-from-checkpoint"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    for path in checkpoint.iterdir():
        if path.is_file() and path.suffix in ADAPTER_SUFFIXES and path.name not in TRAINER_STATE_FILES:
            shutil.copy2(path, staging / path.name)
    shutil.rmtree(folder.adapter_path, ignore_errors=True)
    os.replace(staging, folder.adapter_path)
    return True


def _checkpoint_step(checkpoint: Path) -> str:
    return checkpoint.name.removeprefix("checkpoint-")


def settle(folder: runs.RunFolder, returncode: int | None, tail: list[str], killed_after_stop: bool) -> None:
    """Mark a run honestly when its process ended without recording an outcome (it still reads `running`); a run
    killed after Stop keeps its last checkpoint's adapter."""
    try:
        record = folder.read()
    except UserError:
        return
    if record.get("status") != runs.RUNNING:
        return
    checkpoint = folder.last_checkpoint()
    resume = (f"resume continues from {checkpoint.name}" if checkpoint is not None
              else "it had saved no checkpoint yet; start it again")
    if killed_after_stop:
        if checkpoint is not None and adapter_from_checkpoint(folder, checkpoint):
            kept = (f"the adapter of step {_checkpoint_step(checkpoint)} (its last checkpoint) is kept: chat with it "
                    "or publish it, or resume to train on from there")
        else:
            kept = f"no adapter was kept; {resume}"
        error = f"Stopped: the process did not exit in time to save this step and was killed; {kept}."
        folder.update(status=runs.STOPPED, error=error)
        events.append(folder.path, events.Stopped(reason=error, run_dir=str(folder.path)))
        return
    why = (describe_exit(returncode) if returncode is not None
           else "The training process ended without recording an outcome")
    (folder.path / "failure.txt").write_text("".join(tail), encoding="utf-8")
    error = f"{why}; {resume}. Its last output is kept with the run, for the app's operator."
    folder.update(status=runs.FAILED, error=error)
    events.append(folder.path, events.Failed(reason=error, run_dir=str(folder.path)))


class Supervisor:
    """Runs jobs as child processes (`run`), and follows one a previous app process started (`follow`); both are
    job runners for `jobs.JobManager` (`jobs.JobRunner`)."""

    def __init__(self, grace_seconds: float = STOP_GRACE_SECONDS,
                 command: Callable[[Any, Path | None], list[str]] = command, warm: bool = False,
                 standby_command: list[str] | None = None):
        self.grace_seconds = grace_seconds
        self.command = command
        self.warm = warm
        self.standby_command = standby_command or [sys.executable, "-m", "sft_space.standby"]
        self.standby: subprocess.Popen | None = None
        if warm:
            self.standby = self._start_standby()

    def _start_standby(self) -> subprocess.Popen:
        # Its own session from the start: Stop signals the group of whichever process became the run.
        return subprocess.Popen(self.standby_command, stdin=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=child_environment(),
                                start_new_session=True, text=True)

    def close(self) -> None:
        """End the waiting process, if any (it also ends by itself when this process exits)."""
        standby, self.standby = self.standby, None
        if standby is not None and standby.poll() is None:
            standby.stdin.close()
            try:
                standby.wait(timeout=30)
            except subprocess.TimeoutExpired:
                signal_group(standby.pid, signal.SIGKILL)

    def _launch(self, job: Any, settings_path: Path | None, log_path: Path) -> subprocess.Popen:
        """The run's process: the waiting one when there is one alive, else a new one."""
        standby, self.standby = self.standby, None
        if standby is not None and standby.poll() is None:
            order = {"arguments": arguments(job, settings_path), "log": str(log_path)}
            try:
                standby.stdin.write(json.dumps(order) + "\n")
                standby.stdin.close()
                return standby
            except OSError:  # it ended between the check and the order
                signal_group(standby.pid, signal.SIGKILL)
        # The child writes to a file, not a pipe: it keeps training if this process (the app) dies, and a
        # restarted app follows the same file.
        with open(log_path, "a", encoding="utf-8") as log:
            return subprocess.Popen(self.command(job, settings_path), stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=child_environment(), start_new_session=True)

    def run(self, job: Any, on_status: Callable[[str], None], on_folder: Callable[[Path], None],
            on_running: Callable[[], None]) -> Path | None:
        """Run `job` to its end in a child process; the run folder, or None when it stopped before having one."""
        runs_dir = Path(job.settings.output_dir)
        work = runs_dir / JOBS_DIR
        work.mkdir(parents=True, exist_ok=True)
        settings_path = None
        if not job.resume:
            settings_path = work / f"{job.job_id}.json"
            runs.write_json_atomic(settings_path, asdict(job.settings))
        folder = runs.RunFolder(Path(job.resume) if job.resume else runs_dir / job.job_id)
        log_path = log_file(runs_dir, folder.run_id)
        offset = log_path.stat().st_size if log_path.is_file() else 0
        log_path.touch()
        process = self._launch(job, settings_path, log_path)
        job.pid = process.pid
        try:
            errors, tail = self._follow(job, folder, log_path, offset, lambda: process.poll() is None,
                                        Listeners(on_status, on_folder, on_running))
            returncode = process.wait()
        finally:
            if self.warm:
                # One run at a time: the next one's process loads while this one's result is read.
                self.standby = self._start_standby()
        if not folder.record_path.is_file():
            if errors:
                raise UserError(errors[-1])
            if job.stop_event.is_set():
                return None
            # The page says what happened; where the output is (a path on the server) is for the operator's log.
            log.warning("run %s ended before it started; its output is in %s", folder.run_id, log_path)
            raise UserError(f"{describe_exit(returncode)} before the run started; its output is kept in the app's "
                            "log, for the app's operator.")
        return self._outcome(job, folder, returncode, errors, tail)

    def follow(self, job: Any, on_status: Callable[[str], None], on_folder: Callable[[Path], None],
               on_running: Callable[[], None]) -> Path:
        """Follow a run whose child a previous app process started; it is alive while it holds the run's lock."""
        folder = runs.RunFolder(job.run_dir)
        log_path = log_file(folder.path.parent, folder.run_id)
        # A run started from the command line has no output file of ours: it is followed by its lock alone.
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.touch()
        errors, tail = self._follow(job, folder, log_path, 0, lambda: folder.lock_holder() is not None,
                                    Listeners(on_status, on_folder, on_running))
        return self._outcome(job, folder, None, errors, tail)

    def _outcome(self, job: Any, folder: runs.RunFolder, returncode: int | None, errors: list[str],
                 tail: list[str]) -> Path:
        settle(folder, returncode, tail, job.killed_after_stop)
        record = folder.read()
        if record.get("status") == runs.FAILED:
            raise UserError(record.get("error") or (errors[-1] if errors else describe_exit(returncode or 1)))
        return folder.path

    def _follow(self, job: Any, folder: runs.RunFolder, log_path: Path, offset: int, alive: Callable[[], bool],
                listeners: Listeners) -> tuple[list[str], list[str]]:
        """Read the child's events as they come (what they say, its failure's reason), tell when its run folder
        appears and when its run.json says it is training, and turn Stop into signals, until it ends. Returns the
        reasons of its failures and the output's tail."""
        tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)
        errors: list[str] = []
        announced = training = False
        stop_sent_at = None
        grace = self.grace_seconds
        pending = ""
        with open(log_path, encoding="utf-8", errors="replace") as reader:
            reader.seek(offset)
            while True:
                running = alive()
                pending += reader.read()
                *lines, pending = pending.split("\n")
                for line in lines:
                    tail.append(line + "\n")
                    event = events.from_log_line(line)
                    if event is None:
                        continue
                    if event["event"] == "failed":
                        errors.append(event["reason"])
                    elif (said := events.said(event)) is not None:
                        listeners.on_status(said)
                if not announced and folder.record_path.is_file():
                    announced = True
                    listeners.on_folder(folder.path)
                # A resumed run's folder exists from the start: it trains once its record says so again.
                if announced and not training and says_running(folder):
                    training = True
                    listeners.on_running()
                if not running:
                    break
                if job.stop_event.is_set():
                    if stop_sent_at is None:
                        stop_sent_at = time.monotonic()
                        signal_group(job.pid, signal.SIGINT)
                        grace = stop_grace(folder, self.grace_seconds)
                    elif job.stop_requests >= 2 or time.monotonic() - stop_sent_at > grace:
                        job.killed_after_stop = True
                        signal_group(job.pid, signal.SIGKILL)
                time.sleep(0.2)
        if pending:
            tail.append(pending)
        return errors, list(tail)


def log_file(runs_dir: str | Path, run_id: str) -> Path:
    """The child's output, kept beside the runs: one file per run, a resume appending to it."""
    return Path(runs_dir) / JOBS_DIR / f"{run_id}.log"
