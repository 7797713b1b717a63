"""Inputs a user has (issue 23): bounded images, the stock pipeline's pixels, malformed files, manifests."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dymu.cli import main
from dymu.images import load_batch, open_image

#: a PNG bigger than PIL's decompression-bomb limit (2 x Image.MAX_IMAGE_PIXELS): 225 megapixels
BOMB_SIDE = 15000
#: a 1 x 20000 PNG: the CLIP processor would scale it to 336 x 6720000
SLIVER = (1, 20000)


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err, *fragments):
    assert code == 2, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def huge_images(tmp_path_factory):
    """(bomb, sliver): a 15000x15000 1-bit PNG (28 MB to build, 30 kB on disk) and a 1x20000 one."""
    folder = tmp_path_factory.mktemp("huge")
    Image.new("1", (BOMB_SIDE, BOMB_SIDE)).save(folder / "bomb.png")
    Image.new("L", SLIVER).save(folder / "sliver.png")
    return folder / "bomb.png", folder / "sliver.png"


class RecordingProcessor:
    """A processor stand-in that records the sizes it is handed (a real one would need gigabytes for the sliver)."""

    do_convert_rgb = True

    def __init__(self):
        self.sizes = []

    def __call__(self, images, return_tensors):
        self.sizes += [image.size for image in images]
        return {"pixel_values": torch.zeros(len(images), 3, 2, 2)}


# --- 9. bounded images ---------------------------------------------------------------------------------------------

def test_huge_and_extreme_images_are_skipped_from_the_header_with_the_reason(huge_images, image_paths):
    bomb, sliver = huge_images
    assert sliver.stat().st_size < 200
    processor = RecordingProcessor()
    pixels, names, failures = load_batch([bomb, image_paths[0], sliver], processor)
    assert names == [image_paths[0]] and processor.sizes == [Image.open(image_paths[0]).size]
    reasons = {Path(f["image"]).name: f["error"] for f in failures}
    assert "15000x15000" in reasons["bomb.png"] and "--max-pixels" in reasons["bomb.png"]
    assert "1x20000" in reasons["sliver.png"] and "--max-aspect-ratio" in reasons["sliver.png"]
    from dymu.images import ImageLimits

    # the limits are the user's: raised, the sliver reaches the processor (the bomb is refused by its size alone)
    processor = RecordingProcessor()
    load_batch([sliver], processor, ImageLimits(max_aspect_ratio=SLIVER[1]))
    assert processor.sizes == [SLIVER]
    with pytest.raises(ValueError, match="max-aspect-ratio"):
        ImageLimits(max_aspect_ratio=0.5)


def test_in_memory_images_are_bounded_too():
    processor = RecordingProcessor()
    _, names, failures = load_batch([Image.new("RGB", SLIVER)], processor)
    assert names == [] and processor.sizes == [] and "aspect ratio" in failures[0]["error"]


def test_commands_skip_huge_images_and_resume_past_them(capsys, huge_images, model_dirs, image_paths, tmp_path):
    bomb, sliver = huge_images
    images = [image_paths[0], bomb, image_paths[1], sliver, image_paths[2]]
    model = model_dirs["tiny-clip"]
    thresholds = tmp_path / "t.json"
    code, _, err = run(capsys, "find-thresholds", model, *images, "--target-tokens", "300", "--batch-size", "2",
                       "--out", thresholds, "--workers", "0", "--measure", "0")
    assert code == 0 and "Traceback" not in err, err
    assert "skipped 2 image(s)" in err and "15000x15000" in err and "1x20000" in err
    out_file = tmp_path / "rows.jsonl"
    code, _, err = run(capsys, "encode", model, *images, "--thresholds", thresholds, "--batch-size", "2",
                       "--out", out_file, "--workers", "0")
    assert code == 0, err
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [Path(r["image"]).name for r in rows if "error" in r] == ["bomb.png", "sliver.png"]
    # killed after the first batch: the resumed run passes the bomb's batch
    out_file.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    code, _, err = run(capsys, "encode", model, *images, "--thresholds", thresholds, "--batch-size", "2",
                       "--out", out_file, "--resume", "--workers", "0")
    assert code == 0, err
    assert [json.loads(line) for line in out_file.read_text().splitlines()] == rows
    # the limits are the user's (a 10x300 image, ratio 30: the processor makes it 336x10080)
    Image.new("RGB", (10, 300)).save(tmp_path / "wide.png")
    code, _, err = run(capsys, "encode", model, image_paths[0], tmp_path / "wide.png", "--thresholds", thresholds, "--json")
    assert code == 0 and "aspect ratio 30.0" in err
    code, out, err = run(capsys, "encode", model, tmp_path / "wide.png", "--thresholds", thresholds, "--json",
                         "--max-aspect-ratio", "30")
    assert code == 0 and json.loads(out)["patches"] == 576, err


def test_generate_names_a_huge_image_in_one_line(capsys, huge_images, tiny_llava_dir):
    one_line_error(*run(capsys, "generate", tiny_llava_dir, "--image", huge_images[0], "--prompt", "What?")[::2],
                   "bomb.png", "--max-pixels")


# --- 11. the stock pipeline's pixels -------------------------------------------------------------------------------

def _unusual_images(folder: Path) -> list[Path]:
    """Files of modes that RGB conversion treats differently, each with transparent or out-of-8-bit pixels."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (40, 52), dtype=np.uint8)
    files = {
        "rgba.png": Image.fromarray(np.dstack([rgb, alpha]), "RGBA"),
        "la.png": Image.fromarray(np.dstack([rgb[..., 0], alpha]), "LA"),
        "i16.png": Image.fromarray(rgb[..., 0].astype(np.uint16) * 257),
        "cmyk.tif": Image.fromarray(rgb).convert("CMYK"),
        "one.png": Image.fromarray(alpha > 128),
        "one.tif": Image.fromarray(alpha > 128),
    }
    for name, image in files.items():
        image.save(folder / name)
    palette = Image.fromarray(rgb).quantize(16)
    palette.save(folder / "palette.png", transparency=int(np.asarray(palette)[0, 0]))
    paths = [folder / name for name in (*files, "palette.png")]
    assert {Image.open(p).mode for p in paths} == {"RGBA", "LA", "I;16", "CMYK", "1", "P"}
    assert "transparency" in Image.open(folder / "palette.png").info
    return paths


@pytest.fixture(scope="module")
def unusual_images(tmp_path_factory):
    return _unusual_images(tmp_path_factory.mktemp("modes"))


def _stock(processor, path):
    return processor(images=Image.open(path), return_tensors="pt")["pixel_values"]


@pytest.mark.parametrize("family", ["tiny-clip", "tiny-siglip"])
def test_images_reach_the_processor_as_in_the_stock_pipeline(family, model_dirs, unusual_images):
    from dymu.models import load_processor

    processor = load_processor(model_dirs[family])
    pixels, names, failures = load_batch(unusual_images, processor)
    assert not failures and names == [str(p) for p in unusual_images]
    for row, path in zip(pixels, unusual_images):
        assert torch.equal(row, _stock(processor, path)[0]), path.name
    in_memory, _, _ = load_batch([Image.open(p) for p in unusual_images], processor)
    assert torch.equal(in_memory, pixels)


def test_a_processor_that_does_not_convert_gets_the_stock_conversion(model_dirs, unusual_images):
    from dymu.models import load_processor

    processor = load_processor(model_dirs["tiny-clip"])
    plain = load_processor(model_dirs["tiny-clip"])
    plain.do_convert_rgb = False
    pixels, _, failures = load_batch(unusual_images, plain)
    assert not failures and torch.equal(pixels, load_batch(unusual_images, processor)[0])


def test_generate_and_calibrate_see_the_stock_pixels(monkeypatch, capsys, tiny_llava_dir, unusual_images, tmp_path):
    """generate and calibrate-vtw hand the processor the image as opened: the full processor's pixel_values are the
    stock ones."""
    from dymu.models import load_processor

    processor = load_processor(tiny_llava_dir, full=True)
    rgba = unusual_images[0]
    seen = []
    real = type(processor).__call__

    def spy(self, *args, **kwargs):
        result = real(self, *args, **kwargs)
        if "pixel_values" in result:
            seen.append(result["pixel_values"])
        return result

    monkeypatch.setattr(type(processor), "__call__", spy)
    stock = processor.image_processor(images=Image.open(rgba), return_tensors="pt")["pixel_values"]
    code, _, err = run(capsys, "generate", tiny_llava_dir, "--image", rgba, "--prompt", "What?", "--max-new-tokens", "1")
    assert code == 0, err
    code, _, err = run(capsys, "calibrate-vtw", tiny_llava_dir, rgba, "--out", tmp_path / "k.json", "--first-layer", "1")
    assert code == 0, err
    assert len(seen) >= 2 and all(torch.equal(values, stock) for values in seen)
    assert open_image(rgba).mode == "RGBA", "the image keeps its mode: the processor converts it"


# --- 10. --max-new-tokens ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["0", "-3", "many"])
def test_max_new_tokens_below_one_is_refused_before_the_model_loads(monkeypatch, capsys, tiny_llava_dir, image_paths, value):
    import dymu.models

    monkeypatch.setattr(dymu.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as exit:
        main(["generate", str(tiny_llava_dir), "--image", image_paths[0], "--prompt", "What?", "--max-new-tokens", value])
    assert exit.value.code == 2 and "--max-new-tokens" in capsys.readouterr().err


def test_max_new_tokens_beyond_the_context_is_refused(monkeypatch, capsys, tiny_llava_dir, image_paths):
    import dymu.models

    context = dymu.models.load_config(tiny_llava_dir)[1].text_config.max_position_embeddings
    real_load = dymu.models.load_model
    monkeypatch.setattr(dymu.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    common = ("generate", tiny_llava_dir, "--image", image_paths[0], "--prompt", "What?", "--max-new-tokens")
    one_line_error(*run(capsys, *common, context + 1)[::2], f"--max-new-tokens {context + 1}", f"{context} positions",
                   "max_position_embeddings")
    monkeypatch.setattr(dymu.models, "load_model", real_load)  # fits alone, not after the 600-token prompt
    one_line_error(*run(capsys, *common, context - 10)[::2], f"--max-new-tokens {context - 10}", "-token prompt",
                   f"{context} positions")


# --- 12. malformed files -------------------------------------------------------------------------------------------

def _thresholds_json(**changes) -> str:
    data = {"format": "dymu-thresholds", "version": 1, "model": {"model_type": "clip_vision_model", "num_layers": 4},
            "thresholds": [0.9, 0.8, 0.7, None]}
    return json.dumps(data | changes)


DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("text,fragments", [
    (_thresholds_json(model="clip"), ['"model"', "an object"]),
    (_thresholds_json(thresholds=["0.9", "0.8", "0.7", None]), ['"thresholds"[0]', "a string"]),
    (_thresholds_json(thresholds=[0.9, 1.5, 0.7, None]), ['"thresholds"[1]', "between -1 and 1"]),
    (_thresholds_json(thresholds=[0.9, -2, 0.7, None]), ['"thresholds"[1]', "between -1 and 1"]),
    (_thresholds_json(thresholds=[0.9, True, 0.7, None]), ['"thresholds"[1]', "true/false"]),
    (_thresholds_json(thresholds=[0.9, [0.8], 0.7, None]), ['"thresholds"[1]', "a list"]),
    (_thresholds_json(achieved_tokens={"mean": "many", "std": 1}), ['"achieved_tokens"']),
    (_thresholds_json(budgets="all"), ['"budgets"']),
    (_thresholds_json(images={"skipped": 3}), ['"skipped"']),
    (DEEP, ["nested too deeply"]),
])
def test_malformed_thresholds_files_give_one_line_naming_the_file_and_field(capsys, model_dirs, image_paths, tmp_path,
                                                                          text, fragments):
    path = tmp_path / "bad.json"
    path.write_text(text)
    one_line_error(*run(capsys, "encode", model_dirs["tiny-clip"], image_paths[0], "--thresholds", path)[::2],
                   str(path), *fragments)


def test_thresholds_in_range_and_never_merge_are_accepted(tmp_path):
    import math

    from dymu.thresholds import Thresholds

    path = tmp_path / "ok.json"
    path.write_text(_thresholds_json(thresholds=[1, -1, 1.00001, None]))
    assert Thresholds.load(path).values == [1.0, -1.0, 1.00001, math.inf], "rounding of a cosine above 1 is tolerated"
    with pytest.raises(ValueError, match="between -1 and 1"):
        Thresholds(values=[0.5, 3.0])
    with pytest.raises(ValueError, match="a string"):
        Thresholds(values=["0.9"])


def _copy_model(model_dirs, tmp_path):
    import shutil

    return Path(shutil.copytree(model_dirs["tiny-clip"], tmp_path / "model"))


def test_malformed_config_json_gives_one_line(capsys, model_dirs, image_paths, tmp_path):
    model = _copy_model(model_dirs, tmp_path)
    config = json.loads((model / "config.json").read_text())
    common = ("encode", model, image_paths[0], "--merge", "tome:r=2")
    (model / "config.json").write_text(json.dumps([config]))
    one_line_error(*run(capsys, *common)[::2], str(model / "config.json"), "JSON object", "a list")
    (model / "config.json").write_text(DEEP)
    one_line_error(*run(capsys, *common)[::2], str(model / "config.json"), "nested too deeply")
    (model / "config.json").write_text(json.dumps(config | {"dymu": {"thresholds": ["0.9", 0.8, 0.7, None]}}))
    one_line_error(*run(capsys, "encode", model, image_paths[0])[::2], str(model / "config.json"),
                   '"dymu.thresholds"[0]', "a string")


def test_pickle_bearing_weights_are_refused_in_one_line(capsys, model_dirs, image_paths, tmp_path):
    model = _copy_model(model_dirs, tmp_path)
    (model / "model.safetensors").unlink()

    class Payload:
        def __reduce__(self):
            return (print, ("this ran",))

    torch.save({"weight": Payload()}, model / "pytorch_model.bin")
    code, out, err = run(capsys, "encode", model, image_paths[0], "--merge", "tome:r=2")
    one_line_error(code, err, "pytorch_model.bin", "refused")
    assert "this ran" not in out + err


def test_malformed_search_checkpoints_give_one_line(clip, image_paths, tmp_path):
    from dymu.finder import find_thresholds
    from dymu.vision import DymuError

    model, processor = clip
    checkpoint = tmp_path / "search.partial"

    def interrupt(index):
        raise KeyboardInterrupt

    common = dict(target_tokens=300, batch_size=2, processor=processor, checkpoint=checkpoint, num_workers=0, measure=0,
                  progress=False)
    with pytest.raises(KeyboardInterrupt):
        find_thresholds(model, image_paths[:4], on_batch=interrupt, **common)
    header, batch = [json.loads(line) for line in checkpoint.read_text().splitlines()]
    broken = {
        "no config": [{k: v for k, v in header.items() if k != "config"}, batch],
        "statistics": [header, batch | {"statistics": "fast"}],
        "layers": [header, batch | {"statistics": [0.5]}],
        "skipped": [header, batch | {"skipped": [3]}],
    }
    for what, lines in broken.items():
        checkpoint.write_text("".join(json.dumps(line) + "\n" for line in lines))
        with pytest.raises(DymuError) as error:
            find_thresholds(model, image_paths[:4], resume=True, **common)
        assert str(checkpoint) in str(error.value) and "\n" not in str(error.value), what
    checkpoint.write_text(json.dumps(header) + "\n" + DEEP + "\n")
    with pytest.raises(DymuError, match="line 2 is not a JSON object"):
        find_thresholds(model, image_paths[:4], resume=True, **common)


def test_nested_garbage_manifest_gives_one_line(capsys, model_dirs, tmp_path):
    manifest = tmp_path / "set.json"
    manifest.write_text(DEEP)
    one_line_error(*run(capsys, "encode", model_dirs["tiny-clip"], manifest, "--merge", "tome:r=2")[::2],
                   str(manifest), "nested too deeply")


# --- 14. remove on other models, manifests, symlinked folders ------------------------------------------------------

def test_remove_on_a_model_dymu_does_not_support_is_a_no_op():
    from transformers import BertConfig, BertModel

    import dymu

    bert = BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                vocab_size=50))
    state = {k: v.clone() for k, v in bert.state_dict().items()}
    assert dymu.remove(bert) is bert
    assert all(torch.equal(v, state[k]) for k, v in bert.state_dict().items())


def test_manifest_paths_outside_the_image_root_are_refused_unless_allowed(capsys, model_dirs, image_dir, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "in.png").write_bytes((image_dir / "coins.png").read_bytes())
    (tmp_path / "outside.png").write_bytes((image_dir / "moon.png").read_bytes())
    manifest = root / "set.json"
    entries = ["in.png", "../outside.png", str(tmp_path / "outside.png"), "./in.png"]
    manifest.write_text(json.dumps([{"image": e} for e in entries]))
    common = ("encode", model_dirs["tiny-clip"], manifest, "--merge", "tome:r=2", "--json")
    code, out, err = run(capsys, *common)
    assert code == 0, err
    assert [Path(json.loads(line)["image"]).name for line in out.splitlines()] == ["in.png", "in.png"]
    assert "skipped 2 image(s)" in err and err.count("outside the image root") == 2 and "--allow-outside-root" in err
    code, out, err = run(capsys, *common, "--allow-outside-root")
    assert code == 0 and len(out.splitlines()) == 4, err


def test_folders_are_walked_through_symlinked_sub_folders_without_looping(image_dir, tmp_path):
    from dymu.images import collect_images

    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    (data / "a").mkdir(parents=True)
    elsewhere.mkdir()
    (data / "a" / "x.png").write_bytes((image_dir / "coins.png").read_bytes())
    (elsewhere / "y.png").write_bytes((image_dir / "moon.png").read_bytes())
    (data / "linked").symlink_to(elsewhere, target_is_directory=True)
    (data / "a" / "loop").symlink_to(data, target_is_directory=True)  # a link back to a parent
    found = collect_images(data).paths
    assert found == [str(data / "a" / "x.png"), str(data / "linked" / "y.png")]
