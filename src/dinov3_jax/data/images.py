"""The one image stack of the frozen-backbone tools: finding files, decoding, resizing, normalising.

Decoding gives a PIL RGB image whatever the file holds (grayscale, palette, RGBA, CMYK, 16-bit).
Two evaluation transforms (RECIPE.md §6.1, §8) bring it to the model's input size:

* `Resize((H, W))`: straight to H × W, bilinear, antialiased when shrinking (PIL widens the filter
  by the scale factor): `features`, `segment` and `show`;
* `ResizeCrop(resolution, resize_size)`: shorter side to `resize_size` (bicubic), then the centre
  `resolution` square: the k-NN and linear protocols (`resize_size = resolution · 256 / 224`) and
  logistic regression (`resize_size = resolution`).

`normalize` scales to [0, 1] and applies the mean / std the weights were trained with (LVD-1689M or
SAT-493M statistics, `models.registry.NORMALIZATION`), giving the HWC float32 model input.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from dinov3_jax.models.registry import NORMALIZATION

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)


class UnreadableImage(Exception):
    """An image file that exists in the index but cannot be opened or decoded."""

    def __init__(self, path: str | os.PathLike, reason: str = ""):
        super().__init__(str(path), reason)
        self.path = str(path)
        self.reason = reason

    def __str__(self) -> str:
        return f"unreadable image {self.path}" + (f": {self.reason}" if self.reason else "")


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


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


def images_by_stem(folder: str | Path) -> dict[str, Path]:
    """The image files directly in `folder`, by file stem (how masks are matched to images)."""
    return {p.stem: p for p in sorted(Path(folder).iterdir()) if is_image_file(p) and p.is_file()}


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------


def decode(path: str | Path) -> Image.Image:
    """The file decoded now, in RGB mode, or `UnreadableImage` naming the file and the reason."""
    try:
        with Image.open(path) as img:
            img.load()  # decode now, so a truncated or corrupt file fails here
            if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
                # 16-bit grayscale: PIL's own conversion to 8 bits clips at 255 instead of rescaling.
                arr = np.clip(np.round(np.asarray(img, dtype=np.float64) / 257.0), 0, 255).astype(np.uint8)
                return Image.fromarray(arr, "L").convert("RGB")
            if img.mode == "P" and "transparency" in img.info:
                # Going through RGBA avoids PIL's palette-transparency warning; the colours are the same.
                img = img.convert("RGBA")
            return img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise UnreadableImage(path, f"{type(err).__name__}: {err}") from err


def to_rgb(image: Image.Image | np.ndarray) -> Image.Image:
    """A PIL RGB image from a PIL image or a uint8 [H, W], [H, W, 1|3|4] array."""
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise TypeError(f"array images must be uint8, got {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ValueError(f"array images must be [H, W] or [H, W, 1|3|4], got {arr.shape}")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return Image.fromarray(np.ascontiguousarray(arr[:, :, :3]), "RGB")


# ---------------------------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------------------------


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


def check_resolution(hw: tuple[int, int], stride: int) -> tuple[int, int]:
    """The feature grid (h, w); an error unless both sides are multiples of the stride (the ViT
    patch size, 32 for a ConvNeXt)."""
    if hw[0] % stride or hw[1] % stride:
        raise ValueError(
            f"resolution {hw[0]}x{hw[1]} is not a multiple of the patch size {stride} "
            f"(for example {max(1, round(hw[0] / stride)) * stride}x{max(1, round(hw[1] / stride)) * stride})"
        )
    return hw[0] // stride, hw[1] // stride


# ---------------------------------------------------------------------------------------------
# Transforms and normalisation
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Resize:
    """Straight to `size` = (H, W), bilinear, antialiased when shrinking."""

    size: tuple[int, int]

    @property
    def out_hw(self) -> tuple[int, int]:
        return self.size

    def __call__(self, img: Image.Image) -> Image.Image:
        h, w = self.size
        return img if img.size == (w, h) else img.resize((w, h), Image.Resampling.BILINEAR)


@dataclasses.dataclass(frozen=True)
class ResizeCrop:
    """Shorter side to `resize_size` (bicubic; longer side `int(resize_size · long / short)`), then
    the centre `resolution` × `resolution` crop."""

    resolution: int
    resize_size: int

    @property
    def out_hw(self) -> tuple[int, int]:
        return self.resolution, self.resolution

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        s = self.resize_size
        new = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
        if new != (w, h):
            img = img.resize(new, Image.Resampling.BICUBIC)
        w, h = img.size
        top, left = round((h - self.resolution) / 2.0), round((w - self.resolution) / 2.0)
        return img.crop((left, top, left + self.resolution, top + self.resolution))


Transform = Resize | ResizeCrop


def mean_std(normalization: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) preset of a training dataset ("lvd" or "sat")."""
    try:
        return NORMALIZATION[normalization]
    except KeyError:
        raise ValueError(f"unknown normalization {normalization!r}; expected one of {sorted(NORMALIZATION)}") from None


def normalize(img: Image.Image, mean: Iterable[float], std: Iterable[float]) -> np.ndarray:
    """[H, W, 3] float32: pixels scaled to [0, 1], minus `mean`, over `std`."""
    x = np.asarray(to_rgb(img), dtype=np.float32) / np.float32(255.0)
    return (x - np.asarray(tuple(mean), np.float32)) / np.asarray(tuple(std), np.float32)
