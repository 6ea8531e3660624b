"""A run's events: one typed stream from the training process to every screen.

The training process says everything it does as events, one JSON object each, with its kind in `event` and the
moment in `time` (seconds since the epoch): appended to `events.jsonl` in the run folder, and printed on its stdout
as one line that starts with PREFIX, so that a program finds them amid library noise (a supervising app reading
the child's output, a Hugging Face Job's log stream). Events said before the run folder exists (the data checks)
are written to it once it does.

    kind        fields (besides `event` and `time`; those marked ? may be absent)
    started     run_id, resumed_from? (the checkpoint a resume goes on from), processes
    status      message: what the run is doing, for people ("Loading the model…")
    plan        plan (the training plan, with its reasons), from_step (the step training starts from: 0, a
                resume's checkpoint, or 0 again after an out-of-memory retry, whose curve starts over)
    step        step, max_steps, epoch, loss, loss_smoothed, elapsed_seconds, learning_rate?, grad_norm?,
                tokens_per_second?, eta_seconds?, slowest_step_seconds?, peak_gpu_memory_gib?
    evaluation  step, max_steps, epoch, eval_loss, eval_seconds, elapsed_seconds, and a step's optional fields
    checkpoint  step, name (the checkpoint folder's name)
    stopping    step: a stop was heard; a checkpoint and the adapter are saved at this step
    samples     answers: how many held-out prompts were answered before and after training
    finished    run_dir, final_metrics
    stopped     reason, run_dir?, final_metrics?
    failed      reason, run_dir?

Each attempt of a run (a new run, each resume) opens with `started` and its stream ends with exactly one terminal
event (finished, stopped or failed): a process killed from outside gets its terminal event from its supervisor.

`read_file` and `read_lines` are the one reader, for the file and for a log stream alike: they keep the events whose
fields have the types above and skip everything else (other output, a line cut off while it was written). The
numbers of a step are formatted for people once, by `progress_text`, for the command line and the app alike.
"""

from __future__ import annotations

import functools
import json
import sys
import threading
import time
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable

from .settings import is_number

# The start of an event's line on stdout: rare enough never to begin a library's line.
PREFIX = "@sft-space-event "
EVENTS_FILE = "events.jsonl"
_DECODER = json.JSONDecoder()


@dataclass(frozen=True)
class Started:
    run_id: str
    processes: int = 1
    resumed_from: str | None = None


@dataclass(frozen=True)
class Status:
    message: str


@dataclass(frozen=True)
class Plan:
    plan: dict[str, Any]
    from_step: int = 0


@dataclass(frozen=True)
class Step:
    step: int
    max_steps: int
    epoch: float
    loss: float
    loss_smoothed: float
    elapsed_seconds: float
    learning_rate: float | None = None
    grad_norm: float | None = None
    tokens_per_second: float | None = None
    eta_seconds: float | None = None
    slowest_step_seconds: float | None = None
    peak_gpu_memory_gib: float | None = None


@dataclass(frozen=True)
class Evaluation:
    step: int
    max_steps: int
    epoch: float
    eval_loss: float
    eval_seconds: float
    elapsed_seconds: float
    tokens_per_second: float | None = None
    eta_seconds: float | None = None
    slowest_step_seconds: float | None = None
    peak_gpu_memory_gib: float | None = None


@dataclass(frozen=True)
class Checkpoint:
    step: int
    name: str


@dataclass(frozen=True)
class Stopping:
    step: int


@dataclass(frozen=True)
class Samples:
    answers: int


@dataclass(frozen=True)
class Finished:
    run_dir: str
    final_metrics: dict[str, Any]


@dataclass(frozen=True)
class Stopped:
    reason: str
    run_dir: str | None = None
    final_metrics: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Failed:
    reason: str
    run_dir: str | None = None


KINDS: dict[str, type] = {"started": Started, "status": Status, "plan": Plan, "step": Step,
                          "evaluation": Evaluation, "checkpoint": Checkpoint, "stopping": Stopping,
                          "samples": Samples, "finished": Finished, "stopped": Stopped, "failed": Failed}
KIND_OF = {cls: kind for kind, cls in KINDS.items()}
TERMINAL = ("finished", "stopped", "failed")


def _matches(value: Any, hint: Any) -> bool:
    """Whether a JSON value holds the type a field declares (a float field takes a whole number; true is no number)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_matches(value, option) for option in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return is_number(value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, typing.get_origin(hint) or hint)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def problem(event: Any) -> str | None:
    """What makes `event` (a parsed JSON value) no event of the schema; None when it is one."""
    if not isinstance(event, dict):
        return "not an object"
    kind = event.get("event")
    if kind not in KINDS:
        return f"unknown kind {kind!r}"
    if not _matches(event.get("time"), float):
        return "no time"
    hints = _hints(KINDS[kind])
    for spec in fields(KINDS[kind]):
        if spec.name not in event:
            if spec.default is MISSING and spec.default_factory is MISSING:
                return f"{kind} without {spec.name}"
        elif not _matches(event[spec.name], hints[spec.name]):
            return f"{kind}'s {spec.name} is {type(event[spec.name]).__name__}"
    return None


def _parsed(text: str) -> dict[str, Any] | None:
    try:
        event = json.loads(text)
    except ValueError:
        return None
    return event if problem(event) is None else None


def from_log_line(line: str) -> dict[str, Any] | None:
    """The event a line of a process's output carries (after PREFIX, wherever the line has it, whatever another
    writer put after it), or None."""
    start = line.find(PREFIX)
    if start < 0:
        return None
    try:
        event, _ = _DECODER.raw_decode(line, start + len(PREFIX))
    except ValueError:
        return None
    return event if problem(event) is None else None


def read_lines(lines: Iterable[str]) -> list[dict[str, Any]]:
    """The events of a process's output (a log file, a Job's log stream), in order; other lines are skipped."""
    return [event for event in map(from_log_line, lines) if event is not None]


def read_file(path: str | Path) -> list[dict[str, Any]]:
    """The events of an events.jsonl, in order; [] when there is none. A line that is not an event of the schema
    (one cut off while it was written, one edited by hand) is skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    return [event for event in map(_parsed, text.splitlines()) if event is not None]


def curve(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The step and evaluation events of the run's curve as it stands: a `plan` event that starts training from an
    earlier step (a resume from its checkpoint, a retry after running out of memory) drops what was logged past it."""
    points: list[dict[str, Any]] = []
    for event in events:
        if event["event"] in ("step", "evaluation"):
            points.append(event)
        elif event["event"] == "plan":
            points = [point for point in points if point["step"] <= event.get("from_step", 0)]
    return points


def final_metrics(points: list[dict[str, Any]]) -> dict[str, Any]:
    """A run's summary for its run.json, from its curve: each headline number's last value, and the time its
    evaluations took."""
    final: dict[str, Any] = {key: None for key in ("loss_smoothed", "eval_loss", "loss", "step", "epoch",
                                                   "tokens_per_second")}
    for point in points:
        final.update((key, point[key]) for key in final if key in point)
    final["evaluation_seconds"] = round(sum(point.get("eval_seconds", 0.0) for point in points), 1)
    return final


class EventLog:
    """The training process's writer: each event to the run's events.jsonl (those said before the folder exists
    are written once `attach` names it), to stdout when `echo`, and to each listener (the command line's lines).
    A run says one terminal event: any after the first is not said."""

    def __init__(self, echo: bool = False, listeners: Iterable[Callable[[dict[str, Any]], None]] = ()):
        self.echo = echo
        self.listeners = list(listeners)
        self.path: Path | None = None
        self.pending: list[dict[str, Any]] = []
        self.ended = False
        self._lock = threading.Lock()

    def attach(self, folder: str | Path) -> None:
        """From now on write to `folder`'s events.jsonl, beginning with the events said so far."""
        with self._lock:
            self.path = Path(folder) / EVENTS_FILE
            self._append(self.pending)
            self.pending = []

    def emit(self, event: Any) -> dict[str, Any] | None:
        """Say `event` (an instance of one of KINDS' classes); the object written, or None for a second ending."""
        kind = KIND_OF[type(event)]
        record = {"event": kind, "time": round(time.time(), 3),
                  **{key: value for key, value in asdict(event).items() if value is not None}}
        if problem(record) is not None:
            raise TypeError(f"not an event of the schema: {problem(record)}")
        with self._lock:
            if kind in TERMINAL:
                if self.ended:
                    return None
                self.ended = True
            if self.echo:
                # One write: a line written in pieces could be split by another thread's output.
                sys.stdout.write(PREFIX + json.dumps(record, ensure_ascii=False) + "\n")
                sys.stdout.flush()
            try:
                if self.path is None:
                    self.pending.append(record)
                else:
                    self._append([record])  # an OSError (a full disk) is the caller's, once the others have heard
            finally:
                for listener in self.listeners:
                    listener(record)
        return record

    def _append(self, records: list[dict[str, Any]]) -> None:
        if not records or self.path is None:
            return
        # One short line per event, the file opened to append: a reader sees a partial line only while it is written.
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))


def append(folder: str | Path, event: Any) -> None:
    """Write one event to a run folder's events.jsonl from outside its process (its supervisor, after a kill)."""
    log = EventLog()
    log.attach(folder)
    log.emit(event)


# ---- the one rendering for people ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Headline:
    """The numbers a run is judged by: its smoothed training loss and its latest validation loss. One step's raw
    loss is never the headline: it goes up and down with its batch."""

    train_loss: float | None = None
    validation_loss: float | None = None

    def text(self, digits: int = 3) -> str:
        """e.g. "train loss 2.412 (smoothed) · validation loss 2.370"; "" before the first loss."""
        parts = []
        if self.train_loss is not None:
            parts.append(f"train loss {self.train_loss:.{digits}f} (smoothed)")
        if self.validation_loss is not None:
            parts.append(f"validation loss {self.validation_loss:.{digits}f}")
        return " · ".join(parts)


def duration(seconds: float | None) -> str:
    """A length of time as the page and the command line say it: "36m 40s", "1h 05m"; "…" when unknown."""
    if seconds is None:
        return "…"
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m {seconds % 60:02d}s"


def progress_text(point: dict[str, Any], headline: Headline, ended: bool = False) -> str:
    """Where a run is, after its step or evaluation `point`: the step, its headline, the time an evaluation took,
    the time so far and left (not once the run has `ended`), its speed and its GPU memory."""
    parts = [f"step {point['step']} of {point['max_steps']}"]
    if headline.text():
        parts.append(headline.text())
    if point.get("eval_seconds") is not None:
        parts.append(f"evaluated in {point['eval_seconds']:.1f} s")
    parts.append(f"elapsed {duration(point.get('elapsed_seconds'))}")
    if not ended:
        parts.append(f"ETA {duration(point.get('eta_seconds'))}")
    if point.get("tokens_per_second"):
        parts.append(f"{point['tokens_per_second']:,.0f} tokens/s")
    if point.get("peak_gpu_memory_gib") is not None:
        parts.append(f"GPU memory {point['peak_gpu_memory_gib']:.1f} GiB")
    return " · ".join(parts)


def headline_of(points: list[dict[str, Any]]) -> Headline:
    """The headline of a curve: the last smoothed training loss and the last validation loss."""
    train = [point["loss_smoothed"] for point in points if point["event"] == "step"]
    validation = [point["eval_loss"] for point in points if point["event"] == "evaluation"]
    return Headline(train[-1] if train else None, validation[-1] if validation else None)


def said(event: dict[str, Any]) -> str | None:
    """What an event says to a person watching the run's status (the page's status line, the command line's
    lines), or None for the events shown otherwise (steps are the plot and the progress line)."""
    kind = event["event"]
    if kind == "status":
        return event["message"]
    if kind == "stopping":
        return f"Stopping at step {event['step']}: saving a checkpoint and the adapter…"
    if kind in ("stopped", "failed"):
        return event["reason"]
    if kind == "finished":
        return "Finished."
    return None
