"""Resumable training checkpoints: an orbax CheckpointManager (asynchronous, atomic, keeps the
last N) holding the train state (student, teacher, optimizer, centres, step, RNG key), the data
iterator state of this host, and the resolved config.

Restoring always goes into an abstract target that carries the shardings of the current mesh, so a
run can resume on a different device layout.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


def _encode_iterator_state(state: Any) -> Any:
    # grain iterator states are JSON-able dicts or bytes depending on the iterator kind.
    if isinstance(state, bytes):
        return {"__bytes__": base64.b64encode(state).decode("ascii")}
    return state


def _decode_iterator_state(state: Any) -> Any:
    if isinstance(state, dict) and set(state) == {"__bytes__"}:
        return base64.b64decode(state["__bytes__"])
    return state


class Checkpointer:
    """Thin wrapper so the trainer reads as `save(step, state, data_state)` / `restore(...)`."""

    def __init__(
        self, directory: str | Path, *, max_to_keep: int = 3, keep_every: int | None = None, async_save: bool = True
    ):
        """`keep_every`: checkpoints whose step is a multiple of it are kept beyond `max_to_keep`."""
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, keep_period=keep_every, enable_async_checkpointing=async_save
            ),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: dict, data_state: Any, config_yaml: str, data_start_step: int = 0) -> None:
        """`data_start_step`: the batch the data stream of this run started at (a run that continues
        another starts at that run's step), so a resume rebuilds the same stream."""
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave({f"process_{jax.process_index()}": _encode_iterator_state(data_state)}),
                meta=ocp.args.JsonSave(
                    {"step": int(step), "config": config_yaml, "data_start_step": int(data_start_step)}
                ),
            ),
            force=True,
        )

    def restore(self, step: int, like_state: dict) -> tuple[dict, Any, int]:
        """The state at `step`, placed like `like_state` (arrays or ShapeDtypeStructs with shardings),
        this host's data-iterator state, and the step its data stream started at."""
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), like_state
        )
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()
            ),
        )
        # Only the primary process writes the JSON item. Every process's stream consumes the same
        # number of elements per step, so process 0's position is every process's position.
        data = restored.data.get(f"process_{jax.process_index()}", restored.data.get("process_0"))
        return restored.state, _decode_iterator_state(data), int(restored.meta.get("data_start_step", 0))

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
