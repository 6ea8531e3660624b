"""Errors meant for the person using the tool, not for a debugger.

Every message says what went wrong, where, and what to do. The CLI prints them without a traceback
and the app shows them as they are. A message that names a setting (a limit to raise, a mapping to give) is a
`Message` holding a `Setting` mention: its string is the command line's wording (`--max-rows`), and each other skin
says it in its own words (`Message.said`), without reading the text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


def flag(name: str, prefix: str = "--") -> str:
    """The command line's flag of the setting `name` (`max_rows` → `--max-rows`; with `prefix="--no-"`, a boolean's
    off form)."""
    return prefix + name.replace("_", "-")


@dataclass(frozen=True)
class Setting:
    """A setting a message names: its field in the settings (`max_rows`), and the value it is shown with, if any
    (`prompt=question`).

    `after_its_name`: the text just before already says the field's name, and the mention adds a skin's own name
    for it (`(max_rows, --max-rows)`); a skin that has no name of its own for it adds nothing."""

    name: str
    value: str = ""
    after_its_name: bool = False

    @property
    def flag(self) -> str:
        return flag(self.name)


# A skin's own name for a setting (its value included, when the mention has one), or None where it has none: the
# setting is then said by its field's name.
Namer = Callable[[Setting], str | None]


def command_line(setting: Setting) -> str:
    """The command line's name for a setting: its flag, then the value (`--columns prompt=question`)."""
    return f"{setting.flag} {setting.value}" if setting.value else setting.flag


class Message(str):
    """A message made of text and `Setting` mentions. As a string it is the command line's wording (what `str()`,
    logs, JSON and the CLI show); `said(namer)` is the same message with each setting in another skin's words.
    Pickles with its mentions (a check's refusals and problems come back from a worker process)."""

    parts: tuple[str | Setting, ...]

    def __new__(cls, *parts: str | Setting) -> Message:
        # A Message among the parts keeps its mentions: a message that quotes another still names its settings.
        parts = tuple(piece for part in parts for piece in (part.parts if isinstance(part, Message) else (part,)))
        message = super().__new__(cls, _joined(parts, command_line))
        message.parts = parts
        return message

    def __reduce__(self) -> tuple:
        return type(self), self.parts

    def said(self, namer: Namer) -> str:
        """This message with each setting named by `namer`."""
        return _joined(self.parts, namer)


def _joined(parts: tuple[str | Setting, ...], namer: Namer) -> str:
    words = []
    for part in parts:
        if isinstance(part, str):
            words.append(part)
            continue
        own = namer(part)
        if part.after_its_name:
            words.append(f", {own}" if own else "")
        else:
            words.append(own or (f"{part.name} {part.value}" if part.value else part.name))
    return "".join(words)


def said(message: str, namer: Namer) -> str:
    """`message` with each setting it names said by `namer`; a plain string as it is."""
    return message.said(namer) if isinstance(message, Message) else message


class UserError(Exception):
    """A problem the user can fix: bad input, a missing file, an unreachable Hub."""

    @property
    def message(self) -> str:
        """What it says: the Message it was raised with, whose settings a skin can name in its own words (`str()`
        of the error is the command line's wording)."""
        first = self.args[0] if len(self.args) == 1 else None
        return first if isinstance(first, Message) else str(self)


class DataSourceError(UserError):
    """The data source as a whole cannot be used (missing, unreadable, unknown format)."""


class ModelLoadError(UserError):
    """A model or tokenizer cannot be found, reached or loaded."""
