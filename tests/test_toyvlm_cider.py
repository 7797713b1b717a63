"""toyvlm.cider gives the official CIDEr-D: numbers of COCO's pycocoevalcap (Java PTBTokenizer + CiderScorer) on a
stored fixture (tests/fixtures/make_cider_fixture.py), and hand-computed cases."""

import json
import math
from pathlib import Path

import pytest

from toyvlm.cider import cider_d, ptb_tokenize

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "cider_pycocoevalcap.json").read_text())


def test_ptb_tokenize_matches_the_java_tokenizer_on_every_fixture_caption():
    for key, caption in FIXTURE["candidates"].items():
        assert ptb_tokenize(caption) == FIXTURE["tokenized_candidates"][key], caption
    for key, captions in FIXTURE["references"].items():
        assert [ptb_tokenize(c) for c in captions] == FIXTURE["tokenized_references"][key]


def test_cider_d_equals_pycocoevalcap_on_the_fixture():
    score, per_image = cider_d(FIXTURE["candidates"], FIXTURE["references"])
    assert score == pytest.approx(FIXTURE["cider"], rel=1e-9, abs=1e-12)
    for key, expected in FIXTURE["per_image"].items():
        assert per_image[key] == pytest.approx(expected, rel=1e-9, abs=1e-12), key
    # on the package's own tokenisation too
    pre = cider_d(FIXTURE["tokenized_candidates"], FIXTURE["tokenized_references"], tokenize=False)[0]
    assert pre == pytest.approx(FIXTURE["cider"], rel=1e-9)


def test_cider_d_hand_checked():
    l2 = math.log(2)  # log(images): every n-gram below is in one image's references only, idf = log 2
    refs = {"a": ["red circle"], "b": ["blue square"]}
    # exact two-word match: cosine 1 at n = 1, 2; nothing at n = 3, 4 -> 10 * 2 / 4
    score, per = cider_d({"a": "Red circle.", "b": "blue square"}, refs)
    assert per == {"a": pytest.approx(5.0), "b": pytest.approx(5.0)} and score == pytest.approx(5.0)
    # repetition: unigrams clipped (tf 2 vs 1): (2 * l2 * l2 clipped to l2 * l2 each) / (2 sqrt 2 l2 * sqrt 2 l2) = 1/2;
    # bigrams: l2^2 / (sqrt 5 l2 * l2) = 1 / sqrt 5; length = bigram count 3 vs 1 -> exp(-4 / 72)
    _, per = cider_d({"a": "red circle red circle", "b": "blue square"}, refs)
    assert per["a"] == pytest.approx(10 * (0.5 + 1 / math.sqrt(5)) * math.exp(-4 / 72) / 4)
    # an n-gram in every image's references has idf 0: "red" no longer counts
    _, per = cider_d({"a": "red", "b": "red"}, {"a": ["red circle"], "b": ["red square"]})
    assert per == {"a": 0.0, "b": 0.0}
    assert l2 > 0


def test_cider_d_one_line_errors():
    with pytest.raises(ValueError, match="same image keys"):
        cider_d({"a": "x"}, {"b": ["x"]})
    with pytest.raises(ValueError, match="outside the re-implemented PTB subset"):
        ptb_tokenize("it's (big)")
