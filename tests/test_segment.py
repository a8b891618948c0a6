"""Linear segmentation probe (dinov3_jax.eval.segment): mIoU arithmetic, datasets, and learning."""

from __future__ import annotations

import argparse
import functools
import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from dinov3_jax.backbone import Backbone
from dinov3_jax.eval import segment
from dinov3_jax.models.registry import create_backbone
from dinov3_jax.weights import load_backbone

COLOURS = [(40, 60, 170), (220, 40, 40), (40, 200, 60)]  # background, class 1, class 2


@functools.cache
def tiny():
    return load_backbone("dinov3_vit_tiny")


def reference_miou(pred, target, num_classes, ignore=255):
    """Per-class IoU straight from the definition, mean over classes present in either map."""
    valid = target != ignore
    ious = []
    for c in range(num_classes):
        p, t = (pred == c) & valid, (target == c) & valid
        union = np.sum(p | t)
        if union:
            ious.append(np.sum(p & t) / union)
    return float(np.mean(ious)), float(np.sum((pred == target) & valid) / np.sum(valid))


def test_miou_matches_numpy_formula_on_hand_made_maps():
    target = np.array(
        [
            [0, 0, 1, 1],
            [0, 0, 1, 1],
            [2, 2, 255, 1],
            [2, 2, 0, 0],
        ]
    )
    pred = np.array(
        [
            [0, 1, 1, 1],
            [0, 0, 1, 0],
            [2, 0, 2, 1],
            [2, 2, 0, 3],
        ]
    )
    conf = segment.confusion_matrix(pred, target, 4)
    assert conf.sum() == 15  # the 255 pixel is skipped
    metrics = segment.segmentation_metrics(conf)
    # By hand: class 0: tp 4, gt 6, pred 6 → 4/8; class 1: tp 4, gt 5, pred 5 → 4/6;
    # class 2: tp 3, gt 4, pred 3 → 3/4; class 3: tp 0, gt 0, pred 1 → 0.
    expected = [4 / 8, 4 / 6, 3 / 4, 0.0]
    np.testing.assert_allclose(metrics["iou"], expected)
    assert metrics["miou"] == pytest.approx(np.mean(expected))
    assert metrics["pixel_accuracy"] == pytest.approx(11 / 15)
    miou, acc = reference_miou(pred, target, 4)
    assert metrics["miou"] == pytest.approx(miou)
    assert metrics["pixel_accuracy"] == pytest.approx(acc)


def test_miou_random_maps_and_absent_classes():
    rng = np.random.default_rng(0)
    for _ in range(5):
        target = rng.integers(0, 5, (3, 9, 7))
        target[rng.random(target.shape) < 0.1] = 255
        pred = rng.integers(0, 4, (3, 9, 7))  # class 4 never predicted
        m = segment.segmentation_metrics(segment.confusion_matrix(pred, target, 6))
        miou, acc = reference_miou(pred, target, 6)
        assert m["miou"] == pytest.approx(miou)
        assert m["pixel_accuracy"] == pytest.approx(acc)
        assert m["iou"][5] is None  # in neither map: excluded from the mean


def test_synthetic_masks():
    multi = segment.SyntheticMasks(12, image_size=32)
    assert multi.num_classes == 11 and len(multi.class_names) == 11
    for i in range(12):
        image, mask = multi[i]
        assert image.shape == (32, 32, 3) and mask.shape == (32, 32)
        assert set(np.unique(mask)) <= {0, i % 10 + 1}
    binary = segment.SyntheticMasks(4, image_size=32, binary=True)
    assert binary.num_classes == 2
    assert set(np.unique(binary[0][1])) <= {0, 1}


def write_mask_folder(root, split, n, seed, size=64):
    """Boxes of two fixed colours on a fixed-colour noisy background; masks in palette mode."""
    rng = np.random.default_rng(seed)
    (root / split / "images").mkdir(parents=True)
    (root / split / "masks").mkdir(parents=True)
    for i in range(n):
        img = Image.new("RGB", (size, size), COLOURS[0])
        mask = Image.new("P", (size, size), 0)
        mask.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [255] * (3 * 253))
        for c in (1, 2):
            x0, y0 = rng.integers(0, size * 5 // 8, 2)
            s = int(rng.integers(size // 4, size * 7 // 16))
            box = [int(x0), int(y0), int(x0) + s, int(y0) + s]
            ImageDraw.Draw(img).rectangle(box, fill=COLOURS[c])
            ImageDraw.Draw(mask).rectangle(box, fill=c)
        ImageDraw.Draw(mask).rectangle([0, 0, 3, 3], fill=255)  # an ignored corner
        noisy = np.asarray(img, np.float32) + rng.normal(0, 10, (size, size, 3))
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(root / split / "images" / f"{i:03d}.png")
        mask.save(root / split / "masks" / f"{i:03d}.png")


def test_mask_folder_layout(tmp_path):
    write_mask_folder(tmp_path, "train", 3, 0)
    write_mask_folder(tmp_path, "val", 2, 1)
    (tmp_path / "train" / "images" / "no_mask.png").write_bytes(
        (tmp_path / "train" / "images" / "000.png").read_bytes()
    )
    train = segment.MaskFolder(tmp_path, "train")
    assert len(train) == 3  # the image without a mask is left out
    assert train.num_classes == 3  # 255 is not a class
    image, mask = train[0]
    assert image.mode == "RGB" and mask.dtype == np.uint8 and 255 in mask
    assert len(segment.MaskFolder(tmp_path, "val")) == 2
    with pytest.raises(FileNotFoundError):
        segment.MaskFolder(tmp_path / "train" / "images")


def test_probe_learns_from_tiny_model_features(tmp_path):
    """End to end on a folder of image/mask pairs whose classes differ in colour: the patch features
    of even a randomly initialised tiny model carry colour, and the probe must learn it."""
    write_mask_folder(tmp_path, "train", 24, 0)
    write_mask_folder(tmp_path, "val", 8, 1)
    result = segment.run_segmentation_probe(
        Backbone(tiny()),
        segment.MaskFolder(tmp_path, "train"),
        segment.MaskFolder(tmp_path, "val"),
        resolution=64,
        steps=150,
        lr=3e-2,
    )
    assert result["num_classes"] == 3
    # 4×4 patches per 64-px image bound what a linear probe can do; all-background scores ~0.27.
    assert result["miou"] > 0.6, result
    assert result["miou"] > result["all_background_miou"] + 0.3, result
    assert result["pixel_accuracy"] > 0.85, result


def test_probe_learns_the_builtin_masks():
    """The probe learns the built-in 11-class masks from features that carry them (the mask
    average-pooled per patch, one-hot, plus noise): the training loop, upsampling and loss."""
    h = w = 8
    size = 64
    train, val = segment.SyntheticMasks(32, image_size=size), segment.SyntheticMasks(8, image_size=size, split="val")

    def oracle_features(source, seed):
        rng = np.random.default_rng(seed)
        masks = np.stack([source[i][1] for i in range(len(source))])
        onehot = np.eye(11, dtype=np.float32)[masks]  # [N, H, W, 11]
        pooled = onehot.reshape(len(masks), h, size // h, w, size // w, 11).mean((2, 4))
        return pooled + 0.05 * rng.standard_normal(pooled.shape).astype(np.float32), masks

    train_f, train_y = oracle_features(train, 0)
    val_f, val_y = oracle_features(val, 1)
    probe = segment.train_linear_segmenter(train_f, train_y, 11, steps=200, lr=5e-2)
    metrics = segment.evaluate_segmenter(probe, val_f, val_y)
    floor = segment.segmentation_metrics(segment.confusion_matrix(np.zeros_like(val_y), val_y, 11))
    assert metrics["miou"] > 0.6, metrics
    assert metrics["miou"] > floor["miou"] + 0.4
    assert metrics["pixel_accuracy"] > 0.9


def test_probe_learns_the_builtin_masks_from_backbone_features():
    """The built-in images through a real (randomly initialised) tiny ViT with 8-px patches: its
    patch features carry the dark-on-light shapes, and the probe must turn them into
    foreground masks at pixel resolution, well above always predicting background."""
    train = segment.SyntheticMasks(32, image_size=64, binary=True)
    val = segment.SyntheticMasks(16, image_size=64, split="val", binary=True)
    model = create_backbone("dinov3_vit_tiny", patch_size=8)
    result = segment.run_segmentation_probe(Backbone(model), train, val, resolution=64, steps=200, lr=1e-2)
    assert result["num_classes"] == 2 and result["n_train"] == 32
    assert result["miou"] > 0.6, result
    assert result["miou"] > result["all_background_miou"] + 0.2, result


def test_builtin_masks_through_the_cli(tmp_path):
    """`dinov3-jax segment` on the built-in dataset writes its metrics, and the probe learns."""
    parser = argparse.ArgumentParser()
    segment.add_arguments(parser)
    out = tmp_path / "seg.json"
    flags = "--model dinov3_vit_tiny --resolution 128 --binary --synthetic-samples 16 --steps 100 --lr 1e-2"
    args = parser.parse_args([*flags.split(), "--out", str(out)])
    assert segment.run(args) == 0
    result = json.loads(out.read_text())
    assert result["num_classes"] == 2 and result["n_train"] == 16
    for key in ("miou", "pixel_accuracy", "all_background_miou"):
        assert 0.0 <= result[key] <= 1.0
    assert result["train"]["miou"] > result["all_background_miou"] + 0.1, result


def test_pixel_cross_entropy_ignores_255():
    import jax.numpy as jnp

    logits = jnp.asarray(np.random.default_rng(0).standard_normal((1, 2, 2, 3)), jnp.float32)
    labels = jnp.asarray([[[0, 255], [2, 255]]])
    expected = -np.mean(
        [np.log(np.exp(logits[0, 0, 0, 0]) / np.exp(logits[0, 0, 0]).sum()),
         np.log(np.exp(logits[0, 1, 0, 2]) / np.exp(logits[0, 1, 0]).sum())]
    )  # fmt: skip
    assert float(segment.pixel_cross_entropy(logits, labels)) == pytest.approx(expected, rel=1e-5)
