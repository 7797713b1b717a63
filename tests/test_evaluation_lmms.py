"""dymu eval over lmms-eval (the eval extra: `make eval-setup`, then `make eval-test`). Skipped without lmms-eval."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (the eval extra: make eval-setup; make eval-test)")

from dymu.cli import main  # noqa: E402
from dymu.errors import DymuError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "assets" / "toy-llava"
SCENES = 6
LIMIT = 6
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """A small toy benchmark (python -m toyvlm.data) at the toy model's 192 px, named in $DYMU_TOY_BENCHMARK."""
    folder = tmp_path_factory.mktemp("bench") / "toy"
    subprocess.run([sys.executable, "-m", "toyvlm.data", "--out", str(folder), "--num-scenes", str(SCENES),
                    "--image-size", "192"], check=True, capture_output=True)
    previous = os.environ.get("DYMU_TOY_BENCHMARK")
    os.environ["DYMU_TOY_BENCHMARK"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("DYMU_TOY_BENCHMARK", None)
    else:
        os.environ["DYMU_TOY_BENCHMARK"] = previous


def _lmms_eval(args, out, launcher=()):
    import dymu_lmms

    command = [*launcher, "--model", "dymu", "--tasks", "dymu_toy_qa", "--include_path", dymu_lmms.TASKS,
               "--limit", "8", "--output_path", str(out), "--log_samples", *args]
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    [results] = list(Path(out).rglob("*_results.json"))
    [samples] = list(Path(out).rglob("*dymu_toy_qa*.jsonl"))
    rows = [json.loads(line) for line in samples.read_text().splitlines() if line.strip()]
    return json.loads(results.read_text()), {row["doc_id"]: row["filtered_resps"] for row in rows}


def _one_process_args(journal):
    return ["--model_args", f"pretrained={TOY},method=dymu-mid,responses={journal}", "--batch_size", "2"]


@pytest.fixture(scope="module")
def one_process(bench, tmp_path_factory):
    """`lmms-eval --model dymu` in one process: (results, answers by doc_id, output folder)."""
    out = tmp_path_factory.mktemp("one")
    results, answers = _lmms_eval(_one_process_args(out / "responses.jsonl"), out, launcher=[str(BIN / "lmms-eval")])
    return results, answers, out


def test_lmms_eval_resolves_the_dymu_entry_point(one_process):
    """`lmms-eval --model dymu` loads dymu through the entry point, without torch at resolution, and writes results."""
    probe = ("import sys; from importlib.metadata import entry_points; [e] = [e for e in entry_points("
             "group='lmms_eval.models') if e.name == 'dymu']; m = e.load()(); "
             "print(m.simple_class_path, 'torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True).stdout.split() == ["dymu.evaluation.model.DymuLMM", "False"]
    results, answers, out = one_process
    assert set(answers) == set(range(8))
    assert 0.0 <= results["results"]["dymu_toy_qa"]["exact_match,none"] <= 1.0
    assert not (out / "responses.jsonl.rank1").exists()


def _eval(out, methods, tasks="dymu_toy_qa,dymu_toy_describe", limit=LIMIT, extra=()):
    assert main(["eval", str(TOY), "--tasks", tasks, "--methods", methods, "--out", str(out), "--limit", str(limit),
                 "--batch-size", "4", *extra]) == 0
    return json.loads((out / "table.json").read_text())


def _result(out, method, task):
    return json.loads((out / method / task / "result.json").read_text())


def test_eval_table_comes_from_the_samples_and_full_equals_llava_hf(bench, tmp_path):
    from lmms_eval import evaluator

    from dymu.evaluation.runner import task_manager
    from dymu_lmms.tasks.dymu_toy import utils as toy  # noqa: F401  (importable as package data)

    data = _eval(tmp_path, "full,dymu-low,fastv:k=2,r=0.5")
    assert [row["method"] for row in data["rows"]] == ["full", "dymu-low", "fastv:k=2,r=0.5"]
    assert data["tasks"] == ["dymu_toy_qa", "dymu_toy_describe"]
    slugs = {"full": "full", "dymu-low": "dymu-low", "fastv:k=2,r=0.5": "fastv_k=2,r=0.5"}
    full = data["rows"][0]
    for row in data["rows"]:
        results = {task: _result(tmp_path, slugs[row["method"]], task) for task in data["tasks"]}
        samples = [s for task in data["tasks"] for s in results[task]["samples"]]
        assert len(results["dymu_toy_qa"]["samples"]) == LIMIT == len(results["dymu_toy_describe"]["samples"])
        tokens = [s["visual_tokens"] for s in samples]
        assert row["visual_tokens"] == pytest.approx(sum(tokens) / len(tokens))
        assert row["flops_fraction"] == pytest.approx(sum(s["flops"] for s in samples) / sum(s["stock_flops"] for s in samples))
        qa = results["dymu_toy_qa"]["samples"]
        assert row["scores"]["dymu_toy_qa"] == pytest.approx(sum(s["exact_match"] for s in qa) / len(qa))
        assert row["relative"] == pytest.approx(sum(row["scores"][t] / full["scores"][t] for t in data["tasks"]) / 2)
    assert full["visual_tokens"] == 144 and full["flops_fraction"] == 1.0
    assert data["rows"][1]["visual_tokens"] < 144 and data["rows"][2]["flops_fraction"] < 1.0

    reference = evaluator.simple_evaluate(model="llava_hf", force_simple=True, tasks=data["tasks"], limit=LIMIT,
                                          model_args=f"pretrained={TOY},device=cpu,device_map=cpu", bootstrap_iters=0,
                                          log_samples=True, task_manager=task_manager(), verbosity="WARNING")
    for task in data["tasks"]:
        ours = {s["doc_id"]: s["response"] for s in _result(tmp_path, "full", task)["samples"]}
        theirs = {s["doc_id"]: s["filtered_resps"][0] for s in reference["samples"][task]}
        assert ours == theirs
        metric = data["metrics"][task]
        assert full["scores"][task] == pytest.approx(reference["results"][task][f"{metric},none"], abs=1e-12)


def test_cider_equals_toyvlm_and_the_fallback_tokenizer(bench):
    """The describe task's CIDEr-D (pycocoevalcap, Java PTB tokenizer) equals toyvlm.cider's, and so does the
    no-Java fallback."""
    from toyvlm.cider import cider_d

    from dymu_lmms.tasks.dymu_toy import utils as toy

    docs = toy.describe_docs(bench)
    predictions = [docs[(i + 1) % len(docs)]["references"][i % 5] for i in range(len(docs))]  # some right, some not
    predictions[0] = "a red square. two blue circles, and a k. on a flat background"
    items = [{"id": d["id"], "pred": p, "references": d["references"]} for d, p in zip(docs, predictions)]
    expected = cider_d(dict(enumerate(predictions)), {i: d["references"] for i, d in enumerate(docs)})[0]
    if shutil.which("java"):
        assert toy.cider(items) == pytest.approx(expected, rel=1e-12)
    java = shutil.which
    try:
        toy.shutil.which = lambda name: None
        assert toy.cider(items) == pytest.approx(expected, rel=1e-12)
    finally:
        toy.shutil.which = java


def test_resume_after_a_kill_equals_an_uninterrupted_run(bench, tmp_path, monkeypatch):
    from dymu.evaluation.model import DymuLMM

    whole = _eval(tmp_path / "whole", "dymu-mid", tasks="dymu_toy_qa")
    generated = []
    answer = DymuLMM._answer
    monkeypatch.setattr(DymuLMM, "_answer", lambda self, batch: generated.extend(b[3] for b in batch) or answer(self, batch))
    _eval(tmp_path / "cut", "dymu-mid", tasks="dymu_toy_qa")
    folder = tmp_path / "cut" / "dymu-mid" / "dymu_toy_qa"
    lines = (folder / "responses.jsonl").read_bytes().splitlines(keepends=True)
    assert len(lines) == 1 + LIMIT  # the header, one line per sample
    (folder / "responses.jsonl").write_bytes(b"".join(lines[:3]) + lines[3][:20])  # killed writing the third sample
    (folder / "result.json").unlink()
    generated.clear()
    resumed = _eval(tmp_path / "cut", "dymu-mid", tasks="dymu_toy_qa")
    assert sorted(generated) == list(range(2, LIMIT))  # the two saved samples are not generated again
    strip = lambda data: [{k: v for k, v in row.items() if k != "latency"} for row in data["rows"]]  # noqa: E731
    assert strip(resumed) == strip(whole)
    keep = ("doc_id", "response", "exact_match", "visual_tokens", "flops", "stock_flops")
    samples = lambda out: [{k: s[k] for k in keep} for s in _result(out, "dymu-mid", "dymu_toy_qa")["samples"]]  # noqa: E731
    assert samples(tmp_path / "cut") == samples(tmp_path / "whole")
    generated.clear()
    _eval(tmp_path / "cut", "dymu-mid", tasks="dymu_toy_qa")  # finished: nothing runs
    assert generated == []


def test_two_processes_answer_as_one(one_process, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` starts two processes on a CPU machine too (accelerate's
    torchrun launcher; `--cpu` would start one: README, Evaluation): each answers its half of the requests in its own
    journal, and together they answer as one process does, with the same scores."""
    results, one, _ = one_process
    launcher = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0", "-m", "lmms_eval"]
    together, two = _lmms_eval(_one_process_args(tmp_path / "responses.jsonl"), tmp_path, launcher=launcher)
    assert two == one
    assert together["results"]["dymu_toy_qa"] == results["results"]["dymu_toy_qa"]
    journals = [tmp_path / name for name in ("responses.jsonl", "responses.jsonl.rank1")]
    ranks = [[json.loads(line)["doc_id"] for line in path.read_text().splitlines()[1:]] for path in journals]
    assert sorted(ranks[0] + ranks[1]) == list(range(8)) and [len(r) for r in ranks] == [4, 4]  # rank 0 and rank 1


def test_errors_are_one_line(bench, tmp_path, capsys):
    from dymu.evaluation.model import DymuLMM
    from dymu.models import make_model

    with pytest.raises(DymuError, match="unknown part 'fastv2:k=1'"):
        DymuLMM(str(TOY), method="fastv2:k=1")
    assert main(["eval", str(TOY), "--tasks", "dymu_toy_qa,no_such_task", "--methods", "full", "--out",
                 str(tmp_path / "a")]) == 2
    clip = make_model("tiny-clip", tmp_path / "clip")
    assert main(["eval", str(clip), "--tasks", "dymu_toy_qa", "--methods", "full", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("dymu eval:")]  # (besides weight-loading bars)
    assert len(errors) == 2 and "Traceback" not in err
    assert "unknown task(s) no_such_task" in errors[0]
    assert "CLIPVisionModel is not a VLM dymu evaluates" in errors[1]


def test_a_missing_dataset_is_one_line_and_finished_pairs_stay(bench, tmp_path, monkeypatch, capsys):
    """Offline with an empty cache, lmms-eval's `pope` cannot load its hub dataset: one line naming the task, the
    dataset and the offline route, exit 2; the pair finished before it keeps its result."""
    import datasets
    import huggingface_hub
    import tenacity
    from lmms_eval.api.task import ConfigurableTask

    from dymu.evaluation.runner import finished

    for module in (datasets.config, huggingface_hub.constants):
        monkeypatch.setattr(module, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for name in ("HF_DATASETS_CACHE", "LMMS_EVAL_DATASETS_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(ConfigurableTask.download.retry, "wait", tenacity.wait_none())  # 5 attempts, not 2 s apart
    out = tmp_path / "out"
    assert main(["eval", str(TOY), "--tasks", "dymu_toy_qa,pope", "--methods", "full", "--out", str(out),
                 "--limit", "2"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("dymu eval:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert errors[0].startswith("dymu eval: error: --tasks pope: its dataset lmms-lab-encoder/POPE could not be "
                                "loaded (")
    assert "OfflineModeIsEnabled" in errors[0] and "copy $HF_HOME" in errors[0] and "HF_HUB_OFFLINE=1" in errors[0]
    assert finished(out / "full" / "dymu_toy_qa" / "result.json", "full", 2)
    assert not (out / "full" / "pope" / "result.json").exists()


def test_eval_runs_on_llava_onevision(tmp_path, monkeypatch):
    """A tiny random LLaVA-OneVision through dymu eval, the toy benchmark rendered at one crop (384 px: a base crop
    and one grid crop per scene): each sample's visual tokens are its layout's (the processor's placeholders unmerged;
    ToMe's 329 tokens per crop x 2 crops + 27 newlines merged) and merging costs fewer FLOPs."""
    from PIL import Image

    from dymu.models import load_processor, make_model

    folder = make_model("tiny-llava-onevision", tmp_path / "ov")
    data = tmp_path / "bench"
    subprocess.run([sys.executable, "-m", "toyvlm.data", "--out", str(data), "--num-scenes", "2", "--image-size", "384"],
                   check=True, capture_output=True)
    monkeypatch.setenv("DYMU_TOY_BENCHMARK", str(data))
    out = tmp_path / "out"
    assert main(["eval", str(folder), "--tasks", "dymu_toy_qa", "--methods", "full,tome:r=100+vtu=none", "--out",
                 str(out), "--limit", "3", "--batch-size", "2"]) == 0
    processor = load_processor(folder, full=True)
    batch = processor(images=[Image.new("RGB", (384, 384))], text=["<image>"], return_tensors="pt")
    placeholders = int((batch["input_ids"] == processor.image_token_id).sum())
    full, merged = ({s["doc_id"]: s for s in _result(out, method, "dymu_toy_qa")["samples"]}
                    for method in ("full", "tome_r=100+vtu=none"))
    assert len(full) == 3 and merged.keys() == full.keys()
    assert all(s["visual_tokens"] == placeholders and s["flops"] == s["stock_flops"] for s in full.values())
    for doc, sample in merged.items():
        assert sample["visual_tokens"] == 2 * (729 - 4 * 100) + 27
        assert sample["flops"] < sample["stock_flops"] == full[doc]["stock_flops"]


def test_dymu_eval_answers_the_toy_onevision_as_its_own_evaluation(tmp_path, monkeypatch):
    """The shipped toy OneVision through dymu eval (lmms-eval, batches of 4, the toy tasks at each scene's own size:
    `python -m toyvlm.data --anyres`) gives every question the answer toyvlm.evaluate_onevision gives it (one by
    one in its batches, its own prompts), unmerged and at DToMe-mid with fast VTU."""
    import dymu
    from dymu.methods import DToMe
    from toyvlm import data as D
    from toyvlm import evaluate as E
    from toyvlm.evaluate_onevision import load, scene_renderer

    onevision = ROOT / "assets" / "toy-llava-onevision"
    data = tmp_path / "bench"
    subprocess.run([sys.executable, "-m", "toyvlm.data", "--out", str(data), "--num-scenes", "4", "--image-size", "112",
                    "--anyres"], check=True, capture_output=True)
    monkeypatch.setenv("DYMU_TOY_BENCHMARK", str(data))
    out = tmp_path / "out"
    assert main(["eval", str(onevision), "--tasks", "dymu_toy_qa", "--methods", "full,dymu-mid", "--out", str(out),
                 "--batch-size", "4"]) == 0
    model, processor = load(onevision)
    records, images = E.test_records(4, D.DEFAULT_SEED, render=scene_renderer(D.DEFAULT_SEED, 112))
    for method, merge in (("full", None), ("dymu-mid", DToMe(str(onevision / "thresholds" / "mid.json")))):
        samples = sorted(_result(out, method, "dymu_toy_qa")["samples"], key=lambda s: s["doc_id"])
        if merge is not None:
            dymu.apply(model, merge=merge, vtu="fast")
        try:
            expected = E.answer(model, processor, records, images)
        finally:
            dymu.remove(model)
        assert [s["response"] for s in samples] == expected, method
        assert [s["target"] for s in samples] == [r["answer"] for r in records]
