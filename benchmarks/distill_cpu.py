"""Distillation benchmark (not a test): the default job's trained teacher (tiny_cpu, a vit_tiny/8)
distilled into vit_nano (32 wide, 2 blocks: about 5× fewer backbone parameters), against the
teacher and against the same student trained by self-supervision alone for the same steps.

Printed and written to OUT/summary.json: k-NN top-1 of each model on the run's k-NN split (the
in-training evaluator), wall seconds of each run, and the ratios the target is about: the
distilled student's k-NN / the teacher's (target ≥ 0.95) and its wall time / the teacher's
(target < 1), for the teacher's 400 steps and for half of them. Every run resumes from its
folder, so a second call only prints.

    .venv/bin/python benchmarks/distill_cpu.py --out runs/distill_bench
    .venv/bin/python benchmarks/distill_cpu.py --data fashion_mnist --out runs/distill_fmnist
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import jax
from flax import nnx

from dinov3_jax.configs import load_config
from dinov3_jax.train.main import train

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


def backbone_params(arch: str) -> int:
    from dinov3_jax.configs import student_vit_config
    from dinov3_jax.models.vit import DinoVisionTransformer

    vit = student_vit_config(load_config("tiny_cpu", [f"student.arch={arch}"]))
    model = nnx.eval_shape(lambda: DinoVisionTransformer(vit, rngs=nnx.Rngs(0)))
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def run(name: str, out: Path, overrides: list[str]) -> dict:
    """The run's result (from its result.json when it is already complete) and its wall time."""
    folder = out / name
    done = folder / "result.json"
    if done.is_file() and (folder / "wall.json").is_file():
        return json.loads(done.read_text()) | json.loads((folder / "wall.json").read_text())
    start = time.perf_counter()
    result = train(load_config("tiny_cpu", [*overrides, f"train.output_dir={folder}"]), progress=False)
    wall = {"wall_seconds": round(time.perf_counter() - start, 1)}
    (folder / "wall.json").write_text(json.dumps(wall) + "\n")
    return {k: v for k, v in result.items() if k != "state"} | wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=sorted(DATA), default="synthetic")
    parser.add_argument("--out", default="runs/distill_bench", help="output folder (runs resume from it)")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    args = parser.parse_args()
    out = Path(args.out)
    # k-NN only at the end, so that the wall times are those of training.
    common = [*DATA[args.data], "runtime.knn_every_steps=0", *args.overrides]
    teacher = run("teacher", out, common)
    distilled = run(
        "nano_distilled",
        out,
        [*common, *STUDENT, "distillation.enabled=true", f"distillation.checkpoint_path={out / 'teacher'}"],
    )
    ssl = run("nano_ssl", out, [*common, *STUDENT])
    # Half the steps (200 instead of 400, warm-up halved too): the steps here are bound by the CPU
    # data pipeline (multi-crop augmentation), so a smaller student alone cannot make a step cheaper.
    short = ["optim.epochs=2", "optim.warmup_epochs=1"]
    distilled_short = run(
        "nano_distilled_half",
        out,
        [*common, *STUDENT, *short, "distillation.enabled=true", f"distillation.checkpoint_path={out / 'teacher'}"],
    )

    k = next(key for key in teacher["knn_teacher"] if key.startswith("top1"))
    rows = [
        ("teacher vit_tiny (self-supervised)", teacher, backbone_params("vit_tiny")),
        ("vit_nano distilled from it", distilled, backbone_params("vit_nano")),
        ("vit_nano self-supervised alone", ssl, backbone_params("vit_nano")),
        ("vit_nano distilled, half the steps", distilled_short, backbone_params("vit_nano")),
    ]
    print(f"{'model':38} {'params':>9} {'k-NN ' + k:>14} {'wall s':>8}")
    for label, result, params in rows:
        print(f"{label:38} {params:9,} {result['knn_teacher'][k]:14.1f} {result['wall_seconds']:8.0f}")
    ratios = {
        "distilled_knn_over_teacher_knn": distilled["knn_teacher"][k] / teacher["knn_teacher"][k],
        "distilled_wall_over_teacher_wall": distilled["wall_seconds"] / teacher["wall_seconds"],
        "distilled_knn_over_ssl_knn": distilled["knn_teacher"][k] / ssl["knn_teacher"][k],
        "half_steps_distilled_knn_over_teacher_knn": distilled_short["knn_teacher"][k] / teacher["knn_teacher"][k],
        "half_steps_distilled_wall_over_teacher_wall": distilled_short["wall_seconds"] / teacher["wall_seconds"],
    }
    for name, value in ratios.items():
        print(f"{name}: {value:.3f}")
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}"
    summary = {"data": args.data, "machine": machine, "metric": k, "ratios": ratios}
    summary["runs"] = {label: {"knn": r["knn_teacher"][k], "wall_seconds": r["wall_seconds"]} for label, r, _ in rows}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
