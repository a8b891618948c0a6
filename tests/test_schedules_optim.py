"""Schedules (RECIPE.md §5.4) and the AdamW parameter groups / update (§5.2–5.3)."""

import math
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dinov3_jax
from dinov3_jax.models.heads import DINOHead
from dinov3_jax.train.optim import clip_by_submodule, leaf_labels, make_optimizer, param_labels, path_names
from dinov3_jax.train.schedules import (
    build_schedules,
    cosine_schedule,
    linear_warmup_cosine_decay,
    scale_lr,
    v1_schedules,
)

# ---------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------

V1 = dict(
    lr=0.01,
    min_lr=1e-6,
    warmup_epochs=2,
    weight_decay=0.04,
    weight_decay_end=0.4,
    freeze_last_layer_epochs=1,
    momentum_teacher=0.992,
    final_momentum_teacher=1.0,
    warmup_teacher_temp=0.04,
    teacher_temp=0.07,
    warmup_teacher_temp_epochs=3,
)


def test_v1_schedules_by_hand():
    s = v1_schedules(total_steps=100, epoch_length=10, **V1)
    at = s.at
    # lr: linspace(0, peak, 20) with its endpoint, then cosine over N = 80 iterations.
    assert at(0)["lr"] == 0.0
    np.testing.assert_allclose(at(1)["lr"], 0.01 / 19, rtol=1e-12)
    np.testing.assert_allclose(at(19)["lr"], 0.01, rtol=1e-12)  # the warmup ends on the peak
    np.testing.assert_allclose(at(20)["lr"], 0.01, rtol=1e-12)  # cos(0): the cosine starts there too
    np.testing.assert_allclose(at(60)["lr"], 1e-6 + 0.5 * (0.01 - 1e-6), rtol=1e-12)
    np.testing.assert_allclose(at(99)["lr"], 1e-6 + 0.5 * (0.01 - 1e-6) * (1 + math.cos(math.pi * 79 / 80)), rtol=1e-12)
    assert at(99)["lr"] > 1e-6 and at(100)["lr"] == 1e-6 and at(10_000)["lr"] == 1e-6
    # last layer: the first epoch (10 its) zeroed, then the lr schedule.
    assert all(at(i)["last_layer_lr"] == 0.0 for i in range(10))
    assert at(10)["last_layer_lr"] == at(10)["lr"] > 0
    # wd and momentum: cosine over all 100 iterations (wd increasing).
    assert at(0)["wd"] == pytest.approx(0.04, abs=1e-15) and at(0)["momentum"] == pytest.approx(0.992, abs=1e-15)
    np.testing.assert_allclose(at(50)["wd"], 0.4 + 0.5 * (0.04 - 0.4), rtol=1e-12)
    np.testing.assert_allclose(at(99)["momentum"], 1.0 + 0.5 * (0.992 - 1.0) * (1 + math.cos(math.pi * 99 / 100)))
    assert at(100)["wd"] == 0.4 and at(100)["momentum"] == 1.0
    # teacher temperature: linspace(0.04, 0.07, 30), then constant.
    assert at(0)["teacher_temp"] == 0.04
    np.testing.assert_allclose(at(15)["teacher_temp"], 0.04 + 0.03 * 15 / 29, rtol=1e-12)
    np.testing.assert_allclose(at(29)["teacher_temp"], 0.07, rtol=1e-12)
    assert at(30)["teacher_temp"] == 0.07 and at(500)["teacher_temp"] == 0.07
    assert at(5)["dino_local_weight"] == 1.0 and at(5)["gram_weight"] == 1.0
    assert at(5)["backbone_lr_scale"] == 1.0  # no head warm-up unless optim.freeze_backbone_epochs
    assert set(at(0)) == {
        "lr",
        "wd",
        "momentum",
        "teacher_temp",
        "last_layer_lr",
        "dino_local_weight",
        "gram_weight",
        "backbone_lr_scale",
    }


def test_cosine_schedule_freeze_and_dtype():
    a = cosine_schedule(1.0, 0.0, 10, warmup_iters=3, freeze_iters=2)
    assert a.dtype == np.float64 and len(a) == 10
    np.testing.assert_array_equal(a[:5], [0, 0, 0, 0.5, 1.0])


def test_v2_by_hand():
    a = linear_warmup_cosine_decay(0.0, 1.0, 0.1, warmup_iters=20, total_iters=100)
    assert a.dtype == np.float64 and len(a) == 100
    np.testing.assert_allclose(a[19], 19 / 20, rtol=1e-12)  # the warmup excludes its endpoint
    assert a[20] == 1.0 and a[99] == pytest.approx(0.1, abs=1e-15)  # the cosine ends on `end`
    np.testing.assert_allclose(a[20 + 40], 0.1 + 0.9 * (1 + math.cos(math.pi * 40 / 79)) / 2, rtol=1e-12)
    b = linear_warmup_cosine_decay(0.0, 1.0, 0.1, warmup_iters=20, total_iters=100, cosine_iters=30)
    assert b[49] == pytest.approx(0.1, abs=1e-15) and np.all(b[50:] == 0.1)
    # A "rising cosine": peak below end.
    c = linear_warmup_cosine_decay(0.0, 0.0, 2.0, warmup_iters=5, total_iters=10, cosine_iters=3)
    np.testing.assert_allclose(c, [0, 0, 0, 0, 0, 0, 1, 2, 2, 2], atol=1e-15)
    with pytest.raises(ValueError):
        linear_warmup_cosine_decay(0, 1, 0, warmup_iters=5, total_iters=10, cosine_iters=6)


def test_scaling_rules():
    np.testing.assert_allclose(scale_lr(0.001, "sqrt_wrt_1024", 2048), 0.0056569, rtol=1e-5)
    np.testing.assert_allclose(scale_lr(0.001, "linear_wrt_256", 2048), 0.008, rtol=1e-12)
    with pytest.raises(ValueError):
        scale_lr(0.001, "bogus", 2048)


def _cfg(schedules=None, **extra):
    ns = SimpleNamespace
    optim = ns(scaling_rule="sqrt_wrt_1024", schedule_trunc_extra=0.0, **{k: V1[k] for k in list(V1)[:6]})
    optim.lr = 0.001
    teacher = ns(**{k: V1[k] for k in list(V1)[6:]})
    dino = ns(reweight_dino_local_loss=False, local_loss_weight_schedule=None)
    gram = ns(loss_weight=1.5, loss_weight_schedule=None)
    return ns(optim=optim, teacher=teacher, train=ns(OFFICIAL_EPOCH_LENGTH=10), dino=dino, gram=gram,
              schedules=schedules, **extra)  # fmt: skip


def test_build_schedules_v1_from_config():
    s = build_schedules(_cfg(), total_steps=100, global_batch=2048)
    np.testing.assert_allclose(s.at(19)["lr"], 0.001 * 4 * math.sqrt(2), rtol=1e-12)
    assert s.at(100)["lr"] == 1e-6  # min_lr is not scaled in v1
    assert s.at(3)["gram_weight"] == 1.5 and s.at(3)["dino_local_weight"] == 1.0


def test_build_schedules_v2_from_config():
    sched = {
        "lr": {"start": 0.0, "peak": 1e-3, "end": 1e-4, "warmup_epochs": 2, "freeze_last_layer_epochs": 1},
        "weight_decay": {"start": 0.04, "peak": 0.04, "end": 0.04, "warmup_epochs": 0},
        "momentum": {"start": 0.994, "peak": 0.994, "end": 1.0, "warmup_epochs": 0},
        "teacher_temp": {"start": 0.04, "peak": 0.07, "end": 0.07, "warmup_epochs": 3, "cosine_epochs": 1},
    }
    cfg = _cfg(sched)
    cfg.dino.reweight_dino_local_loss = True
    cfg.dino.local_loss_weight_schedule = {"start": 1, "peak": 1, "end": 0.5, "warmup_epochs": 5, "cosine_epochs": 1}
    cfg.gram.loss_weight_schedule = {"start": 0, "peak": 0, "end": 2.0, "warmup_epochs": 5, "cosine_epochs": 1}
    s = build_schedules(cfg, total_steps=100, global_batch=4096)
    k = 4 * math.sqrt(4)  # both peak and end scaled in v2
    np.testing.assert_allclose(s.at(10)["lr"], 1e-3 * k * 10 / 20, rtol=1e-12)
    np.testing.assert_allclose(s.at(20)["lr"], 1e-3 * k, rtol=1e-12)
    np.testing.assert_allclose(s.at(99)["lr"], 1e-4 * k, rtol=1e-9)
    assert s.at(0)["lr"] == 0.0 and s.at(9)["last_layer_lr"] == 0.0 and s.at(10)["last_layer_lr"] == s.at(10)["lr"]
    assert s.at(50)["wd"] == 0.04 and s.at(99)["momentum"] == pytest.approx(1.0, abs=1e-15)
    np.testing.assert_allclose(s.at(29)["teacher_temp"], 0.04 + 0.03 * 29 / 30, rtol=1e-12)
    assert s.at(39)["teacher_temp"] == pytest.approx(0.07, abs=1e-15) and s.at(60)["teacher_temp"] == 0.07
    assert s.at(49)["dino_local_weight"] == 1.0 and s.at(59)["dino_local_weight"] == pytest.approx(0.5, abs=1e-15)
    assert s.at(49)["gram_weight"] == 0.0 and s.at(80)["gram_weight"] == 2.0
    assert s.at(1000)["lr"] == pytest.approx(1e-4 * k)


# ---------------------------------------------------------------------------------------------
# Parameter groups
# ---------------------------------------------------------------------------------------------


def test_recipe_multiplier_examples():
    def lr(name, n, d):
        return leaf_labels("backbone", name, n_blocks=n, layerwise_decay=d, patch_embed_lr_mult=0.2)[0]

    np.testing.assert_allclose(lr("patch_embed.proj.kernel", 24, 0.9), 0.014358, rtol=1e-4)
    np.testing.assert_allclose(lr("cls_token", 24, 0.9), 0.071790, rtol=1e-4)
    np.testing.assert_allclose(lr("blocks.0.attn.qkv.kernel", 24, 0.9), 0.079766, rtol=1e-4)
    np.testing.assert_allclose(lr("blocks.23.mlp.fc1.bias", 24, 0.9), 0.9, rtol=1e-12)
    assert lr("norm.scale", 24, 0.9) == 1.0
    np.testing.assert_allclose(lr("patch_embed.proj.kernel", 40, 0.98), 0.08736, rtol=1e-3)
    np.testing.assert_allclose(lr("storage_tokens", 40, 0.98), 0.43679, rtol=1e-4)
    np.testing.assert_allclose(lr("blocks.0.ls1.gamma", 40, 0.98), 0.44570, rtol=1e-4)


@pytest.fixture(scope="module")
def student_state():
    """nnx.State of a tiny ViT student, materialised with ones from its abstract shapes (no
    eager init, which would compile every initialiser)."""

    class Student(nnx.Module):
        def __init__(self):
            self.backbone = dinov3_jax.create_backbone("dinov3_vit_tiny")
            self.dino_head = DINOHead(64, 16, hidden_dim=32, bottleneck_dim=8, rngs=nnx.Rngs(1))
            self.ibot_head = DINOHead(64, 16, hidden_dim=32, bottleneck_dim=8, rngs=nnx.Rngs(2))

    abstract = nnx.state(nnx.eval_shape(Student), nnx.Param)
    return jax.tree.map(lambda x: np.ones(x.shape, x.dtype), abstract)


def test_param_labels_tiny_vit(student_state):
    state = student_state
    lr, wd, last = param_labels(state, layerwise_decay=0.9, patch_embed_lr_mult=0.2)
    flat = {
        ".".join(path_names(p)): (a, b, c)
        for (p, a), b, c in zip(jax.tree_util.tree_flatten_with_path(lr)[0], jax.tree.leaves(wd), jax.tree.leaves(last))
    }
    big_l = 3  # dinov3_vit_tiny depth
    expect = {
        "backbone.patch_embed.proj.kernel": (0.9**4 * 0.2, 1.0, False),
        "backbone.patch_embed.proj.bias": (0.9**4 * 0.2, 0.0, False),
        "backbone.cls_token": (0.9**4, 1.0, False),
        "backbone.storage_tokens": (0.9**4, 1.0, False),
        "backbone.mask_token": (0.9**4, 1.0, False),
        "backbone.blocks.0.attn.qkv.kernel": (0.9**big_l, 1.0, False),
        "backbone.blocks.0.attn.qkv.bias": (0.9**big_l, 0.0, False),
        "backbone.blocks.1.norm1.scale": (0.9**2, 0.0, False),
        "backbone.blocks.2.ls2.gamma": (0.9, 0.0, False),
        "backbone.blocks.2.mlp.fc2.kernel": (0.9, 1.0, False),
        "backbone.norm.scale": (1.0, 0.0, False),
        "backbone.norm.bias": (1.0, 0.0, False),
        "dino_head.mlp.0.kernel": (1.0, 1.0, False),
        "dino_head.mlp.2.bias": (1.0, 0.0, False),
        "dino_head.last_layer.kernel": (1.0, 1.0, True),
        "ibot_head.last_layer.kernel": (1.0, 1.0, True),
    }
    for name, (lm, wm, il) in expect.items():
        got = flat[name]
        np.testing.assert_allclose(got[0], lm, rtol=1e-12, err_msg=name)
        assert got[1:] == (wm, il), name
    assert sum(v[2] for v in flat.values()) == 2


# ---------------------------------------------------------------------------------------------
# AdamW update against a NumPy PyTorch-AdamW
# ---------------------------------------------------------------------------------------------


def _tiny_params(seed=0):
    r = np.random.default_rng(seed)

    def a(*shape):
        return jnp.asarray(r.normal(size=shape), jnp.float32)

    return {
        "backbone": {
            "patch_embed": {"proj": {"kernel": a(2, 2, 3, 4), "bias": a(4)}},
            "cls_token": a(1, 1, 4),
            "blocks": {0: {"norm1": {"scale": a(4)}, "attn": {"qkv": {"kernel": a(4, 12)}}, "ls1": {"gamma": a(4)}},
                       1: {"mlp": {"fc1": {"kernel": a(4, 8), "bias": a(8)}}}},
            "norm": {"scale": a(4), "bias": a(4)},
        },
        "dino_head": {"mlp": {0: {"kernel": a(4, 6), "bias": a(6)}}, "last_layer": {"kernel": a(6, 5)}},
        "ibot_head": {"mlp": {0: {"kernel": a(4, 6), "bias": a(6)}}, "last_layer": {"kernel": a(6, 5)}},
    }  # fmt: skip


def _np_adamw(params, grads_seq, scheds, *, b1, b2, clip, decay, pe_mult, eps=1e-8):
    """PyTorch AdamW (documented algorithm) with per-group lr / wd and per-sub-module clipping."""
    flat = {
        ".".join(path_names(p)): np.asarray(v, np.float64) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]
    }
    m = {k: np.zeros_like(v) for k, v in flat.items()}
    v_ = {k: np.zeros_like(v) for k, v in flat.items()}
    for t, (grads, (lr, wd, ll_lr)) in enumerate(zip(grads_seq, scheds), start=1):
        g = {
            ".".join(path_names(p)): np.asarray(x, np.float64)
            for p, x in jax.tree_util.tree_flatten_with_path(grads)[0]
        }
        for sub in ("backbone", "dino_head", "ibot_head"):
            keys = [k for k in g if k.split(".")[0] == sub]
            norm = math.sqrt(sum(np.sum(g[k] ** 2) for k in keys))
            coef = min(clip / (norm + 1e-6), 1.0)
            for k in keys:
                g[k] = g[k] * coef
        for k, theta in flat.items():
            sub, name = k.split(".", 1)
            lm, wm, last = leaf_labels(sub, name, n_blocks=2, layerwise_decay=decay, patch_embed_lr_mult=pe_mult)
            gamma = (ll_lr if last else lr) * lm
            theta = theta * (1 - gamma * wd * wm)
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v_[k] = b2 * v_[k] + (1 - b2) * g[k] ** 2
            m_hat = m[k] / (1 - b1**t)
            v_hat = v_[k] / (1 - b2**t)
            flat[k] = theta - gamma * m_hat / (np.sqrt(v_hat) + eps)
    return flat, m, v_


def test_adamw_matches_numpy():
    params = _tiny_params(0)
    r = np.random.default_rng(1)
    grads_seq = []
    for scale in (5.0, 0.01):  # first step: backbone clipped; second: nothing clipped
        g = jax.tree.map(lambda x, s=scale: jnp.asarray(r.normal(size=x.shape) * s, jnp.float32), params)
        g["dino_head"] = jax.tree.map(lambda x: x * 0.01, g["dino_head"])  # small: never clipped
        grads_seq.append(g)
    scheds = [(1e-2, 0.04, 0.0), (5e-3, 0.1, 5e-3)]
    kw = dict(b1=0.9, b2=0.99, clip_grad=3.0, layerwise_decay=0.8, patch_embed_lr_mult=0.2)
    tx = make_optimizer(params=params, **kw)
    state = tx.init(params)
    update = jax.jit(lambda g, s, p, lr, wd, ll: tx.update(g, s, p, lr=lr, wd=wd, last_layer_lr=ll))
    p = params
    for g, (lr, wd, ll) in zip(grads_seq, scheds):
        updates, state = update(g, state, p, lr, wd, ll)
        p = jax.tree.map(lambda a, b: a + b, p, updates)
    ref, _, _ = _np_adamw(params, grads_seq, scheds, b1=0.9, b2=0.99, clip=3.0, decay=0.8, pe_mult=0.2)
    got = {".".join(path_names(q)): np.asarray(x) for q, x in jax.tree_util.tree_flatten_with_path(p)[0]}
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-6, atol=1e-7, err_msg=k)
    _, norms = clip_by_submodule(grads_seq[0], 3.0)
    assert float(norms["backbone"]) > 3.0 and float(norms["dino_head"]) < 3.0


def test_last_layer_freeze_updates_moments_only():
    params = _tiny_params(2)
    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.1), params)
    tx = make_optimizer(params=params, clip_grad=None)
    state = tx.init(params)
    step = jax.jit(lambda g, s, p: tx.update(g, s, p, lr=1e-2, wd=0.04, last_layer_lr=0.0))
    updates, state = step(grads, state, params)
    new = jax.tree.map(lambda a, b: a + b, params, updates)
    for head in ("dino_head", "ibot_head"):
        np.testing.assert_array_equal(
            np.asarray(new[head]["last_layer"]["kernel"]), np.asarray(params[head]["last_layer"]["kernel"])
        )
        assert np.all(np.asarray(new[head]["mlp"][0]["kernel"]) != np.asarray(params[head]["mlp"][0]["kernel"]))
        np.testing.assert_allclose(np.asarray(state.adam.mu[head]["last_layer"]["kernel"]), 0.1 * 0.1, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(state.adam.nu[head]["last_layer"]["kernel"]), 0.001 * 0.01, rtol=1e-5)
    assert int(state.adam.count) == 1


def test_optimizer_on_nnx_state(student_state):
    state = student_state
    tx = make_optimizer(params=state, clip_grad=3.0)
    opt = tx.init(state)
    grads = jax.tree.map(np.ones_like, state)
    step = jax.jit(lambda g, o, p: tx.update(g, o, p, lr=1e-3, wd=0.04, last_layer_lr=0.0))
    updates, opt = step(grads, opt, state)
    assert jax.tree.structure(updates) == jax.tree.structure(state)
    assert np.all(np.asarray(updates["dino_head"]["last_layer"]["kernel"][...]) == 0)
    assert np.all(np.asarray(updates["backbone"]["cls_token"][...]) != 0)


def test_scaling_rule_none_keeps_the_lr():
    from dinov3_jax.train.schedules import scale_lr

    assert scale_lr(0.003, "none", 64) == 0.003
