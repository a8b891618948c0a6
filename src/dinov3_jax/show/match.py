"""`show match`: two rows of [image 1 | image 2]: dense nearest-neighbour patch matches on top,
sparse mutual nearest neighbours below → (W1 + W2) × 2·max(H1, H2). Nearest neighbours are found
in row chunks, so memory never holds the full N1 × N2 similarity matrix."""

from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image, ImageDraw

from dinov3_jax.show.panels import fit, hstack, label, panel_size, vstack


def nearest_neighbours(f1: np.ndarray, f2: np.ndarray, chunk: int = 1024) -> tuple[np.ndarray, ...]:
    """Cosine nearest neighbours between two sets [N1, D], [N2, D], in row chunks:
    (nn12 [N1], sim12 [N1], nn21 [N2])."""
    a = f1 / np.maximum(np.linalg.norm(f1, axis=-1, keepdims=True), 1e-12)
    b = f2 / np.maximum(np.linalg.norm(f2, axis=-1, keepdims=True), 1e-12)
    nn12 = np.empty(len(a), np.int64)
    sim12 = np.empty(len(a), np.float32)
    best21 = np.full(len(b), -np.inf, np.float32)
    nn21 = np.zeros(len(b), np.int64)
    for start in range(0, len(a), chunk):
        s = a[start : start + chunk] @ b.T
        nn12[start : start + len(s)] = s.argmax(1)
        sim12[start : start + len(s)] = s.max(1)
        col_best = s.max(0)
        better = col_best > best21
        best21[better] = col_best[better]
        nn21[better] = s.argmax(0)[better] + start
    return nn12, sim12, nn21


def mutual_nearest_neighbours(f1: np.ndarray, f2: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (i, j) with j the nearest neighbour of i and i that of j: (i [M], j [M], cosine [M])."""
    nn12, sim12, nn21 = nearest_neighbours(f1, f2)
    i = np.nonzero(nn21[nn12] == np.arange(len(f1)))[0]
    return i, nn12[i], sim12[i]


def _spread(n: int, k: int) -> np.ndarray:
    """`k` indices spread evenly over range(n) (all of them when n ≤ k)."""
    if n <= k:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, k).round().astype(np.int64))


def _grid_subset(h: int, w: int, k: int) -> np.ndarray:
    """At most `k` patch indices of an h×w grid on a regular sub-grid (every s-th row and column)."""
    s = max(1, int(np.ceil(np.sqrt(h * w / max(k, 1)))))
    idx = np.array([r * w + c for r in range(s // 2, h, s) for c in range(s // 2, w, s)], np.int64)
    return idx[_spread(len(idx), k)]


def _draw_matches(pair: Image.Image, offset_x: int, pts1: np.ndarray, pts2: np.ndarray, colours) -> Image.Image:
    draw = ImageDraw.Draw(pair)
    for (x1, y1), (x2, y2), c in zip(pts1, pts2, colours):
        draw.line((x1, y1, x2 + offset_x, y2), fill=c, width=1)
        for x, y in ((x1, y1), (x2 + offset_x, y2)):
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=c)
    return pair


def match_picture(
    image1: Image.Image,
    features1: np.ndarray,
    image2: Image.Image,
    features2: np.ndarray,
    max_lines: int = 60,
    panel: int | None = None,
) -> Image.Image:
    """Dense matches (patches of image 1 on a regular sub-grid to their nearest neighbour in
    image 2) and sparse mutual nearest neighbours (an even subset)."""
    (h1, w1, d), (h2, w2, _) = features1.shape, features2.shape
    wh1 = panel_size((image1.height, image1.width), panel)
    wh2 = panel_size((image2.height, image2.width), panel)
    a, b = fit(image1, wh1), fit(image2, wh2)

    def centres(idx, h, w, wh):
        r, c = np.divmod(idx, w)
        return np.stack([(c + 0.5) * wh[0] / w, (r + 0.5) * wh[1] / h], axis=1)

    def colours(idx):
        r, c = np.divmod(idx, w1)
        return [
            tuple(int(255 * v) for v in colorsys.hsv_to_rgb(cc / max(w1, 1), 0.9, 0.6 + 0.4 * rr / max(h1 - 1, 1)))
            for rr, cc in zip(r, c)
        ]

    f1, f2 = features1.reshape(-1, d), features2.reshape(-1, d)
    nn12, _, _ = nearest_neighbours(f1, f2)
    dense_idx = _grid_subset(h1, w1, max_lines)
    mnn_i, mnn_j, _ = mutual_nearest_neighbours(f1, f2)
    pick = _spread(len(mnn_i), max_lines)
    top = _draw_matches(
        label(hstack([a, b]), "dense NN"),
        wh1[0],
        centres(dense_idx, h1, w1, wh1),
        centres(nn12[dense_idx], h2, w2, wh2),
        colours(dense_idx),
    )
    bottom = _draw_matches(
        label(hstack([a, b]), f"mutual NN ({len(mnn_i)})"),
        wh1[0],
        centres(mnn_i[pick], h1, w1, wh1),
        centres(mnn_j[pick], h2, w2, wh2),
        colours(mnn_i[pick]),
    )
    return vstack([top, bottom])
