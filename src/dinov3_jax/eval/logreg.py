"""L2-regularised multinomial logistic regression on frozen features (RECIPE.md §8.3), in JAX.

The objective is scikit-learn's `LogisticRegression(penalty="l2", C)` (multinomial, intercept not
penalised), `C·Σᵢ CE(W·xᵢ + b, yᵢ) + ½‖W‖²`, divided by `C·n` for conditioning (same minimiser):
`mean CE + ‖W‖² / (2·C·n)`. It is minimised full-batch with `optax.lbfgs` (zoom line search) in
float32 until the gradient norm falls below `tol`, the relative decrease stalls, or `max_iter`.

Protocol: C sweeps `10^linspace(-6, 5, 45)`; C is chosen by top-1 on a validation split of 10 %
of each class of the (seed-0 shuffled) training set (at least 1 per class with more than one
sample); the model is refitted on train + validation with the best C and evaluated on the test
set. The sweep runs from strong to weak regularisation, each fit warm-started from the previous
one, all through one compiled solver (the training set is padded to the refit size with
zero-weight rows so the shapes never change).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu

DEFAULT_CS = tuple(float(c) for c in 10.0 ** np.linspace(-6, 5, 45))


@dataclasses.dataclass
class LogRegResult:
    best_C: float
    top1: float  # test top-1 (%) of the model refitted on train + val with best_C
    top5: float
    val_top1: dict[float, float]  # validation top-1 (%) per C of the sweep
    train_top1: float  # of the refitted model on train + val
    iterations: int  # L-BFGS iterations of the refit

    def to_dict(self) -> dict[str, Any]:
        return {
            "best_C": self.best_C,
            "top1": self.top1,
            "top5": self.top5,
            "train_top1": self.train_top1,
            "val_top1": {f"{c:.4g}": v for c, v in self.val_top1.items()},
            "refit_iterations": self.iterations,
        }


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def split_train_val(labels: np.ndarray, fraction: float = 0.1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, val indices): `fraction` of each class (floor, at least 1 for a class with
    more than one sample) after a seeded shuffle; both sorted."""
    labels = np.asarray(labels)
    order = np.random.default_rng(seed).permutation(len(labels))
    val = []
    for c in np.unique(labels):
        members = order[labels[order] == c]
        if len(members) > 1:
            val.extend(members[: max(1, int(fraction * len(members)))])
    val = np.sort(np.asarray(val, np.int64))
    train = np.setdiff1d(np.arange(len(labels)), val)
    return train, val


def _objective(params, x, y, weights, inv_reg):
    ce = optax.softmax_cross_entropy_with_integer_labels(x @ params["w"] + params["b"], y)
    n = weights.sum()
    return (weights * ce).sum() / n + 0.5 * inv_reg / n * jnp.sum(params["w"] ** 2)


@functools.partial(jax.jit, static_argnames=("max_iter",))
def _solve(params, x, y, weights, C, tol, *, max_iter: int):
    """Minimises the objective for one C from `params`; returns (params, iterations)."""
    fun = functools.partial(_objective, x=x, y=y, weights=weights, inv_reg=1.0 / C)
    solver = optax.lbfgs(
        memory_size=10,
        linesearch=optax.scale_by_zoom_linesearch(max_linesearch_steps=50, initial_guess_strategy="one"),
    )
    value_and_grad = optax.value_and_grad_from_state(fun)
    ftol = 10 * jnp.finfo(jnp.float32).eps  # relative decrease below float32 noise...
    patience = 10  # ...for this many iterations in a row: converged as far as float32 allows

    def step(carry):
        params, state, last_value, stalls = carry
        value, grad = value_and_grad(params, state=state)  # at `params` (reused from the line search)
        updates, state = solver.update(grad, state, params, value=value, grad=grad, value_fn=fun)
        scale = jnp.maximum(jnp.maximum(jnp.abs(last_value), jnp.abs(value)), 1.0)
        stalled = (last_value - value) <= ftol * scale
        stalls = jnp.where(stalled, stalls + 1, 0)
        return optax.apply_updates(params, updates), state, value, stalls

    def keep_going(carry):
        _, state, _, stalls = carry
        count = otu.tree_get(state, "count")
        grad_norm = otu.tree_norm(otu.tree_get(state, "grad"))
        return (count == 0) | ((count < max_iter) & (grad_norm > tol) & (stalls < patience))

    carry = (params, solver.init(params), jnp.asarray(jnp.inf, jnp.float32), jnp.asarray(0, jnp.int32))
    params, state, _, _ = jax.lax.while_loop(keep_going, step, carry)
    return params, otu.tree_get(state, "count")


def _scores(params, x) -> np.ndarray:
    return np.asarray(jnp.asarray(x) @ params["w"] + params["b"])


def accuracy(scores: np.ndarray, labels: np.ndarray, k: int = 1) -> float:
    top = np.argsort(-scores, axis=-1, kind="stable")[:, : min(k, scores.shape[1])]
    return 100.0 * float((top == np.asarray(labels)[:, None]).any(-1).mean())


class LogisticRegression:
    """A multinomial L2-regularised logistic-regression classifier (`fit`, `predict`, `scores`)."""

    def __init__(self, C: float = 1.0, *, max_iter: int = 1000, tol: float = 1e-5):
        self.C, self.max_iter, self.tol = float(C), int(max_iter), float(tol)
        self.params: dict[str, jax.Array] | None = None
        self.n_iter = 0

    def fit(self, x, y, *, num_classes: int | None = None, weights=None, warm_start=None) -> LogisticRegression:
        x = jnp.asarray(x, jnp.float32)
        y = jnp.asarray(y, jnp.int32)
        num_classes = int(num_classes or int(y.max()) + 1)
        weights = jnp.ones(len(y), jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)
        params = warm_start or {
            "w": jnp.zeros((x.shape[1], num_classes), jnp.float32),
            "b": jnp.zeros((num_classes,), jnp.float32),
        }
        params, n_iter = _solve(
            params, x, y, weights, jnp.float32(self.C), jnp.float32(self.tol), max_iter=self.max_iter
        )
        self.params, self.n_iter = params, int(n_iter)
        return self

    def scores(self, x) -> np.ndarray:
        if self.params is None:
            raise ValueError("fit the model first")
        return _scores(self.params, jnp.asarray(x, jnp.float32))

    def predict(self, x) -> np.ndarray:
        return self.scores(x).argmax(-1)


def logistic_regression_eval(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    *,
    Cs: Sequence[float] = DEFAULT_CS,
    num_classes: int | None = None,
    normalize: bool = False,
    val_fraction: float = 0.1,
    max_iter: int = 1000,
    tol: float = 1e-5,
    seed: int = 0,
) -> LogRegResult:
    """The §8.3 protocol: sweep C on a held-out split of train, refit on all of train, test.

    `normalize` L2-normalises the features first (the official protocol uses the final-normed
    CLS as is).
    """
    x = np.asarray(train_features, np.float32)
    y = np.asarray(train_labels, np.int64)
    tx = np.asarray(test_features, np.float32)
    ty = np.asarray(test_labels, np.int64)
    if len(x) == 0 or len(tx) == 0:
        raise ValueError("logistic regression needs non-empty training and test features")
    if (y < 0).any() or (ty < 0).any():
        raise ValueError("logistic regression needs labels for every sample (found -1)")
    Cs = [float(c) for c in np.ravel(np.asarray(Cs, np.float64))]
    if not Cs:
        raise ValueError("the C grid is empty")
    if normalize:
        x, tx = l2_normalize(x), l2_normalize(tx)
    num_classes = int(num_classes or max(y.max(), ty.max()) + 1)
    fit_idx, val_idx = split_train_val(y, val_fraction, seed)
    if len(val_idx) == 0 or len(fit_idx) == 0:
        raise ValueError("the training set is too small to hold out a validation split (needs 2+ per class)")

    # Sweep: rows of the validation split get weight 0, so the solver sees the refit's shapes.
    sweep_weights = np.zeros(len(y), np.float32)
    sweep_weights[fit_idx] = 1.0
    val_top1: dict[float, float] = {}
    fits: dict[float, dict[str, jax.Array]] = {}
    warm = None
    for C in sorted(Cs):
        model = LogisticRegression(C, max_iter=max_iter, tol=tol)
        model.fit(x, y, num_classes=num_classes, weights=sweep_weights, warm_start=warm)
        warm = fits[C] = model.params
        val_top1[C] = accuracy(model.scores(x[val_idx]), y[val_idx])
    best_C = max(val_top1, key=lambda c: (val_top1[c], -c))  # ties: the stronger regularisation

    final = LogisticRegression(best_C, max_iter=max_iter, tol=tol)
    final.fit(x, y, num_classes=num_classes, warm_start=fits[best_C])
    scores = final.scores(tx)
    return LogRegResult(
        best_C=best_C,
        top1=accuracy(scores, ty, 1),
        top5=accuracy(scores, ty, 5),
        val_top1=val_top1,
        train_top1=accuracy(final.scores(x), y),
        iterations=final.n_iter,
    )
