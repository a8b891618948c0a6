"""ConvNeXt state dicts: official `.pth` layout and HF `DINOv3ConvNextModel` ↔ ours (RECIPE.md §2.3).

Official keys: `downsample_layers.{i}.{0,1}.*`, `stages.{i}.{j}.{dwconv,norm,pwconv1,pwconv2}.*`,
`stages.{i}.{j}.gamma`, `norm.*`, and the same final norm a second time as `norms.3.*` (the module
is registered twice, RECIPE.md §10 item 20). Ours are the official names with Flax leaves (conv
kernels HWIO, Dense kernels [in, out], norm `scale`). HF renames the modules
(`stages.{i}.downsample_layers.*`, `stages.{i}.layers.{j}.{depthwise_conv,layer_norm,
pointwise_conv1,pointwise_conv2}.*`, final `layer_norm.*`; transformers 5.x prefixes `model.` to
`stages` in memory and writes the 4.x names).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from dinov3_jax.convert import official
from dinov3_jax.convert.ours import WeightsError
from dinov3_jax.models.config import ConvNeXtConfig

DUPLICATE_NORM = "norms.3."
HF_BLOCK_NAMES = {
    "depthwise_conv": "dwconv",
    "layer_norm": "norm",
    "pointwise_conv1": "pwconv1",
    "pointwise_conv2": "pwconv2",
    "gamma": "gamma",
}


def is_convnext(keys) -> bool:
    """Whether a state dict (official or HF, any wrapper prefix) holds a ConvNeXt."""
    return any(re.search(r"(^|\.)(downsample_layers|stages)\.\d+\.", k) for k in keys)


# ---------------------------------------------------------------------------------------------
# Official
# ---------------------------------------------------------------------------------------------


def official_to_ours(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Official ConvNeXt state dict (wrappers and heads already stripped) → our flat dict."""
    final = {k: np.asarray(v) for k, v in sd.items() if k.startswith(DUPLICATE_NORM)}
    for key, value in final.items():
        twin = "norm." + key[len(DUPLICATE_NORM) :]
        if twin in sd and not np.array_equal(np.asarray(sd[twin]), value):
            raise WeightsError(f"{key} differs from {twin}: the final norm is stored twice and both must agree")
    ours = {}
    for key, value in sd.items():
        if key.startswith(DUPLICATE_NORM):
            key = "norm." + key[len(DUPLICATE_NORM) :]
            if key in sd:
                continue
        # Every 1-D weight of a ConvNeXt belongs to a LayerNorm.
        name, value = official.leaf_to_ours(key, np.asarray(value), is_norm=np.ndim(value) == 1)
        ours[name] = value
    return ours


def official_from_ours(flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Our flat dict → the official state dict, with the duplicate `norms.3.*`, loadable strictly."""
    sd = official.leaves_from_ours(flat)
    for leaf in ("weight", "bias"):
        sd[f"{DUPLICATE_NORM}{leaf}"] = sd[f"norm.{leaf}"]
    return {k: np.ascontiguousarray(v) for k, v in sd.items()}


def infer_config(sd: Mapping[str, np.ndarray]) -> ConvNeXtConfig:
    """Depths, widths and LayerScale read from an official ConvNeXt state dict."""
    need = [k for k in ("downsample_layers.0.0.weight", "norm.weight") if k not in sd]
    if need:
        raise WeightsError(f"not an official DINOv3 ConvNeXt state dict: missing {need}")
    stem = np.shape(sd["downsample_layers.0.0.weight"])
    dims = [int(stem[0])] + [int(np.shape(sd.get(f"downsample_layers.{i}.1.weight", (0,)))[0]) for i in range(1, 4)]
    depths = [len({m.group(1) for k in sd if (m := re.match(rf"stages\.{i}\.(\d+)\.", k))}) for i in range(4)]
    if min(dims) < 1 or min(depths) < 1:
        raise WeightsError(f"a ConvNeXt state dict needs four stages; found widths {dims}, depths {depths}")
    return ConvNeXtConfig(
        depths=tuple(depths),
        dims=tuple(dims),
        in_chans=int(stem[1]),
        layer_scale_init=1e-6 if "stages.0.0.gamma" in sd else None,
    )


# ---------------------------------------------------------------------------------------------
# Hugging Face
# ---------------------------------------------------------------------------------------------


def hf_to_official(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """HF `DINOv3ConvNextModel` keys (4.x or 5.x) → official keys; unknown keys are kept as they are
    so that the strict check names them."""
    out = {}
    for key, value in sd.items():
        key = key.removeprefix("model.")
        if m := re.fullmatch(r"stages\.(\d+)\.downsample_layers\.(\d+)\.(\w+)", key):
            key = f"downsample_layers.{m[1]}.{m[2]}.{m[3]}"
        elif m := re.fullmatch(r"stages\.(\d+)\.layers\.(\d+)\.(\w+)(\.\w+)?", key):
            key = f"stages.{m[1]}.{m[2]}.{HF_BLOCK_NAMES.get(m[3], m[3])}{m[4] or ''}"
        elif key.startswith("layer_norm."):
            key = "norm." + key[len("layer_norm.") :]
        out[key] = value
    return out


def official_to_hf(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Official keys → the HF 4.x keys that `save_pretrained` writes (no duplicate norm)."""
    to_hf = {v: k for k, v in HF_BLOCK_NAMES.items()}
    out = {}
    for key, value in sd.items():
        if key.startswith(DUPLICATE_NORM):
            continue
        if m := re.fullmatch(r"downsample_layers\.(\d+)\.(\d+)\.(\w+)", key):
            key = f"stages.{m[1]}.downsample_layers.{m[2]}.{m[3]}"
        elif m := re.fullmatch(r"stages\.(\d+)\.(\d+)\.(\w+)(\.\w+)?", key):
            key = f"stages.{m[1]}.layers.{m[2]}.{to_hf[m[3]]}{m[4] or ''}"
        elif key.startswith("norm."):
            key = "layer_norm." + key[len("norm.") :]
        out[key] = value
    return out


def config_to_hf(cfg: ConvNeXtConfig) -> dict[str, Any]:
    if cfg.layer_scale_init is None:
        raise WeightsError("HF DINOv3ConvNextModel always has LayerScale; this ConvNeXt has none")
    return {
        "architectures": ["DINOv3ConvNextModel"],
        "model_type": "dinov3_convnext",
        "num_channels": cfg.in_chans,
        "hidden_sizes": list(cfg.dims),
        "depths": list(cfg.depths),
        "hidden_act": "gelu",
        "initializer_range": 0.02,
        "layer_norm_eps": cfg.norm_eps,
        "layer_scale_init_value": cfg.layer_scale_init,
        "drop_path_rate": cfg.drop_path_rate,
        "image_size": 224,
        "torch_dtype": "float32",
    }


def config_from_hf(hf: Mapping[str, Any]) -> ConvNeXtConfig:
    if hf.get("hidden_act", "gelu") != "gelu":
        raise WeightsError(f"HF ConvNeXt config: hidden_act {hf['hidden_act']!r} is not supported (gelu only)")
    eps = float(hf.get("layer_norm_eps", 1e-6))
    if abs(eps - ConvNeXtConfig.norm_eps) > 1e-12:
        raise WeightsError(f"HF ConvNeXt config: layer_norm_eps {eps} differs from DINOv3's 1e-6")
    return ConvNeXtConfig(
        depths=tuple(hf.get("depths", (3, 3, 9, 3))),
        dims=tuple(hf.get("hidden_sizes", (96, 192, 384, 768))),
        in_chans=int(hf.get("num_channels", 3)),
        drop_path_rate=float(hf.get("drop_path_rate", 0.0)),
        layer_scale_init=float(hf.get("layer_scale_init_value", 1e-6)),
    )
