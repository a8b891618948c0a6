"""Distillation from a frozen teacher (paper §5.2; RECIPE.md §5.8): the teacher is read from an
official training checkpoint (its heads checked against a PyTorch head written from the recipe)
and never changes; a student smaller in width, depth and patch size learns from it; a teacher
without heads (a released backbone file) distils by features into a ConvNeXt student; several
students learn from one teacher pass as each would alone, and their run resumes exactly;
mismatched prototypes, patch grids or shared keys are errors naming both values before anything
compiles."""

from __future__ import annotations

import logging
import shutil

import jax
import numpy as np
import pytest
import torch
import yaml
from flax import nnx

from dinov3_jax import load_backbone, parallel, save_backbone
from dinov3_jax.configs import (
    ConfigError,
    apply_overrides,
    config_from_dict,
    config_to_yaml,
    load_config,
    student_configs,
    teacher_vit_config,
)
from dinov3_jax.data.pipeline import build_train_pipeline
from dinov3_jax.data.sources import make_source
from dinov3_jax.models.heads import DINOHead
from dinov3_jax.models.vit import DinoVisionTransformer
from dinov3_jax.train.main import device_batch, format_result, saved_part, setup, train

from .test_train import BATCH, MICRO, micro_config


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


def multi_config(teacher_folder, tmp_path, students: dict[str, list[str]], *extra: str):
    """A multi-distillation run of the micro sizes with 32 px crops: the base config leaves the
    student section at its defaults, so each student's file decides its architecture."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    for name, keys in students.items():
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(_unflatten(keys)))
    listed = ", ".join(f"{{name: {n}, config_path: {tmp_path / n}.yaml}}" for n in students)
    base = [o for o in MICRO if not o.startswith("student.")]
    return config_from_dict(
        {},
        [
            *base,
            "distillation.enabled=true",
            f"distillation.full_cfg_path={teacher_folder / 'teacher.yaml'}",
            f"distillation.checkpoint_path={teacher_folder / 'teacher_checkpoint.pth'}",
            "crops.global_crops_size=32",
            "crops.local_crops_size=16",
            "crops.teacher_to_student_resolution_scale=2",
            "multidistillation.enabled=true",
            f"multidistillation.students=[{listed}]",
            f"train.output_dir={tmp_path / 'run'}",
            *extra,
        ],
    )


def _unflatten(keys: list[str]) -> dict:
    tree: dict = {}
    for item in keys:
        key, value = item.split("=", 1)
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return tree


# Two ViT students of different widths, depths and temperatures (vit_nano: 32 wide, 2 blocks;
# vit_tiny: 64 wide, 3 blocks), both at patch 16 against the patch-8 teacher (scale 2: 2x2 grids).
TWO_VITS = {
    "nano": ["student.arch=vit_nano", "student.patch_size=16", "student.drop_path_rate=0.1"],
    "tiny": ["student.arch=vit_tiny", "student.patch_size=16", "teacher.teacher_temp=0.05"],
}


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
    batch = device_batch(host, mesh)
    sched = run.schedule_values(2)  # lr > 0
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


def test_multi_student_distillation_updates_each_student_as_its_own_run_and_resumes_exactly(
    official_teacher, tmp_path, capsys
):
    """Two ViT students smaller than the teacher (vit_tiny/8) in width, depth or patch grid learn
    from one pass of the frozen teacher of an official training checkpoint, compiled as the
    trainer runs them:

    * each student takes the update its own single-student run would: the nano student after two
      steps equals the single-student run of its merged config with the same seed and data
      (tolerance 2e-6: the two programs are fused differently; the code per student is the same
      for every student, so one is compared to keep the suite short);
    * the run resumed from its step-1 checkpoint ends in the same state bitwise;
    * each student is exported to its folder with its merged config and loads as itself, and
      the frozen teacher is bitwise unchanged."""
    cfg = multi_config(official_teacher[0], tmp_path, TWO_VITS, "runtime.max_steps=2", "checkpointing.period=1")
    configs = student_configs(cfg)
    assert configs["nano"].student.drop_path_rate == 0.1 and configs["tiny"].teacher.teacher_temp == 0.05
    assert configs["tiny"].optim.lr == cfg.optim.lr == 0.002  # a key the run sets is the run's
    result = train(cfg, progress=False)
    assert result["skipped_steps"] == 0 and set(result["loss"]) == {"nano", "tiny"}
    final = jax.device_get(saved_part(result["state"]))
    for name, (width, depth) in {"nano": (32, 2), "tiny": (64, 3)}.items():
        folder = tmp_path / "run" / "students" / name
        assert result["student_backbones"][name] == str(folder / "teacher_backbone.safetensors")
        model = load_backbone(weights=folder / "teacher_backbone.safetensors")
        assert (model.config.embed_dim, model.config.depth, model.config.patch_size) == (width, depth, 16)
        assert load_config(str(folder / "config.yaml")).student.arch == f"vit_{name}"
    assert "nano backbone:" in format_result({**result, "seconds": 1.0})
    teacher = nnx.state(load_backbone(weights=official_teacher[0] / "backbone.pth"), nnx.Param).to_pure_dict()
    for got, want in zip(jax.tree.leaves(result["state"]["distill_teacher"]["backbone"]), jax.tree.leaves(teacher)):
        np.testing.assert_array_equal(got, want)

    shutil.copytree(tmp_path / "run" / "checkpoints" / "1", tmp_path / "resumed" / "checkpoints" / "1")
    again = train(apply_overrides(cfg, [f"train.output_dir={tmp_path / 'resumed'}"]), progress=False)
    for x, y in zip(jax.tree.leaves(final), jax.tree.leaves(jax.device_get(saved_part(again["state"])))):
        np.testing.assert_array_equal(x, y)

    single = train(apply_overrides(configs["nano"], [f"train.output_dir={tmp_path / 'nano'}"]), progress=False)
    assert "heads objective; teacher 64 wide, 3 blocks" in capsys.readouterr().out
    single_state = jax.device_get(single["state"])
    for key in ("student", "teacher", "opt_state"):
        for got, want in zip(jax.tree.leaves(final["students"]["nano"][key]), jax.tree.leaves(single_state[key])):
            np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6, err_msg=key)
    # The single-student run: its teacher's heads are the checkpoint's (the same function as the
    # PyTorch head), the student moved, and its EMA is what the run exports.
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    head_def = nnx.graphdef(DINOHead(64, 64, hidden_dim=32, bottleneck_dim=16, rngs=nnx.Rngs(0)))
    for name, head in official_teacher[1].items():
        ours = nnx.merge(head_def, nnx.State(single_state["distill_teacher"][name]))
        want = head(torch.from_numpy(x)).detach().numpy()
        np.testing.assert_allclose(np.asarray(ours(x)), want, atol=2e-6, err_msg=name)
    assert not all(
        np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(single_state["student"]), jax.tree.leaves(single_state["teacher"]))
    )
    exported = load_backbone(weights=tmp_path / "nano" / "teacher_backbone.safetensors")
    assert (exported.config.embed_dim, exported.config.depth, exported.config.patch_size) == (32, 2, 16)


def test_vit_and_convnext_students_of_one_grid_build_into_one_run(official_teacher, tmp_path):
    """A ViT/32 next to a stride-32 ConvNeXt (32 px crops; the patch-8 teacher of a released
    backbone file sees 8 px, scale 4: 1x1 grids) make one feature-distillation run: each student
    gets its own model, projectors onto the teacher's width and optimizer, and the masks are drawn
    on their grid. (The ConvNeXt step is the single-student test's; the multi-student step is the
    test's above.)"""
    folder, _ = official_teacher
    students = {"vit": ["student.arch=vit_nano", "student.patch_size=32"], "convnext": ["student.arch=convnext_test"]}
    cfg = multi_config(
        folder,
        tmp_path,
        students,
        f"distillation.checkpoint_path={folder / 'backbone.pth'}",
        "distillation.full_cfg_path=''",
        "crops.local_crops_size=32",
        "crops.teacher_to_student_resolution_scale=4",
    )
    run = setup(cfg, parallel.make_mesh(-1, 1), global_batch=BATCH, steps=6)
    assert run.multi and {s.loss_config.distill.objective for s in run.students.values()} == {"features"}
    assert run.mask_stride == 32  # the students' grid, not the base config's (default ViT/16)
    kinds = {
        name: type(nnx.merge(s.student_def, nnx.State(run.state["students"][name]["student"])).backbone).__name__
        for name, s in run.students.items()
    }
    assert kinds == {"vit": "DinoVisionTransformer", "convnext": "ConvNeXt"}
    assert set(run.state["students"]["convnext"]["student"]) == {"backbone", "cls_projector", "patch_projector"}


def test_multi_student_configs_that_cannot_share_a_batch_are_errors(official_teacher, tmp_path):
    """Students share crops, masks, the teacher and the run's length: a student file that sets
    one of those differently is an error naming the key and both students; so is a ViT/16 next
    to a stride-32 ConvNeXt (two patch grids), before anything compiles."""
    folder, _ = official_teacher
    odd = {**TWO_VITS, "odd": [*TWO_VITS["nano"], "crops.global_crops_scale=[0.5, 1.0]"]}
    with pytest.raises(ConfigError, match=r"students nano and odd differ in crops\.global_crops_scale"):
        student_configs(multi_config(folder, tmp_path, odd))
    mixed = {"nano": TWO_VITS["nano"], "convnext": ["student.arch=convnext_test"]}
    with pytest.raises(ConfigError, match=r"differs from the student's \(32 px at stride 32: 1\)"):
        setup(multi_config(folder, tmp_path, mixed), parallel.make_mesh(-1, 1), global_batch=BATCH, steps=6)


def test_a_run_key_that_overrides_a_student_file_is_warned(official_teacher, tmp_path, caplog):
    """The run's keys win over the students' files (as upstream), never silently."""
    students = {"nano": [*TWO_VITS["nano"], "optim.lr=0.5"], "tiny": TWO_VITS["tiny"]}
    with caplog.at_level(logging.WARNING):
        configs = student_configs(multi_config(official_teacher[0], tmp_path, students))
    assert configs["nano"].optim.lr == 0.002
    assert "students[nano]: the run's optim.lr=0.002 overrides the student file's 0.5" in caplog.text
    assert "students[tiny]" not in caplog.text


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
