"""Quality benchmark (not a test): DINOv3 pretraining on Fashion-MNIST for a fixed step budget,
then k-NN top-1 of the trained teacher on the 10k test images against k-NN on raw 28×28 pixels
(the same cosine / T = 0.07 / weighted-vote protocol; raw pixels reach about 85%).

Needs Debian's `dataset-fashion-mnist` package (apt-get install dataset-fashion-mnist).

    .venv/bin/python benchmarks/fashion_mnist_knn.py --steps 1200 --out runs/fmnist
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import jax
import numpy as np

from dinov3_jax.configs import load_config
from dinov3_jax.data.sources import FashionMNISTSource
from dinov3_jax.eval.knn import knn_accuracy
from dinov3_jax.train.main import format_result, train

# The CPU recipe adapted to 28×28 grayscale images: 32 px global crops (8×8 patches of 4 px),
# 16 px local crops, no horizontal-flip change (clothes are left/right symmetric enough).
OVERRIDES = [
    "data.source=fashion_mnist",
    "data.num_samples=null",
    "data.knn_train_samples=null",
    "data.knn_val_samples=null",
    "crops.global_crops_size=32",
    "crops.local_crops_size=16",
]


def raw_pixel_knn(ks) -> dict[str, float]:
    train, test = FashionMNISTSource(split="train"), FashionMNISTSource(split="test")

    def arrays(src):
        x = np.stack(
            [np.asarray(src[i][0], np.float32).reshape(28, 28, -1)[..., 0].ravel() / 255 for i in range(len(src))]
        )
        y = np.array([src[i][1] for i in range(len(src))])
        return x, y

    return knn_accuracy(*arrays(train), *arrays(test), ks=ks, num_classes=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1200, help="training steps (the budget)")
    parser.add_argument("--epoch-length", type=int, default=100, help="steps per schedule 'epoch'")
    parser.add_argument("--out", default="runs/fashion_mnist", help="output folder (resumes if it has checkpoints)")
    parser.add_argument("overrides", nargs="*", help="extra key=value config overrides")
    args = parser.parse_args()
    epochs = max(1, args.steps // args.epoch_length)
    cfg = load_config(
        "tiny_cpu",
        [
            *OVERRIDES,
            f"train.OFFICIAL_EPOCH_LENGTH={args.epoch_length}",
            f"optim.epochs={epochs}",
            f"runtime.max_steps={args.steps}",
            "runtime.knn_every_steps=0",
            f"train.output_dir={args.out}",
            *args.overrides,
        ],
    )
    start = time.perf_counter()
    result = train(cfg)
    minutes = (time.perf_counter() - start) / 60
    raw = raw_pixel_knn(cfg.runtime.knn_k)
    print(format_result(result))
    print(
        "raw 28x28 pixels (full 60k/10k): " + ", ".join(f"{k} {v:.1f}" for k, v in raw.items() if k.startswith("top1"))
    )
    summary = {
        "steps": args.steps,
        "minutes": round(minutes, 1),
        "machine": f"{platform.processor() or platform.machine()}, {jax.device_count()} x {jax.devices()[0].platform}",
        "teacher": result["knn_teacher"],
        "random_init": result["knn_random_init"],
        "raw_pixels_eval_resolution": result["knn_raw_pixels"],
        "raw_pixels_28x28": raw,
    }
    Path(args.out, "fashion_mnist_knn.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
