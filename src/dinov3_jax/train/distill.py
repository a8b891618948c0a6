"""Distillation from a frozen teacher (paper §5.2; RECIPE.md §5.8).

Every released DINOv3 model below the 7B is a student trained against the frozen 7B teacher. In
a distillation run (`distillation.enabled`) the teacher's targets replace the EMA teacher's:

* The teacher is frozen: evaluated in eval mode, never updated, kept out of the optimizer and out
  of the checkpoints (it is read again from `distillation.checkpoint_path` on resume). The
  student's own EMA is still kept, and it is what the run exports and evaluates, as upstream.
* **heads** objective (the paper's): the teacher's DINO and iBOT heads give Sinkhorn-Knopp
  targets; the student's global crops are *not* masked, yet the iBOT loss is taken at the sampled
  mask positions (patch-level distillation on a random subset of tokens); DINO, iBOT and KoLeo
  are always on. Prototype counts must match the teacher's.
* **features** objective (ours, for a teacher without heads, such as a released backbone): the
  student's CLS and patch tokens go through two linear projectors onto the teacher's width and
  are pulled onto the teacher's normalised tokens by cosine distance (local crops' CLS onto the
  teacher's CLS of both global crops of the image); KoLeo keeps the student's CLS spread.
  Fitting heads on a frozen backbone first would need a second, unsupervised training stage whose
  quality decides the student's; regressing the teacher's features needs none and transfers the
  very features users evaluate.

One patch grid serves the teacher and the student: the masks are drawn on it, and patch targets
pair token i with token i. The teacher sees the global crops downscaled by
`crops.teacher_to_student_resolution_scale` (2 for a stride-32 ConvNeXt student of a patch-16
teacher), which upstream looks up under the wrong name and so never applies;
`compat.ignore_teacher_to_student_resolution_scale=true` reproduces that (the grids must then
agree at scale 1). A mismatch is an error naming both grids, raised before anything compiles.

Multi-distillation (`multidistillation.enabled`, paper §5.2: the released ViT-S/S+/B/L were
trained at once): `configs.student_configs` merges each student's config (defaults ← its file ←
the run's keys), the teacher is read once, and `step.make_multi_student_step` runs it once per
batch for every student. Upstream's per-student rank ranges are not needed: every student is on
every device and sees the whole global batch (README, "Several students at once").
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from flax import nnx

from dinov3_jax.configs import Config, ConfigError, load_config, teacher_vit_config
from dinov3_jax.models.config import ViTConfig
from dinov3_jax.models.heads import HeadConfig, SSLModel, head_configs
from dinov3_jax.models.registry import stride_of
from dinov3_jax.train.step import DistillConfig

log = logging.getLogger(__name__)

RANDOM_TEACHER = ("", "ignore")  # the official test configs distil from a random teacher


@dataclasses.dataclass(frozen=True)
class Teacher:
    """The frozen teacher: the graph of its module (an `SSLModel` for the heads objective, a
    backbone for the features objective), its parameters (a pure dict of host arrays), its
    backbone's config, the objective and, for the heads objective, its heads' configs."""

    graphdef: nnx.GraphDef
    params: dict[str, Any]
    backbone: ViTConfig
    objective: str
    heads: tuple[HeadConfig, HeadConfig] | None


def frozen_backbone(graphdef: nnx.GraphDef, params: dict[str, Any]) -> nnx.Module:
    """The teacher's backbone as a module (for evaluating it)."""
    module = nnx.merge(graphdef, nnx.State(params))
    return module.backbone if isinstance(module, SSLModel) else module


def _teacher_recipe(cfg: Config) -> Config | None:
    """The teacher's training config: `distillation.full_cfg_path` (a recipe name, a YAML file or a
    run folder of ours), else the config.yaml of the run folder given as the checkpoint."""
    d = cfg.distillation
    given = d.full_cfg_path or (
        d.checkpoint_path if d.checkpoint_path and (Path(d.checkpoint_path) / "config.yaml").is_file() else ""
    )
    if not given:
        return None
    path = Path(given).expanduser()
    key = "distillation.full_cfg_path" if d.full_cfg_path else "distillation.checkpoint_path"
    try:
        return load_config(str(path / "config.yaml" if path.is_dir() else given))
    except ConfigError as err:
        raise ConfigError(f"{key}: the teacher's config: {err}") from None


def _grid_check(cfg: Config, student_stride: int, teacher_patch: int) -> float:
    """The teacher's downscaling factor, after checking that teacher and student share a patch grid."""
    scale = (
        1.0 if cfg.compat.ignore_teacher_to_student_resolution_scale else cfg.crops.teacher_to_student_resolution_scale
    )
    sizes = cfg.crops.global_crops_size
    for size in sizes if isinstance(sizes, tuple) else (sizes,):
        teacher_px = size / scale
        student_grid, teacher_grid = size / student_stride, teacher_px / teacher_patch
        if student_grid == teacher_grid and teacher_px.is_integer():
            continue
        hint = f"crops.teacher_to_student_resolution_scale={student_stride / teacher_patch:g}"
        if cfg.compat.ignore_teacher_to_student_resolution_scale:
            hint += " and compat.ignore_teacher_to_student_resolution_scale=false"
        raise ConfigError(
            f"distillation: the teacher's patch grid ({size} px / scale {scale:g} = {teacher_px:g} px at patch "
            f"{teacher_patch}: {teacher_grid:g}) differs from the student's ({size} px at stride {student_stride}: "
            f"{student_grid:g}); the masks and patch targets need one grid: set {hint}"
        )
    return scale


def read_teacher(cfg: Config) -> Teacher:
    """The frozen teacher of `cfg.distillation`, read (and its objective settled) before anything
    compiles; `distill_config` checks each student against it."""
    d = cfg.distillation
    recipe = _teacher_recipe(cfg)
    path = d.checkpoint_path
    weights: dict[str, Any] | None = None
    heads = head_configs(recipe) if recipe is not None else None
    if path in RANDOM_TEACHER:
        if recipe is None:
            raise ConfigError(
                "distillation.checkpoint_path: no teacher weights and no distillation.full_cfg_path to build one from"
            )
        vit: ViTConfig = teacher_vit_config(recipe)
        log.warning("distillation: the teacher is RANDOMLY INITIALISED (checkpoint_path=%r)", path)
    else:
        vit, weights = _read_weights(Path(path).expanduser(), recipe, heads)
    has_heads = weights is None or "dino_head" in weights
    objective = d.objective if d.objective != "auto" else ("heads" if has_heads else "features")
    if objective == "heads" and not has_heads:
        raise ConfigError(
            f"distillation.objective=heads: {path} holds no DINO/iBOT heads (a released backbone); use "
            "distillation.objective=features, or a training checkpoint or run folder with heads"
        )

    def build():
        if objective == "heads":
            return SSLModel(vit, *heads, rngs=nnx.Rngs(cfg.train.seed + 1))
        from dinov3_jax.models.vit import DinoVisionTransformer

        return DinoVisionTransformer(vit, rngs=nnx.Rngs(cfg.train.seed + 1))

    if weights is None:
        graphdef, params = nnx.split(build(), nnx.Param)
        params = params.to_pure_dict()
    else:  # the file's weights into the module's graph (no random initialisation of a large teacher)
        graphdef = nnx.graphdef(nnx.eval_shape(build))
        params = weights if objective == "heads" else weights["backbone"]
    source = "random" if weights is None else str(path)
    print(f"distillation: {objective} objective; teacher {vit.embed_dim} wide, {vit.depth} blocks, from {source}")
    return Teacher(graphdef, params, vit, objective, heads if objective == "heads" else None)


def distill_config(teacher: Teacher, cfg: Config, student_backbone: Any) -> DistillConfig:
    """The step's distillation settings for the student of `cfg`, after checking that it scores
    the teacher's prototypes and shares its patch grid (errors naming both values)."""
    if teacher.heads is not None:
        _check_prototypes(cfg, teacher.heads)
    scale = _grid_check(cfg, stride_of(student_backbone), teacher.backbone.patch_size)
    return DistillConfig(objective=teacher.objective, scale=scale)


def _check_prototypes(cfg: Config, heads: tuple[HeadConfig, HeadConfig]) -> None:
    problems = [
        f"{name}.head_n_prototypes: the student has {mine}, the teacher {theirs}"
        for name, mine, theirs in (
            ("dino", cfg.dino.head_n_prototypes, heads[0].n_prototypes),
            ("ibot", cfg.ibot.head_n_prototypes, heads[1].n_prototypes),
        )
        if mine != theirs
    ]
    if problems:
        raise ConfigError(
            "distillation: the student's heads must score the teacher's prototypes:\n  " + "\n  ".join(problems)
        )


def _read_weights(path: Path, recipe: Config | None, heads) -> tuple[ViTConfig, dict[str, Any]]:
    """(architecture, {"backbone", ["dino_head", "ibot_head"]} host arrays) of the teacher file."""
    from dinov3_jax.train.start import check_tree, read_start_weights
    from dinov3_jax.weights import WeightsError, load_backbone, read_torch

    what = "distillation.checkpoint_path"
    if not path.exists():
        raise ConfigError(f"{what}: {path} does not exist")
    if recipe is None:  # a backbone file alone: the architecture is the file's
        try:
            model = load_backbone(weights=path)
        except (WeightsError, ValueError) as err:
            raise ConfigError(f"{what}: {err}") from None
        if not isinstance(model.config, ViTConfig):
            raise ConfigError(f"{what}: {path} holds a ConvNeXt; the teacher must be a ViT")
        return model.config, {"backbone": nnx.state(model, nnx.Param).to_pure_dict()}
    vit = teacher_vit_config(recipe)
    abstract = nnx.state(nnx.eval_shape(lambda: SSLModel(vit, *heads, rngs=nnx.Rngs(0))), nnx.Param).to_pure_dict()
    weights, vit = read_start_weights(str(path), vit, abstract, what)
    if "dino_head" not in weights and path.suffix == ".pth":  # an official training checkpoint keeps its heads
        from dinov3_jax.convert.official import heads_to_ours

        found = heads_to_ours(read_torch(path))
        if found:
            check_tree(found, {k: abstract[k] for k in found}, what, str(path))
            weights = {**weights, **found}
    return vit, weights
