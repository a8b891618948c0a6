"""The DINOv3 trainer, readable top to bottom (paper §3–4; RECIPE.md §5).

Sections: Output → Mesh → Model → Optimizer → State and shardings → Data → Restore → Step →
Evaluation → Loop → Export. One code path runs on one CPU or on a multi-host accelerator mesh:
only the mesh and the batch placement change, and both are data.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml
from flax import nnx
from tqdm import tqdm

from dinov3_jax import parallel
from dinov3_jax.checkpoint import Checkpointer
from dinov3_jax.configs import (
    LAYOUT_KEYS,
    Config,
    ConfigError,
    config_to_yaml,
    global_batch_size,
    resume_differences,
    schedule_steps,
    source_kwargs,
    student_backbone_config,
    student_configs,
    total_steps,
    validate_for_devices,
)
from dinov3_jax.data.pipeline import UnreadableImages, build_train_pipeline
from dinov3_jax.data.sources import make_source
from dinov3_jax.eval.knn import KnnEvaluator, knn_split_problem
from dinov3_jax.inference import CPU_CHECKPOINTING_OPTIONS, cpu_compiler_options
from dinov3_jax.models.heads import FeatureStudent, SSLModel, head_configs
from dinov3_jax.models.registry import stride_of
from dinov3_jax.models.vit import DinoVisionTransformer
from dinov3_jax.train.distill import distill_config, frozen_backbone, read_teacher
from dinov3_jax.train.optim import optimizer_from_config
from dinov3_jax.train.schedules import build_schedules, gram_teacher_copies
from dinov3_jax.train.start import NO_PATH, place_like, read_start_weights, restore_run_state
from dinov3_jax.train.step import (
    DistillConfig,
    GramConfig,
    LossConfig,
    make_multi_student_step,
    make_train_step,
    to_micro_batches,
)
from dinov3_jax.utils.files import atomic_write_text, folder_lock, writable_folder
from dinov3_jax.utils.metrics import MetricsWriter
from dinov3_jax.utils.signals import StopRequest, stop_on_signals
from dinov3_jax.weights import save_backbone

log = logging.getLogger(__name__)

PER_SAMPLE_KEYS = (
    "global_crops",
    "local_crops",
    "gram_teacher_crops",
    "masks",
    "labels",
    "mask_indices",
    "mask_weights",
    "stop",
)
SCHEDULE_KEYS = (
    "lr",
    "wd",
    "momentum",
    "teacher_temp",
    "last_layer_lr",
    "backbone_lr_scale",
    "dino_local_weight",
    "gram_weight",
)


def device_batch(host: dict[str, np.ndarray], mesh, *, n_micro: int = 1, stop: bool = False) -> dict:
    """This process's crop-major host batch (the pipeline's) → the step's global batch on `mesh`:
    `n_micro` sample-major micro-batches on a leading axis (`train.grad_accumulation_steps`), each
    split over every device, this process's rows at its place in each (`to_micro_batches`), with
    the stop flag `stop` on every row."""
    micro = to_micro_batches(host, n_micro, jax.local_device_count(), jax.process_index())
    micro["stop"] = np.full(micro["labels"].shape, stop)
    return parallel.host_to_global(micro, mesh, PER_SAMPLE_KEYS, batch_axis=1)


class TrainingDiverged(RuntimeError):
    """Raised after too many consecutive non-finite steps."""


def loss_config(cfg: Config, n_devices: int, micro_batch: int) -> LossConfig:
    """The static loss settings for a global (micro-)batch of `micro_batch` images. KoLeo and Gram
    work per device (the official per-rank losses); distributed KoLeo over groups of
    `dino.koleo_distributed_loss_group_size` samples (RECIPE.md §4.4)."""
    koleo_groups = n_devices
    if cfg.dino.koleo_loss_distributed:
        koleo_groups = micro_batch // (cfg.dino.koleo_distributed_loss_group_size or micro_batch)
    g = cfg.gram
    gram = None
    if g.use_loss:
        gram = GramConfig(
            normalized=g.normalized,
            img_level=g.img_level,
            remove_neg=g.remove_neg,
            remove_only_teacher_neg=g.remove_only_teacher_neg,
            teacher_neg_as_official=cfg.compat.gram_remove_only_teacher_neg_as_official,
            tokens_used=g.tokens_used,
            resize_method=g.global_teacher_resize_method,
            resize_antialias=g.global_teacher_resize_antialias,
            ema_teacher=g.ema_teacher,
            groups=n_devices,
        )
    return LossConfig(
        n_local_crops=cfg.crops.local_crops_number,
        dino_weight=cfg.dino.loss_weight,
        ibot_weight=cfg.ibot.loss_weight,
        koleo_weight=cfg.dino.koleo_loss_weight,
        global_ignore_diagonal=cfg.dino.global_ignore_diagonal,
        centering=cfg.train.centering,
        center_momentum=cfg.train.center_momentum,
        koleo_groups=koleo_groups,
        gram=gram,
    )


def uses_gram_teacher(cfg: Config) -> bool:
    """A separate, frozen Gram teacher is part of the train state."""
    return cfg.gram.use_loss and not cfg.gram.ema_teacher


def train_stream(cfg: Config, source, *, per_host_batch: int, patch_size: int, **kw) -> Any:
    """The trainer's multi-crop stream over `source` (`data.pipeline.build_train_pipeline` with the
    run's crops: Gram-teacher crops only when a separate Gram teacher trains, the `compat` blur
    probabilities); `kw` are further `build_train_pipeline` arguments."""
    crops = cfg.crops if uses_gram_teacher(cfg) else dataclasses.replace(cfg.crops, gram_teacher_crops_size=None)
    return build_train_pipeline(
        source,
        cfg=cfg,
        crops=crops,
        per_host_batch=per_host_batch,
        patch_size=patch_size,
        inverted_blur_probabilities=cfg.compat.inverted_blur_probabilities,
        **kw,
    )


def opt_state_shardings(tx, params, param_sh, repl):
    """Shardings of the optimizer state: each parameter-shaped leaf takes its parameter's."""
    abstract = jax.eval_shape(tx.init, params)
    return optax.tree_map_params(
        tx,
        lambda _, sharding: sharding,
        abstract,
        param_sh,
        transform_non_params=lambda _: repl,
        is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding),
    )


@dataclasses.dataclass
class StudentRun:
    """One student's part of a run: its config, graphs, optimizer, loss settings and schedules."""

    cfg: Config
    student_def: Any
    teacher_def: Any  # the graph of its EMA (drop path off)
    tx: Any
    loss_config: LossConfig
    schedules: Any
    init_params: Any  # seed → the student's initial parameters (host-sharded like the state)


@dataclasses.dataclass
class TrainingSetup:
    """Everything the loop needs, built from the config for one mesh. A single-student run's
    state holds its student's part (student, teacher, opt_state, centers, NaN counters) at the top; a multi-distillation run's holds
    one per student under `students`."""

    mesh: Any
    state: dict
    state_shardings: Any
    step_fn: Any
    # By name; a single-student run has one, named "".
    students: dict[str, StudentRun]
    # Jitted state → state with the Gram teacher set to the EMA teacher's backbone (None without).
    copy_teacher_to_gram: Any = None
    # The graph of the frozen teacher of a distillation run, whose parameters are the state's
    # `distill_teacher` (None without).
    distill_def: Any = None

    @property
    def multi(self) -> bool:
        return "" not in self.students

    def _single(self) -> StudentRun:
        return self.students[""]

    schedules = property(lambda self: self._single().schedules)
    teacher_def = property(lambda self: self._single().teacher_def)
    init_params = property(lambda self: self._single().init_params)

    @property
    def mask_stride(self) -> int:
        """The stride of the patch grid the masks are drawn on: the student's (a ConvNeXt's is 32).
        The students of a multi-distillation run share one grid (each matches the teacher's)."""
        return stride_of(student_backbone_config(next(iter(self.students.values())).cfg))

    def student_states(self, state: dict) -> dict[str, dict]:
        """Each student's part of `state`, by name."""
        return state["students"] if self.multi else {"": state}

    def schedule_values(self, step: int) -> dict:
        """The step's schedule values: one dict, or one per student name in a multi-student run."""
        values = {
            name: {k: np.float32(v) for k, v in s.schedules.at(step).items() if k in SCHEDULE_KEYS}
            for name, s in self.students.items()
        }
        return values if self.multi else values[""]

    def skipped_steps(self, state: dict) -> int:
        return sum(int(jax.device_get(s["nan_total"])) for s in self.student_states(state).values())


def start_weights(cfg: Config, vit, abstract_params: dict) -> tuple[dict | None, Any]:
    """The weights the student and its EMA teacher start from (`student.resume_from_teacher_chkpt`
    or `student.pretrained_weights`), or None for the random initialisation; and the backbone
    config with the file's RoPE periods."""
    for key in ("student.resume_from_teacher_chkpt", "student.pretrained_weights"):
        path = getattr(cfg.student, key.split(".")[1])
        if path:
            return read_start_weights(path, vit, abstract_params, key)
    return None, vit


def build_student(cfg: Config, mesh, distill: DistillConfig | None, teacher_dim: int, *, global_batch: int, steps: int):
    """One student (`distill`: its checked distillation settings, `teacher_dim`: the teacher's width): (StudentRun, its part of the state: student, teacher, opt_state, centers, NaN counters and, with a separate Gram
    teacher, `gram_teacher`, the Gram teacher's graph or None). Its models are initialised directly
    into their shardings, or from the configured start weights."""
    student_vit = student_backbone_config(cfg)
    dino_head, ibot_head = head_configs(cfg)

    def build(vit, seed):
        if distill is not None and distill.objective == "features":  # head-free: projectors onto the teacher's width
            return FeatureStudent(vit, teacher_dim, rngs=nnx.Rngs(seed))
        return SSLModel(vit, dino_head, ibot_head, rngs=nnx.Rngs(seed))

    abstract = nnx.eval_shape(lambda: build(student_vit, 0))
    abstract_params = nnx.state(abstract, nnx.Param).to_pure_dict()
    start, start_vit = start_weights(cfg, student_vit, abstract_params)
    if start_vit != student_vit:  # the file's RoPE periods
        student_vit, abstract = start_vit, nnx.eval_shape(lambda: build(start_vit, 0))
    # No gradients flow through the teacher: no drop path, nothing to checkpoint.
    teacher_vit = dataclasses.replace(student_vit, drop_path_rate=0.0, remat="off")
    gram_weights = None
    if uses_gram_teacher(cfg) and cfg.gram.ckpt not in NO_PATH:
        gram_weights, gram_vit = read_start_weights(
            cfg.gram.ckpt, teacher_vit, {"backbone": abstract_params["backbone"]}, "gram.ckpt"
        )
    elif uses_gram_teacher(cfg):
        if cfg.gram.it_load_ema_teacher < 0 and not cfg.train.continue_from:
            raise ConfigError(
                "gram.use_loss: the Gram teacher has no weights: set gram.ckpt=PATH (a previous stage's run "
                "folder or a backbone file), gram.it_load_ema_teacher=STEP, or gram.ema_teacher=true"
            )
        gram_vit = teacher_vit  # a copy of the starting teacher until it_load_ema_teacher

    student_def = nnx.graphdef(abstract)
    teacher_abstract = nnx.eval_shape(lambda: build(teacher_vit, 0))
    axes = parallel.logical_axes(teacher_abstract)
    param_sh = parallel.param_shardings(axes, abstract_params, mesh)

    def init_params(seed):
        return nnx.state(build(student_vit, seed), nnx.Param).to_pure_dict()

    init_params = jax.jit(init_params, static_argnums=0, out_shardings=param_sh)
    params = init_params(cfg.train.seed)
    if start is not None:  # the given sub-modules replace the random ones (fresh heads for a bare backbone)
        params = {**params, **place_like(start, {k: params[k] for k in start})}
    tx = optimizer_from_config(cfg, params)
    repl = parallel.replicated(mesh)
    k_dino, k_ibot = cfg.dino.head_n_prototypes, cfg.ibot.head_n_prototypes
    part = {
        "student": params,
        # The teacher starts as a copy of the student (RECIPE.md §5.1), copied by one program.
        "teacher": jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=param_sh)(params),
        # Adam moments are sharded exactly like the parameters they follow (FSDP saves their memory too).
        "opt_state": jax.jit(tx.init, out_shardings=opt_state_shardings(tx, params, param_sh, repl))(params),
        "centers": {"dino": jnp.zeros((1, k_dino), jnp.float32), "ibot": jnp.zeros((1, k_ibot), jnp.float32)},
        "nan_streak": jnp.zeros((), jnp.int32),
        "nan_worst_streak": jnp.zeros((), jnp.int32),
        "nan_total": jnp.zeros((), jnp.int32),
    }
    gram_def = None
    if uses_gram_teacher(cfg):
        # A frozen backbone sharded like the teacher's (no optimizer state, paper §4.2).
        gram_def = nnx.graphdef(nnx.eval_shape(lambda: DinoVisionTransformer(gram_vit, rngs=nnx.Rngs(0))))
        backbone = params["backbone"]
        part["gram_teacher"] = (
            place_like(gram_weights["backbone"], backbone) if gram_weights else jax.tree.map(jnp.copy, backbone)
        )
    # The losses see one micro-batch at a time: KoLeo's groups are of its samples.
    micro_batch = global_batch // cfg.train.grad_accumulation_steps
    lc = dataclasses.replace(loss_config(cfg, mesh.size, micro_batch), distill=distill)
    run = StudentRun(
        cfg=cfg,
        student_def=student_def,
        teacher_def=nnx.graphdef(teacher_abstract),
        tx=tx,
        loss_config=lc,
        schedules=build_schedules(cfg, steps, global_batch),
        init_params=init_params,
    )
    return run, part, gram_def


def setup(cfg: Config, mesh, *, global_batch: int, steps: int, loss_groups: int | None = None) -> TrainingSetup:
    """`steps` is the length the schedules are laid out over. Builds the models, the optimizer,
    the state and the jitted step for `mesh`: of one student, or of every student of a
    multi-distillation run (`student_configs`) around one frozen teacher. `loss_groups`
    overrides the per-device grouping of KoLeo and Gram (one group per device by default,
    RECIPE.md §4.4)."""
    # Read (and check) every file before anything compiles.
    configs = student_configs(cfg) if cfg.multidistillation.enabled else {"": cfg}
    if any(s.ranks_range != (0, 0) for s in cfg.multidistillation.students):
        log.warning(
            "multidistillation.students[*].ranks_range has no effect: every student trains on every device, "
            "on the whole global batch, from one teacher pass (README, Distillation)"
        )
    distill_teacher = read_teacher(cfg) if cfg.distillation.enabled else None
    distills = {  # every student checked against the teacher before any is built
        name: distill_teacher and distill_config(distill_teacher, c, student_backbone_config(c))
        for name, c in configs.items()
    }
    teacher_dim = distill_teacher.backbone.embed_dim if distill_teacher else 0
    students, parts, gram_def = {}, {}, None
    for name, student_cfg in configs.items():
        students[name], parts[name], gram_def = build_student(
            student_cfg, mesh, distills[name], teacher_dim, global_batch=global_batch, steps=steps
        )
        if loss_groups:
            lc = students[name].loss_config
            lc = dataclasses.replace(
                lc, koleo_groups=loss_groups, gram=lc.gram and dataclasses.replace(lc.gram, groups=loss_groups)
            )
            students[name] = dataclasses.replace(students[name], loss_config=lc)
    lengths = {name: total_steps(c) for name, c in configs.items()}
    if len(set(lengths.values())) > 1:
        raise ConfigError(f"multidistillation: the students' runs differ in length (steps: {lengths})")
    common = {"step": jnp.zeros((), jnp.int32), "key": jax.random.key_data(jax.random.key(cfg.train.seed))}
    state = {"students": parts, **common} if cfg.multidistillation.enabled else {**parts[""], **common}
    distill_def = None
    if distill_teacher is not None:
        # Frozen, sharded by the same rule table as the students (FSDP splits a large teacher too).
        distill_def = distill_teacher.graphdef
        axes = parallel.logical_axes(nnx.eval_shape(lambda: nnx.merge(distill_def, nnx.State(distill_teacher.params))))
        shardings = parallel.param_shardings(axes, distill_teacher.params, mesh)
        state["distill_teacher"] = jax.device_put(distill_teacher.params, shardings)
    # Parameters and Adam moments keep their FSDP shardings; everything else is replicated.
    repl = parallel.replicated(mesh)
    placed = lambda x: x.sharding if getattr(x.sharding, "mesh", None) == mesh else repl  # noqa: E731
    state = jax.device_put(state, jax.tree.map(placed, state))
    state_sh = jax.tree.map(lambda x: x.sharding, state)
    if cfg.multidistillation.enabled:
        (dc,) = {s.loss_config.distill for s in students.values()}  # one teacher view: the crops are shared
        step = make_multi_student_step(
            {name: (s.student_def, s.tx, s.loss_config) for name, s in students.items()}, distill_def, dc
        )
    else:
        s = students[""]
        step = make_train_step(s.student_def, s.teacher_def, s.tx, s.loss_config, gram_def, distill_def)
    checkpointed = any(s.cfg.train.checkpointing for s in students.values())
    step_fn = jax.jit(
        step,
        in_shardings=(state_sh, None, repl),
        out_shardings=(state_sh, repl),
        donate_argnums=0,
        compiler_options=cpu_compiler_options(CPU_CHECKPOINTING_OPTIONS) if checkpointed else None,
    )
    copy_teacher_to_gram = None
    if gram_def is not None:
        copy_teacher_to_gram = jax.jit(
            lambda st: {**st, "gram_teacher": jax.tree.map(jnp.copy, st["teacher"]["backbone"])},
            in_shardings=(state_sh,),
            out_shardings=state_sh,
            donate_argnums=0,
        )
    return TrainingSetup(
        mesh=mesh,
        state=state,
        state_shardings=state_sh,
        step_fn=step_fn,
        students=students,
        copy_teacher_to_gram=copy_teacher_to_gram,
        distill_def=distill_def,
    )


# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------


def train(cfg: Config, *, progress: bool = True) -> dict[str, Any]:
    """Runs (or resumes) a pretraining run; returns the final metrics.

    A SIGTERM or SIGINT stops the run after the current step with a checkpoint (every process at
    the same step) and returns `{"steps": ..., "interrupted": "SIGTERM"}`; calling `train` again
    with the same config resumes it exactly.
    """
    if cfg.distributed.enabled:  # before anything touches the devices
        d = cfg.distributed
        parallel.initialize_distributed(d.coordinator_address, d.num_processes, d.process_id)
    # ------------------------------------------------------------------ Output
    out = writable_folder(cfg.train.output_dir, "train.output_dir")
    # One run per folder: a second `train` on it would interleave the metrics, rewrite the config
    # and race for the checkpoints. Process 0 holds the lock for the processes of one run.
    with folder_lock(out) if jax.process_index() == 0 else contextlib.nullcontext(), stop_on_signals() as stop:
        return _train(cfg, out, stop, progress=progress)


# Read again from its file on resume, never saved: the frozen teacher of a distillation run.
NOT_CHECKPOINTED = ("distill_teacher",)


def saved_part(state: dict) -> dict:
    return {k: v for k, v in state.items() if k not in NOT_CHECKPOINTED}


def start_summary(cfg: Config, run: TrainingSetup, source, batch: int, steps: int, start: int, out: Path) -> str:
    """What the run is, in a few lines (the whole resolved config is in OUT/config.yaml)."""
    lines = []
    for name, part in run.student_states(run.state).items():
        student = run.students[name].cfg.student
        n_backbone = sum(int(x.size) for x in jax.tree.leaves(part["student"]["backbone"]))
        n_all = sum(int(x.size) for x in jax.tree.leaves(part["student"]))
        lines.append(
            f"student{' ' + name if name else ''}: {student.arch}/{student.patch_size}, "
            f"{n_backbone / 1e6:.2f}M parameters ({n_all / 1e6:.2f}M with heads)"
        )
    c, k = cfg.crops, cfg.train.grad_accumulation_steps
    micro = f" in {k} micro-batches" if k > 1 else ""
    lines += [
        f"data: {cfg.data.source} {cfg.data.path or ''} ({len(source)} images)".replace("  ", " "),
        f"crops: 2 global of {c.global_crops_size} px, {c.local_crops_number} local of {c.local_crops_size} px",
        f"batch: {batch} images a step{micro}; steps {start}..{steps}",
        f"devices: {jax.device_count()} ({jax.devices()[0].platform}, {jax.process_count()} process(es)), "
        f"mesh data {run.mesh.shape['data']} x fsdp {run.mesh.shape['fsdp']}",
        f"output: {out} (the resolved config: config.yaml)",
    ]
    return "\n".join(lines)


def check_resume(ckpt: Checkpointer, about: dict[str, Any], cfg: Config) -> None:
    """Refuses to resume the newest checkpoint with a config that would make it another run
    (any key outside RESUME_SAFE_KEYS and `runtime.resume_allow_changes`, or another global
    batch), listing every difference. Another device layout (LAYOUT_KEYS: mesh, devices, processes,
    micro-batches) with the same global batch is an elastic restore: allowed, and said."""
    for step in ckpt.steps():
        try:
            stored = ckpt.about(step)
            break
        except Exception:  # a damaged checkpoint: the restore sets it aside and compares an older one
            continue
    else:
        return
    allow = cfg.runtime.resume_allow_changes
    before = {**yaml.safe_load(stored["config"]), "run": stored.get("run", about["run"])}
    now = {**yaml.safe_load(about["config"]), "run": about["run"]}
    was, will = ({k: yaml.safe_load(v) for k, v in meta.get("students", {}).items()} for meta in (stored, about))

    def differences(skip) -> list[str]:
        lines = resume_differences(before, now, skip)
        for name in sorted(was.keys() | will.keys()):  # each student's merged config
            lines += [f"{name}: {line}" for line in resume_differences(was.get(name, {}), will.get(name, {}), skip)]
        return lines

    changed = differences((*allow, *LAYOUT_KEYS))
    if changed:
        keys = ",".join(sorted({line.split(":", 1)[0] for line in changed}))
        raise ConfigError(
            f"train.output_dir={ckpt.directory.parent} holds checkpoint {step} of a run with another config; "
            "resuming it with this one would not be the same run:\n  " + "\n  ".join(changed) + "\n"
            f"Choose a new train.output_dir, or resume with the change on purpose: "
            f"runtime.resume_allow_changes=[{keys}]"
        )
    moved = differences(allow)
    if moved:
        print(
            f"resuming checkpoint {step} on another device layout, with the same global batch of "
            f"{about['run']['global_batch']} images ({'; '.join(moved)}): KoLeo and Gram now group the samples "
            "of each new device"
        )


def _train(cfg: Config, out: Path, stop: StopRequest, *, progress: bool) -> dict[str, Any]:
    # ------------------------------------------------------------------ Mesh
    validate_for_devices(cfg, jax.device_count())
    mesh = parallel.make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
    batch = global_batch_size(cfg, jax.device_count())
    host_batch = batch // jax.process_count()
    steps = total_steps(cfg)

    # ------------------------------------------------------------------ Checkpoints (before anything is written)
    resolved = config_to_yaml(cfg)
    about = {"config": resolved, "run": {"global_batch": batch, "processes": jax.process_count()}}
    if cfg.multidistillation.enabled:
        about["students"] = {name: config_to_yaml(c) for name, c in student_configs(cfg).items()}
    ckpt = Checkpointer(
        out / "checkpoints", max_to_keep=cfg.checkpointing.max_to_keep, keep_every=cfg.checkpointing.keep_every
    )
    check_resume(ckpt, about, cfg)
    if jax.process_index() == 0:
        atomic_write_text(out / "config.yaml", resolved)
        for name, text in about.get("students", {}).items():  # each student's folder: its config, then its backbone
            atomic_write_text(writable_folder(out / "students" / name, "train.output_dir") / "config.yaml", text)
    writer = MetricsWriter(out) if jax.process_index() == 0 else None

    # ------------------------------------------------------------------ Model, optimizer, state, step
    run = setup(cfg, mesh, global_batch=batch, steps=schedule_steps(cfg))
    state, step_fn = run.state, run.step_fn

    # ------------------------------------------------------------------ Restore (this run, or the run it continues)
    start = 0
    restored = ckpt.restore_newest_intact(saved_part(state), out / "damaged_checkpoints")
    if restored is not None:
        start, restored_state = restored
        state = {**state, **restored_state}
        print(f"resumed from {out / 'checkpoints'} at step {start}")
    elif cfg.train.continue_from:
        state, start, new_keys = restore_run_state(cfg.train.continue_from, state, "train.continue_from")
        if "gram_teacher" in new_keys and cfg.gram.ckpt in NO_PATH:
            state = run.copy_teacher_to_gram(state)  # the continued teacher, not the random one
        print(f"continuing {cfg.train.continue_from} from its step {start}")

    # ------------------------------------------------------------------ Data
    source = make_source(cfg.data.source, cfg.data.path, split="train", **source_kwargs(cfg, cfg.data.num_samples))
    pipeline = train_stream(
        cfg,
        source,
        per_host_batch=host_batch,
        patch_size=run.mask_stride,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        # Batch t depends only on t: the stream of a resumed (or continued) run starts at its step.
        start_step=start,
    )
    iterator = iter(pipeline)
    if jax.process_index() == 0:
        print(start_summary(cfg, run, source, batch, steps, start, out))
    suffix = "" if jax.process_index() == 0 else f".process{jax.process_index()}"
    unreadable = UnreadableImages(source, out / f"unreadable_images{suffix}.txt", cfg.data.max_unreadable_fraction)
    gram_copies = gram_teacher_copies(cfg.gram, steps) if uses_gram_teacher(cfg) else frozenset()

    # ------------------------------------------------------------------ Evaluation
    evaluator = None
    if cfg.runtime.knn_every_steps is not None:
        problem = knn_split_problem(cfg)
        if problem:
            print(f"k-NN evaluation skipped: {problem}")
        else:
            # Every process evaluates on its own devices with a full copy of the teacher (the k-NN
            # split is small): no cross-host feature gathering.
            local_mesh = mesh if jax.process_count() == 1 else parallel.make_mesh(devices=jax.local_devices())
            evaluator = KnnEvaluator(cfg, local_mesh)
            if jax.process_index() == 0:
                print(evaluator.memory_summary())

    def ema_backbones(state) -> dict[str, nnx.Module]:
        """Each student's EMA backbone, gathered to the host (a collective on multi-host FSDP: every
        process gathers), by name ("" in a single-student run)."""
        return {
            name: nnx.merge(
                run.students[name].teacher_def, nnx.State(parallel.gather_to_host(part["teacher"]))
            ).backbone
            for name, part in run.student_states(state).items()
        }

    def folder_of(name: str) -> Path:
        """Where a student's backbone goes: the run folder, or its folder under students/."""
        return out / "students" / name if name else out

    t0, evaluating = time.perf_counter(), 0.0  # the loop's start; seconds spent in k-NN evaluations

    def train_seconds() -> float:
        """Wall seconds of this session's training so far (compilation included, k-NN excluded)."""
        return time.perf_counter() - t0 - evaluating

    def evaluate(step: int, backbone: nnx.Module, name: str = "") -> dict[str, float]:
        nonlocal evaluating
        began = time.perf_counter()
        result = evaluator(backbone)
        evaluating += time.perf_counter() - began
        if writer:
            row = {f"knn/{name + '/' if name else ''}{k}": v for k, v in result.items()}
            writer.write(step, row | {"train_seconds": train_seconds()})
        return result

    # ------------------------------------------------------------------ Loop
    bar = tqdm(total=steps, initial=start, disable=not progress or jax.process_index() != 0, dynamic_ncols=True)
    metrics: dict[str, Any] = {}
    end = steps

    def read_back(at: int, step_metrics: dict) -> bool:
        """Stops a diverged run; whether any process asked to stop."""
        streak, stop_asked = jax.device_get((step_metrics["nan_streak"], step_metrics["stop"]))
        if streak > cfg.runtime.nan_max_consecutive:
            ckpt.close()
            total_bad = run.skipped_steps(state)
            raise TrainingDiverged(
                f"{streak} consecutive steps up to step {at} had a non-finite loss or gradient (more than "
                f"runtime.nan_max_consecutive={cfg.runtime.nan_max_consecutive}); their updates were skipped "
                f"({total_bad} skipped in all). Lower optim.lr or check the data."
            )
        return bool(stop_asked)

    pending = None  # (step, metrics) of the step before the one just queued
    for step in range(start, steps):
        if step in gram_copies:  # the Gram teacher becomes the current EMA teacher (paper §4.2)
            state = run.copy_teacher_to_gram(state)
        host = next(iterator)
        unreadable.add(host.pop("skipped_from"), host.pop("n_skipped"))
        # A signal on any process reaches every process through the step: all stop at one step.
        batch_now = device_batch(host, mesh, n_micro=cfg.train.grad_accumulation_steps, stop=stop.signum is not None)
        state, metrics = step_fn(state, batch_now, run.schedule_values(step))
        done = step + 1
        # The previous step's NaN streak and stop flag, read once this step is queued (no stall of
        # the device): a diverging or interrupted run stops at most one step late.
        stopping = pending is not None and read_back(*pending)
        pending = (done, metrics)
        if done % cfg.runtime.log_every_steps == 0 or done == steps or stopping:
            metrics = jax.device_get(metrics)
            total_bad = run.skipped_steps(state)
            shown = ("loss",) if run.multi else ("loss", "dino_local", "dino_global", "ibot", "koleo", "gram")
            bar.set_postfix({k: f"{float(v):.3f}" for k, v in metrics.items() if k.split("/")[-1] in shown})
            if writer:
                extra = {
                    "skipped_steps": total_bad,
                    "skipped_images": len(unreadable),
                    "train_seconds": train_seconds(),
                }
                writer.write(done, dict(metrics) | extra)
        bar.update(1)
        if stopping:
            end = done
            break
        if cfg.checkpointing.period and done % cfg.checkpointing.period == 0 and done < steps:
            ckpt.save(done, saved_part(state), about)
        if done % cfg.evaluation.eval_period_iterations == 0 and done < steps:
            for name, backbone in ema_backbones(state).items():
                if jax.process_index() == 0:
                    path = folder_of(name) / "eval" / f"training_{done}" / "teacher_backbone.safetensors"
                    save_backbone(backbone, path)
        if evaluator and cfg.runtime.knn_every_steps and done % cfg.runtime.knn_every_steps == 0 and done < steps:
            for name, backbone in ema_backbones(state).items():
                knn = evaluate(done, backbone, name)
                bar.write(
                    f"step {done}: {name or 'teacher'} k-NN "
                    + ", ".join(f"{k} {v:.1f}" for k, v in knn.items() if k.startswith("top1"))
                )
    if pending is not None:
        read_back(*pending)
    bar.close()
    if start < end:
        ckpt.save(end, saved_part(state), about)
    ckpt.close()
    if unreadable:
        print(
            f"{len(unreadable)} unreadable images were skipped (each replaced by the next readable one): {unreadable.listing}"
        )
    if end < steps:
        if writer:
            writer.close()
        print(f"stopped by {stop.name} after step {end} with a checkpoint; run the same command to resume")
        return {"steps": end, "interrupted": stop.name, "state": state}
    elapsed = train_seconds()

    # ------------------------------------------------------------------ Export
    backbones = ema_backbones(state)
    exports = {name: folder_of(name) / "teacher_backbone.safetensors" for name in backbones}
    if jax.process_index() == 0:
        for name, backbone in backbones.items():
            save_backbone(backbone, exports[name])
    result: dict[str, Any] = {
        "steps": steps,
        "seconds": elapsed,
        "loss": None,
        "skipped_steps": run.skipped_steps(state),
        "skipped_images": len(unreadable),
        "state": state,
    }
    if run.multi:  # each student's EMA, exported and evaluated on its own
        result["student_backbones"] = {name: str(path) for name, path in exports.items()}
        result["loss"] = {name: float(metrics[f"{name}/loss"]) for name in backbones} if metrics else None
    else:
        result["teacher_backbone"] = str(exports[""])
        result["loss"] = float(metrics.get("loss", np.nan)) if metrics else None
    if evaluator:
        for name, backbone in backbones.items():  # the exported EMA, gathered once
            result[f"knn_student_{name}" if name else "knn_teacher"] = evaluate(steps, backbone, name)
        result["knn_raw_pixels"] = evaluator.raw_pixels()
        if not run.multi:  # the same network as it was before training (same seed, same initialisation)
            init = parallel.gather_to_host(run.init_params(cfg.train.seed))
            result["knn_random_init"] = evaluator(nnx.merge(run.teacher_def, nnx.State(init)).backbone)
        if run.distill_def is not None:
            frozen = frozen_backbone(run.distill_def, parallel.gather_to_host(state["distill_teacher"]))
            result["knn_distillation_teacher"] = evaluator(frozen)
    if writer:
        writer.close()
    if jax.process_index() == 0:
        summary = {k: v for k, v in result.items() if k != "state"}
        (out / "result.json").write_text(json.dumps(summary, indent=2) + "\n")
    return result


def format_result(result: dict[str, Any]) -> str:
    exported = result.get("student_backbones") or {"teacher": result["teacher_backbone"]}
    lines = [
        f"trained {result['steps']} steps in {result['seconds']:.0f} s; "
        + "; ".join(f"{name} backbone: {path}" for name, path in exported.items())
    ]
    rows = [
        ("knn_raw_pixels", "raw pixels"),
        ("knn_random_init", "random-init model"),
        ("knn_distillation_teacher", "distillation teacher"),
        ("knn_teacher", "trained (EMA) model"),
        *((f"knn_student_{name}", f"student {name} (EMA)") for name in result.get("student_backbones", ())),
    ]
    rows = [(name, label) for name, label in rows if name in result]
    if rows:
        keys = [k for k in result[rows[0][0]] if k.startswith("top1")]
        lines.append(f"{'k-NN top-1 (%)':24}" + "".join(f"{k:>10}" for k in keys))
        lines += [f"{label:24}" + "".join(f"{result[name][k]:10.1f}" for k in keys) for name, label in rows]
    return "\n".join(lines)
