"""Run a function in a worker process with a memory limit and a deadline, so that what strangers send (their data,
a chat template or tokenizer they name) cannot take the web server's memory or time.

The worker is forked from the app: it starts at once, with the libraries (and any tokenizer the app has loaded)
already in memory. In the worker the address space may grow by `worker_memory_gb` beyond what it was at the fork
(RLIMIT_AS: an allocation past it fails there, as MemoryError or a crash, not in the app); the app kills the worker
at its deadline. It runs at a lower CPU priority than the app and training. What the function yields comes back through a pipe, one item at a time, as it is made. At most
`workers` of them run at once for the whole app, so that two hostile checks cannot add their limits up beyond that.
A failure is a UserError for the visitor who asked, with what to do; the app and every other visitor go on.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import pickle
import resource
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from .errors import UserError
from .settings import AccessSettings

T = TypeVar("T")
log = logging.getLogger(__name__)
GB = 1024**3
# A worker's answers through the pipe: an item it yielded, its progress, the end, or how it failed.
_ITEM, _PROGRESS, _DONE, _REFUSED, _OUT_OF_MEMORY, _FAILED = "item", "progress", "done", "refused", "memory", "failed"
# How a worker out of memory can die instead of raising MemoryError: native code (the tokenizers' Rust, numpy)
# aborts when an allocation fails, and the kernel's OOM killer sends SIGKILL.
_MEMORY_DEATHS = (signal.SIGABRT, signal.SIGSEGV, signal.SIGBUS, signal.SIGKILL)
WORKER_NICENESS = 10
ALARM_GRACE_SECONDS = 1


@dataclass(frozen=True)
class Limits:
    """What one worker may spend, and how many run at once: the operator's AccessSettings, as `of` reads them."""

    memory_gb: float
    seconds: float
    at_once: int
    wait_seconds: float

    @classmethod
    def of(cls, settings: AccessSettings | None = None) -> Limits:
        """The limits `settings` set (worker_memory_gb, worker_seconds, workers, worker_wait_seconds); the
        defaults without."""
        settings = settings or AccessSettings()
        return cls(settings.worker_memory_gb, settings.worker_seconds, settings.workers, settings.worker_wait_seconds)


@dataclass(frozen=True)
class Task:
    """What a worker does, as the visitor reads it in a refusal: `what` ("This check") and `advice` (what to do
    when it needed too much)."""

    what: str
    advice: str


class _Running:
    """How many workers run now, app-wide; each call says the most it accepts (the operator's `workers`)."""

    def __init__(self) -> None:
        self._count = 0
        self._changed = threading.Condition()

    def enter(self, limits: Limits) -> bool:
        with self._changed:
            if not self._changed.wait_for(lambda: self._count < limits.at_once, timeout=limits.wait_seconds):
                return False
            self._count += 1
            return True

    def leave(self) -> None:
        with self._changed:
            self._count -= 1
            self._changed.notify()

    @property
    def count(self) -> int:
        return self._count


running = _Running()


def _address_space() -> int:
    """This process's virtual size in bytes (what RLIMIT_AS counts)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def _limit_memory(extra_bytes: int) -> None:
    """Let this process's address space grow by `extra_bytes` from now on, and no further. The base is what the
    fork gave it (the app's libraries and models, shared, not copied), so the limit is on what the work adds."""
    try:
        base = _address_space()
    except OSError:
        return  # no /proc (not Linux): the deadline still holds
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    wanted = base + extra_bytes
    resource.setrlimit(resource.RLIMIT_AS, (wanted if hard == resource.RLIM_INFINITY else min(wanted, hard), hard))


def _work_in_child(work: Callable[[Callable[..., None] | None], Iterable[Any]], writer: Any, limits: Limits,
                   relay_progress: bool) -> None:
    # The app's handlers (the web server's graceful shutdown) are not the worker's: Ctrl+C or a stop ends it at once.
    for stop in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM):
        signal.signal(stop, signal.SIG_DFL)
    # The app stops the worker at its deadline while it reads the worker's answers; a worker nobody reads any more
    # (its page gone, its iterator never closed) is ended by the kernel soon after.
    signal.alarm(math.ceil(limits.seconds) + ALARM_GRACE_SECONDS)
    # Behind the web server and training for the CPU: a slow check should not make pages or runs slow.
    os.nice(WORKER_NICENESS)
    # Made before the limit: when memory has run out, the news must not need any.
    out_of_memory = pickle.dumps((_OUT_OF_MEMORY, None))
    _limit_memory(int(limits.memory_gb * GB))

    def progress(*values: Any) -> None:
        writer.send((_PROGRESS, values))

    try:
        for item in work(progress if relay_progress else None):
            writer.send((_ITEM, item))
        writer.send((_DONE, None))
    except MemoryError:
        writer.send_bytes(out_of_memory)
    except UserError as err:
        writer.send((_REFUSED, err.message))  # a Message, whose settings the app names in its own words
    except BaseException as err:  # told to the app as text: the worker's objects end with it
        log.exception("a worker process failed")
        writer.send((_FAILED, f"{type(err).__name__}: {err}"))
    writer.close()


def _out_of_memory(task: Task, limits: Limits) -> UserError:
    return UserError(f"{task.what} needed more than {limits.memory_gb:g} GB of memory, the most one may take on "
                     f"this shared server, and was stopped; {task.advice}")


def _failure(task: Task, limits: Limits, exitcode: int | None) -> UserError:
    if exitcode is not None and -exitcode in _MEMORY_DEATHS:
        return UserError(f"{task.what} crashed, most likely for want of memory: it may take {limits.memory_gb:g} GB "
                         f"on this shared server; {task.advice}")
    return UserError(f"{task.what} stopped unexpectedly (exit code {exitcode}); try again, and if it happens again, "
                     f"{task.advice}")


def stream_in_worker(work: Callable[[Callable[..., None] | None], Iterable[T]], task: Task, limits: Limits,
                     on_progress: Callable[..., None] | None = None) -> Iterator[T]:
    """The items `work(progress)` yields, made in a worker process under `limits`, each as soon as it is made.

    `work` runs in the worker: it may use anything the app has in memory (it is not pickled; what it yields is).
    `progress(*values)` there calls `on_progress(*values)` here (None when no `on_progress` is given). The deadline
    counts from the start, the time a consumer spends between items included. Closing the iterator early stops
    the worker; one whose iterator is left unclosed (a page gone) ends at its deadline by itself, and its place is
    free again. When `limits.at_once` workers run already, this waits up to `limits.wait_seconds` for one to end.
    """
    if not running.enter(limits):
        raise UserError(f"The server is already running {limits.at_once} checks or previews for visitors, the most it "
                        "runs at once; try again in a minute.")
    context = multiprocessing.get_context("fork")
    try:
        reader, writer = context.Pipe(duplex=False)
        worker = context.Process(target=_work_in_child, args=(work, writer, limits, on_progress is not None),
                                 daemon=True)
        worker.start()
    except BaseException:
        running.leave()
        raise
    # The place is given back when the worker ends, however it ends: a thread waits for that.
    ended = threading.Event()
    threading.Thread(target=_give_back_place, args=(worker, ended), daemon=True, name="worker-ended").start()
    # The worker holds the writing end now, so its death reads as the end of the pipe (or as the deadline, if another
    # worker forked meanwhile holds a copy too).
    writer.close()
    try:
        deadline = time.monotonic() + limits.seconds
        while True:
            if not reader.poll(max(0.0, deadline - time.monotonic())):
                raise UserError(f"{task.what} took longer than {limits.seconds:g} s, the most one may take on this "
                                f"shared server, and was stopped; {task.advice}")
            try:
                kind, value = reader.recv()
            except EOFError:
                ended.wait()
                raise _failure(task, limits, worker.exitcode) from None
            if kind == _ITEM:
                yield value
            elif kind == _PROGRESS:
                on_progress(*value)
            elif kind == _DONE:
                return
            elif kind == _OUT_OF_MEMORY:
                raise _out_of_memory(task, limits)
            elif kind == _REFUSED:
                raise UserError(value)
            else:
                raise UserError(f"{task.what} failed: {value}")
    finally:
        reader.close()
        if not ended.is_set():
            worker.kill()
        ended.wait()


def _give_back_place(worker: Any, ended: threading.Event) -> None:
    worker.join()
    running.leave()
    ended.set()


def run_in_worker(work: Callable[[], T], task: Task, limits: Limits) -> T:
    """What `work()` returns, computed in a worker process under `limits` (see `stream_in_worker`)."""
    items = stream_in_worker(lambda progress: [work()], task, limits)
    try:
        return next(items)
    finally:
        items.close()
