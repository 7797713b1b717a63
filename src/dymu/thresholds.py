"""The thresholds artifact: per-layer similarity thresholds plus how they were made.

File format (JSON, ``format: "dymu-thresholds"``, ``version: 1``)::

    {
      "format": "dymu-thresholds", "version": 1,
      "model": {"model_type": "clip_vision_model", "num_layers": 24, "hidden_size": 1024,
                "image_size": 336, "patch_size": 14, "has_cls": true, "read_layer": 22,
                "name_or_path": "...", "fingerprint": {"config": "...", "weights": "..."}},
      "thresholds": [0.93, ..., null],          # one per encoder layer; null = never merge
      "schedule": "constant", "target_tokens": 195, "budgets": [16, ...],
      "batch_size": 32, "images": {"count": 25, "used": [...], "skipped": [{"image": ..., "error": ...}]},
      "achieved_tokens": {"mean": 190.2, "std": 80.1, "count": 25},
      "source": "dymu find-thresholds"
    }

A threshold is a cosine similarity: a number in [-1, 1] (give or take ``SIMILARITY_SLACK`` of float rounding), or
null, stored as ``math.inf``: never merge (``-Infinity``, merge every pair a layer can, is kept for lists made in
Python). Anything else, and fields of the wrong type, are refused with a line naming the file and the field.

``model`` is the identity check: loading onto an encoder of another family, layer count, hidden size or
patch grid fails with a one-line message, and so does another ``read_layer`` (a bare CLIP read at its last
layer vs the tower of a LLaVA that reads layer -2): the merge budgets were spread over the layers up to the
read layer, so the same thresholds give another token count there. Files without ``read_layer`` (imported
reference thresholds) are checked on the other fields. ``fingerprint`` (``dymu.files.model_fingerprint`` of the
encoder searched) is recorded, not checked: thresholds found on one checkpoint are meant to be applied to others
of its architecture.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from .jsonfile import json_type, read_json
from .vision import DymuError

FORMAT = "dymu-thresholds"
VERSION = 1
#: identity fields that must match between a thresholds file and the model it is applied to
IDENTITY_KEYS = ("model_type", "num_layers", "hidden_size", "image_size", "patch_size")
#: finite thresholds are cosine similarities, allowed this far outside [-1, 1] for the rounding of a float cosine
SIMILARITY_SLACK = 1e-4
#: optional fields of the file: the JSON types each may hold (None: null)
FIELD_TYPES = {"model": (dict,), "schedule": (str,), "target_tokens": (int,), "budgets": (list,), "batch_size": (int,),
               "images": (dict,), "achieved_tokens": (dict,), "source": (str,)}


class ThresholdsError(DymuError):
    """A thresholds file that cannot be read or does not fit the model."""


@dataclass
class Thresholds:
    values: list[float]  # one per encoder layer, math.inf = never merge
    model: dict | None = None  # identity of the encoder they were found on (None: unchecked)
    schedule: str | None = None
    target_tokens: int | None = None
    budgets: list[int] | None = None
    batch_size: int | None = None
    images: dict = field(default_factory=dict)
    achieved_tokens: dict | None = None
    source: str = "dymu"
    path: str | None = field(default=None, compare=False)  # the file it was loaded from, for messages
    timing: object = field(default=None, compare=False, repr=False)  # a search's dymu.loader.LoadClock (not saved)

    def __post_init__(self):
        self.values = checked_values(self.values, self.path or "thresholds")

    def __len__(self) -> int:
        return len(self.values)

    def __iter__(self):
        return iter(self.values)

    def __getitem__(self, index):
        return self.values[index]

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "model": self.model,
            "thresholds": [None if math.isinf(v) and v > 0 else v for v in self.values],
            "schedule": self.schedule,
            "target_tokens": self.target_tokens,
            "budgets": self.budgets,
            "batch_size": self.batch_size,
            "images": self.images,
            "achieved_tokens": self.achieved_tokens,
            "source": self.source,
        }

    def save(self, path) -> None:
        """Write the thresholds file (through a temporary file: a failed write leaves the old one whole)."""
        from .files import atomic_write_json

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, self.to_json())

    @classmethod
    def from_json(cls, data, origin: str = "thresholds") -> "Thresholds":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ThresholdsError(f"{origin}: not a dymu thresholds file (missing \"format\": \"{FORMAT}\")")
        if data.get("version") != VERSION:
            raise ThresholdsError(f"{origin}: thresholds format version {data.get('version')!r}, this dymu reads version {VERSION}")
        values = values_from_json(data.get("thresholds"), origin)
        _check_fields(data, origin)
        return cls(
            values=values,
            model=data.get("model"),
            schedule=data.get("schedule"),
            target_tokens=data.get("target_tokens"),
            budgets=data.get("budgets"),
            batch_size=data.get("batch_size"),
            images=data.get("images") or {},
            achieved_tokens=data.get("achieved_tokens"),
            source=data.get("source", "dymu"),
        )

    @classmethod
    def load(cls, path) -> "Thresholds":
        path = Path(path)
        try:
            data = read_json(path, "thresholds file")
        except DymuError as exc:
            raise ThresholdsError(str(exc)) from None
        result = cls.from_json(data, origin=str(path))
        result.path = str(path)
        return result

    def check(self, identity: dict, origin: str = "thresholds") -> None:
        """Raise ThresholdsError if these thresholds were made for another encoder."""
        if len(self.values) != identity["num_layers"]:
            raise ThresholdsError(
                f"{origin}: has {len(self.values)} layer thresholds but the model's vision encoder has {identity['num_layers']} layers"
            )
        if self.model is None:
            return
        for key in IDENTITY_KEYS:
            if key in self.model and self.model[key] != identity.get(key):
                raise ThresholdsError(
                    f"{origin}: made for {key}={self.model[key]!r} ({self.model.get('name_or_path') or 'unknown model'}), "
                    f"but the model has {key}={identity.get(key)!r}"
                )
        read_layer = self.model.get("read_layer")
        if read_layer is not None and read_layer != identity["read_layer"]:
            raise ThresholdsError(
                f"{origin}: found on an encoder read at read_layer={read_layer}, but the model reads its vision tower at "
                f"read_layer={identity['read_layer']}, where they give another token count: find thresholds on this model"
            )

    def __repr__(self) -> str:
        """Counts, not lists: the image paths stay in ``images``."""
        text = self.describe()
        if self.images:
            text += f", {self.images.get('count', 0)} images ({len(self.images.get('skipped', []))} skipped)"
        return f"Thresholds({text}, from {self.path or self.source})"

    def describe(self) -> str:
        finite = [v for v in self.values if math.isfinite(v)]
        text = f"{len(finite)}/{len(self.values)} merging layers"
        if self.target_tokens is not None:
            text += f", target {self.target_tokens} tokens"
        if self.schedule:
            text += f", {self.schedule} schedule"
        if self.achieved_tokens:
            text += f", measured {self.achieved_tokens['mean']:.1f}±{self.achieved_tokens['std']:.1f} tokens"
        return text


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def checked_values(values, origin: str, field: str = "thresholds") -> list[float]:
    """Per-layer thresholds as floats: numbers (not strings or booleans), finite ones within [-1, 1] (cosine
    similarities, SIMILARITY_SLACK of rounding allowed), or +-inf; else ThresholdsError naming ``origin`` and the field."""
    result = []
    for i, value in enumerate(values):
        if isinstance(value, (str, bytes, bool)):
            raise ThresholdsError(f"{origin}: \"{field}\"[{i}] must be a number, got {json_type(value)} {value!r}")
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ThresholdsError(f"{origin}: \"{field}\"[{i}] must be a number, got {json_type(value)}") from None
        if math.isnan(value) or (math.isfinite(value) and abs(value) > 1 + SIMILARITY_SLACK):
            raise ThresholdsError(f"{origin}: \"{field}\"[{i}] is {value}: thresholds are cosine similarities, between -1 "
                                  "and 1 (null: never merge)")
        result.append(value)
    return result


def values_from_json(raw, origin: str, field: str = "thresholds") -> list[float]:
    """Thresholds as stored in JSON (a list of numbers, null = never merge) as floats (math.inf for null)."""
    if not isinstance(raw, list) or not raw:
        raise ThresholdsError(f"{origin}: \"{field}\" must be a non-empty list of numbers or null, got {json_type(raw)}")
    return checked_values([math.inf if v is None else v for v in raw], origin, field)


def _check_fields(data: dict, origin: str) -> None:
    """The optional fields of a thresholds file hold what this dymu reads from them."""
    for key, kinds in FIELD_TYPES.items():
        value = data.get(key)
        if value is not None and (not isinstance(value, kinds) or isinstance(value, bool)):
            raise ThresholdsError(f"{origin}: \"{key}\" must be {json_type(kinds[0]())} or null, got {json_type(value)}")
    if data.get("budgets") is not None and not all(isinstance(b, int) and not isinstance(b, bool) for b in data["budgets"]):
        raise ThresholdsError(f"{origin}: \"budgets\" must be a list of whole numbers")
    skipped = (data.get("images") or {}).get("skipped", [])
    if not isinstance(skipped, list):
        raise ThresholdsError(f"{origin}: \"images\".\"skipped\" must be a list, got {json_type(skipped)}")
    achieved = data.get("achieved_tokens")
    if achieved is not None and not all(_is_number(achieved.get(key)) for key in ("mean", "std")):
        raise ThresholdsError(f"{origin}: \"achieved_tokens\" must hold numbers \"mean\" and \"std\"")


def as_thresholds(thresholds, origin: str | None = None) -> Thresholds:
    """Accept a Thresholds, a path to a thresholds file, or a plain list of per-layer floats."""
    if isinstance(thresholds, Thresholds):
        return thresholds
    if isinstance(thresholds, (str, os.PathLike)):
        return Thresholds.load(thresholds)
    try:
        values = list(thresholds)
    except TypeError:
        raise ThresholdsError(
            f"thresholds must be a dymu.Thresholds, a path or a list of floats, not {type(thresholds).__name__}"
        ) from None
    return Thresholds(values=values, source=origin or "list")
