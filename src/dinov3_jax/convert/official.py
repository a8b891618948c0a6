"""Official DINOv3 state-dict layout ↔ ours (RECIPE.md §2.1; PARITY.md §8.1).

Conversion is rename + transpose: Linear `weight` [out, in] ↔ `kernel` [in, out], conv OIHW ↔ HWIO
with axes (2, 3, 1, 0), norm `weight` ↔ `scale`. Two buffers are not parameters here:
`rope_embed.periods` (moved into the config, since released files hold bf16-rounded values) and
`attn.qkv.bias_mask` (folded into the bias as `bias · mask`; the model re-applies the mask).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

import numpy as np

from dinov3_jax.convert.ours import WeightsError
from dinov3_jax.models.config import ViTConfig, default_rope_periods, is_close_periods

log = logging.getLogger(__name__)

# Prefixes that wrap a backbone in training checkpoints (`teacher_checkpoint.pth`, DDP/FSDP).
WRAPPER_PREFIXES = ("module.", "backbone.", "_orig_mod.", "_checkpoint_wrapped_module.")
# Heads of a training checkpoint: not part of a backbone.
HEAD_PREFIXES = ("dino_head.", "ibot_head.")
PERIODS_KEY = "rope_embed.periods"


def _is_norm(name: str) -> bool:
    module = name.rsplit(".", 2)[-2]
    return "norm" in module


def strip_wrappers(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Removes wrapper prefixes and drops the DINO/iBOT heads of a training checkpoint."""
    out, heads = {}, []
    for key, value in sd.items():
        for prefix in WRAPPER_PREFIXES:
            key = key.replace(prefix, "")
        if key.startswith(HEAD_PREFIXES):
            heads.append(key)
            continue
        out[key] = value
    if heads:
        log.info("ignoring %d projection-head tensors (%s...)", len(heads), heads[0])
    return out


def heads_to_ours(sd: Mapping[str, np.ndarray]) -> dict[str, dict]:
    """The DINO and iBOT heads of an official training checkpoint (`dino_head.mlp.{0,2,4}.*`,
    `last_layer.weight`, RECIPE.md §2.2) as our pure parameter dicts (`mlp[i]` = `mlp.{2i}`,
    kernels transposed); {} when it has none."""
    heads: dict[str, dict] = {}
    for key, value in sd.items():
        for prefix in WRAPPER_PREFIXES:
            key = key.replace(prefix, "") if prefix != "backbone." else key
        head, _, rest = key.partition(".")
        if f"{head}." not in HEAD_PREFIXES:
            continue
        parts = rest.split(".")
        if parts[0] == "mlp":
            node = heads.setdefault(head, {}).setdefault("mlp", {}).setdefault(int(parts[1]) // 2, {})
        else:
            node = heads.setdefault(head, {}).setdefault(parts[0], {})
        value = np.asarray(value)
        node["kernel" if parts[-1] == "weight" else "bias"] = value.T if parts[-1] == "weight" else value
    return heads


def to_ours(sd: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], tuple[float, ...] | None]:
    """Official flat state dict → (our flat dict, the periods stored in the file or None).

    The input is never modified.
    """
    sd = strip_wrappers(sd)
    periods = sd.pop(PERIODS_KEY, None)
    ours = {}
    for key, value in sd.items():
        value = np.asarray(value)
        if key.endswith(".bias_mask"):
            continue
        if key.endswith("attn.qkv.bias"):
            mask = sd.get(key + "_mask")
            if mask is not None:
                _check_bias_mask(key + "_mask", np.asarray(mask))
                value = value * np.asarray(mask).astype(value.dtype)
            ours[key] = value
        else:
            name, value = leaf_to_ours(key, value, key.endswith(".weight") and _is_norm(key))
            ours[name] = value
    found_periods = None if periods is None else tuple(float(p) for p in np.asarray(periods, np.float32))
    return ours, found_periods


def _check_bias_mask(key: str, mask: np.ndarray) -> None:
    # Released non-7B files hold all-zero masks (dinov3 issue #195), so only 0/1 values and a zero k
    # third are required, not the [1, 0, 1] pattern.
    third = mask.shape[0] // 3
    if not np.isin(mask, (0.0, 1.0)).all() or np.any(mask[third : 2 * third] != 0):
        raise WeightsError(f"{key}: expected a 0/1 mask with a zero k third, found {mask[:8]}...")


def leaf_to_ours(key: str, value: np.ndarray, is_norm: bool) -> tuple[str, np.ndarray]:
    """One official tensor under our name: norm `weight` → `scale`, Linear [out, in] → `kernel`
    [in, out], conv OIHW → HWIO."""
    if key.endswith(".weight") and is_norm:
        return key[: -len("weight")] + "scale", value
    if key.endswith(".weight") and value.ndim == 4:
        return key[: -len("weight")] + "kernel", value.transpose(2, 3, 1, 0)
    if key.endswith(".weight") and value.ndim == 2:
        return key[: -len("weight")] + "kernel", value.T
    return key, value


def leaves_from_ours(flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Our flat dict under the official names and layouts (the inverse of `leaf_to_ours`)."""
    sd = {}
    for key, value in flat.items():
        value = np.asarray(value)
        if key.endswith(".scale"):
            sd[key[: -len("scale")] + "weight"] = value
        elif key.endswith(".kernel") and value.ndim == 4:
            sd[key[: -len("kernel")] + "weight"] = value.transpose(3, 2, 0, 1)
        elif key.endswith(".kernel"):
            sd[key[: -len("kernel")] + "weight"] = value.T
        else:
            sd[key] = value
    return sd


def from_ours(flat: Mapping[str, np.ndarray], cfg: ViTConfig) -> dict[str, np.ndarray]:
    """Our flat dict → the official state dict, buffers included, loadable with strict=True."""
    sd = leaves_from_ours(flat)
    sd[PERIODS_KEY] = np.asarray(cfg.rope_periods or default_rope_periods(cfg), np.float32)
    if cfg.qkv_bias and cfg.mask_k_bias:
        d = cfg.embed_dim
        mask = np.concatenate([np.ones(d), np.zeros(d), np.ones(d)]).astype(np.float32)
        for i in range(cfg.depth):
            sd[f"blocks.{i}.attn.qkv.bias_mask"] = mask
    return {k: np.ascontiguousarray(v) for k, v in sd.items()}


def infer_config(sd: Mapping[str, np.ndarray], base: ViTConfig | None = None) -> ViTConfig:
    """The structure of an official state dict, read from its keys and shapes.

    Heads are read from the periods buffer (Dh/4 values); LayerNorm eps cannot be read from a file
    and defaults to 1e-5 ("layernormbf16", every released model). Fields not visible in the file
    come from `base` (default: the released-model settings).
    """
    from dinov3_jax.models.registry import RELEASED

    sd = strip_wrappers(sd)
    base = base or RELEASED
    need = [k for k in ("cls_token", "patch_embed.proj.weight", "norm.weight") if k not in sd]
    if need:
        raise WeightsError(f"not an official DINOv3 ViT state dict: missing {need}")
    embed_dim = int(sd["cls_token"].shape[-1])
    patch = sd["patch_embed.proj.weight"]
    depth = len({m.group(1) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))})
    if PERIODS_KEY in sd:
        num_heads = embed_dim // (4 * int(np.shape(sd[PERIODS_KEY])[0]))
    elif base.embed_dim == embed_dim:
        num_heads = base.num_heads
    else:
        raise WeightsError(f"cannot tell the number of heads: no {PERIODS_KEY} in the file; name the model")
    swiglu = "blocks.0.mlp.w1.weight" in sd
    hidden = int(sd["blocks.0.mlp.w1.weight" if swiglu else "blocks.0.mlp.fc1.weight"].shape[0])
    cfg = base.replace(
        patch_size=int(patch.shape[-1]),
        in_chans=int(patch.shape[1]),
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        ffn_layer=("swiglu" if base.ffn_layer == "mlp" else base.ffn_layer) if swiglu else "mlp",
        ffn_hidden_dim=hidden,
        ffn_bias=("blocks.0.mlp.w1.bias" if swiglu else "blocks.0.mlp.fc1.bias") in sd,
        proj_bias="blocks.0.attn.proj.bias" in sd,
        qkv_bias="blocks.0.attn.qkv.bias" in sd,
        mask_k_bias="blocks.0.attn.qkv.bias_mask" in sd,
        layerscale_init=(base.layerscale_init or 1e-5) if "blocks.0.ls1.gamma" in sd else None,
        norm_layer=("layernormbf16" if base.norm_layer == "rmsnorm" else base.norm_layer)
        if "norm.bias" in sd
        else "rmsnorm",
        n_storage_tokens=int(sd["storage_tokens"].shape[1]) if "storage_tokens" in sd else 0,
        untie_cls_and_patch_norms="cls_norm.weight" in sd,
        untie_global_and_local_cls_norm="local_cls_norm.weight" in sd,
        rope_periods=None,
    )
    if PERIODS_KEY in sd:
        cfg = with_file_periods(cfg, tuple(float(p) for p in np.asarray(sd[PERIODS_KEY], np.float32)))
    return cfg


def with_file_periods(cfg: ViTConfig, periods: tuple[float, ...] | None) -> ViTConfig:
    """Keeps the checkpoint's periods (bf16-rounded in released files) when they differ from the
    config's fp32 ones, so the model reproduces the official one bit for bit (RECIPE.md §10.1)."""
    if periods is None:
        return cfg
    if len(periods) != cfg.head_dim // 4:
        raise WeightsError(f"{PERIODS_KEY} has {len(periods)} values; the model expects {cfg.head_dim // 4}")
    if is_close_periods(periods, default_rope_periods(cfg)):
        return cfg.replace(rope_periods=None)
    return cfg.replace(rope_periods=periods)
