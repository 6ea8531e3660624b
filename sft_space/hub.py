"""What the Hub is to us: the shape of its repository ids, whether it is there at all, and how large a model is
by its metadata (before anything of it is downloaded).

Is the Hub there? One quick question, asked before a slow download starts.

Offline, huggingface_hub retries each request five times with back-off (about 23 s), and loading one model asks
several times: a visitor waited 48 s for "could not reach the Hub" (a dataset: 24 s). One request without retries
answers in milliseconds when the network is down; a model already in the cache is then loaded from it, and
anything else is refused at once.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelLoadError

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
    _sizes.clear()


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


def is_hub_name(text: str | None) -> bool:
    """Whether `text` names a Hub repository rather than a file or folder here: an owner/name id (`is_repo_id`)
    whose first part is no path on this machine. Loaders look for a local folder of that name first, so a relative
    path shaped like owner/name (runs/<id>) is never taken for an id; and the test is on the first part, whose names
    in the app's folder are public (its files, runs), so that a refusal says nothing about what exists below it."""
    return is_repo_id(text) and not Path(str(text).partition("/")[0]).expanduser().exists()


# The network errors of the HTTP clients under huggingface_hub and datasets (httpx2, httpx, requests, aiohttp), by
# name: not all of them are ConnectionErrors or TimeoutErrors, and which library raises depends on the versions
# installed.
TIMEOUT_ERRORS = {"ConnectTimeout", "ReadTimeout", "WriteTimeout", "PoolTimeout", "TimeoutException"}
NETWORK_ERRORS = {"ConnectError", "NetworkError", "ReadError", "RemoteProtocolError", "ConnectionError",
                  "ClientConnectorError", "ServerDisconnectedError", "gaierror"}


def _network_kind(err: BaseException) -> str | None:
    """"offline", "timeout" or "network" when this one error (not its causes) says the Hub was not reached."""
    import httpx
    import httpx2

    names = {cls.__name__ for cls in type(err).__mro__}
    if "OfflineModeIsEnabled" in names:
        return "offline"
    # Before the network errors: httpx's timeouts are transport errors too.
    if isinstance(err, (httpx2.TimeoutException, httpx.TimeoutException, TimeoutError)) or names & TIMEOUT_ERRORS:
        return "timeout"
    if isinstance(err, (httpx2.TransportError, httpx.TransportError, ConnectionError)) or names & NETWORK_ERRORS:
        return "network"
    return None


def _chain(err: BaseException | None) -> list[BaseException]:
    """The error and those it was raised from, in order, each once."""
    chain: list[BaseException] = []
    while err is not None and err not in chain:
        chain.append(err)
        err = err.__cause__ or err.__context__
    return chain


def failure_kind(err: BaseException) -> tuple[str, int | None]:
    """What went wrong in a call to the Hub, looked for along the error's chain: ("offline" | "timeout" |
    "network" | "http" | "other", the HTTP status or None). huggingface_hub 2.x raises httpx2's errors as they are
    besides its own (OfflineModeIsEnabled, HfHubHTTPError and its kinds); datasets may raise others' (see
    NETWORK_ERRORS)."""
    for link in _chain(err):
        kind = _network_kind(link)
        if kind is not None:
            return kind, None
        status = getattr(getattr(link, "response", None), "status_code", None)
        if isinstance(status, int):
            return "http", status
    return "other", None


def unreachable(err: BaseException) -> bool:
    """Whether an error (or one it was raised from) means the network or the Hub did not answer: a network error,
    or one that says the libraries are offline."""
    return any(_network_kind(link) is not None or "offline" in str(link).lower() for link in _chain(err))


# A model's size is asked once per this long: every event of a page names its model again.
SIZE_KEPT_SECONDS = 600.0
_sizes: dict[str, tuple[float, ModelSize]] = {}


@dataclass(frozen=True)
class ModelSize:
    """A Hub model's size as its metadata gives it: the parameter count the Hub read from its safetensors headers,
    and the bytes of its .safetensors files (either may be missing)."""

    parameters: int | None
    weight_bytes: int | None


def model_size(model_id: str, timeout: float = PROBE_TIMEOUT) -> ModelSize:
    """The size of a Hub model from its metadata (`HfApi.model_info`); nothing of the model is downloaded. A model
    that is not there (or private) is a ModelLoadError; so is a Hub that does not answer in `timeout`."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    kept = _sizes.get(model_id)
    if kept is not None and time.monotonic() - kept[0] < SIZE_KEPT_SECONDS:
        return kept[1]
    try:
        info = HfApi().model_info(model_id, timeout=timeout, files_metadata=True)
    except GatedRepoError:  # a kind of RepositoryNotFoundError: asked first
        raise ModelLoadError(f"Model {model_id!r} is gated: accept its licence on https://huggingface.co/{model_id} "
                             "and log in (or set HF_TOKEN) with an account that has access.") from None
    except RepositoryNotFoundError:
        raise ModelLoadError(f"Model {model_id!r} was not found on the Hugging Face Hub; check the spelling of the "
                             "id.") from None
    except Exception as err:  # httpx/httpx2 connection and timeout errors, HTTP errors of the Hub
        said = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise ModelLoadError(f"Could not read the size of {model_id!r} from the Hugging Face Hub ({said}); try "
                             "again in a moment.") from None
    parameters = info.safetensors.total if info.safetensors is not None else None
    weight_bytes = sum(sibling.size or 0 for sibling in info.siblings or ()
                       if sibling.rfilename.endswith(".safetensors")) or None
    size = ModelSize(parameters, weight_bytes)
    _sizes[model_id] = (time.monotonic(), size)
    return size
