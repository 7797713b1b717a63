"""Tests for the synthetic VQA generator in toyvlm.data (numpy + Pillow only)."""

from __future__ import annotations

import json
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
