"""Teacher targets: Sinkhorn-Knopp centering (DINOv3) and DINO v1 EMA centering (RECIPE.md §4.1).

Both functions see the *global* batch: the sums that the official code all-reduces over ranks are
plain sums here, and XLA inserts the collectives when the inputs are sharded.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def sinkhorn_knopp(logits: Array, temp: float | Array, weights: Array | None = None, n_iters: int = 3) -> Array:
    """Sinkhorn-Knopp teacher probabilities [N, K] from teacher logits [N, K], in fp32.

    `Q = exp(logits / temp)` normalised to total mass 1, then `n_iters` rounds of: every prototype gets mass 1/K, every sample mass 1/N_valid. The
    result is scaled by N_valid so that every valid row sums to 1.

    Rows whose `weights` entry is 0 are padding (e.g. the static bound on masked iBOT tokens):
    they take no part in any sum, N_valid counts only rows with weight > 0, and their output rows
    are 0. The weights act only as this validity mask.
    """
    x = logits.astype(jnp.float32)
    n, k = x.shape
    if weights is None:
        valid = jnp.ones((n, 1), jnp.float32)
        n_valid = jnp.asarray(n, jnp.float32)
    else:
        valid = (weights > 0).astype(jnp.float32)[:, None]
        n_valid = jnp.sum(valid)
        x = jnp.where(valid > 0, x, 0.0)  # padding logits may be anything, even overflow exp
    top = jax.lax.stop_gradient(jnp.max(jnp.where(valid > 0, x, -jnp.inf)))
    x = x - jnp.where(jnp.isfinite(top), top, 0.0)  # all rows padding: nothing to subtract
    q = jnp.exp(x / jnp.asarray(temp, jnp.float32)) * valid  # [N, K]
    safe = lambda s: jnp.where(s > 0, s, 1.0)  # noqa: E731  (padding / empty sums stay 0, not NaN)
    q = q / safe(jnp.sum(q))
    for _ in range(n_iters):
        q = q / safe(jnp.sum(q, axis=0, keepdims=True))  # prototype (row of Qᵀ) sums over samples
        q = q / k
        q = q / safe(jnp.sum(q, axis=1, keepdims=True))  # per-sample sums
        q = q / safe(n_valid)
    return q * n_valid


def softmax_center(logits: Array, center: Array, temp: float | Array) -> Array:
    """DINO v1 targets: softmax((logits − center) / temp) over the last axis, in fp32."""
    x = (logits.astype(jnp.float32) - center.astype(jnp.float32)) / jnp.asarray(temp, jnp.float32)
    return jax.nn.softmax(x, axis=-1)


def update_center(center: Array, logits: Array, momentum: float | Array, weights: Array | None = None) -> Array:
    """EMA of the batch-mean teacher logits: `center·m + mean(logits)·(1 − m)` (DINO v1).

    `logits` [..., K] is averaged over all leading axes (the global batch); with `weights` [...]
    the mean is the weighted mean Σ w·x / Σ w (weights 0 mark padding rows). The result has the
    shape and dtype of `center`.
    """
    x = logits.astype(jnp.float32).reshape(-1, logits.shape[-1])
    if weights is None:
        batch_center = jnp.mean(x, axis=0)
    else:
        w = weights.astype(jnp.float32).reshape(-1, 1)
        batch_center = jnp.sum(w * x, axis=0) / jnp.maximum(jnp.sum(w), 1e-12)
    m = jnp.asarray(momentum, jnp.float32)
    new = center.astype(jnp.float32) * m + batch_center.reshape(center.shape) * (1 - m)
    return new.astype(center.dtype)
