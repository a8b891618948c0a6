"""Typed schema of the training configuration (STYLE.md §4; RECIPE.md §7).

One frozen dataclass per section. The official sections (`student`, `teacher`, `dino`, `ibot`,
`gram`, `crops`, `optim`, `train`, `compute_precision`, `distillation`, `multidistillation`,
`evaluation`, `checkpointing`, optional `schedules`, and the unused `MODEL` and `hrft`) use the key
names of the official `ssl_default_config.yaml`, and every default below equals the official
default, so an official recipe file loads as it is. Keys that this implementation reads nowhere are
listed in `NO_EFFECT_KEYS`: they are accepted, and the loader warns in one line when a file or an
override gives them a value other than the official default.

Project additions (no official counterpart): `mesh`, `data`, `runtime` and `compat` (the explicit
reproduce-or-fix switches for the upstream quirks of RECIPE.md §10.22).

Derived values (total steps, the global batch, the lr after the scaling rule, the backbone config)
are computed by the functions at the end of this file and never written back into the config.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any, Literal

from dinov3_jax.models.config import ConvNeXtConfig, ViTConfig
from dinov3_jax.models.registry import NORMALIZATION

# Dtype names (those of dinov3_jax.models.config.DTYPES; "bf16" is bfloat16, never float16).
DtypeName = Literal["bf16", "fp32", "fp16", "bfloat16", "float32", "float16"]


class ConfigError(ValueError):
    """An impossible or unknown configuration value; the message names the full dotted key."""


# --------------------------------------------------------------------------------------------
# Official sections (RECIPE.md §7.1). Defaults = the official `ssl_default_config.yaml`.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ScheduleEntry:
    """A v2 schedule: `start` → `peak` (linear warmup, endpoint excluded) → cosine to `end` → constant."""

    # Value at iteration 0.
    start: float = 0.0
    # Value reached at the end of the warmup.
    peak: float = 0.0
    # Value at the end of the cosine phase, kept constant afterwards.
    end: float = 0.0
    # Length of the linear warmup, in epochs of train.OFFICIAL_EPOCH_LENGTH iterations.
    warmup_epochs: float = 0.0
    # Length of the cosine phase in epochs; None = all the iterations after the warmup.
    cosine_epochs: float | None = None
    # schedules.lr only: epochs during which the heads' last layers get lr 0.
    freeze_last_layer_epochs: float = 0.0


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """Official `MODEL` section: accepted for compatibility, read nowhere."""

    # Official meta-architecture class name (SSLMetaArch / MultiDistillationMetaArch).
    META_ARCHITECTURE: str = "SSLMetaArch"
    # PyTorch device name.
    DEVICE: str = "cuda"
    # Path of initial weights (unused upstream too).
    WEIGHTS: str = ""
    # PyTorch model dtype.
    DTYPE: str = "float32"


@dataclasses.dataclass(frozen=True)
class ComputePrecision:
    """Mixed precision (RECIPE.md §5.5): master weights, optimizer state and EMA always fp32."""

    # Dtype of the parameters as used in forward/backward (the compute dtype): bf16, fp32 or fp16.
    param_dtype: DtypeName = "bf16"
    # Dtype in which gradients are reduced across devices.
    reduce_dtype: DtypeName = "fp32"


@dataclasses.dataclass(frozen=True)
class Dino:
    """DINO (CLS) loss, DINO head and KoLeo (RECIPE.md §3, §4.2, §4.4)."""

    # Weight of the DINO loss (local and global terms).
    loss_weight: float = 1.0
    # Drop the student-crop-i vs teacher-crop-i pairs of the global DINO loss.
    global_ignore_diagonal: bool = True
    # Number of prototypes K of the DINO head.
    head_n_prototypes: int = 65536
    # Bottleneck width of the DINO head.
    head_bottleneck_dim: int = 256
    # Weight-normalised last layer (DINO v1/v2: cosine logits); upstream DINOv3 only logs this key.
    head_norm_last_layer: bool = False
    # Project addition: std of the prototypes' normal initialisation (official 0.02).
    head_last_layer_init_std: float = 0.02
    # Number of MLP layers of the DINO head.
    head_nlayers: int = 3
    # Hidden width of the DINO head MLP.
    head_hidden_dim: int = 2048
    # Weight of the KoLeo regulariser on the student's normalised CLS of the global crops.
    koleo_loss_weight: float = 0.1
    # KoLeo over groups of koleo_distributed_loss_group_size samples instead of per device.
    koleo_loss_distributed: bool = False
    # Number of nearest neighbours of KoLeo (only the official 1 is accepted).
    koleo_topk: int = 1
    # Replicas of distributed KoLeo (must be 0 upstream; no effect).
    koleo_distributed_replicas: int = 0
    # Group size of distributed KoLeo (consecutive samples, a multiple of the per-device batch); None = the global batch.
    koleo_distributed_loss_group_size: int | None = None
    # Group adjacent ranks' data for distributed KoLeo (unused upstream; no effect).
    koleo_distributed_loss_group_data: bool = True
    # Force weight normalisation of the head (unused upstream; no effect).
    force_weight_norm: bool = False
    # Multiply the local DINO term by local_loss_weight_schedule.
    reweight_dino_local_loss: bool = False
    # v2 schedule of the local DINO term weight, used when reweight_dino_local_loss is true.
    local_loss_weight_schedule: ScheduleEntry = ScheduleEntry(start=0.5, peak=0.5, end=0.5, warmup_epochs=0)


@dataclasses.dataclass(frozen=True)
class Ibot:
    """iBOT masked-patch loss, iBOT head and the masking (RECIPE.md §4.3, §6.3–6.4)."""

    # Weight of the iBOT loss.
    loss_weight: float = 1.0
    # Fraction of the global crops that carry a mask.
    mask_sample_probability: float = 0.5
    # Range of the fraction of masked patches of a masked crop.
    mask_ratio_min_max: tuple[float, float] = (0.1, 0.5)
    # Random circular shift of the masks (off in every recipe; no effect).
    mask_random_circular_shift: bool = False
    # Mask even when the iBOT weight is 0 (unused upstream; no effect).
    force_masking_even_with_zero_weight: bool = False
    # Separate DINO and iBOT heads (must be true: DINOv3 always separates them).
    separate_head: bool = True
    # Number of prototypes of the iBOT head.
    head_n_prototypes: int = 65536
    # Bottleneck width of the iBOT head.
    head_bottleneck_dim: int = 256
    # Weight-normalised last layer (DINO v1/v2: cosine logits); upstream DINOv3 only logs this key.
    head_norm_last_layer: bool = False
    # Project addition: std of the prototypes' normal initialisation (official 0.02).
    head_last_layer_init_std: float = 0.02
    # Number of MLP layers of the iBOT head.
    head_nlayers: int = 3
    # Hidden width of the iBOT head MLP.
    head_hidden_dim: int = 2048


@dataclasses.dataclass(frozen=True)
class Gram:
    """Gram anchoring (RECIPE.md §4.5)."""

    # Add the Gram loss (and, unless ema_teacher, keep a frozen Gram teacher in the train state).
    use_loss: bool = False
    # Compute auxiliary Gram statistics (no effect).
    compute_stats: bool = False
    # Weight of the Gram loss when loss_weight_schedule is None.
    loss_weight: float = 1.0
    # Use the EMA teacher's patch outputs as the Gram targets instead of a separate Gram teacher.
    ema_teacher: bool = False
    # Weights of the Gram teacher: a backbone file load_backbone reads (official .pth, HF, ours), an
    # official teacher_checkpoint.pth, or a run folder of ours (its newest checkpoint's teacher).
    # None, "" or the official placeholder "ignore" = none (then it_load_ema_teacher must be set).
    ckpt: str | None = None
    # Iteration at which the EMA teacher is copied into the Gram teacher (-1 = never).
    it_load_ema_teacher: int = -1
    # Refresh the Gram teacher from the EMA teacher every update_frequency iterations.
    rep_update: bool = True
    # Iterations between two refreshes (after iteration it when (it + 1) % update_frequency == 0).
    update_frequency: int = 50000
    # First iteration at which a refresh may happen ((it + 1) ≥ it_first_update).
    it_first_update: int = 0
    # Maximum number of refreshes; None = unlimited.
    max_updates: int | None = None
    # L2-normalise the patch features before the Gram matrices.
    normalized: bool = True
    # One Gram matrix per image (true) or one for the whole local batch (false).
    img_level: bool = False
    # Zero the negative similarities of both Gram matrices.
    remove_neg: bool = False
    # Zero the negative similarities of the teacher only (see compat.gram_remove_only_teacher_neg_as_official).
    remove_only_teacher_neg: bool = False
    # Patch tokens used: all, masked or unmasked.
    tokens_used: Literal["all", "masked", "unmasked"] = "all"
    # Interpolation that resizes the Gram teacher's patch map to the student grid.
    global_teacher_resize_method: Literal["bicubic", "bilinear", "nearest"] = "bicubic"
    # Antialias in that resize.
    global_teacher_resize_antialias: bool = False
    # v2 schedule of the Gram weight; None = the constant loss_weight.
    loss_weight_schedule: ScheduleEntry | None = None


@dataclasses.dataclass(frozen=True)
class Train:
    """Batch, length, seeds, outputs and the activation checkpointing of the student."""

    # Images per device (per GPU upstream) in each micro-batch; the global batch of a step, which
    # the lr scaling rule and the centering see, is this × number of devices × grad_accumulation_steps.
    batch_size_per_gpu: int = 64
    # Project addition: gradient accumulation over this many micro-batches per step, DINO-correct
    # (the teacher's targets are centred over the whole batch; one optimizer and one EMA update).
    grad_accumulation_steps: int = 1
    # Official dataset string (no effect: use data.source / data.path).
    dataset_path: str | None = "ImageNet:split=TRAIN"
    # Official extra dataset config (no effect).
    data_config: Any = None
    # Directory of checkpoints, logs and the resolved config.
    output_dir: str = "."
    # Official checkpoint frequency in epochs (no effect: use checkpointing.period).
    saveckp_freq: int = 20
    # Seed of the parameter initialisation and of every data draw.
    seed: int = 0
    # Official loader workers (no effect: use data.num_workers).
    num_workers: int = 10
    # Iterations per "epoch"; total iterations = optim.epochs × this.
    OFFICIAL_EPOCH_LENGTH: int = 1250
    # Log the gradient norms (no effect: metrics.jsonl always has grad_norm_backbone/_dino_head/_ibot_head).
    monitor_gradient_norm: bool = False
    # Chunked schedule (unused upstream; no effect).
    chunk_schedule: tuple[Any, ...] = ()
    # Use the teacher head (unused upstream; no effect).
    use_teacher_head: bool = True
    # Learn from teacher tokens (unused upstream; no effect).
    learn_from_teacher_tokens: bool = False
    # Teacher centering: Sinkhorn-Knopp (DINOv3); project addition: "softmax", DINO v1's softmax
    # around an EMA of the teacher logits (RECIPE.md §4.1).
    centering: Literal["sinkhorn_knopp", "softmax"] = "sinkhorn_knopp"
    # Project addition: EMA momentum of the softmax centre (DINO v1's 0.9); only with centering softmax.
    center_momentum: float = 0.9
    # Activation checkpointing of the student's blocks (RECIPE.md §9.2): their activations are
    # recomputed in the backward pass, but for the matmul and attention outputs (selective).
    checkpointing: bool = False
    # With checkpointing: recompute everything in each block (full) instead of the selective policy.
    checkpointing_full: bool = False
    # Project addition: a run folder of ours whose newest checkpoint (student, teacher, optimizer,
    # step) this new run continues with its own config, e.g. the Gram stage after pretraining
    # (RECIPE.md §5.7); the Gram teacher comes from gram.* as usual. "" = start from scratch.
    continue_from: str = ""
    # torch.compile (no effect: every step is jitted).
    compile: bool = True
    # CUDA graphs (no effect).
    cudagraphs: bool = False
    # FSDP2 reshard after forward (no effect: the mesh decides).
    fsdp_reshard_after_forward: bool = True
    # Save the eval checkpoints sharded (no effect).
    sharded_eval_checkpoint: bool = False
    # Cache the dataset in memory (no effect).
    cache_dataset: bool = False


@dataclasses.dataclass(frozen=True)
class Student:
    """The student backbone (RECIPE.md §1.1); the teacher has the same architecture without drop path."""

    # Architecture: vit_small/base/large/so400m/huge2/giant2/7b, the vit_tiny test arch, or a registry name.
    arch: str = "vit_large"
    # Patch size.
    patch_size: int = 16
    # Stochastic depth rate, the same in every block.
    drop_path_rate: float = 0.3
    # LayerScale initial value; None or 0 = no LayerScale.
    layerscale: float | None = 1.0e-5
    # Backbone weights that initialise the student and the EMA teacher (official .pth, HF, ours, or
    # a run folder of ours), with fresh heads; for continued pretraining of a released backbone.
    pretrained_weights: str = ""
    # FFN: mlp, swiglu, swiglu32, swiglu64, swiglu128.
    ffn_layer: Literal["mlp", "swiglu", "swiglu32", "swiglu64", "swiglu128"] = "mlp"
    # FFN ratio; ignored like upstream unless compat.ignore_student_ffn_ratio is false.
    ffn_ratio: float = 4.0
    # A previous stage's teacher that initialises the student and the EMA teacher: a run folder of
    # ours (backbone and heads of its newest checkpoint's teacher) or any backbone file (fresh heads).
    resume_from_teacher_chkpt: str = ""
    # Bias of the qkv projection.
    qkv_bias: bool = True
    # Bias of the attention output projection.
    proj_bias: bool = True
    # Bias of the FFN linears.
    ffn_bias: bool = True
    # layernorm (eps 1e-6), layernormbf16 (eps 1e-5) or rmsnorm.
    norm_layer: Literal["layernorm", "layernormbf16", "rmsnorm"] = "layernorm"
    # Register (storage) tokens.
    n_storage_tokens: int = 0
    # Zero the k third of the qkv bias.
    mask_k_bias: bool = False
    # Separate final norm for CLS and registers.
    untie_cls_and_patch_norms: bool = False
    # Separate final norm for the CLS and registers of local crops.
    untie_global_and_local_cls_norm: bool = False
    # Input channels; ignored like upstream unless compat.ignore_student_in_chans is false.
    in_chans: int = 3
    # Position embedding type (always RoPE; no effect).
    pos_embed_type: str = "rope"
    # RoPE base (exclusive with the min/max periods).
    pos_embed_rope_base: float | None = 100.0
    # RoPE minimum period.
    pos_embed_rope_min_period: float | None = None
    # RoPE maximum period.
    pos_embed_rope_max_period: float | None = None
    # RoPE coordinate normalisation: separate, min or max.
    pos_embed_rope_normalize_coords: Literal["separate", "min", "max"] = "separate"
    # Train-time RoPE coordinate shift.
    pos_embed_rope_shift_coords: float | None = None
    # Train-time RoPE per-axis jitter.
    pos_embed_rope_jitter_coords: float | None = None
    # Train-time RoPE rescale.
    pos_embed_rope_rescale_coords: float | None = None
    # RoPE dtype; the official trainer ignores it and uses bf16 (compat.training_rope_dtype_bf16).
    pos_embed_rope_dtype: DtypeName = "bf16"
    # fp8 block linears (no effect).
    fp8_enabled: bool = False
    # Module filter of fp8 (no effect).
    fp8_filter: str = "blocks"


@dataclasses.dataclass(frozen=True)
class Teacher:
    """EMA teacher momentum and temperature (v1 schedules; null when `schedules` is used)."""

    # EMA momentum at the start (cosine to final_momentum_teacher).
    momentum_teacher: float | None = 0.992
    # EMA momentum at the end.
    final_momentum_teacher: float | None = 1.0
    # Teacher temperature at the start of its warmup.
    warmup_teacher_temp: float | None = 0.04
    # Teacher temperature after the warmup.
    teacher_temp: float | None = 0.07
    # Length of the linear temperature warmup, in epochs.
    warmup_teacher_temp_epochs: float | None = 30
    # Input channels of the teacher (no effect).
    in_chans: int = 3


@dataclasses.dataclass(frozen=True)
class Distillation:
    """Distillation from a frozen teacher (paper §5.2; dinov3_jax.train.distill)."""

    # Train the student against the frozen teacher of full_cfg_path / checkpoint_path.
    enabled: bool = False
    # The teacher's training config (a recipe name, a YAML file, or a run folder of ours); empty = the
    # config.yaml of the run folder in checkpoint_path, or the architecture of the backbone file there.
    full_cfg_path: str = ""
    # The teacher's weights: a run folder or checkpoint of ours (backbone and heads), an official training
    # checkpoint (teacher_checkpoint.pth, heads included), or any backbone file (no heads); "ignore" = random.
    checkpoint_path: str = ""
    # Project addition: heads (the teacher's DINO/iBOT head targets, as the paper), features (the student's
    # tokens regressed onto the teacher's, for a teacher without heads), or auto (heads when there are any).
    objective: Literal["auto", "heads", "features"] = "auto"


@dataclasses.dataclass(frozen=True)
class MultiDistillationStudent:
    """One student of a multi-distillation run (RECIPE.md §5.8; dinov3_jax.train.distill)."""

    # Student name: its folder under the run's students/ (config, exported backbone).
    name: str = ""
    # Student config file (a path or a built-in recipe name), merged under the run's config.
    config_path: str = ""
    # Upstream's [first, last) ranks of this student; no effect (with a warning): here every student
    # trains on every device on the whole global batch.
    ranks_range: tuple[int, int] = (0, 0)


@dataclasses.dataclass(frozen=True)
class MultiDistillation:
    """Several students distilled at once from one teacher pass (paper §5.2; dinov3_jax.train.distill)."""

    # Multi-distillation mode (with distillation.enabled and its teacher).
    enabled: bool = False
    # Images per step, seen by every student; None = train.batch_size_per_gpu × devices.
    global_batch_size: int | None = None
    # The students.
    students: tuple[MultiDistillationStudent, ...] = ()


@dataclasses.dataclass(frozen=True)
class Hrft:
    """Official high-resolution fine-tuning section (unused upstream; no effect)."""

    # High-resolution fine-tuning mode.
    enabled: bool = False
    # Teacher checkpoint.
    checkpoint_path: str = ""


@dataclasses.dataclass(frozen=True)
class Optim:
    """AdamW, parameter groups and the v1 schedules (RECIPE.md §5.3–5.4)."""

    # Training length in epochs of train.OFFICIAL_EPOCH_LENGTH iterations.
    epochs: int = 100
    # Optimizer; always AdamW.
    optimizer: Literal["adamw"] = "adamw"
    # Weight decay at the start (cosine to weight_decay_end).
    weight_decay: float | None = 0.04
    # Weight decay at the end.
    weight_decay_end: float | None = 0.4
    # Peak lr before the scaling rule.
    lr: float | None = 0.001
    # Linear lr warmup, in epochs.
    warmup_epochs: float | None = 10
    # Final lr of the cosine (not scaled).
    min_lr: float | None = 1.0e-6
    # Truncated-cosine extension of the v1 schedules (no effect).
    schedule_trunc_extra: float | None = 0.0
    # Max global gradient norm, per student sub-module (backbone, dino_head, ibot_head).
    clip_grad: float = 3.0
    # Epochs during which the heads' last layers get lr 0 (v1).
    freeze_last_layer_epochs: float | None = 1
    # Project addition: epochs during which the backbone gets lr 0 (a head warm-up before joint
    # training, for continued pretraining from a released backbone that ships without heads).
    freeze_backbone_epochs: float = 0.0
    # lr scaling with the global batch: sqrt_wrt_1024, linear_wrt_256, or none (project addition).
    scaling_rule: Literal["sqrt_wrt_1024", "linear_wrt_256", "none"] = "sqrt_wrt_1024"
    # Extra lr multiplier of the patch embedding.
    patch_embed_lr_mult: float = 0.2
    # Weight-decay multiplier of the DINO head (never applies upstream; see compat).
    dino_head_wd_multiplier: float = 1.0
    # Layer-wise lr decay of the backbone.
    layerwise_decay: float = 0.9
    # Fused multi-tensor optimizer (no effect).
    multi_tensor_optim: bool = True
    # Dump FSDP weights path (no effect).
    dump_fsdp_weights_path: str = ""
    # AdamW beta1.
    adamw_beta1: float = 0.9
    # AdamW beta2.
    adamw_beta2: float = 0.999


@dataclasses.dataclass(frozen=True)
class Crops:
    """Multi-crop augmentation (RECIPE.md §6.2). Lists of sizes mean one resolution per iteration."""

    # RandomResizedCrop area range of the global crops.
    global_crops_scale: tuple[float, float] = (0.32, 1.0)
    # Number of local crops per image.
    local_crops_number: int = 8
    # RandomResizedCrop area range of the local crops.
    local_crops_scale: tuple[float, float] = (0.05, 0.32)
    # Side of the global crops (or one per resolution).
    global_crops_size: int | tuple[int, ...] = 224
    # Side of the local crops (or one per resolution).
    local_crops_size: int | tuple[int, ...] = 96
    # Probabilities of the resolutions when the sizes are lists.
    global_local_crop_pairs_ratios: float | tuple[float, ...] = 1.0
    # Side of the Gram-teacher crops (or one per resolution); None = no Gram-teacher crops.
    gram_teacher_crops_size: int | tuple[int, ...] | None = None
    # Take the local crops inside the global crops.
    localcrops_subset_of_globalcrops: bool = False
    # Same colour jitter for all crops of an image.
    share_color_jitter: bool = False
    # Random horizontal flips.
    horizontal_flips: bool = True
    # Project addition: colour-jitter strengths (brightness, contrast, saturation, hue); official values.
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    # Project addition: probability of the colour jitter (official 0.8).
    color_jitter_prob: float = 0.8
    # Project addition: probability of grayscale (official 0.2).
    grayscale_prob: float = 0.2
    # Project addition: range of the Gaussian blur's sigma in pixels of the crop (official [0.1, 2.0],
    # set for 224 px crops).
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    # Project addition: probability of solarising global crop 2 (official 0.2).
    solarize_prob: float = 0.2
    # Gram-teacher crops without photometric distortions.
    gram_teacher_no_distortions: bool = False
    # Normalisation mean.
    rgb_mean: tuple[float, float, float] = NORMALIZATION["lvd"][0]
    # Normalisation std.
    rgb_std: tuple[float, float, float] = NORMALIZATION["lvd"][1]
    # Distillation: the teacher sees the global crops downscaled by this factor, so that its patch grid
    # matches the student's (2 for a stride-32 ConvNeXt student of a patch-16 teacher).
    teacher_to_student_resolution_scale: float = 1.0


@dataclasses.dataclass(frozen=True)
class EvaluationConfigFiles:
    """Official benchmark config files (no effect)."""

    # Frequent benchmark config.
    high_freq: str = "benchmark_high_frequency.yaml"
    # Infrequent benchmark config.
    low_freq: str = "benchmark_low_frequency.yaml"


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """Evaluation checkpoints of the teacher."""

    # Iterations between two exports of the teacher backbone (eval/training_<it>/teacher_backbone.safetensors).
    eval_period_iterations: int = 12500
    # Run the low-frequency benchmarks every this many evaluations (no effect).
    low_freq_every: int = 5
    # Benchmark configs (no effect).
    config_files: EvaluationConfigFiles = EvaluationConfigFiles()


@dataclasses.dataclass(frozen=True)
class Checkpointing:
    """Resumable training checkpoints."""

    # Iterations between two resumable checkpoints.
    period: int = 3750
    # Number of recent checkpoints kept.
    max_to_keep: int = 3
    # Also keep every checkpoint whose iteration is a multiple of this (never deleted).
    keep_every: int = 99999999999999999


@dataclasses.dataclass(frozen=True)
class Schedules:
    """v2 schedules (RECIPE.md §5.4); their presence replaces the v1 keys of optim/teacher."""

    # lr (scaled by optim.scaling_rule, peak and end); freeze_last_layer_epochs applies here.
    lr: ScheduleEntry | None = None
    # Weight decay.
    weight_decay: ScheduleEntry | None = None
    # Teacher EMA momentum.
    momentum: ScheduleEntry | None = None
    # Teacher temperature.
    teacher_temp: ScheduleEntry | None = None


# --------------------------------------------------------------------------------------------
# Project sections (no official counterpart).
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Mesh:
    """Project addition: the (data, fsdp) device mesh (dinov3_jax.parallel.make_mesh)."""

    # Data-parallel axis size; -1 = all the devices that fsdp leaves.
    data: int = -1
    # Parameter-sharding axis size.
    fsdp: int = 1


@dataclasses.dataclass(frozen=True)
class Distributed:
    """Project addition: multi-process runs through `jax.distributed.initialize` (one process per
    host, or per GPU). Every process runs the same command with the same config; only
    `process_id` differs (or comes from the cluster: SLURM, Open MPI, Cloud TPU)."""

    # Join a multi-process run; false = this process is the whole run.
    enabled: bool = False
    # host:port of process 0; None = detected from the cluster or JAX_COORDINATOR_ADDRESS.
    coordinator_address: str | None = None
    # Number of processes; None = detected from the cluster.
    num_processes: int | None = None
    # This process's rank in [0, num_processes); None = detected from the cluster.
    process_id: int | None = None


@dataclasses.dataclass(frozen=True)
class Data:
    """Project addition: where the training and k-NN images come from (dinov3_jax.data.make_source)."""

    # synthetic (generated in memory), folder (class sub-folders), filelist (text file), fashion_mnist.
    source: Literal["synthetic", "folder", "filelist", "fashion_mnist"] = "synthetic"
    # Root folder, file list or dataset directory of the training images (unused for synthetic).
    path: str | None = None
    # Source of the labelled k-NN images (its train split is the memory, its test split is evaluated); None = source.
    val_source: Literal["synthetic", "folder", "filelist", "fashion_mnist"] | None = None
    # Path of the k-NN images; None = path.
    val_path: str | None = None
    # Loader worker processes per host (0 = in the main process).
    num_workers: int = 4
    # Number of synthetic training images, or a truncation of a real source; None = the source's default / all.
    num_samples: int | None = None
    # Side of the synthetic images in pixels; None = the synthetic source's default.
    synthetic_image_size: int | None = None
    # Images of the k-NN memory (train split); None = the source's default / all.
    knn_train_samples: int | None = None
    # Images evaluated by k-NN (test split); None = the source's default / all.
    knn_val_samples: int | None = None
    # Stop when more than this fraction of the training images turned out unreadable (each one is
    # replaced by the next readable image and named in the log and in unreadable_images.txt).
    max_unreadable_fraction: float = 0.1


@dataclasses.dataclass(frozen=True)
class Runtime:
    """Project addition: logging, evaluation cadence, run length and safety nets."""

    # Steps between two log lines.
    log_every_steps: int = 10
    # Steps between two k-NN evaluations of the teacher; 0 = only after the last step; None = never.
    knn_every_steps: int | None = 0
    # Neighbour counts of the weighted k-NN classifier (one accuracy per k).
    knn_k: tuple[int, ...] = (10, 20)
    # Images per batch of the k-NN feature extraction.
    eval_batch_size: int = 256
    # Stop after this many steps; None = optim.epochs × train.OFFICIAL_EPOCH_LENGTH (schedules keep that length).
    max_steps: int | None = None
    # Abort after more than this many consecutive non-finite steps (official: 2); checked every step.
    nan_max_consecutive: int = 2
    # Attention kernel: xla (portable) or cudnn (GPU).
    attention_impl: Literal["xla", "cudnn"] = "xla"
    # Keys (or whole sections, or `run` for the global batch and process count) a resume may change
    # although the run is then no longer exactly the one its checkpoints began; a resume that
    # changes any other key that shapes the training is refused (RESUME_SAFE_KEYS never matter).
    resume_allow_changes: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Compat:
    """Project addition: reproduce (true) or fix (false) the upstream quirks of RECIPE.md §10.22 and §10.9."""

    # Reproduce: the official training builder ignores student.pos_embed_rope_dtype and runs RoPE in bf16.
    training_rope_dtype_bf16: bool = True
    # Reproduce: the FFN ratio is fixed by the arch; student.ffn_ratio is ignored.
    ignore_student_ffn_ratio: bool = True
    # Reproduce: student.in_chans is ignored (always 3 channels).
    ignore_student_in_chans: bool = True
    # Reproduce: optim.dino_head_wd_multiplier never matches a parameter (names are head-relative).
    dino_head_wd_multiplier_never_applies: bool = True
    # Reproduce: gram.remove_only_teacher_neg never masks the student's similarities.
    gram_remove_only_teacher_neg_as_official: bool = True
    # Reproduce: crops.teacher_to_student_resolution_scale is never applied (teacher and student grids must
    # then agree at scale 1). Off by default, unlike the other switches: upstream's configs that set the
    # scale pair grids that differ without it, which only a silently wrong run could reproduce.
    ignore_teacher_to_student_resolution_scale: bool = False
    # Reproduce: the effective blur probabilities are 0 / 0.9 / 0.5 (global 1 / global 2 / local), as trained.
    inverted_blur_probabilities: bool = True


@dataclasses.dataclass(frozen=True)
class Config:
    """The whole training configuration: official sections, then the project additions."""

    # Official, unused.
    MODEL: ModelSection = ModelSection()
    # Mixed precision.
    compute_precision: ComputePrecision = ComputePrecision()
    # DINO loss and head, KoLeo.
    dino: Dino = Dino()
    # iBOT loss, head and masking.
    ibot: Ibot = Ibot()
    # Gram anchoring.
    gram: Gram = Gram()
    # Batch, length, seed, output directory.
    train: Train = Train()
    # Student backbone.
    student: Student = Student()
    # EMA teacher (v1 schedules).
    teacher: Teacher = Teacher()
    # Distillation from a frozen teacher.
    distillation: Distillation = Distillation()
    # Several students at once.
    multidistillation: MultiDistillation = MultiDistillation()
    # Official, unused.
    hrft: Hrft = Hrft()
    # Optimizer and v1 schedules.
    optim: Optim = Optim()
    # Multi-crop augmentation.
    crops: Crops = Crops()
    # Evaluation checkpoints.
    evaluation: Evaluation = Evaluation()
    # Resumable checkpoints.
    checkpointing: Checkpointing = Checkpointing()
    # v2 schedules; None = v1 (optim/teacher keys).
    schedules: Schedules | None = None
    # Project addition: device mesh.
    mesh: Mesh = Mesh()
    # Project addition: multi-process (multi-host) runs.
    distributed: Distributed = Distributed()
    # Project addition: data sources.
    data: Data = Data()
    # Project addition: logging, evaluation, run length.
    runtime: Runtime = Runtime()
    # Project addition: reproduce-or-fix switches for upstream quirks.
    compat: Compat = Compat()


# Sections with no official counterpart (documented as project additions).
# Keys a resume may change and still be the same run, bitwise: where the run writes, how often it
# logs, evaluates and checkpoints, how many processes decode images, its safety nets, its length.
RESUME_SAFE_KEYS = (
    "train.output_dir",
    "train.num_workers",
    "train.saveckp_freq",
    "data.num_workers",
    "data.val_source",
    "data.val_path",
    "data.knn_train_samples",
    "data.knn_val_samples",
    "data.max_unreadable_fraction",
    "runtime.log_every_steps",
    "runtime.knn_every_steps",
    "runtime.knn_k",
    "runtime.eval_batch_size",
    "runtime.max_steps",
    "runtime.nan_max_consecutive",
    "runtime.resume_allow_changes",
    "checkpointing",
    "evaluation",
    "distributed",
)

# Keys a resume may change when the global batch stays the same (elastic restore: a checkpoint
# written on one mesh continues on another): the checkpoint is placed onto the new mesh and the run
# goes on with the same global batch, schedules and data stream; only what is computed per device
# (KoLeo's and Gram's groups, the reduction order) follows the new layout.
LAYOUT_KEYS = ("mesh", "train.batch_size_per_gpu", "train.grad_accumulation_steps", "run.processes")

PROJECT_SECTIONS = ("mesh", "distributed", "data", "runtime", "compat")

# Official keys that this implementation reads nowhere: accepted, with a one-line warning when
# they are given a value other than the official default. Value = hint appended to the warning.
NO_EFFECT_KEYS: dict[str, str] = {
    "MODEL.META_ARCHITECTURE": "distillation.enabled and multidistillation.enabled choose the kind of run",
    "MODEL.DEVICE": "JAX picks the devices",
    "MODEL.WEIGHTS": "",
    "MODEL.DTYPE": "see compute_precision",
    "dino.koleo_distributed_replicas": "",
    "dino.koleo_distributed_loss_group_data": "",
    "dino.force_weight_norm": "",
    "ibot.mask_random_circular_shift": "",
    "ibot.force_masking_even_with_zero_weight": "",
    "gram.compute_stats": "",
    "train.dataset_path": "set data.source and data.path",
    "train.data_config": "set the data section",
    "train.saveckp_freq": "set checkpointing.period",
    "train.num_workers": "set data.num_workers",
    "train.monitor_gradient_norm": "the per-sub-module gradient norms are always logged (grad_norm_*)",
    "train.chunk_schedule": "",
    "train.use_teacher_head": "",
    "train.learn_from_teacher_tokens": "",
    "train.compile": "every step is jitted",
    "train.cudagraphs": "",
    "train.fsdp_reshard_after_forward": "set the mesh section",
    "train.sharded_eval_checkpoint": "",
    "train.cache_dataset": "",
    "student.pos_embed_type": "RoPE is the only position embedding",
    "student.fp8_enabled": "fp8 is not implemented",
    "student.fp8_filter": "fp8 is not implemented",
    "teacher.in_chans": "",
    "compute_precision.reduce_dtype": "gradients are reduced in fp32, the master parameters' dtype",
    "hrft.enabled": "",
    "hrft.checkpoint_path": "",
    "optim.schedule_trunc_extra": "",
    "optim.multi_tensor_optim": "",
    "optim.dump_fsdp_weights_path": "",
    "evaluation.low_freq_every": "",
    "evaluation.config_files.high_freq": "",
    "evaluation.config_files.low_freq": "",
}

# Official keys whose effect depends on a compat switch: key -> (compat field, value of the switch
# under which the key has no effect).
CONDITIONAL_NO_EFFECT_KEYS: dict[str, tuple[str, bool]] = {
    "student.pos_embed_rope_dtype": ("training_rope_dtype_bf16", True),
    "student.ffn_ratio": ("ignore_student_ffn_ratio", True),
    "student.in_chans": ("ignore_student_in_chans", True),
    "optim.dino_head_wd_multiplier": ("dino_head_wd_multiplier_never_applies", True),
}

# Official keys that accept only their official value (anything else is refused by `validate`).
FIXED_KEYS: dict[str, str] = {
    "ibot.separate_head": "DINOv3 always uses separate DINO and iBOT heads",
    "dino.koleo_topk": "KoLeo uses the single nearest neighbour",
    "optim.optimizer": "DINOv3 trains with AdamW",
}

# v1 schedule keys, replaced by the `schedules` section when it is present.
V1_SCHEDULE_KEYS = (
    "optim.lr",
    "optim.weight_decay",
    "optim.weight_decay_end",
    "optim.warmup_epochs",
    "optim.min_lr",
    "optim.freeze_last_layer_epochs",
    "teacher.momentum_teacher",
    "teacher.final_momentum_teacher",
    "teacher.warmup_teacher_temp",
    "teacher.teacher_temp",
    "teacher.warmup_teacher_temp_epochs",
)

# Keys that appear in released official recipe files but not in the official default config
# (leftovers of internal versions). Accepted and dropped, with one warning line listing them.
# A name ending in ".*" accepts a whole section.
LEGACY_KEYS = frozenset(
    {
        "coding_rate_loss.*",
        "compute_precision.sharding_strategy",
        "train.cell_augmentation",
        "train.cell_augmentation_type",
        "student.patch_drop",
        "student.drop_path_uniform",
        "student.drop_path_shape",
        "student.sin_cos_embeddings",
        "student.fourier_embeddings",
        "student.fourier_encoding_dim",
        "student.multiple_pos_embeddings",
        "student.cls_pos_embedding",
        "student.reg_pos_embedding",
        "student.block_chunks",
        "student.mask_attention",
        "student.mask_register_attention",
        "student.interpolate_offset",
        "student.interpolate_antialias",
        "student.init_std_cls",
        "student.init_std_reg",
        "student.rescale_weights_by_layer_id",
        "student.pos_embed_grid_size",
        "student.pos_embed_rope_gamma",
        "student.pos_embed_rope_init_multi_frequencies",
        "student.sparse24_ranges",
        "student.sparse24_filter",
        "student.sparse24_default",
    }
)


# --------------------------------------------------------------------------------------------
# Derived values.
# --------------------------------------------------------------------------------------------

# Training arch functions: name -> (embed_dim, depth, num_heads, ffn_ratio) (RECIPE.md §1.1).
ARCHS: dict[str, tuple[int, int, int, float]] = {
    "vit_nano": (32, 2, 2, 4.0),  # project addition: a distillation student of vit_tiny, ~5x smaller
    "vit_tiny": (64, 3, 4, 4.0),  # project addition, for tests and CPU runs
    "vit_mini": (128, 4, 4, 4.0),  # project addition, for CPU runs on small real images
    "vit_small": (384, 12, 6, 4.0),
    "vit_base": (768, 12, 12, 4.0),
    "vit_large": (1024, 24, 16, 4.0),
    "vit_so400m": (1152, 27, 18, 3.777777778),
    "vit_huge2": (1280, 32, 20, 4.0),
    "vit_giant2": (1536, 40, 24, 4.0),
    "vit_7b": (4096, 40, 32, 3.0),
}


def arch_dims(arch: str) -> tuple[int, int, int, float]:
    """(embed_dim, depth, num_heads, ffn_ratio) of a training arch or of a registry model name."""
    if arch in ARCHS:
        return ARCHS[arch]
    from dinov3_jax.models.registry import MODELS

    if arch in MODELS:
        c = MODELS[arch].config
        return c.embed_dim, c.depth, c.num_heads, c.ffn_ratio
    names = [*ARCHS, *MODELS]
    close = difflib.get_close_matches(arch, names, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ConfigError(f"student.arch: unknown arch {arch!r}{hint}; known: {', '.join(names)}")


def student_vit_config(cfg: Config) -> ViTConfig:
    """The student backbone's ViTConfig from `student.*` (arch → D/L/H/ffn ratio), drop path included.

    Like the official training builder, the arch decides the width, depth, heads and FFN ratio; the
    compat switches decide whether `student.ffn_ratio`, `student.in_chans` and
    `student.pos_embed_rope_dtype` are ignored (official) or honoured. The compute dtype is
    `compute_precision.param_dtype`; master parameters stay fp32.
    """
    s, compat = cfg.student, cfg.compat
    embed_dim, depth, num_heads, ffn_ratio = arch_dims(s.arch)
    try:
        return ViTConfig(
            patch_size=s.patch_size,
            in_chans=3 if compat.ignore_student_in_chans else s.in_chans,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            ffn_ratio=ffn_ratio if compat.ignore_student_ffn_ratio else s.ffn_ratio,
            ffn_layer=s.ffn_layer,
            ffn_bias=s.ffn_bias,
            proj_bias=s.proj_bias,
            qkv_bias=s.qkv_bias,
            # The official 7B configs set mask_k_bias with qkv_bias false: no bias, nothing to mask.
            mask_k_bias=s.mask_k_bias and s.qkv_bias,
            layerscale_init=s.layerscale or None,
            norm_layer=s.norm_layer,
            n_storage_tokens=s.n_storage_tokens,
            untie_cls_and_patch_norms=s.untie_cls_and_patch_norms,
            untie_global_and_local_cls_norm=s.untie_global_and_local_cls_norm,
            pos_embed_rope_base=s.pos_embed_rope_base,
            pos_embed_rope_min_period=s.pos_embed_rope_min_period,
            pos_embed_rope_max_period=s.pos_embed_rope_max_period,
            pos_embed_rope_normalize_coords=s.pos_embed_rope_normalize_coords,
            pos_embed_rope_shift_coords=s.pos_embed_rope_shift_coords,
            pos_embed_rope_jitter_coords=s.pos_embed_rope_jitter_coords,
            pos_embed_rope_rescale_coords=s.pos_embed_rope_rescale_coords,
            pos_embed_rope_dtype="bf16" if compat.training_rope_dtype_bf16 else s.pos_embed_rope_dtype,
            drop_path_rate=s.drop_path_rate,
            attention_impl=cfg.runtime.attention_impl,
            remat=remat_policy(cfg),
            dtype=cfg.compute_precision.param_dtype,
            param_dtype="float32",
        )
    except ValueError as e:
        raise ConfigError(f"student: {e}") from None


def student_backbone_config(cfg: Config) -> ViTConfig | ConvNeXtConfig:
    """The student's backbone: a ViT (`student_vit_config`), or with `student.arch=convnext_{tiny,small,
    base,large}` (distillation students, paper §5.2) that ConvNeXt with `student.drop_path_rate`."""
    arch = cfg.student.arch
    if not arch.startswith("convnext"):
        return student_vit_config(cfg)
    from dinov3_jax.models.registry import MODELS

    spec = MODELS.get(f"dinov3_{arch}")
    if spec is None or not isinstance(spec.config, ConvNeXtConfig):
        sizes = sorted(n.removeprefix("dinov3_") for n, m in MODELS.items() if isinstance(m.config, ConvNeXtConfig))
        raise ConfigError(f"student.arch: unknown ConvNeXt {arch!r}; known: {', '.join(sizes)}")
    return dataclasses.replace(
        spec.config,
        drop_path_rate=cfg.student.drop_path_rate,
        dtype=cfg.compute_precision.param_dtype,
        remat=remat_policy(cfg),
    )


def remat_policy(cfg: Config) -> str:
    """The student's activation checkpointing (a models.config.REMAT_POLICIES name) from
    `train.checkpointing` and `train.checkpointing_full`."""
    if not cfg.train.checkpointing:
        return "off"
    return "full" if cfg.train.checkpointing_full else "selective"


def teacher_vit_config(cfg: Config) -> ViTConfig:
    """The (EMA) teacher backbone: the student's architecture without drop path."""
    return student_vit_config(cfg).replace(drop_path_rate=0.0, remat="off")


def total_steps(cfg: Config) -> int:
    """Iterations of the run: runtime.max_steps, else optim.epochs × train.OFFICIAL_EPOCH_LENGTH."""
    if cfg.runtime.max_steps is not None:
        return cfg.runtime.max_steps
    return cfg.optim.epochs * cfg.train.OFFICIAL_EPOCH_LENGTH


def schedule_steps(cfg: Config) -> int:
    """Length over which the schedules are laid out: optim.epochs × train.OFFICIAL_EPOCH_LENGTH."""
    return cfg.optim.epochs * cfg.train.OFFICIAL_EPOCH_LENGTH


def source_kwargs(cfg: Config, num_samples: int | None) -> dict[str, Any]:
    """Keyword arguments of `data.sources.make_source` for the run's data (seed, sample count,
    synthetic image size)."""
    kw: dict[str, Any] = {"seed": cfg.train.seed}
    if num_samples:
        kw["num_samples"] = num_samples
    if cfg.data.synthetic_image_size:
        kw["image_size"] = cfg.data.synthetic_image_size
    return kw


def global_batch_size(cfg: Config, n_devices: int) -> int:
    """Images per step over all devices and micro-batches: train.batch_size_per_gpu × n_devices ×
    train.grad_accumulation_steps, or multidistillation.global_batch_size when it is set (every
    student sees all of them)."""
    md = cfg.multidistillation
    if md.enabled and md.global_batch_size is not None:
        return md.global_batch_size
    return cfg.train.batch_size_per_gpu * n_devices * cfg.train.grad_accumulation_steps


def lr_scale_factor(cfg: Config, global_batch: int) -> float:
    """The factor of optim.scaling_rule: 4·√(B/1024) (sqrt_wrt_1024), B/256 (linear_wrt_256) or 1."""
    rule = cfg.optim.scaling_rule
    if rule == "sqrt_wrt_1024":
        return 4.0 * math.sqrt(global_batch / 1024.0)
    if rule == "linear_wrt_256":
        return global_batch / 256.0
    return 1.0


def scaled_lr(cfg: Config, global_batch: int) -> float:
    """Largest lr after the scaling rule: optim.lr (v1) or the largest of schedules.lr start/peak/end
    (v2; e.g. the high-res stage rises from peak 0 to end 1.25e-5) × lr_scale_factor.

    (v1 scales only the peak, min_lr stays as is; v2 scales start, peak and end alike.)
    """
    if cfg.schedules is not None and cfg.schedules.lr is not None:
        lr = cfg.schedules.lr
        base = max(lr.start, lr.peak, lr.end)
    else:
        base = cfg.optim.lr
    if base is None:
        raise ConfigError("optim.lr: no lr is set (neither optim.lr nor schedules.lr)")
    return base * lr_scale_factor(cfg, global_batch)


def mesh_shape(cfg: Config, n_devices: int) -> tuple[int, int]:
    """(data, fsdp) axis sizes for n_devices, resolving mesh.data = -1."""
    fsdp = cfg.mesh.fsdp
    if fsdp < 1 or n_devices % fsdp:
        raise ConfigError(f"mesh.fsdp: {fsdp} does not divide the {n_devices} devices")
    data = n_devices // fsdp if cfg.mesh.data == -1 else cfg.mesh.data
    if data * fsdp != n_devices:
        raise ConfigError(
            f"mesh.data: mesh.data × mesh.fsdp = {data}×{fsdp} = {data * fsdp}, but there are {n_devices} devices"
        )
    return data, fsdp
