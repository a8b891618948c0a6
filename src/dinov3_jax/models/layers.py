"""Building blocks of the DINOv3 ViT (paper §3.1; RECIPE.md §1.2–1.7).

Module and parameter names mirror the official checkpoint keys (`patch_embed.proj`, `attn.qkv`,
`ls1`, `mlp.fc1`, ...), with Flax conventions: Dense kernels are (in, out), norms have
`scale`/`bias`, conv kernels are HWIO. Every parameter carries logical axis names; the mapping of
those names onto a device mesh lives in one rule table, not here.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from dinov3_jax.models.config import ViTConfig, resolve_dtype

log = logging.getLogger(__name__)

Array = jax.Array

# The name under which the attention output is kept by the selective checkpointing policy.
ATTENTION_OUT = "attention_out"
# jax.checkpoint policy of each REMAT_POLICIES name (RECIPE.md §9.2). Selective mirrors the
# official mode, which keeps the outputs of the matmuls and of the attention kernel: here the
# non-batched dots (the linears, not the B·H·N² attention scores) and the named attention output.
REMAT_POLICY = {
    "selective": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(ATTENTION_OUT),
    ),
    "full": jax.checkpoint_policies.nothing_saveable,
}


def checkpointed(call: Callable, remat: str) -> Callable:
    """`call(module, *args)` under activation checkpointing `remat` (a REMAT_POLICIES name): its
    activations are recomputed in the backward pass but for what the policy keeps."""
    return call if remat == "off" else nnx.remat(call, policy=REMAT_POLICY[remat])


# Official init (RECIPE.md §1.10): trunc_normal(std=0.02) with *absolute* bounds ±2, i.e. ±100σ:
# in effect a plain normal.
linear_init = nnx.initializers.normal(stddev=0.02)


def logical(init: Callable, *names: str | None) -> Callable:
    """Attaches logical axis names to a parameter initialiser (no mesh needed at construction)."""
    return nnx.with_partitioning(init, names, eager_sharding=False)


def exact_gelu(x: Array) -> Array:
    """The erf GELU of PyTorch's nn.GELU(); JAX defaults to the tanh approximation."""
    return jax.nn.gelu(x, approximate=False)


def dense(din: int, dout: int, axes: tuple[str | None, str | None], *, use_bias: bool, cfg: ViTConfig, rngs):
    return nnx.Linear(
        din,
        dout,
        use_bias=use_bias,
        dtype=resolve_dtype(cfg.dtype),
        param_dtype=resolve_dtype(cfg.param_dtype),
        kernel_init=logical(linear_init, *axes),
        bias_init=logical(nnx.initializers.zeros_init(), axes[1]),
        rngs=rngs,
    )


def make_norm(cfg: ViTConfig, rngs: nnx.Rngs) -> nnx.Module:
    """LayerNorm (two-pass variance, as PyTorch) or RMSNorm, with the eps of the official name."""
    kwargs = dict(
        epsilon=cfg.norm_eps,
        dtype=resolve_dtype(cfg.dtype),
        param_dtype=resolve_dtype(cfg.param_dtype),
        scale_init=logical(nnx.initializers.ones_init(), "embed"),
        rngs=rngs,
    )
    if cfg.norm_layer == "rmsnorm":
        return RMSNorm(cfg.embed_dim, **kwargs)
    return nnx.LayerNorm(
        cfg.embed_dim,
        use_fast_variance=False,
        bias_init=logical(nnx.initializers.zeros_init(), "embed"),
        **kwargs,
    )


class RMSNorm(nnx.RMSNorm):
    """Official RMSNorm: normalise in fp32, cast back to the input dtype, *then* scale."""

    def __call__(self, x: Array, mask=None) -> Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
        return y.astype(x.dtype) * self.scale[...].astype(x.dtype)


class PatchEmbed(nnx.Module):
    """Conv with kernel = stride = patch size (NHWC in, [B, h, w, D] out; floors like PyTorch)."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        p, c = cfg.patch_size, cfg.in_chans
        # PyTorch Conv2d default init: U(±1/sqrt(fan_in)) for kernel and bias (RECIPE.md §1.10).
        bound = 1.0 / math.sqrt(c * p * p)
        uniform = functools.partial(jax.random.uniform, minval=-bound, maxval=bound)
        self.proj = nnx.Conv(
            c,
            cfg.embed_dim,
            kernel_size=(p, p),
            strides=(p, p),
            padding="VALID",
            dtype=resolve_dtype(cfg.dtype),
            param_dtype=resolve_dtype(cfg.param_dtype),
            kernel_init=logical(lambda k, s, d: uniform(k, s, d), None, None, "conv_in", "embed"),
            bias_init=logical(lambda k, s, d: uniform(k, s, d), "embed"),
            rngs=rngs,
        )

    def __call__(self, x_bhwc: Array) -> Array:
        return self.proj(x_bhwc)


# --------------------------------------------------------------------------------------------
# RoPE (RECIPE.md §1.3): axial 2-D, no weights; periods and coordinates in the RoPE dtype.
# --------------------------------------------------------------------------------------------


def rope_periods(cfg: ViTConfig) -> Array:
    """Periods [Dh/4], evaluated in the RoPE dtype like the official buffer (or read from a file)."""
    dtype = resolve_dtype(cfg.pos_embed_rope_dtype)
    if cfg.rope_periods is not None:
        return jnp.asarray(cfg.rope_periods, dtype=jnp.float32).astype(dtype)
    n = cfg.head_dim // 4
    if cfg.pos_embed_rope_base is not None:
        exponent = 2 * jnp.arange(n, dtype=dtype) / (cfg.head_dim // 2)
        return (cfg.pos_embed_rope_base**exponent).astype(dtype)
    lo, hi = cfg.pos_embed_rope_min_period, cfg.pos_embed_rope_max_period
    ratio = hi / lo
    return (hi * ratio ** jnp.linspace(0, 1, n, dtype=dtype) / ratio).astype(dtype)


def patch_coords(cfg: ViTConfig, h: int, w: int) -> Array:
    """Patch centres [h·w, 2] (row, col) mapped to [-1, 1] by the configured normalisation."""
    dtype = resolve_dtype(cfg.pos_embed_rope_dtype)
    mode = cfg.pos_embed_rope_normalize_coords
    denom_h, denom_w = {"separate": (h, w), "max": (max(h, w),) * 2, "min": (min(h, w),) * 2}[mode]
    ch = jnp.arange(0.5, h, dtype=dtype) / denom_h
    cw = jnp.arange(0.5, w, dtype=dtype) / denom_w
    grid = jnp.stack(jnp.meshgrid(ch, cw, indexing="ij"), axis=-1).reshape(h * w, 2)
    return 2 * grid - 1


def augment_coords(cfg: ViTConfig, coords: Array, key: Array) -> Array:
    """Train-time shift, per-axis jitter and shared rescale, one draw for the whole batch."""
    k_shift, k_jitter, k_rescale = jax.random.split(key, 3)
    dtype = coords.dtype
    if cfg.pos_embed_rope_shift_coords is not None:
        s = cfg.pos_embed_rope_shift_coords
        coords = coords + jax.random.uniform(k_shift, (1, 2), jnp.float32, -s, s).astype(dtype)
    if cfg.pos_embed_rope_jitter_coords is not None:
        j = math.log(cfg.pos_embed_rope_jitter_coords)
        coords = coords * jnp.exp(jax.random.uniform(k_jitter, (1, 2), jnp.float32, -j, j)).astype(dtype)
    if cfg.pos_embed_rope_rescale_coords is not None:
        r = math.log(cfg.pos_embed_rope_rescale_coords)
        coords = coords * jnp.exp(jax.random.uniform(k_rescale, (1,), jnp.float32, -r, r)).astype(dtype)
    return coords


def has_rope_augmentation(cfg: ViTConfig) -> bool:
    return any(
        v is not None
        for v in (cfg.pos_embed_rope_shift_coords, cfg.pos_embed_rope_jitter_coords, cfg.pos_embed_rope_rescale_coords)
    )


def rope_sin_cos(cfg: ViTConfig, h: int, w: int, key: Array | None = None) -> tuple[Array, Array]:
    """(sin, cos), each [h·w, Dh] laid out as [θ_h, θ_w, θ_h, θ_w]; θ = 2π·coord / period."""
    coords = patch_coords(cfg, h, w)
    if key is not None:
        coords = augment_coords(cfg, coords, key)
    angles = (2 * math.pi * coords[:, :, None]) / rope_periods(cfg)[None, None, :]
    angles = jnp.tile(angles.reshape(h * w, -1), (1, 2))
    return jnp.sin(angles), jnp.cos(angles)


def apply_rope(x_bhnd: Array, sin: Array, cos: Array) -> Array:
    """Rotates the last h·w tokens (the patches) in NeoX half layout; CLS and registers untouched."""
    # The official model casts all of q / k to the RoPE dtype and back (RECIPE.md §1.3), so with
    # bf16 RoPE even the prefix tokens are rounded.
    dtype = x_bhnd.dtype
    x_bhnd = x_bhnd.astype(sin.dtype)
    n_patches = sin.shape[0]
    prefix, patches = x_bhnd[..., :-n_patches, :], x_bhnd[..., -n_patches:, :]
    x1, x2 = jnp.split(patches, 2, axis=-1)
    rotated = patches * cos + jnp.concatenate([-x2, x1], axis=-1) * sin
    return jnp.concatenate([prefix, rotated], axis=-2).astype(dtype)


# --------------------------------------------------------------------------------------------
# Attention (RECIPE.md §1.4)
# --------------------------------------------------------------------------------------------


class LinearKMaskedBias(nnx.Linear):
    """The fused qkv projection whose k third of the bias is multiplied by 0 (official
    `LinearKMaskedBias`): the stored k bias has no effect and receives no gradient."""

    def __call__(self, x: Array) -> Array:
        third = self.out_features // 3
        mask = jnp.concatenate([jnp.ones(third), jnp.zeros(third), jnp.ones(third)])
        bias = self.bias[...] * mask.astype(self.bias.dtype)
        x, kernel, bias = self.promote_dtype((x, self.kernel[...], bias), dtype=self.dtype)
        return jnp.dot(x, kernel, precision=self.precision) + bias


# On CPU, long sequences run attention over chunks of (batch, head) slices so that the fp32 logits
# of one chunk (chunk · Nq · Nk · 4 bytes) stay in cache: one pass over all of them goes through
# DRAM. Measured (benchmarks/README.md): ~1.7x faster attention alone and ~9% faster ViT-S forward
# at 512 px (1029 tokens); at 224 px (201 tokens) chunking gained nothing, hence the threshold.
CPU_ATTENTION_CHUNK_BYTES = 8 << 20
CPU_ATTENTION_MIN_SLICE_BYTES = 1 << 20


def _attention_forward(q_bhnd: Array, k_bhnd: Array, v_bhnd: Array) -> tuple[Array, Array]:
    """(output, fp32 softmax probabilities)."""
    scale = q_bhnd.shape[-1] ** -0.5
    logits = jnp.einsum("bhqd,bhkd->bhqk", q_bhnd, k_bhnd, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits * scale, axis=-1)
    return jnp.einsum("bhqk,bhkd->bhqd", probs.astype(v_bhnd.dtype), v_bhnd), probs


@jax.custom_vjp
def _softmax_attention(q_bhnd: Array, k_bhnd: Array, v_bhnd: Array) -> Array:
    """softmax(q kᵀ / √Dh) v with fp32 logits and softmax, and a hand-written backward.

    The backward is the one autodiff derives, written out so that XLA sees four plain batched
    matmuls and one elementwise pass: with S = q kᵀ / √Dh, P = softmax(S), O = P v,
    dv = Pᵀ dO, dP = dO vᵀ, dS = P ⊙ (dP − Σₖ P ⊙ dP) / √Dh, dq = dS k, dk = dSᵀ q. On CPU this made
    the attention's forward + backward 20-30% faster than autodiff's (benchmarks/README.md,
    "Forward + backward"); the gradients agree to fp32 rounding (~1e-7 relative)."""
    return _attention_forward(q_bhnd, k_bhnd, v_bhnd)[0]


def _softmax_attention_fwd(q_bhnd: Array, k_bhnd: Array, v_bhnd: Array):
    out, probs = _attention_forward(q_bhnd, k_bhnd, v_bhnd)
    return out, (q_bhnd, k_bhnd, v_bhnd, probs)


def _softmax_attention_bwd(residuals, d_out: Array):
    q, k, v, probs = residuals
    scale = q.shape[-1] ** -0.5
    dv = jnp.einsum("bhqk,bhqd->bhkd", probs.astype(v.dtype), d_out.astype(v.dtype))
    d_probs = jnp.einsum("bhqd,bhkd->bhqk", d_out, v, preferred_element_type=jnp.float32)
    d_logits = probs * (d_probs - jnp.sum(probs * d_probs, axis=-1, keepdims=True)) * scale
    dq = jnp.einsum("bhqk,bhkd->bhqd", d_logits.astype(k.dtype), k).astype(q.dtype)
    dk = jnp.einsum("bhqk,bhqd->bhkd", d_logits.astype(q.dtype), q).astype(k.dtype)
    return dq, dk, dv


_softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)


def cpu_attention_chunk(n_slices: int, n_q: int, n_k: int) -> int:
    """The largest divisor of `n_slices` (= batch · heads) whose fp32 logits fit the chunk budget."""
    fit = max(1, CPU_ATTENTION_CHUNK_BYTES // (n_q * n_k * 4))
    return max(c for c in range(1, min(fit, n_slices) + 1) if n_slices % c == 0)


def xla_attention(q_bhnd: Array, k_bhnd: Array, v_bhnd: Array) -> Array:
    """Softmax attention in [B, H, N, Dh] with fp32 logits and softmax.

    On CPU this layout is about 4x faster than the [B, N, H, Dh] one of
    `jax.nn.dot_product_attention` (CPU-PERF.md), and for long sequences the (batch, head) slices
    are processed in cache-sized chunks (`lax.map`); on GPU the whole batch is one call.
    The chunks compute the same operations; results differ from one unchunked call only by
    fp32 rounding inside the matmul kernels (~1e-7).
    """
    b, h, n_q = q_bhnd.shape[:3]
    n_k = k_bhnd.shape[2]
    chunk = b * h
    if jax.default_backend() == "cpu" and n_q * n_k * 4 >= CPU_ATTENTION_MIN_SLICE_BYTES:
        chunk = cpu_attention_chunk(b * h, n_q, n_k)
    if chunk == b * h:
        return _softmax_attention(q_bhnd, k_bhnd, v_bhnd)

    def one_chunk(qkv):
        return _softmax_attention(*(t[None] for t in qkv))[0]

    def split(t):
        return t.reshape(b * h // chunk, chunk, *t.shape[2:])

    out = jax.lax.map(one_chunk, (split(q_bhnd), split(k_bhnd), split(v_bhnd)))
    return out.reshape(b, h, n_q, v_bhnd.shape[-1])


# --------------------------------------------------------------------------------------------
# Backward-pass fusion cut (CPU)
# --------------------------------------------------------------------------------------------


def _materialized(g: Array) -> Array:
    """`g` through a conditional whose two branches are the identity: XLA does not fuse across a
    conditional, so `g` is computed once into a buffer. The predicate reads `g` (a NaN makes it
    False, which takes the other identity branch), so it cannot be folded away."""
    first = g.reshape(-1)[:1]
    return jax.lax.cond(jnp.all(first == first), lambda t: t, lambda t: t + jnp.zeros((), t.dtype), g)


@jax.custom_vjp
def _cut(x: Array) -> Array:
    return x


_cut.defvjp(lambda x: (x, None), lambda _, g: (_materialized(g),))


def cut_backward_fusion(x: Array) -> Array:
    """The identity; on CPU its cotangent is materialized once (a fusion barrier in the backward).

    Why: the gradient of the residual stream is a chain of elementwise adds through every block
    (each block adds its LayerNorm backward terms). XLA's CPU fusion duplicates cheap elementwise
    producers into every consumer, so each block's weight-gradient transposes and matmuls
    recomputed the whole chain from the last block down: O(depth²) work, ~2.6 s of a 5.7 s
    ViT-S/16 forward + backward at batch 16 (benchmarks/README.md, "Forward + backward"). Calling
    this on the residual stream at each block (in the forward) cuts the chain into one add per
    block. `jax.lax.optimization_barrier` does not help: the CPU compiler removes it before fusion.
    Other backends do not duplicate like this; there it is the plain identity."""
    if jax.default_backend() != "cpu":
        return x
    return _cut(x)


@functools.cache
def _warn_cudnn_fallback(reason: str) -> None:
    log.warning("cuDNN attention refused this call (%s); using the XLA implementation", reason)


def cudnn_attention(q_bhnd: Array, k_bhnd: Array, v_bhnd: Array) -> Array:
    """`jax.nn.dot_product_attention(implementation="cudnn")`, falling back to XLA when the
    backend, dtype or shape is refused (the refusal happens at trace time)."""
    q, k, v = (t.transpose(0, 2, 1, 3) for t in (q_bhnd, k_bhnd, v_bhnd))
    try:
        out = jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    except (ValueError, NotImplementedError, RuntimeError, TypeError) as err:
        _warn_cudnn_fallback(f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")
        return xla_attention(q_bhnd, k_bhnd, v_bhnd)
    return out.transpose(0, 2, 1, 3)


ATTENTION = {"xla": xla_attention, "cudnn": cudnn_attention}


class SelfAttention(nnx.Module):
    """Fused qkv, RoPE on the patch tokens of q and k, softmax attention, output projection."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        self.num_heads = cfg.num_heads
        self.attention_impl = cfg.attention_impl
        d = cfg.embed_dim
        if cfg.mask_k_bias:
            self.qkv = LinearKMaskedBias(
                d,
                3 * d,
                dtype=resolve_dtype(cfg.dtype),
                param_dtype=resolve_dtype(cfg.param_dtype),
                kernel_init=logical(linear_init, "embed", "qkv"),
                bias_init=logical(nnx.initializers.zeros_init(), "qkv"),
                rngs=rngs,
            )
        else:
            self.qkv = dense(d, 3 * d, ("embed", "qkv"), use_bias=cfg.qkv_bias, cfg=cfg, rngs=rngs)
        self.proj = dense(d, d, ("qkv", "embed"), use_bias=cfg.proj_bias, cfg=cfg, rngs=rngs)

    def __call__(self, x_bnd: Array, rope: tuple[Array, Array] | None) -> Array:
        b, n, d = x_bnd.shape
        qkv = self.qkv(x_bnd).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = checkpoint_name(ATTENTION[self.attention_impl](q, k, v), ATTENTION_OUT)
        return self.proj(out.transpose(0, 2, 1, 3).reshape(b, n, d))

    def attention_weights(self, x_bnd: Array, rope: tuple[Array, Array] | None, n_queries: int | None = None) -> Array:
        """The softmax attention probabilities [B, heads, Nq, N] in fp32, through the same qkv
        projection and RoPE as `__call__`. With `n_queries`, only the first `n_queries` tokens are
        queries (e.g. CLS and registers), so the N×N matrix is never formed."""
        b, n, d = x_bnd.shape
        qkv = self.qkv(x_bnd).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        q, k = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(2))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if n_queries is not None:
            q = q[:, :, :n_queries]
        logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
        return jax.nn.softmax(logits.astype(jnp.float32) * q.shape[-1] ** -0.5, axis=-1)


# --------------------------------------------------------------------------------------------
# FFN, LayerScale, Block (RECIPE.md §1.5–1.6)
# --------------------------------------------------------------------------------------------


class Mlp(nnx.Module):
    """fc1 → exact GELU → fc2 (no activation after fc2)."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        h = cfg.ffn_hidden
        self.fc1 = dense(cfg.embed_dim, h, ("embed", "mlp"), use_bias=cfg.ffn_bias, cfg=cfg, rngs=rngs)
        self.fc2 = dense(h, cfg.embed_dim, ("mlp", "embed"), use_bias=cfg.ffn_bias, cfg=cfg, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        return self.fc2(exact_gelu(self.fc1(x)))


class SwiGLUFFN(nnx.Module):
    """w3(silu(w1 x) · w2 x): w1 is the gated branch, w2 the linear one."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        h = cfg.ffn_hidden
        self.w1 = dense(cfg.embed_dim, h, ("embed", "mlp"), use_bias=cfg.ffn_bias, cfg=cfg, rngs=rngs)
        self.w2 = dense(cfg.embed_dim, h, ("embed", "mlp"), use_bias=cfg.ffn_bias, cfg=cfg, rngs=rngs)
        self.w3 = dense(h, cfg.embed_dim, ("mlp", "embed"), use_bias=cfg.ffn_bias, cfg=cfg, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        return self.w3(jax.nn.silu(self.w1(x)) * self.w2(x))


class LayerScale(nnx.Module):
    def __init__(self, cfg: ViTConfig):
        init = jnp.full((cfg.embed_dim,), cfg.layerscale_init, dtype=resolve_dtype(cfg.param_dtype))
        self.gamma = nnx.Param(init, out_sharding=("embed",), eager_sharding=False)

    def __call__(self, x: Array) -> Array:
        return x * self.gamma[...].astype(x.dtype)


def drop_path_residual(x: Array, branch: Callable[[Array], Array], rate: float, key: Array | None) -> Array:
    """x + branch(x), with the official *batch-subset* stochastic depth when a key is given.

    Of b samples, s = max(int(b·(1-rate)), 1) drawn without replacement get the residual, scaled
    by b/s, and the branch runs only on them; the others pass through unchanged (RECIPE.md §1.5).
    """
    if key is None or rate == 0.0:
        return x + branch(x)
    b = x.shape[0]
    keep = max(int(b * (1 - rate)), 1)
    idx = jax.random.permutation(key, b)[:keep]
    residual = branch(x[idx]) * jnp.asarray(b / keep, x.dtype)
    return x.at[idx].add(residual)


class Block(nnx.Module):
    """Pre-norm block: x + ls1(attn(norm1 x)), then + ls2(ffn(norm2 x))."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        self.drop_path_rate = cfg.drop_path_rate
        self.norm1 = make_norm(cfg, rngs)
        self.attn = SelfAttention(cfg, rngs=rngs)
        self.norm2 = make_norm(cfg, rngs)
        self.mlp = Mlp(cfg, rngs=rngs) if cfg.ffn_layer == "mlp" else SwiGLUFFN(cfg, rngs=rngs)
        if cfg.layerscale_init:
            self.ls1 = LayerScale(cfg)
            self.ls2 = LayerScale(cfg)
        else:
            self.ls1 = self.ls2 = None

    def __call__(self, x: Array, rope: tuple[Array, Array] | None, drop_keys: tuple[Array, Array] | None) -> Array:
        def attn_branch(t):
            out = self.attn(self.norm1(t), rope)
            return self.ls1(out) if self.ls1 is not None else out

        def ffn_branch(t):
            out = self.mlp(self.norm2(t))
            return self.ls2(out) if self.ls2 is not None else out

        k_attn, k_ffn = drop_keys if drop_keys is not None else (None, None)
        x = cut_backward_fusion(x)
        x = drop_path_residual(x, attn_branch, self.drop_path_rate, k_attn)
        return drop_path_residual(x, ffn_branch, self.drop_path_rate, k_ffn)
