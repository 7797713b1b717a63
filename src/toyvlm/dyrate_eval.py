"""DyRate against FastV and DToMe on the toy LLaVA: short-answer accuracy and description CIDEr-D vs the FLOPs of the
whole generation (issue 25).

    python -m toyvlm.dyrate_eval --model assets/toy-llava --predictors assets/toy-llava/dyrate [--scenes 150]
        [--describe-scenes 100] [--out DIR]

Every setting runs stock ``model.generate`` through ``dymu.apply`` as a DyRate policy: the trained predictors, and
predictors forced to one rate for the fixed baselines, which are FastV exactly (``tests/test_dyrate.py`` test 2):
forced to r and monotone = FastV(k, r) pruned once at the prefill; non-monotone = FastV(k, r) re-ranked at every
step; forced to 0 = the model as it is. So every row has a per-step trajectory and one FLOPs counter covers all:
``dymu.dyrate.generation_flops`` per generated sequence (its own length), both counters, the baselines charged only
for the attention they read (FastV pruned once: the prefill; unpruned: none).

* cache-aware: vision tower + projector (at the image's merged token counts) + the language model's prefill and every
  decode step against what each layer cached, as dymu runs it;
* fastv-formula: FastV's Eq. 5 per forward (the sequence recomputed at every step; language model only).

Reported per setting: accuracy on the questions of the first ``--scenes`` test scenes (at most 3 tokens each), CIDEr-D
of the descriptions of the first ``--describe-scenes`` test scenes (at most 80 tokens), the mean FLOPs of one answer
and of one description by both counters (% of unmerged), the mean rate over the description steps. Writes
dyrate.json, dyrate.md, dyrate.png (quality vs FLOPs) and dyrate_trajectories.png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from . import data as D
from .cider import cider_d
from .evaluate import describe_records, find_level_thresholds, image_size_of, load, test_records
from .train import MAX_ANSWER_TOKENS, MAX_DESCRIPTION_TOKENS, PROMPT

DEFAULT_SCENES = 150
DEFAULT_DESCRIBE_SCENES = 100
BATCH_SIZE = 32
#: FastV's layer on the 4-layer toy decoder (as toyvlm.baselines) and the rates compared
FASTV_K = 2
FASTV_RATES = (0.25, 0.5, 0.75)
#: the predictor composed with DToMe-mid + VTU
COMPOSED = "linear-3"
#: trajectories drawn in dyrate_trajectories.png
TRAJECTORIES = 8
RESULTS_FORMAT = "toyvlm-dyrate"
RESULTS_VERSION = 1


def forced_file(model, folder: Path, rate: float, rates: int = 4) -> Path:
    """A predictor file forced to ``rate`` (one of the K rates) at FastV's layer."""
    from dymu import dyrate as Y

    config = Y.PredictorConfig(layer=FASTV_K, rates=rates)
    path = folder / f"forced-{rate}.json"
    Y.PredictorFile(config, Y.forced(config, round(rate * rates)).state_dict(), Y.identity(model.config)).save(path)
    return path


def settings(model, predictors: dict, forced: Path, thresholds) -> list[dict]:
    """Every row: name, apply keywords, the reads its FLOPs are charged for."""
    rows = [{"name": "unmerged", "apply": {"prune": f"dyrate:{forced_file(model, forced, 0.0)}"}, "reads": "none"}]
    for rate in FASTV_RATES:
        path = forced_file(model, forced, rate)
        rows.append({"name": f"FastV k={FASTV_K} r={rate} (pruned once)", "apply": {"prune": f"dyrate:{path}"},
                     "reads": "prefill", "family": "fastv-prefill"})
        rows.append({"name": f"FastV k={FASTV_K} r={rate} (re-ranked per step)",
                     "apply": {"prune": f"dyrate:{path},monotone=false"}, "reads": "every", "family": "fastv-step"})
    for name, path in predictors.items():
        rows.append({"name": f"DyRate {name}", "apply": {"prune": f"dyrate:{path}"}, "reads": "every", "family": "dyrate",
                     "predictor": name})
    rows.append({"name": "DToMe-mid + VTU", "apply": {"thresholds": thresholds, "prune": f"dyrate:{forced_file(model, forced, 0.0)}"},
                 "reads": "none", "family": "dtome"})
    middle = next((n for n in predictors if n == COMPOSED), next(iter(predictors), None))
    if middle is not None:
        rows.append({"name": f"DToMe-mid + VTU + DyRate {middle}",
                     "apply": {"thresholds": thresholds, "prune": f"dyrate:{predictors[middle]}"}, "reads": "every",
                     "family": "dtome-dyrate", "predictor": middle})
    return rows


def run_setting(model, processor, records, images, reads: str, max_new_tokens: int, vision: dict, progress: bool,
                desc: str):
    """(texts, per-record FLOPs {counter: flops}, per-record rates (list per step)) of greedy generations."""
    import torch
    from tqdm.auto import tqdm

    from dymu import dyrate as Y
    from dymu import flops as F
    from dymu.llava import get_vlm_patch, last_prefill_plan

    decoder = F.Decoder.from_config(model.config)
    eos = processor.tokenizer.eos_token_id
    texts, costs, trajectories = [], [], []
    for start in tqdm(range(0, len(records), BATCH_SIZE), desc=desc, unit="batch", disable=not progress, leave=False):
        chunk = records[start : start + BATCH_SIZE]
        inputs = processor(images=[images[r["image"]] for r in chunk], text=[PROMPT.format(question=r["question"]) for r in chunk],
                           return_tensors="pt", padding=True)
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new = output[:, inputs["input_ids"].shape[1]:]
        texts += processor.tokenizer.batch_decode(new, skip_special_tokens=True)
        policy = get_vlm_patch(model).state.language.policy
        plan = last_prefill_plan(model)
        for row, record in enumerate(chunk):
            ends = (new[row] == eos).nonzero()
            length = int(ends[0, 0]) + 1 if len(ends) else new.shape[1]
            counts = Y.generation_flops(decoder, plan, policy, row, "fast", reads, forwards=length)
            costs.append({F.CACHE_AWARE: counts.cache_aware.flops + vision[record["image"]],
                          F.FASTV_FORMULA: counts.fastv_formula.flops})
            trajectories.append([float(s.rate[row]) for s in policy.trajectory[:length]])
    return texts, costs, trajectories


def vision_costs(model, processor, images: dict, merged: bool) -> dict:
    """image id -> vision tower + projector FLOPs under the model's current merging (``toyvlm.baselines``' count)."""
    from dymu import flops as F
    from dymu.llava import cls_tokens
    from dymu.vision import tower_info

    from .baselines import encoder_counts

    info = tower_info(model)
    hidden = F.Decoder.from_config(model.config).hidden
    cls = cls_tokens(model.config, info)
    if not merged:
        cost = F.vision_flops(info, hidden, cls=cls)
        return {image: cost for image in images}
    merging = F.merging_layers(model, info)
    return {image: F.vision_flops(info, hidden, layers, merging, cls)
            for image, (_, layers) in encoder_counts(model, processor, images).items()}


def run(model_dir, predictors_dir, out_dir=None, scenes: int = DEFAULT_SCENES, describe_scenes: int = DEFAULT_DESCRIBE_SCENES,
        seed: int = D.DEFAULT_SEED, progress: bool = True) -> dict:
    import tempfile

    import dymu
    from dymu import flops as F

    model_dir = Path(model_dir)
    out = Path(out_dir) if out_dir else model_dir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    model, processor = load(model_dir)
    size = image_size_of(processor)
    questions, question_images = test_records(scenes, seed, size)
    described, described_images = describe_records(describe_scenes, seed, size)
    thresholds = find_level_thresholds(model, processor, model_dir / "thresholds", seed=seed, progress=progress,
                                       levels=("mid",))["mid"]
    predictors = {path.stem: path for path in sorted(Path(predictors_dir).glob("*.json"))}
    started = time.time()
    rows = []
    # rows measured before on the same slice are kept (a killed run, or new predictors, measures only what is missing)
    done_path = out / "dyrate_rows.json"
    slice_ = {"scenes": scenes, "describe_scenes": describe_scenes, "seed": seed,
              "predictors": {k: _file_hash(v) for k, v in predictors.items()}}
    done = json.loads(done_path.read_text()) if done_path.is_file() else {}
    done = {name: row for name, row in done.items() if row.get("slice", {}).get("scenes") == scenes
            and row["slice"].get("describe_scenes") == describe_scenes and row["slice"].get("seed") == seed
            and row["slice"].get("predictor") == slice_["predictors"].get(row["slice"].get("predictor_name"))}
    with tempfile.TemporaryDirectory() as forced:
        for setting in settings(model, predictors, Path(forced), thresholds):
            if setting["name"] in done:
                rows.append(done[setting["name"]])
                continue
            dymu.apply(model, **{"thresholds": None, **setting["apply"]})
            try:
                merged = setting["apply"].get("thresholds") is not None
                vision = vision_costs(model, processor, {**question_images, **described_images}, merged)
                answers, answer_costs, _ = run_setting(model, processor, questions, question_images, setting["reads"],
                                                       MAX_ANSWER_TOKENS, vision, progress, setting["name"])
                texts, describe_costs, trajectories = run_setting(model, processor, described, described_images,
                                                                  setting["reads"], MAX_DESCRIPTION_TOKENS, vision,
                                                                  progress, f"{setting['name']}, describing")
            finally:
                dymu.remove(model)
            cider, _ = cider_d(dict(enumerate(texts)), {i: r["references"] for i, r in enumerate(described)})
            row = {"name": setting["name"], "family": setting.get("family", "unmerged"),
                   "prune": setting["apply"]["prune"].replace(str(forced) + "/", ""),
                   "dtome": merged, **D.accuracy(questions, answers), "cider": cider,
                   "answer_flops": {c: float(np.mean([x[c] for x in answer_costs])) for c in answer_costs[0]},
                   "describe_flops": {c: float(np.mean([x[c] for x in describe_costs])) for c in describe_costs[0]},
                   "describe_tokens": float(np.mean([len(t) for t in trajectories])),
                   "describe_rate": float(np.mean([r for t in trajectories for r in t])),
                   "trajectories": trajectories[:TRAJECTORIES]}
            name = setting.get("predictor")
            row["slice"] = {"scenes": scenes, "describe_scenes": describe_scenes, "seed": seed, "predictor_name": name,
                            "predictor": slice_["predictors"].get(name)}
            rows.append(row)
            done[row["name"]] = row
            done_path.write_text(json.dumps(done))
            _fractions(rows)
            print(f"{row['name']:<44} accuracy {100 * row['overall']:5.1f}%  answer FLOPs "
                  f"{100 * row['answer_fraction'][F.CACHE_AWARE]:5.1f}%  CIDEr-D {row['cider']:.3f}  describe FLOPs "
                  f"{100 * row['describe_fraction'][F.CACHE_AWARE]:5.1f}% / {100 * row['describe_fraction'][F.FASTV_FORMULA]:5.1f}% "
                  f"(cache-aware / fastv-formula)  mean rate {row['describe_rate']:.2f}", flush=True)
    _fractions(rows)
    results = {"format": RESULTS_FORMAT, "version": RESULTS_VERSION, "model": str(model_dir), "split": "test", "seed": seed,
               "scenes": scenes, "questions": len(questions), "describe_scenes": describe_scenes,
               "predictors": {k: str(v) for k, v in predictors.items()}, "counters": [F.CACHE_AWARE, F.FASTV_FORMULA],
               "seconds": time.time() - started, "rows": rows}
    (out / "dyrate.json").write_text(json.dumps(results, indent=1))
    (out / "dyrate.md").write_text(markdown_table(results))
    plot(results, out / "dyrate.png")
    plot_trajectories(results, out / "dyrate_trajectories.png")
    return results


def _fractions(rows: list) -> None:
    """Each row's FLOPs as fractions of the first row's (unmerged), per counter."""
    for row in rows:
        for kind in ("answer", "describe"):
            row[f"{kind}_fraction"] = {c: row[f"{kind}_flops"][c] / rows[0][f"{kind}_flops"][c] for c in row[f"{kind}_flops"]}


def _file_hash(path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def markdown_table(results: dict) -> str:
    header = ("| setting | accuracy | answer FLOPs (cache-aware / fastv-formula) | CIDEr-D | description FLOPs "
              "(cache-aware / fastv-formula) | mean rate (descriptions) |\n|---|---|---|---|---|---|\n")
    lines = []
    for row in results["rows"]:
        a, d = row["answer_fraction"], row["describe_fraction"]
        lines.append(f"| {row['name']} | {100 * row['overall']:.1f}% | {100 * a['cache-aware']:.1f}% / "
                     f"{100 * a['fastv-formula']:.1f}% | {row['cider']:.3f} | {100 * d['cache-aware']:.1f}% / "
                     f"{100 * d['fastv-formula']:.1f}% | {row['describe_rate']:.2f} |")
    return header + "\n".join(lines) + "\n"


#: (family, marker, colour) of the quality-vs-FLOPs plot
FAMILIES = (("unmerged", "*", "black"), ("fastv-prefill", "v", "tab:orange"), ("fastv-step", "^", "tab:red"),
            ("dyrate", "o", "tab:blue"), ("dtome", "s", "tab:grey"), ("dtome-dyrate", "D", "tab:green"))


def plot(results: dict, path) -> None:
    """Accuracy (questions) and CIDEr-D (descriptions) vs the generation's FLOPs, one row per counter."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(11.0, 8.4), dpi=120)
    counters = (("cache-aware", "vision + language model, cache-aware"),
                ("fastv-formula", "language model, FastV's formula per step"))
    for line, (counter, what) in enumerate(counters):
        panels = ((axes[line, 0], "answer_fraction", "overall", 100.0, "accuracy (%)", f"{results['questions']} questions"),
                  (axes[line, 1], "describe_fraction", "cider", 1.0, "CIDEr-D", f"{results['describe_scenes']} descriptions"))
        for axis, fraction, metric, scale, label, title in panels:
            for family, marker, colour in FAMILIES:
                members = sorted((r for r in results["rows"] if r["family"] == family), key=lambda r: r[fraction][counter])
                if not members:
                    continue
                axis.plot([100 * r[fraction][counter] for r in members], [scale * r[metric] for r in members],
                          marker=marker, color=colour, ls="-" if family.startswith("fastv") else "", label=family, ms=8)
                for r in members:
                    short = r["name"].replace("FastV k=2 ", "").replace(" (pruned once)", "").replace(" (re-ranked per step)", "")
                    axis.annotate(short.replace("DToMe-mid + VTU + DyRate ", "DToMe+").replace("DyRate ", ""),
                                  (100 * r[fraction][counter], scale * r[metric]), textcoords="offset points",
                                  xytext=(5, 3), fontsize=6, color=colour)
            axis.set_xlabel(f"FLOPs of the generation (% of unmerged; {what})", fontsize=8)
            axis.set_ylabel(label)
            axis.set_title(f"toy LLaVA, {title}", fontsize=9)
            axis.grid(alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    figure.tight_layout(rect=(0, 0.04, 1, 1))
    figure.savefig(path)
    plt.close(figure)


def plot_trajectories(results: dict, path) -> None:
    from dymu.dyrate import plot_trajectories as draw

    lines = [(f"{row['name'].replace('DyRate ', '')} #{i}", t) for row in results["rows"] if row["family"] == "dyrate"
             for i, t in enumerate(row["trajectories"][:3])]
    draw(lines, path, title="DyRate on the toy LLaVA: rate per step of the first test descriptions")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="assets/toy-llava")
    parser.add_argument("--predictors", default="assets/toy-llava/dyrate", help="folder of DyRate predictor files")
    parser.add_argument("--out", help="output folder (default: MODEL/eval)")
    parser.add_argument("--scenes", type=int, default=DEFAULT_SCENES)
    parser.add_argument("--describe-scenes", type=int, default=DEFAULT_DESCRIBE_SCENES)
    parser.add_argument("--seed", type=int, default=D.DEFAULT_SEED)
    args = parser.parse_args(argv)
    results = run(args.model, args.predictors, args.out, args.scenes, args.describe_scenes, args.seed)
    print(markdown_table(results))


if __name__ == "__main__":
    main()
