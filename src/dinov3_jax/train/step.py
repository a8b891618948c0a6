"""The DINOv3 self-supervised train step as one pure function (paper §3; RECIPE.md §4–5).

`train_step(state, batch, sched) -> (state, metrics)`:
1. teacher (EMA, eval mode, unmasked global crops) → DINO and iBOT head logits → centred targets;
   with Gram anchoring (paper §4), the frozen Gram teacher's patch features of the same crops
   (optionally at a higher resolution), resized to the student's patch grid;
2. student (drop path, RoPE augmentation, masked global crops, then local crops) → head logits;
3. DINO (local→global and cross-global), iBOT (masked patches), KoLeo (per device group, or per
   group of `koleo_distributed_loss_group_size` samples) and Gram (per device group);
4. AdamW with parameter groups, then the EMA `teacher ← m·teacher + (1−m)·student`;
5. a NaN guard: a non-finite loss or gradient leaves the state unchanged and counts the streak.

The batch holds k micro-batches on a leading axis (`train.grad_accumulation_steps`; k = 1 runs the
plain program): step 1 runs over all of them and centres over the whole batch, steps 2–3 run
micro-batch by micro-batch with the gradients summed, steps 4–5 once, so that the step equals the
large-batch one (paper §3.2's Sinkhorn-Knopp is over the batch; naive accumulation would change it).

In distillation a frozen teacher gives the targets of step 1; with several students
(`make_multi_student_step`) it runs once and steps 2–5 run per student (paper §5.2).

State and batch are plain pytrees; the NNX graph definitions are static closures, so the step is
jitted once per batch shape (one crop-size pair) with explicit shardings and a donated state. The
Gram branch is there or not by the static `LossConfig.gram`, never by a traced value; the Gram
teacher's refresh from the EMA teacher is a separate copy the trainer makes between steps.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dinov3_jax.losses import (
    dino_loss,
    gram_loss,
    ibot_loss,
    koleo_loss,
    resize_patch_features,
    sinkhorn_knopp,
    softmax_center,
    update_center,
)
from dinov3_jax.losses.diagnostics import effective_rank, mean_entropy, prototypes_in_use
from dinov3_jax.models.heads import SSLModel, l2_normalize
from dinov3_jax.train.optim import submodule_norms

Array = jax.Array
PyTree = Any


@dataclasses.dataclass(frozen=True)
class GramConfig:
    """Static Gram-anchoring settings (`gram.*`, RECIPE.md §4.5)."""

    normalized: bool = True
    img_level: bool = False
    remove_neg: bool = False
    remove_only_teacher_neg: bool = False
    # compat.gram_remove_only_teacher_neg_as_official: the student is never masked in that mode.
    teacher_neg_as_official: bool = True
    tokens_used: str = "all"
    resize_method: str = "bicubic"
    resize_antialias: bool = False
    # The EMA teacher's patch features are the targets (no separate Gram teacher).
    ema_teacher: bool = False
    # Gram matrices per group of consecutive images, one group per device (the official per-rank loss).
    groups: int = 1


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """Static distillation settings (`distillation.*`, dinov3_jax.train.distill)."""

    # "heads" (the teacher's DINO/iBOT targets) or "features" (its tokens, through projectors).
    objective: str = "heads"
    # The teacher sees the global crops downscaled by this factor (1: as they are).
    scale: float = 1.0


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Static loss settings (RECIPE.md §4.6)."""

    n_local_crops: int
    student_temp: float = 0.1
    dino_weight: float = 1.0
    ibot_weight: float = 1.0
    koleo_weight: float = 0.1
    global_ignore_diagonal: bool = True
    # "sinkhorn_knopp" (DINOv3) or "softmax" (DINO v1: softmax around an EMA centre).
    centering: str = "sinkhorn_knopp"
    center_momentum: float = 0.9
    # KoLeo nearest neighbours are searched within groups of consecutive samples, one group per
    # device, as the official per-rank loss does (RECIPE.md §4.4), or of
    # dino.koleo_distributed_loss_group_size samples (distributed KoLeo).
    koleo_groups: int = 1
    # Gram anchoring; None = no Gram loss.
    gram: GramConfig | None = None
    # Distillation from a frozen teacher; None = self-distillation from the EMA teacher.
    distill: DistillConfig | None = None


# ---------------------------------------------------------------------------------------------
# Batch layout
# ---------------------------------------------------------------------------------------------


def to_micro_batches(
    batch: dict[str, np.ndarray], n_micro: int, n_devices_local: int, process_index: int = 0
) -> dict[str, np.ndarray]:
    """Host batch (crop-major, as the data pipeline and the official collate produce it) → the
    layout of the step: `n_micro` micro-batches of m = B / n_micro consecutive samples stacked on a
    leading axis (gradient accumulation; one when there is none), each sample-major: crops
    [n_micro, m, n_crops, ...], masks [n_micro, m, 2, N], labels [n_micro, m], and per micro-batch the
    masked patches as indices into the sample-major flattening [m_global · 2 · N] of the global
    micro-batch (this process's m samples start at process_index · m) with their iBOT weights
    (1 / masked count of the crop; 0 on padding).

    The index list has a static length: the masked counts of a batch's crops are always the same
    multiset (`data.masking.mask_targets`, only their placement is random), so the largest number
    a micro-batch can hold, the sum of the 2m largest counts, depends on the shapes alone. It is
    padded to a multiple of the local device count so it shards evenly."""
    g = batch["global_crops"]
    b = g.shape[0] // 2
    if b % n_micro:
        raise ValueError(f"a host batch of {b} images does not split into {n_micro} micro-batches")
    m = b // n_micro

    def micro(x: np.ndarray) -> np.ndarray:  # crop-major [C·B, ...] → [n_micro, m, C, ...]
        x = x.reshape(x.shape[0] // b, b, *x.shape[1:]).swapaxes(0, 1)
        return x.reshape(n_micro, m, *x.shape[1:])

    out = {
        key: micro(batch[key]) for key in ("global_crops", "local_crops", "masks", "gram_teacher_crops") if key in batch
    }
    out["labels"] = batch["labels"].reshape(n_micro, m)
    masks = out["masks"].reshape(n_micro, -1)  # [n_micro, m·2·N], sample-major within each micro-batch
    counts = out["masks"].sum(axis=-1)  # [n_micro, m, 2]
    bound = int(np.sort(counts, axis=None)[::-1][: 2 * m].sum())
    length = max(n_devices_local, -(-bound // n_devices_local) * n_devices_local)
    out["mask_indices"] = np.zeros((n_micro, length), np.int32)
    out["mask_weights"] = np.zeros((n_micro, length), np.float32)
    n_patches = batch["masks"].shape[1]
    for j in range(n_micro):
        flat = np.flatnonzero(masks[j])
        out["mask_indices"][j, : len(flat)] = flat + process_index * m * 2 * n_patches
        out["mask_weights"][j, : len(flat)] = 1.0 / counts[j].reshape(-1)[flat // n_patches]
    return out


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------


def _crops_first(x_bck: Array, b: int) -> Array:
    """[B·C, K] sample-major → [C, B, K] (the [crops, batch, K] layout of the DINO loss)."""
    return x_bck.reshape(b, -1, x_bck.shape[-1]).swapaxes(0, 1)


def teacher_logits(teacher: SSLModel, batch: dict) -> tuple[Array, Array, Array]:
    """The teacher's head logits: DINO [2B, K] of the global crops' CLS tokens (sample-major),
    iBOT [M, K] of the patches at the mask positions; and its patch features [2B, P, D]."""
    g = batch["global_crops"]
    out = teacher.backbone.forward_features(g.reshape(g.shape[0] * 2, *g.shape[2:]))
    cls_logits = teacher.dino_head(out["x_norm_clstoken"]).astype(jnp.float32)
    all_patches = out["x_norm_patchtokens"]
    patches = all_patches.reshape(-1, all_patches.shape[-1])[batch["mask_indices"]]
    patch_logits = teacher.ibot_head(patches).astype(jnp.float32)
    return cls_logits, patch_logits, jax.lax.stop_gradient(all_patches)


def center_targets(logits: tuple[Array, Array], batch: dict, temp: Array, centers: dict, lc: LossConfig):
    """Centred teacher probabilities of the `teacher_logits` of every micro-batch (DINO
    [n_micro, 2m, K], iBOT [n_micro, M, K]): DINO [n_micro, 2, m, K] and iBOT [n_micro, M, K] (zero
    rows where the mask index list is padding); and the centres after the softmax-centering update
    (unchanged with Sinkhorn-Knopp). Both are computed over the whole effective batch, all
    micro-batches at once, so that gradient accumulation does not change the targets."""
    cls_logits, patch_logits = (x.reshape(-1, x.shape[-1]) for x in logits)
    valid = (batch["mask_weights"].reshape(-1) > 0).astype(jnp.float32)
    if lc.centering == "sinkhorn_knopp":
        dino_t = sinkhorn_knopp(cls_logits, temp)
        ibot_t = sinkhorn_knopp(patch_logits, temp, weights=valid)
        new_centers = centers
    else:
        dino_t = softmax_center(cls_logits, centers["dino"], temp)
        ibot_t = softmax_center(patch_logits, centers["ibot"], temp) * valid[:, None]
        new_centers = {
            "dino": update_center(centers["dino"], cls_logits, lc.center_momentum),
            "ibot": update_center(centers["ibot"], patch_logits, lc.center_momentum, weights=valid),
        }
    n_micro, m = batch["global_crops"].shape[:2]
    dino_t = jax.vmap(_crops_first, in_axes=(0, None))(dino_t.reshape(n_micro, 2 * m, -1), m)
    return jax.lax.stop_gradient((dino_t, ibot_t.reshape(logits[1].shape))), new_centers


def each_micro_batch(fn, batch: dict, *args):
    """`fn(micro_batch, *args)` for every micro-batch of `batch` (leading axis), outputs stacked:
    one after the other (`lax.map`), so that only one micro-batch's activations live at a time."""
    if batch["global_crops"].shape[0] == 1:  # no accumulation: the plain program
        return jax.tree.map(lambda x: x[None], fn(jax.tree.map(lambda x: x[0], batch), *args))
    return jax.lax.map(lambda micro: fn(micro, *args), batch)


def gram_targets(gram_teacher: nnx.Module, batch: dict, grid: tuple[int, int], gc: GramConfig) -> Array:
    """The Gram teacher's patch features [2B, h·w, D] of the global crops (or of the Gram-teacher
    crops, the same views at a higher resolution), resized to the student's patch grid `grid`."""
    crops = batch.get("gram_teacher_crops", batch["global_crops"])
    b = crops.shape[0]
    out = gram_teacher.forward_features(crops.reshape(b * 2, *crops.shape[2:]))
    patches = out["x_norm_patchtokens"]
    return jax.lax.stop_gradient(resize_to_grid(patches, crops.shape[2:4], gram_teacher.config.patch_size, grid, gc))


def resize_to_grid(patches: Array, image_hw, patch: int, grid: tuple[int, int], gc: GramConfig) -> Array:
    """[N, h_T·w_T, D] patch features of images of size `image_hw` → [N, h·w, D] on `grid`."""
    src = (image_hw[0] // patch, image_hw[1] // patch)
    if src == tuple(grid):
        return patches
    x = patches.reshape(patches.shape[0], *src, patches.shape[-1])
    x = resize_patch_features(x, tuple(grid), method=gc.resize_method, antialias=gc.resize_antialias)
    return x.reshape(patches.shape[0], grid[0] * grid[1], -1)


def teacher_view(batch: dict, scale: float) -> dict:
    """The batch as a distillation teacher sees it: the global crops [B, 2, H, W, 3] downscaled by
    `scale` (antialiased bilinear), so that its patch grid is the student's."""
    if scale == 1:
        return batch
    g = batch["global_crops"]
    size = (round(g.shape[2] / scale), round(g.shape[3] / scale))
    return {**batch, "global_crops": jax.image.resize(g, (*g.shape[:2], *size, g.shape[4]), "linear", antialias=True)}


def teacher_tokens(backbone: nnx.Module, batch: dict) -> tuple[Array, Array]:
    """A frozen teacher's normalised CLS [2B, D] and patch tokens [2B, P, D] of the global crops
    (the targets of feature distillation)."""
    g = batch["global_crops"]
    out = backbone.forward_features(g.reshape(g.shape[0] * 2, *g.shape[2:]))
    return jax.lax.stop_gradient((out["x_norm_clstoken"], out["x_norm_patchtokens"]))


def _weighted_total(
    lc: LossConfig, weights: dict, n_local: int, local: Array, global_: Array, patch: Array, koleo: Array
):
    """The loss: the CLS terms with the DINOv2-style scales of the local→global and cross-global
    pairs (RECIPE.md §4.2), the patch term and KoLeo, each with its weight."""
    terms_global = 2 if lc.global_ignore_diagonal else 4
    terms_local = 2 * n_local
    scale_global, scale_local = terms_global / (terms_global + terms_local), terms_local / (terms_global + terms_local)
    return (
        lc.dino_weight * (scale_local * weights["dino_local_weight"] * local + scale_global * global_)
        + lc.koleo_weight * 2 * koleo
        + lc.ibot_weight * patch
    )


def _koleo(cls_2b: Array, b: int, lc: LossConfig) -> Array:
    """KoLeo of each global crop's CLS tokens [2B, D] within groups of consecutive samples."""
    cls = cls_2b.reshape(b, 2, -1)
    return jnp.mean(
        jnp.stack([koleo_loss(cls[:, c].reshape(lc.koleo_groups, b // lc.koleo_groups, -1)) for c in range(2)])
    )


def feature_losses(
    student: nnx.Module, batch: dict, tokens: tuple[Array, Array], key: Array, weights: dict, lc: LossConfig
):
    """Feature distillation (`distillation.objective=features`): cosine distances of the student's
    projected tokens to the teacher's `tokens` (CLS [2B, D_t], patches [2B, P, D_t]): global CLS
    to the same crop's, every local crop's CLS to both global crops' of its image, every patch to
    the same patch; KoLeo on the student's CLS. Weighted by `dino.loss_weight` (CLS terms, with
    the DINO global/local scales), `ibot.loss_weight` (patches) and the KoLeo weight."""
    t_cls, t_patch = tokens
    g, loc = batch["global_crops"], batch["local_crops"]
    b, n_local = g.shape[0], loc.shape[1]
    k_global, k_local = jax.random.split(key)

    def distance(s: Array, t: Array) -> Array:
        s, t = s.astype(jnp.float32), t.astype(jnp.float32)
        return 1.0 - jnp.sum(l2_normalize(s, 1e-12) * l2_normalize(t, 1e-12), axis=-1)

    out_g = student.backbone.forward_features(g.reshape(b * 2, *g.shape[2:]), training=True, key=k_global)
    cls_global = jnp.mean(distance(student.cls_projector(out_g["x_norm_clstoken"]), t_cls))
    patch = jnp.mean(distance(student.patch_projector(out_g["x_norm_patchtokens"]), t_patch))
    cls_local = jnp.zeros((), jnp.float32)
    if n_local:
        out_l = student.backbone.forward_features(
            loc.reshape(b * n_local, *loc.shape[2:]), training=True, key=k_local, local_crops=True
        )
        s_local = student.cls_projector(out_l["x_norm_clstoken"]).reshape(b, n_local, 1, -1)
        cls_local = jnp.mean(distance(s_local, t_cls.reshape(b, 1, 2, -1)))
    koleo = _koleo(out_g["x_norm_clstoken"], b, lc)
    total = _weighted_total(lc, weights, n_local, cls_local, cls_global, patch, koleo)
    rank = effective_rank(jax.lax.stop_gradient(out_g["x_norm_clstoken"]))
    return total, {
        "cls_local": cls_local,
        "cls_global": cls_global,
        "patch": patch,
        "koleo": koleo,
        "cls_effective_rank": rank,
    }


def student_losses(
    student: SSLModel,
    batch: dict,
    targets,
    gram_t: Array | None,
    key: Array,
    weights: dict,
    lc: LossConfig,
    *,
    masked: bool = True,
):
    """The total loss and its terms. `gram_t` [2B, P, D]: the Gram targets (None without Gram);
    `weights`: this step's `dino_local_weight` and `gram_weight`. `masked=False` (distillation)
    feeds the global crops unmasked; the iBOT terms still use the sampled mask positions."""
    dino_t, ibot_t = targets
    g, loc = batch["global_crops"], batch["local_crops"]
    b, n_local = g.shape[0], loc.shape[1]
    k_global, k_local = jax.random.split(key)
    masks = batch["masks"].reshape(b * 2, -1)
    out_g = student.backbone.forward_features(
        g.reshape(b * 2, *g.shape[2:]), masks if masked else None, training=True, key=k_global
    )
    s_global = _crops_first(student.dino_head(out_g["x_norm_clstoken"]), b)
    patches = out_g["x_norm_patchtokens"]
    s_patch = student.ibot_head(patches.reshape(-1, patches.shape[-1])[batch["mask_indices"]])

    if n_local:
        out_l = student.backbone.forward_features(
            loc.reshape(b * n_local, *loc.shape[2:]), training=True, key=k_local, local_crops=True
        )
        s_local = _crops_first(student.dino_head(out_l["x_norm_clstoken"]), b)
        dino_local = dino_loss(s_local, dino_t, student_temp=lc.student_temp, ignore_diagonal=False)
    else:  # global crops only (crops.local_crops_number=0): no local term, the global one has all the weight
        dino_local = jnp.zeros((), jnp.float32)
    dino_global = dino_loss(s_global, dino_t, student_temp=lc.student_temp, ignore_diagonal=lc.global_ignore_diagonal)
    ibot = ibot_loss(s_patch, ibot_t, batch["mask_weights"], n_images=2 * b, student_temp=lc.student_temp)
    koleo = _koleo(out_g["x_norm_clstoken"], b, lc)
    total = _weighted_total(lc, weights, n_local, dino_local, dino_global, ibot, koleo)
    metrics = {
        "dino_local": dino_local,
        "dino_global": dino_global,
        "ibot": ibot,
        "koleo": koleo,
        # Learning or collapse (losses.diagnostics): below 0, the student predicts better than chance.
        "dino_global_minus_log_k": dino_global - jnp.log(s_global.shape[-1]),
        "student_entropy": mean_entropy(jax.nn.softmax(s_global.astype(jnp.float32) / lc.student_temp, axis=-1)),
        "cls_effective_rank": effective_rank(jax.lax.stop_gradient(out_g["x_norm_clstoken"])),
    }
    if lc.gram is not None:
        gc = lc.gram
        groups = lambda x: x.reshape(gc.groups, -1, *x.shape[1:])  # noqa: E731 (consecutive images per device)
        token_mask = None
        if gc.tokens_used != "all":
            masked = masks.astype(bool)
            token_mask = groups(masked if gc.tokens_used == "masked" else ~masked)
        gram = gram_loss(
            groups(patches),
            groups(gram_t),
            normalized=gc.normalized,
            img_level=gc.img_level,
            remove_neg=gc.remove_neg,
            remove_only_teacher_neg=gc.remove_only_teacher_neg,
            teacher_neg_as_official=gc.teacher_neg_as_official,
            token_mask=token_mask,
        )
        total = total + weights["gram_weight"] * gram
        metrics["gram"] = gram
    return total, metrics


# ---------------------------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------------------------


def all_finite(tree: PyTree) -> Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def make_student_update(student_def: nnx.GraphDef, tx: optax.GradientTransformation, lc: LossConfig):
    """`update(state, batch, sched, targets, gram_t, centers, key) -> (student_state, metrics)`:
    one student's loss, gradient, AdamW update and EMA, from the teacher's `targets` (and the
    centres they updated), under the NaN guard: a non-finite loss or gradient leaves the student's
    part of the state (student, teacher, opt_state, centers and the NaN counters) unchanged and counts the streak."""
    features = lc.distill is not None and lc.distill.objective == "features"

    def loss_fn(params, micro: tuple, sched: dict):
        batch, targets, gram_t, key = micro
        student = nnx.merge(student_def, nnx.State(params))
        if features:
            return feature_losses(student, batch, targets, key, sched, lc)
        return student_losses(student, batch, targets, gram_t, key, sched, lc, masked=lc.distill is None)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def accumulated_grads(params, batch: dict, targets, gram_t, key, sched: dict):
        """`((loss, terms), gradient)` of the effective batch: the mean over the micro-batches (of
        equal size) of each one's, run one after the other (`lax.scan`) with the gradients summed
        in fp32. Each micro-batch draws its own drop path and RoPE augmentation."""
        n_micro = batch["global_crops"].shape[0]
        first = jax.tree.map(lambda x: x[0], (batch, targets, gram_t))
        if n_micro == 1:  # no accumulation: the plain program
            return grad_fn(params, (*first, key), sched)

        def add(total, j_and_micro):
            j, micro = j_and_micro
            return jax.tree.map(jnp.add, total, grad_fn(params, (*micro, jax.random.fold_in(key, j)), sched)), None

        shapes = jax.eval_shape(grad_fn, params, (*first, key), sched)
        zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
        total, _ = jax.lax.scan(add, zeros, (jnp.arange(n_micro), (batch, targets, gram_t)))
        return jax.tree.map(lambda x: x / n_micro, total)

    def update(state: dict, batch: dict, sched: dict, targets, gram_t, centers, key) -> tuple[dict, dict]:
        (loss, parts), grads = accumulated_grads(state["student"], batch, targets, gram_t, key, sched)
        updates, opt_state = tx.update(
            grads,
            state["opt_state"],
            state["student"],
            lr=sched["lr"],
            wd=sched["wd"],
            last_layer_lr=sched["last_layer_lr"],
            backbone_lr_scale=sched["backbone_lr_scale"],
        )
        student = optax.apply_updates(state["student"], updates)
        m = sched["momentum"]
        teacher_params = jax.tree.map(lambda t, s: m * t + (1 - m) * s, state["teacher"], student)

        finite = jnp.isfinite(loss) & all_finite(grads)
        streak = jnp.where(finite, 0, state["nan_streak"] + 1)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        new_state = {
            "student": keep(student, state["student"]),
            "teacher": keep(teacher_params, state["teacher"]),
            "opt_state": keep(opt_state, state["opt_state"]),
            "centers": keep(centers, state["centers"]),
            "nan_streak": streak,
            "nan_worst_streak": jnp.maximum(state["nan_worst_streak"], streak),
            "nan_total": state["nan_total"] + (~finite).astype(jnp.int32),
        }
        norms = {f"grad_norm_{k}": v for k, v in submodule_norms(grads).items()}  # before clipping
        if not features:  # the teacher's DINO targets [n_micro, 2, m, K] over the whole batch
            parts = parts | {
                "teacher_entropy": mean_entropy(targets[0]),
                "prototypes_in_use": prototypes_in_use(targets[0]),
            }
        return new_state, {"loss": loss, **parts, **norms, "finite": finite, "nan_streak": streak, **sched}

    return update


def _step_key(state: dict) -> Array:
    return jax.random.fold_in(jax.random.wrap_key_data(state["key"]), state["step"])


def _stop_asked(batch: dict) -> Array:
    """Whether any process was asked to stop (SIGTERM / SIGINT): every process reads the same answer."""
    return jnp.any(batch["stop"]) if "stop" in batch else jnp.zeros((), bool)


def make_train_step(
    student_def: nnx.GraphDef,
    teacher_def: nnx.GraphDef,
    tx: optax.GradientTransformation,
    lc: LossConfig,
    gram_def: nnx.GraphDef | None = None,
    distill_def: nnx.GraphDef | None = None,
):
    """The pure step. `state` = {student, teacher, opt_state, centers, step, nan_streak,
    nan_worst_streak, nan_total, key} and, with a separate Gram teacher, `gram_teacher` (the
    parameters of the backbone `gram_def`, never updated here); in distillation `distill_teacher`
    (the parameters of the frozen `distill_def`, never updated) gives the targets and `teacher` is
    the student's EMA. `sched` = this step's schedule values (lr, wd, momentum, teacher_temp,
    last_layer_lr, backbone_lr_scale, dino_local_weight, gram_weight) as scalars, so changing
    them never recompiles."""
    update = make_student_update(student_def, tx, lc)

    def train_step(state: dict, batch: dict, sched: dict) -> tuple[dict, dict]:
        # The teacher's pass over every micro-batch comes first, without gradients, and its targets
        # are centred over all of them (DINO-correct gradient accumulation).
        temp, centers = sched["teacher_temp"], state["centers"]
        if lc.distill is None:
            ema = lambda micro, p: teacher_logits(nnx.merge(teacher_def, nnx.State(p)), micro)  # noqa: E731
            cls_logits, patch_logits, teacher_patches = each_micro_batch(ema, batch, state["teacher"])
            targets, centers = center_targets((cls_logits, patch_logits), batch, temp, centers, lc)
        else:
            targets, shared = each_micro_batch(
                distill_targets, batch, distill_def, state["distill_teacher"], lc.distill
            )
            if shared is not None:
                targets, centers = center_targets(shared, batch, temp, centers, lc)
        gram_t = None
        if lc.gram is not None and lc.gram.ema_teacher:
            gram_t = teacher_patches
        elif lc.gram is not None:
            patch = nnx.merge(teacher_def, nnx.State(state["teacher"])).backbone.config.patch_size

            def gram_of(micro, p):
                grid = tuple(size // patch for size in micro["global_crops"].shape[2:4])
                return gram_targets(nnx.merge(gram_def, nnx.State(p)), micro, grid, lc.gram)

            gram_t = each_micro_batch(gram_of, batch, state["gram_teacher"])

        student_state, metrics = update(state, batch, sched, targets, gram_t, centers, _step_key(state))
        # The Gram and distillation teachers (if any) pass through unchanged.
        new_state = {**state, **student_state, "step": state["step"] + 1}
        return new_state, {**metrics, "stop": _stop_asked(batch)}

    return train_step


def distill_targets(batch: dict, distill_def: nnx.GraphDef, params: dict, dc: DistillConfig):
    """What the frozen teacher gives every student: `(tokens, None)` for feature distillation,
    `(None, (DINO logits, iBOT logits))` for the heads objective (each student centres them with
    its own temperature)."""
    frozen = nnx.merge(distill_def, nnx.State(params))
    view = teacher_view(batch, dc.scale)
    if dc.objective == "features":
        return teacher_tokens(frozen, view), None
    cls_logits, patch_logits, _ = teacher_logits(frozen, view)
    return None, (cls_logits, patch_logits)


def make_multi_student_step(students: dict[str, tuple], distill_def: nnx.GraphDef, dc: DistillConfig):
    """The step of a multi-distillation run (paper §5.2): the frozen teacher runs once on the batch
    and every student, `students[name] = (student_def, tx, lc)`, takes its update from it, as its
    single-student run would (the same batch, masks and random key; its own temperature,
    optimizer, schedules, EMA and NaN guard). `state` = {students: {name: that student's part},
    distill_teacher, step, key}; `sched` = {name: that student's schedule values}. Metrics are
    `name/metric`, plus the longest NaN streak and the stop flag."""
    updates = {name: make_student_update(sdef, tx, lc) for name, (sdef, tx, lc) in students.items()}

    def train_step(state: dict, batch: dict, sched: dict) -> tuple[dict, dict]:
        tokens, logits = each_micro_batch(distill_targets, batch, distill_def, state["distill_teacher"], dc)
        key = _step_key(state)
        new_students, metrics = {}, {}
        for name, update in updates.items():
            sub = state["students"][name]
            targets, centers = tokens, sub["centers"]
            if logits is not None:
                targets, centers = center_targets(
                    logits, batch, sched[name]["teacher_temp"], centers, students[name][2]
                )
            new_students[name], m = update(sub, batch, sched[name], targets, None, centers, key)
            metrics |= {f"{name}/{k}": v for k, v in m.items()}
        streak = jnp.max(jnp.stack([s["nan_streak"] for s in new_students.values()]))
        new_state = {**state, "students": new_students, "step": state["step"] + 1}
        return new_state, {**metrics, "nan_streak": streak, "stop": _stop_asked(batch)}

    return train_step
