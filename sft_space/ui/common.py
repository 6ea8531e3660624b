"""Pieces several tabs share: form controls generated from settings fields, and the list of trained runs."""

from __future__ import annotations

import dataclasses
import functools
import html
import inspect
import logging
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import gradio as gr

from .. import access, checks, runs
from ..errors import Setting, UserError, said
from ..settings import AccessSettings, field_type

log = logging.getLogger(__name__)
UPLOAD_SWEEP_SECONDS = 600


@dataclass(frozen=True)
class RunPicker:
    """A tab's list of the visitor's runs, as other tabs use it: opening a run there selects it in `run`."""

    run: gr.Dropdown
    # (the run to keep selected, the visitor token) → the visitor's runs, refreshed, with that one selected
    on_refresh: Callable[[str | None, str | None], Any]


@dataclass
class Gate:
    """What every handler asks before acting: who the page's visitor is (from the signed token it sends), and
    whether the model it names may be used. The decisions themselves are `access`'s."""

    runs_dir: str
    identity: access.Identity
    settings: AccessSettings = field(default_factory=AccessSettings)
    offered_models: set[str] = field(default_factory=set)
    # The Space's environment (SPACE_ID, SPACE_AUTHOR_NAME, OAUTH_CLIENT_ID…): who owns it, whether sign-in works.
    environ: Mapping[str, str] = field(default_factory=lambda: os.environ)

    def visitor(self, token: Any) -> str:
        # Only a page before its load event sends no token; any other value (a number, a list) is a forged one.
        if token is None or token == "":
            raise gr.Error("The page is still loading; try again in a moment.")
        try:
            return self.identity.visitor(token)
        except UserError as err:
            raise gr.Error(str(err)) from None

    def __post_init__(self) -> None:
        self.limits = access.ClientLimits.from_settings(self.settings)
        self._next_sweep = 0.0

    def client(self) -> str:
        """The address of the client whose event is being answered, as the per-client limits count it. Gradio
        keeps the request of the event it runs in LocalContext (the gr.Request a handler could ask for), so
        every handler has it without a parameter; outside an event (a test, the command line) it is "local"."""
        from gradio.context import LocalContext

        return access.request_address(LocalContext.request.get(None),
                                      access.forwarded_hops(self.settings, self.environ))

    def issue(self, token: Any, username: str | None = None) -> str:
        """The token a page should keep (`access.Identity.issue`); a new anonymous one counts against the
        client's ids per hour, since ids cost nothing else."""
        issued = self.identity.issue(token, username)
        if issued != token and not username:
            self._refuse_over(self.limits.ids)
        return issued

    def visitor_or_new(self, token: Any) -> tuple[str, str]:
        """(visitor, token) for a page's first action, which may come before its load event gave it an id: a
        page without one gets a new anonymous id (owning nothing) instead of a refusal."""
        if token is None or token == "":
            token = self.issue(None)
        return self.visitor(token), token

    def upload_from(self, token: Any, uploaded: str | None) -> tuple[str, str]:
        """(visitor, token) for a page that just uploaded `uploaded`: the upload counts against its client's
        uploads per hour; refused, the file is deleted from Gradio's upload folder at once."""
        try:
            if uploaded:
                self._refuse_over(self.limits.uploads)
            return self.visitor_or_new(token)
        except gr.Error:
            if uploaded:
                Path(uploaded).unlink(missing_ok=True)
            raise

    def _refuse_over(self, limit: access.RateLimit, amount: float = 1) -> None:
        try:
            limit.take(self.client(), amount)
        except UserError as err:
            raise gr.Error(str(err)) from None

    def sweep_uploads(self) -> None:
        """Delete uploads past their age (`access.sweep_uploads`), at most every few minutes: page loads call it,
        so that a quiet app's disk empties too."""
        now = time.monotonic()
        if now >= self._next_sweep:
            self._next_sweep = now + UPLOAD_SWEEP_SECONDS
            access.sweep_uploads(self.runs_dir, self.settings)

    def known_visitor(self, token: str | None) -> str | None:
        """The visitor, or None for a page that has no valid token yet (for read-only refreshes)."""
        try:
            return self.identity.visitor(token)
        except UserError:
            return None

    def training_access(self, profile: Mapping[str, Any] | None) -> access.TrainingAccess:
        """Whether the visitor whose Hugging Face profile Gradio passed to the handler (from its signed session
        cookie, never from the page's values) may train and publish here."""
        return access.training_access(self.settings.who_may_train, self.environ, profile)

    def may_train(self, profile: Mapping[str, Any] | None) -> None:
        """Refuse, in one sentence, a visitor who may not train or publish here."""
        decision = self.training_access(profile)
        if not decision.allowed:
            raise gr.Error(decision.reason)

    def model(self, name: str | None) -> str:
        try:
            return access.model_name(name, self.offered_models, self.settings)
        except UserError as err:
            raise gr.Error(str(err)) from None


# Markdown gives meaning to ASCII punctuation (images, links, HTML, lists, LaTeX with $$); a backslash before each
# makes it literal, as CommonMark allows for any of them.
MARKDOWN_PUNCTUATION = re.compile(r"([!-/:-@\[-`{-~])")


def markdown_text(text: Any) -> str:
    """Text from outside (a file, a Hub dataset, what a visitor typed) as Markdown that shows it as it is, on one
    line: a column named `![t](http://…/track.png)` is those characters, not an image the browser fetches."""
    return MARKDOWN_PUNCTUATION.sub(r"\\\1", " ".join(str(text).split()))


# The page's boxes for settings, by the settings' names: where a message of the core names one of these settings
# (errors.Setting), the page names its box.
BOX_NAMES = {"columns": "Column mapping", "max_length": "Maximum length",
             "skip_invalid_rows": checks.SKIP_INVALID_LABEL}


def box_name(setting: Setting) -> str | None:
    """The page's name for `setting`: its box's, with the value the message shows (None where it has no box)."""
    box = BOX_NAMES.get(setting.name)
    if box is None:
        return None
    return f"“{box}”: {setting.value}" if setting.value else f"“{box}”"


def page_words(message: str) -> str:
    """A message of the core as the page says it: each setting it names by the page's box for it, or by the
    setting's own name where the page has none; never by its command-line flag (`errors.Message.said`)."""
    return said(message, box_name)


def refusal_words(err: Exception) -> str:
    """What a refusal says on the page: a UserError's message in the page's words, a gr.Error's as it is."""
    return page_words(err.message) if isinstance(err, (gr.Error, UserError)) else str(err)


def refused_markdown(action: str, err: Exception | str) -> str:
    """A refused action, said where it happened: one line in the server's log, a toast, and "**Refused** · …" for
    the Markdown beside the action, which keeps saying it until the next action (a toast fades). The message may
    quote data or a visitor's typing, so the toast (HTML) and the line (Markdown) get it as text."""
    message = refusal_words(err)
    log.warning("refused %s: %s", action, " ".join(str(message).split()))
    gr.Warning(html.escape(str(message), quote=False))
    return f"**Refused** · {markdown_text(message)}"


def refusal_said(fn: Callable, outputs: Callable[[str], Any]) -> Callable:
    """`fn`, whose refusal (gr.Error, UserError) is answered with `outputs(line)`: the handler's outputs, one of them
    saying the refusal (`line`, from `refused_markdown`) where it happened."""
    @functools.wraps(fn)
    def handler(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (gr.Error, UserError) as err:
            return outputs(refused_markdown(fn.__name__, err))
    return handler


def settings_component(spec: dataclasses.Field, **options: Any) -> gr.components.Component:
    """The form control for one settings field, labelled and explained from its declaration; `options` go to
    the component (visible=False, ...)."""
    label = options.pop("label", None) or spec.name.replace("_", " ").capitalize()
    info = spec.metadata["help"]
    kind = field_type(spec)
    if "choices" in spec.metadata:
        return gr.Dropdown(list(spec.metadata["choices"]), value=spec.default, label=label, info=info, **options)
    if kind is bool:
        return gr.Checkbox(value=spec.default, label=label, info=info, **options)
    if kind in (int, float):
        low, high = spec.metadata.get("bounds", (None, None))
        return gr.Number(value=spec.default, label=label, info=info, precision=0 if kind is int else None,
                         minimum=low, maximum=high, **options)
    return gr.Textbox(value=spec.default, label=label, info=info, **options)


def own_run(runs_dir: str, run_ref: str | None, visitor: str | None, need_adapter: str = "") -> runs.RunFolder:
    """The run a page chose, checked to be the visitor's (a page can send any value); `need_adapter` names what
    the adapter is needed for, when it is."""
    if not run_ref:
        raise gr.Error("Pick a run first.")
    try:
        run = runs.open_visible(runs_dir, run_ref, visitor)
    except UserError as err:
        raise gr.Error(str(err)) from None
    if need_adapter and not run.has_adapter:
        raise gr.Error(f"Run {run.run_id} has no adapter to {need_adapter} yet: wait for it to finish, or stop it.")
    return run


def adapter_run_choices(runs_dir: str, visitor: str | None) -> list[tuple[str, str]]:
    """(label, run folder) for every run of this visitor with an adapter to chat with or publish, newest first."""
    choices = []
    for folder, record in runs.visible_runs(runs_dir, visitor):
        if folder.has_adapter and record.get("status") != runs.UNREADABLE:
            headline = folder.headline(record).text()
            label = f"{folder.run_id} · {record.get('status')}" + (f" · {headline}" if headline else "")
            choices.append((label, str(folder.path)))
    return choices


def keep_choice(choices: list[tuple[str, str]], current: str | None) -> Any:
    """A refreshed run list that keeps the current pick while it is still there, else picks the first."""
    values = [value for _, value in choices]
    return gr.update(choices=choices, value=current if current in values else (values[0] if values else None))


def _unchanged(outputs: int) -> Any:
    """What a handler returns to leave each of its outputs as it is."""
    return gr.skip() if outputs == 1 else tuple(gr.skip() for _ in range(outputs))


def refusals_as_messages(fn: Callable, outputs: int) -> Callable:
    """`fn`, with its refusals (gr.Error, UserError) shown as a warning that fades, and every output left as it
    was. Raised from a handler, gr.Error would also put a red "Error" badge on each output, which stays and looks
    like a crash; a refusal is a message."""
    def refuse(err: Exception) -> Any:
        message = refusal_words(err)
        # One line in the server's log, not a traceback: the refusal is the visitor's to act on, not a fault.
        log.warning("refused %s: %s", fn.__name__, " ".join(str(message).split()))
        gr.Warning(html.escape(str(message), quote=False))  # a toast renders HTML; a refusal may quote data
        return _unchanged(outputs)

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def streaming(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except (gr.Error, UserError) as err:
                yield refuse(err)
        return streaming

    @functools.wraps(fn)
    def handler(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (gr.Error, UserError) as err:
            return refuse(err)
    return handler


class _OverLimit(Exception):
    """A request body past what its client may send: answered with `status` and `message` instead."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class RequestLimits:
    """What one client may send the app before any handler runs, as ASGI middleware on Gradio's server:

    - a request body over `max_request_kb` is refused (413) from its declared length, or as soon as that many
      bytes have arrived (Gradio's upload route excepted: Gradio caps each file at `max_file_size`);
    - what a client uploads to Gradio's upload route counts against its `upload_mb_per_client_hour` as it
      arrives (429 past it), whether or not the page then uses the file;
    - a client with `queued_events_per_client` events waiting or running is refused another (429). Gradio has
      no hook for this: its queue's events are counted by the address of the request that made them.
    """

    def __init__(self, app: Any, blocks: gr.Blocks, settings: AccessSettings,
                 environ: Mapping[str, str] = os.environ):
        self.app, self.blocks = app, blocks
        self.hops = access.forwarded_hops(settings, environ)
        self.max_body = settings.max_request_kb * 1024
        self.events_per_client = settings.queued_events_per_client
        self.upload_bytes = access.RateLimit(settings.upload_mb_per_client_hour * 2**20, "bytes uploaded")

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        from starlette.requests import Request

        request = Request(scope)
        client = access.request_address(request, self.hops)
        path = scope["path"].rstrip("/")
        declared = request.headers.get("content-length", "")
        declared_size = int(declared) if declared.isdigit() else None
        if path.endswith("/upload"):
            def charge(size: int) -> None:
                try:
                    self.upload_bytes.take(client, size)
                except UserError as err:
                    raise _OverLimit(429, str(err)) from None
            if declared_size is not None and declared_size > self.upload_bytes.remaining(client):
                return await self._refuse(scope, receive, send, 429, f"This upload ({declared_size / 2**20:,.1f} "
                                          "MB) is more than your address may still upload this hour; try later.")
        else:
            def charge(size: int) -> None:
                nonlocal received
                received += size
                if received > self.max_body:
                    raise _OverLimit(413, self._too_large())
            received = 0
            if declared_size is not None and declared_size > self.max_body:
                return await self._refuse(scope, receive, send, 413, self._too_large())
            if (path.endswith("/queue/join") or "/call/" in path) and self._events_of(client) >= self.events_per_client:
                return await self._refuse(scope, receive, send, 429, (
                    f"Your address has {self.events_per_client} requests waiting or running in this shared app, "
                    "the most it takes at once; wait for them to finish."))
        # Past the limit, the app's own answer (FastAPI turns an error while reading into "error parsing the
        # body") is replaced by ours, which says what happened.
        refusal: _OverLimit | None = None
        started = answered = False

        async def counted_receive() -> dict:
            nonlocal refusal
            message = await receive()
            if message["type"] == "http.request":
                try:
                    charge(len(message.get("body", b"")))
                except _OverLimit as over:
                    refusal = over
                    raise
            return message

        async def answering_send(message: dict) -> None:
            nonlocal started, answered
            if refusal is None:
                started = started or message["type"] == "http.response.start"
                await send(message)
            elif not started and not answered:
                answered = True
                await self._refuse(scope, receive, send, refusal.status, refusal.message)

        try:
            await self.app(scope, counted_receive, answering_send)
        except _OverLimit:
            if started:
                raise
        if refusal is not None and not started and not answered:
            await self._refuse(scope, receive, send, refusal.status, refusal.message)

    def _too_large(self) -> str:
        return (f"This request is larger than the {self.max_body // 1024:,} KB this app reads; send less (a "
                "shorter message or conversation).")

    def _events_of(self, client: str) -> int:
        events = getattr(getattr(self.blocks, "_queue", None), "event_ids_to_events", None) or {}
        return sum(1 for event in list(events.values())
                   if access.request_address(getattr(event, "request", None), self.hops) == client)

    @staticmethod
    async def _refuse(scope: dict, receive: Callable, send: Callable, status: int, message: str) -> None:
        from starlette.responses import JSONResponse

        log.warning("refused a request to %s: %s", scope["path"], message)
        await JSONResponse({"detail": message}, status_code=status)(scope, receive, send)
