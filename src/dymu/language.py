"""Language-model adapter: carries a ``dymu.plan.TokenPlan`` out in a stock decoder (Llama / Qwen2), with hooks.

The decoder runs as transformers wrote it: positions, RoPE, masks, the KV cache and whatever its arguments are
called this release. The plan (data, ``dymu.plan``) says which prompt positions each layer holds, which unique
token holds each (VTU) and which attention a policy reads; policies (``dymu.policies``) edit it; this module has no
method-specific branch.

* **VTU** (virtual token unmerging). PyTorch hooks (instance-level, removable) surround the token-wise modules
  of every layer: ``q_proj`` / ``k_proj`` / ``v_proj`` and ``mlp`` run on the unique tokens (one per merge group:
  all positions of a group hold the same vector) and their outputs are expanded back to every position (VTU's
  M·); ``o_proj`` first takes the mean over each group's positions ((MᵀM)⁻¹Mᵀ), which keeps the group invariant.
  Attention (sdpa / eager, the model's choice) sees the full-length expanded Q/K/V, so RoPE is applied at the
  original positions and the cache stores full-length K/V: the paper's fast path. ``vtu="exact"`` selects an
  attention kernel registered through ``AttentionInterface`` that computes the scores with the C/S decomposition
  on the un-rotated merged Q/K. Rows of a batch with fewer unique tokens are packed.
* **Plan edits.** A forward pre-hook on every decoder layer first lets the policy edit the plan, then makes the
  layer hold what the plan says: at a prefill the hidden states, RoPE tables and position ids are gathered to the
  layer's positions (rows aligned by fillers); at a decode step the layer's KV cache is shrunk to them
  (``compat.keep_cache_slots``). Every edited layer gets an attention mask built from positions
  (``prune.layer_mask``). Scores a policy asked for come from dymu's attention kernel (the last query's attention,
  mean over heads, at the layer's own keys).

The VLM adapter hands a plan over (``pending``) right before the language model's forward of a prefill; the plan
stays with the sequence (its KV cache) for the decode steps when a policy acts. After each planned forward the
adapter checks that every hooked module ran once per VTU layer and that each layer's KV cache holds exactly what
the plan says; anything else raises instead of decoding garbage.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from . import compat
from . import prune as P
from . import vtu as V
from .errors import DymuError
from .merge import accumulation_dtype
from .methods import VTU_MODES
from .plan import Segment, TokenPlan
from .policies import policy_for

#: exact VTU computes its full-length score matrices this many heads at a time (memory bound)
EXACT_HEADS_PER_CHUNK = 8
#: hooked modules per decoder layer: each must run once per layer that has a VTU map during a planned prefill
HOOKED = (*compat.PROJECTIONS, "mlp", "self_attn")

#: attention module -> its adapter, for the attention kernel (which transformers calls with the module only)
_ADAPTERS: "weakref.WeakKeyDictionary[nn.Module, LanguageAdapter]" = weakref.WeakKeyDictionary()


@dataclass
class Run:
    """One language-model forward that carries a plan (a prefill or a decode step)."""

    plan: TokenPlan
    prefill: bool
    cache: object  # the KV cache (None without one)
    cache_before: list  # per layer: KV-cache length when the forward started
    calls: dict = field(default_factory=dict)  # hooked module name -> calls so far (prefill)
    compressed: tuple | None = None  # (input tensor, its unique tokens): q/k/v share one input
    stash: dict = field(default_factory=dict)  # exact VTU: (attention module, "q"|"k") -> full-length pre-RoPE states
    rotary: tuple | None = None  # exact VTU: (cos, sin) of the prompt, (batch|1, prompt, head_dim)
    tables: tuple | None = None  # the (cos, sin) layer 0 got: gathered for the layers that hold fewer positions
    position_ids: torch.Tensor | None = None  # the position ids layer 0 got (prefill)
    rows: P.Kept | None = None  # the positions of the hidden states in flight (prefill; None: every position)
    rep_vmap: V.VirtualMap | None = None  # the hidden states in flight are these unique tokens (None: positions)
    unique_input: torch.Tensor | None = None  # the attention input of the layer in flight, as unique tokens
    expanded: torch.Tensor | None = None  # the same at full length (what the attention module is given)
    masks: dict = field(default_factory=dict)  # (layout, hidden) -> the mask built for them this forward


class LanguageAdapter:
    """Carries out token plans in one decoder stack. ``remove()`` restores it exactly."""

    def __init__(self, language_model: nn.Module, vtu: str, prune=None):
        if vtu not in VTU_MODES:
            raise DymuError(f"vtu must be one of {', '.join(VTU_MODES)}, got {vtu!r}")
        layers = language_model.layers
        self.prune = prune  # the method as given (a dymu.methods spec object or a policy): re-applying it reproduces us
        self.policy = policy_for(prune, len(layers), getattr(language_model, "config", None))
        compat.check_language_model(language_model, exact=vtu == "exact", prune=self.policy is not None)
        self.language_model = language_model
        self.num_layers = len(layers)
        self.vtu = vtu
        self.pending: TokenPlan | None = None  # set by the VLM adapter right before the forward of a prefill
        self.plan: TokenPlan | None = None  # the plan of the sequence being decoded (a policy acts at decode steps)
        self.last_prefill_plan: TokenPlan | None = None  # the plan as the last prefill ran it (reports, FLOPs)
        self._run: Run | None = None
        self._held: list = [None] * self.num_layers  # per layer: the Kept layout its KV cache holds (None: all)
        self._cache = None  # weakref to the KV cache of the sequence ``plan`` belongs to
        self._handles = []
        self._configs = []  # (config, its attention implementation before ours)
        self._handles.append(language_model.register_forward_pre_hook(self._start, with_kwargs=True))
        self._handles.append(language_model.register_forward_hook(self._finish, with_kwargs=True, always_call=True))
        for index, layer in enumerate(layers):
            attention = layer.self_attn
            for name in ("q_proj", "k_proj", "v_proj"):
                self._projection_hooks(getattr(attention, name), name, index,
                                       stash=(attention, name[0]) if vtu == "exact" else None)
            self._handles.append(attention.o_proj.register_forward_pre_hook(self._reduce_hook(index)))
            self._handles.append(layer.mlp.register_forward_pre_hook(self._unique_check(index, "mlp")))
            self._handles.append(attention.register_forward_pre_hook(self._attention_hook(index), with_kwargs=True))
            self._handles.append(attention.register_forward_hook(self._attention_done(index)))
            self._handles.append(layer.register_forward_pre_hook(self._layer_hook(index), with_kwargs=True))
        self._handles.append(layers[-1].register_forward_hook(self._leave_unique_space))
        if vtu == "exact" or (self.policy is not None and self.policy.score_layers):
            self._use_kernel(language_model)

    @property
    def decode_edits(self) -> bool:
        return self.policy is not None and bool(getattr(self.policy, "decode_edits", False))

    # ------------------------------------------------------------------ lifecycle of one forward
    def _start(self, module, args, kwargs):
        plan, self.pending = self.pending, None
        self._run = None
        cache = compat.find_cache((*args, *kwargs.values()))
        continues = self.plan is not None and cache is not None and self._cache is not None \
            and self._cache() is cache  # a decode step of the sequence the plan belongs to
        if plan is None and not continues:
            self.plan = None  # a forward without a plan (a new sequence: the plan belonged to another one)
            return None
        before = [cache.get_seq_length(layer) for layer in range(self.num_layers)] if cache is not None else [0] * self.num_layers
        if plan is not None:
            if plan.vmap is not None and (kwargs.get("output_hidden_states") or self.language_model.config.output_hidden_states):
                raise DymuError("output_hidden_states with VTU: the hidden states between layers are one row per unique "
                                "token, not per position; pass output_hidden_states=False (or vtu=\"none\")")
            self._start_prefill(plan, cache, before)
        else:
            self._start_step(cache, before, args, kwargs)
        if self.policy is not None:
            plan = self._run.plan
            for layer, kind in self.policy.scores_at(plan).items():
                if layer not in self.policy.score_layers:
                    raise DymuError(f"{type(self.policy).__name__} asked for layer {layer}'s scores but declared "
                                    f"score_layers {self.policy.score_layers}")
                plan.layers[layer].scores = kind
            if plan.step > 0 and kwargs.get("position_ids") is None and plan.edited:
                # the stock default counts layer 0's cache, which an edit may have shortened: pass the real positions
                start = plan.num_prompt + plan.generated
                kwargs["position_ids"] = torch.arange(start, start + plan.queries, device=plan.segments.device)[None]
                return args, kwargs
        return None

    def _start_prefill(self, plan: TokenPlan, cache, before: list) -> None:
        self.plan = None
        if self.policy is not None:
            if any(before):
                raise DymuError("a plan that prunes needs an empty KV cache at the prefill (chunked prefill, "
                                "prefill_chunk_size, or a cache carried over from an earlier prompt is not supported)")
            if cache is not None:
                compat.check_shrinkable(cache)
                compat.follow_reorder(cache, self._reorder)  # beam search: the plan's rows follow the cache's
        if self.vtu == "exact" and cache is not None and not compat.is_dynamic(cache):
            raise DymuError(f"vtu='exact' needs a dynamic KV cache, got {type(cache).__name__}")
        plan.step, plan.generated, plan.queries, plan.cursor = 0, 0, plan.num_prompt, 0
        self._held = [None] * self.num_layers
        self._cache = weakref.ref(cache) if cache is not None else None
        self._run = Run(plan=plan, prefill=True, cache=cache, cache_before=before)

    def _start_step(self, cache, before: list, args, kwargs) -> None:
        plan = self.plan
        for layer in range(self.num_layers):
            expected = self._held_length(layer) + plan.generated
            if before[layer] != expected:
                raise DymuError(f"layer {layer}'s KV cache holds {before[layer]} positions where the plan holds "
                                f"{expected} (a cache cropped or reused outside generate is not supported with pruning)")
        inputs = kwargs.get("inputs_embeds")
        if inputs is None:
            inputs = kwargs.get("input_ids", args[0] if args else None)
        plan.step += 1
        plan.queries = inputs.shape[1]
        plan.cursor = 0
        plan.scores = {}
        for layer in plan.layers:
            layer.hidden = layer.scores = None
        self._run = Run(plan=plan, prefill=False, cache=cache, cache_before=before)

    def _reorder(self, index: torch.Tensor) -> None:
        """Beam search reordered the cache's rows (``index``: (batch,) old row of each row): so do the plan, the
        layouts the caches hold and the policy's per-row state (``reorder``, if it has any)."""
        plan = self.plan
        if plan is None:
            return
        plan.reorder(index)
        self._held = [plan.layout(layer) for layer in range(self.num_layers)]
        reorder = getattr(self.policy, "reorder", None)
        if reorder is not None:
            reorder(index)

    def _held_length(self, layer: int) -> int:
        held = self._held[layer]
        return self.plan.num_prompt if held is None else held.length

    def _finish(self, module, args, kwargs, output):
        run, self._run = self._run, None
        if run is None or output is None:  # no plan, or the forward raised (always_call)
            if output is None:
                self.plan = None
            return
        plan = run.plan
        cache = run.cache
        if run.prefill:
            with_map = sum(plan.vmap_at(layer) is not None for layer in range(self.num_layers))
            for name in HOOKED:
                if run.calls.get(name, 0) != with_map:
                    raise compat.refuse(f"{type(module).__name__}: {name} ran {run.calls.get(name, 0)} time(s) in a "
                                        f"prefill with {with_map} VTU layer(s)")
        plan.generated += 0 if run.prefill else plan.queries
        if cache is not None:
            for layer in range(self.num_layers):
                added = plan.cache_length(layer) if run.prefill else 0
                expected = (run.cache_before[layer] + added) if run.prefill else self._held_length(layer) + plan.generated
                if run.prefill and self.policy is not None and self._held[layer] is not plan.layout(layer):
                    raise compat.refuse(f"decoder layer {layer} never took the plan")
                if cache.get_seq_length(layer) != expected:
                    raise compat.refuse(f"the {'prefill' if run.prefill else 'decode step'} left layer {layer}'s KV "
                                        f"cache at {cache.get_seq_length(layer)} positions instead of {expected}")
        if run.prefill:
            self.last_prefill_plan = plan.snapshot()
            self.plan = plan if self.policy is not None and cache is not None else None

    # ------------------------------------------------------------------ VTU in unique-token space
    # At a prefill with a VTU map the residual stream between layers holds one row per unique token (packed over the
    # batch when rows have different counts): norms, the MLP, o_proj and the residual adds run on it. Only attention
    # works at full length: its input is expanded (the q/k/v projections still run on the unique rows), q/k/v are
    # expanded after their projection (RoPE at the original positions, full-length KV cache), and its output is
    # reduced to the mean over each token's positions before o_proj.
    def _vmap_now(self, layer: int):
        run = self._run
        return None if run is None or not run.prefill else run.plan.vmap_at(layer)

    def _count(self, name: str) -> None:
        self._run.calls[name] = self._run.calls.get(name, 0) + 1

    def _check_unique(self, hidden, vmap, name: str) -> None:
        rows = int(vmap.unique_lengths.sum()) if vmap.padded else vmap.num_unique
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or hidden.shape[-2] != rows:
            shape = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
            raise compat.refuse(f"{name} was called with {shape}, expected the {rows} unique tokens")

    def _attention_hook(self, layer: int):
        def hook(module, args, kwargs):
            vmap = self._vmap_now(layer)
            if vmap is None:
                return None
            run = self._run
            self._count("self_attn")
            positional = "hidden_states" not in kwargs
            hidden = args[0] if positional and args else kwargs.get("hidden_states")
            self._check_unique(hidden, vmap, "self_attn")
            run.unique_input = hidden
            # what attention reads of its input is the shape (batch, positions, hidden): a stride-0 view, no copy; its
            # projections get the unique rows instead (checked: they must be called with this very tensor)
            run.expanded = hidden[:, :1].expand(vmap.full_to_unique.shape[0], vmap.num_full, hidden.shape[-1])
            if positional:
                return (run.expanded, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": run.expanded}

        return hook

    def _attention_done(self, layer: int):
        def hook(module, args, output):
            vmap = self._vmap_now(layer)
            if vmap is None:
                return None
            calls = self._run.calls
            if calls.get("o_proj", 0) != calls["self_attn"]:  # the output would not be unique tokens
                raise compat.refuse(f"o_proj ran {calls.get('o_proj', 0)} time(s) in {calls['self_attn']} attention "
                                    f"call(s) of a prefill with a VTU map (layer {layer})")
            return None

        return hook

    def _projection_hooks(self, module: nn.Module, name: str, layer: int, stash=None) -> None:
        def before(module, args):
            vmap = self._vmap_now(layer)
            if vmap is None:
                return None
            run = self._run
            self._count(name)
            if len(args) != 1 or args[0] is not run.expanded:
                raise compat.refuse(f"{name} was not called on its attention's input")
            return (run.unique_input,)

        def after(module, args, output):
            vmap = self._vmap_now(layer)
            if vmap is None:
                return None
            full = V.from_unique(output, vmap)  # (batch, positions, out features)
            if stash is not None:
                self._run.stash[stash] = full
            return full

        self._handles.append(module.register_forward_pre_hook(before))
        self._handles.append(module.register_forward_hook(after))

    def _reduce_hook(self, layer: int):
        def hook(module, args):
            vmap = self._vmap_now(layer)
            if vmap is None:
                return None
            self._count("o_proj")
            if len(args) != 1 or args[0].dim() != 3 or args[0].shape[1] != vmap.num_full:
                shape = tuple(args[0].shape) if args and isinstance(args[0], torch.Tensor) else "no positional tensor"
                raise compat.refuse(f"o_proj was called with {shape}, expected (batch, {vmap.num_full}, features)")
            return (V.to_unique(args[0], vmap, reduce_mean=True),)  # (MᵀM)⁻¹Mᵀ: the mean over each token's positions

        return hook

    def _unique_check(self, layer: int, name: str):
        def hook(module, args):
            vmap = self._vmap_now(layer)
            if vmap is None:
                return None
            self._count(name)
            self._check_unique(args[0] if args else None, vmap, name)
            return None

        return hook

    def _leave_unique_space(self, module, args, output):
        """After the last layer: every position it holds gets its token's hidden state back."""
        run = self._run
        if run is None or not run.prefill or run.rep_vmap is None:
            return None
        return V.from_unique(output, run.rep_vmap)

    # ------------------------------------------------------------------ plan edits: every decoder layer
    def _layer_hook(self, index: int):
        def hook(module, args, kwargs):
            run = self._run
            if run is None:
                return None
            plan = run.plan
            plan.cursor = index
            if self.policy is not None:
                self.policy.edit(plan, index)
            want = plan.layout(index)
            hidden = plan.layers[index].hidden
            if run.prefill:
                return self._prefill_layer(run, index, want, hidden, module, args, kwargs)
            if want is not self._held[index]:
                self._shrink(run, index, want)
            if want is None and hidden is None:
                return None
            arguments, extra = compat.bind_arguments(type(module).forward, module, *args, **kwargs)
            arguments.pop("self")
            start = plan.num_prompt + plan.generated
            queries = torch.arange(start, start + plan.queries, device=plan.segments.device).expand(plan.batch, -1)
            arguments["attention_mask"] = self._mask(run, want, hidden, queries, arguments.get("attention_mask"))
            return (), {**arguments, **extra}

        return hook

    def _prefill_layer(self, run: Run, index: int, want, hidden, module, args, kwargs):
        plan = run.plan
        self._held[index] = want
        vmap = plan.vmap_at(index)
        first = index == 0
        moves = want is not run.rows or vmap is not run.rep_vmap  # the hidden states change representation here
        edited = want is not None or hidden is not None
        if not (first or moves or edited):
            return None
        arguments, extra = compat.bind_arguments(type(module).forward, module, *args, **kwargs)
        arguments.pop("self")
        if first:
            run.tables = arguments["position_embeddings"]
            run.position_ids = arguments.get("position_ids")
        if moves:
            arguments["hidden_states"] = self._represent(run, arguments["hidden_states"], want, vmap)
        if edited:
            if want is not None:
                arguments["position_embeddings"] = tuple(P.gather_rows(t, want) for t in run.tables)
                if run.position_ids is not None:
                    arguments["position_ids"] = P.gather_rows(run.position_ids.expand(plan.batch, -1), want)
            queries = want.positions if want is not None else torch.arange(
                plan.num_prompt, device=plan.segments.device).expand(plan.batch, -1)
            arguments["attention_mask"] = self._mask(run, want, hidden, queries, arguments.get("attention_mask"),
                                                     own_slots=True)
        return (), {**arguments, **extra}

    def _represent(self, run: Run, states: torch.Tensor, want, vmap) -> torch.Tensor:
        """The hidden states in flight as layer ``want`` / ``vmap`` takes them: back to positions, gathered to the
        positions the layer holds (monotone: a subset), then one row per unique token when it has a VTU map."""
        plan = run.plan
        if run.rep_vmap is not None:
            states = V.from_unique(states, run.rep_vmap)  # (batch, positions of run.rows, hidden)
        if want is not run.rows:
            states = V.take_rows(states, P.slots_in(run.rows, want, plan.num_prompt))  # (batch, positions of want, hidden)
        if vmap is not None:
            states = V.to_unique(states, vmap)  # (batch, unique, hidden) or packed (1, real unique, hidden)
        run.rows, run.rep_vmap = want, vmap
        return states

    def _keys(self, run: Run, kept: P.Kept | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch, kv) positions and real flags of a layer's keys this forward: its prompt slots, then every position
        decoded since and the queries of this forward."""
        plan = run.plan
        device = plan.segments.device
        if kept is None:
            prompt = torch.arange(plan.num_prompt, device=device).expand(plan.batch, -1)
            real = plan.segments != Segment.PAD
        else:
            prompt, real = kept.positions, ~kept.filler & (plan.segments.gather(1, kept.positions) != Segment.PAD)
        if run.prefill:
            return prompt, real
        after = plan.num_prompt + torch.arange(plan.generated + plan.queries, device=device).expand(plan.batch, -1)
        return torch.cat((prompt, after), dim=1), torch.cat((real, real.new_ones(after.shape)), dim=1)

    def _mask(self, run: Run, kept, hidden, queries: torch.Tensor, stock, own_slots: bool = False):
        key = (id(kept), id(hidden))
        if key not in run.masks:
            keys, real = self._keys(run, kept)
            if hidden is not None:
                hidden = hidden.gather(1, keys.clamp_max(run.plan.num_prompt - 1)) & (keys < run.plan.num_prompt)
            dtype = stock.dtype if isinstance(stock, torch.Tensor) and stock.is_floating_point() else torch.bool
            run.masks[key] = P.layer_mask(queries, keys, real, hidden, own_slots, dtype)
        return run.masks[key]

    def _shrink(self, run: Run, index: int, want) -> None:
        """A decode step: layer ``index``'s KV cache keeps only ``want``'s prompt positions (then every decoded one)."""
        plan = run.plan
        held = self._held[index]
        slots = P.slots_in(held, want, plan.num_prompt)  # (batch, new prompt slots)
        old = self._held_length(index)
        after = old + torch.arange(plan.generated, device=slots.device).expand(plan.batch, -1)
        compat.keep_cache_slots(run.cache, index, torch.cat((slots, after), dim=1))
        self._held[index] = want

    # ------------------------------------------------------------------ scores a policy asked for
    def scores(self, run: Run, layer: int, kind: str, query, key, scaling: float) -> torch.Tensor:
        """(batch, prompt + generated + queries) attention each position receives at ``layer``, mean over heads."""
        plan = run.plan
        kept = self._held[layer]
        keys, real = self._keys(run, kept)
        if kind == "all":
            if not run.prefill or kept is not None or plan.layers[layer].hidden is not None:
                raise DymuError("score=all is computed at a prefill on a layer that holds every position")
            received = P.all_query_scores(query, key, scaling, plan.padding)
        else:
            received = P.last_query_scores(query, key, scaling, ~real)
        total = plan.num_prompt + (0 if run.prefill else plan.generated + plan.queries)
        out = received.new_zeros(plan.batch, total)
        return out.scatter_add_(1, keys, received.masked_fill(~real, 0))

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
            if self._run is not None and self._run.prefill:
                self._run.rotary = output  # (cos, sin), each (batch, prompt, head_dim)

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
        self.pending = self.plan = self._run = None


def dymu_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The attention kernel dymu registers (``dymu_<base>``) when a plan needs more than the stock kernel.

    In a planned forward: the scores a policy asked for at this layer (``plan.scores``), and exact VTU scores (C/S
    decomposition on the merged, un-rotated Q/K) at the layers of a prefill with a VTU map. Everything else is the
    base kernel the model was configured with.
    query: (batch, heads, q, head_dim) after RoPE; key / value: (batch, kv_heads, kv, head_dim) after the cache.
    Returns ((batch, q, heads, head_dim), weights or None).
    """
    adapter = _ADAPTERS.get(module)
    run = adapter._run if adapter is not None else None
    base = compat.base_kernel(module)
    if run is None:
        return base(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    layer = module.layer_idx
    scaling = _scale(query, scaling)
    kind = run.plan.layers[layer].scores
    if kind is not None:
        run.plan.scores[layer] = adapter.scores(run, layer, kind, query, key, scaling)
    if adapter.vtu == "exact" and run.prefill and run.plan.vmap_at(layer) is not None:
        return _exact(module, run, query, key, value, attention_mask, scaling)
    return base(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def _scale(query: torch.Tensor, scaling: float | None) -> float:
    """The attention scale: the module's, else 1/sqrt(head_dim)."""
    return query.shape[-1] ** -0.5 if scaling is None else scaling


def _exact(module, run: Run, query, key, value, attention_mask, scaling: float):
    """Exact VTU attention: the logits are the product of the C/S factors of the merged, un-rotated Q/K
    (``vtu.exact_factors``, width 2·head_dim), so the fused SDPA kernel computes softmax(left·rightᵀ·scale + mask)·V
    without a full (heads, length, length) logits tensor of ours."""
    batch, heads, length, head_dim = query.shape
    if key.shape[-2] != length or run.rotary is None:
        raise DymuError("vtu='exact' needs an empty KV cache at prefill")

    def unrotated(kind):  # (batch, length, n * head_dim) -> (batch, n, length, head_dim), merged and pre-RoPE
        states = run.stash.pop((module, kind))
        return states.view(batch, length, -1, head_dim).transpose(1, 2)

    q, k = unrotated("q"), unrotated("k")
    groups = heads // k.shape[1]
    if groups > 1:  # GQA: (batch, heads, length, head_dim)
        k, value = k.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    cos, sin = run.rotary
    kept = run.plan.layout(module.layer_idx)
    if kept is not None:  # a layer that holds fewer positions: their tables
        cos, sin = P.gather_rows(cos, kept), P.gather_rows(sin, kept)
    cos, sin = cos.to(q.dtype), sin.to(q.dtype)
    key = ("exact", id(attention_mask), length)
    if key not in run.masks:  # one mask per forward (every layer gets the same); None: plain causal
        plain = _plain_causal(attention_mask, length)  # SDPA's causal kernel then, no (length, length) mask tensor
        run.masks[key] = None if plain else _to_additive(attention_mask, query, length).to(query.dtype)
    mask = run.masks[key]
    causal = mask is None
    output = torch.empty_like(query)  # (batch, heads, length, head_dim)
    for start in range(0, heads, EXACT_HEADS_PER_CHUNK):  # bounds the (batch, chunk, length, 2 * head_dim) factors
        chunk = slice(start, start + EXACT_HEADS_PER_CHUNK)
        left, right = V.exact_factors(q[:, chunk], k[:, chunk], cos, sin)
        # values padded with zeros to the factors' width: one head size for q, k and v lets SDPA take its fused kernel
        # (different sizes fall back to a full logits matrix); the padding columns of the output are dropped
        padded = torch.cat((value[:, chunk], torch.zeros_like(value[:, chunk])), dim=-1)
        output[:, chunk] = torch.nn.functional.scaled_dot_product_attention(
            left, right, padded, attn_mask=mask, is_causal=causal, scale=scaling)[..., :head_dim]
    return output.transpose(1, 2).contiguous(), None


def _plain_causal(mask: torch.Tensor | None, length: int) -> bool:
    """The prefill mask (None, bool keep, or float additive; (batch|1, 1, length, >= length)) is the plain causal one
    for every row (no padding): each query sees exactly the keys up to itself."""
    if mask is None:
        return True
    if mask.dim() != 4 or mask.shape[-2] != length or mask.shape[-1] < length:
        return False
    keep = mask[..., :length] if mask.dtype == torch.bool else mask[..., :length] == 0
    causal = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
    return bool((keep == causal).all())


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

