"""DToMe merging math: pure tensor functions, no model knowledge.

One routine serves every batch size. A batch is a padded tensor ``(batch, tokens, dim)`` plus
``lengths`` ``(batch,)``: image ``b`` owns positions ``0 .. lengths[b]-1`` and everything after is
padding. Every decision below is taken per image from that image's own tokens, so an image gets
exactly the same merge groups alone or in any padded batch.

Semantics (DyMU, arXiv 2504.17040; reference instance path, with its bugs fixed):

* Bipartite split by current position: set A = even positions, set B = odd positions.
* Similarity = cosine of the head-averaged attention keys (the caller passes that ``metric``).
* Protected prefix tokens (CLS, ``protected=1``) are never sources and never destinations.
* Every A token picks its most similar B token (ties: the lowest B index, as ``torch.max`` documents).
* Threshold mode: an A token merges iff its best score is strictly above the layer threshold, at most
  ``floor((length - protected) / 2)`` merges per image; when that cap binds the best scores win (ties:
  the lower position wins; stable sort).
* Fixed mode (ToMe, Bolya et al.): every image merges its ``min(r, cap)`` best edges (the same ranking and
  ties as the cap above), whatever their scores, so all images keep the same token count.
* Budget mode (threshold finding): the ``budget`` best edges of the whole batch merge, each image still
  capped as above; the statistic is the best edge that did NOT merge, clamped at 0 (reference §1.5 step 7).
* Token order after a layer in which an image merges: ``[protected, surviving A (ascending position),
  B (ascending position)]``, as the reference CLIP instance path; an image that merges nothing in a layer
  keeps its order. Padding always goes last.
* Merged features are size-weighted means computed in at least fp32 whatever the activation dtype;
  tokens that absorb nothing are copied bit for bit. Inputs are never written to.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

#: Guards the cosine normalisation against an all-zero key row (the reference produced NaN there).
NORM_EPS = 1e-12
#: Per-batch threshold statistics are clamped at this floor (reference behaviour).
STATISTIC_FLOOR = 0.0


@dataclass
class MatchScores:
    """Best bipartite edge of every A token."""

    node_max: torch.Tensor  # (batch, tokens_a) best cosine score; -inf where the A token cannot merge
    node_idx: torch.Tensor  # (batch, tokens_a) index into the B set of that best edge
    cap: torch.Tensor  # (batch,) most merges allowed per image: floor((length - protected) / 2)
    rank: torch.Tensor  # (batch, tokens_a) rank of the best edge within its image: 0 = best; ties: lower position first

    @property
    def within_cap(self) -> torch.Tensor:
        """(batch, tokens_a) bool: the A token ranks inside its image's cap."""
        return self.rank < self.cap[:, None]


@dataclass
class MergePlan:
    """Where every current token goes in the merged sequence."""

    dst: torch.Tensor  # (batch, tokens) new index of each token; padding -> num_tokens (a dump slot)
    keep: torch.Tensor  # (batch, num_tokens) old index of the token kept at each new slot
    lengths: torch.Tensor  # (batch,) valid tokens after the merge
    num_tokens: int  # padded length after the merge = max(lengths)
    merged: torch.Tensor  # (batch,) merges done per image in this layer


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half-precision inputs, otherwise the input dtype (fp32 or fp64)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def valid_mask(lengths: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """(batch, num_tokens) bool, True on real tokens."""
    positions = torch.arange(num_tokens, device=lengths.device)
    return positions[None, :] < lengths[:, None]


def match_scores(metric: torch.Tensor, lengths: torch.Tensor, protected: int) -> MatchScores:
    """Best B partner of every A token.

    metric: (batch, tokens, dim) head-averaged keys. lengths: (batch,). protected: 0 or 1.
    """
    if protected not in (0, 1):
        raise ValueError(f"protected must be 0 or 1, got {protected}")
    batch, num_tokens, _ = metric.shape
    metric = F.normalize(metric.to(accumulation_dtype(metric.dtype)), dim=-1, eps=NORM_EPS)
    metric_a, metric_b = metric[:, ::2], metric[:, 1::2]  # (batch, tokens_a, dim), (batch, tokens_b, dim)
    scores = metric_a @ metric_b.transpose(-1, -2)  # (batch, tokens_a, tokens_b)

    valid = valid_mask(lengths, num_tokens)  # (batch, tokens)
    valid_a, valid_b = valid[:, ::2], valid[:, 1::2]
    scores = scores.masked_fill(~valid_b[:, None, :], float("-inf"))
    if scores.shape[-1] == 0:  # a single token: nothing to pair with
        node_max = torch.full(valid_a.shape, float("-inf"), dtype=scores.dtype, device=scores.device)
        node_idx = torch.zeros(valid_a.shape, dtype=torch.long, device=scores.device)
    else:
        node_max, node_idx = scores.max(dim=-1)  # (batch, tokens_a)
    invalid_a = ~valid_a
    if protected:
        invalid_a = invalid_a.clone()
        invalid_a[:, 0] = True
    node_max = node_max.masked_fill(invalid_a, float("-inf"))

    cap = merge_capacity(lengths, protected)  # (batch,)
    order = torch.sort(node_max, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand(batch, -1))
    return MatchScores(node_max=node_max, node_idx=node_idx, cap=cap, rank=rank)


def merge_capacity(tokens, protected: int):
    """Most merges one layer allows ("max 50%" rule): floor((tokens - protected) / 2). tokens: an int or a (batch,) tensor."""
    return (tokens - protected) // 2


def select_by_threshold(scores: MatchScores, threshold: float) -> torch.Tensor:
    """(batch, tokens_a) bool: A tokens that merge at this threshold (strictly above it, within the cap)."""
    return (scores.node_max > threshold) & scores.within_cap


def select_top_r(scores: MatchScores, r: int) -> torch.Tensor:
    """(batch, tokens_a) bool: each image's ``min(r, cap)`` best edges merge, whatever their scores (ToMe's fixed r).

    Ranked per image as the cap ranks them (ties: the lower position); every rank inside the cap is a real edge.
    """
    return scores.within_cap & (scores.rank < r)


def select_by_budget(scores: MatchScores, budget: int) -> tuple[torch.Tensor, float]:
    """The ``budget`` best edges of the whole batch merge (threshold finding).

    Returns the (batch, tokens_a) merge mask and the batch statistic: the score of the best edge that did
    not merge, clamped at ``STATISTIC_FLOOR``. Merging strictly above that statistic reproduces the same
    merges on the same batch (absent exact ties at the boundary).
    """
    eligible = scores.node_max.masked_fill(~scores.within_cap, float("-inf"))
    flat = eligible.flatten()  # (batch * tokens_a,)
    order = torch.sort(flat, descending=True, stable=True).indices
    chosen = order[: max(0, min(budget, flat.numel()))]
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[chosen] = True
    mask &= torch.isfinite(flat)
    if flat.numel() == 0:
        statistic = STATISTIC_FLOOR
    else:
        boundary = flat[order[min(budget, flat.numel() - 1)]].item()
        statistic = max(boundary, STATISTIC_FLOOR) if boundary == boundary else STATISTIC_FLOOR
    return mask.view_as(eligible), float(statistic)


def plan_merge(
    merge_a: torch.Tensor, node_idx: torch.Tensor, lengths: torch.Tensor, protected: int, num_tokens: int
) -> MergePlan:
    """Turn a merge decision into new token indices.

    merge_a: (batch, tokens_a) bool, A tokens that merge. node_idx: (batch, tokens_a) their B partner.
    """
    device = lengths.device
    batch = lengths.shape[0]
    positions = torch.arange(num_tokens, device=device)  # (tokens,)
    is_a = positions % 2 == 0
    valid = valid_mask(lengths, num_tokens)  # (batch, tokens)
    merged_token = torch.zeros(batch, num_tokens, dtype=torch.bool, device=device)
    merged_token[:, ::2] = merge_a
    merged = merge_a.sum(-1)  # (batch,)

    # Sort keys: reorder to [protected, A ascending, B ascending] only where the image merged.
    key_reorder = torch.where(positions < protected, positions - num_tokens, torch.where(is_a, positions, positions + num_tokens))
    key = torch.where((merged > 0)[:, None], key_reorder[None, :], positions[None, :])
    key = torch.where(valid & ~merged_token, key, positions[None, :] + 3 * num_tokens)  # removed and padding last
    order = torch.sort(key, dim=-1, stable=True).indices  # (batch, tokens): old index at each new slot
    rank = torch.empty_like(order)
    rank.scatter_(1, order, positions.expand(batch, -1))  # new slot of each old token

    new_lengths = lengths - merged
    new_num_tokens = int(new_lengths.max().item()) if batch else 0
    dst = rank.clone()
    # A token that merges goes where its B partner goes.
    partner = (2 * node_idx + 1).clamp_max(num_tokens - 1)  # (batch, tokens_a) old index of the partner
    dst_a = torch.where(merge_a, rank.gather(1, partner), rank[:, ::2])
    dst[:, ::2] = dst_a
    dst = torch.where(valid, dst, torch.full_like(dst, new_num_tokens))
    return MergePlan(dst=dst, keep=order[:, :new_num_tokens], lengths=new_lengths, num_tokens=new_num_tokens, merged=merged)


def merge_features(x: torch.Tensor, sizes: torch.Tensor, plan: MergePlan) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted merge.

    x: (batch, tokens, dim); sizes: (batch, tokens) patches per token, 0 on padding.
    Returns x (batch, new_tokens, dim) in x's dtype and sizes (batch, new_tokens) in the sizes' dtype.
    Weighted sums run in at least fp32; a token that absorbed nothing is copied unchanged.
    """
    batch, _, dim = x.shape
    acc = accumulation_dtype(x.dtype)
    slots = plan.num_tokens + 1  # the last slot collects padding and is dropped
    weights = sizes.to(acc)  # (batch, tokens)
    index = plan.dst[..., None].expand(-1, -1, dim)
    sum_x = torch.zeros(batch, slots, dim, dtype=acc, device=x.device).scatter_add_(1, index, x.to(acc) * weights[..., None])
    sum_s = torch.zeros(batch, slots, dtype=acc, device=x.device).scatter_add_(1, plan.dst, weights)
    members = torch.zeros(batch, slots, dtype=torch.int32, device=x.device).scatter_add_(
        1, plan.dst, torch.ones_like(plan.dst, dtype=torch.int32)
    )
    sum_x, sum_s, members = sum_x[:, :-1], sum_s[:, :-1], members[:, :-1]
    averaged = (sum_x / sum_s.clamp_min(torch.finfo(acc).tiny)[..., None]).to(x.dtype)
    copied = x.gather(1, plan.keep[..., None].expand(-1, -1, dim))  # (batch, new_tokens, dim)
    new_x = torch.where((members == 1)[..., None], copied, averaged)
    new_valid = valid_mask(plan.lengths, plan.num_tokens)
    new_x = new_x.masked_fill(~new_valid[..., None], 0)
    return new_x, sum_s.to(sizes.dtype)


def merge_source(source: torch.Tensor, plan: MergePlan) -> torch.Tensor:
    """source: (batch, original_tokens) current index of every original token -> index after the merge."""
    return plan.dst.gather(1, source)


def attention_bias(sizes: torch.Tensor | None, lengths: torch.Tensor, num_tokens: int, dtype: torch.dtype) -> torch.Tensor | None:
    """Additive key bias for proportional attention: log(size) on real tokens, the dtype's minimum on padding.

    Returns (batch, 1, 1, tokens), or None when every token has size 1 and nothing is padded (so an
    unmerged batch runs exactly the stock attention).
    """
    padded = bool((lengths < num_tokens).any())
    if sizes is None and not padded:
        return None
    if sizes is None:
        sizes = valid_mask(lengths, num_tokens).to(dtype)
    valid = valid_mask(lengths, num_tokens)
    bias = torch.log(sizes.to(accumulation_dtype(dtype)).clamp_min(1.0)).to(dtype)
    bias = bias.masked_fill(~valid, torch.finfo(dtype).min)
    return bias[:, None, None, :]


def merge_schedule(num_layers: int, r_total: int, kind: str = "constant") -> list[int]:
    """Tokens to remove per layer during threshold finding (reference ``_get_rs``, made to terminate).

    ``constant``: floor(r_total / L) per layer, the first ``r_total mod L`` layers one more.
    ``linear``: r0 = floor(2 r_total / L) decreasing by r0 / L per layer, the remainder in the next
    layer, zeros after; ``reverse-linear``: the same reversed.
    """
    if num_layers <= 0:
        raise ValueError(f"number of merging layers must be positive, got {num_layers}")
    if r_total < 0:
        raise ValueError(f"tokens to remove must be >= 0, got {r_total}")
    kind = kind.replace("_", "-")
    if kind == "constant":
        base, extra = divmod(r_total, num_layers)
        return [base + (1 if i < extra else 0) for i in range(num_layers)]
    if kind in ("linear", "reverse-linear"):
        r0 = (2 * r_total) // num_layers
        step = r0 / num_layers
        rs: list[int] = []
        for k in range(num_layers):
            nxt = int(r0 - k * step)
            if nxt <= 0 or sum(rs) + nxt >= r_total:
                break
            rs.append(nxt)
        remainder = r_total - sum(rs)
        if remainder > 0 and len(rs) < num_layers:
            rs.append(remainder)
        elif remainder > 0:  # every layer used: spread what is left from the first layer on
            for i in range(remainder):
                rs[i % num_layers] += 1
        rs += [0] * (num_layers - len(rs))
        assert sum(rs) == r_total and len(rs) == num_layers
        return rs[::-1] if kind == "reverse-linear" else rs
    raise ValueError(f"unknown schedule {kind!r}: use constant, linear or reverse-linear")


def check_schedule(schedule: list[int], num_tokens: int, protected: int) -> None:
    """Raise ValueError if a layer asks for more merges than half of its mergeable tokens."""
    tokens = num_tokens
    for i, r in enumerate(schedule):
        cap = merge_capacity(tokens, protected)
        if r > cap:
            raise ValueError(
                f"schedule asks layer {i} to remove {r} tokens but at most {cap} of {tokens} can merge there; "
                "raise the target token count or use more merging layers"
            )
        tokens -= r


def fixed_r_tokens(num_tokens: int, protected: int, r: int, num_layers: int) -> list[int]:
    """Tokens (protected included) after each of ``num_layers`` layers that each merge ``min(r, capacity)``."""
    counts = []
    for _ in range(num_layers):
        num_tokens -= min(r, merge_capacity(num_tokens, protected))
        counts.append(num_tokens)
    return counts


def fixed_r_for(target: int, num_tokens: int, protected: int, num_layers: int) -> int:
    """The smallest r whose fixed schedule leaves the count nearest ``target`` (protected included) after ``num_layers``."""
    largest = merge_capacity(num_tokens, protected)  # any larger r merges exactly as much
    return min(range(largest + 1), key=lambda r: abs(fixed_r_tokens(num_tokens, protected, r, num_layers)[-1] - target))


def layer_flops(tokens_in: int, tokens_out: int, hidden: int, intermediate: int) -> int:
    """Multiply-accumulate FLOPs (x2) of one pre-LN ViT layer that merges after attention.

    Attention (q, k, v, out projections and the two attention products) runs on ``tokens_in``, the MLP on
    ``tokens_out``. The bipartite matching costs (tokens_in / 2)^2 * hidden / heads, which is included by
    the caller through ``matching_flops`` when the layer merges.
    """
    projections = 2 * tokens_in * hidden * hidden * 4
    attention = 2 * 2 * tokens_in * tokens_in * hidden
    mlp = 2 * 2 * tokens_out * hidden * intermediate
    return projections + attention + mlp


def matching_flops(tokens_in: int, head_dim: int) -> int:
    """FLOPs of the A x B cosine score matrix of one merging layer."""
    return 2 * ((tokens_in + 1) // 2) * (tokens_in // 2) * head_dim
