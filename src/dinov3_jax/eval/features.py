"""Frozen-backbone features for the global probes (k-NN, linear, logistic regression; RECIPE.md §8).

`extract_features` runs a backbone once over an image source and returns, per sample:

* `cls`: the final-normed CLS token `[N, D]` (what k-NN and logistic regression use; it is
  `forward_features(x)["x_norm_clstoken"]`);
* `linear`: the linear-probe input of §8.2, the concatenation of the normalised CLS tokens of the
  last `n_last_blocks` blocks and (with `avgpool`) the mean of the last block's normalised patch
  tokens, `[N, (n + 1)·D]` (`[N, n·D]` without avgpool);
* `labels` `[N]` (unreadable images are dropped).

Both come out of one pass through the blocks (`get_intermediate_layers(..., norm=True)`: the last
block's normalised output is exactly the final-normed output in eval). The forward is jitted once
per (architecture, n_last_blocks, avgpool) and input shape; batches are split over a `data` mesh
of all devices (the batch is rounded up to a multiple of the device count and the last one is
padded). With `cache_dir`, results are stored in an `.npz` file named by a hash of the model
config, the weights, the data description and the extraction settings, and later calls with the
same key load it instead of running the model.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dinov3_jax.data.pipeline import build_eval_pipeline
from dinov3_jax.inference import inference_compiler_options

log = logging.getLogger(__name__)

CACHE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Features:
    """Per-sample features of one source, as float32 numpy arrays (see the module docstring)."""

    cls: np.ndarray
    linear: np.ndarray
    labels: np.ndarray
    from_cache: bool = False

    def __len__(self) -> int:
        return len(self.labels)


# ---------------------------------------------------------------------------------------------
# The jitted forward
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _forward_for(graphdef: nnx.GraphDef, n_last_blocks: int, avgpool: bool):
    """One jitted (state, images) → {"cls", "linear"} per architecture: models with the same
    structure (e.g. the teacher at every evaluation of a training run) share its compilations."""

    def run(state, x):
        model = nnx.merge(graphdef, state)
        layers = model.get_intermediate_layers(x, n=n_last_blocks, return_class_token=True, norm=True)
        parts = [cls for _, cls in layers]
        if avgpool:
            parts.append(jnp.mean(layers[-1][0].astype(jnp.float32), axis=1))
        return {
            "cls": layers[-1][1].astype(jnp.float32),
            "linear": jnp.concatenate([p.astype(jnp.float32) for p in parts], axis=-1),
        }

    return jax.jit(run, compiler_options=inference_compiler_options())


def data_mesh(devices=None) -> Mesh:
    """A one-axis (`data`) mesh over all devices (or `devices`)."""
    devices = list(devices if devices is not None else jax.devices())
    return Mesh(np.array(devices), ("data",))


def _on_mesh(x, *, mesh: Mesh):
    """Parameters already laid out on the mesh's devices (e.g. FSDP-sharded by the trainer) stay
    as they are; anything else is replicated over the mesh."""
    if isinstance(x, jax.Array) and x.sharding.device_set == set(mesh.devices.flat):
        return x
    return jax.device_put(x, NamedSharding(mesh, P()))


def _batch_spec(mesh: Mesh) -> P:
    # The batch axis is split over every mesh axis, so a training (data, fsdp) mesh works too.
    return P(tuple(mesh.axis_names))


# ---------------------------------------------------------------------------------------------
# Cache keys
# ---------------------------------------------------------------------------------------------


def describe_source(source: Any) -> dict[str, Any]:
    """A JSON-able description of a source: its type, length and identifying attributes (root
    folder, split, files, sample count, seed, image size, ...), recursing into wrapped sources."""
    desc: dict[str, Any] = {"type": type(source).__name__, "len": len(source)}
    attrs = getattr(source, "__dict__", {})
    for attr in ("root", "txt", "split", "images_file", "labels_file", "num_samples", "image_size", "seed", "n"):
        value = attrs.get(attr)
        if value is not None:
            desc[attr] = value if isinstance(value, int | float | bool) else str(value)
    desc["num_classes"] = int(getattr(source, "num_classes", 0) or 0)
    if attrs.get("files") is not None:  # folder and list sources: the file list identifies the data
        desc["files_sha256"] = hashlib.sha256("\n".join(map(str, attrs["files"])).encode()).hexdigest()
    if attrs.get("source") is not None:  # a wrapped source (e.g. the first n items of another)
        desc["source"] = describe_source(attrs["source"])
    return desc


def weights_id(path: str | os.PathLike) -> dict[str, Any]:
    """Identifies a weights file (or HF folder) cheaply: resolved path, size and mtime."""
    path = Path(path).resolve()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {
        "path": str(path),
        "files": [
            [str(f.relative_to(path)) if path.is_dir() else f.name, f.stat().st_size, f.stat().st_mtime_ns]
            for f in files
        ],
    }


def params_hash(model: nnx.Module) -> str:
    """SHA-256 of every parameter and buffer of `model` (names, shapes, dtypes and bytes)."""
    digest = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(nnx.state(model))[0]
    for path, leaf in leaves:
        arr = np.asarray(leaf)
        digest.update(f"{jax.tree_util.keystr(path)}:{arr.shape}:{arr.dtype}".encode())
        digest.update(np.ascontiguousarray(arr).tobytes())
    return digest.hexdigest()


def cache_key(parts: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _load_cache(path: Path) -> Features | None:
    try:
        with np.load(path) as f:
            return Features(cls=f["cls"], linear=f["linear"], labels=f["labels"], from_cache=True)
    except (OSError, KeyError, ValueError) as err:
        log.warning("ignoring unreadable feature cache %s (%s)", path, err)
        return None


def _save_cache(path: Path, feats: Features, key_parts: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.stem}.{os.getpid()}.partial.npz")
    try:
        np.savez(
            partial,
            cls=feats.cls,
            linear=feats.linear,
            labels=feats.labels,
            key=np.asarray(json.dumps(key_parts, sort_keys=True, default=str)),
        )
        os.replace(partial, path)  # atomic: a concurrent or interrupted run never sees half a file
    finally:
        partial.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------


def extract_features(
    backbone: nnx.Module,
    source: Any,
    *,
    resolution: int,
    batch_size: int = 64,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    n_last_blocks: int = 1,
    avgpool: bool = True,
    resize_size: int | None = None,
    mesh: Mesh | None = None,
    cache_dir: str | os.PathLike | None = None,
    cache_key_parts: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> Features:
    """Features of every image of `source` (see the module docstring).

    Images go through the evaluation transform of `build_eval_pipeline` (shorter side resized to
    `resize_size`, default `resolution·256/224`, centre crop `resolution`, normalised with
    `mean`/`std`). `mesh` defaults to a `data` mesh over all devices; the batch is split over all
    its axes. With `cache_dir`, the result is cached under a key made of the model config, the
    weights (`cache_key_parts["weights"]` if given — e.g. `weights_id(path)` — else a hash of the
    parameters), `describe_source(source)` (or `cache_key_parts["data"]`), the transform and the
    extraction settings; any other `cache_key_parts` entries are added to the key.
    """
    depth = backbone.config.depth
    if not 1 <= n_last_blocks <= depth:
        raise ValueError(f"n_last_blocks must be between 1 and the depth {depth}, got {n_last_blocks}")
    if len(source) == 0:
        raise ValueError("the source is empty")
    if resize_size is None:
        resize_size = resolution * 256 // 224

    cache_path = key_parts = None
    if cache_dir is not None:
        extra = dict(cache_key_parts or {})
        key_parts = {
            "version": CACHE_VERSION,
            "model": json.loads(backbone.config.to_json()),
            "weights": extra.pop("weights", None) or {"params_sha256": params_hash(backbone)},
            "data": extra.pop("data", None) or describe_source(source),
            "transform": {"resolution": resolution, "resize_size": resize_size, "mean": list(mean), "std": list(std)},
            "features": {"n_last_blocks": n_last_blocks, "avgpool": avgpool},
            **extra,
        }
        cache_path = Path(cache_dir) / f"features-{cache_key(key_parts)}.npz"
        if cache_path.exists():
            cached = _load_cache(cache_path)
            if cached is not None:
                log.info("loaded %d cached features from %s", len(cached), cache_path)
                return cached

    mesh = mesh if mesh is not None else data_mesh()
    n_dev = mesh.size
    batch = -(-min(batch_size, len(source)) // n_dev) * n_dev  # a multiple of the device count
    images_sharding = NamedSharding(mesh, _batch_spec(mesh))
    graphdef, state = nnx.split(backbone)
    state = jax.tree.map(functools.partial(_on_mesh, mesh=mesh), state)
    forward = _forward_for(graphdef, n_last_blocks, avgpool)

    pipeline = build_eval_pipeline(source, resolution, batch, mean, std, resize_size=resize_size)
    cls, linear, labels = [], [], []

    def collect(out, valid, batch_labels):
        cls.append(np.asarray(out["cls"])[valid])
        linear.append(np.asarray(out["linear"])[valid])
        labels.append(batch_labels[valid])

    if progress:
        from tqdm import tqdm

        pipeline = tqdm(pipeline, total=-(-len(source) // batch), unit="batch", desc="features", leave=False)
    in_flight = None
    for item in pipeline:
        out = forward(state, jax.device_put(np.asarray(item["images"], np.float32), images_sharding))
        if in_flight is not None:  # read the previous batch back while this one runs
            collect(*in_flight)
        in_flight = (out, np.asarray(item["valid"], bool), np.asarray(item["labels"], np.int32))
    if in_flight is not None:
        collect(*in_flight)
    if not labels or sum(map(len, labels)) == 0:
        raise ValueError("none of the images of the source could be read")
    feats = Features(cls=np.concatenate(cls), linear=np.concatenate(linear), labels=np.concatenate(labels))
    if cache_path is not None:
        _save_cache(cache_path, feats, key_parts)
        log.info("cached %d features in %s", len(feats), cache_path)
    return feats
