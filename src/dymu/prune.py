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


def kept_count(image_tokens: torch.Tensor, fraction) -> torch.Tensor:
    """Image tokens kept when the fraction ``fraction`` (a float or a tensor broadcasting with ``image_tokens``) is
    removed: N - round(fraction * N), as FastV's HF code."""
    if isinstance(fraction, torch.Tensor):
        fraction = fraction.to(torch.float64)
    return image_tokens - torch.round(image_tokens.double() * fraction).long()


def keep_best(scores: torch.Tensor, image: torch.Tensor, fraction, token_of: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Which positions stay when the lowest-scored ``fraction`` (a float, or (batch,) per row) of image tokens goes
    (VTU groups whole).

    scores: (batch, n) attention received per position (ignored for fraction 1); image: (batch, n) bool.
    token_of: (batch, n) the image token each position belongs to (VTU groups), or None (one per position).
    Ties keep the earlier token (stable sort). Returns ((batch, n) bool keep, (batch,) image tokens kept).
    """
    token_of, is_image_token = _image_tokens(image, token_of)
    keep_tokens = kept_count(is_image_token.sum(-1), fraction)  # (batch,)
    return keep_top(scores, image, keep_tokens, token_of), keep_tokens


def _image_tokens(image: torch.Tensor, token_of: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(token_of (batch, n), (batch, tokens) bool: which tokens hold an image position)."""
    batch, n = image.shape
    if token_of is None:
        token_of = torch.arange(n, device=image.device).expand(batch, n)
    tokens = int(token_of.max()) + 1 if n else 0
    is_image_token = torch.zeros(batch, tokens, dtype=torch.long, device=image.device).scatter_add_(
        1, token_of, image.long()) > 0
    return token_of, is_image_token


def keep_top(scores: torch.Tensor, image: torch.Tensor, keep_tokens: torch.Tensor,
             token_of: torch.Tensor | None = None) -> torch.Tensor:
    """(batch, n) bool: every non-image position and the ``keep_tokens`` (batch,) best-scored image tokens of each row
    (a token's score: the sum over its positions; VTU groups whole; ties keep the earlier token)."""
    batch = image.shape[0]
    device = image.device
    token_of, is_image_token = _image_tokens(image, token_of)
    tokens = is_image_token.shape[1]
    token_scores = torch.zeros(batch, tokens, dtype=scores.dtype, device=device).scatter_add_(
        1, token_of, scores.masked_fill(~image, 0))
    order = torch.sort(token_scores.masked_fill(~is_image_token, float("-inf")), dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(tokens, device=device).expand(batch, tokens))
    kept_token = is_image_token & (rank < keep_tokens[:, None])  # (batch, tokens)
    return ~image | kept_token.gather(1, token_of)


def layout(keep: torch.Tensor, image_tokens: torch.Tensor | None = None) -> Kept:
    """The kept positions of every row, ascending and right-aligned: rows with fewer are front-filled with fillers
    that repeat the row's first kept position. keep: (batch, n) bool; image_tokens: (batch,) for the record."""
    batch, n = keep.shape
    device = keep.device
    lengths = keep.sum(-1)
    width = int(lengths.max()) if batch else 0
    slot = width - lengths[:, None] + keep.long().cumsum(-1) - 1  # right-aligned slot of every kept position
    positions = torch.zeros(batch, width, dtype=torch.long, device=device)
    rows, columns = keep.nonzero().unbind(-1)
    positions[rows, slot[rows, columns]] = columns
    filler = torch.arange(width, device=device)[None, :] < (width - lengths)[:, None]
    first = positions.gather(1, (width - lengths).clamp(0, max(width - 1, 0))[:, None])  # the row's first kept position
    positions = torch.where(filler, first, positions)
    if image_tokens is None:
        image_tokens = torch.zeros(batch, dtype=torch.long, device=device)
    return Kept(positions=positions, filler=filler, image_tokens=image_tokens)


def select(scores: torch.Tensor, image: torch.Tensor, fraction: float, token_of: torch.Tensor | None = None) -> Kept:
    """``layout`` of ``keep_best``: every non-image position and the best-scored image tokens."""
    keep, image_tokens = keep_best(scores, image, fraction, token_of)
    return layout(keep, image_tokens)


def slots_in(source: Kept | None, target: Kept, n: int) -> torch.Tensor:
    """(batch, target slots) index of each of ``target``'s positions among ``source``'s slots (None: every position
    0..n-1 in order). Every real position of ``target`` must be held by ``source``; target fillers repeat a real one."""
    if source is None:
        return target.positions
    batch, width = source.positions.shape
    columns = torch.where(source.filler, n, source.positions)  # fillers go to a spare column
    slot = torch.full((batch, n + 1), -1, dtype=torch.long, device=columns.device)
    slot.scatter_(1, columns, torch.arange(width, device=columns.device).expand(batch, -1))
    index = slot.gather(1, target.positions)
    if bool((index < 0).any()):
        raise ValueError("a kept position is not held by the previous layout (drops must be monotone)")
    return index


def layer_mask(queries: torch.Tensor, keys: torch.Tensor, real_keys: torch.Tensor, hidden: torch.Tensor | None,
               own_slots: bool, dtype: torch.dtype) -> torch.Tensor:
    """The attention mask of a layer the plan edits, built from positions (never from the stock mask).

    queries: (batch, q) sequence positions of the query rows; keys: (batch, kv) positions of the key slots;
    real_keys: (batch, kv) bool, False on padding and fillers; hidden: (batch, kv) bool keys hidden from every query
    but the one at their own position (FastV's per-step variant), or None. own_slots: query i is key slot i (a
    prefill), so a query that is itself padding or a filler attends to itself only (a fully masked row gives NaN).
    Returns (batch, 1, q, kv): bool (True = attend), or additive in a float ``dtype``.
    """
    same = keys[:, None, :] == queries[:, :, None]  # (batch, q, kv)
    allowed = (keys[:, None, :] <= queries[:, :, None]) & real_keys[:, None, :]
    if hidden is not None:
        allowed = allowed & (~hidden[:, None, :] | same)
    if own_slots:
        q = queries.shape[1]
        own = torch.eye(q, keys.shape[1], dtype=torch.bool, device=keys.device)[None]
        allowed = torch.where(real_keys[:, :q, None], allowed, own)
    if dtype == torch.bool:
        return allowed[:, None]
    return torch.zeros(allowed.shape, dtype=dtype, device=keys.device).masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def gather_rows(states: torch.Tensor, kept: Kept) -> torch.Tensor:
    """(batch|1, n, ...) -> (batch, kept, ...) along dim 1 (a shared first row, e.g. RoPE tables, is broadcast)."""
    batch = kept.positions.shape[0]
    states = states.expand(batch, *states.shape[1:])
    index = kept.positions.view(*kept.positions.shape, *([1] * (states.dim() - 2)))
    return states.gather(1, index.expand(-1, -1, *states.shape[2:]))
