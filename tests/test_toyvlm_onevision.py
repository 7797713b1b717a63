"""The toy OneVision's recipe (``python -m toyvlm.train --arch onevision``): geometry, targets laid out like the
stock model lays out its tokens, the training loss equal to the stock forward, the warm start, a tiny run end to end
that resumes bit-identically after kills, and the saved folder loading and running with dymu."""

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from tests import toyvlm_runs
from tests.toyvlm_runs import assert_same_run, killed_and_resumed
from toyvlm import onevision as O
from toyvlm import train as T
from toyvlm.data import Obj, Scene, make_split

#: 32 px crops of 8 px patches (16 tokens per crop): the default shapes at a quarter of the size
TINY = replace(T.default_config("onevision"), image_size=32, patch_size=8, vision_hidden=32, vision_layers=2,
               vision_heads=2, text_hidden=32, text_layers=1, text_heads=4, text_kv_heads=1, val_scenes=3, steps=4,
               describe_rows=2, batch_size=4, warmup_steps=1, turns=3, eval_every=2, eval_scenes=2, point_layer=0,
               point_heads=1, tower_steps=2, tower_batch_size=3, readout_start=2, init_from="")


@pytest.fixture(scope="module")
def tiny():
    return T.recipe_for(TINY).build()


def layout_sizes(processor, width, height):
    """(crops, (rows, columns) of the grid's tokens, of the unpadded grid, placeholders) of an image."""
    from transformers.image_processing_utils import select_best_resolution
    from transformers.models.llava_onevision.modeling_llava_onevision import unpad_image

    from dymu.compat import anyres_crops

    pinpoints, crop = processor.image_processor.image_grid_pinpoints, processor.image_processor.size["height"]
    side = math.isqrt(processor.num_image_tokens)
    best = select_best_resolution((height, width), pinpoints)
    grid = (best[0] // crop * side, best[1] // crop * side)
    unpadded = tuple(unpad_image(torch.zeros(1, *grid), (height, width)).shape[1:])
    placeholders = processor._get_number_of_features(height, width, crop, crop)
    return anyres_crops([(height, width)], pinpoints, crop)[0], grid, unpadded, placeholders


def test_the_default_sizes_give_several_crops_unpadding_and_down_scaling():
    """At the default 112 px crops (64 tokens each): 3, 4 and 5 crops per image; grids unpadded (fewer tokens than
    the crops hold) and grids scaled down by anyres_max_3 (fewer placeholders than base + unpadded grid + one newline
    per row)."""
    config = replace(T.default_config("onevision"), vision_hidden=16, vision_layers=1, vision_heads=1, text_hidden=32,
                     text_layers=1, text_heads=4, text_kv_heads=1, init_from="")
    _, processor = T.recipe_for(config).build()
    assert processor.num_image_tokens == 64 and config.image_size == 112
    crops, unpadded, downscaled = set(), 0, 0
    for shape in O.IMAGE_SHAPES:
        count, grid, (rows, columns), placeholders = layout_sizes(processor, *O.shape_pixels(shape, config.image_size))
        crops.add(count)
        unpadded += rows * columns < grid[0] * grid[1]
        downscaled += placeholders < 64 + rows * (columns + 1)
    assert crops == {3, 4, 5}
    assert unpadded >= 4 and downscaled >= 3
    sizes = {O.scene_shape("train", 0, index, config.image_size) for index in range(200)}
    assert sizes == {O.shape_pixels(shape, config.image_size) for shape in O.IMAGE_SHAPES}, "every size is drawn"
    assert O.scene_shape("test", 0, 5, 112) == O.scene_shape("test", 0, 5, 112)


#: a large red square at (60, 120) of the 224 px canvas, lettered K, rendered 64 x 32 px with 32 px crops of 8 px
#: patches: a 1 x 2 grid, neither unpadded nor scaled down (52 positions: base 16, then 4 rows of 8 + newline).
#: By hand: the square spans x 34..86, y 94..146 of the canvas = pixels x 9..24, y 13..20 of the image. First grid
#: crop: patch rows 1 (3 of 8 pixel rows) and 2 (5 of 8), columns 1 (7 of 8 pixel columns) and 2 (8 of 8), so
#: covers 0.33, 0.38, 0.55, 0.62 (column 3: 1 of 8, < 0.25); none in the second crop. Base crop (x halved: 4..11):
#: columns 0 and 1 at 4 of 8, covers 0.19 in row 1 (< 0.25) and 0.31 in row 2. The centre (17, 17) px is in grid
#: patch (2, 2) and base patch (2, 1).
SQUARE = Scene("flat", {"colour": (128, 128, 128)}, [Obj("square", "red", "large", 60, 120, label="K")])
SQUARE_SIZE = (64, 32)


def test_crop_targets_and_layout_masks_hand_checked(tiny):
    model, processor = tiny
    crops = O.probe_crops(processor.image_processor, O.probe_map(SQUARE, SQUARE_SIZE), 32)
    assert crops.shape == (3, 3, 32, 32)
    targets, covers = O.crop_targets(SQUARE, crops, 8)
    red, square = T.D.COLOURS.index("red") + 1, T.D.SHAPES.index("square") + 1
    assert np.flatnonzero(targets[1, 0] == red).tolist() == [5, 6, 9, 10]  # grid crop 1: rows 1-2, columns 1-2
    assert np.flatnonzero(targets[0, 0] == red).tolist() == [8, 9]  # base crop: row 2, columns 0-1
    assert not targets[2, 0].any() and not covers[2].any(), "the second grid crop shows background only"
    np.testing.assert_allclose(covers[1, [5, 6, 9, 10], 0], [3 * 7 / 64, 3 * 8 / 64, 5 * 7 / 64, 5 * 8 / 64])
    np.testing.assert_allclose(covers[0, [4, 5, 8, 9], 0], [3 * 4 / 64, 3 * 4 / 64, 5 * 4 / 64, 5 * 4 / 64])
    assert np.flatnonzero(targets[1, 2]).tolist() == [10] and targets[1, 2, 10] == square
    assert np.flatnonzero(targets[0, 2]).tolist() == [9]
    assert targets[1, T.LETTER_HEAD].max() == T.D.LABEL_LETTERS.index("K") + 1
    assert (targets[:, -2, :4] == 0).all() and targets[0, -1, :4].tolist() == [0, 1, 2, 3]  # row, column in the crop
    image_sizes = torch.tensor([[SQUARE_SIZE[1], SQUARE_SIZE[0]]])
    mask = O.layout_masks(model.model.pack_image_features, [torch.from_numpy(covers)], image_sizes,
                          model.config.vision_aspect_ratio, [SQUARE], base_patches=16)[0]
    assert mask.shape == (T.D.MAX_OBJECTS + 1, 16 + 4 * 9)
    grid = [16 + row * 9 + column for row in (1, 2) for column in (1, 2)]
    assert mask[0].nonzero().flatten().tolist() == [8, 9, *grid]
    assert not mask[1 : T.D.MAX_OBJECTS].any(), "rows past the scene's objects stay empty"
    newlines = [16 + row * 9 + 8 for row in range(4)]
    assert mask[T.D.MAX_OBJECTS].any() and not mask[:, newlines].any()


def test_layout_masks_follow_the_stock_down_scaling(tiny):
    """A square 2 x 2 grid is scaled down (8 x 8 -> 6 x 6 tokens): the masks have the stock layout's length (the
    processor's placeholders), newline positions (found by the stock pack on a probe) are never marked, and every
    object is marked in the base crop and in the grid."""
    from dymu.onevision import layouts

    model, processor = tiny
    scene = make_split("train", 0, 8, 64)[3].scene
    size = (64, 64)
    batch = O.image_batch([scene], [size], processor.image_processor, 8)
    mask = O.layout_masks(model.model.pack_image_features, batch.covers, batch.image_sizes,
                          model.config.vision_aspect_ratio, [scene], base_patches=16)[0]
    placeholders = processor._get_number_of_features(64, 64, 32, 32)
    assert mask.shape[1] == placeholders == 16 + 6 * 7
    sources = [list(torch.arange(16).repeat(5, 1))]
    newline = layouts(model.model.pack_image_features, sources, batch.image_sizes, model.config.vision_aspect_ratio)[0].newline
    assert int(newline.sum()) == 6 and not mask[:, newline].any()
    for k in range(len(scene.objects)):
        assert mask[k, :16].any() and mask[k, 16:].any()



def conversations(recipe, model, processor, count=4, seed=0):
    """(batch, turns, layouts, input_ids, mask, labels) of ``count`` training scenes' conversations."""
    stream = recipe.stream(processor)
    rng = np.random.default_rng(seed)
    batch = stream.draw(rng, count)
    config = replace(recipe.config, batch_size=count - 1, describe_rows=1)
    turns = T.conversation_turns(batch.scenes, rng, config)
    layouts = O.layout_masks(model.model.pack_image_features, batch.covers, batch.image_sizes,
                             model.config.vision_aspect_ratio, batch.scenes, recipe.base)
    encoder = recipe.encoder(model, processor)
    rows = [encoder(qas, layout.shape[1]) for qas, layout in zip(turns, layouts)]
    return (batch, turns, layouts, *T.pad_batch(rows, processor.tokenizer.pad_token_id))


def test_training_loss_equals_the_stock_forward_and_prompts_the_processors(tiny):
    """The training path (crops through the tower, the projector, the model's own pack_image_features, the
    placeholders filled) is the stock forward on the processor's pixel_values and image_sizes; the first turn of a
    conversation is token for token what the stock processor makes of the image and the prompt."""
    model, processor = tiny
    recipe = T.recipe_for(TINY)
    batch, turns, layouts, input_ids, mask, labels = conversations(recipe, model, processor)
    assert len(set(batch.crops)) > 1 and len({layout.shape[1] for layout in layouts}) > 1
    with torch.no_grad():
        embeds, losses = O.image_embeddings(model, T.AuxiliaryHead(32, 4, 32), batch, input_ids)
        ours = model(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss
        stock = model(input_ids=input_ids, attention_mask=mask, labels=labels, pixel_values=batch.pixel_values,
                      image_sizes=batch.image_sizes).loss
    torch.testing.assert_close(ours, stock, rtol=1e-6, atol=1e-6)
    assert torch.isfinite(losses["aux"]) and losses["where"] > 0
    images = [O.render(scene, (int(w), int(h))) for scene, (h, w) in zip(batch.scenes, batch.image_sizes)]
    for row, (image, qas) in enumerate(zip(images, turns)):
        encoded = processor(images=image, text=T.PROMPT.format(question=qas[0].question), return_tensors="pt")
        first = encoded["input_ids"][0]
        assert input_ids[row, : len(first)].tolist() == first.tolist()
        torch.testing.assert_close(encoded["pixel_values"][0], batch.pixel_values[row, : batch.crops[row]])


def test_pointing_and_counting_targets_sit_on_the_rows_image_positions(tiny):
    model, processor = tiny
    recipe = T.recipe_for(TINY)
    batch, turns, layouts, input_ids, mask, labels = conversations(recipe, model, processor, count=6)
    image_tokens = input_ids == model.config.image_token_id
    placed = O.in_rows(layouts, image_tokens)  # (rows, MAX_OBJECTS + 1, tokens)
    assert not placed[~image_tokens[:, None].expand_as(placed)].any(), "marks only on image tokens"
    for row, layout in enumerate(layouts):
        assert torch.equal(placed[row][:, image_tokens[row]], layout)
    rows, positions, masks = T.pointing_targets(turns, batch.scenes, labels, placed)
    assert masks.shape[-1] == input_ids.shape[1] and masks.any(-1).all()
    centres = O.in_rows(list(batch.targets[batch.base_rows, T.CENTRE_HEAD]), image_tokens)
    for row in range(len(layouts)):
        first = image_tokens[row].nonzero()[0, 0]
        assert 0 < int((centres[row] > 0).sum()) <= len(batch.scenes[row].objects)  # 4 x 4 patches: centres may share
        assert not centres[row, first + recipe.base :].any(), "counted in the base crop only"


def test_every_object_has_its_own_centre_in_the_default_base_crop():
    """At 112 px crops of 14 px patches a base-crop patch spans 28 px of the 224 px canvas, less than the 32 px that
    separate two objects' centres along some axis (half sizes >= 14, gap 4): every object counts once."""
    config = replace(T.default_config("onevision"), vision_hidden=16, vision_layers=1, vision_heads=1, text_hidden=32,
                     text_layers=1, text_heads=4, text_kv_heads=1, init_from="")
    _, processor = T.recipe_for(config).build()
    stream = O.SceneStream(0, processor.image_processor, config.patch_size)
    batch = stream.draw(None, 40)
    centres = batch.targets[batch.base_rows, T.CENTRE_HEAD]  # (images, 64)
    assert (centres > 0).sum(-1).tolist() == [len(scene.objects) for scene in batch.scenes]
    assert max(len(scene.objects) for scene in batch.scenes) == T.D.MAX_OBJECTS


def test_warm_start_copies_the_toy_llavas_language_model_exactly(tmp_path):
    """The Qwen2 started from a toy LLaVA (zero q/k/v biases) gives that LLaVA's language model's logits."""
    llava_config = T.TrainConfig(image_size=32, patch_size=8, vision_hidden=32, vision_layers=1, vision_heads=2,
                                 text_hidden=32, text_layers=2, text_heads=4, text_kv_heads=1, seed=3)
    llava, _ = T.build_model(llava_config, T.build_tokenizer())
    llava.save_pretrained(tmp_path / "llava")
    model, processor = T.recipe_for(replace(TINY, text_layers=2, init_from=str(tmp_path / "llava"))).build()
    assert processor.tokenizer.convert_tokens_to_ids(O.VIDEO_TOKEN) == len(T.build_tokenizer())  # appended
    embeds = torch.randn(2, 9, 32)
    with torch.no_grad():
        expected = llava.lm_head(llava.model.language_model(inputs_embeds=embeds).last_hidden_state)
        got = model.lm_head(model.model.language_model(inputs_embeds=embeds).last_hidden_state)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    with pytest.raises(O.InitError, match=r"^--init-from .*missing: no model folder \(config.json missing\)$"):
        T.recipe_for(replace(TINY, init_from=str(tmp_path / "missing"))).build()
    with pytest.raises(O.InitError, match=r"has shape"):
        T.recipe_for(replace(TINY, text_layers=2, text_hidden=64, init_from=str(tmp_path / "llava"))).build()


def test_onevision_settings_are_refused_by_the_llava_recipe_and_the_cli_takes_the_arch_defaults(tmp_path):
    with pytest.raises(T.ConfigError, match=r"^anyres_max is a OneVision setting"):
        T.recipe_for(T.TrainConfig(anyres_max=3))
    with pytest.raises(SystemExit) as refused:
        T.main(["--out", str(tmp_path / "x"), "--init-from", "assets/toy-llava"])
    assert str(refused.value) == "error: init_from is a OneVision setting (--arch onevision); the LLaVA recipe has none"
    with pytest.raises(SystemExit) as refused:
        T.main(["--arch", "onevision", "--out", str(tmp_path / "x"), "--init-from", str(tmp_path / "none")])
    assert str(refused.value) == f"error: --init-from {tmp_path / 'none'}: no model folder (config.json missing)"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """(output folder, summary) of an uninterrupted training with the TINY config."""
    return toyvlm_runs.tiny_run(tmp_path_factory, TINY, "tiny-ov")


def test_training_runs_end_to_end_and_saves_a_stock_onevision(tiny_run):
    from transformers import LlavaOnevisionForConditionalGeneration

    from dymu.models import load_processor

    out, summary = tiny_run
    log = summary["log"]
    assert len(log) == 4 and all(math.isfinite(e["loss"]) for e in log)
    assert [e["locate_loss"] > 0 for e in log] == [False, False, True, True]  # the read-outs join at readout_start
    assert all(e["point_loss"] > 0 and e["align_loss"] > 0 and e["where_loss"] > 0 for e in log)
    assert any(e["count_loss"] > 0 for e in log) and all(e["cpu_seconds"] > 0 for e in log)
    assert [e["step"] for e in summary["tower_log"]] == [0, 1] and len(summary["evaluations"]) == 1
    assert summary["validation"]["questions"] > 0 and summary["validation"]["describe"]["scenes"] == 3
    assert summary["train_cpu_seconds"] > 0
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(out).eval()
    processor = load_processor(out, full=True)  # the stock processor, loaded without torchvision
    assert type(model.model.language_model).__name__ == "Qwen2Model" and model.config.vision_aspect_ratio == "anyres_max_3"
    assert model.config.text_config.num_key_value_heads < model.config.text_config.num_attention_heads
    assert model.model.language_model.layers[0].self_attn.q_proj.bias is not None
    example = make_split("test", 0, 1, 32)[0]
    inputs = processor(images=O.render(example.scene, O.example_size(example, 0, 32)),
                       text=T.PROMPT.format(question=example.qas[0].question), return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert output.shape[1] <= inputs["input_ids"].shape[1] + 2
    assert json.loads((out / "training_log.json").read_text())["config"]["arch"] == "onevision"
    assert not (out / T.STATE_FILE).exists()


def test_dymu_applies_to_the_trained_folder(tiny_run):
    """The saved folder is a OneVision dymu runs on: infinite thresholds change nothing, finite ones merge."""
    import dymu
    from dymu.models import load_model, load_processor

    out, _ = tiny_run
    model, processor = load_model(out), load_processor(out, full=True)
    example = make_split("test", 0, 2, 32)[1]
    inputs = processor(images=O.render(example.scene, (64, 48)), text=T.PROMPT.format(question="Describe the image."),
                       return_tensors="pt")
    with torch.no_grad():
        stock = model(**inputs).logits
        layers = model.config.vision_config.num_hidden_layers
        dymu.apply(model, [math.inf] * layers, vtu="fast")
        torch.testing.assert_close(model(**inputs).logits, stock, rtol=1e-5, atol=1e-5)
        dymu.remove(model)
        dymu.apply(model, [-1.0] * layers, vtu="fast")  # every similarity above -1: merge as much as allowed
        merged = model(**inputs).logits
        assert merged.shape == stock.shape and not torch.allclose(merged, stock)
        dymu.remove(model)


def test_a_killed_onevision_training_resumes_bit_identically(tiny_run, tmp_path, monkeypatch):
    """Killed in the tower stage's step 1 and in the main stage's steps 0 and 2, resumed each time: the same
    weights, bit for bit, and the same logs as the uninterrupted run; the CPU seconds of the segments add up."""
    out = tmp_path / "toy"
    saved, summary = killed_and_resumed(TINY, out, monkeypatch)
    assert [(s["stage"], s["step"]) for s in saved] == [("tower", 1), ("tower", 2), ("main", 2)]
    assert all(s["cpu_seconds"] > 0 for s in saved)
    assert_same_run(out, summary, *tiny_run)
    assert summary["train_cpu_seconds"] > saved[-1]["cpu_seconds"]


def test_reference_layout_concatenates_the_crops_and_dymu_follows_it(tiny_run):
    """The reference's layout: each image's crops one after the other (crops x 16 placeholders, no newline), the
    stock forward reading the tower's projected crop tokens in that order; dymu lays merged tokens out with it
    too: infinite thresholds give the unmerged logits with fast and exact VTU."""
    import dymu
    from toyvlm import evaluate_onevision as EO

    out, _ = tiny_run
    model, processor = EO.load(out)
    pictures = [O.render(SQUARE, SQUARE_SIZE), O.render(SQUARE, (64, 64))]  # 3 and 5 crops
    prompts = [T.PROMPT.format(question="What colour is the square?")] * 2
    inputs = EO.reference_inputs(processor)(pictures, prompts)
    token = model.config.image_token_id
    assert (inputs["input_ids"] == token).sum(-1).tolist() == [3 * 16, 5 * 16]
    with torch.no_grad(), EO.reference_layout(model):
        features = model.model.get_image_features(pixel_values=inputs["pixel_values"],
                                                  image_sizes=inputs["image_sizes"]).pooler_output
        crops = torch.cat([inputs["pixel_values"][0, :3], inputs["pixel_values"][1]])
        projected = model.model.multi_modal_projector(O.tower_hidden(model, crops))  # (8 crops, 16, hidden)
        torch.testing.assert_close(torch.cat(list(features)), projected.flatten(0, 1), rtol=1e-6, atol=1e-6)
        stock = model(**inputs).logits
        for vtu in ("fast", "exact"):  # the reference has no compact mode for several crops (its spec, section 5)
            dymu.apply(model, [math.inf] * model.config.vision_config.num_hidden_layers, vtu=vtu)
            try:
                real = inputs["attention_mask"].bool()
                torch.testing.assert_close(model(**inputs).logits[real], stock[real], rtol=1e-5, atol=1e-5)
            finally:
                dymu.remove(model)
    assert "pack_image_features" not in vars(model.model), "the stock layout is back"


def test_the_onevision_evaluation_runs_resumes_and_tabulates(tiny_run, tmp_path, monkeypatch):
    from toyvlm import evaluate as E
    from toyvlm import evaluate_onevision as EO

    out, _ = tiny_run
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for path in out.iterdir():
        (model_dir / path.name).write_bytes(path.read_bytes())
    results = EO.run(model_dir, scenes=3, describe_scenes=2, threshold_scenes=4, levels=("mid",), progress=False)
    names = [row["name"] for row in results["rows"]]
    assert names == ["unmerged", "blind (grey image)", "prior (text only)", "DToMe-mid (VTU)", "DToMe-mid (no VTU)",
                     "unmerged, reference layout", "DToMe-mid (VTU), reference layout"]
    rows = {row["name"]: row for row in results["rows"]}
    unmerged, merged = rows["unmerged"]["tokens"], rows["DToMe-mid (VTU)"]["tokens"]
    assert unmerged["mean"] == 16 and unmerged["lm_tokens"] == unmerged["positions"] > unmerged["per_image"] / 2
    assert merged["mean"] < 16 and merged["lm_tokens"] < merged["positions"] == unmerged["positions"]
    assert rows["DToMe-mid (no VTU)"]["tokens"] == merged
    reference = rows["unmerged, reference layout"]["tokens"]
    assert reference["positions"] == reference["per_image"] and reference["mean"] == 16
    assert rows["DToMe-mid (VTU), reference layout"]["tokens"]["mean"] == merged["mean"]  # equal thresholds
    assert (model_dir / "thresholds" / "mid.json").is_file()
    table = (model_dir / "eval" / "table.md").read_text()
    assert table.count("\n") == 2 + len(names) and "reference layout" in table
    assert (model_dir / "eval" / "accuracy_vs_tokens.png").is_file() and (model_dir / "eval" / "cider_vs_tokens.png").is_file()
    monkeypatch.setattr(E, "answer", lambda *args, **kwargs: pytest.fail("a finished row was run again"))
    again = EO.run(model_dir, scenes=3, describe_scenes=2, threshold_scenes=4, levels=("mid",), progress=False)
    assert [row["overall"] for row in again["rows"]] == [row["overall"] for row in results["rows"]]
    with pytest.raises(EO.RowJournalError, match="holds rows of another evaluation"):
        EO.run(model_dir, scenes=4, describe_scenes=2, threshold_scenes=4, levels=("mid",), progress=False)


def test_the_model_card_states_the_measured_numbers(tiny_run, tmp_path):
    from toyvlm import card
    from toyvlm import evaluate_onevision as EO

    out, _ = tiny_run
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for path in out.iterdir():
        (model_dir / path.name).write_bytes(path.read_bytes())
    results = EO.run(model_dir, scenes=2, describe_scenes=2, threshold_scenes=3, levels=("low", "high"),
                     progress=False, baselines=False)
    card.main([str(model_dir)])
    text = (model_dir / "README.md").read_text()
    rows = {row["name"]: row for row in results["rows"]}
    assert text.startswith("# toy-llava-onevision") and "Qwen2" in text and "anyres_max_3" in text
    for size in O.IMAGE_SHAPES:  # the sizes table, one line each
        assert "| {} x {} |".format(*O.shape_pixels(size, 32)) in text
    assert EO.markdown_table(results) in text
    high, moved = rows["DToMe-high (VTU)"], rows["DToMe-high (VTU), reference layout"]
    assert (f"high: {100 * high['overall']:.1f}% with the model's layout vs {100 * moved['overall']:.1f}% with the "
            "reference's") in text
    assert "training the tower, projector and word embeddings on" in text  # TINY starts fresh
    warm = {"tower_steps": 2, "tower_batch_size": 3, "tower_learning_rate": 0.003, "init_from": "assets/toy-llava"}
    assert "training the tower and projector on" in card._stage_one(warm)  # a warm start keeps the word embeddings


def test_colour_targets_sit_on_pixels_of_that_colour():
    """The targets (cut from the probe map) and the pixels (cut by the processor) are the same crops: at the default
    geometry, the centre of almost every patch an object covers fully is nearest to that object's palette colour
    (the rest: a letter or an outline drawn there). Shifted by two rows and three columns, they miss almost all."""
    config = replace(T.default_config("onevision"), vision_hidden=16, vision_layers=1, vision_heads=1, text_hidden=32,
                     text_layers=1, text_heads=4, text_kv_heads=1, init_from="")
    _, processor = T.recipe_for(config).build()
    batch = O.SceneStream(0, processor.image_processor, config.patch_size).draw(None, 30)
    pixels = batch.crop_pixels() * 0.5 + 0.5  # SigLIP's normalisation undone: (crops, 3, 112, 112) in [0, 1]
    patches = pixels.unfold(2, 14, 14).unfold(3, 14, 14)[..., 4:10, 4:10].mean((-1, -2))  # (crops, 3, 8, 8)
    centre = patches.permute(0, 2, 3, 1).reshape(len(pixels), 64, 3)
    palette = torch.tensor([T.D.PALETTE[name] for name in T.D.COLOURS], dtype=torch.float) / 255
    covers = torch.cat(batch.covers)[..., : T.D.MAX_OBJECTS]
    colour = batch.targets[:, 0]
    full = (colour > 0) & (covers.max(-1).values > 0.9)
    nearest = ((centre[full][:, None] - palette) ** 2).sum(-1).argmin(-1) + 1
    assert int(full.sum()) > 200 and (nearest == colour[full]).float().mean() > 0.95
    shifted = colour.roll(2 * 8 + 3, dims=1)[full]
    assert (nearest == shifted).float().mean() < 0.2
