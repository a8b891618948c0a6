"""Gram anchoring loss (paper §4.2; RECIPE.md §4.5)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


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
) -> Array:
    """Mean squared difference of the student's and the gram teacher's patch similarity matrices.

    Args:
        student: [B, P, D] student patch features (post final norm), or [G, B, P, D] to compute
            batch-level Gram matrices per group (one group per data-parallel shard, as the
            official per-rank loss).
        teacher: the gram teacher's features, same shape (already resized to the student grid).
        normalized: L2-normalise every token feature (eps 1e-12) first.
        img_level: one P×P Gram matrix per image; otherwise one (B·P)×(B·P) matrix per group.
        remove_neg: zero the negative similarities of both matrices.
        remove_only_teacher_neg: zero the teacher's negative similarities only. As upstream, the
            student matrix is left untouched in this mode (its mask is taken from the already
            zeroed teacher matrix, so it is never triggered).

    Returns:
        mean((S_student − S_teacher)²) over all entries, in fp32.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} shapes differ")
    if remove_neg and remove_only_teacher_neg:
        raise ValueError("remove_neg and remove_only_teacher_neg are exclusive")
    s, t = student.astype(jnp.float32), teacher.astype(jnp.float32)
    if normalized:
        s, t = _normalize(s), _normalize(t)
    if s.ndim == 4:
        gram = jax.vmap(lambda x: _gram(x, img_level))
    elif s.ndim == 3:
        gram = lambda x: _gram(x, img_level)  # noqa: E731
    else:
        raise ValueError(f"gram_loss expects [B, P, D] or [G, B, P, D], got shape {tuple(student.shape)}")
    gs, gt = gram(s), gram(t)
    if remove_neg:
        gs = jnp.where(gs < 0, 0.0, gs)
        gt = jnp.where(gt < 0, 0.0, gt)
    elif remove_only_teacher_neg:
        gt = jnp.where(gt < 0, 0.0, gt)
    return jnp.mean(jnp.square(gs - gt))
