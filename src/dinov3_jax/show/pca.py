"""`show pca`: [image | the first three principal components of the patch features as RGB] → 2W × H.

With `--foreground`, PCA is fitted on the patches the foreground classifier keeps and the
background is black (the paper's PCA pictures, arXiv 2508.10104 Fig. 1 and §6)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from dinov3_jax.show.panels import fit, hstack, minmax, panel_size, to_image, upsample


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


def pca_picture(
    image: Image.Image, features: np.ndarray, foreground: np.ndarray | None = None, panel: int | None = None
) -> Image.Image:
    """[image | PCA rainbow]; with `foreground` ([h, w] bool) PCA uses those patches only, others black."""
    wh = panel_size((image.height, image.width), panel)
    rgb = pca_rgb(features, foreground)
    # With a foreground, hard edges: the background stays black instead of bleeding into the foreground.
    up = upsample(rgb, wh, Image.Resampling.NEAREST) if foreground is not None else upsample(rgb, wh)
    return hstack([fit(image, wh), to_image(up)])
