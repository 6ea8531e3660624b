"""Is the Hugging Face Hub there? One quick question, asked before a slow download starts.

Offline, huggingface_hub retries each request five times with back-off (about 23 s), and loading one model asks
several times: a visitor waited 48 s for "could not reach the Hub" (a dataset: 24 s). One request without retries
answers in milliseconds when the network is down; a model already in the cache is then loaded from it, and
anything else is refused at once.
"""

from __future__ import annotations

import time

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
