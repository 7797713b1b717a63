import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from dymu import viz

GRID = 4  # patches per side
PATCH = 6  # pixels per patch side
SIDE = GRID * PATCH
NUM_PATCHES = GRID * GRID
MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP normalisation
STD = (0.26862954, 0.26130258, 0.27577711)


def _random_image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(SIDE, SIDE, 3), dtype=np.uint8)


@pytest.mark.parametrize("grid, patch, extra_rows, extra_cols", [
    (GRID, PATCH, 0, 0),
    (GRID, PATCH, GRID - 1, 2),  # the conv stride drops rows / columns that do not fill a patch (fewer than GRID)
    (27, 14, 6, 6),  # SigLIP 384 px / patch 14: 27x27 patches cover 378 px
])
def test_identity_source_fills_each_patch_with_its_mean(grid, patch, extra_rows, extra_cols):
    covered = grid * patch
    height, width = covered + extra_rows, covered + extra_cols
    image = np.random.default_rng(0).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    out = viz.merge_map(image, torch.arange(grid * grid))
    assert out.shape == image.shape and out.dtype == np.uint8

    np.testing.assert_array_equal(out[covered:], np.broadcast_to(viz.UNCOVERED_COLOUR, (extra_rows, width, 3)))
    np.testing.assert_array_equal(out[:, covered:], np.broadcast_to(viz.UNCOVERED_COLOUR, (height, extra_cols, 3)))
    ys, xs = np.mgrid[0:covered, 0:covered]
    outline = ((xs % patch == patch - 1) & (xs < covered - 1)) | ((ys % patch == patch - 1) & (ys < covered - 1))
    inside = out[:covered, :covered]
    assert np.all(inside[outline] == viz.OUTLINE_COLOUR)
    for r in range(grid):
        for c in range(grid):
            block = np.s_[r * patch:(r + 1) * patch, c * patch:(c + 1) * patch]
            expected = np.rint(image[block].reshape(-1, 3).mean(axis=0)).astype(np.uint8)
            inner = inside[block][~outline[block]]
            assert len(inner) > 0
            np.testing.assert_array_equal(inner, np.broadcast_to(expected, inner.shape))


def test_single_group_is_one_colour_without_outlines():
    image = _random_image(1)
    out = viz.merge_map(image, np.zeros(NUM_PATCHES, dtype=np.int64))
    expected = np.rint(image.reshape(-1, 3).mean(axis=0)).astype(np.uint8)
    np.testing.assert_array_equal(out, np.broadcast_to(expected, out.shape))


def test_left_right_halves_give_one_outline_column():
    left, right = (200, 30, 10), (10, 90, 250)
    image = np.empty((SIDE, SIDE, 3), dtype=np.uint8)
    half = SIDE // 2
    image[:, :half] = left
    image[:, half:] = right
    source = (np.arange(NUM_PATCHES) % GRID >= GRID // 2).astype(np.int64)  # column >= GRID/2 -> group 1
    out = viz.merge_map(image, torch.from_numpy(source))

    outline = np.all(out == viz.OUTLINE_COLOUR, axis=2)
    assert outline.any(axis=0).nonzero()[0].tolist() == [half - 1]
    assert outline[:, half - 1].all()
    np.testing.assert_array_equal(out[:, : half - 1], np.broadcast_to(left, (SIDE, half - 1, 3)))
    np.testing.assert_array_equal(out[:, half:], np.broadcast_to(right, (SIDE, half, 3)))


def test_non_contiguous_group_ids_and_bad_shapes():
    image = _random_image(2)
    a = viz.merge_map(image, np.arange(NUM_PATCHES) % 2)
    b = viz.merge_map(image, (np.arange(NUM_PATCHES) % 2) * 7 + 3)  # same groups, other ids
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError):
        viz.merge_map(image, np.zeros(NUM_PATCHES - 1))  # not a square grid
    with pytest.raises(ValueError, match="patch grid"):
        viz.merge_map(image[: GRID - 1, : GRID - 1], np.zeros(NUM_PATCHES))  # smaller than one pixel per patch


def test_denormalize_round_trip():
    image = _random_image(3)
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    pixel_values = (torch.from_numpy(image).permute(2, 0, 1).float() / 255 - mean) / std  # (3, H, W)
    back = viz.denormalize(pixel_values, MEAN, STD)
    assert back.shape == image.shape and back.dtype == np.uint8
    np.testing.assert_array_equal(back, image)
    np.testing.assert_array_equal(viz.denormalize(pixel_values.bfloat16(), MEAN, STD).shape, image.shape)
    with pytest.raises(ValueError):
        viz.denormalize(pixel_values[None], MEAN, STD)


def test_save_merge_figure(tmp_path):
    path = tmp_path / "fig.png"
    viz.save_merge_figure(path, _random_image(), torch.arange(NUM_PATCHES) // 2, "x.png: 8 tokens / 16 patches")
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.width > 2 * SIDE and im.height > SIDE
        pixels = np.asarray(im.convert("RGB"))
    assert tuple(pixels[0, 0]) == viz.BACKGROUND


def test_figures_create_their_folder_only_when_written(tmp_path):
    folder = tmp_path / "a" / "b"
    with pytest.raises(ValueError):
        viz.save_merge_figure(folder / "bad.png", _random_image(), np.zeros(NUM_PATCHES - 1), "t")
    assert not (tmp_path / "a").exists()
    viz.save_merge_figure(folder / "fig.png", _random_image(), np.zeros(NUM_PATCHES), "t")
    assert (folder / "fig.png").is_file()


def _find(canvas: np.ndarray, array: np.ndarray) -> list[tuple[int, int]]:
    """(x, y) of every place where ``array`` appears pixel for pixel in ``canvas``."""
    h, w = array.shape[:2]
    corner = np.all(canvas[: canvas.shape[0] - h + 1, : canvas.shape[1] - w + 1] == array[0, 0], axis=2)
    return [(x, y) for y, x in zip(*np.nonzero(corner)) if np.array_equal(canvas[y : y + h, x : x + w], array)]


def test_save_overview_shows_each_image_beside_its_merge_map(tmp_path):
    tiles = [(f"img{i}.png", _random_image(i), np.arange(NUM_PATCHES) % (i + 2)) for i in range(7)]
    path = tmp_path / "overview.png"
    viz.save_overview(path, tiles, columns=3, thumb=SIDE)  # full-size thumbnails: pixels can be found exactly
    with Image.open(path) as im:
        assert im.format == "PNG"
        canvas = np.asarray(im.convert("RGB"))
    corners = []
    for _, image, source in tiles:
        [(x, y)] = _find(canvas, image)
        [(map_x, map_y)] = _find(canvas, viz.merge_map(image, source))
        assert map_y == y and SIDE <= map_x - x < 2 * SIDE  # the merge map right beside its image
        corners.append((y, x))
    assert corners == sorted(corners) and len({y for y, _ in corners}) == 3  # reading order, 3 rows of 3
    assert (canvas[: corners[0][0]] != viz.BACKGROUND).any()  # the legend above the tiles
    with pytest.raises(ValueError):
        viz.save_overview(tmp_path / "empty.png", [])


def test_overview_caption_legend_and_long_names():
    tile = viz.OverviewTile("cat", _random_image(), torch.tensor([5, 5, 2, 9] * GRID))
    assert tile.caption == f"cat: 3 of {NUM_PATCHES} tokens"
    assert viz._overview_legend([tile]) == viz.OVERVIEW_LEGEND
    past_grid = viz.OverviewTile("wide", np.zeros((SIDE, SIDE + GRID - 1, 3), np.uint8), np.arange(NUM_PATCHES))
    assert viz._overview_legend([tile, past_grid]) == viz.OVERVIEW_LEGEND + viz.OVERVIEW_UNCOVERED_NOTE

    draw, font = ImageDraw.Draw(Image.new("RGB", (1, 1))), ImageFont.load_default()
    long = viz.OverviewTile("x" * 200, _random_image(), np.arange(NUM_PATCHES))
    text = viz._fit_caption(draw, long, font, 100)
    assert text.endswith(f"{viz.ELLIPSIS}: {NUM_PATCHES} of {NUM_PATCHES} tokens") and draw.textlength(text, font=font) <= 100
    assert viz._fit_caption(draw, tile, font, 1000) == tile.caption


def test_save_token_bar_chart(tmp_path):
    names = ["a.png", "b.png", "c.png", "d.png"]
    path = tmp_path / "bars.png"
    viz.save_token_bar_chart(path, names, [120, 80, 200, 150], num_patches=576, title="tokens per image")
    width_in, height_in = viz._bar_figsize(len(names))
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size == (round(width_in * viz.BAR_DPI), round(height_in * viz.BAR_DPI))
    import matplotlib.pyplot as plt

    assert plt.get_fignums() == []  # figure was closed
    with pytest.raises(ValueError):
        viz.save_token_bar_chart(tmp_path / "bad.png", names, [1, 2], 576, "t")
