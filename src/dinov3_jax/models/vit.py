"""The DINOv3 vision transformer (paper §3.1 and §4; RECIPE.md §1).

Token layout `[CLS, R registers, h·w patches]`; position enters only through 2-D RoPE on the patch
tokens. Images are NHWC float arrays of any size (the patch grid is floor(H/p) × floor(W/p)).

Randomness is explicit: `training=True` turns on stochastic depth and RoPE coordinate
augmentation, both drawn from the `key` argument (a new draw per block, as the official model
does), so a training step is a pure function of its inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from dinov3_jax.models.config import ViTConfig, resolve_dtype
from dinov3_jax.models.layers import (
    Block,
    PatchEmbed,
    checkpointed,
    has_rope_augmentation,
    logical,
    make_norm,
    rope_sin_cos,
)

Array = jax.Array


class DinoVisionTransformer(nnx.Module):
    """DINOv3 ViT backbone. Attribute names are the official state-dict prefixes."""

    def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
        cfg = self.config = config
        d, pdtype = cfg.embed_dim, resolve_dtype(cfg.param_dtype)
        token_init = logical(nnx.initializers.normal(stddev=0.02), None, None, "embed")
        self.patch_embed = PatchEmbed(cfg, rngs=rngs)
        self.cls_token = nnx.Param(token_init(rngs.params(), (1, 1, d), pdtype))
        if cfg.n_storage_tokens:
            self.storage_tokens = nnx.Param(token_init(rngs.params(), (1, cfg.n_storage_tokens, d), pdtype))
        self.mask_token = nnx.Param(jnp.zeros((1, d), pdtype), out_sharding=(None, "embed"), eager_sharding=False)
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.depth)])
        self.norm = make_norm(cfg, rngs)
        if cfg.untie_cls_and_patch_norms:
            self.cls_norm = make_norm(cfg, rngs)
        if cfg.untie_global_and_local_cls_norm:
            self.local_cls_norm = make_norm(cfg, rngs)

    # ---------------------------------------------------------------------------------------
    # Tokens
    # ---------------------------------------------------------------------------------------

    @property
    def n_prefix_tokens(self) -> int:
        return 1 + self.config.n_storage_tokens

    def patch_grid(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        p = self.config.patch_size
        h, w = image_hw[0] // p, image_hw[1] // p
        if h == 0 or w == 0:
            raise ValueError(f"image of {image_hw[0]}x{image_hw[1]} px is smaller than one {p}x{p} patch")
        return h, w

    def prepare_tokens_with_masks(self, x_bhwc: Array, masks: Array | None = None) -> Array:
        """[CLS, registers, patches] of shape [B, 1+R+h·w, D]; masked patches become `mask_token`."""
        if x_bhwc.ndim != 4 or x_bhwc.shape[-1] != self.config.in_chans:
            raise ValueError(
                f"expected NHWC images with {self.config.in_chans} channels, got shape {tuple(x_bhwc.shape)}"
            )
        self.patch_grid(x_bhwc.shape[1:3])
        dtype = resolve_dtype(self.config.dtype)
        patches = self.patch_embed(x_bhwc.astype(dtype))
        b, h, w, d = patches.shape
        patches = patches.reshape(b, h * w, d)
        if masks is not None:
            if masks.shape != (b, h * w):
                raise ValueError(f"masks must have shape {(b, h * w)} (batch, patches), got {tuple(masks.shape)}")
            patches = jnp.where(masks[..., None], self.mask_token[...].astype(dtype)[None], patches)
        prefix = [self.cls_token[...]]
        if self.config.n_storage_tokens:
            prefix.append(self.storage_tokens[...])
        prefix = jnp.broadcast_to(jnp.concatenate(prefix, axis=1).astype(dtype), (b, self.n_prefix_tokens, d))
        return jnp.concatenate([prefix, patches], axis=1)

    # ---------------------------------------------------------------------------------------
    # Blocks
    # ---------------------------------------------------------------------------------------

    def _run_blocks(
        self,
        x_bhwc: Array,
        masks: Array | None,
        *,
        training: bool,
        key: Array | None,
        collect: Sequence[int] = (),
    ) -> tuple[Array, list[Array]]:
        """Runs every block; returns the last output and the outputs of the blocks in `collect`."""
        cfg = self.config
        augment_rope = training and has_rope_augmentation(cfg)
        drop = training and cfg.drop_path_rate > 0
        if (augment_rope or drop) and key is None:
            raise ValueError("training with drop path or RoPE augmentation needs a PRNG `key`")
        x = self.prepare_tokens_with_masks(x_bhwc, masks)
        h, w = self.patch_grid(x_bhwc.shape[1:3])
        keys = jax.random.split(key, (cfg.depth, 3)) if (augment_rope or drop) else None
        shared_rope = None if augment_rope else rope_sin_cos(cfg, h, w)
        collected = []
        call = checkpointed(lambda block, *args: block(*args), cfg.remat)
        for i, block in enumerate(self.blocks):
            rope = rope_sin_cos(cfg, h, w, keys[i, 0]) if augment_rope else shared_rope
            x = call(block, x, rope, (keys[i, 1], keys[i, 2]) if drop else None)
            if i in collect:
                collected.append(x)
        return x, collected

    def _final_norm(self, x: Array, *, local_crops: bool = False, training: bool = False) -> Array:
        """Final norm; CLS and registers use an untied norm when configured (RECIPE.md §1.7)."""
        cfg = self.config
        if not (cfg.untie_cls_and_patch_norms or cfg.untie_global_and_local_cls_norm):
            return self.norm(x)
        if cfg.untie_global_and_local_cls_norm and training and local_crops:
            prefix_norm = self.local_cls_norm
        elif cfg.untie_cls_and_patch_norms:
            prefix_norm = self.cls_norm
        else:
            prefix_norm = self.norm
        n = self.n_prefix_tokens
        return jnp.concatenate([prefix_norm(x[:, :n]), self.norm(x[:, n:])], axis=1)

    # ---------------------------------------------------------------------------------------
    # Public API (the official method names)
    # ---------------------------------------------------------------------------------------

    def forward_features(
        self,
        x_bhwc: Array,
        masks: Array | None = None,
        *,
        training: bool = False,
        key: Array | None = None,
        local_crops: bool = False,
    ) -> dict[str, Array | None]:
        """The official output dict: normalised CLS [B, D], registers [B, R, D], patches
        [B, h·w, D], the pre-norm tokens [B, 1+R+h·w, D] and the masks passed in.

        `local_crops` selects `local_cls_norm` for CLS/registers in training when the norms are
        untied between global and local crops (ViT-7B, ViT-L SAT).
        """
        x, _ = self._run_blocks(x_bhwc, masks, training=training, key=key)
        x_norm = self._final_norm(x, local_crops=local_crops, training=training)
        n = self.n_prefix_tokens
        return {
            "x_norm_clstoken": x_norm[:, 0],
            "x_storage_tokens": x_norm[:, 1:n],
            "x_norm_patchtokens": x_norm[:, n:],
            "x_prenorm": x,
            "masks": masks,
        }

    def __call__(self, x_bhwc: Array) -> Array:
        """The normalised CLS token [B, D] (the official `forward` in eval, head = identity)."""
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
        """Outputs of the last `n` blocks (int) or of the blocks with the given 0-based indices.

        With `norm`, each output goes through the *final* norm (CLS/registers through `cls_norm`
        when untied; `local_cls_norm` never). With `reshape`, patches come as [B, h, w, D] (the
        channels-last counterpart of the official [B, D, h, w]). Per layer: patches, then the class
        token [B, D] and the register tokens [B, R, D] when asked for.
        """
        depth = self.config.depth
        indices = list(range(depth - n, depth)) if isinstance(n, int) else [int(i) for i in n]
        bad = [i for i in indices if not 0 <= i < depth]
        if bad or not indices:
            raise ValueError(f"layer indices {bad or indices} out of range for depth {depth}")
        _, outputs = self._run_blocks(x_bhwc, None, training=False, key=None, collect=set(indices))
        by_index = dict(zip(sorted(set(indices)), outputs))
        h, w = self.patch_grid(x_bhwc.shape[1:3])
        k = self.n_prefix_tokens
        results = []
        for i in indices:
            out = by_index[i]
            if norm:
                if self.config.untie_cls_and_patch_norms:
                    out = jnp.concatenate([self.cls_norm(out[:, :k]), self.norm(out[:, k:])], axis=1)
                else:
                    out = self.norm(out)
            patches = out[:, k:]
            if reshape:
                patches = patches.reshape(out.shape[0], h, w, out.shape[-1])
            item = (patches,)
            if return_class_token:
                item += (out[:, 0],)
            if return_extra_tokens:
                item += (out[:, 1:k],)
            results.append(item if len(item) > 1 else patches)
        return tuple(results)

    def get_last_self_attention(self, x_bhwc: Array, prefix_only: bool = False) -> Array:
        """Softmax attention probabilities of the last block (eval mode), fp32.

        [B, heads, N, N] over all tokens [CLS, registers, patches]; with `prefix_only`, only the
        CLS and register queries: [B, heads, 1+R, N] (what attention maps show; memory linear in N).
        """
        cfg = self.config
        x = self.prepare_tokens_with_masks(x_bhwc)
        h, w = self.patch_grid(x_bhwc.shape[1:3])
        rope = rope_sin_cos(cfg, h, w)
        for block in self.blocks[:-1]:
            x = block(x, rope, None)
        last = self.blocks[-1]
        return last.attn.attention_weights(last.norm1(x), rope, self.n_prefix_tokens if prefix_only else None)


def count_params(model: nnx.Module) -> int:
    """Number of parameters (buffers such as RoPE periods are not parameters here)."""
    return sum(int(v.size) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
