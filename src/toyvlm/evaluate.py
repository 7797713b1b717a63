"""Evaluate a LLaVA-format checkpoint on the toyvlm task: unmerged, blind, and with DToMe (accuracy vs tokens).

    python -m toyvlm.evaluate --model assets/toy-llava [--scenes 1000] [--out DIR]

Everything goes through the public path a user would take: ``AutoProcessor`` + ``model.generate`` on the
rendered test images, ``dymu.find_thresholds`` on training images, ``dymu.apply`` with ``vtu="fast"``
(virtual token unmerging) or ``vtu="none"`` + ``dymu.prepare_inputs`` (compact: merged tokens only).

Reported:
* ``unmerged``: the checkpoint as trained.
* every row but ``prior`` also describes the first ``--describe-scenes`` test scenes (their describe prompt, greedy,
  at most ``MAX_DESCRIPTION_TOKENS`` tokens): CIDEr-D against the five references (:mod:`toyvlm.cider`) and the share
  of descriptions that ended with ``</s>``.
* ``blind``: the same model shown a uniform grey image (the CLIP mean colour) - what it answers without
  looking; ``prior``: the best text-only rule, the most frequent training answer for each exact question text.
* DToMe ``low`` / ``mid`` / ``high``: thresholds found on training images for the same fraction of the patch
  grid as DyMU's LLaVA-1.5 presets (89 / 195 / 394 of 576), each with VTU and in compact mode.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from . import data as D
from .cider import cider_d
from .data import accuracy
from .train import MAX_ANSWER_TOKENS, MAX_DESCRIPTION_TOKENS, OPENAI_CLIP_MEAN, PROMPT, greedy_generate

#: DyMU's LLaVA-1.5 presets: mean visual tokens out of CLIP-L/14-336's 576 patches
DYMU_LEVELS = {"low": 89 / 576, "mid": 195 / 576, "high": 394 / 576}
#: VTU modes reported: fast = virtual token unmerging in the LLM, none = compact merged sequence
MODES = ("fast", "none")
DEFAULT_TEST_SCENES = 1000
DEFAULT_THRESHOLD_SCENES = 1000
#: test scenes described per setting (CIDEr-D's document frequencies come from their references)
DEFAULT_DESCRIBE_SCENES = 300
#: training scenes whose questions give the text-only prior (answer frequencies per question text)
PRIOR_TRAIN_SCENES = 4000
SLICE_QUESTIONS = 200
#: descriptions kept in results.json per row (the fixed slice the tests re-score)
SLICE_DESCRIPTIONS = 40
BATCH_SIZE = 32
RESULTS_FORMAT = "toyvlm-eval"
RESULTS_VERSION = 1
#: table cell for a value not measured (a background kind without test images, a row without per-background tokens)
NOT_MEASURED = "-"


def load(folder):
    """(LlavaForConditionalGeneration in eval mode, processor) from a checkpoint folder."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: no config.json (train one with `make toy-model`)")
    model = LlavaForConditionalGeneration.from_pretrained(folder).eval()
    return model, AutoProcessor.from_pretrained(folder)


def test_records(num_scenes: int = DEFAULT_TEST_SCENES, seed: int = D.DEFAULT_SEED, image_size: int | None = None,
                 split: str = "test", render=None):
    """(records, images): question records in benchmark order (as ``write_benchmark`` would write them) and
    {image_id: PIL image}; ``render(example)``: the image of an example (default: its square ``image``)."""
    examples = D.make_split(split, seed=seed, num_scenes=num_scenes, image_size=image_size or D.DEFAULT_IMAGE_SIZE)
    records, images = [], {}
    for example in examples:
        images[example.id] = render(example) if render else example.image
        for j, qa in enumerate(example.qas):
            records.append({"question_id": f"{example.id}_q{j:02d}", "image": example.id, "question": qa.question,
                            "kind": qa.kind, "answer": qa.answer, "background": example.scene.background})
    return records, images


def describe_records(num_scenes: int = DEFAULT_DESCRIBE_SCENES, seed: int = D.DEFAULT_SEED,
                     image_size: int | None = None, split: str = "test", render=None):
    """(records, images): one describe record per scene ({question_id, image, question: its describe prompt, kind,
    references, background}) and {image_id: PIL image}; ``render``: as for :func:`test_records`."""
    examples = D.make_split(split, seed=seed, num_scenes=num_scenes, image_size=image_size or D.DEFAULT_IMAGE_SIZE,
                            per_kind=0)
    records = [{"question_id": f"{e.id}_describe", "image": e.id, "question": e.describe_prompt, "kind": D.DESCRIBE_KIND,
                "references": e.descriptions, "background": e.scene.background} for e in examples]
    return records, {e.id: render(e) if render else e.image for e in examples}


def describe(model, processor, records, images, batch_size: int = BATCH_SIZE, progress: bool = False,
             desc: str = "describing", inputs=None) -> dict:
    """Greedy descriptions of describe ``records`` (:func:`describe_records`): {"cider": CIDEr-D, "ended": share that
    ended with </s>, "descriptions": the texts}. ``inputs``: as for :func:`generations`."""
    texts, ended = generations(model, processor, records, images, batch_size, progress, desc, MAX_DESCRIPTION_TOKENS,
                               inputs)
    cider, _ = cider_d(dict(enumerate(texts)), {i: r["references"] for i, r in enumerate(records)})
    return {"cider": cider, "ended": float(np.mean(ended)), "descriptions": texts}


def describe_row(row: dict, model, processor, records, images, progress: bool = False, batch_size: int = BATCH_SIZE,
                 inputs=None) -> None:
    """Add a row's describe columns: CIDEr-D of its descriptions of ``records`` (``images``), the share that ended,
    the first SLICE_DESCRIPTIONS texts and their CIDEr-D alone (:func:`slice_cider`)."""
    descriptions = describe(model, processor, records, images, batch_size, progress, f"{row['name']}, describing", inputs)
    kept = descriptions["descriptions"][:SLICE_DESCRIPTIONS]
    row.update(cider=descriptions["cider"], describe_ended=descriptions["ended"], descriptions=kept,
               slice_cider=slice_cider(kept, records))


def summary_line(row: dict, head: str) -> str:
    """The line printed when a row is done: ``head`` (its name and tokens), accuracy, per kind, CIDEr-D."""
    return (f"{head}  accuracy {100 * row['overall']:5.1f}%  "
            + " ".join(f"{k} {100 * v:.1f}" for k, v in row["per_kind"].items())
            + (f"  CIDEr-D {row['cider']:.3f} ({100 * row['describe_ended']:.0f}% ended)" if "cider" in row else ""))


def slice_cider(descriptions: list[str], records) -> float:
    """CIDEr-D of the first descriptions of a row alone (document frequencies from their own references): the number
    the tests reproduce on the fixed slice."""
    return cider_d(dict(enumerate(descriptions)), {i: records[i]["references"] for i in range(len(descriptions))})[0]


def image_size_of(processor) -> int:
    return int(processor.image_processor.crop_size["height"])


def answer(model, processor, records, images, batch_size: int = BATCH_SIZE, progress: bool = False,
           desc: str = "answering", inputs=None) -> list[str]:
    """Greedy answers, one per record. Uses ``dymu.prepare_inputs`` when the model is in compact mode."""
    return generations(model, processor, records, images, batch_size, progress, desc, inputs=inputs)[0]


def generations(model, processor, records, images, batch_size: int = BATCH_SIZE, progress: bool = False,
                desc: str = "answering", max_new_tokens: int = MAX_ANSWER_TOKENS,
                inputs=None) -> tuple[list[str], list[bool]]:
    """(greedy answers of at most ``max_new_tokens`` tokens, whether each generation ended with </s>), one per
    record. ``inputs(pictures, prompts)``: the model inputs of a batch, when not the processor's (or
    ``dymu.prepare_inputs`` in compact mode)."""
    from tqdm.auto import tqdm

    from dymu.llava import get_vlm_patch

    compact = (patch := get_vlm_patch(model)) is not None and patch.state.vtu == "none"
    answers, ended = [], []
    for start in tqdm(range(0, len(records), batch_size), desc=desc, unit="batch", disable=not progress, leave=False):
        chunk = records[start : start + batch_size]
        prompts = [PROMPT.format(question=r["question"]) for r in chunk]
        pictures = [images[r["image"]] for r in chunk]
        if inputs is not None:
            batch = inputs(pictures, prompts)
        elif compact:
            import dymu

            batch = dymu.prepare_inputs(model, processor, pictures, prompts)
        else:
            batch = processor(images=pictures, text=prompts, return_tensors="pt", padding=True)
        texts, finished = greedy_generate(model, processor.tokenizer, batch, max_new_tokens)
        answers += texts
        ended += finished
    return answers, ended


def visual_tokens(model, processor, records, images, batch_size: int = BATCH_SIZE) -> dict:
    """Visual tokens per image under the model's current merging: mean overall and per background kind."""
    import dymu

    ids = list(dict.fromkeys(r["image"] for r in records))
    background = {r["image"]: r.get("background", "?") for r in records}
    counts = {}
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        pixel_values = processor.image_processor(images=[images[i] for i in chunk], return_tensors="pt")["pixel_values"]
        counts.update(zip(chunk, dymu.encode(model, pixel_values).num_tokens))
    per_background = defaultdict(list)
    for image_id, count in counts.items():
        per_background[background[image_id]].append(count)
    values = list(counts.values())
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "images": len(values),
            "per_background": {k: float(np.mean(v)) for k, v in sorted(per_background.items())}}


def prior_answers(records, train_scenes: int = PRIOR_TRAIN_SCENES, seed: int = D.DEFAULT_SEED) -> list[str]:
    """Text-only baseline: the most frequent training answer for each exact question text (else for its kind)."""
    by_text, by_kind = defaultdict(Counter), defaultdict(Counter)
    for example in D.make_split("train", seed=seed, num_scenes=train_scenes):
        for qa in example.qas:
            by_text[qa.question][qa.answer] += 1
            by_kind[qa.kind][qa.answer] += 1
    out = []
    for r in records:
        counter = by_text.get(r["question"]) or by_kind.get(r["kind"]) or Counter({"": 1})
        out.append(counter.most_common(1)[0][0])
    return out


def blind_images(images, mean=OPENAI_CLIP_MEAN) -> dict:
    """Every image replaced by a uniform image of the processor's mean colour (zero after normalisation; default
    CLIP's)."""
    from PIL import Image

    colour = tuple(round(255 * m) for m in mean)
    return {key: Image.new("RGB", image.size, colour) for key, image in images.items()}


def level_target(model, fraction: float) -> int:
    """``fraction`` of the patches, raised to the nearest count the constant merge schedule can reach (bipartite
    matching merges at most half the tokens of a layer, so a shallow tower cannot go as low as CLIP-L's 23 layers)."""
    from dymu.finder import budgets_for
    from dymu.vision import DymuError, tower_info

    info = tower_info(model)
    for target in range(max(1, round(fraction * info.num_patches)), info.num_patches + 1):
        try:
            budgets_for(info, target, "constant")
            return target
        except DymuError:
            continue
    return info.num_patches


def find_level_thresholds(model, processor, folder: Path, scenes: int = DEFAULT_THRESHOLD_SCENES, seed: int = D.DEFAULT_SEED,
                          progress: bool = True, levels=tuple(DYMU_LEVELS), reuse: bool = True) -> dict:
    """DToMe thresholds for each of ``levels`` (DYMU_LEVELS fractions), found on training images and saved in
    ``folder`` as {level}.json; with ``reuse``, files already there are loaded instead."""
    import dymu
    from dymu.thresholds import Thresholds

    folder.mkdir(parents=True, exist_ok=True)
    out, pixels = {}, None
    for level in levels:
        fraction = DYMU_LEVELS[level]
        path = folder / f"{level}.json"
        if reuse and path.is_file():
            out[level] = Thresholds.load(path)
            continue
        if pixels is None:
            examples = D.make_split("train", seed=seed, num_scenes=scenes, image_size=image_size_of(processor), per_kind=0)
            pixels = processor.image_processor(images=[e.image for e in examples], return_tensors="pt")["pixel_values"]
        thresholds = dymu.find_thresholds(model, pixels, target_tokens=level_target(model, fraction), progress=progress)
        thresholds.save(path)
        out[level] = thresholds
    return out


def open_run(model_dir, out_dir, scenes: int, seed: int):
    """What every test-split evaluation starts from: (model folder, output folder (``out_dir``, default
    ``model_dir/eval``, created), model, processor, question records, images of the first ``scenes`` test scenes)."""
    model_dir = Path(model_dir)
    out = Path(out_dir) if out_dir else model_dir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    model, processor = load(model_dir)
    records, images = test_records(scenes, seed, image_size_of(processor))
    return model_dir, out, model, processor, records, images


def run(model_dir, out_dir=None, scenes: int = DEFAULT_TEST_SCENES, seed: int = D.DEFAULT_SEED, levels=tuple(DYMU_LEVELS),
        modes=MODES, baselines: bool = True, progress: bool = True, threshold_scenes: int = DEFAULT_THRESHOLD_SCENES,
        describe_scenes: int = DEFAULT_DESCRIBE_SCENES) -> dict:
    """Full evaluation; writes results.json, accuracy_vs_tokens.png, cider_vs_tokens.png (with ``describe_scenes``)
    and table.md to ``out_dir`` (default: ``model_dir/eval``). Thresholds are cached in ``model_dir/thresholds``."""
    import dymu

    model_dir, out, model, processor, records, images = open_run(model_dir, out_dir, scenes, seed)
    started = time.time()
    described, described_images = describe_records(describe_scenes, seed, image_size_of(processor)) if describe_scenes \
        else ([], {})
    patches = model.config.image_seq_length
    rows, level_tokens = [], {}  # a level's token counts do not depend on the VTU mode: measured once

    def evaluate(name, level, mode, pictures=images, answers=None, visual=patches):
        answers = answers if answers is not None else answer(model, processor, records, pictures, progress=progress, desc=name)
        if level and level not in level_tokens:
            level_tokens[level] = visual_tokens(model, processor, records, images)
        tokens = level_tokens[level] if level else {"mean": float(visual), "std": 0.0, "per_background": {}}
        row = {"name": name, "level": level, "vtu": mode, "tokens": tokens, **accuracy(records, answers)}
        row["slice_accuracy"] = accuracy(records[:SLICE_QUESTIONS], answers[:SLICE_QUESTIONS])["overall"]
        if described and visual:  # every row that sees an image describes too
            shown = described_images if pictures is images else blind_images(described_images)
            describe_row(row, model, processor, described, shown, progress)
        rows.append(row)
        print(summary_line(row, f"{name:<22} tokens {tokens['mean']:6.1f}"), flush=True)
        return answers

    reference = evaluate("unmerged", None, None)
    if baselines:
        evaluate("blind (grey image)", None, None, pictures=blind_images(images))
        evaluate("prior (text only)", None, None, answers=prior_answers(records, seed=seed), visual=0)
    thresholds = find_level_thresholds(model, processor, model_dir / "thresholds", scenes=threshold_scenes, seed=seed,
                                       progress=progress, levels=levels) if levels else {}
    for level in levels:
        for mode in modes:
            dymu.apply(model, thresholds[level], vtu=mode)
            try:
                answers = evaluate(f"DToMe-{level} ({'VTU' if mode != 'none' else 'no VTU'})", level, mode)
            finally:
                dymu.remove(model)
            rows[-1]["agreement_with_unmerged"] = float(np.mean([D.is_correct(a, b) for a, b in zip(answers, reference)]))
    results = {"format": RESULTS_FORMAT, "version": RESULTS_VERSION, "model": str(model_dir), "split": "test",
               "seed": seed, "scenes": scenes, "questions": len(records), "patches": patches,
               "slice_questions": SLICE_QUESTIONS, "describe_scenes": describe_scenes,
               "slice_descriptions": min(SLICE_DESCRIPTIONS, describe_scenes), "seconds": time.time() - started,
               "targets": {level: thresholds[level].target_tokens for level in levels}, "rows": rows}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "table.md").write_text(markdown_table(results))
    plot(results, out / "accuracy_vs_tokens.png")
    if described:
        plot(results, out / "cider_vs_tokens.png", metric="cider")
    return results


def _background_split(per_background: dict) -> str:
    """Mean tokens per background kind in ``BACKGROUND_KINDS`` order, ``NOT_MEASURED`` in the slot of a kind without
    test images (and alone when nothing was measured), so numbers stay under their labels."""
    if not per_background:
        return NOT_MEASURED
    return " / ".join(f"{per_background[k]:.1f}" if k in per_background else NOT_MEASURED for k in D.BACKGROUND_KINDS)


def markdown_table(results: dict) -> str:
    kinds = list(results["rows"][0]["per_kind"])
    described = any("cider" in row for row in results["rows"])
    header = f"| setting | visual tokens (mean) | {' / '.join(D.BACKGROUND_KINDS)} tokens | accuracy | " + \
        " | ".join(kinds) + (" | CIDEr-D | ended with </s> |\n|" if described else " |\n|") + \
        "---|" * (4 + len(kinds) + 2 * described) + "\n"
    reference = results["rows"][0]["overall"]
    lines = []
    for row in results["rows"]:
        split = _background_split(row["tokens"].get("per_background"))
        relative = f" ({100 * row['overall'] / reference:.1f}% of unmerged)" if row["level"] else ""
        lines.append(f"| {row['name']} | {row['tokens']['mean']:.1f} of {results['patches']} | {split} | "
                     f"{100 * row['overall']:.1f}%{relative} | " + " | ".join(f"{100 * row['per_kind'][k]:.1f}" for k in kinds)
                     + (f" | {row['cider']:.3f} | {100 * row['describe_ended']:.0f}%" if "cider" in row else
                        f" | {NOT_MEASURED} | {NOT_MEASURED}" if described else "") + " |")
    return header + "\n".join(lines) + "\n"


#: what :func:`plot` can draw against the visual tokens: row key -> (axis label, scale)
PLOT_METRICS = {"overall": ("accuracy (%)", 100.0), "cider": ("CIDEr-D (test descriptions)", 1.0)}


#: the DToMe series :func:`plot` draws: (row "vtu", marker, label)
PLOT_SERIES = (("fast", "o", "DToMe + VTU"), ("none", "s", "DToMe, compact (no VTU)"))


def plot(results: dict, path, metric: str = "overall", series=PLOT_SERIES, model_name: str = "toy LLaVA",
         tokens_label: str = "mean visual tokens per image") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    ylabel, scale = PLOT_METRICS[metric]
    rows = [row for row in results["rows"] if metric in row]
    reference = rows[0]
    axis.axhline(scale * reference[metric], color="black", lw=1, ls="--", label=f"unmerged ({results['patches']} tokens)")
    axis.plot([results["patches"]], [scale * reference[metric]], marker="*", color="black", ms=10)
    for name, style in (("blind (grey image)", ":"), ("prior (text only)", "-.")):
        row = next((r for r in rows if r["name"] == name), None)
        if row:
            axis.axhline(scale * row[metric], color="grey", lw=1, ls=style, label=name)
    for mode, marker, label in series:
        points = sorted((r["tokens"]["mean"], scale * r[metric], r["level"]) for r in rows if r["vtu"] == mode and r["level"])
        if points:
            axis.plot([p[0] for p in points], [p[1] for p in points], marker=marker, label=label)
            for x, y, level in points:
                axis.annotate(level, (x, y), textcoords="offset points", xytext=(4, -10), fontsize=8)
    axis.set_xlabel(f"{tokens_label} (of {results['patches']})")
    axis.set_ylabel(ylabel)
    axis.set_title(f"{model_name}, {results['questions']} test questions" if metric == "overall"
                   else f"{model_name}, {results['describe_scenes']} test descriptions")
    axis.set_xlim(0, results["patches"] * 1.05)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def evaluation_parser(description: str) -> argparse.ArgumentParser:
    """The options every test-split evaluation takes: --model, --out, --scenes, --seed."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint folder (e.g. assets/toy-llava)")
    parser.add_argument("--out", default=None, help="output folder (default: MODEL/eval)")
    parser.add_argument("--scenes", type=int, default=DEFAULT_TEST_SCENES, help="test scenes (about 4.4 questions each)")
    parser.add_argument("--seed", type=int, default=D.DEFAULT_SEED)
    return parser


def main(argv=None) -> None:
    parser = evaluation_parser(__doc__)
    parser.add_argument("--levels", default=",".join(DYMU_LEVELS), help="DToMe levels, comma separated ('' = none)")
    parser.add_argument("--describe-scenes", type=int, default=DEFAULT_DESCRIBE_SCENES,
                        help="test scenes described per setting for CIDEr-D (0 = none)")
    args = parser.parse_args(argv)
    levels = tuple(level for level in args.levels.split(",") if level)
    unknown = [level for level in levels if level not in DYMU_LEVELS]
    if unknown:
        parser.error(f"--levels: unknown level(s) {unknown}; choose from {list(DYMU_LEVELS)}")
    try:
        results = run(args.model, args.out, scenes=args.scenes, seed=args.seed, levels=levels,
                      describe_scenes=args.describe_scenes)
    except FileNotFoundError as exc:
        raise SystemExit(f"error: {exc}") from None
    print(markdown_table(results))


if __name__ == "__main__":
    main()
