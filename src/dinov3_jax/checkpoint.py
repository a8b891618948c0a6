"""Resumable training checkpoints: an orbax CheckpointManager (asynchronous, atomic, keeps the
last N and every `keep_every`-th) holding the train state (student, teacher, optimizer, centres,
step, RNG key) and what the run was: its resolved config and the global batch and process count
it ran with, which a resume compares with its own (`configs.resume_differences`).

The data stream needs no state of its own: batch t is a pure function of (seed, process, t), so a
resume rebuilds the stream at its step, whatever `data.num_workers` was or is.

Restoring always goes into an abstract target that carries the shardings of the current mesh, so a
run can resume on a different device layout. A checkpoint that cannot be read (truncated files,
a crash in the middle of orbax's own finalisation) is moved aside, never deleted, and the run
falls back to the newest intact one.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Thin wrapper so the trainer reads as `save(step, state, about)` / `restore(step, like)`."""

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

    def steps(self) -> list[int]:
        """The steps held, newest first."""
        return sorted(self.manager.all_steps(), reverse=True)

    def save(self, step: int, state: dict, about: dict[str, Any]) -> None:
        """`about`: JSON facts of the run stored beside the state (its config, global batch, ...)."""
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave({"step": int(step), **about})
            ),
            force=True,
        )

    def about(self, step: int) -> dict[str, Any]:
        """The facts `save` stored with `step`."""
        return dict(self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)

    def restore(self, step: int, like_state: dict) -> dict:
        """The state at `step`, placed like `like_state` (arrays or ShapeDtypeStructs with shardings)."""
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), like_state
        )
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        return restored.state

    def restore_newest_intact(self, like_state: dict, set_aside: Path) -> tuple[int, dict] | None:
        """(step, state) of the newest checkpoint that reads back, or None when there is none.
        Each damaged newer one is moved to `set_aside/<step>` (process 0) with a warning naming it."""
        for step in self.steps():
            try:
                return step, self.restore(step, like_state)
            except Exception as err:  # orbax and tensorstore raise many kinds for a damaged file
                reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                print(f"warning: checkpoint {step} is damaged ({reason[:200]}); moved to {set_aside / str(step)}")
                if jax.process_index() == 0:
                    set_aside.mkdir(parents=True, exist_ok=True)
                    shutil.move(str(self.directory / str(step)), set_aside / str(step))
                self.manager.reload()
        return None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
