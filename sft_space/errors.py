"""Errors meant for the person using the tool, not for a debugger.

Every message says what went wrong, where, and what to do. The CLI prints them without a traceback
and the app shows them as they are.
"""


class UserError(Exception):
    """A problem the user can fix: bad input, a missing file, an unreachable Hub."""


class DataSourceError(UserError):
    """The data source as a whole cannot be used (missing, unreadable, unknown format)."""


class ModelLoadError(UserError):
    """A model or tokenizer cannot be found, reached or loaded."""
