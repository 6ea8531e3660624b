"""How this package's processes start, and how a command line's ends (`python -m sft_space`, the app's training
process started ahead in standby.py, and the app itself): the known library messages filtered, and the cyclic
garbage collector tuned for a process that loads torch, transformers and TRL.

Those libraries are millions of objects that live as long as the process. With Python's default thresholds the
collector walks them again and again while they import (its oldest generation is collected each time the heap has
grown by a quarter), and once more at exit: about 3 s of CPU of every such process here (`from trl import
SFTTrainer`: 7.7 s of CPU with the defaults, 4.8 s with these; docs/BENCHMARKS.md), freeing nothing. With larger
thresholds the collector still runs, in larger batches: cyclic garbage is still freed while a run trains, a little
later. The app (app.py) starts the same way, then freezes what it loaded and built and goes back to Python's
defaults to serve: its visitors' garbage is collected as usual, and never walks the libraries again.
"""

from __future__ import annotations

import gc

from .quiet import quiet_known_messages

# Objects allocated between young collections, and young (then middle) collections between older ones: Python's
# defaults are (700, 10, 10).
COLLECTOR_THRESHOLDS = (50_000, 20, 20)
PYTHON_THRESHOLDS = (700, 10, 10)


def begin() -> None:
    """Before the libraries load: their known harmless messages filtered (bitsandbytes logs while it is imported),
    and the collector's thresholds raised."""
    quiet_known_messages()
    gc.set_threshold(*COLLECTOR_THRESHOLDS)


def end(code: int) -> int:
    """At exit, `code` passed through: the young garbage the command left is collected (its files flushed, its
    finalizers run), and the rest, alive to the end, is frozen, so that the interpreter's shutdown does not walk the
    libraries' objects again (a full collection here would cost as much)."""
    gc.collect(1)
    gc.freeze()
    return code


def serving() -> None:
    """Once a long-lived process (the app) has loaded its libraries and built what it serves: all of that frozen out
    of the collector's passes, and Python's thresholds again for the garbage of serving."""
    gc.freeze()
    gc.set_threshold(*PYTHON_THRESHOLDS)
