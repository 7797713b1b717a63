"""Threshold finding (DyMU §3.1): learn one similarity threshold per layer from a set of images.

Each batch of B images runs the encoder with a fixed merge budget per layer: the r_i * B best edges of
the whole batch merge (so simple images absorb more of the budget than busy ones). The batch statistic
of layer i is the score of the best edge that did not merge; the threshold is the mean of that statistic
over all batches. Statistics are stored per batch in fp64 and summed in batch order, so a resumed run and
a multi-process run give the same thresholds as one uninterrupted process on the same batches.

Batches are fixed by position in the image list (batch k = images[k*B:(k+1)*B]); an image that fails to
decode is dropped from its batch and reported, it never shifts other batches. Images are decoded in worker
processes (``num_workers``, see ``dymu.loader``) that deliver the same batches in the same order, so the
thresholds do not depend on the number of workers.

The checkpoint is a JSON-lines file (``dymu.journal``): a header with the run's configuration (the encoder's
geometry and fingerprint, the image list's fingerprint, the search settings), then one line per finished batch
(its index, statistics and unreadable images), so saving progress costs one short write per batch however long
the run. Resuming with another model, image list or setting is refused, naming what differs.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import warnings
from pathlib import Path
from typing import Callable

import torch

from . import merge as M
from .api import run_encoder, _check_pixels
from .files import Lock, fingerprint_mismatch, list_fingerprint, model_fingerprint
from .images import (DEFAULT_MAX_ASPECT_RATIO, DEFAULT_MAX_PIXELS, ImageLimits, ImageSet, SkippedImagesWarning,
                     collect_images, summarize_failures)
from .journal import Appender, read_journal, remove
from .loader import ImageBatches, LoadClock, load_batches, on_gpu
from .thresholds import Thresholds
from .vision import DymuError, get_patch, patch_tower, tower_info, unpatch_tower

CHECKPOINT_FORMAT = "dymu-threshold-search"
CHECKPOINT_VERSION = 3
DEFAULT_MEASURE_IMAGES = 256


def _distributed():
    """(rank, world_size), initialising torch.distributed when launched by torchrun."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def checkpoint_file(checkpoint, rank: int | None = None, world: int | None = None) -> Path:
    """The file this process keeps its progress in: ``checkpoint``, or one per rank under torchrun
    (``NAME.rank{r}-of-{w}``; rank and world size from torchrun's environment when not given)."""
    path = Path(checkpoint)
    if world is None:
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    return path.with_name(f"{path.name}.rank{rank}-of-{world}") if world > 1 else path


def _image_items(images) -> tuple[list, list[dict]]:
    """Image files, folders and JSON manifests expanded as the CLI does (a path or a list), PIL images kept.
    Returns (items, manifest entries that named no image)."""
    from PIL import Image

    if isinstance(images, ImageSet):  # listed already (the CLI): not listed again
        return list(images.paths), list(images.skipped)
    if isinstance(images, (str, os.PathLike)):
        images = [images]
    items, skipped = [], []
    for item in images:
        if isinstance(item, Image.Image):
            items.append(item)
        elif isinstance(item, (str, os.PathLike)):
            found = collect_images(item)
            items += found.paths
            skipped += found.skipped
        else:
            raise DymuError(f"images must be paths, folders, manifests or PIL images (or one pixel tensor), got {type(item).__name__}")
    return items, skipped


def _default_processor(model):
    """The image processor saved with the model's checkpoint, else the standard one of its family (with a warning)."""
    from .models import image_processor_for

    processor, notice = image_processor_for(model, getattr(getattr(model, "config", None), "_name_or_path", ""))
    if notice:
        warnings.warn(f"dymu.find_thresholds: {notice} (pass processor=... to use another)", stacklevel=3)
    return processor


def _merge_budgets(info, target_tokens: int, schedule: str) -> list[int] | None:
    """Budgets of the merging layers for ``target_tokens``, None when a layer would merge more than it can."""
    rs = M.merge_schedule(info.merge_layers, info.num_patches - target_tokens, schedule)
    try:
        M.check_schedule(rs, info.num_tokens, info.protected)
    except ValueError:
        return None
    return rs


def reachable_targets(info, schedule: str) -> list[int]:
    """Every token count the schedule can reach on this tower (not an interval: linear schedules have gaps)."""
    return [t for t in range(1, info.num_patches + 1) if _merge_budgets(info, t, schedule) is not None]


def _unreachable(info, target_tokens: int, schedule: str) -> str:
    reachable = reachable_targets(info, schedule)  # never empty: num_patches needs no merge
    text = (f"target {target_tokens} tokens is out of reach of the {schedule} schedule over {info.merge_layers} merging "
            f"layers (a layer merges at most half its tokens): the smallest reachable target is {reachable[0]}")
    if reachable[0] < target_tokens:
        text += f", the nearest above {target_tokens} is {next(t for t in reachable if t > target_tokens)}"
    return text


def budgets_for(info, target_tokens: int, schedule: str) -> list[int]:
    """Per-layer merge budget (tokens removed per image), zeros after the read layer."""
    if not isinstance(target_tokens, int) or not 1 <= target_tokens <= info.num_patches:
        raise DymuError(f"--target-tokens must be between 1 and {info.num_patches} (the patch count), got {target_tokens}")
    rs = _merge_budgets(info, target_tokens, schedule)
    if rs is None:
        raise DymuError(_unreachable(info, target_tokens, schedule))
    return rs + [0] * (info.num_layers - info.merge_layers)


class _Checkpoint:
    """Append-only JSON-lines checkpoint of a threshold search (one file per rank): a header line
    {"format", "version", "config"}, then {"batch": k, "statistics": [...] | null, "skipped": [...]} per batch."""

    def __init__(self, path: Path | None, config: dict):
        self.path = path
        self.config = config
        self._out: Appender | None = None

    def load(self) -> tuple[dict, list] | None:
        """(statistics by batch index, skipped images) of the batches done, None when there is nothing to resume.
        A file that is not a checkpoint of this run is refused unchanged."""
        if self.path is None or not self.path.is_file():
            return None
        header, rows = read_journal(self.path, "cannot resume: checkpoint", self._check_header)
        statistics, skipped = {}, []
        for number, row in enumerate(rows, start=2):
            problem = self._batch_problem(row)
            if problem is not None:
                raise DymuError(f"cannot resume: checkpoint {self.path} line {number} is not a batch record ({problem}); "
                                "delete it to start over")
            statistics[str(row["batch"])] = row.get("statistics")
            skipped += row["skipped"]
        return statistics, skipped

    def _check_header(self, header: dict) -> None:
        """Refuse a header of another format or version, or of another run: one line naming what differs."""
        if header.get("format") != CHECKPOINT_FORMAT or header.get("version") != CHECKPOINT_VERSION:
            raise DymuError(f"cannot resume: {self.path} is not a dymu threshold-search checkpoint of version "
                            f"{CHECKPOINT_VERSION}; it was left unchanged")
        stored = header.get("config") if isinstance(header.get("config"), dict) else {}
        for key, value in self.config.items():
            if stored.get(key) == value:
                continue
            if key == "fingerprint":
                what = fingerprint_mismatch(stored.get(key), value)
            elif key == "images":
                what = f"the image list differs ({self.config['num_images']} images now, {stored.get('num_images')} then)"
            else:
                what = f"it was made with {key}={stored.get(key)!r}, this run has {key}={value!r}"
            raise DymuError(f"cannot resume from {self.path}: {what}")
    def _batch_problem(self, row: dict) -> str | None:
        """What is wrong with a batch line of this checkpoint, None when nothing is."""
        layers = self.config["identity"]["num_layers"]
        statistics = row.get("statistics")
        if not isinstance(row.get("batch"), int) or isinstance(row.get("batch"), bool):
            return "\"batch\" must be a whole number"
        if statistics is not None and not (isinstance(statistics, list) and len(statistics) == layers and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in statistics)):
            return f"\"statistics\" must be null or a list of {layers} numbers"
        if not isinstance(row.get("skipped"), list) or not all(
                isinstance(s, dict) and isinstance(s.get("image"), str) and isinstance(s.get("error"), str) for s in row["skipped"]):
            return "\"skipped\" must be a list of {\"image\", \"error\"} objects"
        return None

    def open(self, fresh: bool) -> None:
        """Start writing: a new file with its header (fresh), else appending to the loaded one."""
        if self.path is None:
            return
        header = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "config": self.config} if fresh else None
        self._out = Appender(self.path, header)

    def save(self, index: int, statistics: list[float] | None, skipped: list[dict]) -> None:
        if self._out is not None:
            self._out.write({"batch": index, "statistics": statistics, "skipped": skipped})

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None

    def delete(self) -> None:
        self.close()
        remove(self.path)

    @contextlib.contextmanager
    def locked(self, resume: bool):
        """Hold the checkpoint's lock for the run; an existing checkpoint is continued (resume) or refused, never
        replaced."""
        if self.path is None:
            yield self
            return
        with Lock(self.path, f"checkpoint {self.path}"):
            if self.path.exists() and not resume:
                raise DymuError(f"checkpoint {self.path} holds an interrupted run: resume it (resume=True, --resume) "
                                "or delete it (--restart) to start over")
            yield self


def calibration_statistics(model, pixel_values: torch.Tensor, budgets: list[int]) -> dict[int, float]:
    """One batch in budget mode: {layer: statistic} for the layers whose budget is positive."""
    patch = get_patch(model)
    with patch.state.using(mode="budget", budgets=budgets) as state:
        run_encoder(patch, pixel_values)
        return dict(state.statistics)


def find_thresholds(
    model,
    images,
    target_tokens: int,
    schedule: str = "constant",
    batch_size: int = 32,
    processor=None,
    checkpoint=None,
    resume: bool = False,
    progress: bool = True,
    measure: int = DEFAULT_MEASURE_IMAGES,
    on_batch: Callable[[int], None] | None = None,
    num_workers: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO,
) -> Thresholds:
    """Learn per-layer thresholds so that the images merge to about ``target_tokens`` tokens on average.

    model: a CLIP/SigLIP vision model or a LLaVA-style VLM (its tower is used, up to its read layer).
    images: image files, folders (searched recursively) and JSON manifests as the CLI takes them (one path or a
    list, or a ``dymu.images.ImageSet`` listed already), PIL images, or a pixel tensor (N, 3, H, W). Images that
    cannot be used are skipped, recorded in ``images["skipped"]`` and reported with a ``SkippedImagesWarning``.
    target_tokens: tokens out of the last merging layer, CLS not counted (the reference's "Xout").
    schedule: constant | linear | reverse-linear. checkpoint: a file to save progress to after every batch, locked
    while the run goes on and removed when it ends; resume=True continues from it (refused, naming what differs,
    when it was made with another model, image list or setting); an existing one without resume=True is refused,
    never replaced. measure: encode up to this many images with the result to record the
    achieved token count (0 = skip). on_batch(k) is called after batch k is done (tests use it to interrupt).
    num_workers: processes decoding images while the model runs (None: ``dymu.loader.default_workers()``, 0: in
    this process); the thresholds are the same whatever the number. The result's ``timing`` (a
    ``dymu.loader.LoadClock``, not saved) tells how long the search waited for data and ran the model.
    max_pixels, max_aspect_ratio: images beyond these (``dymu.images.ImageLimits``, checked from the file's header
    before decoding) are skipped like unreadable ones, so that one huge or extreme image cannot exhaust memory.
    """
    info = tower_info(model)
    if batch_size < 1:
        raise DymuError(f"--batch-size must be >= 1, got {batch_size}")
    limits = ImageLimits(max_pixels, max_aspect_ratio)
    budgets = budgets_for(info, target_tokens, schedule)
    is_tensor = isinstance(images, torch.Tensor)
    unlisted: list[dict] = []  # manifest entries that named no image
    if is_tensor:
        pixels = _check_pixels(images, info)
        names = [f"<tensor {i}>" for i in range(len(images))]
    else:
        images, unlisted = _image_items(images)
        names = [im if isinstance(im, str) else f"<image {i}>" for i, im in enumerate(images)]
        if processor is None:
            processor = _default_processor(model)
    if not names:
        raise DymuError("no images to find thresholds on")
    rank, world = _distributed()
    num_batches = math.ceil(len(names) / batch_size)
    config = {"identity": info.identity() | {"name_or_path": ""}, "fingerprint": model_fingerprint(info.tower),
              "target_tokens": target_tokens, "schedule": schedule, "batch_size": batch_size, "images": list_fingerprint(names),
              "num_images": len(names), "world_size": world, "rank": rank,
              "max_pixels": limits.max_pixels, "max_aspect_ratio": limits.max_aspect_ratio}  # limits decide what is skipped
    ckpt = _Checkpoint(None if checkpoint is None else checkpoint_file(checkpoint, rank, world), config)
    with ckpt.locked(resume):
        done = ckpt.load() if resume else None
        dataset = ImageBatches(pixels if is_tensor else images, batch_size, processor, names=names, limits=limits)
        mine = [k for k in range(num_batches) if k % world == rank]
        statistics, skipped, clock = _search(model, info, dataset, mine, budgets, ckpt, done, num_workers,
                                             progress and rank == 0, on_batch)
        if world > 1:
            statistics, skipped = _gather(statistics, skipped, world)
        skipped = unlisted + skipped
        rows = [statistics[str(k)] for k in range(num_batches) if statistics.get(str(k)) is not None]
        if not rows:
            ckpt.delete()  # it holds nothing but the failures, which a rerun meets again
            raise DymuError(f"no readable images: every image failed ({summarize_failures(skipped)})")
        if skipped:
            warnings.warn(f"dymu.find_thresholds: skipped {len(skipped)} image(s): {summarize_failures(skipped)}",
                          SkippedImagesWarning, stacklevel=2)
        failed = {s["image"] for s in skipped}
        result = Thresholds(
            values=_mean_statistics(rows, budgets),
            model=info.identity() | {"fingerprint": config["fingerprint"]},
            schedule=schedule,
            target_tokens=target_tokens,
            budgets=budgets,
            batch_size=batch_size,
            images={"count": len(names) - len(failed), "batches": len(rows), "used": [n for n in names if n not in failed],
                    "skipped": skipped, "fingerprint": config["images"]},
            source="dymu find-thresholds",
        )
        result.timing = clock
        if measure and rank == 0:
            subset = pixels[:measure] if is_tensor else list(itertools.islice((im for im, n in zip(images, names) if n not in failed), measure))
            result.achieved_tokens = measure_tokens(model, subset, result, processor=processor, batch_size=batch_size,
                                                    progress=progress, num_workers=num_workers, max_pixels=max_pixels,
                                                    max_aspect_ratio=max_aspect_ratio)
        ckpt.delete()
        return result


def _search(model, info, dataset: ImageBatches, mine: list[int], budgets: list[int], ckpt: _Checkpoint, done,
            num_workers, progress: bool, on_batch) -> tuple[dict, list, LoadClock]:
    """Run this process's batches ``mine`` not yet ``done`` (the checkpoint's (statistics, skipped), or None),
    saving each to the checkpoint. Returns (statistics by batch index, unreadable images, the clock)."""
    from tqdm.auto import tqdm

    statistics, skipped = done if done is not None else ({}, [])  # index -> per-layer statistics (None: no readable image)
    todo = [k for k in mine if str(k) not in statistics]
    clock = LoadClock()
    owned = get_patch(model) is None
    if owned:
        patch_tower(model, [math.inf] * info.num_layers)
    ckpt.open(fresh=done is None)
    bar = tqdm(total=sum(map(dataset.size, mine)), initial=sum(dataset.size(k) for k in mine if str(k) in statistics),
               desc="finding thresholds", unit="img", disable=not progress)
    try:
        batches = load_batches(dataset, todo, num_workers, pin_memory=on_gpu(info.tower))
        for batch in clock.batches(batches):
            skipped += batch.failures
            row = None
            if batch.pixel_values is not None:
                with clock.model():
                    stats = calibration_statistics(model, _check_pixels(batch.pixel_values, info), budgets)
                row = [stats.get(layer, math.nan) for layer in range(info.num_layers)]
            statistics[str(batch.index)] = row
            ckpt.save(batch.index, row, batch.failures)
            bar.update(batch.size)
            if on_batch is not None:
                on_batch(batch.index)
    finally:
        bar.close()  # also when interrupted: a message printed next starts on a line of its own
        ckpt.close()
        if owned:
            unpatch_tower(model)
    return statistics, skipped, clock


def _mean_statistics(rows: list[list[float]], budgets: list[int]) -> list[float]:
    """The thresholds: each merging layer's statistic averaged over the batches (summed in batch order, fp64;
    NaN, a layer a batch did not reach, counts as 0), inf for the layers that do not merge."""
    table = torch.tensor(rows, dtype=torch.float64)  # (batches, layers)
    sums = torch.zeros(table.shape[1], dtype=torch.float64)
    for row in table:
        sums += torch.nan_to_num(row, nan=0.0)
    return [float(sums[i] / len(rows)) if budgets[i] > 0 else math.inf for i in range(len(budgets))]



def _gather(statistics: dict, skipped: list, world: int):
    import torch.distributed as dist

    parts = [None] * world
    dist.all_gather_object(parts, (statistics, skipped))
    merged_stats, merged_skipped = {}, []
    for stats, bad in parts:
        merged_stats.update(stats)
        merged_skipped += bad
    return merged_stats, merged_skipped


def measure_tokens(model, images, thresholds: Thresholds, processor=None, batch_size: int = 32, progress: bool = False,
                   num_workers: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                   max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO) -> dict:
    """Encode images (a list of files / PIL images, or a pixel tensor) with the thresholds; mean / std of the token
    counts (CLS not counted; images beyond max_pixels / max_aspect_ratio skipped). The model keeps its own merging
    settings."""
    from tqdm.auto import tqdm

    from .api import _temporarily_patched, encode

    info = tower_info(model)
    thresholds.check(info.identity())
    counts: list[int] = []
    dataset = ImageBatches(images, batch_size, processor, limits=ImageLimits(max_pixels, max_aspect_ratio))
    batches = load_batches(dataset, list(range(len(dataset))), num_workers, pin_memory=on_gpu(info.tower))
    bar = tqdm(LoadClock().batches(batches), total=len(dataset), desc="measuring tokens", unit="batch", disable=not progress)
    with _temporarily_patched(model) as patch, patch.state.using(thresholds.values), bar:  # the model's own settings come back
        for batch in bar:
            if batch.pixel_values is not None:
                counts += encode(model, batch.pixel_values).num_tokens
    if not counts:
        return {"mean": math.nan, "std": math.nan, "count": 0}
    values = torch.tensor(counts, dtype=torch.float64)
    return {"mean": float(values.mean()), "std": float(values.std(unbiased=False)), "count": len(counts)}
