"""Encoding images with the vision-tower adapter: ``encode`` runs a (patched or temporarily never-merging) tower up
to the layer a model reads and returns each image's merged tokens, sizes and merge groups."""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .errors import DymuError
from .vision import get_patch, patch_tower, tower_info, unpatch_tower


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
