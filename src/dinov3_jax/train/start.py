"""Where a run's weights come from: a previous stage, a released backbone, or another run.

DINOv3 is trained in chained stages (paper §4–5.1, RECIPE.md §5.7): pretraining, then Gram
anchoring against an earlier teacher, then high-resolution adaptation started from the Gram
stage's teacher. Users also continue the pretraining of a released backbone on their own images.
The functions here read those starting points into pure parameter dicts of our layout, checked
against the run's architecture before anything compiles:

* a run folder of ours: the EMA teacher (backbone and both heads) of its newest checkpoint, or,
  without checkpoints, its exported `teacher_backbone.safetensors`;
* any backbone file `load_backbone` reads: an official `.pth` (released, or a training
  `teacher_checkpoint.pth`, whose heads are dropped), an HF folder or safetensors file, ours.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from dinov3_jax.configs.schema import ConfigError
from dinov3_jax.models.config import ViTConfig, structural_differences

log = logging.getLogger(__name__)

# The placeholder the official Gram-anchoring recipe ships in `gram.ckpt`.
NO_PATH = ("", "ignore", None)


def newest_checkpoint(run_dir: Path) -> tuple[ocp.CheckpointManager, int] | None:
    """(manager, step) of the newest checkpoint under `run_dir/checkpoints`, or None."""
    directory = Path(run_dir).absolute() / "checkpoints"
    if not directory.is_dir():
        return None
    manager = ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(read_only=True),
        item_handlers={"state": ocp.PyTreeCheckpointHandler()},
    )
    step = manager.latest_step()
    return None if step is None else (manager, step)


def _restore_subtree(manager: ocp.CheckpointManager, step: int, key: str, like: dict) -> dict:
    """`state[key]` of a checkpoint, structured like `like`, as host NumPy arrays (any mesh it was
    written on)."""
    abstract = {key: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), like)}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), abstract)
    args = ocp.args.PyTreeRestore(abstract, restore_args=restore_args, partial_restore=True)
    return manager.restore(step, args=ocp.args.Composite(state=args)).state[key]


def _shapes(tree) -> dict[str, tuple[int, ...]]:
    """Dotted parameter names → shapes (checkpoint metadata spells list indices as strings)."""

    def name(path) -> str:
        return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)

    return {name(path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def check_tree(found, expected, what: str, source: str) -> None:
    """Same names and shapes, or a ConfigError listing every difference."""
    flat_found, flat_expected = _shapes(found), _shapes(expected)
    problems = [f"missing {k}" for k in flat_expected if k not in flat_found]
    problems += [f"unexpected {k}" for k in flat_found if k not in flat_expected]
    problems += [
        f"{k}: the run expects {flat_expected[k]}, the file has {flat_found[k]}"
        for k in flat_expected
        if k in flat_found and flat_found[k] != flat_expected[k]
    ]
    if problems:
        shown = problems[:12] + ([f"... and {len(problems) - 12} more"] if len(problems) > 12 else [])
        raise ConfigError(f"{what}: {source} does not fit this run's model:\n  " + "\n  ".join(shown))


def read_start_weights(path: str, vit: ViTConfig, expected: dict, what: str) -> tuple[dict, ViTConfig]:
    """Weights to start from, as `{"backbone": ..., ["dino_head": ..., "ibot_head": ...]}` pure
    dicts shaped like `expected` (the run's abstract parameters: the sub-modules wanted), and `vit` with
    the file's RoPE periods (released files store bf16-rounded ones). Heads come only from a run
    folder of ours. `what` names the config key in every error."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"{what}: {p} does not exist")
    found = newest_checkpoint(p) if p.is_dir() else None
    if found is not None:
        manager, step = found
        saved = manager.item_metadata(step).state.tree["teacher"]
        check_tree(
            {k: v for k, v in saved.items() if k in expected}, expected, what, f"{p} (teacher of checkpoint {step})"
        )
        teacher = _restore_subtree(manager, step, "teacher", expected)
        manager.close()
        log.info("%s: the teacher of %s at step %d (backbone and heads)", what, p, step)
        return teacher, vit
    if p.is_dir() and (p / "teacher_backbone.safetensors").is_file():
        p = p / "teacher_backbone.safetensors"
    from dinov3_jax.weights import WeightsError, load_backbone

    try:
        model = load_backbone(weights=p)
    except (WeightsError, FileNotFoundError, ValueError) as err:
        raise ConfigError(f"{what}: {err}") from None
    diffs = structural_differences(vit, model.config)
    if diffs:
        raise ConfigError(f"{what}: {p} is not the run's architecture (student.*):\n  " + "\n  ".join(diffs))
    from flax import nnx

    backbone = nnx.state(model, nnx.Param).to_pure_dict()
    check_tree({"backbone": backbone}, {"backbone": expected["backbone"]}, what, str(p))
    log.info("%s: backbone from %s (fresh heads)", what, p)
    return {"backbone": jax.tree.map(np.asarray, backbone)}, vit.replace(rope_periods=model.config.rope_periods)


def restore_run_state(run_dir: str, like_state: dict, what: str) -> tuple[dict, int, set[str]]:
    """The newest checkpoint of another run, restored into this run's state layout (arrays placed
    like `like_state`; keys this run has and that run had not, such as a new Gram teacher, keep
    their values from `like_state`), its step, and those new keys."""
    found = newest_checkpoint(Path(run_dir).expanduser())
    if found is None:
        raise ConfigError(f"{what}: {run_dir} has no checkpoint (expected {run_dir}/checkpoints/<step>)")
    manager, step = found
    saved = manager.item_metadata(step).state.tree
    extra = set(like_state) - set(saved)
    target = {k: v for k, v in like_state.items() if k in saved}
    check_tree({k: saved[k] for k in target}, target, what, f"{run_dir} (checkpoint {step})")
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target)
    restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), target)
    # Partial: that run may hold what this one does not (e.g. a Gram teacher this stage drops).
    args = ocp.args.PyTreeRestore(abstract, restore_args=restore_args, partial_restore=True)
    restored = manager.restore(step, args=ocp.args.Composite(state=args)).state
    manager.close()
    log.info("%s: continuing %s from step %d%s", what, run_dir, step, f" (new: {sorted(extra)})" if extra else "")
    return {**like_state, **restored}, step, extra


def place_like(tree: dict, like: Any) -> Any:
    """Host arrays `tree` placed with the shardings and dtypes of the arrays `like`."""
    return jax.tree.map(lambda x, ref: jax.device_put(np.asarray(x, ref.dtype), ref.sharding), tree, like)
