"""Work in a helper thread that its caller can stop waiting for: a Hub call that does not answer, a stage of a run
that a stop interrupts (loading a model, checking the data), which cannot look at a deadline or a stop themselves.

The thread is a daemon: one left running neither holds the caller nor keeps the interpreter from exiting, and what
it returns then is dropped.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def wait_for(work: Callable[[], T], name: str, seconds: float | None = None,
             give_up: Callable[[], Any] | None = None, poll_seconds: float = 0.1) -> T:
    """work()'s result (or its error, raised here), computed in a daemon thread named `name`. Past `seconds`,
    TimeoutError; `give_up`, called every `poll_seconds` while the work runs, stops the waiting by raising."""
    outcome: dict[str, Any] = {}
    done = threading.Event()

    def run() -> None:
        try:
            outcome["value"] = work()
        except BaseException as err:  # handed to the caller below
            outcome["error"] = err
        finally:
            done.set()

    threading.Thread(target=run, name=name, daemon=True).start()
    deadline = None if seconds is None else time.monotonic() + seconds
    while True:
        wait = poll_seconds if give_up is not None else None
        if deadline is not None:
            left = max(deadline - time.monotonic(), 0.0)
            wait = left if wait is None else min(wait, left)
        if done.wait(wait):
            break
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError(f"no answer after {seconds:g} s")
        if give_up is not None:
            give_up()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def still_running(name: str) -> bool:
    """Whether a thread of that name, given up on by `wait_for`, is still running."""
    return any(thread.name == name and thread.is_alive() for thread in threading.enumerate())
