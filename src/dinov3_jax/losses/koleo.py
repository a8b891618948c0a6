"""KoLeo uniformity regulariser (paper §3.2; RECIPE.md §4.4).

The official loss is computed per rank, so nearest neighbours are searched among the rank's own
images only. In global view that is a reshape: pass the features as [G, b, D] with one group per
data-parallel shard.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def _koleo_group(x_bd: Array) -> Array:
    """−log(d + 1e-8) of every sample's distance d to its nearest neighbour in the group, [b]."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x_bd), axis=-1, keepdims=True))
    x = x_bd / jnp.maximum(norm, jnp.asarray(1e-8, x_bd.dtype))  # F.normalize(eps=1e-8)
    b = x.shape[0]
    dots = x @ x.T
    dots = jnp.where(jnp.eye(b, dtype=bool), jnp.asarray(-1, dots.dtype), dots)  # exclude self
    nn = jnp.argmax(dots, axis=-1)
    # PairwiseDistance(p=2, eps=1e-8): the eps is added to the difference vector.
    diff = x - x[nn] + jnp.asarray(1e-8, x.dtype)
    d = jnp.sqrt(jnp.sum(jnp.square(diff), axis=-1))
    return -jnp.log(d + jnp.asarray(1e-8, d.dtype))


def koleo_loss(x: Array) -> Array:
    """KoLeo loss: −mean log(distance to the nearest neighbour) of L2-normalised features.

    Args:
        x: [B, D] (one group) or [G, b, D] (nearest neighbours within each group of b samples).

    Returns:
        The mean over all samples (equal-size groups: the mean of the per-group losses). Runs in
        the input dtype, as the official loss (bf16 in training).
    """
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3:
        raise ValueError(f"koleo_loss expects [B, D] or [G, b, D], got shape {tuple(x.shape)}")
    if x.shape[1] < 2:
        raise ValueError("koleo_loss needs at least 2 samples per group")
    return jnp.mean(jax.vmap(_koleo_group)(x))
