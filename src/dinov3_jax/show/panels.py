"""Panels shared by every picture: colour ramp, scaling, upsampling, stacking, labels and sizes.

Sizes are predictable: the input image is resized (bilinear) to the *picture size* and each panel
has that size unless stated otherwise. `--resolution N` makes the longer side N and keeps the
aspect ratio, the shorter side rounded to a multiple of the patch size (at least one patch);
`--resolution HxW` is exact. `--panel-size P` rescales every panel so its longer side is P.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from dinov3_jax.data.images import check_resolution, parse_resolution

# A perceptually ordered dark-blue → teal → green → yellow ramp (viridis-like anchor colours).
_RAMP = np.array(
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]],
    dtype=np.float32,
)


def colorize(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (any shape) → uint8 RGB through the colour ramp."""
    v = np.clip(np.nan_to_num(np.asarray(values, np.float32)), 0.0, 1.0) * (len(_RAMP) - 1)
    lo = np.minimum(np.floor(v).astype(np.int64), len(_RAMP) - 2)
    t = (v - lo)[..., None]
    return np.rint(_RAMP[lo] * (1 - t) + _RAMP[lo + 1] * t).astype(np.uint8)


def minmax(x: np.ndarray, axis=None) -> np.ndarray:
    """Scaled to [0, 1] (0 where constant)."""
    x = np.asarray(x, np.float32)
    lo, hi = x.min(axis=axis, keepdims=True), x.max(axis=axis, keepdims=True)
    return np.where(hi > lo, (x - lo) / np.maximum(hi - lo, 1e-12), 0.0)


def upsample(grid: np.ndarray, size_wh: tuple[int, int], resample=Image.Resampling.BILINEAR) -> np.ndarray:
    """A [h, w] or [h, w, C] float map resized to (W, H) pixels, as float32 [H, W(, C)]."""
    grid = np.asarray(grid, np.float32)
    if grid.ndim == 2:
        return np.asarray(Image.fromarray(grid, mode="F").resize(size_wh, resample), np.float32)
    return np.stack([upsample(grid[..., c], size_wh, resample) for c in range(grid.shape[-1])], axis=-1)


def to_image(rgb: np.ndarray) -> Image.Image:
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8:
        rgb = np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(rgb, "RGB")


def blend(image: Image.Image, overlay: np.ndarray, alpha: float = 0.55) -> Image.Image:
    """`overlay` (uint8 RGB [H, W, 3]) over `image` with opacity `alpha`."""
    base = np.asarray(image.convert("RGB"), np.float32)
    return Image.fromarray(np.rint((1 - alpha) * base + alpha * overlay.astype(np.float32)).astype(np.uint8))


def hstack(panels: Sequence[Image.Image]) -> Image.Image:
    """Panels left to right on a black canvas as tall as the tallest."""
    canvas = Image.new("RGB", (sum(p.width for p in panels), max(p.height for p in panels)))
    x = 0
    for p in panels:
        canvas.paste(p, (x, 0))
        x += p.width
    return canvas


def vstack(rows: Sequence[Image.Image]) -> Image.Image:
    canvas = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)))
    y = 0
    for r in rows:
        canvas.paste(r, (0, y))
        y += r.height
    return canvas


def label(image: Image.Image, text: str) -> Image.Image:
    """`text` in the top-left corner (white on a black box), in place; returns the image."""
    draw = ImageDraw.Draw(image)
    _, _, right, bottom = draw.textbbox((2, 1), text)
    draw.rectangle((0, 0, right + 2, bottom + 1), fill=(0, 0, 0))
    draw.text((2, 1), text, fill=(255, 255, 255))
    return image


def picture_size(image_wh: tuple[int, int], resolution: str | int | Sequence[int], patch_size: int) -> tuple[int, int]:
    """(H, W) for the model: `N` → longer side N, aspect kept, shorter side rounded to a multiple of
    the patch size; `HxW` → exact. Both sides must be multiples of the patch size."""
    exact = not (isinstance(resolution, int) or (isinstance(resolution, str) and resolution.strip().isdigit()))
    size = parse_resolution(resolution)
    if not exact:
        n = size[0]
        check_resolution((n, n), patch_size)
        w, h = image_wh
        short = max(1, round(n * min(w, h) / max(w, h) / patch_size)) * patch_size
        size = (n, short) if h >= w else (short, n)
    check_resolution(size, patch_size)
    return size


def panel_size(size_hw: tuple[int, int], longest: int | None) -> tuple[int, int]:
    """(W, H) of a panel: the picture size scaled so that its longer side is `longest` (None: as is)."""
    h, w = size_hw
    if longest is None or longest == max(h, w):
        return w, h
    s = longest / max(h, w)
    return max(1, round(w * s)), max(1, round(h * s))


def fit(image: Image.Image, size_wh: tuple[int, int]) -> Image.Image:
    """The image at the panel size (bilinear)."""
    return image if image.size == size_wh else image.resize(size_wh, Image.Resampling.BILINEAR)
