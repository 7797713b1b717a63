"""``dymu`` command line: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from .vision import DymuError

SCHEDULES = ("constant", "linear", "reverse-linear")


def _add_images(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", metavar="IMAGES",
                        help="image files, folders (searched recursively) or JSON manifests [{\"image\": \"rel/path\"}, ...]")
    parser.add_argument("--image-root", help="folder that manifest paths are relative to (default: the manifest's folder)")


def _open(model_name: str):
    from .models import describe, load_model, load_processor

    model = load_model(model_name)
    processor = load_processor(model_name)
    print(f"model: {model_name} ({describe(model)})", file=sys.stderr)
    return model, processor


def _report_skipped(skipped: list[dict]) -> None:
    if skipped:
        print(f"skipped {len(skipped)} image(s):", file=sys.stderr)
        for entry in skipped:
            message = entry["error"] if entry["image"] in entry["error"] else f"{entry['image']}: {entry['error']}"
            print(f"  {message}", file=sys.stderr)


def cmd_make_model(args) -> None:
    from .models import make_model

    out = make_model(args.preset, args.out_dir, seed=args.seed, layers=args.layers)
    print(f"wrote random-weight {args.preset} checkpoint to {out}")


def cmd_find_thresholds(args) -> None:
    from .finder import find_thresholds
    from .images import collect_images

    image_set = collect_images(args.images, args.image_root)
    model, processor = _open(args.model)
    out = Path(args.out)
    partial = out.with_name(out.name + ".partial")
    if partial.exists() and not args.resume:
        print(f"note: {partial} holds an interrupted run; starting over (pass --resume to continue it)", file=sys.stderr)
    result = find_thresholds(
        model, image_set.paths, target_tokens=args.target_tokens, schedule=args.schedule, batch_size=args.batch_size,
        processor=processor, checkpoint=partial, resume=args.resume, measure=args.measure,
    )
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank()
        dist.destroy_process_group()
        if rank != 0:
            return
    result.images["skipped"] = image_set.skipped + result.images.get("skipped", [])
    result.save(out)
    _report_skipped(result.images["skipped"])
    shown = ", ".join("never" if math.isinf(v) else f"{v:.4f}" for v in result.values)
    print(f"thresholds per layer: {shown}")
    print(f"wrote {out}: {result.describe()}")


def cmd_encode(args) -> None:
    import torch

    from . import api
    from .images import collect_images, load_batch
    from .thresholds import Thresholds

    image_set = collect_images(args.images, args.image_root)
    thresholds = Thresholds.load(args.thresholds)
    model, processor = _open(args.model)
    api.apply(model, thresholds)
    rows, skipped, figures = [], list(image_set.skipped), []
    viz_dir = Path(args.viz) if args.viz else None
    if viz_dir:
        viz_dir.mkdir(parents=True, exist_ok=True)
    from tqdm.auto import tqdm

    for start in tqdm(range(0, len(image_set.paths), args.batch_size), desc="encoding", unit="batch", disable=args.json):
        chunk = image_set.paths[start : start + args.batch_size]
        pixel_values, names, failures = load_batch(chunk, processor)
        skipped += failures
        if pixel_values is None:
            continue
        encoding = api.encode(model, pixel_values)
        for i, name in enumerate(names):
            rows.append({"image": name, "tokens": encoding.num_tokens[i], "patches": encoding.num_patches})
            if args.json:
                print(json.dumps(rows[-1]), flush=True)
            if viz_dir:
                figures.append(_save_viz(viz_dir, name, pixel_values[i], encoding.source[i], rows[-1], processor))
    if not rows:
        raise DymuError("no readable images: every image failed to decode")
    if viz_dir:
        from .viz import save_overview

        save_overview(viz_dir / "overview.png", figures)
    counts = torch.tensor([r["tokens"] for r in rows], dtype=torch.float64)
    if not args.json:
        _print_table(rows)
        print(f"mean {counts.mean():.1f} ± {counts.std(unbiased=False):.1f} tokens over {len(rows)} images "
              f"({100 * counts.mean() / rows[0]['patches']:.1f}% of {rows[0]['patches']} patches)")
    if viz_dir:
        print(f"merge maps: {viz_dir}/", file=sys.stderr)
    _report_skipped(skipped)


def _print_table(rows: list[dict]) -> None:
    width = max(12, *(len(Path(r["image"]).name) for r in rows))
    print(f"{'image':<{width}}  {'tokens':>6}  {'patches':>7}  {'kept':>6}")
    for r in rows:
        print(f"{Path(r['image']).name:<{width}}  {r['tokens']:>6}  {r['patches']:>7}  {100 * r['tokens'] / r['patches']:>5.1f}%")


def _save_viz(viz_dir: Path, name: str, pixels, source, row: dict, processor):
    from .viz import denormalize, merge_map, save_merge_figure

    image = denormalize(pixels, processor.image_mean, processor.image_std)
    stem = Path(name).stem
    title = f"{Path(name).name}: {row['tokens']} tokens / {row['patches']} patches"
    save_merge_figure(viz_dir / f"{stem}.png", image, source, title)
    return (f"{stem}: {row['tokens']}", merge_map(image, source))


def cmd_import_thresholds(args) -> None:
    from .reference import import_reference

    result = import_reference(args.checkpoint, num_layers=args.num_layers)
    result.save(args.out)
    print(f"wrote {args.out}: {result.describe()} ({result.model.get('model_type')}, {len(result)} layers)")


def cmd_demo(args) -> None:
    from .demo import run_demo

    run_demo(out_dir=Path(args.out), layers=args.layers, target_tokens=args.target_tokens)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="dymu", description="Dynamic visual-token merging (DyMU) for Hugging Face VLMs.")
    parser.add_argument("--version", action="version", version=f"dymu {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    from .models import PRESETS

    p = sub.add_parser("make-model", help="write a random-weight checkpoint of a real architecture")
    p.add_argument("preset", choices=sorted(PRESETS))
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", type=int, help="number of encoder layers (default: the preset's)")
    p.set_defaults(func=cmd_make_model)

    p = sub.add_parser("find-thresholds", help="learn per-layer merge thresholds from a set of images")
    p.add_argument("model", help="local checkpoint folder or hub id")
    _add_images(p)
    p.add_argument("--target-tokens", type=int, required=True, help="mean visual tokens wanted out of the last merging layer (CLS not counted)")
    p.add_argument("--schedule", choices=SCHEDULES, default="constant")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", required=True, help="thresholds file to write (JSON)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from OUT.partial")
    p.add_argument("--measure", type=int, default=256, help="encode this many images with the result to report mean±std tokens (0: skip)")
    p.set_defaults(func=cmd_find_thresholds)

    p = sub.add_parser("encode", help="encode images with merging: tokens per image, merge maps")
    p.add_argument("model", help="local checkpoint folder or hub id")
    _add_images(p)
    p.add_argument("--thresholds", required=True, help="thresholds file (from find-thresholds or import-thresholds)")
    p.add_argument("--json", action="store_true", help="print one JSON line per image: image, tokens, patches")
    p.add_argument("--viz", metavar="DIR", help="write a merge-map PNG per image and overview.png here")
    p.add_argument("--batch-size", type=int, default=8)
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("import-thresholds", help="convert a DyMU reference threshold checkpoint to a dymu thresholds file")
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True)
    p.add_argument("--num-layers", type=int, help="keep only the first N layers (LLaVA-OneVision towers drop the last SigLIP layer)")
    p.set_defaults(func=cmd_import_thresholds)

    p = sub.add_parser("demo", help="offline demo on a random-weight CLIP-L/14-336 and scikit-image's photos")
    p.add_argument("--out", default="dymu-demo", help="output folder (default: ./dymu-demo)")
    p.add_argument("--layers", type=int, default=None, help="encoder depth (default: see dymu.demo.DEMO_LAYERS)")
    p.add_argument("--target-tokens", type=int, default=None)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (DymuError, ValueError, OSError) as exc:
        if os.environ.get("DYMU_DEBUG"):
            raise
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"dymu {args.command}: error: {message} (DYMU_DEBUG=1 shows the traceback)"
              if not isinstance(exc, DymuError) else f"dymu {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dymu {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
