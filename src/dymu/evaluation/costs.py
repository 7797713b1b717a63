"""Per-sample costs of one generated batch, from dymu's own counters: the visual tokens the language model got and
the prefill FLOPs (vision tower + projector + language model, ``dymu.flops`` cache-aware counter) of the method and
of the same prompt unmerged.

As ``toyvlm.baselines`` counts a question: the vision side at each image's measured per-layer token counts
(``dymu.llava.last_encoding``), the language side from the plan the prefill ran (``dymu.llava.last_prefill_plan``,
``dymu.flops.plan_shapes`` of the row), or from the counts alone when nothing ran a plan.
"""

from __future__ import annotations

from .. import flops as F


def batch_costs(model, input_ids, attention_mask, images_per_row: list[int], vtu: str) -> list[dict]:
    """One dict per row of a batch ``model`` just generated: ``visual_tokens`` (unique image tokens entering the
    language model, all the row's images), ``flops`` and ``stock_flops`` (prefill, vision + language model).

    input_ids / attention_mask: (batch, prompt) as given to ``generate`` (placeholders compact when ``vtu`` is
    "none"); images_per_row: images of each row, in batch order."""
    from ..llava import cls_tokens, get_vlm_patch, last_encoding, last_prefill_plan, placeholders_per_image
    from ..vision import tower_info

    info = tower_info(model)
    decoder = F.Decoder.from_config(model.config)
    cls = cls_tokens(model.config, info)
    per_image = placeholders_per_image(model.config, info)
    patched = get_vlm_patch(model) is not None
    encoding = last_encoding(model) if patched else None
    plan = last_prefill_plan(model) if patched else None
    merging = F.merging_layers(model, info)
    stock_vision = F.vision_flops(info, decoder.hidden, cls=cls)
    image_token = model.config.image_token_id
    rows, first = [], 0
    for row, count in enumerate(images_per_row):
        images = range(first, first + count)
        first += count
        ids = input_ids[row][attention_mask[row].bool()]
        placeholders = int((ids == image_token).sum())
        text = int(ids.numel()) - placeholders
        positions = per_image * count
        if encoding is None:
            tokens, vision = positions, stock_vision * count
        else:
            tokens = sum(encoding.num_tokens[i] + cls for i in images)
            vision = sum(F.vision_flops(info, decoder.hidden, encoding.layer_tokens[i], merging, cls) for i in images)
        if plan is not None:
            language = F.plan_shapes(plan, row, vtu)
        else:
            language = F.language_plan(F.Prompt(text, positions, tokens), decoder.layers, vtu if patched else "fast")
        stock = F.language_plan(F.Prompt(text, positions, positions), decoder.layers)
        rows.append({"visual_tokens": tokens,
                     "flops": vision + F.prefill_flops(decoder, language).flops,
                     "stock_flops": stock_vision * count + F.prefill_flops(decoder, stock).flops})
    return rows
