"""Evaluation methods: one string per table row, parsed into ``dymu.apply`` keywords.

A method is ``full`` (the untouched model) or parts joined by ``+``, at most one of each side:

* encoder side: ``dymu-low`` / ``dymu-mid`` / ``dymu-high`` (the model's ``thresholds/{level}.json``, as the shipped
  toy model carries them), ``dtome:FILE``, ``tome:r=R``;
* decoder side: ``fastv:k=K,r=R[,...]``, ``vtw:k=K`` (:mod:`dymu.methods`);
* ``vtu=fast|exact|none``: how the language model takes merged tokens (default: the run's ``--vtu``).

e.g. ``dymu-mid``, ``dymu-mid+vtu=none``, ``tome:r=8+fastv:k=2,r=0.5``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DymuError
from ..methods import MERGE_METHODS, MERGE_SYNTAX, PRUNE_METHODS, PRUNE_SYNTAX, check_vtu, parse_merge, parse_prune

FULL = "full"
#: presets: thresholds files in the model folder's ``thresholds/`` (``dymu find-thresholds`` wrote them)
PRESETS = {"dymu-low": "low", "dymu-mid": "mid", "dymu-high": "high"}
THRESHOLDS_FOLDER = "thresholds"
SYNTAX = (f"full | PART[+PART...] with PART one of {' | '.join(PRESETS)} | {MERGE_SYNTAX} | {PRUNE_SYNTAX} | "
          "vtu=fast|exact|none")
#: a ``+`` that starts a new part (a name followed by ``:`` or ``=``, or a preset), not one inside a file name
_SPLIT = re.compile(r"\+(?=(?:" + "|".join([*PRESETS, *MERGE_METHODS, *PRUNE_METHODS, "vtu"]) + r")\b)")


@dataclass(frozen=True)
class Setting:
    """One evaluated method: its spec as given and the ``dymu.apply`` keywords (empty for ``full``)."""

    spec: str
    apply: dict = field(default_factory=dict)

    @property
    def is_full(self) -> bool:
        return not self.apply

    @property
    def vtu(self) -> str:
        return self.apply.get("vtu", "fast")


def parse_method(spec: str, model_dir=None, vtu: str = "fast") -> Setting:
    """The ``Setting`` of a method spec (module docstring). ``model_dir``: the model folder presets are read from;
    ``vtu``: the mode when the spec names none. Raises ``DymuError`` in one line naming the spec."""
    if not isinstance(spec, str) or not spec.strip():
        raise DymuError(f"invalid method {spec!r}; syntax: {SYNTAX}")
    spec = spec.strip()
    if spec == FULL:
        return Setting(FULL)
    merge = prune = mode = None
    for part in _SPLIT.split(spec):
        name = part.partition(":")[0].partition("=")[0].lower()
        if part in PRESETS or name in MERGE_METHODS:
            if merge is not None:
                raise DymuError(f"invalid method {spec!r}: more than one encoder-side part ({merge_text} and {part})")
            merge_text, merge = part, _preset(part, model_dir, spec) if part in PRESETS else parse_merge(part)
        elif name in PRUNE_METHODS:
            if prune is not None:
                raise DymuError(f"invalid method {spec!r}: more than one decoder-side part")
            prune = parse_prune(part)
        elif name == "vtu":
            mode = part.partition("=")[2]
            check_vtu(mode)
        else:
            raise DymuError(f"invalid method {spec!r}: unknown part {part!r}; syntax: {SYNTAX}")
    keywords = {"vtu": mode or vtu}
    check_vtu(keywords["vtu"])
    if merge is not None:
        keywords["merge"] = merge
    if prune is not None:
        keywords["prune"] = prune
    return Setting(spec, keywords)


def _preset(name: str, model_dir, spec: str):
    """``dtome:`` the thresholds file of preset ``name`` in ``model_dir``."""
    if model_dir is None or not Path(model_dir).is_dir():
        raise DymuError(f"method {spec!r}: the preset {name} needs a local model folder with {THRESHOLDS_FOLDER}/"
                        f"{PRESETS[name]}.json; use dtome:FILE instead")
    path = Path(model_dir) / THRESHOLDS_FOLDER / f"{PRESETS[name]}.json"
    if not path.is_file():
        raise DymuError(f"method {spec!r}: no {path} (find it with `dymu find-thresholds {model_dir} IMAGES "
                        f"--target-tokens N --out {path}`), or use dtome:FILE")
    return parse_merge(f"dtome:{path}")


def slug(spec: str) -> str:
    """A folder name for a method spec (readable, one per spec)."""
    text = re.sub(r"[^A-Za-z0-9.=,+-]+", "_", spec).strip("_")
    return text or "method"
