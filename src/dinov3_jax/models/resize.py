"""Resizing patch-feature maps exactly as `torch.nn.functional.interpolate(align_corners=False)`.

Two users: the Gram teacher's patch map brought to the student grid (arXiv 2508.10104 §4;
RECIPE.md §4.5) and the ConvNeXt stage maps brought to the patch grid (RECIPE.md §2.3).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

RESIZE_METHODS = ("bicubic", "bilinear", "nearest")


def _cubic_weights(t: float, a: float) -> list[float]:
    """Keys' cubic convolution weights of the 4 taps at offsets −1, 0, 1, 2 for fraction t ∈ [0, 1]."""

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def _aa_filter(x: float, method: str) -> float:
    """Kernels of torch's antialiased path: triangle (bilinear) and cubic with A = −0.5 (bicubic)."""
    x = abs(x)
    if method == "bilinear":
        return 1.0 - x if x < 1.0 else 0.0
    a = -0.5
    if x < 1.0:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


@functools.lru_cache(maxsize=64)
def _interp_matrix(in_size: int, out_size: int, method: str, antialias: bool) -> np.ndarray:
    """[out_size, in_size] fp32 matrix M with y = M x along one axis, as torch computes the taps.

    Static: it depends only on the sizes and the mode, so it is built once in NumPy (float64) and
    baked into the jitted program as a constant.
    """
    m = np.zeros((out_size, in_size), np.float64)
    # torch's `area_pixel_compute_scale` with align_corners=False and no scale_factor: in/out. torch
    # computes the scale and the source coordinates in fp32 (the opmath type of fp32 inputs); on a
    # 16-to-14 grid the fp32 rounding of the coordinate alone moves outputs by ~5e-6, so it is
    # reproduced here, and only the kernel weights are then evaluated in float64.
    f32 = np.float32
    scale32 = f32(in_size) / f32(out_size)
    scale = float(scale32)
    if method == "nearest":
        for i in range(out_size):
            if out_size == in_size:
                src = i
            elif out_size == 2 * in_size:
                src = i >> 1
            else:
                src = min(math.floor(f32(i) * scale32), in_size - 1)
            m[i, src] = 1.0
    elif antialias:
        # Antialiased path: each output averages the input under the kernel stretched by the scale
        # when downsampling (support interp_size/2 · scale, argument divided by the scale); when
        # upsampling the support stays interp_size/2. Taps outside the input are dropped and the
        # weights renormalised (no border clamping), so bicubic differs from the plain path even
        # when upsampling (A = −0.5 and the border handling).
        interp_size = 2 if method == "bilinear" else 4
        support = interp_size * 0.5 * scale if scale >= 1.0 else interp_size * 0.5
        invscale = 1.0 / scale if scale >= 1.0 else 1.0
        for i in range(out_size):
            center = float(f32(scale * (i + 0.5)))
            lo = max(int(center - support + 0.5), 0)  # int(): truncation, as the C++ cast
            hi = min(int(center + support + 0.5), in_size)
            w = np.array([_aa_filter((j - center + 0.5) * invscale, method) for j in range(lo, hi)])
            total = w.sum()
            m[i, lo:hi] = w / total if total != 0 else w
    else:
        for i in range(out_size):
            if in_size == out_size:
                m[i, i] = 1.0
                continue
            real = scale32 * (f32(i) + f32(0.5)) - f32(0.5)
            if method == "bilinear":
                real = max(real, f32(0.0))  # torch clamps negative source coordinates for linear modes only
            idx = min(math.floor(real), in_size - 1)
            lam = float(min(max(real - f32(idx), f32(0.0)), f32(1.0)))
            if method == "bilinear":
                m[i, idx] += 1.0 - lam
                m[i, idx + (1 if idx < in_size - 1 else 0)] += lam
            else:
                # Bicubic: A = −0.75 (torch, as OpenCV), taps at idx−1 … idx+2 clamped to the border.
                for k, w in enumerate(_cubic_weights(lam, -0.75)):
                    m[i, min(max(idx - 1 + k, 0), in_size - 1)] += w
    out = m.astype(np.float32)
    out.setflags(write=False)  # cached and shared: keep it immutable
    return out


def resize_patch_features(x: Array, out_hw: tuple[int, int], method: str = "bicubic", antialias: bool = False) -> Array:
    """Resize a patch-feature map as `torch.nn.functional.interpolate(align_corners=False)` does.

    RECIPE.md §4.5 (arXiv 2508.10104 §4, Gram anchoring at high resolution): when the Gram teacher
    sees larger crops than the student, its patch map [B, D, N_T, N_T] is resized to the student grid
    with `gram.global_teacher_resize_method` and `gram.global_teacher_resize_antialias`.
    `jax.image.resize` would not match torch (its cubic kernel uses A = −0.5 and it always
    antialiases when downsampling), so the separable interpolation matrices are built in NumPy from
    torch's formulas and applied with two fp32 einsums.

    Args:
        x: [B, h, w, D] patch features, channels last.
        out_hw: the output grid (H, W).
        method: "bicubic" (default, cubic convolution A = −0.75, borders clamped), "bilinear" or
            "nearest" (torch's legacy 'nearest': src = floor(dst · in/out)).
        antialias: torch's antialiased path (bilinear / bicubic only).

    Returns:
        [B, H, W, D] in fp32.
    """
    if method not in RESIZE_METHODS:
        raise ValueError(f"unknown resize method {method!r}; expected one of {RESIZE_METHODS}")
    if antialias and method == "nearest":
        raise ValueError("antialias is only supported for the bilinear and bicubic resize methods")
    if x.ndim != 4:
        raise ValueError(f"resize_patch_features expects [B, h, w, D], got shape {tuple(x.shape)}")
    h, w = int(x.shape[1]), int(x.shape[2])
    out_h, out_w = (int(v) for v in out_hw)
    if out_h <= 0 or out_w <= 0:
        raise ValueError(f"output size must be positive, got {out_hw}")
    x = x.astype(jnp.float32)
    if (h, w) == (out_h, out_w):
        return x  # every mode is the identity at equal sizes
    mh = jnp.asarray(_interp_matrix(h, out_h, method, antialias))
    mw = jnp.asarray(_interp_matrix(w, out_w, method, antialias))
    # HIGHEST: keep the interpolation exact fp32 even where the default matmul precision is lower.
    hi = jax.lax.Precision.HIGHEST
    x = jnp.einsum("Hh,bhwd->bHwd", mh, x, precision=hi)
    return jnp.einsum("Ww,bhwd->bhWd", mw, x, precision=hi)
