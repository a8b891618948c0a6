"""Gram anchoring (arXiv 2508.10104 §4; RECIPE.md §4.5): `gram_loss` against a NumPy reference written
from the formulas, and `resize_patch_features` against `torch.nn.functional.interpolate`."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dinov3_jax.losses import gram_loss, resize_patch_features

# ---------------------------------------------------------------------------------------------
# NumPy reference (float64), independent of the static-shape weighting of `gram_loss`: the tokens
# are selected with boolean indexing (variable length) and images are looped over explicitly.
# ---------------------------------------------------------------------------------------------


def np_gram_loss(s, t, normalized, img_level, remove_neg, only_teacher_neg, as_official, mask=None):
    if s.ndim == 4:  # one loss per data-parallel group (official: per rank), then the mean
        masks = [None] * len(s) if mask is None else list(mask)
        return np.mean(
            [
                np_gram_loss(sg, tg, normalized, img_level, remove_neg, only_teacher_neg, as_official, mg)
                for sg, tg, mg in zip(s, t, masks)
            ]
        )
    s, t = s.astype(np.float64), t.astype(np.float64)
    if normalized:
        s = s / np.maximum(np.linalg.norm(s, axis=-1, keepdims=True), 1e-12)
        t = t / np.maximum(np.linalg.norm(t, axis=-1, keepdims=True), 1e-12)
    if img_level:
        pairs = [(s[b], t[b]) for b in range(len(s))]  # one P×P matrix per image
    elif mask is not None:
        pairs = [(s[mask], t[mask])]  # [n_sel, D]: the selected tokens only
    else:
        pairs = [(s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1]))]
    losses = []
    for xs, xt in pairs:
        if len(xs) == 0:
            losses.append(0.0)  # documented convention of gram_loss for an empty selection
            continue
        gs, gt = xs @ xs.T, xt @ xt.T
        if remove_neg:
            gs[gs < 0] = 0.0
            gt[gt < 0] = 0.0
        elif only_teacher_neg:
            teacher_neg = gt < 0
            gt[teacher_neg] = 0.0
            # Upstream takes the student's mask after zeroing the teacher: never true.
            student_zero = (gs < 0) & ((gt < 0) if as_official else teacher_neg)
            gs[student_zero] = 0.0
        losses.append(np.mean((gs - gt) ** 2))
    return np.mean(losses)  # equal-sized images: mean of per-image means = mean over all entries


NEG_MODES = {  # (remove_neg, remove_only_teacher_neg, teacher_neg_as_official)
    "keep_neg": (False, False, True),
    "remove_neg": (True, False, True),
    "only_teacher_official": (False, True, True),
    "only_teacher_fixed": (False, True, False),
}
SELECTIONS = {  # (img_level, tokens_used)
    "img_all": (True, "all"),
    "batch_all": (False, "all"),
    "batch_masked": (False, "masked"),
    "batch_unmasked": (False, "unmasked"),
}


def _features(shape, seed):
    """Unnormalised random normal features in low dimension: many negative similarities."""
    r = np.random.default_rng(seed)
    s = r.normal(size=shape).astype(np.float32) * 2.0
    t = r.normal(size=shape).astype(np.float32)
    ibot_mask = r.random(shape[:-1]) < 0.4
    return s, t, ibot_mask


@pytest.mark.parametrize("neg", list(NEG_MODES))
@pytest.mark.parametrize("sel", list(SELECTIONS))
def test_gram_loss_matches_numpy_all_options(neg, sel):
    remove_neg, only_teacher, as_official = NEG_MODES[neg]
    img_level, tokens_used = SELECTIONS[sel]
    for normalized, shape in itertools.product((True, False), ((4, 5, 3), (2, 3, 5, 3))):
        s, t, ibot_mask = _features(shape, seed=len(shape) + 10 * normalized)
        mask = {"all": None, "masked": ibot_mask, "unmasked": ~ibot_mask}[tokens_used]
        kwargs = dict(
            normalized=normalized,
            img_level=img_level,
            remove_neg=remove_neg,
            remove_only_teacher_neg=only_teacher,
        )
        got = gram_loss(
            jnp.asarray(s),
            jnp.asarray(t),
            token_mask=None if mask is None else jnp.asarray(mask),
            teacher_neg_as_official=as_official,
            **kwargs,
        )
        assert got.dtype == jnp.float32 and got.shape == ()
        ref = np_gram_loss(s, t, normalized, img_level, remove_neg, only_teacher, as_official, mask)
        np.testing.assert_allclose(float(got), ref, rtol=1e-5)
        if neg == "only_teacher_fixed":
            # The data really exercises the switch: the intended rule changes the loss.
            official = np_gram_loss(s, t, normalized, img_level, False, True, True, mask)
            assert abs(ref - official) > 1e-3 * ref
        if mask is not None:
            # ...and the token selection really selects.
            everything = np_gram_loss(s, t, normalized, img_level, remove_neg, only_teacher, as_official)
            assert abs(ref - everything) > 1e-3 * ref


def test_gram_loss_official_only_teacher_neg_never_touches_student():
    """The upstream quirk equals zeroing the teacher's negatives and nothing else."""
    s, t, _ = _features((3, 4, 3), seed=3)
    gs, gt = np.einsum("bpd,bqd->bpq", s, s), np.einsum("bpd,bqd->bpq", t, t)
    expected = np.mean((gs - np.maximum(gt, 0)) ** 2)
    got = gram_loss(jnp.asarray(s), jnp.asarray(t), normalized=False, remove_only_teacher_neg=True)
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_gram_loss_token_mask_jit_and_empty_group():
    """Static shapes: one compiled program serves any mask; a group without selected tokens adds 0
    to the mean over groups."""
    s, t, ibot_mask = _features((2, 3, 5, 3), seed=4)
    ibot_mask[1] = False
    fn = jax.jit(lambda a, b, m: gram_loss(a, b, img_level=False, token_mask=m))
    got = float(fn(jnp.asarray(s), jnp.asarray(t), jnp.asarray(ibot_mask)))
    ref = np_gram_loss(s[0], t[0], True, False, False, False, True, ibot_mask[0]) / 2
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    assert float(fn(jnp.asarray(s), jnp.asarray(t), jnp.zeros(ibot_mask.shape, bool))) == 0.0
    # An all-true mask is the plain batch-level loss.
    full = float(fn(jnp.asarray(s), jnp.asarray(t), jnp.ones(ibot_mask.shape, bool)))
    np.testing.assert_allclose(full, float(gram_loss(jnp.asarray(s), jnp.asarray(t), img_level=False)), rtol=1e-6)


@pytest.mark.parametrize("neg", ["keep_neg", "remove_neg", "only_teacher_fixed"])
@pytest.mark.parametrize("normalized", [True, False])
def test_gram_loss_grad_ignores_unselected_tokens(neg, normalized):
    remove_neg, only_teacher, as_official = NEG_MODES[neg]
    s, t, ibot_mask = _features((2, 3, 5, 3), seed=5)

    def loss(x):
        return gram_loss(
            x,
            jnp.asarray(t),
            normalized=normalized,
            img_level=False,
            remove_neg=remove_neg,
            remove_only_teacher_neg=only_teacher,
            token_mask=jnp.asarray(ibot_mask),
            teacher_neg_as_official=as_official,
        )

    g = np.asarray(jax.grad(loss)(jnp.asarray(s)))
    assert np.all(np.isfinite(g))
    assert np.all(g[~ibot_mask] == 0.0)  # a token that is not selected does not influence the loss
    assert np.all(np.abs(g[ibot_mask]).sum(-1) > 0)
    # The unselected tokens' features really do not matter, not only to first order.
    noisy = np.where(ibot_mask[..., None], s, 100.0 * np.random.default_rng(0).normal(size=s.shape))
    np.testing.assert_allclose(float(loss(jnp.asarray(noisy, jnp.float32))), float(loss(jnp.asarray(s))), rtol=1e-6)


def test_gram_loss_rejects_bad_arguments():
    x = jnp.ones((2, 4, 3))
    mask = jnp.ones((2, 4), bool)
    with pytest.raises(ValueError, match="img_level"):
        gram_loss(x, x, img_level=True, token_mask=mask)
    with pytest.raises(ValueError, match="token_mask shape"):
        gram_loss(x, x, img_level=False, token_mask=jnp.ones((2, 3), bool))
    with pytest.raises(ValueError, match="exclusive"):
        gram_loss(x, x, remove_neg=True, remove_only_teacher_neg=True)
    with pytest.raises(ValueError, match="shapes differ"):
        gram_loss(x, jnp.ones((2, 4, 2)))


# ---------------------------------------------------------------------------------------------
# Resize of the Gram teacher's patch map vs torch.nn.functional.interpolate (align_corners=False)
# ---------------------------------------------------------------------------------------------

MODES = [("bicubic", False), ("bilinear", False), ("nearest", False), ("bilinear", True), ("bicubic", True)]
SIZES = [
    ((8, 8), (4, 4)),
    ((6, 6), (4, 4)),
    ((8, 6), (4, 3)),
    ((4, 4), (7, 7)),
    ((16, 16), (14, 14)),  # non-integer ratio: torch's fp32 source coordinates matter here
]


def torch_resize(x, out_hw, method, antialias):
    torch = pytest.importorskip("torch")
    nchw = torch.from_numpy(x).permute(0, 3, 1, 2)
    align = None if method == "nearest" else False
    y = torch.nn.functional.interpolate(nchw, size=out_hw, mode=method, align_corners=align, antialias=antialias)
    return y.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize(("method", "antialias"), MODES)
@pytest.mark.parametrize(("in_hw", "out_hw"), SIZES)
def test_resize_patch_features_matches_torch(method, antialias, in_hw, out_hw):
    x = np.random.default_rng(sum(in_hw)).normal(size=(2, *in_hw, 3)).astype(np.float32)
    got = resize_patch_features(jnp.asarray(x), out_hw, method=method, antialias=antialias)
    assert got.shape == (2, *out_hw, 3) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), torch_resize(x, out_hw, method, antialias), rtol=0, atol=1e-5)


def test_resize_patch_features_jit_identity_and_errors():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 6, 6, 2)), jnp.float32)
    fn = jax.jit(resize_patch_features, static_argnums=(1, 2, 3))
    np.testing.assert_allclose(fn(x, (4, 4), "bicubic", False), resize_patch_features(x, (4, 4)), atol=1e-6)
    for method in ("bicubic", "bilinear", "nearest"):
        np.testing.assert_array_equal(resize_patch_features(x, (6, 6), method), x)
    with pytest.raises(ValueError, match="unknown resize method"):
        resize_patch_features(x, (4, 4), method="area")
    with pytest.raises(ValueError, match="antialias"):
        resize_patch_features(x, (4, 4), method="nearest", antialias=True)
