"""grain pipelines: the per-host training stream of multi-crop batches and the ordered evaluation stream.

Training (per host, docs/training-interfaces.md)::

    range(len(source)) → shuffle(seed) → repeat() → tag stream position → shard (p::P)
      → load + DataAugmentationDINO (RNG from (seed, epoch, stream position))
      → batch(B) → collate (crop-major stacking + iBOT masks, RNG from (seed, process, step))
      → [start_step:] → to_iter_dataset → mp_prefetch (num_workers > 0)

Everything up to ``to_iter_dataset`` is a ``MapDataset``: batch ``t`` is a pure function of
(seed, process, t), so the output is the same for any ``num_workers``, and a stream built with ``start_step=t`` resumes exactly at batch t. Unreadable images are replaced by
the next readable source index, and each batch says which ones it skipped (``skipped_from``,
``n_skipped``) so that the trainer can name them.

Several (global, local[, Gram-teacher]) crop-size pairs (the high-resolution adaptation stage,
paper §5.1): every step uses one pair for all of its images on every host, drawn with
``crops.global_local_crop_pairs_ratios`` from a generator seeded by (seed, step) alone
(`crop_pair_index`), so the choice needs no communication and a resumed run draws the same pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grain
import numpy as np
from PIL import Image

from dinov3_jax.data.augment import AugmentConfig, DataAugmentationDINO
from dinov3_jax.data.images import Transform, UnreadableImage, normalize, to_rgb
from dinov3_jax.data.masking import MaskingGenerator, collate_masks, max_masked_tokens
from dinov3_jax.data.sources import ImageSource
from dinov3_jax.models.registry import NORMALIZATION

_SAMPLE_TAG = 0xC20F  # domain separators for the seed sequences
_MASK_TAG = 0x1B07
_PAIR_TAG = 0x9A1C


@dataclass(frozen=True)
class TrainDataSpec:
    """Static shapes of one training batch (host-local)."""

    per_host_batch: int
    global_size: int
    local_size: int
    n_local: int
    patch_size: int
    n_patches: int
    max_masked_tokens: int
    mask_ratio_min_max: tuple[float, float]
    mask_sample_probability: float
    gram_size: int | None = None

    def shapes(self) -> dict[str, tuple[tuple[int, ...], Any]]:
        b, s, ls = self.per_host_batch, self.global_size, self.local_size
        return {
            "global_crops": ((2 * b, s, s, 3), np.float32),
            "local_crops": ((self.n_local * b, ls, ls, 3), np.float32),
            "masks": ((2 * b, self.n_patches), np.bool_),
            "mask_indices": ((self.max_masked_tokens,), np.int32),
            "mask_weights": ((self.max_masked_tokens,), np.float32),
            "labels": ((b,), np.int32),
            "skipped_from": ((b,), np.int64),
            "n_skipped": ((b,), np.int32),
            **(
                {"gram_teacher_crops": ((2 * b, self.gram_size, self.gram_size, 3), np.float32)}
                if self.gram_size
                else {}
            ),
        }


@dataclass(frozen=True)
class CropPairs:
    """The crop sizes of each resolution and the probability of each (one entry = one resolution)."""

    global_sizes: tuple[int, ...]
    local_sizes: tuple[int, ...]
    gram_sizes: tuple[int | None, ...]
    ratios: tuple[float, ...]

    @classmethod
    def from_crops(cls, crops: Any) -> CropPairs:
        """From ``cfg.crops`` (scalars or lists of the official keys; a scalar is repeated)."""

        def sizes(value) -> tuple:
            return tuple(value) if isinstance(value, tuple | list) else (value,)

        g = sizes(_cfg_get(crops, "global_crops_size", 224))
        loc = sizes(_cfg_get(crops, "local_crops_size", 96))
        gram = sizes(_cfg_get(crops, "gram_teacher_crops_size", None))
        ratios = sizes(_cfg_get(crops, "global_local_crop_pairs_ratios", 1.0))
        n = max(len(g), len(loc), len(gram))
        widen = lambda t: t * n if len(t) == 1 else t  # noqa: E731
        g, loc, gram = widen(g), widen(loc), widen(gram)
        ratios = (1.0,) if n == 1 else tuple(float(r) for r in ratios)
        if not len(g) == len(loc) == len(gram) == len(ratios):
            raise ValueError(
                f"crop size lists of different lengths: global {g}, local {loc}, gram {gram}, ratios {ratios}"
            )
        return cls(tuple(map(int, g)), tuple(map(int, loc)), tuple(None if x is None else int(x) for x in gram), ratios)

    def __len__(self) -> int:
        return len(self.global_sizes)

    def pair(self, i: int) -> dict[str, int | None]:
        return {
            "global_crops_size": self.global_sizes[i],
            "local_crops_size": self.local_sizes[i],
            "gram_teacher_crops_size": self.gram_sizes[i],
        }


def crop_pair_index(seed: int, step: int, ratios: tuple[float, ...]) -> int:
    """The crop-size pair of global step ``step``: a draw with probabilities ``ratios`` from a
    generator seeded by (seed, step), the same on every host and after a resume."""
    if len(ratios) == 1:
        return 0
    rng = np.random.default_rng([seed, _PAIR_TAG, int(step)])
    return int(rng.choice(len(ratios), p=np.asarray(ratios) / np.sum(ratios)))


class _TagPosition:
    """(stream position, source index) pairs."""

    def __call__(self, index: int, src_index: int) -> tuple[int, int]:
        return int(index), int(src_index)


class TooManyUnreadable(ValueError):
    """No image of the training source can be read, or more than the allowed fraction cannot."""


def load_with_skips(source: ImageSource, index: int) -> tuple[Image.Image | np.ndarray, int, int]:
    """``source[index]``, or the next readable item (index + 1, ...) when it is unreadable.
    Returns ``(image, label, n_skipped)``: the unreadable ones are ``index, …, index + n_skipped − 1``
    (mod ``len(source)``)."""
    n = len(source)
    first_error = None
    for skipped in range(n):
        try:
            image, label = source[(index + skipped) % n]
            return image, int(label), skipped
        except UnreadableImage as err:
            first_error = first_error or err
    raise TooManyUnreadable(f"none of the {n} images of the training source can be read (the first: {first_error})")


class UnreadableImages:
    """The training images found unreadable so far: named in the log (the first `shown`) and one
    per line (`path<TAB>reason`) in `listing`, which a resumed run reads back and extends. More
    than `max_fraction` of the source unreadable stops the run (`TooManyUnreadable`)."""

    def __init__(self, source: ImageSource, listing: Path, max_fraction: float, shown: int = 10):
        self.source, self.listing, self.max_fraction, self.shown = source, Path(listing), max_fraction, shown
        self.names: set[str] = set()
        if self.listing.is_file():
            self.names = {line.split("\t", 1)[0] for line in self.listing.read_text().splitlines() if line}
        self._seen: set[int] = set()  # source indices already looked at in this process

    def __len__(self) -> int:
        return len(self.names)

    def add(self, skipped_from: np.ndarray, n_skipped: np.ndarray) -> None:
        """Records the items a batch skipped (its ``skipped_from`` and ``n_skipped``)."""
        n = len(self.source)
        new = []
        for first, count in zip(skipped_from.tolist(), n_skipped.tolist()):
            for index in ((first + j) % n for j in range(count)):
                if index in self._seen:
                    continue
                self._seen.add(index)
                try:
                    self.source[index]
                    continue  # readable now: a passing failure (network file system, a file being written)
                except UnreadableImage as err:
                    if err.path not in self.names:
                        self.names.add(err.path)
                        new.append(err)
        if not new:
            return
        with open(self.listing, "a") as f:
            f.writelines(f"{err.path}\t{err.reason}\n" for err in new)
        for k, err in enumerate(new, len(self.names) - len(new)):
            if k < self.shown:
                print(f"skipping {err}")
            elif k == self.shown:
                print(f"skipping more unreadable images; all are listed in {self.listing}")
        if len(self.names) > self.max_fraction * n:
            raise TooManyUnreadable(
                f"{len(self.names)} of the {n} training images are unreadable (more than "
                f"data.max_unreadable_fraction={self.max_fraction}); they are listed in {self.listing}"
            )


class _MakeSample:
    def __init__(
        self,
        source: ImageSource,
        augs: list[DataAugmentationDINO],
        ratios: tuple[float, ...],
        global_batch: int,
        seed: int,
    ):
        self.source, self.augs, self.ratios, self.seed = source, augs, ratios, seed
        self.global_batch = global_batch
        self.n = len(source)

    def __call__(self, item: tuple[int, int]) -> dict[str, Any]:
        pos, src_index = item
        rng = np.random.default_rng([self.seed, _SAMPLE_TAG, pos // self.n, pos])
        image, label, skipped = load_with_skips(self.source, src_index)
        # Stream positions [t·G, (t+1)·G) (G = the global batch) make up step t on all hosts.
        aug = self.augs[crop_pair_index(self.seed, pos // self.global_batch, self.ratios)]
        crops = aug(image, rng)
        return {**crops, "labels": np.int32(label), "skipped_from": np.int64(src_index), "n_skipped": np.int32(skipped)}


class _Collate:
    """Stacked samples ``[B, n_crops, ...]`` → crop-major crops and the batch's iBOT masks."""

    def __init__(
        self,
        specs: list[TrainDataSpec],
        ratios: tuple[float, ...],
        seed: int,
        process_index: int,
        min_num_patches: int,
        max_block_ratio: float,
    ):
        self.specs, self.ratios, self.seed, self.process_index = specs, ratios, seed, process_index

        def generator(spec: TrainDataSpec) -> MaskingGenerator:
            g = spec.global_size // spec.patch_size
            return MaskingGenerator(
                (g, g), max_num_patches=int(max_block_ratio * g * g), min_num_patches=min_num_patches
            )

        self.generators = [generator(spec) for spec in specs]

    def __call__(self, step: int, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pair = crop_pair_index(self.seed, step, self.ratios)
        sp = self.specs[pair]
        g, loc = batch["global_crops"], batch["local_crops"]
        b = g.shape[0]
        rng = np.random.default_rng([self.seed, _MASK_TAG, self.process_index, int(step)])
        masks = collate_masks(
            2 * b,
            self.generators[pair],
            rng,
            mask_ratio_min_max=sp.mask_ratio_min_max,
            mask_sample_probability=sp.mask_sample_probability,
            max_tokens=sp.max_masked_tokens,
        )
        crop_major = lambda x: np.ascontiguousarray(x.swapaxes(0, 1)).reshape(-1, *x.shape[2:])  # noqa: E731
        out = {
            "global_crops": crop_major(g),
            "local_crops": crop_major(loc),
            **masks,
            "labels": batch["labels"].astype(np.int32),
            "skipped_from": batch["skipped_from"],
            "n_skipped": batch["n_skipped"],
        }
        if "gram_teacher_crops" in batch:
            out["gram_teacher_crops"] = crop_major(batch["gram_teacher_crops"])
        return out


def _absl_flags_parsed() -> None:
    """grain's worker start-up reads absl flags; outside ``absl.app`` they are unparsed and the read
    raises ``UnparsedFlagAccessError`` (google/grain#1355). Mark them parsed (defaults) once."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _cfg_get(cfg: Any, path: str, default: Any = None) -> Any:
    obj = cfg
    for part in path.split("."):
        if obj is None:
            return default
        obj = obj.get(part) if isinstance(obj, dict) else getattr(obj, part, None)
    return default if obj is None else obj


def build_train_pipeline(
    source: ImageSource,
    *,
    per_host_batch: int,
    seed: int | None = None,
    cfg: Any = None,
    crops: AugmentConfig | Any = None,
    patch_size: int | None = None,
    mask_ratio_min_max: tuple[float, float] | None = None,
    mask_sample_probability: float | None = None,
    mask_min_num_patches: int = 4,
    mask_max_block_ratio: float = 0.5,
    process_index: int = 0,
    process_count: int = 1,
    num_workers: int | None = None,
    num_threads: int = 2,
    prefetch_buffer_size: int | None = None,
    start_step: int = 0,
    **crop_overrides: Any,
) -> grain.IterDataset:
    """The infinite per-host training stream. ``iter(...)`` gives a grain iterator of dicts::

        global_crops [2B, S, S, 3] f32 (crop-major)   local_crops [L·B, s, s, 3] f32 (crop-major)
        masks [2B, N] bool   mask_indices [M] i32   mask_weights [M] f32   labels [B] i32
        skipped_from [B] i64, n_skipped [B] i32: sample i replaced the unreadable source items
            skipped_from[i], …, skipped_from[i] + n_skipped[i] − 1 (mod the source length)

    Settings come from ``cfg`` (``train.seed``, ``crops.*``, ``student.patch_size``,
    ``ibot.mask_ratio_min_max``, ``ibot.mask_sample_probability``, ``data.num_workers``,
    ``data.prefetch_buffer_size``) unless
    given explicitly; ``crop_overrides`` are :class:`AugmentConfig` fields. The static shapes are
    in ``pipeline.specs`` (one :class:`TrainDataSpec` per crop-size pair; ``pipeline.spec`` is the
    first), the pairs in ``pipeline.crop_pairs``; with a Gram-teacher crop size the batches also
    hold ``gram_teacher_crops [2B, G, G, 3]`` (crop-major). ``start_step`` starts at that batch (the same one
    an uninterrupted stream yields there): a resumed run starts its stream at its step.
    """
    if seed is None:
        seed = int(_cfg_get(cfg, "train.seed", 0))
    crops_cfg = crops if crops is not None else _cfg_get(cfg, "crops")
    pairs = CropPairs.from_crops(crops_cfg if crops_cfg is not None else {})
    explicit = {
        k: crop_overrides.pop(k, None) for k in ("global_crops_size", "local_crops_size", "gram_teacher_crops_size")
    }
    sizes = {k: v for k, v in explicit.items() if v is not None}
    if sizes:  # explicit sizes: one resolution
        pairs = CropPairs.from_crops({**pairs.pair(0), **sizes})
    patch_size = int(patch_size or _cfg_get(cfg, "student.patch_size", 16))
    mask_ratio_min_max = tuple(mask_ratio_min_max or _cfg_get(cfg, "ibot.mask_ratio_min_max", (0.1, 0.5)))
    if mask_sample_probability is None:
        mask_sample_probability = float(_cfg_get(cfg, "ibot.mask_sample_probability", 0.5))
    if num_workers is None:
        num_workers = int(_cfg_get(cfg, "data.num_workers", 0))
    if prefetch_buffer_size is None:
        prefetch_buffer_size = int(_cfg_get(cfg, "data.prefetch_buffer_size", 2))
    if per_host_batch <= 0:
        raise ValueError(f"per_host_batch must be > 0, got {per_host_batch}")
    for size in pairs.global_sizes:
        if size % patch_size:
            raise ValueError(f"global crop size {size} is not a multiple of the patch size {patch_size}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} outside [0, {process_count})")
    n = len(source)
    if n == 0:
        raise ValueError("the training source is empty")

    augs, specs = [], []
    for i in range(len(pairs)):
        aug_cfg = AugmentConfig.from_any(crops_cfg, **crop_overrides, **pairs.pair(i), patch_size=patch_size)
        grid = aug_cfg.global_crops_size // patch_size
        n_patches = grid * grid
        augs.append(DataAugmentationDINO(aug_cfg))
        specs.append(
            TrainDataSpec(
                per_host_batch=per_host_batch,
                global_size=aug_cfg.global_crops_size,
                local_size=aug_cfg.local_crops_size,
                n_local=aug_cfg.local_crops_number,
                patch_size=patch_size,
                n_patches=n_patches,
                max_masked_tokens=max_masked_tokens(
                    2 * per_host_batch, n_patches, mask_ratio_min_max[1], mask_sample_probability
                ),
                mask_ratio_min_max=(float(mask_ratio_min_max[0]), float(mask_ratio_min_max[1])),
                mask_sample_probability=float(mask_sample_probability),
                gram_size=aug_cfg.gram_teacher_crops_size,
            )
        )

    ds = grain.MapDataset.range(n).shuffle(seed=seed % 2**32).repeat(None)
    ds = ds.map_with_index(_TagPosition())
    ds = ds.slice(slice(process_index, None, process_count))
    ds = ds.map(_MakeSample(source, augs, pairs.ratios, per_host_batch * process_count, seed))
    ds = ds.batch(per_host_batch, drop_remainder=True)
    ds = ds.map_with_index(
        _Collate(specs, pairs.ratios, seed, process_index, mask_min_num_patches, mask_max_block_ratio)
    )
    if start_step:
        ds = ds.slice(slice(int(start_step), None))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size))
    if num_workers > 0:
        _absl_flags_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=2))
    it.spec, it.specs, it.crop_pairs = specs[0], specs, pairs
    return it


# ---------------------------------------------------------------------------------------------
# Evaluation: transform + normalise, ordered, last batch padded
# ---------------------------------------------------------------------------------------------


class _EvalSample:
    def __init__(self, source: ImageSource, transform: Transform, mean, std, errors: dict[int, str] | None):
        self.source, self.transform = source, transform
        self.mean, self.std = tuple(mean), tuple(std)
        self.errors = errors if errors is not None else {}

    def __call__(self, index: int) -> dict[str, Any]:
        index = int(index)
        try:
            image, label = self.source[index]
        except UnreadableImage as err:
            self.errors[index] = str(err)
            return {
                "images": np.zeros((*self.transform.out_hw, 3), np.float32),
                "labels": np.int32(-1),
                "valid": np.bool_(False),
                "index": np.int64(index),
            }
        x = normalize(self.transform(to_rgb(image)), self.mean, self.std)
        return {"images": x, "labels": np.int32(label), "valid": np.bool_(True), "index": np.int64(index)}


class _PadBatch:
    def __init__(self, batch: int):
        self.batch = batch

    def __call__(self, b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pad = self.batch - len(b["labels"])
        if pad == 0:
            return b
        fill = {"images": 0.0, "labels": -1, "valid": False, "index": -1}
        return {k: np.concatenate([v, np.full((pad, *v.shape[1:]), fill[k], v.dtype)]) for k, v in b.items()}


def build_eval_pipeline(
    source: ImageSource,
    transform: Transform,
    batch: int,
    mean: tuple[float, float, float] = NORMALIZATION["lvd"][0],
    std: tuple[float, float, float] = NORMALIZATION["lvd"][1],
    *,
    num_threads: int = 2,
    errors: dict[int, str] | None = None,
    start: int = 0,
) -> grain.IterDataset:
    """Ordered batches ``{"images": [batch, H, W, 3] f32, "labels": [batch] i32, "valid": [batch]
    bool, "index": [batch] i64}`` covering the source once, through `transform` and normalised
    with `mean` / `std`; the last batch is padded (``valid`` False, label and index -1).
    Unreadable images come back as invalid rows, and `errors` (when given) gets their reasons by
    source index. Images are decoded in `num_threads` threads, a few batches ahead. `start`
    begins at that source index (a resumed extraction)."""
    if len(source) == 0:
        raise ValueError("the evaluation source is empty")
    ds = grain.MapDataset.range(start, len(source)).map(_EvalSample(source, transform, mean, std, errors))
    ds = ds.batch(batch, drop_remainder=False).map(_PadBatch(batch))
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=4))
