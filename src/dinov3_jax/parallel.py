"""Parallelism as data: a device mesh with `data` and `fsdp` axes, one table mapping the logical
axis names that parameters carry onto mesh axes, and the shardings that follow (STYLE.md §7).

The model code only names axes ("embed", "mlp", ...). GSPMD (jax.jit with in/out shardings)
inserts the collectives, so data parallelism and FSDP are the same code with a different mesh.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp")
# The whole batch is split over both axes: with FSDP every device still sees its own samples.
BATCH_AXES = ("data", "fsdp")

# Logical axis name → mesh axis (None: replicated). FSDP shards the model width and the
# prototype axis of the heads; everything else is replicated.
LOGICAL_RULES: tuple[tuple[str, str | None], ...] = (
    ("embed", "fsdp"),
    ("prototypes", "fsdp"),
    ("qkv", None),
    ("mlp", None),
    ("conv_in", None),
    ("bottleneck", None),
)


def initialize_distributed(
    coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> None:
    """Joins a multi-process run (`jax.distributed.initialize`) unless this process already has.

    Must run before anything touches the devices. Arguments left as None are detected by JAX
    (SLURM, Open MPI, Cloud TPU, or the JAX_COORDINATOR_ADDRESS variable). Afterwards
    `jax.devices()` lists every process's devices, so the same mesh and the same jitted step span
    all hosts; each process feeds its own slice of the batch (`host_to_global`)."""
    if jax.distributed.is_initialized():
        return
    jax.distributed.initialize(coordinator_address, num_processes, process_id)


def gather_to_host(tree):
    """A pytree of (possibly sharded, multi-process) arrays → NumPy on every process."""
    from jax.experimental import multihost_utils

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(one, tree)


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp) mesh over all devices (or `devices`); `data=-1` takes what fsdp leaves."""
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    if fsdp < 1 or n % fsdp:
        raise ValueError(f"mesh.fsdp={fsdp} does not divide the {n} devices")
    if data == -1:
        data = n // fsdp
    if data * fsdp != n:
        raise ValueError(f"mesh.data × mesh.fsdp = {data}×{fsdp} = {data * fsdp}, but there are {n} devices")
    # Auto axes: classic GSPMD propagation (make_mesh defaults to Explicit axes in recent JAX).
    return jax.make_mesh((data, fsdp), MESH_AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)


def logical_to_spec(
    names: Sequence[str | None] | None,
    shape: Sequence[int],
    mesh: Mesh,
    rules: Sequence[tuple[str, str | None]] = LOGICAL_RULES,
) -> P:
    """PartitionSpec for one array: a dim is sharded when its rule names a mesh axis of size > 1
    that divides it and is not already used by an earlier dim; otherwise it is replicated."""
    if not names:
        return P()
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, size in zip(names, shape):
        axis = table.get(name) if name is not None else None
        if axis is None or axis in used or mesh.shape[axis] == 1 or size % mesh.shape[axis]:
            spec.append(None)
        else:
            spec.append(axis)
            used.add(axis)
    return P(*spec)


def logical_axes(module: nnx.Module) -> dict:
    """Pure-dict tree (like `nnx.state(module).to_pure_dict()`) of each parameter's axis names."""
    state = nnx.state(module, nnx.Param)
    return jax.tree.map(
        lambda v: tuple(v.get_metadata().get("out_sharding") or ()),
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    ).to_pure_dict()


def param_shardings(axes_tree: Mapping, shapes_tree: Mapping, mesh: Mesh) -> dict:
    """NamedShardings for a pure-dict parameter tree from its logical axis names."""
    return jax.tree.map(
        lambda names, x: NamedSharding(mesh, logical_to_spec(names, np.shape(x), mesh)),
        axes_tree,
        shapes_tree,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int, batch_axis: int = 0) -> NamedSharding:
    """The batch axis split over every device, the rest replicated."""
    spec = [None] * ndim
    spec[batch_axis] = BATCH_AXES
    return NamedSharding(mesh, P(*spec))


def host_to_global(batch: Mapping[str, np.ndarray], mesh: Mesh, per_sample: Sequence[str], batch_axis: int = 0) -> dict:
    """Per-host numpy batch → global jax.Arrays: `per_sample` keys are split on their batch axis
    `batch_axis` over all devices (each process contributes its rows); the others are replicated
    as given."""
    out = {}
    for key, value in batch.items():
        if key in per_sample:
            out[key] = jax.make_array_from_process_local_data(batch_sharding(mesh, value.ndim, batch_axis), value)
        else:
            out[key] = jax.make_array_from_process_local_data(replicated(mesh), value)
    return out
