"""Append-only JSON-lines files: one JSON object per line, flushed as it is written.

Long runs (threshold-search checkpoints, ``dymu encode --out``) append a line per unit of work, so saving
progress costs one short write whatever has been done before, and a killed run loses at most the line being
written. Reading back drops (and cuts from the file) a last line cut short by a kill.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .vision import DymuError


def read_lines(path: Path, what: str) -> list[dict]:
    """The objects of a JSON-lines file, in order. A last line without its newline is completed when it holds a
    whole object (the kill came just before the newline) and cut off the file otherwise (mid-object), so that
    appending goes on from a clean line. ``what`` names the file in errors ("checkpoint", "--out file")."""
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1  # 0 when no line is complete
    lines = data[:end].splitlines()
    if end < len(data):
        tail = _parse(data[end:])
        with open(path, "r+b") as handle:
            if tail is None:
                handle.truncate(end)
            else:
                handle.seek(0, os.SEEK_END)
                handle.write(b"\n")
                lines.append(data[end:])
    rows = []
    for number, line in enumerate(lines, start=1):
        row = _parse(line)
        if row is None:
            raise DymuError(f"{what} {path} line {number} is not a JSON object; delete the file to start over")
        rows.append(row)
    return rows


def _parse(line: bytes) -> dict | None:
    try:
        row = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):  # RecursionError: nested too deeply
        return None
    return row if isinstance(row, dict) else None


class Appender:
    """Appends JSON objects to a file, one line each, flushed to the OS at once (a killed process loses nothing
    written; a crash of the machine may lose the last lines)."""

    def __init__(self, path: Path, fresh: bool):
        self.path = path
        self._file = open(path, "w" if fresh else "a", encoding="utf-8")

    def write(self, row: dict) -> None:
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def remove(path: Path | None) -> None:
    if path is not None and os.path.exists(path):
        os.unlink(path)
