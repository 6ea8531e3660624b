"""What the Hub is to us: the shape of its repository ids, and whether it is there at all.

Is the Hub there? One quick question, asked before a slow download starts.

Offline, huggingface_hub retries each request five times with back-off (about 23 s), and loading one model asks
several times: a visitor waited 48 s for "could not reach the Hub" (a dataset: 24 s). One request without retries
answers in milliseconds when the network is down; a model already in the cache is then loaded from it, and
anything else is refused at once.
"""

from __future__ import annotations

import re
import time

# owner/name: a model, dataset or Space we name always has both parts (huggingface_hub's rules allow a bare name).
_OWNER_AND_NAME = re.compile(r"^[^/\s]+/[^/\s]+$")
PROBE_TIMEOUT = 5.0
# An answer is trusted this long: a page that checks data, then trains, asks once.
ANSWER_KEPT_SECONDS = 60.0

_last_answer: tuple[float, bool] | None = None


def reachable(timeout: float = PROBE_TIMEOUT) -> bool:
    """Whether the Hub answers at all (any HTTP status counts: only a network failure or HF_HUB_OFFLINE does not)."""
    global _last_answer
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE:
        return False
    if _last_answer is not None and time.monotonic() - _last_answer[0] < ANSWER_KEPT_SECONDS:
        return _last_answer[1]
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
        answer = True
    except Exception:  # httpx/httpx2 connection and timeout errors, whatever the library version raises
        answer = False
    _last_answer = (time.monotonic(), answer)
    return answer


def forget() -> None:
    """Ask again next time (tests, or after the network came back)."""
    global _last_answer
    _last_answer = None


def is_repo_id(text: str | None) -> bool:
    """Whether `text` is a Hub repository id of the form owner/name, by huggingface_hub's own rules (letters,
    digits, '-', '_' and '.'; at most 96 characters a part; no '--' or '..'; not ending in '.git')."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not text or not _OWNER_AND_NAME.match(text):
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True
