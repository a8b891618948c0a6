"""`dinov3-jax features` end to end on a small folder of generated images (tiny model, random weights)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from dinov3_jax import NORMALIZATION, create_backbone, load_backbone, save_backbone
from dinov3_jax.cli import main
from dinov3_jax.data.images import Resize, decode, find_images, mean_std, normalize, parse_resolution

MODEL = "dinov3_vit_tiny"  # patch 16, width 64, 3 blocks, 4 registers

# Readable images in the order the command must list them (sorted relative paths).
EXPECTED = ["a_rgb.png", "b_photo.JPG", "c_gray.png", "d_rgba.png", "sub/e_palette.gif", "sub/f_small.webp"]


def _pixels(rng, h, w, c):
    # Smooth gradients plus noise: closer to photographs than pure noise, and resize-sensitive.
    yy, xx = np.mgrid[0:h, 0:w]
    base = (yy * 255 // max(h - 1, 1) + xx * 128 // max(w - 1, 1))[..., None] % 256
    noise = rng.integers(0, 60, (h, w, c))
    return ((base + noise) % 256).astype(np.uint8).squeeze()


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("images")
    (root / "sub").mkdir()
    Image.fromarray(_pixels(rng, 40, 56, 3), "RGB").save(root / "a_rgb.png")
    Image.fromarray(_pixels(rng, 70, 50, 3), "RGB").save(root / "b_photo.JPG", quality=90)
    Image.fromarray(_pixels(rng, 33, 33, 1), "L").save(root / "c_gray.png")
    Image.fromarray(_pixels(rng, 64, 48, 4), "RGBA").save(root / "d_rgba.png")
    Image.fromarray(_pixels(rng, 45, 60, 3), "RGB").quantize(16).save(root / "sub" / "e_palette.gif")
    Image.fromarray(_pixels(rng, 20, 24, 3), "RGB").save(root / "sub" / "f_small.webp", lossless=True)
    (root / "b_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG" + bytes(range(64)))
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_backbone(create_backbone(MODEL, seed=3), path, "ours")
    return path


def _reference(weights, files, hw, normalization="lvd"):
    """The features computed independently: PIL resize, then ((x / 255) - mean) / std, then the model."""
    mean, std = (np.array(v, np.float32) for v in NORMALIZATION[normalization])
    batch = []
    for f in files:
        with Image.open(f) as img:
            rgb = img.convert("RGB")
        arr = np.asarray(rgb.resize((hw[1], hw[0]), Image.BILINEAR), np.float32)
        batch.append((arr / 255.0 - mean) / std)
    model = load_backbone(weights=weights)
    return model, np.stack(batch)


def _read_safetensors(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118


def test_features_safetensors_match_direct_computation(image_dir, weights, tmp_path, capsys):
    out = tmp_path / "feats.safetensors"
    argv = ["features", "--weights", str(weights), "--input", str(image_dir), "--resolution", "32"]
    assert main([*argv, "--out", str(out), "--patch", "--batch-size", "4"]) == 0
    captured = capsys.readouterr()
    assert "b_corrupt.jpg" in captured.err  # reported by name, then skipped
    assert "6 images" in captured.out and "1 skipped" in captured.out

    tensors, meta = _read_safetensors(out)
    files = json.loads(meta["files"])
    assert files == [str(image_dir / f) for f in EXPECTED]
    assert json.loads(meta["skipped"]) == [str(image_dir / "b_corrupt.jpg")]
    assert meta["model"] == MODEL and meta["normalization"] == "lvd"
    assert json.loads(meta["grid"]) == [2, 2] and json.loads(meta["resolution"]) == [32, 32]
    assert tensors["cls"].shape == (6, 64)
    assert tensors["registers"].shape == (6, 4, 64)
    assert tensors["patch"].shape == (6, 4, 64)

    model, x = _reference(weights, files, (32, 32))
    ref = model.forward_features(x)
    np.testing.assert_allclose(tensors["cls"], ref["x_norm_clstoken"], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(tensors["registers"], ref["x_storage_tokens"], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(tensors["patch"], ref["x_norm_patchtokens"], atol=1e-5, rtol=1e-5)


def test_npz_layers_and_patch_non_square(image_dir, weights, tmp_path, capsys):
    out = tmp_path / "feats.npz"
    a, b = image_dir / "a_rgb.png", image_dir / "sub"
    # A file, a folder, and a file inside that folder again: order as given, the duplicate dropped.
    argv = ["features", "--weights", str(weights), "--input", str(a), str(b), str(b / "e_palette.gif")]
    assert main([*argv, "--resolution", "48x32", "--out", str(out), "--layers", "2", "--patch"]) == 0
    capsys.readouterr()

    data = np.load(out)
    files = list(data["files"])
    assert files == [str(a), str(b / "e_palette.gif"), str(b / "f_small.webp")]
    assert data["files"].dtype.kind == "U"  # loadable without pickle
    assert list(data["grid"]) == [3, 2] and list(data["resolution"]) == [48, 32]
    assert str(data["normalization"]) == "lvd"
    n = len(files)
    assert data["cls"].shape == (n, 64) and data["registers"].shape == (n, 4, 64)
    assert data["patch"].shape == (n, 6, 64)
    assert data["layers_cls"].shape == (n, 2, 64)
    assert data["layers_patch"].shape == (n, 2, 6, 64)

    model, x = _reference(weights, files, (48, 32))
    ref = model.forward_features(x)
    np.testing.assert_allclose(data["cls"], ref["x_norm_clstoken"], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(data["patch"], ref["x_norm_patchtokens"], atol=1e-5, rtol=1e-5)
    layers = model.get_intermediate_layers(x, n=2, return_class_token=True, norm=True)
    for i, (patch, cls) in enumerate(layers):
        np.testing.assert_allclose(data["layers_cls"][:, i], cls, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(data["layers_patch"][:, i], patch, atol=1e-5, rtol=1e-5)


def test_strict_names_the_unreadable_file(image_dir, tmp_path, capsys):
    out = tmp_path / "never.safetensors"
    # No --weights: random init, with a warning; --strict stops at the corrupt file before any compile.
    argv = ["features", "--model", MODEL, "--input", str(image_dir), "--resolution", "32", "--out", str(out)]
    assert main([*argv, "--strict"]) != 0
    err = capsys.readouterr().err
    assert "RANDOMLY INITIALISED" in err
    assert "error" in err and "b_corrupt.jpg" in err
    assert not out.exists()


def test_no_images_is_an_error(tmp_path, capsys):
    empty = tmp_path / "empty"
    (empty / "deeper").mkdir(parents=True)
    (empty / "deeper" / "readme.txt").write_text("no pictures here")
    argv = ["features", "--model", MODEL, "--input", str(empty), "--out", str(tmp_path / "f.safetensors")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "no image files found" in err and str(empty) in err

    assert main(["features", "--model", MODEL, "--input", str(tmp_path / "missing"), "--out", "f.npz"]) == 2
    assert "input not found" in capsys.readouterr().err


@pytest.mark.parametrize("use_weights", [False, True])
def test_resolution_must_be_a_multiple_of_the_patch(image_dir, weights, tmp_path, capsys, use_weights):
    model = ["--weights", str(weights)] if use_weights else ["--model", MODEL]
    argv = ["features", *model, "--input", str(image_dir), "--resolution", "40x32", "--out", str(tmp_path / "f.npz")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "not a multiple of the patch size 16" in err and "40x32" in err


def test_bad_arguments(image_dir, tmp_path, capsys):
    base = ["features", "--model", MODEL, "--input", str(image_dir)]
    assert main([*base, "--out", str(tmp_path / "f.txt")]) == 2
    assert ".safetensors or .npz" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "f.npz"), "--resolution", "big"]) == 2
    assert "expected an integer" in capsys.readouterr().err
    assert main(["features", "--input", str(image_dir), "--out", str(tmp_path / "f.npz")]) == 2
    assert "--model" in capsys.readouterr().err


def test_parse_resolution():
    assert parse_resolution("224") == (224, 224)
    assert parse_resolution("448x640") == (448, 640)
    assert parse_resolution(96) == (96, 96)
    with pytest.raises(ValueError):
        parse_resolution("0")
    with pytest.raises(ValueError):
        parse_resolution("224x")


def test_find_images_sorted_recursive_case_insensitive(image_dir):
    assert find_images([image_dir]) == [image_dir / f for f in ["a_rgb.png", "b_corrupt.jpg", *EXPECTED[1:]]]


def test_load_image_formula(image_dir):
    # Downscaling: PIL's bilinear filter widens with the scale factor (antialiasing), as torchvision's
    # Resize(antialias=True); the result is then ((x / 255) - mean) / std in float32.
    mean, std = (np.array(v, np.float32) for v in NORMALIZATION["sat"])
    got = normalize(Resize((16, 32))(decode(image_dir / "d_rgba.png")), *mean_std("sat"))
    with Image.open(image_dir / "d_rgba.png") as img:
        small = np.asarray(img.convert("RGB").resize((32, 16), Image.BILINEAR), np.float32)
    assert got.shape == (16, 32, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, (small / 255.0 - mean) / std, atol=1e-6)


def test_a_killed_run_leaves_no_output_and_the_same_command_resumes(weights, tmp_path, capsys, monkeypatch):
    """Rows go to disk batch by batch (memory bounded in the number of images); a run killed after
    its first batch leaves no --out, and running the command again continues at the next batch
    and writes the file a straight run writes."""
    from dinov3_jax.features import DiskRows

    rng = np.random.default_rng(1)
    for i in range(20):
        Image.fromarray(_pixels(rng, 24 + i, 30, 3), "RGB").save(tmp_path / f"{i:02d}.png")
    argv = ["features", "--weights", str(weights), "--input", str(tmp_path), "--resolution", "32", "--patch"]
    argv += ["--batch-size", "8"]  # three batches (of 8, on the 8 test devices)
    assert main([*argv, "--out", str(tmp_path / "straight.npz")]) == 0

    out = tmp_path / "resumed.npz"
    commit, commits = DiskRows.commit, []

    def commit_then_die(self):
        if len(commits) == 1:  # the second batch's rows are written, its progress not: redone on resume
            raise KeyboardInterrupt
        commits.append(self.next_index)
        commit(self)

    monkeypatch.setattr(DiskRows, "commit", commit_then_die)
    with pytest.raises(KeyboardInterrupt):
        main([*argv, "--out", str(out)])
    monkeypatch.undo()
    work = tmp_path / ".resumed.npz.partial"
    assert not out.exists() and sorted(p.name for p in tmp_path.glob(".resumed*")) == [work.name]
    assert json.loads((work / "progress.json").read_text())["next_index"] == 8
    assert np.load(work / "patch.npy", mmap_mode="r").shape == (20, 2, 2, 64)  # on disk, every row
    capsys.readouterr()
    assert main([*argv, "--out", str(out)]) == 0
    assert "resuming at image 8 of 20" in capsys.readouterr().err
    assert not work.exists()
    with np.load(out) as got, np.load(tmp_path / "straight.npz") as want:
        assert sorted(got.files) == sorted(want.files)
        for key in want.files:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_out_is_checked_before_any_work(image_dir, tmp_path, capsys):
    """--out is refused in one line, before the weights are read (they do not exist here): a folder,
    an existing file without --force, a place that cannot be written."""
    argv = ["features", "--weights", str(tmp_path / "missing.pth"), "--input", str(image_dir), "--out"]
    (tmp_path / "old.npz").write_bytes(b"the user's file")
    for out, message in (
        (tmp_path, "is a folder"),
        (tmp_path / "old.npz", "exists; pass --force to replace it"),
        ("/sys/dinov3_jax_features/f.npz", "cannot be written to"),
    ):
        assert main([*argv, str(out)]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert (tmp_path / "old.npz").read_bytes() == b"the user's file"
