"""Shared by the benchmark scripts: a description of the machine and the peak FLOP/s that
utilisation (MFU) is measured against.

On a CPU there is no published peak for a KVM guest, so two are given:

* the **measured matmul peak**: the FLOP/s of a large fp32 matmul (`jnp.dot`, jitted) timed in the
  same process, just before the benchmark, i.e. what XLA's own GEMM reaches on these cores now;
* the **theoretical peak** derived from /proc/cpuinfo: cores × SIMD fp32 lanes (16 with AVX-512,
  8 with AVX2) × 2 (FMA) × 2 FMA units per core (an assumption: true of server Xeons and Zen 4,
  not of every part) × the clock /proc/cpuinfo reports (a KVM guest shows the nominal clock; the
  real, turbo or throttled, clock is not visible).
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

# Dense peak TFLOP/s of known accelerators (vendor figures, no sparsity), by (device kind word, dtype).
ACCELERATOR_PEAK_TFLOPS = {
    ("H200", "bfloat16"): 989.0,
    ("H200", "float32"): 67.0,
    ("H100", "bfloat16"): 989.0,
    ("H100", "float32"): 67.0,
}


def _cpuinfo() -> dict[str, str]:
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if ":" in line:
                    key, value = (s.strip() for s in line.split(":", 1))
                    info.setdefault(key, value)
    except OSError:
        pass
    return info


def cpu_model() -> str:
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def theoretical_cpu_peak() -> tuple[float | None, str]:
    """(fp32 FLOP/s, how it was derived) from /proc/cpuinfo, or (None, why not)."""
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    mhz = float(info.get("cpu MHz", "0") or 0)
    if not flags or not mhz:
        return None, "no /proc/cpuinfo clock or flags"
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags or "fma" in flags else 4
    cores = usable_cores()
    peak = cores * lanes * 2 * 2 * mhz * 1e6
    how = f"{cores} cores × {lanes} fp32 lanes × 2 (FMA) × 2 FMA units (assumed) × {mhz:.0f} MHz (cpuinfo)"
    return peak, how


def measured_matmul_peak(n: int = 2048, repeats: int = 7, dtype: str = "float32") -> float:
    """FLOP/s of an n×n @ n×n matmul in `dtype` under jax.jit: best of `repeats` (after one warm-up)."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32), dtype)
    b = jnp.asarray(np.random.default_rng(1).standard_normal((n, n), np.float32), dtype)
    dot = jax.jit(jnp.dot)
    jax.block_until_ready(dot(a, b))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(dot(a, b))
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / min(times)


def accelerator_peak(dtype: str) -> float | None:
    """Vendor dense peak FLOP/s of the first JAX device for `dtype`, when it is a known accelerator."""
    kind = jax.devices()[0].device_kind
    for (word, dt), tflops in ACCELERATOR_PEAK_TFLOPS.items():
        if word in kind and dt == dtype:
            return tflops * 1e12
    return None


def library_versions() -> str:
    import flax
    import optax

    parts = [f"jax {jax.__version__}", f"flax {flax.__version__}", f"optax {optax.__version__}"]
    try:
        import grain

        parts.append(f"grain {getattr(grain, '__version__', '?')}")
    except ImportError:
        pass
    parts += [f"numpy {np.__version__}", f"python {platform.python_version()}"]
    return ", ".join(parts)


def machine_line() -> str:
    dev = jax.devices()[0]
    return (
        f"machine: CPU {cpu_model()} ({usable_cores()} cores usable); JAX devices {jax.device_count()} × "
        f"{dev.platform}:{dev.device_kind}; {library_versions()}"
    )


def now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def median_ms(times: list[float]) -> str:
    return f"median {statistics.median(times) * 1e3:.1f} ms (min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f})"
