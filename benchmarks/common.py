"""Helpers shared by the benchmarks (run as scripts: ``python benchmarks/NAME.py`` puts this folder on the path)."""

from __future__ import annotations

import time


class LanguageModelTimer:
    """Wall time of every forward of a module (hooks): ``times`` lists them, prefill first, then one per decode step."""

    def __init__(self, module):
        self.times = []
        module.register_forward_pre_hook(self._start)
        module.register_forward_hook(self._stop)

    @property
    def elapsed(self) -> float:
        return sum(self.times)

    def _start(self, module, args):
        self._t = time.perf_counter()

    def _stop(self, module, args, output):
        self.times.append(time.perf_counter() - self._t)


def kv_bytes(cache) -> int:
    total = 0
    for layer in cache.layers:
        for tensor in (layer.keys, layer.values):
            total += tensor.numel() * tensor.element_size()
    return total


def prompt_with_text_tokens(processor, count: int) -> str:
    """A chat prompt with one image whose text part (template included) is about ``count`` tokens."""
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    words = 1
    while True:
        question = " ".join(["describe the photo"] * words)
        text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
                                             add_generation_prompt=True)
        ids = processor.tokenizer(text).input_ids
        if sum(1 for i in ids if i != image_token) >= count:
            return text
        words += 1
