"""Language-model adapter: the per-layer token plan, carried out with hooks around the stock decoder (Llama / Qwen2).

The decoder runs as transformers wrote it: positions, RoPE, masks, the KV cache and whatever its arguments are
called this release. The plan decides which positions exist at each layer and which unique token holds each:

* **VTU** (virtual token unmerging). PyTorch hooks (instance-level, removable) surround the token-wise modules
  of every layer: ``q_proj`` / ``k_proj`` / ``v_proj`` and ``mlp`` run on the unique tokens (one per merge group:
  all positions of a group hold the same vector) and their outputs are expanded back to every position (VTU's
  M·); ``o_proj`` first takes the mean over each group's positions ((MᵀM)⁻¹Mᵀ), which keeps the group invariant.
  Attention (sdpa / eager / flash, the model's choice) sees the full-length expanded Q/K/V, so RoPE is applied at
  the original positions and the cache stores full-length K/V: the paper's fast path. ``vtu="exact"`` selects an
  attention kernel registered through ``AttentionInterface`` that computes the scores with the C/S decomposition
  on the un-rotated merged Q/K. Rows of a batch with fewer unique tokens are packed.
* **Pruning** (FastV, VTW; ``dymu.prune``). At prefill, layer K-1's attention kernel also returns the attention
  the last query gives every key; a pre-hook on decoder layer K keeps the chosen positions (hidden states,
  RoPE tables, position ids and mask rows/columns gathered), and every later layer runs on them, so layers >= K
  cache only the kept tokens. The VTU map is restricted to the kept positions. Decode steps gather the mask
  columns of the pruned layers to their shorter caches.

The VLM adapter hands a ``TokenPlan`` over (``pending``) right before the language model's forward; the forward
pre-hook takes it. After a planned prefill the adapter checks that every hooked module ran once per layer and
that each layer's KV cache grew by the positions it holds; anything else raises instead of decoding garbage.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from . import compat
from . import prune as P
from . import vtu as V
from .merge import accumulation_dtype
from .methods import VTW, FastV
from .vision import DymuError

VTU_MODES = ("fast", "exact", "none")
#: exact VTU computes its full-length score matrices this many heads at a time (memory bound)
EXACT_HEADS_PER_CHUNK = 8
#: hooked modules per decoder layer: each must run once per layer that has a VTU map during a planned prefill
HOOKED = (*compat.PROJECTIONS, "mlp")
#: FastV with k = 0 has no attention to rank by: it keeps a random subset, drawn with this seed (reproducible)
RANDOM_RANK_SEED = 0

#: attention module -> its adapter, for the attention kernel (which transformers calls with the module only)
_ADAPTERS: "weakref.WeakKeyDictionary[nn.Module, LanguageAdapter]" = weakref.WeakKeyDictionary()


@dataclass
class TokenPlan:
    """What the VLM adapter hands to the language model for one prefill."""

    image: torch.Tensor  # (batch, full) bool: image placeholder positions
    padding: torch.Tensor | None  # (batch, full) bool: padding positions
    vmap: V.VirtualMap | None  # VTU groups over the full sequence (None: every position its own token)

    @property
    def num_full(self) -> int:
        return self.image.shape[1]

    def select(self, scores: torch.Tensor, fraction: float) -> P.Kept:
        """The positions kept when the lowest-scored ``fraction`` of image tokens goes (VTU groups whole).
        scores: (batch, full) attention each position received."""
        token_of = self.vmap.full_to_unique if self.vmap is not None else None
        return P.select(scores, self.image, fraction, token_of)

    def hidden_images(self, kept: P.Kept) -> torch.Tensor:
        """(batch, full) bool: the image positions ``kept`` leaves out (FastV rerank=step hides their keys)."""
        visible = torch.zeros_like(self.image).scatter_(1, kept.positions, True)
        return self.image & ~visible


@dataclass
class Prefill:
    """The forward in flight that carries a plan."""

    plan: TokenPlan
    cache_before: list  # per layer: KV-cache length when the forward started
    calls: dict = field(default_factory=dict)  # hooked module name -> calls so far
    compressed: tuple | None = None  # (input tensor, its unique tokens): q/k/v share one input
    stash: dict = field(default_factory=dict)  # exact VTU: (attention module, "q"|"k") -> full-length pre-RoPE states
    rotary: tuple | None = None  # exact VTU: (cos, sin) at the full positions, (batch, full, head_dim)
    scores: torch.Tensor | None = None  # FastV: (batch, full) attention received at layer K-1
    kept: P.Kept | None = None  # pruning: the positions of layers >= K (set at layer K)
    restricted: V.VirtualMap | None = None  # the VTU map over the kept positions
    masked: torch.Tensor | None = None  # FastV rerank=step: (batch, full) image keys hidden from layers >= K

    def vmap_at(self, layer: int, prune_layer: int | None) -> V.VirtualMap | None:
        pruned = self.masked is None and self.kept is not None and prune_layer is not None and layer >= prune_layer
        return self.restricted if pruned else self.plan.vmap

    @property
    def gathered(self) -> bool:
        """Layers >= K run on the kept positions only (not FastV's per-step masking)."""
        return self.kept is not None and self.masked is None


@dataclass
class Pruned:
    """After a pruned prefill: layers >= ``layer`` hold only ``kept`` (then every decoded token) in ``cache``; with
    FastV rerank=step they hold every position and each decode step re-chooses which image keys stay visible."""

    layer: int
    kept: P.Kept
    prompt_length: int
    cache: weakref.ref
    plan: TokenPlan | None = None  # rerank=step: image positions, padding and groups of the prompt

    @property
    def reranks(self) -> bool:
        return self.plan is not None


class LanguageAdapter:
    """Carries out token plans in one decoder stack. ``remove()`` restores it exactly."""

    def __init__(self, language_model: nn.Module, vtu: str, prune: FastV | VTW | None = None):
        if vtu not in VTU_MODES:
            raise DymuError(f"vtu must be one of {', '.join(VTU_MODES)}, got {vtu!r}")
        layers = language_model.layers
        self.prune_layer = prune.k if prune is not None and prune.k < len(layers) else None
        compat.check_language_model(language_model, exact=vtu == "exact", prune=self.prune_layer is not None)
        self.language_model = language_model
        self.vtu = vtu
        self.prune = prune
        self.pending: TokenPlan | None = None  # set by the VLM adapter right before the forward
        self.prefill: Prefill | None = None
        self.pruned: Pruned | None = None
        self.last_kept: P.Kept | None = None  # the last choice of kept positions (reports, tests)
        self.step_scores: torch.Tensor | None = None  # rerank=step: this decode step's layer K-1 scores
        self.reranks = isinstance(prune, FastV) and prune.rerank == "step"
        self._step_masked: torch.Tensor | None = None  # rerank=step: (batch, keys) image keys hidden this step
        if self.reranks and self.prune_layer == 0:
            raise DymuError("fastv rerank=step needs k >= 1 (each step ranks by the attention at layer k-1)")
        self._past = 0  # layer-0 cache length at the start of the forward in flight
        self._masks = {}  # id(stock mask) -> gathered mask, within one forward
        self._handles = []
        self._configs = []  # (config, its attention implementation before ours)
        self._handles.append(language_model.register_forward_pre_hook(self._start, with_kwargs=True))
        self._handles.append(language_model.register_forward_hook(self._finish, with_kwargs=True, always_call=True))
        for index, layer in enumerate(layers):
            attention = layer.self_attn
            for name in ("q_proj", "k_proj", "v_proj"):
                self._hook(getattr(attention, name), name, index, stash=(attention, name[0]) if vtu == "exact" else None)
            self._hook(attention.o_proj, "o_proj", index, reduce_mean=True)
            self._hook(layer.mlp, "mlp", index)
            if self.prune_layer is not None and index >= self.prune_layer:
                self._handles.append(layer.register_forward_pre_hook(self._layer_hook(index), with_kwargs=True))
        if vtu == "exact" or (isinstance(prune, FastV) and self.prune_layer):
            self._use_kernel(language_model)

    # ------------------------------------------------------------------ lifecycle of one forward
    def _start(self, module, args, kwargs):
        plan, self.pending = self.pending, None
        self.prefill = None
        self._masks = {}
        cache = compat.find_cache((*args, *kwargs.values()))
        layers = len(self.language_model.layers)
        before = [cache.get_seq_length(layer) for layer in range(layers)] if cache is not None else [0] * layers
        self._past = before[0]
        if self.pruned is not None and (cache is None or self.pruned.cache() is not cache or plan is not None):
            self.pruned = None  # a new sequence: the pruned caches belong to another one
        if plan is not None:
            self.prefill = Prefill(plan=plan, cache_before=before)

    def _finish(self, module, args, kwargs, output):
        prefill, self.prefill = self.prefill, None
        self._masks = {}
        if prefill is None or output is None:  # no plan, or the forward raised (always_call)
            return
        layers = len(self.language_model.layers)
        with_map = sum(prefill.vmap_at(layer, self.prune_layer) is not None for layer in range(layers))
        for name in HOOKED:
            if prefill.calls.get(name, 0) != with_map:
                raise compat.refuse(f"{type(module).__name__}: {name} ran {prefill.calls.get(name, 0)} time(s) in a "
                                    f"prefill with {with_map} VTU layer(s)")
        if self.prune_layer is not None and prefill.kept is None:  # set at layer K in both FastV modes
            raise compat.refuse(f"{type(module).__name__}: decoder layer {self.prune_layer} never took the pruning plan")
        values = output.values() if hasattr(output, "values") else output if isinstance(output, tuple) else ()
        cache = compat.find_cache(values)
        if cache is None:
            return
        for layer in range(layers):
            pruned = prefill.gathered and layer >= self.prune_layer
            expected = prefill.cache_before[layer] + (prefill.kept.length if pruned else prefill.plan.num_full)
            if cache.get_seq_length(layer) != expected:
                raise compat.refuse(f"the prefill left layer {layer}'s KV cache at {cache.get_seq_length(layer)} "
                                    f"positions instead of {expected}")
        if prefill.kept is not None:
            self.pruned = Pruned(layer=self.prune_layer, kept=prefill.kept, prompt_length=prefill.plan.num_full,
                                 cache=weakref.ref(cache), plan=prefill.plan if self.reranks else None)

    # ------------------------------------------------------------------ VTU: hooks around token-wise modules
    def _hook(self, module: nn.Module, name: str, layer: int, reduce_mean: bool = False, stash=None) -> None:
        def vmap_now():
            return None if self.prefill is None else self.prefill.vmap_at(layer, self.prune_layer)

        def before(module, args):
            vmap = vmap_now()
            if vmap is None:
                return None
            prefill = self.prefill
            prefill.calls[name] = prefill.calls.get(name, 0) + 1
            if len(args) != 1 or args[0].dim() != 3 or args[0].shape[1] != vmap.num_full:
                shape = tuple(args[0].shape) if args and isinstance(args[0], torch.Tensor) else "no positional tensor"
                raise compat.refuse(f"{name} was called with {shape}, expected (batch, {vmap.num_full}, features)")
            hidden = args[0]  # (batch, positions, features)
            if reduce_mean:
                return (V.to_unique(hidden, vmap, reduce_mean=True),)
            if prefill.compressed is None or prefill.compressed[0] is not hidden:
                prefill.compressed = (hidden, V.to_unique(hidden, vmap))
            return (prefill.compressed[1],)

        def after(module, args, output):
            vmap = vmap_now()
            if vmap is None:
                return None
            full = V.from_unique(output, vmap)  # (batch, positions, out features)
            if stash is not None:
                self.prefill.stash[stash] = full
            return full

        self._handles.append(module.register_forward_pre_hook(before))
        self._handles.append(module.register_forward_hook(after))

    # ------------------------------------------------------------------ pruning: layers >= K
    def _layer_hook(self, index: int):
        def hook(module, args, kwargs):
            arguments, extra = compat.bind_arguments(type(module).forward, module, *args, **kwargs)
            arguments.pop("self")
            prefill, pruned = self.prefill, self.pruned
            mask = arguments.get("attention_mask")
            if prefill is not None and self.reranks:  # FastV rerank=step: hide the dropped image keys, keep them
                if index == self.prune_layer:
                    self._choose()
                queries = torch.arange(prefill.plan.num_full, device=prefill.masked.device)
                arguments["attention_mask"] = self._masked(mask, prefill.masked, queries.expand(prefill.masked.shape[0], -1))
            elif prefill is not None:
                if index == self.prune_layer:
                    self._choose()
                    arguments["hidden_states"] = P.gather_rows(arguments["hidden_states"], prefill.kept)
                kept = prefill.kept
                arguments["position_embeddings"] = tuple(P.gather_rows(t, kept) for t in arguments["position_embeddings"])
                if arguments.get("position_ids") is not None:
                    ids = arguments["position_ids"]
                    arguments["position_ids"] = P.gather_rows(ids.expand(kept.positions.shape[0], -1), kept)
                arguments["attention_mask"] = self._mask(mask, kept, None, kept.length)
            elif pruned is not None:  # a decode step
                queries = arguments["hidden_states"].shape[1]
                appended = self._past + queries - pruned.prompt_length  # keys after the prompt, these included
                positions = self._past + torch.arange(queries, device=pruned.kept.positions.device)  # full positions
                positions = positions.expand(pruned.kept.positions.shape[0], -1)
                if pruned.reranks:
                    if index == self.prune_layer:
                        self._rechoose(appended)
                    arguments["attention_mask"] = self._masked(mask, self._step_masked, positions)
                else:  # the pruned layers' caches are shorter
                    arguments["attention_mask"] = self._mask(mask, pruned.kept, positions, pruned.kept.length + appended)
            else:
                return None
            return (), {**arguments, **extra}

        return hook

    def _masked(self, mask, masked: torch.Tensor, queries: torch.Tensor):
        key = (id(mask), "masked")
        if key not in self._masks:
            self._masks[key] = P.mask_keys(mask, masked, queries, mask.dtype if mask is not None else torch.bool)
        return self._masks[key]

    def _rechoose(self, appended: int) -> None:
        """rerank=step: this decode step's query chooses the visible image keys again (the cache holds them all)."""
        pruned = self.pruned
        if self.step_scores is None:
            raise compat.refuse(f"layer {self.prune_layer - 1}'s attention kernel did not report FastV's scores")
        kept = pruned.plan.select(self.step_scores[:, : pruned.prompt_length], self.prune.r)
        self.last_kept, self.step_scores = kept, None
        masked = pruned.plan.hidden_images(kept)  # (batch, prompt)
        self._step_masked = torch.cat((masked, masked.new_zeros(masked.shape[0], appended)), dim=1)

    def _mask(self, mask, kept: P.Kept, queries, kv_length: int):
        key = (id(mask), kv_length)
        if key not in self._masks:
            dtype = mask.dtype if mask is not None else torch.bool
            self._masks[key] = P.gather_mask(mask, kept, queries, kv_length, dtype)
        return self._masks[key]

    def _choose(self) -> None:
        """The positions layers >= K keep (FastV: best-scored image tokens; VTW: no image token)."""
        prefill = self.prefill
        plan = prefill.plan
        if isinstance(self.prune, VTW):
            fraction, scores = 1.0, torch.zeros(plan.image.shape, dtype=torch.float32, device=plan.image.device)
        elif self.prune_layer == 0:  # no attention yet: a reproducible random ranking
            generator = torch.Generator(device="cpu").manual_seed(RANDOM_RANK_SEED)
            fraction, scores = self.prune.r, torch.rand(plan.image.shape, generator=generator).to(plan.image.device)
        else:
            if prefill.scores is None:
                raise compat.refuse(f"layer {self.prune_layer - 1}'s attention kernel did not report FastV's scores")
            fraction, scores = self.prune.r, prefill.scores
        prefill.kept = plan.select(scores, fraction)
        self.last_kept = prefill.kept
        if self.reranks:
            prefill.masked = plan.hidden_images(prefill.kept)  # (batch, full)
        elif plan.vmap is not None:
            prefill.restricted = V.restrict(plan.vmap, prefill.kept.positions, prefill.kept.filler)

    # ------------------------------------------------------------------ our attention kernel
    def _use_kernel(self, language_model: nn.Module) -> None:
        configs = {id(language_model.config): language_model.config}
        for layer in language_model.layers:
            _ADAPTERS[layer.self_attn] = self
            configs.setdefault(id(layer.self_attn.config), layer.self_attn.config)
        for config in configs.values():
            base = config._attn_implementation or "eager"
            self._configs.append((config, config._attn_implementation))
            config._attn_implementation = compat.register_kernel(base, dymu_attention)

        def keep_tables(module, args, output):
            if self.prefill is not None:
                self.prefill.rotary = output  # (cos, sin), each (batch, full, head_dim)

        if self.vtu == "exact":
            self._handles.append(language_model.rotary_emb.register_forward_hook(keep_tables))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for config, implementation in self._configs:
            config._attn_implementation = implementation
        self._configs = []
        for layer in self.language_model.layers:
            _ADAPTERS.pop(layer.self_attn, None)
        self.pending = self.prefill = self.pruned = None


def dymu_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The attention kernel dymu registers (``dymu_<base>``) when a plan needs more than the stock kernel.

    During a planned prefill: exact VTU scores (C/S decomposition on the merged, un-rotated Q/K) at layers with a
    VTU map, and, at layer K-1 of FastV, the attention the last query gives every key (``prefill.scores``).
    Everything else is the base kernel the model was configured with.
    query: (batch, heads, q, head_dim) after RoPE; key / value: (batch, kv_heads, kv, head_dim) after the cache.
    Returns ((batch, q, heads, head_dim), weights or None).
    """
    adapter = _ADAPTERS.get(module)
    prefill = adapter.prefill if adapter is not None else None
    base = compat.base_kernel(module)
    layer = module.layer_idx
    scores_layer = isinstance(adapter.prune, FastV) and adapter.prune_layer is not None and layer == adapter.prune_layer - 1
    if prefill is None and scores_layer and adapter.pruned is not None and adapter.pruned.reranks:
        padding = adapter.pruned.plan.padding  # a decode step re-ranks from its own query
        if padding is not None:
            padding = torch.cat((padding, padding.new_zeros(padding.shape[0], key.shape[-2] - padding.shape[1])), dim=1)
        adapter.step_scores = P.last_query_scores(query, key, _scale(query, scaling), padding)
    if prefill is None:
        return base(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    scaling = _scale(query, scaling)
    if scores_layer:
        if key.shape[-2] != prefill.plan.num_full:
            raise DymuError("FastV needs an empty KV cache at prefill")
        padding = prefill.plan.padding
        if adapter.prune.score == "all":
            prefill.scores = P.all_query_scores(query, key, scaling, padding)
        else:
            prefill.scores = P.last_query_scores(query, key, scaling, padding)
    if adapter.vtu == "exact" and prefill.vmap_at(layer, adapter.prune_layer) is not None:
        return _exact(module, prefill, query, key, value, attention_mask, scaling)
    return base(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def _scale(query: torch.Tensor, scaling: float | None) -> float:
    """The attention scale: the module's, else 1/sqrt(head_dim)."""
    return query.shape[-1] ** -0.5 if scaling is None else scaling


def _exact(module, prefill: Prefill, query, key, value, attention_mask, scaling: float):
    """Exact VTU attention: scores from the C/S decomposition on the merged, un-rotated Q/K; eager softmax."""
    batch, heads, length, head_dim = query.shape
    if key.shape[-2] != length or prefill.rotary is None:
        raise DymuError("vtu='exact' needs an empty KV cache at prefill")

    def unrotated(kind):  # (batch, length, n * head_dim) -> (batch, n, length, head_dim), merged and pre-RoPE
        states = prefill.stash.pop((module, kind))
        return states.view(batch, length, -1, head_dim).transpose(1, 2)

    q, k = unrotated("q"), unrotated("k")
    groups = heads // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)  # (batch, heads, length, head_dim), GQA
    value = value.repeat_interleave(groups, dim=1)
    cos, sin = prefill.rotary
    if prefill.kept is not None and cos.shape[1] != length:  # a pruned layer: the kept positions' tables
        cos, sin = P.gather_rows(cos, prefill.kept), P.gather_rows(sin, prefill.kept)
    mask = _to_additive(attention_mask, query, length)
    softmax_dtype = accumulation_dtype(query.dtype)
    output = torch.empty_like(query)  # (batch, heads, length, head_dim)
    for start in range(0, heads, EXACT_HEADS_PER_CHUNK):  # bounds the (batch, heads, length, length) scores
        chunk = slice(start, start + EXACT_HEADS_PER_CHUNK)
        scores = V.exact_scores(q[:, chunk], k[:, chunk], cos, sin, scaling)  # (batch, chunk, length, length)
        weights = torch.softmax(scores + mask.to(scores.dtype), dim=-1, dtype=softmax_dtype).to(query.dtype)
        output[:, chunk] = weights @ value[:, chunk]
    return output.transpose(1, 2).contiguous(), None


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
