"""FLOP estimates (2 x multiply-accumulates) for the vision encoder and the language-model prefill."""

from __future__ import annotations

from .merge import layer_flops, matching_flops

#: exact VTU's score product is one matmul of width 3 x head_dim (dymu.vtu.exact_scores)
EXACT_SCORE_WIDTH = 3


def encoder_flops(layer_tokens: list[int], num_tokens: int, protected: int, hidden: int, intermediate: int,
                  head_dim: int, merging: bool = True) -> int:
    """One image through a ViT given its token count (protected tokens excluded) after each executed layer."""
    total, tokens_in = 0, num_tokens
    for after in layer_tokens:
        tokens_out = after + protected
        total += layer_flops(tokens_in, tokens_out, hidden, intermediate)
        if merging:
            total += matching_flops(tokens_in, head_dim)
        tokens_in = tokens_out
    return total


def decoder_prefill_flops(full: int, unique: int, hidden: int, kv_hidden: int, intermediate: int, layers: int,
                          mode: str = "fast") -> int:
    """Prefill of a Llama-style decoder (gated MLP) over one sequence.

    mode "stock": everything on ``full`` tokens; "fast"/"exact": projections and MLP on ``unique`` tokens,
    attention products at full length (exact: the score product is EXACT_SCORE_WIDTH times wider); "none":
    everything on ``unique``.
    """
    rows = full if mode == "stock" else unique
    attention_len = unique if mode == "none" else full
    projections = 2 * rows * hidden * (2 * hidden + 2 * kv_hidden)
    scores = 2 * attention_len * attention_len * hidden * (EXACT_SCORE_WIDTH if mode == "exact" else 1)
    weighted_values = 2 * attention_len * attention_len * hidden
    mlp = 2 * 3 * rows * hidden * intermediate
    return layers * (projections + scores + weighted_values + mlp)
