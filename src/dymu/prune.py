"""Decoder-side visual-token pruning (FastV, VTW): pure tensor functions, no model knowledge.

FastV ranks the image tokens by the attention they receive at layer K-1 and drops the lowest fraction R from
layer K on; VTW drops all of them (FastV with R = 1). "Image tokens" are the tokens the language model computes
on: with VTU, one per merge group (its score is the attention its positions receive, summed), otherwise one per
placeholder position. Kept positions keep their original RoPE positions.

Rows of a batch can keep different numbers of positions. They are aligned to the longest row by *fillers* put in
front (like left padding): a filler repeats the row's first position, is masked as a key for every query and
attends only to itself, so it changes nothing and the last position of every row stays the last real token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .merge import accumulation_dtype


@dataclass
class Kept:
    """The positions that exist from the pruning layer on, per batch row."""

    positions: torch.Tensor  # (batch, kept) full-sequence positions, ascending after the fillers
    filler: torch.Tensor  # (batch, kept) bool, True on fillers (front-aligned)
    image_tokens: torch.Tensor  # (batch,) image tokens kept per row (unique tokens with VTU)

    @property
    def length(self) -> int:
        return self.positions.shape[1]


def _repeat_kv(key: torch.Tensor, heads: int) -> torch.Tensor:
    """(batch, kv_heads, kv, d) -> (batch, heads, kv, d) (grouped-query attention)."""
    return key.repeat_interleave(heads // key.shape[1], dim=1)


def last_query_scores(query: torch.Tensor, key: torch.Tensor, scaling: float, key_padding: torch.Tensor | None) -> torch.Tensor:
    """Attention the last query gives each key, mean over heads (FastV's official rule).

    query: (batch, heads, q, d) after RoPE; key: (batch, kv_heads, kv, d); key_padding: (batch, kv) bool or None.
    Returns (batch, kv) in the accumulation dtype; each row sums to 1.
    """
    acc = accumulation_dtype(query.dtype)
    logits = (query[:, :, -1:].to(acc) @ _repeat_kv(key, query.shape[1]).to(acc).transpose(-1, -2))[:, :, 0] * scaling
    if key_padding is not None:
        logits = logits.masked_fill(key_padding[:, None], float("-inf"))
    return torch.softmax(logits, dim=-1).mean(dim=1)  # (batch, kv)


def all_query_scores(query: torch.Tensor, key: torch.Tensor, scaling: float, padding: torch.Tensor | None,
                     heads_per_chunk: int = 8) -> torch.Tensor:
    """Attention each key receives, mean over heads and over the real queries (FastV's paper wording).

    Causal over positions; ``padding`` (batch, n) bool marks padding positions (never queries, never keys).
    Returns (batch, n).
    """
    acc = accumulation_dtype(query.dtype)
    batch, heads, n, _ = query.shape
    key = _repeat_kv(key, heads)
    allowed = torch.ones(n, n, dtype=torch.bool, device=query.device).tril()[None]  # (1, q, kv)
    real = torch.ones(batch, n, dtype=torch.bool, device=query.device) if padding is None else ~padding
    allowed = allowed & real[:, None, :]
    total = torch.zeros(batch, n, dtype=acc, device=query.device)
    for start in range(0, heads, heads_per_chunk):
        chunk = slice(start, start + heads_per_chunk)
        logits = (query[:, chunk].to(acc) @ key[:, chunk].to(acc).transpose(-1, -2)) * scaling  # (batch, c, q, kv)
        weights = torch.softmax(logits.masked_fill(~allowed[:, None], float("-inf")), dim=-1).nan_to_num(0.0)
        total += (weights * real[:, None, :, None]).sum(dim=(1, 2))
    return total / (heads * real.sum(-1, keepdim=True).clamp_min(1))


def kept_count(image_tokens: torch.Tensor, fraction: float) -> torch.Tensor:
    """Image tokens kept when the fraction ``fraction`` is removed: N - round(fraction * N), as FastV's HF code."""
    return image_tokens - torch.round(image_tokens.double() * fraction).long()


def select(scores: torch.Tensor, image: torch.Tensor, fraction: float, token_of: torch.Tensor | None = None) -> Kept:
    """Keep every non-image position and the best-scored image tokens; drop the lowest ``fraction`` of them.

    scores: (batch, n) attention received per position (ignored for fraction 1); image: (batch, n) bool.
    token_of: (batch, n) the image token each position belongs to (VTU groups), or None (one per position).
    Ties keep the earlier token (stable sort).
    """
    batch, n = image.shape
    device = image.device
    if token_of is None:
        token_of = torch.arange(n, device=device).expand(batch, n)
    tokens = int(token_of.max()) + 1 if n else 0
    is_image_token = torch.zeros(batch, tokens, dtype=torch.long, device=device).scatter_add_(1, token_of, image.long()) > 0
    token_scores = torch.zeros(batch, tokens, dtype=scores.dtype, device=device).scatter_add_(
        1, token_of, scores.masked_fill(~image, 0))
    image_tokens = is_image_token.sum(-1)
    keep_tokens = kept_count(image_tokens, fraction)  # (batch,)
    order = torch.sort(token_scores.masked_fill(~is_image_token, float("-inf")), dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(tokens, device=device).expand(batch, tokens))
    kept_token = is_image_token & (rank < keep_tokens[:, None])  # (batch, tokens)
    keep = ~image | kept_token.gather(1, token_of)  # (batch, n)
    lengths = keep.sum(-1)
    width = int(lengths.max())
    slot = width - lengths[:, None] + keep.long().cumsum(-1) - 1  # right-aligned slot of every kept position
    positions = torch.zeros(batch, width, dtype=torch.long, device=device)
    rows, columns = keep.nonzero().unbind(-1)
    positions[rows, slot[rows, columns]] = columns
    filler = torch.arange(width, device=device)[None, :] < (width - lengths)[:, None]
    first = positions.gather(1, (width - lengths).clamp_max(width - 1)[:, None])  # the row's first kept position
    positions = torch.where(filler, first, positions)
    return Kept(positions=positions, filler=filler, image_tokens=keep_tokens)


def gather_rows(states: torch.Tensor, kept: Kept) -> torch.Tensor:
    """(batch|1, n, ...) -> (batch, kept, ...) along dim 1 (a shared first row, e.g. RoPE tables, is broadcast)."""
    batch = kept.positions.shape[0]
    states = states.expand(batch, *states.shape[1:])
    index = kept.positions.view(*kept.positions.shape, *([1] * (states.dim() - 2)))
    return states.gather(1, index.expand(-1, -1, *states.shape[2:]))


def gather_mask(mask: torch.Tensor | None, kept: Kept, queries: torch.Tensor | None, kv_length: int,
                dtype: torch.dtype) -> torch.Tensor | None:
    """The attention mask of a pruned layer: kept key columns (then every key appended after the prompt) and the
    given query rows; filler keys masked for every query, filler queries attend to themselves only.

    mask: the stock 4-D mask (batch|1, 1, q, n + extra) as bool (True = attend) or additive float, or None
    (causal, no padding). queries: (batch, q) full positions of the query rows, or None for the kept rows
    (prefill). kv_length: key columns of the pruned layer (kept + keys appended since). Returns None when the
    stock mask is None and no row has fillers (causal order is preserved, so the stock path stays valid).
    """
    batch, width = kept.positions.shape
    device = kept.positions.device
    has_filler = bool(kept.filler.any())
    if mask is None and not has_filler:
        return None
    appended = kv_length - width  # keys written after the prompt (decode steps)
    query_positions = kept.positions if queries is None else queries  # (batch, q)
    n = int(kept.positions.max()) + 1
    prompt_end = n if mask is None else mask.shape[-1] - appended
    key_positions = torch.cat((kept.positions, prompt_end + torch.arange(appended, device=device).expand(batch, -1)), dim=1)
    if mask is None:
        allowed = key_positions[:, None, :] <= query_positions[:, :, None]  # causal by original position
        masked = ~allowed
    else:
        rows = mask.expand(batch, -1, -1, -1)[:, 0]  # (batch, q_all, keys)
        if queries is None:
            rows = rows.gather(1, kept.positions[:, :, None].expand(-1, -1, rows.shape[-1]))
        columns = rows.gather(2, key_positions[:, None, :].expand(-1, rows.shape[1], -1))
        masked = ~columns if columns.dtype == torch.bool else columns < 0
    key_filler = torch.cat((kept.filler, kept.filler.new_zeros(batch, appended)), dim=1)
    masked = masked | key_filler[:, None, :]
    if queries is None:  # filler queries attend to themselves only (a fully masked row would give NaN)
        own = torch.eye(width, kv_length, dtype=torch.bool, device=device)[None]
        masked = torch.where(kept.filler[:, :, None], ~own, masked)
    if dtype == torch.bool:
        return (~masked)[:, None]
    return torch.zeros(masked.shape, dtype=dtype, device=device).masked_fill(masked, torch.finfo(dtype).min)[:, None]


def mask_keys(mask: torch.Tensor | None, masked: torch.Tensor, queries: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The stock attention mask with the key columns ``masked`` hidden from every query but the key's own position
    (FastV's per-step "attention-mask" variant: the pruned tokens stay in the sequence and the cache).

    mask: (batch|1, 1, q, kv) bool (True = attend) or additive float, or None (causal); masked: (batch, kv) bool;
    queries: (batch, q) full positions of the query rows. Returns (batch, 1, q, kv) in ``dtype``.
    """
    batch, kv = masked.shape
    keys = torch.arange(kv, device=masked.device)
    own = keys[None, None, :] == queries[:, :, None]  # (batch, q, kv)
    if mask is None:
        hidden = keys[None, None, :] > queries[:, :, None]  # causal
    else:
        columns = mask.expand(batch, -1, -1, -1)[:, 0, :, :kv]
        hidden = ~columns if columns.dtype == torch.bool else columns < 0
    hidden = hidden | (masked[:, None, :] & ~own)
    if dtype == torch.bool:
        return (~hidden)[:, None]
    return torch.zeros(hidden.shape, dtype=dtype, device=masked.device).masked_fill(hidden, torch.finfo(dtype).min)[:, None]
