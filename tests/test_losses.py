"""Losses and heads against NumPy implementations written from the formulas of RECIPE.md §3–4."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dinov3_jax.losses import (
    dino_loss,
    gram_loss,
    ibot_loss,
    koleo_loss,
    sinkhorn_knopp,
    softmax_center,
    update_center,
)
from dinov3_jax.models.heads import DINOHead

RTOL = 1e-6


def rng(seed=0):
    return np.random.default_rng(seed)


# ---------------------------------------------------------------------------------------------
# NumPy references (float64)
# ---------------------------------------------------------------------------------------------


def np_sinkhorn(logits, temp, n_iters=3):
    q = np.exp(logits.astype(np.float64) / temp).T  # [K, B]
    k, b = q.shape
    q /= q.sum()
    for _ in range(n_iters):
        q /= q.sum(axis=1, keepdims=True)
        q /= k
        q /= q.sum(axis=0, keepdims=True)
        q /= b
    return (q * b).T


def np_log_softmax(x):
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def np_dino(s, t, temp, ignore_diagonal):
    n_s, b, _ = s.shape
    n_t = t.shape[0]
    logp = np_log_softmax(s / temp)
    total, pairs = 0.0, 0
    for i in range(n_s):
        for j in range(n_t):
            if ignore_diagonal and i == j:
                continue
            total += np.sum(t[j] * logp[i])
            pairs += b
    return -total / pairs


def np_ibot(s, t, w, n_images, temp):
    per = np.sum(t * np_log_softmax(s / temp), axis=-1)
    return -np.sum(w * per) / n_images


def np_koleo(x):
    x = x.astype(np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-8)
    dots = x @ x.T
    np.fill_diagonal(dots, -1)
    nn = dots.argmax(-1)
    d = np.linalg.norm(x - x[nn] + 1e-8, axis=-1)
    return -np.mean(np.log(d + 1e-8))


def np_gram(s, t, img_level, remove_neg):
    def norm(x):
        return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

    s, t = norm(s.astype(np.float64)), norm(t.astype(np.float64))
    if img_level:
        gs, gt = np.einsum("bpd,bqd->bpq", s, s), np.einsum("bpd,bqd->bpq", t, t)
    else:
        fs, ft = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
        gs, gt = fs @ fs.T, ft @ ft.T
    if remove_neg:
        gs, gt = np.maximum(gs, 0), np.maximum(gt, 0)
    return np.mean((gs - gt) ** 2)


# ---------------------------------------------------------------------------------------------
# Sinkhorn-Knopp and softmax centering
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 6])
def test_sinkhorn_matches_numpy(n):
    logits = rng(n).normal(size=(n, 16)).astype(np.float32)
    out = np.asarray(sinkhorn_knopp(jnp.asarray(logits), 0.07))
    np.testing.assert_allclose(out, np_sinkhorn(logits, 0.07), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(out.sum(-1), 1.0, rtol=1e-5)
    assert out.dtype == np.float32


def test_sinkhorn_padding_rows_ignored():
    logits = rng(1).normal(size=(9, 16)).astype(np.float32)
    valid = np.array([1, 0, 1, 1, 0, 1, 1, 0, 1], bool)
    weights = np.where(valid, rng(2).uniform(0.1, 1, 9), 0.0).astype(np.float32)
    padded = logits.copy()
    padded[~valid] = 50.0  # would dominate every sum if it took part
    out = np.asarray(sinkhorn_knopp(jnp.asarray(padded), 0.05, weights=jnp.asarray(weights)))
    ref = np.asarray(sinkhorn_knopp(jnp.asarray(logits[valid]), 0.05))
    np.testing.assert_allclose(out[valid], ref, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(out[valid], np_sinkhorn(logits[valid], 0.05), rtol=1e-5, atol=1e-7)
    assert np.all(out[~valid] == 0)
    np.testing.assert_allclose(out[valid].sum(-1), 1.0, rtol=1e-5)


def test_sinkhorn_all_padding_is_zero_not_nan():
    out = sinkhorn_knopp(jnp.ones((3, 4)), 0.1, weights=jnp.zeros(3))
    assert np.all(np.asarray(out) == 0)


def test_softmax_center_and_update():
    x = rng(3).normal(size=(5, 8)).astype(np.float32)
    c = rng(4).normal(size=(8,)).astype(np.float32)
    got = np.asarray(softmax_center(jnp.asarray(x), jnp.asarray(c), 0.04))
    ref = np.exp(np_log_softmax((x - c) / 0.04))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-7)
    new = np.asarray(update_center(jnp.asarray(c), jnp.asarray(x), 0.9))
    np.testing.assert_allclose(new, 0.9 * c + 0.1 * x.mean(0), rtol=RTOL, atol=1e-7)
    w = np.array([1, 0, 1, 1, 0], np.float32)
    new_w = np.asarray(update_center(jnp.asarray(c), jnp.asarray(x), 0.9, weights=jnp.asarray(w)))
    np.testing.assert_allclose(new_w, 0.9 * c + 0.1 * x[w > 0].mean(0), rtol=RTOL, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# DINO and iBOT
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("s", "t", "b", "ignore"), [(4, 2, 3, False), (2, 2, 3, True), (3, 2, 1, True), (1, 1, 1, False)]
)
def test_dino_loss_matches_numpy(s, t, b, ignore):
    r = rng(s * 10 + t)
    student = r.normal(size=(s, b, 12)).astype(np.float32)
    teacher = np.asarray(sinkhorn_knopp(jnp.asarray(r.normal(size=(t * b, 12)), jnp.float32), 0.07)).reshape(t, b, 12)
    got = float(dino_loss(jnp.asarray(student), jnp.asarray(teacher), student_temp=0.1, ignore_diagonal=ignore))
    np.testing.assert_allclose(got, np_dino(student, teacher, 0.1, ignore), rtol=RTOL)


def test_dino_ignore_diagonal_denominator():
    # Uniform targets and equal logits: every pair has the same cross-entropy log K, so the
    # loss is log K whatever the number of pairs — only with the exact denominator.
    s = jnp.zeros((3, 2, 8))
    t = jnp.full((2, 2, 8), 1 / 8)
    for ignore in (False, True):
        np.testing.assert_allclose(float(dino_loss(s, t, ignore_diagonal=ignore)), math.log(8), rtol=RTOL)
    # Only the diagonal pairs carry a large cross-entropy: removing them leaves the rest.
    student = np.zeros((2, 1, 4), np.float32)
    teacher = np.zeros((2, 1, 4), np.float32)
    student[0, 0, 0] = student[1, 0, 1] = 10.0
    teacher[0, 0, 1] = teacher[1, 0, 0] = 1.0  # crop i's target is where crop j != i puts mass
    cross = float(dino_loss(jnp.asarray(student), jnp.asarray(teacher), ignore_diagonal=True))
    np.testing.assert_allclose(cross, np_dino(student, teacher, 0.1, True), rtol=RTOL)
    assert cross < 1e-3


@pytest.mark.parametrize("m", [1, 7])
def test_ibot_loss_matches_numpy(m):
    r = rng(m)
    s = r.normal(size=(m, 10)).astype(np.float32)
    t = np.asarray(sinkhorn_knopp(jnp.asarray(r.normal(size=(m, 10)), jnp.float32), 0.07))
    w = r.uniform(0.1, 1, m).astype(np.float32)
    got = float(ibot_loss(jnp.asarray(s), jnp.asarray(t), jnp.asarray(w), n_images=4, student_temp=0.1))
    np.testing.assert_allclose(got, np_ibot(s, t, w, 4, 0.1), rtol=RTOL)


def test_ibot_padding_has_no_effect():
    r = rng(5)
    s = r.normal(size=(5, 10)).astype(np.float32)
    t = np.asarray(sinkhorn_knopp(jnp.asarray(r.normal(size=(5, 10)), jnp.float32), 0.07))
    w = np.array([0.5, 0.5, 1 / 3, 1 / 3, 1 / 3], np.float32)
    base = float(ibot_loss(jnp.asarray(s), jnp.asarray(t), jnp.asarray(w), n_images=6))
    s_pad = np.concatenate([s, r.normal(size=(3, 10)).astype(np.float32) * 100])
    t_pad = np.concatenate([t, np.full((3, 10), 0.1, np.float32)])
    w_pad = np.concatenate([w, np.zeros(3, np.float32)])
    padded = float(ibot_loss(jnp.asarray(s_pad), jnp.asarray(t_pad), jnp.asarray(w_pad), n_images=6))
    assert padded == base


# ---------------------------------------------------------------------------------------------
# KoLeo and Gram
# ---------------------------------------------------------------------------------------------


def test_koleo_matches_numpy_and_groups():
    x = rng(6).normal(size=(12, 8)).astype(np.float32) * 3
    np.testing.assert_allclose(float(koleo_loss(jnp.asarray(x))), np_koleo(x), rtol=1e-5)
    grouped = float(koleo_loss(jnp.asarray(x.reshape(3, 4, 8))))
    per_group = np.mean([np_koleo(g) for g in x.reshape(3, 4, 8)])
    np.testing.assert_allclose(grouped, per_group, rtol=1e-5)
    assert abs(grouped - np_koleo(x)) > 1e-3  # neighbours really are searched per group


def test_koleo_identical_features_finite():
    x = jnp.ones((4, 8))
    val = float(koleo_loss(x))
    assert math.isfinite(val)
    np.testing.assert_allclose(val, -math.log(1e-8 * math.sqrt(8) + 1e-8), rtol=1e-4)
    g = jax.grad(lambda v: koleo_loss(v))(x)
    assert np.all(np.isfinite(np.asarray(g)))
    assert math.isfinite(float(koleo_loss(jnp.zeros((3, 5)))))


@pytest.mark.parametrize(("img_level", "remove_neg"), [(True, False), (False, False), (True, True)])
def test_gram_loss_matches_numpy(img_level, remove_neg):
    r = rng(7)
    s = r.normal(size=(2, 5, 6)).astype(np.float32)
    t = r.normal(size=(2, 5, 6)).astype(np.float32)
    got = float(gram_loss(jnp.asarray(s), jnp.asarray(t), img_level=img_level, remove_neg=remove_neg))
    np.testing.assert_allclose(got, np_gram(s, t, img_level, remove_neg), rtol=1e-5)


def test_gram_loss_grouped_batch_level():
    r = rng(8)
    s = r.normal(size=(2, 2, 3, 4)).astype(np.float32)
    t = r.normal(size=(2, 2, 3, 4)).astype(np.float32)
    got = float(gram_loss(jnp.asarray(s), jnp.asarray(t), img_level=False))
    ref = np.mean([np_gram(s[g], t[g], False, False) for g in range(2)])
    np.testing.assert_allclose(got, ref, rtol=1e-5)


def test_losses_jit():
    x = jnp.asarray(rng(9).normal(size=(4, 8)), jnp.float32)
    f = jax.jit(lambda x: dino_loss(x.reshape(2, 2, 8), sinkhorn_knopp(x, 0.07).reshape(2, 2, 8), 0.1, True))
    np.testing.assert_allclose(
        float(f(x)),
        float(dino_loss(x.reshape(2, 2, 8), sinkhorn_knopp(x, 0.07).reshape(2, 2, 8), 0.1, True)),
        rtol=1e-6,
    )


# ---------------------------------------------------------------------------------------------
# DINOHead
# ---------------------------------------------------------------------------------------------


def _np_gelu(x):
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


@pytest.fixture(scope="module")
def head():
    return DINOHead(16, 32, hidden_dim=24, bottleneck_dim=8, nlayers=3, rngs=nnx.Rngs(0))


def test_head_shapes_norm_and_exact_gelu(head):
    x = np.asarray(rng(10).normal(size=(5, 16)), np.float32)
    z = np.asarray(head.mlp_and_norm(jnp.asarray(x)))
    logits = np.asarray(head(jnp.asarray(x)))
    assert z.shape == (5, 8) and logits.shape == (5, 32)
    np.testing.assert_allclose(np.linalg.norm(z, axis=-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(head.last_layer(jnp.asarray(z))), logits, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(head.apply_last_layer(jnp.asarray(z))), logits, rtol=1e-6)
    # NumPy forward with the erf GELU (the tanh approximation differs by ~1e-4 here).
    p = nnx.to_pure_dict(nnx.state(head, nnx.Param))
    h = x.astype(np.float64)
    for i in range(3):
        h = h @ np.asarray(p["mlp"][i]["kernel"], np.float64) + np.asarray(p["mlp"][i]["bias"], np.float64)
        if i < 2:
            h = _np_gelu(h)
    h = h / np.linalg.norm(h, axis=-1, keepdims=True)
    np.testing.assert_allclose(z, h, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logits, h @ np.asarray(p["last_layer"]["kernel"], np.float64), rtol=1e-5, atol=1e-6)
    assert set(p["last_layer"]) == {"kernel"}  # no bias, no weight-norm parameters


def test_head_params_and_axes(head):
    assert len(head.mlp) == 3
    assert head.mlp[1].kernel.shape == (24, 24)
    assert np.all(np.asarray(head.mlp[0].bias[...]) == 0)
    assert head.last_layer.bias is None
    assert head.mlp[0].kernel.get_metadata()["out_sharding"] == ("embed", "mlp")
    assert head.mlp[2].kernel.get_metadata()["out_sharding"] == ("mlp", "bottleneck")
    assert head.last_layer.kernel.get_metadata()["out_sharding"] == ("bottleneck", "prototypes")
    big = DINOHead(64, 512, hidden_dim=64, bottleneck_dim=64, nlayers=1, rngs=nnx.Rngs(1))
    assert len(big.mlp) == 1 and big.mlp[0].kernel.shape == (64, 64)
    np.testing.assert_allclose(np.std(np.asarray(big.last_layer.kernel[...])), 0.02, rtol=0.05)


def test_head_bf16_compute_fp32_params():
    head = DINOHead(16, 32, hidden_dim=24, bottleneck_dim=8, dtype="bf16", fp32_logits=True, rngs=nnx.Rngs(0))
    assert head.mlp[0].kernel[...].dtype == jnp.float32
    x = jnp.ones((2, 16), jnp.bfloat16)
    assert head.mlp_and_norm(x).dtype == jnp.float32
    assert head(x).dtype == jnp.float32
    plain = DINOHead(16, 32, hidden_dim=24, bottleneck_dim=8, dtype="bf16", rngs=nnx.Rngs(0))
    assert plain(x).dtype == jnp.bfloat16


def test_sinkhorn_low_temperature_does_not_overflow():
    """exp(100 / 0.01) overflows fp32; subtracting the maximum first gives the exact result."""
    # Spreads of at most 0.5 (exp(-50) is a normal fp32 number), at a level that overflows unshifted.
    logits = np.array([[100.0, 99.8, 99.6], [99.7, 100.0, 99.5]], np.float32)
    with np.errstate(over="ignore"):
        assert not np.isfinite(np.exp(np.float32(100.0) / np.float32(0.01)))
    out = np.asarray(sinkhorn_knopp(jnp.asarray(logits), 0.01))
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, np_sinkhorn(logits.astype(np.float64) - 100.0, 0.01), rtol=1e-5, atol=1e-7)


def test_weight_normalised_prototypes_give_cosine_logits():
    """`norm_last_layer` (DINO v1/v2 heads): logits are cosines between the normalised bottleneck
    and each normalised prototype."""
    from flax import nnx

    from dinov3_jax.models.heads import DINOHead

    head = DINOHead(16, 32, hidden_dim=24, bottleneck_dim=8, norm_last_layer=True, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((5, 16)), jnp.float32)
    z = np.asarray(head.mlp_and_norm(x))
    w = np.asarray(head.last_layer.kernel[...])
    expected = z @ (w / np.linalg.norm(w, axis=0, keepdims=True))
    np.testing.assert_allclose(head(x), expected, rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(head(x))).max() <= 1 + 1e-6


def test_prototype_init_std():
    """`head_last_layer_init_std` sets the spread of the initial prototypes (official 0.02); the
    hidden layers keep theirs."""
    from flax import nnx

    from dinov3_jax.models.heads import DINOHead

    for std in (0.02, 0.125):
        head = DINOHead(16, 512, hidden_dim=24, bottleneck_dim=64, last_layer_init_std=std, rngs=nnx.Rngs(0))
        assert np.std(np.asarray(head.last_layer.kernel[...])) == pytest.approx(std, rel=0.03)
        assert np.std(np.asarray(head.mlp[0].kernel[...])) == pytest.approx(0.02, rel=0.1)


def test_collapse_diagnostics_on_hand_made_inputs():
    """losses.diagnostics, against values written by hand: a collapsed batch (every image the same
    feature, every target the same prototype) has effective rank 1 and one prototype in use;
    orthonormal features have full rank; uniform targets have entropy log K."""
    from dinov3_jax.losses.diagnostics import effective_rank, mean_entropy, prototypes_in_use

    collapsed = jnp.tile(jnp.asarray([[0.6, 0.8, 0.0]]), (16, 1))
    assert float(effective_rank(collapsed)) == pytest.approx(1.0, abs=1e-5)
    assert float(effective_rank(jnp.eye(8, 12))) == pytest.approx(8.0, rel=1e-5)
    # Two directions with singular values 3 and 1: p = (3/4, 1/4), rank = exp(H(p)).
    two = jnp.asarray([[3.0, 0.0], [0.0, 1.0]])
    assert float(effective_rank(two)) == pytest.approx(
        math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))), rel=1e-5
    )
    one_hot = jax.nn.one_hot(jnp.full((2, 16), 3), 10)  # [crops, batch, K], all on prototype 3
    assert int(prototypes_in_use(one_hot)) == 1 and float(mean_entropy(one_hot)) == 0.0
    spread = jax.nn.one_hot(jnp.arange(32).reshape(2, 16) % 10, 10)
    assert int(prototypes_in_use(spread)) == 10
    assert float(mean_entropy(jnp.full((4, 10), 0.1))) == pytest.approx(math.log(10), rel=1e-6)
