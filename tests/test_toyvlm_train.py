"""The toy-model training pipeline runs end to end on a tiny config and saves a loadable checkpoint."""

import json

import torch

from toyvlm import train as T


def test_tokenizer_covers_the_task_vocabulary():
    tokenizer = T.build_tokenizer()
    text = "USER: <image><image>\nWhat colour is the triangle? ASSISTANT: purple"
    ids = tokenizer(text).input_ids
    assert tokenizer.unk_token_id not in ids
    assert ids.count(tokenizer.convert_tokens_to_ids("<image>")) == 2
    assert tokenizer.decode(tokenizer("left", add_special_tokens=False).input_ids) == "left"


def test_collate_supervises_the_answer_only():
    tokenizer = T.build_tokenizer()
    input_ids, mask, labels = T.collate(tokenizer, 4, ["How many objects are there?", "Is there a red circle?"], ["three", "no"])
    for row in range(2):
        supervised = labels[row][labels[row] != T.IGNORE_INDEX].tolist()
        assert supervised[-1] == tokenizer.eos_token_id and len(supervised) == 2
        assert int(mask[row].sum()) == int((input_ids[row] != tokenizer.pad_token_id).sum())


def test_training_runs_end_to_end_and_saves_a_checkpoint(tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    config = T.TrainConfig(image_size=64, patch_size=16, vision_hidden=32, vision_layers=2, vision_heads=2, text_hidden=32,
                           text_layers=1, text_heads=2, text_kv_heads=1, train_scenes=8, val_scenes=3, steps=4,
                           batch_size=4, warmup_steps=1)
    summary = T.train(config, tmp_path / "toy", log_every=1, progress=False)
    assert len(summary["log"]) == 4 and all(torch.isfinite(torch.tensor(e["loss"])) for e in summary["log"])
    assert summary["validation"]["questions"] > 0 and 0.0 <= summary["validation"]["overall"] <= 1.0
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "toy")
    processor = AutoProcessor.from_pretrained(tmp_path / "toy")
    assert model.config.image_seq_length == 16
    from toyvlm.data import make_split

    example = make_split("test", seed=0, num_scenes=1, image_size=64)[0]
    inputs = processor(images=example.image, text=T.PROMPT.format(question=example.qas[0].question), return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 16
    output = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert output.shape[1] == inputs["input_ids"].shape[1] + 2 or output[0, -1] == processor.tokenizer.eos_token_id
    assert json.loads((tmp_path / "toy" / "training_log.json").read_text())["config"]["steps"] == 4
