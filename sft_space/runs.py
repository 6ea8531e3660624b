"""The run folder: the single source of truth about a training run.

    runs/<run-id>/
        run.json          settings, resolved plan, data fingerprint, versions, hardware, status, final metrics
        metrics.jsonl     one JSON object per logged step, appended while training runs
        checkpoint-N/     resumable trainer checkpoints (adapter, optimizer, scheduler, RNG state)
        adapter/          the final (or stopped) adapter: safetensors, adapter config, tokenizer, chat template
        samples.json      answers to held-out prompts before and after training

run.json is replaced atomically (write a temporary file, fsync, rename), so a crash leaves either the old or
the new record, never half of one. Nothing secret is ever written here: settings hold no tokens.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.json"
ADAPTER_DIR = "adapter"
RUNNING, STOPPED, FINISHED, FAILED = "running", "stopped", "finished", "failed"
STATUSES = (RUNNING, STOPPED, FINISHED, FAILED)
RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def write_json_atomic(path: Path, value: Any) -> None:
    """Replace `path` with `value` as JSON in one step: readers see the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(value, handle, ensure_ascii=False, indent=2)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def timestamp() -> str:
    """Now, as run records write it (local time with its UTC offset)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def new_run_id(source: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(source.rstrip("/")).stem or "data").strip("-._")[:40] or "data"
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{stem}"


def validate_run_id(run_id: str) -> str:
    if not RUN_ID.match(run_id) or run_id in (".", ".."):
        raise UserError(f"{run_id!r} is not a valid run id: use letters, digits, '.', '_' and '-' only.")
    return run_id


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
    def metrics_path(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def adapter_path(self) -> Path:
        return self.path / ADAPTER_DIR

    @property
    def samples_path(self) -> Path:
        return self.path / SAMPLES_FILE

    @property
    def has_adapter(self) -> bool:
        """Whether the run saved an adapter (at its end, or when stopped) to chat with or publish."""
        return (self.adapter_path / "adapter_config.json").is_file()

    @classmethod
    def create(cls, runs_dir: str | Path, run_id: str) -> RunFolder:
        path = Path(runs_dir) / validate_run_id(run_id)
        if path.exists():
            raise UserError(f"A run named {run_id} already exists in {runs_dir}; choose another name.")
        path.mkdir(parents=True)
        return cls(path)

    @classmethod
    def open(cls, path: str | Path) -> RunFolder:
        folder = cls(Path(path))
        if not folder.record_path.is_file():
            raise UserError(f"{path} is not a run folder (it has no {RUN_FILE}).")
        return folder

    def read(self) -> dict[str, Any]:
        try:
            return json.loads(self.record_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise UserError(f"Could not read {self.record_path}: {err}.") from None

    def write(self, record: dict[str, Any]) -> None:
        write_json_atomic(self.record_path, record)

    def update(self, **changes: Any) -> dict[str, Any]:
        record = self.read()
        record.update(changes)
        record["updated_at"] = timestamp()
        self.write(record)
        return record

    def append_metrics(self, entry: dict[str, Any]) -> None:
        # One short line per write with the file opened in append mode: a reader never sees a partial
        # line except during the write itself, and `read_metrics` skips a torn last line.
        with self.metrics_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry) + "\n")
            handle.flush()

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.is_file():
            return []
        entries = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return entries

    def checkpoints(self) -> list[Path]:
        """Complete trainer checkpoints, oldest first."""
        found = []
        for child in self.path.glob("checkpoint-*"):
            step = child.name.removeprefix("checkpoint-")
            # A checkpoint is complete once the trainer state is written (the trainer writes it last).
            if step.isdigit() and (child / "trainer_state.json").is_file():
                found.append((int(step), child))
        return [path for _, path in sorted(found)]

    def last_checkpoint(self) -> Path | None:
        checkpoints = self.checkpoints()
        return checkpoints[-1] if checkpoints else None


def list_runs(runs_dir: str | Path) -> list[tuple[RunFolder, dict[str, Any]]]:
    """Every readable run in `runs_dir`, newest first."""
    runs = []
    root = Path(runs_dir)
    if not root.is_dir():
        return []
    for child in root.iterdir():
        if (child / RUN_FILE).is_file():
            folder = RunFolder(child)
            try:
                runs.append((folder, folder.read()))
            except UserError:
                continue
    runs.sort(key=lambda item: item[1].get("created_at", ""), reverse=True)
    return runs


def visible_to(record: dict[str, Any], visitor: str | None) -> bool:
    """Runs started in the app belong to the browser that started them; runs without an owner (started from the
    command line) are everyone's."""
    owner = record.get("owner")
    return not owner or owner == visitor


def visible_runs(runs_dir: str | Path, visitor: str | None) -> list[tuple[RunFolder, dict[str, Any]]]:
    return [(folder, record) for folder, record in list_runs(runs_dir) if visible_to(record, visitor)]


def open_visible(runs_dir: str | Path, run_ref: str | Path, visitor: str | None) -> RunFolder:
    """The run named by `run_ref` (its id or its folder, as a page sends it) inside `runs_dir`, if `visitor` may
    see it. Only the name is used, so a path sent by a page can never point outside the runs folder."""
    run_id = validate_run_id(Path(str(run_ref)).name)
    folder = RunFolder(Path(runs_dir) / run_id)
    record = folder.read() if folder.record_path.is_file() else None
    if record is None or not visible_to(record, visitor):
        raise UserError(f"There is no run {run_id} of yours here.")
    return folder


def resumable_runs(runs_dir: str | Path) -> list[RunFolder]:
    """Runs a restarted process can continue: stopped, failed, or left "running" by a process that died."""
    return [folder for folder, record in list_runs(runs_dir)
            if record.get("status") != FINISHED and folder.last_checkpoint() is not None]
