"""FLOPs counters: FastV's published numbers (fastv-formula), hand-computed plans (cache-aware), ``dymu flops``."""

import itertools

import pytest

import dymu
from dymu import flops as F
from dymu import merge as M

# FastV's paper (spec §2.5 / F9): LLaVA-1.5 decoders, n = 36 system + 576 image tokens
LLAVA_13B = F.Decoder(layers=40, hidden=5120, intermediate=13824, heads=40, kv_heads=40, head_dim=128, vocab=32000)
LLAVA_7B = F.Decoder(layers=32, hidden=4096, intermediate=11008, heads=32, kv_heads=32, head_dim=128, vocab=32000)
FASTV_TOKENS, FASTV_IMAGE = 612, 576

# hidden 8, q/o 2 heads x 4 = 8 wide, k/v 1 kv head x 4 = 4 wide, gated MLP 16, vocab 10, fp32 cache
SMALL = F.Decoder(layers=2, hidden=8, intermediate=16, heads=2, kv_heads=1, head_dim=4, vocab=10, bytes_per_value=4)
# a 10-token prompt: 6 text tokens and 4 image positions merged into 2 tokens (VTU groups of 2)
MERGED = F.Prompt(text=6, image_positions=4, image_tokens=2)
UNMERGED = F.Prompt(text=6, image_positions=4, image_tokens=4)
DROP_ONE = "fastv:k=1,r=0.5"  # keeps 2 - round(0.5 * 2) = 1 of the 2 merged tokens from layer 1 on


def billions(count: F.Count) -> float:
    return round(count.flops / 1e9, 1)


def reduction(decoder, prune, tokens=FASTV_TOKENS, image=FASTV_IMAGE) -> float:
    return 1 - F.fastv_formula(decoder, tokens, image, prune).flops / F.fastv_formula(decoder, tokens, image).flops


def test_fastv_formula_reproduces_the_published_numbers():
    base = F.fastv_formula(LLAVA_13B, FASTV_TOKENS, FASTV_IMAGE)
    pruned = F.fastv_formula(LLAVA_13B, FASTV_TOKENS, FASTV_IMAGE, "fastv:k=2,r=0.5")
    assert pruned.counter == base.counter == F.FASTV_FORMULA
    assert (billions(base), billions(pruned)) == (154.6, 84.6)
    assert round(100 * pruned.flops / base.flops, 1) == 54.7
    assert billions(F.fastv_formula(LLAVA_7B, FASTV_TOKENS, FASTV_IMAGE)) == 99.3
    assert billions(F.fastv_formula(LLAVA_7B, FASTV_TOKENS, FASTV_IMAGE, "fastv:k=3,r=0.5")) == 56.3
    # VTW's sanity check (spec §3.4): 7B, K = 16, n = 612 + 40 -> 55.7% remaining
    assert round(100 * (1 - reduction(LLAVA_7B, "vtw:k=16", tokens=652)), 1) == 55.7


def test_fastv_formula_closed_form_and_monotonicity():
    T, d, m = LLAVA_13B.layers, LLAVA_13B.hidden, LLAVA_13B.intermediate
    for k, r in itertools.product((0, 1, 2, 5, 20, 39), (0.0, 0.25, 0.5, 0.75, 0.9, 1.0)):
        kept = FASTV_TOKENS - round(r * FASTV_IMAGE)
        C = [4 * n * d**2 + 2 * n**2 * d + 2 * n * d * m for n in (FASTV_TOKENS, kept)]  # Eq. 5
        assert reduction(LLAVA_13B, f"fastv:k={k},r={r}") == pytest.approx((T - k) / T * (1 - C[1] / C[0]), rel=1e-12)
    assert reduction(LLAVA_13B, "fastv:k=2,r=0") == 0
    assert reduction(LLAVA_13B, "fastv:k=40,r=0.5") == reduction(LLAVA_13B, "fastv:k=99,r=0.5") == 0
    by_r = [reduction(LLAVA_13B, f"fastv:k=2,r={r}") for r in (0, 0.1, 0.5, 0.9, 1)]
    by_k = [reduction(LLAVA_13B, f"fastv:k={k},r=0.5") for k in (0, 1, 2, 10, 39)]
    assert by_r == sorted(by_r) and len(set(by_r)) == len(by_r)
    assert by_k == sorted(by_k, reverse=True) and len(set(by_k)) == len(by_k)
    assert reduction(LLAVA_7B, "vtw:k=16") == reduction(LLAVA_7B, "fastv:k=16,r=1")  # VTW: n̂ = n − N


def test_language_plan_shapes_by_hand():
    shape = F.LayerShape
    assert F.language_plan(UNMERGED, 2) == [shape(10, 10, 10)] * 2
    assert F.language_plan(MERGED, 2, "fast") == [shape(8, 10, 10)] * 2  # unique rows, full-length attention
    assert F.language_plan(MERGED, 2, "exact") == [shape(8, 10, 10, score_width=2)] * 2
    assert F.language_plan(MERGED, 2, "none") == [shape(8, 8, 8)] * 2
    # FastV k=1 keeps 1 of 2 groups: 6 + 1 rows, its 2 positions (mean group size) for attention; layer 0 ranks
    assert F.language_plan(MERGED, 2, "fast", DROP_ONE) == [shape(8, 10, 10, ranking_queries=1), shape(7, 8, 8)]
    assert F.language_plan(MERGED, 2, "fast", DROP_ONE, kept_image_positions=3)[1] == shape(7, 9, 9)
    assert F.language_plan(MERGED, 2, "none", DROP_ONE) == [shape(8, 8, 8, ranking_queries=1), shape(7, 7, 7)]
    assert F.language_plan(MERGED, 2, "fast", "fastv:k=1,r=0.5,score=all")[0].ranking_queries == 10
    assert F.language_plan(MERGED, 2, "fast", "fastv:k=0,r=0.5")[0] == shape(7, 8, 8)  # random: nothing ranks
    assert F.language_plan(MERGED, 2, "fast", "vtw:k=1") == [shape(8, 10, 10), shape(6, 6, 6)]
    with pytest.raises(dymu.DymuError, match="fastv:k=2 acts from layer 2 on, but the language model has 2 layers"):
        F.language_plan(MERGED, 2, "fast", "fastv:k=2,r=0.5")  # it could change nothing: refused, not counted as 100%
    with pytest.raises(dymu.DymuError, match="rerank=step"):
        F.language_plan(MERGED, 2, "fast", "fastv:k=1,r=0.5,rerank=step")


def test_newlines_are_tokens_of_their_own_never_pruned():
    """OneVision's newlines among the image positions: each its own token, kept by FastV and VTW."""
    shape = F.LayerShape
    # 6 text, 6 image positions: 2 newlines and 4 patches merged into 1 token -> 6 + 1 + 2 unique rows
    newlines = F.Prompt(text=6, image_positions=6, image_tokens=3, newlines=2)
    assert F.language_plan(newlines, 2, "fast") == [shape(9, 12, 12)] * 2
    assert F.language_plan(newlines, 2, "none") == [shape(9, 9, 9)] * 2
    assert F.language_plan(newlines, 2, "fast", "vtw:k=1") == [shape(9, 12, 12), shape(8, 8, 8)]  # text + newlines
    # unmerged: FastV ranks the 4 patch tokens and drops round(0.5 x 4) = 2 of them, never a newline
    unmerged = F.Prompt(text=6, image_positions=6, image_tokens=6, newlines=2)
    assert F.language_plan(unmerged, 2, "fast", DROP_ONE) == [shape(12, 12, 12, ranking_queries=1), shape(10, 10, 10)]


def by_hand(rows, queries, keys, score_width=1, ranking=0):
    """One SMALL layer, matrix by matrix (2 FLOPs per multiply-accumulate)."""
    q, k, v, o = 2 * rows * 8 * 8, 2 * rows * 8 * 4, 2 * rows * 8 * 4, 2 * rows * 8 * 8
    gate, up, down = 2 * rows * 8 * 16, 2 * rows * 8 * 16, 2 * rows * 16 * 8
    scores = 2 * queries * keys * 8 * score_width + 2 * ranking * keys * 8
    weighted_values = 2 * queries * keys * 8
    return q + k + v + o + gate + up + down + scores + weighted_values


LM_HEAD = 2 * 8 * 10


@pytest.mark.parametrize("prompt,vtu,prune,expected", [
    (UNMERGED, "fast", None, 2 * by_hand(10, 10, 10)),
    (MERGED, "fast", None, 2 * by_hand(8, 10, 10)),
    (MERGED, "exact", None, 2 * by_hand(8, 10, 10, score_width=2)),
    (MERGED, "none", None, 2 * by_hand(8, 8, 8)),
    (UNMERGED, "fast", DROP_ONE, by_hand(10, 10, 10, ranking=1) + by_hand(8, 8, 8)),  # keeps 4 - round(2) = 2
    (MERGED, "fast", DROP_ONE, by_hand(8, 10, 10, ranking=1) + by_hand(7, 8, 8)),
    (MERGED, "exact", DROP_ONE, by_hand(8, 10, 10, score_width=2, ranking=1) + by_hand(7, 8, 8, score_width=2)),
    (MERGED, "none", DROP_ONE, by_hand(8, 8, 8, ranking=1) + by_hand(7, 7, 7)),
])
def test_prefill_flops_by_hand(prompt, vtu, prune, expected):
    count = F.prefill_flops(SMALL, F.language_plan(prompt, SMALL.layers, vtu, prune))
    assert count == F.Count(expected + LM_HEAD, F.CACHE_AWARE)


def test_prefill_flops_literal_values():
    """Two of the cases above, summed by hand: 1152 FLOPs per row (projections 384 + MLP 768), 16 per query-key
    pair and product (+ 16 per ranked key); LM head 160."""
    plan = F.language_plan(MERGED, 2, "fast", DROP_ONE)
    assert F.prefill_flops(SMALL, plan).flops == (1152 * 8 + 16 * 10 * 21) + (1152 * 7 + 16 * 8 * 16) + 160 == 22848
    assert F.prefill_flops(SMALL, F.language_plan(UNMERGED, 2)).flops == 2 * (1152 * 10 + 16 * 10 * 20) + 160 == 29600


@pytest.mark.parametrize("vtu", ["fast", "exact", "none"])
def test_decode_step_and_kv_cache_by_hand(vtu):
    stock_plan = F.language_plan(UNMERGED, 2)
    plan = F.language_plan(MERGED, 2, vtu, DROP_ONE)
    prompt_keys = [8, 7] if vtu == "none" else [10, 8]  # layer 0 caches every position, layer 1 the kept ones
    for step in (1, 5):
        expected = sum(by_hand(1, 1, keys + step) for keys in prompt_keys) + LM_HEAD  # decode: no VTU, stock kernel
        assert F.decode_step_flops(SMALL, plan, step) == F.Count(expected, F.CACHE_AWARE)
        assert F.kv_cache_bytes(SMALL, plan, step) == [(keys + step) * 2 * 4 * 4 for keys in prompt_keys]  # k+v, 4 wide, fp32
    assert F.decode_step_flops(SMALL, stock_plan, 1).flops == 2 * (1152 + 16 * 11 * 2) + 160 == 3168
    assert F.kv_cache_bytes(SMALL, stock_plan) == [320, 320]


def test_more_pruning_or_merging_never_costs_more():
    decoder = F.Decoder(layers=6, hidden=16, intermediate=40, heads=4, kv_heads=2, head_dim=4, vocab=50)

    def cost(tokens, vtu="fast", prune=None):
        plan = F.language_plan(F.Prompt(20, 60, tokens), decoder.layers, vtu, prune)
        return F.prefill_flops(decoder, plan).flops, F.decode_step_flops(decoder, plan, 3).flops, sum(F.kv_cache_bytes(decoder, plan))

    for vtu in ("fast", "exact", "none"):
        by_tokens = [cost(t, vtu)[0] for t in range(1, 60)]  # merging: fewer unique tokens never cost more
        assert by_tokens == sorted(by_tokens)
        # (exact VTU's wider score product makes a little merging dearer than none: that step is not checked)
        for tokens in (7, 30, 60):
            by_r = [cost(tokens, vtu, f"fastv:k=2,r={r / 10}") for r in range(11)]
            by_k = [cost(tokens, vtu, f"fastv:k={k},r=0.5") for k in range(1, 6)]
            for series in (by_r[::-1], by_k):  # less pruning first
                for column in zip(*series):
                    assert list(column) == sorted(column)
            vtw, fastv_all = cost(tokens, vtu, "vtw:k=2"), cost(tokens, vtu, "fastv:k=2,r=1.0")
            assert vtw[1:] == fastv_all[1:] and vtw[0] < fastv_all[0]  # the same plan, minus FastV's ranking
    # compact mode: merging also never costs more after pruning (its kept positions are its kept tokens)
    pruned = [cost(t, "none", "fastv:k=2,r=0.5") for t in range(1, 60)]
    for column in zip(*pruned):
        assert list(column) == sorted(column)
    for tokens, prune in itertools.product((1, 30, 59, 60), (None, "fastv:k=2,r=0.5", "vtw:k=3")):
        assert cost(tokens, "exact", prune)[0] >= cost(tokens, "fast", prune)[0]
        assert cost(tokens, "none", prune)[0] <= cost(tokens, "fast", prune)[0]


def test_nothing_merged_costs_the_stock_model_in_every_mode():
    stock = [F.LayerShape(10, 10, 10)] * 2  # every position its own token: the stock computation
    for vtu in ("fast", "exact", "none"):
        assert F.language_plan(UNMERGED, 2, vtu) == stock
        assert F.language_plan(UNMERGED, 2, vtu, "vtw:k=1") == F.language_plan(UNMERGED, 2, "fast", "vtw:k=1")


def test_encoder_and_vision_flops():
    # no merging == the plain sum of layer FLOPs; the matching is counted only on merging layers
    assert F.encoder_flops([576] * 2, 577, 1, 64, 128, 16, merging=False) == 2 * M.layer_flops(577, 577, 64, 128)
    merged = F.encoder_flops([400, 300], 577, 1, 64, 128, 16, merging=[False, True])
    assert merged == M.layer_flops(577, 401, 64, 128) + M.layer_flops(401, 301, 64, 128) + M.matching_flops(401, 16)


def test_schedule_layer_tokens_follow_find_thresholds_budgets(tiny_llava_dir):
    from dymu.models import load_config
    from dymu.vision import config_tower_info

    info = config_tower_info(load_config(tiny_llava_dir)[1])  # 576 patches, read at layer 2: 3 merging layers
    assert F.schedule_layer_tokens(info, 144) == [432, 288, 144]
    assert F.schedule_layer_tokens(info, 576) == [576, 576, 576]
    with pytest.raises(dymu.DymuError, match="out of reach"):
        F.schedule_layer_tokens(info, 10)


# ---------------------------------------------------------------------------------------------- dymu flops
def run(capsys, *argv):
    from dymu.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def table(out: str) -> dict:
    """Label -> the row's cells after the label."""
    rows = {}
    for line in out.splitlines():
        for label in ("unmerged", "plan ("):
            if line.startswith(label):
                rows[label.strip(" (")] = line.split(")", 1)[-1].split() if label == "plan (" else line.split()[1:]
    return rows


def test_flops_cli_table(capsys, tiny_llava_dir):
    code, out, err = run(capsys, "flops", tiny_llava_dir, "--image-tokens", 144, "--prune", "fastv:k=1,r=0.5",
                         "--prompt-tokens", 20, "--new-tokens", 4)
    assert code == 0, err
    assert "counter: cache-aware" in out and "fastv-formula" in out and "144 visual tokens" in out
    rows = table(out)
    assert rows["unmerged"][6] == rows["unmerged"][9] == rows["unmerged"][12] == "100.0%"
    # the plan's prefill ratio is the library's: same decoder, prompt, schedule and vision tower
    from dymu.models import load_config
    from dymu.vision import config_tower_info

    config = load_config(tiny_llava_dir)[1]
    decoder, info = F.Decoder.from_config(config), config_tower_info(config)
    stock = F.prefill_flops(decoder, F.language_plan(F.Prompt(20, 576, 576), 2)).flops + F.vision_flops(info, 64)
    plan = F.prefill_flops(decoder, F.language_plan(F.Prompt(20, 576, 144), 2, "fast", "fastv:k=1,r=0.5")).flops
    plan += F.vision_flops(info, 64, F.schedule_layer_tokens(info, 144), [True] * 3)
    assert rows["plan"][6] == f"{100 * plan / stock:5.1f}%".strip()
    # nothing merged, nothing pruned: the plan is the unmerged model
    code, out, _ = run(capsys, "flops", tiny_llava_dir, "--image-tokens", 576, "--vtu", "exact")
    assert code == 0 and table(out)["plan"] == table(out)["unmerged"]
    # VTW from layer 1 of 2: layer 1 caches the 48 text tokens only (fast VTU, no merging)
    code, out, _ = run(capsys, "flops", tiny_llava_dir, "--prune", "vtw:k=1")
    assert code == 0 and table(out)["plan"][12] == f"{100 * (48 + 624) / (2 * 624):.1f}%"


def test_flops_cli_on_the_llava_1_5_7b_config(capsys, tmp_path):
    """Config only, no weights: FastV's formula line gives the paper's 7B numbers for its 36 + 576 tokens."""
    from dymu.models import llava_preset_config
    from dymu.tokenizer import build_tokenizer

    llava_preset_config("llava-1.5-7b", build_tokenizer()).save_pretrained(tmp_path)
    code, out, err = run(capsys, "flops", tmp_path, "--prompt-tokens", 36, "--prune", "fastv:k=3,r=0.5")
    assert code == 0, err
    assert "fastv-formula" in out and "56.27 GFLOPs vs 99.33 GFLOPs unmerged" in out
    # KV cache of the unmerged prompt: 32 layers x (k, v) x 612 positions x 4096 wide x 4 bytes (fp32 config)
    assert table(out)["unmerged"][10:12] == [f"{32 * 2 * 612 * 4096 * 4 / 1e6:.2f}", "MB"]


def test_flops_cli_reads_the_measured_mean_of_a_thresholds_file(capsys, tiny_llava_dir, image_paths, tmp_path):
    thresholds = tmp_path / "thr.json"
    assert run(capsys, "find-thresholds", tiny_llava_dir, *image_paths[:4], "--target-tokens", 200, "--out", thresholds,
               "--measure", 4)[0] == 0
    mean = dymu.Thresholds.load(thresholds).achieved_tokens["mean"]
    code, out, err = run(capsys, "flops", tiny_llava_dir, "--thresholds", thresholds)
    assert code == 0, err
    assert f"{round(mean)} visual tokens (mean {mean:.1f} measured with {thresholds}, constant schedule)" in out


def one_line_error(code, err, fragment):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("dymu flops: error: ") and fragment in lines[0], err


def test_flops_cli_errors(capsys, tiny_llava_dir, model_dirs, tmp_path):
    one_line_error(*run(capsys, "flops", tiny_llava_dir, "--prune", "fastv:k=x")[::2], "invalid prune spec")
    one_line_error(*run(capsys, "flops", model_dirs["tiny-clip"])[::2], "needs a LLaVA-1.5 or LLaVA-OneVision config")
    one_line_error(*run(capsys, "flops", tiny_llava_dir, "--image-tokens", 577)[::2], "between 1 and 576")
    one_line_error(*run(capsys, "flops", tiny_llava_dir, "--image-tokens", 3)[::2], "out of reach")
    one_line_error(*run(capsys, "flops", tiny_llava_dir, "--image-tokens", 9, "--thresholds", "x.json")[::2], "not both")
    one_line_error(*run(capsys, "flops", tmp_path / "missing")[::2], "not found")
    unmeasured = tmp_path / "thr.json"
    dymu.Thresholds(values=[0.9] * 4).save(unmeasured)
    one_line_error(*run(capsys, "flops", tiny_llava_dir, "--thresholds", unmeasured)[::2], "no measured token count")


# ---------------------------------------------------------------------------------------------- OneVision from a config
@pytest.fixture(scope="module")
def tiny_onevision_dir(tmp_path_factory):
    """A random-weight tiny-llava-onevision checkpoint (384 px crops of 729 patches, anyres_max_9)."""
    from dymu.models import make_model

    return make_model("tiny-llava-onevision", tmp_path_factory.mktemp("ov") / "tiny-llava-onevision")


def _ov_run(model, processor, size, vtu="fast", **apply):
    """Generate one token for a photo of ``size`` (width, height) under ``dymu.apply(model, vtu=vtu, **apply)``:
    (its dymu.flops.last_prefill, prompt length, image placeholders in the prompt, crops the tower encoded)."""
    import torch

    from dymu.llava import last_encoding, model_inputs

    from .test_onevision import photo

    dymu.apply(model, vtu=vtu, **apply)
    try:
        batch = model_inputs(model, processor, [photo(size)], ["<image>\nWhat is it?"])
        with torch.no_grad():
            model.generate(**batch, max_new_tokens=1, do_sample=False)
        length = batch["input_ids"].shape[1]
        placeholders = int((batch["input_ids"] == model.config.image_token_id).sum())
        return F.last_prefill(model, length, vtu), length, placeholders, len(last_encoding(model))
    finally:
        dymu.remove(model)


def _ov_models(tiny_onevision_dir):
    """(model, processor, image sizes) of the tiny-llava-onevision preset at the default size and a square one, and of
    tests.test_onevision's geometry (112 px crops, anyres_max_2) at an unpadded and a down-scaled size."""
    from dymu.models import load_model, load_processor
    from dymu.onevision_flops import DEFAULT_IMAGE_SIZE

    from .test_onevision import DOWNSCALED, UNPADDED, tiny_onevision

    preset = load_model(tiny_onevision_dir), load_processor(tiny_onevision_dir, full=True)
    return [(*preset, (DEFAULT_IMAGE_SIZE, (768, 768))), (*tiny_onevision(), (UNPADDED, DOWNSCALED))]


def test_onevision_config_count_of_an_unmerged_image_equals_a_run(tiny_onevision_dir):
    """From the config alone: the crops, stock positions, vision FLOPs and language-model plan of one image equal what
    dymu.flops.last_prefill counts on a real run of that image (unpadded grids, a down-scaled one); with FastV too
    (newlines never pruned)."""
    from dymu.onevision_flops import anyres_image, config_prefill

    for model, processor, sizes in _ov_models(tiny_onevision_dir):
        for size in sizes:
            ran, length, placeholders, crops = _ov_run(model, processor, size)
            image = anyres_image(model.config, *size)
            assert (image.crops, image.positions) == (crops, placeholders), size
            count = config_prefill(model.config, image, length - image.positions)
            assert count.stock_vision == count.vision == ran.stock_vision == ran.vision
            assert F.prefill_flops(ran.decoder, count.stock_plan) == F.prefill_flops(ran.decoder, ran.stock_plan)
            assert count.plan == ran.plan and not count.estimated
            pruned, *_ = _ov_run(model, processor, size, prune="fastv:k=1,r=0.5")
            assert config_prefill(model.config, image, length - image.positions, prune="fastv:k=1,r=0.5").plan == pruned.plan
    assert anyres_image(model.config, *sizes[1]).blends > 0, "the down-scaled grid blends patches"


def test_onevision_config_count_of_a_merged_image(tiny_onevision_dir):
    """ToMe merges every crop to the same count: the config count's vision FLOPs equal the run's; the language model's
    tokens are an estimate where the grid is unpadded, and exact (every VTU mode) where every patch is a position."""
    from dymu.onevision_flops import DEFAULT_IMAGE_SIZE, anyres_image, config_prefill
    from dymu.vision import config_tower_info

    r, [(model, processor, _), _] = 100, _ov_models(tiny_onevision_dir)
    info = config_tower_info(model.config)
    layer_tokens = F.schedule_layer_tokens(info, info.num_patches - r * info.merge_layers)
    for size in (DEFAULT_IMAGE_SIZE, (768, 768)):
        image = anyres_image(model.config, *size)
        for vtu in ("fast", "none"):
            ran, length, placeholders, _ = _ov_run(model, processor, size, vtu, merge=f"tome:r={r}")
            count = config_prefill(model.config, image, length - placeholders, layer_tokens, [True] * info.merge_layers, vtu)
            assert count.vision == ran.vision < ran.stock_vision == count.stock_vision
            assert count.estimated == (size == DEFAULT_IMAGE_SIZE)
            if not count.estimated:
                assert count.plan == ran.plan, (size, vtu)


def test_flops_cli_on_onevision(capsys, tiny_onevision_dir):
    """The table's cells are config_prefill's counts; a merged count says that its language-model side is estimated
    where the grid is unpadded (the default 1000x700) and not where every patch is a position (768x768)."""
    from dymu.cli import _si
    from dymu.models import load_config
    from dymu.onevision_flops import anyres_image, config_prefill

    code, out, err = run(capsys, "flops", tiny_onevision_dir, "--image-size", "768x768", "--prompt-tokens", 20)
    assert code == 0, err
    config = load_config(tiny_onevision_dir)[1]
    image = anyres_image(config, 768, 768)
    count = config_prefill(config, image, 20)
    decoder = F.Decoder.from_config(config)
    assert f"one 768x768 image: 5 AnyRes crops of 729 patches (base + 4 grid), {image.positions} stock positions" in out
    assert table(out)["unmerged"][:6] == [*_si(count.stock_vision, "FLOPs").split(),
                                          *_si(F.prefill_flops(decoder, count.stock_plan).flops, "FLOPs").split(),
                                          *_si(count.stock_vision + F.prefill_flops(decoder, count.stock_plan).flops, "FLOPs").split()]
    assert table(out)["plan"] == table(out)["unmerged"] and "estimated" not in out
    code, out, err = run(capsys, "flops", tiny_onevision_dir, "--image-tokens", 200, "--vtu", "none")
    assert code == 0 and "1000x700 image" in out and "200 visual tokens per crop" in out and "(estimated)" in out
    assert any(line.startswith("estimated: ") for line in out.splitlines())
    code, out, err = run(capsys, "flops", tiny_onevision_dir, "--image-size", "768x768", "--image-tokens", 200)
    assert code == 0 and "estimated" not in out and "200 visual tokens per crop" in out


def test_flops_cli_onevision_presets_count_the_processors_layout(capsys):
    """A preset by name (its config, no weights): the stock positions are those the processor writes for the image."""
    from PIL import Image

    from dymu.models import onevision_preset_config, onevision_processor_for
    from dymu.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(video=True)
    processor = onevision_processor_for(onevision_preset_config("llava-onevision-qwen2-7b", tokenizer), tokenizer)
    for size in ((1000, 700), (2304, 2304)):
        code, out, err = run(capsys, "flops", "llava-onevision-qwen2-7b", "--image-size", "x".join(map(str, size)),
                             "--image-tokens", 200, "--prune", "fastv:k=3,r=0.5")
        assert code == 0, err
        batch = processor(images=[Image.new("RGB", size)], text=["<image>"], return_tensors="pt")
        placeholders = int((batch["input_ids"] == processor.image_token_id).sum())
        assert f"{placeholders} stock positions" in out and "28-layer decoder" in out and "fastv-formula" in out
    assert "bilinearly down-scaled" in out


def test_flops_cli_onevision_errors(capsys, tiny_onevision_dir, tiny_llava_dir):
    for bad in ("1000", "0x5", "axb", "10x10x10"):
        one_line_error(*run(capsys, "flops", tiny_onevision_dir, "--image-size", bad)[::2], "--image-size must be WIDTHxHEIGHT")
    one_line_error(*run(capsys, "flops", tiny_llava_dir, "--image-size", "100x100")[::2], "is for LLaVA-OneVision configs")
    one_line_error(*run(capsys, "flops", tiny_onevision_dir, "--image-tokens", 730)[::2], "between 1 and 729")
