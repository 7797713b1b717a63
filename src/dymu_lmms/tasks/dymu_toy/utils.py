"""The toy benchmark (``python -m toyvlm.data --out DIR``) as lmms-eval tasks: ``dymu_toy_qa`` and ``dymu_toy_describe``.

Both read the benchmark layout from the folder ``$DYMU_TOY_BENCHMARK`` (default: ``toy-benchmark`` in dymu's cache
folder, ``$DYMU_CACHE`` else ``$XDG_CACHE_HOME/dymu``): ``questions.jsonl`` + ``answers.jsonl`` (short answers, exact
match after the benchmark's normalisation, overall and per question kind) and ``captions.json`` (the describe task in
the COCO caption format: CIDEr-D against the five references, tokenised and scored by ``pycocoevalcap`` as lmms-eval's
COCO caption tasks score them). Without Java (pycocoevalcap's PTB tokenizer is a Java program) the tokenisation is
``toyvlm.cider.ptb_tokenize``, the same rules re-implemented in Python for this benchmark's text (tested equal).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import string
from pathlib import Path

from lmms_eval.api.task import ConfigurableTask

#: environment variable naming the benchmark folder
BENCHMARK_ENV = "DYMU_TOY_BENCHMARK"
#: the question kinds of the short-answer task, each a metric of ``dymu_toy_qa``
KINDS = ("colour", "count", "detail", "exists", "position")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def benchmark_dir() -> Path:
    """The benchmark folder: ``$DYMU_TOY_BENCHMARK``, else ``toy-benchmark`` in dymu's cache folder."""
    if os.environ.get(BENCHMARK_ENV):
        return Path(os.environ[BENCHMARK_ENV]).expanduser()
    from dymu.demo import cache_dir

    return cache_dir() / "toy-benchmark"


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _required(folder: Path, name: str) -> Path:
    path = folder / name
    if not path.is_file():
        from dymu.errors import DymuError

        raise DymuError(f"toy benchmark {folder}: no {name} (write it with `python -m toyvlm.data --out {folder}`, "
                        f"or set {BENCHMARK_ENV} to such a folder)")
    return path


def qa_docs(folder: Path) -> list[dict]:
    """One doc per short question, in file order: question_id, image (absolute path), question, kind, answer."""
    answers = {r["question_id"]: r["answer"] for r in _read_jsonl(_required(folder, "answers.jsonl"))}
    return [{"question_id": r["question_id"], "image": str(folder / r["image"]), "question": r["question"],
             "kind": r["kind"], "answer": answers[r["question_id"]]}
            for r in _read_jsonl(_required(folder, "questions.jsonl"))]


def describe_docs(folder: Path) -> list[dict]:
    """One doc per scene of ``captions.json``: id, image (absolute path), question (its describe prompt), references."""
    coco = json.loads(_required(folder, "captions.json").read_text(encoding="utf-8"))
    references: dict[int, list[str]] = {}
    for annotation in coco["annotations"]:
        references.setdefault(annotation["image_id"], []).append(annotation["caption"])
    return [{"id": image["id"], "image": str(folder / image["file_name"]), "question": image["prompt"],
             "references": references[image["id"]]} for image in coco["images"]]


class _ToyTask(ConfigurableTask):
    """A ConfigurableTask whose docs come from the benchmark folder rather than the hub."""

    docs = staticmethod(qa_docs)

    def __init__(self, config=None):
        super().__init__(config={key: value for key, value in (config or {}).items() if key != "class"})

    def download(self, dataset_kwargs=None) -> None:
        import datasets

        self.dataset = datasets.DatasetDict({"test": datasets.Dataset.from_list(self.docs(benchmark_dir()))})
        self.dataset_no_image = self.dataset  # images are paths, opened by doc_to_visual


class ToyQATask(_ToyTask):
    docs = staticmethod(qa_docs)


class ToyDescribeTask(_ToyTask):
    docs = staticmethod(describe_docs)


def doc_to_visual(doc) -> list:
    from PIL import Image

    with Image.open(doc["image"]) as image:
        return [image.convert("RGB")]


def doc_to_text(doc) -> str:
    return doc["question"]


def normalize_answer(text: str) -> str:
    """The benchmark's rule: lowercase, remove all punctuation and whitespace."""
    return "".join(text.lower().translate(_PUNCTUATION).split())


def qa_process_results(doc, results) -> dict:
    """exact_match of this answer, and the same under its kind's metric (None under the other kinds')."""
    hit = float(normalize_answer(results[0] if results else "") == normalize_answer(doc["answer"]))
    return {"exact_match": hit, **{kind: hit if doc["kind"] == kind else None for kind in KINDS}}


def kind_accuracy(items) -> float:
    """Mean of the answers of one kind (the others are None); NaN when the slice has none of that kind."""
    hits = [item for item in items if item is not None]
    return sum(hits) / len(hits) if hits else math.nan


def describe_process_results(doc, results) -> dict:
    return {"cider": {"id": int(doc["id"]), "pred": results[0] if results else "", "references": list(doc["references"])}}


def ptb_tokenize(captions: dict) -> dict:
    """{key: [caption, ...]} -> {key: [PTB-tokenised caption, ...]}: pycocoevalcap's PTBTokenizer (Java) when java is
    on the PATH, else ``toyvlm.cider.ptb_tokenize`` (the same rules for this benchmark's text)."""
    if shutil.which("java"):
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        return PTBTokenizer().tokenize({key: [{"caption": c} for c in texts] for key, texts in captions.items()})
    from toyvlm.cider import ptb_tokenize as tokenize

    return {key: [tokenize(c) for c in texts] for key, texts in captions.items()}


def cider(items) -> float:
    """Corpus CIDEr-D (pycocoevalcap's ``Cider``) of the descriptions against their references; document frequencies
    from the references of the scored scenes."""
    from pycocoevalcap.cider.cider import Cider

    references = ptb_tokenize({item["id"]: item["references"] for item in items})
    predictions = ptb_tokenize({item["id"]: [item["pred"]] for item in items})
    score, _ = Cider().compute_score(references, predictions)
    return float(score)
