"""Trust, decided at the edge: who a visitor of the app is, and what they may name.

A public Space is one server shared by strangers, and every value a page sends can be forged by any HTTP client.
This module is the one place that turns those values into checked ones, so the core never receives a raw path
from the page:

- identity: a visitor id signed by the server and kept in the browser (`v1.<id>.<signature>`); on a Space with
  sign-in, the Hugging Face user name. Knowing someone's id (it is written in their runs' records) is not enough
  to act as them: only this server can sign one.
- data: the visitor's own uploads (moved out of Gradio's shared upload folder into a folder of their own, and
  referred to by the handle their upload returned), Hub dataset ids, and the bundled sample;
- models: the models the app offers, the operator's default, and Hub ids;
- local paths (any file or folder on the machine): only from the command line, or in the app when the operator
  turns local access on for single-user use (`SFT_SPACE_LOCAL_PATHS=1`; never on a Space);
- who may train and publish (`SFT_SPACE_WHO_MAY_TRAIN`): the Space's owner, any signed-in visitor, or anyone,
  decided from the setting, the Space's environment and the Hugging Face profile Gradio reads from its own
  session cookie, never from a value the page sends.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import ipaddress
import logging
import math
import os
import re
import secrets
import shutil
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from . import hub, runs
from .errors import UserError
from .settings import AUTO, AccessSettings, OperatorSettings, environment_variable, from_environment

log = logging.getLogger(__name__)

SECRET_FILE = ".visitor-secret"
UPLOADS_DIR = ".uploads"
TOKEN_VERSION = "v1"
SIGNED_IN = "hf:"
# A chat is answered on the shared hardware: its whole conversation (both sides, the system prompt and the new
# message) is bounded so that no page can make one reply take minutes of everyone's time or gigabytes of memory.
MAX_CHAT_CHARACTERS = 32_000
# DataSettings' limits that bound the work one check or run makes the shared server do: the operator's to set.
OPERATOR_DATA_LIMITS = ("max_rows", "max_file_mb")
SESSION_UNKNOWN = "This page's visitor id is not one this server issued; reload the page to get a new one."
# Our tokens are "v1." + a signed-in user name or 32 hex digits + "." + 32 hex digits: far shorter than this.
MAX_TOKEN_CHARACTERS = 256


def running_on_space() -> bool:
    """Spaces set SPACE_ID (and SPACE_AUTHOR_NAME) in every Space's environment."""
    return bool(os.environ.get("SPACE_ID"))


def access_settings() -> OperatorSettings:
    """The operator's settings, from SFT_SPACE_<FIELD> environment variables (never from the page)."""
    settings = from_environment()
    if settings.local_paths and running_on_space():
        # On a Space the visitors are strangers: the operator's wish cannot open the machine's files to them.
        log.warning("%s is ignored on a Space: visitors there are strangers.", environment_variable("local_paths"))
        settings.local_paths = False
    return settings


def data_limits() -> dict[str, Any]:
    """The operator's limits on what the app reads (SFT_SPACE_MAX_ROWS, SFT_SPACE_MAX_FILE_MB), as DataSettings
    values. A visitor cannot raise them: they protect a server shared by strangers."""
    settings = from_environment()
    return {name: getattr(settings, name) for name in OPERATOR_DATA_LIMITS}


def max_upload_bytes() -> int:
    """The largest upload the app accepts: the operator's max_file_mb in bytes, as data.py counts a megabyte
    (2**20 bytes), rounded up, so that Gradio never refuses a file the data checks would read."""
    return math.ceil(data_limits()["max_file_mb"] * 2**20)


# --------------------------------------------------------------------------------------------- identity


def _server_secret(runs_dir: str | Path) -> bytes:
    """SFT_SPACE_SECRET, else a random secret kept beside the runs (so ids survive a restart, as runs do)."""
    configured = from_environment().secret
    if configured:
        return configured.encode()
    path = Path(runs_dir) / SECRET_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(descriptor, "w") as handle:
            handle.write(secrets.token_hex(32))
    secret = path.read_text().strip()
    if len(secret) < 32:
        raise UserError(f"{path} holds no usable secret; delete it and restart the app to make a new one.")
    return secret.encode()


class Identity:
    """Issues and checks the signed visitor ids that browsers keep."""

    def __init__(self, secret: bytes):
        self._secret = secret

    @classmethod
    def for_runs(cls, runs_dir: str | Path) -> Identity:
        return cls(_server_secret(runs_dir))

    def _signature(self, visitor: str) -> str:
        return hmac.new(self._secret, visitor.encode(), hashlib.sha256).hexdigest()[:32]

    def sign(self, visitor: str) -> str:
        return f"{TOKEN_VERSION}.{visitor}.{self._signature(visitor)}"

    def visitor(self, token: Any) -> str:
        """The visitor id inside a token the page sent; a token this server did not sign is refused. A page can
        send any JSON value here: anything but a short ASCII string of our shape gets the same refusal."""
        if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARACTERS or not token.isascii():
            raise UserError(SESSION_UNKNOWN)
        version, _, rest = token.partition(".")
        visitor, _, signature = rest.rpartition(".")
        if version != TOKEN_VERSION or not visitor or not hmac.compare_digest(signature, self._signature(visitor)):
            raise UserError(SESSION_UNKNOWN)
        return visitor

    def issue(self, token: Any, username: str | None = None) -> str:
        """The token a page should keep: the signed-in user's, else its own if valid, else a new anonymous one."""
        try:
            current = self.visitor(token)
        except UserError:
            current = None
        if username:
            wanted = SIGNED_IN + username
            return token if current == wanted else self.sign(wanted)
        if current and not current.startswith(SIGNED_IN):
            return token
        # Signed out (or never signed): a fresh anonymous id, never the previous user's.
        return self.sign(secrets.token_hex(16))


# ------------------------------------------------------------------------------------- what one client spends

HOUR = 3600.0
# Keys a RateLimit remembers at most: each costs a few hundred bytes, and addresses are cheap to come by.
MAX_CLIENTS_REMEMBERED = 100_000


def forwarded_hops(settings: AccessSettings, environ: Mapping[str, str]) -> int:
    """How many entries of X-Forwarded-For, from the right, proxies we trust wrote (settings.forwarded_hops with
    -1 resolved): on a Space its proxy connects from an address of its own and appends the visitor's."""
    if settings.forwarded_hops >= 0:
        return settings.forwarded_hops
    return 1 if environ.get("SPACE_ID") else 0


def client_address(peer: str | None, forwarded_for: Iterable[str], hops: int) -> str:
    """The address a request comes from, as the limits count it: the entry `hops` from the right of the
    X-Forwarded-For headers (what our proxies saw connect), else the connection's own peer. Entries further left
    are written by the client and never trusted. An IPv6 address counts as its /64 network, which one client
    usually holds whole."""
    entries = [entry.strip() for header in forwarded_for for entry in header.split(",") if entry.strip()]
    address = (entries[-hops] if len(entries) >= hops else entries[0]) if hops and entries else (peer or "")
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return address[:64] or "unknown"
    if parsed.version == 4:
        return str(parsed)
    if parsed.ipv4_mapped is not None:
        return str(parsed.ipv4_mapped)
    return str(ipaddress.ip_network(f"{parsed}/64", strict=False))


def request_address(request: Any, hops: int) -> str:
    """client_address of a gr.Request or a Starlette/FastAPI request (None: a call from inside the process)."""
    if request is None:
        return "local"
    peer = getattr(getattr(request, "client", None), "host", None)
    headers = getattr(request, "headers", None) or {}
    values = headers.getlist("x-forwarded-for") if hasattr(headers, "getlist") else \
        [headers.get("x-forwarded-for") or ""]
    return client_address(peer, values, hops)


class RateLimit:
    """At most `limit` units (ids, uploads, bytes) per `window` seconds for each client, in a sliding window."""

    def __init__(self, limit: float, what: str, window: float = HOUR, clock=time.monotonic):
        self.limit, self.what, self.window, self._clock = limit, what, window, clock
        self._spent: dict[str, deque[tuple[float, float]]] = {}
        self._lock = threading.Lock()

    def _recent(self, client: str, now: float) -> deque[tuple[float, float]]:
        spent = self._spent.setdefault(client, deque())
        while spent and spent[0][0] <= now - self.window:
            spent.popleft()
        return spent

    def take(self, client: str, amount: float = 1) -> None:
        """Count `amount` for `client`, or refuse (UserError, saying when to come back) when it would go over."""
        with self._lock:
            now = self._clock()
            if len(self._spent) >= MAX_CLIENTS_REMEMBERED:
                self._forget_idle(now)
            spent = self._recent(client, now)
            used = sum(units for _, units in spent)
            if used + amount > self.limit:
                wait = self.window - (now - spent[0][0]) if spent else self.window
                raise UserError(f"Too many {self.what} from your address ({self._amount(used)} in the last "
                                f"{self._amount(self.window / 60)} minutes, the most this shared app allows); "
                                f"try again in {max(1, math.ceil(wait / 60))} minutes.")
            spent.append((now, amount))

    def remaining(self, client: str) -> float:
        with self._lock:
            return self.limit - sum(units for _, units in self._recent(client, self._clock()))

    def _forget_idle(self, now: float) -> None:
        for client in [c for c, spent in self._spent.items() if not spent or spent[-1][0] <= now - self.window]:
            del self._spent[client]
        while len(self._spent) >= MAX_CLIENTS_REMEMBERED:  # all busy: the oldest entry goes
            del self._spent[next(iter(self._spent))]

    @staticmethod
    def _amount(value: float) -> str:
        return f"{value:,.0f}" if value >= 10 else f"{value:,.3g}"


@dataclasses.dataclass
class ClientLimits:
    """The per-client rates of the app, from the operator's settings (one object per app)."""

    ids: RateLimit
    uploads: RateLimit
    upload_bytes: RateLimit

    @classmethod
    def from_settings(cls, settings: AccessSettings) -> ClientLimits:
        return cls(RateLimit(settings.ids_per_client_hour, "new visitor ids"),
                   RateLimit(settings.uploads_per_client_hour, "uploads"),
                   RateLimit(settings.upload_mb_per_client_hour * 2**20, "bytes uploaded"))


# ------------------------------------------------------------------------------------------------ data


def _visitor_folder(runs_dir: str | Path, visitor: str) -> Path:
    # A digest, not the id, names the folder: paths are shown on the page and the id must not be.
    return Path(runs_dir) / UPLOADS_DIR / hashlib.sha256(visitor.encode()).hexdigest()[:24]


def _safe_name(name: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(name).name).strip("-.") or "data"
    return stem[-100:]


def keep_upload(runs_dir: str | Path, visitor: str, uploaded: str | Path, settings: AccessSettings) -> Path:
    """Move a file the visitor just uploaded out of Gradio's shared upload folder into their own, and return the
    handle (its new path) the page keeps in server-side state. Uploads past their age go first; then, to make
    room, the oldest of anyone's beyond `upload_mb_total`, and the visitor's own beyond their quota (never one an
    unfinished run needs). A file that still does not fit is refused and deleted."""
    source = Path(uploaded)
    size = source.stat().st_size
    limit = int(settings.upload_mb_per_visitor * 2**20)
    if size > limit:
        source.unlink(missing_ok=True)
        raise UserError(f"{source.name}: {size / 2**20:,.1f} MB, over the {settings.upload_mb_per_visitor:,g} MB "
                        "this app keeps per visitor; upload a smaller sample.")
    in_use = uploads_in_use(runs_dir)
    sweep_uploads(runs_dir, settings, in_use)
    if not _make_room(runs_dir, size, settings, in_use):
        source.unlink(missing_ok=True)
        raise UserError(f"{source.name}: this app keeps {settings.upload_mb_total:,g} MB of uploads for all its "
                        "visitors, and that is full of data that runs in progress need; try again when they end.")
    target = _visitor_folder(runs_dir, visitor) / f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}"
    target.mkdir(parents=True)
    kept = target / _safe_name(source.name)
    shutil.move(str(source), kept)
    _prune_uploads(runs_dir, visitor, settings, keep=kept, in_use=in_use)
    return kept


def uploads_in_use(runs_dir: str | Path) -> set[str]:
    """The uploads an unfinished run may read again (a resume reads its data anew), as their paths."""
    sources = {str(record.get("settings", {}).get("source")) for _, record in runs.list_runs(runs_dir)
               if record.get("status") != runs.FINISHED}
    return sources | {str(Path(source).resolve()) for source in sources}


def _needed(path: Path, in_use: set[str]) -> bool:
    return str(path) in in_use or str(path.resolve()) in in_use


def _all_uploads(runs_dir: str | Path) -> list[tuple[float, int, Path]]:
    """(modified, size, path) of every visitor's uploads, oldest first."""
    found = []
    for path in (Path(runs_dir) / UPLOADS_DIR).glob("*/*/*"):
        try:
            stat = path.stat()
        except OSError:  # deleted meanwhile by another request's sweep
            continue
        found.append((stat.st_mtime, stat.st_size, path))
    return sorted(found)


def sweep_uploads(runs_dir: str | Path, settings: AccessSettings, in_use: set[str] | None = None) -> int:
    """Delete the uploads older than `upload_max_age_hours` that no unfinished run needs; how many went."""
    oldest_kept = time.time() - settings.upload_max_age_hours * HOUR
    old = [path for modified, _, path in _all_uploads(runs_dir) if modified < oldest_kept]
    if old and in_use is None:
        in_use = uploads_in_use(runs_dir)
    swept = [path for path in old if not _needed(path, in_use or set())]
    for path in swept:
        shutil.rmtree(path.parent, ignore_errors=True)
    return len(swept)


def _make_room(runs_dir: str | Path, size: int, settings: AccessSettings, in_use: set[str]) -> bool:
    """Delete the oldest uploads no unfinished run needs until `size` more bytes fit in `upload_mb_total`;
    whether they fit."""
    cap = settings.upload_mb_total * 2**20
    uploads = _all_uploads(runs_dir)
    total = sum(found for _, found, _ in uploads)
    for _, found, path in uploads:
        if total + size <= cap:
            break
        if not _needed(path, in_use):
            shutil.rmtree(path.parent, ignore_errors=True)
            total -= found
    return total + size <= cap


def _prune_uploads(runs_dir: str | Path, visitor: str, settings: AccessSettings, keep: Path,
                   in_use: set[str]) -> None:
    """Delete the visitor's oldest uploads beyond the quota, except the newest and those a run may resume from."""
    uploads = sorted((p for p in _visitor_folder(runs_dir, visitor).glob("*/*") if p.is_file()),
                     key=lambda p: p.stat().st_mtime, reverse=True)
    needed = [p for p in uploads if p == keep or _needed(p, in_use)]
    kept, kept_bytes = len(needed), sum(p.stat().st_size for p in needed)
    for path in uploads:
        if path in needed:
            continue
        size = path.stat().st_size
        if kept < settings.uploads_per_visitor and kept_bytes + size <= settings.upload_mb_per_visitor * 2**20:
            kept, kept_bytes = kept + 1, kept_bytes + size
        else:
            shutil.rmtree(path.parent, ignore_errors=True)


def own_upload(runs_dir: str | Path, visitor: str, handle: str | Path | None) -> Path:
    """An upload handle the page holds, checked to be this visitor's and still there."""
    folder = _visitor_folder(runs_dir, visitor).resolve()
    path = Path(handle or "").resolve()
    if not handle or not path.is_relative_to(folder) or not path.is_file():
        raise UserError("That upload is not available any more; upload the file again.")
    return path


def hub_id(value: str, what: str) -> str:
    """A Hub repo id (owner/name) as typed; never a path on this server, even one shaped like an id."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    value = (value or "").strip()
    example = "HuggingFaceH4/no_robots" if what == "dataset" else "HuggingFaceTB/SmolLM2-360M-Instruct"
    refusal = UserError(f"{value!r} is not a Hub {what} id: write it as owner/name, for example {example}.")
    try:
        validate_repo_id(value)
    except HFValidationError:
        raise refusal from None
    if not hub.is_hub_name(value):
        raise refusal
    return value


def data_source(kind: str, value: str | None, visitor: str, runs_dir: str | Path, settings: AccessSettings,
                sample: Path) -> str:
    """The data a visitor asked for, as a source the core may read: `kind` is "upload", "hub" or "sample"."""
    if kind == "sample":
        return str(sample)
    if kind == "upload":
        return str(own_upload(runs_dir, visitor, value))
    if settings.local_paths and value and value.strip():
        return value.strip()
    return hub_id(value or "", "dataset")


def model_name(value: str | None, offered: set[str], settings: AccessSettings, hardware: Any = None) -> str:
    """A model a visitor may train or chat with: one the app offers, (local access on) any folder, or a Hub id the
    operator allows (AccessSettings.hub_models) whose size, read from its metadata before anything is downloaded,
    this machine (`hardware`, by default the one detected) can train."""
    from . import catalog

    value = (value or "").strip()
    if value in offered or (settings.local_paths and value):
        return value
    model_id = hub_id(value, "model")
    allowed = settings.hub_models.strip().lower()
    if allowed == "none":
        raise UserError(f"This app trains and chats with the models it offers only; pick one from the list "
                        f"({model_id} is not one of them).")
    if allowed != "any" and model_id.lower() not in {name.strip() for name in allowed.split(",")}:
        raise UserError(f"{model_id} is not among the models this app offers, nor the Hub models it allows "
                        f"({settings.hub_models.replace(',', ', ')}); pick one of those.")
    catalog.check_hub_model_fits(model_id, catalog.TRAIN, hardware)
    return model_id


def check_conversation(texts: list[str]) -> None:
    """Refuse a chat conversation longer than the app answers (every text of it counts)."""
    size = sum(len(text) for text in texts)
    if size > MAX_CHAT_CHARACTERS:
        raise UserError(f"This conversation is {size:,} characters long, more than the {MAX_CHAT_CHARACTERS:,} the "
                        "chat answers; press Clear to start a new one (or shorten the message).")


# ------------------------------------------------------------------------------------------ who may train

OWNER, SIGNED_IN_VISITORS, ANYONE = "owner", "signed-in", "anyone"
DUPLICATE_HINT = "duplicate the Space to train on a GPU of your own"


@dataclasses.dataclass(frozen=True)
class TrainingAccess:
    """Whether one visitor may train and publish from this app; when not, the one sentence that says why."""

    level: str  # owner / signed-in / anyone ("auto" resolved)
    allowed: bool
    reason: str = ""


def sign_in_available(environ: Mapping[str, str]) -> bool:
    """Sign-in with Hugging Face works only on a Space with `hf_oauth: true`: the Space sets SYSTEM=spaces (how
    Gradio recognises a Space) and OAUTH_CLIENT_ID."""
    return environ.get("SYSTEM") == "spaces" and bool(environ.get("OAUTH_CLIENT_ID"))


def space_owner(environ: Mapping[str, str]) -> str:
    """The user or organisation a Space belongs to (Spaces set SPACE_AUTHOR_NAME, and SPACE_ID as owner/name)."""
    return environ.get("SPACE_AUTHOR_NAME") or environ.get("SPACE_ID", "").partition("/")[0]


def who_may_train(setting: str, environ: Mapping[str, str]) -> str:
    """The setting with "auto" resolved: the owner on a Space (strangers open it, and its GPU is paid for by the
    hour), anyone on a machine of one's own."""
    if setting != AUTO:
        return setting
    return OWNER if environ.get("SPACE_ID") else ANYONE


def _owns(profile: Mapping[str, Any], owner: str) -> bool:
    """Whether the signed-in visitor is the owner, or a member of the owning organisation. Names are compared by
    their handle (`preferred_username`), never by the display name, which anyone may set to anything."""
    if not owner:
        return False
    orgs = profile.get("orgs") or []
    handles = [profile.get("preferred_username")] + [org.get("preferred_username") for org in orgs
                                                      if isinstance(org, Mapping)]
    return owner in handles


def _who(level: str, owner: str) -> str:
    if level == SIGNED_IN_VISITORS:
        return "visitors signed in with Hugging Face"
    if not owner:
        return "the owner of this Space"
    return f"{owner}, who owns this Space (or a member, if that is an organisation),"


def training_access(setting: str, environ: Mapping[str, str], profile: Mapping[str, Any] | None) -> TrainingAccess:
    """Whether the visitor may train and publish: `setting` is AccessSettings.who_may_train, `environ` the
    Space's environment, `profile` the Hugging Face profile as Gradio hands it to a handler (gr.OAuthProfile,
    read from the session cookie Gradio signs; None when signed out or without sign-in)."""
    level = who_may_train(setting, environ)
    if level == ANYONE:
        return TrainingAccess(level, True)
    owner = space_owner(environ)
    if not sign_in_available(environ):
        # Nobody can be recognised, so nobody trains: safer than letting every stranger onto the owner's GPU.
        return TrainingAccess(level, False, f"Only {_who(level, owner)} may train or publish here, and this app "
                                            "has no sign-in with Hugging Face to tell who you are (its operator "
                                            "can turn sign-in on, or let anyone train: the README's \"Who may "
                                            "train\" says how).")
    username = (profile or {}).get("preferred_username")
    if not username:
        you = "sign in with Hugging Face if that is you" if level == OWNER else "sign in with Hugging Face"
        return TrainingAccess(level, False, f"Only {_who(level, owner)} may train or publish here: {you}, or "
                                            f"{DUPLICATE_HINT}.")
    if level == SIGNED_IN_VISITORS or _owns(profile or {}, owner):
        return TrainingAccess(level, True)
    return TrainingAccess(level, False, f"Only {_who(level, owner)} may train or publish here, and you are signed "
                                        f"in as {username}: {DUPLICATE_HINT}.")


def describe_who_may_train(setting: str, environ: Mapping[str, str]) -> str:
    """The line the app shows everyone: who may train here, and the setting that decides it."""
    level = who_may_train(setting, environ)
    owner = space_owner(environ)
    who = {ANYONE: "anyone who opens this app",
           SIGNED_IN_VISITORS: "any visitor signed in with Hugging Face",
           OWNER: f"this Space's owner, {owner} (or its members, if that is an organisation), signed in"
                  if owner else "the Space's owner, signed in"}[level]
    # In the page's words: the variable that sets it is the operator's business (README, "Who may train").
    origin = ("as the app's operator set it" if setting != AUTO else
              f"the default {'on a Space' if environ.get('SPACE_ID') else 'off a Space'}; the app's operator can "
              "change it")
    return f"Who may train and publish here: **{who}** ({origin})."


def duplicable(environ: Mapping[str, str]) -> bool:
    """Whether Gradio's Duplicate button works here: it opens Hugging Face's duplicate dialog for SPACE_ID on a
    Space (SYSTEM=spaces), and does nothing elsewhere."""
    return environ.get("SYSTEM") == "spaces" and bool(environ.get("SPACE_ID"))


def is_original_space(settings: AccessSettings, environ: Mapping[str, str]) -> bool:
    """Whether this is the public Space that people duplicate (AccessSettings.original_space names it): a duplicate
    copies the variable, but its own SPACE_ID differs."""
    return bool(settings.original_space) and environ.get("SPACE_ID") == settings.original_space
