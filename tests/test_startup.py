"""How a command-line process starts and ends: the collector tuned for loading large libraries, and at exit the
garbage collected and the rest frozen."""

import gc
import subprocess
import sys
from pathlib import Path

from sft_space import startup

ROOT = Path(startup.__file__).resolve().parent.parent
# What a process of the command line reports of its collector: its thresholds while the command runs, and what
# is frozen once it ends.
PROBE = """
import atexit, gc, sys
sys.argv = ["sft_space", "validate", "no-such-file.jsonl"]
atexit.register(lambda: print("thresholds", gc.get_threshold(), "frozen", gc.get_freeze_count() > 0, flush=True))
import runpy
runpy.run_module("sft_space", run_name="__main__")
"""


def test_a_command_line_process_collects_in_larger_batches_and_freezes_what_it_leaves_at_exit():
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "no such file" in done.stderr, done.stderr
    assert done.stdout.strip().splitlines()[-1] == f"thresholds {startup.COLLECTOR_THRESHOLDS} frozen True"


def test_the_end_collects_the_commands_garbage_before_freezing_the_rest():
    class Cycle:
        finalized = False

        def __del__(self):
            Cycle.finalized = True

    cycle = Cycle()
    cycle.itself = cycle
    del cycle
    gc.disable()  # so that only `end` can collect it
    try:
        assert startup.end(3) == 3
        assert Cycle.finalized, "garbage left at exit is collected (its finalizers run), not frozen"
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.enable()


def test_the_app_loads_as_a_command_line_does_then_serves_with_pythons_thresholds(monkeypatch):
    """app.py: the collector set for loading before the libraries load; once the app is built, what it loaded and
    built frozen, and Python's thresholds back for the garbage of serving its visitors."""
    import app
    from sft_space import ui

    said = []
    monkeypatch.setattr(startup, "quiet_known_messages", lambda: said.append("quiet"))
    monkeypatch.setattr(startup.gc, "set_threshold", lambda *thresholds: said.append(thresholds))
    monkeypatch.setattr(startup.gc, "freeze", lambda: said.append("freeze"))
    monkeypatch.setattr(app.storage, "use_persistent_storage", lambda: said.append("storage"))
    monkeypatch.setattr(ui, "build_app", lambda: said.append("build") or "the app")
    monkeypatch.setattr(ui, "launch", lambda built: said.append(f"launch {built}"))
    app.main()
    assert said == ["quiet", startup.COLLECTOR_THRESHOLDS, "storage", "build", "freeze", startup.PYTHON_THRESHOLDS,
                    "launch the app"]
