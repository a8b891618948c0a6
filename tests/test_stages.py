"""DINOv3's own stages at tiny scale: the official 7B pretrain → Gram anchoring → high-resolution
recipes chained through their output folders, the Gram-teacher refresh schedule, exact resume
across a refresh and across crop-size switches, and continued pretraining from a saved backbone."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from dinov3_jax.configs import ConfigError, load_config, student_vit_config
from dinov3_jax.configs.schema import Gram
from dinov3_jax.data.pipeline import crop_pair_index
from dinov3_jax.models.registry import create_backbone
from dinov3_jax.models.vit import DinoVisionTransformer
from dinov3_jax.train.main import train
from dinov3_jax.train.schedules import gram_teacher_copies
from dinov3_jax.weights import load_backbone, save_backbone

# The 7B architecture's features (SwiGLU-64, 4 registers, masked k bias, untied local CLS norm,
# RoPE rescaling) at a width of 32 and a depth of 2 (compiling is most of these tests' time), on
# 16 px crops of 2×2 patches, 2 images per simulated device.
TINY = [
    "student.arch=vit_nano",
    "student.patch_size=8",
    "student.drop_path_rate=0.1",
    "compute_precision.param_dtype=fp32",
    "dino.head_n_prototypes=32",
    "dino.head_bottleneck_dim=16",
    "dino.head_hidden_dim=32",
    "ibot.head_n_prototypes=32",
    "ibot.head_bottleneck_dim=16",
    "ibot.head_hidden_dim=32",
    "crops.local_crops_number=2",
    "crops.global_crops_size=16",
    "crops.local_crops_size=8",
    "train.batch_size_per_gpu=2",
    "train.OFFICIAL_EPOCH_LENGTH=1",
    "data.source=synthetic",
    "data.synthetic_image_size=32",
    "data.num_samples=64",
    "data.num_workers=0",
    "runtime.knn_every_steps=null",
    "runtime.log_every_steps=1",
    "checkpointing.period=2",
]


def stage(name: str, out, *extra: str):
    return load_config(name, [*TINY, f"train.output_dir={out}", *extra])


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_gram_teacher_copy_schedule():
    # Refresh after iteration it when (it + 1) ≥ first and (it + 1) % freq == 0, at most max times;
    # the copy happens before iteration it + 1. it_load_ema_teacher copies before that iteration.
    g = Gram(use_loss=True, update_frequency=10, it_first_update=15, max_updates=3)
    assert sorted(gram_teacher_copies(g, 100)) == [20, 30, 40]
    assert sorted(gram_teacher_copies(g, 35)) == [20, 30]
    g = Gram(use_loss=True, update_frequency=4, it_first_update=0, max_updates=None, it_load_ema_teacher=2)
    assert sorted(gram_teacher_copies(g, 13)) == [2, 4, 8, 12]
    assert gram_teacher_copies(Gram(use_loss=True, rep_update=False, it_load_ema_teacher=-1), 100) == frozenset()
    # The official Gram stage: 1,010,000 / 1,020,000 / 1,030,000.
    official = load_config("vit7b16_gram_anchor").gram
    assert sorted(gram_teacher_copies(official, 1_200_000)) == [1_010_000, 1_020_000, 1_030_000]


@pytest.mark.slow
def test_official_7b_stages_chain(tmp_path):
    """Pretrain → Gram anchoring (continues the run, Gram teacher = the pretraining teacher, one
    refresh) → high-resolution adaptation (student from the Gram stage's teacher, two crop-size
    pairs, distributed KoLeo, a refresh, resumed bitwise across the refresh and the pair switches)."""
    pre = tmp_path / "pretrain"
    r1 = train(stage("vit7b16_pretrain", pre, "runtime.max_steps=2"), progress=False)
    assert "gram" not in metrics(pre)[-1]

    # Gram stage: refresh before iteration 3 (after iteration 2); the official weight schedule
    # would be 0 until epoch 1000, so it is made non-zero to see the loss act. KoLeo searches
    # neighbours in groups as in the high-res stage, so that stage's first crop pair runs this
    # very program (compiled once for both).
    gram_args = (
        f"train.continue_from={pre}",
        f"gram.ckpt={pre}",
        "crops.gram_teacher_crops_size=32",
        "gram.it_first_update=3",
        "gram.update_frequency=3",
        "gram.max_updates=1",
        "gram.loss_weight_schedule.start=2.0",
        "gram.loss_weight_schedule.peak=2.0",
        "dino.koleo_loss_distributed=true",
        "dino.koleo_distributed_loss_group_size=16",
        "runtime.max_steps=5",
    )
    gram_dir = tmp_path / "gram"
    r2 = train(stage("vit7b16_gram_anchor", gram_dir, *gram_args), progress=False)
    logged = metrics(gram_dir)
    assert [m["step"] for m in logged] == [3, 4, 5]  # continued at the pretraining's step 2
    assert all(np.isfinite(m["gram"]) and m["gram"] > 0 and m["gram_weight"] == 2.0 for m in logged)
    state = host(r2["state"])
    # After the refresh (before iteration 3) the Gram teacher is a frozen copy of the EMA teacher
    # of that moment: it differs from the pretraining teacher it started as, and from the final EMA.
    pre_teacher = host(r1["state"])["teacher"]["backbone"]
    assert not np.array_equal(state["gram_teacher"]["cls_token"], pre_teacher["cls_token"])
    assert not np.array_equal(state["gram_teacher"]["cls_token"], state["teacher"]["backbone"]["cls_token"])

    # High-resolution adaptation from the Gram stage's teacher (heads included). Its Gram teacher
    # is fixed in the official recipe; here it is also refreshed before iteration 3. The run is
    # then resumed from its step-2 checkpoint: the refresh and both crop pairs (drawn 0, 1 at
    # iterations 2, 3) fall in the resumed part, which must reproduce the run bit for bit.
    hr_args = (
        f"student.resume_from_teacher_chkpt={gram_dir}",
        f"gram.ckpt={gram_dir}",
        "gram.rep_update=true",
        "gram.it_first_update=3",
        "gram.update_frequency=3",
        "gram.max_updates=1",
        "crops.global_crops_size=[16,24]",
        "crops.local_crops_size=[8,8]",
        "crops.gram_teacher_crops_size=[32,48]",
        "crops.global_local_crop_pairs_ratios=[0.5,0.5]",
        "runtime.max_steps=4",
    )
    assert [crop_pair_index(0, t, (0.5, 0.5)) for t in range(4)] == [1, 1, 0, 1]
    hr, hr_split = tmp_path / "hr", tmp_path / "hr_split"
    r3 = train(stage("vit7b16_high_res_adapt", hr, *hr_args), progress=False)
    assert all(np.isfinite(m["loss"]) and m["gram"] > 0 for m in metrics(hr))
    assert [m["step"] for m in metrics(hr)] == [1, 2, 3, 4]
    # The refresh replaced the Gram stage's teacher (gram.ckpt) the run started with.
    final = host(r3["state"])
    assert not np.array_equal(final["gram_teacher"]["cls_token"], state["teacher"]["backbone"]["cls_token"])
    shutil.copytree(hr, hr_split)
    shutil.rmtree(hr_split / "checkpoints" / "4")
    resumed = train(stage("vit7b16_high_res_adapt", hr_split, *hr_args), progress=False)
    assert_trees_equal(host(resumed["state"]), final)
    assert metrics(hr_split)[-1]["loss"] == metrics(hr)[-1]["loss"]


@pytest.mark.slow
def test_continued_pretraining_from_a_saved_backbone(tmp_path):
    """A released-format backbone (official .pth layout) starts the student and the EMA teacher,
    with fresh heads; during the head warm-up the backbone does not move, and Gram anchoring to the
    same file is on."""
    cfg = stage("tiny_cpu", tmp_path / "unused")
    source = DinoVisionTransformer(student_vit_config(cfg).replace(drop_path_rate=0.0), rngs=nnx.Rngs(7))
    released = save_backbone(source, tmp_path / "released.pth", "meta")
    out = tmp_path / "continued"
    args = [
        f"student.pretrained_weights={released}",
        "optim.freeze_backbone_epochs=3",
        "gram.use_loss=true",
        f"gram.ckpt={released}",
        "runtime.max_steps=3",
        "optim.epochs=3",
        "optim.warmup_epochs=0",
        "optim.freeze_last_layer_epochs=0",
    ]
    result = train(stage("tiny_cpu", out, *args), progress=False)
    state = host(result["state"])
    expected = host(nnx.state(source, nnx.Param).to_pure_dict())
    # The backbone never moved during the warm-up (lr 0): student bitwise, EMA to rounding.
    assert_trees_equal(state["student"]["backbone"], expected)
    assert_trees_equal(state["gram_teacher"], expected)
    for t, e in zip(jax.tree.leaves(state["teacher"]["backbone"]), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(t, e, rtol=1e-6, atol=1e-7)
    # ... while the heads trained.
    assert all(m["lr"] > 0 for m in metrics(out))
    exported = load_backbone(weights=out / "teacher_backbone.safetensors")
    x = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype(np.float32)
    np.testing.assert_allclose(
        np.asarray(exported.forward_features(x)["x_norm_patchtokens"]),
        np.asarray(source.forward_features(x)["x_norm_patchtokens"]),
        atol=1e-5,
    )


def test_start_weights_errors_before_compiling(tmp_path):
    with pytest.raises(ConfigError, match=r"student.pretrained_weights: .*does not exist"):
        train(stage("tiny_cpu", tmp_path / "a", f"student.pretrained_weights={tmp_path / 'nope.pth'}"))
    wrong = save_backbone(create_backbone("dinov3_vit_tiny_swiglu"), tmp_path / "swiglu.safetensors")
    with pytest.raises(ConfigError, match=r"gram.ckpt: .*not the run.s architecture"):
        train(stage("tiny_cpu", tmp_path / "b", "gram.use_loss=true", f"gram.ckpt={wrong}"))
    with pytest.raises(ConfigError, match="Gram teacher has no weights"):
        train(stage("tiny_cpu", tmp_path / "c", "gram.use_loss=true"))
