"""Hugging Face `transformers` DINOv3ViT layout ↔ ours (PARITY.md §8.1), with no torch needed.

HF splits qkv into q/k/v projections and has no k bias (the official k bias is masked to zero);
`mask_token` is [1, 1, D] instead of [1, D]; RoPE periods are recomputed in fp32 and there is no
`local_cls_norm`. Both the 4.x on-disk keys (`layer.N.*`) and the 5.x in-memory keys
(`model.layer.N.*`) are read; the 4.x layout is written, as `save_pretrained` does.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from dinov3_jax.convert.ours import WeightsError
from dinov3_jax.models.config import ViTConfig, default_rope_periods, is_close_periods

log = logging.getLogger(__name__)

# Our name pattern → HF name pattern, for tensors that only need a rename (and a transpose for
# Dense kernels, handled below). `{i}` is the block index.
_BLOCK_RENAMES = {
    "norm1.scale": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "norm2.scale": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "attn.proj.kernel": "attention.o_proj.weight",
    "attn.proj.bias": "attention.o_proj.bias",
    "ls1.gamma": "layer_scale1.lambda1",
    "ls2.gamma": "layer_scale2.lambda1",
    "mlp.fc1.kernel": "mlp.up_proj.weight",
    "mlp.fc1.bias": "mlp.up_proj.bias",
    "mlp.fc2.kernel": "mlp.down_proj.weight",
    "mlp.fc2.bias": "mlp.down_proj.bias",
    "mlp.w1.kernel": "mlp.gate_proj.weight",
    "mlp.w1.bias": "mlp.gate_proj.bias",
    "mlp.w2.kernel": "mlp.up_proj.weight",
    "mlp.w2.bias": "mlp.up_proj.bias",
    "mlp.w3.kernel": "mlp.down_proj.weight",
    "mlp.w3.bias": "mlp.down_proj.bias",
}
_TOP_RENAMES = {
    "cls_token": "embeddings.cls_token",
    "storage_tokens": "embeddings.register_tokens",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.bias",
    "norm.scale": "norm.weight",
    "norm.bias": "norm.bias",
}


def normalize_keys(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Maps the 5.x in-memory layout (`model.layer.N`) and older q/k/v names onto the 4.x layout."""
    out = {}
    for key, value in sd.items():
        key = re.sub(r"^model\.layer\.", "layer.", key)
        key = re.sub(r"\.attention\.(query|key|value)\.", lambda m: f".attention.{m.group(1)[0]}_proj.", key)
        out[key] = value
    return out


def to_ours(sd: Mapping[str, np.ndarray], cfg: ViTConfig) -> dict[str, np.ndarray]:
    """HF state dict → our flat dict. Keys this mapping does not consume are kept under their HF
    names, so the strict check reports them as unexpected."""
    sd = normalize_keys(sd)
    used: set[str] = set()

    def take(key: str) -> np.ndarray:
        used.add(key)
        return np.asarray(sd[key])

    ours: dict[str, np.ndarray] = {}
    for name, hf_name in _TOP_RENAMES.items():
        if hf_name in sd:
            ours[name] = take(hf_name)
    if "storage_tokens" in ours and ours["storage_tokens"].shape[1] == 0:
        del ours["storage_tokens"]  # HF keeps a [1, 0, D] tensor when there are no registers
    if "embeddings.mask_token" in sd:
        ours["mask_token"] = take("embeddings.mask_token").reshape(1, -1)
    if "embeddings.patch_embeddings.weight" in sd:
        ours["patch_embed.proj.kernel"] = take("embeddings.patch_embeddings.weight").transpose(2, 3, 1, 0)
    mlp_names = ("w1", "w2", "w3") if cfg.ffn_layer != "mlp" else ("fc1", "fc2")
    for i in range(cfg.depth):
        hf, us = f"layer.{i}.", f"blocks.{i}."
        for name, hf_name in _BLOCK_RENAMES.items():
            if name.startswith("mlp.") and name.split(".")[1] not in mlp_names:
                continue
            if hf + hf_name in sd:
                value = take(hf + hf_name)
                ours[us + name] = value.T if name.endswith("kernel") else value
        q, k, v = (hf + f"attention.{c}_proj." for c in "qkv")
        if all(p + "weight" in sd for p in (q, k, v)):
            ours[us + "attn.qkv.kernel"] = np.concatenate([take(p + "weight").T for p in (q, k, v)], axis=1)
        if q + "bias" in sd or v + "bias" in sd:
            d = cfg.embed_dim
            k_bias = take(k + "bias") if k + "bias" in sd else np.zeros(d, np.float32)
            q_bias = take(q + "bias") if q + "bias" in sd else np.zeros(d, np.float32)
            v_bias = take(v + "bias") if v + "bias" in sd else np.zeros(d, np.float32)
            ours[us + "attn.qkv.bias"] = np.concatenate([q_bias, k_bias.astype(q_bias.dtype), v_bias])
    if cfg.layerscale_init is None:
        for key in [k for k in ours if k.endswith(("ls1.gamma", "ls2.gamma"))]:
            if not np.all(ours[key] == 1):
                raise WeightsError(f"{key}: the model has no layer scale but the file has non-unit values")
            del ours[key]
    ours.update({k: np.asarray(v) for k, v in sd.items() if k not in used})
    return ours


def from_ours(flat: Mapping[str, np.ndarray], cfg: ViTConfig) -> dict[str, np.ndarray]:
    """Our flat dict → HF 4.x layout (what `save_pretrained` writes)."""
    if cfg.untie_cls_and_patch_norms:
        raise WeightsError("the HF DINOv3ViT model has no cls_norm: untie_cls_and_patch_norms cannot be exported")
    sd: dict[str, np.ndarray] = {}
    d = cfg.embed_dim
    for name, value in flat.items():
        value = np.asarray(value)
        if name in _TOP_RENAMES:
            sd[_TOP_RENAMES[name]] = value
        elif name == "mask_token":
            sd["embeddings.mask_token"] = value.reshape(1, 1, -1)
        elif name == "patch_embed.proj.kernel":
            sd["embeddings.patch_embeddings.weight"] = value.transpose(3, 2, 0, 1)
        elif name.startswith("local_cls_norm."):
            continue  # training-only norm; HF drops it too
        elif m := re.match(r"blocks\.(\d+)\.(.+)$", name):
            hf, rest = f"layer.{m.group(1)}.", m.group(2)
            if rest == "attn.qkv.kernel":
                for j, c in enumerate("qkv"):
                    sd[hf + f"attention.{c}_proj.weight"] = value[:, j * d : (j + 1) * d].T
            elif rest == "attn.qkv.bias":
                sd[hf + "attention.q_proj.bias"] = value[:d]
                if not cfg.mask_k_bias:
                    sd[hf + "attention.k_proj.bias"] = value[d : 2 * d]
                sd[hf + "attention.v_proj.bias"] = value[2 * d :]
            else:
                hf_name = _BLOCK_RENAMES[rest]
                sd[hf + hf_name] = value.T if rest.endswith("kernel") else value
        else:
            raise WeightsError(f"no HF name for {name}")
    if not cfg.n_storage_tokens:
        sd["embeddings.register_tokens"] = np.zeros((1, 0, d), np.float32)
    if cfg.layerscale_init is None:
        for i in range(cfg.depth):
            for j in (1, 2):
                sd[f"layer.{i}.layer_scale{j}.lambda1"] = np.ones(d, np.float32)
    return {k: np.ascontiguousarray(v) for k, v in sd.items()}


def config_to_hf(cfg: ViTConfig) -> dict[str, Any]:
    """The `config.json` of an equivalent `DINOv3ViTModel`; refuses what HF cannot represent."""
    problems = []
    if cfg.norm_layer == "rmsnorm":
        problems.append("RMSNorm")
    if cfg.pos_embed_rope_base is None:
        problems.append("min/max RoPE periods")
    if cfg.pos_embed_rope_normalize_coords != "separate":
        problems.append(f"normalize_coords={cfg.pos_embed_rope_normalize_coords!r}")
    if cfg.untie_cls_and_patch_norms:
        problems.append("untie_cls_and_patch_norms")
    if problems:
        raise WeightsError("the HF DINOv3ViT model cannot represent: " + ", ".join(problems))
    if cfg.rope_periods is not None and not is_close_periods(cfg.rope_periods, default_rope_periods(cfg)):
        log.warning("HF recomputes RoPE periods in fp32; this model's checkpoint periods differ slightly")
    if cfg.untie_global_and_local_cls_norm:
        log.info("local_cls_norm is training-only and has no HF counterpart; it is not exported")
    gated = cfg.ffn_layer != "mlp"
    return {
        "architectures": ["DINOv3ViTModel"],
        "model_type": "dinov3_vit",
        "patch_size": cfg.patch_size,
        "num_channels": cfg.in_chans,
        "hidden_size": cfg.embed_dim,
        "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.depth,
        "num_attention_heads": cfg.num_heads,
        "hidden_act": "silu" if gated else "gelu",
        "use_gated_mlp": gated,
        "layer_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.pos_embed_rope_base,
        "query_bias": cfg.qkv_bias,
        "key_bias": cfg.qkv_bias and not cfg.mask_k_bias,
        "value_bias": cfg.qkv_bias,
        "proj_bias": cfg.proj_bias,
        "mlp_bias": cfg.ffn_bias,
        "layerscale_value": cfg.layerscale_init if cfg.layerscale_init is not None else 1.0,
        "num_register_tokens": cfg.n_storage_tokens,
        "pos_embed_shift": cfg.pos_embed_rope_shift_coords,
        "pos_embed_jitter": cfg.pos_embed_rope_jitter_coords,
        "pos_embed_rescale": cfg.pos_embed_rope_rescale_coords,
        "image_size": 224,
        "initializer_range": 0.02,
        "drop_path_rate": 0.0,
        "attention_dropout": 0.0,
    }


def config_from_hf(hf: Mapping[str, Any]) -> ViTConfig:
    """Our config from an HF `config.json` dict (gelu/silu, eps 1e-5 or 1e-6, q and v bias alike)."""
    gated = bool(hf.get("use_gated_mlp", False))
    act = hf.get("hidden_act", "gelu")
    if act != ("silu" if gated else "gelu"):
        raise WeightsError(f"hidden_act {act!r} with use_gated_mlp={gated} is not a DINOv3 FFN")
    eps = float(hf.get("layer_norm_eps", 1e-5))
    norm = {1e-5: "layernormbf16", 1e-6: "layernorm"}.get(eps)
    if norm is None:
        raise WeightsError(f"layer_norm_eps {eps} matches no DINOv3 norm (1e-5 or 1e-6)")
    q_bias, k_bias, v_bias = (
        bool(hf.get(n, d)) for n, d in (("query_bias", True), ("key_bias", False), ("value_bias", True))
    )
    if q_bias != v_bias or (k_bias and not q_bias):
        raise WeightsError(f"query/key/value bias {q_bias}/{k_bias}/{v_bias} has no fused-qkv equivalent")
    hidden, inter = int(hf.get("hidden_size", 384)), int(hf.get("intermediate_size", 1536))
    patch = hf.get("patch_size", 16)
    return ViTConfig(
        patch_size=int(patch[0] if isinstance(patch, (list, tuple)) else patch),
        in_chans=int(hf.get("num_channels", 3)),
        embed_dim=hidden,
        depth=int(hf.get("num_hidden_layers", 12)),
        num_heads=int(hf.get("num_attention_heads", 6)),
        ffn_ratio=inter / hidden,
        ffn_hidden_dim=inter,
        ffn_layer="swiglu" if gated else "mlp",
        ffn_bias=bool(hf.get("mlp_bias", True)),
        proj_bias=bool(hf.get("proj_bias", True)),
        qkv_bias=q_bias,
        mask_k_bias=q_bias and not k_bias,
        layerscale_init=float(hf.get("layerscale_value", 1.0)),
        norm_layer=norm,
        n_storage_tokens=int(hf.get("num_register_tokens", 0)),
        pos_embed_rope_base=float(hf.get("rope_theta", 100.0)),
        pos_embed_rope_shift_coords=hf.get("pos_embed_shift"),
        pos_embed_rope_jitter_coords=hf.get("pos_embed_jitter"),
        pos_embed_rope_rescale_coords=hf.get("pos_embed_rescale", 2.0),
        pos_embed_rope_dtype="fp32",
    )
