"""`show similarity`: [image with the point marked | cosine similarity of every patch to the patch
under the point, over the image] → 2W × H."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from dinov3_jax.show.panels import blend, colorize, fit, hstack, minmax, panel_size, upsample


def cosine_similarity_map(features: np.ndarray, row: int, col: int) -> np.ndarray:
    """Cosine similarity [h, w] between patch (row, col) and every patch."""
    f = features / np.maximum(np.linalg.norm(features, axis=-1, keepdims=True), 1e-12)
    return np.einsum("hwd,d->hw", f, f[row, col])


def similarity_picture(
    image: Image.Image, features: np.ndarray, point_xy: tuple[int, int], panel: int | None = None
) -> Image.Image:
    h, w = features.shape[:2]
    p_h, p_w = image.height / h, image.width / w
    x, y = point_xy
    if not (0 <= x < image.width and 0 <= y < image.height):
        raise ValueError(f"--point {x} {y} is outside the {image.width}x{image.height} resized image")
    row, col = min(int(y // p_h), h - 1), min(int(x // p_w), w - 1)
    sim = cosine_similarity_map(features, row, col)
    wh = panel_size((image.height, image.width), panel)
    base = fit(image, wh)
    overlay = blend(base, colorize(minmax(upsample(sim, wh))))
    marked = base.copy()
    sx, sy = wh[0] / image.width, wh[1] / image.height
    for im in (marked, overlay):
        draw = ImageDraw.Draw(im)
        cx, cy, r = x * sx, y * sy, max(3.0, 0.4 * min(p_w * sx, p_h * sy))
        draw.ellipse((cx - r - 1, cy - r - 1, cx + r + 1, cy + r + 1), outline=(0, 0, 0), width=2)
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=(255, 60, 60), width=2)
    return hstack([marked, overlay])
