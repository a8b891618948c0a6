"""Linear probe on frozen features (the official protocol, RECIPE.md §8.2), in JAX with optax.

One linear classifier per learning rate of a grid (each lr scaled by batch / 256), all trained
jointly on the same mini-batches (the loss is the sum of their cross-entropies; the classifiers
are stacked on a leading axis and the per-classifier loss is vmapped over it): SGD with momentum
0.9, no weight decay, a per-iteration cosine schedule down to 0, weights normal(0, 0.01), bias 0.
Every `eval_every` iterations and at the end, every classifier is evaluated on the validation
features; the best learning rate (by top-1 at the final evaluation) is reported.

Features are precomputed (`eval.features.extract_features(...).linear`), so the training-time
crop/flip augmentation of the official recipe does not apply.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

DEFAULT_LRS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)
EVAL_CHUNK = 1024


@dataclasses.dataclass
class LinearProbeResult:
    best_lr: float  # grid value (before the batch / 256 scaling)
    top1: float  # validation top-1 (%) of the best classifier at the final evaluation
    top5: float
    per_lr: dict[float, dict[str, float]]  # final validation accuracy of every classifier
    history: list[dict[str, Any]]  # {"iteration", "best_lr", "top1", "top5"} per evaluation
    iterations: int
    batch_size: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "best_lr": self.best_lr,
            "top1": self.top1,
            "top5": self.top5,
            "per_lr": {f"{lr:g}": v for lr, v in self.per_lr.items()},
            "history": self.history,
            "iterations": self.iterations,
            "batch_size": self.batch_size,
        }


def _logits(params, x):
    """[L, n, C]: every classifier applied to the same features."""
    return jax.vmap(lambda w, b: x @ w + b)(params["w"], params["b"])


def _loss(params, x, y):
    def one(w, b):
        return optax.softmax_cross_entropy_with_integer_labels(x @ w + b, y).mean()

    return jax.vmap(one)(params["w"], params["b"]).sum()


@functools.partial(jax.jit, static_argnames=("max_iter",), donate_argnums=(0,))
def _train_segment(carry, start, stop, table, features, labels, lrs, *, max_iter: int):
    """Iterations [start, stop) of SGD-momentum with a cosine schedule; `carry` = (params, momentum)."""

    def step(it, carry):
        params, momentum = carry
        idx = table[it]
        grads = jax.grad(_loss)(params, features[idx], labels[idx])
        momentum = jax.tree.map(lambda m, g: 0.9 * m + g, momentum, grads)  # torch.optim.SGD momentum
        factor = 0.5 * (1.0 + jnp.cos(jnp.pi * it / max_iter))  # CosineAnnealingLR, eta_min 0
        params = jax.tree.map(lambda p, m: p - (lrs * factor).reshape(-1, *([1] * (p.ndim - 1))) * m, params, momentum)
        return params, momentum

    return jax.lax.fori_loop(start, stop, step, carry)


@jax.jit
def _eval_chunk(params, x, y, valid):
    """Correct top-1 and top-5 counts per classifier on one (padded) chunk."""
    logits = _logits(params, x)
    logits = jnp.where(jnp.isfinite(logits), logits, -jnp.inf)
    k = min(5, logits.shape[-1])
    top_vals, top = jax.lax.top_k(logits, k)
    ok = jnp.isfinite(top_vals[..., :1])  # a diverged classifier counts as wrong
    hit = (top == y[None, :, None]) & ok & valid[None, :, None]
    return hit[..., 0].sum(-1), hit.any(-1).sum(-1)


def evaluate(params, features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-1 and top-5 accuracy (%) of every classifier, [L] each."""
    n = len(features)
    chunk = min(EVAL_CHUNK, n)
    c1 = c5 = 0
    for s in range(0, n, chunk):
        x = np.asarray(features[s : s + chunk], np.float32)
        y = np.asarray(labels[s : s + chunk], np.int32)
        m = len(x)
        valid = np.arange(chunk) < m
        if m < chunk:
            x = np.concatenate([x, np.zeros((chunk - m, x.shape[1]), np.float32)])
            y = np.concatenate([y, np.zeros(chunk - m, np.int32)])
        a, b = _eval_chunk(params, jnp.asarray(x), jnp.asarray(y), jnp.asarray(valid))
        c1, c5 = c1 + np.asarray(a), c5 + np.asarray(b)
    return 100.0 * c1 / n, 100.0 * c5 / n


def train_linear_probe(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    val_features: np.ndarray,
    val_labels: np.ndarray,
    *,
    num_classes: int | None = None,
    lrs: Sequence[float] = DEFAULT_LRS,
    epochs: int = 10,
    batch_size: int = 128,
    max_iter: int | None = None,
    eval_every: int | None = None,
    seed: int = 0,
) -> LinearProbeResult:
    """Trains one classifier per lr (scaled by batch / 256) and reports the best on validation.

    An epoch is `len(train) // batch` iterations (at least 1) over a fresh permutation; training
    runs `max_iter` iterations (default `epochs` epochs). Validation every `eval_every`
    iterations (default: once per epoch) and at the end.
    """
    train_labels = np.asarray(train_labels)
    val_labels = np.asarray(val_labels)
    n, dim = train_features.shape
    if n == 0 or len(val_features) == 0:
        raise ValueError("the linear probe needs non-empty training and validation features")
    if (train_labels < 0).any() or (val_labels < 0).any():
        raise ValueError("the linear probe needs labels for every sample (found -1)")
    if not lrs:
        raise ValueError("the learning-rate grid is empty")
    num_classes = int(num_classes or max(train_labels.max(), val_labels.max()) + 1)
    batch = min(int(batch_size), n)
    per_epoch = max(1, n // batch)
    max_iter = int(max_iter or epochs * per_epoch)
    if max_iter < 1:
        raise ValueError(f"the linear probe needs at least one iteration, got {max_iter}")
    eval_every = int(eval_every or per_epoch)

    rng = np.random.default_rng(seed)
    perms = math.ceil(max_iter * batch / n)
    table = np.concatenate([rng.permutation(n) for _ in range(perms)])[: max_iter * batch]
    table = jnp.asarray(table.reshape(max_iter, batch), jnp.int32)

    grid = np.asarray(lrs, np.float64)
    scaled = jnp.asarray(grid * batch / 256.0, jnp.float32)
    key = jax.random.key(seed)
    params = {
        "w": 0.01 * jax.random.normal(key, (len(grid), dim, num_classes), jnp.float32),
        "b": jnp.zeros((len(grid), num_classes), jnp.float32),
    }
    carry = (params, jax.tree.map(jnp.zeros_like, params))
    x = jnp.asarray(train_features, jnp.float32)
    y = jnp.asarray(train_labels, jnp.int32)

    history = []
    done = 0
    top1 = top5 = None
    while done < max_iter:
        stop = min(done + eval_every, max_iter)
        carry = _train_segment(carry, done, stop, table, x, y, scaled, max_iter=max_iter)
        done = stop
        top1, top5 = evaluate(carry[0], val_features, val_labels)
        best = int(np.argmax(top1))
        history.append(
            {"iteration": done, "best_lr": float(grid[best]), "top1": float(top1[best]), "top5": float(top5[best])}
        )
    best = int(np.argmax(top1))
    return LinearProbeResult(
        best_lr=float(grid[best]),
        top1=float(top1[best]),
        top5=float(top5[best]),
        per_lr={float(lr): {"top1": float(a), "top5": float(b)} for lr, a, b in zip(grid, top1, top5)},
        history=history,
        iterations=max_iter,
        batch_size=batch,
    )
