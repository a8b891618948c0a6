"""The DINOv3 ConvNeXt against Hugging Face `transformers.DINOv3ConvNextModel` (fp32, every weight
randomised, PARITY.md §3–6): every stage's output, the pooled and final-normed features at two
input sizes (one non-square, one not a multiple of the stride), the official and HF layouts both
ways, and the parameter counts of the four released sizes (RECIPE.md §2.3)."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import DINOv3ConvNextModel

from dinov3_jax.convert.ours import abstract_model, model_from_flat, model_to_flat
from dinov3_jax.models.registry import MODELS, get_spec
from dinov3_jax.models.vit import count_params
from dinov3_jax.weights import load_backbone, read_weights, save_backbone
from tests.hf_reference import make_hf_convnext, official_convnext_state_dict

TOL = dict(atol=1e-5, rtol=1e-5)
# (batch, height, width): non-square at a multiple of 32, and a size the convs have to floor.
SHAPES = [(2, 96, 128), (1, 100, 70)]


@functools.cache
def hf_model() -> DINOv3ConvNextModel:
    return make_hf_convnext()


@functools.cache
def hf_outputs(shape):
    x = np.random.default_rng(sum(shape)).standard_normal((shape[0], 3, *shape[1:])).astype(np.float32)
    with torch.no_grad():
        out = hf_model()(torch.from_numpy(x), output_hidden_states=True)
    return x.transpose(0, 2, 3, 1), out


@pytest.fixture(scope="module")
def our_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf_convnext")
    hf_model().save_pretrained(folder)
    return load_backbone(weights=folder)


@pytest.mark.parametrize("shape", SHAPES)
def test_final_and_pooled_features_match(our_model, shape):
    x, ref = hf_outputs(shape)
    ff = our_model.forward_features(jnp.asarray(x))
    last = ref.last_hidden_state.numpy()
    np.testing.assert_allclose(ff["x_norm_clstoken"], ref.pooler_output.numpy(), **TOL)
    np.testing.assert_allclose(ff["x_norm_patchtokens"], last[:, 1:], **TOL)
    assert ff["x_storage_tokens"].shape == (shape[0], 0, 64)
    stage4 = ref.hidden_states[4].numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(ff["x_prenorm"], stage4.reshape(shape[0], -1, 64), **TOL)


@pytest.mark.parametrize("shape", SHAPES)
def test_every_stage_matches(our_model, shape):
    x, ref = hf_outputs(shape)
    stages = our_model.get_intermediate_layers(jnp.asarray(x), n=4, reshape=True, return_class_token=True, norm=False)
    for i, (patches, pooled) in enumerate(stages):
        want = ref.hidden_states[i + 1].numpy().transpose(0, 2, 3, 1)
        bound = 1e-5 * max(1.0, float(np.abs(want).max()))
        assert float(np.abs(np.asarray(patches) - want).max()) <= bound, f"stage {i}"
        np.testing.assert_allclose(pooled, want.mean(axis=(1, 2)), atol=bound, rtol=1e-5)
    # With norm, only the last stage is normed (the official `norms` are identity for stages 0-2).
    normed = our_model.get_intermediate_layers(jnp.asarray(x), n=[1, 3], return_class_token=True, norm=True)
    np.testing.assert_allclose(normed[0][0], np.asarray(stages[1][0]).reshape(shape[0], -1, 16), **TOL)
    np.testing.assert_allclose(normed[1][0], ref.last_hidden_state.numpy()[:, 1:], **TOL)
    np.testing.assert_allclose(normed[1][1], ref.pooler_output.numpy(), **TOL)


def test_intermediate_maps_resized_to_the_patch_grid(our_model):
    """With `patch_size`, each stage map is resized to (H//p, W//p) as torch's antialiased bilinear."""
    x, ref = hf_outputs(SHAPES[0])
    model = model_from_flat(our_model.config.replace(patch_size=16), model_to_flat(our_model))
    out = model.get_intermediate_layers(jnp.asarray(x), n=[0, 3], reshape=True, norm=False)
    for i, got in zip((0, 3), out):
        want = F.interpolate(ref.hidden_states[i + 1], size=(6, 8), mode="bilinear", antialias=True)
        assert got.shape == (2, 6, 8, our_model.config.dims[i])
        np.testing.assert_allclose(got, want.numpy().transpose(0, 2, 3, 1), atol=1e-4, rtol=1e-5)


def test_official_layout_import_export_round_trip(our_model, tmp_path):
    official = official_convnext_state_dict(hf_model())
    path = tmp_path / "dinov3_convnext_tiny_like.pth"
    torch.save(official, path)
    model = load_backbone(weights=path)
    assert model.config == our_model.config
    x, ref = hf_outputs(SHAPES[1])
    np.testing.assert_allclose(model(jnp.asarray(x)), ref.pooler_output.numpy(), **TOL)
    # official -> ours -> official is bit-exact, the duplicated final norm included.
    out = save_backbone(model, tmp_path / "again.pth", layout="meta")
    layout, back, _ = read_weights(out)
    assert layout == "meta" and sorted(back) == sorted(official)
    for key, value in official.items():
        np.testing.assert_array_equal(back[key], value.numpy(), err_msg=key)


def test_hf_export_loads_in_transformers(our_model, tmp_path):
    folder = save_backbone(our_model, tmp_path / "hf", layout="hf")
    reloaded = DINOv3ConvNextModel.from_pretrained(folder).eval()
    theirs = hf_model().state_dict()
    for key, value in reloaded.state_dict().items():  # HF -> ours -> HF is bit-exact
        np.testing.assert_array_equal(value.numpy(), theirs[key].numpy(), err_msg=key)
    x, ref = hf_outputs(SHAPES[0])
    with torch.no_grad():
        again = reloaded(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
    np.testing.assert_array_equal(again.last_hidden_state.numpy(), ref.last_hidden_state.numpy())


def test_ours_round_trip_and_wrong_model_error(our_model, tmp_path):
    path = save_backbone(our_model, tmp_path / "ours.safetensors")
    again = model_to_flat(load_backbone(weights=path))
    for key, value in model_to_flat(our_model).items():
        np.testing.assert_array_equal(again[key], value)
    with pytest.raises(ValueError, match="does not hold a dinov3_convnext_tiny"):
        load_backbone("dinov3_convnext_tiny", path)
    with pytest.raises(ValueError, match="architecture"):
        load_backbone("dinov3_vit_tiny", path)


@pytest.mark.parametrize("name", [n for n in MODELS if n.startswith("dinov3_convnext_") and MODELS[n].n_params])
def test_released_sizes_have_the_stated_parameter_counts(name):
    assert count_params(abstract_model(get_spec(name).config)) == MODELS[name].n_params


# ---------------------------------------------------------------------------------------------
# Every frozen-backbone command through the front door with a ConvNeXt (stride 32)
# ---------------------------------------------------------------------------------------------


def test_frozen_backbone_commands_take_a_convnext(tmp_path, capsys):
    from PIL import Image

    from dinov3_jax.cli import main

    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)).save(tmp_path / f"{name}.png")
    weights = save_backbone(load_backbone("dinov3_convnext_test", seed=1), tmp_path / "cnx.safetensors")
    model = ["--weights", str(weights)]

    out = tmp_path / "feats.npz"
    argv = ["features", *model, "--input", str(tmp_path), "--resolution", "64x96", "--patch", "--layers", "2"]
    assert main([*argv, "--out", str(out)]) == 0
    data = np.load(out)
    assert str(data["model"]) == "dinov3_convnext_test" and list(data["grid"]) == [2, 3]
    assert data["cls"].shape == (2, 64) and data["registers"].shape == (2, 0, 64)
    assert data["patch"].shape == (2, 6, 64)
    # The last two stages at their own width and stride (32 channels at stride 16, 64 at 32).
    assert data["stage2_cls"].shape == (2, 32) and data["stage2_patch"].shape == (2, 4 * 6, 32)
    np.testing.assert_allclose(data["stage3_cls"], data["cls"], atol=1e-6)
    np.testing.assert_allclose(data["stage3_patch"], data["patch"], atol=1e-6)

    assert main(["show", "pca", *model, "--input", str(tmp_path / "a.png"), "--resolution", "64", "--out",
                 str(tmp_path / "pca.png")]) == 0  # fmt: skip
    assert main(["show", "attention", *model, "--input", str(tmp_path / "a.png"), "--out",
                 str(tmp_path / "attn.png")]) == 2  # fmt: skip
    assert "has no attention" in capsys.readouterr().err
    assert main(["eval", "knn", *model, "--train", "synthetic:16", "--val", "synthetic:8", "--resolution", "64",
                 "--ks", "3", "--no-cache"]) == 0  # fmt: skip
    assert main(["segment", *model, "--resolution", "64", "--binary", "--synthetic-samples", "8",
                 "--steps", "5"]) == 0  # fmt: skip
    assert "mIoU" in capsys.readouterr().out


def test_depthwise_conv_gradients_are_the_convolutions():
    """Training differentiates the shifted-add depthwise conv through its custom VJP: checked
    against finite differences."""
    from jax.test_util import check_grads

    from dinov3_jax.models.convnext import depthwise_conv

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 5, 6, 3)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((7, 7, 1, 3)), jnp.float32)
    check_grads(depthwise_conv, (x, kernel), order=1, modes=["rev"], atol=2e-2, rtol=2e-2)
