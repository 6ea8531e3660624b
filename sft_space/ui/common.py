"""Pieces several tabs share: form controls generated from settings fields, and the list of trained runs."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable

import gradio as gr

from .. import access, runs
from ..errors import UserError
from ..settings import AccessSettings, field_type

log = logging.getLogger(__name__)


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

    def visitor_or_new(self, token: str | None) -> tuple[str, str]:
        """(visitor, token) for a page's first action, which may come before its load event gave it an id: a
        page without one gets a new anonymous id (owning nothing) instead of a refusal."""
        token = token or self.identity.issue(None)
        return self.visitor(token), token

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
        message = err.message if isinstance(err, gr.Error) else str(err)
        # One line in the server's log, not a traceback: the refusal is the visitor's to act on, not a fault.
        log.warning("refused %s: %s", fn.__name__, " ".join(str(message).split()))
        gr.Warning(message)
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
