"""The model card (README.md) of the toy OneVision, from its training_log.json and eval/results.json
(``python -m toyvlm.evaluate_onevision``); ``python -m toyvlm.card FOLDER`` writes it for a OneVision folder."""

from __future__ import annotations

import math
from pathlib import Path

from . import onevision as O
from .card import _describe_rows, _describing, _extra_losses, _history, _stage_one, card_inputs
from .evaluate_onevision import OV_LEVELS, REFERENCE, markdown_table

#: shown in the card's snippet and reproduce lines
FOLDER = "assets/toy-llava-onevision"


def layouts_table(folder: Path) -> str:
    """Every rendered size at the model's crops: its AnyRes crops, the grid's tokens, unpadded, down-scaled, and the
    placeholders the stock processor writes (base crop + grid + one newline per row)."""
    import torch
    from transformers.image_processing_utils import select_best_resolution
    from transformers.models.llava_onevision.modeling_llava_onevision import unpad_image

    from dymu.models import load_processor

    processor = load_processor(folder, full=True)
    image_processor = processor.image_processor
    crop, side = image_processor.size["height"], math.isqrt(processor.num_image_tokens)
    lines = []
    for shape in O.IMAGE_SHAPES:
        width, height = O.shape_pixels(shape, crop)
        best = select_best_resolution((height, width), image_processor.image_grid_pinpoints)
        grid = (best[0] // crop, best[1] // crop)
        tokens = (grid[0] * side, grid[1] * side)
        rows, columns = unpad_image(torch.zeros(1, *tokens), (height, width)).shape[1:]
        placeholders = processor._get_number_of_features(height, width, crop, crop)
        downscaled = placeholders < side * side + rows * (columns + 1)
        kept = placeholders - side * side
        lines.append(f"| {width} x {height} | {1 + grid[0] * grid[1]} ({grid[0]} x {grid[1]} grid) | "
                     f"{tokens[0]} x {tokens[1]} | {rows} x {columns} | "
                     f"{'yes' if downscaled else 'no'} | {placeholders} ({side * side} + {kept}) |")
    return ("| image (w x h px) | crops | grid tokens | unpadded | scaled down | placeholders (base + grid with "
            "newlines) |\n|---|---|---|---|---|---|\n" + "\n".join(lines))


def _layout_comparison(rows: dict, levels) -> str:
    """Sentences comparing the model's layout with the reference's at each level (accuracy and CIDEr-D points)."""
    parts = []
    for level in levels:
        ours, theirs = rows.get(f"DToMe-{level} (VTU)"), rows.get(f"DToMe-{level} (VTU), reference layout")
        if not ours or not theirs:
            continue
        text = (f"{level}: {100 * ours['overall']:.1f}% with the model's layout vs {100 * theirs['overall']:.1f}% "
                f"with the reference's ({100 * (ours['overall'] - theirs['overall']):+.1f} points)")
        if "cider" in ours and "cider" in theirs:
            text += f", CIDEr-D {ours['cider']:.3f} vs {theirs['cider']:.3f}"
        parts.append(text)
    base, moved = rows.get("unmerged"), rows.get("unmerged, reference layout")
    if base and moved:
        parts.insert(0, f"unmerged: {100 * base['overall']:.1f}% vs {100 * moved['overall']:.1f}% "
                        f"({100 * (base['overall'] - moved['overall']):+.1f} points)"
                        + (f", CIDEr-D {base['cider']:.3f} vs {moved['cider']:.3f}" if "cider" in base and "cider" in moved
                           else ""))
    return "; ".join(parts)


def _start(cfg: dict) -> str:
    if not cfg.get("init_from"):
        return "the language model starts from fresh weights"
    return (f"the language model starts as `{cfg['init_from']}`'s Llama (Qwen2's q/k/v biases at zero compute exactly "
            "what it computed)")


def model_card(folder) -> str:
    folder = Path(folder)
    log, results, config, cfg, vision, text, params, rows, baselines = card_inputs(folder)
    unmerged = rows["unmerged"]
    kinds = " | ".join(unmerged["per_kind"])
    minutes, cpu_minutes = log["train_seconds"] / 60, log.get("train_cpu_seconds", 0) / 60
    levels = [level for level in OV_LEVELS if level in results.get("targets", {})]
    targets = ", ".join(f"{level} {results['targets'][level]}" for level in levels)
    patches = results["patches"]
    reference_rows = [row for row in results["rows"] if row["vtu"] == REFERENCE]
    comparison = _layout_comparison(rows, levels)
    return f"""# toy-llava-onevision: a small LLaVA-OneVision-format model trained on synthetic VQA

A stock `LlavaOnevisionForConditionalGeneration` checkpoint (safetensors) with the toy's word-level tokenizer and a
stock `LlavaOnevisionProcessor` (AnyRes crops, unpadding, `anyres_max_{cfg['anyres_max']}` down-scaling, newline
tokens), trained on 2 CPU cores by `python -m toyvlm.train --arch onevision`, so that dymu's OneVision path (every
crop merged, the model's own token layout kept) is measured on a model that really reads its images. A research
fixture: it only knows the synthetic task below.

```python
from transformers import LlavaOnevisionForConditionalGeneration
from dymu.models import load_processor  # AutoProcessor needs torchvision for OneVision's video processor
model = LlavaOnevisionForConditionalGeneration.from_pretrained("{FOLDER}")
processor = load_processor("{FOLDER}", full=True)
prompt = "USER: <image>\\nWhat colour is the triangle? ASSISTANT:"
inputs = processor(images=image, text=prompt, return_tensors="pt")
answer = processor.decode(model.generate(**inputs, max_new_tokens=3)[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
```

## Architecture ({sum(params.values()) / 1e6:.2f} M parameters)

- Vision tower: SigLIP ({params['vision tower'] / 1e6:.2f} M), {vision['image_size']} px crops, patch
  {vision['patch_size']} -> {patches} tokens per crop, {vision['num_hidden_layers']} layers, width
  {vision['hidden_size']}, {vision['num_attention_heads']} heads, no CLS, no head; read at its last layer
  (`vision_feature_layer` {config['vision_feature_layer']}, `full` strategy), as OneVision.
- AnyRes: grid pinpoints {', '.join(f"{h}x{w}" for h, w in config['image_grid_pinpoints'])} px (crops of
  {vision['image_size']} px), `{config['vision_aspect_ratio']}`; the image's tokens are the base crop's, then the
  grid's unpadded to the image's aspect ratio, bilinearly scaled down when above
  {cfg['anyres_max']} crops' worth (x 1.1), with a learned `image_newline` after every row.
- Projector: two-layer GELU MLP ({params['projector'] / 1e6:.2f} M, the newline included).
- Language model: Qwen2 ({params['language model'] / 1e6:.2f} M), {text['num_hidden_layers']} layers, width
  {text['hidden_size']}, {text['num_attention_heads']} query / {text['num_key_value_heads']} key-value heads (GQA),
  q/k/v biases, RoPE, vocabulary {text['vocab_size']} (the toy LLaVA's words + `<video>`).
- Prompt format: the toy's LLaVA-1.5 one, `USER: <image>\\n{{question}} ASSISTANT: {{answer}}</s>`.

## Images

The toy scenes (`toyvlm.data`: 1-8 objects, 4 shapes x 6 colours, at most one letter, flat / gradient / texture /
photo backgrounds) rendered at one of {len(O.IMAGE_SHAPES)} sizes per scene (its own seeded stream): the square scene
stretched to the size, so every question stays true. What the stock processor and model make of each size:

{layouts_table(folder)}

Questions and descriptions as for the toy LLaVA; evaluation on split `test`, first {results['scenes']} scenes,
{results['questions']} questions, the first {results['describe_scenes']} described.

## Training

The toy LLaVA's recipe (`toyvlm.train`, one code path for both models), with the OneVision parts of
`toyvlm.onevision`: {_start(cfg)}; the dense targets (per patch of every crop) are cut from a probe map of
the scene by the image processor's own crop code and laid out like image tokens by the model's own
`pack_image_features`, so pointing and counting supervise the positions the language model really sees.
{_stage_one(cfg)}{cfg['steps']} steps of {cfg['batch_size']} images (their crops), each with a {cfg['turns']}-turn
conversation of freshly sampled questions (loss on every answer and `</s>`){_describe_rows(cfg)}; AdamW lr
{cfg['learning_rate']}, {cfg['warmup_steps']} warm-up steps, cosine decay, weight decay {cfg['weight_decay']},
gradient clipping 1.0; at most {cfg['curriculum_start']} object(s) per scene at first, rising to 8 over
{cfg['curriculum_steps']} steps. Training-only losses, discarded with their heads: a per-patch linear head on the
tower features of every crop (colour, shape, object centre, letter, patch row and column; weight
{cfg['aux_weight']}){_extra_losses(cfg)}; the row / column read-out on the base crop only (the one crop whose patch
position is the image position), the locate read-out's positions and the counted centres from the base crop.
fp32, seed {cfg['seed']}, {cfg['threads']} threads: **{minutes:.1f} minutes** of wall time on a shared 2-core
machine ({cpu_minutes:.1f} CPU minutes; see the history below for the idle-machine estimate).

## Accuracy (test split, {results['questions']} questions, greedy, exact match after normalisation)

| model | overall | {kinds} |
|---|---|{'---|' * len(unmerged['per_kind'])}
{baselines}

`blind` shows the model a uniform grey image of the same size; `prior` answers each exact question text with its most
frequent training answer. The first {results['slice_questions']} test questions: **{100 * unmerged['slice_accuracy']:.1f}%**.

{_describing(folder, results)}## With DyMU (thresholds on {results['threshold_scenes']} training scenes, every crop an image; targets {targets} tokens of {patches} per crop)

The targets are the DyMU paper's OneVision levels (105 / 183 / 339 of 729 tokens per crop: 14.4 / 25.1 / 46.5%)
scaled to {patches} tokens, raised where this {vision['num_hidden_layers']}-layer tower cannot merge that far (bipartite
matching merges at most half the tokens per layer). VTU = virtual token unmerging in the Qwen2 with the stock layout
kept (`vtu="fast"`); no VTU = compact (`vtu="none"`, `dymu.prepare_inputs`: each position's token once, newlines
kept). Tokens: per crop (of {patches}), per image (its crops summed) and what the language model holds for an image
(distinct tokens) of the stock layout's positions. The shipped presets are `thresholds/{{low,mid,high}}.json`.

{markdown_table(results)}
**Our layout vs the reference's.** The DyMU reference feeds OneVision every crop's tokens one after the other (base
crop first): no unpadding, no spatial grid, no newline tokens, no down-scaling ({len(reference_rows)} rows above,
VTU at the same thresholds). Measured: {comparison}.

Full results: `eval/results.json`, plots `eval/accuracy_vs_tokens.png`, `eval/cider_vs_tokens.png`.
Reproduce: `python -m toyvlm.evaluate_onevision --model {FOLDER}` (it finds the thresholds when
`thresholds/` lacks them) and `python -m toyvlm.card {FOLDER}`.
{_history(folder)}"""
