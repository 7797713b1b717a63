"""``dymu`` command line: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import Counter
from pathlib import Path

from .images import plural
from .vision import DymuError

SCHEDULES = ("constant", "linear", "reverse-linear")
#: exit status of a command whose reader went away (`dymu encode --json | head`), as 128 + SIGPIPE
EXIT_BROKEN_PIPE = 141
#: --viz: file stem of the picture of all merge maps
OVERVIEW = "overview"
#: dymu flops: text tokens of the prompt by default (LLaVA-1.5's system prompt is 35, then a short question)
DEFAULT_PROMPT_TOKENS = 48
#: dymu flops: decode steps averaged by default
DEFAULT_NEW_TOKENS = 32
SI_PREFIXES = ("", "k", "M", "G", "T", "P")
#: dymu generate: untimed runs first (allocations, caches), then timed runs whose median is shown
GENERATE_WARMUPS = 1
GENERATE_REPEATS = 3
#: dymu generate: a prefill faster than this is mostly fixed per-call cost, where fewer tokens cannot show
SMALL_PREFILL_SECONDS = 0.1
#: dymu train-dyrate: the pruning layer by default (spec §4.3 item 9: FastV's K = 3), capped below the model's depth
DYRATE_LAYER = 3
#: dymu flops: the table's columns and their widths
FLOPS_COLUMNS = ("vision", "language", "prefill", "", "decode/step", "", "KV cache", "")
FLOPS_WIDTHS = (13, 13, 13, 6, 13, 6, 10, 6)


def _add_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="local checkpoint folder or hub id")
    parser.add_argument("--processor", metavar="DIR", help="folder holding the image processor to use (a preprocessor_config.json) "
                        "(default: the model's; without one, the standard processor of its family, with a notice)")


def _add_images(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", metavar="IMAGES",
                        help="image files, folders (searched recursively) or JSON manifests [{\"image\": \"rel/path\"}, ...]")
    parser.add_argument("--image-root", help="folder that manifest paths are relative to (default: the manifest's folder)")
    parser.add_argument("--allow-outside-root", action="store_true",
                        help="read manifest entries outside the image root (../, absolute paths), skipped otherwise")
    _add_limits(parser)


def _add_limits(parser: argparse.ArgumentParser) -> None:
    from .images import DEFAULT_MAX_ASPECT_RATIO, DEFAULT_MAX_PIXELS

    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, metavar="N",
                        help="skip (and list) images of more pixels, read from the file header before decoding (default: %(default)s)")
    parser.add_argument("--max-aspect-ratio", type=float, default=DEFAULT_MAX_ASPECT_RATIO, metavar="R",
                        help="skip (and list) images whose long side is more than R times the short one: the processor "
                        "scales the short side to the model's size (default: %(default)s)")


def _limits(args):
    from .images import ImageLimits

    return ImageLimits(args.max_pixels, args.max_aspect_ratio)


def _add_merge(parser: argparse.ArgumentParser) -> None:
    from .methods import MERGE_SYNTAX

    parser.add_argument("--merge", metavar="SPEC", help=f"encoder merging instead of --thresholds: {MERGE_SYNTAX} "
                        "(tome:r=8: each image merges 8 token pairs per layer, ToMe's fixed r; dtome:FILE: a thresholds file)")


def _open(model_name: str, processor_path: str | None):
    """The model and its image processor: --processor, else the checkpoint's, else its family's standard one."""
    from .models import describe, image_processor_for, load_model, load_processor

    model = load_model(model_name)
    print(f"model: {model_name} ({describe(model)})", file=sys.stderr)
    if processor_path is not None:
        return model, load_processor(processor_path)
    processor, notice = image_processor_for(model, model_name)
    if notice:
        print(f"note: {notice} (pass --processor DIR to use another)", file=sys.stderr)
    return model, processor


def _out_file(path: str, overwrite: bool = False, inputs=(), resume: bool | None = None) -> Path:
    """--out: a file in an existing folder, checked before any work so a typo does not cost a whole run: never one
    of ``inputs``, and absent unless --overwrite (or --resume)."""
    from .files import check_output

    out = Path(path)
    if out.is_dir():
        raise DymuError(f"--out {out} is a folder: name the file to write in it")
    if not out.parent.is_dir():
        raise DymuError(f"--out {out}: folder {out.parent} does not exist")
    return check_output(out, "--out", overwrite, inputs, resume)


def _model_files(args) -> list[Path]:
    """The files a command reads from the model's folder (and --processor's), which no output may replace."""
    from .files import folder_files

    return folder_files(args.model) + folder_files(getattr(args, "processor", None) or "")


def _lock(path: Path):
    """The advisory lock of an output (torchrun: rank 0's; the other ranks lock their own checkpoints)."""
    import contextlib

    from .files import Lock

    return Lock(path, f"--out {path}") if os.environ.get("RANK", "0") == "0" else contextlib.nullcontext()


def _out_folder(path: str | None, option: str) -> Path | None:
    """A folder to write into, checked before any work (created by the first file written, so a failed run leaves
    no empty folder)."""
    if path is None:
        return None
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise DymuError(f"{option} {folder} is a file, not a folder")
    existing = next(parent for parent in (folder, *folder.absolute().parents) if parent.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise DymuError(f"{option} {folder}: cannot create a folder inside {existing}")
    return folder


def _add_overwrite(parser: argparse.ArgumentParser, what: str = "an existing --out file") -> None:
    parser.add_argument("--overwrite", action="store_true", help=f"replace {what} (never one of the inputs; without it an "
                        "existing output is refused)")
def _positive_int(text: str) -> int:
    """argparse type of counts that must be at least 1 (checked before any model loads)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _text_config(model_name: str):
    """The text config of a checkpoint's language model (read before the weights load)."""
    from .models import load_config

    return load_config(model_name)[1].get_text_config()


def _check_depth(text, prune) -> None:
    """A pruning spec must act within the language model's depth (``text``: its text config)."""
    from .policies import policy_for

    if prune is not None and getattr(text, "num_hidden_layers", None):
        policy_for(prune, text.num_hidden_layers)


def _check_context(model_name: str, context: int | None, new_tokens: int, prompt_length: int = 0) -> None:
    """--max-new-tokens must fit in the model's context after the prompt."""
    if context is not None and prompt_length + new_tokens > context:
        prompt = f" after the {prompt_length}-token prompt" if prompt_length else ""
        raise DymuError(f"--max-new-tokens {new_tokens} does not fit{prompt} in the context of {model_name}: "
                        f"{context} positions (max_position_embeddings of its text config)")


def _add_workers(parser: argparse.ArgumentParser) -> None:
    from .loader import MAX_DEFAULT_WORKERS, default_workers

    parser.add_argument("--workers", type=int, default=default_workers(), metavar="N",
                        help="processes decoding images while the model runs, 0 to decode in the main process; the results "
                        f"do not depend on it (default: %(default)s here: the cores but one, at most {MAX_DEFAULT_WORKERS}, "
                        "shared among torchrun's processes)")


def _encoder_merging(args) -> tuple[dict, str]:
    """The ``dymu.apply`` keywords of the encoder's merging ({}: none) and the VTU mode, checked before any model loads:
    --merge SPEC, else --thresholds FILE, else the checkpoint's "dymu" section."""
    from .methods import ToMe, parse_merge
    from .models import settings_from_config
    from .thresholds import Thresholds

    if args.merge is not None and args.thresholds is not None:
        raise DymuError("--merge and --thresholds are alternatives: give one")
    thresholds, vtu = settings_from_config(args.model, args.thresholds, getattr(args, "vtu", None))
    if args.merge is None and args.thresholds is None and thresholds is not None:
        print(f"thresholds: the \"dymu\" section of {Path(args.model).expanduser() / 'config.json'}"
              f"{f' ({thresholds})' if isinstance(thresholds, str) else ''} (pass --thresholds or --merge for others)",
              file=sys.stderr)
    if args.merge is not None:
        method = parse_merge(args.merge)
        if isinstance(method, ToMe):
            return {"merge": method}, vtu
        thresholds = method.path
    if isinstance(thresholds, str):
        thresholds = Thresholds.load(thresholds)
    return ({} if thresholds is None else {"thresholds": thresholds}), vtu


def _report_skipped(skipped: list[dict]) -> None:
    from .images import failure_line

    if skipped:
        print(f"skipped {len(skipped)} image(s):", file=sys.stderr)
        for entry in skipped:
            print(f"  {failure_line(entry)}", file=sys.stderr)


def cmd_make_model(args) -> None:
    from .models import make_model

    import torch

    dtype = getattr(torch, args.dtype) if args.dtype else None
    out = make_model(args.preset, args.out_dir, seed=args.seed, layers=args.layers, dtype=dtype, overwrite=args.overwrite)
    print(f"wrote random-weight {args.preset} checkpoint to {out}")


def cmd_find_thresholds(args) -> None:
    from .finder import checkpoint_file

    image_set = _image_set(args)
    out = _out_file(args.out, args.overwrite, [*image_set.paths, *_model_files(args)])
    checkpoint = out.with_name(out.name + ".partial")
    partial = checkpoint_file(checkpoint)  # this process's (torchrun: one per rank)
    _out_file(partial, True, [*image_set.paths, *_model_files(args)])
    if args.resume and args.restart:
        raise DymuError("--resume continues OUT.partial, --restart discards it: give one")
    with _lock(out):
        if partial.exists() and args.restart:
            partial.unlink()
            print(f"note: discarded the interrupted run in {partial} (--restart)", file=sys.stderr)
        elif partial.exists() and not args.resume:
            raise DymuError(f"{partial} holds an interrupted run: pass --resume to continue it, or --restart to discard "
                            "it and start over")
        try:
            _find_thresholds(args, image_set, out, checkpoint)
        except KeyboardInterrupt:
            saved = (f"the finished batches are saved in {partial}: run the same command with --resume to continue"
                     if partial.exists() else "nothing was saved")
            raise KeyboardInterrupt(f"interrupted; {saved}") from None


def _image_set(args):
    from .images import collect_images

    return collect_images(args.images, args.image_root, args.allow_outside_root)


def _find_thresholds(args, image_set, out: Path, checkpoint: Path) -> None:
    import warnings

    from .finder import find_thresholds
    from .images import SkippedImagesWarning

    _limits(args)  # checked before the model loads
    model, processor = _open(args.model, args.processor)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedImagesWarning)  # the full list is printed below
        result = find_thresholds(
            model, image_set, target_tokens=args.target_tokens, schedule=args.schedule, batch_size=args.batch_size,
            processor=processor, checkpoint=checkpoint, resume=args.resume,
            measure=args.measure, num_workers=args.workers,
            max_pixels=args.max_pixels, max_aspect_ratio=args.max_aspect_ratio,
        )
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank()
        dist.destroy_process_group()
        if rank != 0:
            return
    result.save(out)
    _report_skipped(result.images["skipped"])
    print(f"search: {result.timing.summary()} ({plural(args.workers, 'worker')})", file=sys.stderr)
    shown = ", ".join("never" if math.isinf(v) else f"{v:.4f}" for v in result.values)
    print(f"thresholds per layer: {shown}")
    print(f"wrote {out}: {result.describe()}")


def _encode_output(args, inputs: list) -> Path | None:
    """encode --out / --resume, checked before any work (a file to resume must be one of dymu encode)."""
    from .rows import check_is_ours

    if args.out is None:
        if args.resume:
            raise DymuError("--resume continues the rows of --out FILE: name the file")
        return None
    if args.resume and args.viz:
        raise DymuError("--viz cannot be combined with --resume (the overview needs every image): run without --resume")
    if args.resume and args.overwrite:
        raise DymuError("--resume continues --out FILE, --overwrite replaces it: give one")
    out = _out_file(args.out, args.overwrite, inputs, resume=args.resume)
    if args.resume and out.exists() and out.stat().st_size > 0:
        check_is_ours(out)
    return out


def _still_missing(missing, name: str) -> bool:
    """Whether a resumed batch must write this row (``missing``: rows per image still to write, None: all)."""
    if missing is None:
        return True
    if missing[name] > 0:
        missing[name] -= 1
        return True
    return False


def cmd_encode(args) -> None:
    import contextlib

    viz_dir = _out_folder(args.viz, "--viz")
    image_set = _image_set(args)
    _limits(args)  # checked before the model loads
    merging, _ = _encoder_merging(args)
    if not merging:
        raise DymuError(f"no thresholds: pass --thresholds FILE or --merge SPEC, or store thresholds in {args.model} with `dymu enable`")
    inputs = [*image_set.paths, *_model_files(args), getattr(merging.get("thresholds"), "path", None)]
    out = _encode_output(args, inputs)
    if viz_dir is not None:
        from .files import check_outputs

        pictures = [viz_dir / f"{name}.png" for name in (*_viz_names(image_set.paths).values(), OVERVIEW)]
        check_outputs(pictures, "--viz", args.overwrite, inputs)
    with _lock(out) if out is not None else contextlib.nullcontext():
        try:
            _encode(args, image_set, merging, out, viz_dir)
        except KeyboardInterrupt:
            if out is None or not out.exists():
                raise
            raise KeyboardInterrupt(f"interrupted; the rows written so far are in {out}: run the same command with "
                                    "--resume to continue") from None


def _encode(args, image_set, merging: dict, out: Path | None, viz_dir: Path | None) -> None:
    import torch
    from tqdm.auto import tqdm

    from . import api, rows as R
    from .images import summarize_failures
    from .journal import Appender
    from .loader import ImageBatches, LoadClock, load_batches, on_gpu, remaining_batches
    from .vision import tower_info

    model, processor = _open(args.model, args.processor)
    api.apply(model, **merging)
    info = tower_info(model)
    header = R.header(info.tower, info.identity(), merging, image_set.paths) if out is not None else None
    resumed = args.resume and out.exists() and out.stat().st_size > 0
    written = R.resume_rows(out, header, image_set.paths) if resumed else []
    rows = [row for row in written if "tokens" in row]
    skipped = list(image_set.skipped) + [row for row in written if "tokens" not in row]
    figures = []
    viz_names = _viz_names(image_set.paths)
    dataset = ImageBatches(image_set.paths, args.batch_size, processor, limits=_limits(args))
    todo, partial = remaining_batches(image_set.paths, args.batch_size, [row["image"] for row in written])
    if resumed:
        print(f"resuming {out}: {len(written)} image(s) done, {len(todo)} batch(es) to go", file=sys.stderr)
    to_stdout = args.json and out is None
    clock = LoadClock()
    sink = Appender(out, None if resumed else header) if out is not None else None
    bar = tqdm(total=sum(map(dataset.size, todo)), desc="encoding", unit="img", disable=to_stdout)
    try:
        for batch in clock.batches(load_batches(dataset, todo, args.workers, pin_memory=on_gpu(model))):
            missing = partial.get(batch.index)
            if batch.pixel_values is not None:
                with clock.model():
                    encoding = api.encode(model, batch.pixel_values)
            crops = batch.crops or [1] * len(batch.names)
            if viz_dir and max(crops, default=1) > 1:
                raise DymuError("--viz draws one crop per image; AnyRes processors (LLaVA-OneVision) give several: "
                                "pass the tower's plain image processor with --processor, or drop --viz")
            starts = [sum(crops[:i]) for i in range(len(crops))]
            for i, name in enumerate(batch.names):
                if not _still_missing(missing, name):
                    continue
                rows_of_image = range(starts[i], starts[i] + crops[i])  # an AnyRes image: its crops' tokens add up
                rows.append({"image": name, "tokens": sum(encoding.num_tokens[r] for r in rows_of_image),
                             "patches": encoding.num_patches * crops[i], **({"crops": crops[i]} if crops[i] > 1 else {})})
                if to_stdout:
                    print(json.dumps(rows[-1]), flush=True)
                if sink is not None:
                    sink.write(rows[-1])
                if viz_dir:
                    figures.append(_save_viz(viz_dir / f"{viz_names[name]}.png", name, batch.pixel_values[i],
                                             encoding.source[i], rows[-1], processor))
            for failure in batch.failures:
                if _still_missing(missing, failure["image"]):
                    skipped.append(failure)
                    if to_stdout:  # the same line --out writes
                        print(json.dumps(failure), flush=True)
                    if sink is not None:
                        sink.write(failure)
            bar.update(batch.size)
    finally:
        bar.close()
        if sink is not None:
            sink.close()
    if not rows:
        removed = ""
        if out is not None:  # it lists failures only, which a rerun meets again
            out.unlink()
            removed = f"; removed {out}, which held no encoded image"
        raise DymuError(f"no readable images: every image failed ({summarize_failures(skipped)}){removed}")
    if viz_dir:
        from .viz import save_overview

        save_overview(viz_dir / f"{OVERVIEW}.png", figures)
    counts = torch.tensor([r["tokens"] for r in rows], dtype=torch.float64)
    if not args.json and out is None:
        _print_table(rows)
    if not to_stdout:
        patches = {r["patches"] for r in rows}
        share = (f"{100 * counts.mean() / rows[0]['patches']:.1f}% of {rows[0]['patches']} patches" if len(patches) == 1
                 else f"{100 * counts.sum() / sum(r['patches'] for r in rows):.1f}% of their patches, AnyRes crops included")
        print(f"mean {counts.mean():.1f} ± {counts.std(unbiased=False):.1f} tokens over {plural(len(rows), 'image')} ({share})")
    if out is not None:
        print(f"wrote {out}: a header line, then a JSON line per image ({len(rows)} encoded, "
              f"{len(skipped) - len(image_set.skipped)} unreadable)", file=sys.stderr)
    if viz_dir:
        print(f"merge maps: {viz_dir}/", file=sys.stderr)
    print(f"encode: {clock.summary()} ({plural(args.workers, 'worker')})", file=sys.stderr)
    _report_skipped(skipped)


def _common_folder(paths: list[str]) -> str:
    """The deepest folder holding every one of ``paths`` (absolute)."""
    return os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])


def _print_table(rows: list[dict]) -> None:
    """Rows named by their path from the images' common folder: two x.jpg of a/ and b/ show as a/x.jpg, b/x.jpg."""
    root = _common_folder([r["image"] for r in rows])
    names = [os.path.relpath(os.path.abspath(r["image"]), root) for r in rows]
    width = max(12, *map(len, names))
    print(f"{'image':<{width}}  {'tokens':>6}  {'patches':>7}  {'kept':>6}")
    for name, r in zip(names, rows):
        print(f"{name:<{width}}  {r['tokens']:>6}  {r['patches']:>7}  {100 * r['tokens'] / r['patches']:>5.1f}%")


def _viz_names(paths: list[str]) -> dict[str, str]:
    """A distinct file stem per image for --viz, the same on every run: the image's stem; where stems clash
    (case-insensitively), its path from the images' common folder with the extension ("a/img.png" -> "a_img.png"),
    numbered if that clashes too. No image takes the overview's name."""
    paths = list(dict.fromkeys(paths))
    clashes = Counter(Path(p).stem.lower() for p in paths) + Counter([OVERVIEW])
    root = _common_folder(paths)
    names, used = {}, {OVERVIEW}
    for path in paths:
        name = base = Path(path).stem
        if clashes[name.lower()] > 1:
            name = base = "_".join(Path(os.path.relpath(os.path.abspath(path), root)).parts)
        number = 1
        while name.lower() in used:
            number += 1
            name = f"{base}-{number}"
        used.add(name.lower())
        names[path] = name
    return names


def _save_viz(out: Path, name: str, pixels, source, row: dict, processor):
    """Write the merge figure of one image to ``out``; return its overview tile (name, image, source)."""
    from .viz import denormalize, save_merge_figure

    image = denormalize(pixels, processor.image_mean, processor.image_std)
    title = f"{Path(name).name}: {row['tokens']} tokens / {row['patches']} patches"
    save_merge_figure(out, image, source, title)
    return (out.stem, image, source)


def cmd_import_thresholds(args) -> None:
    from .reference import import_reference

    out = _out_file(args.out, args.overwrite, [args.checkpoint])
    with _lock(out):
        result = import_reference(args.checkpoint, num_layers=args.num_layers)
        result.save(out)
    print(f"wrote {args.out}: {result.describe()} ({result.model.get('model_type')}, {len(result)} layers)")


def _run_generate(model, processor, images, text, max_new_tokens: int, model_name: str = "the model") -> dict:
    import statistics
    import time

    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    from .llava import model_inputs

    class FirstStep(LogitsProcessor):
        """Timestamps the first call, which follows the prefill forward."""

        def __init__(self):
            self.first = None

        def __call__(self, input_ids, scores):
            if self.first is None:
                self.first = time.perf_counter()
            return scores

    inputs = model_inputs(model, processor, images, [text])  # compact inputs when the model is in compact mode
    _check_context(model_name, getattr(model.config.get_text_config(), "max_position_embeddings", None), max_new_tokens,
                   inputs["input_ids"].shape[1])
    timings = []  # (prefill, decode) seconds of the timed runs
    with torch.no_grad():
        for run in range(GENERATE_WARMUPS + GENERATE_REPEATS):
            clock = FirstStep()
            start = time.perf_counter()
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                    logits_processor=LogitsProcessorList([clock]))
            end = time.perf_counter()
            if run >= GENERATE_WARMUPS:
                timings.append((clock.first - start, end - clock.first))
    new_tokens = output[0, inputs["input_ids"].shape[1]:]
    return {"answer": processor.decode(new_tokens, skip_special_tokens=True).strip(),
            "prefill": statistics.median(t[0] for t in timings), "decode": statistics.median(t[1] for t in timings),
            "new_tokens": len(new_tokens), "prompt_length": inputs["input_ids"].shape[1],
            "placeholders": int((inputs["input_ids"] == model.config.image_token_id).sum())}


def _prefill_report(model, prompt_length: int, vtu: str) -> str:
    """Image tokens per language-model layer and the prefill FLOPs (vision + language model) vs unmerged."""
    from .flops import CACHE_AWARE, last_prefill

    last = last_prefill(model, prompt_length, vtu)
    spans = ", ".join(f"{n} in {_layer_span(a, b)}" for a, b, n in last.spans)
    return (f"  image tokens in the language model: {spans}; prefill FLOPs {100 * last.prefill_ratio:.1f}% of unmerged "
            f"({CACHE_AWARE})")


def _dyrate_report(model, vtu: str, plot: str | None) -> str:
    """DyRate's rate and kept image tokens at every step of the last generation, its language-model FLOPs by both
    counters vs the same generation without it, and the trajectory's PNG (``plot``); "" for other prunings."""
    from .dyrate import DyRatePolicy, describe_trajectory, generation_flops, plot_trajectories
    from .flops import Decoder
    from .llava import get_vlm_patch, last_prefill_plan

    policy = get_vlm_patch(model).state.language.policy
    if not isinstance(policy, DyRatePolicy):
        return ""
    counts = generation_flops(Decoder.from_config(model.config), last_prefill_plan(model), policy, 0, vtu)
    lines = describe_trajectory(policy)
    lines.append("  language-model FLOPs of this generation vs without DyRate: " + ", ".join(
        f"{100 * ratio:.1f}% ({counter})" for counter, ratio in counts.ratios.items()))
    if plot is not None:
        plot_trajectories([("this prompt", policy.rates()[0])], plot)
        lines.append(f"  wrote {plot}")
    return "\n" + "\n".join(lines)


def _layer_span(first: int, end: int) -> str:
    return f"layer {first}" if end == first + 1 else f"layers {first}-{end - 1}"


def cmd_generate(args) -> None:
    from . import api
    from .images import open_image
    from .llava import chat_prompt, is_vlm, last_images, supports_language_side
    from .methods import parse_prune
    from .models import describe, load_model, load_processor

    prune = parse_prune(args.prune)  # a bad spec fails before any loading
    if args.rate_plot is not None:
        from .methods import DyRate

        if not isinstance(prune, DyRate):
            raise DymuError("--rate-plot draws DyRate's rates: give --prune dyrate:FILE")
        _out_file(args.rate_plot, overwrite=True, inputs=[*args.image, prune.path])
    merging, vtu = _encoder_merging(args)
    text = _text_config(args.model)
    _check_context(args.model, getattr(text, "max_position_embeddings", None), args.max_new_tokens)
    _check_depth(text, prune)
    images = [open_image(path, _limits(args)) for path in args.image]
    model = load_model(args.model)
    if not (is_vlm(model) and supports_language_side(model)):
        raise DymuError(f"{args.model} is a {type(model).__name__}: dymu generate needs a LLaVA-1.5 or LLaVA-OneVision checkpoint "
                        "(for vision encoders use dymu encode)")
    processor = load_processor(args.model, full=True)
    print(f"model: {args.model} ({describe(model)})", file=sys.stderr)
    text = chat_prompt(processor, args.prompt, len(images))
    reduced = bool(merging) or args.prune is not None
    runs = []
    if reduced:
        api.apply(model, **merging, vtu=vtu, prune=args.prune)
        merged = _run_generate(model, processor, images, text, args.max_new_tokens, args.model)
        merged["images"] = last_images(model)  # per image: (placeholders, tokens the language model gets)
        merged["report"] = _prefill_report(model, merged["prompt_length"], vtu)
        merged["report"] += _dyrate_report(model, vtu, args.rate_plot)
        if args.show_plan:
            from .llava import last_prefill_plan

            plan = last_prefill_plan(model)
            merged["report"] += "\n" + ("  (no plan: the language model ran the stock computation)" if plan is None
                                        else "\n".join("  " + line for line in str(plan).splitlines()))
        method = [f"ToMe r={merging['merge'].r} (vtu={vtu})" if "merge" in merging else f"DyMU (vtu={vtu})"] * bool(merging)
        runs.append((" + ".join(method + [args.prune] * (args.prune is not None)), merged))
        api.remove(model)
    if not reduced or args.compare:
        runs.append(("unmerged", _run_generate(model, processor, images, text, args.max_new_tokens, args.model)))
    stock = [p for p, _ in runs[0][1]["images"]] if reduced else []  # each image's placeholders
    for label, run in runs:
        print(f"[{label}] {run['answer']}")
        if "images" in run:
            counts = run["images"]
        else:  # the stock model: every placeholder its own token
            counts = [(p, p) for p in stock] or [(run["placeholders"] // len(images),) * 2] * len(images)
        per_image = ", ".join(f"{Path(p).name}: {n}/{positions}" for p, (positions, n) in zip(args.image, counts))
        print(f"  visual tokens {per_image}; prefill {run['prefill'] * 1000:.0f} ms, decode {run['decode'] * 1000:.0f} ms "
              f"for {run['new_tokens']} tokens (median of {GENERATE_REPEATS} runs after {plural(GENERATE_WARMUPS, 'warm-up')})")
        if "report" in run:
            print(run["report"])
    if reduced and max(run["prefill"] for _, run in runs) < SMALL_PREFILL_SECONDS:
        print(f"note: the prefill takes under {SMALL_PREFILL_SECONDS * 1000:.0f} ms on this model: fixed per-call costs "
              "dominate, so the times do not show the saving (the FLOPs line does); a full-size model shows it")
    if not reduced:
        print("(no merging: pass --thresholds FILE or --merge SPEC (or enable thresholds with `dymu enable`), or --prune SPEC)",
              file=sys.stderr)


def cmd_train_dyrate(args) -> None:
    from .dyrate import PredictorConfig
    from .dyrate_train import Settings, chosen_rates, init_distributed, read_records, train
    from .llava import is_vlm, supports_language_side
    from .models import describe, load_model, load_processor

    records = read_records(args.data, args.limit)  # a bad DATA fails before any loading
    out = _out_file(args.out, args.overwrite, [r.image for r in records] + [args.data, *_model_files(args)],
                    resume=args.resume)
    state = out.with_name(out.name + ".state")
    if state.exists() and not args.resume:
        raise DymuError(f"{state} holds an interrupted training: pass --resume to continue it, or delete it to start over")
    text = _text_config(args.model)
    layers = getattr(text, "num_hidden_layers", None) or 0
    layer = args.layer if args.layer is not None else min(DYRATE_LAYER, max(layers - 1, 1))
    config = PredictorConfig(predictor=args.predictor, rates=args.rates, layer=layer, hidden=args.hidden,
                             history=args.history, penalty=args.penalty)
    config.check(layers or None, "train-dyrate")
    distributed = init_distributed()
    model = load_model(args.model)
    if not (is_vlm(model) and supports_language_side(model)):
        raise DymuError(f"{args.model} is a {type(model).__name__}: train-dyrate needs a LLaVA-1.5 checkpoint")
    processor = load_processor(args.model, full=True)
    print(f"model: {args.model} ({describe(model)}); {plural(len(records), 'training record')}", file=sys.stderr)
    settings = Settings(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                        save_every=args.save_every)
    with _lock(out):
        try:
            result = train(model, processor, records, config, out, settings, resume=args.resume, data_name=str(args.data))
        except KeyboardInterrupt:
            saved = f"the training state is in {state}: rerun with --resume to continue" if state.exists() else "nothing was saved"
            raise KeyboardInterrupt(f"interrupted; {saved}") from None
    if distributed:
        import torch.distributed as dist

        rank = dist.get_rank()
        dist.destroy_process_group()
        if rank != 0:
            return
    last = result.training["history"][-1]
    rate = chosen_rates(model, processor, records[: args.batch_size * 4], result.predictor(), config)
    print(f"wrote {out}: {config.predictor} predictor over rates {{{', '.join(f'{i}/{config.rates}' for i in range(config.rates))}}} "
          f"from layer {config.layer}, penalty {config.penalty}; {result.training['steps']} steps, last loss "
          f"{last['loss']:.3f} (cross-entropy {last['cross_entropy']:.3f}, kept {last['kept']:.2f}); mean rate chosen "
          f"{rate:.2f} on the first {min(len(records), args.batch_size * 4)} records")


def cmd_calibrate_vtw(args) -> None:
    from . import api
    from .calibrate import calibrate_vtw
    from .images import collect_images, load_images
    from .models import load_model, load_processor

    merging, vtu = _encoder_merging(args)
    image_set = collect_images(args.images, args.image_root, args.allow_outside_root)
    out = _out_file(args.out, args.overwrite, [*image_set.paths, *_model_files(args),
                                               getattr(merging.get("thresholds"), "path", None)])
    with _lock(out):  # held from the start: a second run on the same --out fails before its work
        images, skipped = load_images(image_set.paths[: args.limit], _limits(args))
        _report_skipped(image_set.skipped + skipped)
        model = load_model(args.model)
        processor = load_processor(args.model, full=True)
        api.apply(model, **merging, vtu=vtu)
        result = calibrate_vtw(model, processor, images, prompt=args.prompt, threshold=args.kl, first_layer=args.first_layer,
                               batch_size=args.batch_size)
        for k, value in result.kl.items():
            print(f"withdraw before layer {k:>3}: mean KL {value:.5f}{'  <= threshold' if value <= result.threshold else ''}")
        chosen = "no layer qualifies: never withdraw" if result.k == result.model["num_layers"] else f"prune=\"{result.spec}\""
        print(f"K = {result.k} (first layer with mean KL <= {result.threshold} on {result.samples} images): {chosen}")
        result.save(out)
    print(f"wrote {out}")


def _planned_images(args, info) -> tuple[list[int] | None, list[bool], str]:
    """dymu flops: one image's tokens after each executed encoder layer (None: unmerged), which layers merge, and
    where the count comes from: --image-tokens (constant schedule) or the thresholds' measured mean (their schedule)."""
    from . import flops as F
    from .models import settings_from_config
    from .thresholds import as_thresholds

    if args.image_tokens is not None and args.thresholds is not None:
        raise DymuError("pass --thresholds FILE or --image-tokens N, not both")
    if args.image_tokens is not None:
        if not 1 <= args.image_tokens <= info.num_patches:
            raise DymuError(f"--image-tokens must be between 1 and {info.num_patches} (the patch count), got {args.image_tokens}")
        tokens = F.schedule_layer_tokens(info, args.image_tokens)
        return tokens, [after < before for before, after in zip([info.num_patches, *tokens], tokens)], "--image-tokens, constant schedule"
    thresholds = settings_from_config(args.model, args.thresholds)[0]
    if thresholds is None:
        return None, [], "unmerged"
    thresholds = as_thresholds(thresholds)
    origin = thresholds.path or "the checkpoint's thresholds"
    thresholds.check(info.identity(), origin=origin)
    if not thresholds.achieved_tokens:
        raise DymuError(f"{origin} holds no measured token count (dymu find-thresholds --measure): pass --image-tokens N")
    mean = thresholds.achieved_tokens["mean"]
    schedule = thresholds.schedule or "constant"
    merging = [math.isfinite(t) for t in thresholds.values[: info.merge_layers]]
    return F.schedule_layer_tokens(info, round(mean), schedule), merging, f"mean {mean:.1f} measured with {origin}, {schedule} schedule"


def _costs(decoder, plan, vision: int, new_tokens: int) -> dict:
    """dymu flops: one table row of the cache-aware counter."""
    from . import flops as F

    prefill = F.prefill_flops(decoder, plan)
    decode = sum(F.decode_step_flops(decoder, plan, step).flops for step in range(1, new_tokens + 1)) / new_tokens
    return {"vision": vision, "language": prefill.flops, "prefill": vision + prefill.flops, "decode": decode,
            "kv": sum(F.kv_cache_bytes(decoder, plan)), "counter": prefill.counter}


def _si(value: float, unit: str) -> str:
    """(1234567, "B") -> "1.23 MB"."""
    exponent = min(max(int(math.log10(value) // 3), 0), len(SI_PREFIXES) - 1) if value > 0 else 0
    return f"{value / 1000 ** exponent:.2f} {SI_PREFIXES[exponent]}{unit}"


def _print_flops_table(rows: dict) -> None:
    """dymu flops: label -> ``_costs`` row, ratios vs the "unmerged" row."""
    stock = rows["unmerged"]
    width = max(map(len, rows))
    print(f"counter: {stock['counter']} (x2 multiply-accumulates; causal attention counted as full products)")
    print((f"{'':<{width}}  " + "  ".join(f"{title:>{w}}" for title, w in zip(FLOPS_COLUMNS, FLOPS_WIDTHS))).rstrip())
    for label, row in rows.items():
        cells = [_si(row["vision"], "FLOPs"), _si(row["language"], "FLOPs")]
        for key, unit in (("prefill", "FLOPs"), ("decode", "FLOPs"), ("kv", "B")):
            cells += [_si(row[key], unit), f"{100 * row[key] / stock[key]:.1f}%"]
        print(f"{label:<{width}}  " + "  ".join(f"{cell:>{w}}" for cell, w in zip(cells, FLOPS_WIDTHS)))


def _flops_config(name: str):
    """dymu flops: the config of a checkpoint folder or hub id, or of a LLaVA / LLaVA-OneVision preset (``dymu
    make-model``'s names) when no folder of that name exists."""
    from .models import LLAVA_PRESETS, ONEVISION_PRESETS, llava_preset_config, load_config, onevision_preset_config

    if name in (*LLAVA_PRESETS, *ONEVISION_PRESETS) and not Path(name).exists():
        from .tokenizer import build_tokenizer

        if name in ONEVISION_PRESETS:
            return onevision_preset_config(name, build_tokenizer(video=True))
        return llava_preset_config(name, build_tokenizer())
    return load_config(name)[1]


def cmd_flops(args) -> None:
    from . import flops as F
    from .llava import cls_tokens
    from .methods import parse_prune
    from .models import settings_from_config
    from .vision import config_tower_info

    prune = parse_prune(args.prune)
    if args.prompt_tokens < 0 or args.new_tokens < 1:
        raise DymuError(f"--prompt-tokens must be >= 0 and --new-tokens >= 1, got {args.prompt_tokens} and {args.new_tokens}")
    config = _flops_config(args.model)
    onevision = config.model_type == "llava_onevision"
    if config.model_type not in ("llava", "llava_onevision"):
        raise DymuError(f"{args.model}: dymu flops needs a LLaVA-1.5 or LLaVA-OneVision config (model_type 'llava' or "
                        f"'llava_onevision'), got {config.model_type!r}")
    if args.image_size is not None and not onevision:
        raise DymuError("--image-size is for LLaVA-OneVision configs (LLaVA-1.5 reads every image at its tower's size)")
    info = config_tower_info(config)
    decoder = F.Decoder.from_config(config)
    vtu = settings_from_config(args.model, None, args.vtu)[1]
    layer_tokens, merging, origin = _planned_images(args, info)
    cls = cls_tokens(config, info)
    tokens = (info.num_patches if layer_tokens is None else layer_tokens[-1]) + cls  # per image (OneVision: per crop)
    label = f"plan (vtu={vtu}{f', {args.prune}' if prune else ''})"
    if onevision:
        from . import onevision_flops as OF

        image = OF.anyres_image(config, *OF.parse_image_size(args.image_size))
        count = OF.config_prefill(config, image, args.prompt_tokens, layer_tokens, merging, vtu, prune)
        lines = [OF.describe(image), f"{tokens} visual tokens per crop ({origin}): {count.prompt.image_tokens} unique "
                 f"image tokens in the language model{' (estimated)' if count.estimated else ''}"]
    else:
        count = F.config_prefill(config, args.prompt_tokens, layer_tokens, merging, vtu, prune)
        lines = [f"one image, {tokens} visual tokens ({origin})"]
    stock, prompt, estimated = count.stock, count.prompt, count.estimated
    rows = {"unmerged": _costs(decoder, count.stock_plan, count.stock_vision, args.new_tokens),
            label: _costs(decoder, count.plan, count.vision, args.new_tokens)}
    print(f"model: {args.model}: {decoder.layers}-layer decoder (hidden {decoder.hidden}, {decoder.heads} heads, "
          f"{decoder.kv_heads} kv heads, mlp {decoder.intermediate}), {info.num_patches}-patch vision tower")
    lines[-1] += f", {args.prompt_tokens} text tokens; decode: mean of steps 1-{args.new_tokens}; KV cache after the prefill"
    print("\n".join(lines))
    _print_flops_table(rows)
    if estimated:
        print(f"estimated: the plan's language-model figures rest on {prompt.image_tokens} unique image tokens, {tokens} "
              f"of {image.patches} per crop applied to the layout's positions (which merge groups the unpadded"
              f"{' and down-scaled' if image.blends else ''} grid keeps depends on the image); its vision figure is exact "
              f"for crops that merge to {tokens}; `dymu generate` prints an image's exact prefill FLOPs")
    if prune is not None:
        formula = F.fastv_formula(decoder, args.prompt_tokens + prompt.image_tokens, prompt.image_tokens, prune)
        base = F.fastv_formula(decoder, args.prompt_tokens + stock.image_positions, stock.image_positions)
        print(f"{formula.counter} (FastV Eq. 5, language-model prefill, per-layer average; no VTU, GQA or vision): "
              f"{_si(formula.flops, 'FLOPs')} vs {_si(base.flops, 'FLOPs')} unmerged ({100 * formula.flops / base.flops:.1f}%)")


def cmd_enable(args) -> None:
    from .models import enable

    path, notes = enable(args.checkpoint, args.thresholds, vtu=args.vtu)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote the \"dymu\" section of {path}: dymu.from_pretrained and every dymu command now apply these thresholds")


def cmd_disable(args) -> None:
    from .models import disable

    path, notes = disable(args.checkpoint)
    if notes is None:
        print(f"{path} has no \"dymu\" section: nothing to remove")
        return
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"removed the \"dymu\" section of {path}: the checkpoint loads unmerged again")


def cmd_convert_llava(args) -> None:
    from .convert import convert_llava

    out = convert_llava(args.src, args.dst, vision_tower=args.vision_tower, overwrite=args.overwrite)
    print(f"wrote transformers LLaVA checkpoint to {out}")


def cmd_convert_onevision(args) -> None:
    from .convert_onevision import convert_onevision

    out = convert_onevision(args.src, args.dst, vision_tower=args.vision_tower, overwrite=args.overwrite)
    print(f"wrote transformers LLaVA-OneVision checkpoint to {out}")


#: a file the demo leaves in its output folder: a rerun replaces the demo's own files, never someone else's
DEMO_MARKER = ".dymu-demo"
#: what a demo folder holds (the toy demo and --clip); a folder of these names with merge maps in it is an earlier
#: demo's output even without the marker (dymu before the marker wrote none)
DEMO_ENTRIES = {DEMO_MARKER, "merge_maps", "overview.png", "thresholds", "thresholds.json", "tokens_per_image.png"}


def _is_demo_folder(out: Path) -> bool:
    names = {entry.name for entry in out.iterdir()}
    return (out / DEMO_MARKER).is_file() or ("merge_maps" in names and names <= DEMO_ENTRIES)


def _demo_folder(path: str, overwrite: bool) -> Path:
    """The demo's output folder: new, empty, or one the demo wrote before (its marker file, or only its own entries
    with merge maps among them); any other folder only with --overwrite."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise DymuError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not _is_demo_folder(out) and not overwrite:
        raise DymuError(f"--out {out} holds files the demo did not write: pass --overwrite to write its results there "
                        "anyway, or choose another folder")
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).write_text("written by dymu demo; a rerun replaces the demo's files here\n")
    return out


def cmd_demo(args) -> None:
    from .demo import run_clip_demo, run_demo

    _demo_folder(args.out, args.overwrite)
    if args.clip:
        run_clip_demo(out_dir=Path(args.out), layers=args.layers, target_tokens=args.target_tokens)
    else:
        run_demo(out_dir=Path(args.out), model_dir=args.model)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="dymu", description="Dynamic visual-token merging (DyMU) for Hugging Face VLMs.")
    parser.add_argument("--version", action="version", version=f"dymu {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    from .demo import DEMO_LAYERS, DEMO_TARGET_TOKENS
    from .methods import PRUNE_SYNTAX as PRUNE_HELP
    from .models import ALL_PRESETS

    p = sub.add_parser("make-model", help="write a random-weight checkpoint of a real architecture")
    p.add_argument("preset", choices=ALL_PRESETS, help="architecture to build: %(choices)s")
    p.add_argument("out_dir", help="checkpoint folder to write (config, weights, processor)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights (default: %(default)s)")
    p.add_argument("--layers", type=int, help="encoder layers (vision presets) or language-model layers (LLaVA presets) (default: the real architecture's depth)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="weight dtype (llava-1.5-7b at full depth needs bfloat16 on 24 GiB) (default: float32)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR that holds a model checkpoint "
                   "(a config.json; not the current folder): the new one is built beside it and swapped in once complete")
    p.set_defaults(func=cmd_make_model)

    p = sub.add_parser("find-thresholds", help="learn per-layer merge thresholds from a set of images")
    _add_model(p)
    _add_images(p)
    p.add_argument("--target-tokens", type=int, required=True, help="mean visual tokens wanted out of the last merging layer (CLS not counted)")
    p.add_argument("--schedule", choices=SCHEDULES, default="constant",
                   help="how the tokens to remove are spread over the merging layers: %(choices)s (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32,
                   help="images per calibration batch; each batch yields one statistic per layer (default: %(default)s)")
    p.add_argument("--out", required=True, help="thresholds file to write (JSON)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from OUT.partial (made with the same "
                   "model, images and settings, else refused)")
    p.add_argument("--restart", action="store_true", help="discard an interrupted run's OUT.partial and start over (without "
                   "--resume or --restart an existing OUT.partial is refused)")
    _add_overwrite(p)
    p.add_argument("--measure", type=int, default=256, help="encode this many images with the result to report mean±std tokens, 0 to skip (default: %(default)s)")
    _add_workers(p)
    p.set_defaults(func=cmd_find_thresholds)

    p = sub.add_parser("encode", help="encode images with merging: tokens per image, merge maps")
    _add_model(p)
    _add_images(p)
    p.add_argument("--thresholds", help="thresholds file (default: the checkpoint's \"dymu\" config section)")
    _add_merge(p)
    p.add_argument("--json", action="store_true", help="print one JSON line per image: image, tokens, patches")
    p.add_argument("--viz", metavar="DIR", help="write a merge-map PNG per image and overview.png here (default: none)")
    p.add_argument("--out", metavar="FILE", help="write the JSON lines to FILE as each batch is done, with a line "
                   "{\"image\", \"error\"} for an unreadable image, instead of printing (default: none)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted --out FILE: images it has a line for are "
                   "not encoded again, a line cut short by the kill is dropped (refused when FILE was made with another "
                   "model, merging or image list)")
    _add_overwrite(p, "an existing --out file and --viz pictures")
    p.add_argument("--batch-size", type=int, default=8, help="images encoded together (default: %(default)s)")
    _add_workers(p)
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("generate", help="answer a prompt about images with DyMU (and optionally the unmerged model)")
    p.add_argument("model", help="local LLaVA checkpoint folder or hub id")
    p.add_argument("--image", action="append", required=True, help="an image file (repeat for several images)")
    p.add_argument("--prompt", required=True, help="the question; <image> placeholders optional (added by the chat template)")
    p.add_argument("--thresholds", help="thresholds file (default: the checkpoint's \"dymu\" config section)")
    _add_merge(p)
    p.add_argument("--vtu", choices=["fast", "exact", "none"], help="virtual token unmerging mode (default: fast)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=32,
                   help="longest answer, in tokens, at least 1 and within the model's context (default: %(default)s)")
    p.add_argument("--prune", metavar="SPEC", help=f"prune image tokens in the language model: {PRUNE_HELP}; k must be below the "
                   "language model's depth; fastv:k=0 ranks at random (no attention exists before layer 0) (default: none)")
    p.add_argument("--compare", action="store_true", help="also run the unmerged model and print both answers")
    p.add_argument("--rate-plot", metavar="PNG", help="with --prune dyrate:FILE, write the rate chosen at each step as a "
                   "PNG (default: none)")
    p.add_argument("--show-plan", action="store_true",
                   help="print the language model's token plan of the prefill: per layer and row, positions per segment, "
                        "KV-cache length, VTU unique tokens, layers whose attention a policy read")
    _add_limits(p)
    p.set_defaults(func=cmd_generate)

    from .dyrate import PREDICTORS
    from .dyrate_train import DEFAULT_BATCH_SIZE, DEFAULT_EPOCHS, DEFAULT_LR, DEFAULT_SAVE_EVERY

    p = sub.add_parser("train-dyrate", help="train a DyRate predictor (the VLM frozen): the fraction of image tokens "
                       "pruned at every generation step, for --prune dyrate:FILE")
    p.add_argument("model", help="local LLaVA checkpoint folder or hub id")
    p.add_argument("data", help="JSON lines of {\"image\", \"prompt\", \"answer\"} (images relative to the file), or a "
                   "folder in the toy benchmark layout (python -m toyvlm.data)")
    p.add_argument("--out", required=True, help="predictor file to write (JSON); OUT.state holds the training state while it runs")
    _add_overwrite(p)
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from OUT.state (same model, data "
                   "and settings, else refused)")
    p.add_argument("--penalty", type=float, default=0.5, help="weight of the mean kept fraction of image tokens in the "
                   "loss: larger prunes more (default: %(default)s)")
    p.add_argument("--rates", type=int, default=4, help="K: the rates are 0, 1/K, ..., (K-1)/K (default: %(default)s)")
    p.add_argument("--predictor", choices=PREDICTORS, default="linear",
                   help="linear / mlp on the step's attention shares, recurrent over the last --history steps (default: %(default)s)")
    p.add_argument("--layer", type=int, help=f"pruning layer K (default: {DYRATE_LAYER}, or the last layer of a shallower model)")
    p.add_argument("--history", type=int, default=8, help="recurrent: steps it reads (default: %(default)s)")
    p.add_argument("--hidden", type=int, default=32, help="mlp / recurrent width (default: %(default)s)")
    p.add_argument("--epochs", type=_positive_int, default=DEFAULT_EPOCHS, help="passes over DATA (default: %(default)s)")
    p.add_argument("--batch-size", type=_positive_int, default=DEFAULT_BATCH_SIZE, help="records per step (default: %(default)s)")
    p.add_argument("--lr", type=float, default=DEFAULT_LR, help="AdamW learning rate (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="initialisation, data order and Gumbel noise (default: %(default)s)")
    p.add_argument("--limit", type=_positive_int, help="use the first N records of DATA (default: all)")
    p.add_argument("--save-every", type=_positive_int, default=DEFAULT_SAVE_EVERY,
                   help="steps between writes of the training state (default: %(default)s)")
    p.set_defaults(func=cmd_train_dyrate)

    from .calibrate import DEFAULT_FIRST_LAYER, DEFAULT_KL_THRESHOLD, DEFAULT_PROMPT, DEFAULT_SAMPLES

    p = sub.add_parser("calibrate-vtw", help="choose VTW's withdrawal layer K by its KL criterion on a few images")
    p.add_argument("model", help="local LLaVA checkpoint folder or hub id")
    _add_images(p)
    p.add_argument("--out", required=True, help="calibration result to write (JSON)")
    _add_overwrite(p)
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="question asked about every image (default: %(default)r)")
    p.add_argument("--limit", type=int, default=DEFAULT_SAMPLES, help="images used, the first N (default: %(default)s)")
    p.add_argument("--kl", type=float, default=DEFAULT_KL_THRESHOLD,
                   help="KL threshold: K is the first layer at or below it (default: %(default)s, VTW's LLaVA-1.5-7B value)")
    p.add_argument("--first-layer", type=int, default=None,
                   help=f"first candidate layer, 1..layers-1 (default: {DEFAULT_FIRST_LAYER} as VTW; 1 for models with "
                        f"at most {DEFAULT_FIRST_LAYER} layers)")
    p.add_argument("--thresholds", help="calibrate the merged model: DToMe thresholds (default: the checkpoint's \"dymu\" section, else none)")
    _add_merge(p)
    p.add_argument("--vtu", choices=["fast", "exact", "none"], help="VTU mode of the merged model (default: fast)")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward (default: %(default)s)")
    p.set_defaults(func=cmd_calibrate_vtw)

    from .onevision_flops import DEFAULT_IMAGE_SIZE

    p = sub.add_parser("flops", help="FLOPs and KV cache of a LLaVA / LLaVA-OneVision plan (merging, VTU, pruning) vs "
                       "unmerged, from the config alone")
    p.add_argument("model", help="local LLaVA or LLaVA-OneVision checkpoint folder, hub id (only its config is read), or a "
                   "preset name: llava-1.5-7b, tiny-llava, llava-onevision-qwen2-7b, tiny-llava-onevision")
    p.add_argument("--thresholds", help="thresholds file whose measured mean tokens per image (OneVision: per AnyRes crop) "
                   "to count (default: the checkpoint's \"dymu\" config section, else unmerged)")
    p.add_argument("--image-tokens", type=int, metavar="N", help="visual tokens per image (OneVision: per AnyRes crop) "
                   "instead, merged on a constant schedule (default: none)")
    p.add_argument("--image-size", metavar="WxH", help="LLaVA-OneVision: the image's width x height in pixels, which sets "
                   "its crops and layout (default: %dx%d)" % DEFAULT_IMAGE_SIZE)
    p.add_argument("--vtu", choices=["fast", "exact", "none"], help="virtual token unmerging mode (default: the checkpoint's, else fast)")
    p.add_argument("--prune", metavar="SPEC", help=f"prune image tokens in the language model: {PRUNE_HELP}; k must be below the "
                   "language model's depth; fastv:k=0 ranks at random (no attention exists before layer 0) (default: none)")
    p.add_argument("--prompt-tokens", type=int, default=DEFAULT_PROMPT_TOKENS, metavar="T",
                   help="text tokens of the prompt besides the image (default: %(default)s)")
    p.add_argument("--new-tokens", type=int, default=DEFAULT_NEW_TOKENS, metavar="G",
                   help="decode steps the per-step decode FLOPs are averaged over (default: %(default)s)")
    p.set_defaults(func=cmd_flops)

    p = sub.add_parser("enable", help="store thresholds in a checkpoint's config.json so loading applies DyMU (a copy "
                       "saved with save_pretrained keeps them)")
    p.add_argument("checkpoint", help="local checkpoint folder whose config.json gets the \"dymu\" section (a config.json "
                   "that is a link is replaced by a file; the link's target is not written)")
    p.add_argument("--thresholds", required=True, help="thresholds file to copy into the checkpoint")
    p.add_argument("--vtu", default="fast", choices=["fast", "exact", "none"],
                   help="virtual token unmerging mode stored with them: %(choices)s (default: %(default)s)")
    p.set_defaults(func=cmd_enable)

    p = sub.add_parser("disable", help="remove the thresholds `dymu enable` stored in a checkpoint's config.json")
    p.add_argument("checkpoint", help="local checkpoint folder whose config.json loses its \"dymu\" section")
    p.set_defaults(func=cmd_disable)

    p = sub.add_parser("convert-llava", help="convert an original LLaVA checkpoint (liuhaotian layout) to transformers format")
    p.add_argument("src", help="original LLaVA checkpoint folder (liuhaotian layout)")
    p.add_argument("dst", help="folder to write the transformers checkpoint to")
    p.add_argument("--vision-tower", help="local CLIP checkpoint folder (default: the source's mm_vision_tower)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace DST when it is a model folder (built beside it, swapped in once complete)")
    p.set_defaults(func=cmd_convert_llava)

    p = sub.add_parser("convert-onevision", help="convert an original LLaVA-OneVision checkpoint (lmms-lab layout) to "
                       "transformers format")
    p.add_argument("src", help="original LLaVA-OneVision checkpoint folder (lmms-lab layout, with its Qwen2 tokenizer)")
    p.add_argument("dst", help="folder to write the transformers checkpoint to")
    p.add_argument("--vision-tower", help="local SigLIP checkpoint folder: the tower when the checkpoint holds none, "
                   "its geometry otherwise (default: the source's mm_vision_tower)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace DST when it is a model folder (built beside it, swapped in once complete)")
    p.set_defaults(func=cmd_convert_onevision)

    p = sub.add_parser("import-thresholds", help="convert a DyMU reference threshold checkpoint to a dymu thresholds file")
    p.add_argument("checkpoint", help="reference threshold checkpoint (.pt, torch.save of a state dict)")
    p.add_argument("--out", required=True, help="thresholds file to write (JSON)")
    _add_overwrite(p)
    p.add_argument("--num-layers", type=int, help="keep only the first N layers (LLaVA-OneVision towers drop the last SigLIP layer) (default: all)")
    p.set_defaults(func=cmd_import_thresholds)

    p = sub.add_parser("demo", help="offline demo: the trained toy LLaVA answering with and without DToMe (--clip: "
                                    "encoder-only demo on a random-weight CLIP-L/14-336 and scikit-image's photos)")
    p.add_argument("--out", default="dymu-demo", help="output folder (default: ./%(default)s): new, empty or the demo's "
                   "own from an earlier run")
    p.add_argument("--overwrite", action="store_true", help="write into an --out folder that holds other files")
    p.add_argument("--model", default=None, help="toy checkpoint folder (default: $DYMU_TOY_MODEL or assets/toy-llava)")
    p.add_argument("--clip", action="store_true", help="run the encoder-only CLIP-L/14-336 demo instead")
    p.add_argument("--layers", type=int, default=DEMO_LAYERS, help="--clip: encoder depth (default: %(default)s)")
    p.add_argument("--target-tokens", type=int, default=DEMO_TARGET_TOKENS,
                   help="--clip: mean tokens to find thresholds for (default: %(default)s)")
    p.set_defaults(func=cmd_demo)

    from .evaluation.cli import add_commands as add_evaluation_commands

    add_evaluation_commands(sub)  # eval, report
    return parser


def _silence_stdout() -> None:
    """Point stdout at devnull so the final flush at exit does not raise again (Python's SIGPIPE recipe)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except (DymuError, ValueError, OSError) as exc:
        if os.environ.get("DYMU_DEBUG"):
            raise
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"dymu {args.command}: error: {message} (DYMU_DEBUG=1 shows the traceback)"
              if not isinstance(exc, DymuError) else f"dymu {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # a command may say what was saved and how to continue
        print(f"dymu {args.command}: {exc or 'interrupted'}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
