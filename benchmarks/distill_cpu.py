"""Distillation benchmark (not a test): the default job's trained teacher (tiny_cpu, a vit_tiny/8)
distilled into vit_nano (32 wide, 2 blocks: about 5× fewer backbone parameters), against the
teacher and against the same student trained by self-supervision alone for the same steps; then
two students at once (vit_nano and vit_nano with an MLP ratio of 2, 7× smaller than the teacher)
from one teacher pass, against each distilled alone.

Printed and written to OUT/summary.json: k-NN top-1 of each model on the run's k-NN split (the
in-training evaluator), wall seconds of each run, the ratios the target is about (the distilled
student's k-NN / the teacher's, target ≥ 0.95, and its wall time / the teacher's, target < 1,
for the teacher's 400 steps and for half of them), and the seconds of one compiled training step
on one fixed batch: the two-student step against the sum of the two single-student steps. Every
run resumes from its folder, so a second call only re-times the steps.

    .venv/bin/python benchmarks/distill_cpu.py --out runs/distill_bench
    .venv/bin/python benchmarks/distill_cpu.py --data fashion_mnist --out runs/distill_fmnist
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time
from pathlib import Path

import jax
import yaml
from flax import nnx

from dinov3_jax import parallel
from dinov3_jax.configs import Config, apply_overrides, load_config
from dinov3_jax.configs.schema import Student, global_batch_size, schedule_steps, source_kwargs
from dinov3_jax.data.pipeline import build_train_pipeline
from dinov3_jax.data.sources import make_source
from dinov3_jax.train.main import device_batch, setup, train

DATA = {
    "synthetic": [],
    # The CPU recipe on 28×28 Fashion-MNIST (as benchmarks/fashion_mnist_knn.py), a 10k/2k k-NN split.
    "fashion_mnist": [
        "data.source=fashion_mnist",
        "data.num_samples=null",
        "data.knn_train_samples=10000",
        "data.knn_val_samples=2000",
    ],
}
STUDENT = ["student.arch=vit_nano"]
# The two students of the multi-student run, as their files set them (the FFN ratio is honoured:
# compat.ignore_student_ffn_ratio=false, a key the students share).
STUDENTS = {
    "nano": {"student": {"arch": "vit_nano"}},
    "nano_mlp2": {"student": {"arch": "vit_nano", "ffn_ratio": 2.0}},
}
HONOUR_FFN_RATIO = ["compat.ignore_student_ffn_ratio=false"]


def backbone_params(*overrides: str) -> int:
    from dinov3_jax.configs import student_vit_config
    from dinov3_jax.models.vit import DinoVisionTransformer

    vit = student_vit_config(load_config("tiny_cpu", list(overrides)))
    model = nnx.eval_shape(lambda: DinoVisionTransformer(vit, rngs=nnx.Rngs(0)))
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def multi_config(out: Path, overrides: list[str]) -> Config:
    """The two-student run: tiny_cpu with every student's architecture left to its file (a key
    the run sets wins over the students' files, as upstream: tiny_cpu's vit_tiny would)."""
    listed = []
    for name, keys in STUDENTS.items():
        (out / f"{name}.yaml").write_text(yaml.safe_dump(keys))
        listed.append(f"{{name: {name}, config_path: {out / name}.yaml}}")
    cfg = load_config(
        "tiny_cpu", [*overrides, "multidistillation.enabled=true", f"multidistillation.students=[{', '.join(listed)}]"]
    )
    return dataclasses.replace(cfg, student=dataclasses.replace(cfg.student, arch=Student().arch))


def run(name: str, out: Path, cfg: Config) -> dict:
    """The run's result (from its result.json when it is already complete) and its wall time."""
    folder = out / name
    done = folder / "result.json"
    if done.is_file() and (folder / "wall.json").is_file():
        return json.loads(done.read_text()) | json.loads((folder / "wall.json").read_text())
    start = time.perf_counter()
    result = train(apply_overrides(cfg, [f"train.output_dir={folder}"]), progress=False)
    wall = {"wall_seconds": round(time.perf_counter() - start, 1)}
    (folder / "wall.json").write_text(json.dumps(wall) + "\n")
    return {k: v for k, v in result.items() if k != "state"} | wall


def step_seconds(cfg: Config, repeats: int = 30) -> float:
    """Median wall seconds of one compiled training step of `cfg` (after two warm-up steps), all
    on the run's first batch, which is decoded once: the data pipeline is not timed."""
    mesh = parallel.make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
    batch = global_batch_size(cfg, jax.device_count())
    run = setup(cfg, mesh, global_batch=batch, steps=schedule_steps(cfg))
    source = make_source(cfg.data.source, cfg.data.path, split="train", **source_kwargs(cfg, cfg.data.num_samples))
    host = next(iter(build_train_pipeline(source, cfg=cfg, per_host_batch=batch, patch_size=run.mask_stride)))
    del host["skipped_from"], host["n_skipped"]
    placed = device_batch(host, mesh)
    state, schedules, times = run.state, run.schedule_values(1), []
    for i in range(repeats + 2):
        start = time.perf_counter()
        state, metrics = run.step_fn(state, placed, schedules)
        jax.block_until_ready((state, metrics))
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=sorted(DATA), default="synthetic")
    parser.add_argument("--out", default="runs/distill_bench", help="output folder (runs resume from it)")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    args = parser.parse_args()
    out = Path(args.out)
    # k-NN only at the end, so that the wall times are those of training.
    common = [*DATA[args.data], "runtime.knn_every_steps=0", *args.overrides]
    tiny_cpu = lambda *keys: load_config("tiny_cpu", [*common, *keys])  # noqa: E731
    teacher = run("teacher", out, tiny_cpu())
    distill = ["distillation.enabled=true", f"distillation.checkpoint_path={out / 'teacher'}"]
    nano_cfg = tiny_cpu(*STUDENT, *distill)
    distilled = run("nano_distilled", out, nano_cfg)
    ssl = run("nano_ssl", out, tiny_cpu(*STUDENT))
    # Half the steps (200 instead of 400, warm-up halved too): the steps here are bound by the CPU
    # data pipeline (multi-crop augmentation), so a smaller student alone cannot make a step cheaper.
    distilled_short = run(
        "nano_distilled_half", out, tiny_cpu(*STUDENT, "optim.epochs=2", "optim.warmup_epochs=1", *distill)
    )

    # Two students at once, and the second one alone (the first alone is `distilled`).
    nano_mlp2 = [*STUDENT, "student.ffn_ratio=2", *HONOUR_FFN_RATIO]
    mlp2_cfg = tiny_cpu(*nano_mlp2, *distill)
    distilled_mlp2 = run("nano_mlp2_distilled", out, mlp2_cfg)
    multi_cfg = multi_config(out, [*common, *distill, *HONOUR_FFN_RATIO])
    multi = run("two_students", out, multi_cfg)
    timed = {"two_students": multi_cfg, "nano": nano_cfg, "nano_mlp2": mlp2_cfg}
    steps = {name: step_seconds(cfg) for name, cfg in timed.items()}

    k = next(key for key in teacher["knn_teacher"] if key.startswith("top1"))
    knn = lambda result, name="": result[f"knn_student_{name}" if name else "knn_teacher"][k]  # noqa: E731
    nano, mlp2 = backbone_params(*STUDENT), backbone_params(*nano_mlp2)
    rows = [
        ("teacher vit_tiny (self-supervised)", knn(teacher), teacher["wall_seconds"], backbone_params()),
        ("vit_nano distilled from it", knn(distilled), distilled["wall_seconds"], nano),
        ("vit_nano self-supervised alone", knn(ssl), ssl["wall_seconds"], nano),
        ("vit_nano distilled, half the steps", knn(distilled_short), distilled_short["wall_seconds"], nano),
        ("vit_nano MLP 2 distilled", knn(distilled_mlp2), distilled_mlp2["wall_seconds"], mlp2),
        ("two students at once: vit_nano", knn(multi, "nano"), multi["wall_seconds"], nano),
        ("two students at once: vit_nano MLP 2", knn(multi, "nano_mlp2"), multi["wall_seconds"], mlp2),
    ]
    print(f"{'model':38} {'params':>9} {'k-NN ' + k:>14} {'wall s':>8}")
    for label, value, wall, params in rows:
        print(f"{label:38} {params:9,} {value:14.1f} {wall:8.0f}")
    print("step seconds (one fixed batch): " + ", ".join(f"{name} {t * 1e3:.1f} ms" for name, t in steps.items()))
    ratios = {
        "distilled_knn_over_teacher_knn": knn(distilled) / knn(teacher),
        "distilled_wall_over_teacher_wall": distilled["wall_seconds"] / teacher["wall_seconds"],
        "distilled_knn_over_ssl_knn": knn(distilled) / knn(ssl),
        "half_steps_distilled_knn_over_teacher_knn": knn(distilled_short) / knn(teacher),
        "half_steps_distilled_wall_over_teacher_wall": distilled_short["wall_seconds"] / teacher["wall_seconds"],
        "two_students_wall_over_sum_of_single_walls": multi["wall_seconds"]
        / (distilled["wall_seconds"] + distilled_mlp2["wall_seconds"]),
        "two_students_step_over_sum_of_single_steps": steps["two_students"] / (steps["nano"] + steps["nano_mlp2"]),
    }
    for name, value in ratios.items():
        print(f"{name}: {value:.3f}")
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}"
    summary = {"data": args.data, "machine": machine, "metric": k, "ratios": ratios, "step_seconds": steps}
    summary["runs"] = {label: {"knn": value, "wall_seconds": wall} for label, value, wall, _ in rows}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
