"""Jitted inference entry points: split the NNX model once, jit a pure function of (state, images).

The NNX performance guide recommends this functional form over `nnx.jit` for repeated calls: the
graph is traversed once, and each new input shape compiles once.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

log = logging.getLogger(__name__)


# Forward-only XLA options on CPU (CPU-PERF.md): the YNNPACK fusions slow a ViT forward; they are
# turned off for inference only, never for training. Experimental options come and go between
# jaxlib releases, so they are tried once on a trivial program before use.
CPU_INFERENCE_OPTIONS: dict[str, Any] = {"xla_cpu_experimental_ynn_fusion_type": ""}
# Training options on CPU with activation checkpointing: XLA:CPU expands the optimisation barriers
# that keep jax.checkpoint's recomputation apart before its CSE pass, which then merges the
# recomputation back into the forward pass, so every activation would be kept after all (ViT-S/16,
# 8 images of 224 px: 1060 MiB of temporaries with or without checkpointing; 354 MiB selective and
# 146 MiB full with this pass off). GPU and TPU keep the barriers.
CPU_CHECKPOINTING_OPTIONS: dict[str, Any] = {"xla_disable_hlo_passes": "cse_barrier_expander"}


@functools.cache
def _options_accepted(options: tuple[tuple[str, Any], ...]) -> bool:
    try:
        jax.jit(lambda x: x + 1, compiler_options=dict(options)).lower(jnp.zeros((), jnp.float32)).compile()
    except jax.errors.JaxRuntimeError as err:
        log.warning(
            "this jaxlib (%s) refuses the CPU compiler options %s (%s); compiling without them",
            jax.__version__,
            dict(options),
            str(err).splitlines()[0][:200],
        )
        return False
    return True


def cpu_compiler_options(options: dict[str, Any]) -> dict[str, Any] | None:
    """`options` (XLA options) on CPU when this jaxlib accepts them, else None (no options; other
    backends get none either)."""
    if jax.default_backend() != "cpu" or not options:
        return None
    key = tuple(sorted(options.items()))
    return dict(key) if _options_accepted(key) else None


def inference_compiler_options() -> dict[str, Any] | None:
    """XLA options for forward-only programs (`CPU_INFERENCE_OPTIONS`)."""
    return cpu_compiler_options(CPU_INFERENCE_OPTIONS)


def jit_method(model: nnx.Module, method: str = "forward_features", **kwargs: Any) -> Callable[[jax.Array], Any]:
    """`model.<method>(x, **kwargs)` as a jitted function of the images only (weights closed over
    as arguments, not constants, so they are not baked into the executable)."""
    graphdef, state = nnx.split(model)

    def run(state, x):
        return getattr(nnx.merge(graphdef, state), method)(x, **kwargs)

    compiled = jax.jit(run, compiler_options=inference_compiler_options())
    return lambda x: compiled(state, x)
