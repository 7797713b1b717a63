"""``dymu demo``: the whole DToMe pipeline offline, on a random-weight CLIP-L/14-336 and real photos."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

DEMO_PRESET = "clip-vit-l-14-336"
#: full CLIP-L/14-336 depth; the demo stays well under 3 minutes on 2 CPU cores at this depth
DEMO_LAYERS = 24
#: DyMU-mid's published mean token count on LLaVA-1.5
DEMO_TARGET_TOKENS = 195
DEMO_BATCH_SIZE = 25
REAL_CHECKPOINT = "openai/clip-vit-large-patch14-336"


def cache_dir() -> Path:
    root = os.environ.get("DYMU_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache")), "dymu")
    return Path(root)


def run_demo(out_dir: Path, layers: int | None = None, target_tokens: int | None = None) -> None:
    import torch

    from . import api
    from .data import write_bundled_images
    from .finder import find_thresholds
    from .images import load_batch
    from .models import describe, load_model, load_processor, make_model
    from .viz import denormalize, merge_map, save_merge_figure, save_overview, save_token_bar_chart

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
        make_model(DEMO_PRESET, checkpoint, seed=0, layers=layers)
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
    maps_dir.mkdir(exist_ok=True)
    figures = []
    for i in order:
        image = denormalize(pixel_values[i], processor.image_mean, processor.image_std)
        stem = Path(names[i]).stem
        title = f"{stem}: {encoding.num_tokens[i]} tokens / {encoding.num_patches} patches"
        save_merge_figure(maps_dir / f"{stem}.png", image, encoding.source[i], title)
        figures.append((f"{stem}: {encoding.num_tokens[i]}", merge_map(image, encoding.source[i])))
    save_overview(out_dir / "overview.png", figures)
    save_token_bar_chart(out_dir / "tokens_per_image.png", [Path(n).stem for n in names], encoding.num_tokens,
                         encoding.num_patches, f"DToMe tokens per image, target {target_tokens}")
    print(f"      {out_dir}/overview.png, {out_dir}/tokens_per_image.png, {maps_dir}/*.png, {out_dir}/thresholds.json")
    print(f"\ndone in {time.time() - started:.0f} s. The same on a real checkpoint (needs the hub):")
    print(f"  dymu find-thresholds {REAL_CHECKPOINT} IMAGES --target-tokens {target_tokens} --out clip-l-336-mid.json")
    print(f"  dymu encode {REAL_CHECKPOINT} IMAGES --thresholds clip-l-336-mid.json --viz merge_maps/")
    sys.stdout.flush()
