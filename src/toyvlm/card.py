"""Write the model card (README.md) of a toy checkpoint from its training_log.json and eval/results.json.

    python -m toyvlm.card assets/toy-llava
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from . import data as D
from .evaluate import DEFAULT_THRESHOLD_SCENES, DYMU_LEVELS, markdown_table
from .train import MAX_DESCRIPTION_TOKENS

#: accuracy the toy model is meant to reach on the test split (issue 4)
TARGET_OVERALL = 0.90
TARGET_PER_KIND = 0.75
#: hand-written training history kept next to the checkpoint, included in the card
HISTORY_FILE = "history.md"
#: a kind whose accuracy is within this of the blind (grey image) score is not read from the image
NEAR_BLIND_MARGIN = 0.05


def _parameters(folder: Path) -> dict[str, int]:
    from safetensors import safe_open

    counts = {"vision tower": 0, "projector": 0, "language model": 0}
    with safe_open(str(folder / "model.safetensors"), "pt") as handle:
        for name in handle.keys():
            part = "vision tower" if "vision_tower" in name else "projector" if "projector" in name else "language model"
            counts[part] += math.prod(handle.get_slice(name).get_shape())
    return counts


def _training_scenes(cfg: dict) -> str:
    """A pool of ``train_scenes`` (older runs) or every scene new (the train split from its start)."""
    if "train_scenes" in cfg:
        return f"{cfg['train_scenes']} scenes"
    return "a new scene for every training row (the split read from its start)"


def _describe_rows(cfg: dict) -> str:
    """The describe rows and the hard-"no" share of runs that have them (issue 14), else nothing."""
    parts = []
    if cfg.get("describe_rows"):
        parts.append(f", plus {cfg['describe_rows']} rows of one describe turn answered by one of the scene's five "
                     "reference descriptions")
    if cfg.get("hard_no_share"):
        parts.append(f"; an existence \"no\" asks about a shape that is in the scene in another colour with "
                     f"probability {cfg['hard_no_share']} when the scene allows both kinds")
    return "".join(parts)


def card_inputs(folder: Path):
    """What a card is written from: (training log, eval results, config.json, the log's training config, vision
    config, text config, parameters per part, result rows by name, the accuracy table's rows (unmerged, blind,
    prior) as Markdown)."""
    log = json.loads((folder / "training_log.json").read_text())
    results = json.loads((folder / "eval" / "results.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    rows = {row["name"]: row for row in results["rows"]}
    baselines = "\n".join(f"| {name} | {100 * rows[name]['overall']:.1f} | "
                          + " | ".join(f"{100 * v:.1f}" for v in rows[name]["per_kind"].values()) + " |"
                          for name in ("unmerged", "blind (grey image)", "prior (text only)") if name in rows)
    return (log, results, config, log["config"], config["vision_config"], config["text_config"], _parameters(folder),
            rows, baselines)


def model_card(folder) -> str:
    folder = Path(folder)
    log, results, config, cfg, vision, text, params, rows, baselines = card_inputs(folder)
    unmerged = rows["unmerged"]
    kinds = " | ".join(unmerged["per_kind"])
    minutes = log["train_seconds"] / 60
    weak = [kind for kind, value in unmerged["per_kind"].items() if value < TARGET_PER_KIND]
    blind = rows.get("blind (grey image)", {}).get("per_kind", {})
    sightless = [kind for kind, value in unmerged["per_kind"].items()
                 if kind in blind and value - blind[kind] < NEAR_BLIND_MARGIN]
    status = ("**Below the target** this model was meant to reach (at least "
              f"{100 * TARGET_OVERALL:.0f}% overall and {100 * TARGET_PER_KIND:.0f}% per kind): "
              f"{100 * unmerged['overall']:.1f}% overall"
              + "".join(f", {kind} {100 * unmerged['per_kind'][kind]:.1f}%" for kind in weak) + "."
              + (f" Within {100 * NEAR_BLIND_MARGIN:.0f} points of the blind score (answered from the language prior): "
                 f"{', '.join(sightless)}." if sightless else "")
              if unmerged["overall"] < TARGET_OVERALL or weak else "Meets the target accuracy.")
    targets = results.get("targets", {})
    read = config["vision_feature_layer"] % (vision["num_hidden_layers"] + 1)
    levels = ", ".join(f"{level} {targets.get(level, round(fraction * results['patches']))}"
                       for level, fraction in DYMU_LEVELS.items())
    return f"""# toy-llava: a small LLaVA-1.5-format model trained from scratch on synthetic VQA

A stock `LlavaForConditionalGeneration` checkpoint (safetensors) with a word-level tokenizer and a
`LlavaProcessor`, trained on 2 CPU cores by `make toy-model` (`python -m toyvlm.train`), so that dymu's accuracy
claims rest on a model that really reads its images. It is a research fixture, not a general VLM: it only knows
the synthetic task below.

```python
from transformers import AutoProcessor, LlavaForConditionalGeneration
model = LlavaForConditionalGeneration.from_pretrained("assets/toy-llava")
processor = AutoProcessor.from_pretrained("assets/toy-llava")
prompt = "USER: <image>\\nWhat colour is the triangle? ASSISTANT:"
inputs = processor(images=image, text=prompt, return_tensors="pt")
answer = processor.decode(model.generate(**inputs, max_new_tokens=3)[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
```

## Architecture ({sum(params.values()) / 1e6:.2f} M parameters)

- Vision tower: CLIP ViT ({params['vision tower'] / 1e6:.2f} M), {vision['image_size']} px, patch {vision['patch_size']} ->
  {results['patches']} patches, {vision['num_hidden_layers']} layers, width {vision['hidden_size']},
  {vision['num_attention_heads']} heads, quick-GELU. Read at `vision_feature_layer` {config['vision_feature_layer']}
  with the `default` strategy (CLS dropped), as LLaVA-1.5.
- Projector: LLaVA-1.5's two-layer GELU MLP ({params['projector'] / 1e6:.2f} M).
- Language model: Llama ({params['language model'] / 1e6:.2f} M), {text['num_hidden_layers']} layers, width
  {text['hidden_size']}, {text['num_attention_heads']} query / {text['num_key_value_heads']} key-value heads (GQA),
  RoPE, vocabulary {text['vocab_size']} (word-level).
- Prompt format: LLaVA-1.5, `USER: <image>\\n{{question}} ASSISTANT: {{answer}}</s>`.

## Data

`toyvlm.data`: deterministic scenes of 1-8 objects (4 shapes x 6 colours, small/large, at most one with a
letter written on it) on flat, gradient, textured or scikit-image photo backgrounds (1/4 each). Questions:
exists (yes/no, balanced, POPE-style), colour, count (number words), position (left/right/above/below) and detail
(the letter), each answered with one word; and describe ("Describe the image." or one of
{len(D.DESCRIBE_PROMPTS) - 1} paraphrases), answered with a description of every object (size, colour, shape,
letter, place) and the background, {D.NUM_DESCRIPTIONS} reference paraphrases per scene.
Training: {_training_scenes(cfg)} of split `train` (seed {cfg['seed']}); evaluation: split `test`
(an independent random stream), first {results['scenes']} scenes, {results['questions']} questions.

## Training

{_stage_one(cfg)}{cfg['steps']} steps of {cfg['batch_size']} images, each with a {cfg['turns']}-turn conversation of freshly sampled
questions (loss on every answer and `</s>`){_describe_rows(cfg)}; AdamW lr {cfg['learning_rate']}, {cfg['warmup_steps']} warm-up steps,
cosine decay, weight decay {cfg['weight_decay']}, gradient clipping 1.0. A curriculum on scene size: at most
{cfg.get('curriculum_start', 8)} object(s) per training scene at first, rising linearly to 8 over the first
{cfg.get('curriculum_steps', 0)} steps. Training-only losses, all discarded with their heads (the shipped weights are
a plain LLaVA): a per-patch linear head on the tower features the projector reads (colour, shape, object centre,
letter, patch row and column; weight {cfg['aux_weight']}){_extra_losses(cfg)}. fp32, seed
{cfg['seed']}, {cfg['threads']} threads: **{minutes:.1f} minutes** on 2 CPU cores.

## Accuracy (test split, {results['questions']} questions, greedy, exact match after normalisation)

| model | overall | {kinds} |
|---|---|{'---|' * len(unmerged['per_kind'])}
{baselines}

{status}

`blind` shows the model a uniform grey image; `prior` answers each exact question text with its most frequent
training answer (the best a text-only model can do on this data). The first {results['slice_questions']} test
questions (a fixed slice checked by `tests/test_toyvlm_eval.py`): **{100 * unmerged['slice_accuracy']:.1f}%**.

{_describing(folder, results)}## With DyMU (thresholds found on {DEFAULT_THRESHOLD_SCENES} training images; targets {levels} tokens of {results['patches']})

The targets are DyMU's LLaVA-1.5 presets (89 / 195 / 394 of 576 tokens) scaled to {results['patches']} patches and,
for `low`, raised to the lowest count a constant merge schedule can reach in this {read}-layer
read depth (bipartite matching merges at most half the tokens per layer). VTU = virtual token unmerging in the
Llama (`vtu="fast"`); no VTU = the merged tokens fed as a shorter sequence (`vtu="none"`, `dymu.prepare_inputs`).

{markdown_table(results)}
Visual tokens follow image complexity: the tokens column splits the mean by background
({" / ".join(D.BACKGROUND_KINDS)}). Full results: `eval/results.json`, plot: `eval/accuracy_vs_tokens.png`.
Reproduce: `python -m toyvlm.evaluate --model assets/toy-llava`.
{_dyrate(folder)}{_drift(folder)}{_history(folder)}"""


def _describing(folder: Path, results: dict) -> str:
    """The describe task's section: CIDEr-D of the model and of the blind baseline, one description beside its
    references. Empty for results without descriptions."""
    from .evaluate import describe_records

    rows = [row for row in results["rows"] if "cider" in row and not row["level"]]
    if not rows:
        return ""
    table = "\n".join(f"| {row['name']} | {row['cider']:.3f} | {100 * row['describe_ended']:.0f}% | "
                      f"{row['slice_cider']:.3f} |" for row in rows)
    example = describe_records(1, results["seed"])[0][0]
    references = "\n".join(f"  - {text}" for text in example["references"])
    return f"""## Describing (test split, first {results['describe_scenes']} scenes, greedy, at most {MAX_DESCRIPTION_TOKENS} tokens)

Each scene is asked its describe prompt ("Describe the image." or a paraphrase) and scored with CIDEr-D against its
five reference descriptions (`toyvlm.cider`: pycocoevalcap's CIDEr-D and PTB tokenisation, checked against the
package on fixtures). `fixed slice`: the first {results['slice_descriptions']} descriptions scored alone (document
frequencies from their own references), the number `tests/test_toyvlm_eval.py` reproduces.

| model | CIDEr-D | ended with `</s>` | CIDEr-D, fixed slice |
|---|---|---|---|
{table}

{example['image']} ({example['background']} background), asked "{example['question']}":
- unmerged: **{rows[0]['descriptions'][0]}**
- references:
{references}

"""


def _dyrate(folder: Path) -> str:
    """The DyRate section from ``eval/dyrate.json`` (``python -m toyvlm.dyrate_eval``) and the predictor files in
    ``dyrate/``, if present."""
    path = folder / "eval" / "dyrate.json"
    if not path.is_file():
        return ""
    results = json.loads(path.read_text())
    rows = {row["name"]: row for row in results["rows"]}
    training = {}
    for name in results["predictors"]:
        predictor = folder / "dyrate" / f"{name}.json"
        if predictor.is_file():
            stored = json.loads(predictor.read_text())
            training[name] = (stored["config"], stored["training"])
    if not training:
        return ""
    config, record = next(iter(training.values()))

    def cells(row):
        a, d = row["answer_fraction"], row["describe_fraction"]
        return (f"{100 * row['overall']:.1f}% | {100 * a['cache-aware']:.1f}% / {100 * a['fastv-formula']:.1f}% | "
                f"{row['cider']:.3f} | {100 * d['cache-aware']:.1f}% / {100 * d['fastv-formula']:.1f}% | "
                f"{row['describe_rate']:.2f}")

    lines = [f"| (unmerged) | - | {cells(rows['unmerged'])} |"]
    for name, (stored, _) in training.items():
        kind = "GRU over the last " + str(stored["history"]) + " steps" if stored["predictor"] == "recurrent" else stored["predictor"]
        lines.append(f"| `{name}` ({kind}) | {stored['penalty']:g} | {cells(rows[f'DyRate {name}'])} |")
    fastv = rows.get("FastV k=2 r=0.5 (pruned once)")
    table = "\n".join(lines)
    steps = record["steps"]
    return f"""
## With DyRate (predictors in `dyrate/`, trained by `dymu train-dyrate`)

Predictors of the rate pruned at each generation step (`prune="dyrate:dyrate/NAME.json"`), each trained on
{record['records']} records of the training split ({steps} steps of {record['batch_size']}, lr {record['lr']:g}, one
epoch; Gumbel-softmax with straight-through samples, temperature {config['temperature']:g} -> {config['temperature_end']:g}),
pruning layer {config['layer']} of the decoder, rates {{{", ".join(f"{i}/{config['rates']}" for i in range(config['rates']))}}},
monotone; the VLM frozen. Measured by `python -m toyvlm.dyrate_eval` on {results['questions']} test questions
({results['scenes']} scenes) and {results['describe_scenes']} descriptions; FLOPs of the whole generation, % of
unmerged (cache-aware with the vision tower / FastV's formula per step, language model):

| predictor | penalty | accuracy | answer FLOPs | CIDEr-D | description FLOPs | mean rate (descriptions) |
|---|---|---|---|---|---|---|
{table}
""" + (f"""
FastV k=2 r=0.5 pruned once: {100 * fastv['overall']:.1f}% / {fastv['cider']:.3f} at {100 * fastv['answer_fraction']['cache-aware']:.1f}% /
{100 * fastv['describe_fraction']['cache-aware']:.1f}% (cache-aware). The whole comparison (FastV pruned once and
re-ranked per step, DToMe-mid + VTU with and without DyRate): `eval/dyrate.md`, `eval/dyrate.png`,
`eval/dyrate_trajectories.png`, and the main README ("DyRate: a rate per generation step").
""" if fastv else "")


def _drift(folder: Path) -> str:
    """The attention-drift section from ``eval/drift.json`` (``python -m toyvlm.diagnose --drift``), if present."""
    from .diagnose import SEGMENTS

    path = folder / "eval" / "drift.json"
    if not path.is_file():
        return ""
    report = json.loads(path.read_text())
    share = report["share"]  # (steps, layers, segments)
    # steps where at least half of the scenes are still generating (later means rest on a few long descriptions)
    steps = [step for step, count in enumerate(report["scenes_at_step"]) if 2 * count >= report["scenes"]]
    shown = sorted({steps[0], steps[len(steps) // 2], steps[-1]})
    image = SEGMENTS.index("image")
    layers = range(report["layers"])

    def mean_share(step: int, segment: str) -> float:
        column = SEGMENTS.index(segment)
        return sum(share[step][layer][column] for layer in layers) / report["layers"]

    header = " | ".join(f"layer {layer}" for layer in layers)
    lines = "\n".join(f"| {step} ({report['scenes_at_step'][step]}) | "
                      + " | ".join(f"{100 * share[step][layer][image]:.1f}" for layer in layers)
                      + f" | {100 * mean_share(step, 'image'):.1f} |" for step in shown)
    first, last = mean_share(steps[0], "image"), mean_share(steps[-1], "image")
    trend = "falls" if last < first else "does not fall"
    others = ", ".join(f"the {segment}'s from {100 * mean_share(steps[0], segment):.1f}% to "
                       f"{100 * mean_share(steps[-1], segment):.1f}%" for segment in SEGMENTS if segment != "image")
    response_grows = mean_share(steps[-1], "response") > mean_share(steps[0], "response")
    cause = " Part of the image's loss is attention going to the words the model has already written." * (
        last < first and response_grows)
    return f"""
## Attention drift while describing

`python -m toyvlm.diagnose --model assets/toy-llava --drift` ({report['scenes']} test scenes, {100 * report['ended']:.0f}%
of the descriptions ended with `</s>`): the share of the last query's attention (mean over heads, then over the
scenes still generating) on the image tokens at each generated step. Steps with at least half of the scenes still
generating:

| step (scenes) | {header} | mean |
|---|{'---|' * (report['layers'] + 1)}
{lines}

On this model the image share {trend} as the description grows: {100 * first:.1f}% at step {steps[0]} and
{100 * last:.1f}% at step {steps[-1]} (mean over layers). Over the same steps the other shares move as follows:
{others}.{cause}
Every segment, every layer and every step: `eval/drift.json`, plot `eval/drift.png`.
"""


def _history(folder: Path) -> str:
    """The hand-written account of the runs that led to this recipe (``HISTORY_FILE``), if the folder has one."""
    path = folder / HISTORY_FILE
    if not path.is_file():
        return ""
    text = "\n".join(line for line in path.read_text().splitlines() if not line.startswith("<!--"))
    return f"\n## How this recipe was found\n\n{text.strip()}\n"


def _stage_one(cfg: dict) -> str:
    if not cfg.get("tower_steps"):
        return ""
    trained = "tower and projector" if cfg.get("init_from") else "tower, projector and word embeddings"
    return (f"Stage 1: {cfg['tower_steps']} steps of {cfg['tower_batch_size']} images training the {trained} on the "
            f"auxiliary and word-alignment losses alone (lr {cfg['tower_learning_rate']}). Stage 2: ")


def _extra_losses(cfg: dict) -> str:
    parts = []
    if cfg.get("align_weight"):
        parts.append(f"word alignment: projected patch tokens classified against the language model's embeddings of "
                     f"their colour, shape and letter words (weight {cfg['align_weight']})")
    if cfg.get("point_weight"):
        parts.append(f"pointing: at each answer, {cfg['point_heads']} heads of language-model layer {cfg['point_layer']} "
                     f"put their attention on the object named first and {cfg['point_heads']} on the one named last "
                     f"(the letter for detail questions; weight {cfg['point_weight']})")
    if cfg.get("count_weight"):
        parts.append(f"counting: head {2 * cfg['point_heads']} of that layer spreads its attention uniformly over `<s>` "
                     f"and the counted objects' centre patches at count answers (weight {cfg['count_weight']})")
    if cfg.get("where_weight"):
        parts.append(f"a linear read-out of each projected image token's row and column (weight {cfg['where_weight']})")
    locate = bool(cfg.get("locate_weight") and cfg.get("point_weight"))
    tally = bool(cfg.get("tally_weight") and cfg.get("count_weight"))
    if locate:
        parts.append(f"a linear read-out, from the output of layer {cfg['point_layer']} at each pointed answer, of the "
                     f"row and column of both named objects (weight {cfg['locate_weight']})")
    if tally:
        parts.append(f"a linear read-out there of the number counted at count answers (weight {cfg['tally_weight']})")
    if cfg.get("readout_start") and (locate or tally):
        parts.append(f"these read-outs only from stage-2 step {cfg['readout_start']} on")
    return "".join(f"; {part}" for part in parts)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder")
    args = parser.parse_args(argv)
    folder = Path(args.folder)
    if json.loads((folder / "config.json").read_text()).get("model_type") == "llava_onevision":
        from .card_onevision import model_card as onevision_card

        (folder / "README.md").write_text(onevision_card(folder))
    else:
        (folder / "README.md").write_text(model_card(folder))
    print(f"wrote {folder / 'README.md'}")


if __name__ == "__main__":
    main()
