"""iBOT block masks (RECIPE.md §6.3) and their batch-level collation (§6.4).

Every masked crop gets exactly ``int(N · p_i)`` masked patches (blocks, then uniformly random
patches to complete the count). Per batch of ``n_crops = 2B`` global crops, ``int(n_crops · prob)``
crops are masked with ratios ``linspace(min, max, n + 1)[1:]`` and land at shuffled positions. The
flat masked-token list is padded to a static length :func:`max_masked_tokens` so that the train
step compiles once.
"""

from __future__ import annotations

import math

import numpy as np


class MaskingGenerator:
    """Block masking on a ``height × width`` patch grid; ``gen(target, rng) -> bool [h, w]`` with
    exactly ``target`` True entries."""

    def __init__(
        self,
        input_size: int | tuple[int, int],
        max_num_patches: int | None = None,
        min_num_patches: int = 4,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
    ):
        if isinstance(input_size, int):
            input_size = (input_size, input_size)
        self.height, self.width = input_size
        self.num_patches = self.height * self.width
        self.max_num_patches = int(max_num_patches if max_num_patches is not None else 0.5 * self.num_patches)
        self.min_num_patches = min_num_patches
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def get_shape(self) -> tuple[int, int]:
        return self.height, self.width

    def _add_block(self, mask: np.ndarray, max_mask_patches: int, rng: np.random.Generator) -> int:
        """Try (up to 10 times) to add one rectangle adding 1..max_mask_patches new patches."""
        for _ in range(10):
            # uniform between the two even when max < min (as Python's random.uniform)
            target_area = self.min_num_patches + (max_mask_patches - self.min_num_patches) * rng.random()
            aspect = math.exp(rng.uniform(*self.log_aspect_ratio))
            h = round(math.sqrt(target_area * aspect))
            w = round(math.sqrt(target_area / aspect))
            if w < self.width and h < self.height:
                top = int(rng.integers(0, self.height - h + 1))
                left = int(rng.integers(0, self.width - w + 1))
                new = h * w - int(mask[top : top + h, left : left + w].sum())
                if 0 < new <= max_mask_patches:
                    mask[top : top + h, left : left + w] = True
                    return new
        return 0

    def __call__(self, num_masking_patches: int, rng: np.random.Generator) -> np.ndarray:
        target = int(num_masking_patches)
        if not 0 <= target <= self.num_patches:
            raise ValueError(f"cannot mask {target} of {self.num_patches} patches")
        mask = np.zeros((self.height, self.width), bool)
        count = 0
        while count < target:
            added = self._add_block(mask, min(target - count, self.max_num_patches), rng)
            if added == 0:
                break
            count += added
        if count < target:  # complete randomly (DINOv3): exactly `target` masked patches
            free = np.flatnonzero(~mask.reshape(-1))
            mask.reshape(-1)[rng.choice(free, target - count, replace=False)] = True
        return mask


def mask_targets(
    n_crops: int, n_patches: int, mask_ratio_min_max: tuple[float, float], mask_sample_probability: float
) -> list[int]:
    """Masked-patch counts of the masked crops of one batch: ``int(N · probs[i + 1])`` with
    ``probs = linspace(min, max, n + 1)`` in float32 and ``n = int(n_crops · prob)``."""
    n_masked = int(n_crops * mask_sample_probability)
    probs = np.linspace(mask_ratio_min_max[0], mask_ratio_min_max[1], n_masked + 1, dtype=np.float32)
    return [int(np.float32(n_patches) * probs[i + 1]) for i in range(n_masked)]


def max_masked_tokens(
    n_crops: int,
    n_patches: int,
    mask_ratio_max: float,
    mask_sample_probability: float,
) -> int:
    """Static bound M on the masked tokens of a batch of ``n_crops`` global crops:
    ``int(n_crops · prob) · int(N · max_ratio)`` (at least 1, so arrays are never empty)."""
    n_masked = int(n_crops * mask_sample_probability)
    per_crop = int(np.float32(n_patches) * np.float32(mask_ratio_max))
    return max(1, n_masked * min(per_crop, n_patches))


def collate_masks(
    n_crops: int,
    generator: MaskingGenerator,
    rng: np.random.Generator,
    mask_ratio_min_max: tuple[float, float] = (0.1, 0.5),
    mask_sample_probability: float = 0.5,
    max_tokens: int | None = None,
) -> dict[str, np.ndarray]:
    """Masks for ``n_crops`` crop-major global crops: ``masks [n_crops, N] bool``, ``mask_indices
    [M] int32`` (flat indices into ``[n_crops · N]``, padded with 0) and ``mask_weights [M] float32``
    (1 / masked count of the crop, 0 on padding); M = ``max_tokens`` or the static bound."""
    n_patches = generator.num_patches
    if max_tokens is None:
        max_tokens = max_masked_tokens(n_crops, n_patches, mask_ratio_min_max[1], mask_sample_probability)
    targets = mask_targets(n_crops, n_patches, mask_ratio_min_max, mask_sample_probability)
    masks = np.zeros((n_crops, n_patches), bool)
    for i, t in enumerate(targets):
        masks[i] = generator(t, rng).reshape(-1)
    masks = masks[rng.permutation(n_crops)]
    counts = masks.sum(axis=1)
    flat = np.flatnonzero(masks.reshape(-1))
    total = len(flat)
    assert total == sum(targets)
    assert total <= max_tokens, f"{total} masked tokens exceed the static bound {max_tokens}"
    indices = np.zeros(max_tokens, np.int32)
    weights = np.zeros(max_tokens, np.float32)
    indices[:total] = flat
    weights[:total] = 1.0 / np.maximum(counts[flat // n_patches], 1).astype(np.float32)
    return {"masks": masks, "mask_indices": indices, "mask_weights": weights}
