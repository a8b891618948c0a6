"""Configurations of the DINOv3 backbones: the vision transformer (paper §3; RECIPE.md §1.1) and
the distilled ConvNeXt (paper §5.2; RECIPE.md §2.3).

Field names follow the official constructors (`DinoVisionTransformer`, `ConvNeXt`) so that recipes
and checkpoints map one to one. The ViT additions are `ffn_hidden_dim` (an explicit FFN width, used
when a Hugging Face config gives `intermediate_size` directly), `rope_periods` (periods read from a
checkpoint), and the compute policy (`attention_impl`, `dtype`, `param_dtype`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import jax.numpy as jnp

NORM_EPS = {"layernorm": 1e-6, "layernormbf16": 1e-5, "rmsnorm": 1e-5}
SWIGLU_ALIGN = {"swiglu": 8, "swiglu32": 32, "swiglu64": 64, "swiglu128": 128}
FFN_LAYERS = ("mlp", *SWIGLU_ALIGN)
NORMALIZE_COORDS = ("separate", "min", "max")
ATTENTION_IMPLS = ("xla", "cudnn")
# Activation checkpointing of each block in training (`train.checkpointing[_full]`, RECIPE.md §9.2):
# "off", "selective" (keep the matmul and attention outputs, recompute the rest) or "full".
REMAT_POLICIES = ("off", "selective", "full")
DTYPES = {
    "float32": jnp.float32,
    "fp32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "bf16": jnp.bfloat16,
    "float16": jnp.float16,
    "fp16": jnp.float16,
}


def resolve_dtype(name: str) -> Any:
    """Maps a dtype name ("fp32", "bf16", ...) to a jnp dtype; "bf16" never means float16."""
    try:
        return DTYPES[str(name)]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}") from None


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Every option of the DINOv3 ViT (RECIPE.md §1.1). Frozen and hashable: it is static data."""

    # Side of the square patches; images need not be a multiple (the conv floors, like PyTorch).
    patch_size: int = 16
    # Input channels (3 for RGB).
    in_chans: int = 3
    # Token width D.
    embed_dim: int = 768
    # Number of transformer blocks.
    depth: int = 12
    # Attention heads; D must be divisible by 4 * num_heads (RoPE uses Dh / 4 frequencies).
    num_heads: int = 12
    # FFN width = int(D * ffn_ratio), then the SwiGLU rounding (§1.6).
    ffn_ratio: float = 4.0
    # Explicit FFN width, overriding ffn_ratio and the SwiGLU rounding (HF `intermediate_size`).
    ffn_hidden_dim: int | None = None
    # "mlp" (fc1-GELU-fc2) or "swiglu", "swiglu32", "swiglu64", "swiglu128" (alignment suffix).
    ffn_layer: str = "mlp"
    # Bias in the FFN linears.
    ffn_bias: bool = True
    # Bias in the attention output projection.
    proj_bias: bool = True
    # Bias in the fused qkv projection.
    qkv_bias: bool = True
    # Force the k third of the qkv bias to zero (official LinearKMaskedBias).
    mask_k_bias: bool = False
    # LayerScale initial value; None means no LayerScale parameters at all.
    layerscale_init: float | None = None
    # "layernorm" (eps 1e-6), "layernormbf16" (LayerNorm eps 1e-5, all released models), "rmsnorm".
    norm_layer: str = "layernorm"
    # Register ("storage") tokens between CLS and the patches.
    n_storage_tokens: int = 0
    # Separate final norm (`cls_norm`) for CLS and register tokens.
    untie_cls_and_patch_norms: bool = False
    # Separate final norm (`local_cls_norm`) for CLS and registers of local crops, training only.
    untie_global_and_local_cls_norm: bool = False
    # RoPE base; exclusive with the min/max periods.
    pos_embed_rope_base: float | None = 100.0
    # RoPE periods as min/max instead of a base.
    pos_embed_rope_min_period: float | None = None
    pos_embed_rope_max_period: float | None = None
    # Patch-centre normalisation: "separate" (per axis), "min" or "max" (by the shorter/longer side).
    pos_embed_rope_normalize_coords: str = "separate"
    # Train-time RoPE augmentation (off at inference): shift, per-axis jitter, shared rescale.
    pos_embed_rope_shift_coords: float | None = None
    pos_embed_rope_jitter_coords: float | None = None
    pos_embed_rope_rescale_coords: float | None = None
    # Dtype of the whole RoPE computation and of the q/k rotation: "fp32" (hub models) or "bf16"
    # (every model built by the official training code).
    pos_embed_rope_dtype: str = "fp32"
    # Periods taken from a checkpoint (released files hold bf16-rounded values); None computes them.
    rope_periods: tuple[float, ...] | None = None
    # Stochastic depth rate, the same in every block (batch-subset rule of §1.5).
    drop_path_rate: float = 0.0
    # "xla" (portable, fast on CPU) or "cudnn" (GPU, bf16/fp16, falls back to "xla" when refused).
    attention_impl: str = "xla"
    # Compute dtype of activations and matmuls; norms, softmax and RoPE statistics stay fp32.
    dtype: str = "float32"
    # Storage dtype of the parameters.
    param_dtype: str = "float32"
    # Activation checkpointing of each block under differentiation (one of REMAT_POLICIES).
    remat: str = "off"

    def __post_init__(self):
        problems = []
        if self.remat not in REMAT_POLICIES:
            problems.append(f"remat {self.remat!r} is not one of {REMAT_POLICIES}")
        if self.embed_dim % self.num_heads:
            problems.append(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        elif (self.embed_dim // self.num_heads) % 4:
            problems.append(f"head dim {self.embed_dim // self.num_heads} is not divisible by 4 (2-D RoPE)")
        if self.ffn_layer not in FFN_LAYERS:
            problems.append(f"ffn_layer {self.ffn_layer!r} is not one of {FFN_LAYERS}")
        if self.norm_layer not in NORM_EPS:
            problems.append(f"norm_layer {self.norm_layer!r} is not one of {tuple(NORM_EPS)}")
        if self.pos_embed_rope_normalize_coords not in NORMALIZE_COORDS:
            problems.append(f"pos_embed_rope_normalize_coords must be one of {NORMALIZE_COORDS}")
        has_base = self.pos_embed_rope_base is not None
        has_min_max = (self.pos_embed_rope_min_period, self.pos_embed_rope_max_period) != (None, None)
        if has_base == has_min_max:
            problems.append("set exactly one of pos_embed_rope_base or the min/max periods")
        if has_min_max and None in (self.pos_embed_rope_min_period, self.pos_embed_rope_max_period):
            problems.append("pos_embed_rope_min_period and pos_embed_rope_max_period go together")
        if self.rope_periods is not None and len(self.rope_periods) != self.head_dim // 4:
            problems.append(f"rope_periods has {len(self.rope_periods)} values, expected {self.head_dim // 4}")
        if self.attention_impl not in ATTENTION_IMPLS:
            problems.append(f"attention_impl {self.attention_impl!r} is not one of {ATTENTION_IMPLS}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            problems.append(f"drop_path_rate {self.drop_path_rate} is not in [0, 1)")
        if self.mask_k_bias and not self.qkv_bias:
            problems.append("mask_k_bias needs qkv_bias")
        for name in ("pos_embed_rope_dtype", "dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                problems.append(f"{name} {getattr(self, name)!r} is not one of {sorted(DTYPES)}")
        if problems:
            raise ValueError("invalid ViTConfig: " + "; ".join(problems))
        if self.rope_periods is not None:
            object.__setattr__(self, "rope_periods", tuple(float(p) for p in self.rope_periods))

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def norm_eps(self) -> float:
        return NORM_EPS[self.norm_layer]

    @property
    def ffn_hidden(self) -> int:
        """FFN width: int(D·ratio), rounded *up* to the SwiGLU alignment of d = int(2/3·width)."""
        if self.ffn_hidden_dim is not None:
            return self.ffn_hidden_dim
        hidden = int(self.embed_dim * self.ffn_ratio)
        if self.ffn_layer == "mlp":
            return hidden
        d = int(hidden * 2 / 3)
        return d + (-d) % SWIGLU_ALIGN[self.ffn_layer]

    def replace(self, **changes: Any) -> ViTConfig:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ViTConfig:
        return _from_dict(cls, values)

    @classmethod
    def from_json(cls, text: str) -> ViTConfig:
        return cls.from_dict(json.loads(text))


def _from_dict(cls, values: dict[str, Any]):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known - {"family"})
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {unknown}")
    return cls(**{k: v for k, v in values.items() if k != "family"})


@dataclasses.dataclass(frozen=True)
class ConvNeXtConfig:
    """The DINOv3 ConvNeXt (RECIPE.md §2.3): a stem, four stages of blocks and downsampling layers."""

    # Blocks per stage.
    depths: tuple[int, ...] = (3, 3, 9, 3)
    # Channels per stage.
    dims: tuple[int, ...] = (96, 192, 384, 768)
    # Input channels (3 for RGB).
    in_chans: int = 3
    # Stochastic depth: rates rise linearly from 0 to this over all blocks (per-sample drop path).
    drop_path_rate: float = 0.0
    # LayerScale (`gamma`) initial value; None means no LayerScale parameters.
    layer_scale_init: float | None = 1e-6
    # With a patch size, `get_intermediate_layers` resizes every stage's map to (H // p, W // p)
    # (bilinear, antialiased), as the official training builder does with 16; the hub models leave it None.
    patch_size: int | None = None
    # Compute and storage dtypes.
    dtype: str = "float32"
    param_dtype: str = "float32"
    # Activation checkpointing of each block under differentiation (one of REMAT_POLICIES).
    remat: str = "off"

    # Every norm (stem, downsampling, blocks, final) uses eps 1e-6 (RECIPE.md §10 item 6).
    norm_eps = 1e-6
    # Stem stride 4, then three 2x downsamplings: the last stage has stride 32.
    output_stride = 32

    def __post_init__(self):
        object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))
        object.__setattr__(self, "dims", tuple(int(d) for d in self.dims))
        problems = []
        if len(self.depths) != 4 or len(self.dims) != 4:
            problems.append(f"depths {self.depths} and dims {self.dims} must have four stages each")
        if min(self.depths + self.dims, default=0) < 1:
            problems.append("depths and dims must be positive")
        if not 0.0 <= self.drop_path_rate < 1.0:
            problems.append(f"drop_path_rate {self.drop_path_rate} is not in [0, 1)")
        if self.remat not in REMAT_POLICIES:
            problems.append(f"remat {self.remat!r} is not one of {REMAT_POLICIES}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                problems.append(f"{name} {getattr(self, name)!r} is not one of {sorted(DTYPES)}")
        if problems:
            raise ValueError("invalid ConvNeXtConfig: " + "; ".join(problems))

    @property
    def embed_dim(self) -> int:
        """Width of the output features (the last stage's channels)."""
        return self.dims[-1]

    @property
    def depth(self) -> int:
        """Number of selectable intermediate outputs (`get_intermediate_layers` indexes the stages)."""
        return len(self.depths)

    def replace(self, **changes: Any) -> ConvNeXtConfig:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps({"family": "convnext", **dataclasses.asdict(self)}, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ConvNeXtConfig:
        return _from_dict(cls, values)


BackboneConfig = ViTConfig | ConvNeXtConfig


def config_from_json(text: str) -> BackboneConfig:
    """A config written by `to_json` (ours; ViT files from before ConvNeXt carry no family)."""
    values = json.loads(text)
    return (ConvNeXtConfig if values.get("family") == "convnext" else ViTConfig).from_dict(values)


# Fields that decide the parameter tree (names and shapes). Two configs that agree on these can
# load each other's weights; the others (dtype, attention kernel, drop path, ...) are run options.
STRUCTURAL_FIELDS = (
    "patch_size",
    "in_chans",
    "embed_dim",
    "depth",
    "num_heads",
    "ffn_layer",
    "ffn_bias",
    "proj_bias",
    "qkv_bias",
    "n_storage_tokens",
    "untie_cls_and_patch_norms",
    "untie_global_and_local_cls_norm",
)


def structural_differences(expected: BackboneConfig, found: BackboneConfig) -> list[str]:
    """Lists the structural fields on which a checkpoint's config disagrees with the requested one."""
    if type(expected) is not type(found):
        return [
            f"architecture: model is a {type(expected).__name__[:-6]}, checkpoint holds a {type(found).__name__[:-6]}"
        ]
    if isinstance(expected, ConvNeXtConfig):
        diffs = [
            f"{name}: model has {getattr(expected, name)!r}, checkpoint has {getattr(found, name)!r}"
            for name in ("depths", "dims", "in_chans")
            if getattr(expected, name) != getattr(found, name)
        ]
        if (expected.layer_scale_init is None) != (found.layer_scale_init is None):
            diffs.append("layer scale: present in one and absent in the other")
        return diffs
    diffs = [
        f"{name}: model has {getattr(expected, name)!r}, checkpoint has {getattr(found, name)!r}"
        for name in STRUCTURAL_FIELDS
        if getattr(expected, name) != getattr(found, name)
    ]
    if expected.ffn_hidden != found.ffn_hidden:
        diffs.append(f"FFN width: model has {expected.ffn_hidden}, checkpoint has {found.ffn_hidden}")
    if (expected.layerscale_init is None) != (found.layerscale_init is None):
        diffs.append("layer scale: present in one and absent in the other")
    if (expected.norm_layer == "rmsnorm") != (found.norm_layer == "rmsnorm"):
        diffs.append(f"norm_layer: model has {expected.norm_layer!r}, checkpoint has {found.norm_layer!r}")
    return diffs


def default_rope_periods(cfg: ViTConfig) -> tuple[float, ...]:
    """The fp32 periods of the config, as Python floats (for comparing with a checkpoint's)."""
    import numpy as np

    n = cfg.head_dim // 4
    if cfg.pos_embed_rope_base is not None:
        exponent = 2 * np.arange(n, dtype=np.float32) / np.float32(cfg.head_dim // 2)
        periods = np.float32(cfg.pos_embed_rope_base) ** exponent
    else:
        lo, hi = cfg.pos_embed_rope_min_period, cfg.pos_embed_rope_max_period
        periods = np.float32(lo) * np.float32(hi / lo) ** np.linspace(0, 1, n, dtype=np.float32)
    return tuple(float(p) for p in periods.astype(np.float32))


def is_close_periods(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-6) for x, y in zip(a, b))
