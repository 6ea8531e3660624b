"""Known harmless library messages, filtered once at start-up (by the app and the command line), and only those.

Each filter names the exact message, where it comes from and why it is harmless, so that everything else the
libraries say still reaches the log: a filter that matched more would hide the warning someone needs one day.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass


@dataclass(frozen=True)
class HarmlessRecord:
    """A log record to drop: logged by `logger`, its message template starting with `starts`, and (when
    given) its formatted text holding `holds`."""

    logger: str
    starts: str
    holds: str = ""


HARMLESS_RECORDS = (
    # Logged when bitsandbytes is imported on a CPU with AVX512-BF16: it looks for an optional faster 4-bit CPU
    # kernel in the `kernels` package (not installed) and falls back to its own. 4-bit loading is only ever
    # chosen on CUDA GPUs (hardware.py), and every train or chat imports bitsandbytes through peft.
    # Only the "not installed" case is dropped: a `kernels` that is installed and fails still shows.
    HarmlessRecord("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community",
                   "No module named 'kernels'"),
)

# (category, start of the message, module that warns): passed to warnings.filterwarnings as regular expressions.
HARMLESS_WARNINGS = (
    # peft and TRL read this deprecated alias of transformers' models on every train and chat; the code to
    # change is theirs, and the property still answers correctly.
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated", r"transformers\.modeling_utils"),
)


class DropHarmless(logging.Filter):
    """Drops the records of one logger that match a HarmlessRecord; lets every other record through."""

    def __init__(self, harmless: HarmlessRecord) -> None:
        super().__init__()
        self.harmless = harmless

    def filter(self, record: logging.LogRecord) -> bool:
        if not isinstance(record.msg, str) or not record.msg.startswith(self.harmless.starts):
            return True
        return self.harmless.holds not in record.getMessage()


def quiet_known_messages() -> None:
    """Install the filters: call it once at start-up, before the libraries are imported (bitsandbytes logs its
    message while it is being imported). Calling it again changes nothing."""
    for harmless in HARMLESS_RECORDS:
        # Filters sit on the logger the library logs with (created here if it is not yet): a filter on a parent
        # logger would not see the record.
        logger = logging.getLogger(harmless.logger)
        if not any(isinstance(f, DropHarmless) and f.harmless == harmless for f in logger.filters):
            logger.addFilter(DropHarmless(harmless))
    for category, message, module in HARMLESS_WARNINGS:
        # filterwarnings replaces an identical filter rather than adding a second.
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
