"""DINOv3 training losses (paper §3.2–3.3, §4; RECIPE.md §4): pure, jit-able, global-view."""

from dinov3_jax.losses.centering import sinkhorn_knopp, softmax_center, update_center
from dinov3_jax.losses.dino import dino_loss
from dinov3_jax.losses.gram import gram_loss
from dinov3_jax.losses.ibot import ibot_loss
from dinov3_jax.losses.koleo import koleo_loss
from dinov3_jax.models.resize import resize_patch_features

__all__ = [
    "dino_loss",
    "gram_loss",
    "ibot_loss",
    "koleo_loss",
    "resize_patch_features",
    "sinkhorn_knopp",
    "softmax_center",
    "update_center",
]
