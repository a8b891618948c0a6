"""AdamW with the DINOv3 parameter groups (RECIPE.md §5.2 step 4–6, §5.3).

Parameter groups are rules on parameter *paths* relative to each student sub-module
(`backbone`, `dino_head`, `ibot_head`), evaluated at trace time, so the labels are Python
constants folded into the jitted update:

* lr multiplier: layer-wise decay in the backbone, `decay ** (L + 1 − layer_id)` with layer 0 for
  the patch embedding and the tokens, `i + 1` for `blocks.i`, `L + 1` for everything else;
  `patch_embed.*` additionally × `patch_embed_lr_mult`; heads × 1.
* weight-decay multiplier: 0 for biases, for anything whose path contains "norm" and for
  LayerScale `gamma`; 1 otherwise (tokens and the patch-embed kernel included, as upstream).
* last layer: paths containing `last_layer` (both heads) follow the last-layer lr schedule.

The update (PyTorch AdamW semantics): gradients clipped by global norm *per sub-module* with
factor `min(max_norm / (norm + 1e-6), 1)`; Adam moments with bias correction, eps 1e-8;
`θ ← θ − lr_g·wd_g·θ − lr_g·m̂/(√v̂ + eps)`. A zero lr (the last-layer freeze) zeroes the step and
the decay while the moments keep updating.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

PyTree = Any

_TOKENS = ("patch_embed", "cls_token", "storage_tokens", "mask_token", "pos_embed")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


# ---------------------------------------------------------------------------------------------
# Paths and labels
# ---------------------------------------------------------------------------------------------


def _key_name(k: Any) -> str:
    if isinstance(k, jax.tree_util.DictKey):
        return str(k.key)
    if isinstance(k, jax.tree_util.SequenceKey):
        return str(k.idx)
    if isinstance(k, jax.tree_util.GetAttrKey):
        return k.name
    if isinstance(k, jax.tree_util.FlattenedIndexKey):
        return str(k.key)
    return str(k)


def path_names(path: tuple) -> list[str]:
    """Dotted-name parts of a pytree path; the trailing `.value` of an `nnx.Variable` leaf is
    dropped, so `nnx.State` trees and pure nested dicts give the same names."""
    names = [_key_name(k) for k in path]
    if names and isinstance(path[-1], jax.tree_util.GetAttrKey) and names[-1] in ("value", "raw_value"):
        names = names[:-1]
    return names


def count_blocks(params: PyTree, submodule: str = "backbone") -> int:
    """Number of transformer blocks L under `submodule` (0 when it has no `blocks`)."""
    n = 0
    for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = path_names(path)
        if len(names) > 2 and names[0] == submodule and names[1] == "blocks":
            n = max(n, int(names[2]) + 1)
    return n


def leaf_labels(
    submodule: str,
    name: str,
    *,
    n_blocks: int,
    layerwise_decay: float,
    patch_embed_lr_mult: float,
    dino_head_wd_mult: float = 1.0,
) -> tuple[float, float, bool]:
    """(lr_mult, wd_mult, is_last_layer) of the parameter `name` (dotted, relative to the
    student sub-module `submodule`)."""
    lr_mult = 1.0
    if submodule == "backbone" and n_blocks > 0:
        m = _BLOCK.match(name)
        if any(t in name for t in _TOKENS):
            layer_id = 0
        elif m:
            layer_id = int(m.group(1)) + 1
        else:
            layer_id = n_blocks + 1
        lr_mult = layerwise_decay ** (n_blocks + 1 - layer_id)
        if "patch_embed" in name:
            lr_mult *= patch_embed_lr_mult
    no_decay = name.endswith("bias") or "norm" in name or "gamma" in name
    wd_mult = 0.0 if no_decay else (dino_head_wd_mult if submodule == "dino_head" else 1.0)
    return lr_mult, wd_mult, "last_layer" in name


def _labels_flat(
    params: PyTree, n_blocks: int, layerwise_decay: float, patch_embed_lr_mult: float, dino_head_wd_mult: float = 1.0
):
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    labels = []
    for path, _ in leaves:
        names = path_names(path)
        labels.append(
            leaf_labels(
                names[0] if names else "",
                ".".join(names[1:]),
                n_blocks=n_blocks,
                layerwise_decay=layerwise_decay,
                patch_embed_lr_mult=patch_embed_lr_mult,
                dino_head_wd_mult=dino_head_wd_mult,
            )
        )
    return labels, treedef


def param_labels(
    params: PyTree,
    *,
    layerwise_decay: float = 0.9,
    patch_embed_lr_mult: float = 0.2,
    n_blocks: int | None = None,
) -> tuple[PyTree, PyTree, PyTree]:
    """(lr_mult, wd_mult, is_last_layer): three pytrees shaped like `params` with Python float /
    bool leaves. `params` has the student sub-modules at its top level (`backbone`, `dino_head`,
    `ibot_head`); `n_blocks` defaults to the number of `backbone.blocks`."""
    if n_blocks is None:
        n_blocks = count_blocks(params)
    labels, treedef = _labels_flat(params, n_blocks, layerwise_decay, patch_embed_lr_mult)
    return tuple(jax.tree_util.tree_unflatten(treedef, [lab[i] for lab in labels]) for i in range(3))


# ---------------------------------------------------------------------------------------------
# Clipping and the optimizer
# ---------------------------------------------------------------------------------------------


def submodule_norms(grads: PyTree) -> dict[str, jax.Array]:
    """The global L2 norm of each top-level sub-module's gradients (backbone, dino_head, ibot_head)."""
    sq: dict[str, jax.Array] = {}
    for path, x in jax.tree_util.tree_flatten_with_path(grads)[0]:
        g = path_names(path)[0] if len(path) else ""
        sq[g] = sq.get(g, 0.0) + jnp.sum(jnp.square(x.astype(jnp.float32)))
    return {g: jnp.sqrt(s) for g, s in sq.items()}


def clip_by_submodule(grads: PyTree, max_norm: float) -> tuple[PyTree, dict[str, jax.Array]]:
    """Scales the gradients of each top-level sub-module by `min(max_norm / (norm + 1e-6), 1)`,
    with `norm` that sub-module's global L2 norm (PyTorch `clip_grad_norm_`). Returns the clipped
    gradients and the pre-clipping norms."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(grads)
    groups = [path_names(p)[0] if len(p) else "" for p, _ in leaves]
    norms = submodule_norms(grads)
    factors = {g: jnp.minimum(max_norm / (n + 1e-6), 1.0) for g, n in norms.items()}
    clipped = [(x * factors[g]).astype(x.dtype) for g, (_, x) in zip(groups, leaves)]
    return jax.tree_util.tree_unflatten(treedef, clipped), norms


class DinoAdamWState(NamedTuple):
    """Adam moments (`optax.ScaleByAdamState`: count, mu, nu)."""

    adam: optax.ScaleByAdamState


def make_optimizer(
    *,
    params: PyTree,
    b1: float = 0.9,
    b2: float = 0.999,
    clip_grad: float | None = 3.0,
    layerwise_decay: float = 0.9,
    patch_embed_lr_mult: float = 0.2,
    dino_head_wd_mult: float = 1.0,
    eps: float = 1e-8,
) -> optax.GradientTransformationExtraArgs:
    """DINOv3 AdamW. `update(grads, state, params, *, lr, wd, last_layer_lr, backbone_lr_scale=1)`
    returns updates to add to the parameters (`optax.apply_updates`); lr, wd, last_layer_lr and
    the backbone's lr factor are this step's schedule values (scalars, traced). `params` fixes the number of backbone blocks for the
    layer-wise decay; the labels themselves are re-derived from the paths of each call's tree, so
    `nnx.State` trees and pure nested dicts both work. `clip_grad` None or 0 disables clipping.
    """
    n_blocks = count_blocks(params)
    adam = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)

    def init(params: PyTree) -> DinoAdamWState:
        return DinoAdamWState(adam=adam.init(params))

    def update(grads, state, params=None, *, lr, wd, last_layer_lr, backbone_lr_scale=1.0, **unused):
        del unused
        if params is None:
            raise ValueError("the DINOv3 AdamW update needs `params` (decoupled weight decay)")
        if clip_grad:
            grads, _ = clip_by_submodule(grads, clip_grad)
        adam_updates, adam_state = adam.update(grads, state.adam, params)
        labels, treedef = _labels_flat(params, n_blocks, layerwise_decay, patch_embed_lr_mult, dino_head_wd_mult)
        paths_and_leaves = jax.tree_util.tree_flatten_with_path(params)[0]
        in_backbone = [path_names(path)[:1] == ["backbone"] for path, _ in paths_and_leaves]
        p_leaves = [leaf for _, leaf in paths_and_leaves]
        u_leaves = treedef.flatten_up_to(adam_updates)
        out = []
        for u, p, (lm, wm, last), backbone in zip(u_leaves, p_leaves, labels, in_backbone):
            lr_g = (last_layer_lr if last else lr) * lm
            if backbone:  # 0 while the backbone is frozen (optim.freeze_backbone_epochs): no step, no decay
                lr_g = lr_g * backbone_lr_scale
            step = u + (wd * wm) * p if wm else u
            out.append((-lr_g * step).astype(p.dtype))
        return jax.tree_util.tree_unflatten(treedef, out), DinoAdamWState(adam=adam_state)

    return optax.GradientTransformationExtraArgs(init, update)


def optimizer_from_config(cfg: Any, params: PyTree) -> optax.GradientTransformationExtraArgs:
    """`make_optimizer` with the official `optim.*` keys (adamw_beta1/2, clip_grad,
    layerwise_decay, patch_embed_lr_mult, and dino_head_wd_multiplier unless
    compat.dino_head_wd_multiplier_never_applies reproduces the official no-op)."""
    optim = cfg.optim
    return make_optimizer(
        params=params,
        b1=float(getattr(optim, "adamw_beta1", 0.9)),
        b2=float(getattr(optim, "adamw_beta2", 0.999)),
        clip_grad=getattr(optim, "clip_grad", 3.0),
        layerwise_decay=float(getattr(optim, "layerwise_decay", 0.9)),
        patch_embed_lr_mult=float(getattr(optim, "patch_embed_lr_mult", 0.2)),
        dino_head_wd_mult=1.0 if cfg.compat.dino_head_wd_multiplier_never_applies else optim.dino_head_wd_multiplier,
    )
