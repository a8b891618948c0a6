"""Distillation from a frozen teacher (paper §5.2; RECIPE.md §5.8): the teacher is read from an
official training checkpoint (its heads checked against a PyTorch head written from the recipe)
and never changes; a student smaller in width, depth and patch size learns from it; a teacher
without heads (a released backbone file) distils by features into a ConvNeXt student; mismatched
prototypes or patch grids are errors naming both values before anything compiles."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from dinov3_jax import load_backbone, parallel, save_backbone
from dinov3_jax.configs import ConfigError, config_to_yaml, teacher_vit_config
from dinov3_jax.data.pipeline import build_train_pipeline
from dinov3_jax.data.sources import make_source
from dinov3_jax.models.heads import DINOHead
from dinov3_jax.models.vit import DinoVisionTransformer
from dinov3_jax.train.main import PER_SAMPLE_KEYS, SCHEDULE_KEYS, setup, train
from dinov3_jax.train.step import to_sample_major

from .test_train import BATCH, micro_config


class TorchHead(torch.nn.Module):
    """The DINOv3 projection head as RECIPE.md §3 specifies it: Linear → GELU → Linear → GELU →
    Linear to the bottleneck, L2 normalisation, a bias-free last layer."""

    def __init__(self, dim: int, prototypes: int, hidden: int, bottleneck: int):
        super().__init__()
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(dim, hidden),
            torch.nn.GELU(),
            torch.nn.Linear(hidden, hidden),
            torch.nn.GELU(),
            torch.nn.Linear(hidden, bottleneck),
        )
        self.last_layer = torch.nn.Linear(bottleneck, prototypes, bias=False)

    def forward(self, x):
        return self.last_layer(torch.nn.functional.normalize(self.mlp(x), dim=-1, eps=1e-12))


def micro_teacher_backbone():
    """The micro recipe's vit_tiny/8 (what that recipe trains), randomly initialised."""
    return DinoVisionTransformer(teacher_vit_config(micro_config()), rngs=nnx.Rngs(5))


@pytest.fixture(scope="module")
def official_teacher(tmp_path_factory):
    """A `teacher_checkpoint.pth` as upstream writes it ({"teacher": backbone.*, dino_head.*,
    ibot_head.*}) of the micro recipe's vit_tiny/8 with 64-prototype heads; that backbone alone as
    a released file (`backbone.pth`); and the recipe."""
    folder = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(0)
    cfg = micro_config()
    save_backbone(micro_teacher_backbone(), folder / "backbone.pth", "meta")
    state = {f"backbone.{k}": v for k, v in torch.load(folder / "backbone.pth").items()}
    heads = {name: TorchHead(64, 64, 32, 16) for name in ("dino_head", "ibot_head")}
    for name, head in heads.items():
        state |= {f"{name}.{k}": v for k, v in head.state_dict().items()}
    torch.save({"teacher": state}, folder / "teacher_checkpoint.pth")
    (folder / "teacher.yaml").write_text(config_to_yaml(cfg))
    return folder, heads


def test_heads_distillation_from_an_official_checkpoint_into_a_smaller_student(official_teacher, tmp_path, capsys):
    """vit_nano/16 (32 wide, 2 blocks) learns from the frozen vit_tiny/8 teacher (64 wide, 3
    blocks) on 32 px crops, the teacher seeing them at 16 px (scale 2: both grids 2×2)."""
    folder, torch_heads = official_teacher
    cfg = micro_config(
        "distillation.enabled=true",
        f"distillation.full_cfg_path={folder / 'teacher.yaml'}",
        f"distillation.checkpoint_path={folder / 'teacher_checkpoint.pth'}",
        "student.arch=vit_nano",
        "student.patch_size=16",
        "crops.global_crops_size=32",
        "crops.local_crops_size=16",
        "crops.teacher_to_student_resolution_scale=2",
        "runtime.max_steps=2",
        f"train.output_dir={tmp_path / 'run'}",
    )
    result = train(cfg, progress=False)
    assert "heads objective; teacher 64 wide, 3 blocks" in capsys.readouterr().out
    assert result["skipped_steps"] == 0 and np.isfinite(result["loss"])

    # The teacher's heads are the checkpoint's (the same function as the PyTorch head) ...
    state = jax.device_get(result["state"])
    frozen = state["distill_teacher"]
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    head_def = nnx.graphdef(DINOHead(64, 64, hidden_dim=32, bottleneck_dim=16, rngs=nnx.Rngs(0)))
    for name, head in torch_heads.items():
        ours = nnx.merge(head_def, nnx.State(frozen[name]))
        want = head(torch.from_numpy(x)).detach().numpy()
        np.testing.assert_allclose(np.asarray(ours(x)), want, atol=2e-6, err_msg=name)
    # ... and unchanged, bitwise, after the steps; its backbone is the checkpoint's.
    reference = nnx.state(load_backbone(weights=folder / "backbone.pth"), nnx.Param).to_pure_dict()
    for got, want in zip(jax.tree.leaves(frozen["backbone"]), jax.tree.leaves(reference)):
        np.testing.assert_array_equal(got, want)
    # The student (32 wide) moved; its EMA is what the run exports.
    assert not all(
        np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state["student"]), jax.tree.leaves(state["teacher"]))
    )
    exported = load_backbone(weights=tmp_path / "run" / "teacher_backbone.safetensors")
    assert (exported.config.embed_dim, exported.config.depth, exported.config.patch_size) == (32, 2, 16)


def test_a_released_backbone_distils_by_features_into_a_convnext_student(official_teacher, tmp_path, capsys):
    """A backbone file has no heads: the objective becomes feature regression, the architecture
    comes from the file, and a stride-32 ConvNeXt student (32 px crops; the patch-8 teacher sees
    8 px, scale 4) takes a step that moves it and leaves the teacher as it was. (The trainer
    around the step is the heads test's.)"""
    folder, _ = official_teacher
    cfg = micro_config(
        "distillation.enabled=true",
        f"distillation.checkpoint_path={folder / 'backbone.pth'}",
        "student.arch=convnext_test",
        "crops.global_crops_size=32",
        "crops.local_crops_size=32",
        "crops.teacher_to_student_resolution_scale=4",
    )
    mesh = parallel.make_mesh(-1, 1)
    run = setup(cfg, mesh, global_batch=BATCH, steps=6)
    assert "features objective; teacher 64 wide, 3 blocks" in capsys.readouterr().out
    source = make_source("synthetic", None, num_samples=64, image_size=32)
    host = next(iter(build_train_pipeline(source, cfg=cfg, per_host_batch=BATCH, patch_size=32)))
    batch = parallel.host_to_global(to_sample_major(host, 8), mesh, PER_SAMPLE_KEYS)
    sched = {k: np.float32(v) for k, v in run.schedules.at(2).items() if k in SCHEDULE_KEYS}  # lr > 0
    before = jax.device_get(run.state)
    state, metrics = run.step_fn(run.state, batch, sched)
    after = jax.device_get(state)
    assert bool(metrics["finite"]) and {"cls_global", "cls_local", "patch", "koleo"} <= set(metrics)
    for x, y in zip(jax.tree.leaves(before["distill_teacher"]), jax.tree.leaves(after["distill_teacher"])):
        np.testing.assert_array_equal(x, y)
    moved = [
        not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(before["student"]), jax.tree.leaves(after["student"]))
    ]
    assert sum(moved) > len(moved) // 2
    ema = nnx.merge(run.teacher_def, nnx.State(after["teacher"])).backbone
    save_backbone(ema, tmp_path / "student.safetensors")
    assert type(load_backbone(weights=tmp_path / "student.safetensors")).__name__ == "ConvNeXt"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["dino.head_n_prototypes=32"], r"dino\.head_n_prototypes: the student has 32, the teacher 64"),
        (
            ["student.patch_size=16"],
            r"teacher's patch grid \(16 px / scale 1 = 16 px at patch 8: 2\) differs from the student's "
            r"\(16 px at stride 16: 1\).*scale=2",
        ),
        (["distillation.objective=heads", "distillation.checkpoint_path=BACKBONE"], "holds no DINO/iBOT heads"),
    ],
)
def test_mismatches_are_errors_naming_both_values(official_teacher, tmp_path, overrides, message):
    folder, _ = official_teacher
    cfg = micro_config(
        "distillation.enabled=true",
        f"distillation.full_cfg_path={folder / 'teacher.yaml'}",
        f"distillation.checkpoint_path={folder / 'teacher_checkpoint.pth'}",
        *(o.replace("BACKBONE", str(folder / "backbone.pth")) for o in overrides),
        f"train.output_dir={tmp_path / 'run'}",
    )
    with pytest.raises(ConfigError, match=message):
        train(cfg, progress=False)
