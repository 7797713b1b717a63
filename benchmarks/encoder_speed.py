"""Encoder speed of DToMe vs the stock encoder, as ratios measured in one run.

CLIP ViT-L/14-336 architecture with random weights (compute does not depend on weight values), CPU, fp32.
Thresholds for DyMU-low / mid / high (~90 / ~195 / ~395 tokens) are found on scikit-image's bundled photos.

Reports, for batch 1 and batch 8:
  measured speedup  = time(stock) / time(merged) over the same images
  FLOPs speedup     = FLOPs(stock) / FLOPs(merged) from each image's per-layer token counts
  efficiency        = measured / FLOPs-predicted  (target >= 0.85 at batch 1)
and the threshold-finding throughput relative to stock inference on the same batch (target >= 0.9).

Usage: python benchmarks/encoder_speed.py [--layers 24] [--images 8] [--repeats 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

import dymu
from dymu import flops
from dymu.data import write_bundled_images
from dymu.demo import cache_dir
from dymu.finder import find_thresholds, measure_tokens
from dymu.images import load_batch
from dymu.models import build_preset
from dymu.vision import tower_info

LEVELS = {"low": 90, "mid": 195, "high": 395}  # DyMU-low / mid / high mean token counts on LLaVA-1.5
#: images timed one by one: chosen to span flat to busy (all 25 are used for threshold finding)
TIMED_IMAGES = ("checkerboard", "clock", "rocket", "coffee", "camera", "astronaut", "coins", "chelsea", "moon", "grass")


def encoder_flops(layer_tokens: list[int], info, merging: bool = True) -> int:
    """FLOPs of one image through the encoder given its tokens (CLS excluded) after each layer.

    With ``merging`` every layer also pays for its bipartite score matrix (all layers merge in this benchmark).
    """
    return flops.encoder_flops(layer_tokens, num_tokens=info.num_tokens, protected=info.protected, hidden=info.hidden_size,
                               intermediate=info.intermediate_size, head_dim=info.hidden_size // info.num_heads, merging=merging)


def timed(fn, repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--images", type=int, default=8, help="how many of the timed images to use")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, processor = build_preset("clip-vit-l-14-336", layers=args.layers)
    info = tower_info(model)
    paths = write_bundled_images(cache_dir() / "images")
    all_pixels, names, _ = load_batch(paths, processor)
    timed_names = TIMED_IMAGES[: args.images]
    index = [next(i for i, n in enumerate(names) if n.endswith(f"/{t}.png")) for t in timed_names]
    pixels = all_pixels[index]
    print(f"CLIP ViT-L/14-336 shape, random weights, {info.num_layers} layers, width {info.hidden_size}, "
          f"{info.num_tokens} tokens, fp32, {torch.get_num_threads()} threads")
    print(f"thresholds found on {len(paths)} bundled images (one batch); timing on {len(index)} images, best of {args.repeats}")

    def stock(x):
        with torch.no_grad():
            model(x)

    # --- threshold finding throughput vs plain inference on the same batch -------------------------------
    stock(pixels[:1])  # warm-up
    start = time.perf_counter()
    stock(all_pixels)
    stock_batch_time = time.perf_counter() - start
    thresholds = {}
    results = {"config": {"layers": info.num_layers, "hidden": info.hidden_size, "tokens": info.num_tokens,
                          "threads": torch.get_num_threads(), "timed_images": list(timed_names), "repeats": args.repeats},
               "levels": {}}
    for level, target in LEVELS.items():
        start = time.perf_counter()
        thresholds[level] = find_thresholds(model, all_pixels, target_tokens=target, batch_size=len(all_pixels),
                                            progress=False, measure=0)
        finding = time.perf_counter() - start
        thresholds[level].achieved_tokens = measure_tokens(model, all_pixels, thresholds[level], batch_size=len(all_pixels))
        results["levels"][level] = {"finding_throughput_vs_stock": stock_batch_time / finding,
                                    "achieved_tokens": thresholds[level].achieved_tokens}

    # --- batch 1 and batch 8 speed ------------------------------------------------------------------------
    stock_flops = encoder_flops([info.num_patches] * info.num_layers, info, merging=False)
    per_image_stock = [timed(lambda x=pixels[i : i + 1]: stock(x), args.repeats) for i in range(len(index))]
    batch_stock = timed(lambda: stock(pixels), args.repeats)
    for level in LEVELS:
        dymu.apply(model, thresholds[level])
        encoding = dymu.encode(model, pixels)
        flops = [encoder_flops(t, info) for t in encoding.layer_tokens]
        per_image = [timed(lambda x=pixels[i : i + 1]: stock(x), args.repeats) for i in range(len(index))]
        batched = timed(lambda: stock(pixels), args.repeats)
        dymu.remove(model)
        flops_speedup = stock_flops * len(flops) / sum(flops)
        entry = results["levels"][level]
        entry.update({
            "tokens_timed": encoding.num_tokens,
            "flops_speedup": flops_speedup,
            "batch1_speedup": sum(per_image_stock) / sum(per_image),
            "batch8_speedup": batch_stock / batched,
        })
        entry["batch1_efficiency"] = entry["batch1_speedup"] / flops_speedup
        entry["batch8_efficiency"] = entry["batch8_speedup"] / flops_speedup

    print()
    print(f"{'level':<6} {'target':>6} {'tokens (all 25)':>16} {'FLOPs x':>8} {'bs1 x':>7} {'bs1 eff':>8} "
          f"{'bs8 x':>7} {'bs8 eff':>8} {'find/stock':>11}")
    for level, target in LEVELS.items():
        e = results["levels"][level]
        achieved = e["achieved_tokens"]
        print(f"{level:<6} {target:>6} {achieved['mean']:>9.1f}±{achieved['std']:<6.1f} {e['flops_speedup']:>8.2f} "
              f"{e['batch1_speedup']:>7.2f} {e['batch1_efficiency']:>8.2f} {e['batch8_speedup']:>7.2f} "
              f"{e['batch8_efficiency']:>8.2f} {e['finding_throughput_vs_stock']:>11.2f}")
    worst = min(results["levels"][l]["batch1_efficiency"] for l in LEVELS)
    find_worst = min(results["levels"][l]["finding_throughput_vs_stock"] for l in LEVELS)
    print(f"\nbatch-1 efficiency (measured / FLOPs-predicted speedup), worst level: {worst:.2f} (target >= 0.85)")
    print(f"threshold finding throughput / stock inference throughput, worst level: {find_worst:.2f} (target >= 0.90)")
    print(f"timed images: {', '.join(timed_names)}; stock FLOPs per image {stock_flops / 1e9:.1f} GFLOPs; "
          f"bs8 = the {len(index)} timed images as one batch")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
