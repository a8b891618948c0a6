"""Backbone behaviour beyond HF parity: registry, RoPE options, norms, drop path, training mode,
untied norms, precision, attention fall-back and input errors. Expected values are written from
RECIPE.md, never taken from our own output."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dinov3_jax import ViTConfig, create_backbone
from dinov3_jax.convert.ours import abstract_model, model_from_flat, model_to_flat
from dinov3_jax.models.layers import drop_path_residual, patch_coords, rope_periods
from dinov3_jax.models.registry import MODELS
from dinov3_jax.models.vit import count_params

X = jnp.asarray(np.random.default_rng(0).standard_normal((4, 32, 48, 3)).astype(np.float32))


@pytest.mark.parametrize("name", [n for n, s in MODELS.items() if s.n_params])
def test_released_parameter_counts(name):
    """Counts from the shapes of the released checkpoints (RECIPE.md §1.11); no weights allocated."""
    assert count_params(abstract_model(MODELS[name].config)) == MODELS[name].n_params


def test_swiglu_widths_follow_the_official_rounding():
    widths = {
        n: MODELS[n].config.ffn_hidden
        for n in ("dinov3_vits16plus", "dinov3_vitl16plus", "dinov3_vith16plus", "dinov3_vit7b16")
    }
    assert widths == {
        "dinov3_vits16plus": 1536,
        "dinov3_vitl16plus": 4096,
        "dinov3_vith16plus": 5120,
        "dinov3_vit7b16": 8192,
    }


def test_bf16_rope_periods_are_the_released_values():
    """Evaluated in bf16, the Dh = 64 periods are the values stored in released checkpoints."""
    cfg = MODELS["dinov3_vits16"].config.replace(pos_embed_rope_dtype="bf16")
    released = [1.0, 1.3359375, 1.78125, 2.375, 3.15625, 4.21875, 5.625, 7.5,
                10.0, 13.3125, 17.75, 23.75, 31.625, 42.25, 56.25, 75.0]  # fmt: skip
    np.testing.assert_array_equal(np.asarray(rope_periods(cfg), np.float32), released)
    fp32 = np.asarray(rope_periods(cfg.replace(pos_embed_rope_dtype="fp32")))
    np.testing.assert_allclose(fp32, 100.0 ** (np.arange(16) * 4 / 64), rtol=1e-6)


def test_bf16_rope_rotates_in_bf16_and_rounds_the_prefix():
    """Official bf16 RoPE: q/k cast to bf16, patches rotated, everything cast back to fp32."""
    from dinov3_jax.models.layers import apply_rope, rope_sin_cos

    cfg = MODELS["dinov3_vit_tiny"].config.replace(pos_embed_rope_dtype="bf16")
    sin, cos = rope_sin_cos(cfg, 2, 3)
    assert sin.dtype == jnp.bfloat16
    q = np.random.default_rng(0).standard_normal((1, 4, 5 + 6, 16)).astype(np.float32)
    out = np.asarray(apply_rope(jnp.asarray(q), sin, cos))
    assert out.dtype == np.float32
    q16 = q.astype(jnp.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(out[:, :, :5], q16[:, :, :5])
    s, c = np.asarray(sin, np.float32), np.asarray(cos, np.float32)
    p = q16[:, :, 5:]
    rotated = p * c + np.concatenate([-p[..., 8:], p[..., :8]], axis=-1) * s
    np.testing.assert_allclose(out[:, :, 5:], rotated, rtol=2e-2, atol=2e-2)


def test_min_max_periods_and_coordinate_modes():
    cfg = ViTConfig(embed_dim=64, num_heads=2, depth=1, pos_embed_rope_base=None,
                    pos_embed_rope_min_period=0.5, pos_embed_rope_max_period=64.0)  # fmt: skip
    # period_j = min · (max/min)^(j / (n-1)), n = Dh/4 = 8
    np.testing.assert_allclose(rope_periods(cfg), 0.5 * 128.0 ** (np.arange(8) / 7), rtol=1e-6)
    h, w = 2, 4
    for mode, (dh, dw) in {"separate": (h, w), "max": (4, 4), "min": (2, 2)}.items():
        coords = np.asarray(patch_coords(cfg.replace(pos_embed_rope_normalize_coords=mode), h, w))
        rows, cols = np.meshgrid((np.arange(h) + 0.5) / dh, (np.arange(w) + 0.5) / dw, indexing="ij")
        expected = 2 * np.stack([rows.ravel(), cols.ravel()], axis=1) - 1
        np.testing.assert_allclose(coords, expected, rtol=1e-6, err_msg=mode)


def test_rmsnorm_formula():
    cfg = MODELS["dinov3_vit_tiny"].config.replace(norm_layer="rmsnorm")
    model = create_backbone(cfg)
    flat = model_to_flat(model)
    assert "norm.bias" not in flat and "norm.scale" in flat
    scale = np.random.default_rng(1).uniform(0.5, 1.5, 64).astype(np.float32)
    model.norm.scale.set_value(jnp.asarray(scale))
    x = np.random.default_rng(2).standard_normal((3, 64)).astype(np.float32) * 4
    expected = x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + 1e-5) * scale
    np.testing.assert_allclose(model.norm(jnp.asarray(x)), expected, rtol=1e-5, atol=1e-6)


def test_drop_path_is_batch_subset():
    """Exactly int(b·(1-p)) samples get the residual, scaled by b/kept; the others pass through."""
    x = jnp.zeros((8, 3, 2))
    out = np.asarray(drop_path_residual(x, lambda t: jnp.ones_like(t), 0.3, jax.random.key(0)))
    kept = int(8 * (1 - 0.3))  # 5
    touched = np.any(out != 0, axis=(1, 2))
    assert touched.sum() == kept
    np.testing.assert_allclose(out[touched], 8 / kept)
    # Deterministic in the key; without a key it is the plain residual.
    np.testing.assert_array_equal(out, drop_path_residual(x, lambda t: jnp.ones_like(t), 0.3, jax.random.key(0)))
    np.testing.assert_array_equal(drop_path_residual(x, lambda t: jnp.ones_like(t), 0.3, None), np.ones((8, 3, 2)))
    # A batch of one always keeps its sample.
    one = drop_path_residual(jnp.zeros((1, 2)), lambda t: jnp.ones_like(t), 0.9, jax.random.key(1))
    np.testing.assert_array_equal(one, np.ones((1, 2)))


def test_training_randomness_is_explicit():
    model = create_backbone("dinov3_vit_tiny", drop_path_rate=0.25)
    assert model.config.pos_embed_rope_rescale_coords == 2.0
    with pytest.raises(ValueError, match="needs a PRNG `key`"):
        model.forward_features(X, training=True)
    a = model.forward_features(X, training=True, key=jax.random.key(0))["x_norm_clstoken"]
    b = model.forward_features(X, training=True, key=jax.random.key(0))["x_norm_clstoken"]
    c = model.forward_features(X, training=True, key=jax.random.key(1))["x_norm_clstoken"]
    evaluation = model(X)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c) and not np.allclose(a, evaluation)
    # Inference ignores the augmentation entirely.
    np.testing.assert_array_equal(evaluation, model.forward_features(X, key=jax.random.key(5))["x_norm_clstoken"])


def test_rope_augmentation_alone_changes_training_output():
    model = create_backbone("dinov3_vit_tiny")  # rescale 2, no drop path
    train = model.forward_features(X, training=True, key=jax.random.key(0))["x_norm_clstoken"]
    assert not np.allclose(train, model(X))
    no_aug = create_backbone(model.config.replace(pos_embed_rope_rescale_coords=None))
    np.testing.assert_allclose(no_aug.forward_features(X, training=True)["x_norm_clstoken"], no_aug(X), atol=1e-6)


def _perturbed_norm(model, name, seed):
    norm = getattr(model, name)
    rng = np.random.default_rng(seed)
    norm.scale.set_value(jnp.asarray(rng.uniform(0.5, 1.5, 64), jnp.float32))
    norm.bias.set_value(jnp.asarray(rng.standard_normal(64), jnp.float32))
    return norm


def test_untied_norms():
    cfg = MODELS["dinov3_vit_tiny"].config.replace(untie_cls_and_patch_norms=True, untie_global_and_local_cls_norm=True)
    model = create_backbone(cfg)
    cls_norm = _perturbed_norm(model, "cls_norm", 0)
    local = _perturbed_norm(model, "local_cls_norm", 1)
    out = model.forward_features(X)
    prenorm = out["x_prenorm"]
    np.testing.assert_allclose(out["x_norm_clstoken"], cls_norm(prenorm[:, 0]), atol=1e-6)
    np.testing.assert_allclose(out["x_storage_tokens"], cls_norm(prenorm[:, 1:5]), atol=1e-6)
    np.testing.assert_allclose(out["x_norm_patchtokens"], model.norm(prenorm[:, 5:]), atol=1e-6)
    # local_cls_norm only for local crops in training.
    key = jax.random.key(0)
    train_local = model.forward_features(X, training=True, key=key, local_crops=True)
    np.testing.assert_allclose(train_local["x_norm_clstoken"], local(train_local["x_prenorm"][:, 0]), atol=1e-6)
    train_global = model.forward_features(X, training=True, key=key)
    np.testing.assert_allclose(train_global["x_norm_clstoken"], cls_norm(train_global["x_prenorm"][:, 0]), atol=1e-6)
    # get_intermediate_layers uses cls_norm for the class token, never local_cls_norm.
    (_, cls), = model.get_intermediate_layers(X, n=1, return_class_token=True)  # fmt: skip
    np.testing.assert_allclose(cls, out["x_norm_clstoken"], atol=1e-6)


def test_without_layer_scale_or_biases():
    cfg = ViTConfig(embed_dim=32, depth=2, num_heads=2, layerscale_init=None, qkv_bias=False,
                    proj_bias=False, ffn_bias=False, n_storage_tokens=0)  # fmt: skip
    model = create_backbone(cfg)
    names = model_to_flat(model)
    assert not any(k.endswith(("gamma", "qkv.bias", "attn.proj.bias", "fc1.bias", "fc2.bias")) for k in names)
    assert "storage_tokens" not in names
    assert model.forward_features(X)["x_storage_tokens"].shape == (4, 0, 32)


def test_official_initialisation():
    """RECIPE.md §1.10: tokens N(0, 0.02), mask token 0, linears N(0, 0.02), biases 0, layer scale
    at its init value, the patch conv U(±1/sqrt(3·p²))."""
    flat = model_to_flat(create_backbone("dinov3_vits16", seed=0))
    assert abs(flat["blocks.0.attn.qkv.kernel"].std() - 0.02) < 1e-3
    assert abs(flat["cls_token"].std() - 0.02) < 5e-3 and not flat["mask_token"].any()
    assert not flat["blocks.3.mlp.fc1.bias"].any() and not flat["blocks.3.attn.qkv.bias"].any()
    np.testing.assert_array_equal(flat["blocks.5.ls2.gamma"], np.full(384, 1e-5, np.float32))
    bound = 1 / np.sqrt(3 * 16 * 16)
    kernel = flat["patch_embed.proj.kernel"]
    assert kernel.shape == (16, 16, 3, 384) and np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.9 * bound


def test_logical_axis_names_on_parameters():
    state = nnx.state(abstract_model(MODELS["dinov3_vit_tiny"].config), nnx.Param)
    axes = {".".join(map(str, p)): v.get_metadata().get("out_sharding") for p, v in nnx.to_flat_state(state)}
    assert axes["blocks.0.attn.qkv.kernel"] == ("embed", "qkv")
    assert axes["blocks.0.attn.proj.kernel"] == ("qkv", "embed")
    assert axes["blocks.0.mlp.fc1.kernel"] == ("embed", "mlp")
    assert axes["patch_embed.proj.kernel"] == (None, None, "conv_in", "embed")
    assert all(v is not None for v in axes.values()), [k for k, v in axes.items() if v is None]


def test_bf16_compute_stays_close_to_fp32():
    model = create_backbone("dinov3_vit_tiny", seed=1)
    flat = model_to_flat(model)
    bf16 = model_from_flat(model.config.replace(dtype="bfloat16"), flat)
    out16, out32 = bf16(X), model(X)
    assert out16.dtype == jnp.bfloat16 and bf16.blocks[0].attn.qkv.kernel.dtype == jnp.float32
    a, b = np.asarray(out16, np.float32), np.asarray(out32)
    cosine = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert cosine.min() > 0.999


def test_cudnn_request_falls_back_on_cpu():
    model = create_backbone("dinov3_vit_tiny", seed=2)
    cudnn = model_from_flat(model.config.replace(attention_impl="cudnn"), model_to_flat(model))
    np.testing.assert_allclose(cudnn(X), model(X), atol=1e-6)


def test_any_resolution_and_aspect_ratio():
    model = create_backbone("dinov3_vit_tiny")
    for h, w in [(16, 16), (16, 96), (50, 33)]:
        out = model.forward_features(jnp.zeros((1, h, w, 3)))
        assert out["x_norm_patchtokens"].shape == (1, (h // 16) * (w // 16), 64)


def test_input_errors_name_the_problem():
    model = create_backbone("dinov3_vit_tiny")
    with pytest.raises(ValueError, match=r"expected NHWC images with 3 channels, got shape \(1, 3, 32, 32\)"):
        model(jnp.zeros((1, 3, 32, 32)))
    with pytest.raises(ValueError, match="smaller than one 16x16 patch"):
        model(jnp.zeros((1, 8, 32, 3)))
    with pytest.raises(ValueError, match=r"masks must have shape \(4, 6\)"):
        model.forward_features(X, jnp.zeros((4, 5), bool))
    with pytest.raises(ValueError, match="out of range for depth 3"):
        model.get_intermediate_layers(X, n=[0, 3])
    with pytest.raises(ValueError, match="head dim 10 is not divisible by 4"):
        ViTConfig(embed_dim=40, num_heads=4)
    with pytest.raises(ValueError, match="dtype 'half' is not one of"):
        create_backbone("dinov3_vit_tiny", dtype="half")


def kept_for_backward(model: nnx.Module, images: jax.Array) -> tuple[int, dict]:
    """Bytes of what `jax.vjp` keeps for the backward pass of a training forward (the residuals,
    parameters included) and the parameter gradients of a loss on every output token."""
    graph, params = nnx.split(model)

    def loss(p):
        out = nnx.merge(graph, p).forward_features(images, training=True, key=jax.random.key(3))
        return jnp.mean(out["x_norm_patchtokens"] ** 2) + jnp.mean(out["x_norm_clstoken"] ** 2)

    _, backward = jax.vjp(loss, params)
    return sum(x.nbytes for x in jax.tree.leaves(backward)), backward(jnp.ones(()))[0]


@pytest.mark.parametrize("name", ["dinov3_vit_tiny", "dinov3_convnext_tiny"])
def test_activation_checkpointing_keeps_less_and_changes_no_gradient(name):
    """train.checkpointing (RECIPE.md §9.2): the selective policy keeps the matmul and attention
    outputs of each block and recomputes the rest, the full one keeps only each block's input;
    the gradients are those without checkpointing (drop path and RoPE augmentation on: the same
    random draws are replayed in the recomputation)."""
    images = X[:2, :32, :32] if "vit" in name else jnp.tile(X[:2, :32, :32], (1, 2, 2, 1))
    kept, grads = {}, {}
    for remat in ("off", "selective", "full"):
        overrides = {"depths": (1, 1, 2, 1), "dims": (8, 16, 32, 64)} if "convnext" in name else {"depth": 3}
        model = create_backbone(name, drop_path_rate=0.2, remat=remat, **overrides)
        kept[remat], grads[remat] = kept_for_backward(model, images)
    assert kept["off"] > kept["selective"] > kept["full"], kept
    for remat in ("selective", "full"):
        for a, b in zip(jax.tree.leaves(grads[remat]), jax.tree.leaves(grads["off"])):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_activation_checkpointing_lowers_the_compiled_peak():
    """What XLA holds, not only what JAX keeps: with the trainer's compiler options (on CPU, the
    CSE that would merge the recomputation back into the forward pass is off) the compiled
    gradient needs less temporary memory under each policy."""
    from dinov3_jax.inference import CPU_CHECKPOINTING_OPTIONS, cpu_compiler_options

    images = jnp.zeros((16, 64, 64, 3))
    temp = {}
    for remat in ("off", "selective", "full"):
        model = nnx.eval_shape(lambda remat=remat: create_backbone("dinov3_vit_tiny", depth=4, remat=remat))
        graph, params = nnx.split(model)

        def loss(p, graph=graph):
            return jnp.mean(
                nnx.merge(graph, p).forward_features(images, training=True, key=jax.random.key(0))["x_norm_patchtokens"]
            )

        options = cpu_compiler_options(CPU_CHECKPOINTING_OPTIONS) if remat != "off" else None
        compiled = jax.jit(jax.grad(loss), compiler_options=options).lower(params).compile()
        temp[remat] = compiled.memory_analysis().temp_size_in_bytes
    # Measured (jax 0.10.2, CPU): 12.4, 6.8 and 4.6 MB; without the options 12.4, 13.8 and 13.6 MB.
    assert temp["off"] > 1.5 * temp["selective"] and temp["selective"] > 1.2 * temp["full"], temp


@pytest.mark.parametrize("shape", [(2, 3, 7, 8), (2, 4, 520, 8)], ids=["whole", "chunked"])
def test_attention_backward_matches_torch_autograd(shape):
    """The hand-written VJP of the softmax attention (models/layers.py) gives torch autograd's
    gradients of softmax(q kᵀ / √Dh) v (float64 reference), also on the long-sequence path that
    runs the (batch, head) slices in chunks."""
    import torch

    from dinov3_jax.models.layers import cpu_attention_chunk, xla_attention

    b, h, n, dh = shape
    assert (cpu_attention_chunk(b * h, n, n) < b * h) == (n > 500)  # the second case is chunked
    rng = np.random.default_rng(0)
    q, k, v, d_out = (rng.standard_normal(shape).astype(np.float32) for _ in range(4))
    out, backward = jax.vjp(xla_attention, *(jnp.asarray(t) for t in (q, k, v)))
    grads = backward(jnp.asarray(d_out))

    tq, tk, tv = (torch.tensor(t, dtype=torch.float64, requires_grad=True) for t in (q, k, v))
    t_out = torch.softmax(tq @ tk.transpose(-1, -2) / dh**0.5, dim=-1) @ tv
    t_out.backward(torch.tensor(d_out, dtype=torch.float64))
    np.testing.assert_allclose(out, t_out.detach().numpy(), rtol=1e-5, atol=1e-5)
    for ours, ref in zip(grads, (tq.grad, tk.grad, tv.grad)):
        np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-4, atol=1e-5)


def test_backward_fusion_cut_changes_no_gradient_and_keeps_the_backward_linear_in_depth(monkeypatch):
    """Block.__call__ passes its input through `cut_backward_fusion`: on CPU the residual-stream
    gradient is then materialised once per block instead of being recomputed inside every earlier
    block's backward fusions (benchmarks/README.md, "Forward + backward"). The gradients are those
    of the plain identity, and the compiled backward's memory traffic (XLA's cost analysis) grows
    linearly with depth; without the cut it grows faster."""
    from dinov3_jax.models import layers

    images = X[:2, :32, :32]

    def grads_and_bytes(depth):
        model = create_backbone("dinov3_vit_tiny", depth=depth)
        graph, params = nnx.split(model)

        def loss(p):
            return jnp.mean(nnx.merge(graph, p).forward_features(images)["x_norm_patchtokens"] ** 2)

        compiled = jax.jit(jax.grad(loss)).lower(params).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        return compiled(params), cost["bytes accessed"]

    cut = {depth: grads_and_bytes(depth) for depth in (2, 4, 8)}
    monkeypatch.setattr(layers, "cut_backward_fusion", lambda x: x)
    plain = {depth: grads_and_bytes(depth) for depth in (2, 4, 8)}
    for a, b in zip(jax.tree.leaves(cut[8][0]), jax.tree.leaves(plain[8][0])):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
    growth = {name: (r[8][1] - r[4][1]) / (2 * (r[4][1] - r[2][1])) for name, r in (("cut", cut), ("plain", plain))}
    # Measured (jax 0.10.2, CPU): 26.8 MB at depth 8 with the cut, 36.1 MB without; growth ratios
    # 1.00 and 1.23.
    assert abs(growth["cut"] - 1) < 0.05 and growth["plain"] > 1.1, growth
    assert cut[8][1] < 0.85 * plain[8][1], (cut[8][1], plain[8][1])
