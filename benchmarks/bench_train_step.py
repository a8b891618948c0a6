"""Train-step benchmark (not a test): the full DINOv3 step of a named recipe, built by the
trainer's own code, timed without the data pipeline.

For one recipe plus `--set key=value` overrides the script

1. loads the config (`configs.load_config`) and builds the run (`train.main.setup`: models,
   optimizer, sharded state, the jitted step with the state donated);
2. draws `--batches` host batches from the trainer's data pipeline (`data.pipeline.build_train_pipeline`
   over the synthetic source, in this process) and places them with `train.main.device_batch`,
   so the timed loop never waits for data;
3. times `step_fn.lower(state, batch, sched)` and `.compile()` separately, reads the compiled
   program's `cost_analysis()` (FLOPs; a dict or a list of dicts depending on the jax version)
   and `memory_analysis()` (argument, output, temp, alias bytes);
4. runs `--warmup` steps, then `--steps` timed steps of the compiled program (cycling through the
   placed batches, each step's own schedule values, `block_until_ready` on state and metrics) and
   reports the median step time, images/s (images per step / median), achieved FLOP/s and MFU;
5. with `--with-pipeline`, also times `--steps` steps fed by the pipeline as the trainer's loop
   feeds them (next batch, `device_batch`, queue the step; the pipeline and the step share the
   CPU), i.e. what training gets when the data is the bottleneck.

MFU is against `--peak-tflops` when given; otherwise on a known accelerator its vendor dense peak
for the compute dtype (H200: 989 TFLOP/s bf16, 67 fp32), and on a CPU the *measured matmul peak*
(a 2048² fp32 `jnp.dot` timed in this process first) and the theoretical peak derived from
/proc/cpuinfo (benchmarks/common.py states the assumptions). An analytic matmul-only FLOP count
(backbone and heads, forward ×1 for the teacher, ×3 for the student's forward + backward) is
printed beside XLA's count as a cross-check.

    .venv/bin/python benchmarks/bench_train_step.py --recipe tiny_cpu
    .venv/bin/python benchmarks/bench_train_step.py --recipe vits16_im1k --steps 5 \\
        --set train.batch_size_per_gpu=2 --set compute_precision.param_dtype=fp32 --set runtime.attention_impl=xla
    .venv/bin/python benchmarks/bench_train_step.py --recipe vits16_im1k --checkpointing full ...
"""

from __future__ import annotations

import argparse
import functools
import itertools
import resource
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # benchmarks/common.py
from dinov3_jax import parallel
from dinov3_jax.configs import Config, global_batch_size, load_config, schedule_steps, student_backbone_config
from dinov3_jax.data.sources import make_source
from dinov3_jax.models.heads import head_configs
from dinov3_jax.train import main as trainer

CHECKPOINTING = {
    "off": ["train.checkpointing=false", "train.checkpointing_full=false"],
    "selective": ["train.checkpointing=true", "train.checkpointing_full=false"],
    "full": ["train.checkpointing=true", "train.checkpointing_full=true"],
}


# ---------------------------------------------------------------------------------------------
# Analytic FLOPs (matmuls only): a cross-check of XLA's count
# ---------------------------------------------------------------------------------------------


def vit_forward_flops(vit, image: int, n_images: int) -> float:
    """Matmul FLOPs of the ViT forward on `n_images` square crops of `image` px."""
    p, d, hidden = vit.patch_size, vit.embed_dim, vit.ffn_hidden
    n_patches = (image // p) ** 2
    n = 1 + vit.n_storage_tokens + n_patches
    ffn_mats = 2 if vit.ffn_layer == "mlp" else 3
    per_block = 2 * n * d * 3 * d + 2 * n * d * d + ffn_mats * 2 * n * d * hidden + 2 * 2 * n * n * d
    return n_images * (vit.depth * per_block + 2 * n_patches * 3 * p * p * d)


def head_flops(in_dim: int, head, n_tokens: int) -> float:
    dims = [in_dim] + [head.hidden_dim] * (head.nlayers - 1) + [head.bottleneck_dim, head.n_prototypes]
    return n_tokens * sum(2 * a * b for a, b in itertools.pairwise(dims))


def analytic_step_flops(cfg: Config, batch: int, n_masked: int) -> dict[str, float] | None:
    """Teacher forward (global crops, DINO head on their CLS, iBOT head on the `n_masked` padded
    mask slots) + 3 × the student's forward (global and local crops, both heads): backward ≈ 2 ×
    forward. Matmuls only (no softmax, norms, GELU, optimizer), every student block on every
    sample (stochastic depth's batch subsets run fewer). `{"backbone": ..., "heads": ...,
    "total": ...}`, or None for a non-ViT student."""
    vit = student_backbone_config(cfg)
    if not hasattr(vit, "num_heads"):
        return None
    dino, ibot = head_configs(cfg)
    c = cfg.crops
    size = lambda v: v[0] if isinstance(v, (tuple, list)) else v  # noqa: E731
    g, loc, n_local = size(c.global_crops_size), size(c.local_crops_size), c.local_crops_number
    d = vit.embed_dim
    backbone_g = vit_forward_flops(vit, g, 2 * batch)
    backbone_l = vit_forward_flops(vit, loc, n_local * batch) if n_local else 0.0
    backbone = backbone_g + 3 * (backbone_g + backbone_l)
    heads = head_flops(d, dino, 2 * batch) + head_flops(d, ibot, n_masked)  # teacher
    heads += 3 * (head_flops(d, dino, (2 + n_local) * batch) + head_flops(d, ibot, n_masked))  # student
    return {"backbone": backbone, "heads": heads, "total": backbone + heads}


# ---------------------------------------------------------------------------------------------
# XLA's analyses
# ---------------------------------------------------------------------------------------------


def cost_flops(compiled) -> tuple[float | None, dict]:
    """FLOPs of the compiled program from `cost_analysis()`: a dict (jax ≥ 0.4.3x) or a list of
    dicts, one per program (older versions; the first is the step)."""
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
        if len(ca) > 1:
            print(f"  note: cost_analysis() returned {len(ca)} entries; using the first")
        ca = ca[0] if ca else {}
    ca = dict(ca or {})
    flops = ca.get("flops")
    return (float(flops) if flops is not None else None), ca


MEMORY_FIELDS = (
    "argument_size_in_bytes",
    "output_size_in_bytes",
    "alias_size_in_bytes",
    "temp_size_in_bytes",
    "generated_code_size_in_bytes",
    "host_argument_size_in_bytes",
    "host_output_size_in_bytes",
    "host_alias_size_in_bytes",
    "host_temp_size_in_bytes",
)


def memory_fields(compiled) -> dict[str, int]:
    stats = compiled.memory_analysis()
    if stats is None:
        return {}
    if isinstance(stats, (list, tuple)):
        stats = stats[0]
    return {f: int(getattr(stats, f)) for f in MEMORY_FIELDS if isinstance(getattr(stats, f, None), int)}


# ---------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------


def host_batch_size(cfg: Config) -> int:
    """Images per step of this process, as the trainer computes it (`train.main._train`)."""
    return global_batch_size(cfg, jax.device_count()) // jax.process_count()


def place(host: dict, mesh, cfg: Config) -> dict:
    """The host batch placed as the trainer's loop places it (`train.main.device_batch`)."""
    host = {k: v for k, v in host.items() if k not in ("skipped_from", "n_skipped")}
    return trainer.device_batch(host, mesh, n_micro=cfg.train.grad_accumulation_steps)


def images_in(batch: dict) -> int:
    """Images one step consumes: the labels of the placed batch, whatever its layout."""
    return int(np.prod(batch["labels"].shape))


def compute_dtype(cfg: Config) -> str:
    return {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(
        str(cfg.compute_precision.param_dtype), str(cfg.compute_precision.param_dtype)
    )


def run(args, cfg: Config) -> dict:
    mesh = parallel.make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
    batch = global_batch_size(cfg, jax.device_count())

    t0 = time.perf_counter()
    setup = trainer.setup(cfg, mesh, global_batch=batch, steps=schedule_steps(cfg))
    setup_s = time.perf_counter() - t0
    n_params = sum(x.size for x in jax.tree.leaves(setup.state["student"])) if "student" in setup.state else 0

    # Data: the trainer's pipeline over the synthetic source, drawn before any timing.
    source_kw = {"num_samples": cfg.data.num_samples or max(64, 4 * host_batch_size(cfg)), "seed": 0}
    source_kw["image_size"] = args.image_size or cfg.data.synthetic_image_size or 64
    source = make_source("synthetic", None, split="train", **source_kw)
    stream = functools.partial(
        trainer.train_stream, cfg, source, per_host_batch=host_batch_size(cfg), patch_size=setup.mask_stride
    )
    it = iter(stream(num_workers=0))
    t0 = time.perf_counter()
    hosts = [next(it) for _ in range(args.batches)]
    data_s = (time.perf_counter() - t0) / args.batches
    n_masked = len(hosts[0]["mask_indices"])
    batches = [place(h, mesh, cfg) for h in hosts]
    images = images_in(batches[0])

    state = setup.state
    sched0 = setup.schedule_values(0)
    t0 = time.perf_counter()
    lowered = setup.step_fn.lower(state, batches[0], sched0)
    lower_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    flops, costs = cost_flops(compiled)
    memory = memory_fields(compiled)

    times = []
    for i in range(args.warmup + args.steps):
        b = batches[i % len(batches)]
        sched = setup.schedule_values(i)
        t0 = time.perf_counter()
        state, metrics = compiled(state, b, sched)
        jax.block_until_ready((state, metrics))
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    loss = float(jax.device_get(metrics["loss"])) if "loss" in metrics else float("nan")
    step_s = statistics.median(times)

    fed = None
    if args.with_pipeline:
        # As the trainer's loop: each step's batch drawn from a fresh stream of the run's pipeline
        # (data.num_workers of the config), steps queued without waiting, one wait at the end.
        fed_stream = iter(stream())
        for i in range(args.warmup):  # the pipeline's start-up (and worker processes) untimed
            state, metrics = compiled(state, place(next(fed_stream), mesh, cfg), setup.schedule_values(i))
        jax.block_until_ready((state, metrics))
        t0 = time.perf_counter()
        for i in range(args.steps):
            state, metrics = compiled(state, place(next(fed_stream), mesh, cfg), setup.schedule_values(i))
        jax.block_until_ready((state, metrics))
        fed = (time.perf_counter() - t0) / args.steps
    return {
        "fed_step_s": fed,
        "images": images,
        "n_params": n_params,
        "setup_s": setup_s,
        "data_s": data_s,
        "lower_s": lower_s,
        "compile_s": compile_s,
        "flops": flops,
        "costs": costs,
        "analytic_flops": analytic_step_flops(cfg, images, n_masked),
        "memory": memory,
        "times": times,
        "step_s": step_s,
        "loss": loss,
        "rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="tiny_cpu", help="built-in recipe name or YAML path")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeat)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    parser.add_argument("--batches", type=int, default=2, help="distinct pre-built batches to cycle through")
    parser.add_argument("--checkpointing", choices=sorted(CHECKPOINTING), help="sets train.checkpointing(_full)")
    parser.add_argument("--peak-tflops", type=float, help="the peak to compute MFU against (TFLOP/s)")
    parser.add_argument("--matmul-size", type=int, default=2048, help="side of the peak-measuring matmul (0: skip)")
    parser.add_argument("--image-size", type=int, help="synthetic source image side (default: the config's)")
    parser.add_argument("--label", help="the row's name (default: the recipe)")
    parser.add_argument(
        "--with-pipeline",
        action="store_true",
        help="also time --steps steps fed by the data pipeline, as the trainer's loop (data.num_workers of the config)",
    )
    args = parser.parse_args(argv)

    overrides = [*args.set, *CHECKPOINTING.get(args.checkpointing or "", [])]
    cfg = load_config(args.recipe, overrides)
    dtype = compute_dtype(cfg)
    print(common.machine_line())
    print(f"date: {common.now()}; load average before: {common.load_average()}")
    print(f"recipe {args.recipe}; overrides {overrides or 'none'}; compute dtype {dtype}")
    peaks: dict[str, float] = {}
    if args.peak_tflops:
        peaks["given"] = args.peak_tflops * 1e12
    elif jax.default_backend() == "cpu":
        for dt in dict.fromkeys(("float32", dtype)) if args.matmul_size else ():
            name = f"measured {dt} matmul"
            peaks[name] = common.measured_matmul_peak(args.matmul_size, dtype=dt)
            print(f"{name} peak: {peaks[name] / 1e9:.1f} GFLOP/s ({args.matmul_size}² jnp.dot, best of 7)")
        theory, how = common.theoretical_cpu_peak()
        if theory:
            peaks["theoretical fp32"] = theory
            print(f"theoretical fp32 peak: {theory / 1e9:.1f} GFLOP/s = {how}")
    else:
        vendor = common.accelerator_peak(dtype)
        if vendor:
            peaks[f"vendor {dtype}"] = vendor

    r = run(args, cfg)
    step_s, flops = r["step_s"], r["flops"]
    print(
        f"setup (models, state, jit wrapper) {r['setup_s']:.1f} s; pipeline {r['data_s']:.2f} s per host batch "
        f"(one process, not part of the step)"
    )
    print(f"lower {r['lower_s']:.1f} s, compile {r['compile_s']:.1f} s")
    print(f"step: {common.median_ms(r['times'])} over {len(r['times'])} steps; loss after {r['loss']:.4f}")
    print(f"images per step {r['images']}; {r['images'] / step_s:.2f} images/s")
    if r["fed_step_s"]:
        print(
            f"fed by the pipeline (data.num_workers={cfg.data.num_workers}, synthetic source): "
            f"{r['fed_step_s'] * 1e3:.1f} ms per step, {r['images'] / r['fed_step_s']:.2f} images/s"
        )
    if flops:
        print(
            f"XLA cost_analysis: {flops / 1e9:.1f} GFLOP per step, "
            f"transcendentals {r['costs'].get('transcendentals', 0) / 1e9:.2f} G, "
            f"bytes accessed {r['costs'].get('bytes accessed', 0) / 2**30:.2f} GiB; "
            f"achieved {flops / step_s / 1e9:.1f} GFLOP/s"
        )
    analytic = r["analytic_flops"]
    if analytic:
        print(
            f"analytic matmul FLOPs: {analytic['total'] / 1e9:.1f} GFLOP per step "
            f"(backbones {analytic['backbone'] / 1e9:.1f}, heads {analytic['heads'] / 1e9:.1f})"
        )
    for name, peak in peaks.items():
        if flops:
            print(f"MFU vs {name} peak ({peak / 1e9:.1f} GFLOP/s): {flops / step_s / peak:.1%} (XLA FLOPs)", end="")
            if analytic:
                print(f", {analytic['total'] / step_s / peak:.1%} (analytic FLOPs)", end="")
            print()
    mem = r["memory"]
    if mem:
        print("memory_analysis: " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in mem.items()))
        total = (
            mem.get("temp_size_in_bytes", 0) + mem.get("argument_size_in_bytes", 0) + mem.get("output_size_in_bytes", 0)
        )
        print(
            f"  temp + argument + output = {total / 2**30:.2f} GiB; "
            f"minus alias (donated state reused for the output) = {(total - mem.get('alias_size_in_bytes', 0)) / 2**30:.2f} GiB"
        )
    print(f"process peak RSS {r['rss_gib']:.2f} GiB; student parameters {r['n_params'] / 1e6:.2f} M")
    print(f"load average after: {common.load_average()}")

    label = args.label or args.recipe
    mfu = "; ".join(f"{flops / step_s / p:.1%} ({n})" for n, p in peaks.items()) if flops else "n/a"
    mem_gib = (
        (mem.get("temp_size_in_bytes", 0) + mem.get("argument_size_in_bytes", 0) + mem.get("output_size_in_bytes", 0))
        / 2**30
        if mem
        else float("nan")
    )
    print(
        "\n| case | images/step | lower s | compile s | step ms median (min) | images/s | GFLOP/step (XLA) | GFLOP/s | MFU | temp+arg+out GiB |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print(
        f"| {label} | {r['images']} | {r['lower_s']:.1f} | {r['compile_s']:.1f} | "
        f"{step_s * 1e3:.1f} ({min(r['times']) * 1e3:.1f}) | "
        f"{r['images'] / step_s:.2f} | {flops / 1e9 if flops else float('nan'):.1f} | "
        f"{flops / step_s / 1e9 if flops else float('nan'):.1f} | {mfu} | {mem_gib:.2f} |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
