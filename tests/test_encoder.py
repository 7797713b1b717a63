"""DToMe inside HF CLIP / SigLIP towers: identity, halving, batch invariance, self-consistency, VLM towers."""

import math

import pytest
import torch

import dymu
from dymu.finder import budgets_for, calibration_statistics
from dymu.vision import get_patch, patch_tower, tower_info, unpatch_tower

from .conftest import pixels


def _hidden_states(model, x):
    with torch.no_grad():
        return model(x, output_hidden_states=True).hidden_states


@pytest.mark.parametrize("family", ["clip", "siglip"])
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_inf_thresholds_equal_stock_model_and_remove_restores(family, backend, request, image_dir):
    model, processor = request.getfixturevalue(family)
    model.set_attn_implementation(backend)
    x = pixels(processor, image_dir)
    with torch.no_grad():
        stock = model(x, output_hidden_states=True)
    layers = tower_info(model).num_layers
    dymu.apply(model, [math.inf] * layers)
    with torch.no_grad():
        patched = model(x, output_hidden_states=True)
    for a, b in zip(stock.hidden_states, patched.hidden_states, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(stock.last_hidden_state, patched.last_hidden_state)
    # encode returns the read layer's output, CLS excluded, all patches kept
    encoding = dymu.encode(model, x)
    protected = 1 if family == "clip" else 0
    assert torch.equal(torch.stack(encoding.tokens), stock.hidden_states[-1][:, protected:])
    assert all(s.eq(1).all() for s in encoding.sizes)
    assert all(torch.equal(src, torch.arange(encoding.num_patches)) for src in encoding.source)
    # merge hard, then remove: the model is exactly the stock one again (no leftover attributes or hooks)
    dymu.apply(model, [-math.inf] * layers)
    assert dymu.encode(model, x).num_tokens[0] < encoding.num_patches
    dymu.remove(model)
    assert not dymu.is_applied(model)
    encoder = tower_info(model).tower.encoder
    assert "forward" not in encoder.__dict__ and all("forward" not in layer.__dict__ for layer in encoder.layers)
    assert all(not layer.self_attn.k_proj._forward_hooks for layer in encoder.layers)
    with torch.no_grad():
        restored = model(x, output_hidden_states=True)
    for a, b in zip(stock.hidden_states, restored.hidden_states, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("family,expected", [("clip", [288, 144, 72, 36]), ("siglip", [365, 183, 92, 46])])
def test_minus_inf_halves_tokens_per_layer(family, expected, request, image_dir):
    model, processor = request.getfixturevalue(family)
    dymu.apply(model, [-math.inf] * 4)
    encoding = dymu.encode(model, pixels(processor, image_dir, names=("astronaut", "grass")))
    # with CLS: 577 -> 289 -> 145 -> 73 -> 37 tokens; without: 729 -> 365 -> 183 -> 92 -> 46
    assert encoding.layer_tokens == [expected, expected]
    for sizes, source, tokens in zip(encoding.sizes, encoding.source, encoding.tokens):
        assert int(sizes.sum()) == encoding.num_patches
        assert torch.equal(torch.bincount(source, minlength=tokens.shape[0]), sizes)
        assert tokens.shape[0] == expected[-1]


def test_layers_with_inf_never_merge(clip, image_dir):
    model, processor = clip
    dymu.apply(model, [math.inf, -math.inf, math.inf, -math.inf])
    encoding = dymu.encode(model, pixels(processor, image_dir, names=("coins",)))
    assert encoding.layer_tokens == [[576, 288, 288, 144]]


@pytest.mark.parametrize("family", ["clip", "siglip"])
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_padded_batch_gives_the_same_groups_as_one_by_one(family, backend, request, image_dir):
    """Batch invariance, asserted exactly on merge groups in float64 (fp32 near-ties can flip argmax); a batch of
    different lengths runs packed, each image's attention through the model's own kernel."""
    model, processor = request.getfixturevalue(family)
    model = model.double()
    model.set_attn_implementation(backend)
    x = pixels(processor, image_dir).double()
    thresholds = [0.9, 0.6, 0.4, 0.2] if family == "clip" else [0.95, 0.8, 0.6, 0.4]
    dymu.apply(model, thresholds)
    batched = dymu.encode(model, x)
    assert len(set(batched.num_tokens)) > 2, "the test needs images that merge to different lengths"
    for i in range(x.shape[0]):
        alone = dymu.encode(model, x[i : i + 1])
        assert torch.equal(alone.source[0], batched.source[i])
        assert torch.equal(alone.sizes[0], batched.sizes[i])
        torch.testing.assert_close(alone.tokens[0], batched.tokens[i], rtol=1e-10, atol=1e-10)


def test_fp32_batch_features_match_within_tolerance(clip, image_dir):
    model, processor = clip
    x = pixels(processor, image_dir)
    dymu.apply(model, [0.9, 0.6, 0.4, 0.2])
    batched = dymu.encode(model, x)
    for i in range(x.shape[0]):
        alone = dymu.encode(model, x[i : i + 1])
        if torch.equal(alone.source[0], batched.source[i]):  # fp32 near-ties may legitimately flip a group
            torch.testing.assert_close(alone.tokens[0], batched.tokens[i], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_threshold_self_consistency(family, request, image_dir):
    """Re-encoding a calibration batch at that batch's own statistics reproduces the same merges (spec §9.6)."""
    model, processor = request.getfixturevalue(family)
    model = model.double()
    x = pixels(processor, image_dir).double()
    info = tower_info(model)
    budgets = budgets_for(info, 150, "constant")
    patch_tower(model, [math.inf] * info.num_layers)
    statistics = calibration_statistics(model, x, budgets)
    state = get_patch(model).state
    budget_source, budget_lengths = state.source.clone(), [t.clone() for t in state.layer_lengths]
    assert all(v > 0 for v in statistics.values()), "a clamped statistic would make the oracle inapplicable"
    unpatch_tower(model)
    dymu.apply(model, [statistics[i] for i in range(info.num_layers)])
    encoding = dymu.encode(model, x)
    state = get_patch(model).state
    assert [t.tolist() for t in state.layer_lengths] == [t.tolist() for t in budget_lengths]
    assert torch.equal(state.source, budget_source)
    # the budget is a batch total: per image counts differ, the mean is the target
    assert sum(encoding.num_tokens) == 150 * x.shape[0]
    assert len(set(encoding.num_tokens)) > 1


def _tiny_llava():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                              image_size=336, patch_size=14, hidden_act="quick_gelu")
    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=2, vocab_size=64)
    torch.manual_seed(0)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=63, vision_feature_layer=-2)
    return LlavaForConditionalGeneration(config).eval()


def _tiny_onevision():
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                                image_size=384, patch_size=14, vision_use_head=False)
    text = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, vocab_size=64)
    torch.manual_seed(0)
    config = LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_index=63, vision_feature_layer=-1)
    return LlavaOnevisionForConditionalGeneration(config).eval()


def test_llava_tower_merges_up_to_vision_feature_layer():
    model = _tiny_llava()
    info = tower_info(model)
    assert info.tower is model.model.vision_tower and info.read_layer == 2 and info.protected == 1
    x = torch.randn(2, 3, 336, 336)
    stock = _hidden_states(info.tower, x)
    dymu.apply(model, [math.inf] * 4)
    encoding = dymu.encode(model, x)
    assert torch.equal(torch.stack(encoding.tokens), stock[-2][:, 1:]), "tokens are what LLaVA reads: hidden_states[-2] without CLS"
    dymu.apply(model, [-math.inf] * 4)
    encoding = dymu.encode(model, x)
    assert encoding.layer_tokens[0] == [288, 144, 72], "the layer after the read layer is not run"
    dymu.remove(model)
    for a, b in zip(stock, _hidden_states(info.tower, x), strict=True):
        assert torch.equal(a, b)


def test_onevision_tower_is_siglip_read_at_last_layer():
    model = _tiny_onevision()
    info = tower_info(model)
    assert info.model_type == "siglip_vision_model" and info.read_layer == 2 and info.protected == 0
    dymu.apply(model, [-math.inf] * 3)  # the language side too (tests/test_onevision.py)
    assert dymu.llava.get_vlm_patch(model) is not None
    assert dymu.encode(model, torch.randn(1, 3, 384, 384)).layer_tokens == [[365, 183, 92]]


def test_encode_rejects_wrong_pixels(clip):
    model, _ = clip
    with pytest.raises(dymu.DymuError, match="336x336"):
        dymu.encode(model, torch.randn(1, 3, 224, 224))
    with pytest.raises(dymu.DymuError, match="batch, 3, height, width"):
        dymu.encode(model, torch.randn(3, 336, 336))


def test_threshold_list_length_is_checked(clip):
    model, _ = clip
    with pytest.raises(dymu.ThresholdsError, match="4 layers"):
        dymu.apply(model, [0.5] * 3)


def test_thresholds_found_at_another_read_layer_are_refused():
    """The budgets are spread over the layers up to the read layer: a tower read at layer 3 needs its own thresholds."""
    model = _tiny_llava()
    tower = model.model.vision_tower
    x = torch.randn(2, 3, 336, 336)
    on_tower = dymu.find_thresholds(tower, x, target_tokens=300, progress=False, measure=0)
    on_vlm = dymu.find_thresholds(model, x, target_tokens=300, progress=False, measure=0)
    assert (tower_info(tower).read_layer, tower_info(model).read_layer) == (3, 2)
    with pytest.raises(dymu.ThresholdsError, match="read_layer=3.*read_layer=2"):
        dymu.apply(model, on_tower)
    assert not dymu.is_applied(model)
    with pytest.raises(dymu.ThresholdsError, match="read_layer=2.*read_layer=3"):
        dymu.apply(tower, on_vlm)
    dymu.apply(model, on_vlm)
    dymu.remove(model)
    dymu.apply(tower, on_tower)


def test_apply_checks_vtu_on_every_model(clip):
    model, _ = clip
    with pytest.raises(dymu.DymuError, match="vtu must be one of fast, exact, none, got 'fats'"):
        dymu.apply(model, [math.inf] * 4, vtu="fats")
    assert not dymu.is_applied(model)
