"""``dymu eval``: every method of a list on every task of a list, through lmms-eval, in this process.

For each (method, task) pair: ``simple_evaluate`` with a :class:`~dymu.evaluation.model.DymuLMM` object on the loaded
model (``dymu.apply`` per method), its answers journaled per sample in ``OUT/METHOD/TASK/responses.jsonl`` and the
pair's scores and per-sample records in ``OUT/METHOD/TASK/result.json`` once it is finished. A rerun skips the
finished pairs and continues an unfinished one from its journal; the table (:mod:`.report`) is rewritten at the end.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

from ..errors import DymuError
from ..files import atomic_write_json
from .settings import parse_method, slug

RESULT_FORMAT = "dymu-eval-result"
RESULT_VERSION = 1
RESULT_FILE = "result.json"
RESPONSES_FILE = "responses.jsonl"
#: prefix of the toy benchmark's tasks (their data: ``python -m toyvlm.data``)
TOY_PREFIX = "dymu_toy_"
#: test scenes of the toy benchmark written when none is there (toyvlm.evaluate's test set: 4,510 questions)
TOY_SCENES = 1000
DEFAULT_BATCH_SIZE = 8
#: how lmms-eval's tasks get their data without the Hugging Face hub (README, Evaluation, Datasets)
OFFLINE_ROUTE = ("without the Hugging Face hub, copy $HF_HOME (its datasets/ and hub/ folders) from a machine where "
                 "the same lmms-eval ran the task, set HF_DATASETS_CACHE if the datasets are elsewhere, and "
                 "HF_HUB_OFFLINE=1")


def task_manager():
    """lmms-eval's TaskManager with dymu's tasks included; lmms-eval's logging quieted to warnings."""
    _quiet_logging()
    return _task_manager()


@functools.lru_cache(maxsize=1)
def _task_manager():
    """Built once per process: indexing lmms-eval's ~2000 task files takes seconds, and the index only names the
    YAML files (a task's config is read from its file each time the task is loaded)."""
    from lmms_eval.tasks import TaskManager

    import dymu_lmms

    return TaskManager("WARNING", include_path=dymu_lmms.TASKS)


def _quiet_logging() -> None:
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING")


def check_tasks(manager, tasks: list[str]) -> None:
    """One line for a task lmms-eval does not know."""
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        raise DymuError(f"--tasks: unknown task(s) {', '.join(unknown)} (lmms-eval {len(manager.all_tasks)} tasks and "
                        f"dymu's {', '.join(t for t in manager.all_tasks if t.startswith(TOY_PREFIX))}; "
                        "`lmms-eval --tasks list` lists them)")


def toy_benchmark(model_dir, folder=None, scenes: int = TOY_SCENES) -> Path:
    """The toy benchmark folder the dymu_toy tasks read (``$DYMU_TOY_BENCHMARK`` is set to it): ``folder``, else the
    environment's, else ``toy-benchmark/test-{scenes}-{size}px`` in dymu's cache folder, written by
    ``python -m toyvlm.data`` at the model's image size when it is not there yet (LLaVA-OneVision:
    ``...-{size}px-anyres``, every scene at its own size in crops of ``size``, ``--anyres``: the toy OneVision's test
    set)."""
    from ..demo import cache_dir
    from ..models import checkpoint_model_type, load_processor

    if folder is None and os.environ.get("DYMU_TOY_BENCHMARK"):
        folder = os.environ["DYMU_TOY_BENCHMARK"]
    if folder is not None:
        folder = Path(folder).expanduser()
        if not (folder / "questions.jsonl").is_file():
            raise DymuError(f"--toy-data {folder}: no toy benchmark there (write one with `python -m toyvlm.data "
                            f"--out {folder}`)")
    else:
        size = toy_image_size(load_processor(model_dir))
        anyres = checkpoint_model_type(model_dir) == "llava_onevision"  # each scene at its own size, in 2-5 AnyRes crops
        folder = cache_dir() / "toy-benchmark" / f"test-{scenes}-{size}px{'-anyres' if anyres else ''}"
        if not (folder / "captions.json").is_file():
            shape = f"{size} px crops, each scene at its own size" if anyres else f"{size} px"
            print(f"writing the toy benchmark ({scenes} test scenes, {shape}) to {folder}", flush=True)
            subprocess.run([sys.executable, "-m", "toyvlm.data", "--out", str(folder), "--num-scenes", str(scenes),
                            "--image-size", str(size), *(["--anyres"] if anyres else [])], check=True,
                           stdout=subprocess.DEVNULL)
    os.environ["DYMU_TOY_BENCHMARK"] = str(folder)
    return folder


def toy_image_size(image_processor) -> int:
    """The side the toy benchmark's square scenes are rendered at: the tower's input (LLaVA-1.5's crop; OneVision:
    one AnyRes crop, the unit of the sizes ``--anyres`` renders its scenes at)."""
    size = getattr(image_processor, "crop_size", None) or image_processor.size
    return int(size["height"])


def run(model_dir, tasks: list[str], methods: list[str], out, limit: int | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE, vtu: str = "fast", toy_data=None, progress: bool = True) -> list[Path]:
    """Evaluate every (method, task); returns the result files (``OUT/METHOD/TASK/result.json``) in table order."""
    from .model import DymuLMM
    from .vlm import load_vlm

    settings = [parse_method(method, model_dir, vtu) for method in methods]  # every spec checked before any work
    manager = task_manager()
    check_tasks(manager, tasks)
    if any(task.startswith(TOY_PREFIX) for task in tasks):
        toy_benchmark(model_dir, toy_data)
    out = Path(out)
    model, processor = load_vlm(str(model_dir))
    files = []
    for setting in settings:
        for task in tasks:
            folder = out / slug(setting.spec) / task
            files.append(folder / RESULT_FILE)
            if finished(files[-1], setting.spec, limit):
                print(f"{setting.spec} / {task}: finished before, skipped", flush=True)
                continue
            lm = DymuLMM(str(model_dir), method=setting.spec, vtu=vtu, batch_size=batch_size, model=model,
                         processor=processor, responses=str(folder / RESPONSES_FILE), progress=progress)
            lm.description = f"{setting.spec} / {task}"
            try:
                result = evaluate(lm, manager, task, limit)
            finally:
                lm.journal.close()
            if lm.rank == 0:
                result.update(model=str(model_dir), method=setting.spec, vtu=setting.vtu, batch_size=batch_size)
                atomic_write_json(files[-1], result)
                print(f"{setting.spec} / {task}: {result['main_metric']} {result['metrics'][result['main_metric']]:.4f}",
                      flush=True)
    import dymu

    dymu.remove(model)
    return files


def finished(path: Path, method: str, limit: int | None) -> bool:
    """A result file of this method and limit is there (its pair needs no work)."""
    import json

    if not path.is_file():
        return False
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return result.get("format") == RESULT_FORMAT and result.get("method") == method and result.get("limit") == limit


def evaluate(lm, manager, task: str, limit: int | None) -> dict:
    """One task through lmms-eval's ``simple_evaluate``: {metrics, main_metric, samples: per-sample answers, scores
    and costs (visual tokens, FLOPs, seconds)}."""
    from lmms_eval import evaluator

    started = time.time()
    try:
        output = evaluator.simple_evaluate(model=lm, tasks=[task], limit=limit, bootstrap_iters=0, log_samples=True,
                                           task_manager=manager, batch_size=lm.batch_size, verbosity="WARNING")
    except Exception as error:
        failed = dataset_failure(error)
        if failed is None:
            raise
        dataset, cause = failed
        reason = " ".join(f"{type(cause).__name__}: {cause}".split())
        raise DymuError(f"--tasks {task}: its dataset {dataset} could not be loaded ({reason}); {OFFLINE_ROUTE}; "
                        "finished (method, task) pairs are kept: rerun to continue") from None
    if output is None:  # another process of an accelerate launch: rank 0 has the results
        return {}
    metrics = {name.split(",")[0]: value for name, value in output["results"][task].items()
               if "," in name and "stderr" not in name}
    main = next(m["metric"] for m in output["configs"][task]["metric_list"])
    by_doc = {(row["task"], row["doc_id"]): row for row in lm.samples.values()}
    samples = []
    for logged in output["samples"][task]:
        cost = by_doc[(task, logged["doc_id"])]
        scores = {k: logged[k] for k in metrics if k in logged}
        samples.append({"doc_id": logged["doc_id"], "response": cost["response"], "target": logged["target"],
                        **scores, **{k: cost[k] for k in ("visual_tokens", "flops", "stock_flops", "seconds")}})
    return {"format": RESULT_FORMAT, "version": RESULT_VERSION, "task": task, "limit": limit, "metrics": metrics,
            "main_metric": main, "higher_is_better": output.get("higher_is_better", {}).get(task, {}),
            "seconds": time.time() - started, "samples": samples}


def dataset_failure(error: BaseException) -> tuple[str, BaseException] | None:
    """(dataset, the exception) if ``error`` was raised while lmms-eval loaded a task's dataset (``Task.download``,
    which tenacity retries: its ``RetryError`` holds the last attempt's exception), else None."""
    pending, seen = [error], set()
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        for frame, _ in traceback.walk_tb(current.__traceback__):
            if frame.f_code.co_name == "download" and f"lmms_eval{os.sep}api" in frame.f_code.co_filename:
                task = frame.f_locals.get("self")
                return str(getattr(task, "DATASET_PATH", None) or "(unnamed)"), current
        attempt = getattr(current, "last_attempt", None)  # tenacity.RetryError
        if attempt is not None and hasattr(attempt, "exception"):
            pending.append(attempt.exception())
        pending += [current.__cause__, current.__context__]
    return None
