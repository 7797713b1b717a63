"""Image sets: a folder, a list of files, or a reference-style JSON manifest ``[{"image": "rel/path.jpg"}, ...]``.

Problems with the *set* (a missing file named explicitly, an unsupported file type, an empty folder, a
manifest that is not a list) are errors with one line naming the file. Problems with one *image* while a
run is going (cannot be decoded) are returned as failures so long runs skip and report them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .vision import DymuError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
#: 16-bit grey levels per 8-bit level (65535 / 255)
LEVELS_16_TO_8 = 257
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


def _manifest(path: Path, image_root: Path | None) -> tuple[list[str], list[dict]]:
    try:
        entries = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ImageError(f"{path}: not a valid JSON manifest ({exc})") from None
    if not isinstance(entries, list):
        raise ImageError(f"{path}: a manifest must be a JSON list of {{\"image\": \"relative/path\"}} objects")
    root = image_root if image_root is not None else path.parent
    paths, skipped = [], []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
            skipped.append({"image": f"{path}[{i}]", "error": "entry has no \"image\" path"})
            continue
        paths.append(str(root / entry["image"]))
    return paths, skipped


def failure_line(entry: dict) -> str:
    """One skipped image, {"image": ..., "error": ...}, as a line that names it once."""
    return entry["error"] if entry["image"] in entry["error"] else f"{entry['image']}: {entry['error']}"


def summarize_failures(failures: list[dict]) -> str:
    """The first few failures on one line, for warnings and for errors when nothing was readable."""
    text = "; ".join(failure_line(entry) for entry in failures[:REASONS_SHOWN])
    more = len(failures) - REASONS_SHOWN
    return text + (f"; and {more} more" if more > 0 else "")


def collect_images(inputs, image_root=None) -> ImageSet:
    """Expand folders (recursively, sorted) and manifests into a list of image paths."""
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
            found = sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise ImageError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found in folder {path}")
            paths += found
        elif path.suffix.lower() == ".json":
            if not path.is_file():
                raise ImageError(f"manifest not found: {path}")
            found, bad = _manifest(path, root)
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
    """RGB copy of a PIL image. Integer grey ("I;16", "I": 16-bit PNG/TIFF) is scaled to 8 bits first, where
    Pillow's own conversion clips every level above 255 to white."""
    from PIL import Image

    if image.mode.startswith("I"):
        import numpy as np

        grey = np.rint(np.asarray(image, dtype=np.float64) / LEVELS_16_TO_8)
        image = Image.fromarray(np.clip(grey, 0, 255).astype(np.uint8))
    return image.convert("RGB")


def open_image(path):
    """Decode an image file to RGB, or raise ImageError naming the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return to_rgb(image)
    except FileNotFoundError:
        raise ImageError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ImageError(f"cannot read image {path}: {reason}") from None


def load_images(items) -> tuple[list, list[dict]]:
    """Decode image files (PIL images pass through, made RGB). Returns (images, failures with their reasons)."""
    from PIL import Image

    images, failures = [], []
    for item in items:
        if isinstance(item, Image.Image):
            images.append(to_rgb(item))
            continue
        try:
            images.append(open_image(item))
        except ImageError as exc:
            failures.append({"image": str(item), "error": str(exc)})
    return images, failures


def load_batch(items, processor):
    """Decode and preprocess. Returns (pixel_values or None, names of the images used, failures)."""
    from PIL import Image

    images, failures = load_images(items)
    failed = {f["image"] for f in failures}
    names = [getattr(item, "filename", "") or f"<image {i}>" if isinstance(item, Image.Image) else str(item)
             for i, item in enumerate(items) if isinstance(item, Image.Image) or str(item) not in failed]
    if not images:
        return None, names, failures
    pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
    return pixel_values, names, failures
