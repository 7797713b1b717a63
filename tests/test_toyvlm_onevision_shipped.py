"""The shipped toy OneVision (assets/toy-llava-onevision): it reproduces what its model card states, reads its
images, its threshold presets load, and the card is the generator's output."""

import json
from pathlib import Path

import pytest

import dymu
from toyvlm import data as D
from toyvlm import evaluate as E
from toyvlm import evaluate_onevision as O

TOY = Path(__file__).resolve().parents[1] / "assets" / "toy-llava-onevision"
#: the card's accuracy on the fixed slice must be reproduced within this (as for the toy LLaVA)
SLICE_TOLERANCE = 0.02
#: minimum accuracy gain of the real image over a grey one on the slice
READS_THE_IMAGE_MARGIN = 0.05
#: mean merged tokens per crop on the slice's images vs the evaluation's mean over 1000 scenes
TOKENS_TOLERANCE = 0.15
#: issue 24: trained in <= 90 minutes on 2 cores; the log's CPU time over 2 cores is that wall-time floor
TRAINING_BUDGET_SECONDS = 90 * 60
CORES = 2
#: test scenes whose questions hold the evaluation's fixed slice (its first 200 questions; the toy LLaVA's test too)
SLICE_SCENES = 60


@pytest.fixture(scope="module")
def toy():
    model, processor = O.load(TOY)
    results = json.loads((TOY / "eval" / "results.json").read_text())
    render = O.scene_renderer(results["seed"], processor.image_processor.size["height"])
    records, images = E.test_records(SLICE_SCENES, results["seed"], render=render)  # the first records: the slice
    assert len(records) >= results["slice_questions"]
    records = records[: results["slice_questions"]]
    scenes = {record["image"] for record in records}
    images = {key: image for key, image in images.items() if key in scenes}
    return model, processor, records, images, {row["name"]: row for row in results["rows"]}


@pytest.mark.parametrize("setting,level", [("unmerged", None), ("DToMe-mid (VTU)", "mid")])
def test_shipped_onevision_reproduces_its_slice_accuracy_and_reads_the_image(toy, setting, level):
    model, processor, records, images, rows = toy
    if level is not None:
        dymu.apply(model, TOY / "thresholds" / f"{level}.json", vtu="fast")
    try:
        measured = E.accuracy(records, E.answer(model, processor, records, images, progress=False))["overall"]
        if level is not None:
            tokens = O.image_tokens(model, processor, records, images, E.BATCH_SIZE)["mean"]
            assert tokens == pytest.approx(rows[setting]["tokens"]["mean"], rel=TOKENS_TOLERANCE)
    finally:
        dymu.remove(model)
    assert abs(measured - rows[setting]["slice_accuracy"]) <= SLICE_TOLERANCE, (measured, rows[setting])
    if level is None:  # shown a grey image of the same size instead, the same questions score clearly lower
        grey = E.blind_images(images, O.SIGLIP_MEAN)
        blind = E.accuracy(records, E.answer(model, processor, records, grey, progress=False))["overall"]
        assert measured > blind + READS_THE_IMAGE_MARGIN, (measured, blind)


def test_shipped_onevision_presets_are_the_papers_levels_and_fit_the_budget():
    from dymu.thresholds import Thresholds

    results = json.loads((TOY / "eval" / "results.json").read_text())
    rows = {row["name"]: row for row in results["rows"]}
    patches = results["patches"]
    for level, share in O.OV_LEVELS.items():
        thresholds = Thresholds.load(TOY / "thresholds" / f"{level}.json")
        assert len(thresholds.values) == json.loads((TOY / "config.json").read_text())["vision_config"]["num_hidden_layers"]
        # the measured tokens per crop sit near the paper's share (the 5-layer tower's floor may raise low's)
        assert rows[f"DToMe-{level} (VTU)"]["tokens"]["mean"] / patches == pytest.approx(share, abs=0.03)
    log = json.loads((TOY / "training_log.json").read_text())
    assert log["train_cpu_seconds"] / CORES <= TRAINING_BUDGET_SECONDS
    assert log["config"]["seed"] == D.DEFAULT_SEED


def test_shipped_onevision_card_is_the_generators_output():
    from toyvlm.card_onevision import model_card

    assert model_card(TOY) == (TOY / "README.md").read_text()
