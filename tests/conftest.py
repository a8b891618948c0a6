"""Test set-up: 8 simulated CPU devices (set before JAX initialises) and exact fp32 matmuls."""

import os

# Compiling is most of the suite's time; the tiny test programs run in milliseconds either way.
# So LLVM's backend optimisations are off, and elementwise fusions use XLA's classic emitters,
# whose compile is cheaper than the MLIR fusion emitters' (a train step: 24 -> 18 CPU s). The fp
# semantics are the same (no fast-math either way).
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {TEST_XLA_FLAGS}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# Many tests train the same tiny configs more than once (an uninterrupted run, then a stopped and
# resumed one): a compilation cache for the session compiles each distinct program once. The
# pytest-xdist workers of one run share it (same run id), so a program compiled by one is reused
# by the other.
# The controller process (or a lone pytest) removes the caches at the end.
import shutil  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


def _shared_cache(run_id: str) -> Path:
    return Path(tempfile.gettempdir(), f"dinov3-jax-test-cache-{run_id}")


_run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
jax.config.update(
    "jax_compilation_cache_dir",
    str(_shared_cache(_run)) if _run else tempfile.mkdtemp(prefix="dinov3-jax-test-cache-"),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
_caches_to_remove = {Path(jax.config.jax_compilation_cache_dir)}


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """(pytest-xdist controller) a worker has finished: its run's shared cache is removed at the end."""
    _caches_to_remove.add(_shared_cache(node.workerinput["testrunuid"]))


def pytest_unconfigure(config):
    if not hasattr(config, "workerinput"):
        for path in _caches_to_remove:
            shutil.rmtree(path, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    """The slow tests first, so that pytest-xdist's workers do not end on one long test each."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
