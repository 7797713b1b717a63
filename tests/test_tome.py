"""ToMe with a fixed r (dymu.apply(model, merge="tome:r=8")): the stock model at r=0, exact per-image token counts,
batch invariance, LLaVA with VTU fast / exact / compact and FastV, the CLI."""

import json

import pytest
import torch

import dymu
from dymu.methods import ToMe
from dymu.thresholds import Thresholds
from dymu.vision import tower_info

from .conftest import MIXED_IMAGES, pixels
from .test_cli import _one_line_error, run
from .test_llava import PATCHES, images, left_pad, logits, prompt, tiny_llava  # noqa: F401 (fixtures)

#: per-layer patch counts (CLS not counted) computed by hand: n -> n - min(r, floor((n - cls) / 2)), 4 layers
CLIP_COUNTS = {8: [568, 560, 552, 544], 200: [376, 188, 94, 47], 1000: [288, 144, 72, 36]}
SIGLIP_COUNTS = {8: [721, 713, 705, 697], 1000: [365, 183, 92, 46]}


def _encode(model, x):
    with torch.no_grad():
        return model(x, output_hidden_states=True)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_r0_is_the_stock_encoder_bit_for_bit(family, request, image_dir):
    model, processor = request.getfixturevalue(family)
    x = pixels(processor, image_dir)
    stock = _encode(model, x)
    dymu.apply(model, merge="tome:r=0")
    patched = _encode(model, x)
    for a, b in zip(stock.hidden_states, patched.hidden_states, strict=True):
        assert torch.equal(a, b)
    encoding = dymu.encode(model, x)
    protected = tower_info(model).protected
    assert torch.equal(torch.stack(encoding.tokens), stock.hidden_states[-1][:, protected:])


@pytest.mark.parametrize("family,counts", [("clip", CLIP_COUNTS), ("siglip", SIGLIP_COUNTS)])
def test_every_image_keeps_exactly_what_r_and_the_capacity_leave(family, counts, request, image_dir):
    """Flat (checkerboard) and textured (grass) photos get the same counts: that is fixed r."""
    model, processor = request.getfixturevalue(family)
    x = pixels(processor, image_dir)
    for r, expected in counts.items():
        dymu.apply(model, merge=ToMe(r=r))
        encoding = dymu.encode(model, x)
        assert encoding.layer_tokens == [expected] * len(MIXED_IMAGES)
        for sizes, source, tokens in zip(encoding.sizes, encoding.source, encoding.tokens):
            assert tokens.shape[0] == expected[-1] and int(sizes.sum()) == encoding.num_patches
            assert torch.equal(torch.bincount(source, minlength=tokens.shape[0]), sizes)
    dymu.apply(model, [0.9, 0.6, 0.4, 0.2] if family == "clip" else [0.95, 0.8, 0.6, 0.4])
    assert len(set(dymu.encode(model, x).num_tokens)) > 1, "thresholds on the same photos give different counts"


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_batch_gives_the_same_groups_as_one_by_one(family, request, image_dir):
    model, processor = request.getfixturevalue(family)
    model = model.double()
    x = pixels(processor, image_dir).double()
    dymu.apply(model, merge="tome:r=40")
    batched = dymu.encode(model, x)
    for i in range(x.shape[0]):
        alone = dymu.encode(model, x[i : i + 1])
        assert torch.equal(alone.source[0], batched.source[i])
        assert torch.equal(alone.sizes[0], batched.sizes[i])
        torch.testing.assert_close(alone.tokens[0], batched.tokens[i], rtol=1e-10, atol=1e-10)


def test_llava_tower_merges_up_to_its_read_layer():
    from .test_encoder import _tiny_llava

    model = _tiny_llava()
    dymu.apply(model, merge="tome:r=8")
    assert dymu.encode(model, torch.randn(2, 3, 336, 336)).layer_tokens == [[568, 560, 552]] * 2


def test_dtome_spec_is_the_thresholds_file_and_settings_survive_threshold_finding(clip, image_dir, tmp_path):
    model, processor = clip
    x = pixels(processor, image_dir)
    path = tmp_path / "thr.json"
    Thresholds(values=[0.9, 0.6, 0.4, 0.2]).save(path)
    dymu.apply(model, path)
    expected = dymu.encode(model, x)
    dymu.apply(model, merge=f"dtome:{path}")
    assert all(torch.equal(a, b) for a, b in zip(dymu.encode(model, x).source, expected.source, strict=True))
    # finding and measuring thresholds on a ToMe model leaves it a ToMe model
    dymu.apply(model, merge="tome:r=8")
    found = dymu.find_thresholds(model, x, target_tokens=300, progress=False, measure=len(MIXED_IMAGES))
    assert found.achieved_tokens["mean"] != 544, "measured with the thresholds found, not with ToMe"
    assert dymu.encode(model, x).layer_tokens == [CLIP_COUNTS[8]] * len(MIXED_IMAGES)


def test_apply_errors_are_one_line(clip):
    model, _ = clip
    for kwargs, fragment in (({"thresholds": [0.5] * 4, "merge": "tome:r=8"}, "give thresholds or merge=, not both"),
                             ({"merge": "tome:r=-1"}, "r must be >= 0"),
                             ({"merge": [0.5] * 4}, "invalid merge spec")):
        with pytest.raises(dymu.DymuError, match=fragment) as caught:
            dymu.apply(model, **kwargs)
        assert "\n" not in str(caught.value)
        assert not dymu.is_applied(model)


def test_llava_r0_is_the_stock_model(images):
    model = tiny_llava()
    ids, mask = left_pad([prompt(5, 7, seed=1), prompt(2, 4, seed=2)])
    pixels = images[:2]
    stock = logits(model, ids, mask, pixels)
    stock_tokens = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=5, do_sample=False)
    dymu.apply(model, merge="tome:r=0", vtu="fast")
    assert torch.equal(logits(model, ids, mask, pixels), stock)
    tokens = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=5, do_sample=False)
    assert torch.equal(tokens, stock_tokens)


def test_llava_exact_equals_fast_and_generate_runs(images):
    model = tiny_llava().double()
    ids, mask = left_pad([prompt(5, 7, seed=1), prompt(2, 4, seed=2)])
    pixels = images[:2].double()
    dymu.apply(model, merge="tome:r=100", vtu="fast")
    assert dymu.encode(model, pixels).num_tokens == [PATCHES - 300] * 2, "3 merging layers of 100"
    fast = logits(model, ids, mask, pixels)
    tokens = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=4, do_sample=False)
    assert tokens.shape == (2, ids.shape[1] + 4)
    dymu.apply(model, merge="tome:r=100", vtu="exact")
    exact = logits(model, ids, mask, pixels)
    torch.testing.assert_close(exact[mask.bool()], fast[mask.bool()], rtol=1e-10, atol=1e-10)
    # FastV on top: keeping every token is ToMe alone; dropping half still generates
    dymu.apply(model, merge="tome:r=100", vtu="fast", prune="fastv:k=1,r=0")
    kept_all = logits(model, ids, mask, pixels)
    torch.testing.assert_close(kept_all[mask.bool()], fast[mask.bool()], rtol=1e-10, atol=1e-10)
    dymu.apply(model, merge="tome:r=100", vtu="fast", prune="fastv:k=1,r=0.5")
    assert model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=4).shape == tokens.shape


def test_llava_compact_mode(tiny_llava_dir):
    from dymu.data import bundled_image
    from dymu.models import load_model, load_processor

    model, processor = load_model(tiny_llava_dir), load_processor(tiny_llava_dir, full=True)
    photos = [bundled_image("checkerboard"), bundled_image("grass")]
    texts = ["USER: <image>\nWhat? ASSISTANT:", "USER: <image>\nWhat is it? ASSISTANT:"]
    stock_inputs = processor(images=photos, text=texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        stock = model(**stock_inputs).logits
    dymu.apply(model, merge="tome:r=0", vtu="none")
    with torch.no_grad():
        assert torch.equal(model(**dymu.prepare_inputs(model, processor, photos, texts)).logits, stock)
    dymu.apply(model, merge="tome:r=50", vtu="none")
    inputs = dymu.prepare_inputs(model, processor, photos, texts)
    assert inputs["attention_mask"].sum(-1).tolist() == (stock_inputs["attention_mask"].sum(-1) - 150).tolist()
    assert model.generate(**inputs, max_new_tokens=3, do_sample=False).shape == (2, inputs["input_ids"].shape[1] + 3)


def test_cli_merge_option(capsys, model_dirs, image_paths, tiny_llava_dir, tmp_path):
    clip = model_dirs["tiny-clip"]
    code, out, _ = run(capsys, "encode", clip, *image_paths[:3], "--merge", "tome:r=8", "--json")
    assert code == 0 and [json.loads(line)["tokens"] for line in out.splitlines()] == [544] * 3
    path = tmp_path / "thr.json"
    Thresholds(values=[0.9, 0.6, 0.4, 0.2]).save(path)
    assert run(capsys, "encode", clip, *image_paths[:3], "--merge", f"dtome:{path}", "--json")[1] == \
        run(capsys, "encode", clip, *image_paths[:3], "--thresholds", path, "--json")[1]
    for command in (["encode", clip, image_paths[0]], ["generate", tiny_llava_dir, "--image", image_paths[0], "--prompt", "hi"]):
        _one_line_error(*run(capsys, *command, "--merge", "tome:r=8", "--thresholds", path)[::2],
                        f"dymu {command[0]}: error: --merge and --thresholds are alternatives: give one")
        _one_line_error(*run(capsys, *command, "--merge", "tome:r=x")[::2], "r must be an integer", "syntax: dtome:FILE | tome:r=R")
    code, out, _ = run(capsys, "generate", tiny_llava_dir, "--image", image_paths[0], "--prompt", "What?", "--merge", "tome:r=8",
                       "--max-new-tokens", "2")
    assert code == 0 and "[ToMe r=8 (vtu=fast)]" in out and f"{PATCHES - 24}/{PATCHES}" in out and "prefill FLOPs" in out
