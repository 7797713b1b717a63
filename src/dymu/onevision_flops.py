"""LLaVA-OneVision from a config alone (``dymu flops``): one image's AnyRes crops and the stock token layout its
language model reads, without weights.

The counts come from the model's own code: transformers' crop count of an image size (``compat.anyres_crops``,
what ``LlavaOnevisionModel.get_image_features`` splits by) and its ``pack_image_features`` run on an unmerged probe
(``dymu.onevision.layouts``, called on a config-only stand-in by ``compat.onevision_pack``): the base crop, the grid
unpadded to the image's aspect ratio, bilinearly down-scaled beyond ``anyres_max_N`` crops' worth of tokens, an
``image_newline`` after every grid row. The unmerged counts are therefore exact.

Merged, each crop's token count is given (thresholds' measured mean per crop, or ``--image-tokens``): the vision
side is exact for crops that merge to it. Which merge groups the unpadded, down-scaled grid keeps and how many of
its positions blend groups depends on the image, so the language model's unique tokens are an estimate
(``estimated_tokens``): the crops' merged share of their patches applied to the layout's positions, plus the
newlines. It is exact when nothing merges, and when every crop merges to that count and the grid needs neither
unpadding nor down-scaling (every patch of every crop is a position).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from . import compat
from . import flops as F
from . import onevision as O
from .errors import DymuError

#: dymu flops: the image a OneVision count assumes by default, (width, height): a typical landscape photo, which
#: llava-onevision-qwen2-7b reads as its base crop and a 2 x 3 grid of 384 px crops (7 tower passes), the grid's
#: 54 x 81 tokens unpadded to 54 x 77
DEFAULT_IMAGE_SIZE = (1000, 700)
_SIZE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


def parse_image_size(text: str | None) -> tuple[int, int]:
    """"WIDTHxHEIGHT" in pixels -> (width, height); None -> ``DEFAULT_IMAGE_SIZE``."""
    if text is None:
        return DEFAULT_IMAGE_SIZE
    match = _SIZE.match(str(text))
    if match is None or min(int(match[1]), int(match[2])) < 1:
        width, height = DEFAULT_IMAGE_SIZE
        raise DymuError(f"--image-size must be WIDTHxHEIGHT in pixels, e.g. {width}x{height}; got {text!r}")
    return int(match[1]), int(match[2])


@dataclass(frozen=True)
class AnyresImage:
    """One image as an unpatched LLaVA-OneVision reads it (alone in its prompt)."""

    width: int
    height: int
    crops: int  # tower passes: the base crop + the AnyRes grid crops
    patches: int  # patches (tokens) of one crop
    positions: int  # stock image placeholder positions: base crop + unpadded (down-scaled) grid + newlines
    newlines: int  # image_newline positions (one per grid row)
    blends: int  # grid positions that mix several patches (bilinear down-scaling; 0 when not down-scaled)

    @property
    def layout_patches(self) -> int:
        """Positions holding patches (base and grid), newlines excluded."""
        return self.positions - self.newlines

    @property
    def every_patch_placed(self) -> bool:
        """The grid is neither unpadded nor down-scaled: every patch of every crop is one position."""
        return self.layout_patches == self.crops * self.patches and not self.blends


def anyres_image(config, width: int, height: int) -> AnyresImage:
    """The crops and stock layout of a ``width`` x ``height`` image under the OneVision ``config`` (no weights)."""
    vision = config.vision_config
    if config.vision_feature_select_strategy != "full":
        raise DymuError(f"LLaVA-OneVision with vision_feature_select_strategy={config.vision_feature_select_strategy!r}: "
                        "dymu counts \"full\" (SigLIP has no CLS token to drop)")
    patches = (vision.image_size // vision.patch_size) ** 2
    [crops] = compat.anyres_crops([(height, width)], config.image_grid_pinpoints, vision.image_size)
    unmerged = [torch.arange(patches) for _ in range(crops)]  # every patch its own group
    [layout] = O.layouts(compat.onevision_pack(config), [unmerged], torch.tensor([[height, width]]),
                         config.vision_aspect_ratio)
    newline = layout.newline
    return AnyresImage(width=width, height=height, crops=crops, patches=patches, positions=layout.num_positions,
                       newlines=int(newline.sum()), blends=int((~layout.single & ~newline).sum()))


def estimated_tokens(image: AnyresImage, tokens_per_crop: int) -> int:
    """Unique image tokens the language model gets when every crop merges to ``tokens_per_crop`` (an estimate, module
    docstring): the layout's patch positions x tokens_per_crop / patches, rounded, plus the newlines."""
    return round(image.layout_patches * tokens_per_crop / image.patches) + image.newlines


def prompts(image: AnyresImage, text: int, tokens_per_crop: int | None = None) -> tuple[F.Prompt, F.Prompt]:
    """(unmerged, merged) ``dymu.flops.Prompt`` of one image and ``text`` text tokens; ``tokens_per_crop`` None:
    nothing merges (both unmerged)."""
    stock = F.Prompt(text, image.positions, image.positions, image.newlines)
    if tokens_per_crop is None or tokens_per_crop >= image.patches:
        return stock, stock
    return stock, F.Prompt(text, image.positions, estimated_tokens(image, tokens_per_crop), image.newlines)


@dataclass(frozen=True)
class ConfigPrefill(F.ConfigPrefill):
    """``dymu.flops.ConfigPrefill`` of one image under a OneVision config (vision: every crop through the tower and
    the projector), with the image's AnyRes reading."""

    image: AnyresImage = field(kw_only=True)

    @property
    def estimated(self) -> bool:
        """The plan's language-model figures are an estimate (module docstring)."""
        return self.prompt.image_tokens != self.stock.image_tokens and not self.image.every_patch_placed


def config_prefill(config, image: AnyresImage, text: int, layer_tokens: list[int] | None = None,
                   merging=False, vtu: str = "fast", prune=None) -> ConfigPrefill:
    """``image`` with ``text`` text tokens under OneVision ``config``: every crop's tokens after each executed tower
    layer ``layer_tokens`` (None: unmerged), ``merging``: which of those layers compute the matching; the language
    model in VTU mode ``vtu`` with pruning ``prune`` (a ``dymu.methods`` spec or object)."""
    stock, prompt = prompts(image, text, None if layer_tokens is None else layer_tokens[-1])
    return ConfigPrefill.count(config, stock, prompt, layer_tokens, merging, vtu, prune, crops=image.crops, image=image)


def describe(image: AnyresImage) -> str:
    """One line: the image's crops and stock layout."""
    grid = image.layout_patches - image.patches
    scaled = ", bilinearly down-scaled" if image.blends else ""
    return (f"one {image.width}x{image.height} image: {image.crops} AnyRes crops of {image.patches} patches (base + "
            f"{image.crops - 1} grid), {image.positions} stock positions in the language model (base {image.patches}, "
            f"grid {grid}{scaled}, {image.newlines} newlines)")
