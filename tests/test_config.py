"""Training configuration: official defaults, recipes, overrides, errors and derived values (no JAX compilation)."""

import dataclasses
import logging
import math
import re
from pathlib import Path

import pytest
import yaml

from dinov3_jax.configs import (
    NO_EFFECT_KEYS,
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    config_to_yaml,
    get_key,
    global_batch_size,
    list_recipes,
    load_config,
    mesh_shape,
    scaled_lr,
    student_vit_config,
    teacher_vit_config,
    total_steps,
    validate_for_devices,
)

# Official `ssl_default_config.yaml` defaults (RECIPE.md §7.1).
OFFICIAL_DEFAULTS = {
    "MODEL.META_ARCHITECTURE": "SSLMetaArch",
    "compute_precision.param_dtype": "bf16",
    "compute_precision.reduce_dtype": "fp32",
    "dino.loss_weight": 1.0,
    "dino.global_ignore_diagonal": True,
    "dino.head_n_prototypes": 65536,
    "dino.head_bottleneck_dim": 256,
    "dino.head_nlayers": 3,
    "dino.head_hidden_dim": 2048,
    "dino.koleo_loss_weight": 0.1,
    "dino.koleo_loss_distributed": False,
    "dino.koleo_topk": 1,
    "dino.koleo_distributed_loss_group_size": None,
    "dino.reweight_dino_local_loss": False,
    "dino.local_loss_weight_schedule.start": 0.5,
    "dino.local_loss_weight_schedule.end": 0.5,
    "ibot.loss_weight": 1.0,
    "ibot.mask_sample_probability": 0.5,
    "ibot.mask_ratio_min_max": (0.1, 0.5),
    "ibot.separate_head": True,
    "ibot.head_n_prototypes": 65536,
    "gram.use_loss": False,
    "gram.it_load_ema_teacher": -1,
    "gram.update_frequency": 50000,
    "gram.max_updates": None,
    "gram.tokens_used": "all",
    "gram.global_teacher_resize_method": "bicubic",
    "gram.loss_weight_schedule": None,
    "train.batch_size_per_gpu": 64,
    "train.dataset_path": "ImageNet:split=TRAIN",
    "train.OFFICIAL_EPOCH_LENGTH": 1250,
    "train.centering": "sinkhorn_knopp",
    "train.checkpointing": False,
    "train.compile": True,
    "student.arch": "vit_large",
    "student.patch_size": 16,
    "student.drop_path_rate": 0.3,
    "student.layerscale": 1e-5,
    "student.ffn_layer": "mlp",
    "student.ffn_ratio": 4.0,
    "student.norm_layer": "layernorm",
    "student.n_storage_tokens": 0,
    "student.mask_k_bias": False,
    "student.pos_embed_rope_base": 100.0,
    "student.pos_embed_rope_normalize_coords": "separate",
    "student.pos_embed_rope_dtype": "bf16",
    "student.fp8_filter": "blocks",
    "teacher.momentum_teacher": 0.992,
    "teacher.final_momentum_teacher": 1.0,
    "teacher.warmup_teacher_temp": 0.04,
    "teacher.teacher_temp": 0.07,
    "teacher.warmup_teacher_temp_epochs": 30,
    "distillation.enabled": False,
    "multidistillation.enabled": False,
    "hrft.enabled": False,
    "optim.epochs": 100,
    "optim.optimizer": "adamw",
    "optim.weight_decay": 0.04,
    "optim.weight_decay_end": 0.4,
    "optim.lr": 0.001,
    "optim.warmup_epochs": 10,
    "optim.min_lr": 1e-6,
    "optim.clip_grad": 3.0,
    "optim.freeze_last_layer_epochs": 1,
    "optim.scaling_rule": "sqrt_wrt_1024",
    "optim.patch_embed_lr_mult": 0.2,
    "optim.layerwise_decay": 0.9,
    "optim.adamw_beta1": 0.9,
    "optim.adamw_beta2": 0.999,
    "crops.global_crops_scale": (0.32, 1.0),
    "crops.local_crops_number": 8,
    "crops.local_crops_scale": (0.05, 0.32),
    "crops.global_crops_size": 224,
    "crops.local_crops_size": 96,
    "crops.gram_teacher_crops_size": None,
    "crops.horizontal_flips": True,
    "crops.rgb_mean": (0.485, 0.456, 0.406),
    "crops.rgb_std": (0.229, 0.224, 0.225),
    "evaluation.eval_period_iterations": 12500,
    "checkpointing.period": 3750,
    "checkpointing.max_to_keep": 3,
    "schedules": None,
}


def test_defaults_are_the_official_ones():
    cfg = Config()
    for key, expected in OFFICIAL_DEFAULTS.items():
        assert get_key(cfg, key) == expected, key
    assert total_steps(cfg) == 125_000


def test_every_field_has_a_comment_and_a_default():
    import inspect

    from dinov3_jax.configs import schema

    classes = [c for c in vars(schema).values() if dataclasses.is_dataclass(c) and c.__module__ == schema.__name__]
    assert len(classes) > 15
    for cls in classes:
        lines = inspect.getsource(cls).splitlines()
        for f in dataclasses.fields(cls):
            assert f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING, f.name
            idx = next(i for i, line in enumerate(lines) if line.strip().startswith(f"{f.name}:"))
            assert lines[idx - 1].strip().startswith("#"), f"{cls.__name__}.{f.name} has no comment"


def test_choices_match_the_model_config():
    import typing

    from dinov3_jax.configs import schema
    from dinov3_jax.models.config import DTYPES, FFN_LAYERS, NORM_EPS

    hints = typing.get_type_hints(schema.Student)
    assert set(typing.get_args(hints["ffn_layer"])) == set(FFN_LAYERS)
    assert set(typing.get_args(hints["norm_layer"])) == set(NORM_EPS)
    assert set(typing.get_args(schema.DtypeName)) == set(DTYPES)


@pytest.mark.parametrize("name", ["tiny_cpu", "vitl16_im1k", "vits16_im1k"])
def test_builtin_recipes_load(name):
    assert name in list_recipes()
    cfg = load_config(name)
    vit = student_vit_config(cfg)
    assert global_batch_size(cfg, 1) == cfg.train.batch_size_per_gpu
    for size in (cfg.crops.global_crops_size, cfg.crops.local_crops_size):
        assert size % vit.patch_size == 0
    assert load_config(f"{name}.yaml") == cfg


def test_default_is_tiny_cpu_and_top_level_symlink():
    cfg = load_config(None)
    assert cfg == load_config("tiny_cpu")
    assert cfg.data.source == "synthetic"
    assert student_vit_config(cfg).embed_dim == 64
    link = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"
    assert load_config(str(link)) == cfg


def test_vitl16_recipe():
    cfg = load_config("vitl16_im1k")
    batch = global_batch_size(cfg, 32)
    assert batch == 2048
    assert math.isclose(scaled_lr(cfg, batch), 0.001 * 4 * math.sqrt(2), rel_tol=1e-12)
    assert math.isclose(scaled_lr(cfg, batch), 0.0056569, rel_tol=1e-5)
    # The same global batch on 8 devices in 4 micro-batches: the same lr.
    accumulated = load_config("vitl16_im1k", ["train.grad_accumulation_steps=4"])
    assert global_batch_size(accumulated, 8) == 2048 and scaled_lr(accumulated, 2048) == scaled_lr(cfg, batch)
    with pytest.raises(ConfigError, match="grad_accumulation_steps"):
        load_config("vitl16_im1k", ["train.grad_accumulation_steps=0"])
    assert total_steps(cfg) == 125_000
    vit = student_vit_config(cfg)
    assert (vit.embed_dim, vit.depth, vit.num_heads, vit.ffn_hidden) == (1024, 24, 16, 4096)
    assert vit.norm_layer == "layernorm" and vit.norm_eps == 1e-6
    assert vit.layerscale_init == 1e-5 and vit.n_storage_tokens == 0 and not vit.mask_k_bias
    assert vit.drop_path_rate == 0.3 and vit.pos_embed_rope_dtype == "bf16"
    assert vit.dtype == "bf16" and vit.param_dtype == "float32"
    assert teacher_vit_config(cfg) == vit.replace(drop_path_rate=0.0)
    assert cfg.data.source == "folder" and cfg.data.path
    small = load_config("vits16_im1k")
    assert (student_vit_config(small).embed_dim, student_vit_config(small).depth) == (384, 12)
    # Only the documented changes differ from the ViT-L recipe.
    diff = {k for k in _flat(config_to_dict(cfg)) if _flat(config_to_dict(cfg))[k] != _flat(config_to_dict(small))[k]}
    assert diff == {"student.arch", "student.drop_path_rate", "train.output_dir"}


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_overrides_untouched_fields_and_types():
    cfg = load_config(
        "tiny_cpu",
        [
            "optim.lr=1e-3",  # PyYAML reads this as a string: still a number
            "ibot.mask_ratio_min_max=[0.2,0.4]",
            "crops.horizontal_flips=false",
            "gram.ckpt=null",
            "gram.max_updates=3",
            "data.path=/tmp/x",
            "student.pos_embed_rope_rescale_coords=2",  # int promoted to float
            "runtime.knn_k=20",  # a scalar for a list of numbers: a list of one
            "runtime.knn_every_steps=null",
            "schedules.lr.peak=0.5",
            "schedules.lr={start: 0, peak: 0.001, end: 1.0e-6, warmup_epochs: 1}",
            "schedules.weight_decay={start: 0.04, peak: 0.04, end: 0.04}",
            "schedules.momentum={start: 0.99, peak: 0.99, end: 1.0}",
            "schedules.teacher_temp={start: 0.04, peak: 0.07, end: 0.07, warmup_epochs: 2}",
        ],
    )
    base = load_config("tiny_cpu")
    assert cfg.optim.lr == 0.001 and isinstance(cfg.optim.lr, float)
    assert cfg.ibot.mask_ratio_min_max == (0.2, 0.4)
    assert cfg.crops.horizontal_flips is False
    assert cfg.gram.ckpt is None and cfg.gram.max_updates == 3
    assert cfg.data.path == "/tmp/x"
    assert cfg.student.pos_embed_rope_rescale_coords == 2.0
    assert cfg.runtime.knn_k == (20,) and cfg.runtime.knn_every_steps is None
    assert cfg.schedules.lr.peak == 0.001 and cfg.schedules.lr.warmup_epochs == 1
    assert cfg.schedules.teacher_temp.cosine_epochs is None
    # Untouched fields keep the recipe's values.
    assert cfg.ibot.mask_sample_probability == base.ibot.mask_sample_probability
    assert cfg.dino == base.dino and cfg.student == dataclasses.replace(base.student, pos_embed_rope_rescale_coords=2.0)
    assert scaled_lr(cfg, 64) == pytest.approx(0.001)
    # The same overrides applied to a loaded config.
    assert apply_overrides(base, ["optim.lr=1e-3"]).optim.lr == 0.001


@pytest.mark.parametrize(
    "override, match",
    [
        ("optim.lrr=0.1", r"optim\.lrr.*did you mean optim\.lr"),
        ("optim.teacher_temp=0.1", r"optim\.teacher_temp.*teacher\.teacher_temp"),
        ("studnet.arch=vit_small", r"studnet.*did you mean student"),
        ("crops.global_crops_sizes=64", r"crops\.global_crops_sizes.*crops\.global_crops_size"),
    ],
)
def test_unknown_key_in_override(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config("tiny_cpu", [override])


def test_unknown_key_in_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("ibot:\n  mask_ratio_minmax: [0.1, 0.5]\n")
    with pytest.raises(ConfigError, match=r"ibot\.mask_ratio_minmax.*did you mean ibot\.mask_ratio_min_max.*bad\.yaml"):
        load_config(str(path))


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.batch_size_per_gpu=1.5", "train.batch_size_per_gpu"),
        ("crops.horizontal_flips=3", "crops.horizontal_flips"),
        ("optim.lr=fast", "optim.lr"),
        ("ibot.mask_ratio_min_max=[0.1]", "ibot.mask_ratio_min_max"),
        ("optim.clip_grad=null", "optim.clip_grad"),
        ("optim.scaling_rule=sqrt_wrt_1042", "optim.scaling_rule"),
        ("data.source=imagenet", "data.source"),
        ("student.norm_layer=layernorm_bf16", "student.norm_layer"),
        ("compute_precision.param_dtype=bfloat", "compute_precision.param_dtype"),
        ("student=3", "student"),
        ("optim.lr", "optim.lr"),
    ],
)
def test_type_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("tiny_cpu", [override])


def test_choice_error_suggests():
    with pytest.raises(ConfigError, match=r"student\.norm_layer.*did you mean 'layernormbf16'"):
        load_config("tiny_cpu", ["student.norm_layer=layernorm_bf16"])


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["crops.global_crops_size=30"], "crops.global_crops_size"),
        (["student.patch_size=6"], "crops.global_crops_size"),
        (["ibot.mask_ratio_min_max=[0.5,0.1]"], "ibot.mask_ratio_min_max"),
        (["ibot.mask_ratio_min_max=[0.1,1.5]"], "ibot.mask_ratio_min_max"),
        (["ibot.mask_sample_probability=-0.1"], "ibot.mask_sample_probability"),
        (["crops.local_crops_number=-1"], "crops.local_crops_number"),
        (["train.batch_size_per_gpu=0"], "train.batch_size_per_gpu"),
        (["dino.head_n_prototypes=0"], "dino.head_n_prototypes"),
        (["crops.global_crops_scale=[0.8,0.3]"], "crops.global_crops_scale"),
        (["mesh.data=0"], "mesh.data"),
        (["mesh.fsdp=0"], "mesh.fsdp"),
        (["optim.warmup_epochs=50"], "optim.warmup_epochs"),
        (["teacher.teacher_temp=0"], "teacher.teacher_temp"),
        (["optim.lr=null"], "optim.lr"),
        (["schedules.lr.peak=0.001"], "schedules.weight_decay"),
        (["student.arch=vit_lage"], "student.arch.*vit_large"),
        (["student.drop_path_rate=1.0"], "student"),
        (["data.source=folder"], "data.path"),
        (["runtime.knn_k=[]"], "runtime.knn_k"),
        (["data.knn_val_samples=0"], "data.knn_val_samples"),
        (["crops.global_crops_size=[32,64]", "crops.local_crops_size=[16,16]"], "global_local_crop_pairs_ratios"),
        (["ibot.separate_head=false"], "ibot.separate_head"),
        (["crops.color_jitter=[0.4,0.4,0.2,0.6]"], "crops.color_jitter"),
        (["crops.grayscale_prob=1.5"], "crops.grayscale_prob"),
        (["crops.solarize_prob=-0.1"], "crops.solarize_prob"),
        (["crops.blur_sigma=[2.0,0.5]"], "crops.blur_sigma"),
        (["train.centering=softmax", "train.center_momentum=1.5"], "train.center_momentum"),
        (["train.centering=ema"], "train.centering"),
        (["distributed.coordinator_address=10.0.0.1:1234"], "distributed.enabled"),
        (["distributed.enabled=true", "distributed.num_processes=2", "distributed.process_id=2"], "process_id"),
        (["data.max_unreadable_fraction=1.5"], "data.max_unreadable_fraction"),
        (["runtime.resume_allow_changes=[optim.lrr]"], "resume_allow_changes.*'optim.lrr' is neither"),
    ],
)
def test_impossible_values_are_named(overrides, key):
    with pytest.raises(ConfigError, match=key):
        load_config("tiny_cpu", overrides)


def test_schedule_nonsense(tmp_path):
    entry = {"start": 0.0, "peak": 0.001, "end": 0.0, "warmup_epochs": 5, "cosine_epochs": 10}
    other = {"start": 0.04, "peak": 0.04, "end": 0.04}
    data = {
        "optim": {"epochs": 10},
        "schedules": {"lr": entry, "weight_decay": other, "momentum": {**other, "start": 1.5}, "teacher_temp": other},
    }
    with pytest.raises(ConfigError) as e:
        config_from_dict(data)
    assert "schedules.lr: warmup_epochs + cosine_epochs = 15" in str(e.value)
    assert "schedules.momentum" in str(e.value)


def test_validate_for_devices():
    cfg = load_config("tiny_cpu", ["mesh.fsdp=2"])
    assert mesh_shape(cfg, 8) == (4, 2)
    validate_for_devices(cfg, 8)
    with pytest.raises(ConfigError, match=r"mesh\.fsdp"):
        validate_for_devices(cfg, 3)
    cfg = load_config("tiny_cpu", ["mesh.data=3"])
    with pytest.raises(ConfigError, match=r"mesh\.data"):
        validate_for_devices(cfg, 8)
    cfg = load_config("tiny_cpu", ["dino.koleo_loss_distributed=true", "dino.koleo_distributed_loss_group_size=128"])
    with pytest.raises(ConfigError, match="koleo_distributed_loss_group_size"):
        validate_for_devices(cfg, 3)
    validate_for_devices(cfg, 4)


def test_official_style_file_loads_with_warnings(tmp_path, caplog):
    # An official-style 7B file: null v1 keys, v2 schedules, multi-resolution lists, legacy keys.
    text = """
MODEL: {META_ARCHITECTURE: SSLMetaArch, DEVICE: cuda, WEIGHTS: '', DTYPE: float32}
train: {batch_size_per_gpu: 8, OFFICIAL_EPOCH_LENGTH: 1000, compile: true, cache_dataset: true,
        cell_augmentation: false, dataset_path: null}
student: {arch: vit_7b, ffn_layer: swiglu64, ffn_ratio: 3, qkv_bias: false, mask_k_bias: true,
          norm_layer: layernormbf16, n_storage_tokens: 4, untie_global_and_local_cls_norm: true,
          pos_embed_rope_base: 100, pos_embed_rope_rescale_coords: 2, pos_embed_rope_dtype: fp32,
          patch_drop: 0.0, fp8_enabled: true}
teacher: {momentum_teacher: null, final_momentum_teacher: null, warmup_teacher_temp: null,
          teacher_temp: null, warmup_teacher_temp_epochs: null}
optim: {epochs: 30, lr: null, weight_decay: null, weight_decay_end: null, warmup_epochs: null,
        min_lr: null, freeze_last_layer_epochs: null, clip_grad: 30.0, adamw_beta2: 0.99}
crops: {global_crops_size: [512, 768], local_crops_size: [112, 168], global_local_crop_pairs_ratios: [0.5, 0.5],
        gram_teacher_crops_size: [768, 1152]}
coding_rate_loss: {use_cls_loss: false}
schedules:
  lr: {start: 0, peak: 0, end: 1.25e-05, warmup_epochs: 0, freeze_last_layer_epochs: 0, cosine_epochs: 10}
  weight_decay: {start: 0.04, peak: 0.04, end: 0.04, warmup_epochs: 0}
  teacher_temp: {start: 0.07, peak: 0.07, end: 0.07, warmup_epochs: 0}
  momentum: {start: 0.999, peak: 0.999, end: 0.999, warmup_epochs: 0}
"""
    path = tmp_path / "official.yaml"
    path.write_text(text)
    with caplog.at_level(logging.WARNING, logger="dinov3_jax.configs"):
        cfg = load_config(str(path))
    vit = student_vit_config(cfg)
    assert (vit.embed_dim, vit.depth, vit.num_heads, vit.ffn_hidden) == (4096, 40, 32, 8192)
    assert vit.norm_eps == 1e-5 and vit.n_storage_tokens == 4 and not vit.mask_k_bias
    assert vit.pos_embed_rope_dtype == "bf16"  # compat.training_rope_dtype_bf16 (official trainer)
    assert cfg.crops.global_crops_size == (512, 768)
    assert scaled_lr(cfg, 2048) == pytest.approx(1.25e-5 * 4 * math.sqrt(2))
    messages = [r.getMessage() for r in caplog.records]
    assert all("\n" not in m for m in messages)
    text = "\n".join(messages)
    for key in ("train.compile", "train.cache_dataset", "student.fp8_enabled", "student.pos_embed_rope_dtype"):
        assert (key in text) == (key != "train.compile"), key  # compile: true is the default → silent
    assert "student.patch_drop" in text and "coding_rate_loss" in text
    assert "local_crops_size [168]" in text
    assert "train.dataset_path" not in text  # null: not set
    # The fix switch honours the file's RoPE dtype.
    fixed = load_config(str(path), ["compat.training_rope_dtype_bf16=false"])
    assert student_vit_config(fixed).pos_embed_rope_dtype == "fp32"


def test_no_effect_keys_warn(caplog):
    assert "train.compile" in NO_EFFECT_KEYS
    with caplog.at_level(logging.WARNING, logger="dinov3_jax.configs"):
        load_config("tiny_cpu", ["train.compile=false", "hrft.enabled=true", "optim.lr=0.003"])
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "train.compile=False has no effect" in text
    assert "hrft.enabled=True has no effect" in text
    assert "optim.lr" not in text
    with caplog.at_level(logging.WARNING, logger="dinov3_jax.configs"):
        caplog.clear()
        load_config("tiny_cpu")
    assert not caplog.records


def test_yaml_round_trip(tmp_path):
    cfg = load_config(
        "vitl16_im1k",
        [
            "gram.loss_weight_schedule={start: 0, peak: 0, end: 2.0, warmup_epochs: 10, cosine_epochs: 1}",
            "crops.global_crops_size=[224,256]",
            "crops.local_crops_size=[96,112]",
            "crops.global_local_crop_pairs_ratios=[0.5,0.5]",
            "multidistillation.students=[{name: s, config_path: a.yaml, ranks_range: [0, 8]}]",
        ],
    )
    text = config_to_yaml(cfg)
    assert yaml.safe_load(text) == config_to_dict(cfg)
    path = tmp_path / "resolved.yaml"
    path.write_text(text)
    assert load_config(str(path)) == cfg
    assert cfg.multidistillation.students[0].ranks_range == (0, 8)
    assert config_from_dict(config_to_dict(Config()), source="defaults") == Config()


def test_missing_recipe_suggests():
    with pytest.raises(ConfigError, match="tiny_cpu"):
        load_config("tiny_cp")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/dir/x.yaml")


def test_every_key_is_read_refused_or_declared_without_effect():
    """No silent keys: every leaf key of the schema is read by the code (an attribute access
    `.name` or a `"name"` lookup outside the schema's own tables and the validator), or accepts
    only its official value (FIXED_KEYS), or warns that it has no effect (NO_EFFECT_KEYS)."""
    import pathlib
    import re

    import dinov3_jax
    from dinov3_jax.configs.load import _all_keys
    from dinov3_jax.configs.schema import FIXED_KEYS, NO_EFFECT_KEYS

    root = pathlib.Path(dinov3_jax.__file__).parent
    texts = []
    for path in root.rglob("*.py"):
        text = path.read_text()
        if path.name == "load.py" and path.parent.name == "configs":
            continue  # validation and warnings are not an effect
        if path.name == "schema.py" and path.parent.name == "configs":
            text = text[text.index("# Derived values.") :]  # the functions that read the config
        texts.append(text)
    code = "\n".join(texts)
    silent = []
    for key in _all_keys():
        if key in NO_EFFECT_KEYS or key in FIXED_KEYS:
            continue
        name = re.escape(key.rsplit(".", 1)[-1])
        if not re.search(rf"\.{name}\b|[\"']{name}[\"']", code):
            silent.append(key)
    assert not silent, f"keys read nowhere (implement, refuse, or add to NO_EFFECT_KEYS): {silent}"


def test_fixed_keys_are_refused():
    with pytest.raises(ConfigError, match=r"dino\.koleo_topk: must be 1"):
        load_config("tiny_cpu", ["dino.koleo_topk=2"])
    with pytest.raises(ConfigError, match=r"ibot\.separate_head: must be True"):
        load_config("tiny_cpu", ["ibot.separate_head=false"])
    with pytest.raises(ConfigError, match=r"gram\.tokens_used"):
        load_config("tiny_cpu", ["gram.tokens_used=masked", "gram.img_level=true"])
    with pytest.raises(ConfigError, match="both say where the run starts"):
        load_config("tiny_cpu", ["student.pretrained_weights=a.pth", "train.continue_from=runs/x"])


def test_official_7b_recipes_load():
    pre, gram, hr = (load_config(n) for n in ("vit7b16_pretrain", "vit7b16_gram_anchor", "vit7b16_high_res_adapt"))
    assert not pre.gram.use_loss and gram.gram.use_loss and hr.gram.use_loss
    assert gram.crops.gram_teacher_crops_size == 512 and gram.gram.img_level and gram.gram.max_updates == 3
    assert hr.crops.global_crops_size == (512, 768, 768, 768, 768)
    assert hr.crops.gram_teacher_crops_size == (768, 1152, 1152, 1152, 1152)
    assert hr.dino.koleo_loss_distributed and hr.dino.koleo_distributed_loss_group_size == 16
    assert not hr.gram.rep_update and hr.schedules.lr.end == 1.25e-5


@pytest.mark.parametrize("override", ["optim.lr=.nan", "teacher.teacher_temp=.inf", "optim.clip_grad=.nan",
                                      "dino.koleo_loss_weight=-.inf", "crops.global_crops_scale=[0.32, .nan]"])  # fmt: skip
def test_non_finite_floats_are_refused(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"{re.escape(key)}.*(nan|inf)"):
        load_config("tiny_cpu", [override])


def test_empty_output_dir_is_refused():
    """`train.output_dir: ''` would write checkpoints and logs into the current folder."""
    with pytest.raises(ConfigError, match=r"train\.output_dir: is empty"):
        config_from_dict({"train": {"output_dir": " "}})


def test_duplicate_yaml_keys_are_an_error_naming_both_lines(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("optim:\n  lr: 0.001\n  epochs: 3\n  lr: 0.5\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml: duplicate key 'lr' \(lines 2 and 4\)"):
        load_config(str(path))


def test_resume_differences_skip_harmless_and_allowed_keys():
    from dinov3_jax.configs import config_to_dict, resume_differences

    before = config_to_dict(load_config("tiny_cpu")) | {"run": {"global_batch": 64}}
    after = config_to_dict(load_config("tiny_cpu", ["train.seed=7", "optim.lr=0.1", "runtime.log_every_steps=3"]))
    after |= {"run": {"global_batch": 128}}
    changed = resume_differences(before, after)
    assert [line.split(":")[0] for line in changed] == ["optim.lr", "run.global_batch", "train.seed"]
    assert resume_differences(before, after, ("optim", "run", "train.seed")) == []


def test_shipped_multi_distillation_recipes_resolve_every_student():
    """The official multi-distillation configs as shipped: every student's file merges under the
    run's keys (the run's crops and heads, the student's own arch and, for the ConvNeXts, their own
    schedules)."""
    from dinov3_jax.configs import student_configs

    vits = student_configs(load_config("vit7b16_distill_multi"))
    assert {n: (c.student.arch, c.student.ffn_layer) for n, c in vits.items()} == {
        "vits16": ("vit_small", "mlp"),
        "vits16plus": ("vit_small", "swiglu"),
        "vitb16": ("vit_base", "mlp"),
        "vitl16": ("vit_large", "mlp"),
    }
    assert {
        (c.crops.global_crops_size, c.dino.head_n_prototypes, c.student.n_storage_tokens) for c in vits.values()
    } == {(256, 262144, 4)}
    convnexts = student_configs(load_config("convnext_distill_multi_test"))
    assert {n: c.schedules.lr.peak for n, c in convnexts.items()} == {
        "convnext_tiny": 2e-4,
        "convnext_small": 2e-4,
        "convnext_base": 1e-4,
        "convnext_large": 1e-4,
    }
    assert all(c.student.arch == n and c.crops.teacher_to_student_resolution_scale == 2 for n, c in convnexts.items())


def test_activation_checkpointing_keys_choose_the_student_policy(caplog):
    """train.checkpointing selects the selective policy, with train.checkpointing_full the full one
    (RECIPE.md §9.2); the teacher, which is never differentiated, is not checkpointed; the full
    switch alone has no effect, as upstream, and says so."""
    from dinov3_jax.configs import student_backbone_config

    def policies(*overrides):
        cfg = load_config("tiny_cpu", list(overrides))
        return student_backbone_config(cfg).remat, teacher_vit_config(cfg).remat

    assert policies() == ("off", "off")
    assert policies("train.checkpointing=true") == ("selective", "off")
    assert policies("train.checkpointing=true", "train.checkpointing_full=true") == ("full", "off")
    with caplog.at_level(logging.WARNING, logger="dinov3_jax.configs"):
        assert policies("train.checkpointing_full=true") == ("off", "off")
    assert "train.checkpointing_full=true has no effect without train.checkpointing=true" in caplog.text


def test_center_momentum_warns_without_softmax_centring(caplog):
    """train.center_momentum acts only with train.centering=softmax; with Sinkhorn-Knopp it warns."""
    with caplog.at_level(logging.WARNING, logger="dinov3_jax.configs"):
        load_config("tiny_cpu", ["train.center_momentum=0.5", "train.centering=softmax"])
        assert "center_momentum" not in caplog.text
        load_config("tiny_cpu", ["train.center_momentum=0.5"])
    assert "train.center_momentum has no effect without train.centering=softmax" in caplog.text
