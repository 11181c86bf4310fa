"""Errors users see: each names the input, the field and the fix, in one line."""

from __future__ import annotations


class SubqError(Exception):
    """A user-facing error. The CLI prints `error: <message>` and exits with code 2."""

    def __init__(self, message: str, *, field: str | None = None, source: str | None = None, hint: str | None = None):
        self.field = field
        self.source = source
        self.hint = hint
        parts = []
        if source:
            parts.append(f"{source}:")
        if field:
            parts.append(f"field '{field}':")
        parts.append(message)
        if hint:
            parts.append(f"({hint})")
        super().__init__(" ".join(parts))


class DataError(SubqError):
    """Input data is missing, unreadable or malformed."""


class ConfigError(SubqError):
    """A config value (YAML or flag) is invalid."""
