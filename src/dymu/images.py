"""Image sets: a folder, a list of files, or a reference-style JSON manifest ``[{"image": "rel/path.jpg"}, ...]``.

Problems with the *set* (a missing file named explicitly, an unsupported file type, an empty folder, a
manifest that is not a list) are errors with one line naming the file. Problems with one *image* while a
run is going (cannot be decoded) are returned as failures so long runs skip and report them.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .jsonfile import read_json
from .vision import DymuError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
#: images with more pixels are skipped unless the limit is raised: PIL's own decompression-bomb warning size
#: (Image.MAX_IMAGE_PIXELS, 89.5 megapixels: 268 MB decoded as RGB)
DEFAULT_MAX_PIXELS = 89_478_485
#: images whose longest side is more than this many times their shortest are skipped unless the limit is raised (a
#: 1x20000 PNG of 162 bytes becomes 336x6720000 pixels, 27 GB as floats, once a CLIP processor resizes its short side)
DEFAULT_MAX_ASPECT_RATIO = 20.0
#: failures quoted in a one-line summary
REASONS_SHOWN = 3


class ImageError(DymuError):
    pass


class SkippedImagesWarning(UserWarning):
    """Some images of a set could not be used (the API's report; the CLI prints its own list)."""


@dataclass
class ImageSet:
    paths: list[str]
    skipped: list[dict]  # manifest entries that named no image: {"image": ..., "error": ...}


def _manifest(path: Path, image_root: Path | None, allow_outside_root: bool = False) -> tuple[list[str], list[dict]]:
    try:
        entries = read_json(path, "manifest")
    except DymuError as exc:
        raise ImageError(str(exc)) from None
    if not isinstance(entries, list):
        raise ImageError(f"{path}: a manifest must be a JSON list of {{\"image\": \"relative/path\"}} objects")
    root = image_root if image_root is not None else path.parent
    paths, skipped = [], []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
            skipped.append({"image": f"{path}[{i}]", "error": "entry has no \"image\" path"})
            continue
        image = root / entry["image"]
        if not allow_outside_root and not _inside(image, root):
            skipped.append({"image": entry["image"], "error": f"{path}[{i}]: {entry['image']!r} is outside the image root "
                            f"{root} (pass --allow-outside-root, allow_outside_root=True, to read it)"})
            continue
        paths.append(str(image))
    return paths, skipped


def _inside(path: Path, root: Path) -> bool:
    """Whether ``path`` names a file under ``root`` as written (``..`` resolved, symlinks not followed: a link the
    user put in the image folder is theirs)."""
    root = os.path.abspath(root)
    return os.path.commonpath([root, os.path.abspath(path)]) == root


def _walk(folder: Path) -> list[str]:
    """Image files under ``folder``, recursively and sorted, symlinked sub-folders included; each real folder is
    walked once, so a link back to a parent cannot loop."""
    seen, found = set(), []
    for parent, folders, files in os.walk(folder, followlinks=True):
        status = os.stat(parent)
        if (status.st_dev, status.st_ino) in seen:
            folders[:] = []
            continue
        seen.add((status.st_dev, status.st_ino))
        found += [os.path.join(parent, name) for name in files
                  if Path(name).suffix.lower() in IMAGE_EXTENSIONS and os.path.isfile(os.path.join(parent, name))]
    return sorted(found)


def failure_line(entry: dict) -> str:
    """One skipped image, {"image": ..., "error": ...}, as a line that names it once."""
    return entry["error"] if entry["image"] in entry["error"] else f"{entry['image']}: {entry['error']}"


def plural(count: int, noun: str) -> str:
    """"1 image", "2 images"."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def summarize_failures(failures: list[dict]) -> str:
    """The first few failures on one line, for warnings and for errors when nothing was readable."""
    text = "; ".join(failure_line(entry) for entry in failures[:REASONS_SHOWN])
    more = len(failures) - REASONS_SHOWN
    return text + (f"; and {more} more" if more > 0 else "")


def collect_images(inputs, image_root=None, allow_outside_root: bool = False) -> ImageSet:
    """Expand folders (recursively, sorted, symlinked sub-folders included) and manifests into a list of image paths.
    A manifest entry outside the image root (``../``, an absolute path elsewhere) is skipped with the reason unless
    ``allow_outside_root``."""
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    root = Path(image_root) if image_root is not None else None
    if root is not None and not root.is_dir():
        raise ImageError(f"--image-root is not a folder: {root}")
    paths: list[str] = []
    skipped: list[dict] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = _walk(path)
            if not found:
                raise ImageError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found in folder {path}")
            paths += found
        elif path.suffix.lower() == ".json":
            if not path.is_file():
                raise ImageError(f"manifest not found: {path}")
            found, bad = _manifest(path, root, allow_outside_root)
            paths += found
            skipped += bad
        elif not path.exists():
            raise ImageError(f"image not found: {path}")
        elif path.suffix.lower() not in IMAGE_EXTENSIONS:
            raise ImageError(f"unsupported image type {path.suffix or '(no extension)'!r}: {path}")
        else:
            paths.append(str(path))
    if not paths:
        raise ImageError("no images to process")
    return ImageSet(paths=paths, skipped=skipped)


def to_rgb(image):
    """RGB copy of a PIL image as the installed transformers' image processors make it (``convert_to_rgb`` of
    ``transformers.image_transforms``: since 5.24 transparent pixels are composited onto white, before that the alpha
    band is dropped). Only used for processors that do not convert themselves (``do_convert_rgb`` off)."""
    from transformers.image_transforms import convert_to_rgb

    return image if image.mode == "RGB" else convert_to_rgb(image)


def for_processor(image, processor):
    """``image`` as ``processor`` gets it: unchanged when the processor converts to RGB itself (what
    ``processor(images=PIL.Image.open(path))`` sees, transparency and all), else made RGB as it would."""
    image_processor = getattr(processor, "image_processor", processor)
    return image if getattr(image_processor, "do_convert_rgb", False) else to_rgb(image)


@dataclass(frozen=True)
class ImageLimits:
    """Images larger than this are skipped (reported with the reason) before they are decoded.

    max_pixels: width x height, read from the file's header. max_aspect_ratio: longest / shortest side: processors
    resize the short side to the model's input size, so the long side (and memory) grows with the ratio.
    """

    max_pixels: int = DEFAULT_MAX_PIXELS
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO

    def __post_init__(self):
        if isinstance(self.max_pixels, bool) or not isinstance(self.max_pixels, int) or self.max_pixels < 1:
            raise ImageError(f"--max-pixels must be a whole number >= 1, got {self.max_pixels!r}")
        if not isinstance(self.max_aspect_ratio, (int, float)) or not self.max_aspect_ratio >= 1:
            raise ImageError(f"--max-aspect-ratio must be a number >= 1, got {self.max_aspect_ratio!r}")

    def problem(self, size: tuple[int, int]) -> str | None:
        """Why an image of ``size`` (width, height) is refused, None when it is within the limits."""
        width, height = size
        if width * height > self.max_pixels:
            return (f"{width}x{height} is {width * height:,} pixels, more than the limit of {self.max_pixels:,} "
                    "(--max-pixels, max_pixels=)")
        if min(width, height) < 1:
            return f"{width}x{height} has no pixels"
        if max(width, height) / min(width, height) > self.max_aspect_ratio:
            return (f"{width}x{height} has aspect ratio {max(width, height) / min(width, height):.1f}, more than the limit "
                    f"of {self.max_aspect_ratio:g} (--max-aspect-ratio, max_aspect_ratio=)")
        return None


@contextlib.contextmanager
def _own_size_check():
    """PIL's decompression-bomb guard (an error above twice ``Image.MAX_IMAGE_PIXELS``) off while a file is opened:
    ImageLimits replaces it, with a limit the user can change."""
    from PIL import Image

    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def open_image(path, limits: ImageLimits = ImageLimits()):
    """Decode an image file, or raise ImageError naming the file. The image keeps its mode (the processor converts
    it, as in the user's own pipeline); its size is checked against ``limits`` from the header, before decoding."""
    from PIL import Image, UnidentifiedImageError

    try:
        with _own_size_check(), Image.open(path) as image:
            problem = limits.problem(image.size)
            if problem is not None:
                raise ImageError(f"cannot read image {path}: {problem}")
            image.load()
            return image
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ImageError(f"cannot read image {path}: {reason}") from None


def load_images(items, limits: ImageLimits = ImageLimits()) -> tuple[list, list[dict]]:
    """Decode image files (PIL images pass through). Returns (images in their own modes, failures with their reasons):
    an image outside ``limits`` is a failure."""
    from PIL import Image

    images, failures = [], []
    for index, item in enumerate(items):
        try:
            if isinstance(item, Image.Image):
                problem = limits.problem(item.size)
                if problem is not None:
                    raise ImageError(f"{_name(item, index)}: {problem}")
                images.append(item)
            else:
                images.append(open_image(item, limits))
        except ImageError as exc:
            failures.append({"image": _name(item, index), "error": str(exc)})
    return images, failures


def _name(item, index: int) -> str:
    """A path as given; an in-memory PIL image by its file name, else its position."""
    from PIL import Image

    if isinstance(item, Image.Image):
        return getattr(item, "filename", "") or f"<image {index}>"
    return str(item)


def load_batch(items, processor, limits: ImageLimits = ImageLimits(), crops: bool = False):
    """Decode and preprocess. Returns (pixel_values or None, names of the images used, failures), and with ``crops``
    how many rows of pixel_values each image has (1 each; AnyRes processors: its crops, see ``crops_of``)."""
    images, failures = load_images(items, limits)
    failed = {f["image"] for f in failures}
    names = [_name(item, i) for i, item in enumerate(items) if _name(item, i) not in failed]
    if not images:
        return (None, names, failures, []) if crops else (None, names, failures)
    processed = processor(images=[for_processor(image, processor) for image in images], return_tensors="pt")
    pixel_values, counts = crops_of(processed, processor)
    return (pixel_values, names, failures, counts) if crops else (pixel_values, names, failures)


def crops_of(processed, processor) -> tuple[torch.Tensor, list[int]]:
    """(the images an encoder runs on, rows per input image): ``pixel_values`` (batch, 3, h, w) as they are; AnyRes
    processors (LLaVA-OneVision) return (images, max crops, 3, h, w) padded with empty crops, and ``image_sizes``:
    every real crop (base + grid) of every image, in order, counts as one image, since the tower merges each crop on
    its own."""
    pixel_values = processed["pixel_values"]
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 5:
        return pixel_values, [1] * len(pixel_values)
    from .compat import anyres_crops

    counts = anyres_crops(processed["image_sizes"], processor.image_grid_pinpoints, pixel_values.shape[-1])
    return torch.cat([crops[:n] for crops, n in zip(pixel_values, counts)]), counts
