"""Evaluate the toy LLaVA-OneVision on the toyvlm task: unmerged, blind and prior; DToMe at the DyMU paper's
OneVision levels with VTU and compact; and the DyMU reference's token layout against the model's own.

    python -m toyvlm.evaluate_onevision --model assets/toy-llava-onevision [--scenes 1000] [--describe-scenes 300]

Every image is a test scene at its own size (:func:`toyvlm.onevision.scene_shape`), cut into its AnyRes crops by
the model's stock processor. Rows (all through ``dymu.apply`` and stock ``generate``, as :mod:`toyvlm.evaluate`):

* ``unmerged``, ``blind`` (every image a uniform grey of the same size, zero after SigLIP's normalisation) and
  ``prior`` (the best text-only rule).
* DToMe ``low`` / ``mid`` / ``high``: thresholds for 105 / 183 / 339 of 729 tokens per crop (14.4 / 25.1 / 46.5%,
  the paper's ov-low/mid/high), found by ``dymu.find_thresholds`` (what ``dymu find-thresholds MODEL IMAGES``
  runs) on training scenes at their sizes, **every AnyRes crop counting as an image** (the tower merges each crop
  alone, so a crop is what a threshold is learned on), saved in ``MODEL/thresholds/{level}.json``; each with VTU
  (``vtu="fast"``, the stock layout kept) and compact (``vtu="none"``: each position's token once, newlines kept).
* **The reference's layout** (:func:`reference_layout`): the DyMU reference feeds OneVision every crop's tokens one
  after the other (base crop first, raster order inside a crop): no unpadding, no spatial grid, no newline tokens,
  no bilinear down-scaling. Measured unmerged (the layout change alone) and at each level with VTU at the same
  thresholds, so "keeping the layout matters" is a measured difference.

Token columns: ``per crop`` = merged tokens per crop (of the crop's patches; the paper's percentages);
``per image`` = over its crops; ``LM`` = the distinct tokens the language model holds for an image (compact
mode's sequence; with VTU the stock positions are kept and these are the tokens attention is computed over), of
the stock layout's positions.

Rows are written to ``OUT/rows.json`` as they finish; a rerun (same model weights, scenes and seed) keeps them and
runs the rest, so a killed evaluation continues.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from . import data as D
from . import evaluate as E
from . import onevision as O

#: the DyMU paper's LLaVA-OneVision levels: tokens per 729-token SigLIP crop, (729 - 26 r) for r = 24 / 21 / 15
OV_LEVELS = {"low": 105 / 729, "mid": 183 / 729, "high": 339 / 729}
#: the "vtu" of rows measured in the reference's layout (with VTU)
REFERENCE = "reference"
#: SigLIP's normalisation mean: a uniform image of it is zero after normalisation (the blind row)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
ROWS_FILE = "rows.json"
RESULTS_FORMAT = "toyvlm-eval-onevision"
RESULTS_VERSION = 1


def load(folder):
    """(LlavaOnevisionForConditionalGeneration in eval mode, its stock processor) from a checkpoint folder."""
    from dymu.models import load_model, load_processor

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: no config.json (train one: python -m toyvlm.train --arch onevision --out "
                                f"{folder} --resume)")
    model = load_model(folder)
    if model.config.model_type != "llava_onevision":
        raise FileNotFoundError(f"{folder}: a {model.config.model_type} checkpoint, not LLaVA-OneVision")
    return model, load_processor(folder, full=True)


def scene_renderer(seed: int, crop: int):
    """``render(example)``: a split example rendered at its own size."""
    return lambda example: O.render(example.scene, O.example_size(example, seed, crop))


def reference_pack(image_features, image_sizes, image_newline=None, vision_aspect_ratio=None):
    """``pack_image_features`` of the DyMU reference's OneVision layout: per image its crops' tokens concatenated
    (base crop first, raster order within a crop); ``image_sizes``, ``image_newline`` and ``vision_aspect_ratio``
    are not used (no unpadding, no newline, no down-scaling). image_features: per image (crops, patches, dim)."""
    packed = [feature.flatten(0, 1) for feature in image_features]  # (crops * patches, dim)
    return packed, torch.tensor([len(feature) for feature in packed], dtype=torch.long)


@contextlib.contextmanager
def reference_layout(model):
    """The model lays its images out as the reference does (:func:`reference_pack`, on this instance only): the stock
    forward and dymu (which lays merged tokens out with the model's own ``pack_image_features``) both use it. Inputs
    need crops x patches placeholders per image (:func:`reference_inputs`)."""
    base = model.model
    base.pack_image_features = reference_pack
    try:
        yield model
    finally:
        del base.pack_image_features


def reference_inputs(processor):
    """``inputs(pictures, prompts)`` for the reference layout: the processor's crops and image sizes, each prompt's
    ``<image>`` expanded to (crops x tokens per crop) placeholders (left padding)."""
    from dymu.compat import anyres_crops

    image_processor = processor.image_processor

    def inputs(pictures, prompts):
        processed = image_processor(images=pictures, return_tensors="pt")
        crops = anyres_crops(processed["image_sizes"], image_processor.image_grid_pinpoints,
                             image_processor.size["height"])
        texts = [prompt.replace("<image>", "<image>" * (count * processor.num_image_tokens))
                 for prompt, count in zip(prompts, crops)]
        encoded = processor.tokenizer(texts, return_tensors="pt", padding=True)
        return {**encoded, "pixel_values": processed["pixel_values"], "image_sizes": processed["image_sizes"]}

    return inputs


def image_tokens(model, processor, records, images, batch_size: int = E.BATCH_SIZE) -> dict:
    """Tokens of every image under the model's current merging and layout: per crop (mean over crops), per image (its
    crops summed), the language model's positions for it and the distinct tokens it holds there (see the module
    docstring); the per-crop mean per background kind."""
    from dymu.compat import anyres_crops
    from dymu.llava import get_vlm_patch, last_encoding, last_images

    ids = list(dict.fromkeys(r["image"] for r in records))
    background = {r["image"]: r.get("background", "?") for r in records}
    per_crop, per_image, positions, held, kinds = [], [], [], [], defaultdict(list)
    patches = processor.num_image_tokens
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        processed = processor.image_processor(images=[images[i] for i in chunk], return_tensors="pt")
        with torch.no_grad():
            features = model.model.get_image_features(pixel_values=processed["pixel_values"],
                                                      image_sizes=processed["image_sizes"]).pooler_output
        crops = anyres_crops(processed["image_sizes"], processor.image_processor.image_grid_pinpoints,
                             processor.image_processor.size["height"])
        if get_vlm_patch(model) is None:
            merged = [patches] * sum(crops)
            layout = [(len(feature), len(feature)) for feature in features]
        else:
            merged, layout = last_encoding(model).num_tokens, last_images(model)
        offset = 0
        for image_id, count, (position_count, token_count) in zip(chunk, crops, layout):
            own = merged[offset : offset + count]
            offset += count
            per_crop += own
            kinds[background[image_id]] += own
            per_image.append(sum(own))
            positions.append(position_count)
            held.append(token_count)
    return {"mean": float(np.mean(per_crop)), "std": float(np.std(per_crop)), "crops": len(per_crop),
            "per_image": float(np.mean(per_image)), "positions": float(np.mean(positions)),
            "lm_tokens": float(np.mean(held)), "images": len(per_image),
            "per_background": {k: float(np.mean(v)) for k, v in sorted(kinds.items())}}


def find_level_thresholds(model, processor, folder: Path, scenes: int = E.DEFAULT_THRESHOLD_SCENES,
                          seed: int = D.DEFAULT_SEED, progress: bool = True, levels=tuple(OV_LEVELS)) -> dict:
    """DToMe thresholds for each of ``levels`` (OV_LEVELS fractions of a crop's patches, raised where the tower's
    depth cannot merge that far: :func:`toyvlm.evaluate.level_target`), found on the first ``scenes`` training
    scenes at their sizes with every crop an image, saved in ``folder`` as {level}.json; files already there are
    loaded instead."""
    import dymu
    from dymu.thresholds import Thresholds

    folder.mkdir(parents=True, exist_ok=True)
    out, pictures = {}, None
    for level in levels:
        path = folder / f"{level}.json"
        if path.is_file():
            out[level] = Thresholds.load(path)
            continue
        if pictures is None:
            render = scene_renderer(seed, processor.image_processor.size["height"])
            pictures = [render(e) for e in D.make_split("train", seed=seed, num_scenes=scenes, per_kind=0)]
        thresholds = dymu.find_thresholds(model, pictures, target_tokens=E.level_target(model, OV_LEVELS[level]),
                                          processor=processor.image_processor, progress=progress)
        thresholds.save(path)
        out[level] = thresholds
    return out


class RowJournal:
    """Finished rows of one evaluation (``OUT/rows.json``, written atomically after each row), kept by a rerun with
    the same identity (model weights, scenes, seed); another identity is refused in one line."""

    def __init__(self, path: Path, identity: dict):
        self.path, self.identity, self.rows = path, identity, {}
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved.get("identity") != identity:
                raise RowJournalError(f"{path} holds rows of another evaluation ({saved.get('identity')}); delete it "
                                      "to start over")
            self.rows = saved["rows"]

    def save(self, row: dict) -> None:
        from dymu.files import atomic_write_json

        self.rows[row["name"]] = row
        atomic_write_json(self.path, {"identity": self.identity, "rows": self.rows})


class RowJournalError(Exception):
    pass


def run(model_dir, out_dir=None, scenes: int = E.DEFAULT_TEST_SCENES, seed: int = D.DEFAULT_SEED,
        levels=tuple(OV_LEVELS), describe_scenes: int = E.DEFAULT_DESCRIBE_SCENES,
        threshold_scenes: int = E.DEFAULT_THRESHOLD_SCENES, progress: bool = True, batch_size: int = E.BATCH_SIZE,
        baselines: bool = True) -> dict:
    """Full evaluation; writes results.json, table.md, accuracy_vs_tokens.png and cider_vs_tokens.png (with
    ``describe_scenes``) to ``out_dir`` (default ``model_dir/eval``)."""
    import dymu

    model_dir = Path(model_dir)
    out = Path(out_dir) if out_dir else model_dir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    model, processor = load(model_dir)
    render = scene_renderer(seed, processor.image_processor.size["height"])
    records, images = E.test_records(scenes, seed, render=render)
    described, described_images = (E.describe_records(describe_scenes, seed, render=render) if describe_scenes
                                   else ([], {}))
    weights = hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()[:16]
    journal = RowJournal(out / ROWS_FILE, {"model": weights, "scenes": scenes, "describe_scenes": describe_scenes,
                                           "seed": seed, "threshold_scenes": threshold_scenes})
    started, rows, level_tokens = time.time(), [], {}

    def evaluate(name, level, mode, pictures=images, answers=None, visual=True, inputs=None, reference=None):
        if name in journal.rows:
            rows.append(journal.rows[name])
            print(f"{name:<34} (kept from {journal.path})", flush=True)
            return rows[-1]["answers"]
        answers = answers if answers is not None else E.answer(model, processor, records, pictures, batch_size,
                                                               progress, name, inputs)
        key = (level, mode == REFERENCE)  # the tokens depend on the level and the layout, not on the VTU mode
        if visual and key not in level_tokens:
            level_tokens[key] = image_tokens(model, processor, records, images, batch_size)
        tokens = level_tokens[key] if visual else {"mean": 0.0, "per_image": 0.0, "positions": 0.0, "lm_tokens": 0.0}
        row = {"name": name, "level": level, "vtu": mode, "tokens": tokens, **E.accuracy(records, answers),
               "answers": answers}
        row["slice_accuracy"] = E.accuracy(records[: E.SLICE_QUESTIONS], answers[: E.SLICE_QUESTIONS])["overall"]
        if reference is not None:
            row["agreement_with_unmerged"] = float(np.mean([D.is_correct(a, b) for a, b in zip(answers, reference)]))
        if described and visual:
            shown = described_images if pictures is images else E.blind_images(described_images, SIGLIP_MEAN)
            E.describe_row(row, model, processor, described, shown, progress, batch_size, inputs)
        journal.save(row)
        rows.append(row)
        print(E.summary_line(row, f"{name:<34} per crop {tokens['mean']:5.1f}"), flush=True)
        return answers

    reference = evaluate("unmerged", None, None)
    if baselines:
        evaluate("blind (grey image)", None, None, pictures=E.blind_images(images, SIGLIP_MEAN))
        evaluate("prior (text only)", None, None, answers=E.prior_answers(records, seed=seed), visual=False)
    thresholds = find_level_thresholds(model, processor, model_dir / "thresholds", threshold_scenes, seed, progress,
                                       levels) if levels else {}
    for level in levels:
        for mode in E.MODES:
            dymu.apply(model, thresholds[level], vtu=mode)
            try:
                evaluate(f"DToMe-{level} ({'VTU' if mode != 'none' else 'no VTU'})", level, mode, reference=reference)
            finally:
                dymu.remove(model)
    with reference_layout(model):
        inputs = reference_inputs(processor)
        evaluate("unmerged, reference layout", None, REFERENCE, inputs=inputs, reference=reference)
        for level in levels:
            dymu.apply(model, thresholds[level], vtu="fast")
            try:
                evaluate(f"DToMe-{level} (VTU), reference layout", level, REFERENCE, inputs=inputs, reference=reference)
            finally:
                dymu.remove(model)
    results = {"format": RESULTS_FORMAT, "version": RESULTS_VERSION, "model": str(model_dir), "split": "test",
               "seed": seed, "scenes": scenes, "questions": len(records), "patches": processor.num_image_tokens,
               "slice_questions": E.SLICE_QUESTIONS, "describe_scenes": describe_scenes,
               "slice_descriptions": min(E.SLICE_DESCRIPTIONS, describe_scenes), "seconds": time.time() - started,
               "threshold_scenes": threshold_scenes,
               "targets": {level: thresholds[level].target_tokens for level in levels},
               "rows": [{k: v for k, v in row.items() if k != "answers"} for row in rows]}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "table.md").write_text(markdown_table(results))
    series = (*E.PLOT_SERIES, (REFERENCE, "^", "DToMe + VTU, reference layout"))
    labels = dict(series=series, model_name="toy OneVision", tokens_label="mean visual tokens per crop")
    E.plot(results, out / "accuracy_vs_tokens.png", **labels)
    if described:
        E.plot(results, out / "cider_vs_tokens.png", metric="cider", **labels)
    return results


def markdown_table(results: dict) -> str:
    """The rows as a Markdown table: tokens per crop / per image / the language model's, accuracy (and its share of
    the unmerged one), per kind, CIDEr-D, descriptions ended."""
    rows = results["rows"]
    kinds = list(rows[0]["per_kind"])
    described = any("cider" in row for row in rows)
    head = ["setting", f"tokens per crop (of {results['patches']})", "per image", "LM tokens / positions", "accuracy",
            *kinds] + (["CIDEr-D", "ended with </s>"] if described else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    unmerged = rows[0]["overall"]
    for row in rows:
        tokens = row["tokens"]
        seen = tokens["mean"] > 0
        compared = (row["level"] or row["vtu"]) and unmerged > 0
        relative = f" ({100 * row['overall'] / unmerged:.1f}% of unmerged)" if compared else ""
        cells = [row["name"], f"{tokens['mean']:.1f}" if seen else E.NOT_MEASURED,
                 f"{tokens['per_image']:.1f}" if seen else E.NOT_MEASURED,
                 f"{tokens['lm_tokens']:.1f} / {tokens['positions']:.1f}" if seen else E.NOT_MEASURED,
                 f"{100 * row['overall']:.1f}%{relative}", *(f"{100 * row['per_kind'][k]:.1f}" for k in kinds)]
        if described:
            cells += ([f"{row['cider']:.3f}", f"{100 * row['describe_ended']:.0f}%"] if "cider" in row
                      else [E.NOT_MEASURED, E.NOT_MEASURED])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = E.evaluation_parser(__doc__)
    parser.add_argument("--levels", default=",".join(OV_LEVELS), help="DToMe levels, comma separated ('' = none)")
    parser.add_argument("--describe-scenes", type=int, default=E.DEFAULT_DESCRIBE_SCENES,
                        help="test scenes described per setting for CIDEr-D (0 = none)")
    parser.add_argument("--threshold-scenes", type=int, default=E.DEFAULT_THRESHOLD_SCENES,
                        help="training scenes the thresholds are found on (their crops count as images)")
    args = parser.parse_args(argv)
    levels = tuple(level for level in args.levels.split(",") if level)
    if unknown := [level for level in levels if level not in OV_LEVELS]:
        parser.error(f"--levels: unknown level(s) {unknown}; choose from {list(OV_LEVELS)}")
    try:
        results = run(args.model, args.out, scenes=args.scenes, seed=args.seed, levels=levels,
                      describe_scenes=args.describe_scenes, threshold_scenes=args.threshold_scenes)
    except (FileNotFoundError, RowJournalError) as exc:
        raise SystemExit(f"error: {exc}") from None
    print(markdown_table(results))


if __name__ == "__main__":
    main()
