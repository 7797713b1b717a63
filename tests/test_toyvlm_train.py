"""The toy-model training pipeline runs end to end on a tiny config and saves a loadable checkpoint."""

import json

import numpy as np
import torch

from toyvlm import train as T
from toyvlm.data import COLOURS, LABEL_LETTERS, QA, QUESTION_KINDS, SHAPES, Obj, Scene, candidate_questions, make_split


def test_tokenizer_covers_the_task_vocabulary():
    tokenizer = T.build_tokenizer()
    text = "USER: <image><image>\nWhat colour is the triangle? ASSISTANT: purple"
    ids = tokenizer(text).input_ids
    assert tokenizer.unk_token_id not in ids
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
    pixels, targets = T.render_split(examples, 64, 16)
    encoder = T.ConversationEncoder(tokenizer, 16)
    rows = [encoder([qa]) for qa in (QA("How many objects are there?", "two", "count"), QA("Is there a red circle?", "no", "exists"),
                                     QA("What letter is written on the blue square?", "k", "detail"))]
    input_ids, mask, labels = T.pad_batch(rows, tokenizer.pad_token_id)
    loss, aux = T.training_loss(model, T.AuxiliaryHead(32, 4), T.normalize(pixels), input_ids, mask, labels, targets)
    stock = model(input_ids=input_ids, attention_mask=mask, labels=labels, pixel_values=T.normalize(pixels)).loss
    torch.testing.assert_close(loss, stock, rtol=1e-6, atol=1e-6)
    assert torch.isfinite(aux)


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


def test_sample_turns_are_distinct_valid_and_cover_kinds():
    rng = np.random.default_rng(0)
    seen = set()
    for example in make_split("train", 0, 40, 64, per_kind=0):
        valid = {(qa.question, qa.answer) for qas in candidate_questions(example.scene).values() for qa in qas}
        turns = T.sample_turns(example.scene, rng, 6)
        assert len(turns) == 6 and len({qa.question for qa in turns}) == 6
        assert all((qa.question, qa.answer) in valid for qa in turns)
        seen.update(qa.kind for qa in turns)
    assert seen == set(QUESTION_KINDS)


def test_training_runs_end_to_end_and_saves_a_checkpoint(tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    config = T.TrainConfig(image_size=64, patch_size=16, vision_hidden=32, vision_layers=2, vision_heads=2, text_hidden=32,
                           text_layers=1, text_heads=2, text_kv_heads=1, train_scenes=8, val_scenes=3, steps=4,
                           batch_size=4, warmup_steps=1, turns=3, eval_every=2, eval_scenes=2)
    summary = T.train(config, tmp_path / "toy", log_every=1, progress=False)
    assert len(summary["log"]) == 4 and all(torch.isfinite(torch.tensor(e["loss"])) for e in summary["log"])
    assert len(summary["evaluations"]) == 1 and torch.isfinite(torch.tensor(summary["log"][0]["aux_loss"]))
    assert summary["validation"]["questions"] > 0 and 0.0 <= summary["validation"]["overall"] <= 1.0
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "toy")
    processor = AutoProcessor.from_pretrained(tmp_path / "toy")
    assert model.config.image_seq_length == 16
    example = make_split("test", seed=0, num_scenes=1, image_size=64)[0]
    inputs = processor(images=example.image, text=T.PROMPT.format(question=example.qas[0].question), return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 16
    output = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert output.shape[1] == inputs["input_ids"].shape[1] + 2 or output[0, -1] == processor.tokenizer.eos_token_id
    assert json.loads((tmp_path / "toy" / "training_log.json").read_text())["config"]["steps"] == 4
