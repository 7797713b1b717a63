"""Reading image files: bit depths, modes (the processor's own RGB conversion: tests/test_inputs.py)."""

import numpy as np
from PIL import Image

from dymu.images import load_batch, open_image


def test_16_bit_grey_png_reaches_the_processor_as_the_stock_pipeline_gives_it(tmp_path):
    """Pillow converts 16-bit grey to RGB by clipping levels above 255, and so does the user's own
    ``processor(images=Image.open(path))``: dymu hands the processor the same image (issue 23), not a rescaled one."""
    levels = np.add.outer(np.arange(64), np.arange(64) * 3).astype(np.uint16) * 257  # (64, 64) 16-bit gradient
    Image.fromarray(levels).save(tmp_path / "16.png")
    assert open_image(tmp_path / "16.png").mode == "I;16"
    stock = np.asarray(Image.open(tmp_path / "16.png").convert("RGB"), dtype=int)
    pixels, _, _ = load_batch([tmp_path / "16.png"], lambda images, return_tensors: {"pixel_values": images})
    assert np.array_equal(np.asarray(pixels[0], dtype=int), stock)
