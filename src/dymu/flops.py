"""FLOPs of visual-token plans: two counters, and every number says which one produced it.

FLOPs are 2 x multiply-accumulates of the matrix products; norms, RoPE, softmax and activations are not counted.

* ``fastv-formula`` (``fastv_formula``): FastV's Eq. 5 (paper §4.2) as its Table 1 uses it: per layer
  C(n) = 4·n·d² + 2·n²·d + 2·n·d·m, layers >= K on n̂ tokens, reported as the per-layer average. Prefill only,
  MHA and FFN only: no GQA, no gated MLP, no LM head, no vision tower, no VTU.
* ``cache-aware`` (``prefill_flops``, ``decode_step_flops``, ``kv_cache_bytes``): a ``language_plan`` as dymu runs
  it on a Llama / Qwen2 decoder: per layer the rows of the projections and the MLP (unique tokens with VTU, kept
  positions after pruning), the query rows and key length of the attention products (full length with VTU), the
  real shapes (GQA k/v width, gated MLP, LM head once for the last position), then decode steps that attend to
  what each layer cached. Causal attention is counted as the full queries x keys products the kernels compute
  (they do not skip the masked half).

The vision tower (``vision_flops``) runs per image before the language model: ``encoder_flops`` with the merging
cost, plus the projector on the tokens it passes on.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import vtu as V
from .errors import DymuError
from .merge import layer_flops, matching_flops
from .methods import VTW, DyRate, FastV, check_vtu, parse_prune
from .plan import Segment, TokenPlan
from .policies import policy_for
from .prune import kept_count

FASTV_FORMULA = "fastv-formula"
CACHE_AWARE = "cache-aware"
#: exact VTU's score product is one matmul of width 2 x head_dim (dymu.vtu.exact_factors)
EXACT_SCORE_WIDTH = 2
#: matrices of a gated MLP (gate, up, down)
GATED_MLP_MATRICES = 3
#: tensors a KV cache keeps per layer (keys, values)
KV_TENSORS = 2
#: the KV cache's element type when the config names none (what the weights load as)
DEFAULT_DTYPE = torch.float32


@dataclass(frozen=True)
class Count:
    """A FLOPs number and the counter that produced it."""

    flops: float
    counter: str


@dataclass(frozen=True)
class Decoder:
    """The shapes of a Llama / Qwen2 decoder that its FLOPs depend on."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    bytes_per_value: int = DEFAULT_DTYPE.itemsize  # KV-cache element size

    @classmethod
    def from_config(cls, config, dtype: torch.dtype | None = None) -> "Decoder":
        """From a text config or a VLM config (its ``text_config``); ``dtype``: of the KV cache (default: the config's)."""
        text = getattr(config, "text_config", None) or config
        dtype = dtype or getattr(config, "dtype", None) or getattr(text, "dtype", None) or DEFAULT_DTYPE
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        return cls(layers=text.num_hidden_layers, hidden=text.hidden_size, intermediate=text.intermediate_size,
                   heads=text.num_attention_heads, kv_heads=text.num_key_value_heads or text.num_attention_heads,
                   head_dim=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
                   vocab=text.vocab_size, bytes_per_value=dtype.itemsize)


# ---------------------------------------------------------------------------------------------- fastv-formula
def fastv_layer(n: int, hidden: int, intermediate: int) -> int:
    """FastV's Eq. 5 for one layer over ``n`` tokens: Q/K/V/O projections, QKᵀ and AV, the two FFN matmuls."""
    return 4 * n * hidden**2 + 2 * n**2 * hidden + 2 * n * hidden * intermediate


def fastv_formula(decoder: Decoder, tokens: int, image_tokens: int, prune=None) -> Count:
    """Per-layer average prefill FLOPs [K·C(n) + (T−K)·C(n̂)] / T (FastV's Table 1 "FLOPs(B)" column).

    tokens: n (FastV's paper: system prompt + image, 36 + 576); image_tokens: N of them. FastV removes
    round(R·N) image tokens (the rule dymu runs), VTW all N; K >= T removes nothing.
    """
    prune = _static(parse_prune(prune))
    k = min(prune.k, decoder.layers) if prune is not None else decoder.layers
    kept = tokens - image_tokens + _kept_image_tokens(prune, image_tokens)
    full, pruned = (fastv_layer(n, decoder.hidden, decoder.intermediate) for n in (tokens, kept))
    return Count((k * full + (decoder.layers - k) * pruned) / decoder.layers, FASTV_FORMULA)


def _static(prune):
    """A pruning whose plan is known before generating (DyRate's rates are chosen while it generates)."""
    if isinstance(prune, DyRate):
        raise DymuError("dyrate chooses its rates while generating: its FLOPs are counted per generation "
                        "(dymu generate --prune dyrate:FILE prints them; dymu.dyrate.generation_flops)")
    return prune


def _kept_image_tokens(prune: FastV | VTW | None, image_tokens: int) -> int:
    """Image tokens the layers after the pruning layer keep."""
    if prune is None:
        return image_tokens
    if isinstance(prune, VTW):
        return 0
    return int(kept_count(torch.tensor(image_tokens), prune.r))


# ---------------------------------------------------------------------------------------------- cache-aware
@dataclass(frozen=True)
class Prompt:
    """One sequence as the language model receives it (all its images together)."""

    text: int  # positions that are not image placeholders
    image_positions: int  # image placeholder positions of the unmerged prompt (one per patch)
    image_tokens: int  # unique image tokens after merging (== image_positions when nothing merged)
    newlines: int = 0  # of those positions and tokens: layout tokens of their own, never merged or pruned (OneVision)


@dataclass(frozen=True)
class LayerShape:
    """What one decoder layer computes on at prefill."""

    rows: int  # tokens through the q/k/v/o projections and the MLP
    queries: int  # query rows of the attention products
    keys: int  # keys per query: the positions this layer caches
    score_width: int = 1  # the score product's width in head_dims (exact VTU: EXACT_SCORE_WIDTH)
    ranking_queries: int = 0  # FastV at layer K-1: queries whose attention is computed again to rank image tokens


def language_plan(prompt: Prompt, layers: int, vtu: str = "fast", prune=None,
                  kept_image_positions: int | None = None) -> list[LayerShape]:
    """The per-layer shapes of a prefill from counts alone (a config): ``plan_shapes`` of ``synthetic_plan``.

    vtu "fast" / "exact": projections and MLP on the unique tokens, attention over every placeholder position
    (exact: a wider score product) once anything merged; "none" (compact): the merged tokens are the positions.
    prune (``FastV`` / ``VTW`` or a spec): its policy edits the plan as at a real prefill, ranking every image token
    equally (FastV keeps N − round(R·N) of the N unique tokens, VTU groups whole; VTW none).
    kept_image_positions: with VTU, the placeholder positions the kept groups cover (default: the kept groups at the
    mean group size, rounded).
    """
    check_vtu(vtu)
    prune = _static(parse_prune(prune))
    if isinstance(prune, FastV) and prune.rerank != "prefill":
        raise DymuError(f"FastV rerank={prune.rerank} has no FLOPs count yet (counted: rerank=prefill)")
    kept = _kept_image_tokens(prune, prompt.image_tokens - prompt.newlines)
    plan = synthetic_plan(prompt, layers, vtu, kept, kept_image_positions)
    if prune is not None:
        policy = policy_for(prune, layers)
        for layer, kind in policy.scores_at(plan).items():
            plan.layers[layer].scores = kind
            plan.scores[layer] = torch.zeros(plan.segments.shape, dtype=torch.float64)  # every token ranked equal
        for layer in range(layers):
            plan.cursor = layer
            policy.edit(plan, layer)
    return plan_shapes(plan, 0, vtu)


def synthetic_plan(prompt: Prompt, layers: int, vtu: str = "fast", kept_tokens: int | None = None,
                   kept_image_positions: int | None = None):
    """A one-row prefill ``TokenPlan`` with ``prompt``'s counts: its text, then its image positions in
    ``image_tokens`` merge groups (VTU; compact mode: the merged tokens are the positions), the last ``newlines`` of
    them newline tokens of their own. Group sizes are as even as possible, and the first ``kept_tokens`` groups
    (those an equal ranking keeps) cover ``kept_image_positions`` positions (default: their share at the mean group
    size, rounded)."""
    merged = vtu != "none" and prompt.image_tokens < prompt.image_positions
    positions = prompt.image_positions if vtu != "none" else prompt.image_tokens
    image = torch.zeros(1, prompt.text + positions, dtype=torch.bool)
    image[0, prompt.text:] = True
    newline = torch.zeros_like(image)
    newline[0, prompt.text + positions - prompt.newlines:] = True
    vmap = None
    if merged:
        tokens, spots = prompt.image_tokens - prompt.newlines, positions - prompt.newlines  # merged: not newlines
        kept = tokens if kept_tokens is None else kept_tokens
        covered = round(kept * spots / tokens) if kept_image_positions is None else kept_image_positions
        sizes = _even(covered, kept) + _even(spots - covered, tokens - kept) + [1] * prompt.newlines
        source = torch.repeat_interleave(torch.arange(tokens + prompt.newlines), torch.tensor(sizes, dtype=torch.long))
        vmap = V.build_map(image, [source])
    if not prompt.newlines:
        return TokenPlan.build(image, None, vmap, layers)
    return TokenPlan.build(image & ~newline, None, vmap, layers, newline=newline)


def _even(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` integers as even as possible (larger first)."""
    if parts <= 0:
        return []
    base, extra = divmod(total, parts)
    return [base + 1] * extra + [base] * (parts - extra)


def plan_shapes(plan, row: int = 0, vtu: str = "fast") -> list[LayerShape]:
    """The per-layer shapes of batch row ``row`` of a prefill ``dymu.plan.TokenPlan`` (the one a model ran,
    ``dymu.llava.last_prefill_plan``, or ``synthetic_plan``): projections and MLP on the unique tokens of the
    positions each layer holds (VTU) or on those positions, the attention on those positions (exact VTU: a wider
    score product), and the layers whose attention a policy read ranked once more (score "last": the last query;
    "all": every query)."""
    padding = plan.segments[row] == Segment.PAD
    image = plan.image[row]
    positions = plan.num_prompt - int(padding.sum())
    token_of = plan.vmap.full_to_unique[row] if plan.vmap is not None else None
    merged = token_of is not None and int(torch.unique(token_of[image]).numel()) < int(image.sum())
    width = EXACT_SCORE_WIDTH if vtu == "exact" and merged else 1
    shapes = []
    for layer in range(len(plan.layers)):
        keep = plan.keep_at(layer)[row] & ~padding  # (prompt,) real positions this layer holds
        held = int(keep.sum())
        rows = held if token_of is None else int(torch.unique(token_of[keep]).numel())
        kind = plan.layers[layer].scores
        ranking = 0 if kind is None else 1 if kind == "last" else positions
        shapes.append(LayerShape(rows=rows, queries=held, keys=held, score_width=width, ranking_queries=ranking))
    return shapes


def decoder_layer_flops(decoder: Decoder, shape: LayerShape) -> int:
    """One decoder layer: q/o projections (heads·head_dim wide), k/v (kv_heads·head_dim), gated MLP, QKᵀ and AV."""
    q_width = decoder.heads * decoder.head_dim
    kv_width = decoder.kv_heads * decoder.head_dim
    projections = 2 * shape.rows * decoder.hidden * (2 * q_width + 2 * kv_width)
    scores = 2 * (shape.queries * shape.score_width + shape.ranking_queries) * shape.keys * q_width
    weighted_values = 2 * shape.queries * shape.keys * q_width
    mlp = 2 * GATED_MLP_MATRICES * shape.rows * decoder.hidden * decoder.intermediate
    return projections + scores + weighted_values + mlp


def lm_head_flops(decoder: Decoder) -> int:
    """The LM head on one position (generation computes the logits of the last position only)."""
    return 2 * decoder.hidden * decoder.vocab


def prefill_flops(decoder: Decoder, plan: Sequence[LayerShape]) -> Count:
    """The language model's prefill of one sequence: every layer of the plan and the LM head once."""
    return Count(sum(decoder_layer_flops(decoder, shape) for shape in plan) + lm_head_flops(decoder), CACHE_AWARE)


def decode_step_flops(decoder: Decoder, plan: Sequence[LayerShape], step: int) -> Count:
    """Decode step ``step`` (1 = the first token after the prefill): one token through every layer, attending to
    the keys that layer cached at prefill plus ``step`` (the tokens decoded so far, itself included)."""
    layers = (decoder_layer_flops(decoder, LayerShape(rows=1, queries=1, keys=shape.keys + step)) for shape in plan)
    return Count(sum(layers) + lm_head_flops(decoder), CACHE_AWARE)


def kv_cache_bytes(decoder: Decoder, plan: Sequence[LayerShape], step: int = 0) -> list[int]:
    """Per layer: bytes of its KV cache after the prefill and ``step`` decode steps."""
    per_key = KV_TENSORS * decoder.kv_heads * decoder.head_dim * decoder.bytes_per_value
    return [(shape.keys + step) * per_key for shape in plan]


# ---------------------------------------------------------------------------------------------- vision side
def encoder_flops(layer_tokens: list[int], num_tokens: int, protected: int, hidden: int, intermediate: int,
                  head_dim: int, merging: bool | Sequence[bool] = True) -> int:
    """One image through a ViT given its token count (protected tokens excluded) after each executed layer.

    merging: whether each layer computes the matching (one flag per layer, or one for all).
    """
    flags = [merging] * len(layer_tokens) if isinstance(merging, bool) else merging
    total, tokens_in = 0, num_tokens
    for after, merges in zip(layer_tokens, flags, strict=True):
        tokens_out = after + protected
        total += layer_flops(tokens_in, tokens_out, hidden, intermediate)
        if merges:
            total += matching_flops(tokens_in, head_dim)
        tokens_in = tokens_out
    return total


def projector_flops(tokens: int, vision_hidden: int, text_hidden: int) -> int:
    """LLaVA's two-layer projector on ``tokens`` visual tokens."""
    return 2 * tokens * text_hidden * (vision_hidden + text_hidden)


def vision_flops(info, text_hidden: int, layer_tokens: list[int] | None = None, merging: bool | Sequence[bool] = True,
                 cls: int = 0) -> int:
    """One image: the vision tower up to its read layer (``info``: a ``TowerInfo``) and the projector.

    layer_tokens: tokens (CLS excluded) after each executed layer, None for the unmerged tower; merging: which
    of those layers compute the matching (default: all); cls: tokens the projector gets besides them (``llava.cls_tokens``).
    """
    if layer_tokens is None:
        layer_tokens, merging = [info.num_patches] * info.merge_layers, False
    tower = encoder_flops(layer_tokens, info.num_tokens, info.protected, info.hidden_size, info.intermediate_size,
                          info.hidden_size // info.num_heads, merging)
    return tower + projector_flops(layer_tokens[-1] + cls, info.hidden_size, text_hidden)


def schedule_layer_tokens(info, tokens: int, schedule: str = "constant") -> list[int]:
    """Tokens after each executed layer when a merge ``schedule`` (``dymu find-thresholds``) ends at ``tokens``."""
    from .finder import budgets_for

    budgets = budgets_for(info, tokens, schedule)[: info.merge_layers]
    return [info.num_patches - removed for removed in itertools.accumulate(budgets)]


@dataclass(frozen=True)
class ConfigPrefill:
    """A prefill of one image and its prompt counted from a config alone (``dymu flops``): the prompt unmerged and
    under the plan, their plans (``LayerShape`` per layer) and vision FLOPs (tower and projector)."""

    stock: Prompt
    prompt: Prompt
    stock_plan: list
    plan: list
    stock_vision: int
    vision: int

    @property
    def estimated(self) -> bool:
        """The plan's language-model figures are an estimate: never for LLaVA-1.5 (every patch is a position)."""
        return False

    @classmethod
    def count(cls, config, stock: Prompt, prompt: Prompt, layer_tokens: list[int] | None, merging, vtu: str, prune,
              crops: int = 1, cls_tokens: int = 0, **fields):
        """The plans of ``stock`` and ``prompt`` under ``config`` (the language model in VTU mode ``vtu`` with pruning
        ``prune``) and the vision FLOPs of ``crops`` tower passes, unmerged and at ``layer_tokens`` (None: unmerged;
        ``merging``: which executed layers compute the matching), with ``cls_tokens`` besides the patches; ``fields``:
        a subclass's own."""
        from .vision import config_tower_info

        info = config_tower_info(config)
        decoder = Decoder.from_config(config)
        return cls(stock=stock, prompt=prompt, stock_plan=language_plan(stock, decoder.layers),
                   plan=language_plan(prompt, decoder.layers, vtu, prune),
                   stock_vision=crops * vision_flops(info, decoder.hidden, cls=cls_tokens),
                   vision=crops * vision_flops(info, decoder.hidden, layer_tokens, merging, cls_tokens), **fields)


def config_prefill(config, text: int, layer_tokens: list[int] | None = None, merging=False, vtu: str = "fast",
                   prune=None) -> ConfigPrefill:
    """One image with ``text`` text tokens under LLaVA-1.5 ``config``: the image's tokens after each executed tower
    layer ``layer_tokens`` (None: unmerged), ``merging``: which of those layers compute the matching; the language
    model in VTU mode ``vtu`` with pruning ``prune`` (a ``dymu.methods`` spec or object). LLaVA-OneVision:
    ``dymu.onevision_flops.config_prefill``."""
    from .llava import cls_tokens, placeholders_per_image
    from .vision import config_tower_info

    info = config_tower_info(config)
    cls = cls_tokens(config, info)
    positions = placeholders_per_image(config, info)
    tokens = positions if layer_tokens is None else layer_tokens[-1] + cls
    return ConfigPrefill.count(config, Prompt(text, positions, positions), Prompt(text, positions, tokens), layer_tokens,
                               merging, vtu, prune, cls_tokens=cls)


# ---------------------------------------------------------------------------------------------- from a patched model
@dataclass(frozen=True)
class LastPrefill:
    """The plans of a patched LLaVA's last prefill (batch row 0's language model; vision over every image) and of
    the same prompt unmerged, with what ``dymu.language`` kept: (first layer, end layer, image tokens) spans."""

    decoder: Decoder
    plan: list
    stock_plan: list
    vision: int
    stock_vision: int
    spans: list

    @property
    def prefill_ratio(self) -> float:
        """Prefill FLOPs (vision + language model) of the plan over the unmerged prompt's."""
        return (self.vision + prefill_flops(self.decoder, self.plan).flops) / (
            self.stock_vision + prefill_flops(self.decoder, self.stock_plan).flops)


def merging_layers(model, info) -> list[bool]:
    """Which executed encoder layers of ``model`` (``info``: its ``TowerInfo``) compute the matching
    (``dymu.vision.merging_layers``)."""
    from .vision import merging_layers as merging

    return merging(model, info)


def last_prefill(model, prompt_length: int, vtu: str) -> LastPrefill:
    """``LastPrefill`` of a model patched by ``dymu.apply`` after a generation or forward of one prompt of
    ``prompt_length`` input ids (as the processor produced them: placeholders unmerged unless ``vtu`` is "none"):
    the plan its language model ran (row 0), counted by ``plan_shapes``."""
    from .llava import last_encoding, last_images

    encoding = last_encoding(model)  # every image (OneVision: every crop) the tower ran on
    if encoding is None:
        raise DymuError("no images were encoded since dymu.apply: last_prefill counts the prefill that encoded them "
                        "(with pre-encoded inputs, count after dymu.prepare_inputs under the same dymu.apply)")
    images = last_images(model)
    positions = sum(p for p, _ in images)
    tokens = sum(t for _, t in images)
    text = prompt_length - (tokens if vtu == "none" else positions)
    return row_prefill(model, 0, text, images, encoding.layer_tokens, vtu)


def row_prefill(model, row: int, text: int, images: list, crop_tokens: list, vtu: str) -> LastPrefill:
    """``LastPrefill`` of batch row ``row`` of ``model``'s last prefill: ``text`` positions that are not image
    placeholders, its images' (stock placeholder positions, visual tokens) pairs (``dymu.llava.last_images``), the
    per-layer token counts of each crop the tower ran for them (``last_encoding().layer_tokens``; None per crop: that
    crop unmerged). The language side is the plan the prefill ran (``dymu.llava.last_prefill_plan``), or the counts
    alone when nothing ran a plan (the model unpatched, or patched and nothing to change)."""
    from .llava import cls_tokens, get_vlm_patch, last_prefill_plan
    from .vision import tower_info

    info = tower_info(model)
    decoder = Decoder.from_config(model.config)
    cls = cls_tokens(model.config, info)
    positions = sum(p for p, _ in images)
    tokens = sum(t for _, t in images)
    merging = merging_layers(model, info)
    vision = sum(vision_flops(info, decoder.hidden, t, merging, cls) for t in crop_tokens)
    stock_vision = len(crop_tokens) * vision_flops(info, decoder.hidden, cls=cls)
    ran = last_prefill_plan(model) if get_vlm_patch(model) is not None else None
    if ran is None:  # nothing to change: the stock computation on the prompt as given
        plan = language_plan(Prompt(text, positions, tokens), decoder.layers, vtu)
        image = [tokens] * decoder.layers
    else:
        plan = plan_shapes(ran, row, vtu)
        image = [int(ran.image_tokens(ran.keep_at(layer))[row]) for layer in range(decoder.layers)]
    spans, start = [], 0
    for layer in range(1, decoder.layers + 1):
        if layer == decoder.layers or image[layer] != image[start]:
            spans.append((start, layer, image[start]))
            start = layer
    stock = language_plan(Prompt(text, positions, positions), decoder.layers)
    return LastPrefill(decoder, plan, stock, vision, stock_vision, spans)
