"""`dinov3-jax show` pictures and the attention-map API (tiny model, small images)."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from dinov3_jax.backbone import Backbone
from dinov3_jax.cli import main
from dinov3_jax.data.images import mean_std, normalize
from dinov3_jax.show import foreground, match, panels, pca, similarity
from dinov3_jax.show import model as show_model
from dinov3_jax.weights import load_backbone

MODEL = ["--model", "dinov3_vit_tiny"]  # patch 16, width 64, 4 heads, 4 registers


@functools.cache
def tiny():
    return load_backbone("dinov3_vit_tiny")


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """A 64×48 (W×H) landscape and a 48×64 portrait picture with some structure."""
    root = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:48, 0:64]
    land = np.stack([xx * 4, yy * 5, 128 + 60 * np.sin(xx / 5.0)], -1) + rng.normal(0, 8, (48, 64, 3))
    land[10:30, 20:44] = (230, 40, 40)
    portrait = np.ascontiguousarray(land.transpose(1, 0, 2)[::-1])
    paths = {}
    for name, arr in (("land", land), ("portrait", portrait)):
        paths[name] = root / f"{name}.png"
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(paths[name])
    masks = root / "masks"
    images = root / "images"
    masks.mkdir()
    images.mkdir()
    mask = np.zeros((48, 64), np.uint8)
    mask[0:32, 16:48] = 1  # whole patches, so some are clearly foreground
    for i in range(2):
        Image.open(paths["land"]).save(images / f"{i}.png")
        Image.fromarray(mask).save(masks / f"{i}.png")
    paths["images"], paths["masks"] = images, masks
    return paths


def show(kind, out, *inputs, extra=()):
    argv = ["show", kind, *MODEL, "--input", *map(str, inputs), "--out", str(out), "--resolution", "64", *extra]
    assert main(argv) == 0
    with Image.open(out) as img:
        assert img.format == "PNG" and img.mode == "RGB"
        return img.size


# ---------------------------------------------------------------------------------------------
# Every command writes a PNG of the documented size (picture size 64×48 at --resolution 64)
# ---------------------------------------------------------------------------------------------


def test_show_pca(pictures, tmp_path, capsys):
    assert show("pca", tmp_path / "pca.png", pictures["land"]) == (2 * 64, 48)
    assert "RANDOMLY INITIALISED" in capsys.readouterr().err


def test_show_pca_foreground_from_folders(pictures, tmp_path):
    extra = ["--foreground", "--train-images", str(pictures["images"]), "--train-masks", str(pictures["masks"])]
    assert show("pca", tmp_path / "pca_fg.png", pictures["land"], extra=extra) == (2 * 64, 48)


def test_show_similarity(pictures, tmp_path):
    assert show("similarity", tmp_path / "sim.png", pictures["land"], extra=["--point", "30", "20"]) == (128, 48)
    # Panels rescaled: longer side 100 → 100×75 each.
    extra = ["--point", "30", "20", "--panel-size", "100"]
    assert show("similarity", tmp_path / "sim_big.png", pictures["land"], extra=extra) == (200, 75)


def test_show_attention(pictures, tmp_path):
    # Columns: image, mean, 4 heads; rows: CLS + 4 registers.
    assert show("attention", tmp_path / "attn.png", pictures["land"]) == (6 * 64, 5 * 48)


def test_show_foreground_default_synthetic(pictures, tmp_path):
    assert show("foreground", tmp_path / "fg.png", pictures["land"]) == (3 * 64, 48)


def test_show_match(pictures, tmp_path):
    # The portrait becomes 48×64 (W×H): [64 + 48] wide, two rows of max(48, 64) px.
    size = show("match", tmp_path / "match.png", pictures["land"], pictures["portrait"], extra=["--max-lines", "5"])
    assert size == (64 + 48, 2 * 64)


def test_show_errors(pictures, tmp_path, capsys):
    base = ["show", "similarity", *MODEL, "--input", str(pictures["land"]), "--resolution", "64"]
    assert main([*base, "--out", str(tmp_path / "x.png")]) == 2  # no --point
    assert "--point" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "x.jpg"), "--point", "1", "1"]) == 2
    assert main([*base, "--out", str(tmp_path / "x.png"), "--point", "99", "1"]) == 2  # outside the image
    match = ["show", "match", *MODEL, "--input", str(pictures["land"]), "--out", str(tmp_path / "m.png")]
    assert main(match) == 2  # needs two images
    assert not (tmp_path / "x.png").exists()


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


def test_picture_size():
    assert panels.picture_size((64, 48), "64", 16) == (48, 64)
    assert panels.picture_size((48, 64), 64, 16) == (64, 48)
    assert panels.picture_size((1000, 100), "64", 16) == (16, 64)  # at least one patch
    assert panels.picture_size((1000, 100), "32x48", 16) == (32, 48)  # exact
    with pytest.raises(ValueError, match="multiple"):
        panels.picture_size((64, 48), "60", 16)


def test_attention_maps_are_probabilities():
    model = tiny()
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 48, 64, 3)), jnp.float32)
    full = np.asarray(model.get_last_self_attention(x))
    n = model.n_prefix_tokens + 3 * 4
    assert full.shape == (2, 4, n, n) and full.dtype == np.float32
    assert full.min() >= 0.0
    np.testing.assert_allclose(full.sum(-1), 1.0, atol=1e-5)
    prefix = np.asarray(model.get_last_self_attention(x, prefix_only=True))
    assert prefix.shape == (2, 4, model.n_prefix_tokens, n)
    np.testing.assert_allclose(prefix, full[:, :, : model.n_prefix_tokens], atol=1e-6)
    # Through the pictures' access path: an image, normalised by the extraction loop.
    image = np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    maps = show_model.prefix_attention(Backbone(model), image, (48, 64))
    direct = np.asarray(model.get_last_self_attention(normalize(image, *mean_std("lvd"))[None], prefix_only=True))
    assert maps.shape == (5, 4, 3, 4)
    np.testing.assert_allclose(maps.reshape(5, 4, 12), direct[0, :, :, 5:].transpose(1, 0, 2), atol=1e-6)


def test_attention_matches_hf_eager():
    """Last-block attention probabilities equal HF `output_attentions=True` (eager attention)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import torch

    from dinov3_jax.convert import hf as hf_convert
    from dinov3_jax.convert.ours import model_from_flat
    from tests.hf_reference import make_hf_model, state_dict_numpy

    ref = make_hf_model("mlp_reg4")
    ref.set_attn_implementation("eager")
    cfg = hf_convert.config_from_hf(ref.config.to_dict())
    model = model_from_flat(cfg, hf_convert.to_ours(state_dict_numpy(ref), cfg))
    x = np.random.default_rng(1).standard_normal((1, 3, 64, 80)).astype(np.float32)
    with torch.no_grad():
        expected = ref(torch.from_numpy(x), output_attentions=True).attentions[-1].numpy()
    ours = np.asarray(model.get_last_self_attention(jnp.asarray(x.transpose(0, 2, 3, 1))))
    np.testing.assert_allclose(ours, expected, atol=1e-5)


def test_nearest_neighbours_match_brute_force():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((50, 8)), rng.standard_normal((37, 8))
    b[:10] = a[:10] * 3.0  # ten exact (scaled) correspondences
    nn12, sim12, nn21 = match.nearest_neighbours(a, b, chunk=7)
    an, bn = a / np.linalg.norm(a, axis=1, keepdims=True), b / np.linalg.norm(b, axis=1, keepdims=True)
    s = an @ bn.T
    np.testing.assert_array_equal(nn12, s.argmax(1))
    np.testing.assert_allclose(sim12, s.max(1), rtol=1e-6)
    np.testing.assert_array_equal(nn21, s.argmax(0))
    i, j, _ = match.mutual_nearest_neighbours(a, b)
    expected = [k for k in range(50) if s[:, s[k].argmax()].argmax() == k]
    np.testing.assert_array_equal(i, expected)
    assert set(range(10)) <= set(i.tolist())
    np.testing.assert_array_equal(j, s.argmax(1)[i])


def test_pca_and_similarity_maps():
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((3, 4, 16)).astype(np.float32)
    rgb = pca.pca_rgb(feats)
    assert rgb.shape == (3, 4, 3) and rgb.min() == 0.0 and rgb.max() == 1.0
    keep = np.zeros((3, 4), bool)
    keep[:2, :2] = True
    masked = pca.pca_rgb(feats, keep)
    assert np.all(masked[~keep] == 0.0)
    sim = similarity.cosine_similarity_map(feats, 1, 2)
    assert sim[1, 2] == pytest.approx(1.0) and np.all(sim <= 1.0 + 1e-6)


def test_logistic_regression_separates():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 10))
    y = (x[:, 0] + 0.5 * x[:, 3] > 0).astype(int)
    clf = foreground.fit_logistic_regression(x, y)
    assert np.mean((clf.predict_proba(x) >= 0.5) == y) > 0.97
    targets = foreground.patch_targets(np.pad(np.ones((16, 16), np.uint8), ((0, 16), (0, 16))), (2, 2))
    np.testing.assert_array_equal(targets, [[1, 0], [0, 0]])


def test_plot_writes_the_curves_of_a_run(tmp_path):
    """`dinov3-jax plot RUN_DIR` draws a PNG from a small metrics.jsonl (with a non-finite value,
    k-NN rows and a multi-student series); a folder without metrics is a one-line error."""
    import json

    rows = [
        {
            "step": s,
            "loss": 8.0 - s,
            "dino_global_minus_log_k": 0.5 - 0.2 * s,
            "teacher_entropy": 3.0,
            "student_entropy": 3.5 - 0.1 * s,
            "prototypes_in_use": 40 + s,
            "cls_effective_rank": 10.0 + s,
            "lr": 1e-4 * s,
            "s1/loss": 7.0 if s != 2 else "nan",
        }
        for s in range(1, 5)
    ]
    rows.append({"step": 4, "knn/top1_k20": 55.0})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["plot", str(tmp_path)]) == 0
    with Image.open(tmp_path / "curves.png") as png:
        assert png.size[0] > 800 and png.size[1] > 400
    (tmp_path / "empty").mkdir()
    assert main(["plot", str(tmp_path / "empty")]) == 2
