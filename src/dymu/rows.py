"""``dymu encode --out FILE``: a JSON-lines journal of token counts, one row per image, tied to what made it.

The first line is a header ``{"format": "dymu-encode", "version": 1, "model": {...identity, "fingerprint"},
"merging": {...}, "images": fingerprint, "num_images": N}``; then ``{"image", "tokens", "patches"}`` per encoded
image and ``{"image", "error"}`` per unreadable one, in list order. ``--resume`` continues a file only when the
model (config and weights), the merging settings and the image list are those of the run; otherwise it is refused
with one line naming what differs, and left unchanged.
"""

from __future__ import annotations

from pathlib import Path

from .files import fingerprint, fingerprint_mismatch, list_fingerprint, model_fingerprint
from .journal import parse_line, read_journal
from .vision import DymuError

FORMAT = "dymu-encode"
VERSION = 1
#: first bytes read to recognise a file as ours before loading a model
PEEK_BYTES = 1 << 16


def merging_record(merging: dict) -> dict:
    """The ``dymu.apply`` merging keywords of a run as stored in the header: ToMe's r or the DToMe thresholds."""
    from .thresholds import as_thresholds

    if "merge" in merging:
        return {"method": "tome", "r": merging["merge"].r}
    return {"method": "dtome", "thresholds": as_thresholds(merging["thresholds"]).to_json()["thresholds"]}


def _describe(record) -> str:
    if not isinstance(record, dict):
        return "unknown merging"
    if record.get("method") == "tome":
        return f"ToMe r={record.get('r')}"
    return f"DToMe thresholds {fingerprint(record.get('thresholds'))}"


def header(tower, identity: dict, merging: dict, names: list[str]) -> dict:
    """The header of a new file: ``tower`` is the vision tower that encodes (its fingerprint is stored)."""
    return {"format": FORMAT, "version": VERSION, "model": identity | {"fingerprint": model_fingerprint(tower)},
            "merging": merging_record(merging), "images": list_fingerprint(names), "num_images": len(names)}


def _check_format(path: Path, head: dict) -> None:
    if head.get("format") != FORMAT or head.get("version") != VERSION:
        raise DymuError(f"--out {path} is not a file of dymu encode (version {VERSION}); it was left unchanged: "
                        "choose another file, or --overwrite to replace it")


def check_is_ours(path: Path) -> None:
    """Refuse (before any model loads) a file to resume that is not a dymu encode file; reads its first line only."""
    with open(path, "rb") as handle:
        first = handle.read(PEEK_BYTES).split(b"\n", 1)[0]
    head = parse_line(first)
    _check_format(path, head if head is not None else {})


def resume_rows(path: Path, current: dict, names: list[str]) -> list[dict]:
    """The rows of a file to resume, after checking its header against this run's (``current``); a last row cut
    short by a kill is dropped."""

    def check(head: dict) -> None:
        _check_format(path, head)
        stored = head.get("model") if isinstance(head.get("model"), dict) else {}
        differs = fingerprint_mismatch(stored.get("fingerprint"), current["model"]["fingerprint"])
        if differs:
            raise DymuError(f"cannot resume {path}: {differs}; it was left unchanged")
        if head.get("merging") != current["merging"]:
            raise DymuError(f"cannot resume {path}: it was written with {_describe(head.get('merging'))}, this run has "
                            f"{_describe(current['merging'])}; it was left unchanged")

    head, rows = read_journal(path, "--out file", check)
    for number, row in enumerate(rows, start=2):
        if not isinstance(row.get("image"), str) or not ("tokens" in row or "error" in row):
            raise DymuError(f"--out file {path} line {number} is not a row of dymu encode; delete the file to start over")
    if head.get("images") != current["images"]:
        listed = set(names)
        outside = [row["image"] for row in rows if row["image"] not in listed]
        extra = f"; {len(outside)} of its rows are of images outside this run, e.g. {outside[0]}" if outside else ""
        raise DymuError(f"cannot resume {path}: it was written for another image list ({head.get('num_images')} images "
                        f"then, {len(names)} now){extra}: run with the same images, or --overwrite to start over")
    return rows
