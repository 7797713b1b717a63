"""Virtual token unmerging (VTU, DyMU §3.2): pure tensor functions, no model knowledge.

The language model sees a *full-length* sequence (every image keeps all its placeholder positions, so
positions, masks and the KV cache are those of the unmerged model) but computes on the *unique* tokens:
text tokens plus one token per merge group. ``VirtualMap`` links the two per batch row:

* ``compress``: full -> unique (every member of a group carries the same features; take one copy),
* ``expand``: unique -> full (copy each unique token to all its positions),
* ``reduce``: full -> unique by the mean over each token's positions (``(MᵀM)⁻¹Mᵀ`` in the paper),
* ``to_unique`` / ``from_unique``: the same around a token-wise module, packing rows of a batch that have fewer
  unique tokens so a batch costs its real tokens (``dymu.language`` hooks them around the decoder's modules).

Attention runs at full length with RoPE at the full positions; ``exact_scores`` evaluates the paper's C/S
decomposition on the merged Q/K, reassociated into matrix products.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .merge import accumulation_dtype


@dataclass
class VirtualMap:
    """Full sequence positions <-> unique tokens, per batch row."""

    full_to_unique: torch.Tensor  # (batch, full) unique index of every position
    unique_to_full: torch.Tensor  # (batch, unique) first full position of each unique token (padding -> 0)
    counts: torch.Tensor  # (batch, unique) positions per unique token, 0 on padding
    unique_lengths: torch.Tensor  # (batch,) unique tokens per row
    padding: torch.Tensor | None = None  # (batch, full) bool: padding positions, all held by one unique token per row

    @property
    def valid(self) -> torch.Tensor:
        """(batch, unique) bool: real unique tokens (rows are padded to the longest)."""
        return torch.arange(self.num_unique, device=self.unique_lengths.device)[None, :] < self.unique_lengths[:, None]

    @property
    def padded(self) -> bool:
        return bool((self.unique_lengths < self.num_unique).any())

    @property
    def num_full(self) -> int:
        return self.full_to_unique.shape[1]

    @property
    def num_unique(self) -> int:
        return self.unique_to_full.shape[1]


def build_map(image_mask: torch.Tensor, sources: list[torch.Tensor], padding: torch.Tensor | None = None) -> VirtualMap:
    """Build the map from image placeholder positions and each image's merge groups.

    image_mask: (batch, full) bool, True on image placeholder positions. Images fill them in row-major
    order (as ``masked_scatter`` does): image k takes the next ``len(sources[k])`` positions, all in one row.
    sources[k]: (positions of image k,) group index of every position of image k (raster order).
    padding: (batch, full) bool, True on padding positions (attention_mask == 0). All padding positions of a
    row share one unique token, so batched prompts of different lengths cost their real tokens only; that
    token's attention output is defined as 0 (padding attends to nothing; ``reduce`` skips it).
    """
    batch, full = image_mask.shape
    device = image_mask.device
    positions = torch.arange(full, device=device)
    representative = positions.expand(batch, full).clone()  # (batch, full) first position of each one's group
    placeholders = image_mask.nonzero()  # (total, 2) rows, columns in row-major order
    expected = sum(int(s.numel()) for s in sources)
    if expected != placeholders.shape[0]:
        raise ValueError(
            f"{len(sources)} image(s) need {expected} image placeholder tokens but the prompt(s) have {placeholders.shape[0]}"
        )
    offset = 0
    for source in sources:
        count = source.numel()
        rows, columns = placeholders[offset : offset + count].unbind(-1)
        offset += count
        if count and not bool((rows == rows[0]).all()):
            raise ValueError("an image's placeholder tokens are split across batch rows")
        groups = int(source.max()) + 1 if count else 0
        first = torch.full((groups,), full, dtype=torch.long, device=device)
        first = first.scatter_reduce(0, source.to(device), columns, reduce="amin")
        if count:
            representative[rows[0], columns] = first[source.to(device)]
    if padding is not None and bool(padding.any()):
        first_padding = torch.where(padding, positions, full).min(dim=-1).values  # (batch,)
        representative = torch.where(padding, first_padding[:, None], representative)
    else:
        padding = None
    is_first = representative == positions  # (batch, full)
    unique_index = is_first.long().cumsum(-1) - 1  # (batch, full)
    full_to_unique = unique_index.gather(1, representative)
    unique_lengths = is_first.sum(-1)
    num_unique = int(unique_lengths.max()) if batch else 0
    unique_to_full = torch.zeros(batch, num_unique, dtype=torch.long, device=device)
    rows, columns = is_first.nonzero().unbind(-1)
    unique_to_full[rows, unique_index[rows, columns]] = columns
    counts = torch.zeros(batch, num_unique, dtype=torch.long, device=device).scatter_add_(
        1, full_to_unique, torch.ones_like(full_to_unique)
    )
    return VirtualMap(full_to_unique=full_to_unique, unique_to_full=unique_to_full, counts=counts,
                      unique_lengths=unique_lengths, padding=padding)


def to_unique(hidden: torch.Tensor, vmap: VirtualMap, reduce_mean: bool = False) -> torch.Tensor:
    """(batch, full, dim) -> the unique tokens a token-wise module runs on.

    One copy per unique token (``compress``), or the mean over its positions (``reduce``) with
    ``reduce_mean``. Rows with fewer unique tokens than the longest are packed: (1, real unique tokens, dim).
    """
    unique = reduce(hidden, vmap) if reduce_mean else compress(hidden, vmap)  # (batch, unique, dim)
    return unique[vmap.valid][None] if vmap.padded else unique


def from_unique(unique: torch.Tensor, vmap: VirtualMap) -> torch.Tensor:
    """Inverse of ``to_unique``: (batch, unique, dim) or packed (1, real, dim) -> (batch, full, dim).

    Padding unique tokens (packed rows) come back as 0.
    """
    if vmap.padded:
        valid = vmap.valid
        unpacked = unique.new_zeros(*valid.shape, unique.shape[-1])  # (batch, unique, dim)
        unpacked[valid] = unique[0]
        unique = unpacked
    return expand(unique, vmap)


def take_rows(hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(batch, n, dim) rows picked per batch row by index (batch, m) -> (batch, m, dim).

    One ``index_select`` of whole rows over the flattened batch (a row copy, much faster on CPU than ``gather``
    with an index expanded over ``dim``)."""
    batch, n, dim = hidden.shape
    flat = (index + torch.arange(batch, device=index.device)[:, None] * n).reshape(-1)
    return hidden.reshape(batch * n, dim).index_select(0, flat).view(batch, index.shape[1], dim)


def compress(hidden: torch.Tensor, vmap: VirtualMap) -> torch.Tensor:
    """(batch, full, dim) -> (batch, unique, dim): one copy per unique token."""
    return take_rows(hidden, vmap.unique_to_full)


def expand(hidden: torch.Tensor, vmap: VirtualMap) -> torch.Tensor:
    """(batch, unique, dim) -> (batch, full, dim)."""
    return take_rows(hidden, vmap.full_to_unique)


def reduce(hidden: torch.Tensor, vmap: VirtualMap) -> torch.Tensor:
    """(batch, full, dim) -> (batch, unique, dim): mean over each unique token's positions (fp32 or wider).

    Padding positions do not contribute: the padding token of a row gets 0.
    """
    acc = accumulation_dtype(hidden.dtype)
    batch, _, dim = hidden.shape
    counts = vmap.counts
    if vmap.padding is not None:
        hidden = hidden.masked_fill(vmap.padding[..., None], 0)
        counts = torch.zeros_like(counts).scatter_add_(1, vmap.full_to_unique, (~vmap.padding).long())
    sums = torch.zeros(batch, vmap.num_unique, dim, dtype=acc, device=hidden.device)
    sums.scatter_add_(1, vmap.full_to_unique[..., None].expand(-1, -1, dim), hidden.to(acc))
    return (sums / counts.clamp_min(1)[..., None].to(acc)).to(hidden.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def exact_factors(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left and right factors of the RoPE attention logits from the paper's C/S decomposition:
    ``exact_scores = left @ right.T * scaling``.

    q: (batch, heads, full, head_dim) merged queries gathered to full length, *before* RoPE; k likewise
    (heads already repeated for GQA); cos, sin: (batch, full, head_dim) HF tables (halves duplicated).

    A = C M (Q·K) Mᵀ C + S M (Q·K) Mᵀ S + S M (Q×K) Mᵀ C − C M (Q×K) Mᵀ S with Q·K = q¹k¹ᵀ + q²k²ᵀ and
    Q×K = q¹k²ᵀ − q²k¹ᵀ. The four terms are [Cq]·[Ck]ᵀ, [Sq]·[Sk]ᵀ, [Sq]·[C(k², −k¹)]ᵀ and [Cq]·[S(−k², k¹)]ᵀ;
    the terms that share Cq and those that share Sq are reassociated into one product of width 2·head_dim:
    [Cq, Sq] · [Ck + S(−k², k¹), Sk + C(k², −k¹)]ᵀ. Returns (batch, heads, full, 2·head_dim) each.
    """
    d = q.shape[-1]
    half = d // 2
    c, s = cos[:, None], sin[:, None]  # (batch, 1, full, head_dim)
    shape = (*torch.broadcast_shapes(q.shape, c.shape)[:-1], 2 * d)
    left = torch.empty(shape, dtype=q.dtype, device=q.device)  # (batch, heads, full, 2 * head_dim), written in place
    torch.mul(c, q, out=left[..., :d])
    torch.mul(s, q, out=left[..., d:])
    turned = torch.empty_like(k)  # (−k², k¹)
    torch.neg(k[..., half:], out=turned[..., :half])
    turned[..., half:] = k[..., :half]
    right = torch.empty(shape, dtype=k.dtype, device=k.device)
    torch.mul(c, k, out=right[..., :d]).addcmul_(s, turned)  # Ck + S(−k², k¹)
    torch.mul(s, k, out=right[..., d:]).addcmul_(c, turned, value=-1)  # Sk + C(k², −k¹)
    return left, right


def exact_scores(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, scaling: float) -> torch.Tensor:
    """RoPE attention logits at full length from the C/S decomposition (``exact_factors``): (batch, heads, full, full)."""
    left, right = exact_factors(q, k, cos, sin)
    return (left @ right.transpose(-1, -2)) * scaling


def restrict(vmap: VirtualMap, positions: torch.Tensor, filler: torch.Tensor) -> VirtualMap:
    """The map over a subset of positions (pruning): positions (batch, kept) into the full sequence, fillers
    (batch, kept) bool treated as padding. Fillers share one unique token of their own (they repeat a real
    position but evolve apart from it); unique tokens are renumbered per row in order of first appearance."""
    batch, _ = positions.shape
    device = positions.device
    own = vmap.full_to_unique.gather(1, positions).masked_fill(filler, vmap.num_unique)  # (batch, kept) old ids
    present = torch.zeros(batch, vmap.num_unique + 1, dtype=torch.long, device=device).scatter_(1, own, 1)
    renumber = present.cumsum(-1) - 1
    full_to_unique = renumber.gather(1, own)
    unique_lengths = present.sum(-1)
    num_unique = int(unique_lengths.max())
    columns = torch.arange(positions.shape[1], device=device).expand(batch, -1)
    unique_to_full = torch.full((batch, num_unique), positions.shape[1], dtype=torch.long, device=device)
    unique_to_full = unique_to_full.scatter_reduce(1, full_to_unique, columns, reduce="amin").clamp_max(positions.shape[1] - 1)
    counts = torch.zeros(batch, num_unique, dtype=torch.long, device=device).scatter_add_(
        1, full_to_unique, torch.ones_like(full_to_unique))
    padding = filler if vmap.padding is None else vmap.padding.gather(1, positions) | filler
    return VirtualMap(full_to_unique=full_to_unique, unique_to_full=unique_to_full, counts=counts,
                      unique_lengths=unique_lengths, padding=padding if bool(padding.any()) else None)
