"""Thin adapter: DToMe inside Hugging Face CLIP / SigLIP vision encoders (transformers 5.x).

Patches a model *instance* (never the transformers classes):

* ``encoder.forward`` is replaced by the same layer loop, which also resets the merge state and can stop
  after the layer a VLM reads;
* every ``encoder.layers[i].forward`` is replaced by the stock pre-LN block with two additions:
  proportional attention (an additive ``log(size)`` key bias, padding masked) and, between the attention
  residual and the MLP, the merge step of ``dymu.merge``;
* a forward hook on ``self_attn.k_proj`` of the mergeable layers captures the keys (the matching metric),
  so the attention code itself is untouched and any attention backend (eager, sdpa) keeps working.

The original ``layer_norm1``, ``self_attn``, ``layer_norm2`` and ``mlp`` modules are still called, so
hooks on them (profilers, FLOP counters, output capture) keep working. ``remove`` deletes the instance
attributes and hooks, which restores the model exactly.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import MethodType
from typing import Callable

import torch
from torch import nn

from . import compat
from . import merge as M
from .errors import DymuError  # noqa: F401 (re-exported: dymu.vision.DymuError)

#: model_type of the supported vision towers -> number of protected prefix tokens (CLS).
SUPPORTED_TOWERS = {"clip_vision_model": 1, "siglip_vision_model": 0}
PATCH_ATTRIBUTE = "_dymu_patch"


@dataclass
class TowerInfo:
    """What the merging code needs to know about a vision tower."""

    tower: nn.Module | None  # None when described from a config alone
    model_type: str  # "clip_vision_model" | "siglip_vision_model"
    protected: int  # 1 with a CLS token, else 0
    num_layers: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    image_size: int
    patch_size: int
    read_layer: int  # 0-based index of the layer whose output is used; merging stops there
    name_or_path: str = ""

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_tokens(self) -> int:
        return self.num_patches + self.protected

    @property
    def merge_layers(self) -> int:
        """Layers that may merge: 0 .. read_layer."""
        return self.read_layer + 1

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(batch, 3, H, W) -> (batch, tokens, dim): what the stock model feeds its encoder."""
        hidden = self.tower.embeddings(pixel_values)
        if self.model_type == "clip_vision_model":
            hidden = self.tower.pre_layrnorm(hidden)
        return hidden

    def identity(self) -> dict:
        return {
            "model_type": self.model_type,
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "has_cls": bool(self.protected),
            "read_layer": self.read_layer,
            "name_or_path": self.name_or_path,
        }


def _read_layer_from_feature_layer(feature_layer, num_layers: int) -> int:
    """HF ``vision_feature_layer`` (index into hidden_states, which has num_layers + 1 entries) -> layer index."""
    layers = feature_layer if isinstance(feature_layer, (list, tuple)) else [feature_layer]
    read = []
    for value in layers:
        index = value if value >= 0 else num_layers + 1 + value
        if not 1 <= index <= num_layers:
            raise DymuError(f"vision_feature_layer {value} does not name an encoder layer of a {num_layers}-layer tower")
        read.append(index - 1)
    return max(read)


def tower_info(model: nn.Module) -> TowerInfo:
    """Find the vision tower of a bare encoder or a LLaVA-style VLM and describe it."""
    tower, read_layer = model, None
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "vision_config", None) is not None and config.model_type not in ("clip", "siglip"):
        inner = getattr(model, "model", model)
        tower = getattr(inner, "vision_tower", None)
        if tower is None:
            tower = getattr(model, "vision_tower", None)
        if tower is None:
            raise DymuError(f"{type(model).__name__} has no vision_tower")
        read_layer = _read_layer_from_feature_layer(config.vision_feature_layer, tower.config.num_hidden_layers)
    elif config is not None and config.model_type in ("clip", "siglip"):
        tower = model.vision_model  # full CLIPModel / SiglipModel: use the image side
    tower_config = getattr(tower, "config", None)
    model_type = getattr(tower_config, "model_type", None)
    if model_type not in SUPPORTED_TOWERS or not hasattr(tower, "encoder"):
        raise DymuError(
            f"unsupported model {type(model).__name__} (vision model_type {model_type!r}); "
            "dymu supports CLIPVisionModel, SiglipVisionModel and LLaVA / LLaVA-OneVision models built on them"
        )
    name = str(getattr(config, "_name_or_path", "") or getattr(tower_config, "_name_or_path", "") or "")
    return _describe(tower_config, read_layer, name, tower)


def config_tower_info(config) -> TowerInfo:
    """The vision tower of a LLaVA-style config, described without weights (``tower`` is None): for FLOPs counts."""
    vision = config.vision_config
    if vision.model_type not in SUPPORTED_TOWERS:
        raise DymuError(f"unsupported vision model_type {vision.model_type!r}; dymu supports {', '.join(SUPPORTED_TOWERS)}")
    read_layer = _read_layer_from_feature_layer(config.vision_feature_layer, vision.num_hidden_layers)
    return _describe(vision, read_layer, str(getattr(config, "_name_or_path", "") or ""), None)


def _describe(tower_config, read_layer: int | None, name_or_path: str, tower: nn.Module | None) -> TowerInfo:
    """A TowerInfo from a supported tower config (read_layer None: the last layer)."""
    model_type = tower_config.model_type
    num_layers = tower_config.num_hidden_layers
    image_size = tower_config.image_size
    if isinstance(image_size, (list, tuple)):
        image_size = image_size[0]
    return TowerInfo(
        tower=tower,
        model_type=model_type,
        protected=SUPPORTED_TOWERS[model_type],
        num_layers=num_layers,
        hidden_size=tower_config.hidden_size,
        num_heads=tower_config.num_attention_heads,
        intermediate_size=tower_config.intermediate_size,
        image_size=image_size,
        patch_size=tower_config.patch_size,
        read_layer=num_layers - 1 if read_layer is None else read_layer,
        name_or_path=name_or_path,
    )


@dataclass
class MergeState:
    """Per-model merge settings plus the state of the forward pass in flight."""

    info: TowerInfo
    thresholds: list[float]  # one per layer; +inf never merges
    mode: str = "threshold"  # "threshold" (DToMe), "fixed" (ToMe) or "budget" (threshold finding)
    # merges per layer, fixed and budget modes: each image merges min(budgets[i], cap) of its own best edges (fixed),
    # or the batch merges its budgets[i] * batch best edges (budget)
    budgets: list[int] | None = None
    run_until: int | None = None  # stop the encoder after this layer (encode / VLM use)
    # --- per forward ---
    lengths: torch.Tensor | None = None  # (batch,) valid tokens
    sizes: torch.Tensor | None = None  # (batch, tokens) patches per token, None until the first merge
    source: torch.Tensor | None = None  # (batch, original_tokens) current index of every original token
    keys: dict = field(default_factory=dict)  # layer -> (batch, tokens, dim) keys the k_proj hook captured
    statistics: dict = field(default_factory=dict)  # layer -> batch threshold statistic (budget mode)
    layer_lengths: list = field(default_factory=list)  # per executed layer: (batch,) tokens after the merge

    def ragged(self, batch: int, tokens: int) -> bool:
        """Images of the batch have different lengths: some rows of the padded (batch, tokens) layout are padding."""
        return batch > 1 and bool((self.lengths < tokens).any())

    def merges_at(self, layer: int) -> bool:
        if layer > self.info.read_layer:
            return False
        if self.mode == "threshold":
            return self.thresholds[layer] != math.inf
        return bool(self.budgets and self.budgets[layer] > 0)

    @contextmanager
    def using(self, thresholds: list[float] | None = None, mode: str = "threshold", budgets: list[int] | None = None):
        """Merge with these settings for the duration (threshold finding, measuring), then with the previous ones."""
        saved = self.thresholds, self.mode, self.budgets
        self.thresholds = saved[0] if thresholds is None else [float(t) for t in thresholds]
        self.mode, self.budgets = mode, budgets
        try:
            yield self
        finally:
            self.thresholds, self.mode, self.budgets = saved

    def start(self, hidden: torch.Tensor) -> None:
        batch, tokens, _ = hidden.shape  # (batch, tokens, dim)
        self.lengths = torch.full((batch,), tokens, dtype=torch.long, device=hidden.device)
        self.sizes = None
        self.source = torch.arange(tokens, device=hidden.device).expand(batch, -1)
        self.keys = {}
        self.statistics = {}
        self.layer_lengths = []

    def merge(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = hidden.shape  # (batch, tokens, dim)
        keys = self.keys.pop(layer)  # (batch, tokens, dim)
        metric = keys.view(batch, tokens, self.info.num_heads, -1).mean(dim=2)  # (batch, tokens, head_dim)
        scores = M.match_scores(metric, self.lengths, self.info.protected)
        if self.mode == "budget":
            merge_a, statistic = M.select_by_budget(scores, self.budgets[layer] * batch)
            self.statistics[layer] = statistic
        elif self.mode == "fixed":
            merge_a = M.select_top_r(scores, self.budgets[layer])
        else:
            merge_a = M.select_by_threshold(scores, self.thresholds[layer])
        if not bool(merge_a.any()):
            return hidden
        plan = M.plan_merge(merge_a, scores.node_idx, self.lengths, self.info.protected, tokens)
        sizes = self.sizes if self.sizes is not None else M.valid_mask(self.lengths, tokens).to(torch.float32)
        hidden, self.sizes = M.merge_features(hidden, sizes, plan)
        self.source = M.merge_source(self.source, plan)
        self.lengths = plan.lengths
        return hidden


def _layer_forward(state: MergeState, index: int) -> Callable:
    """The stock pre-LN block plus proportional attention and the merge step.

    Once images in a batch have different lengths (merging made them so, or AnyRes crops of different images), the
    layer runs on the packed valid tokens (``_packed_layer``), so compute follows the real token counts instead of
    the longest image.
    """

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        batch, tokens, _ = hidden_states.shape  # (batch, tokens, dim)
        if attention_mask is None and state.ragged(batch, tokens):
            return _packed_layer(self, state, index, hidden_states)
        residual = hidden_states
        hidden_states = self.layer_norm1(hidden_states)
        bias = M.attention_bias(state.sizes, state.lengths, tokens, hidden_states.dtype)  # (batch, 1, 1, tokens)
        if attention_mask is not None:
            bias = attention_mask if bias is None else bias + attention_mask
        attended, _ = self.self_attn(hidden_states=hidden_states, attention_mask=bias, **kwargs)
        hidden_states = residual + attended
        if state.merges_at(index):
            hidden_states = state.merge(index, hidden_states)
        state.layer_lengths.append(state.lengths)
        batch, tokens, _ = hidden_states.shape
        if state.ragged(batch, tokens):
            valid = M.valid_mask(state.lengths, tokens)  # (batch, tokens)
            return _packed_mlp(self, hidden_states[valid], valid)
        residual = hidden_states
        hidden_states = self.layer_norm2(hidden_states)
        hidden_states = self.mlp(hidden_states)
        return residual + hidden_states

    return forward


def _packed_layer(layer: nn.Module, state: MergeState, index: int, hidden: torch.Tensor) -> torch.Tensor:
    """One encoder layer on a batch of images of different lengths, packed end to end.

    Both layer norms, the q/k/v/out projections and the MLP run once on the valid tokens of the whole batch (one
    matrix product each, no padding rows); only the attention kernel runs per image, on views of the packed
    projections. The merge step reads the padded layout, so the layer converts there and back when it merges.
    hidden: (batch, tokens, dim), real tokens first in each row (``state.lengths``). Returns the same layout.
    """
    valid = M.valid_mask(state.lengths, hidden.shape[1])  # (batch, tokens)
    packed = hidden[valid]  # (valid tokens, dim)
    attended, keys = _packed_attention(layer.self_attn, layer.layer_norm1(packed), state.lengths, state.sizes)
    packed = packed + attended
    if state.merges_at(index):
        state.keys[index] = _unpack(keys, valid)  # the matching's keys, in place of the packed ones the hook saw
        merged = state.merge(index, _unpack(packed, valid))  # (batch, tokens', dim)
        valid = M.valid_mask(state.lengths, merged.shape[1])
        packed = merged[valid]
    state.layer_lengths.append(state.lengths)
    return _packed_mlp(layer, packed, valid)


def _packed_mlp(layer: nn.Module, packed: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The block's second half (layer_norm2, MLP, residual) on packed valid tokens ((valid tokens, dim)), returned in
    the padded layout of ``valid`` ((batch, tokens) bool): (batch, tokens, dim), zeros on padding."""
    return _unpack(packed + layer.mlp(layer.layer_norm2(packed[None]))[0], valid)


def _packed_attention(attention: nn.Module, hidden: torch.Tensor, lengths: torch.Tensor, sizes: torch.Tensor | None):
    """CLIP / SigLIP self-attention of packed images (``hidden``: (valid tokens, dim), image after image, ``lengths``
    (batch,) tokens each), proportional (log ``sizes``, (batch, tokens) or None, added to the keys' scores).

    The projections run once over all tokens; the model's own attention kernel (sdpa / eager, as configured) once
    per image. Returns (attended (valid tokens, dim), keys (valid tokens, dim): the k_proj output the matching reads).
    """
    heads, head_dim = attention.num_heads, attention.head_dim
    query, key, value = attention.q_proj(hidden), attention.k_proj(hidden), attention.v_proj(hidden)  # (valid, dim)
    kernel = compat.base_kernel(attention)
    out = torch.empty_like(query)  # (valid tokens, heads * head_dim)
    start = 0
    for b, n in enumerate(lengths.tolist()):
        def image(states):  # (1, heads, n, head_dim): a view of image b's rows
            return states[start:start + n].view(1, n, heads, head_dim).transpose(1, 2)

        bias = M.attention_bias(None if sizes is None else sizes[b:b + 1, :n], lengths[b:b + 1], n, hidden.dtype)
        output, _ = kernel(attention, image(query), image(key), image(value), bias, scaling=attention.scale,
                           dropout=0.0)  # (1, n, heads, head_dim)
        out[start:start + n] = output.reshape(n, heads * head_dim)
        start += n
    return attention.out_proj(out), key


def _unpack(packed: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(valid tokens, dim) -> (batch, tokens, dim), zeros on padding. ``valid``: (batch, tokens) bool."""
    out = packed.new_zeros(*valid.shape, packed.shape[-1])
    out[valid] = packed
    return out


def _encoder_forward(state: MergeState) -> Callable:
    from transformers.modeling_outputs import BaseModelOutput

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        state.start(inputs_embeds)
        hidden_states = inputs_embeds  # (batch, tokens, dim)
        last = len(self.layers) - 1 if state.run_until is None else state.run_until
        for layer in self.layers[: last + 1]:
            hidden_states = layer(hidden_states, attention_mask, **kwargs)
        return BaseModelOutput(last_hidden_state=hidden_states)

    return forward


def _key_hook(state: MergeState, index: int) -> Callable:
    def hook(module, args, output):
        if state.merges_at(index):
            state.keys[index] = output  # (batch, tokens, dim); the packed path replaces it with the padded keys

    return hook


@dataclass
class Patch:
    state: MergeState
    modules: list  # modules whose instance ``forward`` we set
    hooks: list  # removable hook handles
    thresholds: object = None  # the dymu.Thresholds applied (set by dymu.apply)


def get_patch(model: nn.Module) -> Patch | None:
    try:
        info = tower_info(model)
    except DymuError:
        return None
    return getattr(info.tower, PATCH_ATTRIBUTE, None)


def patch_tower(model: nn.Module, thresholds: list[float] | None = None, merges: list[int] | None = None) -> Patch:
    """Install merging on the vision tower of ``model`` (instance only). Replaces an existing patch.

    thresholds: DToMe, one per layer (+inf never merges). merges: ToMe, how many merges each image makes in each
    layer (capacity permitting). Neither: never merge.
    """
    info = tower_info(model)
    if thresholds is not None and merges is not None:
        raise DymuError("merge with thresholds or with fixed merge counts, not both")
    per_layer, what = (thresholds, "thresholds") if merges is None else (merges, "merge counts")
    if per_layer is not None and len(per_layer) != info.num_layers:
        raise DymuError(f"got {len(per_layer)} {what} for a {info.num_layers}-layer vision encoder")
    from .compat import check_tower

    check_tower(info.tower, has_cls=bool(info.protected))
    unpatch_tower(model)
    never = [math.inf] * info.num_layers
    if merges is None:
        state = MergeState(info=info, thresholds=never if thresholds is None else [float(t) for t in thresholds])
    else:
        state = MergeState(info=info, thresholds=never, mode="fixed", budgets=[int(r) for r in merges])
    encoder = info.tower.encoder
    modules, hooks = [encoder], []
    encoder.forward = MethodType(_encoder_forward(state), encoder)
    for index, layer in enumerate(encoder.layers):
        layer.forward = MethodType(_layer_forward(state, index), layer)
        modules.append(layer)
        if index <= info.read_layer:
            hooks.append(layer.self_attn.k_proj.register_forward_hook(_key_hook(state, index)))
    patch = Patch(state=state, modules=modules, hooks=hooks)
    setattr(info.tower, PATCH_ATTRIBUTE, patch)
    return patch


def unpatch_tower(model: nn.Module) -> bool:
    """Undo ``patch_tower``. Returns whether a patch was removed (False for a model dymu cannot patch, e.g. a BERT)."""
    try:
        info = tower_info(model)
    except DymuError:
        return False
    patch = getattr(info.tower, PATCH_ATTRIBUTE, None)
    if patch is None:
        return False
    for module in patch.modules:
        if "forward" in module.__dict__:
            del module.forward
    for handle in patch.hooks:
        handle.remove()
    delattr(info.tower, PATCH_ATTRIBUTE)
    return True


def merging_layers(model: nn.Module, info: TowerInfo) -> list[bool]:
    """Which executed encoder layers of ``model`` (``info``: its ``TowerInfo``) compute the matching, as patched by
    ``dymu.apply`` (DToMe thresholds or ToMe's fixed r); none for an unpatched model."""
    patch = get_patch(model)
    return [patch is not None and patch.state.merges_at(layer) for layer in range(info.merge_layers)]
