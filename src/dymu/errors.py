"""Errors every layer raises (no adapter owns them)."""


class DymuError(ValueError):
    """A user-facing error with a one-line message."""
