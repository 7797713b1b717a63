"""The transformers contract: declared range, layout checks at apply, run-time checks that refuse to decode garbage."""

import inspect
import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import dymu
from dymu import compat
from dymu.llava import get_vlm_patch
from dymu.vision import get_patch

from .test_llava import MERGING, images, left_pad, prompt, tiny_llava  # noqa: F401 (images: fixture)

ROOT = Path(__file__).resolve().parents[1]


def test_declared_range_matches_the_tested_range():
    """pyproject admits exactly [TESTED_MIN, NEXT_UNTESTED); the constraints file installs TESTED_MAX."""
    requirements = re.findall(r'^\s*"(transformers[^"]*)",$', (ROOT / "pyproject.toml").read_text(), re.M)
    assert requirements == [f"transformers>={compat.TESTED_MIN},<{compat.NEXT_UNTESTED}"]
    pinned = re.search(r"^transformers==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M)
    assert pinned and pinned.group(1) == compat.TESTED_MAX
    assert compat.in_tested_range(compat.TESTED_MIN) and compat.in_tested_range(compat.TESTED_MAX)
    assert not compat.in_tested_range(compat.NEXT_UNTESTED + ".0") and not compat.in_tested_range("5.17.1")
    assert compat.in_tested_range(), f"the suite runs on transformers {compat.transformers_version()}, outside the range"


def _version_named(message: str) -> bool:
    return compat.transformers_version() in message and compat.TESTED_MIN in message and compat.TESTED_MAX in message


def test_unknown_attention_layout_is_refused_naming_the_version():
    """A test double: an attention with a fused qkv projection (no q_proj / k_proj / v_proj)."""
    model = tiny_llava()
    attention = model.model.language_model.layers[1].self_attn
    attention.qkv_proj = nn.Linear(64, 3 * 64)
    del attention.q_proj, attention.k_proj, attention.v_proj
    with pytest.raises(compat.LayoutError) as caught:
        dymu.apply(model, MERGING)
    message = str(caught.value)
    assert "layer 1" in message and "q_proj" in message and _version_named(message) and "\n" not in message
    assert get_vlm_patch(model) is None and get_patch(model) is None, "a refused model is left untouched"


def test_unknown_vlm_forward_is_refused():
    model = tiny_llava()
    stock = type(model.model).forward

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, **kwargs):  # no mm_encoder_outputs
        return stock(self, input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, **kwargs)

    model.model.__class__ = type("LlavaModel", (type(model.model),), {"forward": forward})  # an older LlavaModel
    with pytest.raises(compat.LayoutError, match="mm_encoder_outputs") as caught:
        dymu.apply(model, MERGING)
    assert _version_named(str(caught.value))


def test_unknown_vision_layout_is_refused(model_dirs):
    from dymu.models import load_model

    tower = load_model(model_dirs["tiny-clip"])
    del tower.encoder.layers[0].layer_norm2
    with pytest.raises(compat.LayoutError, match="layer_norm2") as caught:
        dymu.apply(tower, [math.inf] * 4)
    assert _version_named(str(caught.value))


def _cache_argument(model) -> str:
    """The name this transformers gives the cache argument (5.24 renamed past_key_values to cache)."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def test_a_prefill_that_leaves_the_cache_empty_raises(images):
    """Simulates a transformers whose attention no longer writes the cache dymu expects: refuse, don't decode."""
    from transformers import DynamicCache

    model = tiny_llava()
    dymu.apply(model, MERGING)
    ids = prompt(4, 6, seed=21)[None]
    cache = DynamicCache(config=model.config.text_config)
    cache.update = lambda key, value, *args, **kwargs: (key, value)  # stores nothing
    with torch.no_grad(), pytest.raises(compat.LayoutError, match="KV cache at 0 positions instead of") as caught:
        model(input_ids=ids, pixel_values=images[:1], use_cache=True, **{_cache_argument(model): cache})
    assert _version_named(str(caught.value))
    with torch.no_grad():  # a working cache passes the same check
        out = model(input_ids=ids, pixel_values=images[:1], use_cache=True)
    assert len(out.logits[0]) == ids.shape[1]


class Bypass(nn.Module):
    """Calls a linear layer's maths without going through its module call (so hooks on it never fire)."""

    def __init__(self, linear):
        super().__init__()
        self.linear = linear

    def forward(self, x):
        return nn.functional.linear(x, self.linear.weight, self.linear.bias)


def test_a_projection_that_escapes_the_hooks_raises(images):
    model = tiny_llava()
    dymu.apply(model, MERGING)
    attention = model.model.language_model.layers[0].self_attn
    attention.o_proj = Bypass(attention.o_proj)
    ids = prompt(4, 6, seed=22)[None]
    with torch.no_grad(), pytest.raises(compat.LayoutError, match="o_proj ran 0 time"):
        model(input_ids=ids, pixel_values=images[:1])
    with torch.no_grad():  # decode-like calls without images carry no plan and are not checked
        model(input_ids=ids[:, :4])


def test_remove_restores_attention_implementation_and_hooks(images):
    model = tiny_llava()
    language_model = model.model.language_model
    before = language_model.config._attn_implementation
    ids, mask = left_pad([prompt(5, 7, seed=1), prompt(2, 4, seed=2)])
    with torch.no_grad():
        stock = model(input_ids=ids, attention_mask=mask, pixel_values=images[:2]).logits
    dymu.apply(model, MERGING, vtu="exact")
    assert language_model.config._attn_implementation == compat.KERNEL_PREFIX + before
    dymu.remove(model)
    assert language_model.config._attn_implementation == before
    modules = [language_model, *language_model.modules()]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in modules), "every hook is removed"
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask, pixel_values=images[:2]).logits, stock)


def test_an_untested_release_warns_once_in_one_line():
    """Issue 23: outside the tested range, one warning line per process, with no Python source line under it."""
    import subprocess
    import sys

    code = ("import dymu, dymu.compat as c\n"
            "c.transformers_version = lambda: '9.0.0'\n"
            "from tests.test_llava import tiny_llava\n"
            "for _ in range(3):\n"
            "    dymu.apply(tiny_llava(), None)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                            env={**__import__("os").environ, "PYTHONWARNINGS": "default"})
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if "dymu" in line]
    assert len(lines) == 1 and "transformers 9.0.0 is outside the tested" in lines[0], result.stderr
    assert "UntestedTransformersWarning" in lines[0] and "apply(" not in result.stderr  # no source line
