"""A training process started before it is needed: `python -m sft_space.standby`.

Loading torch, transformers, PEFT, TRL and datasets takes about 5 s on two CPU cores, longer than everything else
between Start and a run's first step on the embedded default (checking the sample, loading the model). So the app
keeps one such process waiting with its libraries loaded (`child.Supervisor(warm=True)`). Start hands it one JSON
line on its standard input, the command line's arguments and the file its output goes to, and from then on it is
exactly the process `python -m sft_space train …` would have been: same signals, same exit status. An input that
closes first (the app went away) ends it.
"""

from __future__ import annotations

import json
import os
import sys

# What a run imports on its way to the first step; loaded while nobody waits.
PRELOADED = ("torch", "transformers", "peft", "trl", "datasets", "sft_space.train")


def preload() -> None:
    import importlib

    for name in PRELOADED:
        importlib.import_module(name)
    # transformers loads these lazily, on first use; a run always uses them.
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer  # noqa: F401
    from trl import SFTConfig, SFTTrainer  # noqa: F401


def take_order(line: str) -> list[str]:
    """Send this process's output to the run's log file, and return the command line's arguments."""
    order = json.loads(line)
    log = os.open(order["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    arguments = [str(a) for a in order["arguments"]]
    sys.argv = [sys.argv[0], *arguments]
    return arguments


def main() -> int:
    from . import startup

    startup.begin()  # before the libraries load, as `python -m sft_space` does
    preload()
    line = sys.stdin.readline()
    if not line.strip():
        return 0
    arguments = take_order(line)
    from .cli import main as command_line

    return startup.end(command_line(arguments))


if __name__ == "__main__":
    raise SystemExit(main())
