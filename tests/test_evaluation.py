"""dymu eval's parts that need no lmms-eval: method settings, per-sample costs, the table and `dymu report`."""

import csv
import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dymu.cli import main
from dymu.errors import DymuError
from dymu.evaluation import report
from dymu.evaluation.cli import split_methods
from dymu.evaluation.runner import RESULT_FORMAT
from dymu.evaluation.settings import parse_method
from dymu.methods import VTW, DToMe, FastV, ToMe

TOY = Path(__file__).resolve().parents[1] / "assets" / "toy-llava"


def test_methods_parse_into_apply_keywords():
    assert parse_method("full", TOY).is_full
    assert parse_method("dymu-mid", TOY).apply == {"vtu": "fast", "merge": DToMe(str(TOY / "thresholds" / "mid.json"))}
    both = parse_method("tome:r=8+fastv:k=2,r=0.5+vtu=none", TOY)
    assert both.apply == {"vtu": "none", "merge": ToMe(8), "prune": FastV(k=2, r=0.5)} and both.vtu == "none"
    assert parse_method("vtw:k=2", TOY, vtu="exact").apply == {"vtu": "exact", "prune": VTW(2)}
    assert parse_method("dtome:/a+b.json+fastv:k=1,r=0.25").apply["merge"] == DToMe("/a+b.json")  # '+' in a file name


@pytest.mark.parametrize("spec, words", [
    ("bogus", "unknown part 'bogus'"), ("fastv:k=x", "k must be an integer"), ("", "invalid method"),
    ("dymu-mid+tome:r=2", "more than one encoder-side part"), ("vtw:k=2+fastv:k=1,r=0.5", "more than one decoder-side"),
    ("dymu-mid+vtu=slow", "vtu must be one of"), ("dymu-ultra", "unknown part")])
def test_invalid_method_is_one_line(spec, words):
    with pytest.raises(DymuError, match=words) as info:
        parse_method(spec, TOY)
    assert "\n" not in str(info.value)


def test_preset_needs_the_thresholds_file(tmp_path):
    with pytest.raises(DymuError, match=r"no .*thresholds/low.json .*find-thresholds"):
        parse_method("dymu-low", tmp_path)
    with pytest.raises(DymuError, match="needs a local model folder"):
        parse_method("dymu-low", "llava-hf/llava-1.5-7b-hf")


def test_split_methods_keeps_options_with_their_method():
    assert split_methods("full,fastv:k=2,r=0.5,dymu-mid+fastv:k=2,r=0.75,vtw:k=2") == [
        "full", "fastv:k=2,r=0.5", "dymu-mid+fastv:k=2,r=0.75", "vtw:k=2"]


# ---------------------------------------------------------------------------------------------- per-sample costs
@pytest.fixture(scope="module")
def toy():
    from dymu.evaluation.vlm import load_vlm

    return load_vlm(str(TOY))


def _scenes(count):
    from toyvlm import data as D

    return D.make_split("test", num_scenes=count, image_size=192)


@pytest.mark.parametrize("method", ["full", "dymu-low", "dymu-mid+fastv:k=2,r=0.5", "tome:r=20+vtu=none", "vtw:k=2"])
def test_batch_costs_equal_the_flops_counter_per_prompt(toy, method):
    """Row r of a left-padded batch costs what dymu.flops.last_prefill counts for prompt r generated alone."""
    import dymu
    from dymu.evaluation.costs import batch_costs
    from dymu.flops import last_prefill, prefill_flops
    from dymu.llava import model_inputs

    model, processor = toy
    setting = parse_method(method, TOY)
    scenes = _scenes(3)
    prompts = [f"USER: <image>\n{q} ASSISTANT:" for q in ("What colour is the square?", "How many objects are there?",
                                                           "Is there a red circle in the image?")]
    dymu.remove(model)
    if not setting.is_full:
        dymu.apply(model, **setting.apply)
    try:
        inputs = model_inputs(model, processor, [s.image for s in scenes], prompts)
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
        batch = batch_costs(model, inputs["input_ids"], inputs["attention_mask"], [1, 1, 1], setting.vtu)
        dymu.apply(model, **({"vtu": "fast"} if setting.is_full else setting.apply))  # last_prefill needs a patch
        for row, (scene, prompt) in enumerate(zip(scenes, prompts)):
            alone = model_inputs(model, processor, [scene.image], [prompt])
            model.generate(**alone, max_new_tokens=1, do_sample=False)
            counted = last_prefill(model, alone["input_ids"].shape[1], setting.vtu)
            assert batch[row]["flops"] == counted.vision + prefill_flops(counted.decoder, counted.plan).flops
            assert batch[row]["stock_flops"] == counted.stock_vision + prefill_flops(counted.decoder, counted.stock_plan).flops
            assert batch[row]["visual_tokens"] == dymu.llava.last_encoding(model).num_tokens[0]
    finally:
        dymu.remove(model)
    if setting.is_full:
        assert all(row["flops"] == row["stock_flops"] and row["visual_tokens"] == 144 for row in batch)


# ---------------------------------------------------------------------------------------------- the table
def _result(folder, method, task, scores, samples, main="exact_match"):
    path = Path(folder) / method / task / "result.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"format": RESULT_FORMAT, "version": 1, "task": task, "method": method, "limit": None,
                                "metrics": scores, "main_metric": main, "samples": samples}))


def _samples(tokens, flops, stock, seconds):
    return [{"doc_id": i, "visual_tokens": t, "flops": f, "stock_flops": s, "seconds": w}
            for i, (t, f, s, w) in enumerate(zip(tokens, flops, stock, seconds))]


@pytest.fixture
def runs(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _result(a, "full", "qa", {"exact_match": 0.8}, _samples([144, 144], [10.0, 12.0], [10.0, 12.0], [0.1, 0.3]))
    _result(a, "full", "cap", {"cider": 2.0}, _samples([144], [30.0], [30.0], [1.0]), main="cider")
    _result(b, "mid", "qa", {"exact_match": 0.6}, _samples([40, 60], [4.0, 8.0], [10.0, 12.0], [0.1, 0.1]))
    _result(b, "mid", "cap", {"cider": 1.5}, _samples([50], [10.0], [30.0], [0.4]), main="cider")
    return a, b


def test_table_rows_come_from_the_samples(runs):
    data = report.table(report.load_results(runs), tasks=["qa", "cap"])
    full, mid = data["rows"]
    assert data["tasks"] == ["qa", "cap"] and data["metrics"] == {"qa": "exact_match", "cap": "cider"}
    assert full["relative"] == 1.0 and mid["relative"] == pytest.approx((0.6 / 0.8 + 1.5 / 2.0) / 2)
    assert mid["visual_tokens"] == pytest.approx(50.0) and mid["visual_tokens_std"] == pytest.approx(np.std([40, 60, 50]))
    assert mid["flops_fraction"] == pytest.approx((22.0 / 3) / (52.0 / 3)) and mid["latency"] == pytest.approx(0.2)
    text = report.markdown(data)
    assert "| mid | 0.600 | 1.500 | 75.0% | 50.0 ± 8.2 |" in text
    rows = list(csv.reader(io.StringIO(report.csv_text(data))))
    assert rows[0][:3] == ["method", "qa", "cap"] and float(rows[2][3]) == pytest.approx(0.75)


def test_report_command_merges_folders(runs, tmp_path, capsys):
    assert main(["report", *map(str, runs), "--out", str(tmp_path / "merged")]) == 0
    assert "| full |" in capsys.readouterr().out
    for name in report.TABLE_FILES:
        assert (tmp_path / "merged" / name).stat().st_size > 0
    assert json.loads((tmp_path / "merged" / "table.json").read_text())["rows"][1]["method"] == "mid"


def test_report_errors_are_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing")]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and "no such folder" in errors[0] and "no results there" in errors[1]


def test_eval_refuses_a_bad_method_before_anything_runs(tmp_path, capsys):
    assert main(["eval", str(TOY), "--tasks", "dymu_toy_qa", "--methods", "full,fastv:k=2,r=7", "--out",
                 str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "r must be between 0 and 1" in error and not (tmp_path / "out").exists()


@pytest.mark.skipif(importlib.util.find_spec("lmms_eval") is not None, reason="lmms-eval is installed here")
def test_eval_without_lmms_eval_says_how_to_install(tmp_path, capsys):
    assert main(["eval", str(TOY), "--tasks", "dymu_toy_qa", "--out", str(tmp_path / "out")]) == 2
    assert "needs lmms-eval: pip install -e '.[eval]'" in capsys.readouterr().err


def test_a_model_that_is_not_a_vlm_is_refused(model_dirs):
    from dymu.evaluation.vlm import load_vlm

    with pytest.raises(DymuError, match="is not a VLM dymu evaluates") as info:
        load_vlm(str(model_dirs["tiny-clip"]))
    assert "\n" not in str(info.value)


def _raised_in(filename, source, call):
    """The exception ``call`` raises in code compiled as if it were the file ``filename``."""
    namespace = {}
    exec(compile(source, filename, "exec"), namespace)
    try:
        call(namespace)
    except Exception as error:
        return error
    raise AssertionError("nothing raised")


def test_dataset_failure_is_found_inside_lmms_eval_retries():
    """An error raised in lmms-eval's Task.download (behind tenacity's RetryError and a wrapper) is a dataset failure
    naming the task's dataset; the same error raised elsewhere in lmms-eval, or in dymu, is not."""
    from dymu.evaluation.runner import dataset_failure

    task_file = str(Path("site-packages", "lmms_eval", "api", "task.py"))
    source = ("class Task:\n    DATASET_PATH = 'org/data'\n    def download(self):\n        raise ConnectionError("
              "\"Couldn't reach 'org/data' on the Hub (OfflineModeIsEnabled)\")\n"
              "    def generate(self):\n        raise ConnectionError('elsewhere')\n")
    offline = _raised_in(task_file, source, lambda ns: ns["Task"]().download())

    class Attempt:
        def exception(self):
            return offline

    class RetryError(Exception):  # tenacity's: the last attempt's exception in .last_attempt
        last_attempt = Attempt()

    try:
        try:
            raise RetryError("RetryError[<Future state=finished raised ConnectionError>]")
        except RetryError as retry:
            raise RuntimeError("while loading the tasks") from retry
    except RuntimeError as error:
        assert dataset_failure(error) == ("org/data", offline)
    assert dataset_failure(_raised_in(task_file, source, lambda ns: ns["Task"]().generate())) is None
    assert dataset_failure(_raised_in(str(Path("dymu", "task.py")), source, lambda ns: ns["Task"]().download())) is None
    assert dataset_failure(DymuError("a model error")) is None


# ---------------------------------------------------------------------------------------------- OneVision costs
@pytest.fixture(scope="module")
def ov():
    from .test_onevision import tiny_onevision

    model, processor = tiny_onevision()
    processor.tokenizer.padding_side = "left"
    return model, processor


def _ov_batch():
    """Three prompts: two images in OneVision's multi-image mode (a base crop each), one down-scaled grid, one
    unpadded grid; (images per prompt, prompts)."""
    from .test_onevision import DOWNSCALED, UNPADDED, photo

    images = [[photo(UNPADDED, "astronaut"), photo(DOWNSCALED, "coffee")], [photo(DOWNSCALED, "chelsea")],
              [photo(UNPADDED, "camera")]]
    prompts = ["<image>\n<image>\nCompare them.", "<image>\nWhat is it?", "<image>\nWhat is shown in this picture?"]
    return images, prompts


def _ov_costs(model, processor, images, prompts, vtu):
    """Generate one token for the prompts, then their batch_costs."""
    from dymu.evaluation.costs import batch_costs
    from dymu.llava import model_inputs

    inputs = model_inputs(model, processor, images, prompts)
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
    return batch_costs(model, inputs["input_ids"], inputs["attention_mask"], [len(i) for i in images], vtu,
                       inputs.get("image_sizes"), inputs.get("batch_num_images"))


ONEVISION_SETTINGS = {"full": None, "no-merge": {"vtu": "fast"}, "fast": {"merge": "MERGING", "vtu": "fast"},
                      "exact": {"merge": "MERGING", "vtu": "exact"}, "compact": {"merge": "MERGING", "vtu": "none"},
                      "fastv": {"merge": "MERGING", "vtu": "fast", "prune": "fastv:k=1,r=0.5"},
                      "compact+vtw": {"merge": "MERGING", "vtu": "none", "prune": "vtw:k=1"}}


def _ov_apply(model, setting):
    import dymu

    from .test_onevision import MERGING

    dymu.remove(model)
    if setting is not None:
        setting = dict(setting)
        merge = MERGING if setting.pop("merge", None) else None
        dymu.apply(model, merge, **setting)


@pytest.mark.parametrize("name", ONEVISION_SETTINGS)
def test_onevision_batch_costs_equal_the_flops_counter_per_prompt(ov, name):
    """LLaVA-OneVision (AnyRes crops, the stock layout): row r of a left-padded batch costs what
    dymu.flops.last_prefill counts for prompt r alone: vision over the row's images' crops, the layout tokens
    (newlines included) its images give the language model, the plan the prefill ran."""
    import dymu
    from dymu.flops import last_prefill, prefill_flops
    from dymu.llava import last_images, model_inputs

    model, processor = ov
    setting = ONEVISION_SETTINGS[name]
    vtu = (setting or {}).get("vtu", "fast")
    images, prompts = _ov_batch()
    _ov_apply(model, setting)
    try:
        batch = _ov_costs(model, processor, images, prompts, vtu)
        if setting is None:
            dymu.apply(model, vtu="fast")  # last_prefill needs a patch; nothing merged
        for row in range(len(prompts)):
            alone = model_inputs(model, processor, [images[row]], [prompts[row]])
            with torch.no_grad():
                model.generate(**alone, max_new_tokens=1, do_sample=False)
            counted = last_prefill(model, alone["input_ids"].shape[1], vtu)
            assert batch[row]["flops"] == counted.vision + prefill_flops(counted.decoder, counted.plan).flops
            assert batch[row]["stock_flops"] == counted.stock_vision + prefill_flops(counted.decoder, counted.stock_plan).flops
            assert batch[row]["visual_tokens"] == sum(tokens for _, tokens in last_images(model))
    finally:
        dymu.remove(model)
    if "merge" in (setting or {}):
        assert all(row["flops"] < row["stock_flops"] for row in batch)


def test_onevision_unmerged_costs_by_hand_and_infinite_thresholds_equal_them(ov):
    """The unpatched model's figures by hand: its placeholders (the stock features' lengths) and every crop of the
    processor's pixel_values through the unmerged tower; thresholds = +inf in every VTU mode cost exactly that."""
    import math

    import dymu
    from dymu import flops as F
    from dymu.vision import tower_info

    model, processor = ov
    images, prompts = _ov_batch()
    _ov_apply(model, None)
    full = _ov_costs(model, processor, images, prompts, "fast")
    info, decoder = tower_info(model), F.Decoder.from_config(model.config)
    for row, (own, prompt) in enumerate(zip(images, prompts)):
        alone = processor(images=[own], text=[prompt], return_tensors="pt")
        with torch.no_grad():
            stock = model.model.get_image_features(pixel_values=alone["pixel_values"], image_sizes=alone["image_sizes"],
                                                   batch_num_images=alone["batch_num_images"]).pooler_output
        positions = sum(feature.shape[0] for feature in stock)
        crops = sum(int(pixels.flatten(1).any(-1).sum()) for pixels in alone["pixel_values"])  # non-padding crops
        text = alone["input_ids"].shape[1] - positions
        language = F.prefill_flops(decoder, F.language_plan(F.Prompt(text, positions, positions), decoder.layers)).flops
        assert full[row] == {"visual_tokens": positions, "flops": crops * F.vision_flops(info, decoder.hidden) + language,
                             "stock_flops": crops * F.vision_flops(info, decoder.hidden) + language}
    assert len({row["visual_tokens"] for row in full}) == len(prompts), "three different layouts"
    try:
        for vtu in ("fast", "exact", "none"):
            dymu.apply(model, [math.inf] * info.merge_layers, vtu=vtu)
            assert _ov_costs(model, processor, images, prompts, vtu) == full, vtu
    finally:
        dymu.remove(model)


def test_the_toy_benchmark_is_rendered_at_the_tower_input(ov):
    """LLaVA-1.5: its crop (192 px for the toy model); OneVision: one AnyRes crop (its processor has no crop_size)."""
    from dymu.evaluation.runner import toy_image_size
    from dymu.models import load_processor

    from .test_onevision import CROP

    assert toy_image_size(load_processor(TOY)) == 192
    assert toy_image_size(ov[1].image_processor) == CROP


def test_the_toy_onevision_reads_the_toy_benchmark_at_its_scene_sizes(tmp_path, monkeypatch):
    """dymu eval writes the dymu_toy tasks' scenes for a OneVision checkpoint each at its own size (its test set, as
    toyvlm.evaluate_onevision renders it: 2-5 AnyRes crops), for LLaVA-1.5 square at its crop."""
    from PIL import Image

    from dymu.evaluation.runner import toy_benchmark
    from toyvlm import data as D
    from toyvlm.evaluate_onevision import scene_renderer

    monkeypatch.setenv("DYMU_CACHE", str(tmp_path))
    monkeypatch.setenv("DYMU_TOY_BENCHMARK", "")  # unset for toy_benchmark (which sets it), restored after the test
    onevision = TOY.parent / "toy-llava-onevision"
    crop = 112
    folder = toy_benchmark(onevision, scenes=4)
    assert folder.name == f"test-4-{crop}px-anyres"
    render = scene_renderer(D.DEFAULT_SEED, crop)
    sizes = set()
    for example in D.make_split("test", num_scenes=4):
        written = Image.open(folder / "images" / f"{example.id}.png").convert("RGB")
        expected = render(example).convert("RGB")
        assert written.size == expected.size
        assert written.tobytes() == expected.tobytes(), example.id
        sizes.add(written.size)
    assert len(sizes) > 1, "scenes of different sizes"
    monkeypatch.setenv("DYMU_TOY_BENCHMARK", "")
    square = toy_benchmark(TOY, scenes=2)
    assert square.name == "test-2-192px"
    assert {Image.open(p).size for p in (square / "images").glob("*.png")} == {(192, 192)}
