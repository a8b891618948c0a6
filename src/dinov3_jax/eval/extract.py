"""The one batched, jitted, sharded, cached, streaming forward of a frozen backbone.

`extract(backbone, source, transform=..., outputs=...)` runs every image of an `ImageSource` through
the backbone once and returns the requested features (`backbone.Outputs`) of each readable image,
in source order. Decoding runs in grain threads a bounded window ahead of the model; batches have
one shape (padded at the end, a multiple of the device count) and are split over every mesh axis;
one jitted function per (architecture, request) is compiled and reused; unreadable images are
reported, not fatal (unless `strict`); with `cache_dir` the result is stored under a hash of the
backbone's identity, the data, the transform and the request. docs/frozen-backbone.md has the design.
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
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dinov3_jax.backbone import Backbone, Outputs, compute_outputs
from dinov3_jax.data.images import Transform, check_resolution
from dinov3_jax.data.pipeline import build_eval_pipeline
from dinov3_jax.inference import inference_compiler_options
from dinov3_jax.utils.files import atomic_write

log = logging.getLogger(__name__)

CACHE_VERSION = 2
CLS_ONLY = Outputs()


@dataclasses.dataclass(frozen=True)
class Extracted:
    """Features of the readable images of a source, as float32 numpy arrays, in source order.

    `arrays[key]` has one row per readable image; `labels` [N] (-1 when the source has none) and
    `indices` [N] (the source index of each row); `skipped` maps the index of each unreadable
    image to the reason."""

    arrays: dict[str, np.ndarray]
    labels: np.ndarray
    indices: np.ndarray
    skipped: dict[int, str]
    from_cache: bool = False

    def __getitem__(self, key: str) -> np.ndarray:
        return self.arrays[key]

    def __len__(self) -> int:
        return len(self.labels)


# ---------------------------------------------------------------------------------------------
# The jitted forward and the mesh
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _forward_for(graphdef: nnx.GraphDef, request: Outputs):
    """One jitted (state, images) → features per architecture and request: models of the same
    structure (e.g. the teacher at every evaluation of a training run) share its compilations."""

    def run(state, x):
        return compute_outputs(nnx.merge(graphdef, state), x, request)

    return jax.jit(run, compiler_options=inference_compiler_options())


def _on_mesh(x, *, mesh: Mesh):
    """Parameters already laid out on the mesh's devices (e.g. FSDP-sharded by the trainer) stay
    as they are; anything else is replicated over the mesh."""
    if isinstance(x, jax.Array) and x.sharding.device_set == set(mesh.devices.flat):
        return x
    return jax.device_put(x, NamedSharding(mesh, P()))


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
    for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.state(model))[0]:
        arr = np.asarray(leaf)
        digest.update(f"{jax.tree_util.keystr(path)}:{arr.shape}:{arr.dtype}".encode())
        digest.update(np.ascontiguousarray(arr).tobytes())
    return digest.hexdigest()


def cache_key(parts: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _load_cache(path: Path) -> Extracted | None:
    try:
        with np.load(path) as f:
            arrays = {k[len("out_") :]: f[k] for k in f.files if k.startswith("out_")}
            skipped = dict(zip(f["skipped_index"].tolist(), f["skipped_reason"].tolist()))
            return Extracted(arrays, f["labels"], f["indices"], skipped, from_cache=True)
    except (OSError, KeyError, ValueError) as err:
        log.warning("ignoring unreadable feature cache %s (%s)", path, err)
        return None


def _save_cache(path: Path, result: Extracted, key_parts: Mapping[str, Any]) -> None:
    with atomic_write(path) as tmp:  # a concurrent or interrupted run never sees half a file
        np.savez(
            tmp,
            **{f"out_{k}": v for k, v in result.arrays.items()},
            labels=result.labels,
            indices=result.indices,
            skipped_index=np.asarray(list(result.skipped), np.int64),
            skipped_reason=np.asarray(list(result.skipped.values()), dtype=str),
            key=np.asarray(json.dumps(key_parts, sort_keys=True, default=str)),
        )


# ---------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------


class Rows:
    """Where `extract` puts its rows (features, labels, source indices), in memory here;
    `features.DiskRows` streams them to files instead. `filled` rows are written, every source
    index below `next_index` is done (read or skipped), and `skipped` maps the unreadable ones to
    the reason; `commit()` follows each batch, when all three are consistent."""

    def __init__(self, n_images: int):
        self.n_images = n_images
        self.columns: dict[str, np.ndarray] = {}
        self.filled = 0
        self.next_index = 0
        self.skipped: dict[int, str] = {}

    def write(self, key: str, start: int, values: np.ndarray) -> None:
        """Rows `start, ...` of column `key` (sized for every image, made on first use)."""
        if key not in self.columns:
            self.columns[key] = np.empty((self.n_images, *values.shape[1:]), values.dtype)
        self.columns[key][start : start + len(values)] = values

    def commit(self) -> None:
        pass

    def result(self) -> dict[str, np.ndarray]:
        """Every column, the written rows only."""
        return {k: v[: self.filled] for k, v in self.columns.items()}


def extract(
    backbone: Backbone,
    source: Any,
    *,
    transform: Transform,
    outputs: Outputs = CLS_ONLY,
    batch_size: int = 64,
    mesh: Mesh | None = None,
    num_threads: int = 2,
    strict: bool = False,
    cache_dir: str | os.PathLike | None = None,
    cache_key_parts: Mapping[str, Any] | None = None,
    rows: Rows | None = None,
    progress: bool = False,
) -> Extracted:
    """Features of every readable image of `source` (see the module docstring).

    `mesh` defaults to a `data` mesh over all devices (fewer when the source has fewer images);
    the batch is split over all its axes. With `cache_dir`, `cache_key_parts` entries are added to
    the cache key (`"data"` replaces `describe_source(source)`). `rows` receives the rows as they
    come (in memory by default); one that already holds some (a resumed `DiskRows`) is continued
    from its `next_index`.
    """
    backbone.check_outputs(outputs)
    check_resolution(transform.out_hw, backbone.stride)
    if batch_size < 1:
        raise ValueError(f"the batch size must be at least 1, got {batch_size}")
    if len(source) == 0:
        raise ValueError("the source is empty")

    cache_path = key_parts = None
    if cache_dir is not None:
        extra = dict(cache_key_parts or {})
        key_parts = {
            "version": CACHE_VERSION,
            "backbone": backbone.identity(),
            "data": extra.pop("data", None) or describe_source(source),
            "transform": {"type": type(transform).__name__, **dataclasses.asdict(transform)},
            "outputs": dataclasses.asdict(outputs),
            **extra,
        }
        cache_path = Path(cache_dir).expanduser() / f"features-{cache_key(key_parts)}.npz"
        if cache_path.exists() and (cached := _load_cache(cache_path)) is not None:
            log.info("loaded %d cached features from %s", len(cached), cache_path)
            return cached

    if mesh is None:  # a one-axis mesh over all devices, or as many as there are images
        mesh = Mesh(np.array(jax.devices()[: max(1, len(source))]), ("data",))
    batch = -(-min(batch_size, len(source)) // mesh.size) * mesh.size  # a multiple of the device count
    images_sharding = NamedSharding(mesh, P(tuple(mesh.axis_names)))  # batch over every mesh axis
    graphdef, state = nnx.split(backbone.module)
    state = jax.tree.map(functools.partial(_on_mesh, mesh=mesh), state)
    forward = _forward_for(graphdef, outputs)
    rows = rows if rows is not None else Rows(len(source))
    errors: dict[int, str] = {}
    pipeline = build_eval_pipeline(
        source, transform, batch, backbone.mean, backbone.std, num_threads=num_threads, errors=errors,
        start=rows.next_index,
    )  # fmt: skip

    def collect(out, valid, batch_labels, batch_indices):
        real = batch_indices >= 0  # the padding of the last batch is neither read nor skipped
        bad = batch_indices[~valid & real].tolist()
        if strict and bad:
            raise ValueError(f"cannot read image {bad[0]} of the source: {errors[bad[0]]}")
        for key, value in (*out.items(), ("labels", batch_labels), ("indices", batch_indices)):
            rows.write(key, rows.filled, np.asarray(value)[valid])
        rows.filled += int(valid.sum())
        rows.skipped |= {i: errors[i] for i in bad}
        rows.next_index = int(batch_indices[real].max()) + 1
        rows.commit()
        if bar is not None:
            bar.update(int(real.sum()))

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(
            total=len(source), initial=rows.next_index, unit="img", desc="features", leave=False, dynamic_ncols=True
        )
    in_flight = None
    try:
        for item in pipeline:
            out = forward(state, jax.device_put(np.asarray(item["images"], np.float32), images_sharding))
            if in_flight is not None:  # read the previous batch back while this one runs
                collect(*in_flight)
            in_flight = (out, *(np.asarray(item[k]) for k in ("valid", "labels", "index")))
        if in_flight is not None:
            collect(*in_flight)
    finally:
        if bar is not None:
            bar.close()
    if rows.filled == 0:
        raise ValueError(f"none of the {len(source)} images of the source could be read")
    arrays = rows.result()
    labels, indices = arrays.pop("labels"), arrays.pop("indices")
    result = Extracted(
        arrays,  # compute_outputs gives float32
        labels.astype(np.int32),
        indices.astype(np.int64),
        dict(sorted(rows.skipped.items())),
    )
    if cache_path is not None:
        _save_cache(cache_path, result, key_parts)
        log.info("cached %d features in %s", len(result), cache_path)
    return result
