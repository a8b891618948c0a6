"""iBOT loss on masked patch tokens (paper §3.2; RECIPE.md §4.3)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def ibot_loss(
    student_logits: Array,
    teacher_probs: Array,
    weights: Array,
    n_images: int | Array,
    student_temp: float = 0.1,
) -> Array:
    """Weighted masked-token cross-entropy `−Σ_m w_m ℓ_m / n_images`, in fp32.

    Args:
        student_logits: [M, K] student iBOT-head logits of the masked tokens (M a static bound).
        teacher_probs: [M, K] teacher targets at the same positions.
        weights: [M] per-token weights 1 / (masked tokens of its crop); 0 on padding entries,
            which then contribute nothing.
        n_images: number of global-crop images (2B), masked or not.
        student_temp: student softmax temperature.

    `ℓ_m = Σ_k t[m, k]·log_softmax(s[m] / τ)_k`: the result is the mean over images of the
    per-image mean masked-token cross-entropy, images without masks counting as 0.
    """
    log_p = jax.nn.log_softmax(student_logits.astype(jnp.float32) / student_temp, axis=-1)
    per_token = jnp.sum(teacher_probs.astype(jnp.float32) * log_p, axis=-1)
    w = weights.astype(jnp.float32)
    return -jnp.sum(jnp.where(w > 0, w * per_token, 0.0)) / n_images
