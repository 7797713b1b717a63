"""Real photos and test images bundled with scikit-image, written to disk for demos and tests."""

from __future__ import annotations

from pathlib import Path

#: skimage.data images that ship inside the wheel (no download). Grey and binary ones are converted to RGB.
BUNDLED = (
    "astronaut", "binary_blobs", "brick", "camera", "cat", "cell", "checkerboard", "chelsea", "clock", "coffee",
    "coins", "colorwheel", "grass", "gravel", "horse", "hubble_deep_field", "immunohistochemistry", "logo",
    "microaneurysms", "moon", "page", "retina", "rocket", "shepp_logan_phantom", "text",
)


def bundled_image(name: str):
    """One scikit-image sample as an RGB PIL image."""
    import numpy as np
    from PIL import Image

    try:
        import skimage.data
    except ImportError as exc:  # pragma: no cover - install hint
        raise RuntimeError("scikit-image is needed for the bundled images: pip install scikit-image") from exc
    array = np.asarray(getattr(skimage.data, name)())
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    elif array.dtype != np.uint8:
        array = (255 * (array - array.min()) / max(float(array.max() - array.min()), 1e-12)).astype(np.uint8)
    image = Image.fromarray(array)
    return image.convert("RGB")


def write_bundled_images(out_dir, names=BUNDLED) -> list[str]:
    """Write the bundled images as PNG files (once) and return their paths in a stable order."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        path = out / f"{name}.png"
        if not path.exists():
            tmp = out / f".{name}.tmp.png"
            bundled_image(name).save(tmp)
            tmp.replace(path)
        paths.append(str(path))
    return paths
