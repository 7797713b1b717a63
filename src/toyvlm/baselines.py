"""DToMe against the training-free baselines on the toy LLaVA: accuracy per question kind vs prefill FLOPs.

    python -m toyvlm.baselines --model assets/toy-llava [--scenes 1000] [--out DIR]

Every setting goes through ``dymu.apply`` and stock ``model.generate`` on the same test questions as
``toyvlm.evaluate``:

* ``unmerged``; FastV (``fastv:k=2,r=0.5`` and ``r=0.75``: from layer 2 of the 4, the image tokens the last query
  attends to least are dropped); VTW at the K that ``dymu.calibrate.calibrate_vtw`` chooses on training images
  (and at half depth when that is another K: what withdrawing costs);
* ToMe with the fixed r whose token count is nearest DToMe-low's and DToMe-mid's measured means
  (``dymu.tome_r_for``), with VTU, against DToMe-low / mid + VTU (the thresholds ``toyvlm.evaluate`` found);
* DToMe-mid + VTU + FastV(2, 0.5).

FLOPs (``dymu.flops``, cache-aware counter): per question, the vision tower and projector at the image's measured
per-layer token counts plus the language model's prefill of that question's prompt (text tokens, image positions,
unique image tokens, the pruning plan), averaged over the questions. With VTU and FastV together, the positions the
kept groups cover are counted at the image's mean group size (the counter's default).
"""

from __future__ import annotations

import json
import time

import numpy as np

from . import data as D
from .data import accuracy
from .evaluate import (BATCH_SIZE, DEFAULT_TEST_SCENES, answer, evaluation_parser, find_level_thresholds,
                       image_size_of, open_run)
from .train import PROMPT

RESULTS_FORMAT = "toyvlm-baselines"
RESULTS_VERSION = 1
#: FastV's layer (the spec's K = 2) and the two pruning ratios the issue asks for
FASTV_K = 2
FASTV_RATIOS = (0.5, 0.75)
#: VTW calibration: training images and the question asked about each
VTW_CALIBRATION_IMAGES = 64
VTW_CALIBRATION_QUESTION = "How many objects are there?"
#: the 4-layer toy decoder has no layer 5 (VTW's first candidate on 32-layer models)
VTW_FIRST_LAYER = 1
LEVELS = ("low", "mid")
#: label of a calibrated VTW that keeps the visual tokens in every layer (no candidate met the KL threshold)
NEVER = ": no layer qualifies"


def encoder_counts(model, processor, images: dict, batch_size: int = BATCH_SIZE) -> dict:
    """image id -> (visual tokens, tokens after each executed encoder layer) under the model's current merging."""
    import dymu

    ids, out = list(images), {}
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        pixel_values = processor.image_processor(images=[images[i] for i in chunk], return_tensors="pt")["pixel_values"]
        encoding = dymu.encode(model, pixel_values)
        out.update({i: (int(n), list(map(int, layers))) for i, n, layers in zip(chunk, encoding.num_tokens, encoding.layer_tokens)})
    return out


def text_tokens(processor, records) -> list[int]:
    """Prompt tokens besides the image placeholders, per record."""
    image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    ids = processor.tokenizer([PROMPT.format(question=r["question"]) for r in records])["input_ids"]
    return [sum(1 for i in row if i != image_token) for row in ids]


def mean_prefill_flops(model, records, texts: list[int], counts: dict | None, vtu: str, prune) -> float:
    """Mean over records of vision + language-model prefill FLOPs (cache-aware counter) of one question.

    counts: ``encoder_counts`` of the setting (None: unmerged); the model patched as the setting (the merge state
    says which encoder layers compute the matching)."""
    from dymu import flops as F
    from dymu.llava import cls_tokens, placeholders_per_image
    from dymu.vision import tower_info

    info = tower_info(model)
    decoder = F.Decoder.from_config(model.config)
    cls = cls_tokens(model.config, info)
    positions = placeholders_per_image(model.config, info)
    merging = F.merging_layers(model, info)
    total = 0.0
    for record, text in zip(records, texts):
        tokens, layers = counts[record["image"]] if counts is not None else (info.num_patches, None)
        vision = F.vision_flops(info, decoder.hidden, layers, merging, cls)
        plan = F.language_plan(F.Prompt(text, positions, tokens + cls), decoder.layers, vtu, prune)
        total += vision + F.prefill_flops(decoder, plan).flops
    return total / len(records)


def calibrated_vtw(model, processor, images: int = VTW_CALIBRATION_IMAGES, seed: int = D.DEFAULT_SEED, progress: bool = True):
    """VTW's K chosen by its KL criterion on ``images`` training images (``dymu.calibrate.calibrate_vtw``)."""
    import dymu
    from dymu.calibrate import calibrate_vtw

    examples = D.make_split("train", seed=seed, num_scenes=images, image_size=image_size_of(processor), per_kind=0)
    dymu.apply(model, None)
    try:
        return calibrate_vtw(model, processor, [e.image for e in examples],
                             prompt=PROMPT.format(question=VTW_CALIBRATION_QUESTION), first_layer=VTW_FIRST_LAYER,
                             progress=progress)
    finally:
        dymu.remove(model)


def settings(thresholds: dict, tome: dict, vtw_spec: str, layers: int) -> list[tuple[str, dict]]:
    """(name, dymu.apply keywords) of every setting, in table order (``layers``: of the language model)."""
    fastv = [(f"FastV k={FASTV_K} r={r}", {"prune": f"fastv:k={FASTV_K},r={r}"}) for r in FASTV_RATIOS]
    vtw = [(f"VTW calibrated ({vtw_spec}{NEVER if vtw_spec == f'vtw:k={layers}' else ''})", {"prune": vtw_spec})]
    if vtw_spec != f"vtw:k={layers // 2}":  # what withdrawing costs on this model, at half depth
        vtw.append((f"VTW k={layers // 2}", {"prune": f"vtw:k={layers // 2}"}))
    rows = [("unmerged", {}), *fastv, *vtw]
    for level in LEVELS:
        rows.append((f"ToMe r={tome[level].r} + VTU (~DToMe-{level})", {"merge": tome[level], "vtu": "fast"}))
        rows.append((f"DToMe-{level} + VTU", {"thresholds": thresholds[level], "vtu": "fast"}))
    rows.append((f"DToMe-mid + VTU + FastV k={FASTV_K} r=0.5",
                 {"thresholds": thresholds["mid"], "vtu": "fast", "prune": f"fastv:k={FASTV_K},r=0.5"}))
    return rows


def run(model_dir, out_dir=None, scenes: int = DEFAULT_TEST_SCENES, seed: int = D.DEFAULT_SEED, progress: bool = True) -> dict:
    """Every setting on the test split; writes baselines.json, baselines.md and accuracy_vs_flops.png to ``out_dir``
    (default ``model_dir/eval``). DToMe thresholds are those of ``toyvlm.evaluate`` (found if missing)."""
    import dymu
    from dymu.api import tome_r_for

    model_dir, out, model, processor, records, images = open_run(model_dir, out_dir, scenes, seed)
    started = time.time()
    texts = text_tokens(processor, records)
    thresholds = find_level_thresholds(model, processor, model_dir / "thresholds", seed=seed, progress=progress, levels=LEVELS)
    means = {}
    for level in LEVELS:
        dymu.apply(model, thresholds[level])
        means[level] = float(np.mean([n for n, _ in encoder_counts(model, processor, images).values()]))
        dymu.remove(model)
    tome = {level: tome_r_for(means[level], model) for level in LEVELS}
    vtw = calibrated_vtw(model, processor, seed=seed, progress=progress)
    rows, reference = [], None
    layers = model.config.text_config.num_hidden_layers
    for name, keywords in settings(thresholds, tome, vtw.spec, layers):
        # a calibrated VTW that found no layer (vtw:k=depth) is the model as it is: dymu refuses a k it cannot act on
        acting = {k: v for k, v in keywords.items() if not (k == "prune" and v == f"vtw:k={layers}")}
        dymu.apply(model, **{"thresholds": None, **acting})
        try:
            merged = "thresholds" in keywords and keywords["thresholds"] is not None or "merge" in keywords
            counts = encoder_counts(model, processor, images) if merged else None
            answers = answer(model, processor, records, images, progress=progress, desc=name)
            flops = mean_prefill_flops(model, records, texts, counts, keywords.get("vtu", "fast"), acting.get("prune"))
        finally:
            dymu.remove(model)
        tokens = [counts[r["image"]][0] for r in records] if counts else [model.config.image_seq_length] * len(records)
        row = {"name": name, "merge": "tome" if "merge" in keywords else "dtome" if counts else None,
               "prune": keywords.get("prune"), "vtu": keywords.get("vtu", "fast"),
               "visual_tokens": float(np.mean(list({r["image"]: t for r, t in zip(records, tokens)}.values()))),
               "prefill_flops": flops, **accuracy(records, answers)}
        reference = reference or row
        row["flops_fraction"] = flops / reference["prefill_flops"]
        rows.append(row)
        print(f"{name:<40} tokens {row['visual_tokens']:6.1f}  FLOPs {100 * row['flops_fraction']:5.1f}%  "
              f"accuracy {100 * row['overall']:5.1f}%  " + " ".join(f"{k} {100 * v:.1f}" for k, v in row["per_kind"].items()),
              flush=True)
    results = {"format": RESULTS_FORMAT, "version": RESULTS_VERSION, "model": str(model_dir), "split": "test", "seed": seed,
               "scenes": scenes, "questions": len(records), "patches": model.config.image_seq_length,
               "counter": "cache-aware", "dtome_mean_tokens": means, "tome_r": {k: v.r for k, v in tome.items()},
               "vtw": {"k": vtw.k, "kl": vtw.kl, "threshold": vtw.threshold, "images": vtw.samples},
               "seconds": time.time() - started, "rows": rows}
    (out / "baselines.json").write_text(json.dumps(results, indent=1))
    (out / "baselines.md").write_text(markdown_table(results))
    plot(results, out / "accuracy_vs_flops.png")
    return results


def markdown_table(results: dict) -> str:
    kinds = list(results["rows"][0]["per_kind"])
    header = ("| setting | visual tokens (mean) | prefill FLOPs (% of unmerged) | accuracy | " + " | ".join(kinds) + " |\n|"
              + "---|" * (4 + len(kinds)) + "\n")
    lines = [f"| {row['name']} | {row['visual_tokens']:.1f} of {results['patches']} | "
             f"{row['prefill_flops'] / 1e6:.1f} M ({100 * row['flops_fraction']:.1f}%) | {100 * row['overall']:.1f}% | "
             + " | ".join(f"{100 * row['per_kind'][k]:.1f}" for k in kinds) + " |" for row in results["rows"]]
    return header + "\n".join(lines) + "\n"


def plot(results: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7.0, 4.6), dpi=120)
    # (legend, member, marker, colour, label offset in points, short label)
    families = (("FastV", lambda r: r["merge"] is None and (r["prune"] or "").startswith("fastv"), "v", "tab:orange",
                 (6, -4), lambda r: r["name"].replace("FastV k=2 ", "")),
                ("VTW", lambda r: (r["prune"] or "").startswith("vtw"), "X", "tab:red", (6, 4),
                 lambda r: f"VTW calibrated: {r['prune']}" if "calibrated" in r["name"] else r["name"]),
                ("ToMe fixed r + VTU", lambda r: r["merge"] == "tome", "s", "tab:grey", (6, -12),
                 lambda r: r["name"].split(" +")[0]),
                ("DToMe + VTU", lambda r: r["merge"] == "dtome" and not r["prune"], "o", "tab:blue", (-62, 4),
                 lambda r: r["name"].split(" +")[0]),
                ("DToMe + VTU + FastV", lambda r: r["merge"] == "dtome" and r["prune"], "D", "tab:green", (-70, 6),
                 lambda r: "DToMe-mid + FastV"),
                ("unmerged", lambda r: r["name"] == "unmerged", "*", "black", (-52, -4), lambda r: "unmerged"))
    for legend, member, marker, colour, offset, short in families:
        members = sorted((r for r in results["rows"] if member(r)), key=lambda r: r["flops_fraction"])
        if not members:
            continue
        axis.plot([100 * r["flops_fraction"] for r in members], [100 * r["overall"] for r in members], marker=marker,
                  color=colour, label=legend, ls="-" if len(members) > 1 and legend != "VTW" else "",
                  ms=12 if legend == "unmerged" else 8, zorder=3 if legend == "unmerged" else 2)
        for r in members:
            axis.annotate(short(r), (100 * r["flops_fraction"], 100 * r["overall"]), textcoords="offset points",
                          xytext=offset, fontsize=7, color=colour)
    axis.set_xlabel("prefill FLOPs, vision + language model (% of unmerged; cache-aware counter)")
    axis.set_ylabel("accuracy (%)")
    axis.set_title(f"toy LLaVA, {results['questions']} test questions")
    axis.set_xlim(0, 118)  # room for the labels of the points at 100%
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="lower left")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main(argv=None) -> None:
    args = evaluation_parser(__doc__).parse_args(argv)
    try:
        results = run(args.model, args.out, scenes=args.scenes, seed=args.seed)
    except FileNotFoundError as exc:
        raise SystemExit(f"error: {exc}") from None
    print(markdown_table(results))


if __name__ == "__main__":
    main()
