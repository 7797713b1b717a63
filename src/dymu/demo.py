"""``dymu demo``: DyMU end to end, offline.

Default: the trained toy LLaVA shipped in ``assets/toy-llava`` (see ``toyvlm``) answers questions about synthetic
test scenes and describes one scene per background kind, unmerged and with DToMe + VTU at two threshold levels;
accuracy, visual tokens, descriptions beside a reference, and merge maps.
``dymu demo --clip``: the encoder-only demo on a random-weight CLIP-L/14-336 and scikit-image's photos.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from .vision import DymuError

DEMO_PRESET = "clip-vit-l-14-336"
#: full CLIP-L/14-336 depth; the demo stays well under 3 minutes on 2 CPU cores at this depth
DEMO_LAYERS = 24
#: DyMU-mid's published mean token count on LLaVA-1.5
DEMO_TARGET_TOKENS = 195
DEMO_BATCH_SIZE = 25
REAL_CHECKPOINT = "openai/clip-vit-large-patch14-336"
#: environment variable naming the toy checkpoint folder (default: the repository's assets/toy-llava)
TOY_MODEL_ENV = "DYMU_TOY_MODEL"
#: toy demo: the two DToMe levels shown (see toyvlm.evaluate.DYMU_LEVELS), test scenes scored, scenes shown
TOY_LEVELS = ("mid", "low")
TOY_SCORED_SCENES = 80
TOY_SHOWN_PER_BACKGROUND = 1
#: training scenes the demo finds its thresholds on
TOY_THRESHOLD_SCENES = 1000
#: the self-check re-answers this many scored questions with never-merge thresholds (several left-padded batches)
SELF_CHECK_QUESTIONS = 96
#: settings whose descriptions of the shown scenes must all end with </s> (no runaway generation)
DESCRIPTIONS_MUST_END = ("unmerged", "DToMe-mid")


class SelfCheckError(DymuError):
    """The demo's answers fail a check they must pass on a healthy install (one line)."""


def cache_dir() -> Path:
    root = os.environ.get("DYMU_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache")), "dymu")
    return Path(root)


def run_clip_demo(out_dir: Path, layers: int | None = None, target_tokens: int | None = None) -> None:
    import torch

    from . import api
    from .data import write_bundled_images
    from .finder import find_thresholds
    from .images import load_batch
    from .models import describe, load_model, load_processor, make_model
    from .viz import denormalize, save_merge_figure, save_overview, save_token_bar_chart

    layers = layers or DEMO_LAYERS
    target_tokens = target_tokens or DEMO_TARGET_TOKENS
    started = time.time()
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = cache_dir() / "models" / f"{DEMO_PRESET}-{layers}layers-seed0"
    print("=" * 78)
    print("dymu demo: dynamic token merging (DToMe) in a CLIP ViT-L/14-336 vision encoder")
    print("NOTE: the encoder has RANDOM weights (no downloads here). Shapes, compute and the way")
    print("merging follows image complexity are real; the features themselves mean nothing.")
    print("=" * 78)
    if not (checkpoint / "config.json").is_file():
        print(f"[1/4] building a random-weight {DEMO_PRESET} ({layers} layers) -> {checkpoint}")
        import shutil

        shutil.rmtree(checkpoint, ignore_errors=True)  # our cache: what a build interrupted by an older dymu left
        make_model(DEMO_PRESET, checkpoint, seed=0, layers=layers)  # built beside it, swapped in once complete
    else:
        print(f"[1/4] using cached random-weight checkpoint {checkpoint}")
    model = load_model(checkpoint)
    processor = load_processor(checkpoint)
    print(f"      {describe(model)}")

    paths = write_bundled_images(cache_dir() / "images")
    print(f"[2/4] finding thresholds for {target_tokens} tokens on {len(paths)} photos bundled with scikit-image")
    thresholds = find_thresholds(model, paths, target_tokens=target_tokens, batch_size=DEMO_BATCH_SIZE,
                                 processor=processor, measure=0)

    print("[3/4] encoding every photo with those thresholds")
    api.apply(model, thresholds)
    pixel_values, names, _ = load_batch(paths, processor)
    encoding = api.encode(model, pixel_values)
    counts = torch.tensor(encoding.num_tokens, dtype=torch.float64)
    thresholds.achieved_tokens = {"mean": float(counts.mean()), "std": float(counts.std(unbiased=False)), "count": len(names)}
    thresholds.save(out_dir / "thresholds.json")

    order = sorted(range(len(names)), key=lambda i: encoding.num_tokens[i])
    print(f"\n{'image':<26}{'tokens':>7}{'of':>6}   kept")
    for i in order:
        n = encoding.num_tokens[i]
        bar = "#" * max(1, round(30 * n / encoding.num_patches))
        print(f"{Path(names[i]).stem:<26}{n:>7}{encoding.num_patches:>6}   {bar}")
    print(f"\nmean {counts.mean():.1f} ± {counts.std(unbiased=False):.1f} tokens (target {target_tokens}); "
          f"min {int(counts.min())}, max {int(counts.max())} of {encoding.num_patches} patches")

    print(f"[4/4] writing merge maps and a bar chart to {out_dir}/")
    maps_dir = out_dir / "merge_maps"
    figures = []
    for i in order:
        image = denormalize(pixel_values[i], processor.image_mean, processor.image_std)
        stem = Path(names[i]).stem
        title = f"{stem}: {encoding.num_tokens[i]} tokens / {encoding.num_patches} patches"
        save_merge_figure(maps_dir / f"{stem}.png", image, encoding.source[i], title)
        figures.append((stem, image, encoding.source[i]))
    save_overview(out_dir / "overview.png", figures)
    save_token_bar_chart(out_dir / "tokens_per_image.png", [Path(n).stem for n in names], encoding.num_tokens,
                         encoding.num_patches, f"DToMe tokens per image, target {target_tokens}")
    print(f"      {out_dir}/overview.png, {out_dir}/tokens_per_image.png, {maps_dir}/*.png, {out_dir}/thresholds.json")
    print(f"\ndone in {time.time() - started:.0f} s. The same on a real checkpoint (needs the hub):")
    print(f"  dymu find-thresholds {REAL_CHECKPOINT} IMAGES --target-tokens {target_tokens} --out clip-l-336-mid.json")
    print(f"  dymu encode {REAL_CHECKPOINT} IMAGES --thresholds clip-l-336-mid.json --viz merge_maps/")
    sys.stdout.flush()


def default_toy_model() -> Path:
    if os.environ.get(TOY_MODEL_ENV):
        return Path(os.environ[TOY_MODEL_ENV])
    return Path(__file__).resolve().parents[2] / "assets" / "toy-llava"


def run_demo(out_dir: Path, model_dir: Path | None = None, scenes: int | None = None) -> None:
    """The toy-LLaVA demo (see the module docstring). Raises SelfCheckError before reporting if its answers are
    not those of a healthy install."""
    import torch

    from toyvlm import data as D
    from toyvlm import evaluate as E
    from toyvlm.train import MAX_DESCRIPTION_TOKENS

    from . import api
    from .viz import denormalize, save_merge_figure, save_overview

    model_dir = Path(model_dir) if model_dir else default_toy_model()
    if not (model_dir / "config.json").is_file():
        raise DymuError(f"toy model not found at {model_dir}: run `make toy-model`, set {TOY_MODEL_ENV} or pass --model")
    scenes = scenes or TOY_SCORED_SCENES
    started = time.time()
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    print("=" * 78)
    print("dymu demo: DToMe + virtual token unmerging on a small LLaVA trained here (assets/toy-llava)")
    print("=" * 78)
    for line in _glossary(E.DYMU_LEVELS):
        print(line)
    model, processor = E.load(model_dir)
    patches = model.config.image_seq_length
    vision, text = model.config.vision_config, model.config.text_config
    print(f"[1/5] {model_dir}: CLIP tower {vision.num_hidden_layers} layers, {vision.image_size}px / {vision.patch_size} = "
          f"{patches} patches; Llama {text.num_hidden_layers} layers, width {text.hidden_size}")
    thresholds = E.find_level_thresholds(model, processor, out_dir / "thresholds", scenes=TOY_THRESHOLD_SCENES,
                                         progress=False, levels=TOY_LEVELS, reuse=False)
    print(f"      thresholds found on {TOY_THRESHOLD_SCENES} training images: "
          + ", ".join(f"{level} (target {E.level_target(model, E.DYMU_LEVELS[level])} tokens)" for level in TOY_LEVELS))

    records, images = E.test_records(scenes, image_size=E.image_size_of(processor))
    settings = [("unmerged", None)] + [(f"DToMe-{level}", level) for level in TOY_LEVELS]
    answers, ended, tokens, encodings, descriptions = {}, {}, {}, {}, {}
    shown = _pick_shown(records)
    shown_pixels = processor.image_processor(images=[images[i] for i in shown], return_tensors="pt")["pixel_values"]
    described, corpus = _describe_records(shown, scenes, E.image_size_of(processor))
    for name, level in settings:
        if level:
            api.apply(model, thresholds[level], vtu="fast")
        try:
            answers[name], ended[name] = E.generations(model, processor, records, images)
            descriptions[name] = E.generations(model, processor, described, images, max_new_tokens=MAX_DESCRIPTION_TOKENS)
            tokens[name] = E.visual_tokens(model, processor, records, images) if level else None
            encodings[name] = api.encode(model, shown_pixels)
        finally:
            api.remove(model)
    never = [float("inf")] * vision.num_hidden_layers
    checked = self_check(model, processor, records, images, answers, ended, never, described, descriptions)
    print(f"      self-check passed: {checked}")

    print("[2/5] a few test scenes (one per background kind): answers unmerged | " + " | ".join(n for n, lv in settings if lv))
    by_image = {}
    for index, record in enumerate(records):
        by_image.setdefault(record["image"], []).append(index)
    for k, image_id in enumerate(shown):
        counts = " / ".join(f"{encodings[name].num_tokens[k]}" for name, _ in settings)
        print(f"  {image_id} ({records[by_image[image_id][0]]['background']}): visual tokens {counts}")
        for index in by_image[image_id]:
            record = records[index]
            got = " | ".join(answers[name][index].strip() or "-" for name, _ in settings)
            print(f"    {record['question']:<58} {got:<24} (truth: {record['answer']})")

    print(f"[3/5] the same scenes described (greedy, at most {MAX_DESCRIPTION_TOKENS} tokens) beside the first of "
          "their five references, with each description's CIDEr-D against all five (a description that gets the scene "
          f"wrong scores low; document frequencies from the references of the {len(corpus)} test scenes):")
    scores = {name: _scene_cider(descriptions[name][0], described, corpus) for name, _ in settings}
    for k, record in enumerate(described):
        print(f"  {record['image']} ({record['background']}), asked {record['question']!r}:")
        print(f"    {'reference':<14}{'':<13}{record['references'][0]}")
        for name, _ in settings:
            text, done = descriptions[name][0][k], descriptions[name][1][k]
            print(f"    {name:<14}CIDEr-D {scores[name][k]:5.2f} {text.strip() or '-'}"
                  f"{'' if done else f' [no </s> within {MAX_DESCRIPTION_TOKENS} tokens]'}")

    print(f"[4/5] accuracy on {len(records)} test questions ({scenes} scenes), VTU on:")
    for name, level in settings:
        result = E.accuracy(records, answers[name])
        if level:
            per = tokens[name]["per_background"]
            split = ", ".join(f"{kind} {per[kind]:.0f}" for kind in D.BACKGROUND_KINDS if kind in per)
            used = f"{tokens[name]['mean']:5.1f} tokens ({split})"
        else:
            used = f"{patches:5.1f} tokens"
        kinds = " ".join(f"{kind} {100 * value:.0f}" for kind, value in result["per_kind"].items())
        print(f"  {name:<11} {100 * result['overall']:5.1f}%  {used}  [{kinds}]")

    print(f"[5/5] merge maps -> {out_dir}/merge_maps/, {out_dir}/overview.png")
    maps_dir = out_dir / "merge_maps"
    figures = []
    mean, std = processor.image_processor.image_mean, processor.image_processor.image_std
    for k, image_id in enumerate(shown):
        image = denormalize(shown_pixels[k], mean, std)
        for name, level in settings[1:]:
            encoding = encodings[name]
            title = f"{image_id} {name}: {encoding.num_tokens[k]}/{patches} tokens"
            save_merge_figure(maps_dir / f"{image_id}_{level}.png", image, encoding.source[k], title)
            figures.append((f"{image_id} {level}", image, encoding.source[k]))
    save_overview(out_dir / "overview.png", figures)
    print(f"\ndone in {time.time() - started:.0f} s. Full table (1000 test scenes, low/mid/high, with and without VTU):")
    print(f"  python -m toyvlm.evaluate --model {model_dir}")
    sys.stdout.flush()


def self_check(model, processor, records, images, answers: dict, ended: dict, never_merge: list, described: list,
               descriptions: dict) -> str:
    """Checks a healthy install passes; raises SelfCheckError (one line) otherwise. Returns what was checked.

    1. Never-merge thresholds (+inf) with VTU give exactly the unmerged answers (batched, left padded) and the
       unmerged descriptions of the ``described`` records (``descriptions``: setting -> (texts, ended)).
    2. Every answer of every setting is a well-formed short answer followed by the end of the generation: one of
       the task's answer words (a merged model may answer a letter question with a colour; a broken KV cache makes
       answers run on: "right no zero", "d yes").
    3. Every description of the settings in ``DESCRIPTIONS_MUST_END`` ends with </s> within the token budget.
    """
    from toyvlm import data as D
    from toyvlm import evaluate as E
    from toyvlm.train import MAX_DESCRIPTION_TOKENS

    from . import api

    subset = records[:SELF_CHECK_QUESTIONS]
    api.apply(model, never_merge, vtu="fast")
    try:
        patched, _ = E.generations(model, processor, subset, images)
        patched_descriptions, _ = E.generations(model, processor, described, images, max_new_tokens=MAX_DESCRIPTION_TOKENS)
    finally:
        api.remove(model)
    for what, ours, theirs, questions in (("answers", patched, answers["unmerged"], subset),
                                          ("descriptions", patched_descriptions, descriptions["unmerged"][0], described)):
        differ = [i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b]
        if differ:
            i = differ[0]
            raise SelfCheckError(f"self-check failed: with never-merge thresholds {len(differ)} of {len(ours)} {what} "
                                 f"differ from the unmerged model (first: {questions[i]['question']!r} -> {ours[i]!r}, "
                                 f"unmerged {theirs[i]!r}); this install gives wrong answers")
    words = set().union(*(D.answer_space(kind) for kind in D.QUESTION_KINDS))
    for name, texts in answers.items():
        bad = [i for i, (text, done) in enumerate(zip(texts, ended[name])) if not done or D.normalize_answer(text) not in words]
        if bad:
            i = bad[0]
            raise SelfCheckError(f"self-check failed: {name}: {len(bad)} of {len(texts)} answers are not a short answer "
                                 f"ending the generation (first: {records[i]['question']!r} -> {texts[i]!r})")
    for name in DESCRIPTIONS_MUST_END:
        texts, done = descriptions[name]
        if not all(done):
            i = done.index(False)
            raise SelfCheckError(f"self-check failed: {name}: {done.count(False)} of {len(texts)} descriptions do not end "
                                 f"with </s> within {MAX_DESCRIPTION_TOKENS} tokens (first: {described[i]['image']} -> "
                                 f"{texts[i]!r})")
    return (f"never-merge == unmerged on {len(subset)} questions and {len(described)} descriptions; all "
            f"{sum(map(len, answers.values()))} answers well formed; {' and '.join(DESCRIPTIONS_MUST_END)} descriptions "
            "end with </s>")


def _glossary(levels: dict) -> list[str]:
    """One line each for the terms the demo prints (``levels``: toyvlm.evaluate.DYMU_LEVELS, share of the patches)."""
    shares = " / ".join(f"{100 * share:.0f}%" for share in levels.values())
    return [
        "DToMe: each vision-encoder layer merges tokens more similar than a threshold learned from images, so plain "
        "images keep few tokens and busy ones many.",
        "VTU: the language model treats each merged token as the tokens it replaced (same positions), so it runs "
        "unchanged on fewer distinct tokens.",
        f"{' / '.join(levels)}: DyMU's token levels, thresholds aimed at {shares} of the image's patches on average "
        "(the targets reachable here are shown below).",
    ]


def _scene_cider(texts: list[str], described: list[dict], corpus: list[dict]) -> list[float]:
    """CIDEr-D of each description of the ``described`` records against its scene's references, with the document
    frequencies of all the ``corpus`` records' references (a scene's score depends only on its own candidate, so
    the other scenes stand in with their first reference)."""
    from toyvlm.cider import cider_d

    candidates = {record["image"]: record["references"][0] for record in corpus}
    candidates.update((record["image"], text) for record, text in zip(described, texts))
    per_scene = cider_d(candidates, {record["image"]: record["references"] for record in corpus})[1]
    return [per_scene[record["image"]] for record in described]


def _describe_records(shown: list[str], scenes: int, image_size: int) -> tuple[list[dict], list[dict]]:
    """The describe records (``toyvlm.evaluate.describe_records``) of the ``shown`` test images, in their order, and
    those of all ``scenes`` test scenes."""
    from toyvlm import evaluate as E

    corpus = E.describe_records(scenes, image_size=image_size)[0]
    by_image = {record["image"]: record for record in corpus}
    return [by_image[image_id] for image_id in shown], corpus


def _pick_shown(records) -> list[str]:
    """The first test image of each background kind."""
    shown, seen = [], {}
    for record in records:
        kind = record["background"]
        if seen.get(kind, 0) < TOY_SHOWN_PER_BACKGROUND and record["image"] not in shown:
            seen[kind] = seen.get(kind, 0) + 1
            shown.append(record["image"])
    return shown
