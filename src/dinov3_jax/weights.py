"""Reading and writing backbone weights in three layouts, and `load_backbone`.

Layouts: "meta" (the official `.pth` state dict, also a training `teacher_checkpoint.pth`),
"hf" (a `transformers` DINOv3ViT or DINOv3ConvNext folder or safetensors file, 4.x or 5.x keys)
and "ours" (safetensors with our names and the config in its metadata). ViT and ConvNeXt files
are told apart by their keys. Reading `.pth` needs torch (the `[torch]` extra); everything else is
numpy + safetensors. Nothing is downloaded.
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from dinov3_jax.convert import convnext, hf, official
from dinov3_jax.convert.ours import FORMAT_TAG, WeightsError, model_from_flat, model_to_flat, save_ours
from dinov3_jax.models.config import BackboneConfig, ConvNeXtConfig, config_from_json, structural_differences
from dinov3_jax.models.registry import create_backbone, get_spec, model_from_filename, registry_matches
from dinov3_jax.utils.files import atomic_write

log = logging.getLogger(__name__)

FORMATS = ("meta", "hf", "ours")
TORCH_SUFFIXES = (".pth", ".pt", ".bin")


# ---------------------------------------------------------------------------------------------
# Reading files into flat numpy dicts
# ---------------------------------------------------------------------------------------------


def _torch_to_numpy(tensor) -> np.ndarray:
    import torch

    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        import ml_dtypes

        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def read_torch(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise ImportError(f"reading {path} needs torch: pip install 'dinov3-jax[torch]'") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise WeightsError(f"{path}: not a readable PyTorch checkpoint ({err})") from err
    # Training checkpoints wrap the state dict: {"teacher": {...}}, {"model": {...}}, {"state_dict": ...}.
    for wrapper in ("teacher", "model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return {k: _torch_to_numpy(v) for k, v in obj.items() if hasattr(v, "detach")}


def read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
            return {k: f.get_tensor(k) for k in f.keys()}, metadata  # noqa: SIM118 (not a dict)
    except Exception as err:
        raise WeightsError(f"{path}: not a readable safetensors file ({err})") from err


def read_hf_dir(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """An HF model folder: config.json plus model.safetensors or a sharded index."""
    config_file = path / "config.json"
    if not config_file.exists():
        raise WeightsError(f"{path}: an HF model folder needs config.json")
    index = path / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [path / s for s in shards]
    elif (path / "model.safetensors").exists():
        files = [path / "model.safetensors"]
    else:
        raise WeightsError(f"{path}: no model.safetensors or model.safetensors.index.json")
    sd = {}
    for file in files:
        sd.update(read_safetensors(file)[0])
    return sd, json.loads(config_file.read_text())


def detect_layout(keys) -> str:
    keys = list(keys)
    if any(k.startswith(("embeddings.", "layer.", "model.layer.", "layer_norm.", "model.stages.")) for k in keys):
        return "hf"
    if any(re.match(r"stages\.\d+\.layers\.", k) for k in keys):
        return "hf"
    return "meta"


def _config_from_hf(hf_config: dict[str, Any]) -> BackboneConfig:
    if hf_config.get("model_type") == "dinov3_convnext":
        return convnext.config_from_hf(hf_config)
    return hf.config_from_hf(hf_config)


def _infer_official(sd: dict[str, np.ndarray]) -> BackboneConfig:
    sd = official.strip_wrappers(sd)
    return convnext.infer_config(sd) if convnext.is_convnext(sd) else official.infer_config(sd)


def read_weights(path: str | Path) -> tuple[str, dict[str, np.ndarray], BackboneConfig | None]:
    """(layout, flat arrays in that layout, the config the file states or implies, if any)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"weights not found: {path}")
    if path.is_dir():
        sd, hf_config = read_hf_dir(path)
        return "hf", sd, _config_from_hf(hf_config)
    if path.suffix in TORCH_SUFFIXES:
        sd = read_torch(path)
        layout = detect_layout(sd)
        return layout, sd, (_infer_official(sd) if layout == "meta" else None)
    sd, metadata = read_safetensors(path)
    if metadata.get("format") == FORMAT_TAG:
        return "ours", sd, config_from_json(metadata["config"])
    layout = detect_layout(sd)
    if layout == "hf":
        config_file = path.parent / "config.json"
        return "hf", sd, _config_from_hf(json.loads(config_file.read_text())) if config_file.exists() else None
    return "meta", sd, _infer_official(sd)


# ---------------------------------------------------------------------------------------------
# Layout → our flat dict and config
# ---------------------------------------------------------------------------------------------


def to_ours(
    layout: str, sd: dict[str, np.ndarray], cfg: BackboneConfig
) -> tuple[dict[str, np.ndarray], BackboneConfig]:
    if layout == "ours":
        return dict(sd), cfg
    if isinstance(cfg, ConvNeXtConfig):
        official_sd = convnext.hf_to_official(sd) if layout == "hf" else official.strip_wrappers(sd)
        return convnext.official_to_ours(official_sd), cfg
    if layout == "hf":
        return hf.to_ours(sd, cfg), cfg
    flat, periods = official.to_ours(sd)
    return flat, official.with_file_periods(cfg, periods)


def resolve_config(name: str | None, found: BackboneConfig | None, path: Path) -> tuple[BackboneConfig, str | None]:
    """The config and the registry name of a weights file, resolved once: the name given, else the
    official hash in the file name, else the only registry entry of the file's structure (None
    when there is none or several). A named model's config is checked against the file's."""
    if name is None:
        name = model_from_filename(path.name)
        if name:
            log.info("%s: recognised %s from the file name", path, name)
    if name is None:
        if found is None:
            raise WeightsError(f"{path}: the file does not state its architecture; pass the model name")
        matches = registry_matches(found)
        return found, matches[0] if len(matches) == 1 else None
    cfg = get_spec(name).config
    if found is not None:
        diffs = structural_differences(cfg, found)
        if diffs:
            raise WeightsError(f"{path} does not hold a {name} backbone:\n  " + "\n  ".join(diffs))
        if getattr(found, "rope_periods", None) is not None:
            cfg = cfg.replace(rope_periods=found.rope_periods)
    return cfg, name


def load_backbone(
    name: str | None = None,
    weights: str | Path | None = None,
    *,
    dtype: Any = None,
    param_dtype: Any = None,
    attention_impl: str | None = None,
    seed: int = 0,
) -> nnx.Module:
    """A DINOv3 backbone (`DinoVisionTransformer` or `ConvNeXt`) as an NNX module (see
    `load_named`, which also returns the registry name it resolved)."""
    return load_named(name, weights, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl, seed=seed)[0]


def load_named(
    name: str | None = None,
    weights: str | Path | None = None,
    *,
    dtype: Any = None,
    param_dtype: Any = None,
    attention_impl: str | None = None,
    seed: int = 0,
) -> tuple[nnx.Module, str | None]:
    """(the backbone, its registry name or None).

    `name` is a registry name (see `list_models()`); with `weights` (official `.pth`, HF folder or
    safetensors, or ours) the parameters come from the file, strictly: every key must be used and
    every shape must match, or a `WeightsError` lists what does not. Without `weights` the model
    is randomly initialised. `dtype` is the compute dtype ("bf16", jnp.bfloat16, ...);
    `param_dtype` the storage dtype (fp32 by default).
    """
    options = {
        k: v
        for k, v in (("dtype", dtype), ("param_dtype", param_dtype), ("attention_impl", attention_impl))
        if v is not None
    }
    options = {k: (v if isinstance(v, str) else np.dtype(v).name) for k, v in options.items()}
    if weights is None:
        if name is None:
            raise ValueError("pass a model name, weights, or both")
        return create_backbone(_with_options(get_spec(name).config, options), seed=seed), name
    path = Path(weights)
    layout, sd, found = read_weights(path)
    cfg, name = resolve_config(name, found, path)
    flat, cfg = to_ours(layout, sd, cfg)
    return model_from_flat(_with_options(cfg, options), flat, source=str(path)), name


def _with_options(cfg: BackboneConfig, options: dict[str, str]) -> BackboneConfig:
    if isinstance(cfg, ConvNeXtConfig) and options.pop("attention_impl", "xla") != "xla":
        log.warning("a ConvNeXt has no attention: the attention kernel choice does not apply")
    return cfg.replace(**options)


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def save_backbone(model: nnx.Module, out: str | Path, layout: str = "ours") -> Path:
    """Writes the backbone in `layout`: "ours" (.safetensors), "meta" (.pth, or .safetensors by
    suffix) or "hf" (a folder with config.json and model.safetensors, loadable by
    `DINOv3ViTModel.from_pretrained` / `DINOv3ConvNextModel.from_pretrained`)."""
    return save_flat(model_to_flat(model), model.config, out, layout)


# What each layout is written as; an HF checkpoint is a folder.
SUFFIXES = {"ours": (".safetensors",), "meta": (".pth", ".pt", ".bin", ".safetensors")}
# The files a sharded HF checkpoint adds; a new single-file checkpoint in that folder removes them.
STALE_HF_FILES = ("model.safetensors.index.json", "model-*-of-*.safetensors")


def check_target(out: Path, layout: str) -> None:
    """The output name must say the layout: a file the tools could not read back is an error."""
    if layout not in FORMATS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {FORMATS}")
    if layout == "hf":
        if out.suffix in (*TORCH_SUFFIXES, ".safetensors") or out.is_file():
            raise ValueError(f"{out}: the hf layout is a folder (config.json + model.safetensors), not a file")
    elif out.suffix not in SUFFIXES[layout]:
        raise ValueError(
            f"{out}: the {layout} layout is written as {' or '.join(SUFFIXES[layout])}, not {out.suffix!r}"
        )


def save_flat(flat: dict[str, np.ndarray], cfg: BackboneConfig, out: str | Path, layout: str) -> Path:
    """Writes `layout` to `out`, each file through a temporary file renamed into place."""
    from safetensors.numpy import save_file

    out = Path(out)
    check_target(out, layout)
    is_convnext = isinstance(cfg, ConvNeXtConfig)
    if layout == "ours":
        with atomic_write(out) as tmp:
            save_ours(tmp, flat, cfg)
    elif layout == "meta":
        sd = convnext.official_from_ours(flat) if is_convnext else official.from_ours(flat, cfg)
        with atomic_write(out) as tmp:
            if out.suffix == ".safetensors":
                save_file(sd, str(tmp))
            else:
                try:
                    import torch
                except ImportError:
                    raise ImportError("writing .pth needs torch; write .safetensors or install [torch]") from None
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    torch.save({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, tmp)
    else:
        if is_convnext:
            hf_config = convnext.config_to_hf(cfg)
            sd = convnext.official_to_hf(convnext.official_from_ours(flat))
        else:
            hf_config = hf.config_to_hf(cfg)
            sd = hf.from_ours(flat, cfg)
        with atomic_write(out / "model.safetensors") as tmp:
            save_file(sd, str(tmp), metadata={"format": "pt"})
        for pattern in STALE_HF_FILES:  # an index left over would make the folder load its old shards
            for stale in out.glob(pattern):
                stale.unlink()
        with atomic_write(out / "config.json") as tmp:
            tmp.write_text(json.dumps(hf_config, indent=2) + "\n")
    return out


def convert_file(
    src: str | Path,
    dst: str | Path,
    *,
    to: str,
    name: str | None = None,
    expect: str | None = None,
    force: bool = False,
):
    """Reads any layout, checks it strictly against the model, and writes `to`; an existing `dst`
    is replaced only with `force`. Returns the config."""
    src, dst = Path(src), Path(dst)
    check_target(dst, to)
    if dst.exists() and not force:
        raise FileExistsError(f"{dst} exists; pass --force to replace it")
    layout, sd, found = read_weights(src)
    if expect is not None and expect != layout:
        raise WeightsError(f"{src} is in the {layout!r} layout, not {expect!r}")
    cfg, _ = resolve_config(name, found, src)
    flat, cfg = to_ours(layout, sd, cfg)
    from dinov3_jax.convert.ours import check_flat

    check_flat(flat, cfg, str(src))
    save_flat(flat, cfg, dst, to)
    return cfg
