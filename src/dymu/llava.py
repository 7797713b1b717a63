"""Thin adapter: DyMU on LLaVA-style VLMs (LlavaForConditionalGeneration; Llama / Qwen2 language models).

Patches the model *instance*:

* ``model.model.get_image_features``: the vision tower merges (``dymu.vision``), the projector runs on the
  merged tokens, and each image's features are expanded back to its placeholder positions (virtual mode,
  ``vtu="fast"|"exact"``) or returned merged (compact mode, ``vtu="none"``). Each feature tensor carries its
  merge groups (``_dymu_source``), which survive ``generate``'s beam expansion (it repeats list entries).
* ``model.model.forward``: builds the ``VirtualMap`` of the prompt (image placeholder positions + groups) and
  hands it to the language model for this one forward (prefill). Decode steps see no images: stock path.
* language model: the first decoder layer compresses the full-length hidden states to the unique tokens,
  every attention layer expands Q/K/V to the full positions before RoPE, stores full-length K/V in the cache
  and reduces its output back (``dymu.vtu``); the last layer expands again. Norms and MLPs run on the unique
  tokens only. Positions, masks, cache length and left padding are exactly those of the unmerged model.
* batched prompts: projections and MLPs run on the packed real unique tokens, and all padding positions of a
  row share one unique token (in compact mode too), so a batch costs its real tokens, not rows x longest.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass, field
from types import MethodType

import torch
from torch import nn

from . import vtu as V
from .merge import accumulation_dtype
from .vision import DymuError

VTU_MODES = ("fast", "exact", "none")
#: exact VTU computes its full-length score matrices this many heads at a time (memory bound)
EXACT_HEADS_PER_CHUNK = 8
PATCH_ATTRIBUTE = "_dymu_llava_patch"


@dataclass
class LlavaState:
    vtu: str
    last_encoding: object = None  # dymu.Encoding of the last images encoded (token counts, per-layer counts)
    pending: V.VirtualMap | None = None  # built by the VLM forward, taken by the first decoder layer
    active: V.VirtualMap | None = None  # map of the forward in flight


@dataclass
class LlavaPatch:
    state: LlavaState
    modules: list = field(default_factory=list)


def is_vlm(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) in ("llava", "llava_onevision")


def supports_language_side(model: nn.Module) -> bool:
    """VTU / compact generation is implemented for LLaVA-1.5 (LlavaModel with a Llama or Qwen2 decoder)."""
    return type(getattr(model, "model", model)).__name__ == "LlavaModel"


def _vlm_parts(model: nn.Module):
    """(LlavaModel-like base, language model) of a VLM."""
    base = getattr(model, "model", model)
    language_model = getattr(base, "language_model", None)
    if language_model is None or not hasattr(base, "multi_modal_projector"):
        raise DymuError(f"{type(model).__name__}: expected a LLaVA-style model with a language_model and multi_modal_projector")
    return base, language_model


def _model_module(module: nn.Module):
    return sys.modules[type(module).__module__]


def _selected_tokens(encoding, index: int, strategy: str, protected: int):
    """Tokens and groups of image ``index`` as the VLM reads them (CLS kept only by the "full" strategy)."""
    tokens, source = encoding.tokens[index], encoding.source[index]
    if strategy == "full" and protected:
        tokens = torch.cat((encoding.cls[index][None], tokens))
        source = torch.cat((source.new_zeros(1), source + 1))
    return tokens, source


def _get_image_features(state: LlavaState):
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    from .api import encode
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
        features = []
        for i in range(len(encoding)):
            tokens, source = _selected_tokens(encoding, i, strategy, info.protected)
            projected = self.multi_modal_projector(tokens[None])[0]  # (n_i, text hidden)
            if state.vtu == "none":  # compact: merged tokens in raster order of the first patch each covers
                feature = projected[raster_order(source, projected.shape[0])]
            else:  # virtual: every placeholder position gets its group's token
                feature = projected[source]
                feature._dymu_source = source
            features.append(feature)
        return BaseModelOutputWithPooling(pooler_output=features, last_hidden_state=None)

    return get_image_features


def raster_order(source: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Token indices sorted by the first patch (raster order) each token covers. source: (patches,)."""
    first = torch.full((num_tokens,), source.numel(), dtype=torch.long, device=source.device)
    first = first.scatter_reduce(0, source, torch.arange(source.numel(), device=source.device), reduce="amin")
    return torch.argsort(first)


def prepare_inputs(model, processor, images, text, **processor_kwargs) -> dict:
    """Inputs for compact mode (``vtu="none"``): each image's placeholders shrink to its merged token count.

    Encodes the images once, then returns ``input_ids``, ``attention_mask`` (left padded) and
    ``mm_encoder_outputs`` for ``model(**inputs)`` / ``model.generate(**inputs)``.
    """
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    patch = get_vlm_patch(model)
    if patch is None or patch.state.vtu != "none":
        raise DymuError("dymu.prepare_inputs is for compact mode: dymu.apply(model, thresholds, vtu=\"none\") first")
    base, _ = _vlm_parts(model)
    try:
        inputs = processor(images=images, text=text, return_tensors="pt", padding=True, **processor_kwargs)
    except ValueError as exc:
        raise DymuError(str(exc).splitlines()[0]) from None
    with torch.no_grad():
        features = base.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    token = base.config.image_token_id
    rows, image = [], 0
    for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"]):
        ids = ids[mask.bool()]
        is_image = ids == token
        runs, lengths = torch.unique_consecutive(is_image, return_counts=True)  # alternating text / placeholder runs
        pieces = []
        for piece, placeholder in zip(ids.split(lengths.tolist()), runs.tolist()):
            if placeholder:  # one image's run of placeholders -> its merged token count
                if image >= len(features):
                    raise DymuError(f"the prompts have more image placeholders than the {len(features)} image(s) given")
                piece = ids.new_full((features[image].shape[0],), token)
                image += 1
            pieces.append(piece)
        rows.append(torch.cat(pieces))
    if image != len(features):
        raise DymuError(f"{len(features)} image(s) given but the prompts have {image} image placeholder(s)")
    pad = processor.tokenizer.pad_token_id or 0
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row):] = row
        attention_mask[i, width - len(row):] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=list(features))}}


def _image_mask(base, input_ids, inputs_embeds) -> torch.Tensor:
    token = base.config.image_token_id
    if input_ids is not None:
        return input_ids == token
    embedded = base.get_input_embeddings()(torch.full((), token, dtype=torch.long, device=inputs_embeds.device))
    return (inputs_embeds == embedded).all(-1)


def _vlm_forward(state: LlavaState):
    def forward(self, *args, **kwargs):
        bound = inspect.signature(type(self).forward).bind(self, *args, **kwargs)
        arguments = dict(bound.arguments)
        arguments.pop("self")
        extra = arguments.pop("kwargs", {})
        state.pending = None
        if arguments.get("pixel_values") is not None and arguments.get("mm_encoder_outputs") is None:
            arguments["mm_encoder_outputs"] = {"image": self.get_image_features(
                pixel_values=arguments.pop("pixel_values"),
                vision_feature_layer=arguments.get("vision_feature_layer"),
                vision_feature_select_strategy=arguments.get("vision_feature_select_strategy"),
                image_sizes=arguments.get("image_sizes"),
            )}
        image_outputs = (arguments.get("mm_encoder_outputs") or {}).get("image")
        if image_outputs is not None:
            features = list(image_outputs.pooler_output)
            sources = [getattr(f, "_dymu_source", None) for f in features]
            mask = _image_mask(self, arguments.get("input_ids"), arguments.get("inputs_embeds"))
            visual_tokens = sum(f.shape[0] for f in features)
            if int(mask.sum()) != visual_tokens:
                hint = "build compact inputs with dymu.prepare_inputs" if state.vtu == "none" else "put one <image> per image in the prompt"
                raise DymuError(
                    f"{len(features)} image(s) give {visual_tokens} visual tokens but the prompt(s) have "
                    f"{int(mask.sum())} image placeholder tokens ({hint})"
                )
            attention_mask = arguments.get("attention_mask")
            padding = attention_mask == 0 if attention_mask is not None and attention_mask.dim() == 2 else None
            try:
                if state.vtu != "none" and all(s is not None for s in sources):
                    state.pending = V.build_map(mask, sources, padding)
                elif state.vtu == "none" and padding is not None and bool(padding.any()):
                    state.pending = V.build_map(torch.zeros_like(mask), [], padding)  # batch cost = real tokens
            except ValueError as exc:
                raise DymuError(str(exc)) from None
        return type(self).forward(self, **arguments, **extra)

    return forward


def _decoder_layer_forward(state: LlavaState, first: bool, last: bool):
    """The first layer compresses to the unique tokens, the last expands back; in between the stock pre-norm
    block, with the MLP on the packed real tokens when rows have different unique counts."""

    def forward(self, hidden_states, *args, **kwargs):
        if first:
            state.active, state.pending = state.pending, None
            if state.active is not None:
                if hidden_states.shape[1] != state.active.num_full:
                    state.active = None
                else:
                    hidden_states = V.compress(hidden_states, state.active)  # (batch, unique, hidden)
        vmap = state.active
        if vmap is None or not vmap.padded:
            output = type(self).forward(self, hidden_states, *args, **kwargs)
        else:
            residual = hidden_states
            attended, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **_layer_kwargs(args, kwargs))
            hidden_states = residual + attended
            output = hidden_states + V.packed_apply(lambda h: self.mlp(self.post_attention_layernorm(h)), hidden_states, vmap)
        if last and state.active is not None:
            output = V.expand(output, state.active)  # (batch, full, hidden)
            state.active = None
        return output

    return forward


#: positional parameters of Llama / Qwen2 decoder layers after hidden_states
_LAYER_PARAMETERS = ("attention_mask", "position_ids", "past_key_values", "use_cache", "position_embeddings")


def _layer_kwargs(args: tuple, kwargs: dict) -> dict:
    return {**dict(zip(_LAYER_PARAMETERS, args)), **kwargs}


def _to_additive(mask: torch.Tensor | None, query: torch.Tensor, kv_length: int) -> torch.Tensor:
    """HF masks (None = causal, bool = keep, float = additive) as an additive float mask (batch|1, 1, q, kv)."""
    dtype = accumulation_dtype(query.dtype)
    q_length = query.shape[-2]
    if mask is None:
        q_pos = torch.arange(kv_length - q_length, kv_length, device=query.device)
        keep = torch.arange(kv_length, device=query.device)[None, :] <= q_pos[:, None]
        mask = keep[None, None]
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=query.device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask[..., :kv_length].to(dtype)


def _attention_forward(state: LlavaState):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        vmap = state.active
        if vmap is None:
            return type(self).forward(self, hidden_states, position_embeddings=position_embeddings,
                                      attention_mask=attention_mask, past_key_values=past_key_values, **kwargs)
        module = _model_module(self)
        batch, unique, _ = hidden_states.shape  # (batch, unique, hidden)
        shape = (batch, unique, -1, self.head_dim)

        def project(linear):  # (batch, unique, hidden) -> (batch, heads, full, d), real tokens only
            return V.expand_heads(V.packed_apply(linear, hidden_states, vmap).view(shape).transpose(1, 2), vmap)

        query, key, value = project(self.q_proj), project(self.k_proj), project(self.v_proj)
        cos, sin = position_embeddings  # (batch, full, d)
        if state.vtu == "exact":
            attn_output, attn_weights = _exact_attention(self, module, query, key, value, cos, sin, attention_mask, past_key_values)
        else:
            query, key = module.apply_rotary_pos_emb(query, key, cos, sin)
            if past_key_values is not None:
                key, value = past_key_values.update(key, value, self.layer_idx)
            interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, module.eager_attention_forward)
            if getattr(self, "sliding_window", None) is not None:
                kwargs["sliding_window"] = self.sliding_window
            attn_output, attn_weights = interface(
                self, query, key, value, attention_mask,
                dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling, **kwargs,
            )  # (batch, full, heads, d)
        attn_output = attn_output.reshape(batch, vmap.num_full, -1)
        attn_output = V.reduce(attn_output, vmap)  # (batch, unique, heads * d)
        return V.packed_apply(self.o_proj, attn_output, vmap), attn_weights

    return forward


def _exact_attention(self, module, query, key, value, cos, sin, attention_mask, past_key_values):
    """Scores from the C/S decomposition on merged Q/K (no rotated Q is formed); eager softmax."""
    if past_key_values is not None:
        if past_key_values.get_seq_length(self.layer_idx) != 0:
            raise DymuError("vtu='exact' needs an empty KV cache at prefill")
        rotated_key = key * cos[:, None] + V.rotate_half(key) * sin[:, None]
        past_key_values.update(rotated_key, value, self.layer_idx)  # the cache holds what the fast path stores
    groups = query.shape[1] // key.shape[1]
    key, value = module.repeat_kv(key, groups), module.repeat_kv(value, groups)
    mask = _to_additive(attention_mask, query, key.shape[-2])
    softmax_dtype = accumulation_dtype(query.dtype)
    output = torch.empty_like(query)  # (batch, heads, full, d)
    for start in range(0, query.shape[1], EXACT_HEADS_PER_CHUNK):  # bounds the (batch, heads, full, full) scores
        heads = slice(start, start + EXACT_HEADS_PER_CHUNK)
        scores = V.exact_scores(query[:, heads], key[:, heads], cos, sin, self.scaling)  # (batch, chunk, full, full)
        weights = torch.softmax(scores + mask.to(scores.dtype), dim=-1, dtype=softmax_dtype).to(query.dtype)
        output[:, heads] = weights @ value[:, heads]
    return output.transpose(1, 2).contiguous(), None  # (batch, full, heads, d)


def check_vtu(vtu: str) -> None:
    if vtu not in VTU_MODES:
        raise DymuError(f"vtu must be one of {', '.join(VTU_MODES)}, got {vtu!r}")


def patch_vlm(model: nn.Module, vtu: str) -> LlavaPatch:
    check_vtu(vtu)
    base, language_model = _vlm_parts(model)
    if type(base).__name__ != "LlavaModel":
        raise DymuError(f"{type(base).__name__}: the language-model side of dymu supports LLaVA-1.5 (LlavaModel) so far")
    unpatch_vlm(model)
    state = LlavaState(vtu=vtu)
    patch = LlavaPatch(state=state)
    base.get_image_features = MethodType(_get_image_features(state), base)
    base.forward = MethodType(_vlm_forward(state), base)
    patch.modules.append(base)
    layers = language_model.layers
    for index, layer in enumerate(layers):
        layer.forward = MethodType(_decoder_layer_forward(state, index == 0, index == len(layers) - 1), layer)
        patch.modules.append(layer)
        layer.self_attn.forward = MethodType(_attention_forward(state), layer.self_attn)
        patch.modules.append(layer.self_attn)
    setattr(base, PATCH_ATTRIBUTE, patch)
    return patch


def get_vlm_patch(model: nn.Module) -> LlavaPatch | None:
    base = getattr(model, "model", model)
    return getattr(base, PATCH_ATTRIBUTE, None)


def unpatch_vlm(model: nn.Module) -> bool:
    base = getattr(model, "model", model)
    patch = getattr(base, PATCH_ATTRIBUTE, None)
    if patch is None:
        return False
    for module in patch.modules:
        for name in ("forward", "get_image_features"):
            if name in module.__dict__:
                delattr(module, name)
    delattr(base, PATCH_ATTRIBUTE)
    return True
