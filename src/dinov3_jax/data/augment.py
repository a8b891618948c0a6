"""DINOv3 multi-crop augmentation on PIL images (RECIPE.md §6.2), randomness from a numpy Generator.

Per image: 2 global crops and L local crops. Global crop 1: crop+flip → colour jitter (p 0.8) →
grayscale (p 0.2) → never blurred. Global crop 2: the same, blurred with probability 0.9, then
solarised (p 0.2). Local crops: blurred with probability 0.5. These are the *effective*
probabilities of the official code (which passes ``1 - p`` to ``RandomApply``, dinov3 issue #286);
``AugmentConfig.inverted_blur_probabilities=False`` (the pipeline passes
``compat.inverted_blur_probabilities``) uses the nominal ones instead: global 1 always blurred,
global 2 with probability 0.1, local crops 0.5.
Output crops are float32 HWC, ``(x / 255 - mean) / std``.

Optional (RECIPE.md §6.2, all off by default): Gram-teacher crops (``gram_teacher_crops_size``,
``gram_teacher_no_distortions``), colour jitter and grayscale applied once to the whole image
before cropping (``share_color_jitter``) and local crops cut as patch-aligned windows out of the
global views (``localcrops_subset_of_globalcrops``); see :class:`DataAugmentationDINO`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance

from dinov3_jax.data.images import to_rgb
from dinov3_jax.models.registry import NORMALIZATION

# Effective probabilities (see the module docstring).
BLUR_P_GLOBAL1 = 0.0
BLUR_P_GLOBAL2 = 0.9
BLUR_P_LOCAL = 0.5
# Nominal probabilities (inverted_blur_probabilities=False).
NOMINAL_BLUR_P_GLOBAL1 = 1.0
NOMINAL_BLUR_P_GLOBAL2 = 0.1
NOMINAL_BLUR_P_LOCAL = 0.5
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
    # the probability of the jitter and of grayscale, the blur's sigma range (pixels of the crop)
    # and the probability of solarising global crop 2.
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    color_jitter_prob: float = COLOR_JITTER_P
    grayscale_prob: float = GRAYSCALE_P
    blur_sigma: tuple[float, float] = BLUR_SIGMA
    solarize_prob: float = SOLARIZE_P_GLOBAL2
    rgb_mean: tuple[float, float, float] = NORMALIZATION["lvd"][0]
    rgb_std: tuple[float, float, float] = NORMALIZATION["lvd"][1]
    # RECIPE.md §6.2 options of the official DataAugmentationDINO (defaults: off).
    gram_teacher_crops_size: int | None = None
    gram_teacher_no_distortions: bool = False
    share_color_jitter: bool = False
    localcrops_subset_of_globalcrops: bool = False
    # Not ``crops.*`` keys; the pipeline passes them as overrides. ``patch_size`` (the student's)
    # is the grid of the local-window offsets of ``localcrops_subset_of_globalcrops``;
    # ``inverted_blur_probabilities`` is ``compat.inverted_blur_probabilities`` (module docstring).
    patch_size: int = 16
    inverted_blur_probabilities: bool = True

    def __post_init__(self) -> None:
        if int(self.patch_size) != self.patch_size or self.patch_size <= 0:
            raise ValueError(f"patch_size must be a positive integer, got {self.patch_size}")
        if self.localcrops_subset_of_globalcrops and self.local_crops_size > self.global_crops_size:
            raise ValueError(
                f"crops.localcrops_subset_of_globalcrops: the local crop size {self.local_crops_size} must not "
                f"exceed the global crop size {self.global_crops_size} (local crops are windows of global views)"
            )

    def blur_probabilities(self) -> tuple[float, float, float]:
        """Blur probabilities of (global crop 1, global crop 2, local crops)."""
        if self.inverted_blur_probabilities:
            return BLUR_P_GLOBAL1, BLUR_P_GLOBAL2, BLUR_P_LOCAL
        return NOMINAL_BLUR_P_GLOBAL1, NOMINAL_BLUR_P_GLOBAL2, NOMINAL_BLUR_P_LOCAL

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
        # The config allows one size per resolution (multi-resolution training); the augmentation
        # works on one resolution at a time, so a one-element tuple is unwrapped.
        for k in ("global_crops_size", "local_crops_size", "gram_teacher_crops_size"):
            if isinstance(values.get(k), (tuple, list)):
                if len(values[k]) != 1:
                    raise NotImplementedError(f"crops.{k}={values[k]}: multi-resolution crops are not supported")
                values[k] = values[k][0]
        if values.get("gram_teacher_crops_size") is not None:
            values["gram_teacher_crops_size"] = int(values["gram_teacher_crops_size"])
            if values["gram_teacher_crops_size"] <= 0:
                raise ValueError(
                    f"crops.gram_teacher_crops_size must be positive, got {values['gram_teacher_crops_size']}"
                )
        for k in ("global_crops_scale", "local_crops_scale", "color_jitter", "blur_sigma", "rgb_mean", "rgb_std"):
            if k in values:
                values[k] = tuple(float(x) for x in values[k])
        if "patch_size" in values:
            values["patch_size"] = int(values["patch_size"])
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


def crop_resize(img: Image.Image, box: tuple[int, int, int, int], size: int) -> Image.Image:
    """Bicubic resize of the ``(top, left, h, w)`` region of ``img`` to ``size``×``size``."""
    top, left, h, w = box
    return img.resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h))


def random_resized_crop(
    img: Image.Image, rng: np.random.Generator, size: int, scale: tuple[float, float]
) -> Image.Image:
    return crop_resize(img, random_resized_crop_box(rng, img.width, img.height, scale), size)


def resize_square(img: Image.Image, size: int) -> Image.Image:
    """Bicubic resize to ``size``×``size``; a no-op at that size already (like torchvision's Resize)."""
    return img if img.size == (size, size) else img.resize((size, size), Image.BICUBIC)


# ---------------------------------------------------------------------------------------------
# Photometric
# ---------------------------------------------------------------------------------------------


def adjust_hue(img: Image.Image, hue: float) -> Image.Image:
    """Rotate the hue by ``hue`` turns (in [-0.5, 0.5]) through PIL's 8-bit HSV."""
    if hue == 0:
        return img
    hsv = np.array(img.convert("HSV"))
    hsv[..., 0] += np.uint8(round(hue * 255) % 256)  # uint8 wrap-around = rotation
    return Image.frombytes("HSV", img.size, hsv.tobytes()).convert("RGB")


def draw_jitter_params(
    rng: np.random.Generator,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.2,
    hue: float = 0.1,
) -> dict[str, Any]:
    """One colour-jitter outcome: op ``order`` (0 brightness, 1 contrast, 2 saturation, 3 hue), factors
    ~ U(1 ± x) and hue ~ U(±hue). Kept apart from :func:`apply_color_jitter` so that the outcome can
    be recorded in the augmentation trace."""
    order = tuple(int(i) for i in rng.permutation(4))
    return {
        "order": order,
        "brightness": float(rng.uniform(1 - brightness, 1 + brightness)),
        "contrast": float(rng.uniform(1 - contrast, 1 + contrast)),
        "saturation": float(rng.uniform(1 - saturation, 1 + saturation)),
        "hue": float(rng.uniform(-hue, hue)),
    }


def adjust_contrast(img: Image.Image, factor: float) -> Image.Image:
    """``ImageEnhance.Contrast(img).enhance(factor)`` for an RGB image, with the mean luma summed by
    numpy instead of ImageStat's Python loop over the histogram (the same integer sum, the same
    division): a blend towards the rounded mean grey."""
    lum = np.asarray(img.convert("L"))
    mean = int(int(lum.sum(dtype=np.int64)) / lum.size + 0.5)
    return Image.blend(Image.new("L", img.size, mean).convert(img.mode), img, factor)


def is_grey(img: Image.Image) -> bool:
    """Every pixel of the RGB image has R = G = B."""
    x = np.asarray(img)
    return bool((x[..., 0] == x[..., 1]).all() and (x[..., 1] == x[..., 2]).all())


def apply_color_jitter(img: Image.Image, params: dict[str, Any]) -> Image.Image:
    # On a grey image (Fashion-MNIST, scans) saturation and hue are exact no-ops -- its luma is its
    # value and its HSV saturation 0 -- and brightness and contrast keep it grey: skip them.
    grey = is_grey(img)
    for op in params["order"]:
        if grey and op >= 2:
            continue
        if op == 0:
            img = ImageEnhance.Brightness(img).enhance(params["brightness"])
        elif op == 1:
            img = adjust_contrast(img, params["contrast"])
        elif op == 2:
            img = ImageEnhance.Color(img).enhance(params["saturation"])
        else:
            img = adjust_hue(img, params["hue"])
    return img


def color_jitter(
    img: Image.Image,
    rng: np.random.Generator,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.2,
    hue: float = 0.1,
) -> Image.Image:
    """Brightness/contrast/saturation factors ~ U(1 ± x), hue ~ U(±hue), applied in random order."""
    return apply_color_jitter(img, draw_jitter_params(rng, brightness, contrast, saturation, hue))


def grayscale(img: Image.Image) -> Image.Image:
    return img.convert("L").convert("RGB")


def gaussian_kernel1d(sigma: float, size: int = BLUR_KERNEL) -> np.ndarray:
    x = np.arange(size, dtype=np.float32) - (size - 1) / 2
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


@functools.cache
def _reflect_index(n: int, r: int) -> np.ndarray:
    """Indices of ``np.pad(x, r, mode="reflect")`` along an axis of length n (edge not repeated)."""
    return np.pad(np.arange(n), r, mode="reflect")


def _taps(pad: np.ndarray, k: np.ndarray, n: int, axis: int) -> np.ndarray:
    """Σᵢ k[i] · pad[i : i + n] along `axis` (0 or 1), summed in order i = 0, 1, … in float32."""
    window = lambda i: pad[i : i + n] if axis == 0 else pad[:, i : i + n]  # noqa: E731
    acc = k[0] * window(0)
    for i in range(1, len(k)):
        acc += k[i] * window(i)
    return acc


def gaussian_blur(img: Image.Image, sigma: float, size: int = BLUR_KERNEL) -> Image.Image:
    """Separable ``size``×``size`` Gaussian with reflect padding, rounded back to uint8."""
    x = np.asarray(img, np.float32)
    k = gaussian_kernel1d(sigma, size)
    r = size // 2
    h, w = x.shape[:2]
    # Reflect padding by gathering rows / columns (np.pad's own machinery dominated on small crops).
    x = _taps(np.take(x, _reflect_index(h, r), axis=0), k, h, axis=0)
    x = _taps(np.take(x, _reflect_index(w, r), axis=1), k, w, axis=1)
    return Image.fromarray(np.clip(np.rint(x), 0, 255).astype(np.uint8), "RGB")


# ImageOps.solarize's table, built once per threshold (building it is most of the call on small crops).
@functools.cache
def _solarize_lut(threshold: int) -> tuple[int, ...]:
    return tuple(i if i < threshold else 255 - i for i in range(256)) * 3


def solarize(img: Image.Image, threshold: int = 128) -> Image.Image:
    """Invert every pixel value ≥ threshold (``ImageOps.solarize``)."""
    return img.point(list(_solarize_lut(int(threshold))))


def normalize(img: Image.Image | np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """``(x / 255 − mean) / std`` in float32 (computed in place in a fresh array)."""
    x = np.array(img, np.float32)
    x /= np.float32(255.0)
    x -= mean
    x /= std
    return x


# ---------------------------------------------------------------------------------------------
# Multi-crop
# ---------------------------------------------------------------------------------------------


class DataAugmentationDINO:
    """``aug(image, rng) -> {"global_crops": [2, S, S, 3], "local_crops": [L, s, s, 3]}`` float32,
    plus ``"gram_teacher_crops": [2, G, G, 3]`` when ``gram_teacher_crops_size`` is set and
    ``"offsets": int32 [L, 2]`` with ``localcrops_subset_of_globalcrops`` (RECIPE.md §6.2).

    Gram-teacher crops: each global crop is first taken at ``max(S, G)`` px. With
    ``gram_teacher_no_distortions`` the base crop is resized (bicubic) to ``S`` before the photometric
    ops and the Gram crop is the undistorted base crop resized to ``G``; otherwise the photometric ops
    run at ``max(S, G)`` px and the distorted crop is resized to ``S`` and to ``G`` afterwards.

    ``share_color_jitter``: the colour jitter (p ``color_jitter_prob``) and the random grayscale
    (p ``grayscale_prob``) are applied once to the whole source image, before any cropping; the crops'
    own photometric ops then skip jitter and grayscale (blur and solarisation stay per crop). Every
    crop therefore carries that shared outcome -- the Gram-teacher crops too, even with
    ``gram_teacher_no_distortions``, as they are cut from the jittered image.

    ``localcrops_subset_of_globalcrops``: the first ``L // 2`` local crops come from global view 1,
    the others from global view 2, where a global view is the geometric global crop (crop + flip) at
    ``S`` px, before its photometric ops (with Gram crops: after the resize to ``S``). For each local
    crop the view goes through the local photometric ops (jitter unless shared, grayscale, blur with
    the local probability) at ``S`` px, then an ``s``×``s`` window is cut at ``(top, left)``, each
    drawn uniformly among the multiples of ``patch_size`` in ``[0, S - s]``; no resize, no flip.
    ``offsets[i]`` is local crop ``i``'s ``(top, left)`` in its view's pixels.
    """

    def __init__(self, cfg: AugmentConfig | None = None, **overrides: Any):
        self.cfg = cfg = AugmentConfig.from_any(cfg, **overrides)
        self.mean = np.asarray(cfg.rgb_mean, np.float32)
        self.std = np.asarray(cfg.rgb_std, np.float32)
        self.flip_p = 0.5 if cfg.horizontal_flips else 0.0

    def _geometric(
        self, img: Image.Image, rng: np.random.Generator, size: int, scale, trace: dict | None = None
    ) -> Image.Image:
        box = random_resized_crop_box(rng, img.width, img.height, scale)
        img = crop_resize(img, box, size)
        flip = bool(rng.random() < self.flip_p)
        if flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if trace is not None:
            trace.update(box=box, flip=flip)
        return img

    def _photometric(
        self,
        img: Image.Image,
        rng: np.random.Generator,
        blur_p: float,
        solarize_p: float = 0.0,
        trace: dict[str, Any] | None = None,
        jitter_p: float | None = None,
        grayscale_p: float | None = None,
    ) -> Image.Image:
        """Jitter → grayscale → blur → solarise; ``jitter_p``/``grayscale_p`` default to the config's.
        A probability of 0 still consumes its draw, so that the random stream does not depend on it."""
        # The draw order (jitter decision, its parameters, grayscale, blur, solarise) is that of the
        # original implementation, so that the default path reproduces earlier results bit for bit.
        c = self.cfg
        jitter_p = c.color_jitter_prob if jitter_p is None else jitter_p
        grayscale_p = c.grayscale_prob if grayscale_p is None else grayscale_p
        params = draw_jitter_params(rng, *c.color_jitter) if rng.random() < jitter_p else None
        applied: dict[str, Any] = {"jitter": params is not None, "jitter_params": params}
        if params is not None:
            img = apply_color_jitter(img, params)
        applied["grayscale"] = bool(rng.random() < grayscale_p)
        if applied["grayscale"]:
            img = grayscale(img)
        applied["blur"] = bool(rng.random() < blur_p)
        applied["blur_sigma"] = float(rng.uniform(*c.blur_sigma)) if applied["blur"] else None
        if applied["blur"]:
            img = gaussian_blur(img, applied["blur_sigma"])
        applied["solarize"] = bool(rng.random() < solarize_p)
        if applied["solarize"]:
            img = solarize(img, 128)
        if trace is not None:
            trace.update(applied)
        return img

    def __call__(
        self, image: Image.Image | np.ndarray, rng: np.random.Generator, trace: list[dict] | None = None
    ) -> dict[str, np.ndarray]:
        """Pass a list as ``trace`` to get one record per crop (globals first, then locals):

        ``crop`` (name), ``jitter``/``grayscale``/``blur``/``solarize`` (whether the crop's own op was
        applied), ``jitter_params`` (its jitter outcome, None when not applied), ``blur_sigma`` (None
        when not blurred), ``box`` (``(top, left, h, w)`` of the crop), ``flip``, ``parent`` (None, or
        the index of the global view a local crop was cut from) and the image-level ``shared_jitter``/``shared_jitter_params``/
        ``shared_grayscale`` (``share_color_jitter``; False/None otherwise). ``box`` is the
        RandomResizedCrop box in source-image pixels, except for local crops with a parent, where it
        is the ``(top, left, s, s)`` window in the parent view's pixels (``flip`` is then False).
        """
        img = to_rgb(image)
        c = self.cfg
        norm = self._normalize
        gram = c.gram_teacher_crops_size
        size, s = c.global_crops_size, c.local_crops_size
        names = ["global1", "global2"] + [f"local{i}" for i in range(c.local_crops_number)]
        records: list[dict[str, Any]] = [{"crop": n, "parent": None} for n in names]
        if trace is not None:
            trace.extend(records)
        shared: dict[str, Any] = {"shared_jitter": False, "shared_jitter_params": None, "shared_grayscale": False}
        own_p: dict[str, Any] = {}
        if c.share_color_jitter:
            # Once per image, before any crop; the crops' own jitter and grayscale are then off.
            params = draw_jitter_params(rng, *c.color_jitter) if rng.random() < c.color_jitter_prob else None
            if params is not None:
                img = apply_color_jitter(img, params)
            gray = bool(rng.random() < c.grayscale_prob)
            if gray:
                img = grayscale(img)
            shared = {"shared_jitter": params is not None, "shared_jitter_params": params, "shared_grayscale": gray}
            own_p = {"jitter_p": 0.0, "grayscale_p": 0.0}
        for rec in records:
            rec.update(shared)
        blur_g1, blur_g2, blur_local = c.blur_probabilities()
        subset = c.localcrops_subset_of_globalcrops
        view_size = size if gram is None else max(size, gram)
        views, globals_, grams = [], [], []
        for k, (blur_p, solarize_p) in enumerate(((blur_g1, 0.0), (blur_g2, c.solarize_prob))):
            view = self._geometric(img, rng, view_size, c.global_crops_scale, trace=records[k])
            if gram is not None and c.gram_teacher_no_distortions:
                # Resize first, so the photometric ops (blur above all) see the global crop size.
                base = resize_square(view, size)
                crop = self._photometric(base, rng, blur_p, solarize_p, records[k], **own_p)
                grams.append(norm(resize_square(view, gram)))
            else:
                base = resize_square(view, size) if subset else None
                crop = self._photometric(view, rng, blur_p, solarize_p, records[k], **own_p)
                if gram is not None:
                    grams.append(norm(resize_square(crop, gram)))
                    crop = resize_square(crop, size)
            views.append(base)
            globals_.append(norm(crop))
        locs, offsets = [], []
        n_first = c.local_crops_number // 2
        steps = (size - s) // c.patch_size + 1  # valid window offsets: 0, p, 2p, ... <= size - s
        for i in range(c.local_crops_number):
            rec = records[2 + i]
            if subset:
                parent = 0 if i < n_first else 1
                full = self._photometric(views[parent], rng, blur_local, 0.0, rec, **own_p)
                top = int(rng.integers(0, steps)) * c.patch_size
                left = int(rng.integers(0, steps)) * c.patch_size
                loc = full.crop((left, top, left + s, top + s))
                rec.update(parent=parent, box=(top, left, s, s), flip=False)
                offsets.append((top, left))
            else:
                loc = self._geometric(img, rng, s, c.local_crops_scale, trace=rec)
                loc = self._photometric(loc, rng, blur_local, 0.0, rec, **own_p)
            locs.append(norm(loc))
        out = {
            "global_crops": np.stack(globals_),
            "local_crops": np.stack(locs) if locs else np.zeros((0, s, s, 3), np.float32),
        }
        if gram is not None:
            out["gram_teacher_crops"] = np.stack(grams)
        if subset:
            out["offsets"] = np.asarray(offsets, np.int32).reshape(len(offsets), 2)
        return out

    def _normalize(self, img: Image.Image) -> np.ndarray:
        return normalize(img, self.mean, self.std)
