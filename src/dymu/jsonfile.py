"""Reading JSON files a user hands us: every failure is one line naming the file, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

from .vision import DymuError

#: JSON type names for messages, by Python type
JSON_TYPES = {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number", bool: "true/false",
              type(None): "null"}


def parse_json(text: str | bytes):
    """The value of a JSON text; ValueError (one line) when it is not JSON, not UTF-8 or nested too deeply."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(str(exc)) from None


def read_json(path, what: str = "file"):
    """The value of a JSON file; a DymuError naming ``what`` and the file when it cannot be read as JSON."""
    path = Path(path)
    if not path.is_file():
        raise DymuError(f"{what} not found: {path}")
    try:
        return parse_json(path.read_bytes())
    except ValueError as exc:
        raise DymuError(f"{path}: the {what} is not valid JSON ({exc})") from None


def json_type(value) -> str:
    """"a list", "a string", ... for messages."""
    return JSON_TYPES.get(type(value), type(value).__name__)
