"""Pictures of token-merge groups: which original patches ended up in which merged token.

Inputs come from ``dymu.encode``: ``source[i]`` maps each original patch (raster order over a square
``g x g`` grid) to the merged token that holds it. The grid covers the top-left ``g * patch`` pixels of the
image; rows / columns past it (6 for 384 px SigLIP with 14 px patches) are not seen by the encoder.
Only numpy, Pillow and matplotlib are used; matplotlib is imported lazily with the Agg backend so importing
``dymu`` never touches a GUI.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

MAX_PIXEL = 255  # largest uint8 value
OUTLINE_COLOUR = (20, 20, 20)  # dark grey line between different merge groups
BACKGROUND = (255, 255, 255)  # white canvas for composed figures
UNCOVERED_COLOUR = BACKGROUND  # merge-map pixels past the patch grid, which the encoder never sees
TEXT_COLOUR = (0, 0, 0)
MARGIN = 8  # pixels around / between panels in composed figures
ELLIPSIS = "..."

OVERVIEW_COLUMNS = 4  # tiles per row
OVERVIEW_THUMB = 160  # pixels: the image and its merge map each fit a square this size
PAIR_GAP = MARGIN // 2  # between an image and its merge map
TILE_GAP = 3 * MARGIN  # between tiles, wider than PAIR_GAP so pairs read as one
OVERVIEW_LEGEND = "Each pair: image | merge map (each merged token's patches filled with their mean colour and outlined)"
OVERVIEW_UNCOVERED_NOTE = "; blank edge: pixels past the patch grid, not seen by the encoder"

BAR_FIG_WIDTH_IN = 8.0  # bar chart width in inches
BAR_HEIGHT_PER_NAME_IN = 0.25  # vertical space per bar
BAR_EXTRA_HEIGHT_IN = 1.5  # title, axis labels, ticks
BAR_MIN_HEIGHT_IN = 3.0
BAR_DPI = 100


def _to_numpy(x) -> np.ndarray:
    """A torch tensor (any device / float dtype) or array-like as a numpy array."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().cpu()
        if x.is_floating_point():
            x = x.float()  # bfloat16 / float16 have no (or a lossy) numpy path
        return x.numpy()
    return np.asarray(x)


def denormalize(pixel_values, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Undo processor normalisation: ``(3, H, W)`` float tensor/array -> ``(H, W, 3)`` uint8 image.

    Inverts ``pixel = (x / 255 - mean) / std`` per channel, rounding to the nearest integer.
    """
    values = _to_numpy(pixel_values).astype(np.float64)  # (3, H, W)
    if values.ndim != 3 or values.shape[0] != 3:
        raise ValueError(f"expected pixel values of shape (3, H, W), got {tuple(values.shape)}")
    mean_arr = np.asarray(mean, dtype=np.float64).reshape(3, 1, 1)
    std_arr = np.asarray(std, dtype=np.float64).reshape(3, 1, 1)
    unit = values * std_arr + mean_arr  # (3, H, W) in [0, 1]
    image = np.clip(np.rint(unit * MAX_PIXEL), 0, MAX_PIXEL).astype(np.uint8)
    return np.ascontiguousarray(image.transpose(1, 2, 0))  # (H, W, 3)


def _pixel_labels(source, height: int, width: int) -> np.ndarray:
    """Group index of every pixel the patch grid covers: ``(num_patches,)`` source -> ``(g * ph, g * pw)`` int array.

    The encoder's patch embedding is a convolution with stride = kernel = patch side, so a ``g x g`` grid covers
    the top-left ``g * patch`` pixels and drops the remaining rows / columns (SigLIP: 27 patches of 14 px cover
    378 of 384 px). The patch side per axis is ``side // g``: the encoder's own patch whenever fewer than ``g``
    pixels are dropped, which holds for every tower with at least as many patches per side as pixels per patch.
    """
    labels = _to_numpy(source).astype(np.int64).reshape(-1)  # (num_patches,)
    grid = math.isqrt(labels.size)
    if grid * grid != labels.size or grid == 0:
        raise ValueError(f"source has {labels.size} patches, not a square grid")
    patch_h, patch_w = height // grid, width // grid
    if not patch_h or not patch_w:
        raise ValueError(f"image of {height}x{width} pixels is smaller than its {grid}x{grid} patch grid")
    _, dense = np.unique(labels, return_inverse=True)  # group ids -> 0..n_groups-1
    patch_labels = dense.reshape(grid, grid)  # (g, g), row-major like the patch sequence
    return np.repeat(np.repeat(patch_labels, patch_h, axis=0), patch_w, axis=1)  # (g * ph, g * pw)


def merge_map(image: np.ndarray, source) -> np.ndarray:
    """Fill each merge group with the mean colour of its pixels and outline group boundaries.

    ``image`` is ``(H, W, 3)`` uint8, ``source`` ``(num_patches,)``. Returns ``(H, W, 3)`` uint8.
    A pixel is drawn in ``OUTLINE_COLOUR`` when its right or bottom neighbour is in another group.
    Groups need not be contiguous. Pixels past the patch grid (not seen by the encoder) are ``UNCOVERED_COLOUR``.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {image.shape}")
    pixels = _pixel_labels(source, *image.shape[:2])  # (h, w) covered area
    height, width = pixels.shape
    flat = pixels.reshape(-1)  # (h*w,)
    n_groups = int(flat.max()) + 1
    counts = np.bincount(flat, minlength=n_groups).astype(np.float64)  # (n_groups,)
    colours = image[:height, :width].reshape(-1, 3).astype(np.float64)  # (h*w, 3)
    sums = np.stack([np.bincount(flat, weights=colours[:, c], minlength=n_groups) for c in range(3)], axis=1)
    means = np.rint(sums / counts[:, None]).astype(np.uint8)  # (n_groups, 3)

    boundary = np.zeros((height, width), dtype=bool)  # (h, w)
    boundary[:, :-1] |= pixels[:, :-1] != pixels[:, 1:]  # right neighbour differs
    boundary[:-1, :] |= pixels[:-1, :] != pixels[1:, :]  # bottom neighbour differs
    out = np.full(image.shape, UNCOVERED_COLOUR, dtype=np.uint8)  # (H, W, 3)
    covered = out[:height, :width]  # (h, w, 3) view
    covered[:] = means[pixels]
    covered[boundary] = OUTLINE_COLOUR
    return out


@contextlib.contextmanager
def _written(path: str | Path):
    """A temporary file beside ``path`` to draw into, renamed to ``path`` once complete (a failed or killed write
    leaves any earlier picture whole). Figures make their folder only once there is a figure to write."""
    from .files import default_mode

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        yield tmp
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _text_height(font) -> int:
    left, top, right, bottom = font.getbbox("Ag")
    return int(bottom) + 2  # a little leading below descenders


def save_merge_figure(path: str | Path, image: np.ndarray, source, title: str) -> None:
    """Write a PNG: a title line above the image (left) and its merge map (right), on white."""
    image = np.asarray(image, dtype=np.uint8)  # (H, W, 3)
    mapped = merge_map(image, source)  # (H, W, 3)
    height, width = image.shape[:2]
    font = ImageFont.load_default()
    title_height = _text_height(font)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    canvas_width = max(2 * width + 3 * MARGIN, int(math.ceil(probe.textlength(title, font=font))) + 2 * MARGIN)
    canvas = Image.new("RGB", (canvas_width, height + title_height + 3 * MARGIN), BACKGROUND)
    ImageDraw.Draw(canvas).text((MARGIN, MARGIN), title, fill=TEXT_COLOUR, font=font)
    top = title_height + 2 * MARGIN
    canvas.paste(Image.fromarray(image), (MARGIN, top))
    canvas.paste(Image.fromarray(mapped), (2 * MARGIN + width, top))
    with _written(path) as tmp:
        canvas.save(tmp, format="PNG")


class OverviewTile(NamedTuple):
    """One overview tile: ``image`` ``(H, W, 3)`` uint8 beside its merge map for ``source`` ``(num_patches,)``."""

    name: str
    image: np.ndarray
    source: object

    @property
    def caption(self) -> str:
        """``"NAME: n of N tokens"``: merged tokens (groups in ``source``) of the original patches."""
        labels = _to_numpy(self.source).reshape(-1)
        return f"{self.name}: {np.unique(labels).size} of {labels.size} tokens"


def _overview_legend(tiles: Sequence[OverviewTile]) -> str:
    """The one-line key printed above the overview tiles."""
    legend = OVERVIEW_LEGEND
    if any(_pixel_labels(t.source, *t.image.shape[:2]).shape != t.image.shape[:2] for t in tiles):
        legend += OVERVIEW_UNCOVERED_NOTE
    return legend


def _fit_caption(draw: ImageDraw.ImageDraw, tile: OverviewTile, font, max_width: int) -> str:
    """``tile.caption``, its name shortened with an ellipsis if the caption is wider than ``max_width`` pixels."""
    caption = tile.caption
    if draw.textlength(caption, font=font) <= max_width:
        return caption
    name, counts = tile.name, caption[len(tile.name):]  # counts: ": n of N tokens"
    while name and draw.textlength(name + ELLIPSIS + counts, font=font) > max_width:
        name = name[:-1]
    return name + ELLIPSIS + counts


def save_overview(
    path: str | Path,
    tiles: Sequence[tuple[str, np.ndarray, object]],
    columns: int = OVERVIEW_COLUMNS,
    thumb: int = OVERVIEW_THUMB,
) -> None:
    """Write one PNG: a legend line, then a grid of tiles, each an image beside its merge map (each fitting
    ``thumb`` x ``thumb``) over the caption ``"NAME: n of N tokens"``. ``tiles``: ``(name, image, source)``
    (see ``OverviewTile``)."""
    if not tiles:
        raise ValueError("save_overview needs at least one tile")
    if columns < 1 or thumb < 1:
        raise ValueError("columns and thumb must be positive")
    tiles = [OverviewTile(name, np.asarray(image, dtype=np.uint8), source) for name, image, source in tiles]
    columns = min(columns, len(tiles))
    rows = math.ceil(len(tiles) / columns)
    font = ImageFont.load_default()
    line_height = _text_height(font)
    tile_w = 2 * thumb + PAIR_GAP
    cell_w, cell_h = tile_w + TILE_GAP, thumb + line_height + TILE_GAP
    legend = _overview_legend(tiles)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    width = max(columns * cell_w - TILE_GAP, int(math.ceil(probe.textlength(legend, font=font)))) + 2 * MARGIN
    top = 2 * MARGIN + line_height  # below the legend
    canvas = Image.new("RGB", (width, top + rows * cell_h - TILE_GAP + MARGIN), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    draw.text((MARGIN, MARGIN), legend, fill=TEXT_COLOUR, font=font)
    for k, tile in enumerate(tiles):
        row, col = divmod(k, columns)
        x0, y0 = MARGIN + col * cell_w, top + row * cell_h
        for x, array in ((x0, tile.image), (x0 + thumb + PAIR_GAP, merge_map(tile.image, tile.source))):
            picture = Image.fromarray(array)
            picture.thumbnail((thumb, thumb), Image.Resampling.LANCZOS)  # keeps aspect ratio
            canvas.paste(picture, (x + (thumb - picture.width) // 2, y0))
        draw.text((x0, y0 + thumb + MARGIN // 2), _fit_caption(draw, tile, font, tile_w), fill=TEXT_COLOUR, font=font)
    with _written(path) as tmp:
        canvas.save(tmp, format="PNG")


def _bar_figsize(count: int) -> tuple[float, float]:
    """Figure size in inches for a horizontal bar chart with ``count`` bars."""
    height = max(BAR_MIN_HEIGHT_IN, BAR_HEIGHT_PER_NAME_IN * count + BAR_EXTRA_HEIGHT_IN)
    return BAR_FIG_WIDTH_IN, height


def save_token_bar_chart(
    path: str | Path,
    names: Sequence[str],
    tokens: Sequence[int],
    num_patches: int,
    title: str,
) -> None:
    """Write a PNG horizontal bar chart of tokens per image (fewest at the top), dashed line at the mean."""
    if len(names) != len(tokens):
        raise ValueError(f"{len(names)} names but {len(tokens)} token counts")
    if not names:
        raise ValueError("save_token_bar_chart needs at least one image")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    order = sorted(range(len(names)), key=lambda i: (tokens[i], names[i]))
    sorted_names = [names[i] for i in order]
    sorted_tokens = [tokens[i] for i in order]
    mean = float(np.mean(sorted_tokens))

    # A Figure with its own Agg canvas: no pyplot state, the user's matplotlib backend is left alone.
    fig = Figure(figsize=_bar_figsize(len(names)), dpi=BAR_DPI)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    positions = np.arange(len(sorted_names))
    ax.barh(positions, sorted_tokens, color="tab:blue")
    ax.set_yticks(positions, sorted_names)
    ax.invert_yaxis()  # fewest tokens at the top
    ax.axvline(mean, color="tab:red", linestyle="--", label=f"mean {mean:.1f}")
    ax.set_xlim(0, num_patches)
    ax.set_xlabel(f"tokens (of {num_patches} patches)")
    ax.set_title(f"{title} ({num_patches} patches)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    with _written(path) as tmp:
        fig.savefig(tmp, format="png", dpi=BAR_DPI)
