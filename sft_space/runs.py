"""The run folder: the single source of truth about a training run.

    runs/<run-id>/
        run.json          settings, resolved plan, data fingerprint, versions, hardware, status, final metrics
        events.jsonl      the run's events (events.py), appended while it trains: its steps and evaluations are
                          its curve (`read_metrics`)
        checkpoint-N/     resumable trainer checkpoints (adapter, optimizer, scheduler, RNG state)
        adapter/          the final (or stopped) adapter: safetensors, adapter config, tokenizer, chat template
        samples.json      answers to held-out prompts before and after training

        .lock             while a process trains the run: {pid, host, started_at}; one trainer per run

run.json is replaced atomically (write a temporary file, fsync, rename), so a crash leaves either the old or
the new record, never half of one. Nothing secret is ever written here: settings hold no tokens.

A run folder is outside input, like an upload: it may be cut off, hand-edited or written by another version.
`RunFolder.read` checks every known key's type once, so the rest of the code can trust a record it is given;
a record that fails is an `UnreadableRun` with a reason a person can act on, and `list_runs` still lists it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import tempfile
import threading
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

from . import events
from .errors import UserError
from .events import Headline
from .settings import DEFAULT_PRESET, RunSettings, is_number, run_settings

RUN_FILE = "run.json"
SAMPLES_FILE = "samples.json"
ADAPTER_DIR = "adapter"
LOCK_FILE = ".lock"
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
# Weights in these formats are pickles: loading one can run arbitrary code, so they are never loaded or published.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
RUNNING, STOPPED, FINISHED, FAILED = "running", "stopped", "finished", "failed"
STATUSES = (RUNNING, STOPPED, FINISHED, FAILED)
# Not a status a run.json may hold: what `list_runs` says of a run whose record cannot be used.
UNREADABLE = "unreadable"
RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
# A lock file younger than this that cannot be parsed is one being written right now, not a stale one.
LOCK_WRITE_SECONDS = 10.0
# Weight of the past in the smoothed training loss, per logged point: the last 9 points carry about 85% of the
# weight, enough to even out one batch's luck (a run logs every step up to 100 steps, about 100 points beyond).
SMOOTHING = 0.8


class UnreadableRun(UserError):
    """A run.json that cannot be used: not JSON, cut off, or holding a value of the wrong type."""


class RunLocked(UserError):
    """Another process (or thread) is training this run."""


def _kind(value: Any) -> str:
    """How a JSON value reads to a person: 'text', 'a number', 'null', ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "text"
    return "a list" if isinstance(value, list) else "an object"


def _text(value: Any) -> bool:
    return isinstance(value, str)


def _text_or_null(value: Any) -> bool:
    return value is None or isinstance(value, str)


def _object(value: Any) -> bool:
    return isinstance(value, dict)


# Every key of run.json that code reads, with what it must hold; other keys are kept as they are.
RECORD_SCHEMA: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "run_id": ("text", _text),
    "status": ("one of " + ", ".join(STATUSES), lambda value: value in STATUSES),
    "created_at": ("text", _text),
    "updated_at": ("text", _text),
    "settings": ("an object", _object),
    "plan": ("an object", _object),
    "data": ("an object", _object),
    "hardware": ("an object", _object),
    "versions": ("an object", _object),
    "final_metrics": ("an object", _object),
    "owner": ("text or null", _text_or_null),
    "error": ("text or null", _text_or_null),
    "base_model": ("text or null", _text_or_null),
    "resumed_from": ("text or null", _text_or_null),
    "published": ("a list", lambda value: isinstance(value, list)),
}


def validate_record(run_id: str, record: Any) -> dict[str, Any]:
    """`record` if it is a run record every reader can trust, else UnreadableRun naming what is wrong."""
    def unusable(reason: str) -> UnreadableRun:
        return UnreadableRun(f"run.json of run {run_id} cannot be used: {reason}. Fix or restore the file, or "
                             "delete the run.")

    if not isinstance(record, dict):
        raise unusable(f"it should be a JSON object, not {_kind(record)}")
    for key, (expected, valid) in RECORD_SCHEMA.items():
        if key in record and not valid(record[key]):
            raise unusable(f"{key!r} should be {expected}, not {_kind(record[key])}")
    for name, value in (record.get("final_metrics") or {}).items():
        if value is not None and not is_number(value):
            raise unusable(f"'final_metrics' should hold numbers (or null), but {name!r} is {_kind(value)}")
    return record


def write_json_atomic(path: Path, value: Any) -> None:
    """Replace `path` with `value` as JSON in one step: readers see the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            # Compact: on a nearly full disk the smaller record is the one that still fits.
            json.dump(value, handle, ensure_ascii=False, separators=(",", ":"))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def timestamp(when: float | None = None) -> str:
    """Now (or `when`, in seconds since the epoch), as run records write it: local time with its UTC offset."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(when))


def new_run_id(source: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(source.rstrip("/")).stem or "data").strip("-._")[:40] or "data"
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{stem}"


def validate_run_id(run_id: str) -> str:
    if not RUN_ID.match(run_id) or run_id in (".", ".."):
        raise UserError(f"{run_id!r} is not a valid run id: use letters, digits, '.', '_' and '-' only.")
    return run_id


class LossSmoother:
    """The training loss as an exponential moving average, bias-corrected as TensorBoard smooths its curves.

    One step's loss depends on which examples its batch drew; the average over the last points says where the
    run is. Plain EMA started at 0 reads far too low at first, and one started at the first value lets that (the
    highest) loss linger for dozens of points; dividing by the weight the EMA has gathered so far (1 - w^n) gives
    every point seen the weight it would have in a long run, so the first value is itself and nothing lags.
    """

    def __init__(self, weight: float = SMOOTHING):
        self.weight = weight
        self.biased = 0.0
        self.count = 0

    def add(self, loss: float) -> float:
        """Fold in the next logged loss; the smoothed value up to it. A NaN or infinite loss is given back as it
        is and left out of the average (the curve shows it; it does not poison every point after it)."""
        if not math.isfinite(loss):
            return loss
        self.count += 1
        self.biased = self.weight * self.biased + (1 - self.weight) * loss
        return self.biased / (1 - self.weight**self.count)


def asked(sample: dict[str, Any]) -> str:
    """A held-out sample's question (`RunFolder.samples`): its prompt's last user message, or "" when it has none."""
    users = [m["content"] for m in sample["prompt"] if m["role"] == "user"]
    return users[-1] if users else ""


def _is_message(message: Any) -> bool:
    return isinstance(message, dict) and all(isinstance(message.get(key), str) for key in ("role", "content"))


@dataclass
class RunFolder:
    path: Path

    def __post_init__(self) -> None:
        self.path = Path(self.path)

    @property
    def run_id(self) -> str:
        return self.path.name

    @property
    def record_path(self) -> Path:
        return self.path / RUN_FILE

    @property
    def events_path(self) -> Path:
        return self.path / events.EVENTS_FILE

    @property
    def adapter_path(self) -> Path:
        return self.path / ADAPTER_DIR

    @property
    def samples_path(self) -> Path:
        return self.path / SAMPLES_FILE

    def settings(self) -> RunSettings:
        """The settings this run recorded (its preset's values under its own), with the runs folder it is in now:
        the record names the one it was made in, which may since have moved."""
        values = dict(self.read().get("settings") or {})
        recorded = run_settings(values.pop("preset", None) or DEFAULT_PRESET, **values)
        return replace(recorded, output_dir=str(self.path.parent))

    @property
    def lock_path(self) -> Path:
        return self.path / LOCK_FILE

    @property
    def has_adapter(self) -> bool:
        """Whether the run saved a whole adapter (at its end, or when stopped) to chat with or publish."""
        return (self.adapter_path / ADAPTER_CONFIG).is_file() and (self.adapter_path / ADAPTER_WEIGHTS).is_file()

    def require_adapter(self, purpose: str) -> None:
        """Refuse, saying which file is missing and what to do, unless the run has a whole safetensors adapter
        to `purpose` ("chat with", "publish", "export", "merge")."""
        if self.has_adapter:
            return
        config = (self.adapter_path / ADAPTER_CONFIG).is_file()
        pickles = sorted(p.name for p in self.adapter_path.glob("*") if p.suffix.lower() in PICKLE_SUFFIXES) \
            if self.adapter_path.is_dir() else []
        weights = (self.adapter_path / ADAPTER_WEIGHTS).is_file()
        if not config and not weights and not pickles:
            status = self.read().get("status")
            raise UserError(f"Run {self.run_id} has no adapter to {purpose} (status: {status}); wait for it to "
                            "finish, or stop it to save the adapter so far.")
        if pickles and not weights:
            raise UserError(f"Run {self.run_id}'s adapter has only pickle weights ({', '.join(pickles)}), which "
                            f"are never loaded or published: unpickling can run arbitrary code. Save the adapter "
                            f"as {ADAPTER_WEIGHTS} (or train the run again) to {purpose} it.")
        missing = ADAPTER_CONFIG if weights else ADAPTER_WEIGHTS
        checkpoint = self.last_checkpoint()
        remedy = (f"copy {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} from {checkpoint} into {self.adapter_path}"
                  if checkpoint is not None else "train the run again")
        raise UserError(f"Run {self.run_id}'s adapter is incomplete: {self.adapter_path / missing} is missing (the "
                        f"save may have been cut short). To {purpose} it, {remedy}.")

    @classmethod
    def create(cls, runs_dir: str | Path, run_id: str) -> RunFolder:
        path = Path(runs_dir) / validate_run_id(run_id)
        if path.exists():
            raise UserError(f"A run named {run_id} already exists in {runs_dir}; choose another name.")
        path.mkdir(parents=True)
        return cls(path)

    @classmethod
    def open(cls, path: str | Path) -> RunFolder:
        """An existing run folder whose record can be used (UnreadableRun, with the reason, otherwise)."""
        folder = cls(Path(path))
        if not folder.record_path.is_file():
            raise UserError(f"{path} is not a run folder (it has no {RUN_FILE}).")
        folder.read()
        return folder

    def _load(self) -> Any:
        try:
            return json.loads(self.record_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UnreadableRun(f"run.json of run {self.run_id} is not valid JSON (it may have been cut off): "
                                f"{err}. Fix or restore the file, or delete the run.") from None
        except OSError as err:
            raise UnreadableRun(f"run.json of run {self.run_id} could not be read: {err.strerror}.") from None

    def read(self) -> dict[str, Any]:
        """The run record, checked: every known key holds the type its readers expect."""
        return validate_record(self.run_id, self._load())

    def unreadable_record(self, reason: str) -> dict[str, Any]:
        """What `list_runs` says of a run whose record cannot be used: enough to show it, and whose it is."""
        try:
            raw = self._load()
        except UnreadableRun:
            raw = None
        owner = raw.get("owner") if isinstance(raw, dict) else None
        try:
            created = timestamp(self.record_path.stat().st_mtime)
        except OSError:
            created = ""
        return {"run_id": self.run_id, "status": UNREADABLE, "error": reason,
                "owner": owner if isinstance(owner, str) else None, "created_at": created, "settings": {},
                "final_metrics": {}}

    def write(self, record: dict[str, Any]) -> None:
        write_json_atomic(self.record_path, record)

    def update(self, **changes: Any) -> dict[str, Any]:
        record = self.read()
        record.update(changes)
        record["updated_at"] = timestamp()
        self.write(record)
        return record

    def read_events(self) -> list[dict[str, Any]]:
        """The run's events, every attempt's, in order (`events.read_file`)."""
        return events.read_file(self.events_path)

    def read_metrics(self) -> list[dict[str, Any]]:
        """The step and evaluation events of the run's curve (`events.curve`)."""
        return events.curve(self.read_events())

    def samples(self) -> list[dict[str, Any]]:
        """The held-out prompts and their answers before and after training (samples.json, as train writes it),
        each a dict; empty when the run has none or the file cannot be read: the answers are an extra that the
        card and the chat tab show when they can, never a reason to fail."""
        try:
            samples = json.loads(self.samples_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return []
        if not isinstance(samples, list):
            return []
        # A prompt keeps only messages of the shape train writes ({"role": str, "content": str}).
        return [{**sample, "prompt": [m for m in sample.get("prompt") or [] if _is_message(m)]
                 if isinstance(sample.get("prompt"), list) else []}
                for sample in samples if isinstance(sample, dict)]

    def held_out_prompts(self) -> list[str]:
        """The last user message of each held-out prompt (`samples`): what the run was asked and not trained on."""
        return [asked(sample) for sample in self.samples()]

    def headline(self, record: dict[str, Any] | None = None) -> Headline:
        """The run's headline numbers (see `Headline`), for every view that names a run's loss: from the record's
        final metrics once the run has ended, else (while it trains) from its curve. `record`: the run record when
        the caller has read it already."""
        final = (record if record is not None else self.read()).get("final_metrics") or {}
        if is_number(final.get("loss_smoothed")):
            validation = final.get("eval_loss")
            return Headline(float(final["loss_smoothed"]), float(validation) if is_number(validation) else None)
        return events.headline_of(self.read_metrics())

    def checkpoints(self) -> list[Path]:
        """Complete trainer checkpoints, oldest first."""
        found = []
        for child in self.path.glob("checkpoint-*"):
            step = child.name.removeprefix("checkpoint-")
            # A checkpoint is complete once the trainer state is written (the trainer writes it last).
            if step.isdigit() and (child / "trainer_state.json").is_file():
                found.append((int(step), child))
        return [path for _, path in sorted(found)]

    def incomplete_checkpoints(self) -> list[Path]:
        """Checkpoint folders whose save was cut short (no trainer state): never resumed from."""
        complete = set(self.checkpoints())
        return [path for path in sorted(self.path.glob("checkpoint-*")) if path.is_dir() and path not in complete]

    def last_checkpoint(self) -> Path | None:
        checkpoints = self.checkpoints()
        return checkpoints[-1] if checkpoints else None

    # ---- one trainer at a time: a lock file beside run.json -------------------------------------------------

    def _lock_state(self) -> tuple[bytes, dict[str, Any] | None, bool] | None:
        """(the lock file's bytes, its holder, whether that holder still counts), or None without a lock."""
        try:
            content = self.lock_path.read_bytes()
            age = time.time() - self.lock_path.stat().st_mtime
        except FileNotFoundError:
            return None
        try:
            holder = json.loads(content)
        except (UnicodeDecodeError, json.JSONDecodeError):
            holder = None
        if not isinstance(holder, dict) or not isinstance(holder.get("pid"), int) \
                or not isinstance(holder.get("host"), str):
            # Created but not yet written (O_EXCL first, content next), or left half-written by a crash.
            return content, None, age < LOCK_WRITE_SECONDS
        if holder["host"] != socket.gethostname():
            return content, holder, True  # a process elsewhere (a shared disk): nothing here can tell it ended
        return content, holder, _process_alive(holder)

    def lock_holder(self) -> dict[str, Any] | None:
        """The process training this run ({pid, host, started_at}), or None when no live process holds it."""
        state = self._lock_state()
        if state is None or not state[2]:
            return None
        return state[1] or {"pid": None, "host": None, "started_at": None}

    def _locked_message(self, holder: dict[str, Any] | None) -> str:
        if not holder:
            return f"Run {self.run_id} is being started by another process; try again in a moment."
        message = (f"Run {self.run_id} is already training (process {holder['pid']} on host {holder['host']} "
                   f"since {holder.get('started_at')}); wait for it to end or stop it.")
        if holder["host"] != socket.gethostname():
            message += f" If host {holder['host']} is gone for good, delete {self.lock_path} and try again."
        return message

    def _break_stale_lock(self, seen: bytes) -> None:
        """Remove the lock file if it still holds `seen` (a dead holder), without removing one taken meanwhile."""
        aside = self.path / f"{LOCK_FILE}.stale-{os.getpid()}-{threading.get_ident()}"
        try:
            os.rename(self.lock_path, aside)  # atomic: of several processes breaking it, one gets the file
        except FileNotFoundError:
            return
        if aside.read_bytes() != seen:
            with contextlib.suppress(FileExistsError):  # a live holder's fresh lock: put it back
                os.link(aside, self.lock_path)
        aside.unlink(missing_ok=True)

    def _take_lock(self) -> dict[str, Any]:
        mine = {"pid": os.getpid(), "host": socket.gethostname(), "started_at": timestamp(),
                "process_start": _process_start(os.getpid())}
        for _ in range(5):
            try:
                fd = os.open(self.lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                state = self._lock_state()
                if state is not None and state[2]:
                    raise RunLocked(self._locked_message(state[1])) from None
                if state is not None:
                    self._break_stale_lock(state[0])
                continue
            except OSError as err:
                raise UserError(f"Could not lock run {self.run_id} ({self.lock_path}): {err.strerror}.") from None
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as handle:
                    json.dump(mine, handle)
            except OSError as err:
                self.lock_path.unlink(missing_ok=True)
                raise UserError(f"Could not lock run {self.run_id} ({self.lock_path}): {err.strerror}.") from None
            return mine
        raise RunLocked(f"Run {self.run_id} is being started by another process; try again in a moment.")

    @contextlib.contextmanager
    def locked(self) -> Iterator[dict[str, Any]]:
        """Hold the run's lock for the block: RunLocked if another live process (or this one) holds it."""
        mine = self._take_lock()
        try:
            yield mine
        finally:
            state = self._lock_state()
            if state is not None and state[1] == mine:
                self.lock_path.unlink(missing_ok=True)


def _process_start(pid: int) -> str | None:
    """When process `pid` started, in clock ticks since boot (Linux), so a reused pid is not taken for it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    return fields[19] if len(fields) > 19 else None


def _process_alive(holder: dict[str, Any]) -> bool:
    """Whether the process that wrote `holder` (on this host) still runs."""
    pid = holder["pid"]
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process: it exists
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return True
    if state in ("Z", "X"):
        return False  # ended, not yet reaped by its parent
    # After a restart (a container's pids start again from 1) the pid may now be another process.
    started = holder.get("process_start")
    return started is None or started == _process_start(pid)


def list_runs(runs_dir: str | Path) -> list[tuple[RunFolder, dict[str, Any]]]:
    """Every run in `runs_dir`, newest first; one whose record cannot be used has status UNREADABLE and the
    reason as its error (see `RunFolder.unreadable_record`)."""
    runs = []
    root = Path(runs_dir)
    if not root.is_dir():
        return []
    for child in root.iterdir():
        if (child / RUN_FILE).is_file():
            folder = RunFolder(child)
            try:
                runs.append((folder, folder.read()))
            except UnreadableRun as err:
                runs.append((folder, folder.unreadable_record(str(err))))
    runs.sort(key=lambda item: item[1].get("created_at") or "", reverse=True)
    return runs


def visible_to(record: dict[str, Any], visitor: str | None) -> bool:
    """Runs started in the app belong to the browser that started them. Runs without an owner were started from
    the command line: they are the operator's, and no visitor of the app sees, chats with, exports or publishes
    them (the command line does all of that)."""
    owner = record.get("owner")
    return bool(owner) and owner == visitor


def visible_runs(runs_dir: str | Path, visitor: str | None) -> list[tuple[RunFolder, dict[str, Any]]]:
    return [(folder, record) for folder, record in list_runs(runs_dir) if visible_to(record, visitor)]


def open_visible(runs_dir: str | Path, run_ref: str | Path, visitor: str | None) -> RunFolder:
    """The run named by `run_ref` (its id or its folder, as a page sends it) inside `runs_dir`, if `visitor` may
    see it. Only the name is used, so a path sent by a page can never point outside the runs folder."""
    run_id = validate_run_id(Path(str(run_ref)).name)
    folder = RunFolder(Path(runs_dir) / run_id)
    missing = UserError(f"There is no run {run_id} of yours here.")
    if not folder.record_path.is_file():
        raise missing
    try:
        record = folder.read()
    except UnreadableRun as err:
        # Why it cannot be used is told only to whoever may see the run.
        if visible_to(folder.unreadable_record(str(err)), visitor):
            raise
        raise missing from None
    if not visible_to(record, visitor):
        raise missing
    return folder


def check_unfinished(folder: RunFolder, record: dict[str, Any] | None = None) -> None:
    """Refuse to resume a run that finished (the app asks before it starts a resume, so that the refusal is
    said at once, and never by a training process started only to refuse)."""
    if (record if record is not None else folder.read()).get("status") == FINISHED:
        raise UserError(f"Run {folder.run_id} already finished; there is nothing to resume. Start a new run to "
                        "train more.")


def check_resumable(folder: RunFolder, record: dict[str, Any] | None = None) -> Path:
    """The last checkpoint of a run that may be resumed; UserError saying why not (it finished, it has no
    checkpoint, its record names no data)."""
    record = record if record is not None else folder.read()
    check_unfinished(folder, record)
    checkpoint = folder.last_checkpoint()
    if checkpoint is None:
        raise UserError(f"Run {folder.run_id} has no checkpoint to resume from (it stopped before its first save); "
                        "start it again as a new run.")
    if not (record.get("settings") or {}).get("source"):
        raise UserError(f"run.json of run {folder.run_id} names no data in its 'settings', so the run cannot be "
                        "resumed; start a new run instead.")
    return checkpoint


