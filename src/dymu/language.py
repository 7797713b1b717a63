"""Language-model adapter: virtual token unmerging (VTU) with hooks around the stock decoder (Llama / Qwen2).

The decoder runs at *full length* exactly as transformers wrote it: positions, RoPE, masks, the KV cache and
whatever its arguments are called this release. What VTU changes is where the token-wise work happens.
PyTorch hooks (instance-level, removable) surround the stock sub-modules of every layer:

* ``q_proj`` / ``k_proj`` / ``v_proj`` and ``mlp``: the input is compressed to the unique tokens (one copy per
  merge group: all positions of a group hold the same vector), the module runs on those only, and the output
  is expanded back to every position (VTU's M·);
* ``o_proj``: the attention output is reduced to the mean over each group's positions ((MᵀM)⁻¹Mᵀ), projected,
  and expanded, which keeps the group invariant for the next layer.

Attention itself (sdpa / eager / flash, chosen by the model) sees the full-length expanded Q/K/V, so RoPE is
applied at the original positions and the cache stores full-length K/V: this is the paper's fast path. Exact
VTU (``vtu="exact"``) additionally selects the ``dymu_exact`` attention kernel (registered through
``AttentionInterface``), which computes the scores from the C/S decomposition on the un-rotated merged Q/K.
Rows of a batch with fewer unique tokens are packed, so a batch costs its real tokens.

A *plan* (today: one ``VirtualMap`` for every layer) is handed over by the VLM adapter (``pending``) and taken
by the language model's forward pre-hook; decode steps get no plan and run the untouched stock path. After a
prefill with a plan, the adapter checks that every hooked module ran once per layer and that the KV cache grew
by the full sequence length; anything else raises instead of decoding garbage.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from . import compat
from . import vtu as V
from .merge import accumulation_dtype
from .vision import DymuError

VTU_MODES = ("fast", "exact", "none")
#: exact VTU computes its full-length score matrices this many heads at a time (memory bound)
EXACT_HEADS_PER_CHUNK = 8
#: hooked modules per decoder layer: each must run once per layer during a planned prefill
HOOKED = (*compat.PROJECTIONS, "mlp")

#: attention module -> its adapter, for the exact kernel (which transformers calls with the module only)
_ADAPTERS: "weakref.WeakKeyDictionary[nn.Module, LanguageAdapter]" = weakref.WeakKeyDictionary()


@dataclass
class Prefill:
    """The forward in flight that carries a plan."""

    vmap: V.VirtualMap
    cache_before: int  # KV-cache length when the forward started
    calls: dict = field(default_factory=dict)  # hooked module name -> calls so far
    compressed: tuple | None = None  # (input tensor, its unique tokens): q/k/v share one input
    stash: dict = field(default_factory=dict)  # exact VTU: (attention module, "q"|"k") -> full-length pre-RoPE states
    rotary: tuple | None = None  # exact VTU: (cos, sin) at the full positions, (batch, full, head_dim)


class LanguageAdapter:
    """Hooks VTU into one decoder stack. ``remove()`` restores it exactly."""

    def __init__(self, language_model: nn.Module, vtu: str):
        if vtu not in VTU_MODES:
            raise DymuError(f"vtu must be one of {', '.join(VTU_MODES)}, got {vtu!r}")
        compat.check_language_model(language_model, exact=vtu == "exact")
        self.language_model = language_model
        self.vtu = vtu
        self.pending: V.VirtualMap | None = None  # set by the VLM adapter right before the forward
        self.prefill: Prefill | None = None
        self._handles = []
        self._configs = []  # (config, its attention implementation before exact VTU)
        layers = language_model.layers
        self._handles.append(language_model.register_forward_pre_hook(self._start, with_kwargs=True))
        self._handles.append(language_model.register_forward_hook(self._finish, with_kwargs=True, always_call=True))
        for layer in layers:
            attention = layer.self_attn
            for name in ("q_proj", "k_proj", "v_proj"):
                self._hook(getattr(attention, name), name, stash=(attention, name[0]) if vtu == "exact" else None)
            self._hook(attention.o_proj, "o_proj", reduce_mean=True)
            self._hook(layer.mlp, "mlp")
        if vtu == "exact":
            self._use_exact_kernel(language_model)

    # ------------------------------------------------------------------ lifecycle of one forward
    def _start(self, module, args, kwargs):
        vmap, self.pending = self.pending, None
        self.prefill = None
        if vmap is not None:
            cache = compat.find_cache((*args, *kwargs.values()))
            self.prefill = Prefill(vmap=vmap, cache_before=cache.get_seq_length() if cache is not None else 0)

    def _finish(self, module, args, kwargs, output):
        prefill, self.prefill = self.prefill, None
        if prefill is None or output is None:  # no plan, or the forward raised (always_call)
            return
        layers = len(self.language_model.layers)
        for name in HOOKED:
            if prefill.calls.get(name, 0) != layers:
                raise compat.refuse(f"{type(module).__name__}: {name} ran {prefill.calls.get(name, 0)} time(s) in a "
                                    f"{layers}-layer prefill")
        values = output.values() if hasattr(output, "values") else output if isinstance(output, tuple) else ()
        cache = compat.find_cache(values)
        if cache is not None:
            expected = prefill.cache_before + prefill.vmap.num_full
            if cache.get_seq_length() != expected:
                raise compat.refuse(f"the prefill left the KV cache at {cache.get_seq_length()} positions instead of "
                                    f"{expected}")

    # ------------------------------------------------------------------ hooks around token-wise modules
    def _hook(self, module: nn.Module, name: str, reduce_mean: bool = False, stash=None) -> None:
        def before(module, args):
            prefill = self.prefill
            if prefill is None:
                return None
            prefill.calls[name] = prefill.calls.get(name, 0) + 1
            if len(args) != 1 or args[0].dim() != 3 or args[0].shape[1] != prefill.vmap.num_full:
                shape = tuple(args[0].shape) if args and isinstance(args[0], torch.Tensor) else "no positional tensor"
                raise compat.refuse(f"{name} was called with {shape}, expected (batch, {prefill.vmap.num_full}, features)")
            hidden = args[0]  # (batch, full, features)
            if reduce_mean:
                return (V.to_unique(hidden, prefill.vmap, reduce_mean=True),)
            if prefill.compressed is None or prefill.compressed[0] is not hidden:
                prefill.compressed = (hidden, V.to_unique(hidden, prefill.vmap))
            return (prefill.compressed[1],)

        def after(module, args, output):
            prefill = self.prefill
            if prefill is None:
                return None
            full = V.from_unique(output, prefill.vmap)  # (batch, full, out features)
            if stash is not None:
                prefill.stash[stash] = full
            return full

        self._handles.append(module.register_forward_pre_hook(before))
        self._handles.append(module.register_forward_hook(after))

    # ------------------------------------------------------------------ exact VTU
    def _use_exact_kernel(self, language_model: nn.Module) -> None:
        name = compat.register_exact_kernel(exact_attention)
        configs = {id(language_model.config): language_model.config}
        for layer in language_model.layers:
            _ADAPTERS[layer.self_attn] = self
            configs.setdefault(id(layer.self_attn.config), layer.self_attn.config)
        for config in configs.values():
            self._configs.append((config, config._attn_implementation))
            config._attn_implementation = name

        def keep_tables(module, args, output):
            if self.prefill is not None:
                self.prefill.rotary = output  # (cos, sin), each (batch, full, head_dim)

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
        self.pending = self.prefill = None


def exact_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The ``dymu_exact`` attention kernel. During a planned prefill: scores from the C/S decomposition on the
    merged, un-rotated Q/K (``dymu.vtu.exact_scores``), eager softmax. Otherwise the stock sdpa kernel.

    query: (batch, heads, q, head_dim) after RoPE; key / value: (batch, kv_heads, kv, head_dim) after the cache.
    Returns ((batch, q, heads, head_dim), None).
    """
    adapter = _ADAPTERS.get(module)
    prefill = adapter.prefill if adapter is not None else None
    if prefill is None:
        return compat.fallback_kernel()(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if key.shape[-2] != prefill.vmap.num_full or prefill.rotary is None:
        raise DymuError("vtu='exact' needs an empty KV cache at prefill")
    batch, heads, full, head_dim = query.shape

    def unrotated(kind):  # (batch, full, n * head_dim) -> (batch, n, full, head_dim), merged and pre-RoPE
        states = prefill.stash.pop((module, kind))
        return states.view(batch, full, -1, head_dim).transpose(1, 2)

    q, k = unrotated("q"), unrotated("k")
    groups = heads // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)  # (batch, heads, full, head_dim), GQA
    value = value.repeat_interleave(groups, dim=1)
    cos, sin = prefill.rotary
    mask = _to_additive(attention_mask, query, full)
    softmax_dtype = accumulation_dtype(query.dtype)
    scaling = head_dim ** -0.5 if scaling is None else scaling
    output = torch.empty_like(query)  # (batch, heads, full, head_dim)
    for start in range(0, heads, EXACT_HEADS_PER_CHUNK):  # bounds the (batch, heads, full, full) scores
        chunk = slice(start, start + EXACT_HEADS_PER_CHUNK)
        scores = V.exact_scores(q[:, chunk], k[:, chunk], cos, sin, scaling)  # (batch, chunk, full, full)
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
