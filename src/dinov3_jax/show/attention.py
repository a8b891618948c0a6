"""`show attention`: the last block's attention of the CLS and register tokens to the patches.

A row per query token (CLS, then each register), columns image | mean over heads | each head →
(2 + heads)·w × (1 + R)·h, each panel (h, w) the picture size shrunk so that its longer side is at
most 256 px (`--panel-size` changes the cap). Memory stays linear in the number of patches: only
the CLS/register query rows are computed. A ConvNeXt has no attention (a clear error)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from dinov3_jax.show.panels import colorize, fit, hstack, label, minmax, panel_size, to_image, upsample, vstack

PANEL_CAP = 256


def attention_picture(image: Image.Image, attention: np.ndarray, panel: int | None = None) -> Image.Image:
    """`attention` is [1+R, heads, h, w]; every map is min-max scaled on its own."""
    n_queries, n_heads = attention.shape[:2]
    longest = panel if panel is not None else min(PANEL_CAP, max(image.height, image.width))
    wh = panel_size((image.height, image.width), longest)
    base = fit(image, wh)
    rows = []
    for q in range(n_queries):
        name = "CLS" if q == 0 else f"reg{q}"
        maps = [attention[q].mean(0), *attention[q]]
        titles = [f"{name} mean", *(f"{name} head {i}" for i in range(n_heads))]
        panels = [label(base.copy(), name)]
        panels += [label(to_image(colorize(minmax(upsample(m, wh)))), t) for m, t in zip(maps, titles)]
        rows.append(hstack(panels))
    return vstack(rows)
