"""Evaluation preprocessing, as the official DINOv3 feature transform (RECIPE.md §6.1).

An image file is decoded with PIL and converted to RGB, resized to a fixed (H, W) with
antialiased bilinear interpolation, scaled to [0, 1] and normalised with the mean/std of the
model's training data (RECIPE.md §1.11). The result is an HWC float32 array.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from dinov3_jax.models.registry import NORMALIZATION

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})


def is_image_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def find_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Image files under `inputs` (folders, searched recursively by extension, and files).

    Inputs keep their order; within a folder files are sorted by relative path. A file reached
    twice (same resolved path) is listed once, where it first appears.
    """
    found: list[Path] = []
    seen: set[Path] = set()
    for item in inputs:
        root = Path(item)
        if root.is_dir():
            rels = [
                Path(dirpath, name).relative_to(root)
                for dirpath, _, names in os.walk(root)
                for name in names
                if is_image_file(name)
            ]
            candidates = [root / rel for rel in sorted(rels, key=lambda p: p.parts)]
        elif root.is_file():
            # A file named explicitly is taken whatever its extension: the user chose it.
            candidates = [root]
        else:
            raise FileNotFoundError(f"input not found: {root}")
        for path in candidates:
            key = path.resolve()
            if key not in seen:
                seen.add(key)
                found.append(path)
    return found


def parse_resolution(text: str | int | Sequence[int]) -> tuple[int, int]:
    """(H, W) from 224, "224", "448x640" or (448, 640)."""
    if isinstance(text, int):
        hw = (text, text)
    elif isinstance(text, str):
        match = re.fullmatch(r"\s*(\d+)\s*(?:[xX×,]\s*(\d+)\s*)?", text)
        if not match:
            raise ValueError(f"resolution {text!r}: expected an integer (square) or HxW such as 448x640")
        h = int(match.group(1))
        hw = (h, int(match.group(2)) if match.group(2) else h)
    else:
        hw = tuple(int(v) for v in text)
        if len(hw) != 2:
            raise ValueError(f"resolution {text!r}: expected (H, W)")
    if min(hw) <= 0:
        raise ValueError(f"resolution {hw[0]}x{hw[1]}: both sides must be positive")
    return hw


def check_resolution(hw: tuple[int, int], patch_size: int) -> tuple[int, int]:
    """The patch grid (h, w); an error unless both sides are multiples of the patch size."""
    if hw[0] % patch_size or hw[1] % patch_size:
        raise ValueError(
            f"resolution {hw[0]}x{hw[1]} is not a multiple of the patch size {patch_size} "
            f"(for example {max(1, round(hw[0] / patch_size)) * patch_size}x"
            f"{max(1, round(hw[1] / patch_size)) * patch_size})"
        )
    return hw[0] // patch_size, hw[1] // patch_size


def mean_std(normalization: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        mean, std = NORMALIZATION[normalization]
    except KeyError:
        raise ValueError(f"unknown normalization {normalization!r}; expected one of {sorted(NORMALIZATION)}") from None
    return np.asarray(mean, np.float32), np.asarray(std, np.float32)


def load_rgb(path: str | Path) -> Image.Image:
    """The decoded image in RGB mode (grayscale, palette, RGBA, CMYK, 16-bit all accepted)."""
    with Image.open(path) as img:
        img.load()  # decode now, so a truncated or corrupt file fails here, inside the try of the caller
        if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
            # 16-bit grayscale: PIL's own conversion to 8 bits clips at 255 instead of rescaling.
            arr = np.asarray(img, dtype=np.float64)
            arr = np.clip(np.round(arr / 257.0), 0, 255).astype(np.uint8)
            return Image.fromarray(arr, "L").convert("RGB")
        if img.mode == "P" and "transparency" in img.info:
            # Going through RGBA avoids PIL's palette-transparency warning; the colours are the same.
            img = img.convert("RGBA")
        return img.convert("RGB")


def preprocess(
    img: Image.Image, size: tuple[int, int], mean: np.ndarray | Iterable[float], std: np.ndarray | Iterable[float]
) -> np.ndarray:
    """Resize an RGB image to `size` = (H, W) (bilinear, antialiased when shrinking: PIL widens
    the filter by the scale factor), scale to [0, 1], normalise. Returns [H, W, 3] float32."""
    h, w = size
    if img.mode != "RGB":
        img = img.convert("RGB")
    if img.size != (w, h):
        img = img.resize((w, h), Image.Resampling.BILINEAR)
    x = np.asarray(img, dtype=np.float32) / np.float32(255.0)
    mean = np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)
    return (x - mean) / std


def load_image(path: str | Path, size: tuple[int, int], normalization: str = "lvd") -> np.ndarray:
    """`path` decoded and preprocessed for evaluation: [H, W, 3] float32."""
    mean, std = mean_std(normalization)
    return preprocess(load_rgb(path), size, mean, std)
