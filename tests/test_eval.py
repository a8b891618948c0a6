"""Global-feature evaluation: linear probe, logistic regression, feature extraction and its cache,
and `dinov3-jax eval` end to end (RECIPE.md §8.1–8.3)."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from dinov3_jax.backbone import Backbone, Outputs
from dinov3_jax.cli import main
from dinov3_jax.data.images import ResizeCrop
from dinov3_jax.data.pipeline import build_eval_pipeline
from dinov3_jax.data.sources import SyntheticSource
from dinov3_jax.eval import extract as extract_mod
from dinov3_jax.eval.cli import default_resolution, parse_source
from dinov3_jax.eval.linear import train_linear_probe
from dinov3_jax.eval.logreg import LogisticRegression, logistic_regression_eval, split_train_val
from dinov3_jax.models.registry import NORMALIZATION, create_backbone

MEAN, STD = NORMALIZATION["lvd"]
RES, BATCH = 32, 16  # one compiled extraction shape for the whole file


def blobs(n, noise, *, classes=5, dim=24, seed=0):
    """Gaussian blobs around fixed class centres: separable for small noise, overlapping for large."""
    centers = np.random.default_rng(123).standard_normal((classes, dim)) * 3.0
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    return (centers[y] + noise * rng.standard_normal((n, dim))).astype(np.float32), y


# ---------------------------------------------------------------------------------------------
# Probes on synthetic features
# ---------------------------------------------------------------------------------------------


def test_linear_probe_separable_and_noisy():
    xtr, ytr = blobs(300, 0.5, seed=1)
    xva, yva = blobs(100, 0.5, seed=2)
    res = train_linear_probe(xtr, ytr, xva, yva, lrs=(1e-3, 1e-2, 1e-1), epochs=4, batch_size=64)
    assert res.top1 >= 95.0 and res.top5 == 100.0
    assert res.best_lr in (1e-3, 1e-2, 1e-1) and set(res.per_lr) == {1e-3, 1e-2, 1e-1}
    assert res.iterations == 4 * (300 // 64) and len(res.history) == 4
    assert res.per_lr[res.best_lr]["top1"] == max(v["top1"] for v in res.per_lr.values())

    xtr, ytr = blobs(300, 6.0, seed=3)
    xva, yva = blobs(100, 6.0, seed=4)
    noisy = train_linear_probe(xtr, ytr, xva, yva, lrs=(1e-3, 1e-2, 1e-1), epochs=4, batch_size=64)
    assert 35.0 < noisy.top1 < 100.0  # chance is 20 %


def test_logreg_separable_and_noisy():
    cs = 10.0 ** np.linspace(-6, 5, 6)
    xtr, ytr = blobs(300, 0.5, seed=1)
    xte, yte = blobs(100, 0.5, seed=2)
    res = logistic_regression_eval(xtr, ytr, xte, yte, Cs=cs, max_iter=200)
    assert res.top1 >= 95.0 and res.top5 == 100.0
    assert res.best_C in set(cs.tolist()) and len(res.val_top1) == len(cs)

    xtr, ytr = blobs(300, 6.0, seed=3)
    xte, yte = blobs(100, 6.0, seed=4)
    noisy = logistic_regression_eval(xtr, ytr, xte, yte, Cs=cs, max_iter=200, normalize=True)
    assert 35.0 < noisy.top1 < 100.0


def test_logreg_regularisation_and_split():
    x, y = blobs(300, 6.0, seed=5)
    strong = LogisticRegression(1e-6, max_iter=300).fit(x, y)
    weak = LogisticRegression(1e3, max_iter=300).fit(x, y)
    acc = lambda m: (m.predict(x) == y).mean()  # noqa: E731
    assert acc(strong) < acc(weak) - 0.1  # strong regularisation underfits the training set
    assert np.abs(strong.params["w"]).max() < 0.1 * np.abs(weak.params["w"]).max()
    assert strong.predict(x[:7]).shape == (7,) and strong.scores(x[:7]).shape == (7, 5)

    labels = np.repeat(np.arange(4), [30, 11, 2, 1])
    train, val = split_train_val(labels)
    assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == len(labels)
    assert np.bincount(labels[val], minlength=4).tolist() == [3, 1, 1, 0]  # 10 %, at least 1, none of 1
    assert np.array_equal(split_train_val(labels)[1], val)  # seeded


# ---------------------------------------------------------------------------------------------
# Feature extraction and its cache
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    return create_backbone("dinov3_vit_tiny")


@pytest.fixture(scope="module")
def source():
    return SyntheticSource(num_samples=20, image_size=RES, split="train")


TRANSFORM = ResizeCrop(RES, RES * 256 // 224)


def extract(model, src, **kw):
    # batch 12 is not a multiple of the 8 test devices: rounded up to 16 (and the last batch padded)
    return extract_mod.extract(
        Backbone(model), src, transform=TRANSFORM, outputs=Outputs(linear_blocks=2), batch_size=12, **kw
    )


def test_extract_features_matches_direct_call(tiny, source):
    feats = extract(tiny, source)
    d = tiny.config.embed_dim
    assert feats["cls"].shape == (20, d) and feats["linear"].shape == (20, 3 * d)  # (n + 1)·D for n = 2
    assert feats.labels.tolist() == [i % 10 for i in range(20)]
    assert feats.indices.tolist() == list(range(20)) and not feats.skipped
    assert not feats.from_cache

    batch = next(iter(build_eval_pipeline(source, TRANSFORM, BATCH, MEAN, STD)))
    x = jnp.asarray(batch["images"])
    layers = tiny.get_intermediate_layers(x, n=2, return_class_token=True, norm=True)
    direct = jnp.concatenate([layers[0][1], layers[1][1], layers[1][0].mean(axis=1)], axis=-1)
    cls = tiny.forward_features(x)["x_norm_clstoken"]
    np.testing.assert_allclose(feats["linear"][:BATCH], np.asarray(direct), atol=2e-5)
    np.testing.assert_allclose(feats["cls"][:BATCH], np.asarray(cls), atol=2e-5)
    np.testing.assert_allclose(feats["linear"][:, d : 2 * d], feats["cls"], atol=1e-6)  # last block's CLS


def test_feature_cache_is_used(tiny, source, tmp_path, monkeypatch):
    first = extract(tiny, source, cache_dir=tmp_path)
    assert not first.from_cache and len(list(tmp_path.glob("features-*.npz"))) == 1

    def no_forward(*args, **kwargs):
        raise AssertionError("the cached features should have been loaded")

    monkeypatch.setattr(extract_mod, "build_eval_pipeline", no_forward)
    second = extract(tiny, source, cache_dir=tmp_path)
    assert second.from_cache
    for name in ("cls", "linear"):
        np.testing.assert_array_equal(first[name], second[name])
    np.testing.assert_array_equal(first.labels, second.labels)
    monkeypatch.undo()

    # A different model (same architecture, other weights) or different data misses the cache.
    other = create_backbone("dinov3_vit_tiny", seed=1)
    assert not extract(other, source, cache_dir=tmp_path).from_cache
    smaller = SyntheticSource(num_samples=12, image_size=RES, split="train")
    assert not extract(tiny, smaller, cache_dir=tmp_path).from_cache
    assert len(list(tmp_path.glob("features-*.npz"))) == 3


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------


def test_parse_source():
    assert parse_source("synthetic").kind == "synthetic"
    assert parse_source("synthetic:24").num_samples == 24
    assert parse_source("folder:/data/in1k").path == "/data/in1k"
    assert parse_source("fashion_mnist").path is None
    assert parse_source("fashion-mnist:/x").path == "/x"
    assert default_resolution(16) == 224 and default_resolution(14) == 224


def test_cli_knn_and_linear_end_to_end(tmp_path, capsys):
    common = ["--model", "dinov3_vit_tiny", "--train", "synthetic:24", "--val", "synthetic:16"]
    common += ["--resolution", str(RES), "--batch-size", str(BATCH), "--cache-dir", str(tmp_path / "cache")]
    out = tmp_path / "knn.json"
    assert main(["eval", "knn", *common, "--ks", "5", "10", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["probe"] == "knn" and record["n_train"] == 24 and record["n_val"] == 16
    assert {"top1@5", "top5@5", "top1@10", "top5@10"} <= set(record["results"])
    assert all(0.0 <= v <= 100.0 for v in record["results"].values())
    captured = capsys.readouterr()
    assert "RANDOMLY INITIALISED" in captured.err and "top-1" in captured.out

    # The linear probe reuses the cached features (same model, data and transform).
    out = tmp_path / "linear.json"
    assert main(["eval", "linear", *common, "--lrs", "0.01", "0.1", "--epochs", "2", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["features_from_cache"] == {"train": True, "val": True}
    assert record["feature_dim"] == 2 * 64 and record["results"]["best_lr"] in (0.01, 0.1)


def test_cli_bad_source_is_named(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["eval", "knn", "--model", "dinov3_vit_tiny", "--train", "imagenet:/data", "--val", "synthetic"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "imagenet:/data" in err and "folder:PATH" in err
    with pytest.raises(SystemExit):
        main(["eval", "knn", "--model", "dinov3_vit_tiny", "--train", "synthetic", "--val", "synthetic:many"])
    assert "synthetic:many" in capsys.readouterr().err


def test_cli_knn_names_dropped_files_and_refuses_a_class_without_images(tmp_path, capsys):
    """A class whose every image is unreadable would vanish from the accuracy (100% top-1 over the
    rest): the probe reports the dropped files per class and refuses."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / "imgs" / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (RES, RES, 3), dtype=np.uint8)).save(
                    tmp_path / "imgs" / split / cls / f"{i}.png"
                )
    (tmp_path / "imgs" / "train" / "cat" / "0.png").write_bytes(b"broken")  # one of three: reported, kept going
    for i in range(3):
        (tmp_path / "imgs" / "val" / "dog" / f"{i}.png").write_bytes(b"broken")  # the whole class
    common = ["eval", "knn", "--model", "dinov3_vit_tiny", "--resolution", str(RES), "--batch-size", str(BATCH)]
    common += [
        "--no-cache",
        "--ks",
        "2",
        "--train",
        f"folder:{tmp_path / 'imgs'}",
        "--val",
        f"folder:{tmp_path / 'imgs'}",
    ]
    assert main(common) == 2
    err = capsys.readouterr().err
    assert (
        "1 unreadable images left out (cat 1 of 3)" in err and str(tmp_path / "imgs" / "train" / "cat" / "0.png") in err
    )
    assert "3 unreadable images left out (dog 3 of 3)" in err
    assert "every image of class 'dog' is unreadable" in err
