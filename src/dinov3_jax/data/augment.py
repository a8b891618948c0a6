"""DINOv3 multi-crop augmentation on PIL images (RECIPE.md §6.2), randomness from a numpy Generator.

Per image: 2 global crops and L local crops. Global crop 1: crop+flip → colour jitter (p 0.8) →
grayscale (p 0.2) → never blurred. Global crop 2: the same, blurred with probability 0.9, then
solarised (p 0.2). Local crops: blurred with probability 0.5. These are the *effective*
probabilities of the official code (which passes ``1 - p`` to ``RandomApply``, dinov3 issue #286).
Output crops are float32 HWC, ``(x / 255 - mean) / std``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Effective probabilities (see the module docstring).
BLUR_P_GLOBAL1 = 0.0
BLUR_P_GLOBAL2 = 0.9
BLUR_P_LOCAL = 0.5
SOLARIZE_P_GLOBAL2 = 0.2
COLOR_JITTER_P = 0.8
GRAYSCALE_P = 0.2
BLUR_KERNEL = 9
BLUR_SIGMA = (0.1, 2.0)


@dataclass(frozen=True)
class AugmentConfig:
    """The ``crops.*`` keys of the official config that the augmentation uses."""

    global_crops_size: int = 224
    local_crops_size: int = 96
    local_crops_number: int = 8
    global_crops_scale: tuple[float, float] = (0.32, 1.0)
    local_crops_scale: tuple[float, float] = (0.05, 0.32)
    horizontal_flips: bool = True
    # Project additions (official values): brightness, contrast, saturation, hue jitter strengths,
    # the probability of the jitter and of grayscale.
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    color_jitter_prob: float = COLOR_JITTER_P
    grayscale_prob: float = GRAYSCALE_P
    rgb_mean: tuple[float, float, float] = IMAGENET_MEAN
    rgb_std: tuple[float, float, float] = IMAGENET_STD

    @classmethod
    def from_any(cls, crops: Any = None, **overrides: Any) -> AugmentConfig:
        """From an object (e.g. ``cfg.crops``) or mapping with these attribute names; missing
        keys keep the defaults; ``overrides`` that are not None win."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            if isinstance(crops, dict) and f.name in crops:
                values[f.name] = crops[f.name]
            elif crops is not None and not isinstance(crops, dict) and hasattr(crops, f.name):
                values[f.name] = getattr(crops, f.name)
            if overrides.get(f.name) is not None:
                values[f.name] = overrides[f.name]
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise TypeError(f"unknown augmentation options {sorted(unknown)}")
        for k in ("global_crops_size", "local_crops_size"):
            if isinstance(values.get(k), (tuple, list)):
                if len(values[k]) != 1:
                    raise NotImplementedError(f"crops.{k}={values[k]}: multi-resolution crops are not supported")
                values[k] = values[k][0]
        for k in ("global_crops_scale", "local_crops_scale", "color_jitter", "rgb_mean", "rgb_std"):
            if k in values:
                values[k] = tuple(float(x) for x in values[k])
        return cls(**values)


# ---------------------------------------------------------------------------------------------
# Geometric
# ---------------------------------------------------------------------------------------------


def random_resized_crop_box(
    rng: np.random.Generator,
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a random crop: area fraction ~ U(scale), log-aspect ~ U(log ratio),
    10 attempts, then a centre crop clamped to the ratio range (the torchvision algorithm)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = round(w / min(ratio))
    elif in_ratio > max(ratio):
        h = height
        w = round(h * max(ratio))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(
    img: Image.Image, rng: np.random.Generator, size: int, scale: tuple[float, float]
) -> Image.Image:
    top, left, h, w = random_resized_crop_box(rng, img.width, img.height, scale)
    return img.resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h))


# ---------------------------------------------------------------------------------------------
# Photometric
# ---------------------------------------------------------------------------------------------


def adjust_hue(img: Image.Image, hue: float) -> Image.Image:
    """Rotate the hue by ``hue`` turns (in [-0.5, 0.5]) through PIL's 8-bit HSV."""
    if hue == 0:
        return img
    h, s, v = img.convert("HSV").split()
    shift = np.uint8(round(hue * 255) % 256)
    h = Image.fromarray(np.asarray(h, np.uint8) + shift, "L")  # uint8 wrap-around = rotation
    return Image.merge("HSV", (h, s, v)).convert("RGB")


def color_jitter(
    img: Image.Image,
    rng: np.random.Generator,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.2,
    hue: float = 0.1,
) -> Image.Image:
    """Brightness/contrast/saturation factors ~ U(1 ± x), hue ~ U(±hue), applied in random order."""
    order = rng.permutation(4)
    b = rng.uniform(1 - brightness, 1 + brightness)
    c = rng.uniform(1 - contrast, 1 + contrast)
    s = rng.uniform(1 - saturation, 1 + saturation)
    h = rng.uniform(-hue, hue)
    for op in order:
        if op == 0:
            img = ImageEnhance.Brightness(img).enhance(b)
        elif op == 1:
            img = ImageEnhance.Contrast(img).enhance(c)
        elif op == 2:
            img = ImageEnhance.Color(img).enhance(s)
        else:
            img = adjust_hue(img, h)
    return img


def grayscale(img: Image.Image) -> Image.Image:
    return img.convert("L").convert("RGB")


def gaussian_kernel1d(sigma: float, size: int = BLUR_KERNEL) -> np.ndarray:
    x = np.arange(size, dtype=np.float32) - (size - 1) / 2
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


def gaussian_blur(img: Image.Image, sigma: float, size: int = BLUR_KERNEL) -> Image.Image:
    """Separable ``size``×``size`` Gaussian with reflect padding, rounded back to uint8."""
    x = np.asarray(img, np.float32)
    k = gaussian_kernel1d(sigma, size)
    r = size // 2
    h, w = x.shape[:2]
    pad = np.pad(x, ((r, r), (0, 0), (0, 0)), mode="reflect")
    x = sum(k[i] * pad[i : i + h] for i in range(size))
    pad = np.pad(x, ((0, 0), (r, r), (0, 0)), mode="reflect")
    x = sum(k[i] * pad[:, i : i + w] for i in range(size))
    return Image.fromarray(np.clip(np.rint(x), 0, 255).astype(np.uint8), "RGB")


def solarize(img: Image.Image, threshold: int = 128) -> Image.Image:
    """Invert every pixel value ≥ threshold."""
    return ImageOps.solarize(img, threshold)


def normalize(img: Image.Image, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    return (np.asarray(img, np.float32) / np.float32(255.0) - mean) / std


# ---------------------------------------------------------------------------------------------
# Multi-crop
# ---------------------------------------------------------------------------------------------


def to_pil_rgb(image: Image.Image | np.ndarray) -> Image.Image:
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise TypeError(f"array images must be uint8, got {arr.dtype}")
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ValueError(f"array images must be [H, W] or [H, W, 1|3|4], got {arr.shape}")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return Image.fromarray(np.ascontiguousarray(arr[:, :, :3]), "RGB")


class DataAugmentationDINO:
    """``aug(image, rng) -> {"global_crops": [2, S, S, 3], "local_crops": [L, s, s, 3]}`` float32."""

    def __init__(self, cfg: AugmentConfig | None = None, **overrides: Any):
        self.cfg = cfg = AugmentConfig.from_any(cfg, **overrides)
        self.mean = np.asarray(cfg.rgb_mean, np.float32)
        self.std = np.asarray(cfg.rgb_std, np.float32)
        self.flip_p = 0.5 if cfg.horizontal_flips else 0.0

    def _geometric(self, img: Image.Image, rng: np.random.Generator, size: int, scale) -> Image.Image:
        img = random_resized_crop(img, rng, size, scale)
        if rng.random() < self.flip_p:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return img

    def _photometric(
        self,
        img: Image.Image,
        rng: np.random.Generator,
        blur_p: float,
        solarize_p: float = 0.0,
        trace: dict[str, bool] | None = None,
    ) -> np.ndarray:
        applied = {"jitter": rng.random() < self.cfg.color_jitter_prob}
        if applied["jitter"]:
            img = color_jitter(img, rng, *self.cfg.color_jitter)
        applied["grayscale"] = rng.random() < self.cfg.grayscale_prob
        if applied["grayscale"]:
            img = grayscale(img)
        applied["blur"] = rng.random() < blur_p
        if applied["blur"]:
            img = gaussian_blur(img, rng.uniform(*BLUR_SIGMA))
        applied["solarize"] = rng.random() < solarize_p
        if applied["solarize"]:
            img = solarize(img, 128)
        if trace is not None:
            trace.update(applied)
        return normalize(img, self.mean, self.std)

    def __call__(
        self, image: Image.Image | np.ndarray, rng: np.random.Generator, trace: list[dict] | None = None
    ) -> dict[str, np.ndarray]:
        """Pass a list as ``trace`` to get, per crop, which photometric ops were applied."""
        img = to_pil_rgb(image)
        c = self.cfg
        names = ["global1", "global2"] + [f"local{i}" for i in range(c.local_crops_number)]
        records = [{"crop": n} for n in names]
        if trace is not None:
            trace.extend(records)
        g1 = self._geometric(img, rng, c.global_crops_size, c.global_crops_scale)
        g1 = self._photometric(g1, rng, BLUR_P_GLOBAL1, trace=records[0])
        g2 = self._geometric(img, rng, c.global_crops_size, c.global_crops_scale)
        g2 = self._photometric(g2, rng, BLUR_P_GLOBAL2, SOLARIZE_P_GLOBAL2, trace=records[1])
        locs = [
            self._photometric(
                self._geometric(img, rng, c.local_crops_size, c.local_crops_scale),
                rng,
                BLUR_P_LOCAL,
                trace=records[2 + i],
            )
            for i in range(c.local_crops_number)
        ]
        s = c.local_crops_size
        return {
            "global_crops": np.stack([g1, g2]),
            "local_crops": np.stack(locs) if locs else np.zeros((0, s, s, 3), np.float32),
        }
