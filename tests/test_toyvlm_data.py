"""Tests for the synthetic VQA generator in toyvlm.data (numpy + Pillow only)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from toyvlm import data as D
from toyvlm.data import Obj, Scene

GREY = (128, 128, 128)


def _flat(objects, colour=GREY):
    return Scene("flat", {"colour": colour}, list(objects))


def _questions(scene, kind):
    return {qa.question: qa.answer for qa in D.candidate_questions(scene)[kind]}


# --------------------------------------------------------------------------- determinism


def test_same_seed_is_byte_identical_and_different_seeds_differ():
    a = D.make_split("test", seed=7, num_scenes=6, image_size=96)
    b = D.make_split("test", seed=7, num_scenes=6, image_size=96)
    c = D.make_split("test", seed=8, num_scenes=6, image_size=96)
    assert [ex.scene for ex in a] == [ex.scene for ex in b]
    assert [ex.qas for ex in a] == [ex.qas for ex in b]
    assert [ex.png_bytes() for ex in a] == [ex.png_bytes() for ex in b]
    assert [ex.scene for ex in a] != [ex.scene for ex in c]
    assert [ex.png_bytes() for ex in a] != [ex.png_bytes() for ex in c]


def test_splits_use_different_streams():
    scenes = {name: [ex.scene for ex in D.make_split(name, 3, 5, 64)]
              for name in ("train", "val", "test")}
    assert scenes["train"] != scenes["val"] != scenes["test"] != scenes["train"]
    with pytest.raises(ValueError):
        D.make_split("dev", 3, 1, 64)


# --------------------------------------------------------------------------- hand-checked scenes


def test_hand_checked_two_objects():
    scene = _flat([Obj("circle", "red", "small", 50, 100),
                   Obj("square", "blue", "large", 170, 110)])
    position = _questions(scene, "position")
    assert position == {
        "Is the red circle left or right of the blue square?": "left",
        "Is the blue square left or right of the red circle?": "right",
    }  # dy = 10 < POSITION_MARGIN, so no above/below questions
    exists = _questions(scene, "exists")
    assert exists["Is there a red circle?"] == "yes"
    assert exists["Is there a blue square?"] == "yes"
    assert exists["Is there a blue circle?"] == "no"
    assert exists["Is there a red square?"] == "no"
    assert sum(a == "yes" for a in exists.values()) == 2
    assert len(exists) == len(D.COLOURS) * len(D.SHAPES)
    assert _questions(scene, "colour") == {
        "What colour is the circle?": "red",
        "What colour is the square?": "blue",
    }
    count = _questions(scene, "count")
    assert count == {
        "How many circles are there?": "one",
        "How many squares are there?": "one",
        "How many triangles are there?": "zero",
        "How many crosses are there?": "zero",
        "How many objects are there?": "two",
    }
    assert _questions(scene, "detail") == {}


def test_hand_checked_duplicates_labels_and_vertical_position():
    scene = _flat([
        Obj("triangle", "green", "large", 60, 40, label="K"),
        Obj("triangle", "green", "small", 160, 40),
        Obj("triangle", "yellow", "small", 100, 120),
        Obj("cross", "purple", "large", 62, 180, label="Q"),
    ])
    # "triangle" occurs 3 times -> no colour question for it; cross is unique
    assert _questions(scene, "colour") == {"What colour is the cross?": "purple"}
    count = _questions(scene, "count")
    assert count["How many triangles are there?"] == "three"
    assert count["How many crosses are there?"] == "one"
    assert count["How many objects are there?"] == "four"
    # green triangles are ambiguous, so only yellow triangle & purple cross are referable
    assert _questions(scene, "detail") == {"What letter is written on the purple cross?": "q"}
    assert _questions(scene, "position") == {
        "Is the yellow triangle left or right of the purple cross?": "right",
        "Is the yellow triangle above or below the purple cross?": "above",
        "Is the purple cross left or right of the yellow triangle?": "left",
        "Is the purple cross above or below the yellow triangle?": "below",
    }
    assert _questions(scene, "exists")["Is there a green triangle?"] == "yes"


def test_position_margin_and_questions_for_sampling():
    scene = _flat([Obj("circle", "orange", "small", 100, 100),
                   Obj("square", "green", "small", 100 + D.POSITION_MARGIN - 1, 150)])
    position = _questions(scene, "position")
    assert all("above or below" in q for q in position)
    rng = np.random.default_rng(0)
    qas = D.questions_for(scene, rng, per_kind=2)
    kinds = Counter(qa.kind for qa in qas)
    assert kinds == {"exists": 2, "colour": 2, "count": 2, "position": 2}
    assert sorted(qa.answer for qa in qas if qa.kind == "exists") == ["no", "yes"]
    candidates = D.candidate_questions(scene)
    assert all(qa in candidates[qa.kind] for qa in qas)


# --------------------------------------------------------------------------- rendering


@pytest.mark.parametrize("image_size", [224, 112])
def test_render_centre_pixels_and_size(image_size):
    objects = [Obj(shape, colour, size, x, y) for shape, colour, size, x, y in [
        ("circle", "red", "small", 40, 40),
        ("square", "blue", "large", 150, 50),
        ("triangle", "yellow", "small", 50, 160),
        ("cross", "purple", "large", 160, 170),
    ]]
    scene = _flat(objects)
    assert not D.objects_overlap(scene.objects)
    image = D.render(scene, image_size)
    assert image.mode == "RGB" and image.size == (image_size, image_size)
    scale = image_size / D.SCENE_SIZE
    for obj in objects:
        pixel = image.getpixel((round(obj.x * scale), round(obj.y * scale)))
        assert pixel == D.PALETTE[obj.colour], obj
    assert image.getpixel((0, image_size - 1)) == GREY


def test_label_is_drawn_on_object():
    plain = _flat([Obj("square", "yellow", "large", 112, 112)])
    labelled = _flat([Obj("square", "yellow", "large", 112, 112, label="W")])
    diff = np.abs(np.asarray(D.render(plain), int) - np.asarray(D.render(labelled), int))
    ys, xs = np.nonzero(diff.sum(-1))
    assert len(ys) > 0
    half = D.LARGE_HALF
    assert xs.min() > 112 - half and xs.max() < 112 + half
    assert ys.min() > 112 - half and ys.max() < 112 + half


def test_generated_scenes_are_valid():
    for i in range(60):
        scene = D.generate_scene(np.random.default_rng(i))
        assert D.MIN_OBJECTS <= len(scene.objects) <= D.MAX_OBJECTS
        assert not D.objects_overlap(scene.objects)
        for obj in scene.objects:
            assert obj.shape in D.SHAPES and obj.colour in D.COLOURS and obj.size in D.SIZES
            assert obj.half <= obj.x <= D.SCENE_SIZE - obj.half
            assert obj.half <= obj.y <= D.SCENE_SIZE - obj.half
        assert sum(obj.label is not None for obj in scene.objects) <= 1
        if scene.background in ("flat", "gradient"):
            colours = [v for k, v in scene.background_params.items() if k != "angle"]
            assert all(tuple(c) not in D.PALETTE.values() for c in colours)


# --------------------------------------------------------------------------- question statistics


def test_all_kinds_appear_single_word_answers_and_balanced_exists():
    examples = D.make_split("train", seed=1, num_scenes=60, image_size=64, per_kind=2)
    qas = [qa for ex in examples for qa in ex.qas]
    kinds = Counter(qa.kind for qa in qas)
    assert set(kinds) == set(D.QUESTION_KINDS)
    backgrounds = Counter(ex.scene.background for ex in examples)
    assert set(backgrounds) == set(D.BACKGROUND_KINDS)
    for qa in qas:
        assert qa.answer == D.normalize_answer(qa.answer) and qa.answer.isalpha(), qa
        assert qa.question.endswith("?")
    exists = Counter(qa.answer for qa in qas if qa.kind == "exists")
    assert set(exists) == {"yes", "no"}
    assert abs(exists["yes"] - exists["no"]) <= 0.1 * sum(exists.values())
    allowed = {
        "exists": {"yes", "no"},
        "colour": set(D.COLOURS),
        "count": set(D.NUMBER_WORDS),
        "position": {"left", "right", "above", "below"},
        "detail": set(D.LABEL_LETTERS.lower()),
    }
    assert {kind: set(D.answer_space(kind)) for kind in D.QUESTION_KINDS} == allowed
    for qa in qas:
        assert qa.answer in D.answer_space(qa.kind), qa


# --------------------------------------------------------------------------- benchmark I/O


def test_write_read_benchmark_round_trip(tmp_path):
    examples = D.make_split("val", seed=2, num_scenes=5, image_size=80, per_kind=2)
    out = D.write_benchmark(tmp_path / "bench", examples)
    records = D.read_benchmark(out)
    expected = [(qa.question, qa.kind, qa.answer) for ex in examples for qa in ex.qas]
    assert [(r["question"], r["kind"], r["answer"]) for r in records] == expected
    ids = [r["question_id"] for r in records]
    assert len(set(ids)) == len(ids)
    for line in (out / "questions.jsonl").read_text().splitlines():
        assert set(json.loads(line)) == {"question_id", "image", "question", "kind"}
    for line in (out / "answers.jsonl").read_text().splitlines():
        assert set(json.loads(line)) == {"question_id", "answer"}
    for record in records:
        with Image.open(out / record["image"]) as image:
            assert image.size == (80, 80) and image.mode == "RGB"
    ex = examples[0]
    assert (out / "images" / f"{ex.id}.png").read_bytes() == ex.png_bytes()
    assert "Scoring" in (out / "README.md").read_text()
    perfect = {r["question_id"]: f" {r['answer'].upper()}. " for r in records}
    assert D.score(perfect, records) == 1.0
    assert D.score({}, records) == 0.0


def test_cli_writes_layout(tmp_path):
    out = tmp_path / "cli"
    subprocess.run([sys.executable, "-m", "toyvlm.data", "--out", str(out), "--split", "test",
                    "--num-scenes", "3", "--seed", "4", "--image-size", "64"],
                   check=True, capture_output=True)
    assert len(list((out / "images").glob("*.png"))) == 3
    assert D.read_benchmark(out)


# --------------------------------------------------------------------------- complexity


def _mean_abs_dx(image):
    arr = np.asarray(image, dtype=np.float64)
    return float(np.abs(np.diff(arr, axis=1)).mean())


def test_background_kinds_differ_in_complexity():
    by_kind: dict[str, list[float]] = {kind: [] for kind in D.BACKGROUND_KINDS}
    seed = 0
    while min(len(v) for v in by_kind.values()) < 4:
        scene = D.generate_scene(np.random.default_rng(seed))
        seed += 1
        if len(by_kind[scene.background]) < 4:
            by_kind[scene.background].append(_mean_abs_dx(D.render_background(scene, 128)))
    flat = max(by_kind["flat"])
    assert flat < 0.5
    assert np.mean(by_kind["texture"]) > 20 * max(flat, 0.1)
    assert np.mean(by_kind["photo"]) > 10 * max(flat, 0.1)
    assert np.mean(by_kind["texture"]) > np.mean(by_kind["gradient"])


# --------------------------------------------------------------------------- describe task


def _words(text):
    """Words and punctuation marks, as the word-level tokenizer splits them."""
    import re

    return re.findall(r"\w+|[^\w\s]", text)


def test_descriptions_hand_checked_with_a_letter():
    scene = _flat([Obj("circle", "red", "small", 40, 40, label="K"),  # thirds of 224: column 0, row 0
                   Obj("square", "blue", "large", 150, 60),  # column 2, row 0
                   Obj("circle", "green", "small", 60, 180)])  # column 0, row 2
    assert [D.place(o) for o in scene.objects] == ["top left", "top right", "bottom left"]
    assert D.describe(scene) == [
        "There are three objects on a plain background: a small red circle with the letter k in the top left, "
        "a large blue square in the top right and a small green circle in the bottom left.",
        "A plain background with three objects. From left to right: a small red circle labelled k at the top left, "
        "a small green circle at the bottom left, a large blue square at the top right.",
        "A large blue square at the top right, a small red circle showing the letter k at the top left and "
        "a small green circle at the bottom left, on a plain background.",
        # top to bottom; square vs circle: dx 110 > dy 20 -> right of; green vs square: dy 120 > dx 90 -> below
        "The image shows a small red circle marked k at the top left, a large blue square right of the red circle "
        "and a small green circle below the blue square on a plain background.",
        "Three objects on a plain background. A small red circle is in the top left. A large blue square is in the "
        "top right. A small green circle is in the bottom left. The letter k is on the small red circle.",
    ]


def test_descriptions_hand_checked_with_duplicates_of_one_shape():
    scene = Scene("texture", {"style": "noise", "seed": 1},
                  [Obj("circle", "red", "small", 50, 30), Obj("circle", "red", "small", 170, 100),
                   Obj("square", "blue", "large", 60, 190)])
    descriptions = D.describe(scene)
    # "the red circle" would be ambiguous: objects after a duplicate get their absolute place
    assert descriptions[3] == ("The image shows a small red circle at the top left, a small red circle at the right "
                               "and a large blue square at the bottom left on a textured background.")
    assert descriptions[0].startswith("There are three objects on a textured background: ")
    assert all("letter" not in d and "labelled" not in d for d in descriptions)
    one = D.describe(_flat([Obj("cross", "orange", "large", 112, 112)]))
    assert one[0] == "There is one object on a plain background: a large orange cross in the centre."


def test_crowded_scenes_use_the_compact_form_and_stay_short():
    rng = np.random.default_rng(5)
    crowded = next(s for s in (D.generate_scene(rng) for _ in range(200)) if len(s.objects) == D.MAX_OBJECTS)
    descriptions = D.describe(crowded)
    assert all("eight objects" in descriptions[k].lower() for k in (0, 1, 4))
    for obj in crowded.objects:  # compact objects: "size colour shape place", no article
        assert f"{obj.size} {obj.colour} {obj.shape} {D.place(obj)}" in descriptions[4].lower()
        assert f"a {obj.size} {obj.colour} {obj.shape}" not in descriptions[0]
    lengths = []
    for scene in (D.generate_scene(rng) for _ in range(500)):
        for text in D.describe(scene):
            lengths.append(len(_words(text)))
            assert not re.search(r"\b[a-zA-Z]\.", text), text  # PTB would keep "k." whole (see toyvlm.cider)
    assert min(lengths) >= 12 and max(lengths) <= D.MAX_DESCRIPTION_WORDS  # one object: 13 words and marks
    assert 30 <= np.mean(lengths) <= 50


def test_descriptions_are_deterministic_distinct_and_name_every_object():
    a = D.make_split("test", seed=4, num_scenes=20, image_size=64)
    b = D.make_split("test", seed=4, num_scenes=20, image_size=64)
    assert [(e.describe_prompt, e.descriptions) for e in a] == [(e.describe_prompt, e.descriptions) for e in b]
    assert {e.describe_prompt for e in a} == set(D.DESCRIBE_PROMPTS)
    for example in a:
        descriptions = example.descriptions
        assert len(descriptions) == len(set(descriptions)) == D.NUM_DESCRIPTIONS
        count = D.NUMBER_WORDS[len(example.scene.objects)]
        for k, text in enumerate(descriptions):
            assert count in text.lower() or k in (2, 3)  # templates 3 and 4 only list the objects
            assert D.BACKGROUND_PHRASES[example.scene.background] in text.lower()
            for obj in example.scene.objects:
                assert f"{obj.size} {obj.colour} {obj.shape}" in text.lower()
                assert obj.label is None or f" {obj.label.lower()} " in text
    # the describe prompt comes from a third spawned stream: the scene and question streams are unchanged
    scene_seq, question_seq = np.random.SeedSequence([4, D.SPLIT_CODES["test"], 3]).spawn(2)
    assert a[3].scene == D.generate_scene(np.random.default_rng(scene_seq))
    assert a[3].qas == D.questions_for(a[3].scene, np.random.default_rng(question_seq))
    qa = D.describe_qa(a[0].scene, np.random.default_rng(0))
    assert qa.kind == D.DESCRIBE_KIND and qa.question in D.DESCRIBE_PROMPTS and qa.answer in a[0].descriptions


def test_benchmark_captions_file_is_coco_format(tmp_path):
    examples = D.make_split("val", seed=2, num_scenes=4, image_size=64)
    out = D.write_benchmark(tmp_path / "bench", examples)
    captions = json.loads((out / "captions.json").read_text())
    assert [image["id"] for image in captions["images"]] == [0, 1, 2, 3]
    assert all((out / image["file_name"]).is_file() for image in captions["images"])
    assert [image["prompt"] for image in captions["images"]] == [e.describe_prompt for e in examples]
    by_image = {}
    for annotation in captions["annotations"]:
        assert set(annotation) == {"id", "image_id", "caption"}
        by_image.setdefault(annotation["image_id"], []).append(annotation["caption"])
    assert by_image == {i: e.descriptions for i, e in enumerate(examples)}
    assert len({a["id"] for a in captions["annotations"]}) == 4 * D.NUM_DESCRIPTIONS
