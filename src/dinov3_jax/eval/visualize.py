"""Pictures of patch features: `dinov3-jax show pca|similarity|attention|foreground|match`.

Every picture is a PNG made of panels. Sizes are predictable: the input image is resized (bilinear)
to the *picture size* and each panel has that size unless stated otherwise:

- `--resolution N` (default 448): the longer side becomes N and the shorter side keeps the aspect
  ratio, rounded to a multiple of the patch size (at least one patch); `--resolution HxW` is exact.
  Both must be multiples of the patch size.
- `pca`: [image | PCA rainbow] → 2W × H.
- `similarity`: [image with the point marked | cosine-similarity heat map over the image] → 2W × H.
- `attention`: rows = CLS then each register; columns = image, mean over heads, each head →
  (2 + heads)·w × (1 + R)·h, where each panel (h, w) is the picture size shrunk so that its longer
  side is at most 256 px (`--panel-size` changes the cap).
- `foreground`: [image | foreground probability | image with the background dimmed] → 3W × H.
- `match`: two rows of [image 1 | image 2]: dense nearest-neighbour matches on top, sparse mutual
  nearest neighbours below → (W1 + W2) × 2·max(H1, H2).

`--panel-size P` rescales every panel so its longer side is P. Memory stays per image and linear
in the number of patches wherever possible: attention maps use only the CLS/register query rows
(`get_last_self_attention(prefix_only=True)`), and nearest neighbours are found in row chunks.

The foreground classifier (for `foreground` and `pca --foreground`) is an L2-regularised logistic
regression on standardised patch features, fitted with Newton's method in NumPy on patches whose
mask is clearly foreground (≥ 75 % of their pixels) or background (≤ 25 %). By default it is trained
on 16 images of the built-in synthetic shapes (224 px) with their masks; `--train-images DIR
--train-masks DIR` use your own images and masks instead (matched by file stem; mask pixels > 0
are foreground, 255 is ignored).
"""

from __future__ import annotations

import argparse
import colorsys
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dinov3_jax.data.preprocess import (
    IMAGE_EXTENSIONS,
    check_resolution,
    load_rgb,
    mean_std,
    parse_resolution,
    preprocess,
)

KINDS = ("pca", "similarity", "attention", "foreground", "match")
DEFAULT_RESOLUTION = "448"
ATTENTION_PANEL_CAP = 256
IGNORE_INDEX = 255

# A perceptually ordered dark-blue → teal → green → yellow ramp (viridis-like anchor colours).
_RAMP = np.array(
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]],
    dtype=np.float32,
)


# ---------------------------------------------------------------------------------------------
# Small image helpers
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Model access (one image at a time)
# ---------------------------------------------------------------------------------------------


class FeatureExtractor:
    """Jitted per-image access to a backbone: patch features [h, w, D] and prefix attention."""

    def __init__(self, model, normalization: str = "lvd"):
        from dinov3_jax.inference import jit_method

        self.model = model
        self.patch_size = model.config.patch_size
        self.mean, self.std = mean_std(normalization)
        self._patches = jit_method(model, "get_intermediate_layers", n=1, reshape=True)
        self._attention = jit_method(model, "get_last_self_attention", prefix_only=True)

    def prepare(self, image: Image.Image | np.ndarray, size_hw: tuple[int, int]) -> tuple[Image.Image, np.ndarray]:
        """The resized RGB image (for display) and the model input [1, H, W, 3]."""
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        image = image.convert("RGB")
        h, w = size_hw
        resized = image if image.size == (w, h) else image.resize((w, h), Image.Resampling.BILINEAR)
        return resized, preprocess(resized, size_hw, self.mean, self.std)[None]

    def patch_features(self, x: np.ndarray) -> np.ndarray:
        """Final-normed patch tokens [h, w, D] (float32) of one model input [1, H, W, 3]."""
        return np.asarray(self._patches(x)[0][0], np.float32)

    def prefix_attention(self, x: np.ndarray) -> np.ndarray:
        """Last-block attention of CLS and registers to the patches: [1+R, heads, h, w] (fp32)."""
        attn = np.asarray(self._attention(x)[0], np.float32)  # [heads, 1+R, N]
        k = self.model.n_prefix_tokens
        h, w = x.shape[1] // self.patch_size, x.shape[2] // self.patch_size
        return attn[:, :, k:].reshape(attn.shape[0], k, h, w).transpose(1, 0, 2, 3)


# ---------------------------------------------------------------------------------------------
# Feature computations
# ---------------------------------------------------------------------------------------------


def pca_rgb(features: np.ndarray, keep: np.ndarray | None = None, n_components: int = 3) -> np.ndarray:
    """The first principal components of patch features [h, w, D] as colours [h, w, 3] in [0, 1].

    PCA is fitted on the patches in `keep` (all when None) and each component is min-max scaled
    over them; the other patches are black.
    """
    h, w, d = features.shape
    flat = features.reshape(-1, d).astype(np.float64)
    keep = np.ones(h * w, bool) if keep is None else np.asarray(keep, bool).reshape(-1)
    if keep.sum() < 2:
        keep = np.ones(h * w, bool)
    x = flat[keep] - flat[keep].mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    proj = x @ vt[:n_components].T
    if proj.shape[1] < 3:
        proj = np.pad(proj, ((0, 0), (0, 3 - proj.shape[1])))
    out = np.zeros((h * w, 3), np.float32)
    out[keep] = minmax(proj, axis=0)
    return out.reshape(h, w, 3)


def cosine_similarity_map(features: np.ndarray, row: int, col: int) -> np.ndarray:
    """Cosine similarity [h, w] between patch (row, col) and every patch."""
    f = features / np.maximum(np.linalg.norm(features, axis=-1, keepdims=True), 1e-12)
    return np.einsum("hwd,d->hw", f, f[row, col])


def nearest_neighbours(f1: np.ndarray, f2: np.ndarray, chunk: int = 1024) -> tuple[np.ndarray, ...]:
    """Cosine nearest neighbours between two sets [N1, D], [N2, D], in row chunks (never N1×N2 at once):
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


@dataclasses.dataclass
class ForegroundClassifier:
    """Logistic regression on standardised patch features: P(fg) = σ(((f - mean) / std) · w + b)."""

    weight: np.ndarray
    bias: float
    mean: np.ndarray
    std: np.ndarray

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        z = ((features - self.mean) / self.std) @ self.weight + self.bias
        return 1.0 / (1.0 + np.exp(-np.clip(z, -60, 60)))


def fit_logistic_regression(
    x: np.ndarray, y: np.ndarray, l2: float = 1.0, iterations: int = 30, tol: float = 1e-6
) -> ForegroundClassifier:
    """Binary logistic regression (L2 on the weights, not the bias) by Newton's method, float64."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64).reshape(-1)
    if len(np.unique(y)) < 2:
        raise ValueError("the foreground classifier needs both foreground and background patches")
    mean, std = x.mean(0), x.std(0) + 1e-6
    a = np.concatenate([(x - mean) / std, np.ones((len(x), 1))], axis=1)
    reg = np.full(a.shape[1], l2)
    reg[-1] = 0.0
    w = np.zeros(a.shape[1])
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-np.clip(a @ w, -60, 60)))
        grad = a.T @ (p - y) + reg * w
        hess = (a * (p * (1 - p))[:, None]).T @ a + np.diag(reg + 1e-9)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < tol:
            break
    return ForegroundClassifier(
        w[:-1].astype(np.float32), float(w[-1]), mean.astype(np.float32), std.astype(np.float32)
    )


def patch_targets(mask: np.ndarray, grid: tuple[int, int], lo: float = 0.25, hi: float = 0.75) -> np.ndarray:
    """Per-patch foreground targets from a pixel mask already at the picture size: 1 where at least
    `hi` of the (non-ignored) pixels are foreground (> 0), 0 where at most `lo`, -1 otherwise."""
    h, w = grid
    p_h, p_w = mask.shape[0] // h, mask.shape[1] // w
    m = mask[: h * p_h, : w * p_w].reshape(h, p_h, w, p_w)
    valid = (m != IGNORE_INDEX).sum((1, 3))
    fg = ((m > 0) & (m != IGNORE_INDEX)).sum((1, 3))
    frac = np.where(valid > 0, fg / np.maximum(valid, 1), 0.5)
    return np.where(frac >= hi, 1, np.where(frac <= lo, 0, -1)).astype(np.int64)


def synthetic_training_pairs(n: int = 16, size: int = 224, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Built-in labelled images for the foreground classifier: synthetic shapes and their masks."""
    from dinov3_jax.data.sources import SyntheticSource

    source = SyntheticSource(n, image_size=size, seed=seed, split="train")
    return [(img, fg.astype(np.uint8)) for img, fg, _ in (source.render(i) for i in range(n))]


def folder_training_pairs(images_dir: str | Path, masks_dir: str | Path) -> list[tuple[Image.Image, np.ndarray]]:
    masks = {p.stem: p for p in Path(masks_dir).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS}
    pairs = []
    for path in sorted(Path(images_dir).iterdir()):
        if path.suffix.lower() in IMAGE_EXTENSIONS and path.stem in masks:
            with Image.open(masks[path.stem]) as m:
                mask = np.asarray(m.convert("L") if m.mode not in ("L", "P") else m)
            pairs.append((load_rgb(path), mask))
    if not pairs:
        raise ValueError(f"no image in {images_dir} has a mask of the same name in {masks_dir}")
    return pairs


def train_foreground_classifier(
    extractor: FeatureExtractor,
    pairs: Sequence[tuple[Image.Image | np.ndarray, np.ndarray]],
    resolution: str | int | Sequence[int] = 224,
    l2: float = 1.0,
) -> ForegroundClassifier:
    """Fit the classifier on patch features of labelled (image, mask) pairs (mask > 0 = foreground)."""
    xs, ys = [], []
    p = extractor.patch_size
    for image, mask in pairs:
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        size = picture_size(image.size, resolution, p)
        _, x = extractor.prepare(image, size)
        feats = extractor.patch_features(x)
        mask_img = Image.fromarray(np.asarray(mask, np.uint8)).resize((size[1], size[0]), Image.Resampling.NEAREST)
        target = patch_targets(np.asarray(mask_img), feats.shape[:2]).reshape(-1)
        keep = target >= 0
        xs.append(feats.reshape(-1, feats.shape[-1])[keep])
        ys.append(target[keep])
    return fit_logistic_regression(np.concatenate(xs), np.concatenate(ys), l2=l2)


# ---------------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------------


def _panel(image: Image.Image, size_wh: tuple[int, int]) -> Image.Image:
    return image if image.size == size_wh else image.resize(size_wh, Image.Resampling.BILINEAR)


def pca_picture(
    image: Image.Image, features: np.ndarray, foreground: np.ndarray | None = None, panel: int | None = None
) -> Image.Image:
    """[image | PCA rainbow]; with `foreground` ([h, w] bool) PCA uses those patches only, others black."""
    wh = panel_size((image.height, image.width), panel)
    rgb = pca_rgb(features, foreground)
    if foreground is not None:
        # Hard edges: the background stays black instead of bleeding into the foreground.
        up = upsample(rgb, wh, Image.Resampling.NEAREST)
    else:
        up = upsample(rgb, wh)
    return hstack([_panel(image, wh), to_image(up)])


def similarity_picture(
    image: Image.Image, features: np.ndarray, point_xy: tuple[int, int], panel: int | None = None
) -> Image.Image:
    """[image with the point marked | cosine similarity to the patch under the point, over the image]."""
    h, w = features.shape[:2]
    p_h, p_w = image.height / h, image.width / w
    x, y = point_xy
    if not (0 <= x < image.width and 0 <= y < image.height):
        raise ValueError(f"--point {x} {y} is outside the {image.width}x{image.height} resized image")
    row, col = min(int(y // p_h), h - 1), min(int(x // p_w), w - 1)
    sim = cosine_similarity_map(features, row, col)
    wh = panel_size((image.height, image.width), panel)
    base = _panel(image, wh)
    overlay = blend(base, colorize(minmax(upsample(sim, wh))))
    marked = base.copy()
    sx, sy = wh[0] / image.width, wh[1] / image.height
    for im in (marked, overlay):
        draw = ImageDraw.Draw(im)
        cx, cy, r = x * sx, y * sy, max(3.0, 0.4 * min(p_w * sx, p_h * sy))
        draw.ellipse((cx - r - 1, cy - r - 1, cx + r + 1, cy + r + 1), outline=(0, 0, 0), width=2)
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=(255, 60, 60), width=2)
    return hstack([marked, overlay])


def attention_picture(image: Image.Image, attention: np.ndarray, panel: int | None = None) -> Image.Image:
    """Grid: a row per query token (CLS, then registers), columns image | mean over heads | each head.

    `attention` is [1+R, heads, h, w]; every map is min-max scaled on its own.
    """
    n_queries, n_heads = attention.shape[:2]
    longest = panel if panel is not None else min(ATTENTION_PANEL_CAP, max(image.height, image.width))
    wh = panel_size((image.height, image.width), longest)
    base = _panel(image, wh)
    rows = []
    for q in range(n_queries):
        name = "CLS" if q == 0 else f"reg{q}"
        maps = [attention[q].mean(0), *attention[q]]
        titles = [f"{name} mean", *(f"{name} head {i}" for i in range(n_heads))]
        panels = [label(base.copy(), name)]
        panels += [label(to_image(colorize(minmax(upsample(m, wh)))), t) for m, t in zip(maps, titles)]
        rows.append(hstack(panels))
    return vstack(rows)


def foreground_picture(image: Image.Image, probability: np.ndarray, panel: int | None = None) -> Image.Image:
    """[image | foreground probability (white = 1) | image with the background (p < 0.5) dimmed]."""
    wh = panel_size((image.height, image.width), panel)
    base = _panel(image, wh)
    prob = np.clip(upsample(probability, wh), 0, 1)
    gray = np.repeat(prob[..., None], 3, axis=-1)
    dim = np.where(prob[..., None] >= 0.5, 1.0, 0.2)
    overlay = np.asarray(base, np.float32) * dim
    return hstack([base, to_image(gray), Image.fromarray(np.rint(overlay).astype(np.uint8))])


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
    """Two rows of [image 1 | image 2]: dense matches (patches of image 1 on a regular sub-grid to
    their nearest neighbour in image 2) and sparse mutual nearest neighbours (an even subset)."""
    (h1, w1, d), (h2, w2, _) = features1.shape, features2.shape
    wh1 = panel_size((image1.height, image1.width), panel)
    wh2 = panel_size((image2.height, image2.width), panel)
    a, b = _panel(image1, wh1), _panel(image2, wh2)

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


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Write a PNG picture of a backbone's patch features. pca: first three principal components as RGB; "
        "similarity: cosine similarity to the patch at --point X Y; attention: last-block CLS/register attention "
        "per head and averaged; foreground: linear foreground classifier; match: dense and mutual nearest-neighbour "
        "patch matches between two images. Without --weights the model is randomly initialised."
    )
    parser.add_argument("kind", choices=KINDS, help="which picture")
    parser.add_argument("--model", help="registry name (see `dinov3-jax models`); optional when --weights states it")
    parser.add_argument("--weights", help="backbone weights (official .pth, HF folder/safetensors, ours)")
    parser.add_argument("--input", nargs="+", required=True, metavar="IMAGE", help="image (two for match)")
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument(
        "--resolution",
        default=DEFAULT_RESOLUTION,
        help=f"N: longer side N px, aspect kept (default {DEFAULT_RESOLUTION}); HxW: exact. Multiples of the patch size",
    )
    parser.add_argument("--point", nargs=2, type=int, metavar=("X", "Y"), help="similarity: pixel in the resized image")
    parser.add_argument("--foreground", action="store_true", help="pca: fit on foreground patches, background black")
    parser.add_argument("--train-images", help="foreground classifier: folder of training images")
    parser.add_argument("--train-masks", help="foreground classifier: folder of masks (same stems; > 0 = foreground)")
    parser.add_argument("--max-lines", type=int, default=60, help="match: most lines drawn per row (default 60)")
    parser.add_argument("--panel-size", type=int, help="longer side of each panel in px (default: see above)")
    parser.add_argument("--normalization", choices=("lvd", "sat"), help="input mean/std; default: the model's")


def _load(args: argparse.Namespace):
    from dinov3_jax.models.registry import get_spec
    from dinov3_jax.weights import load_backbone

    if args.model is None and args.weights is None:
        raise ValueError("pass --model NAME (random weights) or --weights PATH, or both")
    model = load_backbone(args.model, args.weights)
    if args.weights is None:
        print(
            f"dinov3-jax show: warning: no --weights given, so {args.model} is RANDOMLY INITIALISED; "
            "the picture only exercises the pipeline",
            file=sys.stderr,
        )
    normalization = args.normalization or (get_spec(args.model).normalization if args.model else "lvd")
    return model, normalization


def _foreground_classifier(extractor: FeatureExtractor, args: argparse.Namespace) -> ForegroundClassifier:
    if bool(args.train_images) != bool(args.train_masks):
        raise ValueError("pass both --train-images and --train-masks, or neither (built-in synthetic masks)")
    if args.train_images:
        return train_foreground_classifier(
            extractor, folder_training_pairs(args.train_images, args.train_masks), args.resolution
        )
    return train_foreground_classifier(extractor, synthetic_training_pairs(), 224)


def make_picture(args: argparse.Namespace) -> Image.Image:
    n_inputs = 2 if args.kind == "match" else 1
    if len(args.input) != n_inputs:
        raise ValueError(f"show {args.kind} takes {n_inputs} image(s) in --input, got {len(args.input)}")
    if args.kind == "similarity" and args.point is None:
        raise ValueError("show similarity needs --point X Y (pixel coordinates in the resized image)")
    if args.panel_size is not None and args.panel_size < 1:
        raise ValueError(f"--panel-size must be positive, got {args.panel_size}")
    for path in args.input:
        if not Path(path).is_file():
            raise FileNotFoundError(f"input not found: {path}")
    model, normalization = _load(args)
    extractor = FeatureExtractor(model, normalization)
    images = [load_rgb(p) for p in args.input]
    prepared = [extractor.prepare(im, picture_size(im.size, args.resolution, extractor.patch_size)) for im in images]
    image, x = prepared[0]
    if args.kind == "attention":
        return attention_picture(image, extractor.prefix_attention(x), args.panel_size)
    features = extractor.patch_features(x)
    if args.kind == "pca":
        keep = None
        if args.foreground:
            keep = _foreground_classifier(extractor, args).predict_proba(features) >= 0.5
        return pca_picture(image, features, keep, args.panel_size)
    if args.kind == "similarity":
        return similarity_picture(image, features, tuple(args.point), args.panel_size)
    if args.kind == "foreground":
        prob = _foreground_classifier(extractor, args).predict_proba(features)
        return foreground_picture(image, prob, args.panel_size)
    image2, x2 = prepared[1]
    return match_picture(image, features, image2, extractor.patch_features(x2), args.max_lines, args.panel_size)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out must be a .png file, got {out}")
    picture = make_picture(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    picture.save(out)
    print(f"wrote {out} ({picture.width}x{picture.height})")
    return 0


__all__ = [
    "KINDS",
    "FeatureExtractor",
    "ForegroundClassifier",
    "attention_picture",
    "colorize",
    "cosine_similarity_map",
    "fit_logistic_regression",
    "foreground_picture",
    "match_picture",
    "mutual_nearest_neighbours",
    "nearest_neighbours",
    "pca_picture",
    "pca_rgb",
    "picture_size",
    "similarity_picture",
    "train_foreground_classifier",
]
