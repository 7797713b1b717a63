"""The shipped toy LLaVA (assets/toy-llava) and the toyvlm evaluation path."""

import json
from pathlib import Path

import pytest
import torch

import dymu
from toyvlm import evaluate as E

TOY = Path(__file__).resolve().parents[1] / "assets" / "toy-llava"
#: the model card's accuracy on the fixed slice must be reproduced within this
SLICE_TOLERANCE = 0.02
#: minimum accuracy gain of the real image over a grey one on the slice
READS_THE_IMAGE_MARGIN = 0.05
#: the model card's CIDEr-D on the fixed slice of descriptions must be reproduced within this (a greedy token flipped
#: by a different float summation order moves one description of 40)
SLICE_CIDER_TOLERANCE = 0.05
#: the training budget of the shipped recipe on 2 CPU cores (issue 14: up to 90 minutes)
TRAINING_BUDGET_SECONDS = 90 * 60


@pytest.fixture(scope="module")
def toy():
    model, processor = E.load(TOY)
    records, images = E.test_records(60, image_size=E.image_size_of(processor))
    return model, processor, records, images


def _stated():
    results = json.loads((TOY / "eval" / "results.json").read_text())
    return {row["name"]: row for row in results["rows"]}, results


def test_shipped_checkpoint_reproduces_its_stated_accuracy_on_the_fixed_slice(toy):
    model, processor, _, _ = toy
    rows, results = _stated()
    records, images = E.test_records(60, image_size=E.image_size_of(processor))
    records = records[: results["slice_questions"]]
    assert len(records) == results["slice_questions"] == 200
    measured = E.accuracy(records, E.answer(model, processor, records, images))["overall"]
    assert abs(measured - rows["unmerged"]["slice_accuracy"]) <= SLICE_TOLERANCE
    # it reads the image: shown a grey image instead, the same questions score clearly lower
    blind = E.accuracy(records, E.answer(model, processor, records, E.blind_images(images)))["overall"]
    assert measured > blind + READS_THE_IMAGE_MARGIN, (measured, blind)


@pytest.mark.parametrize("setting", ["unmerged", "DToMe-mid (VTU)"])
def test_shipped_checkpoint_reproduces_its_stated_cider_and_every_description_ends(toy, setting):
    """The fixed slice of test descriptions, unmerged and under DToMe-mid + fast VTU: CIDEr-D as the model card
    states it, every description ends with </s> (no runaway generation), and it is better than describing a grey
    image."""
    from dymu.thresholds import Thresholds

    model, processor, _, _ = toy
    rows, results = _stated()
    stated = rows[setting]
    records, images = E.describe_records(results["slice_descriptions"], image_size=E.image_size_of(processor))
    assert stated["slice_cider"] == pytest.approx(E.slice_cider(stated["descriptions"], records), abs=1e-12)
    if setting != "unmerged":
        dymu.apply(model, Thresholds.load(TOY / "thresholds" / "mid.json"), vtu="fast")
    try:
        measured = E.describe(model, processor, records, images)
    finally:
        dymu.remove(model)
    assert measured["ended"] == 1.0, [d for d in measured["descriptions"]][:3]
    assert abs(measured["cider"] - stated["slice_cider"]) <= SLICE_CIDER_TOLERANCE, (measured["cider"], stated["slice_cider"])
    blind = E.slice_cider(rows["blind (grey image)"]["descriptions"], records)
    assert measured["cider"] > blind + 0.1, (measured["cider"], blind)


#: a flat scene gets at most this share of the tokens of a busy (textured or photo) one under DToMe-mid
FLAT_TO_BUSY_TOKENS = 0.7


def test_shipped_thresholds_give_fewer_tokens_on_flat_than_textured_backgrounds(toy):
    model, processor, records, images = toy
    from dymu.thresholds import Thresholds

    thresholds = Thresholds.load(TOY / "thresholds" / "mid.json")
    dymu.apply(model, thresholds)
    try:
        tokens = E.visual_tokens(model, processor, records, images)
    finally:
        dymu.remove(model)
    per = tokens["per_background"]
    busy = (per["texture"] + per["photo"]) / 2
    # measured on the shipped checkpoint (1000 test scenes, mid): flat 38.3, texture 52.8, photo 68.0 tokens
    assert per["flat"] < FLAT_TO_BUSY_TOKENS * busy, per
    assert per["flat"] < min(per["texture"], per["photo"]), per
    assert tokens["mean"] < model.config.image_seq_length


def test_fast_vtu_and_compact_answers_agree_with_batched_vs_one_by_one(toy):
    """Greedy answers do not depend on batch composition (ragged merged batches), in both modes."""
    model, processor, records, images = toy
    from dymu.thresholds import Thresholds

    chunk = records[:6]
    for mode in ("fast", "none"):
        dymu.apply(model, Thresholds.load(TOY / "thresholds" / "low.json"), vtu=mode)
        try:
            batched = E.answer(model, processor, chunk, images, batch_size=6)
            single = [E.answer(model, processor, [r], images, batch_size=1)[0] for r in chunk]
        finally:
            dymu.remove(model)
        assert batched == single, mode


def test_accuracy_and_prior_baseline():
    records = [{"question": "Is there a red circle?", "kind": "exists", "answer": "yes", "background": "flat"},
               {"question": "How many objects are there?", "kind": "count", "answer": "three", "background": "photo"}]
    result = E.accuracy(records, ["Yes.", "two"])
    assert result["overall"] == 0.5 and result["per_kind"] == {"count": 0.0, "exists": 1.0}
    assert result["per_background"] == {"flat": 1.0, "photo": 0.0}
    prior = E.prior_answers(records, train_scenes=200)
    assert prior[0] in {"yes", "no"}  # training asks exists questions balanced, so either can be the majority
    assert prior[1] in {"one", "two", "three", "four", "five", "six", "seven", "eight"}


def test_blind_images_normalise_to_zero(toy):
    _, processor, _, images = toy
    blank = E.blind_images({"x": next(iter(images.values()))})
    pixels = processor.image_processor(images=[blank["x"]], return_tensors="pt")["pixel_values"]
    assert pixels.abs().max() < 0.01
    assert torch.isfinite(pixels).all()


def test_level_target_is_the_lowest_count_the_constant_schedule_reaches(toy):
    from dymu.finder import budgets_for
    from dymu.vision import DymuError, tower_info

    model = toy[0]
    info = tower_info(model)
    low = E.level_target(model, E.DYMU_LEVELS["low"])
    budgets_for(info, low, "constant")  # reachable
    assert low > round(E.DYMU_LEVELS["low"] * info.num_patches)  # 4 merging layers cannot reach 15% of 144
    with pytest.raises(DymuError):
        budgets_for(info, low - 1, "constant")
    assert E.level_target(model, E.DYMU_LEVELS["high"]) == round(E.DYMU_LEVELS["high"] * info.num_patches)


def test_demo_without_the_toy_model_is_a_one_line_error(tmp_path, capsys):
    from dymu.cli import main

    assert main(["demo", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) != 0
    error = capsys.readouterr().err.strip()
    assert "toy model not found" in error and "\n" not in error
    # the folder is the demo's now (a rerun may write there); a folder of someone else's files needs --overwrite
    assert (tmp_path / "out" / ".dymu-demo").is_file()
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "overview.png").write_bytes(b"mine")
    assert main(["demo", "--model", str(tmp_path / "missing"), "--out", str(theirs)]) == 2
    assert "holds files the demo did not write: pass --overwrite" in capsys.readouterr().err
    assert (theirs / "overview.png").read_bytes() == b"mine" and not (theirs / ".dymu-demo").exists()
    older = tmp_path / "older"  # an earlier demo's output, written before the marker existed
    (older / "merge_maps").mkdir(parents=True)
    (older / "overview.png").write_bytes(b"demo")
    assert main(["demo", "--model", str(tmp_path / "missing"), "--out", str(older)]) != 0
    assert "toy model not found" in capsys.readouterr().err and (older / ".dymu-demo").is_file()


def test_shipped_checkpoint_was_trained_with_the_default_config():
    """`make toy-model` (python -m toyvlm.train with defaults) reproduces the shipped training run."""
    from dataclasses import asdict

    from toyvlm.train import ONEVISION_ONLY, TrainConfig

    log = json.loads((TOY / "training_log.json").read_text())
    defaults = asdict(TrainConfig())
    assert set(log["config"]) <= set(defaults)
    assert log["config"] == {name: value for name, value in defaults.items() if name in log["config"]}
    # options added after the shipped run must default to off (weight 0; the LLaVA arch, no OneVision setting), or
    # the defaults would train another model
    off = {"arch": "llava", **ONEVISION_ONLY}
    assert all(defaults[name] == off.get(name, 0) for name in set(defaults) - set(log["config"]))
    assert log["train_seconds"] <= TRAINING_BUDGET_SECONDS


def test_model_card_states_the_shipped_accuracy_and_every_kind_below_target():
    from toyvlm import card

    rows, _ = _stated()
    text = card.model_card(TOY)
    unmerged = rows["unmerged"]
    below = unmerged["overall"] < card.TARGET_OVERALL or min(unmerged["per_kind"].values()) < card.TARGET_PER_KIND
    assert ("**Below the target**" in text) == below and ("Meets the target accuracy." in text) == (not below)
    for kind, value in unmerged["per_kind"].items():
        assert (f"{kind} {100 * value:.1f}%" in text) == (below and value < card.TARGET_PER_KIND)
    assert text == (TOY / "README.md").read_text()  # the shipped card is regenerated from the shipped results


def test_demo_checks_itself_and_exits_non_zero_on_wrong_answers(tmp_path, capsys, monkeypatch):
    """A small demo run passes its self-check; with VTU's reduce broken (attention outputs lost) it exits 2, one line."""
    import torch

    from dymu import demo
    from dymu import vtu as V
    from dymu.cli import main

    monkeypatch.setattr(demo, "TOY_SCORED_SCENES", 4)
    monkeypatch.setattr(demo, "TOY_THRESHOLD_SCENES", 32)
    assert main(["demo", "--out", str(tmp_path / "ok")]) == 0
    out = capsys.readouterr().out
    assert "self-check passed" in out
    # a line for each term, and a CIDEr-D beside each description of each setting
    assert all(any(line.startswith(term) for line in out.splitlines()) for term in ("DToMe: ", "VTU: ", "low / mid / high: "))
    described = out.split("[3/5]")[1].split("[4/5]")[0]
    scenes = described.count(", asked ")
    assert scenes >= 1 and sum(line.lstrip().startswith(("unmerged ", "DToMe-")) and " CIDEr-D " in line
                               for line in described.splitlines()) == 3 * scenes  # 3 settings
    monkeypatch.setattr(V, "reduce", lambda hidden, vmap: torch.zeros_like(V.compress(hidden, vmap)))
    assert main(["demo", "--out", str(tmp_path / "broken")]) == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("dymu demo: error")]
    assert len(errors) == 1 and "self-check failed" in errors[0] and captured.err.rstrip().endswith(errors[0])
    assert "[2/5]" not in captured.out, "nothing is reported before the check"


def test_markdown_table_keeps_an_absent_background_kind_in_its_slot():
    per_kind = {"count": 0.5, "exists": 1.0}
    measured = {"flat": 30.0, "texture": 60.0, "photo": 70.0}  # no gradient scene among the test images
    results = {"patches": 144, "rows": [
        {"name": "unmerged", "level": None, "overall": 0.8, "per_kind": per_kind,
         "tokens": {"mean": 144.0, "std": 0.0, "per_background": {}}},
        {"name": "DToMe-mid (VTU)", "level": "mid", "overall": 0.6, "per_kind": per_kind,
         "tokens": {"mean": 50.0, "std": 9.0, "per_background": measured}},
    ]}
    header, _, unmerged, merged = [[cell.strip() for cell in line.split("|")[1:-1]] for line in E.markdown_table(results).splitlines()]
    column = next(i for i, cell in enumerate(header) if cell.endswith(" tokens") and " / " in cell)
    labels = header[column].removesuffix(" tokens").split(" / ")
    values = merged[column].split(" / ")
    assert len(values) == len(labels)
    assert dict(zip(labels, values)) == {kind: f"{measured[kind]:.1f}" if kind in measured else "-" for kind in labels}
    assert set(labels) == set(measured) | {"gradient"}
    assert unmerged[column] == "-"  # no per-background measurement at all


def test_describe_path_scores_greedy_descriptions_with_cider(toy, tmp_path):
    from toyvlm import data as D

    model, processor, _, _ = toy
    records, images = E.describe_records(3, image_size=E.image_size_of(processor))
    examples = D.make_split("test", seed=0, num_scenes=3, image_size=E.image_size_of(processor))
    assert [r["references"] for r in records] == [e.descriptions for e in examples]
    assert [r["question"] for r in records] == [e.describe_prompt for e in examples]
    result = E.describe(model, processor, records, images)
    assert len(result["descriptions"]) == 3 and result["cider"] >= 0 and 0 <= result["ended"] <= 1
    per_kind = {"count": 0.5}
    rows = [{"name": "unmerged", "level": None, "vtu": None, "overall": 0.8, "per_kind": per_kind, "cider": 1.25,
             "describe_ended": 1.0, "tokens": {"mean": 144.0, "std": 0.0, "per_background": {}}},
            {"name": "prior (text only)", "level": None, "vtu": None, "overall": 0.3, "per_kind": per_kind,
             "tokens": {"mean": 0.0, "std": 0.0, "per_background": {}}},
            {"name": "DToMe-mid (VTU)", "level": "mid", "vtu": "fast", "overall": 0.6, "per_kind": per_kind,
             "cider": 0.5, "describe_ended": 0.9, "tokens": {"mean": 50.0, "std": 9.0, "per_background": {}}}]
    results = {"patches": 144, "questions": 10, "describe_scenes": 3, "rows": rows}
    table = E.markdown_table(results).splitlines()
    assert table[0].endswith("| CIDEr-D | ended with </s> |")
    assert table[2].endswith("| 1.250 | 100% |") and table[3].endswith("| - | - |") and table[4].endswith("| 0.500 | 90% |")
    E.plot(results, tmp_path / "cider.png", metric="cider")
    assert (tmp_path / "cider.png").stat().st_size > 0


def test_card_drift_section_reports_the_measured_trend_over_steps_most_scenes_reach(tmp_path):
    from toyvlm import card
    from toyvlm.diagnose import SEGMENTS

    def write(image_shares, scenes_at_step):
        rest = len(SEGMENTS) - 1
        share = [[[s if k == SEGMENTS.index("image") else (1 - s) / rest for k in range(len(SEGMENTS))] for s in layers]
                 for layers in image_shares]
        (tmp_path / "eval").mkdir(exist_ok=True)
        (tmp_path / "eval" / "drift.json").write_text(json.dumps(
            {"segments": list(SEGMENTS), "layers": 2, "share": share, "scenes_at_step": scenes_at_step, "scenes": 10,
             "ended": 1.0}))
        return card._drift(tmp_path)

    assert card._drift(tmp_path) == ""  # no drift.json: no section
    # the last step (2 of 10 scenes still generating) would show a rise; it is left out of the trend
    text = write([[0.5, 0.3], [0.4, 0.2], [0.3, 0.1], [0.9, 0.9]], [10, 9, 5, 2])
    assert "the image share falls as the description grows: 40.0% at step 0 and\n20.0% at step 2" in text
    assert "| 0 (10) | 50.0 | 30.0 | 40.0 |" in text and "| 3 (2)" not in text
    text = write([[0.2, 0.2], [0.3, 0.3]], [10, 10])
    assert "the image share does not fall" in text
