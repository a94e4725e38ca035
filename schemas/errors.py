"""The exceptions lorabatch raises on purpose, in one small hierarchy.

Every one carries a message that names the problem and the fix; the CLI prints it
as one line. ``exit_code`` is what the CLI exits with.
"""

from __future__ import annotations


class LorabatchError(Exception):
    """Base class: an error with a message meant for the user."""

    exit_code = 1


class UsageError(LorabatchError):
    """Invalid input or usage: a bad file, an unknown job, a bad option."""

    exit_code = 2


class ConfigError(UsageError):
    """The configuration file or environment is invalid."""


class InvalidInput(UsageError):
    """An input file failed validation. ``problems`` lists (line number, reason)."""

    def __init__(self, message: str, problems: list[tuple[int, str]] | None = None):
        super().__init__(message)
        self.problems = problems or []


class NotFound(UsageError):
    """A job id that does not exist."""


class ServiceUnavailable(LorabatchError):
    """Redis or the database cannot be reached. The message names the URL, password hidden."""

    exit_code = 2


class AdapterError(LorabatchError):
    """An adapter cannot be resolved, validated or loaded. Never retried: it fails its requests."""


class RequestTooLarge(LorabatchError):
    """One request cannot fit in memory even alone. Never retried."""
