"""Pure merging math: conservation, proportional attention, schedules, batch semantics."""

import math

import pytest
import torch
import torch.nn.functional as F

from dymu import merge as M


def _merge_once(x, metric, lengths, protected, threshold, sizes=None):
    scores = M.match_scores(metric, lengths, protected)
    mask = M.select_by_threshold(scores, threshold)
    plan = M.plan_merge(mask, scores.node_idx, lengths, protected, x.shape[1])
    if sizes is None:
        sizes = M.valid_mask(lengths, x.shape[1]).to(x.dtype)
    new_x, new_sizes = M.merge_features(x, sizes, plan)
    return scores, mask, plan, new_x, new_sizes


@pytest.mark.parametrize("protected", [0, 1])
def test_weighted_sum_and_sizes_are_conserved(protected):
    torch.manual_seed(0)
    batch, tokens, dim = 3, 23, 8
    x = torch.randn(batch, tokens, dim, dtype=torch.float64)
    metric = torch.randn(batch, tokens, 4, dtype=torch.float64)
    lengths = torch.tensor([23, 17, 9])
    sizes = torch.randint(1, 5, (batch, tokens)).double() * M.valid_mask(lengths, tokens)
    x_before, sizes_before = x.clone(), sizes.clone()
    _, mask, plan, new_x, new_sizes = _merge_once(x, metric, lengths, protected, threshold=-0.2, sizes=sizes)
    assert torch.equal(x, x_before) and torch.equal(sizes, sizes_before), "inputs must not be written to"
    assert mask.any()
    valid = M.valid_mask(lengths, tokens)
    new_valid = M.valid_mask(plan.lengths, plan.num_tokens)
    torch.testing.assert_close(new_sizes.sum(-1), sizes.sum(-1), rtol=0, atol=0)
    weighted_before = (x * sizes[..., None] * valid[..., None]).sum(1)
    weighted_after = (new_x * new_sizes[..., None] * new_valid[..., None]).sum(1)
    torch.testing.assert_close(weighted_after, weighted_before, rtol=1e-12, atol=1e-12)
    assert torch.equal(plan.lengths, lengths - mask.sum(-1))
    assert bool((new_x[~new_valid] == 0).all()) and bool((new_sizes[~new_valid] == 0).all())


def test_source_map_is_a_partition_and_matches_sizes():
    torch.manual_seed(1)
    batch, tokens = 2, 41
    lengths = torch.tensor([41, 41])  # images diverge in length after the first merge
    source = torch.arange(tokens).expand(batch, -1)
    sizes = M.valid_mask(lengths, tokens).double()
    x = torch.randn(batch, tokens, 6, dtype=torch.float64)
    for threshold in (0.3, 0.0, -1.0):
        metric = torch.randn(batch, x.shape[1], 5, dtype=torch.float64)
        _, _, plan, x, sizes = _merge_once(x, metric, lengths, 1, threshold, sizes)
        source = M.merge_source(source, plan)
        lengths = plan.lengths
    for b in range(batch):
        n = int(lengths[b])
        own = source[b]
        assert int(own.min()) >= 0 and int(own.max()) == n - 1
        counts = torch.bincount(own, minlength=n)
        assert torch.equal(counts.double(), sizes[b, :n]), "every token's size is the number of patches mapped to it"
        assert int(own[0]) == 0, "CLS stays at index 0"
        assert int(counts[0]) == 1, "CLS never merges"


def test_cap_and_minus_inf_threshold():
    metric = torch.randn(1, 577, 16)
    lengths = torch.tensor([577])
    scores = M.match_scores(metric, lengths, protected=1)
    mask = M.select_by_threshold(scores, -math.inf)
    assert int(mask.sum()) == 288 and not bool(mask[0, 0])
    assert int(M.select_by_threshold(scores, math.inf).sum()) == 0
    metric = torch.randn(1, 729, 16)
    scores = M.match_scores(metric, torch.tensor([729]), protected=0)
    assert int(M.select_by_threshold(scores, -math.inf).sum()) == 364


def test_cap_keeps_best_scores_and_ties_go_to_lower_position():
    # 5 tokens, no CLS: A = {0, 2, 4}, B = {1, 3}; cap = 2. All A rows tie with score 1 -> positions 0, 2 win.
    metric = torch.ones(1, 5, 3)
    scores = M.match_scores(metric, torch.tensor([5]), protected=0)
    assert scores.node_idx.tolist() == [[0, 0, 0]], "ties pick the lowest B index"
    mask = M.select_by_threshold(scores, 0.5)
    assert mask.tolist() == [[True, True, False]]


def test_order_rule_and_identity_when_nothing_merges():
    # tokens 0..5 with CLS; make A token 2 identical to B token 5 only.
    metric = torch.eye(6)[None].clone()
    metric[0, 2] = metric[0, 5]
    lengths = torch.tensor([6])
    scores = M.match_scores(metric, lengths, 1)
    mask = M.select_by_threshold(scores, 0.5)
    plan = M.plan_merge(mask, scores.node_idx, lengths, 1, 6)
    # new order: [CLS(0), A survivors (4), B (1, 3, 5)]; token 2 goes where 5 goes
    assert plan.keep.tolist() == [[0, 4, 1, 3, 5]]
    assert plan.dst.tolist() == [[0, 2, 4, 3, 1, 4]]
    nothing = M.select_by_threshold(scores, 2.0)
    plan = M.plan_merge(nothing, scores.node_idx, lengths, 1, 6)
    assert plan.keep.tolist() == [[0, 1, 2, 3, 4, 5]]


def test_half_precision_is_averaged_in_fp32():
    x = torch.tensor([[[60000.0], [60000.0], [1.0]]], dtype=torch.float16)
    sizes = torch.tensor([[300.0, 300.0, 1.0]])
    plan = M.plan_merge(torch.tensor([[True, False]]), torch.tensor([[0, 0]]), torch.tensor([3]), 0, 3)
    new_x, new_sizes = M.merge_features(x, sizes, plan)
    assert torch.isfinite(new_x).all(), "x * size would overflow fp16 (300 * 60000)"
    # new order: [surviving A (token 2), B (token 1, which absorbed token 0)]
    assert new_x.dtype == torch.float16 and new_x[0, :, 0].tolist() == [1.0, 60000.0]
    assert new_sizes.tolist() == [[1.0, 600.0]]


def test_singletons_are_copied_bit_for_bit():
    torch.manual_seed(2)
    x = torch.randn(1, 9, 4)
    sizes = torch.tensor([[3.0, 7.0, 1.0, 5.0, 2.0, 9.0, 1.0, 4.0, 6.0]])
    metric = torch.randn(1, 9, 4)
    scores, mask, plan, new_x, _ = _merge_once(x, metric, torch.tensor([9]), 0, 0.2, sizes)
    members = torch.bincount(plan.dst[0], minlength=plan.num_tokens + 1)[:-1]
    for slot in range(plan.num_tokens):
        if members[slot] == 1:
            assert torch.equal(new_x[0, slot], x[0, plan.keep[0, slot]])


def test_budget_statistic_reproduces_the_budget_merges():
    torch.manual_seed(3)
    metric = torch.randn(4, 31, 8, dtype=torch.float64)
    lengths = torch.tensor([31, 25, 31, 12])
    scores = M.match_scores(metric, lengths, 1)
    budget_mask, statistic = M.select_by_budget(scores, 20)
    assert int(budget_mask.sum()) == 20 and statistic > 0
    assert torch.equal(M.select_by_threshold(scores, statistic), budget_mask)
    # an over-large budget merges every eligible A token (each image within its cap)
    all_mask, _ = M.select_by_budget(scores, 10_000)
    assert torch.equal(all_mask, M.select_by_threshold(scores, -math.inf))


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_proportional_attention_equals_duplicated_keys(backend):
    torch.manual_seed(4)
    heads, tokens, head_dim = 2, 7, 5
    q = torch.randn(1, heads, tokens, head_dim, dtype=torch.float64)
    k = torch.randn(1, heads, tokens, head_dim, dtype=torch.float64)
    v = torch.randn(1, heads, tokens, head_dim, dtype=torch.float64)
    sizes = torch.tensor([[1.0, 3.0, 2.0, 1.0, 5.0, 1.0, 4.0]], dtype=torch.float64)
    bias = M.attention_bias(sizes, torch.tensor([tokens]), tokens, torch.float64)  # (1, 1, 1, tokens)
    repeats = sizes[0].long()
    k_dup, v_dup = k.repeat_interleave(repeats, dim=2), v.repeat_interleave(repeats, dim=2)

    def attend(q, k, v, mask):
        if backend == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        logits = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
        return torch.softmax(logits if mask is None else logits + mask, -1) @ v

    torch.testing.assert_close(attend(q, k, v, bias), attend(q, k_dup, v_dup, None), rtol=1e-12, atol=1e-12)


def test_attention_bias_masks_padding_and_is_none_when_unneeded():
    assert M.attention_bias(None, torch.tensor([5, 5]), 5, torch.float32) is None
    bias = M.attention_bias(None, torch.tensor([5, 3]), 5, torch.float32)
    assert bias.shape == (2, 1, 1, 5)
    assert bias[0].eq(0).all() and bias[1, 0, 0, 3:].eq(torch.finfo(torch.float32).min).all()


# Reference schedules (spec §1.7, computed with the reference algorithm).
REFERENCE_SCHEDULES = [
    (24, 504, "constant", [21] * 24),
    (24, 504, "linear", [42, 40, 38, 36, 35, 33, 31, 29, 28, 26, 24, 22, 21, 19, 17, 15, 14, 12, 10, 8, 4, 0, 0, 0]),
    (24, 384, "linear", [32, 30, 29, 28, 26, 25, 24, 22, 21, 20, 18, 17, 16, 14, 13, 12, 10, 9, 8, 6, 4, 0, 0, 0]),
    (24, 384, "reverse-linear", [32, 30, 29, 28, 26, 25, 24, 22, 21, 20, 18, 17, 16, 14, 13, 12, 10, 9, 8, 6, 4, 0, 0, 0][::-1]),
    (12, 504, "linear", [84, 77, 70, 63, 56, 49, 42, 35, 28, 0, 0, 0]),
    (27, 537, "constant", [20] * 24 + [19, 19, 19]),
    (27, 648, "constant", [24] * 27),
]


@pytest.mark.parametrize("layers,r_total,kind,expected", REFERENCE_SCHEDULES)
def test_schedules_match_the_reference_tables(layers, r_total, kind, expected):
    assert M.merge_schedule(layers, r_total, kind) == expected


def test_linear_schedule_terminates_and_sums_for_every_layer_count():
    # the reference loops forever for e.g. (27, 537) and (27, 345)
    for layers in range(1, 41):
        for r_total in range(0, 730, 7):
            for kind in ("linear", "reverse-linear", "constant"):
                rs = M.merge_schedule(layers, r_total, kind)
                assert sum(rs) == r_total and len(rs) == layers and min(rs) >= 0


def test_schedule_validation():
    M.check_schedule([288, 144], 577, 1)
    with pytest.raises(ValueError, match="layer 1"):
        M.check_schedule([288, 145], 577, 1)
    with pytest.raises(ValueError, match="unknown schedule"):
        M.merge_schedule(4, 10, "cosine")


def test_flops_drop_with_tokens():
    full = M.layer_flops(577, 577, 1024, 4096)
    merged = M.layer_flops(577, 300, 1024, 4096)
    assert merged < full
    assert M.layer_flops(100, 100, 8, 16) == 2 * 100 * 8 * 8 * 4 + 4 * 100 * 100 * 8 + 4 * 100 * 8 * 16


def _scored_metric(rows):
    """(batch, tokens, 5) metric whose A token at A-index a has cosine ``score`` with B token ``partner`` only.

    rows: per image a list of (score, partner) per A token; B token j (position 2j + 1) is the unit vector e_j.
    """
    tokens = 2 * max(len(r) for r in rows)
    metric = torch.zeros(len(rows), tokens, 5, dtype=torch.float64)
    for b, row in enumerate(rows):
        for j in range(tokens // 2):
            metric[b, 2 * j + 1, j] = 1.0
        for a, (score, partner) in enumerate(row):
            metric[b, 2 * a, partner] = score
            metric[b, 2 * a, 4] = math.sqrt(1 - score**2)
    return metric


def test_top_r_takes_each_images_best_edges_whatever_their_scores():
    # image 0 scores high, image 1 low (6 tokens: its A token 3 is padding), image 2 ties everywhere
    metric = _scored_metric([[(0.9, 0), (0.5, 1), (0.7, 2), (0.2, 0)],
                             [(0.1, 0), (0.3, 1), (0.05, 2), (0.9, 0)],
                             [(0.5, 0), (0.5, 1), (0.5, 2), (0.5, 3)]])
    scores = M.match_scores(metric, torch.tensor([8, 6, 8]), protected=0)
    assert scores.cap.tolist() == [4, 3, 4]
    assert M.select_top_r(scores, 2).tolist() == [[True, False, True, False], [True, True, False, False],
                                                  [True, True, False, False]], "per image; ties to the lower position"
    assert M.select_top_r(scores, 0).sum() == 0
    # capacity binds: every image merges as many as its cap, padding never
    assert M.select_top_r(scores, 10).tolist() == [[True] * 4, [True, True, True, False], [True] * 4]
    # with CLS: A token 0 is protected, cap = floor((8 - 1) / 2) = 3
    scores = M.match_scores(metric, torch.tensor([8, 8, 8]), protected=1)
    assert M.select_top_r(scores, 1).tolist() == [[False, False, True, False], [False, False, False, True],
                                                  [False, True, False, False]]


# (tokens, protected, r, layers) -> tokens after each layer, computed by hand: n -> n - min(r, floor((n - p) / 2))
FIXED_R_SEQUENCES = [
    (577, 1, 8, 4, [569, 561, 553, 545]),
    (577, 1, 200, 4, [377, 189, 95, 48]),  # 200 < 288, then the capacity binds: 188, 94, 47
    (577, 1, 1000, 4, [289, 145, 73, 37]),  # halving
    (577, 1, 287, 4, [290, 146, 74, 38]),
    (729, 0, 8, 4, [721, 713, 705, 697]),
    (729, 0, 1000, 4, [365, 183, 92, 46]),
    (577, 1, 0, 3, [577, 577, 577]),
]


@pytest.mark.parametrize("tokens,protected,r,layers,expected", FIXED_R_SEQUENCES)
def test_fixed_r_token_counts(tokens, protected, r, layers, expected):
    assert M.fixed_r_tokens(tokens, protected, r, layers) == expected


@pytest.mark.parametrize("target,layers,r", [
    (209, 23, 16),  # LLaVA-1.5: 23 merging layers, 577 - 23 * 16 = 209 exactly
    (201, 23, 16),  # 209 (8 away) beats 186 (15 away)
    (197, 23, 17),  # 186 (11 away) beats 209 (12 away)
    (575, 4, 0),  # 577 and 573 are both 2 away: the smaller r
    (37, 4, 288),  # halving reaches 37; r = 287 stops at 38
    (1, 4, 288),  # below what merging can reach: the fewest tokens, with the smallest r giving them
    (577, 4, 0),
])
def test_fixed_r_for_gives_the_smallest_r_with_the_nearest_count(target, layers, r):
    assert M.fixed_r_for(target, 577, 1, layers) == r
