"""The toy-model training pipeline runs end to end on a tiny config and saves a loadable checkpoint."""

import json

import numpy as np
import pytest
import torch

from tests import toyvlm_runs
from tests.toyvlm_runs import assert_same_run, killed_and_resumed
from toyvlm import train as T
from toyvlm.cider import ptb_tokenize
from toyvlm.data import COLOURS, LABEL_LETTERS, QA, QUESTION_KINDS, SHAPES, Obj, Scene, candidate_questions, make_split


def test_tokenizer_covers_the_task_vocabulary():
    tokenizer = T.build_tokenizer()
    text = "USER: <image><image>\nWhat colour is the triangle? ASSISTANT: purple"
    ids = tokenizer(text).input_ids
    assert tokenizer.unk_token_id not in ids
    for example in make_split("test", 1, 200, 64):  # scenes the vocabulary was not built from
        for description in example.descriptions + [example.describe_prompt]:
            assert tokenizer.unk_token_id not in tokenizer(description).input_ids, description
        words = tokenizer(example.descriptions[0], add_special_tokens=False).input_ids
        assert len(words) + 1 <= T.MAX_DESCRIPTION_TOKENS  # with </s>
        assert ptb_tokenize(tokenizer.decode(words)) == ptb_tokenize(example.descriptions[0])  # decoding keeps the score
    assert ids.count(tokenizer.convert_tokens_to_ids("<image>")) == 2
    assert tokenizer.decode(tokenizer("left", add_special_tokens=False).input_ids) == "left"


def test_conversation_supervises_every_answer_and_nothing_else():
    tokenizer = T.build_tokenizer()
    qas = [QA("How many objects are there?", "three", "count"), QA("Is there a red circle?", "no", "exists"),
           QA("What colour is the square?", "blue", "colour")]
    ids, labels = T.ConversationEncoder(tokenizer, 4)(qas)
    assert len(ids) == len(labels)
    first = tokenizer(T.PROMPT.format(question=qas[0].question).replace("<image>", "<image>" * 4)).input_ids
    assert ids[: len(first)] == first  # the first turn is exactly the evaluation prompt
    supervised = [token for token in labels if token != T.IGNORE_INDEX]
    expected = []
    for qa in qas:
        expected += tokenizer(qa.answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    assert supervised == expected
    assert tokenizer.decode(ids, skip_special_tokens=False).count("assistant :") == 3
    input_ids, mask, target = T.pad_batch([(ids, labels), (ids[:10], labels[:10])], tokenizer.pad_token_id)
    assert input_ids.shape == (2, len(ids)) and int(mask[1].sum()) == 10 and (target[1, 10:] == T.IGNORE_INDEX).all()


def test_training_loss_equals_the_stock_forward_on_single_turns():
    """The training path (tower run to the read layer, features scattered into the embeddings) is the stock
    LlavaForConditionalGeneration forward."""
    config = T.TrainConfig(image_size=64, patch_size=16, vision_hidden=32, vision_layers=3, vision_heads=2, text_hidden=32,
                           text_layers=1, text_heads=2, text_kv_heads=1)
    tokenizer = T.build_tokenizer()
    model, _ = T.build_model(config, tokenizer)
    examples = make_split("train", 0, 3, 64, per_kind=0)
    pixels, targets, _ = T.render_split(examples, 64, 16)
    encoder = T.ConversationEncoder(tokenizer, 16)
    rows = [encoder([qa]) for qa in (QA("How many objects are there?", "two", "count"), QA("Is there a red circle?", "no", "exists"),
                                     QA("What letter is written on the blue square?", "k", "detail"))]
    input_ids, mask, labels = T.pad_batch(rows, tokenizer.pad_token_id)
    losses = T.training_loss(model, T.AuxiliaryHead(32, 4), T.normalize(pixels), input_ids, mask, labels, targets)
    loss, aux, point = losses["lm"], losses["aux"], losses["point"]
    stock = model(input_ids=input_ids, attention_mask=mask, labels=labels, pixel_values=T.normalize(pixels)).loss
    torch.testing.assert_close(loss, stock, rtol=1e-6, atol=1e-6)
    assert torch.isfinite(aux) and point == 0


def test_patch_targets_hand_checked():
    # 192 px / 16 = 12x12 patches; reference canvas 224 -> scale 192/224
    square = Obj("square", "red", "large", 112, 112, label="K")  # centre (96, 96) px -> patch (6, 6); covers x,y 73.7..118.3 px
    circle = Obj("circle", "blue", "small", 30, 200)  # centre (25.7, 171.4) px -> patch row 10, column 1
    scene = Scene("flat", {"colour": (128, 128, 128)}, [square, circle])
    targets = T.patch_targets(scene, 192, 16).reshape(len(T.AUX_CLASSES) + 2, 12, 12)
    colour, shape, centre, letter, row, column = targets
    assert row[3, 7] == 3 and column[3, 7] == 7
    red, blue = COLOURS.index("red") + 1, COLOURS.index("blue") + 1
    assert colour[6, 6] == red and shape[6, 6] == SHAPES.index("square") + 1
    assert (colour[5:7, 5:7] == red).all()  # patches 5..6 lie fully inside 73.7..118.3 px
    assert colour[0, 0] == 0 and colour[6, 9] == 0  # background
    assert colour[10, 1] == blue and shape[10, 1] == SHAPES.index("circle") + 1
    assert centre[6, 6] == SHAPES.index("square") + 1 and centre[10, 1] == SHAPES.index("circle") + 1
    assert int((centre > 0).sum()) == 2
    assert letter[6, 6] == LABEL_LETTERS.index("K") + 1 and int((letter > 0).sum()) == 1


def test_sample_turns_oversample_no_questions_whose_shape_is_in_the_scene():
    scene = Scene("flat", {"colour": (128, 128, 128)}, [Obj("circle", "red", "small", 40, 40)])
    # "no" candidates: 5 other-colour circles (hard) and 18 other shapes (easy); natural hard share 5 / 23
    rng = np.random.default_rng(0)
    hard = {"no": 0, "hard": 0}
    for _ in range(400):
        for qa in T.sample_turns(scene, rng, 1, hard_no_share=0.8):
            if qa.kind == "exists" and qa.answer == "no":
                hard["no"] += 1
                hard["hard"] += qa.question.endswith("circle?")
    assert hard["no"] > 50 and 0.7 < hard["hard"] / hard["no"] < 0.9
    uniform = [qa for _ in range(400) for qa in T.sample_turns(scene, rng, 1)
               if qa.kind == "exists" and qa.answer == "no"]
    assert sum(qa.question.endswith("circle?") for qa in uniform) / len(uniform) < 0.4


def test_sample_turns_are_distinct_valid_and_cover_kinds():
    rng = np.random.default_rng(0)
    seen = set()
    for example in make_split("train", 0, 40, 64, per_kind=0):
        valid = {(qa.question, qa.answer) for qas in candidate_questions(example.scene).values() for qa in qas}
        turns = T.sample_turns(example.scene, rng, 6, hard_no_share=0.8)
        assert len(turns) == 6 and len({qa.question for qa in turns}) == 6
        assert all((qa.question, qa.answer) in valid for qa in turns)
        seen.update(qa.kind for qa in turns)
    assert seen == set(QUESTION_KINDS)


def test_scene_stream_renders_the_train_split_in_order_each_scene_once():
    stream = T.SceneStream(seed=0, image_size=64, patch_size=16)
    split = make_split("train", 0, 12, 64, per_kind=0)
    scenes, pixels, targets, objects = stream.draw(None, 3)
    more, _, _, _ = stream.draw(None, 2, max_objects=3)
    assert scenes == [e.scene for e in split[:3]]
    small = [e.scene for e in split[3:] if len(e.scene.objects) <= 3][:2]
    assert more == small and stream.next_index == [e.scene for e in split].index(small[-1]) + 1
    reference = T.render_split(split[:3], 64, 16)
    for got, expected in zip((pixels, targets, objects), reference):
        assert torch.equal(got, expected)


TINY = T.TrainConfig(image_size=64, patch_size=16, vision_hidden=32, vision_layers=2, vision_heads=2, text_hidden=32,
                     text_layers=1, text_heads=4, text_kv_heads=1, val_scenes=3, steps=4, describe_rows=2,
                     batch_size=4, warmup_steps=1, turns=3, eval_every=2, eval_scenes=2,
                     point_layer=0, point_heads=1, tower_steps=2, tower_batch_size=4, locate_weight=1.0,
                     tally_weight=1.0, readout_start=2)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """(output folder, summary) of an uninterrupted training with the TINY config."""
    return toyvlm_runs.tiny_run(tmp_path_factory, TINY, "tiny")


def test_training_runs_end_to_end_and_saves_a_checkpoint(tiny_run):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    out, summary = tiny_run
    # the read-outs join at readout_start (tally only on batches with a count answer)
    assert [e["locate_loss"] > 0 for e in summary["log"]] == [False, False, True, True]
    assert all(e["tally_loss"] == 0 for e in summary["log"][:2])
    assert len(summary["log"]) == 4 and all(torch.isfinite(torch.tensor(e["loss"])) for e in summary["log"])
    assert len(summary["evaluations"]) == 1 and torch.isfinite(torch.tensor(summary["log"][0]["aux_loss"]))
    assert all(e["point_loss"] > 0 for e in summary["log"])  # every batch of 4 x 3 turns names some object
    assert all(e["align_loss"] > 0 for e in summary["log"]) and any(e["count_loss"] > 0 for e in summary["log"])
    assert [e["step"] for e in summary["tower_log"]] == [0, 1] and all(e["aux_loss"] > 0 for e in summary["tower_log"])
    assert summary["validation"]["questions"] > 0 and 0.0 <= summary["validation"]["overall"] <= 1.0
    describe = summary["validation"]["describe"]
    assert describe["scenes"] == 3 and describe["cider"] >= 0 and 0 <= describe["ended"] <= 1
    assert "describe" in summary["evaluations"][0]
    model = LlavaForConditionalGeneration.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    assert model.config.image_seq_length == 16
    example = make_split("test", seed=0, num_scenes=1, image_size=64)[0]
    inputs = processor(images=example.image, text=T.PROMPT.format(question=example.qas[0].question), return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 16
    output = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert output.shape[1] == inputs["input_ids"].shape[1] + 2 or output[0, -1] == processor.tokenizer.eos_token_id
    assert json.loads((out / "training_log.json").read_text())["config"]["steps"] == 4
    assert not (out / T.STATE_FILE).exists()


def test_a_killed_training_resumes_bit_identically(tiny_run, tmp_path, monkeypatch):
    """Killed mid-step in the tower stage, in the first step of the main stage (the state on disk: the tower stage's
    end) and in its step 2 (after the evaluation; two steps left, so the LR schedule matters), then resumed each time:
    the same weights, bit for bit, and the same logs as the uninterrupted run."""
    out = tmp_path / "toy"
    saved, summary = killed_and_resumed(TINY, out, monkeypatch)
    assert [(s["stage"], s["step"]) for s in saved] == [("tower", 1), ("tower", 2), ("main", 2)]
    assert len(saved[-1]["logs"]["evaluations"]) == 1  # made after main step 1
    assert_same_run(out, summary, *tiny_run)
    assert summary["train_seconds"] > saved[-1]["seconds"]  # the segments' seconds add up


def test_a_training_state_is_not_overwritten_nor_resumed_with_another_config(tmp_path):
    from dataclasses import replace

    out = tmp_path / "toy"
    state = T.TrainingState(out, TINY, resume=False)
    layer = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(layer.parameters())
    state.attach(0.0, 0.0, layer, layer, np.random.default_rng(0), T.SceneStream(0, 64, 16))
    state.step_done("tower", 1, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0), last=True)
    path = out / T.STATE_FILE
    with pytest.raises(SystemExit) as refused:
        T.main(["--out", str(out)])
    assert str(refused.value) == (f"error: {path} holds the state of an interrupted run: pass --resume to continue it "
                                  "(or delete the file to start over)")
    with pytest.raises(SystemExit) as refused:
        T.main(["--out", str(out), "--resume"])  # the default config
    assert str(refused.value) == (f"error: cannot resume from {path}: it was made with image_size=64, "
                                  "this run has image_size=192")
    with pytest.raises(T.StateError, match=r"it was made with steps=4, this run has steps=5$"):
        T.train(replace(TINY, steps=5), out, resume=True)
    assert path.exists()


def test_referenced_objects_follow_the_question_templates():
    objects = [Obj("circle", "red", "small", 40, 40), Obj("square", "blue", "large", 150, 60, label="K"),
               Obj("circle", "green", "small", 60, 180)]
    scene = Scene("flat", {"colour": (128, 128, 128)}, objects)
    named = {qa.question: T.referenced_objects(scene, qa) for qas in candidate_questions(scene).values() for qa in qas}
    assert named["Is there a red circle?"] == ([0], [0]) and named["Is there a red square?"] is None  # absent: no target
    assert T.referenced_objects(scene, QA("Describe the image.", "A red circle.", "describe")) is None
    assert named["What colour is the square?"] == ([1], [1])
    assert named["Is the green circle left or right of the blue square?"] == ([2], [1])
    assert named["What letter is written on the blue square?"] == ([1], [1])
    assert named["How many circles are there?"] is None


def test_pointing_loss_is_minus_log_attention_mass_on_the_named_patches():
    """Checked against a hand-built attention pattern: two rows, image tokens at positions 1..4 (4 patches)."""
    image_mask = torch.tensor([[0, 1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    weights = torch.zeros(2, 3, 7, 7)  # (rows, heads, tokens, tokens)
    weights[1, 0, 6, [1, 2]] = torch.tensor([0.5, 0.5])  # head 0 of row 1 at query 6: half on patch 0, half on patch 1
    weights[1, 1, 6, 4] = 0.25  # head 1: a quarter on patch 3
    masks = torch.tensor([[[True, False, False, False], [False, False, False, True]]])  # first: patch 0, last: patch 3
    loss = T.pointing_loss(weights, image_mask, torch.tensor([1]), torch.tensor([6]), masks, heads=1)
    torch.testing.assert_close(loss, -(torch.log(torch.tensor(0.5)) + torch.log(torch.tensor(0.25))) / 2)


def test_pointing_targets_find_answer_queries():
    tokenizer = T.build_tokenizer()
    objects = [Obj("circle", "red", "small", 40, 40), Obj("square", "blue", "large", 150, 60)]
    scene = Scene("flat", {"colour": (128, 128, 128)}, objects)
    qas = [QA("How many objects are there?", "two", "count"), QA("What colour is the square?", "blue", "colour")]
    ids, labels = T.ConversationEncoder(tokenizer, 16)(qas)
    _, _, labels = T.pad_batch([(ids, labels)], tokenizer.pad_token_id)
    masks = torch.from_numpy(T.object_patches(scene, 64, 16))[None]
    rows, positions, named = T.pointing_targets([qas], [scene], labels, masks)
    assert rows.tolist() == [0] and labels[0, positions[0] + 1] == tokenizer.convert_tokens_to_ids("blue")
    assert named.shape == (1, 2, 16) and torch.equal(named[0, 0], masks[0, 1]) and named[0, 0].any()


def test_alignment_loss_scores_patches_against_the_naming_words():
    embeddings = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])  # (vocab, hidden)
    features = torch.tensor([[[3.0, 1.0], [5.0, 5.0]]])  # (images, patches, hidden)
    targets = torch.zeros(1, 2, 2, dtype=torch.long)  # (images, heads, patches)
    targets[0, 0, 0] = 2  # patch 0: second class of row 0 (token 2); patch 1 has no attribute
    words = [(0, torch.tensor([1, 2])), (1, torch.tensor([1, 2, 3]))]  # row 1 has no present patch: skipped
    logits = torch.tensor([3.0, 1.0])  # patch 0 against tokens 1 and 2
    expected = -torch.log_softmax(logits, 0)[1]
    torch.testing.assert_close(T.alignment_loss(features, embeddings, targets, words), expected)
    tokenizer = T.build_tokenizer()
    rows = dict(T.alignment_words(tokenizer))
    assert tokenizer.convert_ids_to_tokens(rows[0].tolist()) == list(COLOURS)
    assert tokenizer.unk_token_id not in rows[T.LETTER_HEAD].tolist()


def test_counting_loss_is_zero_only_for_uniform_attention_over_first_token_and_counted_centres():
    image_mask = torch.tensor([[0, 1, 1, 1, 1, 0]], dtype=torch.bool)  # 4 patches at positions 1..4
    support = torch.tensor([[True, False, True, False]])  # two counted objects: centres at patches 0 and 2
    weights = torch.zeros(1, 2, 6, 6)
    weights[0, 1, 5, [0, 1, 3]] = 1 / 3  # head 1 at query 5: uniform over <s>, patch 0, patch 2
    loss = T.counting_loss(weights, image_mask, torch.tensor([0]), torch.tensor([5]), support, head=1)
    torch.testing.assert_close(loss, -torch.log(torch.tensor(1 / 3)))  # the cross-entropy of the uniform target
    weights[0, 1, 5, [0, 1, 3]] = torch.tensor([0.5, 0.25, 0.25])
    skewed = T.counting_loss(weights, image_mask, torch.tensor([0]), torch.tensor([5]), support, head=1)
    assert skewed > loss


def test_counting_targets_mark_the_counted_centres():
    tokenizer = T.build_tokenizer()
    objects = [Obj("circle", "red", "small", 40, 40), Obj("square", "blue", "large", 150, 60),
               Obj("circle", "green", "small", 60, 180)]
    scene = Scene("flat", {"colour": (128, 128, 128)}, objects)
    qas = [QA("How many circles are there?", "two", "count"), QA("Is there a red circle?", "yes", "exists"),
           QA("How many objects are there?", "three", "count"), QA("How many triangles are there?", "zero", "count")]
    ids, labels = T.ConversationEncoder(tokenizer, 16)(qas)
    _, _, labels = T.pad_batch([(ids, labels)], tokenizer.pad_token_id)
    centres = torch.from_numpy(T.patch_targets(scene, 64, 16))[None, T.CENTRE_HEAD]
    rows, positions, support = T.counting_targets([qas], labels, centres)
    assert rows.tolist() == [0, 0, 0] and support.sum(-1).tolist() == [2, 3, 0]
    assert tokenizer.convert_ids_to_tokens(labels[0, positions + 1].tolist()) == ["two", "three", "zero"]


def test_position_loss_is_zero_for_a_token_that_holds_its_scaled_row_and_column():
    head = T.AuxiliaryHead(4, grid=2, text_hidden=2)
    with torch.no_grad():
        head.where.weight.copy_(torch.eye(2))
        head.where.bias.zero_()
    targets = torch.zeros(1, len(T.AUX_CLASSES) + 2, 4, dtype=torch.long)
    targets[0, -2], targets[0, -1] = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1])  # 2x2 grid, raster order
    exact = torch.tensor([[[-0.5, -0.5], [-0.5, 0.5], [0.5, -0.5], [0.5, 0.5]]])  # (row, column) scaled to [-1, 1]
    torch.testing.assert_close(head.position_loss(exact, targets), torch.tensor(0.0))
    torch.testing.assert_close(head.position_loss(exact + 0.1, targets), torch.tensor(0.01))


def test_pointing_report_runs_on_a_tiny_model():
    from toyvlm.diagnose import POINTED_KINDS, pointing_report

    config = T.TrainConfig(image_size=64, patch_size=16, vision_hidden=32, vision_layers=2, vision_heads=2, text_hidden=32,
                           text_layers=1, text_heads=4, text_kv_heads=1, point_layer=0, point_heads=1)
    tokenizer = T.build_tokenizer()
    model, _ = T.build_model(config, tokenizer)
    model.model.language_model.config._attn_implementation = "eager"
    report = pointing_report(model.eval(), tokenizer, config, scenes=4)
    assert report and set(report) <= set(POINTED_KINDS)
    for row in report.values():
        assert 1 <= row["questions"] <= 4 and 0 <= row["mass_first"] <= 1 and 0 <= row["mass_last"] <= 1


def test_eager_attention_at_one_layer_gives_the_all_eager_losses_and_restores():
    """Eager attention only at the pointing layer (the stock kernel elsewhere) is the same math as eager everywhere;
    the pointing layer still returns its attention probabilities, and the restore leaves every layer on the stock
    config."""
    config = T.TrainConfig(image_size=64, patch_size=16, vision_hidden=32, vision_layers=2, vision_heads=2, text_hidden=32,
                           text_layers=3, text_heads=4, text_kv_heads=2, point_layer=1, point_heads=1)
    tokenizer = T.build_tokenizer()
    model, _ = T.build_model(config, tokenizer)
    model.model.language_model.config._attn_implementation = "sdpa"
    examples = make_split("train", 0, 3, 64, per_kind=0)
    pixels, targets, objects = T.render_split(examples, 64, 16)
    rng = np.random.default_rng(0)
    turns = [T.sample_turns(example.scene, rng, 3) for example in examples]
    input_ids, mask, labels = T.pad_batch([T.ConversationEncoder(tokenizer, 16)(qas) for qas in turns], tokenizer.pad_token_id)
    assert (mask == 0).any()  # right padding is exercised
    pointing = T.pointing_targets(turns, [example.scene for example in examples], labels, objects)
    counting = T.counting_targets(turns, labels, targets[:, T.CENTRE_HEAD])
    assert pointing is not None and counting is not None
    head = T.AuxiliaryHead(32, 4, 32)

    def losses():
        return T.training_loss(model, head, T.normalize(pixels), input_ids, mask, labels, targets, pointing, 1, 1,
                               counting=counting, locate=True, tally=True)

    language_model = model.model.language_model
    language_model.config._attn_implementation = "eager"
    everywhere = losses()
    language_model.config._attn_implementation = "sdpa"
    restore = T.eager_attention_at(language_model, 1)
    assert [layer.self_attn.config._attn_implementation for layer in language_model.layers] == ["sdpa", "eager", "sdpa"]
    mixed = losses()
    restore()
    assert all(layer.self_attn.config is language_model.config for layer in language_model.layers)
    assert language_model.config._attn_implementation == "sdpa"
    for name in everywhere:
        torch.testing.assert_close(mixed[name], everywhere[name], rtol=1e-5, atol=1e-6)
    assert everywhere["locate"] > 0 and everywhere["tally"] > 0


def test_pointed_positions_are_the_scaled_centres_of_the_marked_patches():
    masks = torch.zeros(1, 2, 9, dtype=torch.bool)  # 3x3 grid
    masks[0, 0, [0, 1]] = True  # row 0, columns 0 and 1 -> centre (0, 0.5)
    masks[0, 1, 8] = True  # row 2, column 2
    expected = torch.tensor([[[2 * 0.5 / 3 - 1, 2 * 1.0 / 3 - 1], [2 * 2.5 / 3 - 1, 2 * 2.5 / 3 - 1]]])
    torch.testing.assert_close(T.pointed_positions(masks, 3), expected)


def test_locate_and_tally_losses_vanish_for_a_hidden_state_that_holds_the_answer():
    head = T.AuxiliaryHead(4, grid=3, text_hidden=4)
    masks = torch.zeros(1, 2, 9, dtype=torch.bool)
    masks[0, 0, 4], masks[0, 1, 0] = True, True  # centre patch (0, 0 scaled) and top-left ((-2/3, -2/3))
    with torch.no_grad():
        head.locate.weight.copy_(torch.eye(4))
        head.locate.bias.zero_()
        head.tally.weight.copy_(torch.tensor([[0.0, 0.0, 0.0, 1.0]]))
        head.tally.bias.zero_()
    hidden = torch.tensor([[0.0, 0.0, -2 / 3, -2 / 3]])
    torch.testing.assert_close(head.locate_loss(hidden, masks), torch.tensor(0.0))
    torch.testing.assert_close(head.locate_loss(hidden + 0.1, masks), torch.tensor(0.01))
    support = torch.zeros(1, 9, dtype=torch.bool)
    support[0, :2] = True  # two objects counted -> 2 * 2 / MAX_OBJECTS - 1
    count = 2 * 2 / T.D.MAX_OBJECTS - 1
    torch.testing.assert_close(head.tally_loss(torch.tensor([[0.0, 0.0, 0.0, count]]), support), torch.tensor(0.0))


def test_weighted_total_weights_every_loss_by_its_config_field_and_the_answer_loss_by_one():
    config = T.TrainConfig(aux_weight=0.5, align_weight=2.0, where_weight=0.0, locate_weight=3.0)
    losses = {"aux": torch.tensor(1.0), "align": torch.tensor(10.0), "where": torch.tensor(100.0),
              "lm": torch.tensor(1000.0), "locate": torch.tensor(0.25)}
    torch.testing.assert_close(T.weighted_total(losses, config), torch.tensor(0.5 + 20.0 + 0.0 + 1000.0 + 0.75))


def test_drift_segments_hand_checked():
    from toyvlm.diagnose import SEGMENTS, segment_ids

    prompt = torch.tensor([1, 7, 8, 4, 4, 4, 9, 10, 11])  # <s> USER : <image> x3 \n-question ASSISTANT :
    got = segment_ids(prompt, image_token_id=4, length=12)
    names = [SEGMENTS[i] for i in got.tolist()]
    assert names == ["system"] * 3 + ["image"] * 3 + ["instruction"] * 3 + ["response"] * 3
    with pytest.raises(ValueError, match="no image tokens"):
        segment_ids(torch.tensor([1, 7]), 4, 3)


def test_drift_report_runs_on_a_tiny_model_and_its_shares_sum_to_one():
    from toyvlm.diagnose import SEGMENTS, drift_report

    config = T.TrainConfig(image_size=64, patch_size=16, vision_hidden=32, vision_layers=2, vision_heads=2, text_hidden=32,
                           text_layers=2, text_heads=4, text_kv_heads=1)
    model, processor = T.build_model(config, T.build_tokenizer())
    model.config.text_config._attn_implementation = "eager"
    model.model.language_model.config._attn_implementation = "eager"
    report = drift_report(model.eval(), processor, scenes=2, max_new_tokens=4)
    share = torch.tensor(report["share"])  # (steps, layers, segments)
    assert share.shape[1:] == (2, len(SEGMENTS)) and 1 <= share.shape[0] <= 4
    torch.testing.assert_close(share.sum(-1), torch.ones(share.shape[:2], dtype=share.dtype))  # every key counted once
    assert (share[0, :, SEGMENTS.index("response")] == 0).all()  # nothing generated yet at the first step
    assert report["scenes_at_step"][0] == 2 and report["scenes"] == 2 and 0 <= report["ended"] <= 1
