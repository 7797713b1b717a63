"""Method specs: one parser for the strings the API, the CLI and the evaluation runner take.

Encoder side (``merge=``): ``dtome:FILE`` (DyMU thresholds), ``tome:r=8`` (ToMe, a fixed number of merges per layer).
Decoder side (``prune=``): ``fastv:k=2,r=0.5[,rerank=prefill|step][,score=last|all]``, ``vtw:k=16``,
``dyrate:FILE[,monotone=true|false]``.
A method says *what* happens to tokens; the adapters (``dymu.vision``, ``dymu.language``) carry it out.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass

from .errors import DymuError


#: how the language model takes merged tokens: virtual unmerging (fast path / exact decomposition) or compact
VTU_MODES = ("fast", "exact", "none")


def check_vtu(vtu: str) -> None:
    if vtu not in VTU_MODES:
        raise DymuError(f"vtu must be one of {', '.join(VTU_MODES)}, got {vtu!r}")


@dataclass(frozen=True)
class DToMe:
    """Dynamic merging with per-layer thresholds learned by ``dymu find-thresholds``."""

    path: str


@dataclass(frozen=True)
class ToMe:
    """Exactly ``r`` merges per layer and image (capacity permitting): ToMe's fixed schedule."""

    r: int

    def check(self) -> None:
        _at_least("r", self.r, 0)


@dataclass(frozen=True)
class FastV:
    """Drop the fraction ``r`` of image tokens that receive the least attention at layer ``k - 1``, from layer ``k`` on.

    rerank: ``prefill`` (decide once; layers >= k cache only the kept tokens) or ``step`` (re-decide at every decode
    step from that step's query). score: ``last`` (the last query, the official code) or ``all`` (mean over queries).
    """

    k: int = 2
    r: float = 0.5
    rerank: typing.Literal["prefill", "step"] = "prefill"
    score: typing.Literal["last", "all"] = "last"

    def check(self) -> None:
        _at_least("k", self.k, 0)
        if not 0.0 <= self.r <= 1.0:
            raise ValueError(f"r must be between 0 and 1, got {self.r}")


@dataclass(frozen=True)
class VTW:
    """Withdraw every visual token from layer ``k`` on (prefill and cache)."""

    k: int = 16

    def check(self) -> None:
        _at_least("k", self.k, 0)


@dataclass(frozen=True)
class DyRate:
    """At every forward, a trained predictor (``dymu train-dyrate``; ``path``: its file, ``dymu.dyrate``) picks from the
    attention shares of system / image / instruction / response the fraction of image tokens dropped from its layer on.

    monotone: a dropped token never comes back (caches shrink); false: hidden for this step only. None: the file's.
    """

    path: str
    monotone: bool | None = None

    #: options after the path (``dyrate:FILE,monotone=false``)
    OPTIONS = ("monotone",)

    @classmethod
    def from_spec(cls, rest: str) -> "DyRate":
        parts = rest.split(",")
        options = {}
        while len(parts) > 1 and parts[-1].partition("=")[0].strip() in cls.OPTIONS:
            key, _, text = parts.pop().partition("=")
            options[key.strip()] = _boolean(key.strip(), text.strip())
        path = ",".join(parts).strip()
        if not path:
            raise ValueError("the predictor file is missing")
        return cls(path=path, **options)


def _boolean(name: str, text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise ValueError(f"{name} must be true or false, got {text!r}")


MERGE_METHODS = {"dtome": DToMe, "tome": ToMe}
PRUNE_METHODS = {"fastv": FastV, "vtw": VTW, "dyrate": DyRate}
MERGE_SYNTAX = "dtome:FILE | tome:r=R"
PRUNE_SYNTAX = "fastv:k=K,r=R[,rerank=prefill|step][,score=last|all] | vtw:k=K | dyrate:FILE[,monotone=true|false]"


def _at_least(name: str, value: int, low: int) -> None:
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


def _convert(name: str, kind, text: str):
    """``text`` as the type of option ``name``: int, float, or one of a Literal's choices."""
    if typing.get_origin(kind) is typing.Literal:
        if text not in typing.get_args(kind):
            raise ValueError(f"{name} must be one of {', '.join(typing.get_args(kind))}, got {text!r}")
        return text
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {text!r}") from None


def parse(spec, methods: dict, syntax: str, what: str):
    """A method object from ``name:key=value,...`` (or ``dtome:FILE``); objects of a known class pass through."""
    if isinstance(spec, tuple(methods.values())):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise DymuError(f"invalid {what} spec {spec!r}; syntax: {syntax}")
    name, _, rest = spec.strip().partition(":")
    method = methods.get(name.lower())
    try:
        if method is None:
            raise ValueError(f"unknown method {name!r}")
        fields = {f.name: f for f in dataclasses.fields(method)}
        types = typing.get_type_hints(method)
        if method is DToMe:
            if not rest:
                raise ValueError("the thresholds file is missing")
            return DToMe(path=rest)
        if method is DyRate:
            return DyRate.from_spec(rest)
        values = {}
        for item in filter(None, (part.strip() for part in rest.split(","))):
            key, equals, text = item.partition("=")
            if not equals or key not in fields:
                raise ValueError(f"unknown option {key!r}" if equals else f"{item!r} is not key=value")
            values[key] = _convert(key, types[key], text.strip())
        missing = [f.name for f in fields.values() if f.default is dataclasses.MISSING and f.name not in values]
        if missing:
            raise ValueError(f"{', '.join(missing)} missing")
        result = method(**values)
        result.check()
        return result
    except ValueError as exc:
        raise DymuError(f"invalid {what} spec {spec!r}: {exc}; syntax: {syntax}") from None


def parse_merge(spec) -> DToMe | ToMe:
    return parse(spec, MERGE_METHODS, MERGE_SYNTAX, "merge")


def is_policy(spec) -> bool:
    """A decoder-side policy object (``dymu.policies``: ``scores_at``, ``edit``, ``score_layers``) rather than a spec."""
    return all(hasattr(spec, name) for name in ("scores_at", "edit", "score_layers"))


def parse_prune(spec):
    """FastV / VTW from a spec; None; or a policy object as given (``dymu.policies`` says what one has)."""
    if spec is None or is_policy(spec):
        return spec
    return parse(spec, PRUNE_METHODS, PRUNE_SYNTAX, "prune")

