"""VTW's choice of K by the KL criterion (decoder_pruning_spec.md §3.3, oracle V6)."""

import json
import math

import pytest
import torch

import dymu
from dymu.calibrate import calibrate_vtw, choose_layer, kl_divergence

LAYERS = 4


def test_kl_divergence_by_hand():
    p = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64)  # probabilities 1/4, 3/4
    q = torch.tensor([[0.0, 0.0]])  # 1/2, 1/2
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert math.isclose(float(kl_divergence(p, q)), expected, rel_tol=1e-12)
    assert float(kl_divergence(q, q)) == 0.0
    # the direction is KL(withdrawn || full), as nn.KLDivLoss(log_softmax(full), softmax(withdrawn)) computes it
    official = torch.nn.functional.kl_div(torch.log_softmax(q.double(), -1), torch.softmax(p.double(), -1), reduction="sum")
    assert math.isclose(float(kl_divergence(p, q)), float(official), rel_tol=1e-12)


def test_the_first_qualifying_layer_is_chosen_not_the_smallest_kl():
    assert choose_layer({5: 0.01, 6: 0.002, 7: 0.0001, 8: 0.004}, 0.003, 32) == 6
    assert choose_layer({1: 0.5, 2: 0.4}, 0.003, 4) == 4  # none qualifies: never withdraw


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from dymu.models import load_model, load_processor, make_model

    folder = make_model("tiny-llava", tmp_path_factory.mktemp("vtw") / "tiny-llava", layers=LAYERS)
    return folder, load_model(folder), load_processor(folder, full=True)


def test_calibration_measures_each_withdrawal_layer(tiny):
    """Every candidate's KL equals the one computed by hand from the model with and without VTW at that layer."""
    from dymu.data import bundled_image

    _, model, processor = tiny
    photos = [bundled_image(name) for name in ("coins", "camera", "grass")]
    dymu.apply(model, None)
    result = calibrate_vtw(model, processor, photos, threshold=0.05, batch_size=2, progress=False)
    assert dymu.llava.get_vlm_patch(model).state.language.prune is None, "the model is left as it was applied"
    assert list(result.kl) == [1, 2, 3]  # a 4-layer model: candidates from layer 1
    inputs = processor(images=photos, text=[result.prompt] * 3, return_tensors="pt")
    with torch.no_grad():
        full = model(**inputs).logits[:, -1]
        for k, value in result.kl.items():
            dymu.apply(model, None, prune=f"vtw:k={k}")
            withdrawn = model(**inputs).logits[:, -1]
            expected = float(torch.nn.functional.kl_div(torch.log_softmax(full.double(), -1), torch.softmax(withdrawn.double(), -1),
                                                        reduction="none").sum(-1).mean())
            assert math.isclose(value, expected, rel_tol=1e-6, abs_tol=1e-12)
    assert result.k == choose_layer(result.kl, 0.05, LAYERS)
    assert list(calibrate_vtw(model, processor, photos[:1], first_layer=2, progress=False).kl) == [2, 3]
    for first in (LAYERS, 9, 0):  # issue 23 item 13: a first layer the model cannot withdraw at is refused, not lowered
        with pytest.raises(dymu.DymuError, match=f"--first-layer {first}: the language model has {LAYERS} layers"):
            calibrate_vtw(model, processor, photos[:1], first_layer=first, progress=False)


def test_calibration_under_tome_keeps_tome_and_measures_the_merged_model(tiny):
    """The candidates are measured on the ToMe-merged model (fixed r re-applied with each), which it is left with."""
    from dymu.api import encoder_merging
    from dymu.data import bundled_image
    from dymu.methods import ToMe

    _, model, processor = tiny
    photos = [bundled_image(name) for name in ("coins", "camera")]
    dymu.apply(model, merge="tome:r=3")
    result = calibrate_vtw(model, processor, photos, threshold=0.05, batch_size=2, progress=False)
    assert encoder_merging(model) == {"merge": ToMe(r=3)}
    inputs = processor(images=photos, text=[result.prompt] * 2, return_tensors="pt")
    with torch.no_grad():
        full = model(**inputs).logits[:, -1]
        dymu.apply(model, merge="tome:r=3", prune="vtw:k=2")
        withdrawn = model(**inputs).logits[:, -1]
        dymu.apply(model, None)
        unmerged = model(**inputs).logits[:, -1]
    assert not torch.allclose(full, unmerged), "r=3 changes the model: the test would not tell merged from unmerged"
    expected = float(kl_divergence(withdrawn, full).mean())
    assert math.isclose(result.kl[2], expected, rel_tol=1e-6, abs_tol=1e-12)
    dymu.remove(model)


def test_calibrate_vtw_command(tiny, image_paths, tmp_path, capsys):
    from dymu.cli import main

    folder, _, _ = tiny
    out = tmp_path / "vtw.json"
    assert main(["calibrate-vtw", str(folder), *image_paths[:4], "--out", str(out), "--limit", "3", "--kl", "1e9"]) == 0
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["format"] == "dymu-vtw-calibration" and data["version"] == 1 and data["samples"] == 3
    assert data["k"] == 1 and 'prune="vtw:k=1"' in printed  # any KL qualifies at the first candidate
    assert main(["calibrate-vtw", str(folder), *image_paths[:2], "--out", str(tmp_path / "missing" / "x.json")]) == 2
    assert main(["calibrate-vtw", str(folder), *image_paths[:2], "--out", str(tmp_path / "tome.json"), "--merge",
                 "tome:r=2", "--kl", "1e9"]) == 0
    assert json.loads((tmp_path / "tome.json").read_text())["k"] == 1
    assert main(["calibrate-vtw", str(folder), *image_paths[:2], "--out", str(out), "--merge", "tome:r=2",
                 "--thresholds", str(out)]) == 2  # alternatives: one line, before any model loads
