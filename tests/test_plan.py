"""The language-model token plan as data: policies written outside the package, per-step drops that shrink each
row's KV cache, printing, and the routes by which a plan could be lost (each works or raises one line)."""

import pytest
import torch

import dymu
from dymu import vtu as V
from dymu.compat import find_cache
from dymu.errors import DymuError
from dymu.llava import get_vlm_patch
from dymu.plan import Segment, TokenPlan
from dymu.policies import FastVPolicy
from dymu.methods import FastV

from .test_llava import IMAGE_TOKEN, MERGING, images, prompt, tiny_llava  # noqa: F401 (images: fixture)

LAYERS = 4
#: the test policy's edits: (decode step, batch row, from layer, image positions dropped, counted from the first image
#: position of the row)
DROPS = ((3, 0, 2, range(0, 300, 3)), (5, 1, 2, range(100, 500, 2)), (5, 0, 3, range(301, 400)))


class DropAtSteps:
    """A policy written outside the package: at given decode steps, drop given image positions of given rows from
    a given layer on (nothing at the prefill, no attention read)."""

    score_layers = ()
    decode_edits = True

    def __init__(self, drops):
        self.drops = drops  # (step, row, from layer, (batch, prompt) bool positions)

    def scores_at(self, plan):
        return {}

    def edit(self, plan, layer):
        for step, row, from_layer, positions in self.drops:
            if plan.step == step and layer == from_layer:
                plan.drop(positions, from_layer=from_layer)


def drop_masks(ids):
    """(step, row, from layer, (batch, prompt) bool) of DROPS for the prompts ``ids``."""
    out = []
    for step, row, layer, offsets in DROPS:
        first = int((ids[row] == IMAGE_TOKEN).nonzero()[0, 0])
        positions = torch.zeros(ids.shape, dtype=torch.bool)
        positions[row, [first + o for o in offsets]] = True
        out.append((step, row, layer, positions))
    return out


def brute_force(model, sequences, prompt_length, pixels, drops, merged):
    """The finished sequences recomputed without a cache on the stock modules (fp64): the image positions a drop names
    are hidden as keys, from its layer on, from every query computed at its decode step or later (the prefill is step 0
    and computes the prompt; step t computes position prompt + t - 1); with ``merged`` the prompt runs with VTU (the
    attention output of each merge group's positions is replaced by their mean before o_proj, the paper's fast path).
    Returns the logits of every position, (batch, n, vocab)."""
    base, lm = model.model, model.model.language_model
    batch, n = sequences.shape
    with torch.no_grad():
        features = list(base.get_image_features(pixel_values=pixels).pooler_output)  # the patched tower: merged groups
        hidden = base.get_input_embeddings()(sequences).masked_scatter((sequences == IMAGE_TOKEN)[..., None], torch.cat(features))
        positions = torch.arange(n)[None].expand(batch, -1)
        cos, sin = lm.rotary_emb(hidden, positions)
        step_of = (torch.arange(n) - prompt_length + 1).clamp_min(0)  # (n,) the step that computes each position
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        visible = [causal.expand(batch, n, n).clone() for _ in range(LAYERS)]
        for step, row, layer, dropped in drops:
            keys = torch.cat((dropped[row], torch.zeros(n - prompt_length, dtype=torch.bool)))
            for later in range(layer, LAYERS):
                visible[later][row][(step_of >= step)[:, None] & keys[None, :]] = False
        vmap = V.build_map(sequences == IMAGE_TOKEN, [f._dymu_source for f in features]) if merged else None
        handles = []
        if merged:
            def group_mean(module, args):
                return (V.expand(V.reduce(args[0], vmap), vmap),)

            handles = [layer.self_attn.o_proj.register_forward_pre_hook(group_mean) for layer in lm.layers]
        try:
            low = torch.finfo(hidden.dtype).min
            for index, layer in enumerate(lm.layers):
                mask = torch.zeros(batch, 1, n, n, dtype=hidden.dtype).masked_fill(~visible[index][:, None], low)
                hidden = layer(hidden, attention_mask=mask, position_embeddings=(cos, sin), position_ids=positions)
        finally:
            for handle in handles:
                handle.remove()
        return model.lm_head(lm.norm(hidden))


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "dtome-fast-vtu"])
@pytest.mark.parametrize("text", ["llama", "qwen2"])
def test_a_policy_written_in_a_test_equals_brute_force(merged, text, images):
    """Issue 22 test 2: per-row drops at decode steps 3 and 5 (different rows, positions and layers) == the uncached
    brute force at every step; each layer's KV cache holds per row what the plan says."""
    model = tiny_llava(layers=LAYERS, text=text).double()
    model.set_attn_implementation({"text_config": "eager", "vision_config": "sdpa"})
    pixels = images[:2].double()
    ids = torch.stack([prompt(5, 7, seed=21), prompt(5, 7, seed=22)])  # one length: no padding
    drops = drop_masks(ids)
    policy = DropAtSteps(drops)
    dymu.apply(model, MERGING if merged else None, vtu="fast", prune=policy)
    steps = 7
    with torch.no_grad():
        out = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=steps, min_new_tokens=steps,
                             do_sample=False, output_logits=True, return_dict_in_generate=True)
    n = ids.shape[1]
    language = get_vlm_patch(model).state.language
    plan = language.plan
    assert plan.step == steps - 1 and plan.generated == steps - 1
    cache = find_cache(out.values())
    dropped = {0: [0, 0, 100, 199], 1: [0, 0, 200, 200]}  # per row: image positions dropped at layers 0..3
    for layer in range(LAYERS):
        held = plan.keep_at(layer).sum(-1)
        assert held.tolist() == [n - dropped[row][layer] for row in range(2)]
        kept = plan.layout(layer)
        length = n if kept is None else kept.length
        assert length == n - min(dropped[row][layer] for row in range(2)), "rows are aligned to the longest"
        assert cache.get_seq_length(layer) == length + steps - 1
    reference = brute_force(model, out.sequences[:, :-1], n, pixels, drops, merged)
    torch.testing.assert_close(torch.stack(out.logits, dim=1).double(), reference[:, n - 1:], rtol=1e-5, atol=1e-5)
    # the drops change the answer's logits from the step they take effect: the test is not vacuous
    undropped = brute_force(model, out.sequences[:, :-1], n, pixels, [], merged)
    assert not torch.allclose(reference[:, n + 2:], undropped[:, n + 2:])
    torch.testing.assert_close(reference[:, : n + 2], undropped[:, : n + 2], rtol=1e-10, atol=1e-10)


def test_drops_are_checked(images):
    """An edit names (batch, prompt) positions, applies from the layer about to run on, never touches a newline."""
    image = torch.tensor([[False, True, True, False]])
    newline = torch.tensor([[False, False, False, True]])
    plan = TokenPlan.build(image, None, None, num_layers=3, newline=newline)
    plan.cursor = 1
    with pytest.raises(DymuError, match="from layer 0 at layer 1"):
        plan.drop(image, from_layer=0)
    with pytest.raises(DymuError, match="bool tensor"):
        plan.drop(image[0], from_layer=1)
    with pytest.raises(DymuError, match="newline positions are never dropped"):
        plan.drop(newline, from_layer=2)
    plan.drop(torch.tensor([[False, True, False, False]]), from_layer=2)
    plan.drop(torch.tensor([[False, False, True, False]]), from_layer=1)
    assert [plan.keep_at(layer).tolist() for layer in range(3)] == [
        [[True] * 4], [[True, True, False, True]], [[True, False, False, True]]]


def test_print_a_dtome_vtu_fastv_prefill_plan():
    """Issue 22 test 5: print(plan) of a tiny DToMe + VTU + FastV prefill against a hand-written expectation."""
    image = torch.tensor([[False, True, True, True, True, False, False, False],
                          [False, False, True, True, True, True, False, False]])
    padding = torch.tensor([[False] * 8, [True] + [False] * 7])
    sources = [torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 1, 1])]  # row 0: {1, 2} {3} {4}; row 1: {2} {3, 4, 5}
    vmap = V.build_map(image, sources, padding)
    plan = TokenPlan.build(image, padding, vmap, num_layers=4)
    policy = FastVPolicy(FastV(k=2, r=0.5), num_layers=4)
    assert policy.scores_at(plan) == {1: "last"}
    for layer, kind in policy.scores_at(plan).items():
        plan.layers[layer].scores = kind
    # attention the last query gave each position at layer 1: row 0 ranks {1, 2} (0.3) > {4} (0.2) > {3} (0.1)
    plan.scores[1] = torch.tensor([[0.1, 0.15, 0.15, 0.1, 0.2, 0.1, 0.1, 0.1],
                                   [0.0, 0.1, 0.05, 0.1, 0.1, 0.1, 0.25, 0.3]])
    plan.cursor = 2
    policy.edit(plan, 2)  # (row 0 is aligned to row 1 by a filler, which is computed: one more unique row)
    # row 0 keeps 3 - round(1.5) = 1 token: {1, 2}; row 1 keeps 2 - 1 = 1: {3, 4, 5} (0.3)
    assert plan.segments.tolist() == [[1, 2, 2, 2, 2, 4, 4, 4], [0, 1, 2, 2, 2, 2, 4, 4]]
    assert str(plan) == """TokenPlan: 2 row(s), prompt 8 positions, prefill
layer 0:
  row 0: system 1, image 4, instruction 3; cache 8; unique 7
  row 1: pad 1, system 1, image 4, instruction 2; cache 8; unique 6
layer 1 (scores: last):
  row 0: system 1, image 4, instruction 3; cache 8; unique 7
  row 1: pad 1, system 1, image 4, instruction 2; cache 8; unique 6
layers 2-3:
  row 0: system 1, image 2/4, instruction 3; cache 7 (1 filler); unique 6
  row 1: pad 1, system 1, image 3/4, instruction 2; cache 7; unique 5"""


def test_segments_of_a_prompt():
    """System before the first image, instruction after it (and text-only rows), padding, newlines."""
    image = torch.tensor([[False, True, False, True, False], [False, False, False, False, False]])
    padding = torch.tensor([[False] * 5, [True, False, False, False, False]])
    newline = torch.tensor([[False, False, True, False, False], [False] * 5])
    plan = TokenPlan.build(image, padding, None, num_layers=1, newline=newline)
    S = Segment
    assert plan.segments.tolist() == [[S.SYSTEM, S.IMAGE, S.NEWLINE, S.IMAGE, S.INSTRUCTION], [S.PAD] + [S.INSTRUCTION] * 4]


# ---------------------------------------------------------------------------------------------- routes (test 4)
def _routes_model(spec=None, vtu="fast", thresholds=MERGING):
    model = tiny_llava(layers=LAYERS).double()
    dymu.apply(model, thresholds, vtu=vtu, prune=spec)
    return model


def _generate(model, steps=3, **inputs):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)


@pytest.mark.parametrize("vtu, spec", [("fast", None), ("exact", None), ("fast", "fastv:k=2,r=0.5")])
def test_a_plain_forward_and_inputs_embeds_equal_the_generate_path(vtu, spec, images):
    """model(**inputs) and inputs_embeds given directly (forward and generate) equal the input_ids path."""
    model = _routes_model(spec, vtu)
    ids = prompt(4, 6, seed=31)[None]
    pixels = images[:1].double()
    with torch.no_grad():
        generated = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=3, min_new_tokens=3,
                                   do_sample=False, output_logits=True, return_dict_in_generate=True)
        forward = model(input_ids=ids, pixel_values=pixels).logits
        embeds = model.get_input_embeddings()(ids)
        from_embeds = model(inputs_embeds=embeds, pixel_values=pixels).logits
    torch.testing.assert_close(forward[:, -1].float(), generated.logits[0], rtol=1e-5, atol=1e-5)  # generate: fp32 logits
    torch.testing.assert_close(from_embeds, forward, rtol=1e-10, atol=1e-10)
    tokens = _generate(model, inputs_embeds=embeds, pixel_values=pixels)
    assert torch.equal(tokens[0, -3:], generated.sequences[0, -3:])
    # hidden states between layers are unique tokens under VTU: asking for them is refused, not answered wrongly
    with pytest.raises(DymuError, match="output_hidden_states with VTU"), torch.no_grad():
        model(input_ids=ids, pixel_values=pixels, output_hidden_states=True)


def test_copied_or_chunked_features_raise_instead_of_dropping_vtu(images):
    """Features that lost their merge groups (a copy; generate's chunked prefill splits them) raise one line."""
    model = _routes_model()
    ids = prompt(4, 6, seed=32)[None]
    pixels = images[:1].double()
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=pixels)
    copied = type(features)(pooler_output=[f.clone() for f in features.pooler_output])
    with pytest.raises(DymuError, match="without their merge groups"):
        with torch.no_grad():
            model(input_ids=ids, mm_encoder_outputs={"image": copied})
    with pytest.raises(DymuError, match="without their merge groups|no image reached the model"):
        _generate(model, input_ids=ids, mm_encoder_outputs={"image": features}, prefill_chunk_size=128)
    # the features dymu returned, in one prefill, are the pixel_values path
    expected = _generate(model, input_ids=ids, pixel_values=pixels)
    assert torch.equal(_generate(model, input_ids=ids, mm_encoder_outputs={"image": features}), expected)


def test_chunked_prefill_without_merging_or_pruning_is_the_stock_model(images):
    """With nothing to change in the language model, chunked prefill is stock generate where transformers passes each
    chunk its features (5.24); where it drops them (older releases; the stock model then answers without the image)
    dymu raises one line."""
    model = _routes_model(thresholds=None)
    ids = prompt(4, 6, seed=33)[None]
    pixels = images[:1].double()
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=pixels)
    expected = _generate(model, input_ids=ids, pixel_values=pixels)
    try:
        chunked = _generate(model, input_ids=ids, mm_encoder_outputs={"image": features}, prefill_chunk_size=128)
    except DymuError as error:
        assert "no image reached the model" in str(error) and "\n" not in str(error)
    else:
        assert torch.equal(chunked, expected)
    pruned = _routes_model("fastv:k=2,r=0.5", thresholds=None)
    with pytest.raises(DymuError, match="empty KV cache at the prefill|no image reached the model"):
        _generate(pruned, input_ids=ids, mm_encoder_outputs={"image": features}, prefill_chunk_size=128)


def test_static_cache_and_assisted_decoding(images):
    """A static cache: fast VTU works (== the dynamic cache), exact VTU and pruning raise one line naming it.
    Assisted decoding (prompt lookup): VTU works (== greedy), pruning raises."""
    ids = prompt(4, 6, seed=34)[None]
    pixels = images[:1].double()
    fast = _routes_model()
    expected = _generate(fast, input_ids=ids, pixel_values=pixels)
    assert torch.equal(_generate(fast, input_ids=ids, pixel_values=pixels, cache_implementation="static"), expected)
    assert torch.equal(_generate(fast, input_ids=ids, pixel_values=pixels, prompt_lookup_num_tokens=2), expected)
    with pytest.raises(DymuError, match="StaticCache"):
        _generate(_routes_model(vtu="exact"), input_ids=ids, pixel_values=pixels, cache_implementation="static")
    pruned = _routes_model("fastv:k=2,r=0.5")
    with pytest.raises(DymuError, match="StaticCache"):
        _generate(pruned, input_ids=ids, pixel_values=pixels, cache_implementation="static")
    with pytest.raises(DymuError, match="prompt_lookup_num_tokens"):
        _generate(pruned, input_ids=ids, pixel_values=pixels, prompt_lookup_num_tokens=2)


def full_length_vtu(model, ids, pixels, plan):
    """VTU computed the long way on the stock modules (one prompt, fp64): every layer runs at full length over the
    positions the plan holds, each merge group's attention output replaced by its mean before o_proj (the groups
    restricted to the held positions after a drop)."""
    base, lm = model.model, model.model.language_model
    n = ids.shape[1]
    with torch.no_grad():
        features = list(base.get_image_features(pixel_values=pixels).pooler_output)
        hidden = base.get_input_embeddings()(ids).masked_scatter((ids == IMAGE_TOKEN)[..., None], torch.cat(features))
        positions = torch.arange(n)
        cos, sin = lm.rotary_emb(hidden, positions[None])
        groups = V.build_map(ids == IMAGE_TOKEN, [f._dymu_source for f in features])
        held = positions
        low = torch.finfo(hidden.dtype).min
        for index, layer in enumerate(lm.layers):
            keep = plan.keep_at(index)[0].nonzero()[:, 0]
            if len(keep) != len(held):
                hidden = hidden[:, torch.searchsorted(held, keep)]
                held = keep
            vmap = groups if len(held) == n else V.restrict(groups, held[None], torch.zeros(1, len(held), dtype=torch.bool))
            handle = layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a, vmap=vmap: (V.expand(V.reduce(a[0], vmap), vmap),))
            mask = torch.zeros(len(held), len(held), dtype=hidden.dtype).masked_fill(held[None, :] > held[:, None], low)
            try:
                hidden = layer(hidden, attention_mask=mask[None, None], position_embeddings=(cos[:, held], sin[:, held]),
                               position_ids=held[None])
            finally:
                handle.remove()
        return model.lm_head(lm.norm(hidden))


@pytest.mark.parametrize("text", ["llama", "qwen2"])
@pytest.mark.parametrize("spec", [None, "fastv:k=2,r=0.5", "vtw:k=3"])
def test_unique_token_space_equals_the_full_length_computation(spec, text, images):
    """Issue 22 test 3: fast VTU with the residual stream, norms and MLP on the unique tokens equals VTU computed at
    full length (1e-10, fp64), alone and with FastV / VTW on top."""
    from dymu.llava import last_prefill_plan

    model = tiny_llava(layers=LAYERS, text=text).double()
    model.set_attn_implementation({"text_config": "eager", "vision_config": "sdpa"})
    dymu.apply(model, MERGING, vtu="fast", prune=spec)
    ids = prompt(5, 7, seed=41)[None]
    pixels = images[1:2].double()
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=pixels).logits
    plan = last_prefill_plan(model)
    assert int(plan.vmap.unique_lengths[0]) < ids.shape[1] // 2, "the image must really be merged"
    torch.testing.assert_close(logits, full_length_vtu(model, ids, pixels, plan), rtol=1e-10, atol=1e-10)


def test_specs_that_cannot_act_are_refused_naming_the_depth(images, model_dirs):
    """Issue 23 item 13: a spec acting from a layer the model does not have, VTU modes on a model without a language
    side, are one-line errors."""
    from dymu.models import load_model

    for spec in ("fastv:k=99,r=0.5", "vtw:k=99", "vtw", f"vtw:k={LAYERS}"):
        with pytest.raises(DymuError, match=f"the language model has {LAYERS} layers"):
            dymu.apply(tiny_llava(layers=LAYERS), None, prune=spec)
    clip = load_model(model_dirs["tiny-clip"])
    for vtu in ("exact", "none"):
        with pytest.raises(DymuError, match=f"vtu='{vtu}' acts in the language model"):
            dymu.apply(clip, None, vtu=vtu)
    dymu.apply(clip, None)  # the default stays accepted


def test_beam_search_with_a_policy_that_edits_rows_at_decode_steps_is_refused(images):
    """Beam search reorders rows; a plan whose rows differ after decode-step drops cannot follow: one line."""
    model = tiny_llava(layers=LAYERS).double()
    ids = torch.stack([prompt(5, 7, seed=23), prompt(5, 7, seed=24)])
    dymu.apply(model, None, prune=DropAtSteps(drop_masks(ids)))
    with pytest.raises(DymuError, match="beam search reorders rows: use num_beams=1"):
        _generate(model, input_ids=ids, pixel_values=images[:2].double(), num_beams=2)
