"""The DINO / iBOT projection head (paper §3.2; RECIPE.md §3).

MLP (Linear → exact GELU → ... → Linear to the bottleneck), L2 normalisation of the bottleneck,
then `last_layer`: a bias-free Linear onto the K prototypes, *without* the weight normalisation
of DINO / DINOv2. DINOv3 trains two separate heads: `dino_head` on CLS tokens and `ibot_head` on
masked patch tokens; `SSLModel` is a backbone (a ViT, or a ConvNeXt student in distillation)
with both (the student, or its EMA teacher). `FeatureStudent` is the head-free alternative of
feature distillation: linear projectors from the student's widths onto the teacher's.

Names map onto the official state dict: `mlp[i]` is the official `mlp.{2i}` (the official MLP is
an `nn.Sequential` whose odd entries are the parameter-free GELUs), `last_layer` is `last_layer`.
Dense kernels are (in, out), i.e. the transpose of PyTorch's weights.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dinov3_jax.models.config import BackboneConfig, resolve_dtype
from dinov3_jax.models.layers import exact_gelu, linear_init, logical
from dinov3_jax.models.registry import backbone_class

Array = jax.Array


def _dtype(d: Any) -> Any:
    return resolve_dtype(d) if isinstance(d, str) else jnp.dtype(d)


def l2_normalize(x: Array, eps: float) -> Array:
    """x / max(||x||₂, eps) along the last axis (PyTorch `F.normalize`), statistics in fp32."""
    x32 = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(jnp.square(x32), axis=-1, keepdims=True))
    return x32 / jnp.maximum(norm, eps)


class DINOHead(nnx.Module):
    """Projection head: `logits = last_layer(normalise(mlp(x)))`.

    Args:
        in_dim: backbone width D.
        out_dim: number of prototypes K.
        hidden_dim: MLP width (2048 in the IN-1k recipe).
        bottleneck_dim: width of the normalised bottleneck (256 in the IN-1k recipe).
        nlayers: number of Linears in the MLP (3 in every recipe; 1 = a single D → bottleneck).
        dtype: compute dtype of the Linears (name such as "bf16" or a jnp dtype).
        param_dtype: storage dtype of the parameters.
        fp32_logits: return the normalised bottleneck in fp32 and run `last_layer` in fp32
            (otherwise the normalisation statistics are fp32 but its output and the logits are
            in `dtype`).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        *,
        dtype: Any = "float32",
        param_dtype: Any = "float32",
        fp32_logits: bool = False,
        norm_last_layer: bool = False,
        last_layer_init_std: float = 0.02,
        rngs: nnx.Rngs,
    ):
        if nlayers < 1:
            raise ValueError(f"nlayers must be >= 1, got {nlayers}")
        self.dtype = _dtype(dtype)
        self.param_dtype = _dtype(param_dtype)
        self.fp32_logits = fp32_logits
        self.norm_last_layer = norm_last_layer
        # F.normalize eps: 1e-6 only for fp16 activations (1e-12 underflows there); bf16 uses 1e-12.
        self.norm_eps = 1e-6 if self.dtype == jnp.float16 else 1e-12

        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        names = ["embed"] + ["mlp"] * (nlayers - 1) + ["bottleneck"]
        linears = []
        for i in range(nlayers):
            # A hidden → hidden kernel gets (None, "mlp"): one logical name may not appear twice.
            axes = (names[i] if names[i] != names[i + 1] else None, names[i + 1])
            linears.append(self._linear(dims[i], dims[i + 1], axes, use_bias=True, dtype=self.dtype, rngs=rngs))
        self.mlp = nnx.List(linears)
        self.last_layer = self._linear(
            bottleneck_dim,
            out_dim,
            ("bottleneck", "prototypes"),
            use_bias=False,
            dtype=jnp.float32 if fp32_logits else self.dtype,
            init=nnx.initializers.normal(stddev=last_layer_init_std),
            rngs=rngs,
        )

    def _linear(
        self, din: int, dout: int, axes, *, use_bias: bool, dtype, rngs: nnx.Rngs, init=linear_init
    ) -> nnx.Linear:
        return nnx.Linear(
            din,
            dout,
            use_bias=use_bias,
            dtype=dtype,
            param_dtype=self.param_dtype,
            kernel_init=logical(init, *axes),
            bias_init=logical(nnx.initializers.zeros_init(), axes[1]),
            rngs=rngs,
        )

    def mlp_and_norm(self, x: Array) -> Array:
        """The L2-normalised bottleneck [..., bottleneck_dim] (official `no_last_layer=True`)."""
        x = x.astype(self.dtype)
        for i, linear in enumerate(self.mlp):
            x = linear(x)
            if i < len(self.mlp) - 1:
                x = exact_gelu(x)
        x = l2_normalize(x, self.norm_eps)
        return x if self.fp32_logits else x.astype(self.dtype)

    def apply_last_layer(self, x: Array) -> Array:
        """Prototype logits [..., K] of a normalised bottleneck (official `only_last_layer=True`).

        With `norm_last_layer` each prototype is L2-normalised first (the weight-normalised last
        layer of DINO v1/v2 with its scale fixed to 1), so logits are cosines in [-1, 1]: the
        teacher's targets are sharp from the first step instead of waiting for the small
        initial prototypes (std 0.02) to grow, which matters for short runs. DINOv3 uses a plain
        linear layer (the default)."""
        if not self.norm_last_layer:
            return self.last_layer(x)
        kernel = self.last_layer.kernel[...]
        kernel = kernel / jnp.maximum(jnp.linalg.norm(kernel.astype(jnp.float32), axis=0, keepdims=True), 1e-12)
        return jnp.dot(x, kernel.astype(x.dtype))

    def __call__(self, x: Array) -> Array:
        return self.apply_last_layer(self.mlp_and_norm(x))


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    n_prototypes: int
    bottleneck_dim: int
    hidden_dim: int
    nlayers: int = 3
    # DINO v1/v2 weight-normalised prototypes (cosine logits); DINOv3: False.
    norm_last_layer: bool = False
    # Std of the prototypes' initialisation (DINOv3: 0.02).
    last_layer_init_std: float = 0.02

    @classmethod
    def of(cls, section: Any) -> HeadConfig:
        """From a config's `dino` or `ibot` section (`head_n_prototypes`, ...)."""
        return cls(
            section.head_n_prototypes,
            section.head_bottleneck_dim,
            section.head_hidden_dim,
            section.head_nlayers,
            section.head_norm_last_layer,
            section.head_last_layer_init_std,
        )


def head_configs(cfg: Any) -> tuple[HeadConfig, HeadConfig]:
    """The DINO and iBOT heads of a training config."""
    return HeadConfig.of(cfg.dino), HeadConfig.of(cfg.ibot)


class SSLModel(nnx.Module):
    """Backbone with its DINO (CLS) and iBOT (patch) heads: the student, or its EMA teacher."""

    def __init__(self, backbone: BackboneConfig, dino_head: HeadConfig, ibot_head: HeadConfig, *, rngs: nnx.Rngs):
        self.backbone = backbone_class(backbone)(backbone, rngs=rngs)

        def head(h: HeadConfig) -> DINOHead:
            return DINOHead(
                backbone.embed_dim,
                h.n_prototypes,
                hidden_dim=h.hidden_dim,
                bottleneck_dim=h.bottleneck_dim,
                nlayers=h.nlayers,
                norm_last_layer=h.norm_last_layer,
                last_layer_init_std=h.last_layer_init_std,
                dtype=backbone.dtype,
                param_dtype=backbone.param_dtype,
                rngs=rngs,
            )

        self.dino_head = head(dino_head)
        self.ibot_head = head(ibot_head)


class FeatureStudent(nnx.Module):
    """A student backbone with two linear projectors (its width → the teacher's), one for the
    CLS token and one for the patch tokens, for head-free feature distillation."""

    def __init__(self, backbone: BackboneConfig, teacher_dim: int, *, rngs: nnx.Rngs):
        self.backbone = backbone_class(backbone)(backbone, rngs=rngs)

        def projector() -> nnx.Linear:
            return nnx.Linear(
                backbone.embed_dim,
                teacher_dim,
                dtype=_dtype(backbone.dtype),
                param_dtype=_dtype(backbone.param_dtype),
                kernel_init=logical(linear_init, "embed", "mlp"),
                bias_init=logical(nnx.initializers.zeros_init(), "mlp"),
                rngs=rngs,
            )

        self.cls_projector = projector()
        self.patch_projector = projector()
