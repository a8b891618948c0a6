"""What the pictures need from a backbone, one image at a time, through the shared extraction
loop: the resized image, its final-normed patch features [h, w, D] and (ViT only) the last
block's attention of the CLS and register queries [1+R, heads, h, w]."""

from __future__ import annotations

import numpy as np
from PIL import Image

from dinov3_jax.backbone import Backbone, Outputs
from dinov3_jax.data.images import Resize, to_rgb
from dinov3_jax.data.sources import InMemoryImages
from dinov3_jax.eval.extract import extract


def resized(image: Image.Image | np.ndarray, size_hw: tuple[int, int]) -> Image.Image:
    """The RGB image at the picture size, as the model sees it (before normalisation)."""
    return Resize(size_hw)(to_rgb(image))


def patch_features(backbone: Backbone, image: Image.Image | np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Final-normed patch features [h, w, D] (float32) of one image resized to `size_hw`."""
    result = extract(backbone, InMemoryImages([image]), transform=Resize(size_hw), outputs=Outputs(patch=True))
    return result["patch"][0]


def prefix_attention(backbone: Backbone, image: Image.Image | np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Last-block attention of CLS and registers to the patches: [1+R, heads, h, w] (fp32)."""
    result = extract(backbone, InMemoryImages([image]), transform=Resize(size_hw), outputs=Outputs(attention=True))
    attn = result["attention"][0]  # [heads, 1+R, h·w]
    h, w = size_hw[0] // backbone.stride, size_hw[1] // backbone.stride
    return attn.reshape(attn.shape[0], attn.shape[1], h, w).transpose(1, 0, 2, 3)
