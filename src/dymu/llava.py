"""VLM-family adapter: DyMU on LLaVA-1.5 (LlavaForConditionalGeneration with a Llama or Qwen2 language model).

Patches the model *instance* (``dymu.remove`` restores it):

* ``model.model.get_image_features``: the vision tower merges (``dymu.vision``), the projector runs on the
  merged tokens, and each image's features are expanded back to its placeholder positions (virtual mode,
  ``vtu="fast"|"exact"``) or returned merged (compact mode, ``vtu="none"``). Each feature tensor carries its
  merge groups (``_dymu_source``), which survive ``generate``'s beam expansion (it repeats list entries).
* ``model.model.forward``: encodes the images itself when given pixels, builds the ``VirtualMap`` of the
  prompt (image placeholder positions + groups; padding positions share one token) and hands it to the
  language-model adapter (``dymu.language``) for this one forward (prefill), then calls the stock forward.
* ``model.generate``: the stock method on a shallow copy of ``mm_encoder_outputs`` (stock beam search and
  ``num_return_sequences`` expand the caller's pre-encoded features in place).

Positions, masks, cache length and left padding stay exactly those of the unmerged model.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from types import MethodType

import torch
from torch import nn

from . import compat
from . import vtu as V
from .errors import DymuError
from .language import LanguageAdapter
from .methods import check_vtu  # noqa: F401 (dymu.llava.check_vtu)
from .plan import TokenPlan

PATCH_ATTRIBUTE = "_dymu_llava_patch"


@dataclass
class LlavaState:
    vtu: str
    language: LanguageAdapter
    last_encoding: object = None  # dymu.Encoding of the last images (crops) encoded (token counts, per-layer counts)
    last_images: list = field(default_factory=list)  # per image of the last encoding: (placeholders, tokens) it gives
    # the language model (stock placeholder positions; tokens they hold: merged groups, blends, newlines, CLS)
    last_crops: list = field(default_factory=list)  # per image of the last encoding: its crops (entries of
    # last_encoding, in order; LLaVA-1.5: 1, OneVision: base + AnyRes grid, base only in multi-image prompts)
    merges: bool = True  # the vision tower merges in some layer (image features then carry merge groups)


@dataclass
class LlavaPatch:
    state: LlavaState
    modules: list = field(default_factory=list)  # modules whose instance forward / generate / get_image_features we set


def is_vlm(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) in ("llava", "llava_onevision")


#: base models whose language side dymu carries (VTU, compact mode, pruning): LLaVA-1.5 and LLaVA-OneVision
LANGUAGE_SIDE_MODELS = ("LlavaModel", "LlavaOnevisionModel")


def supports_language_side(model: nn.Module) -> bool:
    """VTU / compact generation is implemented for LLaVA-1.5 (LlavaModel) and LLaVA-OneVision (LlavaOnevisionModel),
    with a Llama or Qwen2 decoder."""
    return type(getattr(model, "model", model)).__name__ in LANGUAGE_SIDE_MODELS


def is_onevision(base: nn.Module) -> bool:
    return type(getattr(base, "model", base)).__name__ == "LlavaOnevisionModel"


def _vlm_parts(model: nn.Module):
    """(LlavaModel-like base, language model) of a VLM."""
    base = getattr(model, "model", model)
    language_model = getattr(base, "language_model", None)
    if language_model is None or not hasattr(base, "multi_modal_projector"):
        raise DymuError(f"{type(model).__name__}: expected a LLaVA-style model with a language_model and multi_modal_projector")
    return base, language_model


def _selected_tokens(encoding, index: int, strategy: str, protected: int):
    """Tokens and groups of image ``index`` as the VLM reads them (CLS kept only by the "full" strategy)."""
    tokens, source = encoding.tokens[index], encoding.source[index]
    if strategy == "full" and protected:
        tokens = torch.cat((encoding.cls[index][None], tokens))
        source = torch.cat((source.new_zeros(1), source + 1))
    return tokens, source


def _get_image_features(state: LlavaState):
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    from .encoding import encode
    from .vision import tower_info

    def get_image_features(self, pixel_values, vision_feature_layer=None, vision_feature_select_strategy=None, **kwargs):
        layer = self.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        strategy = vision_feature_select_strategy or self.config.vision_feature_select_strategy
        if layer != self.config.vision_feature_layer:
            raise DymuError(f"dymu merges up to the configured vision_feature_layer {self.config.vision_feature_layer}, got {layer}")
        if not isinstance(layer, int):
            raise DymuError("dymu supports a single vision_feature_layer (merged token sets differ between layers)")
        if kwargs.get("image_sizes") is not None and type(self).__name__ != "LlavaModel":
            raise DymuError(f"{type(self).__name__}: image_sizes (AnyRes crops) are not supported yet")
        info = tower_info(self)
        encoding = encode(self, pixel_values)
        state.last_encoding = encoding
        state.last_images = []
        state.last_crops = [1] * len(encoding)
        features = []
        for i in range(len(encoding)):
            tokens, source = _selected_tokens(encoding, i, strategy, info.protected)
            projected = self.multi_modal_projector(tokens[None])[0]  # (n_i, text hidden)
            if state.vtu == "none":  # compact: merged tokens in raster order of the first patch each covers
                feature = projected[raster_order(source, projected.shape[0])]
            else:  # virtual: every placeholder position gets its group's token
                feature = projected[source]
                feature._dymu_source = source
            state.last_images.append((int(source.numel()), int(projected.shape[0])))
            features.append(feature)
        return BaseModelOutputWithPooling(pooler_output=features, last_hidden_state=None)

    return get_image_features


def _onevision_image_features(state: LlavaState):
    """``get_image_features`` of a LlavaOnevisionModel: every crop of every image is encoded in one batch (each its
    own merge groups), projected once per merged token, then laid out by the model's own ``pack_image_features``
    (base crop, unpadded grid, bilinear down-scaling, newline per row; ``dymu.onevision``)."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    from . import onevision as O
    from .encoding import encode

    def get_image_features(self, pixel_values, image_sizes=None, vision_feature_layer=None,
                           vision_feature_select_strategy=None, vision_aspect_ratio=None, batch_num_images=None, **kwargs):
        layer = self.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        strategy = vision_feature_select_strategy or self.config.vision_feature_select_strategy
        ratio = vision_aspect_ratio or self.config.vision_aspect_ratio
        if layer != self.config.vision_feature_layer or not isinstance(layer, int):
            raise DymuError(f"dymu merges up to the configured vision_feature_layer {self.config.vision_feature_layer}, got {layer}")
        if strategy != "full":
            raise DymuError(f"LLaVA-OneVision with vision_feature_select_strategy={strategy!r}: dymu supports \"full\" "
                            "(SigLIP has no CLS token to drop)")
        if image_sizes is None:
            raise DymuError("LLaVA-OneVision needs image_sizes (the processor returns them with pixel_values)")
        crops = compat.onevision_crops(self, image_sizes, batch_num_images)
        if pixel_values.dim() == 5:  # (images, max crops, 3, h, w), padded with empty crops
            pixel_values = torch.cat([pixels[:n] for pixels, n in zip(pixel_values, crops)])
        if pixel_values.shape[0] != sum(crops):
            raise DymuError(f"pixel_values hold {pixel_values.shape[0]} crops but image_sizes give {sum(crops)}")
        encoding = encode(self, pixel_values)  # every crop of every image in one batch
        state.last_encoding = encoding
        state.last_crops = list(crops)
        tokens = self.multi_modal_projector(torch.cat(encoding.tokens)[None])[0]  # (merged tokens of all crops, text hidden)
        projected = tokens.split(encoding.num_tokens)
        starts = [sum(crops[:i]) for i in range(len(crops))]
        images = [range(start, start + n) for start, n in zip(starts, crops)]
        expanded = [torch.stack([projected[c][encoding.source[c]] for c in image]) for image in images]  # (crops, patches, D)
        packed, _ = self.pack_image_features(expanded, image_sizes, image_newline=self.image_newline,
                                             vision_aspect_ratio=ratio)
        layouts = O.layouts(self.pack_image_features, [[encoding.source[c] for c in image] for image in images],
                            image_sizes, ratio)
        features, state.last_images = [], []
        for image, feature, layout in zip(images, packed, layouts):
            table = torch.cat([projected[c] for c in image])  # (groups, D): crop-major, as the layout numbers them
            feature = feature.clone()
            feature[layout.single] = table[layout.ids[layout.single]]  # a group's positions: its token, bit for bit
            newline = layout.newline
            first = layout.first_positions()
            state.last_images.append((layout.num_positions, int(first.numel())))
            if state.vtu == "none":  # compact: every token the layout holds once, at its first position
                feature, newline = feature[first], newline[first]
            else:
                feature._dymu_source = layout.ids
            feature._dymu_newline = newline
            feature._dymu_placeholders = layout.num_positions
            features.append(feature)
        return BaseModelOutputWithPooling(pooler_output=features, last_hidden_state=None)

    return get_image_features


def raster_order(source: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Token indices sorted by the first patch (raster order) each token covers. source: (patches,)."""
    first = torch.full((num_tokens,), source.numel(), dtype=torch.long, device=source.device)
    first = first.scatter_reduce(0, source, torch.arange(source.numel(), device=source.device), reduce="amin")
    return torch.argsort(first)


def chat_prompt(processor, prompt: str, num_images: int) -> str:
    """The prompt as is when it holds <image> placeholders (one per image); otherwise wrapped with the processor's
    chat template (or one "<image>" line per image when it has none)."""
    if "<image>" in prompt:
        if prompt.count("<image>") != num_images:
            raise DymuError(f"the prompt has {prompt.count('<image>')} <image> placeholder(s) but {num_images} image(s) given")
        return prompt
    if getattr(processor, "chat_template", None):
        content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": prompt}]
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return "<image>\n" * num_images + prompt


def model_inputs(model, processor, images, text: list[str]) -> dict:
    """Inputs for ``model(**inputs)`` / ``generate``: ``prepare_inputs`` when ``model`` is patched in compact mode,
    else the processor's (full placeholders, left padding as the processor is configured)."""
    patch = get_vlm_patch(model)
    if patch is not None and patch.state.vtu == "none":
        return prepare_inputs(model, processor, images, text)
    return processor(images=images, text=text, return_tensors="pt", padding=True)


def prepare_inputs(model, processor, images, text, **processor_kwargs) -> dict:
    """Inputs for compact mode (``vtu="none"``): each image's placeholders shrink to its merged token count.

    Encodes the images once, then returns ``input_ids``, ``attention_mask`` (left padded) and
    ``mm_encoder_outputs`` for ``model(**inputs)`` / ``model.generate(**inputs)``.
    """
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    from .vision import tower_info

    patch = get_vlm_patch(model)
    if patch is None or patch.state.vtu != "none":
        raise DymuError("dymu.prepare_inputs is for compact mode: dymu.apply(model, thresholds, vtu=\"none\") first")
    base, _ = _vlm_parts(model)
    try:
        inputs = processor(images=images, text=text, return_tensors="pt", padding=True, **processor_kwargs)
    except ValueError as exc:
        raise DymuError(str(exc).splitlines()[0]) from None
    image_arguments = {name: inputs[name] for name in ("image_sizes", *ONEVISION_IMAGE_ARGUMENTS) if name in inputs}
    with torch.no_grad():
        features = base.get_image_features(pixel_values=inputs["pixel_values"], **image_arguments).pooler_output
    token = base.config.image_token_id
    per_image = placeholders_per_image(base.config, tower_info(base))
    stock = [getattr(f, "_dymu_placeholders", per_image) for f in features]  # each image's stock placeholder count
    rows, image = [], 0
    for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"]):
        ids = ids[mask.bool()]
        runs, lengths = torch.unique_consecutive(ids == token, return_counts=True)  # alternating text / placeholder runs
        pieces = []
        for piece, placeholder in zip(ids.split(lengths.tolist()), runs.tolist()):
            if not placeholder:
                pieces.append(piece)
                continue
            left = len(piece)
            while left:  # adjacent <image><image> make one run of several images
                if image >= len(features):
                    raise DymuError(f"the prompts have more image placeholders than the {len(features)} image(s) given")
                if stock[image] > left:
                    raise DymuError(f"a run of {len(piece)} image placeholders is not a whole number of images "
                                    f"(image {image} has {stock[image]})")
                pieces.append(ids.new_full((features[image].shape[0],), token))  # its merged token count
                left -= stock[image]
                image += 1
        rows.append(torch.cat(pieces))
    if image != len(features):
        raise DymuError(f"{len(features)} image(s) given but the prompts have {image} <image> placeholder(s)")
    pad = processor.tokenizer.pad_token_id or 0
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row):] = row
        attention_mask[i, width - len(row):] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=list(features))}}


def placeholders_per_image(config, info) -> int:
    """Placeholder tokens the processor writes for one LLaVA-1.5 image: its patches (+ CLS with "full").
    config: the LLaVA config; info: its tower's ``TowerInfo``."""
    return info.num_patches + cls_tokens(config, info)


def cls_tokens(config, info) -> int:
    """Tokens the language model gets from an image besides its patch tokens: the CLS with the "full" strategy."""
    return info.protected if config.vision_feature_select_strategy == "full" else 0


def _image_mask(base, input_ids, inputs_embeds) -> torch.Tensor:
    token = base.config.image_token_id
    if input_ids is not None:
        return input_ids == token
    embedded = base.get_input_embeddings()(torch.full((), token, dtype=torch.long, device=inputs_embeds.device))
    return (inputs_embeds == embedded).all(-1)


#: forward arguments OneVision's get_image_features also takes
ONEVISION_IMAGE_ARGUMENTS = ("vision_aspect_ratio", "batch_num_images")


def _vlm_forward(state: LlavaState):
    def forward(self, *args, **kwargs):
        arguments, extra = compat.bind_arguments(type(self).forward, self, *args, **kwargs)
        arguments.pop("self")
        language = state.language
        language.pending = None
        if arguments.get("pixel_values_videos") is not None or (arguments.get("mm_encoder_outputs") or {}).get("video") is not None:
            raise DymuError("videos (pixel_values_videos) are not supported by dymu yet: pass images, or dymu.remove(model)")
        if arguments.get("pixel_values") is not None and arguments.get("mm_encoder_outputs") is None:
            extra_image_arguments = {name: arguments[name] for name in ONEVISION_IMAGE_ARGUMENTS if name in arguments}
            arguments["mm_encoder_outputs"] = {"image": self.get_image_features(
                pixel_values=arguments.pop("pixel_values"),
                vision_feature_layer=arguments.get("vision_feature_layer"),
                vision_feature_select_strategy=arguments.get("vision_feature_select_strategy"),
                image_sizes=arguments.get("image_sizes"),
                **extra_image_arguments,
            )}
        image_outputs = (arguments.get("mm_encoder_outputs") or {}).get("image")
        if image_outputs is not None:
            language.pending = _plan(self, state, arguments, list(image_outputs.pooler_output))
            if language.pending is None:  # this prefill runs the stock computation: no plan of an earlier one stays
                language.last_prefill_plan = None
        elif arguments.get("input_ids") is not None:
            _check_images_arrive(self, arguments)
        try:
            return type(self).forward(self, **arguments, **extra)
        finally:
            language.pending = None  # the language model took it, or never ran

    return forward


def _check_images_arrive(base, arguments: dict) -> None:
    """A prompt (empty cache) with image placeholders but no image features: the stock model would read the
    placeholder's own embedding as the image (transformers < 5.24 drops pre-encoded features in chunked prefill)."""
    placeholders = int((arguments["input_ids"] == base.config.image_token_id).sum())
    cache = compat.find_cache(arguments.values())
    if placeholders and (cache is None or cache.get_seq_length() == 0):
        raise DymuError(f"the prompt has {placeholders} image placeholder tokens but no image reached the model (pass "
                        "pixel_values or mm_encoder_outputs in one prefill; generate(prefill_chunk_size=...) drops them "
                        "before transformers 5.24)")


def _plan(base, state: LlavaState, arguments: dict, features: list) -> TokenPlan | None:
    """The prompt's token plan: segments (image placeholders, padding, text around them) and (VTU) each image's
    merge groups at its placeholders with padding as one token per row. None when there is nothing to change."""
    sources = [getattr(f, "_dymu_source", None) for f in features]
    mask = _image_mask(base, arguments.get("input_ids"), arguments.get("inputs_embeds"))
    visual_tokens = sum(f.shape[0] for f in features)
    if int(mask.sum()) != visual_tokens:
        hint = ("build compact inputs with dymu.prepare_inputs" if state.vtu == "none"
                else "each image needs the processor's placeholder run: pass the prompt and images through the processor")
        raise DymuError(f"{len(features)} image(s) give {visual_tokens} visual tokens but the prompt(s) have "
                        f"{int(mask.sum())} image placeholder tokens ({hint})")
    newlines = [getattr(f, "_dymu_newline", None) for f in features]
    onevision = is_onevision(base)
    if (state.vtu != "none" and state.merges and any(s is None for s in sources)) or (onevision and None in newlines):
        raise DymuError("image features without their merge groups reached the language model (features copied or "
                        "split, e.g. by generate(prefill_chunk_size=...), or made outside dymu): pass pixel_values, "
                        "or the mm_encoder_outputs dymu's get_image_features returned, in one prefill")
    newline = None
    if onevision and features:
        newline = torch.zeros_like(mask)
        newline[mask] = torch.cat(newlines).to(mask.device)  # placeholder positions in row-major order, as masked_scatter
        newline = newline if bool(newline.any()) else None
    attention_mask = arguments.get("attention_mask")
    padding = attention_mask == 0 if attention_mask is not None and attention_mask.dim() == 2 else None
    padding = padding if padding is not None and bool(padding.any()) else None
    try:
        if state.vtu != "none" and all(s is not None for s in sources):
            vmap = V.build_map(mask, sources, padding)
        else:  # compact: padding as one token, so a batch costs its real tokens
            vmap = V.build_map(torch.zeros_like(mask), [], padding) if padding is not None else None
    except ValueError as exc:
        raise DymuError(str(exc)) from None
    if vmap is not None and not vmap.padded and vmap.num_unique == vmap.num_full:
        vmap = None  # every position its own token: the stock computation
    if vmap is None and state.language.policy is None:
        return None
    image = mask if newline is None else mask & ~newline
    return TokenPlan.build(image, padding, vmap, state.language.num_layers, newline=newline)


def last_encoding(model: nn.Module):
    """The ``dymu.Encoding`` of the images ``model`` (patched by ``dymu.apply``) encoded last, or None."""
    patch = get_vlm_patch(model)
    return None if patch is None else patch.state.last_encoding


def last_images(model: nn.Module) -> list[tuple[int, int]]:
    """Per image ``model`` (patched by ``dymu.apply``) encoded last: (stock placeholder positions, tokens they hold
    for the language model: merge groups, plus CLS, OneVision's bilinear blends and newlines)."""
    patch = get_vlm_patch(model)
    return [] if patch is None else list(patch.state.last_images)


def last_crops(model: nn.Module) -> list[int]:
    """Per image ``model`` (patched by ``dymu.apply``) encoded last: how many consecutive entries (crops) of
    ``last_encoding`` it has (LLaVA-1.5: 1; OneVision: base + AnyRes grid crops, the base crop alone in a
    multi-image prompt)."""
    patch = get_vlm_patch(model)
    return [] if patch is None else list(patch.state.last_crops)


def last_prefill_plan(model: nn.Module) -> TokenPlan | None:
    """The token plan as the last prefill of ``model`` (patched by ``dymu.apply``) ran it, or None (nothing ran, or
    the last prefill with images ran the stock computation)."""
    patch = get_vlm_patch(model)
    return None if patch is None else patch.state.language.last_prefill_plan


#: generate options under which the language model's forward is not one prefill then one token per step
ASSISTED_OPTIONS = ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit")


def _generate(self, *args, **kwargs):
    """Stock generate on a copy of the caller's pre-encoded features (stock expansion edits them in place);
    refuses the options a plan that prunes cannot follow, with one line."""
    language = get_vlm_patch(self).state.language
    if language.policy is not None:
        config = kwargs.get("generation_config")
        for option in ASSISTED_OPTIONS:
            if kwargs.get(option) is not None or getattr(config, option, None) is not None:
                raise DymuError(f"generate({option}=...) with pruning: assisted decoding crops the KV cache, which "
                                "the pruned layers hold shorter; pass prune=None or drop the option")
        beams = kwargs.get("num_beams") or getattr(config, "num_beams", None) or self.generation_config.num_beams or 1
        if language.decode_edits and beams > 1 and not hasattr(language.policy, "reorder"):
            # the plan follows the cache's reordering; a policy's own per-row state only if it can reorder it
            raise DymuError(f"{type(language.policy).__name__} edits each row at decode steps; beam search reorders "
                            "rows: use num_beams=1 (or give the policy a reorder(beam_idx) method)")
    outputs = kwargs.get("mm_encoder_outputs")
    if isinstance(outputs, dict):
        kwargs["mm_encoder_outputs"] = {key: copy.copy(value) for key, value in outputs.items()}
    return type(self).generate(self, *args, **kwargs)


def patch_vlm(model: nn.Module, vtu: str, prune=None) -> LlavaPatch:
    check_vtu(vtu)
    base, language_model = _vlm_parts(model)
    if type(base).__name__ not in LANGUAGE_SIDE_MODELS:
        raise DymuError(f"{type(base).__name__}: the language-model side of dymu supports {', '.join(LANGUAGE_SIDE_MODELS)}")
    compat.check_vlm(base)
    if is_onevision(base):
        compat.check_onevision(base)
    unpatch_vlm(model)
    state = LlavaState(vtu=vtu, language=LanguageAdapter(language_model, vtu, prune), merges=_tower_merges(base))
    patch = LlavaPatch(state=state, modules=[base])
    features = _onevision_image_features if is_onevision(base) else _get_image_features
    base.get_image_features = MethodType(features(state), base)
    base.forward = MethodType(_vlm_forward(state), base)
    if model is not base and hasattr(model, "generate"):
        model.generate = MethodType(_generate, model)
        patch.modules.append(model)
    setattr(base, PATCH_ATTRIBUTE, patch)
    return patch


def _tower_merges(base: nn.Module) -> bool:
    from .vision import merging_layers, tower_info

    return any(merging_layers(base, tower_info(base)))


def get_vlm_patch(model: nn.Module) -> LlavaPatch | None:
    base = getattr(model, "model", model)
    return getattr(base, PATCH_ATTRIBUTE, None)


def unpatch_vlm(model: nn.Module) -> bool:
    base = getattr(model, "model", model)
    patch = getattr(base, PATCH_ATTRIBUTE, None)
    if patch is None:
        return False
    for module in patch.modules:
        for name in ("forward", "get_image_features", "generate"):
            if name in module.__dict__:
                delattr(module, name)
    patch.state.language.remove()
    delattr(base, PATCH_ATTRIBUTE)
    return True
