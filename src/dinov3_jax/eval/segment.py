"""Linear segmentation probe on frozen patch features, reported as mIoU (RECIPE.md §8; issue 4 §2).

The backbone is frozen: every image goes once through the shared extraction loop
(`eval.extract`) and its final-normed patch tokens [h, w, D] (a ConvNeXt's stride-32 map) are
kept in memory. A linear layer D → C per patch (on features standardised with the training-set
mean and standard deviation, a frozen stand-in for the BatchNorm of the official linear head)
gives logits [h, w, C], which are bilinearly upsampled to the mask resolution and trained with
per-pixel cross-entropy (label 255 ignored) using AdamW. Validation reports the mean IoU over
classes that occur (in the ground truth or the prediction) and the pixel accuracy.

Datasets are image/mask pairs:

    DATA/images/NAME.jpg|png|...   RGB images
    DATA/masks/NAME.png            class id per pixel (8-bit grayscale or palette), 255 = ignore

optionally split into `DATA/train/{images,masks}` and `DATA/val/{images,masks}`. Masks are
matched to images by file stem. Images are resized (bilinear) and masks (nearest) to the probe
resolution, and mIoU is computed at that resolution. The built-in `synthetic` dataset renders the
procedural shapes of `SyntheticSource` with their masks: background + 10 shape classes, or with
`binary` background / foreground.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from dinov3_jax import backbone as front_door
from dinov3_jax.backbone import Backbone, Outputs
from dinov3_jax.data.images import Resize, check_resolution, decode, images_by_stem, parse_resolution
from dinov3_jax.data.sources import SYNTHETIC_CLASSES, SyntheticSource
from dinov3_jax.eval.extract import extract

IGNORE_INDEX = 255


# ---------------------------------------------------------------------------------------------
# Datasets of image / mask pairs
# ---------------------------------------------------------------------------------------------


class SegmentationSource(Protocol):
    """`len`, `source[i] -> (image, mask [H, W] uint8)` and `num_classes`."""


def read_mask(path: str | Path) -> np.ndarray:
    """Class ids [H, W] uint8 from an 8-bit grayscale or palette PNG (palette indices are ids)."""
    with Image.open(path) as img:
        if img.mode not in ("L", "P", "I", "I;16", "1"):
            raise ValueError(
                f"{path}: mask mode {img.mode!r}; expected one class id per pixel (8-bit grayscale or palette)"
            )
        arr = np.asarray(img).astype(np.int64)
    if arr.min() < 0 or arr.max() > 255:
        raise ValueError(f"{path}: class ids must lie in 0..254 (255 = ignore)")
    return arr.astype(np.uint8)


class MaskFolder:
    """`root/images/NAME.*` with `root/masks/NAME.png` (or `root/<split>/images|masks`)."""

    def __init__(self, root: str | Path, split: str | None = None, num_classes: int | None = None):
        root = Path(root)
        if split is not None and (root / split / "images").is_dir():
            root = root / split
        elif split == "val" and (root / "validation" / "images").is_dir():
            root = root / "validation"
        images_dir, masks_dir = root / "images", root / "masks"
        if not images_dir.is_dir() or not masks_dir.is_dir():
            raise FileNotFoundError(f"{root}: expected the folders images/ and masks/ (see dinov3_jax.eval.segment)")
        masks = images_by_stem(masks_dir)
        self.items = [(p, masks[stem]) for stem, p in images_by_stem(images_dir).items() if stem in masks]
        if not self.items:
            raise ValueError(f"{root}: no image in images/ has a mask of the same name in masks/")
        self.root = root
        self._num_classes = num_classes

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Image.Image, np.ndarray]:
        image_path, mask_path = self.items[index]
        return decode(image_path), read_mask(mask_path)

    @property
    def num_classes(self) -> int:
        """Given, or the largest class id in the masks (255 excluded) plus one."""
        if self._num_classes is None:
            top = 0
            for _, mask_path in self.items:
                ids = np.unique(read_mask(mask_path))
                ids = ids[ids != IGNORE_INDEX]
                if ids.size:
                    top = max(top, int(ids.max()))
            self._num_classes = top + 1
        return self._num_classes


class SyntheticMasks:
    """The built-in procedural shapes with their masks: 0 background, 1 + shape class
    (11 classes), or with `binary` 0 background / 1 foreground."""

    def __init__(
        self, num_samples: int = 64, image_size: int = 64, seed: int = 0, split: str = "train", binary: bool = False
    ):
        self.source = SyntheticSource(num_samples, image_size=image_size, seed=seed, split=split)
        self.binary = binary

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image, fg, label = self.source.render(index)
        mask = fg.astype(np.uint8) if self.binary else np.where(fg, label + 1, 0).astype(np.uint8)
        return image, mask

    @property
    def num_classes(self) -> int:
        return 2 if self.binary else 1 + self.source.num_classes

    @property
    def class_names(self) -> list[str]:
        return ["background", "foreground"] if self.binary else ["background", *SYNTHETIC_CLASSES]


def make_segmentation_source(
    data: str, split: str, *, num_samples: int = 64, image_size: int = 64, binary: bool = False, seed: int = 0
) -> SegmentationSource:
    """`synthetic` (the built-in shapes) or a folder of image/mask pairs."""
    if data == "synthetic":
        return SyntheticMasks(num_samples, image_size=image_size, seed=seed, split=split, binary=binary)
    return MaskFolder(data, split)


class _ImagesOf:
    """The images of a segmentation source as an unlabelled image source (for `eval.extract`)."""

    def __init__(self, source: SegmentationSource):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        return self.source[index][0], -1

    num_classes = 0
    class_names: Sequence[str] = ()


def masks_at(source: SegmentationSource, size: tuple[int, int]) -> np.ndarray:
    """The masks [N, H, W] uint8, resized to `size` with nearest-neighbour interpolation."""
    h, w = size
    return np.stack(
        [np.asarray(Image.fromarray(source[i][1]).resize((w, h), Image.Resampling.NEAREST)) for i in range(len(source))]
    )


def patch_features(backbone: Backbone, source: SegmentationSource, size: tuple[int, int]) -> np.ndarray:
    """Final-normed patch features [N, h, w, D] of the source's images resized to `size`."""
    result = extract(backbone, _ImagesOf(source), transform=Resize(size), outputs=Outputs(patch=True), batch_size=16)
    if len(result) != len(source):
        raise ValueError(f"{len(source) - len(result)} images could not be read: {list(result.skipped.values())[:3]}")
    return result["patch"]


# ---------------------------------------------------------------------------------------------
# The probe
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class LinearSegmenter:
    """Per-patch linear classifier on standardised features: logits = ((f - mean) / std) @ kernel + bias."""

    kernel: np.ndarray  # [D, C]
    bias: np.ndarray  # [C]
    mean: np.ndarray  # [D]
    std: np.ndarray  # [D]

    @property
    def num_classes(self) -> int:
        return int(self.kernel.shape[1])


def _logits(params, feats, mean, std, out_hw):
    """Upsampled logits [B, H, W, C] (bilinear, half-pixel centres as `align_corners=False`)."""
    import jax
    import jax.numpy as jnp

    x = (feats - mean) / std
    logits = jnp.einsum("bhwd,dc->bhwc", x, params["kernel"]) + params["bias"]
    b, _, _, c = logits.shape
    return jax.image.resize(logits, (b, *out_hw, c), method="bilinear")


def pixel_cross_entropy(logits, labels, ignore_index: int = IGNORE_INDEX):
    """Mean cross-entropy over the pixels whose label is not `ignore_index`."""
    import jax.numpy as jnp
    import optax

    labels = labels.astype(jnp.int32)
    valid = labels != ignore_index
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, labels, 0))
    return jnp.sum(losses * valid) / jnp.maximum(jnp.sum(valid), 1)


def train_linear_segmenter(
    features: np.ndarray,
    masks: np.ndarray,
    num_classes: int,
    *,
    steps: int = 500,
    batch_size: int = 16,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    seed: int = 0,
    standardize: bool = True,
) -> LinearSegmenter:
    """Train the probe on features [N, h, w, D] and masks [N, H, W] (255 = ignore) with AdamW
    (cosine-decayed learning rate), minibatches drawn at random with replacement."""
    import jax
    import jax.numpy as jnp
    import optax

    if len(features) != len(masks):
        raise ValueError(f"{len(features)} feature maps but {len(masks)} masks")
    labels = masks[masks != IGNORE_INDEX]
    if labels.size and int(labels.max()) >= num_classes:
        raise ValueError(f"mask labels reach {int(labels.max())} but num_classes is {num_classes}")
    d = features.shape[-1]
    flat = features.reshape(-1, d).astype(np.float64)
    mean = flat.mean(0).astype(np.float32) if standardize else np.zeros(d, np.float32)
    std = (flat.std(0) + 1e-6).astype(np.float32) if standardize else np.ones(d, np.float32)
    out_hw = masks.shape[1:]
    batch_size = max(1, min(batch_size, len(features)))
    tx = optax.adamw(optax.cosine_decay_schedule(lr, max(steps, 1)), weight_decay=weight_decay)
    params = {"kernel": jnp.zeros((d, num_classes), jnp.float32), "bias": jnp.zeros((num_classes,), jnp.float32)}
    feats_d, masks_d, mean_d, std_d = map(jnp.asarray, (features, masks, mean, std))

    @jax.jit
    def fit(params, key):
        def step(carry, key):
            params, opt_state = carry
            idx = jax.random.randint(key, (batch_size,), 0, feats_d.shape[0])

            def loss_fn(p):
                return pixel_cross_entropy(_logits(p, feats_d[idx], mean_d, std_d, out_hw), masks_d[idx])

            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        (params, _), losses = jax.lax.scan(step, (params, tx.init(params)), jax.random.split(key, steps))
        return params, losses

    params, _ = fit(params, jax.random.key(seed))
    return LinearSegmenter(np.asarray(params["kernel"]), np.asarray(params["bias"]), mean, std)


def predict_segmentation(
    probe: LinearSegmenter, features: np.ndarray, out_hw: tuple[int, int], batch_size: int = 16
) -> np.ndarray:
    """Per-pixel class ids [N, H, W] (uint8) at `out_hw`."""
    import jax
    import jax.numpy as jnp

    params = {"kernel": jnp.asarray(probe.kernel), "bias": jnp.asarray(probe.bias)}

    @jax.jit
    def predict(feats):
        return jnp.argmax(_logits(params, feats, probe.mean, probe.std, tuple(out_hw)), axis=-1).astype(jnp.uint8)

    return np.concatenate(
        [np.asarray(predict(features[i : i + batch_size])) for i in range(0, len(features), batch_size)]
    )


def confusion_matrix(
    pred: np.ndarray, target: np.ndarray, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> np.ndarray:
    """[C, C] int64 counts, rows = ground truth, columns = prediction; ignored pixels skipped."""
    pred, target = np.asarray(pred).ravel().astype(np.int64), np.asarray(target).ravel().astype(np.int64)
    valid = target != ignore_index
    index = target[valid] * num_classes + pred[valid]
    return np.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def segmentation_metrics(conf: np.ndarray) -> dict[str, Any]:
    """mIoU (mean over classes with a non-empty union), pixel accuracy and per-class IoU (None when absent)."""
    conf = np.asarray(conf, np.float64)
    tp = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
    total = conf.sum()
    return {
        "miou": float(np.nanmean(iou)) if np.any(union > 0) else float("nan"),
        "pixel_accuracy": float(tp.sum() / total) if total else float("nan"),
        "iou": [None if np.isnan(v) else float(v) for v in iou],
    }


def evaluate_segmenter(
    probe: LinearSegmenter, features: np.ndarray, masks: np.ndarray, ignore_index: int = IGNORE_INDEX
) -> dict[str, Any]:
    pred = predict_segmentation(probe, features, masks.shape[1:])
    return segmentation_metrics(confusion_matrix(pred, masks, probe.num_classes, ignore_index))


def run_segmentation_probe(
    backbone: Backbone,
    train: SegmentationSource,
    val: SegmentationSource,
    *,
    resolution: int | str | Sequence[int] = 224,
    num_classes: int | None = None,
    steps: int = 500,
    batch_size: int = 16,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> dict[str, Any]:
    """Extract features of both splits, train the probe on `train`, report metrics on `val`
    (with the mIoU of always predicting class 0, as a floor)."""
    size = parse_resolution(resolution)
    check_resolution(size, backbone.stride)
    num_classes = num_classes or train.num_classes
    train_y, val_y = masks_at(train, size), masks_at(val, size)
    train_f, val_f = patch_features(backbone, train, size), patch_features(backbone, val, size)
    probe = train_linear_segmenter(
        train_f, train_y, num_classes, steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay, seed=seed
    )
    metrics = evaluate_segmenter(probe, val_f, val_y)
    floor = segmentation_metrics(confusion_matrix(np.zeros_like(val_y), val_y, num_classes))
    metrics["train"] = evaluate_segmenter(probe, train_f, train_y)
    metrics.update(
        num_classes=num_classes,
        resolution=list(size),
        n_train=len(train_y),
        n_val=len(val_y),
        all_background_miou=floor["miou"],
    )
    return metrics


# ---------------------------------------------------------------------------------------------
# Command line (`add_arguments` / `run` pair, for registration in cli.py)
# ---------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Linear segmentation probe on frozen patch features: mIoU and pixel accuracy on the validation split. "
        "DATA is 'synthetic' (built-in shapes with masks) or a folder with images/ and masks/ "
        "(optionally under train/ and val/); masks hold a class id per pixel, 255 = ignore."
    )
    front_door.add_arguments(parser)
    parser.add_argument("--data", default="synthetic", help="'synthetic' or a folder of image/mask pairs")
    parser.add_argument("--resolution", default="224", help="input size N or HxW, a multiple of the patch size")
    parser.add_argument("--num-classes", type=int, help="default: the largest label in the training masks + 1")
    parser.add_argument("--binary", action="store_true", help="synthetic data: background / foreground only")
    parser.add_argument("--synthetic-samples", type=int, default=64, help="synthetic images per split (default 64)")
    parser.add_argument("--steps", type=int, default=500, help="AdamW steps (default 500)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--out", help="also write the results as JSON to this file")


def run(args: argparse.Namespace) -> int:
    backbone = front_door.from_args(args, "segment")
    size = parse_resolution(args.resolution)
    kw = dict(num_samples=args.synthetic_samples, image_size=max(size), binary=args.binary)
    train = make_segmentation_source(args.data, "train", **kw)
    val = make_segmentation_source(args.data, "val", **kw)
    result = run_segmentation_probe(
        backbone,
        train,
        val,
        resolution=size,
        num_classes=args.num_classes,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
    )
    print(
        f"segmentation probe ({result['num_classes']} classes, {result['n_train']} train / {result['n_val']} val "
        f"images at {size[0]}x{size[1]}): mIoU {100 * result['miou']:.2f}  pixel accuracy "
        f"{100 * result['pixel_accuracy']:.2f}  (all-background mIoU {100 * result['all_background_miou']:.2f})"
    )
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0
