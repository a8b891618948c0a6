"""Our parameter tree as a flat `{dotted.name: np.ndarray}` dict, strict loading, and our file format.

Names are the NNX state paths joined with dots (`blocks.0.attn.qkv.kernel`), i.e. the official
names with Flax leaf names (`kernel`, `scale`). Our file is a safetensors file whose metadata holds
`format = "dinov3-jax"` and the model config as JSON.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dinov3_jax.models.config import BackboneConfig, resolve_dtype

FORMAT_TAG = "dinov3-jax"
FORMAT_VERSION = "1"


class WeightsError(ValueError):
    """A checkpoint that does not fit the model: the message lists every offending key."""


def _path_name(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def abstract_model(cfg: BackboneConfig) -> nnx.Module:
    """The model with shapes only: nothing is allocated (a 7B model costs no memory here)."""
    from dinov3_jax.models.registry import backbone_class

    return nnx.eval_shape(lambda: backbone_class(cfg)(cfg, rngs=nnx.Rngs(0)))


def expected_shapes(cfg: BackboneConfig) -> dict[str, tuple[int, ...]]:
    state = nnx.state(abstract_model(cfg), nnx.Param)
    return {_path_name(path): tuple(var.shape) for path, var in nnx.to_flat_state(state)}


def model_to_flat(model: nnx.Module) -> dict[str, np.ndarray]:
    """Every parameter as a host numpy array under its dotted name."""
    state = nnx.state(model, nnx.Param)
    return {_path_name(path): np.asarray(jax.device_get(var[...])) for path, var in nnx.to_flat_state(state)}


def check_flat(flat: Mapping[str, np.ndarray], cfg: BackboneConfig, source: str) -> None:
    """Raises one WeightsError naming every missing, unexpected and mis-shaped key."""
    expected = expected_shapes(cfg)
    missing = sorted(set(expected) - set(flat))
    unexpected = sorted(set(flat) - set(expected))
    mismatched = [
        f"{k}: expected {expected[k]}, found {tuple(np.shape(flat[k]))}"
        for k in sorted(set(expected) & set(flat))
        if tuple(np.shape(flat[k])) != expected[k]
    ]
    if missing or unexpected or mismatched:
        lines = [f"weights from {source} do not fit the model:"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", mismatched)):
            if items:
                lines.append(
                    f"  {title} ({len(items)}): " + ", ".join(items[:40]) + (" ..." if len(items) > 40 else "")
                )
        raise WeightsError("\n".join(lines))


def model_from_flat(cfg: BackboneConfig, flat: Mapping[str, np.ndarray], source: str = "weights") -> nnx.Module:
    """Builds the model directly from arrays (no random initialisation happens), strictly."""
    check_flat(flat, cfg, source)
    graphdef, state = nnx.split(abstract_model(cfg))
    pdtype = resolve_dtype(cfg.param_dtype)
    for path, var in nnx.to_flat_state(state):
        array = np.asarray(flat[_path_name(path)])
        if not np.all(np.isfinite(array.astype(np.float32))):
            raise WeightsError(f"weights from {source}: {_path_name(path)} holds NaN or infinite values")
        var.set_value(jnp.asarray(array, dtype=pdtype))
    return nnx.merge(graphdef, state)


def save_ours(path, flat: Mapping[str, np.ndarray], cfg: BackboneConfig) -> None:
    from safetensors.numpy import save_file

    metadata = {"format": FORMAT_TAG, "version": FORMAT_VERSION, "config": cfg.to_json()}
    save_file({k: np.ascontiguousarray(v) for k, v in flat.items()}, str(path), metadata=metadata)
