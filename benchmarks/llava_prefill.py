"""LLaVA-1.5 prefill with DyMU vs the unmerged model, as ratios measured in one run.

LLaVA-1.5-7B architecture (CLIP ViT-L/14-336 tower, Llama-7B width) with random weights and the language
model cut to a few layers (--llm-layers, default 2: compute per layer does not depend on depth), CPU, fp32.
Thresholds for DyMU-low / mid / high (~90 / ~195 / ~395 tokens at LLaVA's layer -2) are found on
scikit-image's bundled photos. One image + ~40 text tokens per prompt, batch 1 and 4.

Reports per configuration: language-model prefill time (the `language_model` forward only, timed with
hooks; logits for the last position only, as `generate` does) and its speedup over unmerged, the whole
prefill time (vision + LM), the peak extra resident memory of the prefill, and the KV-cache bytes after it.
Targets at DyMU-low: fast VTU >= 3x faster than unmerged in the LM part, compact (vtu=none) >= 4x, exact
VTU at most 1.3x the time of fast (issue 22; 2x before).

Usage: python benchmarks/llava_prefill.py [--llm-layers 2] [--repeats 2] [--levels low,mid,high] [--json out.json]

Each repeat runs every configuration once, in turn (round 0 warms up); the best time per photo counts.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

import dymu
from dymu.data import write_bundled_images
from common import LanguageModelTimer, kv_bytes, prompt_with_text_tokens
from dymu.compat import find_cache
from dymu.demo import cache_dir
from dymu.finder import find_thresholds
from dymu.images import load_batch, open_image
from dymu.models import build_llava_preset

LEVELS = {"low": 90, "mid": 195, "high": 395}
MODES = ("fast", "exact", "none")
#: targets at DyMU-low: language-model speedups of fast VTU and compact mode, and exact VTU's time over fast VTU's
FAST_TARGET, COMPACT_TARGET, EXACT_OVER_FAST_TARGET = 3.0, 4.0, 1.3
TEXT_TOKENS = 40
#: the timed photos (batch 4 takes all, batch 1 takes the first); all 25 bundled images calibrate
TIMED_IMAGES = ("astronaut", "coffee", "camera", "chelsea")
MMAP_THRESHOLD = 1 << 16  # bytes: allocations above this are mmapped by glibc
CLEAR_PEAK_RSS = "5"  # writing this to /proc/self/clear_refs resets VmHWM (Linux >= 4.0)


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def peak_extra_memory(fn):
    """Run fn(); return (result, peak resident memory above the starting point in bytes, or nan)."""
    release_freed_memory()
    try:
        Path("/proc/self/clear_refs").write_text(CLEAR_PEAK_RSS)
        before = _rss_kib("VmRSS:")
        result = fn()
        return result, 1024 * (_rss_kib("VmHWM:") - before)
    except OSError:
        return fn(), math.nan




def release_freed_memory() -> None:
    """Return freed heap memory to the OS (glibc), so resident-set peaks measure the next run only."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def main() -> None:
    # Large allocations must be mmapped (returned to the OS when freed) for RSS peaks to mean anything.
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        os.execve(sys.executable, [sys.executable, *sys.argv], dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD)))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llm-layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--levels", default=",".join(LEVELS), help="DyMU levels to time (default: %(default)s)")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, processor = build_llava_preset("llava-1.5-7b", layers=args.llm_layers)
    text_config = model.config.text_config
    print(f"LLaVA-1.5-7B shape, random weights: CLIP-L/14-336 tower (24 layers, read at -2), Llama width "
          f"{text_config.hidden_size}, {text_config.num_hidden_layers} LLM layers (of 32), fp32, {torch.get_num_threads()} threads")
    timer = LanguageModelTimer(model.model.language_model)

    paths = write_bundled_images(cache_dir() / "images")
    all_pixels, names, _ = load_batch(paths, processor.image_processor)
    levels = [level for level in args.levels.split(",") if level]
    if unknown := [level for level in levels if level not in LEVELS]:
        parser.error(f"--levels: unknown {', '.join(unknown)} (choose from {', '.join(LEVELS)})")
    thresholds = {level: find_thresholds(model, all_pixels, target_tokens=LEVELS[level], batch_size=len(all_pixels),
                                         progress=False, measure=len(all_pixels))
                  for level in levels}
    for level, t in thresholds.items():
        print(f"DyMU-{level}: {t.achieved_tokens['mean']:.1f}±{t.achieved_tokens['std']:.1f} tokens on the 25 photos")

    photos = [open_image(p) for p in paths if Path(p).stem in TIMED_IMAGES]
    text = prompt_with_text_tokens(processor, TEXT_TOKENS)
    rows = []

    def prefill(inputs):
        with torch.no_grad():
            return model(**inputs, use_cache=True, logits_to_keep=1)

    # batch 1: each timed photo alone (times summed, memory of the largest); batch 4: all four at once
    groups = {1: [[photo] for photo in photos], len(photos): [photos]}
    configs = [("unmerged", None, "stock")] + [(f"DyMU-{lvl}", lvl, mode) for lvl in levels for mode in MODES]
    for batch, batches in groups.items():
        group_rows = {}
        for round_ in range(args.repeats + 1):  # round 0 warms up; configurations take turns against host noise
            for label, level, mode in configs:
                if level is None:
                    dymu.remove(model)
                else:
                    dymu.apply(model, thresholds[level], vtu=mode)
                row = group_rows.setdefault(label + mode, {
                    "batch": batch, "config": label, "vtu": mode, "visual_tokens": [], "sequence": [],
                    "lm": [math.inf] * len(batches), "total": [math.inf] * len(batches), "peak_extra_bytes": 0,
                    "kv_bytes": 0})
                for index, chunk in enumerate(batches):
                    stock_inputs = processor(images=chunk, text=[text] * len(chunk), return_tensors="pt", padding=True)
                    inputs = dymu.prepare_inputs(model, processor, chunk, [text] * len(chunk)) if mode == "none" else stock_inputs
                    timer.times = []
                    start = time.perf_counter()
                    output, peak = peak_extra_memory(lambda: prefill(inputs))
                    if not round_:
                        row["visual_tokens"] += (dymu.encode(model, stock_inputs["pixel_values"]).num_tokens if level
                                                 else [576] * len(chunk))
                        row["sequence"].append(int(inputs["input_ids"].shape[1]))
                        row["kv_bytes"] = max(row["kv_bytes"], kv_bytes(find_cache(output.values())))
                        continue
                    row["total"][index] = min(row["total"][index], time.perf_counter() - start)
                    row["lm"][index] = min(row["lm"][index], timer.elapsed)
                    row["peak_extra_bytes"] = max(row["peak_extra_bytes"], peak)
        for row in group_rows.values():  # bs1: each photo's best time, summed
            row["lm_seconds"], row["total_seconds"] = sum(row.pop("lm")), sum(row.pop("total"))
            rows.append(row)
        dymu.remove(model)

    print(f"\ntimed photos: {', '.join(TIMED_IMAGES)}; bs1 = each alone (times summed), bs{len(photos)} = one padded batch; "
          "tokens = mean visual tokens per image, seq = mean prompt length, peak/KV = largest single prefill")
    print(f"{'bs':>2} {'config':<10} {'vtu':<6} {'tokens':>12} {'seq':>5} {'LM x':>6} {'total x':>8} {'peak MiB':>9} {'KV MiB':>8}")
    for row in rows:
        base = next(r for r in rows if r["batch"] == row["batch"] and r["config"] == "unmerged")
        row["lm_speedup"] = base["lm_seconds"] / row["lm_seconds"]
        row["total_speedup"] = base["total_seconds"] / row["total_seconds"]
        tokens = f"{sum(row['visual_tokens']) / len(row['visual_tokens']):.0f}"
        sequence = f"{sum(row['sequence']) / len(row['sequence']):.0f}"
        print(f"{row['batch']:>2} {row['config']:<10} {row['vtu']:<6} {tokens:>12} {sequence:>5} {row['lm_speedup']:>6.2f} "
              f"{row['total_speedup']:>8.2f} {row['peak_extra_bytes'] / 2**20:>9.0f} {row['kv_bytes'] / 2**20:>8.1f}")
    for batch in groups if "low" in levels else ():
        get = {(r["config"], r["vtu"]): r for r in rows if r["batch"] == batch}
        fast, exact, compact = get[("DyMU-low", "fast")], get[("DyMU-low", "exact")], get[("DyMU-low", "none")]
        print(f"bs{batch} DyMU-low: fast VTU {fast['lm_speedup']:.2f}x (target >= {FAST_TARGET:g}), compact "
              f"{compact['lm_speedup']:.2f}x (target >= {COMPACT_TARGET:g}), exact / fast time "
              f"{exact['lm_seconds'] / fast['lm_seconds']:.2f} (target <= {EXACT_OVER_FAST_TARGET:g})")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
