"""Per-sample costs of one generated batch, from dymu's own counters: the visual tokens the language model got and
the prefill FLOPs (vision tower + projector + language model, ``dymu.flops`` cache-aware counter) of the method and
of the same prompt unmerged.

Each batch row is counted by ``dymu.flops.row_prefill`` (which ``dymu.flops.last_prefill`` uses for a lone prompt):
the vision side over the row's images' crops (LLaVA-1.5: one per image; LLaVA-OneVision: base + AnyRes grid crops,
``dymu.llava.last_crops``) at each crop's measured per-layer token counts (``dymu.llava.last_encoding``), the visual
tokens and stock placeholder positions of the row's images (``dymu.llava.last_images``: OneVision's layout tokens,
newlines included), the language side from the plan the prefill ran, or from the counts alone when nothing ran a
plan. An unpatched model costs its stock figures: its placeholders, every crop unmerged.
"""

from __future__ import annotations

import itertools

from .. import flops as F
from ..errors import DymuError


def batch_costs(model, input_ids, attention_mask, images_per_row: list[int], vtu: str, image_sizes=None,
                batch_num_images=None) -> list[dict]:
    """One dict per row of a batch ``model`` just generated: ``visual_tokens`` (unique image tokens entering the
    language model, all the row's images), ``flops`` and ``stock_flops`` (prefill, vision + language model).

    input_ids / attention_mask: (batch, prompt) as given to ``generate`` (placeholders compact when ``vtu`` is
    "none"); images_per_row: images of each row, in batch order; image_sizes / batch_num_images: the processor's
    (OneVision: each image's crops when the model is not patched, which then records none)."""
    from ..llava import get_vlm_patch, last_crops, last_encoding, last_images

    patched = get_vlm_patch(model) is not None
    encoding = last_encoding(model) if patched else None
    count = sum(images_per_row)
    if encoding is not None:
        images, crops, crop_tokens = last_images(model), last_crops(model), encoding.layer_tokens
        if len(images) != count or len(encoding) != sum(crops):
            raise DymuError(f"the model last encoded {len(images)} image(s) ({len(encoding)} crops) but the batch has "
                            f"{count}: count the costs right after the batch's generate")
    else:  # unpatched: every placeholder its own token, every crop unmerged
        images, crops = None, image_crops(model, count, image_sizes, batch_num_images)
        crop_tokens = [None] * sum(crops)
    first_crop = list(itertools.accumulate([0, *crops]))  # image i's crops: first_crop[i] .. first_crop[i + 1] - 1
    image_token = model.config.image_token_id
    rows, first = [], 0
    for row, count in enumerate(images_per_row):
        own = range(first, first + count)  # the row's images
        first += count
        ids = input_ids[row][attention_mask[row].bool()]
        placeholders = int((ids == image_token).sum())
        row_images = [images[i] for i in own] if images is not None else [(placeholders, placeholders)]
        cost = F.row_prefill(model, row, int(ids.numel()) - placeholders, row_images,
                             crop_tokens[first_crop[own.start]:first_crop[own.stop]], vtu)
        rows.append({"visual_tokens": sum(tokens for _, tokens in row_images),
                     "flops": cost.vision + F.prefill_flops(cost.decoder, cost.plan).flops,
                     "stock_flops": cost.stock_vision + F.prefill_flops(cost.decoder, cost.stock_plan).flops})
    return rows


def image_crops(model, count: int, image_sizes=None, batch_num_images=None) -> list[int]:
    """Tower passes (crops) of each of ``count`` images the stock ``model`` reads: 1 each for LLaVA-1.5; OneVision's
    AnyRes crops from the processor's ``image_sizes`` (``dymu.compat.onevision_crops``, as the model splits them)."""
    from .. import compat
    from ..llava import is_onevision

    if not is_onevision(model):
        return [1] * count
    if image_sizes is None:
        raise DymuError("LLaVA-OneVision: the costs of an unpatched model need the processor's image_sizes")
    crops = compat.onevision_crops(getattr(model, "model", model), image_sizes, batch_num_images)
    if len(crops) != count:
        raise DymuError(f"image_sizes hold {len(crops)} image(s) but the batch has {count}")
    return crops
