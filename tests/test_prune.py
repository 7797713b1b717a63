"""FastV and VTW in the language model (spec decoder_pruning_spec.md §2-3, oracles §7), alone and with DToMe + VTU."""

import math

import pytest
import torch

import dymu
from dymu import prune as P
from dymu.compat import find_cache
from dymu.methods import VTW, FastV
from dymu.policies import FastVPolicy, VTWPolicy
from dymu.llava import get_vlm_patch

from .test_llava import (IMAGE_TOKEN, MERGING, PATCHES, TEXT_MODELS, images, left_pad, prompt,  # noqa: F401 (images)
                         tiny_llava)

LAYERS = 4


def model_with(layers=LAYERS, dtype=torch.float64, attention="sdpa", text="llama"):
    model = tiny_llava(layers=layers, text=text).to(dtype)
    model.set_attn_implementation({"text_config": attention, "vision_config": "sdpa"})
    return model


def run(model, ids, mask, pixels):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, use_cache=True)
    return out.logits, find_cache(out.values())


def greedy(model, ids, mask, pixels, steps=4):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=steps, do_sample=False)


def language(model):
    return get_vlm_patch(model).state.language


def prefill_plan(model):
    return get_vlm_patch(model).state.language.last_prefill_plan


@pytest.mark.parametrize("thresholds, vtu", [(None, "fast"), (MERGING, "fast"), (MERGING, "exact"), (MERGING, "none")],
                         ids=["unmerged", "dtome-fast", "dtome-exact", "dtome-compact"])
@pytest.mark.parametrize("spec", ["fastv:k=2,r=0", "fastv:k=2,r=0,rerank=step", "fastv:k=1,r=0,score=all",
                                  FastVPolicy(FastV(k=LAYERS, r=0.5), LAYERS), VTWPolicy(VTW(k=LAYERS), LAYERS)],
                         ids=str)  # k >= the depth: built as policies (dymu.apply refuses such a spec, it changes nothing)
@pytest.mark.parametrize("text", TEXT_MODELS)
def test_pruning_that_keeps_everything_is_the_model_without_it(spec, thresholds, vtu, text, images):
    """Oracle 1: FastV r=0, FastV / VTW with k >= layers equal the model without pruning (logits, greedy tokens)."""
    model = model_with(text=text)
    pixels = images[:2].double()
    rows = [prompt(5, 7, seed=1), prompt(2, 4, seed=2)]
    ids, mask = left_pad(rows)
    if vtu == "none":
        return _compact_case(spec)
    dymu.apply(model, thresholds, vtu=vtu)
    reference, _ = run(model, ids, mask, pixels)
    reference_tokens = greedy(model, ids, mask, pixels)
    dymu.apply(model, thresholds, vtu=vtu, prune=spec)
    logits, _ = run(model, ids, mask, pixels)
    real = mask.bool()
    torch.testing.assert_close(logits[real], reference[real], rtol=1e-10, atol=1e-10)
    assert torch.equal(greedy(model, ids, mask, pixels), reference_tokens)


def _compact_case(spec):
    from dymu.models import build_llava_preset  # a real processor for dymu.prepare_inputs

    from dymu.data import bundled_image

    model, processor = build_llava_preset("tiny-llava", layers=LAYERS)
    model = model.double()

    photos = [bundled_image("checkerboard"), bundled_image("coins")]
    texts = ["USER: <image>\nWhat is it? ASSISTANT:", "USER: <image>\nHow many coins are there here? ASSISTANT:"]
    dymu.apply(model, MERGING, vtu="none")
    inputs = dymu.prepare_inputs(model, processor, photos, texts)
    inputs["mm_encoder_outputs"]["image"].pooler_output = [f.double() for f in inputs["mm_encoder_outputs"]["image"].pooler_output]
    with torch.no_grad():
        reference = model(**inputs).logits
    dymu.apply(model, MERGING, vtu="none", prune=spec)
    with torch.no_grad():
        logits = model(**inputs).logits
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(logits[real], reference[real], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("thresholds, vtu", [(None, "fast"), (MERGING, "fast"), (MERGING, "exact")])
@pytest.mark.parametrize("text", TEXT_MODELS)
def test_vtw_equals_fastv_dropping_everything(thresholds, vtu, text, images):
    """Oracle 2: VTW(k) == FastV(k, r=1)."""
    model = model_with(text=text)
    ids, mask = left_pad([prompt(5, 7, seed=3), prompt(2, 4, seed=4)])
    pixels = images[:2].double()
    dymu.apply(model, thresholds, vtu=vtu, prune="vtw:k=2")
    vtw, vtw_cache = run(model, ids, mask, pixels)
    dymu.apply(model, thresholds, vtu=vtu, prune="fastv:k=2,r=1")
    fastv, fastv_cache = run(model, ids, mask, pixels)
    torch.testing.assert_close(fastv, vtw, rtol=1e-12, atol=1e-12)
    for layer in range(LAYERS):
        assert fastv_cache.get_seq_length(layer) == vtw_cache.get_seq_length(layer)
    text = ids.shape[1] - PATCHES  # every row keeps its text (and its padding)
    assert [vtw_cache.get_seq_length(layer) for layer in range(LAYERS)] == [ids.shape[1]] * 2 + [text] * 2


def brute_force_fastv(model, ids, pixels, k, r):
    """FastV written out by hand on the stock modules (one prompt, no cache, fp64): layers < k on every token; the
    last query's attention at layer k-1, mean over heads, ranks the image tokens; the lowest fraction r are removed
    from the hidden states, RoPE tables and causal mask; the remaining layers, final norm and head."""
    base, lm = model.model, model.model.language_model
    with torch.no_grad():
        features = torch.cat(list(base.get_image_features(pixel_values=pixels).pooler_output))
        hidden = base.get_input_embeddings()(ids).masked_scatter((ids == IMAGE_TOKEN)[..., None], features)  # (1, n, d)
        n = ids.shape[1]
        positions = torch.arange(n)[None]
        cos, sin = lm.rotary_emb(hidden, positions)
        causal = torch.full((n, n), torch.finfo(hidden.dtype).min, dtype=hidden.dtype).triu(1)[None, None]
        captured = {}

        def keep_weights(module, args, kwargs, output):
            captured["weights"] = output[1]  # (1, heads, n, n): eager attention probabilities

        handle = lm.layers[k - 1].self_attn.register_forward_hook(keep_weights, with_kwargs=True)
        for layer in lm.layers[:k]:
            hidden = layer(hidden, attention_mask=causal, position_embeddings=(cos, sin), position_ids=positions)
        handle.remove()
        scores = captured["weights"][0, :, -1].mean(0)  # (n,)
        image = (ids[0] == IMAGE_TOKEN).nonzero()[:, 0]
        keep_images = PATCHES - round(PATCHES * r)
        chosen = image[torch.sort(scores[image], descending=True, stable=True).indices[:keep_images]]
        keep = torch.sort(torch.cat(((ids[0] != IMAGE_TOKEN).nonzero()[:, 0], chosen))).values
        hidden, cos, sin, positions = hidden[:, keep], cos[:, keep], sin[:, keep], positions[:, keep]
        causal = causal[:, :, keep][:, :, :, keep]
        for layer in lm.layers[k:]:
            hidden = layer(hidden, attention_mask=causal, position_embeddings=(cos, sin), position_ids=positions)
        return model.lm_head(lm.norm(hidden)), keep


@pytest.mark.parametrize("k, r, text", [(1, 0.5, "llama"), (2, 0.75, "llama"), (3, 0.25, "llama"), (2, 0.5, "qwen2")])
def test_fastv_equals_a_brute_force_reference(k, r, text, images):
    """Oracle 3, with F4: the kept set is every text position plus N - round(rN) image positions, ascending."""
    model = model_with(attention="eager", text=text)
    ids = prompt(6, 9, seed=5)[None]
    pixels = images[1:2].double()
    reference, keep = brute_force_fastv(model, ids, pixels, k, r)
    dymu.apply(model, None, prune=f"fastv:k={k},r={r}")
    logits, cache = run(model, ids, torch.ones_like(ids), pixels)
    kept = prefill_plan(model).layout(k)
    assert torch.equal(kept.positions[0], keep) and not bool(kept.filler.any())
    assert int(kept.image_tokens[0]) == PATCHES - round(PATCHES * r)
    torch.testing.assert_close(logits, reference, rtol=1e-10, atol=1e-10)
    assert [cache.get_seq_length(layer) for layer in range(LAYERS)] == [ids.shape[1]] * k + [len(keep)] * (LAYERS - k)


def test_scores_equal_the_eager_attention_weights(images):
    """The kernel's scores (sdpa runs the attention itself) equal the eager attention probabilities of layer k-1:
    the last query's, mean over heads (score=last), and every query's mean (score=all)."""
    model = model_with(attention="eager")
    ids = prompt(4, 5, seed=6)[None]
    pixels = images[:1].double()
    with torch.no_grad():
        weights = model(input_ids=ids, pixel_values=pixels, output_attentions=True).attentions[1]  # (1, heads, n, n)
    expected = {"last": weights[:, :, -1].mean(1), "all": weights.mean(dim=(1, 2))}
    model.set_attn_implementation({"text_config": "sdpa"})
    for score, name in (("last", "last_query_scores"), ("all", "all_query_scores")):
        captured, original = {}, getattr(P, name)

        def spy(*args, **kwargs):
            captured["scores"] = original(*args, **kwargs)
            return captured["scores"]

        setattr(P, name, spy)
        try:
            dymu.apply(model, None, prune=f"fastv:k=2,r=0.5,score={score}")
            run(model, ids, torch.ones_like(ids), pixels)
        finally:
            setattr(P, name, original)
            dymu.remove(model)
        torch.testing.assert_close(captured["scores"], expected[score], rtol=1e-6, atol=1e-9)  # eager softmax: fp32


@pytest.mark.parametrize("thresholds, vtu, spec", [(None, "fast", "fastv:k=2,r=0.5"), (MERGING, "fast", "fastv:k=1,r=0.5"),
                                                  (MERGING, "exact", "fastv:k=2,r=0.75"), (MERGING, "fast", "vtw:k=2")])
@pytest.mark.parametrize("text", TEXT_MODELS)
def test_cached_generation_equals_recomputing_the_finished_sequence(thresholds, vtu, spec, text, images):
    """Oracle 4 (F6 / V2): greedy tokens from cached decoding == one uncached forward over the finished sequence
    with the prefill's kept set frozen (generated tokens kept at every layer)."""
    model = model_with(text=text)
    rows = [prompt(5, 7, seed=7), prompt(2, 4, seed=8)]
    ids, mask = left_pad(rows)
    pixels = images[:2].double()
    dymu.apply(model, thresholds, vtu=vtu, prune=spec)
    steps = 4
    tokens = greedy(model, ids, mask, pixels, steps)
    k, n = int(spec.split("k=")[1].split(",")[0]), ids.shape[1]
    dropped = prefill_plan(model).image & ~prefill_plan(model).keep_at(k)  # (batch, prompt)
    language(model).policy = Replay(k, torch.cat((dropped, dropped.new_zeros(2, steps - 1)), dim=1))
    full_mask = torch.cat((mask, torch.ones(2, steps - 1, dtype=mask.dtype)), dim=1)
    with torch.no_grad():
        logits = model(input_ids=tokens[:, :-1], attention_mask=full_mask, pixel_values=pixels).logits
    assert torch.equal(logits[:, -steps:].argmax(-1), tokens[:, n:])


class Replay:
    """A policy that drops given positions from layer k on at the prefill (a frozen choice)."""

    score_layers = ()
    decode_edits = False

    def __init__(self, k, dropped):
        self.k, self.dropped = k, dropped

    def scores_at(self, plan):
        return {}

    def edit(self, plan, layer):
        if plan.step == 0 and layer == self.k:
            plan.drop(self.dropped, from_layer=self.k)


@pytest.mark.parametrize("text", TEXT_MODELS)
def test_batch_equals_each_prompt_alone_with_dtome_vtu_and_fastv(text, images):
    """Oracle 7: different token counts per image (fillers align the rows), left padding, beam search runs."""
    model = model_with(text=text)
    pixels = images.double()
    dymu.apply(model, MERGING, vtu="fast", prune="fastv:k=2,r=0.5")
    assert len(set(dymu.encode(model, pixels).num_tokens)) == 3
    rows = [prompt(5, 7, seed=9), prompt(2, 4, seed=10), prompt(9, 3, seed=11)]
    ids, mask = left_pad(rows)
    batched, cache = run(model, ids, mask, pixels)
    kept = prefill_plan(model).layout(2)
    assert bool(kept.filler.any()), "rows keep different numbers of positions"
    batched_tokens = greedy(model, ids, mask, pixels, steps=5)
    for i, row in enumerate(rows):
        alone, _ = run(model, row[None], torch.ones(1, len(row), dtype=torch.long), pixels[i : i + 1])
        # Llama's RMSNorm computes in fp32 even in an fp64 model: batch and alone round differently at ~1e-7
        torch.testing.assert_close(batched[i, -1], alone[0, -1], rtol=1e-5, atol=1e-7)
        alone_tokens = greedy(model, row[None], torch.ones(1, len(row), dtype=torch.long), pixels[i : i + 1], steps=5)
        assert torch.equal(batched_tokens[i, -5:], alone_tokens[0, -5:])
    beams = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=3, num_beams=2)
    assert beams.shape == (3, ids.shape[1] + 3)


def test_text_only_prompts_and_random_ranking(images):
    """F10: without images nothing is pruned. F8: k=0 ranks at random, reproducibly."""
    model = model_with()
    text = torch.randint(2, 90, (1, 12))
    with torch.no_grad():
        reference = model(input_ids=text).logits
    dymu.apply(model, None, prune="fastv:k=2,r=0.5")
    with torch.no_grad():
        assert torch.equal(model(input_ids=text).logits, reference)
    dymu.apply(model, None, prune="fastv:k=0,r=0.5")
    ids = prompt(3, 4, seed=12)[None]
    first, _ = run(model, ids, torch.ones_like(ids), images[:1].double())
    first_kept = prefill_plan(model).layout(0).positions.clone()
    second, _ = run(model, ids, torch.ones_like(ids), images[:1].double())
    assert torch.equal(first, second) and torch.equal(prefill_plan(model).layout(0).positions, first_kept)
    assert int(prefill_plan(model).layout(0).image_tokens[0]) == PATCHES // 2


def test_select_handles_groups_ties_and_rows():
    """VTU groups are ranked and dropped whole; ties keep the earlier token; rows are front-filled."""
    image = torch.tensor([[False, True, True, True, True, False], [False, False, True, True, True, True]])
    token_of = torch.tensor([[0, 1, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5]])  # row 0: positions 1-2 are one merged token
    scores = torch.tensor([[0.0, 0.1, 0.1, 0.15, 0.3, 0.0], [0.0, 0.0, 0.2, 0.2, 0.1, 0.4]])
    kept = P.select(scores, image, 0.5, token_of)
    # row 0: tokens 1 (0.2 summed), 2 (0.15), 3 (0.3): keep 3 - round(1.5) = 1 -> token 3 (position 4)
    # row 1: tokens 2 (0.2), 3 (0.2), 4 (0.1), 5 (0.4): keep 2 -> tokens 5 and 2 (tie with 3: the earlier wins)
    assert kept.image_tokens.tolist() == [1, 2]
    assert kept.positions.tolist() == [[0, 0, 4, 5], [0, 1, 2, 5]]
    assert kept.filler.tolist() == [[True, False, False, False], [False, False, False, False]]
    assert math.isclose(float(P.kept_count(torch.tensor([576]), 0.5)), 288)


def brute_force_rerank(model, sequence, prompt_length, pixels, k, r):
    """FastV's per-step variant written out by hand (one sequence, no cache, fp64): every position stays; at layers
    >= k each query row sees only the image keys its selection keeps (the prompt rows: the last prompt token's
    selection; a generated row: its own), ranked by that row's layer k-1 attention, mean over heads; a hidden image
    key stays visible to its own row. Returns the logits of every position."""
    base, lm = model.model, model.model.language_model
    with torch.no_grad():
        features = torch.cat(list(base.get_image_features(pixel_values=pixels).pooler_output))
        ids = sequence[None]
        hidden = base.get_input_embeddings()(ids).masked_scatter((ids == IMAGE_TOKEN)[..., None], features)
        n = ids.shape[1]
        positions = torch.arange(n)[None]
        cos, sin = lm.rotary_emb(hidden, positions)
        low = torch.finfo(hidden.dtype).min
        causal = torch.full((n, n), low, dtype=hidden.dtype).triu(1)
        captured = {}

        def keep_weights(module, args, kwargs, output):
            captured["weights"] = output[1]  # (1, heads, n, n): eager attention probabilities

        handle = lm.layers[k - 1].self_attn.register_forward_hook(keep_weights, with_kwargs=True)
        for layer in lm.layers[:k]:
            hidden = layer(hidden, attention_mask=causal[None, None], position_embeddings=(cos, sin), position_ids=positions)
        handle.remove()
        attention = captured["weights"][0].mean(0)  # (n, n)
        image = (sequence == IMAGE_TOKEN).nonzero()[:, 0]
        keep = PATCHES - round(PATCHES * r)
        pruned = causal.clone()
        for row in range(n):
            chooser = max(row, prompt_length - 1)
            chosen = image[torch.sort(attention[chooser, image], descending=True, stable=True).indices[:keep]]
            hidden_keys = image[~torch.isin(image, chosen)]
            pruned[row, hidden_keys[hidden_keys != row]] = low
        for layer in lm.layers[k:]:
            hidden = layer(hidden, attention_mask=pruned[None, None], position_embeddings=(cos, sin), position_ids=positions)
        return model.lm_head(lm.norm(hidden))[0]


def test_per_step_reranking_equals_a_brute_force_reference(images):
    """rerank=step (FastV's mask variant with a cache): greedy decoding equals the per-row reference, and every
    layer's cache keeps the whole sequence."""
    model = model_with(attention="eager")
    ids = prompt(6, 9, seed=13)[None]
    pixels = images[2:3].double()
    dymu.apply(model, None, prune="fastv:k=2,r=0.75,rerank=step")
    steps = 5
    with torch.no_grad():
        generated = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=steps, do_sample=False,
                                   output_logits=True, return_dict_in_generate=True)
        last_step_choice = language(model).plan.layers[2].hidden.clone()  # the last decode step's hidden keys
        out = model(input_ids=ids, pixel_values=pixels, use_cache=True)
    prefill_choice = prefill_plan(model).layers[2].hidden
    first_choice = last_step_choice
    assert not torch.equal(first_choice, prefill_choice), "decode steps must have re-chosen the image keys"
    tokens = generated.sequences[0]
    dymu.remove(model)
    reference = brute_force_rerank(model, tokens[:-1], ids.shape[1], pixels, k=2, r=0.75)
    n = ids.shape[1]
    torch.testing.assert_close(torch.cat(generated.logits).double(), reference[n - 1:], rtol=1e-5, atol=1e-6)  # generate keeps fp32 logits
    cache = find_cache(out.values())
    assert [cache.get_seq_length(layer) for layer in range(LAYERS)] == [n] * LAYERS
    torch.testing.assert_close(out.logits[0], reference[:n], rtol=1e-10, atol=1e-10)
