"""What tells learning from collapse, logged next to the losses (pure, jit-able).

A self-supervised run can lower its losses while its features collapse: every image onto one
prototype (the DINO paper's "collapse to one dimension") or onto the uniform distribution. These
statistics show it: the entropy of the teacher's targets and of the student's predictions
(uniform: log K), how many prototypes are the teacher's choice for at least one image (collapse: 1),
the DINO cross-entropy minus log K (below 0: the student predicts the teacher better than chance)
and the effective rank of the CLS features (Roy & Vetterli 2007: exp of the entropy of the
normalised singular values; identical features: 1; features in general position: min(N, D)).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.special import entr

Array = jax.Array


def mean_entropy(probs: Array) -> Array:
    """Mean entropy (nats) of the distributions in the rows of `probs` [..., K]."""
    return jnp.mean(jnp.sum(entr(probs.astype(jnp.float32)), axis=-1))


def prototypes_in_use(probs: Array) -> Array:
    """How many prototypes are the most probable one of at least one row of `probs` [..., K]."""
    k = probs.shape[-1]
    choice = jnp.argmax(probs.reshape(-1, k), axis=-1)
    return jnp.sum(jnp.zeros(k, jnp.int32).at[choice].set(1))


def effective_rank(x: Array) -> Array:
    """exp(entropy of the normalised singular values) of the features `x` [N, D]."""
    sigma = jnp.linalg.svd(x.astype(jnp.float32), compute_uv=False)
    return jnp.exp(jnp.sum(entr(sigma / jnp.maximum(jnp.sum(sigma), 1e-12))))
