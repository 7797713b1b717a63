"""DyMU on LLaVA-OneVision: AnyRes crops merged, the stock token layout kept (base crop, unpadded grid, bilinear
down-scaling, newlines), VTU fast / exact / compact on Qwen2, pruning policies that never touch newlines.

The test model has OneVision's architecture at a small geometry: 112 px crops of 14 px patches (64 tokens per crop),
grid pinpoints up to 3 x 3 crops and ``anyres_max_2``, so unpadding and down-scaling both happen on small images.
"""

import json
import math

import pytest
import torch

import dymu
from dymu import onevision as O
from dymu.llava import get_vlm_patch, last_prefill_plan
from dymu.plan import Segment

CROP = 112
TOKENS_PER_CROP = (CROP // 14) ** 2
PINPOINTS = [[CROP * h, CROP * w] for h in (1, 2, 3) for w in (1, 2, 3)]
#: (width, height) of test images: unpadding only, then down-scaled grids (``anyres_max_2``: > 2.4 crops of tokens)
UNPADDED = (150, 100)
DOWNSCALED = (330, 300)
ASPECTS = ((150, 100), (100, 150), (330, 300), (300, 90), (90, 330), (112, 112))
#: thresholds that merge the tiny random tower a lot (tokens per crop far below 64)
MERGING = [0.3, 0.2, 0.1, 0.0]


def tiny_onevision(seed=0, dtype=torch.float64):
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config, SiglipVisionConfig

    from dymu.models import onevision_processor_for
    from dymu.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(video=True)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                                image_size=CROP, patch_size=14, vision_use_head=False)
    text = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=1, vocab_size=576, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config = LlavaOnevisionConfig(vision_config=vision, text_config=text, image_grid_pinpoints=PINPOINTS,
                                  image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                                  video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
                                  vision_feature_layer=-1, vision_feature_select_strategy="full",
                                  vision_aspect_ratio="anyres_max_2")
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).to(dtype).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    for layer in model.model.language_model.layers:  # Qwen2's q/k/v biases start at zero: give them something to do
        for name in ("q_proj", "k_proj", "v_proj"):
            with torch.no_grad():
                getattr(layer.self_attn, name).bias.normal_(0.0, 0.5)
    return model, onevision_processor_for(config, tokenizer)


@pytest.fixture(scope="module")
def ov():
    return tiny_onevision()


def photo(size, name="astronaut"):
    from PIL import Image
    from skimage import data

    return Image.fromarray(getattr(data, name)()).convert("RGB").resize(size)


def inputs(processor, sizes, names=None, prompts=None):
    names = names or ["astronaut", "coffee", "chelsea", "camera"][: len(sizes)]
    prompts = prompts or [f"<image>\nWhat is shown {i}?" for i in range(len(sizes))]
    return processor(images=[photo(s, n) for s, n in zip(sizes, names)], text=prompts, return_tensors="pt", padding=True)


def run(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def test_layout_positions_and_newlines_equal_the_stock_model(ov):
    model, processor = ov
    base = model.model
    for size in ASPECTS:
        batch = inputs(processor, [size])
        placeholders = int((batch["input_ids"] == model.config.image_token_id).sum())
        with torch.no_grad():
            stock = base.get_image_features(pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"]).pooler_output[0]
        assert stock.shape[0] == placeholders
        stock_newline = (stock == base.image_newline).all(-1)
        dymu.apply(model, MERGING, vtu="fast")
        with torch.no_grad():
            ours = base.get_image_features(pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"]).pooler_output[0]
        dymu.remove(model)
        assert ours.shape[0] == placeholders, f"{size}: the language model sees the stock number of image tokens"
        assert torch.equal(ours._dymu_newline, stock_newline), f"{size}: newlines at the stock positions"
        assert int(stock_newline.sum()) > 0
        assert torch.equal(ours[ours._dymu_newline], stock[stock_newline]), "newline rows are image_newline"
        ids = ours._dymu_source
        assert len(set(ids[ours._dymu_newline].tolist())) == int(ours._dymu_newline.sum()), "each newline its own token"
        assert ids.unique().numel() < placeholders * 0.7, "merging must really reduce the tokens"


def test_features_are_the_stock_layout_of_the_unmerged_expansion(ov):
    """Every position holds what the stock pack_image_features makes of the crops' merged-then-expanded tokens:
    its group's token, or (down-scaling across groups) the stock bilinear blend, which is then a token of its own."""
    model, processor = ov
    base = model.model
    batch = inputs(processor, [DOWNSCALED])
    dymu.apply(model, MERGING, vtu="fast")
    with torch.no_grad():
        ours = base.get_image_features(pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"]).pooler_output[0]
        crops = batch["pixel_values"][0]
        encoding = dymu.encode(model, crops)
        expanded = torch.stack([base.multi_modal_projector(t[None])[0][s] for t, s in zip(encoding.tokens, encoding.source)])
        stock, _ = base.pack_image_features([expanded], batch["image_sizes"], image_newline=base.image_newline,
                                            vision_aspect_ratio=model.config.vision_aspect_ratio)
    dymu.remove(model)
    torch.testing.assert_close(ours, stock[0], rtol=1e-12, atol=1e-12)
    layout = O.layouts(base.pack_image_features, [encoding.source], batch["image_sizes"], model.config.vision_aspect_ratio)[0]
    mixed = ~layout.single & ~layout.newline
    assert int(mixed.sum()) > 0, "down-scaling must blend some groups"
    assert int(layout.single.sum()) > int(mixed.sum())


@pytest.mark.parametrize("vtu", ["fast", "exact", "none"])
def test_no_merging_equals_the_stock_model(ov, vtu):
    model, processor = ov
    sizes = [UNPADDED, DOWNSCALED]
    batch = inputs(processor, sizes)
    stock = run(model, batch)
    stock_tokens = model.generate(**batch, max_new_tokens=4, do_sample=False)
    dymu.apply(model, [math.inf] * 4, vtu=vtu)
    ours = dymu.prepare_inputs(model, processor, [photo(s, n) for s, n in zip(sizes, ["astronaut", "coffee"])],
                               [f"<image>\nWhat is shown {i}?" for i in range(2)]) if vtu == "none" else batch
    if vtu == "none":
        assert torch.equal(ours["input_ids"], batch["input_ids"]), "nothing merged: the compact sequence is the stock one"
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(run(model, ours)[real], stock[real], rtol=1e-10, atol=1e-10)
    assert torch.equal(model.generate(**ours, max_new_tokens=4, do_sample=False), stock_tokens)
    dymu.remove(model)
    assert get_vlm_patch(model) is None


def test_exact_equals_fast_and_compact_is_really_shorter(ov):
    model, processor = ov
    sizes = [UNPADDED, DOWNSCALED]
    batch = inputs(processor, sizes)
    real = batch["attention_mask"].bool()
    dymu.apply(model, MERGING, vtu="fast")
    fast = run(model, batch)
    plan = last_prefill_plan(model)
    unique = plan.vmap.unique_lengths
    dymu.apply(model, MERGING, vtu="exact")
    torch.testing.assert_close(run(model, batch)[real], fast[real], rtol=1e-10, atol=1e-10)
    dymu.apply(model, MERGING, vtu="none")
    compact = dymu.prepare_inputs(model, processor, [photo(s, n) for s, n in zip(sizes, ["astronaut", "coffee"])],
                                  [f"<image>\nWhat is shown {i}?" for i in range(2)])
    lengths = compact["attention_mask"].sum(-1)
    padding = (~real).sum(-1)
    assert torch.equal(lengths, unique - (padding > 0).long()), "compact = the unique tokens of the VTU plan"
    features = compact["mm_encoder_outputs"]["image"].pooler_output
    text = real.sum(-1) - (batch["input_ids"] == model.config.image_token_id).sum(-1)
    for row, feature in enumerate(features):
        newlines = int(feature._dymu_newline.sum())
        merged = feature.shape[0] - newlines
        assert int(lengths[row]) == merged + newlines + int(text[row])
        assert feature.shape[0] < 0.6 * feature._dymu_placeholders
    run(model, compact)
    dymu.remove(model)


def test_crops_encoded_together_equal_each_alone_and_batch_equals_one_by_one(ov):
    model, processor = ov
    sizes = [UNPADDED, DOWNSCALED, (100, 150)]
    names = ["astronaut", "coffee", "chelsea"]
    batch = inputs(processor, sizes, names)
    dymu.apply(model, MERGING, vtu="fast")
    crops = torch.cat([p[:n] for p, n in zip(batch["pixel_values"], [int(x) for x in _crops(model, batch)])])
    together = dymu.encode(model, crops)
    for index in (0, 3, len(crops) - 1):
        alone = dymu.encode(model, crops[index:index + 1])
        assert torch.equal(alone.source[0], together.source[index])
        torch.testing.assert_close(alone.tokens[0], together.tokens[index], rtol=1e-10, atol=1e-10)
    logits = run(model, batch)
    real = batch["attention_mask"].bool()
    for row in range(len(sizes)):
        one = inputs(processor, [sizes[row]], [names[row]], [f"<image>\nWhat is shown {row}?"])
        single = run(model, one)[0]
        # the stock model itself differs by up to ~1e-7 here between a left-padded row and the row alone (its RoPE
        # tables are float32 whatever the model's dtype)
        torch.testing.assert_close(logits[row][real[row]], single, rtol=1e-6, atol=1e-6)
    dymu.remove(model)


def _crops(model, batch):
    from dymu.compat import onevision_crops

    return onevision_crops(model.model, batch["image_sizes"], batch.get("batch_num_images"))


def test_pruning_policies_never_touch_newlines(ov):
    model, processor = ov
    batch = inputs(processor, [UNPADDED, DOWNSCALED])
    stock = run(model, batch)
    real = batch["attention_mask"].bool()
    dymu.apply(model, None, prune="fastv:k=1,r=0")
    torch.testing.assert_close(run(model, batch)[real], stock[real], rtol=1e-10, atol=1e-10)
    for spec in ("fastv:k=1,r=1.0", "vtw:k=1"):
        for thresholds in (None, MERGING):
            dymu.apply(model, thresholds, vtu="fast", prune=spec)
            run(model, batch)
            plan = last_prefill_plan(model)
            newline = plan.segments == Segment.NEWLINE
            assert int(newline.sum()) > 0
            kept = plan.keep_at(1)
            assert bool(kept[newline].all()), f"{spec}: newlines are never dropped"
            assert not bool(kept[plan.segments == Segment.IMAGE].any()), f"{spec}: every image token dropped"
    dymu.remove(model)


def test_several_images_per_prompt_and_beam_search(ov):
    model, processor = ov
    images = [photo(UNPADDED, "astronaut"), photo(DOWNSCALED, "coffee")]
    batch = processor(images=[images], text=["<image>\n<image>\nCompare them."], return_tensors="pt")
    assert int(batch["batch_num_images"][0]) == 2
    stock = run(model, batch)
    stock_beams = model.generate(**batch, max_new_tokens=3, num_beams=2, do_sample=False)
    dymu.apply(model, [math.inf] * 4, vtu="fast")
    torch.testing.assert_close(run(model, batch), stock, rtol=1e-10, atol=1e-10)
    assert torch.equal(model.generate(**batch, max_new_tokens=3, num_beams=2, do_sample=False), stock_beams)
    dymu.apply(model, MERGING, vtu="fast")
    model.generate(**batch, max_new_tokens=3, num_beams=2, do_sample=False)
    assert last_prefill_plan(model).vmap is not None
    dymu.remove(model)


def test_refusals(ov):
    model, processor = ov
    batch = inputs(processor, [UNPADDED])
    dymu.apply(model, MERGING, vtu="fast")
    with pytest.raises(dymu.DymuError, match="videos"):
        model(**batch, pixel_values_videos=torch.zeros(1, 2, 3, CROP, CROP, dtype=torch.float64))
    with pytest.raises(dymu.DymuError, match="image_sizes"):
        model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"])
    dymu.remove(model)


def test_cli_make_model_find_thresholds_generate(tmp_path, image_dir, capsys):
    """The tiny OneVision preset through the CLI: AnyRes crops count as images when finding thresholds; generate
    reports each image's tokens against its stock placeholders and the plan's newline segment."""
    from PIL import Image

    from dymu.cli import main

    folder = tmp_path / "ov"
    assert main(["make-model", "tiny-llava-onevision", str(folder)]) == 0
    images = [str(image_dir / f"{name}.png") for name in ("camera", "coins", "checkerboard")]
    thresholds = tmp_path / "ov.json"
    assert main(["find-thresholds", str(folder), *images, "--target-tokens", "300", "--out", str(thresholds), "--measure", "3"]) == 0
    assert "measured" in capsys.readouterr().out
    photo = tmp_path / "wide.png"
    Image.open(images[0]).convert("RGB").resize((400, 300)).save(photo)
    assert main(["generate", str(folder), "--image", str(photo), "--prompt", "What is it?", "--thresholds",
                 str(thresholds), "--max-new-tokens", "2", "--show-plan"]) == 0
    out = capsys.readouterr().out
    tokens, placeholders = (int(n) for n in out.split("wide.png: ")[1].split(";")[0].split("/"))
    assert tokens < placeholders, out
    assert "newline 27" in out, "400x300: base crop + a 1 x 2 grid (384x768) unpadded to 27 rows of 36 tokens, a newline each"
    assert main(["encode", str(folder), str(photo), images[0], "--thresholds", str(thresholds), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    # 400x300: base + a 1 x 2 grid; camera (512x512): base + a 2 x 2 grid
    assert [(r["crops"], r["patches"]) for r in rows] == [(3, 3 * 729), (5, 5 * 729)], "an image's crops add up"
    assert all(r["tokens"] < r["patches"] for r in rows)
    assert main(["enable", str(folder), "--thresholds", str(thresholds)]) == 0
    enabled = dymu.from_pretrained(folder)
    assert get_vlm_patch(enabled) is not None and dymu.vision.get_patch(enabled).thresholds.values[0] < math.inf
    capsys.readouterr()
    assert main(["flops", str(folder), "--image-size", "400x300"]) == 0  # the enabled thresholds' mean per crop
    mean = dymu.Thresholds.load(thresholds).achieved_tokens["mean"]
    out = capsys.readouterr().out
    assert "one 400x300 image: 3 AnyRes crops" in out and f"{round(mean)} visual tokens per crop (mean {mean:.1f}" in out
