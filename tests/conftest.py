"""Test set-up: 8 simulated CPU devices (set before JAX initialises) and exact fp32 matmuls."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax

jax.config.update("jax_default_matmul_precision", "highest")

# Many tests train the same tiny configs more than once (an uninterrupted run, then a stopped and
# resumed one): a per-session compilation cache compiles each distinct program once.
import tempfile  # noqa: E402

jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="dinov3-jax-test-cache-"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
