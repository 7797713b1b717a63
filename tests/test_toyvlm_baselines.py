"""toyvlm.baselines: its FLOPs per question are the ones the patched model reports for that question."""

from pathlib import Path

import pytest

import dymu
from dymu.flops import last_prefill, prefill_flops
from dymu.api import tome_r_for
from dymu.thresholds import Thresholds
from toyvlm import baselines as B
from toyvlm import evaluate as E
from toyvlm.train import PROMPT

TOY = Path(__file__).resolve().parents[1] / "assets" / "toy-llava"


@pytest.fixture(scope="module")
def toy():
    model, processor = E.load(TOY)
    records, images = E.test_records(4, image_size=E.image_size_of(processor))
    return model, processor, records[:3], images


SETTINGS = {
    "unmerged": {},
    "fastv": {"prune": "fastv:k=2,r=0.5"},
    "vtw": {"prune": "vtw:k=1"},
    "dtome-mid": {"thresholds": "mid"},
    "tome": {"merge": "tome"},
    "dtome-mid compact": {"thresholds": "mid", "vtu": "none"},
}


@pytest.mark.parametrize("setting", SETTINGS)
def test_per_question_flops_equal_what_the_patched_model_reports(toy, setting):
    model, processor, records, images = toy
    keywords = dict(SETTINGS[setting])
    if keywords.get("thresholds"):
        keywords["thresholds"] = Thresholds.load(TOY / "thresholds" / f"{keywords['thresholds']}.json")
    if keywords.get("merge"):
        keywords["merge"] = tome_r_for(50, model)
    vtu = keywords.setdefault("vtu", "fast")
    dymu.apply(model, **keywords)
    try:
        merged = "thresholds" in keywords or "merge" in keywords
        counts = B.encoder_counts(model, processor, images) if merged else None
        texts = B.text_tokens(processor, records)
        for record, text in zip(records, texts):
            answers = E.answer(model, processor, [record], images)
            assert answers[0]
            if vtu == "none":
                inputs = dymu.prepare_inputs(model, processor, [images[record["image"]]], [PROMPT.format(question=record["question"])])
            else:
                inputs = processor(images=[images[record["image"]]], text=[PROMPT.format(question=record["question"])])
            last = last_prefill(model, len(inputs["input_ids"][0]), vtu)
            reported = last.vision + prefill_flops(last.decoder, last.plan).flops
            assert B.mean_prefill_flops(model, [record], [text], counts, vtu, keywords.get("prune")) == reported
        unmerged = B.mean_prefill_flops(model, records, texts, None, "fast", None)
        mean = B.mean_prefill_flops(model, records, texts, counts, vtu, keywords.get("prune"))
        assert mean == unmerged if setting == "unmerged" else mean < unmerged
    finally:
        dymu.remove(model)
