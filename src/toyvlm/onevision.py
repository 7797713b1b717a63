"""The toy LLaVA-OneVision: what ``python -m toyvlm.train --arch onevision`` needs beyond the toy LLaVA's recipe.

The model is a stock ``LlavaOnevisionForConditionalGeneration``: a SigLIP tower (no CLS, read at its last layer,
``full`` feature strategy), the two-layer projector, a learned ``image_newline`` and a Qwen2 language model (q/k/v
biases, grouped-query attention). Its processor is the stock ``LlavaOnevisionProcessor`` as dymu builds it
(``dymu.models.onevision_processor_for``, no torchvision), with the toy's word-level tokenizer (plus ``<video>``)
and the toy LLaVA's prompt format.

**Images.** Every scene is rendered at a size of its own (:data:`IMAGE_SHAPES`, the scene's fourth seeded stream,
:func:`scene_shape`): the square scene stretched to ``width x height``, so every question stays true. At the
default 112 px crops the sizes give 2-5 AnyRes crops (base + a 1x2, 2x1, 1x3, 3x1 or 2x2 grid of the
:data:`GRID_CROPS` pinpoints); unpadding happens for every grid whose aspect ratio differs from the image's, and
``anyres_max_3`` scales the 2x2 grids of square images (16 x 16 -> 13 x 13 tokens) bilinearly down.

**Dense targets through the stock geometry.** The training-only targets of the toy LLaVA (per-patch colour / shape
/ centre / letter, the patches of every object and of the letter) are made here per crop by the processor itself:
a probe map of the scene (object ids, the letter's box and anchor, object centres) is cut into crops by the image
processor's own ``get_image_patches`` with nearest resampling (:func:`probe_crops`), and the per-crop object covers
are laid out like image tokens by the model's own ``pack_image_features`` (:func:`layout_masks`), so a target sits
exactly where the language model sees the token it describes (base crop, unpadded grid, down-scaled blend,
newlines never marked).

**Warm start.** ``init_from`` (default ``assets/toy-llava``): the Qwen2 language model starts as the toy LLaVA's
Llama (same shapes, same tokenizer ids; Qwen2's q/k/v biases start at zero, so it computes exactly what the Llama
computes, tested), as the real OneVision starts from a trained language model. The tower, projector and newline are
new; the stage-1 tower pre-training then does not move the word embeddings the language model already reads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import data as D
from . import train as T

#: AnyRes grids (rows, columns of crops) the image processor may choose (its ``image_grid_pinpoints``)
GRID_CROPS = ((1, 1), (1, 2), (2, 1), (2, 2), (1, 3), (3, 1))
#: rendered sizes (width, height) in eighths of a crop (14 px at 112 px crops): square, 4:3, 2:1, 3:1 and 7:4 images
IMAGE_SHAPES = ((16, 16), (20, 20), (12, 12), (16, 12), (12, 16), (20, 15), (15, 20), (16, 8), (8, 16), (24, 8),
                (8, 24), (14, 8), (8, 14))
SHAPE_UNITS_PER_CROP = 8
#: the probe map's channels (:func:`probe_map`)
PROBE_IDS, PROBE_LABEL, PROBE_CENTRES = 0, 1, 2
#: in the label channel: 1 = the letter's box, 2 = its anchor mark
LABEL_BOX, LABEL_ANCHOR = 1, 2
#: half side of the centre / anchor marks on the reference canvas (pixels): small, so a mark falls in one patch
#: (or two at a crop border; the patch with most of it wins)
MARK_HALF = 2
#: the layout value of newline positions in :func:`layout_masks` (never >= a cover threshold)
NEWLINE_PROBE = -1.0
VIDEO_TOKEN = "<video>"


def grid_pinpoints(crop: int) -> list[list[int]]:
    """AnyRes resolutions (height, width) in pixels for ``crop`` px crops."""
    return [[crop * rows, crop * columns] for rows, columns in GRID_CROPS]


def shape_pixels(shape: tuple[int, int], crop: int) -> tuple[int, int]:
    """(width, height) in pixels of an :data:`IMAGE_SHAPES` entry at ``crop`` px crops."""
    return tuple(round(units * crop / SHAPE_UNITS_PER_CROP) for units in shape)


def scene_shape(split: str, seed: int, index: int, crop: int) -> tuple[int, int]:
    """(width, height) of scene ``index`` of ``split``: from the scene's fourth seeded stream (the first three are
    :func:`toyvlm.data.split_rngs`', unchanged by spawning a fourth)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, D.SPLIT_CODES[split], index]).spawn(4)[3])
    return shape_pixels(IMAGE_SHAPES[int(rng.integers(len(IMAGE_SHAPES)))], crop)


def render(scene: D.Scene, size: tuple[int, int]) -> Image.Image:
    """The scene rendered square at the longer side and stretched to ``size`` = (width, height)."""
    side = max(size)
    image = D.render(scene, side)
    return image if tuple(size) == (side, side) else image.resize(tuple(size), Image.Resampling.BILINEAR)


@dataclass
class AnyresExample(D.Example):
    """A :class:`toyvlm.data.Example` rendered at its scene's own size (:func:`render`), as the toy OneVision is
    trained and tested."""

    size: tuple[int, int] | None = None  # (width, height) in pixels

    @property
    def image(self) -> Image.Image:
        if self._image is None:
            self._image = render(self.scene, self.size)
        return self._image


def anyres_split(name: str, seed: int, num_scenes: int, crop: int, per_kind: int = D.DEFAULT_PER_KIND) -> list:
    """:func:`toyvlm.data.make_split`'s examples, each at its scene's size (:func:`scene_shape` at ``crop`` px crops):
    the toy OneVision's test set when ``name`` is "test"."""
    examples = D.make_split(name, seed, num_scenes, crop, per_kind)
    return [AnyresExample(**{f.name: getattr(e, f.name) for f in fields(e)}, size=example_size(e, seed, crop))
            for e in examples]


def probe_map(scene: D.Scene, size: tuple[int, int]) -> np.ndarray:
    """(height, width, 3) uint8 map with :func:`render`'s geometry: object id + 1 (0 = background), the letter's box
    (LABEL_BOX, its anchor LABEL_ANCHOR) and each object's centre mark (object id + 1)."""
    side = max(size)
    scale = side / D.SCENE_SIZE
    probe = np.zeros((side, side, 3), dtype=np.uint8)
    probe[..., PROBE_IDS] = D.object_id_map(scene, side)
    mark = max(1, round(MARK_HALF * scale))

    def paint(channel: int, x: float, y: float, half: float, value: int) -> None:
        top, left = max(0, int(y - half)), max(0, int(x - half))
        probe[top : int(math.ceil(y + half)), left : int(math.ceil(x + half)), channel] = value

    label = D.label_position(scene, side)
    if label is not None:
        x, y, _ = label
        paint(PROBE_LABEL, x, y, D.LABEL_FONT_SIZE * scale / 2, LABEL_BOX)
        paint(PROBE_LABEL, x, y, mark, LABEL_ANCHOR)
    for index, obj in enumerate(scene.objects):
        paint(PROBE_CENTRES, obj.x * scale, obj.y * scale, mark, index + 1)
    image = Image.fromarray(probe)
    if tuple(size) != (side, side):
        image = image.resize(tuple(size), Image.Resampling.NEAREST)
    return np.asarray(image)


def probe_crops(image_processor, probe: np.ndarray, crop: int) -> np.ndarray:
    """(crops, 3, crop, crop) uint8: ``probe`` (height, width, 3) cut into the AnyRes crops (base first) by the
    image processor's own ``get_image_patches`` with nearest resampling (the pixels' crops use its own resampling)."""
    from transformers.image_utils import PILImageResampling

    crops = image_processor.get_image_patches(np.ascontiguousarray(probe.transpose(2, 0, 1)),
                                              image_processor.image_grid_pinpoints, size=(crop, crop),
                                              patch_size=crop, resample=PILImageResampling.NEAREST)
    return np.stack(crops)


def _per_patch(values: np.ndarray, patch: int) -> np.ndarray:
    """(crops, crop, crop) -> (crops, patches, patch * patch) pixels of every patch, raster order."""
    crops, side, _ = values.shape
    grid = side // patch
    return values.reshape(crops, grid, patch, grid, patch).transpose(0, 1, 3, 2, 4).reshape(crops, grid * grid, -1)


def crop_targets(scene: D.Scene, crops: np.ndarray, patch: int) -> tuple[np.ndarray, np.ndarray]:
    """Per crop: the toy LLaVA's auxiliary targets (crops, len(AUX_CLASSES) + 2, patches) int64 (colour, shape,
    centre, letter, row, column within the crop, as :func:`toyvlm.train.patch_targets`) and the covers
    (crops, patches, MAX_OBJECTS + 1) float: the fraction of each patch each object covers, and (last column) the
    letter box's. ``crops``: :func:`probe_crops`."""
    AUX_CLASSES, LETTER_HEAD, MIN_PATCH_COVER = T.AUX_CLASSES, T.LETTER_HEAD, T.MIN_PATCH_COVER
    ids = _per_patch(crops[:, PROBE_IDS], patch)  # (crops, patches, pixels)
    label = _per_patch(crops[:, PROBE_LABEL], patch)
    centres = _per_patch(crops[:, PROBE_CENTRES], patch)
    count, patches = ids.shape[:2]
    grid = int(math.isqrt(patches))
    covers = np.zeros((count, patches, D.MAX_OBJECTS + 1), dtype=np.float32)
    for k in range(len(scene.objects)):
        covers[..., k] = (ids == k + 1).mean(-1)
    covers[..., D.MAX_OBJECTS] = (label >= LABEL_BOX).mean(-1)
    targets = np.zeros((count, len(AUX_CLASSES) + 2, patches), dtype=np.int64)
    targets[:, -2], targets[:, -1] = np.divmod(np.arange(patches), grid)
    if scene.objects:
        objects = covers[..., : len(scene.objects)]
        best, covered = objects.argmax(-1), objects.max(-1) >= MIN_PATCH_COVER  # (crops, patches)
        colour = np.array([D.COLOURS.index(o.colour) + 1 for o in scene.objects])
        shape = np.array([D.SHAPES.index(o.shape) + 1 for o in scene.objects])
        targets[:, 0] = np.where(covered, colour[best], 0)
        targets[:, 1] = np.where(covered, shape[best], 0)
        for k, code in enumerate(shape):
            marked = (centres == k + 1).sum(-1)  # (crops, patches)
            for c in np.flatnonzero(marked.max(-1) > 0):
                targets[c, 2, marked[c].argmax()] = code
        letter = next((o.label for o in scene.objects if o.label), None)
        anchor = (label == LABEL_ANCHOR).sum(-1)
        for c in np.flatnonzero(anchor.max(-1) > 0) if letter else []:
            targets[c, LETTER_HEAD, anchor[c].argmax()] = D.LABEL_LETTERS.index(letter) + 1
    return targets, covers


def layout_masks(pack, covers: list[torch.Tensor], image_sizes, vision_aspect_ratio: str, scenes,
                 base_patches: int) -> list[torch.Tensor]:
    """Per image, (MAX_OBJECTS + 1, positions) bool in the stock layout the language model sees: the positions whose
    token shows each object (rows past the scene's objects all False) and, last row, the letter's box. Laid out by
    ``pack`` (the model's ``pack_image_features``) from the crops' covers (:func:`crop_targets`), so blends of the
    bilinear down-scaling carry blended covers and newline positions are never marked. As for the toy LLaVA
    (:func:`toyvlm.train.object_patches`): an object marks the positions it covers by at least MIN_PATCH_COVER, and
    always its best-covered one, separately in the base crop (the first ``base_patches`` positions) and the grid."""
    probes = [cover.to(torch.float64) for cover in covers]  # (crops, patches, MAX_OBJECTS + 1)
    newline = torch.full((D.MAX_OBJECTS + 1,), NEWLINE_PROBE, dtype=torch.float64)
    packed, _ = pack(probes, image_sizes, image_newline=newline, vision_aspect_ratio=vision_aspect_ratio)
    masks = []
    for layout, scene in zip(packed, scenes):  # layout: (positions, MAX_OBJECTS + 1)
        mask = torch.zeros(layout.shape[::-1], dtype=torch.bool)
        for part in (slice(0, base_patches), slice(base_patches, layout.shape[0])):
            cover = layout[part].T  # (MAX_OBJECTS + 1, part positions)
            best = cover.max(-1, keepdim=True).values
            marked = (cover >= torch.clamp(best, max=T.MIN_PATCH_COVER)) & (best > 0)
            marked[len(scene.objects) : D.MAX_OBJECTS] = False
            marked[D.MAX_OBJECTS] = cover[D.MAX_OBJECTS] > 0  # the letter box: every position it overlaps
            mask[:, part] = marked
        masks.append(mask)
    return masks


def build_tokenizer():
    """The toy LLaVA's word-level tokenizer plus OneVision's ``<video>`` placeholder (appended: every other id stays)."""
    tokenizer = T.build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", VIDEO_TOKEN]})
    tokenizer.video_token = VIDEO_TOKEN
    return tokenizer


def build_model(config, tokenizer):
    """(LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor) with fresh weights, or with the language
    model of the toy LLaVA in ``config.init_from`` (:func:`warm_start`)."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config, SiglipVisionConfig

    from dymu.models import onevision_processor_for
    from dymu.tokenizer import CHAT_TEMPLATE

    crop = config.image_size  # the crop size: the tower's image size
    vocab = math.ceil(len(tokenizer) / T.VOCAB_MULTIPLE) * T.VOCAB_MULTIPLE
    vision = SiglipVisionConfig(hidden_size=config.vision_hidden, intermediate_size=4 * config.vision_hidden,
                                num_hidden_layers=config.vision_layers, num_attention_heads=config.vision_heads,
                                image_size=crop, patch_size=config.patch_size, vision_use_head=False)
    text = Qwen2Config(hidden_size=config.text_hidden, intermediate_size=int(8 / 3 * config.text_hidden),
                       num_hidden_layers=config.text_layers, num_attention_heads=config.text_heads,
                       num_key_value_heads=config.text_kv_heads, vocab_size=vocab, max_position_embeddings=1024,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    ov = LlavaOnevisionConfig(vision_config=vision, text_config=text, image_grid_pinpoints=grid_pinpoints(crop),
                              image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                              video_token_index=tokenizer.convert_tokens_to_ids(VIDEO_TOKEN), vision_feature_layer=-1,
                              vision_feature_select_strategy="full", vision_aspect_ratio=f"anyres_max_{config.anyres_max}")
    torch.manual_seed(config.seed)
    model = LlavaOnevisionForConditionalGeneration(ov)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if config.init_from:
        warm_start(model, config.init_from)
    processor = onevision_processor_for(ov, tokenizer)
    processor.chat_template = CHAT_TEMPLATE  # the toy's LLaVA-1.5 conversation format
    return model, processor


class InitError(T.ConfigError):
    """``init_from`` names no toy LLaVA whose language model fits."""


def warm_start(model, folder) -> None:
    """Copy the language model (decoder, final norm, word embeddings, output head) of the toy LLaVA saved in
    ``folder`` into ``model``'s Qwen2: same shapes but the vocabulary, whose shared rows are copied (the OneVision
    tokenizer only appends ``<video>``); Qwen2's q/k/v biases stay zero, so the copy computes what the Llama did."""
    from transformers import LlavaForConditionalGeneration

    path = Path(folder)
    if not (path / "config.json").is_file():
        raise InitError(f"--init-from {folder}: no model folder (config.json missing)")
    llava = LlavaForConditionalGeneration.from_pretrained(path)
    source = {**{f"model.{k}": v for k, v in llava.model.language_model.state_dict().items()},
              **{f"lm_head.{k}": v for k, v in llava.lm_head.state_dict().items()}}
    target = {**{f"model.{k}": v for k, v in model.model.language_model.state_dict().items()},
              **{f"lm_head.{k}": v for k, v in model.lm_head.state_dict().items()}}
    with torch.no_grad():
        for name, value in source.items():
            if name not in target:
                raise InitError(f"--init-from {folder}: its language model has {name}, this model has not")
            into = target[name]
            rows = min(into.shape[0], value.shape[0])
            if into.shape[1:] != value.shape[1:] or (into.shape[0] != value.shape[0] and "embed" not in name
                                                     and "lm_head" not in name):
                raise InitError(f"--init-from {folder}: {name} has shape {tuple(value.shape)}, this model "
                                f"{tuple(into.shape)}")
            into[:rows].copy_(value[:rows])


@dataclass
class ImageBatch:
    """Scenes as the stock OneVision model reads them, with their per-crop training targets."""

    scenes: list[D.Scene]
    pixel_values: torch.Tensor  # (images, most crops, 3, crop, crop) as the processor pads them
    image_sizes: torch.Tensor  # (images, 2) (height, width)
    crops: list[int]  # crops of each image, base first
    targets: torch.Tensor  # (all crops, len(AUX_CLASSES) + 2, patches): crop_targets, image-major
    covers: list[torch.Tensor]  # per image (crops, patches, MAX_OBJECTS + 1): crop_targets

    @property
    def base_rows(self) -> torch.Tensor:
        """(images,) index of every image's base crop among all crops."""
        return torch.tensor([0, *np.cumsum(self.crops)[:-1]], dtype=torch.long)

    def crop_pixels(self) -> torch.Tensor:
        """(all crops, 3, crop, crop): the real crops, image-major (as ``LlavaOnevisionModel.get_image_features``)."""
        return torch.cat([pixels[:count] for pixels, count in zip(self.pixel_values, self.crops)])


def image_batch(scenes: list[D.Scene], sizes: list[tuple[int, int]], image_processor, patch: int) -> ImageBatch:
    """:class:`ImageBatch` of ``scenes`` rendered at ``sizes`` (width, height)."""
    crop = image_processor.size["height"]
    processed = image_processor(images=[render(scene, size) for scene, size in zip(scenes, sizes)], return_tensors="pt")
    targets, covers, crops = [], [], []
    for scene, size in zip(scenes, sizes):
        target, cover = crop_targets(scene, probe_crops(image_processor, probe_map(scene, size), crop), patch)
        targets.append(torch.from_numpy(target))
        covers.append(torch.from_numpy(cover))
        crops.append(len(target))
    return ImageBatch(scenes, processed["pixel_values"], processed["image_sizes"], crops, torch.cat(targets), covers)


def example_size(example: D.Example, seed: int, crop: int) -> tuple[int, int]:
    """(width, height) of a :func:`toyvlm.data.make_split` example (its split and index are in its id)."""
    split, index = example.id.rsplit("_", 1)
    return scene_shape(split, seed, int(index), crop)


class SceneStream(T.SceneStream):
    """The toy LLaVA's stream of training scenes (the next scenes of split ``train``, each used once), each at its
    own size (:func:`scene_shape`), drawn as an :class:`ImageBatch`."""

    def __init__(self, seed: int, image_processor, patch_size: int):
        super().__init__(seed, image_processor.size["height"], patch_size)
        self.image_processor = image_processor

    def draw(self, rng, count: int, max_objects: int | None = None) -> ImageBatch:
        """:class:`ImageBatch` of the next ``count`` scenes (with at most ``max_objects``; ``rng`` is not used)."""
        scenes, sizes = [], []
        while len(scenes) < count:
            index = self.next_index
            scene = D.generate_scene(D.split_rngs("train", self.seed, index)[0])
            self.next_index += 1
            if max_objects is None or len(scene.objects) <= max_objects:
                scenes.append(scene)
                sizes.append(scene_shape("train", self.seed, index, self.image_size))
        return image_batch(scenes, sizes, self.image_processor, self.patch_size)


def tower_hidden(model, crops: torch.Tensor) -> torch.Tensor:
    """(crops, patches, vision hidden): the tower's features at ``vision_feature_layer`` (all patches: ``full``)."""
    return model.model.vision_tower(crops, output_hidden_states=True).hidden_states[model.config.vision_feature_layer]


def image_embeddings(model, aux_head, batch: ImageBatch, input_ids, words=None):
    """(input embeddings with every image's tokens in the stock layout (rows, tokens, text hidden), the tower's
    losses): the stock ``get_image_features`` (tower, projector, the model's ``pack_image_features``) and
    placeholder scatter, with the tower's features also fed to :func:`toyvlm.train.tower_losses` (the position
    read-out on base crops only)."""
    hidden = tower_hidden(model, batch.crop_pixels())  # (all crops, patches, vision hidden)
    projected, losses = T.tower_losses(model, aux_head, hidden, batch.targets, words, where_rows=batch.base_rows)
    packed, _ = model.model.pack_image_features(list(projected.split(batch.crops)), batch.image_sizes,
                                                image_newline=model.model.image_newline,
                                                vision_aspect_ratio=model.config.vision_aspect_ratio)
    embeds = model.get_input_embeddings()(input_ids)
    image_tokens = input_ids == model.config.image_token_id  # (rows, tokens)
    return embeds.masked_scatter(image_tokens[..., None], torch.cat(packed).to(embeds.dtype)), losses


def in_rows(values: list[torch.Tensor], image_tokens: torch.Tensor) -> torch.Tensor:
    """(rows, ..., tokens): row ``i``'s ``values[i]`` (..., positions) placed at its first image-token positions
    (zeros elsewhere)."""
    out = torch.zeros((*image_tokens.shape[:1], *values[0].shape[:-1], image_tokens.shape[1]), dtype=values[0].dtype)
    for row, value in enumerate(values):
        out[row, ..., image_tokens[row].nonzero()[: value.shape[-1], 0]] = value
    return out


class OneVisionRecipe(T.LlavaRecipe):
    """The toy OneVision's side of :func:`toyvlm.train.train` (see :class:`toyvlm.train.LlavaRecipe`). The
    pointing and counting targets are in sequence positions (the rows' image-token counts differ), the locate
    read-out's positions and the counted centres come from the base crop (the whole image on the tower's grid)."""

    def build(self):
        return build_model(self.config, build_tokenizer())

    @property
    def base(self) -> int:
        """Tokens of the base crop (the first of every image's layout)."""
        return (self.config.image_size // self.config.patch_size) ** 2

    def stream(self, processor) -> SceneStream:
        return SceneStream(self.config.seed, processor.image_processor, self.config.patch_size)

    def encoder(self, model, processor) -> T.ConversationEncoder:
        return T.ConversationEncoder(processor.tokenizer, None)

    def images(self, examples) -> list[Image.Image]:
        return [render(e.scene, example_size(e, self.config.seed, self.config.image_size)) for e in examples]

    def inputs(self, model, processor, images):
        return onevision_inputs(processor, images)

    def tower_losses(self, model, aux_head, scenes, rng, words) -> dict[str, torch.Tensor]:
        batch = scenes.draw(rng, self.config.tower_batch_size)
        return T.tower_losses(model, aux_head, tower_hidden(model, batch.crop_pixels()), batch.targets, words,
                              where_rows=batch.base_rows)[1]

    def step_losses(self, model, aux_head, scenes, rng, step: int, encoder, words) -> dict[str, torch.Tensor]:
        config = self.config
        batch = scenes.draw(rng, config.batch_size + config.describe_rows, T.object_limit(config, step))
        turns = T.conversation_turns(batch.scenes, rng, config)
        layouts = layout_masks(model.model.pack_image_features, batch.covers, batch.image_sizes,
                               model.config.vision_aspect_ratio, batch.scenes, self.base)
        input_ids, mask, labels = T.pad_batch([encoder(qas, layout.shape[1]) for qas, layout in zip(turns, layouts)],
                                              encoder.tokenizer.pad_token_id)
        image_tokens = input_ids == model.config.image_token_id
        pointing = locate_masks = counting = None
        if config.point_weight:
            pointing = T.pointing_targets(turns, batch.scenes, labels, in_rows(layouts, image_tokens))
            base = T.pointing_targets(turns, batch.scenes, labels, [layout[:, : self.base] for layout in layouts])
            locate_masks = None if base is None else base[2]  # (queries, 2, base patches)
        if config.count_weight:
            centres = batch.targets[batch.base_rows, T.CENTRE_HEAD]  # (images, base patches)
            counting = T.counting_targets(turns, labels, in_rows(list(centres), image_tokens))
        readouts = step >= config.readout_start
        embeds, losses = image_embeddings(model, aux_head, batch, input_ids, words if config.align_weight else None)
        return T.language_losses(model, aux_head, embeds, mask, labels, torch.ones_like(image_tokens), losses, pointing,
                                 config.point_layer, config.point_heads, counting,
                                 bool(config.locate_weight) and readouts, bool(config.tally_weight) and readouts,
                                 locate_masks)


def onevision_inputs(processor, images):
    """``prepare(indices, questions)``: the stock processor's inputs for ``images[indices]`` asked ``questions`` in
    the toy prompt (left padding)."""

    def prepare(indices: list[int], questions: list[str]):
        prompts = [T.PROMPT.format(question=question) for question in questions]
        return processor(images=[images[i] for i in indices], text=prompts, padding=True, return_tensors="pt")

    return prepare
