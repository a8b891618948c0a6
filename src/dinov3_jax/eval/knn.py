"""Weighted k-NN classification on L2-normalised features (DINO protocol; RECIPE.md §8.1).

Similarity is the cosine; the `max(ks)` nearest training samples vote with weights
softmax(sim / T) (T = 0.07), and each k uses its first k neighbours. Top-1 and top-5 per k.
`KnnEvaluator` is the trainer's periodic k-NN of the teacher backbone.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dinov3_jax.backbone import Backbone
from dinov3_jax.configs import Config, source_kwargs
from dinov3_jax.data.images import ResizeCrop
from dinov3_jax.data.pipeline import CropPairs, build_eval_pipeline
from dinov3_jax.data.sources import make_source
from dinov3_jax.eval.extract import extract

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


# ---------------------------------------------------------------------------------------------
# The trainer's periodic k-NN of the teacher backbone on the labelled split
# ---------------------------------------------------------------------------------------------


def knn_split_problem(cfg: Config) -> str | None:
    """Why the periodic k-NN cannot run (no labels, or no held-out split), or None when it can.

    k-NN uses the train split as memory and the test/val split as queries: a folder needs class
    subfolders and a `val`/`test` sibling of `train` (or `data.val_path`), a file list needs
    `data.val_path`; the synthetic and Fashion-MNIST sources have both splits built in."""
    d = cfg.data
    kind = (d.val_source or d.source).lower()
    path = d.val_path or d.path
    if kind in ("synthetic", "fashion_mnist", "fashionmnist", "fmnist"):
        return None
    if kind in ("filelist", "file_list", "list"):
        return None if d.val_path else "a file list has no held-out split (set data.val_path)"
    root = Path(path)
    held_out = [s for s in ("val", "validation", "test") if (root / s).is_dir()]
    if not held_out or not (root / "train").is_dir():
        return f"{root} has no train/ and val/ (or test/) subfolders"
    if not make_source(kind, path, split="test").num_classes:
        return f"{root / held_out[0]} has no class subfolders (no labels)"
    return None


class KnnEvaluator:
    """k-NN on a labelled train/val pair at the global-crop resolution, through the same
    extraction loop as `dinov3-jax eval` (no disk cache: the weights change)."""

    def __init__(self, cfg: Config, mesh=None):
        d = cfg.data
        kind, path = d.val_source or d.source, d.val_path or d.path
        self.train_source = make_source(kind, path, split="train", **source_kwargs(cfg, d.knn_train_samples))
        self.val_source = make_source(kind, path, split="test", **source_kwargs(cfg, d.knn_val_samples))
        resolution = CropPairs.from_crops(cfg.crops).global_sizes[0]
        self.transform = ResizeCrop(resolution, resolution * 256 // 224)
        self.mean, self.std = tuple(cfg.crops.rgb_mean), tuple(cfg.crops.rgb_std)
        self.batch_size = cfg.runtime.eval_batch_size
        self.mesh = mesh
        self.ks = tuple(cfg.runtime.knn_k)
        self.num_classes = self.train_source.num_classes

    def memory_summary(self) -> str:
        """The k-NN memory's size and images per class (when the source lists its labels)."""
        text = f"k-NN memory: {len(self.train_source)} images, {len(self.val_source)} queries"
        labels = getattr(self.train_source, "labels", None)
        if labels is None:
            return text
        names = getattr(self.train_source, "class_names", None) or [str(i) for i in range(self.num_classes)]
        counts = np.bincount(np.asarray(labels)[np.asarray(labels) >= 0], minlength=len(names))
        return text + "; per class: " + ", ".join(f"{name} {count}" for name, count in zip(names, counts))

    def __call__(self, module) -> dict[str, float]:
        backbone = Backbone(module, normalization=None, mean=self.mean, std=self.std)
        train, val = (
            extract(backbone, src, transform=self.transform, batch_size=self.batch_size, mesh=self.mesh)
            for src in (self.train_source, self.val_source)
        )
        return knn_accuracy(
            train["cls"], train.labels, val["cls"], val.labels, ks=self.ks, num_classes=self.num_classes
        )

    def raw_pixels(self) -> dict[str, float]:
        """The floor: k-NN on the normalised pixels themselves."""
        pixels = []
        for source in (self.train_source, self.val_source):
            feats, labels = [], []
            for batch in build_eval_pipeline(source, self.transform, self.batch_size, self.mean, self.std):
                valid = np.asarray(batch["valid"], bool)
                feats.append(np.asarray(batch["images"])[valid].reshape(int(valid.sum()), -1))
                labels.append(np.asarray(batch["labels"])[valid])
            pixels += [np.concatenate(feats), np.concatenate(labels)]
        return knn_accuracy(*pixels, ks=self.ks, num_classes=self.num_classes)
