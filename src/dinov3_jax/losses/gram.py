"""Gram anchoring loss and the Gram teacher's patch-map resize (arXiv 2508.10104 §4; RECIPE.md §4.5).

Gram anchoring (paper §4, "Gram anchoring") regularises the student's dense features by matching the
*pairwise patch similarities* (the Gram matrix) of a frozen earlier copy of the model, the Gram
teacher, rather than the features themselves. Two pieces live here:

* `gram_loss`: mean squared difference of the two Gram matrices, with the official options
  (normalisation, image- or batch-level matrices, zeroing of negative similarities, token selection).
* `resize_patch_features`: brings the Gram teacher's patch map to the student grid when the teacher
  sees higher-resolution crops, numerically equal to `torch.nn.functional.interpolate`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

RESIZE_METHODS = ("bicubic", "bilinear", "nearest")


# ---------------------------------------------------------------------------------------------
# Gram loss
# ---------------------------------------------------------------------------------------------


def _normalize(x: Array) -> Array:
    """F.normalize(eps=1e-12) along the last axis."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
    return x / jnp.maximum(norm, 1e-12)


def _gram(x: Array, img_level: bool) -> Array:
    if img_level:
        return jnp.einsum("bpd,bqd->bpq", x, x)
    flat = x.reshape(-1, x.shape[-1])
    return flat @ flat.T


def gram_loss(
    student: Array,
    teacher: Array,
    normalized: bool = True,
    img_level: bool = True,
    remove_neg: bool = False,
    remove_only_teacher_neg: bool = False,
    token_mask: Array | None = None,
    teacher_neg_as_official: bool = True,
) -> Array:
    """Mean squared difference of the student's and the Gram teacher's patch similarity matrices.

    arXiv 2508.10104 §4 (Gram anchoring), RECIPE.md §4.5: L_gram = mean((S_student − S_teacher)²),
    S = X Xᵀ of the (optionally L2-normalised) patch features, computed in fp32.

    Args:
        student: [B, P, D] student patch features (`x_norm_patchtokens` of the global crops), or
            [G, B, P, D] with one group per data-parallel shard: the official loss is computed on
            each rank's local batch and then averaged over ranks, so the result is the mean over
            groups of each group's loss (this only changes anything for batch-level matrices).
        teacher: the Gram teacher's features, same shape (already resized to the student grid,
            see `resize_patch_features`).
        normalized: L2-normalise every token feature (eps 1e-12) first.
        img_level: one P×P Gram matrix per image; otherwise one (B·P)×(B·P) matrix per group.
        remove_neg: zero the negative similarities of both matrices.
        remove_only_teacher_neg: zero the teacher's negative similarities, and the student's
            negative similarities where the teacher's were negative too. See
            `teacher_neg_as_official` for the upstream behaviour.
        token_mask: optional bool [B, P] (or [G, B, P]) of the tokens that take part
            (`gram.tokens_used` "masked": the iBOT mask; "unmasked": its complement). The Gram
            matrices are then over the selected tokens only and the mean is over the n_sel² selected
            pairs of each group. Only with batch-level matrices (`img_level=False`), as upstream.
            A group without any selected token contributes 0 to the mean over groups (upstream
            would average an empty tensor, i.e. NaN).
        teacher_neg_as_official: with `remove_only_teacher_neg`, reproduce the upstream quirk
            (`compat.gram_remove_only_teacher_neg_as_official`): upstream derives the student's
            mask from the teacher matrix *after* its negatives were zeroed, so the student is never
            modified. False applies the intended rule: the student's negative entries are zeroed
            where the teacher's original similarity was negative.

    Returns:
        The scalar loss in fp32.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} shapes differ")
    if remove_neg and remove_only_teacher_neg:
        raise ValueError("remove_neg and remove_only_teacher_neg are exclusive")
    if student.ndim not in (3, 4):
        raise ValueError(f"gram_loss expects [B, P, D] or [G, B, P, D], got shape {tuple(student.shape)}")
    if token_mask is not None:
        if img_level:
            raise ValueError("token_mask (gram.tokens_used masked/unmasked) needs batch-level Gram (img_level=False)")
        if tuple(token_mask.shape) != tuple(student.shape[:-1]):
            raise ValueError(
                f"token_mask shape {tuple(token_mask.shape)} does not match the features' {tuple(student.shape[:-1])}"
            )

    s, t = student.astype(jnp.float32), teacher.astype(jnp.float32)
    if normalized:
        s, t = _normalize(s), _normalize(t)
    grouped = s.ndim == 4
    if not grouped:
        s, t = s[None], t[None]
        token_mask = None if token_mask is None else token_mask[None]

    if token_mask is not None:
        # Static-shape token selection: zeroing the unselected tokens' features (after the
        # normalisation, whose gradient at a zero vector would not be finite) makes their rows and
        # columns of both Gram matrices 0, so every pair with an unselected token has a zero
        # difference, also after the negative-zeroing below. Summing over all entries is therefore
        # the sum over the selected pairs, exactly the loss of the boolean-indexed tokens, and
        # those tokens get an exactly zero gradient (`where` does not propagate into the other branch).
        keep = token_mask.astype(bool)[..., None]
        s, t = jnp.where(keep, s, 0.0), jnp.where(keep, t, 0.0)

    gram = jax.vmap(lambda x: _gram(x, img_level))
    gs, gt = gram(s), gram(t)
    if remove_neg:
        gs = jnp.where(gs < 0, 0.0, gs)
        gt = jnp.where(gt < 0, 0.0, gt)
    elif remove_only_teacher_neg:
        if not teacher_neg_as_official:
            # Mask from the teacher's *original* similarities (upstream takes it after zeroing).
            gs = jnp.where((gs < 0) & (gt < 0), 0.0, gs)
        gt = jnp.where(gt < 0, 0.0, gt)

    sq = jnp.square(gs - gt)
    if token_mask is None:
        # Equal-sized groups: the mean over groups of per-group means is the overall mean.
        return jnp.mean(sq)
    n_sel = jnp.sum(token_mask.astype(jnp.float32), axis=(1, 2))  # [G]
    per_group = jnp.sum(sq, axis=(1, 2)) / jnp.maximum(jnp.square(n_sel), 1.0)
    return jnp.mean(jnp.where(n_sel > 0, per_group, 0.0))


# ---------------------------------------------------------------------------------------------
# Resize of the Gram teacher's patch map (torch.nn.functional.interpolate, align_corners=False)
# ---------------------------------------------------------------------------------------------


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
