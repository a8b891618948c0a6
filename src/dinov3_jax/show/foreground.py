"""`show foreground`: [image | foreground probability (white = 1) | image with the background
(p < 0.5) dimmed] → 3W × H, from a linear foreground classifier on patch features.

The classifier (also behind `pca --foreground`) is an L2-regularised logistic regression on
standardised patch features, fitted with Newton's method in NumPy on patches whose mask is clearly
foreground (≥ 75 % of their pixels) or background (≤ 25 %). By default it is trained on 16 images
of the built-in synthetic shapes (224 px) with their masks; `--train-images DIR --train-masks DIR`
use your own images and masks (matched by file stem; mask pixels > 0 are foreground, 255 ignored).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from dinov3_jax.backbone import Backbone
from dinov3_jax.data.images import decode, images_by_stem
from dinov3_jax.show.model import patch_features
from dinov3_jax.show.panels import fit, hstack, panel_size, picture_size, to_image, upsample

IGNORE_INDEX = 255


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
    masks = images_by_stem(masks_dir)
    pairs = []
    for stem, path in images_by_stem(images_dir).items():
        if stem in masks:
            with Image.open(masks[stem]) as m:
                mask = np.asarray(m.convert("L") if m.mode not in ("L", "P") else m)
            pairs.append((decode(path), mask))
    if not pairs:
        raise ValueError(f"no image in {images_dir} has a mask of the same name in {masks_dir}")
    return pairs


def train_foreground_classifier(
    backbone: Backbone,
    pairs: Sequence[tuple[Image.Image | np.ndarray, np.ndarray]],
    resolution: str | int | Sequence[int] = 224,
    l2: float = 1.0,
) -> ForegroundClassifier:
    """Fit the classifier on patch features of labelled (image, mask) pairs (mask > 0 = foreground)."""
    xs, ys = [], []
    for image, mask in pairs:
        image = image if isinstance(image, Image.Image) else Image.fromarray(image)
        size = picture_size(image.size, resolution, backbone.stride)
        feats = patch_features(backbone, image, size)
        mask_img = Image.fromarray(np.asarray(mask, np.uint8)).resize((size[1], size[0]), Image.Resampling.NEAREST)
        target = patch_targets(np.asarray(mask_img), feats.shape[:2]).reshape(-1)
        keep = target >= 0
        xs.append(feats.reshape(-1, feats.shape[-1])[keep])
        ys.append(target[keep])
    return fit_logistic_regression(np.concatenate(xs), np.concatenate(ys), l2=l2)


def foreground_picture(image: Image.Image, probability: np.ndarray, panel: int | None = None) -> Image.Image:
    wh = panel_size((image.height, image.width), panel)
    base = fit(image, wh)
    prob = np.clip(upsample(probability, wh), 0, 1)
    gray = np.repeat(prob[..., None], 3, axis=-1)
    dim = np.where(prob[..., None] >= 0.5, 1.0, 0.2)
    overlay = np.asarray(base, np.float32) * dim
    return hstack([base, to_image(gray), Image.fromarray(np.rint(overlay).astype(np.uint8))])
