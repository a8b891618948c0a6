"""DINO loss on CLS prototypes (paper §3.2; RECIPE.md §4.2)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def dino_loss(
    student_logits: Array,
    teacher_probs: Array,
    student_temp: float = 0.1,
    ignore_diagonal: bool = False,
) -> Array:
    """Cross-entropy between teacher targets and student predictions over all crop pairs.

    Args:
        student_logits: [S, B, K] student DINO-head logits (S crops of B images).
        teacher_probs: [T, B, K] teacher target distributions (T crops of the same images).
        student_temp: student softmax temperature.
        ignore_diagonal: drop the pairs s == t for s, t < min(S, T) (student and teacher on the
            same global crop); the denominator then counts only the remaining pairs.

    Returns:
        `−Σ_{s,t,b,k} t[t,b,k]·log_softmax(s/τ)[s,b,k] / n_pairs` with n_pairs = B·S·T, or
        B·S·T − B·min(S, T) with `ignore_diagonal`. Computed in fp32.
    """
    s, b, _ = student_logits.shape
    t = teacher_probs.shape[0]
    log_p = jax.nn.log_softmax(student_logits.astype(jnp.float32) / student_temp, axis=-1)
    # Cross terms per (student crop, teacher crop) pair, summed over images and prototypes.
    pair = jnp.einsum("tbk,sbk->st", teacher_probs.astype(jnp.float32), log_p)
    total = jnp.sum(pair)
    n_pairs = b * s * t
    if ignore_diagonal:
        m = min(s, t)
        total = total - jnp.trace(pair[:m, :m])
        n_pairs -= b * m
    return -total / n_pairs
