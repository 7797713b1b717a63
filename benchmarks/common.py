"""Helpers shared by the benchmarks (run as scripts: ``python benchmarks/NAME.py`` puts this folder on the path)."""

from __future__ import annotations

import math
import time

import torch


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


class ShapeTimer:
    """What this CPU gives for a prefill plan's shapes, with no dymu code: one decoder layer's products (its q/k/v/o
    projections and MLP, the model's own modules) on (1, rows, hidden) and PyTorch's SDPA at (queries, keys), timed on
    random inputs, best of every ``measure`` call. ``ideal(shapes)`` sums them over a plan's layers
    (``dymu.flops.LayerShape``): the time a prefill of exactly those shapes would take if nothing else ran (no norms,
    RoPE, masks, VTU expansions or plan bookkeeping). The speedup two such sums predict prices each product at the rate
    this CPU reaches for its row count, where the FLOPs ratio assumes one rate for all."""

    def __init__(self, layer, config):
        self.attention, self.mlp = layer.self_attn, layer.mlp
        self.hidden = config.hidden_size
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or self.hidden // self.heads
        self.best = {}  # ("products", rows) | ("attention", queries, keys, width) | ("ranking", queries, keys) -> s

    @staticmethod
    def _keys(shape) -> list[tuple]:
        keys = [("products", shape.rows), ("attention", shape.queries, shape.keys, shape.score_width)]
        return keys + ([("ranking", shape.ranking_queries, shape.keys)] if shape.ranking_queries else [])

    def measure(self, plans) -> None:
        """Time every distinct shape of ``plans`` (lists of LayerShape) once; keep the best per shape."""
        for key in sorted({key for shapes in plans for shape in shapes for key in self._keys(shape)}):
            inputs = self._inputs(key)
            with torch.no_grad():
                start = time.perf_counter()
                self._run(key, inputs)
                elapsed = time.perf_counter() - start
            self.best[key] = min(self.best.get(key, math.inf), elapsed)

    def _inputs(self, key: tuple) -> list[torch.Tensor]:
        if key[0] == "products":  # (batch, rows, hidden), (batch, rows, heads · head_dim): o_proj's input
            return [torch.randn(1, key[1], self.hidden), torch.randn(1, key[1], self.attention.o_proj.in_features)]
        queries, keys = key[1], key[2]
        width = self.head_dim * (key[3] if key[0] == "attention" else 1)
        return [torch.randn(1, self.heads, queries, width),  # (batch, heads, queries, head_dim · score width)
                torch.randn(1, self.kv_heads, keys, width),  # (batch, kv heads, keys, ...)
                torch.randn(1, self.kv_heads, keys, self.head_dim)]

    def _run(self, key: tuple, inputs: list[torch.Tensor]) -> None:
        if key[0] == "products":
            hidden, heads = inputs
            for name in ("q_proj", "k_proj", "v_proj"):
                getattr(self.attention, name)(hidden)
            self.attention.o_proj(heads)
            self.mlp(hidden)
            return
        query, key_states, value = inputs
        groups = self.heads // self.kv_heads
        key_states, value = key_states.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        if key[0] == "ranking":  # FastV's extra scores: softmax(q kᵀ) of the ranking queries
            torch.softmax(query @ key_states.transpose(-1, -2) * self.head_dim ** -0.5, dim=-1)
            return
        if key_states.shape[-1] != value.shape[-1]:  # a wider score product (exact VTU): values zero-padded to it
            value = torch.nn.functional.pad(value, (0, key_states.shape[-1] - value.shape[-1]))
        torch.nn.functional.scaled_dot_product_attention(query, key_states, value, is_causal=key[1] == key[2])

    def ideal(self, shapes) -> float:
        """Seconds: the sum over the plan's layers of the best times of its shapes."""
        return sum(self.best[key] for shape in shapes for key in self._keys(shape))
