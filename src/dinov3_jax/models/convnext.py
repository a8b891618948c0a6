"""The DINOv3 ConvNeXt backbones, distilled from the ViT-7B (paper §5.2; RECIPE.md §2.3).

A 4×4 stride-4 stem, then four stages; stages 1–3 start with a LayerNorm + 2×2 stride-2 conv.
A block is a 7×7 depthwise conv, LayerNorm, Linear C → 4C, exact GELU, Linear 4C → C, LayerScale
`gamma` and a residual (drop path per sample). Images are NHWC of any size (the convs floor like
PyTorch's), so a feature map is floor(H/32) × floor(W/32) at the end.

The outputs have the ViT's shape of API: `forward_features` returns the official dict, with the
final-normed global average pool as `x_norm_clstoken`, the final-normed stride-32 map as
`x_norm_patchtokens` and no register tokens; `get_intermediate_layers` indexes the four stages
(only the last one has a norm). Attribute names are the official state-dict prefixes
(`downsample_layers.0.0`, `stages.2.5.dwconv`, `norm`).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dinov3_jax.models.config import ConvNeXtConfig, resolve_dtype
from dinov3_jax.models.layers import checkpointed, exact_gelu, linear_init, logical
from dinov3_jax.models.resize import resize_patch_features

Array = jax.Array


def _norm(cfg: ConvNeXtConfig, dim: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # PyTorch's two-pass variance; the channels-first norms of the stem and the downsampling layers
    # are the same normalisation over C here, since the maps are channels-last.
    return nnx.LayerNorm(
        dim,
        epsilon=cfg.norm_eps,
        use_fast_variance=False,
        dtype=resolve_dtype(cfg.dtype),
        param_dtype=resolve_dtype(cfg.param_dtype),
        scale_init=logical(nnx.initializers.ones_init(), "embed"),
        bias_init=logical(nnx.initializers.zeros_init(), "embed"),
        rngs=rngs,
    )


def _conv(cfg: ConvNeXtConfig, din: int, dout: int, kernel: int, *, rngs) -> nnx.Conv:
    """The stem (4×4, stride 4) and downsampling (2×2, stride 2) convs: kernel = stride, no padding."""
    return nnx.Conv(
        din,
        dout,
        kernel_size=(kernel, kernel),
        strides=(kernel, kernel),
        padding="VALID",
        dtype=resolve_dtype(cfg.dtype),
        param_dtype=resolve_dtype(cfg.param_dtype),
        kernel_init=logical(linear_init, None, None, None, "embed"),
        bias_init=logical(nnx.initializers.zeros_init(), "embed"),
        rngs=rngs,
    )


def _grouped_conv(x_bhwc: Array, kernel: Array) -> Array:
    k = kernel.shape[0]
    return jax.lax.conv_general_dilated(
        x_bhwc,
        kernel,
        (1, 1),
        [(k // 2, k // 2)] * 2,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=x_bhwc.shape[-1],
    )


@jax.custom_vjp
def depthwise_conv(x_bhwc: Array, kernel: Array) -> Array:
    """A k×k depthwise conv (zero padding k // 2) as k² shifted multiply-adds."""
    k = kernel.shape[0]
    h, w = x_bhwc.shape[1:3]
    padded = jnp.pad(x_bhwc, ((0, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)))
    out = jnp.zeros_like(x_bhwc)
    for i in range(k):
        for j in range(k):
            out = out + padded[:, i : i + h, j : j + w, :] * kernel[i, j, 0]
    return out


def _depthwise_fwd(x_bhwc, kernel):
    return depthwise_conv(x_bhwc, kernel), (x_bhwc, kernel)


def _depthwise_bwd(residuals, grad):
    # The gradients of the same conv written as XLA's grouped convolution: differentiating the
    # 49 shifted adds gives 49 padded copies per block, which takes XLA minutes to compile.
    return jax.vjp(_grouped_conv, *residuals)[1](grad)


depthwise_conv.defvjp(_depthwise_fwd, _depthwise_bwd)


class DepthwiseConv(nnx.Module):
    """The 7×7 depthwise conv (`groups = C`, zero padding 3) as 49 shifted multiply-adds.

    Same parameters as `nnx.Conv(feature_group_count=C)` (`kernel` [7, 7, 1, C], `bias` [C]) and
    the same result up to summation order, but XLA's CPU backend runs grouped convolutions an
    order of magnitude slower than this fused elementwise loop (measured 15× on ConvNeXt-T's
    stage-1 map, [32, 56, 56, 96]); on GPUs XLA fuses it into one kernel as well. Training
    differentiates it as the grouped convolution (`depthwise_conv`'s custom VJP).
    """

    def __init__(self, cfg: ConvNeXtConfig, dim: int, *, rngs: nnx.Rngs, size: int = 7):
        pdtype = resolve_dtype(cfg.param_dtype)
        kernel_init = logical(linear_init, None, None, None, "embed")
        self.kernel = nnx.Param(kernel_init(rngs.params(), (size, size, 1, dim), pdtype))
        self.bias = nnx.Param(jnp.zeros((dim,), pdtype), out_sharding=("embed",), eager_sharding=False)
        self.dtype = resolve_dtype(cfg.dtype)

    def __call__(self, x_bhwc: Array) -> Array:
        out = depthwise_conv(x_bhwc.astype(self.dtype), self.kernel[...].astype(self.dtype))
        return out + self.bias[...].astype(self.dtype)


def _linear(cfg: ConvNeXtConfig, din: int, dout: int, axes, rngs) -> nnx.Linear:
    return nnx.Linear(
        din,
        dout,
        dtype=resolve_dtype(cfg.dtype),
        param_dtype=resolve_dtype(cfg.param_dtype),
        kernel_init=logical(linear_init, *axes),
        bias_init=logical(nnx.initializers.zeros_init(), axes[1]),
        rngs=rngs,
    )


def drop_path(x: Array, rate: float, key: Array | None) -> Array:
    """Per-sample stochastic depth of the official ConvNeXt: a sample's branch is kept with
    probability 1 − rate and then scaled by 1 / (1 − rate)."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros_like(x))


class ConvNeXtBlock(nnx.Module):
    def __init__(self, cfg: ConvNeXtConfig, dim: int, drop_path_rate: float, *, rngs: nnx.Rngs):
        self.drop_path_rate = drop_path_rate
        self.dwconv = DepthwiseConv(cfg, dim, rngs=rngs)
        self.norm = _norm(cfg, dim, rngs)
        self.pwconv1 = _linear(cfg, dim, 4 * dim, ("embed", "mlp"), rngs)
        self.pwconv2 = _linear(cfg, 4 * dim, dim, ("mlp", "embed"), rngs)
        if cfg.layer_scale_init is not None:
            init = jnp.full((dim,), cfg.layer_scale_init, resolve_dtype(cfg.param_dtype))
            self.gamma = nnx.Param(init, out_sharding=("embed",), eager_sharding=False)
        else:
            self.gamma = None

    def __call__(self, x_bhwc: Array, key: Array | None = None) -> Array:
        y = self.pwconv2(exact_gelu(self.pwconv1(self.norm(self.dwconv(x_bhwc)))))
        if self.gamma is not None:
            y = y * self.gamma[...].astype(y.dtype)
        return x_bhwc + drop_path(y, self.drop_path_rate, key)


class ConvNeXt(nnx.Module):
    """DINOv3 ConvNeXt backbone (NHWC). Attribute names are the official state-dict prefixes."""

    def __init__(self, config: ConvNeXtConfig, *, rngs: nnx.Rngs):
        cfg = self.config = config
        dims = cfg.dims
        self.downsample_layers = nnx.List(
            [nnx.List([_conv(cfg, cfg.in_chans, dims[0], 4, rngs=rngs), _norm(cfg, dims[0], rngs)])]
            + [
                nnx.List([_norm(cfg, dims[i - 1], rngs), _conv(cfg, dims[i - 1], dims[i], 2, rngs=rngs)])
                for i in range(1, 4)
            ]
        )
        rates = np.linspace(0.0, cfg.drop_path_rate, sum(cfg.depths)).tolist()
        first = np.cumsum((0, *cfg.depths[:-1])).tolist()
        self.stages = nnx.List(
            [
                nnx.List([ConvNeXtBlock(cfg, dims[i], rates[first[i] + j], rngs=rngs) for j in range(cfg.depths[i])])
                for i in range(4)
            ]
        )
        self.norm = _norm(cfg, dims[-1], rngs)

    n_prefix_tokens = 1  # the pooled token stands where a ViT has its CLS token

    def patch_grid(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        s = self.config.output_stride
        h, w = image_hw[0] // s, image_hw[1] // s
        if h == 0 or w == 0:
            raise ValueError(f"image of {image_hw[0]}x{image_hw[1]} px is smaller than the ConvNeXt stride {s}")
        return h, w

    def _run_stages(self, x_bhwc: Array, *, training: bool, key: Array | None, collect: Sequence[int] = ()):
        """Every stage; returns the last map [B, h, w, C] and the maps of the stages in `collect`."""
        if x_bhwc.ndim != 4 or x_bhwc.shape[-1] != self.config.in_chans:
            raise ValueError(
                f"expected NHWC images with {self.config.in_chans} channels, got shape {tuple(x_bhwc.shape)}"
            )
        self.patch_grid(x_bhwc.shape[1:3])
        drop = training and self.config.drop_path_rate > 0
        if drop and key is None:
            raise ValueError("training with drop path needs a PRNG `key`")
        keys = iter(jax.random.split(key, sum(self.config.depths))) if drop else None
        x = x_bhwc.astype(resolve_dtype(self.config.dtype))
        collected = []
        # Per block and per downsampling layer, as the official checkpointing wraps them (RECIPE.md §9.2).
        call = checkpointed(lambda module, *args: module(*args), self.config.remat)
        for i, (down, stage) in enumerate(zip(self.downsample_layers, self.stages)):
            for layer in down:
                x = call(layer, x)
            for block in stage:
                x = call(block, x, next(keys) if drop else None)
            if i in collect:
                collected.append(x)
        return x, collected

    def forward_features(
        self,
        x_bhwc: Array,
        masks: Array | None = None,
        *,
        training: bool = False,
        key: Array | None = None,
        local_crops: bool = False,
    ) -> dict[str, Array | None]:
        """The official output dict: `x_norm_clstoken` [B, C] (the final-normed global average
        pool), `x_storage_tokens` [B, 0, C], `x_norm_patchtokens` [B, h·w, C], `x_prenorm` (the
        stride-32 tokens before the norm, without the pooled token) and `masks` (ConvNeXt ignores
        masks, as the official model does; `local_crops` has no effect either)."""
        x, _ = self._run_stages(x_bhwc, training=training, key=key)
        b, h, w, c = x.shape
        tokens = x.reshape(b, h * w, c)
        pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(x.dtype)
        x_norm = self.norm(jnp.concatenate([pooled[:, None], tokens], axis=1))
        return {
            "x_norm_clstoken": x_norm[:, 0],
            "x_storage_tokens": x_norm[:, 1:1],
            "x_norm_patchtokens": x_norm[:, 1:],
            "x_prenorm": tokens,
            "masks": masks,
        }

    def __call__(self, x_bhwc: Array) -> Array:
        """The normalised pooled features [B, C]."""
        return self.forward_features(x_bhwc)["x_norm_clstoken"]

    def get_intermediate_layers(
        self,
        x_bhwc: Array,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        return_extra_tokens: bool = False,
        norm: bool = True,
    ) -> tuple:
        """Outputs of the last `n` stages (int) or of the stages with the given 0-based indices.

        Per stage: the patch map (flattened [B, h·w, C], or [B, h, w, C] with `reshape`) and, when
        asked for, the pooled token [B, C] (the spatial mean of the map) and empty register tokens
        [B, 0, C]. With `norm`, the last stage's outputs go through the final norm (the official
        `norms` are the identity for stages 0–2). With `config.patch_size` set, each map is
        resized to (H // patch_size, W // patch_size), bilinear and antialiased, as the official
        model does; the pooled token is taken before the resize.
        """
        indices = list(range(4 - n, 4)) if isinstance(n, int) else [int(i) for i in n]
        bad = [i for i in indices if not 0 <= i < 4]
        if bad or not indices:
            raise ValueError(f"stage indices {bad or indices} out of range for the 4 ConvNeXt stages")
        _, maps = self._run_stages(x_bhwc, training=False, key=None, collect=set(indices))
        by_index = dict(zip(sorted(set(indices)), maps))
        p = self.config.patch_size
        results = []
        for i in indices:
            fmap = by_index[i]
            pooled = jnp.mean(fmap.astype(jnp.float32), axis=(1, 2)).astype(fmap.dtype)
            if p is not None:
                out_hw = (x_bhwc.shape[1] // p, x_bhwc.shape[2] // p)
                fmap = resize_patch_features(fmap, out_hw, "bilinear", antialias=True).astype(pooled.dtype)
            b, h, w, c = fmap.shape
            patches = fmap.reshape(b, h * w, c)
            if norm and i == 3:
                pooled, patches = self.norm(pooled), self.norm(patches)
            item = (patches.reshape(b, h, w, c) if reshape else patches,)
            if return_class_token:
                item += (pooled,)
            if return_extra_tokens:
                item += (patches[:, :0],)
            results.append(item if len(item) > 1 else item[0])
        return tuple(results)
