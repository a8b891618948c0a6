"""dinov3-jax: DINOv3 self-supervised vision (arXiv 2508.10104) in JAX and Flax NNX."""

from dinov3_jax.backbone import Backbone, Outputs
from dinov3_jax.convert.ours import WeightsError
from dinov3_jax.models.config import ConvNeXtConfig, ViTConfig
from dinov3_jax.models.convnext import ConvNeXt
from dinov3_jax.models.registry import NORMALIZATION, create_backbone, get_spec, list_models
from dinov3_jax.models.vit import DinoVisionTransformer
from dinov3_jax.weights import load_backbone, save_backbone

__all__ = [
    "NORMALIZATION",
    "Backbone",
    "ConvNeXt",
    "ConvNeXtConfig",
    "DinoVisionTransformer",
    "Outputs",
    "ViTConfig",
    "WeightsError",
    "create_backbone",
    "get_spec",
    "list_models",
    "load_backbone",
    "save_backbone",
]
__version__ = "0.1.0"
