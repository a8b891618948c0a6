"""Numerical parity with Hugging Face `transformers.DINOv3ViTModel` (fp32, random weights).

Tolerances (PARITY.md §6): final normalised tokens atol = rtol = 1e-5; the pre-norm residual
stream max|Δ| ≤ 1e-5 · max(1, max|ref|); RoPE tables atol 1e-6.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dinov3_jax.convert import hf as hf_convert
from dinov3_jax.convert.ours import model_from_flat, model_to_flat
from dinov3_jax.inference import jit_method
from dinov3_jax.models.layers import rope_sin_cos
from dinov3_jax.weights import load_backbone
from tests.hf_reference import CASES, make_hf_model, official_state_dict, run_hf, state_dict_numpy

# (batch, height, width): square at the usual size, non-square (4×5 patches), and a size that is
# not a multiple of the patch (floor cropping).
SHAPES = {"224": (2, 224, 224), "64x80": (1, 64, 80), "230": (1, 230, 230)}
CASE_SHAPES = [("mlp_reg4", s) for s in SHAPES] + [("swiglu_reg0", "64x80"), ("swiglu_nobias", "64x80")]


def assert_residual_close(ours, ref, what: str):
    ours, ref = np.asarray(ours), np.asarray(ref)
    bound = 1e-5 * max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(ours - ref).max())
    assert err <= bound, f"{what}: max |Δ| = {err:.3g} > {bound:.3g}"


def images(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((shape[0], 3, *shape[1:])).astype(np.float32)


def nhwc(x_nchw: np.ndarray) -> jax.Array:
    return jnp.asarray(x_nchw.transpose(0, 2, 3, 1))


@functools.cache
def hf_model(case: str):
    return make_hf_model(case)


@functools.cache
def our_model(case: str):
    ref = hf_model(case)
    cfg = hf_convert.config_from_hf(ref.config.to_dict())
    return model_from_flat(cfg, hf_convert.to_ours(state_dict_numpy(ref), cfg), source=f"hf:{case}")


@functools.cache
def forward(case: str):
    return jit_method(our_model(case))


@functools.cache
def all_layers(case: str):
    depth = our_model(case).config.depth
    return jit_method(
        our_model(case),
        "get_intermediate_layers",
        n=depth,
        return_class_token=True,
        return_extra_tokens=True,
        norm=False,
    )


@pytest.mark.parametrize(("case", "shape"), CASE_SHAPES)
def test_final_tokens_match(case, shape):
    x = images(SHAPES[shape])
    ref = run_hf(hf_model(case), x)
    out = forward(case)(nhwc(x))
    r = our_model(case).config.n_storage_tokens
    last = ref.last_hidden_state.numpy()
    np.testing.assert_allclose(out["x_norm_clstoken"], ref.pooler_output.numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(out["x_storage_tokens"], last[:, 1 : 1 + r], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(out["x_norm_patchtokens"], last[:, 1 + r :], atol=1e-5, rtol=1e-5)
    assert_residual_close(out["x_prenorm"], ref.hidden_states[-1].numpy(), "x_prenorm")


@pytest.mark.parametrize(("case", "shape"), CASE_SHAPES)
def test_every_hidden_state_matches(case, shape):
    x = images(SHAPES[shape])
    ref = run_hf(hf_model(case), x)
    model = our_model(case)
    assert len(ref.hidden_states) == model.config.depth + 1  # embeddings, then each block
    assert_residual_close(model.prepare_tokens_with_masks(nhwc(x)), ref.hidden_states[0].numpy(), "embeddings")
    for i, (patches, cls, extra) in enumerate(all_layers(case)(nhwc(x))):
        tokens = np.concatenate([np.asarray(cls)[:, None], np.asarray(extra), np.asarray(patches)], axis=1)
        assert_residual_close(tokens, ref.hidden_states[i + 1].numpy(), f"block {i}")


@pytest.mark.parametrize("shape", ["224", "64x80"])
def test_rope_tables_match(shape):
    ref = hf_model("mlp_reg4")
    x = images(SHAPES[shape])
    cos_ref, sin_ref = ref.rope_embeddings(torch.from_numpy(x))
    p = ref.config.patch_size
    sin, cos = rope_sin_cos(our_model("mlp_reg4").config, x.shape[2] // p, x.shape[3] // p)
    np.testing.assert_allclose(sin, sin_ref.numpy(), atol=1e-6)
    np.testing.assert_allclose(cos, cos_ref.numpy(), atol=1e-6)


@pytest.mark.parametrize("case", list(CASES))
def test_masked_tokens_match(case):
    x = images(SHAPES["64x80"], seed=3)
    masks = np.random.default_rng(4).random((1, 20)) < 0.4
    ref = run_hf(hf_model(case), x, masks)
    out = our_model(case).forward_features(nhwc(x), jnp.asarray(masks))
    np.testing.assert_allclose(out["x_norm_clstoken"], ref.pooler_output.numpy(), atol=1e-5, rtol=1e-5)
    assert_residual_close(out["x_prenorm"], ref.hidden_states[-1].numpy(), "masked x_prenorm")
    assert out["masks"] is not None


def test_get_intermediate_layers_matches_normed_hidden_states():
    case = "mlp_reg4"
    ref_model, model = hf_model(case), our_model(case)
    x = images(SHAPES["64x80"], seed=5)
    ref = run_hf(ref_model, x)
    with torch.no_grad():
        normed = [ref_model.norm(h).numpy() for h in ref.hidden_states[1:]]
    r = model.config.n_storage_tokens
    # n as a list, with reshape to the patch grid (channels last), class and register tokens.
    layers = model.get_intermediate_layers(
        nhwc(x), n=[0, 2], reshape=True, return_class_token=True, return_extra_tokens=True
    )
    for (patches, cls, extra), i in zip(layers, [0, 2]):
        assert patches.shape == (1, 4, 5, 64)
        np.testing.assert_allclose(patches.reshape(1, 20, 64), normed[i][:, 1 + r :], atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(cls, normed[i][:, 0], atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(extra, normed[i][:, 1 : 1 + r], atol=1e-5, rtol=1e-5)
    # n as an int: the last n blocks, patches only.
    last_two = model.get_intermediate_layers(nhwc(x), n=2)
    assert len(last_two) == 2
    np.testing.assert_allclose(last_two[1], normed[2][:, 1 + r :], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(last_two[0], normed[1][:, 1 + r :], atol=1e-5, rtol=1e-5)


def test_k_bias_has_no_effect():
    """With mask_k_bias the k third of the fused bias is ignored, as in the official model."""
    case = "mlp_reg4"
    flat = model_to_flat(our_model(case))
    rng = np.random.default_rng(9)
    for name in [k for k in flat if k.endswith("attn.qkv.bias")]:
        flat[name] = flat[name].copy()
        flat[name][64:128] = rng.standard_normal(64).astype(np.float32)
    model = model_from_flat(our_model(case).config, flat)
    x = images(SHAPES["64x80"])
    ref = run_hf(hf_model(case), x)
    np.testing.assert_allclose(model(nhwc(x)), ref.pooler_output.numpy(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["mlp_reg4", "swiglu_nobias"])
def test_official_layout_import_matches(case, tmp_path):
    """An official-layout .pth (non-zero k bias + bias_mask, periods buffer, [1, D] mask token)
    loads without naming the architecture and reproduces the HF outputs."""
    ref_model = hf_model(case)
    path = tmp_path / "dinov3_official.pth"
    torch.save(official_state_dict(ref_model), path)
    model = load_backbone(weights=path)
    assert model.config.mask_k_bias == bool(ref_model.config.query_bias)
    x = images(SHAPES["64x80"], seed=7)
    ref = run_hf(ref_model, x)
    masks = np.zeros((1, 20), bool)
    masks[0, ::3] = True
    ref_masked = run_hf(ref_model, x, masks)
    out = model.forward_features(nhwc(x), jnp.asarray(masks))
    np.testing.assert_allclose(model(nhwc(x)), ref.pooler_output.numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(
        out["x_norm_patchtokens"],
        ref_masked.last_hidden_state.numpy()[:, 1 + model.config.n_storage_tokens :],
        atol=1e-5,
        rtol=1e-5,
    )


def test_hf_folder_both_key_layouts(tmp_path):
    """`save_pretrained` writes the 4.x layout (`layer.N`); the in-memory 5.x layout is `model.layer.N`."""
    ref_model = hf_model("swiglu_reg0")
    ref_model.save_pretrained(tmp_path / "hf")
    from_folder = load_backbone(weights=tmp_path / "hf")
    from_memory = our_model("swiglu_reg0")
    flat_a, flat_b = model_to_flat(from_folder), model_to_flat(from_memory)
    assert flat_a.keys() == flat_b.keys()
    for k in flat_a:
        np.testing.assert_array_equal(flat_a[k], flat_b[k], err_msg=k)
