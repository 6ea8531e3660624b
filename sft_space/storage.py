"""Where the app keeps what should outlive it: on a Space, its disk is wiped at every restart, except the
persistent storage its owner may add, which Spaces mount at /data.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from pathlib import Path

from .access import running_on_space
from .settings import environment_variable

PERSISTENT_MOUNT = Path("/data")
EPHEMERAL_RUNS_NOTE = (
    "⚠️ This Space has no persistent storage: runs are kept on its own disk, which is wiped when the Space "
    "restarts (a rebuild, a change of settings, or a sleep after some idle time), and the runs vanish with it. "
    "Publish a run you want to keep (**Publish** tab: to the Hub, or download the adapter as a zip). The Space's "
    "owner can add persistent storage in the Space's settings; runs are then kept on it."
)


def persistent_storage(mount: Path | None = None) -> Path | None:
    """The Space's persistent storage (`mount`, default /data), when this is a Space that has it."""
    mount = mount or PERSISTENT_MOUNT
    if running_on_space() and mount.is_dir() and os.access(mount, os.W_OK):
        return mount
    return None


def use_persistent_storage(environ: MutableMapping[str, str] | None = None, mount: Path | None = None) -> Path | None:
    """On a Space with persistent storage, keep the runs and the model caches there: SFT_SPACE_RUNS, HF_HOME
    and SFT_SPACE_CACHE default to folders in it (an operator's own setting wins). Returns the storage, or None.

    Call it before huggingface_hub is imported: it reads HF_HOME once, when imported.
    """
    environ = os.environ if environ is None else environ
    root = persistent_storage(mount)
    if root is not None:
        environ.setdefault(environment_variable("runs"), str(root / "runs"))
        environ.setdefault("HF_HOME", str(root / ".huggingface"))
        environ.setdefault(environment_variable("cache"), str(root / ".cache" / "sft_space"))
    return root


def runs_note(runs_dir: str | Path, mount: Path | None = None) -> str:
    """What the Train tab says about keeping runs: on a Space whose runs folder is not on persistent storage,
    that they vanish at the next restart and how to keep one; elsewhere nothing."""
    if not running_on_space():
        return ""
    root = persistent_storage(mount)
    if root is not None and Path(runs_dir).resolve().is_relative_to(root.resolve()):
        return ""
    return EPHEMERAL_RUNS_NOTE
