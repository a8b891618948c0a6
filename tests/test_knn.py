"""k-NN against a brute-force NumPy implementation of the DINO protocol (RECIPE.md §8.1)."""

import numpy as np
import pytest

from dinov3_jax.eval.knn import knn_accuracy


def brute_force_knn(train, train_labels, test, test_labels, k, temperature, num_classes):
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    top1 = top5 = 0
    for x, y in zip(test, test_labels):
        sims = train @ x
        order = np.argsort(-sims, kind="stable")
        max_k = 200 if len(train) >= 200 else len(train)
        w = np.exp(sims[order[:max_k]] / temperature)
        w /= w.sum()
        scores = np.zeros(num_classes)
        for j in range(k):
            scores[train_labels[order[j]]] += w[j]
        ranking = np.argsort(-scores, kind="stable")
        top1 += ranking[0] == y
        top5 += y in ranking[:5]
    return 100 * top1 / len(test), 100 * top5 / len(test)


def test_matches_brute_force():
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((7, 16)) * 1.5
    train_labels = rng.integers(0, 7, 300)
    test_labels = rng.integers(0, 7, 90)
    train = centers[train_labels] + rng.standard_normal((300, 16))
    test = centers[test_labels] + rng.standard_normal((90, 16))
    result = knn_accuracy(train, train_labels, test, test_labels, ks=(1, 10, 20, 200), chunk=32)
    for k in (1, 10, 20, 200):
        top1, top5 = brute_force_knn(train, train_labels, test, test_labels, k, 0.07, 7)
        assert result[f"top1@{k}"] == pytest.approx(top1)
        assert result[f"top5@{k}"] == pytest.approx(top5)
    assert 30 < result["top1@20"] < 100  # informative data: neither chance nor trivially perfect


def test_k_clipped_to_training_set_and_errors():
    x = np.eye(4, dtype=np.float32)
    result = knn_accuracy(x, np.arange(4), x, np.arange(4), ks=(10,))
    assert result == {"top1@4": 100.0, "top5@4": 100.0}
    with pytest.raises(ValueError, match="non-empty"):
        knn_accuracy(x[:0], np.arange(0), x, np.arange(4))
