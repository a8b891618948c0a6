"""Training configuration: typed schema with the official DINOv3 key names, YAML recipes, overrides.

    cfg = load_config("vitl16_im1k", ["data.path=/data/imagenet/train", "optim.lr=0.0005"])

See `schema.py` for every section and key, and `recipes/` for the built-in recipes.
"""

from dinov3_jax.configs.load import (
    apply_overrides,
    config_from_dict,
    config_to_dict,
    config_to_yaml,
    get_key,
    list_recipes,
    load_config,
    resume_differences,
    student_configs,
    validate,
    validate_for_devices,
)
from dinov3_jax.configs.schema import (
    ARCHS,
    LAYOUT_KEYS,
    NO_EFFECT_KEYS,
    PROJECT_SECTIONS,
    Config,
    ConfigError,
    ScheduleEntry,
    arch_dims,
    global_batch_size,
    lr_scale_factor,
    mesh_shape,
    scaled_lr,
    schedule_steps,
    source_kwargs,
    student_backbone_config,
    student_vit_config,
    teacher_vit_config,
    total_steps,
)

__all__ = [
    "ARCHS",
    "LAYOUT_KEYS",
    "NO_EFFECT_KEYS",
    "PROJECT_SECTIONS",
    "Config",
    "ConfigError",
    "ScheduleEntry",
    "apply_overrides",
    "arch_dims",
    "config_from_dict",
    "config_to_dict",
    "config_to_yaml",
    "get_key",
    "global_batch_size",
    "list_recipes",
    "load_config",
    "lr_scale_factor",
    "mesh_shape",
    "resume_differences",
    "scaled_lr",
    "schedule_steps",
    "source_kwargs",
    "student_backbone_config",
    "student_configs",
    "student_vit_config",
    "teacher_vit_config",
    "total_steps",
    "validate",
    "validate_for_devices",
]
