"""Per-iteration schedules of the DINOv3 recipes (RECIPE.md §5.4).

Two systems, as upstream:

* **v1** (`cosine_schedule`, the default and ViT-L IN-1k configs): linear warmup that *includes*
  its endpoint, then a cosine that never quite reaches `final` within the run; the index past
  the end returns `final`.
* **v2** (`linear_warmup_cosine_decay`, used when the config has a top-level `schedules`
  section): warmup that *excludes* its endpoint, a cosine that ends exactly on `end`, then
  constant `end`.

Every schedule is a float64 NumPy array with one value per iteration, evaluated on the host;
`Schedules.at(step)` returns plain floats that the trainer feeds to the jitted step as scalars.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

SCALING_RULES = ("sqrt_wrt_1024", "linear_wrt_256", "none")


# ---------------------------------------------------------------------------------------------
# Schedule shapes
# ---------------------------------------------------------------------------------------------


def cosine_schedule(
    base: float,
    final: float,
    total_iters: int,
    warmup_iters: int = 0,
    start_warmup: float = 0.0,
    freeze_iters: int = 0,
) -> np.ndarray:
    """v1 schedule [total_iters]: `freeze_iters` zeros, `linspace(start_warmup, base,
    warmup_iters)` (endpoint included), then `final + ½(base − final)(1 + cos(π i / N))` for
    i = 0..N−1 over the N remaining iterations."""
    n = total_iters - warmup_iters - freeze_iters
    if n < 0:
        raise ValueError(f"freeze ({freeze_iters}) + warmup ({warmup_iters}) exceed the {total_iters} iterations")
    freeze = np.zeros(freeze_iters, np.float64)
    warmup = np.linspace(start_warmup, base, warmup_iters, dtype=np.float64)
    i = np.arange(n, dtype=np.float64)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * i / max(n, 1)))
    return np.concatenate([freeze, warmup, cosine])


def linear_warmup_cosine_decay(
    start: float,
    peak: float,
    end: float,
    warmup_iters: int,
    total_iters: int,
    cosine_iters: int | None = None,
) -> np.ndarray:
    """v2 schedule [total_iters]: `linspace(start, peak, W, endpoint=False)`, then
    `end + (peak − end)(1 + cos(linspace(0, π, C)))/2` with C = `cosine_iters` (default: all
    remaining iterations), then constant `end`."""
    if cosine_iters is None:
        cosine_iters = total_iters - warmup_iters
    rest = total_iters - warmup_iters - cosine_iters
    if min(warmup_iters, cosine_iters, rest) < 0:
        raise ValueError(
            f"warmup ({warmup_iters}) + cosine ({cosine_iters}) iterations exceed the {total_iters} iterations"
        )
    warmup = np.linspace(start, peak, warmup_iters, endpoint=False, dtype=np.float64)
    cosine = end + (peak - end) * (1 + np.cos(np.linspace(0, np.pi, cosine_iters, dtype=np.float64))) / 2
    return np.concatenate([warmup, cosine, np.full(rest, end, np.float64)])


def scale_lr(lr: float, rule: str | None, global_batch: int) -> float:
    """The recipe's lr scaling rule: `sqrt_wrt_1024` → lr·4·√(batch/1024), `linear_wrt_256` →
    lr·batch/256, `none` → lr unchanged (a project addition)."""
    if rule == "none":
        return lr
    if rule == "sqrt_wrt_1024":
        return lr * 4 * math.sqrt(global_batch / 1024)
    if rule == "linear_wrt_256":
        return lr * global_batch / 256
    raise ValueError(f"unknown optim.scaling_rule {rule!r}; expected one of {SCALING_RULES}")


# ---------------------------------------------------------------------------------------------
# The set of schedules read by the trainer
# ---------------------------------------------------------------------------------------------

KEYS = (
    "lr",
    "wd",
    "momentum",
    "teacher_temp",
    "last_layer_lr",
    "dino_local_weight",
    "gram_weight",
    "backbone_lr_scale",
)


@dataclasses.dataclass(frozen=True)
class Schedules:
    """One float64 array per key; `final` holds the value returned past the end of an array
    (v1: the cosine's `final`; v2 and constants: the last entry)."""

    arrays: dict[str, np.ndarray]
    final: dict[str, float]

    def __post_init__(self):
        missing = set(KEYS) - set(self.arrays)
        if missing:
            raise ValueError(f"missing schedules: {sorted(missing)}")

    def at(self, step: int) -> dict[str, float]:
        """Every schedule's value at iteration `step` (0-based)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return {k: float(a[step]) if step < len(a) else float(self.final[k]) for k, a in self.arrays.items()}

    def __len__(self) -> int:
        return max(len(a) for a in self.arrays.values())


def _constant(value: float, total_steps: int) -> tuple[np.ndarray, float]:
    return np.full(total_steps, value, np.float64), float(value)


def _tail(a: np.ndarray, default: float) -> float:
    return float(a[-1]) if len(a) else float(default)


def v1_schedules(
    *,
    total_steps: int,
    epoch_length: int,
    lr: float,
    min_lr: float,
    warmup_epochs: float,
    weight_decay: float,
    weight_decay_end: float,
    freeze_last_layer_epochs: float,
    momentum_teacher: float,
    final_momentum_teacher: float,
    warmup_teacher_temp: float,
    teacher_temp: float,
    warmup_teacher_temp_epochs: float,
    dino_local_weight: np.ndarray | None = None,
    gram_weight: np.ndarray | float = 1.0,
    freeze_backbone_iters: int = 0,
) -> Schedules:
    """The v1 (CosineScheduler) set. `lr` is the peak *after* the scaling rule; `min_lr` is not
    scaled. Epoch counts are converted to iterations with `epoch_length`."""
    e = epoch_length
    lr_a = cosine_schedule(lr, min_lr, total_steps, warmup_iters=int(warmup_epochs * e))
    last = lr_a.copy()
    last[: int(freeze_last_layer_epochs * e)] = 0.0
    wd_a = cosine_schedule(weight_decay, weight_decay_end, total_steps)
    mom_a = cosine_schedule(momentum_teacher, final_momentum_teacher, total_steps)
    tt_iters = int(warmup_teacher_temp_epochs * e)
    tt_a = cosine_schedule(
        teacher_temp, teacher_temp, tt_iters, warmup_iters=tt_iters, start_warmup=warmup_teacher_temp
    )
    # The teacher-temperature schedule only spans its warmup; past it, the constant `teacher_temp`.
    tt_full = np.concatenate([tt_a, np.full(max(total_steps - tt_iters, 0), teacher_temp, np.float64)])
    arrays = {"lr": lr_a, "wd": wd_a, "momentum": mom_a, "teacher_temp": tt_full, "last_layer_lr": last}
    final = {
        "lr": min_lr,
        "wd": weight_decay_end,
        "momentum": final_momentum_teacher,
        "teacher_temp": teacher_temp,
        "last_layer_lr": min_lr,
    }
    _add_loss_weights(arrays, final, total_steps, dino_local_weight, gram_weight, freeze_backbone_iters)
    return Schedules(arrays, final)


def v2_schedules(
    *,
    total_steps: int,
    epoch_length: int,
    lr: dict,
    weight_decay: dict,
    momentum: dict,
    teacher_temp: dict,
    dino_local_weight: np.ndarray | None = None,
    gram_weight: np.ndarray | float = 1.0,
    freeze_backbone_iters: int = 0,
) -> Schedules:
    """The v2 set. Each argument is a dict with `start, peak, end, warmup_epochs` and optional
    `cosine_epochs`; `lr` also takes `freeze_last_layer_epochs`. The lr `peak` and `end` must
    already be scaled (see `build_schedules`)."""
    e = epoch_length

    def build(spec: dict) -> np.ndarray:
        return v2_from_spec(spec, total_steps, e)

    lr_a = build(lr)
    last = lr_a.copy()
    last[: int(_get(lr, "freeze_last_layer_epochs", 0) * e)] = 0.0
    arrays = {
        "lr": lr_a,
        "wd": build(weight_decay),
        "momentum": build(momentum),
        "teacher_temp": build(teacher_temp),
        "last_layer_lr": last,
    }
    final = {k: _tail(a, 0.0) for k, a in arrays.items()}
    _add_loss_weights(arrays, final, total_steps, dino_local_weight, gram_weight, freeze_backbone_iters)
    return Schedules(arrays, final)


def v2_from_spec(spec: Any, total_steps: int, epoch_length: int) -> np.ndarray:
    """`linear_warmup_cosine_decay` from a {start, peak, end, warmup_epochs, cosine_epochs?}
    entry (dict or attribute object), epochs converted with `epoch_length`."""
    cosine_epochs = _get(spec, "cosine_epochs", None)
    return linear_warmup_cosine_decay(
        float(_get(spec, "start")),
        float(_get(spec, "peak")),
        float(_get(spec, "end")),
        warmup_iters=int(_get(spec, "warmup_epochs", 0) * epoch_length),
        total_iters=total_steps,
        cosine_iters=None if cosine_epochs is None else int(cosine_epochs * epoch_length),
    )


def _add_loss_weights(arrays, final, total_steps, dino_local_weight, gram_weight, freeze_backbone_iters) -> None:
    # The backbone's lr factor: 0 during the head warm-up of continued pretraining, then 1.
    backbone = np.ones(total_steps, np.float64)
    backbone[:freeze_backbone_iters] = 0.0
    for key, value, default in (
        ("dino_local_weight", dino_local_weight, 1.0),
        ("gram_weight", gram_weight, 1.0),
        ("backbone_lr_scale", backbone, 1.0),
    ):
        if value is None:
            value = default
        if np.ndim(value) == 0:
            arrays[key], final[key] = _constant(float(value), total_steps)
        else:
            arrays[key] = np.asarray(value, np.float64)
            final[key] = _tail(arrays[key], default)


# ---------------------------------------------------------------------------------------------
# From the config
# ---------------------------------------------------------------------------------------------

_MISSING = object()


def _get(obj: Any, name: str, default: Any = _MISSING) -> Any:
    """Attribute or mapping lookup, so both the config dataclasses and plain dicts work."""
    if isinstance(obj, dict):
        value = obj.get(name, _MISSING)
    else:
        value = getattr(obj, name, _MISSING)
    if value is _MISSING:
        if default is _MISSING:
            raise KeyError(f"config entry {name!r} is missing")
        return default
    return value


def build_schedules(cfg: Any, total_steps: int, global_batch: int) -> Schedules:
    """All schedules of a config (official key names, RECIPE.md §7.1), scaling rule applied.

    v2 is used when `cfg.schedules` exists and is not None (the lr `peak` and `end` are scaled),
    v1 otherwise (only `optim.lr` is scaled). The epoch length is
    `cfg.train.OFFICIAL_EPOCH_LENGTH`. The DINO local-crop weight follows
    `dino.local_loss_weight_schedule` when `dino.reweight_dino_local_loss`, else 1; the Gram
    weight follows `gram.loss_weight_schedule` when set, else the constant `gram.loss_weight`. The
    backbone's lr factor is 0 for the first `optim.freeze_backbone_epochs`, then 1.
    """
    optim, teacher, train = _get(cfg, "optim"), _get(cfg, "teacher"), _get(cfg, "train")
    e = int(_get(train, "OFFICIAL_EPOCH_LENGTH"))
    rule = _get(optim, "scaling_rule")
    dino, gram = _get(cfg, "dino", None), _get(cfg, "gram", None)

    local_w = None
    if dino is not None and _get(dino, "reweight_dino_local_loss", False):
        local_w = v2_from_spec(_get(dino, "local_loss_weight_schedule"), total_steps, e)
    gram_w: np.ndarray | float = 1.0
    if gram is not None:
        spec = _get(gram, "loss_weight_schedule", None)
        gram_w = v2_from_spec(spec, total_steps, e) if spec is not None else float(_get(gram, "loss_weight", 1.0))

    freeze_backbone = int(float(_get(optim, "freeze_backbone_epochs", 0) or 0) * e)

    sched = _get(cfg, "schedules", None)
    if sched is not None:
        lr = _as_dict(_get(sched, "lr"))
        lr["peak"] = scale_lr(float(lr["peak"]), rule, global_batch)
        lr["end"] = scale_lr(float(lr["end"]), rule, global_batch)
        return v2_schedules(
            total_steps=total_steps,
            epoch_length=e,
            lr=lr,
            weight_decay=_as_dict(_get(sched, "weight_decay")),
            momentum=_as_dict(_get(sched, "momentum")),
            teacher_temp=_as_dict(_get(sched, "teacher_temp")),
            dino_local_weight=local_w,
            gram_weight=gram_w,
            freeze_backbone_iters=freeze_backbone,
        )

    if float(_get(optim, "schedule_trunc_extra", 0.0) or 0.0) > 0:
        raise NotImplementedError("optim.schedule_trunc_extra > 0 (truncated cosine) is not supported")
    return v1_schedules(
        total_steps=total_steps,
        epoch_length=e,
        lr=scale_lr(float(_get(optim, "lr")), rule, global_batch),
        min_lr=float(_get(optim, "min_lr")),
        warmup_epochs=float(_get(optim, "warmup_epochs")),
        weight_decay=float(_get(optim, "weight_decay")),
        weight_decay_end=float(_get(optim, "weight_decay_end")),
        freeze_last_layer_epochs=float(_get(optim, "freeze_last_layer_epochs")),
        momentum_teacher=float(_get(teacher, "momentum_teacher")),
        final_momentum_teacher=float(_get(teacher, "final_momentum_teacher")),
        warmup_teacher_temp=float(_get(teacher, "warmup_teacher_temp")),
        teacher_temp=float(_get(teacher, "teacher_temp")),
        warmup_teacher_temp_epochs=float(_get(teacher, "warmup_teacher_temp_epochs")),
        dino_local_weight=local_w,
        gram_weight=gram_w,
        freeze_backbone_iters=freeze_backbone,
    )


def _as_dict(spec: Any) -> dict:
    if isinstance(spec, dict):
        return dict(spec)
    if dataclasses.is_dataclass(spec):
        return dataclasses.asdict(spec)
    return {k: getattr(spec, k) for k in vars(spec)}


def gram_teacher_copies(gram: Any, total_steps: int) -> frozenset[int]:
    """The iterations before which the Gram teacher becomes a copy of the EMA teacher (RECIPE.md
    §4.5): `gram.it_load_ema_teacher` (when ≥ 0), and with `gram.rep_update` the refreshes after
    each iteration `it` with `(it + 1) ≥ it_first_update` and `(it + 1) % update_frequency == 0`,
    at most `max_updates` of them (None = no limit). A refresh after iteration `it` is the copy
    before iteration `it + 1`. A pure function of the config, so a resumed run repeats it exactly."""
    copies = set()
    if gram.it_load_ema_teacher >= 0:
        copies.add(int(gram.it_load_ema_teacher))
    if gram.rep_update:
        first = max(int(gram.it_first_update), 1)
        start = -(-first // gram.update_frequency) * gram.update_frequency  # first multiple ≥ first
        refreshes = range(start, total_steps, gram.update_frequency)
        if gram.max_updates is not None:
            refreshes = refreshes[: gram.max_updates]
        copies.update(refreshes)
    return frozenset(c for c in copies if c < total_steps)
