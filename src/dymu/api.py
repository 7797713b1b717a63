"""Public Python API: apply / remove / encode."""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .thresholds import Thresholds, as_thresholds
from .errors import DymuError
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
    if isinstance(merge, ToMe):
        patch_tower(model, merges=[merge.r] * info.num_layers)
    else:
        thresholds = as_thresholds([math.inf] * info.num_layers if thresholds is None else thresholds)
        thresholds.check(info.identity(), origin=_origin(thresholds))
        patch_tower(model, thresholds.values)
        get_patch(model).thresholds = thresholds
    if is_vlm(model) and not supports_language_side(model):
        warnings.warn(f"dymu: {type(model).__name__}: only the vision tower merges (use dymu.encode); "
                      "generation with merged tokens is supported for LLaVA-1.5 so far", stacklevel=2)
    elif is_vlm(model):
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


@dataclass
class Encoding:
    """Per-image result of ``dymu.encode`` (lists indexed by image).

    tokens[i]: (n_i, dim) merged token features at the layer the model is read at: the output of that
        encoder layer, before any post-layernorm (for a bare CLIP this is ``last_hidden_state``; for a bare
        SigLIP it is ``hidden_states[-1]``, i.e. ``last_hidden_state`` without ``post_layernorm``), CLS excluded.
    sizes[i]: (n_i,) how many patches each token covers (sums to the patch count).
    source[i]: (num_patches,) for every original patch (raster order), the index of the token holding it.
    cls[i]: (dim,) the CLS token for encoders that have one, else None.
    layer_tokens[i]: tokens (CLS excluded) after each executed layer.
    """

    tokens: list
    sizes: list
    source: list
    cls: list
    layer_tokens: list
    num_patches: int

    @property
    def num_tokens(self) -> list[int]:
        return [int(t.shape[0]) for t in self.tokens]

    def __len__(self) -> int:
        return len(self.tokens)


@contextmanager
def _temporarily_patched(model: nn.Module):
    """Yield the active patch; an unpatched model gets a never-merge patch for the duration."""
    patch = get_patch(model)
    if patch is not None:
        yield patch
        return
    info = tower_info(model)
    patch_tower(model, [math.inf] * info.num_layers)
    try:
        yield get_patch(model)
    finally:
        unpatch_tower(model)


def _check_pixels(pixel_values, info) -> torch.Tensor:
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
        shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
        raise DymuError(f"pixel_values must be a (batch, 3, height, width) tensor, got {shape}")
    if pixel_values.shape[-1] != info.image_size or pixel_values.shape[-2] != info.image_size:
        raise DymuError(
            f"pixel_values are {pixel_values.shape[-2]}x{pixel_values.shape[-1]} but the encoder takes {info.image_size}x{info.image_size}"
        )
    parameter = next(info.tower.parameters())
    return pixel_values.to(device=parameter.device, dtype=parameter.dtype, non_blocking=True)  # async from pinned memory


def run_encoder(patch, pixel_values: torch.Tensor) -> torch.Tensor:
    """Run the patched tower up to its read layer. Returns padded hidden states (batch, tokens, dim)."""
    info = patch.state.info
    patch.state.run_until = info.read_layer
    try:
        with torch.no_grad():
            return info.tower.encoder(inputs_embeds=info.embed(pixel_values)).last_hidden_state
    finally:
        patch.state.run_until = None


def encode(model: nn.Module, pixel_values: torch.Tensor) -> Encoding:
    """Encode a batch with the model's current merging (none if ``dymu.apply`` was not called)."""
    info = tower_info(model)
    pixel_values = _check_pixels(pixel_values, info)
    with _temporarily_patched(model) as patch:
        hidden = run_encoder(patch, pixel_values)  # (batch, tokens, dim)
        state = patch.state
        p = info.protected
        lengths = state.lengths.tolist()
        result = Encoding(tokens=[], sizes=[], source=[], cls=[], layer_tokens=[], num_patches=info.num_patches)
        per_layer = torch.stack(state.layer_lengths, dim=1) - p  # (batch, executed layers)
        for b, n in enumerate(lengths):
            result.tokens.append(hidden[b, p:n])
            if state.sizes is None:
                result.sizes.append(torch.ones(n - p, dtype=torch.long, device=hidden.device))
            else:
                result.sizes.append(state.sizes[b, p:n].round().long())
            result.source.append(state.source[b, p:] - p)
            result.cls.append(hidden[b, 0] if p else None)
            result.layer_tokens.append(per_layer[b].tolist())
    return result
