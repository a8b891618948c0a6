"""Gram anchoring loss (arXiv 2508.10104 §4; RECIPE.md §4.5).

Gram anchoring (paper §4, "Gram anchoring") regularises the student's dense features by matching the
*pairwise patch similarities* (the Gram matrix) of a frozen earlier copy of the model, the Gram
teacher, rather than the features themselves. `gram_loss` is the mean squared difference of the two
Gram matrices, with the official options (normalisation, image- or batch-level matrices, zeroing of
negative similarities, token selection). When the Gram teacher sees higher-resolution crops, its
patch map is brought to the student grid by `dinov3_jax.models.resize.resize_patch_features`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

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
