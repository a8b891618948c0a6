"""Named DINOv3 backbones with the exact hyper-parameters of the released models (RECIPE.md §1.11, §2.3).

Each entry also names its input normalisation (LVD-1689M: ImageNet statistics; SAT-493M: the
satellite statistics) and the hash that the official file names carry, so a file such as
`dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth` can be recognised.
"""

from __future__ import annotations

import dataclasses
import difflib

from flax import nnx

from dinov3_jax.models.config import BackboneConfig, ConvNeXtConfig, ViTConfig, structural_differences

NORMALIZATION = {
    "lvd": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "sat": ((0.430, 0.411, 0.296), (0.213, 0.156, 0.143)),
}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    config: BackboneConfig
    # Key of NORMALIZATION the weights were trained with.
    normalization: str = "lvd"
    # Hash in the official weight file name, when released.
    file_hash: str | None = None
    # Parameter count stated for the released model (RECIPE.md §1.11), for tests.
    n_params: int | None = None


# Shared by every released ViT (RECIPE.md §1.11).
RELEASED = ViTConfig(
    patch_size=16,
    pos_embed_rope_base=100.0,
    pos_embed_rope_normalize_coords="separate",
    pos_embed_rope_rescale_coords=2.0,
    pos_embed_rope_dtype="fp32",
    qkv_bias=True,
    mask_k_bias=True,
    ffn_bias=True,
    proj_bias=True,
    layerscale_init=1e-5,
    norm_layer="layernormbf16",
    n_storage_tokens=4,
)


def _released(**kw) -> ViTConfig:
    return RELEASED.replace(**kw)


_VIT_7B = _released(
    embed_dim=4096,
    depth=40,
    num_heads=32,
    ffn_ratio=3.0,
    ffn_layer="swiglu64",
    qkv_bias=False,
    mask_k_bias=False,
    untie_global_and_local_cls_norm=True,
)

MODELS: dict[str, ModelSpec] = {
    "dinov3_vits16": ModelSpec(
        _released(embed_dim=384, depth=12, num_heads=6, ffn_ratio=4.0), "lvd", "08c60483", 21_601_152
    ),
    "dinov3_vits16plus": ModelSpec(
        _released(embed_dim=384, depth=12, num_heads=6, ffn_ratio=6.0, ffn_layer="swiglu"),
        "lvd",
        "4057cbaa",
        28_697_472,
    ),
    "dinov3_vitb16": ModelSpec(
        _released(embed_dim=768, depth=12, num_heads=12, ffn_ratio=4.0), "lvd", "73cec8be", 85_669_632
    ),
    "dinov3_vitl16": ModelSpec(
        _released(embed_dim=1024, depth=24, num_heads=16, ffn_ratio=4.0), "lvd", "8aa4cbdd", 303_154_176
    ),
    "dinov3_vitl16_sat": ModelSpec(
        _released(embed_dim=1024, depth=24, num_heads=16, ffn_ratio=4.0, untie_global_and_local_cls_norm=True),
        "sat",
        "eadcf0ff",
        303_156_224,
    ),
    "dinov3_vitl16plus": ModelSpec(
        _released(embed_dim=1024, depth=24, num_heads=16, ffn_ratio=6.0, ffn_layer="swiglu"),
        "lvd",
        "46503df0",
        403_915_776,
    ),
    "dinov3_vith16plus": ModelSpec(
        _released(embed_dim=1280, depth=32, num_heads=20, ffn_ratio=6.0, ffn_layer="swiglu"),
        "lvd",
        "7c1da9a5",
        840_633_600,
    ),
    "dinov3_vit7b16": ModelSpec(_VIT_7B, "lvd", "a955f4ea", 6_716_043_264),
    "dinov3_vit7b16_sat": ModelSpec(_VIT_7B, "sat", "a6675841", 6_716_043_264),
    # The ConvNeXt distilled from the ViT-7B (RECIPE.md §2.3); counts are backbone + final norm.
    "dinov3_convnext_tiny": ModelSpec(ConvNeXtConfig((3, 3, 9, 3), (96, 192, 384, 768)), "lvd", "21b726bb", 27_820_128),
    "dinov3_convnext_small": ModelSpec(
        ConvNeXtConfig((3, 3, 27, 3), (96, 192, 384, 768)), "lvd", "296db49d", 49_454_688
    ),
    "dinov3_convnext_base": ModelSpec(
        ConvNeXtConfig((3, 3, 27, 3), (128, 256, 512, 1024)), "lvd", "801f2ba9", 87_566_464
    ),
    "dinov3_convnext_large": ModelSpec(
        ConvNeXtConfig((3, 3, 27, 3), (192, 384, 768, 1536)), "lvd", "61fa432d", 196_230_336
    ),
    # Tiny variants with every option of the released models switched on, for tests and CPU runs.
    "dinov3_vit_tiny": ModelSpec(_released(embed_dim=64, depth=3, num_heads=4, ffn_ratio=4.0)),
    "dinov3_vit_tiny_swiglu": ModelSpec(
        _released(embed_dim=64, depth=3, num_heads=4, ffn_ratio=4.0, ffn_layer="swiglu")
    ),
    "dinov3_convnext_test": ModelSpec(ConvNeXtConfig((1, 2, 1, 1), (8, 16, 32, 64))),
}


def list_models() -> list[str]:
    return list(MODELS)


def get_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        close = difflib.get_close_matches(name, MODELS, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"unknown model {name!r}{hint}; known models: {', '.join(MODELS)}") from None


def registry_matches(cfg: BackboneConfig) -> list[str]:
    """The registry names whose architecture is `cfg`'s (the parameter tree; run options aside)."""
    return [
        n
        for n, spec in MODELS.items()
        if type(spec.config) is type(cfg) and not structural_differences(spec.config, cfg)
    ]


def model_from_filename(filename: str) -> str | None:
    """The registry name whose official hash appears in a weight file name, if any."""
    for name, spec in MODELS.items():
        if spec.file_hash and spec.file_hash in filename:
            return name
    return None


def stride_of(cfg: BackboneConfig) -> int:
    """Pixels per output feature: the ViT patch size, or a ConvNeXt's output stride (32)."""
    return cfg.output_stride if isinstance(cfg, ConvNeXtConfig) else cfg.patch_size


def backbone_class(cfg: BackboneConfig) -> type[nnx.Module]:
    """The module class of a config: `ConvNeXt` or `DinoVisionTransformer`."""
    if isinstance(cfg, ConvNeXtConfig):
        from dinov3_jax.models.convnext import ConvNeXt

        return ConvNeXt
    from dinov3_jax.models.vit import DinoVisionTransformer

    return DinoVisionTransformer


def create_backbone(name_or_config: str | BackboneConfig, *, seed: int = 0, **overrides) -> nnx.Module:
    """A randomly initialised backbone (official init, RECIPE.md §1.10, §2.3) from a name or a config."""
    cfg = get_spec(name_or_config).config if isinstance(name_or_config, str) else name_or_config
    if overrides:
        cfg = cfg.replace(**overrides)
    return backbone_class(cfg)(cfg, rngs=nnx.Rngs(seed))
