"""Learning on small compute (not a test): trains a recipe for a step budget with periodic k-NN of
the teacher, for one or more seeds, and records each run (k-NN over training seconds, the final
k-NN beside raw pixels and the initialisation, wall time, machine load) as a line of
`benchmarks/small_compute.jsonl`; `plot` draws k-NN against training time for named runs.

    .venv/bin/python benchmarks/small_compute.py run base --steps 1500 --seeds 0 1
    .venv/bin/python benchmarks/small_compute.py run p8 --steps 1500 --set student.patch_size=8
    .venv/bin/python benchmarks/small_compute.py run final --steps 6000 --full-knn
    .venv/bin/python benchmarks/small_compute.py plot base p4 --out benchmarks/small_compute.png
    .venv/bin/python benchmarks/small_compute.py digits runs/digits     # needs scikit-learn
    .venv/bin/python benchmarks/small_compute.py run digits --steps 1000 --set data.source=folder \
        data.path=runs/digits data.knn_train_samples=null data.knn_val_samples=null

`--full-knn` also evaluates the final teacher on the whole train/test split (Fashion-MNIST: the
60k/10k protocol of raw pixels' 85.6%), besides the run's own k-NN subset. Training seconds
exclude the periodic k-NN (the trainer's `train_seconds`) and include compilation.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # benchmarks/common.py
from dinov3_jax.configs import load_config
from dinov3_jax.eval.knn import KnnEvaluator
from dinov3_jax.train.main import train
from dinov3_jax.weights import load_backbone

RESULTS = Path(__file__).with_name("small_compute.jsonl")


def knn_curve(run_dir: Path, key: str) -> list[tuple[float, float]]:
    """(training seconds, k-NN top-1) of every periodic evaluation in the run's metrics.jsonl.
    `train_seconds` counts one session; a resumed run's clock restarts, so later sessions are
    offset by the seconds of the earlier ones."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    curve, offset, last = [], 0.0, 0.0
    for r in rows:
        if "train_seconds" not in r:
            continue
        if r["train_seconds"] < last:  # a new session
            offset += last
        last = r["train_seconds"]
        if key in r:
            curve.append((offset + last, r[key]))
    return curve


def run(args: argparse.Namespace) -> None:
    for seed in args.seeds:
        out = Path(args.runs) / f"{args.name}-s{seed}"
        overrides = [
            f"runtime.max_steps={args.steps}",
            f"train.seed={seed}",
            f"train.output_dir={out}",
            f"runtime.knn_every_steps={args.knn_every}",
            *args.overrides,
        ]
        # The schedules span the budget: optim.epochs "epochs" of steps / epochs steps.
        epochs = load_config(args.recipe, args.overrides).optim.epochs
        cfg = load_config(args.recipe, [f"train.OFFICIAL_EPOCH_LENGTH={max(1, args.steps // epochs)}", *overrides])
        load_before = os.getloadavg()
        result = train(cfg, progress=False)
        key = f"top1@{max(cfg.runtime.knn_k)}"
        curve = knn_curve(out, f"knn/{key}")
        record = {
            "name": args.name,
            "recipe": args.recipe,
            "seed": seed,
            "steps": args.steps,
            "overrides": args.overrides,
            # The training seconds at the last evaluation (a rerun of a finished run only evaluates).
            "train_seconds": round(curve[-1][0] if curve else result["seconds"], 1),
            "knn": result["knn_teacher"][key],
            "raw_pixels": result["knn_raw_pixels"][key],
            "random_init": result["knn_random_init"][key],
            "curve": curve,
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "machine": f"{common.cpu_model()}, {common.usable_cores()} cores, jax {jax.__version__}",
            "load_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        }
        if args.full_knn:  # the whole train / test split
            whole = dataclasses.replace(
                cfg, data=dataclasses.replace(cfg.data, knn_train_samples=None, knn_val_samples=None)
            )
            evaluator = KnnEvaluator(whole)
            record["full_knn"] = evaluator(load_backbone(weights=result["teacher_backbone"]))[key]
            record["full_raw_pixels"] = evaluator.raw_pixels()[key]
        with RESULTS.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps({k: v for k, v in record.items() if k != "curve"}))


def digits(args: argparse.Namespace) -> None:
    """Writes scikit-learn's bundled handwritten digits (1797 images of 8x8 px, 17 grey levels) as
    PNGs in `OUT/{train,val}/<digit>/`, split 75 / 25 per class with a fixed seed: a second
    labelled image set that needs no download, read by the `folder` source as a user's own
    folder would be."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise SystemExit("the digits set comes with scikit-learn: .venv/bin/pip install scikit-learn") from err
    import numpy as np
    from PIL import Image

    out = Path(args.out)
    if out.exists():
        raise SystemExit(f"{out} exists; not overwriting it")
    data = load_digits()
    images = np.rint(data.images * (255 / 16)).astype(np.uint8)  # [1797, 8, 8], 0..16 -> 0..255
    rng = np.random.default_rng(0)
    for label in range(10):
        index = rng.permutation(np.flatnonzero(data.target == label))
        n_val = len(index) // 4
        for split, part in (("val", index[:n_val]), ("train", index[n_val:])):
            folder = out / split / str(label)
            folder.mkdir(parents=True)
            for i in part:
                Image.fromarray(images[i], "L").save(folder / f"{i:04d}.png")
    print(f"wrote {len(images)} digits to {out}/train and {out}/val")


def plot(args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    runs = [r for name in args.names for r in records if r["name"] == name]
    colours = plt.get_cmap("tab10" if len(runs) <= 10 else "tab20")
    for i, r in enumerate(runs):
        t, k = zip(*r["curve"]) if r["curve"] else ((), ())
        label = f"{r['name']} (seed {r['seed']})"
        ax.plot([s / 60 for s in t], k, marker="o", markersize=3, color=colours(i), label=label)
    raw = next((r["raw_pixels"] for r in records if r["name"] in args.names), None)
    if raw is not None:
        ax.axhline(raw, color="gray", linestyle="--", linewidth=1, label=f"raw pixels ({raw:.1f})")
    ax.set_xlabel("training minutes (2 CPU cores; k-NN evaluations excluded)")
    ax.set_ylabel("k-NN top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train and record")
    r.add_argument("name")
    r.add_argument("--recipe", default="fmnist_cpu")
    r.add_argument("--steps", type=int, default=1500)
    r.add_argument("--seeds", type=int, nargs="+", default=[0])
    r.add_argument("--knn-every", type=int, default=250)
    r.add_argument("--runs", default="runs/small_compute", help="folder of the run folders")
    r.add_argument("--full-knn", action="store_true", help="also k-NN on the whole train/test split")
    r.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides")
    r.set_defaults(run=run)
    p = sub.add_parser("plot", help="k-NN against training minutes of named runs")
    p.add_argument("names", nargs="+")
    p.add_argument("--out", default=str(Path(__file__).with_name("small_compute.png")))
    p.set_defaults(run=plot)
    d = sub.add_parser("digits", help="write scikit-learn's digits as an image folder (train/ and val/)")
    d.add_argument("out")
    d.set_defaults(run=digits)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
