"""Weighted k-NN classification on L2-normalised features (DINO protocol; RECIPE.md §8.1).

Similarity is the cosine; the `max(ks)` nearest training samples vote with weights
softmax(sim / T) (T = 0.07), and each k uses its first k neighbours. Top-1 and top-5 per k.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_KS = (10, 20, 100, 200)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def _knn_scores(test: jax.Array, train: jax.Array, train_labels: jax.Array, *, ks, temperature, num_classes):
    """Class scores [len(ks), n_test, C] for one chunk of test features."""
    sims = l2_normalize(test) @ l2_normalize(train).T
    max_k = max(ks)
    top_sims, top_idx = jax.lax.top_k(sims, max_k)
    weights = jax.nn.softmax(top_sims / temperature, axis=-1)
    votes = jax.nn.one_hot(train_labels[top_idx], num_classes) * weights[..., None]
    cumulative = jnp.cumsum(votes, axis=1)
    return jnp.stack([cumulative[:, k - 1] for k in ks])


def knn_accuracy(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk: int = 1024,
) -> dict[str, float]:
    """{"top1@k": %, "top5@k": %} for each k (k larger than the training set is clipped)."""
    n_train = len(train_features)
    if n_train == 0 or len(test_features) == 0:
        raise ValueError("k-NN needs a non-empty training and test set")
    ks = tuple(sorted({min(int(k), n_train) for k in ks}))
    num_classes = int(num_classes or max(train_labels.max(), test_labels.max()) + 1)
    train = jnp.asarray(train_features, jnp.float32)
    labels = jnp.asarray(train_labels, jnp.int32)
    score = jax.jit(lambda t: _knn_scores(t, train, labels, ks=ks, temperature=temperature, num_classes=num_classes))
    correct1 = np.zeros(len(ks))
    correct5 = np.zeros(len(ks))
    for start in range(0, len(test_features), chunk):
        part = np.asarray(test_features[start : start + chunk], np.float32)
        truth = np.asarray(test_labels[start : start + chunk])
        valid = len(part)
        if valid < chunk and len(test_features) > chunk:  # keep one compiled shape
            part = np.concatenate([part, np.zeros((chunk - valid, part.shape[1]), np.float32)])
        scores = np.asarray(score(jnp.asarray(part)))[:, :valid]
        top5 = np.argsort(-scores, axis=-1, kind="stable")[..., : min(5, num_classes)]
        correct1 += (top5[..., 0] == truth).sum(axis=1)
        correct5 += (top5 == truth[None, :, None]).any(axis=-1).sum(axis=1)
    n = len(test_features)
    result = {}
    for i, k in enumerate(ks):
        result[f"top1@{k}"] = 100.0 * correct1[i] / n
        result[f"top5@{k}"] = 100.0 * correct5[i] / n
    return result
