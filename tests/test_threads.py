"""Work a caller stops waiting for: by a deadline (a Hub call) or a stop (a stage of a run), in one helper."""

import threading
import time

import pytest

from sft_space import threads


def test_the_result_the_error_a_deadline_and_a_stop():
    assert threads.wait_for(lambda: "done", "t-result") == "done"
    with pytest.raises(ZeroDivisionError):
        threads.wait_for(lambda: 1 / 0, "t-error", seconds=5)
    release = threading.Event()
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="no answer after 0.2 s"):
        threads.wait_for(lambda: release.wait(30), "t-deadline", seconds=0.2)
    assert time.monotonic() - started < 5
    assert threads.still_running("t-deadline")  # left to finish alone

    stop = threading.Event()

    def give_up():
        if stop.is_set():
            raise InterruptedError("stopped")

    threading.Timer(0.2, stop.set).start()
    with pytest.raises(InterruptedError):
        threads.wait_for(lambda: release.wait(30), "t-stop", give_up=give_up, poll_seconds=0.05)
    release.set()
    time.sleep(0.1)
    assert not threads.still_running("t-deadline") and not threads.still_running("t-stop")
