"""Public Python API: apply / remove / encode."""

from __future__ import annotations

import math

from torch import nn

from .encoding import Encoding, _check_pixels, _temporarily_patched, encode, run_encoder  # noqa: F401 (public here)
from .errors import DymuError
from .thresholds import Thresholds, as_thresholds
from .vision import get_patch, patch_tower, tower_info, unpatch_tower


def apply(model: nn.Module, thresholds=None, vtu: str = "fast", prune=None, merge=None) -> nn.Module:
    """Reduce the visual tokens of ``model``. Patches the instance in place; ``dymu.remove`` restores it.

    ``thresholds``: DToMe merging in the vision encoder: a ``dymu.Thresholds``, a path to a thresholds file, or
    a list with one float per encoder layer (``float("inf")`` = never merge); None = no merging. Works on
    ``CLIPVisionModel``, ``SiglipVisionModel`` and the vision tower of LLaVA / LLaVA-OneVision models (merging
    stops at ``vision_feature_layer``).
    On a LLaVA model the language model is patched too, so stock ``generate`` works: ``vtu="fast"`` (virtual
    token unmerging, Q/K/V expanded before RoPE), ``"exact"`` (the paper's C/S decomposition) or ``"none"``
    (compact: merged tokens fed directly; build inputs with ``dymu.prepare_inputs``).
    ``merge``: the encoder-side method as a spec or a ``dymu.methods`` object, instead of ``thresholds``:
    ``"tome:r=8"`` (ToMe: in every layer up to the read layer each image makes exactly ``min(8, floor((tokens - CLS)
    / 2))`` merges; same matching and proportional attention as DToMe) or ``"dtome:FILE"``.
    ``prune``: decoder-side pruning on LLaVA, ``"fastv:k=2,r=0.5"`` or ``"vtw:k=16"`` (see ``dymu.methods``).
    Returns ``model``. Applying again replaces the previous settings.
    """
    from .compat import warn_if_untested
    from .llava import is_vlm, patch_vlm, supports_language_side
    from .methods import DToMe, ToMe, check_vtu, parse_merge, parse_prune

    check_vtu(vtu)
    prune = parse_prune(prune)
    if merge is not None:
        if thresholds is not None:
            raise DymuError("give thresholds or merge=, not both")
        merge = parse_merge(merge)
        thresholds = merge.path if isinstance(merge, DToMe) else None
    warn_if_untested()
    info = tower_info(model)
    if prune is not None and not (is_vlm(model) and supports_language_side(model)):
        raise DymuError(f"{type(model).__name__}: prune= needs a LLaVA-1.5 model (it acts in the language model)")
    if vtu != "fast" and not (is_vlm(model) and supports_language_side(model)):
        raise DymuError(f"{type(model).__name__}: vtu={vtu!r} acts in the language model of a LLaVA-1.5 model; this "
                        "model has none dymu generates with (leave vtu at its default)")
    if isinstance(merge, ToMe):
        patch_tower(model, merges=[merge.r] * info.num_layers)
    else:
        thresholds = as_thresholds([math.inf] * info.num_layers if thresholds is None else thresholds)
        thresholds.check(info.identity(), origin=_origin(thresholds))
        patch_tower(model, thresholds.values)
        get_patch(model).thresholds = thresholds
    if is_vlm(model):
        try:
            patch_vlm(model, vtu, prune)
        except Exception:
            unpatch_tower(model)
            raise
    return model


def encoder_merging(model: nn.Module) -> dict:
    """The ``apply`` keywords that reproduce the encoder merging ``model`` is patched with: {"merge": ToMe} for a fixed
    r, else {"thresholds": ...} (never-merge thresholds on an unpatched model)."""
    from .methods import ToMe

    patch = get_patch(model)
    if patch is None:
        return {"thresholds": None}
    if patch.state.mode == "fixed":
        return {"merge": ToMe(r=patch.state.budgets[0])}
    return {"thresholds": patch.thresholds}


def tome_r_for(tokens: float, model):
    """ToMe with the smallest r whose fixed schedule leaves the count nearest ``tokens`` at the read layer.

    tokens: visual tokens as ``dymu.encode`` counts them (CLS not counted), e.g. the mean of DToMe on a data set.
    model: a model ``dymu.apply`` takes, or its ``dymu.vision.TowerInfo``.
    """
    from . import merge as M
    from .methods import ToMe
    from .vision import TowerInfo

    info = model if isinstance(model, TowerInfo) else tower_info(model)
    if not 0 <= tokens <= info.num_patches:
        raise DymuError(f"tokens must be between 0 and {info.num_patches} (the patches of the encoder), got {tokens}")
    return ToMe(r=M.fixed_r_for(tokens + info.protected, info.num_tokens, info.protected, info.merge_layers))


def remove(model: nn.Module) -> nn.Module:
    """Restore the original model exactly (no-op on an unpatched model)."""
    from .llava import unpatch_vlm

    unpatch_tower(model)
    unpatch_vlm(model)
    return model


def is_applied(model: nn.Module) -> bool:
    return get_patch(model) is not None


def _origin(thresholds: Thresholds) -> str:
    return thresholds.path or f"thresholds ({thresholds.source})"
