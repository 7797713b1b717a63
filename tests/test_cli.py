"""Command line: outputs, clear one-line errors, reference import."""

import json
import math
from pathlib import Path

import pytest
import torch

from dymu.cli import main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def clip_thresholds(tmp_path_factory, model_dirs, image_paths):
    out = tmp_path_factory.mktemp("thr") / "clip.json"
    assert main(["find-thresholds", str(model_dirs["tiny-clip"]), *image_paths[:8], "--target-tokens", "250",
                 "--batch-size", "8", "--out", str(out)]) == 0
    return out


def test_find_thresholds_writes_a_versioned_file(clip_thresholds):
    data = json.loads(Path(clip_thresholds).read_text())
    assert data["format"] == "dymu-thresholds" and data["version"] == 1
    assert data["model"]["num_layers"] == 4 and data["model"]["hidden_size"] == 64
    assert len(data["thresholds"]) == 4 and data["target_tokens"] == 250 and data["schedule"] == "constant"
    assert data["achieved_tokens"]["count"] == 8 and data["images"]["count"] == 8


def test_encode_table_json_and_viz(capsys, model_dirs, image_dir, clip_thresholds, tmp_path):
    images = [image_dir / "checkerboard.png", image_dir / "grass.png"]
    code, out, _ = run(capsys, "encode", model_dirs["tiny-clip"], *images, "--thresholds", clip_thresholds, "--json")
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [Path(r["image"]).name for r in rows] == ["checkerboard.png", "grass.png"]
    assert all(r["patches"] == 576 for r in rows) and rows[0]["tokens"] < rows[1]["tokens"]
    code, out, _ = run(capsys, "encode", model_dirs["tiny-clip"], *images, "--thresholds", clip_thresholds,
                       "--viz", tmp_path / "viz")
    assert code == 0 and "checkerboard.png" in out and "mean" in out
    assert sorted(p.name for p in (tmp_path / "viz").iterdir()) == ["checkerboard.png", "grass.png", "overview.png"]


def test_encode_viz_on_a_384px_patch14_tower(capsys, model_dirs, image_dir, tmp_path):
    """SigLIP 384 px / patch 14: 27x27 patches cover 378 px; the merge maps must still be drawn."""
    thresholds = tmp_path / "siglip.json"
    images = [image_dir / "checkerboard.png", image_dir / "coins.png"]
    assert run(capsys, "find-thresholds", model_dirs["tiny-siglip"], *images, "--target-tokens", "500",
               "--out", thresholds, "--measure", "0")[0] == 0
    code, out, err = run(capsys, "encode", model_dirs["tiny-siglip"], *images, "--thresholds", thresholds,
                         "--viz", tmp_path / "viz")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "viz").iterdir()) == ["checkerboard.png", "coins.png", "overview.png"]


def test_failed_encode_leaves_no_viz_folder(capsys, model_dirs, clip_thresholds, tmp_path):
    corrupt = tmp_path / "only.png"
    corrupt.write_bytes(b"nope")
    _one_line_error(*run(capsys, "encode", model_dirs["tiny-clip"], corrupt, "--thresholds", clip_thresholds,
                         "--viz", tmp_path / "viz")[::2], "no readable images")
    assert not (tmp_path / "viz").exists()


def test_corrupt_image_in_folder_is_skipped_and_reported(capsys, model_dirs, image_dir, clip_thresholds, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "a.png").write_bytes((image_dir / "coins.png").read_bytes())
    (folder / "b.jpg").write_bytes(b"garbage")
    (folder / "notes.txt").write_text("ignored: not an image type")
    code, out, err = run(capsys, "encode", model_dirs["tiny-clip"], folder, "--thresholds", clip_thresholds, "--json")
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [(Path(r["image"]).name, "error" in r) for r in rows] == [("a.png", False), ("b.jpg", True)], "as --out writes"
    assert "skipped 1 image" in err and "b.jpg" in err
    code, _, err = run(capsys, "find-thresholds", model_dirs["tiny-clip"], folder, "--target-tokens", "300",
                       "--out", tmp_path / "t.json")
    assert code == 0 and "b.jpg" in err
    assert [s["image"] for s in json.loads((tmp_path / "t.json").read_text())["images"]["skipped"]] == [str(folder / "b.jpg")]


def _one_line_error(code, err, *fragments):
    assert code == 2
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_bad_inputs_give_clear_errors(capsys, model_dirs, image_dir, clip_thresholds, tmp_path):
    clip_dir = model_dirs["tiny-clip"]
    _one_line_error(*run(capsys, "encode", clip_dir, tmp_path / "missing.png", "--thresholds", clip_thresholds)[::2],
                    "image not found", "missing.png")
    (tmp_path / "doc.txt").write_text("x")
    _one_line_error(*run(capsys, "encode", clip_dir, tmp_path / "doc.txt", "--thresholds", clip_thresholds)[::2],
                    "unsupported image type", "doc.txt")
    (tmp_path / "empty").mkdir()
    _one_line_error(*run(capsys, "encode", clip_dir, tmp_path / "empty", "--thresholds", clip_thresholds)[::2],
                    "no images", "empty")
    corrupt = tmp_path / "only.png"
    corrupt.write_bytes(b"nope")
    _one_line_error(*run(capsys, "encode", clip_dir, corrupt, "--thresholds", clip_thresholds)[::2], "no readable images")
    image = image_dir / "coins.png"
    _one_line_error(*run(capsys, "encode", tmp_path / "no-such-model", image, "--thresholds", clip_thresholds)[::2],
                    "model folder not found", "no-such-model")
    _one_line_error(*run(capsys, "encode", model_dirs["tiny-siglip"], image, "--thresholds", clip_thresholds)[::2],
                    "model_type", "clip_vision_model", "siglip_vision_model")
    wrong_layers = json.loads(Path(clip_thresholds).read_text())
    wrong_layers["thresholds"] = wrong_layers["thresholds"] + [0.5]
    (tmp_path / "wrong.json").write_text(json.dumps(wrong_layers))
    _one_line_error(*run(capsys, "encode", clip_dir, image, "--thresholds", tmp_path / "wrong.json")[::2],
                    "5 layer thresholds", "4 layers")
    (tmp_path / "bad.json").write_text("{not json")
    _one_line_error(*run(capsys, "encode", clip_dir, image, "--thresholds", tmp_path / "bad.json")[::2], "not valid JSON")
    future = dict(wrong_layers, version=99)
    (tmp_path / "future.json").write_text(json.dumps(future))
    _one_line_error(*run(capsys, "encode", clip_dir, image, "--thresholds", tmp_path / "future.json")[::2], "version 99")
    _one_line_error(*run(capsys, "encode", clip_dir, image, "--thresholds", tmp_path / "absent.json")[::2],
                    "thresholds file not found")
    _one_line_error(*run(capsys, "find-thresholds", clip_dir, image, "--target-tokens", "5", "--out", tmp_path / "x.json")[::2],
                    "target 5 tokens")
    _one_line_error(*run(capsys, "find-thresholds", clip_dir, image, "--target-tokens", "9999", "--out", tmp_path / "x.json")[::2],
                    "--target-tokens")
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"image": "x"}))
    _one_line_error(*run(capsys, "find-thresholds", clip_dir, manifest, "--target-tokens", "300", "--out", tmp_path / "x.json")[::2],
                    "manifest must be a JSON list")


def test_manifest_with_image_root(capsys, model_dirs, image_dir, clip_thresholds, tmp_path):
    manifest = tmp_path / "train.json"
    manifest.write_text(json.dumps([{"image": "coins.png"}, {"id": 3}, {"image": "moon.png"}]))
    code, out, err = run(capsys, "encode", model_dirs["tiny-clip"], manifest, "--image-root", image_dir,
                         "--thresholds", clip_thresholds, "--json")
    assert code == 0 and [Path(json.loads(l)["image"]).name for l in out.splitlines()] == ["coins.png", "moon.png"]
    assert "train.json[1]" in err


def test_make_model_presets(capsys, tmp_path):
    from dymu.models import load_model

    code, out, _ = run(capsys, "make-model", "tiny-siglip", tmp_path / "s", "--seed", "3", "--layers", "2")
    assert code == 0
    model = load_model(tmp_path / "s")
    assert type(model).__name__ == "SiglipVisionModel" and model.config.num_hidden_layers == 2
    assert (tmp_path / "s" / "preprocessor_config.json").is_file()
    code, _, err = run(capsys, "make-model", "tiny-siglip", tmp_path / "t", "--layers", "0")
    assert code == 2 and "--layers" in err


def test_full_clip_checkpoint_loads_its_vision_side(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    from dymu.models import load_model

    config = CLIPConfig(text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2),
                        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                           image_size=56, patch_size=14), projection_dim=8)
    torch.manual_seed(0)
    full = CLIPModel(config).eval()
    full.save_pretrained(tmp_path / "clip")
    vision = load_model(tmp_path / "clip")
    assert type(vision).__name__ == "CLIPVisionModel"
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(vision(x).last_hidden_state, full.vision_model(x).last_hidden_state, rtol=0, atol=0)


def _reference_checkpoint(path, prefix, blocks, values, name, extra=None):
    state = {f"{prefix}.{i}.threshold": torch.tensor(v, dtype=torch.bfloat16) for i, v in zip(range(blocks), values)}
    state.update(extra or {})
    torch.save({"name": name, "state_dict": state}, path)


def test_import_reference_clip_checkpoint(capsys, tmp_path, model_dirs):
    values = [0.99609375, 0.97265625, 1.0, 0.84765625]
    ckpt = tmp_path / "clip_72out.pt"
    extra = {"module.visual.conv1.weight": torch.zeros(64, 3, 14, 14),
             "module.visual.positional_embedding": torch.zeros(577, 64)}
    _reference_checkpoint(ckpt, "module.visual.transformer.resblocks", 4, values, "ViT-L-14-336-tome-72out-linear", extra)
    out = tmp_path / "imported.json"
    code, stdout, _ = run(capsys, "import-thresholds", ckpt, "--out", out)
    assert code == 0
    data = json.loads(out.read_text())
    # 1.0 is the reference's never-updated sentinel -> never merge (null)
    assert data["thresholds"] == [0.99609375, 0.97265625, None, 0.84765625]
    assert data["model"]["model_type"] == "clip_vision_model" and data["model"]["num_layers"] == 4
    assert (data["model"]["hidden_size"], data["model"]["image_size"], data["model"]["patch_size"]) == (64, 336, 14)
    assert data["target_tokens"] == 72 and data["schedule"] == "linear"
    # it applies to a matching HF model (tiny-clip has width 64, 336px, patch 14, 4 layers)
    import dymu
    from dymu.models import load_model

    model = load_model(model_dirs["tiny-clip"])
    dymu.apply(model, out)
    from dymu.vision import get_patch

    assert get_patch(model).state.thresholds[2] == math.inf


def test_import_reference_onevision_checkpoint_drops_last_layer(capsys, tmp_path):
    ckpt = tmp_path / "ov.pt"
    _reference_checkpoint(ckpt, "module.vision_model.encoder.layers", 27, [0.9] * 27, "google/siglip-so400m-patch14-384-81out")
    out = tmp_path / "ov.json"
    code, _, _ = run(capsys, "import-thresholds", ckpt, "--out", out, "--num-layers", "26")
    assert code == 0
    data = json.loads(out.read_text())
    assert len(data["thresholds"]) == 26 and data["model"]["model_type"] == "siglip_vision_model"
    assert (data["model"]["hidden_size"], data["model"]["patch_size"]) == (1152, 14)


def test_import_rejects_non_threshold_checkpoints(capsys, tmp_path):
    torch.save({"state_dict": {"visual.conv1.weight": torch.zeros(1)}}, tmp_path / "plain.pt")
    _one_line_error(*run(capsys, "import-thresholds", tmp_path / "plain.pt", "--out", tmp_path / "x.json")[::2], "no per-block")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    _one_line_error(*run(capsys, "import-thresholds", tmp_path / "junk.pt", "--out", tmp_path / "x.json")[::2], "not a readable torch checkpoint")


def test_vlm_folder_uses_its_tower_processor_and_feature_layer(capsys, image_paths, tmp_path):
    """A LLaVA checkpoint folder: thresholds cover its 4 tower layers, merging stops at vision_feature_layer=-2."""
    from dymu.models import make_image_processor

    from .test_encoder import _tiny_llava

    folder = tmp_path / "llava"
    _tiny_llava().save_pretrained(folder)
    make_image_processor("clip", 336).save_pretrained(folder)
    out = tmp_path / "llava.json"
    code, _, err = run(capsys, "find-thresholds", folder, *image_paths[:6], "--target-tokens", "250", "--out", out)
    assert code == 0, err
    data = json.loads(out.read_text())
    assert data["model"]["read_layer"] == 2 and data["budgets"][3] == 0 and data["thresholds"][3] is None
    assert sum(data["budgets"]) == 576 - 250
    code, stdout, _ = run(capsys, "encode", folder, *image_paths[:6], "--thresholds", out, "--json")
    assert code == 0 and len(stdout.splitlines()) == 6


def test_encode_json_into_a_closed_pipe_exits_quietly(capsys, monkeypatch, model_dirs, image_paths, clip_thresholds):
    """`dymu encode --json | head -1`: the reader goes away; no traceback, exit 141 like a SIGPIPE'd tool."""
    import os
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)
    pipe = os.fdopen(write_end, "w")
    monkeypatch.setattr(sys, "stdout", pipe)
    code = main(["encode", str(model_dirs["tiny-clip"]), *image_paths[:2], "--thresholds", str(clip_thresholds), "--json"])
    monkeypatch.undo()
    assert code == 141
    assert capsys.readouterr().err.count("error") == 0
    print("more output", file=pipe)
    pipe.close()  # stdout now goes to devnull: flushing at exit raises nothing


def test_thresholds_repr_is_short(clip_thresholds):
    from dymu import Thresholds

    text = repr(Thresholds.load(clip_thresholds))
    assert "\n" not in text and "png" not in text and len(text) < 200, text
    assert "/4 merging layers" in text and "8 images" in text and "target 250" in text


def _subcommands():
    import argparse

    from dymu.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return subparsers.choices.items()


@pytest.mark.parametrize("command,parser", _subcommands())
def test_every_option_has_help_that_states_its_default(command, parser):
    for action in parser._actions:
        if action.dest == "help":
            continue
        text = (action.help or "") % dict(vars(action), prog=parser.prog)
        assert text.strip(), f"{command} {action.option_strings or action.dest}: no help"
        if action.default not in (None, False):
            assert str(action.default) in text, f"{command} {action.option_strings}: default {action.default} not shown: {text}"
        assert "dymu." not in text, f"{command} {action.option_strings}: points at source code: {text}"


def test_make_model_refuses_a_non_empty_folder_unless_overwrite(capsys, tmp_path):
    from dymu.models import load_model, load_processor

    folder, fresh = tmp_path / "m", tmp_path / "fresh"
    assert run(capsys, "make-model", "tiny-llava", folder, "--layers", "1")[0] == 0
    _one_line_error(*run(capsys, "make-model", "tiny-siglip", folder, "--layers", "1")[::2], str(folder), "not empty", "--overwrite")
    assert type(load_model(folder)).__name__ == "LlavaForConditionalGeneration", "a refused run leaves the folder as it was"
    assert run(capsys, "make-model", "tiny-siglip", folder, "--layers", "1", "--overwrite")[0] == 0
    assert run(capsys, "make-model", "tiny-siglip", fresh, "--layers", "1")[0] == 0
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in fresh.iterdir()), "no stale files of the old model"
    assert load_processor(folder).size["height"] == load_model(folder).config.image_size == 384
    (tmp_path / "file").write_text("x")
    _one_line_error(*run(capsys, "make-model", "tiny-siglip", tmp_path / "file", "--overwrite")[::2], "file", "not a folder")


def test_output_paths_are_checked_before_any_work(capsys, model_dirs, image_paths, tmp_path):
    clip_dir, images = model_dirs["tiny-clip"], image_paths[:2]
    find = ("find-thresholds", clip_dir, *images, "--target-tokens", "300", "--measure", "0", "--out")
    code, _, err = run(capsys, *find, tmp_path / "missing" / "t.json")
    _one_line_error(code, err, "--out", str(tmp_path / "missing"), "does not exist")
    assert "model:" not in err, "refused before loading the model"
    (tmp_path / "folder").mkdir()
    code, _, err = run(capsys, *find, tmp_path / "folder")
    _one_line_error(code, err, "--out", "is a folder")
    assert "model:" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"] and not any((tmp_path / "folder").iterdir()), \
        "no .tmp / .partial files left behind"
    _one_line_error(*run(capsys, "import-thresholds", tmp_path / "absent.pt", "--out", tmp_path / "folder")[::2],
                    "--out", "is a folder")
    (tmp_path / "file.png").write_text("x")
    code, _, err = run(capsys, "encode", clip_dir, *images, "--thresholds", tmp_path / "t.json", "--viz", tmp_path / "file.png")
    _one_line_error(code, err, "--viz", "not a folder")
    _one_line_error(*run(capsys, "convert-llava", tmp_path / "folder", tmp_path / "file.png")[::2], "file.png", "not a folder")


def test_viz_gives_every_image_its_own_file(capsys, model_dirs, image_dir, clip_thresholds, tmp_path):
    from PIL import Image

    from dymu.cli import _viz_names

    folder = tmp_path / "imgs"
    for sub, name, source in [("a", "img.png", "coins"), ("b", "img.png", "moon"), ("a", "img.jpg", "camera"),
                              ("b", "overview.png", "grass")]:
        (folder / sub).mkdir(parents=True, exist_ok=True)
        Image.open(image_dir / f"{source}.png").save(folder / sub / name)
    code, _, err = run(capsys, "encode", model_dirs["tiny-clip"], folder, "--thresholds", clip_thresholds, "--viz", tmp_path / "viz")
    assert code == 0, err
    written = sorted(p.name for p in (tmp_path / "viz").iterdir())
    assert len(written) == 5 and "overview.png" in written, written
    paths = sorted(str(p) for p in folder.rglob("*.*"))
    names = _viz_names(paths)
    assert sorted(f"{n}.png" for n in names.values()) + ["overview.png"] == written
    assert _viz_names(paths[::-1]) == names, "a file's name does not depend on the order or the run"


#: far below the ~30 s of hub retries a mistyped name used to cost offline, far above a local check
FAST_FAILURE_SECONDS = 5


@pytest.mark.parametrize("name,offline,fragment", [
    ("tiny-clp", True, "HF_HUB_OFFLINE"),  # a valid hub id, absent from the hub cache
    ("models/tiny-clp", False, "model folder not found"),  # models/ is a local folder: a path, not org/name
    ("my model", False, "model folder not found"),  # not a valid hub id
])
def test_mistyped_model_name_fails_at_once(capsys, monkeypatch, tmp_path, image_paths, name, offline, fragment):
    import time

    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    from transformers import AutoConfig  # noqa: F401  (imported before the clock starts)

    start = time.perf_counter()
    code, _, err = run(capsys, "find-thresholds", name, image_paths[0], "--target-tokens", "300", "--out", "t.json")
    assert time.perf_counter() - start < FAST_FAILURE_SECONDS
    _one_line_error(code, err, fragment, name)


def test_every_image_failing_says_why_in_the_error(capsys, model_dirs, clip_thresholds, tmp_path):
    corrupt = tmp_path / "only.png"
    corrupt.write_bytes(b"nope")
    clip_dir = model_dirs["tiny-clip"]
    _one_line_error(*run(capsys, "encode", clip_dir, corrupt, "--thresholds", clip_thresholds)[::2],
                    "no readable images", "only.png", "cannot read image")
    _one_line_error(*run(capsys, "find-thresholds", clip_dir, corrupt, "--target-tokens", "300", "--out", tmp_path / "t.json")[::2],
                    "no readable images", "only.png", "cannot read image")


def _tower_saved_alone(model_dir, folder):
    """The model of a make-model folder saved with save_pretrained alone: no preprocessor_config.json."""
    from dymu.models import load_model

    load_model(model_dir).save_pretrained(folder)
    assert not list(folder.glob("*processor*"))
    return folder


def test_tower_without_processor_config_uses_its_family_standard_processor(capsys, model_dirs, image_paths, tmp_path):
    clip_dir, images = model_dirs["tiny-clip"], image_paths[:2]
    bare = _tower_saved_alone(clip_dir, tmp_path / "bare")
    out = tmp_path / "t.json"
    code, _, err = run(capsys, "find-thresholds", bare, *images, "--target-tokens", "300", "--batch-size", "2",
                       "--measure", "0", "--out", out)
    assert code == 0, err
    notes = [line for line in err.splitlines() if "preprocessor_config.json" in line]
    assert len(notes) == 1 and "standard CLIP image processor" in notes[0] and "--processor" in notes[0], err
    encoded = {}
    for model, extra in [(bare, ()), (clip_dir, ()), (bare, ("--processor", clip_dir))]:
        code, stdout, err = run(capsys, "encode", model, *images, "--thresholds", out, "--json", *extra)
        assert code == 0, err
        encoded[(str(model), extra)] = [json.loads(line)["tokens"] for line in stdout.splitlines()]
        assert ("preprocessor_config.json" in err) == (model == bare and not extra)
    # make-model saved the family's standard processor with the original folder: the same tokens everywhere
    assert len({tuple(tokens) for tokens in encoded.values()}) == 1, encoded
    _one_line_error(*run(capsys, "encode", bare, *images, "--thresholds", out, "--processor", bare)[::2],
                    str(bare), "no image processor")
    _one_line_error(*run(capsys, "encode", bare, *images, "--thresholds", out, "--processor", tmp_path / "nowhere")[::2],
                    "nowhere", "not found")


def test_api_builds_the_standard_processor_of_a_siglip_without_one(model_dirs, image_paths, tmp_path):
    import dymu
    from dymu.models import load_model, load_processor

    bare = load_model(_tower_saved_alone(model_dirs["tiny-siglip"], tmp_path / "bare"))
    kwargs = dict(target_tokens=400, batch_size=2, progress=False, measure=0)
    with pytest.warns(UserWarning, match="standard SigLIP image processor") as notes:
        found = dymu.find_thresholds(bare, image_paths[:2], **kwargs)
    assert len(notes) == 1
    assert found.values == dymu.find_thresholds(bare, image_paths[:2], processor=load_processor(model_dirs["tiny-siglip"]), **kwargs).values


def _json_lines(path):
    """The rows of a dymu encode --out file (after its header line)."""
    lines = [json.loads(line) for line in Path(path).read_text().splitlines()]
    assert lines[0]["format"] == "dymu-encode" and lines[0]["model"]["fingerprint"]["weights"]
    return lines[1:]


def test_encode_out_killed_and_resumed_writes_every_image_exactly_once(capsys, monkeypatch, model_dirs, image_paths,
                                                                      clip_thresholds, tmp_path):
    from collections import Counter

    from dymu.journal import Appender

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    # batches of 3: [0, 1, 2], [3, broken, 4], [5, 6, 0] (image 0 listed twice: two rows)
    images = [*image_paths[:4], bad, *image_paths[4:7], image_paths[0]]
    common = ("encode", model_dirs["tiny-clip"], *images, "--thresholds", clip_thresholds, "--batch-size", "3")
    full = tmp_path / "full.jsonl"
    code, out, err = run(capsys, *common, "--out", full, "--workers", "0")
    assert code == 0 and "tokens over 8 images" in out and "skipped 1 image" in err
    uninterrupted = _json_lines(full)
    assert [r["image"] for r in uninterrupted] == [*image_paths[:3], image_paths[3], image_paths[4], str(bad),
                                                   *image_paths[5:7], image_paths[0]]
    assert "cannot read image" in uninterrupted[5]["error"]

    written, real_write = [], Appender.write

    def killed_mid_row(self, row):  # the 5th row (image 4, in batch 1) is cut short by the kill
        written.append(row)
        if len(written) == 5:
            self._file.write(json.dumps(row)[:10])
            self._file.flush()
            raise KeyboardInterrupt
        real_write(self, row)

    monkeypatch.setattr(Appender, "write", killed_mid_row)
    part = tmp_path / "part.jsonl"
    assert run(capsys, *common, "--out", part, "--workers", "2")[0] == 130
    monkeypatch.undo()
    assert part.read_text().count("\n") == 5, "the header, four whole rows and a cut one"
    _one_line_error(*run(capsys, *common, "--out", part, "--workers", "2")[::2], "--out", "exists", "--resume")
    code, out, err = run(capsys, *common, "--out", part, "--resume", "--workers", "2")
    assert code == 0, err
    assert "resuming" in err and "4 image(s) done, 2 batch(es) to go" in err
    resumed = _json_lines(part)
    assert resumed == uninterrupted, "every image exactly once, as in one run"
    assert Counter(r["image"] for r in resumed) == Counter(map(str, images))
    assert "tokens over 8 images" in out and "skipped 1 image" in err
    code, out, err = run(capsys, *common, "--out", part, "--resume")
    assert code == 0 and _json_lines(part) == uninterrupted and "0 batch(es) to go" in err


def test_encode_out_and_resume_errors(capsys, model_dirs, image_paths, clip_thresholds, tmp_path):
    common = ("encode", model_dirs["tiny-clip"], image_paths[0], "--thresholds", clip_thresholds)
    _one_line_error(*run(capsys, *common, "--resume")[::2], "--resume", "--out FILE")
    _one_line_error(*run(capsys, *common, "--out", tmp_path / "r.jsonl", "--resume", "--viz", tmp_path / "v")[::2], "--viz", "--resume")
    (tmp_path / "other.jsonl").write_text('{"image": "a.png", "tokens": 3}\n[1, 2]\n{"cut')  # rows without a header
    _one_line_error(*run(capsys, *common, "--out", tmp_path / "other.jsonl", "--resume")[::2], "other.jsonl",
                    "not a file of dymu encode", "left unchanged")
    assert (tmp_path / "other.jsonl").read_text() == '{"image": "a.png", "tokens": 3}\n[1, 2]\n{"cut'
    out = tmp_path / "rows.jsonl"
    assert run(capsys, *common, "--out", out)[0] == 0
    out.write_text(out.read_text() + '[1, 2]\n')
    _one_line_error(*run(capsys, *common, "--out", out, "--resume")[::2], "rows.jsonl", "line 3")
    _one_line_error(*run(capsys, *common, "--workers", "-1")[::2], "--workers must be >= 0")
