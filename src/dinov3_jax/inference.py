"""Jitted inference entry points: split the NNX model once, jit a pure function of (state, images).

The NNX performance guide recommends this functional form over `nnx.jit` for repeated calls: the
graph is traversed once, and each new input shape compiles once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx


def inference_compiler_options() -> dict[str, Any] | None:
    """XLA options for forward-only programs on CPU (CPU-PERF.md): the YNNPACK fusions slow a ViT
    forward; they are turned off for inference only, never for training."""
    if jax.default_backend() != "cpu":
        return None
    return {"xla_cpu_experimental_ynn_fusion_type": ""}


def jit_method(model: nnx.Module, method: str = "forward_features", **kwargs: Any) -> Callable[[jax.Array], Any]:
    """`model.<method>(x, **kwargs)` as a jitted function of the images only (weights closed over
    as arguments, not constants, so they are not baked into the executable)."""
    graphdef, state = nnx.split(model)

    def run(state, x):
        return getattr(nnx.merge(graphdef, state), method)(x, **kwargs)

    compiled = jax.jit(run, compiler_options=inference_compiler_options())
    return lambda x: compiled(state, x)
