"""Image batches decoded and preprocessed in worker processes while the model runs.

Batch k is always ``items[k*B:(k+1)*B]`` (its unreadable images dropped and reported), whatever the number
of workers: a ``torch.utils.data.DataLoader`` over batch indices, auto-batching off, delivering batches in
index order. So a run with workers computes exactly what a run without them does, batch for batch.

Workers are forked from the main process (Linux's default start method: the image list and the processor are
not copied, only the batch index is sent) and run torch with ``WORKER_THREADS`` thread each (the DataLoader's
own default, set again here): decoding and resizing are per image, and more threads per worker would only
compete with the model's threads for the cores.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch

from .images import ImageLimits, load_batch, plural
from .vision import DymuError

#: most workers chosen by default: beyond this decoding outpaces any encoder we run, and each worker holds
#: PREFETCH_BATCHES decoded batches in memory
MAX_DEFAULT_WORKERS = 8
#: batches each worker decodes ahead of the model (the DataLoader's prefetch_factor)
PREFETCH_BATCHES = 2
#: torch threads in a worker process
WORKER_THREADS = 1


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. under taskset or a container's cpuset)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_workers() -> int:
    """Workers per process: the cores left after one for the model, shared among torchrun's local processes,
    at most MAX_DEFAULT_WORKERS; 0 (decode in the main process) when no core is left."""
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(0, min(MAX_DEFAULT_WORKERS, available_cores() // max(local_processes, 1) - 1))


@dataclass
class Batch:
    """Batch ``index`` of an image list, decoded and preprocessed."""

    index: int
    size: int  # images in the batch, readable or not
    pixel_values: torch.Tensor | None  # (b, 3, H, W), the b readable images in list order; None when b == 0
    names: list[str]  # the b readable images
    failures: list[dict] = field(default_factory=list)  # {"image": ..., "error": ...} of the unreadable ones
    error: BaseException | None = None  # raised in a worker: re-raised in the main process as it was
    crops: list[int] | None = None  # rows of pixel_values per readable image (AnyRes crops); None: one each

    def pin_memory(self) -> "Batch":
        """Called by the DataLoader's pinning thread (pin_memory=True): page-locked pixels copy to a GPU faster."""
        if self.pixel_values is not None:
            self.pixel_values = self.pixel_values.pin_memory()
        return self


class ImageBatches(torch.utils.data.Dataset):
    """Batches of B images: image files and PIL images decoded with ``processor``, or slices of a pixel tensor."""

    def __init__(self, items, batch_size: int, processor=None, names: list[str] | None = None,
                 limits: ImageLimits = ImageLimits()):
        self.items = items  # a list of paths / PIL images, or a (N, 3, H, W) tensor
        self.batch_size = batch_size
        self.processor = processor
        self.names = names
        self.limits = limits  # larger images are skipped as unreadable

    def __len__(self) -> int:
        return math.ceil(len(self.items) / self.batch_size)

    def size(self, index: int) -> int:
        return min(self.batch_size, len(self.items) - index * self.batch_size)

    def __getitem__(self, index: int) -> Batch:
        chunk = slice(index * self.batch_size, (index + 1) * self.batch_size)
        size = self.size(index)
        if isinstance(self.items, torch.Tensor):
            return Batch(index, size, self.items[chunk], list(self.names[chunk]) if self.names else [])
        try:
            pixel_values, names, failures, crops = load_batch(self.items[chunk], self.processor, self.limits, crops=True)
        except Exception as exc:  # noqa: BLE001 - a worker's traceback would hide the one-line message
            return Batch(index, size, None, [], error=exc)
        return Batch(index, size, pixel_values, names, failures, crops=crops)


def _one_batch(batch: Batch) -> Batch:
    return batch


def _init_worker(_worker_id: int) -> None:
    torch.set_num_threads(WORKER_THREADS)


class LoadClock:
    """Wall time spent waiting for data and running the model, and images done, for the run's summary."""

    def __init__(self):
        self.waiting = 0.0
        self.running = 0.0
        self.images = 0

    def batches(self, batches: Iterable[Batch]) -> Iterator[Batch]:
        """``batches``, timing each wait for the next one (worker start-up included)."""
        iterator = iter(batches)
        while True:
            start = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            finally:
                self.waiting += time.perf_counter() - start
            if batch.error is not None:
                raise batch.error
            self.images += batch.size
            yield batch

    @contextlib.contextmanager
    def model(self):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.running += time.perf_counter() - start

    def summary(self) -> str:
        total = self.waiting + self.running
        rate = self.images / total if total > 0 else math.nan
        share = (lambda t: 100 * t / total) if total > 0 else (lambda t: math.nan)
        return (f"{plural(self.images, 'image')} in {total:.1f} s ({rate:.1f} images/s): waiting for data {self.waiting:.1f} s "
                f"({share(self.waiting):.0f}%), model {self.running:.1f} s ({share(self.running):.0f}%)")



def on_gpu(model) -> bool:
    """Whether the model's weights are on a CUDA device (then batches come in pinned memory)."""
    parameter = next(model.parameters(), None)
    return parameter is not None and parameter.device.type == "cuda"


def load_batches(dataset: ImageBatches, indices: list[int], num_workers: int | None = None,
                 pin_memory: bool = False) -> Iterable[Batch]:
    """The batches ``indices`` of ``dataset``, in that order, decoded by ``num_workers`` processes (None: the
    machine's default, 0: in this process). A pixel tensor needs no decoding and is always sliced here."""
    if num_workers is None:
        num_workers = default_workers()
    if num_workers < 0:
        raise DymuError(f"--workers must be >= 0, got {num_workers}")
    if isinstance(dataset.items, torch.Tensor) or not indices:
        num_workers = 0
    num_workers = min(num_workers, len(indices))
    return torch.utils.data.DataLoader(
        dataset, batch_size=None, sampler=indices, collate_fn=_one_batch, num_workers=num_workers,
        pin_memory=pin_memory, worker_init_fn=_init_worker if num_workers else None,
        prefetch_factor=PREFETCH_BATCHES if num_workers else None,
    )


def remaining_batches(names: list[str], batch_size: int, written: list[str]) -> tuple[list[int], dict[int, Counter]]:
    """Resuming a run that wrote one row per image, batch by batch in list order (``written``: the images of
    the rows it wrote, a path listed twice has two rows). Returns the indices of the batches with images still to
    write, and for those partly written, how many rows each of their images still needs: such a batch is run
    whole again (the same batch as before) and only the missing rows are written."""
    left = Counter(written)
    todo, partial = [], {}
    for index in range(math.ceil(len(names) / batch_size)):
        chunk = names[index * batch_size : (index + 1) * batch_size]
        missing = Counter()
        for name in chunk:
            if left[name] > 0:
                left[name] -= 1
            else:
                missing[name] += 1
        if missing:
            todo.append(index)
            if sum(missing.values()) < len(chunk):
                partial[index] = missing
    return todo, partial
