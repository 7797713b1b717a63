"""DyMU on LLaVA: virtual token unmerging (fast and exact), stock generate, batching, positions."""

import math

import pytest
import torch

import dymu
from dymu import vtu as V
from dymu.compat import find_cache  # the output field is past_key_values before 5.24, cache after
from dymu.llava import get_vlm_patch

IMAGE_TOKEN = 99
PAD = 0
PATCHES = 576
#: thresholds that merge the tiny random tower to very different counts per image
MERGING = [0.6, 0.5, 0.4, 0.3]


#: the language models every language-side oracle runs on: Llama, and Qwen2 (grouped-query attention with one KV
#: head for four query heads, q/k/v biases on)
TEXT_MODELS = ("llama", "qwen2")


def tiny_llava(kv_heads=2, seed=0, layers=2, text="llama"):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, Qwen2Config

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                              image_size=336, patch_size=14, hidden_act="quick_gelu")
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4, vocab_size=100,
                 pad_token_id=PAD, bos_token_id=1, eos_token_id=98)
    if text == "qwen2":
        text = Qwen2Config(num_key_value_heads=1, **shape)
        assert text.num_key_value_heads < text.num_attention_heads
    else:
        text = LlamaConfig(num_key_value_heads=kv_heads, **shape)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                                                      vision_feature_layer=-2)).eval()
    model.generation_config.pad_token_id = PAD
    for layer in model.model.language_model.layers:  # initialised to zero: give the biases something to do
        for name in ("q_proj", "k_proj", "v_proj"):
            bias = getattr(layer.self_attn, name).bias
            if bias is not None:
                with torch.no_grad():
                    bias.normal_(0.0, 0.5)
    return model


def prompt(prefix, suffix, images=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    parts = [torch.randint(2, 90, (prefix,), generator=g)]
    for _ in range(images):
        parts += [torch.full((PATCHES,), IMAGE_TOKEN), torch.randint(2, 90, (suffix,), generator=g)]
    return torch.cat(parts)


def left_pad(rows):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return ids, mask


@pytest.fixture(scope="module")
def images(image_dir):
    from dymu.images import load_batch
    from dymu.models import make_image_processor

    values, _, _ = load_batch([str(image_dir / f"{n}.png") for n in ("checkerboard", "grass", "coins")], make_image_processor("clip", 336))
    return values


def logits(model, ids, mask, pixels):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits


@pytest.mark.parametrize("text", TEXT_MODELS)
@pytest.mark.parametrize("vtu", ["fast", "exact"])
def test_no_merging_equals_stock_model_and_generate(vtu, text, images):
    model = tiny_llava(text=text)
    ids, mask = left_pad([prompt(5, 7, seed=1), prompt(2, 4, seed=2)])
    pixels = images[:2]
    stock = logits(model, ids, mask, pixels)
    stock_tokens = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=5, do_sample=False)
    dymu.apply(model, [math.inf] * 4, vtu=vtu)
    patched = logits(model, ids, mask, pixels)
    if vtu == "fast":
        assert torch.equal(patched, stock), "singleton groups: the fast path is the stock computation"
    else:  # padding positions attend to nothing: their (unused) logits are backend-defined
        torch.testing.assert_close(patched[mask.bool()], stock[mask.bool()], rtol=1e-5, atol=1e-5)
    tokens = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=5, do_sample=False)
    assert torch.equal(tokens, stock_tokens)
    dymu.remove(model)
    assert get_vlm_patch(model) is None
    assert torch.equal(logits(model, ids, mask, pixels), stock)


@pytest.mark.parametrize("kv_heads, text", [(4, "llama"), (2, "llama"), (1, "qwen2")], ids=["MHA", "GQA", "qwen2"])
def test_exact_vtu_equals_fast_vtu(kv_heads, text, images):
    model = tiny_llava(kv_heads=kv_heads, text=text)
    ids, mask = left_pad([prompt(5, 7, seed=1), prompt(2, 4, seed=2)])
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
        model = model.to(dtype)
        pixels = images[:2].to(dtype)
        dymu.apply(model, MERGING, vtu="fast")
        assert max(dymu.encode(model, pixels).num_tokens) < PATCHES // 2, "inputs must really be merged"
        fast = logits(model, ids, mask, pixels)
        dymu.apply(model, MERGING, vtu="exact")
        exact = logits(model, ids, mask, pixels)
        torch.testing.assert_close(exact[mask.bool()], fast[mask.bool()], rtol=tol, atol=tol)


def test_one_vtu_attention_layer_equals_expand_attend_mean():
    """Spec §9 oracles 8-9: VTU attention == stock RoPE attention at full length, then the mean per group."""
    from transformers.masking_utils import create_causal_mask

    from dymu.language import Run
    from dymu.plan import TokenPlan

    model = tiny_llava(kv_heads=2).double()
    language_model = model.model.language_model
    ids, mask = left_pad([prompt(3, 5, seed=3), prompt(1, 2, seed=4)])
    g = torch.Generator().manual_seed(5)
    sources = [torch.randint(0, 40, (PATCHES,), generator=g), torch.randint(0, 200, (PATCHES,), generator=g)]
    vmap = V.build_map(ids == IMAGE_TOKEN, sources)
    full_hidden = V.expand(torch.randn(2, vmap.num_unique, 64, dtype=torch.float64, generator=g), vmap)  # group-constant
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    cos_sin = language_model.rotary_emb(full_hidden, positions)
    attention = language_model.layers[0].self_attn
    real = mask.bool()
    with torch.no_grad():
        causal = create_causal_mask(language_model.config, full_hidden, mask, None, positions)
        stock = attention(full_hidden, position_embeddings=cos_sin, attention_mask=causal)[0]
        reference = V.expand(V.reduce(stock, vmap), vmap)  # (batch, full, hidden)
        for mode in ("fast", "exact"):
            dymu.apply(model, MERGING, vtu=mode)
            causal = create_causal_mask(language_model.config, full_hidden, mask, None, positions)  # the mode's mask format
            language = get_vlm_patch(model).state.language
            plan = TokenPlan.build(ids == IMAGE_TOKEN, None, vmap, num_layers=2)
            language._run = Run(plan=plan, prefill=True, cache=None, cache_before=[0, 0], rotary=cos_sin)
            unique = V.to_unique(full_hidden, vmap)  # the residual stream between layers: one row per unique token
            merged = V.from_unique(attention(unique, position_embeddings=cos_sin, attention_mask=causal)[0], vmap)
            assert language._run.calls == {"self_attn": 1, "q_proj": 1, "k_proj": 1, "v_proj": 1, "o_proj": 1}
            language._run = None
            torch.testing.assert_close(merged[real], reference[real], rtol=1e-10, atol=1e-10)
            assert not torch.allclose(stock[real], reference[real]), "the per-group mean must change the output"


def test_map_groups_positions_and_checks_counts():
    ids, _ = left_pad([prompt(2, 3, images=2, seed=6), prompt(1, 1, seed=7)])
    sources = [torch.zeros(PATCHES, dtype=torch.long), torch.arange(PATCHES) % 3, torch.arange(PATCHES)]
    vmap = V.build_map(ids == IMAGE_TOKEN, sources)
    # row 0: 2 + 1 (one group) + 3 + 3 (three groups) + 3 text tokens; row 1: pads + 1 + 576 + 1
    assert vmap.unique_lengths.tolist() == [2 + 1 + 3 + 3 + 3, ids.shape[1] - (PATCHES + 2) + 1 + PATCHES + 1]
    assert torch.equal(vmap.counts.sum(-1), torch.full((2,), ids.shape[1]))
    # mapping is non-decreasing on text and surjective
    for row in range(2):
        own = vmap.full_to_unique[row]
        assert torch.equal(torch.unique(own), torch.arange(int(vmap.unique_lengths[row])))
    hidden = torch.randn(2, vmap.num_unique, 4)
    assert torch.equal(V.compress(V.expand(hidden, vmap), vmap)[:, :12][0], hidden[0, :12])
    with pytest.raises(ValueError, match="placeholder"):
        V.build_map(ids == IMAGE_TOKEN, sources[:2])


@pytest.mark.parametrize("text", TEXT_MODELS)
def test_left_padded_batch_equals_each_prompt_alone(text, images):
    model = tiny_llava(kv_heads=2, text=text)
    dymu.apply(model, MERGING, vtu="fast")
    counts = dymu.encode(model, images).num_tokens
    assert len(set(counts)) == 3, "the three images must merge to different counts"
    rows = [prompt(5, 7, seed=1), prompt(2, 4, seed=2), prompt(9, 3, seed=3)]
    ids, mask = left_pad(rows)
    batched = logits(model, ids, mask, images)
    batched_tokens = model.generate(input_ids=ids, attention_mask=mask, pixel_values=images, max_new_tokens=5, do_sample=False)
    for i, row in enumerate(rows):
        alone = logits(model, row[None], torch.ones(1, len(row), dtype=torch.long), images[i : i + 1])
        torch.testing.assert_close(batched[i, -len(row):], alone[0], rtol=1e-4, atol=1e-4)
        alone_tokens = model.generate(input_ids=row[None], pixel_values=images[i : i + 1], max_new_tokens=5, do_sample=False)
        assert torch.equal(batched_tokens[i, -5:], alone_tokens[0, -5:])


@pytest.mark.parametrize("text", TEXT_MODELS)
def test_two_images_in_one_prompt(text, images):
    model = tiny_llava(text=text)
    ids, mask = left_pad([prompt(3, 4, images=2, seed=8), prompt(2, 5, seed=9)])
    pixels = images  # row 0 takes images 0 and 1, row 1 takes image 2
    stock = logits(model, ids, mask, pixels)
    dymu.apply(model, [math.inf] * 4)
    assert torch.equal(logits(model, ids, mask, pixels), stock)
    dymu.apply(model, MERGING)
    batched = logits(model, ids, mask, pixels)
    row = ids[0][mask[0].bool()]
    alone = logits(model, row[None], torch.ones(1, len(row), dtype=torch.long), pixels[:2])
    torch.testing.assert_close(batched[0, -len(row):], alone[0], rtol=1e-4, atol=1e-4)
    tokens = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=3, num_beams=2)
    assert tokens.shape == (2, ids.shape[1] + 3)


def test_positions_and_cache_are_full_length(images):
    """The first text token after an image keeps its unmerged RoPE position; the KV cache has full length."""
    model = tiny_llava()
    ids = prompt(4, 6, seed=10)[None]
    seen = {}

    def capture(name):
        def hook(module, args, kwargs):
            seen[name] = kwargs["position_embeddings"][0].clone()  # cos: (batch, positions, head_dim)
        return hook

    attention = model.model.language_model.layers[1].self_attn
    handle = attention.register_forward_pre_hook(capture("stock"), with_kwargs=True)
    with torch.no_grad():
        stock = model(input_ids=ids, pixel_values=images[:1], use_cache=True)
    handle.remove()
    dymu.apply(model, MERGING)
    handle = attention.register_forward_pre_hook(capture("merged"), with_kwargs=True)
    with torch.no_grad():
        merged = model(input_ids=ids, pixel_values=images[:1], use_cache=True)
    handle.remove()
    assert dymu.encode(model, images[:1]).num_tokens[0] < PATCHES
    first_text = 4 + PATCHES
    assert torch.equal(seen["merged"], seen["stock"])
    assert torch.equal(seen["merged"][0, first_text], seen["stock"][0, first_text])
    assert find_cache(merged.values()).get_seq_length() == find_cache(stock.values()).get_seq_length() == ids.shape[1]


def test_bad_inputs(images, model_dirs):
    model = tiny_llava()
    with pytest.raises(dymu.DymuError, match="vtu must be one of"):
        dymu.apply(model, MERGING, vtu="sometimes")
    assert get_vlm_patch(model) is None and not dymu.is_applied(model)
    from dymu.models import load_model

    siglip_thresholds = dymu.find_thresholds(load_model(model_dirs["tiny-siglip"]), images[:2].new_zeros(2, 3, 384, 384),
                                             target_tokens=400, progress=False, measure=0)
    with pytest.raises(dymu.ThresholdsError, match="siglip_vision_model"):
        dymu.apply(model, siglip_thresholds)
    dymu.apply(model, MERGING)
    text_only = torch.randint(2, 90, (1, 12))
    with pytest.raises(dymu.DymuError, match="0 image placeholder tokens"):
        logits(model, text_only, torch.ones_like(text_only), images[:1])


def test_preset_ships_a_real_processor_and_compact_mode_works(tiny_llava_dir, image_dir):
    from dymu.data import bundled_image
    from dymu.models import load_model, load_processor

    model, processor = load_model(tiny_llava_dir), load_processor(tiny_llava_dir, full=True)
    assert type(processor).__name__ == "LlavaProcessor"
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}],
                                         add_generation_prompt=True)
    photos = [bundled_image("checkerboard"), bundled_image("grass")]
    stock_inputs = processor(images=photos, text=[text, text], return_tensors="pt", padding=True)
    assert int((stock_inputs["input_ids"] == model.config.image_token_id).sum()) == 2 * PATCHES
    with torch.no_grad():
        stock = model(**stock_inputs).logits
    # compact mode with no merging is the stock model
    dymu.apply(model, [math.inf] * 4, vtu="none")
    inputs = dymu.prepare_inputs(model, processor, photos, [text, text])
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, stock)
    # compact mode really shrinks the sequence and the KV cache; batch == one by one
    dymu.apply(model, MERGING, vtu="none")
    inputs = dymu.prepare_inputs(model, processor, photos, [text, text])
    counts = get_vlm_patch(model).state.last_encoding.num_tokens
    assert inputs["attention_mask"].sum(-1).tolist() == [stock_inputs["attention_mask"][i].sum().item() - PATCHES + counts[i] for i in range(2)]
    batched = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    for i in range(2):
        alone = model.generate(**dymu.prepare_inputs(model, processor, photos[i : i + 1], [text]), max_new_tokens=4, do_sample=False)
        assert torch.equal(batched[i, -4:], alone[0, -4:])
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    assert find_cache(out.values()).get_seq_length() == inputs["input_ids"].shape[1] < stock_inputs["input_ids"].shape[1]
    with pytest.raises(dymu.DymuError, match="<image>"):  # one line: the processor's (5.24) or ours (5.18)
        dymu.prepare_inputs(model, processor, photos, [text, "no image here"])


def test_config_section_and_enable(tiny_llava_dir, image_paths, tmp_path, capsys):
    import json
    import shutil

    from dymu.cli import main
    from dymu.models import load_model

    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_llava_dir, folder)
    thresholds = tmp_path / "thr.json"
    assert main(["find-thresholds", str(folder), *image_paths[:6], "--target-tokens", "200", "--out", str(thresholds), "--measure", "0"]) == 0
    assert main(["enable", str(folder), "--thresholds", str(thresholds), "--vtu", "exact"]) == 0
    section = json.loads((folder / "config.json").read_text())["dymu"]
    stored = json.loads(thresholds.read_text())
    assert section["vtu"] == "exact" and section["thresholds"] == stored["thresholds"] and section["model"] == stored["model"]
    assert "used" not in section["images"] and not (folder / "dymu_thresholds.json").exists(), "all inside config.json"
    model = dymu.from_pretrained(folder)
    assert get_vlm_patch(model).state.vtu == "exact" and dymu.is_applied(model)
    reference = load_model(folder)
    dymu.apply(reference, thresholds, vtu="exact")
    ids = prompt(3, 4, seed=11)[None]
    pixels = torch.randn(1, 3, 336, 336)
    ids[ids == IMAGE_TOKEN] = model.config.image_token_id
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, pixel_values=pixels).logits, reference(input_ids=ids, pixel_values=pixels).logits)
    capsys.readouterr()
    code = main(["generate", str(folder), "--image", image_paths[0], "--prompt", "What?", "--max-new-tokens", "3", "--compare"])
    out = capsys.readouterr().out
    assert code == 0 and "[DyMU (vtu=exact)]" in out and "[unmerged]" in out and "prefill FLOPs" in out


def test_generate_prune_reports_kept_tokens_and_prefill_flops(tiny_llava_dir, image_paths, capsys):
    from dymu import flops as F
    from dymu.cli import main
    from dymu.images import open_image
    from dymu.llava import chat_prompt
    from dymu.models import load_config, load_processor
    from dymu.vision import config_tower_info

    processor = load_processor(tiny_llava_dir, full=True)
    ids = processor(images=[open_image(image_paths[0])], text=[chat_prompt(processor, "What?", 1)])["input_ids"]
    config = load_config(tiny_llava_dir)[1]
    decoder, vision = F.Decoder.from_config(config), F.vision_flops(config_tower_info(config), 64)
    prompt = F.Prompt(len(ids[0]) - PATCHES, PATCHES, PATCHES)
    stock = vision + F.prefill_flops(decoder, F.language_plan(prompt, 2)).flops
    pruned = vision + F.prefill_flops(decoder, F.language_plan(prompt, 2, "fast", "fastv:k=1,r=0.25")).flops
    assert main(["generate", str(tiny_llava_dir), "--image", image_paths[0], "--prompt", "What?", "--prune", "vtw:k=2"]) == 2
    assert capsys.readouterr().err.strip() == ("dymu generate: error: vtw:k=2 acts from layer 2 on, but the language model "
                                               "has 2 layers (0..1): choose k < 2")  # it would change nothing
    for spec, kept, ratio in [("fastv:k=1,r=0.25", "576 in layer 0, 432 in layer 1", pruned / stock),
                              ("vtw:k=1", "576 in layer 0, 0 in layer 1", None)]:
        ratio = ratio or (vision + F.prefill_flops(decoder, F.language_plan(prompt, 2, "fast", spec)).flops) / stock
        assert main(["generate", str(tiny_llava_dir), "--image", image_paths[0], "--prompt", "What?", "--max-new-tokens", "2",
                     "--prune", spec]) == 0
        out = capsys.readouterr().out
        assert f"[{spec}]" in out and "[unmerged]" not in out
        assert f"image tokens in the language model: {kept}; prefill FLOPs {100 * ratio:.1f}% of unmerged (cache-aware)" in out
    assert main(["generate", str(tiny_llava_dir), "--image", image_paths[0], "--prompt", "What?", "--prune", "fastv:r=2"]) == 2
    assert capsys.readouterr().err.strip() == ("dymu generate: error: invalid prune spec 'fastv:r=2': r must be between 0 and 1, "
                                               "got 2.0; syntax: fastv:k=K,r=R[,rerank=prefill|step][,score=last|all] | vtw:k=K | "
                                               "dyrate:FILE[,monotone=true|false]")


def test_generate_with_merging_and_pruning_counts_the_kept_positions(tiny_llava_dir, image_paths, tmp_path, capsys):
    from dymu.cli import main

    out = tmp_path / "thr.json"
    assert main(["find-thresholds", str(tiny_llava_dir), *image_paths[:4], "--target-tokens", "150", "--out", str(out),
                 "--measure", "0"]) == 0
    capsys.readouterr()
    assert main(["generate", str(tiny_llava_dir), "--image", image_paths[0], "--prompt", "What?", "--max-new-tokens", "2",
                 "--thresholds", str(out), "--prune", "fastv:k=1,r=0.5", "--show-plan"]) == 0
    text = capsys.readouterr().out
    assert "[DyMU (vtu=fast) + fastv:k=1,r=0.5]" in text
    line = next(line for line in text.splitlines() if "image tokens in the language model" in line)
    before, after = (int(part.split(" in ")[0]) for part in line.split(": ", 1)[1].split(";")[0].split(", "))
    assert after == before - round(before / 2)
    plan = text[text.index("TokenPlan:"):].splitlines()
    assert plan[1] == "  layer 0 (scores: last):" and plan[3].startswith("  layer")  # layer 0 ranks, then k=1 on
    positions = int(plan[2].split("image ")[1].split(",")[0])
    assert f"image {positions - 1}" not in plan[2] and "unique " in plan[2]


def test_generate_cli_errors(tiny_llava_dir, image_paths, tmp_path, capsys, model_dirs):
    from dymu.cli import main

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    assert main(["generate", str(tiny_llava_dir), "--image", str(bad), "--prompt", "hi"]) == 2
    assert "cannot read image" in capsys.readouterr().err
    siglip_thr = tmp_path / "siglip.json"
    assert main(["find-thresholds", str(model_dirs["tiny-siglip"]), *image_paths[:3], "--target-tokens", "400", "--out", str(siglip_thr), "--measure", "0"]) == 0
    capsys.readouterr()
    assert main(["generate", str(tiny_llava_dir), "--image", image_paths[0], "--prompt", "hi", "--thresholds", str(siglip_thr)]) == 2
    err = capsys.readouterr().err
    assert "siglip_vision_model" in err and str(siglip_thr) in err
    assert main(["generate", str(tiny_llava_dir), "--image", image_paths[0], "--prompt", "<image> <image> two?"]) == 2
    assert "2 <image> placeholder(s) but 1 image(s) given" in capsys.readouterr().err
    assert main(["generate", str(model_dirs["tiny-clip"]), "--image", image_paths[0], "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"dymu generate: error: {model_dirs['tiny-clip']} is a CLIPVisionModel: dymu generate needs a LLaVA-1.5 checkpoint (for vision encoders use dymu encode)"


def test_padding_positions_share_one_token_and_contribute_nothing():
    ids, mask = left_pad([prompt(6, 9, seed=12), prompt(1, 2, seed=13)])
    sources = [torch.arange(PATCHES) // 4, torch.arange(PATCHES) // 2]
    vmap = V.build_map(ids == IMAGE_TOKEN, sources, padding=mask == 0)
    pads = int((mask[1] == 0).sum())
    assert pads > 1
    assert vmap.unique_lengths.tolist() == [6 + 144 + 9, 1 + 1 + 288 + 2]  # row 1: one token holds all padding
    assert torch.unique(vmap.full_to_unique[1, :pads]).numel() == 1
    hidden = torch.randn(2, ids.shape[1], 3)
    reduced = V.reduce(hidden, vmap)
    assert torch.equal(reduced[1, vmap.full_to_unique[1, 0]], torch.zeros(3))
    no_padding = V.build_map(ids == IMAGE_TOKEN, sources)
    real = mask.bool()
    torch.testing.assert_close(V.expand(reduced, vmap)[real], V.expand(V.reduce(hidden, no_padding), no_padding)[real])


def test_compact_batch_logits_equal_each_prompt_alone(tiny_llava_dir):
    from dymu.data import bundled_image
    from dymu.models import load_model, load_processor

    model, processor = load_model(tiny_llava_dir), load_processor(tiny_llava_dir, full=True)
    dymu.apply(model, MERGING, vtu="none")
    photos = [bundled_image("checkerboard"), bundled_image("coins")]
    texts = ["USER: <image>\nWhat is it? ASSISTANT:", "USER: <image>\nHow many coins are there in this photo? ASSISTANT:"]
    inputs = dymu.prepare_inputs(model, processor, photos, texts)
    assert int((inputs["attention_mask"] == 0).sum()) > 1, "rows must need padding"
    with torch.no_grad():
        batched = model(**inputs).logits
        for i in range(2):
            alone_inputs = dymu.prepare_inputs(model, processor, photos[i : i + 1], texts[i : i + 1])
            alone = model(**alone_inputs).logits[0]
            torch.testing.assert_close(batched[i][inputs["attention_mask"][i].bool()], alone, rtol=1e-4, atol=1e-4)


def test_config_section_with_an_inline_list(tiny_llava_dir, tmp_path):
    import json
    import shutil

    folder = tmp_path / "inline"
    shutil.copytree(tiny_llava_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["dymu"] = {"thresholds": [0.6, 0.5, None, None], "vtu": "none"}
    (folder / "config.json").write_text(json.dumps(config))
    model = dymu.from_pretrained(folder)
    patch = get_vlm_patch(model)
    assert patch.state.vtu == "none"
    from dymu.vision import get_patch

    assert get_patch(model).state.thresholds == [0.6, 0.5, math.inf, math.inf]
    config["dymu"] = {"vtu": "fast"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(dymu.DymuError, match="needs a \"thresholds\" entry"):
        dymu.from_pretrained(folder)


def test_beam_search_leaves_the_callers_inputs_alone(tiny_llava_dir):
    """Stock generate expands pre-encoded features in place for beams; a second call must see the same inputs."""
    from dymu.data import bundled_image
    from dymu.models import load_model, load_processor

    model, processor = load_model(tiny_llava_dir), load_processor(tiny_llava_dir, full=True)
    dymu.apply(model, MERGING, vtu="none")
    inputs = dymu.prepare_inputs(model, processor, [bundled_image("coins")], ["USER: <image>\nWhat? ASSISTANT:"])
    features = list(inputs["mm_encoder_outputs"]["image"].pooler_output)
    first = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    for options in ({"num_beams": 2}, {"num_return_sequences": 2, "num_beams": 2}):
        model.generate(**inputs, max_new_tokens=3, **options)
        assert inputs["mm_encoder_outputs"]["image"].pooler_output == features
    assert torch.equal(model.generate(**inputs, max_new_tokens=3, do_sample=False), first)


def test_compact_mode_takes_adjacent_images(tiny_llava_dir):
    """<image><image> written together: two images, each shrunk to its own merged count (as fast mode reads it)."""
    from dymu.data import bundled_image
    from dymu.models import load_model, load_processor

    model, processor = load_model(tiny_llava_dir), load_processor(tiny_llava_dir, full=True)
    photos = [bundled_image("checkerboard"), bundled_image("grass")]
    dymu.apply(model, MERGING, vtu="none")
    together = dymu.prepare_inputs(model, processor, photos, ["USER: <image><image>\nWhat? ASSISTANT:"])
    apart = dymu.prepare_inputs(model, processor, photos, ["USER: <image>\n<image>\nWhat? ASSISTANT:"])
    counts = get_vlm_patch(model).state.last_encoding.num_tokens
    token = model.config.image_token_id
    assert int((together["input_ids"] == token).sum()) == int((apart["input_ids"] == token).sum()) == sum(counts)
    assert counts[0] != counts[1]
    with torch.no_grad():
        logits = model(**together).logits
    assert torch.isfinite(logits).all()
