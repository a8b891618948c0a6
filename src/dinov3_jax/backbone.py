"""One way in for every frozen-backbone tool: a loaded backbone that knows what it is.

`load(model, weights)` takes the registry name that reading the weights resolved (given; else the
official hash in the file name; else the only registry entry of the same structure), and with it
the normalisation the weights were trained with (LVD-1689M or SAT-493M statistics, RECIPE.md §1.11). The resulting
`Backbone` holds the NNX module (a `DinoVisionTransformer` or a `ConvNeXt`) with that identity,
its stride (the ViT patch size; 32 for a ConvNeXt) and `outputs`, the one pure function from
images to the features the tools ask for (`Outputs`). `features`, `eval`, `segment`, `show` and the
trainer's k-NN all go through it and `eval.extract.extract`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dinov3_jax.models.config import ConvNeXtConfig
from dinov3_jax.models.registry import MODELS, NORMALIZATION, get_spec, registry_matches, stride_of

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Outputs:
    """Which features `compute_outputs` computes (static: part of the compiled program).

    Always `cls` [B, D] (the final-normed CLS token; a ConvNeXt's normed global pool) and
    `registers` [B, R, D] (R = 0 for a ConvNeXt). Optionally:

    * `patch`: `patch` [B, h, w, D], the final-normed patch tokens / last feature map;
    * `layers` = L: the last L blocks, each through the final norm: `layers_cls` [B, L, D] and,
      with `patch`, `layers_patch` [B, L, h, w, D]. A ConvNeXt's stages differ in width and
      stride, so it gives one entry per stage instead, at its own resolution: `stage{i}_cls`
      [B, D_i] (the pooled map; final-normed for the last stage only, as the official model) and,
      with `patch`, `stage{i}_patch` [B, H/s_i, W/s_i, D_i] for the stages i = 4 − L … 3;
    * `linear_blocks` = n: `linear`, the linear-probe input of RECIPE.md §8.2: the CLS tokens of the
      last n blocks, then (with `avgpool`) the mean of the last block's patch tokens;
    * `attention`: `attention` [B, heads, 1+R, h·w], the last block's attention of the CLS and
      register queries to the patches (ViT only).
    """

    patch: bool = False
    layers: int = 0
    linear_blocks: int = 0
    avgpool: bool = True
    attention: bool = False


@dataclasses.dataclass(frozen=True, eq=False)
class Backbone:
    """A loaded backbone and what it is. `weights` is the file read (None: random or in memory)."""

    module: nnx.Module
    name: str | None = None
    normalization: str | None = "lvd"
    mean: tuple[float, float, float] = NORMALIZATION["lvd"][0]
    std: tuple[float, float, float] = NORMALIZATION["lvd"][1]
    weights: str | None = None

    @property
    def config(self):
        return self.module.config

    @property
    def is_convnext(self) -> bool:
        return isinstance(self.config, ConvNeXtConfig)

    @property
    def stride(self) -> int:
        """Pixels per feature-map cell: the patch size, or a ConvNeXt's output stride 32."""
        return stride_of(self.config)

    @property
    def n_layers(self) -> int:
        """How many intermediate outputs there are to choose from: blocks, or ConvNeXt stages."""
        return self.config.depth

    @property
    def description(self) -> str:
        if self.name:
            return self.name
        cfg = self.config
        if self.is_convnext:
            return f"custom ConvNeXt (depths {list(cfg.depths)}, widths {list(cfg.dims)})"
        return f"custom ViT (width {cfg.embed_dim}, depth {cfg.depth}, patch {cfg.patch_size})"

    def check_outputs(self, request: Outputs) -> None:
        for what, n in (("layers", request.layers), ("linear_blocks", request.linear_blocks)):
            if n and not 1 <= n <= self.n_layers:
                unit = "stages" if self.is_convnext else "blocks"
                raise ValueError(
                    f"{what} must be between 1 and the {self.n_layers} {unit} of {self.description}, got {n}"
                )
        if request.attention and self.is_convnext:
            raise ValueError(f"{self.description} is a ConvNeXt: it has no attention, so there are no attention maps")

    def identity(self) -> dict[str, Any]:
        """What the features depend on, for cache keys: architecture, weights, normalisation."""
        from dinov3_jax.eval.extract import params_hash, weights_id

        return {
            "model": json.loads(self.config.to_json()),
            "weights": weights_id(self.weights) if self.weights else {"params_sha256": params_hash(self.module)},
            "mean": list(self.mean),
            "std": list(self.std),
        }


def compute_outputs(module: nnx.Module, x_bhwc: jax.Array, request: Outputs) -> dict[str, jax.Array]:
    """The features of `request` (see `Outputs`) of a batch of normalised NHWC images, float32.

    Pure, so the extraction loop jits it once per architecture and request. One pass through the
    blocks gives the final and the intermediate features: the last block's output through the
    final norm is exactly `forward_features`' in eval.
    """
    n = max(request.layers, request.linear_blocks, 1)
    per_layer = module.get_intermediate_layers(
        x_bhwc, n=n, reshape=True, return_class_token=True, return_extra_tokens=True, norm=True
    )
    last_patch, last_cls, last_regs = per_layer[-1]
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    out = {"cls": f32(last_cls), "registers": f32(last_regs)}
    if request.patch:
        out["patch"] = f32(last_patch)
    if request.layers:
        chosen = per_layer[-request.layers :]
        if isinstance(module.config, ConvNeXtConfig):
            for i, (patch, cls, _) in zip(range(4 - request.layers, 4), chosen):
                out[f"stage{i}_cls"] = f32(cls)
                if request.patch:
                    out[f"stage{i}_patch"] = f32(patch)
        else:
            out["layers_cls"] = jnp.stack([f32(c) for _, c, _ in chosen], axis=1)
            if request.patch:
                out["layers_patch"] = jnp.stack([f32(p) for p, _, _ in chosen], axis=1)
    if request.linear_blocks:
        parts = [f32(c) for _, c, _ in per_layer[-request.linear_blocks :]]
        if request.avgpool:
            parts.append(jnp.mean(f32(last_patch), axis=(1, 2)))
        out["linear"] = jnp.concatenate(parts, axis=-1)
    if request.attention:
        attn = module.get_last_self_attention(x_bhwc, prefix_only=True)
        out["attention"] = f32(attn[..., module.n_prefix_tokens :])
    return out


def _normalization(requested: str | None, candidates: list[str]) -> str:
    if requested:
        if requested not in NORMALIZATION:
            raise ValueError(f"unknown normalization {requested!r}; expected one of {sorted(NORMALIZATION)}")
        return requested
    presets = {MODELS[n].normalization for n in candidates}
    if len(presets) == 1:
        return presets.pop()
    # The same architecture trained on different data (e.g. the two ViT-7B): the file cannot tell.
    log.warning(
        "cannot tell which normalisation the weights were trained with (%s); using 'lvd' "
        "(pass --normalization sat for satellite models)",
        ", ".join(candidates) or "no registry model has this architecture",
    )
    return "lvd"


def load(
    model: str | None = None,
    weights: str | Path | None = None,
    *,
    normalization: str | None = None,
    dtype: str | None = None,
    seed: int = 0,
) -> Backbone:
    """A `Backbone` from a registry name, a weights file (official `.pth`, HF folder or
    safetensors, ours), or both; random weights (seeded) when no file is given."""
    from dinov3_jax.weights import load_named

    if model is None and weights is None:
        raise ValueError("pass --model NAME (random weights) or --weights PATH, or both")
    if model is not None:
        get_spec(model)  # an unknown name fails before a large file is read
    weights = None if weights is None else str(weights)
    module, name = load_named(model, weights, dtype=dtype, seed=seed)
    preset = _normalization(normalization, [name] if name else registry_matches(module.config))
    mean, std = NORMALIZATION[preset]
    return Backbone(module, name, preset, tuple(mean), tuple(std), weights)


# ---------------------------------------------------------------------------------------------
# The command-line face of the front door, shared by every frozen-backbone command
# ---------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser, *, dtype: bool = True) -> None:
    parser.add_argument("--model", help="registry name (see `dinov3-jax models`); optional when --weights states it")
    parser.add_argument(
        "--weights", help="backbone weights (official .pth, HF folder/safetensors, ours); RANDOM init if omitted"
    )
    parser.add_argument(
        "--normalization", choices=sorted(NORMALIZATION), help="input mean/std preset; default: the model's"
    )
    if dtype:
        parser.add_argument("--dtype", choices=("fp32", "bf16"), help="compute dtype (default: fp32)")


def from_args(args: argparse.Namespace, command: str, seed: int = 0) -> Backbone:
    """The backbone named by --model / --weights / --normalization / --dtype, with the warning
    every command gives when the weights are random."""
    backbone = load(
        args.model, args.weights, normalization=args.normalization, dtype=getattr(args, "dtype", None), seed=seed
    )
    if args.weights is None:
        print(
            f"dinov3-jax {command}: warning: no --weights given, so {args.model} is RANDOMLY INITIALISED; "
            "the results only exercise the pipeline",
            file=sys.stderr,
        )
    return backbone
