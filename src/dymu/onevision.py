"""LLaVA-OneVision's token layout for merged AnyRes crops: which merge group every position of the stock layout holds.

OneVision lays an image out as its base crop (27 x 27 tokens), then the grid crops as one spatial map, unpadded to
the image's aspect ratio, bilinearly scaled down when it exceeds ``anyres_max_N`` crops' worth of tokens, with an
``image_newline`` token after every row (``LlavaOnevisionModel.pack_image_features``). dymu keeps that layout: the
language model sees exactly the stock positions. With merging, every patch of a crop holds its merge group's token,
so a position of the layout holds one group when every bilinear tap that feeds it (weight > 0) falls in that group,
and a blend of groups otherwise.

Rather than re-deriving OneVision's arithmetic, ``layouts`` runs the model's own ``pack_image_features`` on a probe:
three float64 channels per patch, (g, g², 0) with g = 1 + the patch's group id (crop-major numbering), and (0, 0, 1)
as the newline. A packed position is a newline iff channel 2 is 1; it holds one group iff the variance of g over its
taps, E[g²] - E[g]², is 0 (up to rounding), and then that group is E[g] - 1. Everything else gets a token of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: probe channels: group id + 1, its square, newline flag
PROBE_CHANNELS = 3
#: a packed position holds one group when the variance of its taps' ids is below this fraction of E[g]² + 1.
#: fp64 rounding of E[g²] is ~1e-16 relative; a real blend of two ids has variance >= w(1-w) >= ~1e-3 for the
#: bilinear weights w OneVision's down-scaling produces (ids up to ~10^4, so the threshold stays below 1e-4).
MIX_TOLERANCE = 1e-12


@dataclass
class ImageLayout:
    """One image in the stock OneVision layout (``positions`` = its placeholder tokens)."""

    ids: torch.Tensor  # (positions,) long: the token every position holds (a group id < num_groups, or its own)
    single: torch.Tensor  # (positions,) bool: the position holds exactly one merge group (ids < num_groups)
    newline: torch.Tensor  # (positions,) bool: an image_newline position (a token of its own, never merged)
    num_groups: int  # merge groups over all crops of the image (crop-major numbering)

    @property
    def num_positions(self) -> int:
        return int(self.ids.numel())

    def first_positions(self) -> torch.Tensor:
        """(tokens,) the first position of every token the layout holds, in order: the compact sequence."""
        n = int(self.ids.max()) + 1 if self.num_positions else 0
        first = torch.full((n,), self.num_positions, dtype=torch.long, device=self.ids.device)
        first = first.scatter_reduce(0, self.ids, torch.arange(self.num_positions, device=self.ids.device), reduce="amin")
        return first[first < self.num_positions].sort().values


def crop_ids(sources: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
    """One image's crops: each crop's (patches,) group index -> (crops, patches) ids numbered crop-major, and the
    number of groups."""
    ids, offset = [], 0
    for source in sources:
        ids.append(source + offset)
        offset += int(source.max()) + 1
    return torch.stack(ids), offset


def layouts(pack, sources: list[list[torch.Tensor]], image_sizes, vision_aspect_ratio: str) -> list[ImageLayout]:
    """The stock layout of every image. pack: the model's ``pack_image_features``; sources[i]: image i's crops,
    each a (patches,) group index per patch (raster order within the crop)."""
    probes, groups = [], []
    for image_sources in sources:
        ids, n = crop_ids(image_sources)
        g = ids.to(torch.float64) + 1  # (crops, patches)
        probes.append(torch.stack((g, g * g, torch.zeros_like(g)), dim=-1))  # (crops, patches, PROBE_CHANNELS)
        groups.append(n)
    device = probes[0].device if probes else None
    newline = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64, device=device)
    packed, _ = pack(probes, image_sizes, image_newline=newline, vision_aspect_ratio=vision_aspect_ratio)
    return [_read_probe(out, n) for out, n in zip(packed, groups)]


def _read_probe(out: torch.Tensor, num_groups: int) -> ImageLayout:
    """(positions, PROBE_CHANNELS) packed probe -> ``ImageLayout``."""
    newline = out[:, 2] > 0.5
    mean = out[:, 0]
    variance = out[:, 1] - mean * mean
    single = ~newline & (variance.abs() <= MIX_TOLERANCE * (mean * mean + 1))
    ids = (mean.round().long() - 1).clamp(min=0)
    own = ~single
    ids[own] = num_groups + torch.arange(int(own.sum()), device=ids.device)
    return ImageLayout(ids=ids, single=single, newline=newline, num_groups=num_groups)
