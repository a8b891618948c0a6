"""Data pipeline: sources, multi-crop augmentation, iBOT masks, grain pipelines (tiny and fast)."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from dinov3_jax.configs import load_config
from dinov3_jax.data import augment as A
from dinov3_jax.data.images import ResizeCrop
from dinov3_jax.data.masking import MaskingGenerator, collate_masks, mask_targets, max_masked_tokens
from dinov3_jax.data.pipeline import build_eval_pipeline, build_train_pipeline
from dinov3_jax.data.sources import (
    FashionMNISTSource,
    FileListSource,
    FolderSource,
    SyntheticSource,
    UnreadableImage,
    find_fashion_mnist,
    make_source,
)
from dinov3_jax.models.registry import NORMALIZATION

TINY = dict(global_crops_size=16, local_crops_size=8, local_crops_number=2, patch_size=4)


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


class IndexSource:
    """Label = source index; uint8 images whose content encodes the index."""

    def __init__(self, n: int = 16, size: int = 20):
        self.n, self.size = n, size

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return np.full((self.size, self.size, 3), (i * 13) % 256, np.uint8), int(i)

    num_classes = 0
    class_names = ()


# ---------------------------------------------------------------------------------------------
# Augmentation
# ---------------------------------------------------------------------------------------------


def test_crop_shapes_and_ranges():
    aug = A.DataAugmentationDINO(global_crops_size=24, local_crops_size=12, local_crops_number=3)
    img = SyntheticSource(4, 40)[0][0]
    out = aug(img, np.random.default_rng(0))
    assert out["global_crops"].shape == (2, 24, 24, 3) and out["global_crops"].dtype == np.float32
    assert out["local_crops"].shape == (3, 12, 12, 3) and out["local_crops"].dtype == np.float32
    lo = (0 - np.array(NORMALIZATION["lvd"][0])) / np.array(NORMALIZATION["lvd"][1])
    hi = (1 - np.array(NORMALIZATION["lvd"][0])) / np.array(NORMALIZATION["lvd"][1])
    for x in (out["global_crops"], out["local_crops"]):
        assert np.all(x >= lo - 1e-5) and np.all(x <= hi + 1e-5)
        assert np.isfinite(x).all()
    # no local crops at all is allowed
    out0 = A.DataAugmentationDINO(global_crops_size=8, local_crops_size=4, local_crops_number=0)(
        img, np.random.default_rng(0)
    )
    assert out0["local_crops"].shape == (0, 4, 4, 3)


def test_random_resized_crop_box():
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = A.random_resized_crop_box(rng, 50, 30, (0.05, 1.0))
        assert top >= 0 and top + h <= 30 and left >= 0 and left + w <= 50 and h > 0 and w > 0
    # impossible scale → centre-crop fallback with the ratio clamped (very wide image)
    assert A.random_resized_crop_box(rng, 100, 10, (5.0, 6.0)) == (0, (100 - 13) // 2, 10, 13)
    assert A.random_resized_crop_box(rng, 20, 20, (5.0, 6.0)) == (0, 0, 20, 20)


def test_effective_blur_and_solarize_probabilities():
    aug = A.DataAugmentationDINO(global_crops_size=8, local_crops_size=8, local_crops_number=2)
    img = np.random.default_rng(0).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    rng = np.random.default_rng(1)
    trace: list[dict] = []
    n = 500
    for _ in range(n):
        aug(img, rng, trace=trace)
    by = {c: [t for t in trace if t["crop"].startswith(c)] for c in ("global1", "global2", "local")}
    rate = {
        c: {k: np.mean([t[k] for t in ts]) for k in ("blur", "solarize", "jitter", "grayscale")} for c, ts in by.items()
    }
    assert rate["global1"]["blur"] == 0.0
    assert abs(rate["global2"]["blur"] - 0.9) < 0.05
    assert abs(rate["local"]["blur"] - 0.5) < 0.06
    assert rate["global1"]["solarize"] == 0.0 and rate["local"]["solarize"] == 0.0
    assert abs(rate["global2"]["solarize"] - 0.2) < 0.06
    for c in rate:
        assert abs(rate[c]["jitter"] - 0.8) < 0.06 and abs(rate[c]["grayscale"] - 0.2) < 0.06


def test_colour_jitter_strength_and_probabilities_are_configurable():
    """The project's crops.color_jitter / color_jitter_prob / grayscale_prob keys reach the ops."""
    img = np.random.default_rng(0).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    kw = dict(global_crops_size=8, local_crops_size=8, local_crops_number=1, global_crops_scale=(1.0, 1.0))
    never = A.DataAugmentationDINO(**kw, color_jitter_prob=0.0, grayscale_prob=0.0)
    always = A.DataAugmentationDINO(**kw, color_jitter_prob=1.0, grayscale_prob=1.0)
    for aug, expected in ((never, False), (always, True)):
        trace: list[dict] = []
        for seed in range(20):
            aug(img, np.random.default_rng(seed), trace=trace)
        assert all(t["jitter"] == expected and t["grayscale"] == expected for t in trace)
    # Jitter strengths: zero strengths leave the image as it is; full hue rotation changes it.
    still = A.color_jitter(Image.fromarray(img), np.random.default_rng(0), 0.0, 0.0, 0.0, 0.0)
    assert np.array_equal(np.asarray(still), img)
    rotated = A.color_jitter(Image.fromarray(img), np.random.default_rng(0), 0.0, 0.0, 0.0, 0.5)
    assert not np.array_equal(np.asarray(rotated), img)
    cfg = load_config("tiny_cpu", ["crops.color_jitter=[0,0,0,0.5]", "crops.color_jitter_prob=1"])
    assert A.AugmentConfig.from_any(cfg.crops).color_jitter == (0.0, 0.0, 0.0, 0.5)


def test_grey_images_skip_saturation_and_hue_with_the_same_result():
    """On a grey image the jitter skips its saturation and hue steps; the result is bit for bit
    that of all four steps (written out here), for random sizes, grey levels and outcomes."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        v = rng.integers(0, 256, tuple(rng.integers(4, 24, 2)), dtype=np.uint8)
        img = Image.fromarray(np.repeat(v[..., None], 3, axis=2))
        params = A.draw_jitter_params(rng, 0.4, 0.4, 0.4, 0.5)
        full = img
        for op in params["order"]:
            if op == 0:
                full = ImageEnhance.Brightness(full).enhance(params["brightness"])
            elif op == 1:
                full = A.adjust_contrast(full, params["contrast"])
            elif op == 2:
                full = ImageEnhance.Color(full).enhance(params["saturation"])
            else:
                full = A.adjust_hue(full, params["hue"])
        assert np.array_equal(np.asarray(A.apply_color_jitter(img, params)), np.asarray(full))
    colour = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    assert A.is_grey(img) and not A.is_grey(colour)


def test_blur_sigma_and_solarisation_probability_are_configurable():
    """crops.blur_sigma bounds every blurred crop's sigma; crops.solarize_prob is global crop 2's
    solarisation rate (0 and 1 here), and neither changes the other draws of the random stream."""
    img = np.random.default_rng(0).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    kw = dict(global_crops_size=8, local_crops_size=8, local_crops_number=2)
    cfg = A.AugmentConfig.from_any(
        load_config("tiny_cpu", ["crops.blur_sigma=[0.2,0.4]", "crops.solarize_prob=1"]).crops
    )
    assert (cfg.blur_sigma, cfg.solarize_prob) == ((0.2, 0.4), 1.0)
    traces = {}
    for name, aug in (
        ("default", A.DataAugmentationDINO(**kw)),
        ("set", A.DataAugmentationDINO(**kw, blur_sigma=(0.2, 0.4), solarize_prob=1.0)),
        ("never", A.DataAugmentationDINO(**kw, solarize_prob=0.0)),
    ):
        traces[name] = []
        for seed in range(30):
            aug(img, np.random.default_rng(seed), trace=traces[name])
    sigmas = [t["blur_sigma"] for t in traces["set"] if t["blur"]]
    assert sigmas and all(0.2 <= s <= 0.4 for s in sigmas)
    assert max(t["blur_sigma"] for t in traces["default"] if t["blur"]) > 0.4
    g2 = {name: [t["solarize"] for t in trace if t["crop"] == "global2"] for name, trace in traces.items()}
    assert all(g2["set"]) and not any(g2["never"]) and 0 < sum(g2["default"]) < 30
    for name in ("set", "never"):  # the same crops, jitter and blur decisions as the default
        for a, b in zip(traces[name], traces["default"]):
            assert (a["box"], a["flip"], a["jitter"], a["blur"]) == (b["box"], b["flip"], b["jitter"], b["blur"])


def test_photometric_ops():
    x = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, 2)
    sol = np.asarray(A.solarize(Image.fromarray(x)))
    assert np.array_equal(sol, np.where(x >= 128, 255 - x, x))
    flat = Image.fromarray(np.full((12, 12, 3), 77, np.uint8))
    assert np.array_equal(np.asarray(A.gaussian_blur(flat, 1.5)), np.asarray(flat))  # blur keeps constants
    assert np.isclose(A.gaussian_kernel1d(0.7).sum(), 1.0) and len(A.gaussian_kernel1d(0.7)) == 9
    g = np.asarray(A.grayscale(Image.fromarray(np.random.default_rng(0).integers(0, 256, (4, 4, 3), dtype=np.uint8))))
    assert g.shape == (4, 4, 3) and (g[..., 0] == g[..., 1]).all() and (g[..., 1] == g[..., 2]).all()
    red = Image.fromarray(np.tile(np.array([200, 30, 30], np.uint8), (4, 4, 1)))
    assert np.array_equal(np.asarray(A.adjust_hue(red, 0.0)), np.asarray(red))
    shifted = np.asarray(A.adjust_hue(red, 1 / 3))[0, 0]
    assert shifted.argmax() == 1  # red → green


# ---------------------------------------------------------------------------------------------
# Masking
# ---------------------------------------------------------------------------------------------


def test_masking_generator_exact_counts():
    gen = MaskingGenerator((14, 14), max_num_patches=98)
    rng = np.random.default_rng(0)
    for target in (0, 1, 3, 20, 57, 98, 150, 196):
        m = gen(target, rng)
        assert m.shape == (14, 14) and m.dtype == bool and int(m.sum()) == target


def test_mask_targets_match_recipe():
    # RECIPE.md §6.4: 224 px / patch 16, B = 64 → 64 masked crops with 20, 22, 23, …, 98 patches
    t = mask_targets(128, 196, (0.1, 0.5), 0.5)
    assert len(t) == 64 and t[:3] == [20, 22, 23] and t[-1] == 98
    assert max_masked_tokens(128, 196, 0.5, 0.5) == 64 * 98 >= sum(t)


def test_collate_masks():
    n_crops, grid = 10, 6
    gen = MaskingGenerator(grid)
    bound = max_masked_tokens(n_crops, grid * grid, 0.5, 0.5)
    out = collate_masks(n_crops, gen, np.random.default_rng(3), (0.1, 0.5), 0.5)
    masks, idx, w = out["masks"], out["mask_indices"], out["mask_weights"]
    assert masks.shape == (n_crops, 36) and masks.dtype == bool
    assert idx.shape == w.shape == (bound,) and idx.dtype == np.int32 and w.dtype == np.float32
    counts = masks.sum(1)
    targets = mask_targets(n_crops, 36, (0.1, 0.5), 0.5)
    assert (counts > 0).sum() == int(n_crops * 0.5) == len(targets)
    assert sorted(counts[counts > 0].tolist()) == sorted(targets)
    total = int(counts.sum())
    assert total <= bound
    # indices: the True entries of the crop-major flattening, in order; padding 0 with weight 0
    assert np.array_equal(idx[:total], np.flatnonzero(masks.reshape(-1)))
    assert (idx[total:] == 0).all() and (w[total:] == 0).all()
    assert np.allclose(w[:total], 1.0 / counts[idx[:total] // 36])
    assert np.isclose(w.sum(), (counts > 0).sum(), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Training pipeline
# ---------------------------------------------------------------------------------------------


def _train(source, **kw):
    args = dict(seed=0, per_host_batch=4, **TINY) | kw
    return build_train_pipeline(source, **args)


def test_train_batch_contract():
    src = SyntheticSource(24, 24, seed=1)
    pipe = _train(src)
    b = next(iter(pipe))
    B, n = 4, (16 // 4) ** 2
    m = pipe.spec.max_masked_tokens
    assert m == max_masked_tokens(2 * B, n, 0.5, 0.5)
    expect = {
        "global_crops": ((2 * B, 16, 16, 3), np.float32),
        "local_crops": ((2 * B, 8, 8, 3), np.float32),
        "masks": ((2 * B, n), np.bool_),
        "mask_indices": ((m,), np.int32),
        "mask_weights": ((m,), np.float32),
        "labels": ((B,), np.int32),
        "skipped_from": ((B,), np.int64),
        "n_skipped": ((B,), np.int32),
    }
    assert set(b) == set(expect)
    for k, (shape, dtype) in expect.items():
        assert b[k].shape == shape and b[k].dtype == dtype, k
    assert {k: (v.shape, v.dtype) for k, v in b.items()} == {
        k: (s, np.dtype(d)) for k, (s, d) in pipe.spec.shapes().items()
    }
    counts = b["masks"].sum(1)
    assert (counts > 0).sum() == B
    assert np.isclose(b["mask_weights"].sum(), B, atol=1e-5)
    total = int(counts.sum())
    assert np.array_equal(b["mask_indices"][:total], np.flatnonzero(b["masks"].reshape(-1)))
    assert ((b["labels"] >= 0) & (b["labels"] < 10)).all() and not b["n_skipped"].any()


def test_crop_major_layout():
    from dinov3_jax.data.pipeline import _Collate

    pipe = _train(IndexSource(8), local_crops_number=3)
    collate = _Collate(pipe.specs, (1.0,), seed=0, process_index=0, min_num_patches=4, max_block_ratio=0.5)
    B = 4
    g = (
        np.zeros((B, 2, 16, 16, 3), np.float32)
        + (10 * np.arange(B)[:, None] + np.arange(2)[None, :])[..., None, None, None]
    )
    loc = (
        np.zeros((B, 3, 8, 8, 3), np.float32)
        + (10 * np.arange(B)[:, None] + np.arange(3)[None, :])[..., None, None, None]
    )
    out = collate(
        0,
        {
            "global_crops": g,
            "local_crops": loc,
            "labels": np.arange(B),
            "skipped_from": np.arange(B),
            "n_skipped": np.zeros(B, np.int32),
        },
    )
    assert out["global_crops"][:, 0, 0, 0].tolist() == [10 * b + c for c in range(2) for b in range(B)]
    assert out["local_crops"][:, 0, 0, 0].tolist() == [10 * b + c for c in range(3) for b in range(B)]
    assert out["labels"].dtype == np.int32 and not out["n_skipped"].any()


def test_settings_from_config_object():
    from types import SimpleNamespace as NS

    cfg = NS(
        train=NS(seed=3),
        student=NS(patch_size=8),
        ibot=NS(mask_ratio_min_max=(0.2, 0.4), mask_sample_probability=0.25),
        crops=NS(global_crops_size=(16,), local_crops_size=8, local_crops_number=1, horizontal_flips=False),
        data=NS(num_workers=0, prefetch_buffer_size=1),
    )
    pipe = build_train_pipeline(SyntheticSource(8, 16), cfg=cfg, per_host_batch=4)
    assert pipe.spec.n_patches == 4 and pipe.spec.n_local == 1 and pipe.spec.mask_ratio_min_max == (0.2, 0.4)
    assert pipe.spec.max_masked_tokens == max_masked_tokens(8, 4, 0.4, 0.25) == 2
    b = next(iter(pipe))
    assert b["global_crops"].shape == (8, 16, 16, 3) and b["local_crops"].shape == (4, 8, 8, 3)
    assert (b["masks"].sum(1) > 0).sum() == 2
    assert _equal(b, next(iter(build_train_pipeline(SyntheticSource(8, 16), cfg=cfg, seed=3, per_host_batch=4))))


def test_determinism_and_steps():
    src = SyntheticSource(24, 24, seed=1)
    a = iter(_train(src))
    b = iter(_train(src))
    a0, a1 = next(a), next(a)
    b0, b1 = next(b), next(b)
    assert _equal(a0, b0) and _equal(a1, b1)
    assert not np.array_equal(a0["global_crops"], a1["global_crops"])
    assert not np.array_equal(a0["masks"], a1["masks"]) or not np.array_equal(a0["labels"], a1["labels"])
    c0 = next(iter(_train(src, seed=5)))
    assert not np.array_equal(a0["global_crops"], c0["global_crops"])
    # start_step gives the batch an uninterrupted stream yields at that step
    assert _equal(next(iter(_train(src, start_step=1))), a1)


def test_exact_resume_via_state():
    src = SyntheticSource(10, 24, seed=2)  # 10 images, batch 4: batches straddle epochs
    ref = iter(_train(src))
    ref_batches = [next(ref) for _ in range(5)]
    it = iter(_train(src))
    for _ in range(3):
        next(it)
    state = it.get_state()
    resumed = iter(_train(src))
    resumed.set_state(state)
    assert _equal(next(resumed), ref_batches[3])
    assert _equal(next(resumed), ref_batches[4])


def test_epochs_and_process_shards():
    src = IndexSource(16)
    seen = []
    for p in range(2):
        it = iter(_train(src, process_index=p, process_count=2))
        labels = np.concatenate([next(it)["labels"] for _ in range(2)])  # 8 per process = one epoch
        seen.append(labels)
    assert len(set(seen[0]) & set(seen[1])) == 0
    assert sorted(np.concatenate(seen).tolist()) == list(range(16))
    # each epoch of a single process is a permutation, reshuffled per epoch
    it = iter(_train(src))
    e1 = np.concatenate([next(it)["labels"] for _ in range(4)])
    e2 = np.concatenate([next(it)["labels"] for _ in range(4)])
    assert sorted(e1.tolist()) == sorted(e2.tolist()) == list(range(16)) and not np.array_equal(e1, e2)


def _write_folder(root, corrupt: bool = True):
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (root / cls / "sub").mkdir(parents=True)
        for i in range(3):
            arr = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
            ext = ".JPG" if i == 0 else ".png"
            Image.fromarray(arr).save(root / cls / f"{i}{ext}", format="JPEG" if ext == ".JPG" else "PNG")
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / cls / "sub" / "x.jpeg")
    (root / "dog" / "notes.txt").write_text("not an image")
    if corrupt:
        (root / "dog" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")


def test_folder_source_labels_and_corrupt_skipped(tmp_path):
    _write_folder(tmp_path)
    src = FolderSource(tmp_path)
    assert len(src) == 9 and src.class_names == ["cat", "dog"] and src.num_classes == 2
    assert src.files[0] == "cat/0.JPG" and "dog/bad.jpg" in src.files
    assert sorted(set(src.labels.tolist())) == [0, 1] and (src.labels[:4] == 0).all()
    bad = src.files.index("dog/bad.jpg")
    with pytest.raises(UnreadableImage) as e:
        src[bad]
    assert "bad.jpg" in str(e.value.path)
    img, label = src[0]
    assert isinstance(img, Image.Image) and img.mode == "RGB" and label == 0
    # the pipeline skips it: one epoch (9 images, B 3) has exactly one replacement
    it = iter(_train(src, per_host_batch=3))
    batches = [next(it) for _ in range(3)]
    assert sum(int(b["n_skipped"].sum()) for b in batches) == 1
    assert all(((b["labels"] >= 0) & (b["labels"] < 2)).all() for b in batches)
    # eval pipeline: the corrupt file becomes an invalid row
    rows = list(build_eval_pipeline(src, ResizeCrop(8, 9), 4))
    valid = np.concatenate([r["valid"] for r in rows])
    assert len(rows) == 3 and valid.sum() == 8 and not valid[bad]


def test_any_number_of_unreadable_images_is_skipped_and_named(tmp_path, capsys):
    """A class of 70 broken files in a row (more than the 64 the pipeline once tried) is skipped:
    every batch holds readable images, the first 10 broken ones are named in the log and all 70 in
    the listing. More than data.max_unreadable_fraction of the source broken, or nothing readable
    at all, stops with a message saying so."""
    from dinov3_jax.data.pipeline import TooManyUnreadable, UnreadableImages

    rng = np.random.default_rng(0)
    for cls in ("a_broken", "b_good"):
        (tmp_path / "photos" / cls).mkdir(parents=True)
    for i in range(70):
        (tmp_path / "photos" / "a_broken" / f"{i:02d}.jpg").write_bytes(b"not a jpeg")
    for i in range(10):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
            tmp_path / "photos" / "b_good" / f"{i}.png"
        )
    src = FolderSource(tmp_path / "photos")
    listing = tmp_path / "unreadable_images.txt"
    unreadable = UnreadableImages(src, listing, max_fraction=1.0)
    it = iter(_train(src, per_host_batch=8))
    for _ in range(10):  # 80 samples: every source index once, the broken ones replaced
        batch = next(it)
        assert (batch["labels"] == 1).all()  # only the good class's images
        unreadable.add(batch["skipped_from"], batch["n_skipped"])
    assert len(unreadable) == 70
    lines = listing.read_text().splitlines()
    assert sorted(line.split("\t")[0] for line in lines) == [
        str(tmp_path / "photos" / "a_broken" / f"{i:02d}.jpg") for i in range(70)
    ]
    printed = capsys.readouterr().out
    assert printed.count("skipping unreadable image") == 10 and f"all are listed in {listing}" in printed
    assert len(UnreadableImages(src, listing, 1.0)) == 70  # a resumed run reads the listing back

    with pytest.raises(
        TooManyUnreadable,
        match=r"of the 80 training images are unreadable \(more than data\.max_unreadable_fraction=0\.5\)",
    ):
        strict = UnreadableImages(src, tmp_path / "other.txt", max_fraction=0.5)
        for _ in range(10):
            batch = next(it)
            strict.add(batch["skipped_from"], batch["n_skipped"])
    for i in range(10):
        (tmp_path / "photos" / "b_good" / f"{i}.png").write_bytes(b"broken too")
    with pytest.raises(TooManyUnreadable, match="none of the 80 images of the training source can be read"):
        next(iter(_train(FolderSource(tmp_path / "photos"), per_host_batch=8)))


def test_folder_source_unlabelled_and_empty(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "c").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "c" / "b.png")
    src = FolderSource(tmp_path)
    assert len(src) == 2 and (src.labels == -1).all() and src.num_classes == 0
    empty = tmp_path / "empty"
    (empty / "x").mkdir(parents=True)
    (empty / "x" / "readme.txt").write_text("hi")
    with pytest.raises(ValueError, match="empty"):
        FolderSource(empty)
    with pytest.raises(ValueError, match="does not exist"):
        FolderSource(tmp_path / "missing")


def test_file_list_source_and_factory(tmp_path):
    _write_folder(tmp_path, corrupt=False)
    (tmp_path / "list.txt").write_text("cat/0.JPG\t3\n\n# comment\ndog/1.png\t1\n")
    src = FileListSource(tmp_path / "list.txt")
    assert len(src) == 2 and src[0][1] == 3 and src.num_classes == 4
    (tmp_path / "nolabel.txt").write_text("cat/1.png\n")
    assert FileListSource(tmp_path / "nolabel.txt")[0][1] == -1
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match=r"empty\.txt"):
        FileListSource(tmp_path / "empty.txt")
    assert len(make_source("folder", tmp_path)) == 8
    assert len(make_source("folder", tmp_path, num_samples=3)) == 3
    assert len(make_source("synthetic", None, "test", num_samples=7, image_size=16, seed=3)) == 7
    with pytest.raises(ValueError, match="unknown source"):
        make_source("nope", tmp_path)


# ---------------------------------------------------------------------------------------------
# Synthetic and Fashion-MNIST sources
# ---------------------------------------------------------------------------------------------


def test_synthetic_source():
    src = SyntheticSource(40, 32, seed=7)
    img, label = src[13]
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8 and label == 3
    assert np.array_equal(SyntheticSource(40, 32, seed=7)[13][0], img)  # deterministic
    assert not np.array_equal(SyntheticSource(40, 32, seed=8)[13][0], img)
    assert not np.array_equal(SyntheticSource(40, 32, seed=7, split="test")[13][0], img)
    labels = [src[i][1] for i in range(40)]
    assert np.bincount(labels).tolist() == [4] * 10 and src.num_classes == 10
    three = SyntheticSource(9, 16, num_classes=3)
    assert [three[i][1] for i in range(9)] == [0, 1, 2] * 3 and three.class_names == ["circle", "square", "triangle"]
    for i in (0, 5, 13):  # masks: aligned with the label and the drawn shape
        image, fg, lab = src.render(i)
        mask = src.get_mask(i)
        assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, lab + 1}
        assert np.array_equal(mask > 0, fg) and 0.02 < fg.mean() < 0.6
    for i in (0, 1, 2, 3, 4, 5, 8, 9):  # one-tone grey shapes, dark on a light background
        image, fg, _ = src.render(i)
        inside, outside = image[fg].astype(float), image[~fg].astype(float)
        assert np.abs(inside.mean(0) - inside.mean()).max() < 10  # grey: no colour
        assert outside.mean() - inside.mean() > 60
    with pytest.raises(ValueError):
        SyntheticSource(0)


def _write_idx(path, arr: np.ndarray, gz: bool):
    data = struct.pack(">BBBB", 0, 0, 8, arr.ndim) + b"".join(struct.pack(">I", d) for d in arr.shape) + arr.tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_reader(tmp_path, gz):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([0, 9, 3, 3, 1], np.uint8)
    sfx = ".gz" if gz else ""
    _write_idx(tmp_path / f"t10k-images-idx3-ubyte{sfx}", images, gz)
    _write_idx(tmp_path / f"t10k-labels-idx1-ubyte{sfx}", labels, gz)
    src = FashionMNISTSource(tmp_path, split="test")
    assert len(src) == 5 and src.num_classes == 10 and src.class_names[9] == "Ankle boot"
    img, lab = src[1]
    assert img.shape == (28, 28, 3) and lab == 9 and np.array_equal(img[..., 2], images[1])
    with pytest.raises(ValueError, match="train"):
        FashionMNISTSource(tmp_path, split="train")
    batch = next(iter(build_eval_pipeline(src, ResizeCrop(8, 9), 4)))
    assert batch["images"].shape == (4, 8, 8, 3) and batch["labels"].tolist() == [0, 9, 3, 3]


def test_fashion_mnist_missing(monkeypatch, tmp_path):
    import dinov3_jax.data.sources as S

    monkeypatch.setattr(S, "FASHION_MNIST_DIRS", (str(tmp_path / "nowhere"),))
    monkeypatch.delenv("FASHION_MNIST_DIR", raising=False)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        FashionMNISTSource()


def test_fashion_mnist_debian_package():
    assert find_fashion_mnist() is not None, "install Debian's dataset-fashion-mnist (make test does)"
    train, test = FashionMNISTSource(split="train"), FashionMNISTSource(split="test")
    assert len(train) == 60000 and len(test) == 10000
    img, lab = test[0]
    assert img.shape == (28, 28, 3) and 0 <= lab < 10
    assert np.bincount([train[i][1] for i in range(0, 60000, 60)], minlength=10).min() > 50


# ---------------------------------------------------------------------------------------------
# Evaluation pipeline
# ---------------------------------------------------------------------------------------------


def test_eval_pipeline_order_and_padding():
    src = SyntheticSource(10, 20, seed=0)
    rows = list(build_eval_pipeline(src, ResizeCrop(16, 18), 4, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)))
    assert len(rows) == 3
    for r in rows:
        assert r["images"].shape == (4, 16, 16, 3) and r["images"].dtype == np.float32
        assert r["labels"].dtype == np.int32 and r["valid"].dtype == bool
    labels = np.concatenate([r["labels"] for r in rows])
    valid = np.concatenate([r["valid"] for r in rows])
    assert valid.tolist() == [True] * 10 + [False] * 2
    assert labels[:10].tolist() == [src[i][1] for i in range(10)] and (labels[10:] == -1).all()
    assert (rows[-1]["images"][2:] == 0).all()
    assert rows[0]["images"].min() >= -1 - 1e-6 and rows[0]["images"].max() <= 1 + 1e-6


@pytest.mark.slow
def test_multiprocess_prefetch_matches_single_process():
    src = SyntheticSource(20, 24, seed=1)
    ref = iter(_train(src))
    expected = [next(ref) for _ in range(3)]
    it = iter(_train(src, num_workers=2))
    try:
        got = [next(it) for _ in range(3)]
        assert all(_equal(a, b) for a, b in zip(expected, got))
    finally:
        it.close()


# ---------------------------------------------------------------------------------------------
# Augmentation options: Gram-teacher crops, shared colour jitter, local crops inside global crops
# ---------------------------------------------------------------------------------------------

AUG_SRC = np.random.default_rng(7).integers(0, 256, (48, 48, 3), dtype=np.uint8)
AUG_KW = dict(global_crops_size=16, local_crops_size=8, grayscale_prob=0.0)


def _to_pil(aug: A.DataAugmentationDINO, x: np.ndarray) -> Image.Image:
    """Invert the normalisation of one crop back to the uint8 image it came from."""
    u = np.rint((x * aug.std + aug.mean) * 255)
    return Image.fromarray(np.clip(u, 0, 255).astype(np.uint8), "RGB")


def _view(image: Image.Image, rec: dict, size: int) -> Image.Image:
    """Rebuild a crop's geometric view from its trace record (RandomResizedCrop box, flip)."""
    v = A.crop_resize(image, rec["box"], size)
    return v.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rec["flip"] else v


def test_new_crop_options_from_config():
    from types import SimpleNamespace as NS

    assert A.AugmentConfig().gram_teacher_crops_size is None
    cfg = A.AugmentConfig.from_any(
        NS(gram_teacher_crops_size=(32,), gram_teacher_no_distortions=True, share_color_jitter=True)
    )
    assert cfg.gram_teacher_crops_size == 32 and cfg.gram_teacher_no_distortions and cfg.share_color_jitter
    assert A.AugmentConfig.from_any({"localcrops_subset_of_globalcrops": True}).localcrops_subset_of_globalcrops
    assert A.AugmentConfig.from_any(NS(gram_teacher_crops_size=None)).gram_teacher_crops_size is None
    with pytest.raises(NotImplementedError, match="multi-resolution"):
        A.AugmentConfig.from_any(NS(gram_teacher_crops_size=(32, 48)))
    full = load_config("tiny_cpu", ["crops.gram_teacher_crops_size=32", "crops.share_color_jitter=true"])
    got = A.AugmentConfig.from_any(full.crops)
    assert got.gram_teacher_crops_size == 32 and got.share_color_jitter
    # patch_size / inverted_blur_probabilities are not crops.* keys: defaults, or explicit overrides
    assert got.patch_size == 16 and got.inverted_blur_probabilities is True
    got = A.AugmentConfig.from_any(full.crops, patch_size=8, inverted_blur_probabilities=False)
    assert got.patch_size == 8 and got.inverted_blur_probabilities is False
    with pytest.raises(ValueError, match="patch_size"):
        A.AugmentConfig(patch_size=0)
    # default: no Gram-teacher output, and every crop's trace has the geometry and jitter outcome
    trace: list[dict] = []
    out = A.DataAugmentationDINO(**AUG_KW, local_crops_number=2)(AUG_SRC, np.random.default_rng(0), trace=trace)
    assert set(out) == {"global_crops", "local_crops"}
    assert all({"box", "flip", "parent", "jitter_params"} <= set(t) and t["parent"] is None for t in trace)


def test_gram_crops_without_distortions():
    """RECIPE.md §6.2: the Gram crop is the undistorted base crop; the global crop is resized first."""
    kw = dict(AUG_KW, local_crops_number=2, gram_teacher_crops_size=32, gram_teacher_no_distortions=True)
    off = A.DataAugmentationDINO(**kw, color_jitter_prob=0.0)
    trace: list[dict] = []
    out = off(AUG_SRC, np.random.default_rng(0), trace=trace)
    assert out["gram_teacher_crops"].shape == (2, 32, 32, 3) and out["gram_teacher_crops"].dtype == np.float32
    assert out["global_crops"].shape == (2, 16, 16, 3) and out["local_crops"].shape == (2, 8, 8, 3)
    src = Image.fromarray(AUG_SRC)
    for k in range(2):
        assert np.array_equal(out["gram_teacher_crops"][k], A.normalize(_view(src, trace[k], 32), off.mean, off.std))
    # global crop 1 (never blurred, photometric ops off) = the Gram crop resized to the global size
    small = _to_pil(off, out["gram_teacher_crops"][0]).resize((16, 16), Image.BICUBIC)
    np.testing.assert_allclose(out["global_crops"][0], A.normalize(small, off.mean, off.std), atol=1e-5)
    # colour jitter forced on: the global crops are jittered, the Gram crops are not
    on = A.DataAugmentationDINO(**kw, color_jitter_prob=1.0)
    trace_on: list[dict] = []
    jit = on(AUG_SRC, np.random.default_rng(0), trace=trace_on)
    assert all(t["jitter"] for t in trace_on)
    assert np.array_equal(jit["gram_teacher_crops"][0], out["gram_teacher_crops"][0])  # same geometry draws
    assert not np.array_equal(jit["global_crops"][0], out["global_crops"][0])
    # the jitter draws shift crop 2's geometry, so compare it with its rebuilt undistorted view
    assert np.array_equal(jit["gram_teacher_crops"][1], A.normalize(_view(src, trace_on[1], 32), on.mean, on.std))
    # a Gram size below the global size: the base crop is taken at the global size
    small_gram = A.DataAugmentationDINO(**dict(kw, gram_teacher_crops_size=12), color_jitter_prob=0.0)
    assert small_gram(AUG_SRC, np.random.default_rng(0))["gram_teacher_crops"].shape == (2, 12, 12, 3)


def test_gram_crops_with_distortions():
    """RECIPE.md §6.2: distortions at the large size, then resized to the global and Gram sizes."""
    kw = dict(AUG_KW, local_crops_number=2, gram_teacher_crops_size=32)
    dist = A.DataAugmentationDINO(**kw, color_jitter_prob=1.0)
    clean = A.DataAugmentationDINO(**kw, color_jitter_prob=1.0, gram_teacher_no_distortions=True)
    a = dist(AUG_SRC, np.random.default_rng(0))
    b = clean(AUG_SRC, np.random.default_rng(0))
    assert a["gram_teacher_crops"].shape == (2, 32, 32, 3) and a["global_crops"].shape == (2, 16, 16, 3)
    assert not np.array_equal(a["gram_teacher_crops"][0], b["gram_teacher_crops"][0])
    # the global crop is the distorted large crop (here = the Gram crop) resized to the global size
    small = _to_pil(dist, a["gram_teacher_crops"][0]).resize((16, 16), Image.BICUBIC)
    np.testing.assert_allclose(a["global_crops"][0], A.normalize(small, dist.mean, dist.std), atol=1e-5)
    # with the photometric ops off both orders give the same global crop 1 and Gram crop 1
    c = A.DataAugmentationDINO(**kw, color_jitter_prob=0.0)(AUG_SRC, np.random.default_rng(0))
    d = A.DataAugmentationDINO(**kw, color_jitter_prob=0.0, gram_teacher_no_distortions=True)(
        AUG_SRC, np.random.default_rng(0)
    )
    for key in ("global_crops", "gram_teacher_crops"):
        assert np.array_equal(c[key][0], d[key][0])


def _shared_prepass(aug: A.DataAugmentationDINO, img: np.ndarray, rng: np.random.Generator):
    """Replay share_color_jitter's image-level step: jitter (p color_jitter_prob), then grayscale."""
    c, pil = aug.cfg, Image.fromarray(img)
    params = A.draw_jitter_params(rng, *c.color_jitter) if rng.random() < c.color_jitter_prob else None
    if params is not None:
        pil = A.apply_color_jitter(pil, params)
    gray = bool(rng.random() < c.grayscale_prob)
    return (A.grayscale(pil) if gray else pil), params, gray


def test_share_color_jitter():
    """Jitter and grayscale run once on the whole image; the crops' own jitter/grayscale are off."""
    kw = dict(AUG_KW, local_crops_number=3, gram_teacher_crops_size=24, gram_teacher_no_distortions=True)
    shared = A.DataAugmentationDINO(**dict(kw, color_jitter_prob=0.5, grayscale_prob=0.5), share_color_jitter=True)
    plain = A.DataAugmentationDINO(**dict(kw, color_jitter_prob=0.0, grayscale_prob=0.0))
    outcomes = set()
    for seed in range(20):
        trace: list[dict] = []
        out = shared(AUG_SRC, np.random.default_rng(seed), trace=trace)
        assert len(trace) == 5 and not any(t["jitter"] or t["grayscale"] or t["jitter_params"] for t in trace)
        # = the unshared pipeline without jitter/grayscale on the pre-jittered image, same random stream
        rng = np.random.default_rng(seed)
        pre, params, gray = _shared_prepass(shared, AUG_SRC, rng)
        ref_trace: list[dict] = []
        assert _equal(out, plain(np.asarray(pre), rng, trace=ref_trace))
        assert [t["box"] for t in trace] == [t["box"] for t in ref_trace]
        assert all(t["shared_jitter_params"] == params and t["shared_grayscale"] == gray for t in trace)
        assert all(t["shared_jitter"] == (params is not None) for t in trace)
        # the undistorted Gram crops carry the shared jitter/grayscale: cut from the jittered image
        for k in range(2):
            gram = out["gram_teacher_crops"][k]
            assert np.array_equal(gram, A.normalize(_view(pre, trace[k], 24), shared.mean, shared.std))
            raw = A.normalize(_view(Image.fromarray(AUG_SRC), trace[k], 24), shared.mean, shared.std)
            assert np.array_equal(gram, raw) == (params is None and not gray)
        outcomes.add((params is not None, gray))
    assert len(outcomes) == 4  # applied / not applied, for both ops
    # off: every crop draws its own outcome, recorded per crop
    trace = []
    A.DataAugmentationDINO(**kw, color_jitter_prob=1.0)(AUG_SRC, np.random.default_rng(0), trace=trace)
    assert len({repr(t["jitter_params"]) for t in trace}) == 5 and not any(t["shared_jitter"] for t in trace)
    # on a constant image the shared outcome gives every crop the same colour
    flat = np.full((48, 48, 3), (200, 120, 40), np.uint8)
    for share in (True, False):
        out = A.DataAugmentationDINO(**AUG_KW, local_crops_number=4, color_jitter_prob=1.0, share_color_jitter=share)(
            flat, np.random.default_rng(1)
        )
        colours = [out["global_crops"][0, 0, 0]] + [x[0, 0] for x in out["local_crops"]]
        assert all(np.allclose(col, colours[0], atol=1e-6) for col in colours) == share


def _global_view_size(gram) -> int:
    return 16 if gram is None else max(16, gram[0])


def test_local_crops_subset_of_global_crops():
    """First L // 2 local crops from global view 1, the rest from view 2: patch-aligned s×s windows
    of the view after the local photometric ops (here only blur can apply; the trace says when)."""
    kw = dict(AUG_KW, local_crops_number=5, color_jitter_prob=0.0, patch_size=4, localcrops_subset_of_globalcrops=True)
    src = Image.fromarray(AUG_SRC)
    seen_offsets, compared, blurred = set(), 0, 0
    for gram in (None, (32, False), (32, True)):
        extra = {} if gram is None else dict(gram_teacher_crops_size=gram[0], gram_teacher_no_distortions=gram[1])
        aug = A.DataAugmentationDINO(**kw, **extra)
        for seed in range(4):
            trace: list[dict] = []
            out = aug(AUG_SRC, np.random.default_rng(seed), trace=trace)
            assert out["local_crops"].shape == (5, 8, 8, 3)
            assert out["offsets"].shape == (5, 2) and out["offsets"].dtype == np.int32
            assert [t["parent"] for t in trace] == [None, None, 0, 0, 1, 1, 1]
            assert np.all(out["offsets"] % 4 == 0) and np.all((out["offsets"] >= 0) & (out["offsets"] <= 8))
            # the parent views at the global size, rebuilt from the global crops' trace
            views = [A.resize_square(_view(src, trace[k], _global_view_size(gram)), 16) for k in range(2)]
            for i, t in enumerate(trace[2:]):
                top, left = (int(x) for x in out["offsets"][i])
                assert t["box"] == (top, left, 8, 8) and t["flip"] is False and not (t["jitter"] or t["grayscale"])
                seen_offsets.update((top, left))
                window = A.normalize(views[t["parent"]].crop((left, top, left + 8, top + 8)), aug.mean, aug.std)
                assert np.array_equal(out["local_crops"][i], window) or t["blur"]
                compared += not t["blur"]
                if t["blur"]:  # local blur (p 0.5) cannot be switched off: it runs on the whole view
                    full = A.gaussian_blur(views[t["parent"]], t["blur_sigma"])
                    window = A.normalize(full.crop((left, top, left + 8, top + 8)), aug.mean, aug.std)
                    assert np.array_equal(out["local_crops"][i], window)
                    blurred += 1
    assert seen_offsets == {0, 4, 8} and compared >= 10 and blurred >= 10
    # without the option there are no offsets; a local crop larger than the global crop is an error
    assert "offsets" not in A.DataAugmentationDINO(**AUG_KW, local_crops_number=1)(AUG_SRC, np.random.default_rng(0))
    with pytest.raises(ValueError, match="must not exceed the global crop size"):
        A.DataAugmentationDINO(**dict(kw, local_crops_size=20))
    A.DataAugmentationDINO(**dict(kw, local_crops_size=20, localcrops_subset_of_globalcrops=False))
    empty = A.DataAugmentationDINO(**dict(kw, local_crops_number=0))(AUG_SRC, np.random.default_rng(0))
    assert empty["offsets"].shape == (0, 2) and empty["local_crops"].shape == (0, 8, 8, 3)


def test_nominal_blur_probabilities():
    """compat.inverted_blur_probabilities=False: global 1 always blurred, global 2 p 0.1, local p 0.5."""
    assert A.AugmentConfig().blur_probabilities() == (0.0, 0.9, 0.5)
    aug = A.DataAugmentationDINO(
        global_crops_size=8, local_crops_size=4, local_crops_number=2, inverted_blur_probabilities=False
    )
    assert aug.cfg.blur_probabilities() == (1.0, 0.1, 0.5)
    img = np.random.default_rng(0).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    rng = np.random.default_rng(2)
    trace: list[dict] = []
    for _ in range(200):
        aug(img, rng, trace=trace)
    rate = {c: np.mean([t["blur"] for t in trace if t["crop"].startswith(c)]) for c in ("global1", "global2", "local")}
    assert rate["global1"] == 1.0
    assert abs(rate["global2"] - 0.1) < 0.06
    assert abs(rate["local"] - 0.5) < 0.08
    # the same seed with the default (inverted) probabilities never blurs global crop 1
    trace = []
    A.DataAugmentationDINO(aug.cfg, inverted_blur_probabilities=True)(img, np.random.default_rng(2), trace=trace)
    assert trace[0]["blur"] is False


def test_training_sources_decode_16_bit_images_like_features(tmp_path):
    """A 16-bit grayscale PNG is rescaled to 8 bits (value / 257), not clipped to near-white as
    PIL's own conversion does: training reads images through the same decoder as `features`."""
    (tmp_path / "c").mkdir()
    values = np.array([[0, 257 * 40], [257 * 128, 65535]], np.uint16)
    Image.fromarray(values).save(tmp_path / "c" / "deep.png")  # mode I;16
    img, _ = FolderSource(tmp_path)[0]
    np.testing.assert_array_equal(np.asarray(img)[..., 0], [[0, 40], [128, 255]])


def test_a_resumed_stream_on_another_process_count_yields_the_same_samples():
    """Elastic resume (the data half): the stream of step t is the same global samples, with the
    same crops, whatever the process count that reads it; each process reads its share."""
    src = IndexSource(64)

    def by_label(batches):  # labels → the first global crop of each sample (crop-major: rows 0..B-1)
        return {int(label): b["global_crops"][i] for b in batches for i, label in enumerate(b["labels"])}

    one = by_label([next(iter(_train(src, per_host_batch=8, start_step=3)))])
    two = by_label([next(iter(_train(src, process_index=p, process_count=2, start_step=3))) for p in range(2)])
    assert one.keys() == two.keys() and len(one) == 8
    for label in one:
        np.testing.assert_array_equal(one[label], two[label])


def test_a_subset_of_a_class_sorted_folder_keeps_every_class(tmp_path):
    """data.num_samples / data.knn_train_samples: a folder read in sorted order lists its classes
    one after the other; the subset is stratified (each class its share, drawn with the seed), not
    the first N files (which would be the first class only)."""
    sizes = {"a": 12, "b": 6, "c": 2}
    for name, count in sizes.items():
        (tmp_path / name).mkdir()
        for i in range(count):
            Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(tmp_path / name / f"{i}.png")
    subset = make_source("folder", tmp_path, num_samples=10, seed=0)
    counts = np.bincount([subset[i][1] for i in range(len(subset))], minlength=3)
    assert counts.tolist() == [6, 3, 1]  # 12/20, 6/20 and 2/20 of 10
    assert subset.labels.tolist() == sorted(subset.labels.tolist())  # read in source order
    other = make_source("folder", tmp_path, num_samples=10, seed=1)
    assert list(subset.indices) != list(other.indices)  # another seed, another draw
    assert list(make_source("folder", tmp_path, num_samples=10, seed=0).indices) == list(subset.indices)
    # As few images as classes: one of each.
    assert sorted(make_source("folder", tmp_path, num_samples=3).labels.tolist()) == [0, 1, 2]
