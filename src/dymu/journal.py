"""Append-only JSON-lines journals: a header object on the first line, then one JSON object per line, flushed as
it is written.

Long runs (threshold-search checkpoints, ``dymu encode --out``) append a line per unit of work, so saving
progress costs one short write whatever has been done before, and a killed run loses at most the line being
written. A journal is created with its header in one atomic write, so a file whose first line is not a whole
header of the expected format is not a journal of ours: reading it refuses it before changing a byte. Reading a
journal of ours back drops (and cuts from the file) a last line cut short by a kill.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from .files import atomic_write
from .vision import DymuError


def read_journal(path: Path, what: str, check_header: Callable[[dict], None]) -> tuple[dict, list[dict]]:
    """(header, rows) of a journal, in order. ``check_header(header)`` raises when the first line is not the
    expected header; nothing is written before it passed (nor when the first line is no whole JSON object). Then a
    last line without its newline is completed when it holds a whole object (the kill came just before the
    newline) and cut off the file otherwise (mid-object), so that appending goes on from a clean line. ``what``
    names the file in errors ("checkpoint", "--out file")."""
    data = path.read_bytes()
    first_end = data.find(b"\n") if b"\n" in data else len(data)
    header = parse_line(data[:first_end])
    if header is None:
        raise DymuError(f"{what} {path} is not a journal of dymu (its first line is no header); it was left unchanged")
    check_header(header)
    end = data.rfind(b"\n") + 1
    lines = data[:end].splitlines()[1:]
    if end == 0:  # a header of ours without its newline (not written by dymu, which writes it whole)
        end, lines = len(data), []
        with open(path, "ab") as handle:
            handle.write(b"\n")
    if end < len(data):
        tail = parse_line(data[end:])
        with open(path, "r+b") as handle:
            if tail is None:
                handle.truncate(end)
            else:
                handle.seek(0, os.SEEK_END)
                handle.write(b"\n")
                lines.append(data[end:])
    rows = []
    for number, line in enumerate(lines, start=2):
        row = parse_line(line)
        if row is None:
            raise DymuError(f"{what} {path} line {number} is not a JSON object; delete the file to start over")
        rows.append(row)
    return header, rows


def parse_line(line: bytes) -> dict | None:
    """The JSON object on a line, None when it holds anything else."""
    try:
        row = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    return row if isinstance(row, dict) else None


class Appender:
    """Appends JSON objects to a journal, one line each, flushed to the OS at once (a killed process loses nothing
    written; a crash of the machine may lose the last lines). ``header``: start a new journal with this first line
    (written atomically, replacing any file there); None: append to the existing journal."""

    def __init__(self, path: Path, header: dict | None = None):
        self.path = path
        if header is not None:
            atomic_write(path, json.dumps(header) + "\n")
        self._file = open(path, "a", encoding="utf-8")

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
