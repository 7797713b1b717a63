"""Method spec strings: one parser, one-line errors that list the syntax."""

import pytest

from dymu import DymuError
from dymu.methods import VTW, DToMe, FastV, ToMe, parse_merge, parse_prune


def test_specs_parse_to_methods():
    assert parse_prune("fastv:k=2,r=0.5") == FastV(k=2, r=0.5, rerank="prefill", score="last")
    assert parse_prune(" fastv:k=3, r=0.75, rerank=step,score=all ") == FastV(k=3, r=0.75, rerank="step", score="all")
    assert parse_prune("fastv") == FastV()  # every option has the official default
    assert parse_prune("vtw:k=16") == VTW(k=16)
    assert parse_prune(None) is None
    assert parse_prune(VTW(k=3)) == VTW(k=3)
    assert parse_merge("tome:r=8") == ToMe(r=8)
    assert parse_merge("dtome:thr/mid.json") == DToMe(path="thr/mid.json")


@pytest.mark.parametrize("spec, reason", [
    ("fastv:k=x", "k must be an integer, got 'x'"),
    ("fastv:r=1.5", "r must be between 0 and 1"),
    ("fastv:rerank=always", "rerank must be one of prefill, step"),
    ("fastv:k=2,depth=3", "unknown option 'depth'"),
    ("fastv:k", "'k' is not key=value"),
    ("vtw:k=-1", "k must be >= 0"),
    ("fasv:k=2", "unknown method 'fasv'"),
    ("", ""),
])
def test_invalid_prune_specs_are_one_line_with_the_syntax(spec, reason):
    with pytest.raises(DymuError) as caught:
        parse_prune(spec)
    message = str(caught.value)
    assert reason in message and "syntax: fastv:k=K,r=R" in message and "vtw:k=K" in message and "\n" not in message


def test_invalid_merge_specs():
    for spec, reason in (("tome", "r missing"), ("tome:r=2.5", "r must be an integer"), ("dtome:", "file is missing")):
        with pytest.raises(DymuError, match=reason):
            parse_merge(spec)


def test_tome_r_for_counts_patches_up_to_the_read_layer(clip):
    from dymu.api import tome_r_for
    from dymu.vision import tower_info

    from .test_encoder import _tiny_llava

    model, _ = clip  # 4 layers, all merging: 576 - 4 r patches while the capacity allows
    assert tome_r_for(552, model) == ToMe(r=6)
    assert tome_r_for(550.2, tower_info(model)) == ToMe(r=6)  # 552 is nearer than 548
    assert tome_r_for(36, model) == ToMe(r=288)
    assert tome_r_for(552, _tiny_llava()) == ToMe(r=8), "LLaVA reads layer -2: 3 merging layers"
    for tokens in (-1, 577):
        with pytest.raises(DymuError, match="between 0 and 576"):
            tome_r_for(tokens, model)
