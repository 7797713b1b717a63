"""Reading image files: bit depths, modes."""

import numpy as np
from PIL import Image

from dymu.images import load_batch, open_image


def test_16_bit_grey_png_reads_as_its_8_bit_version(tmp_path):
    levels = np.add.outer(np.arange(64), np.arange(64) * 3).astype(np.uint8)  # (64, 64) gradient, 0..252
    Image.fromarray(levels).save(tmp_path / "8.png")
    Image.fromarray(levels.astype(np.uint16) * 257).save(tmp_path / "16.png")
    assert Image.open(tmp_path / "16.png").mode == "I;16"
    eight = np.asarray(open_image(tmp_path / "8.png"), dtype=int)
    sixteen = np.asarray(open_image(tmp_path / "16.png"), dtype=int)
    assert sixteen.shape == eight.shape == (64, 64, 3)
    assert np.abs(sixteen - eight).max() <= 1
    in_memory = Image.open(tmp_path / "16.png")
    pixels, _, _ = load_batch([in_memory], lambda images, return_tensors: {"pixel_values": images})
    assert np.abs(np.asarray(pixels[0], dtype=int) - eight).max() <= 1
