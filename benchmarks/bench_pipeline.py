"""Input-pipeline benchmark (not a test): images/s of the trainer's multi-crop training stream
alone (`data.pipeline.build_train_pipeline`: load → DataAugmentationDINO → batch → iBOT masks),
with no model.

Sources: the built-in `synthetic` one (images rendered on the data path, at the config's
`data.synthetic_image_size` or `--synthetic-size`) and `jpeg`, a folder of JPEG files written
with Pillow into a temporary folder (`--jpeg-size`, default 500×375, about the mean ImageNet
image; quality 90), read by the `folder` source, so that decoding is timed too. Each case is run
with every `--workers` count (0: in this process; n > 0: grain worker processes, `mp_prefetch`).
The first batch (worker start-up, first decodes) is timed apart; the batches read ahead
meanwhile (grain's buffers) are drawn untimed; then `--batches` batches are timed and images/s =
images / seconds.

`--profile` also times the pieces of one sample in this process (decode, crop + resize, flip,
colour jitter, grayscale, blur, solarise, normalise) and of one batch (stacking, iBOT masks) by
wrapping the functions the augmentation calls, over `--profile-samples` samples, with one
reading thread (the trainer's pipeline reads with 2 threads, `num_threads=2`).

    .venv/bin/python benchmarks/bench_pipeline.py --recipe tiny_cpu
    .venv/bin/python benchmarks/bench_pipeline.py --recipe vits16_im1k --set train.batch_size_per_gpu=16 --profile
"""

from __future__ import annotations

import argparse
import collections
import functools
import pickle
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # benchmarks/common.py
from dinov3_jax.configs import Config, load_config
from dinov3_jax.data import augment, pipeline
from dinov3_jax.data import sources as sources_mod
from dinov3_jax.data.sources import make_source
from dinov3_jax.train.main import train_stream


def write_jpegs(folder: Path, count: int, width: int, height: int, seed: int = 0) -> None:
    """`count` JPEGs of natural-image-like content (smooth colour fields, blobs and pixel noise:
    not the near-flat content that compresses to nothing) in one class folder."""
    rng = np.random.default_rng(seed)
    (folder / "class0").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        low = rng.uniform(0, 255, size=(4, 5, 3)).astype(np.uint8)
        field = np.asarray(Image.fromarray(low).resize((width, height), Image.BICUBIC), np.float32)
        mid = rng.normal(0, 30, size=(height // 16, width // 16, 3)).astype(np.float32)
        mid = np.stack(
            [np.asarray(Image.fromarray(mid[..., c], "F").resize((width, height), Image.BICUBIC)) for c in range(3)], -1
        )
        x = field + mid + rng.normal(0, 10, size=(height, width, 3)).astype(np.float32)
        img = Image.fromarray(np.clip(x, 0, 255).astype(np.uint8), "RGB")
        img.save(folder / "class0" / f"{i:05d}.jpg", quality=90)


def build(cfg: Config, source, batch: int, workers: int, threads: int = 2):
    return train_stream(
        cfg, source, per_host_batch=batch, patch_size=cfg.student.patch_size, num_workers=workers, num_threads=threads
    )


# Batches the stream holds ready ahead of the consumer: grain's read-ahead (prefetch_buffer_size=2)
# and, with workers, 2 per worker (per_worker_buffer_size). They fill during the first batch's
# start-up, so they are drawn before the timed batches: the timing is of production.
def read_ahead(workers: int) -> int:
    return 2 + 2 * workers


def throughput(cfg: Config, source, batch: int, workers: int, n_batches: int) -> dict:
    it = iter(build(cfg, source, batch, workers))
    t0 = time.perf_counter()
    next(it)
    first_s = time.perf_counter() - t0
    for _ in range(read_ahead(workers)):
        next(it)
    t0 = time.perf_counter()
    for _ in range(n_batches):
        next(it)
    seconds = time.perf_counter() - t0
    del it
    return {"first_s": first_s, "ips": batch * n_batches / seconds, "batch_s": seconds / n_batches}


# ---------------------------------------------------------------------------------------------
# Profile: where one sample's time goes
# ---------------------------------------------------------------------------------------------

PIECES = {
    # (module or class, function name): label. None of them calls another of them.
    (sources_mod, "decode"): "decode (JPEG → RGB)",
    (sources_mod.SyntheticSource, "__getitem__"): "synthetic render",
    (augment, "to_rgb"): "to_rgb",
    (augment, "crop_resize"): "crop + bicubic resize",
    (augment, "apply_color_jitter"): "colour jitter",
    (augment, "grayscale"): "grayscale",
    (augment, "gaussian_blur"): "gaussian blur",
    (augment, "solarize"): "solarise",
    (augment, "normalize"): "normalise to float32",
    (augment, "resize_square"): "resize_square",
    (pipeline, "collate_masks"): "iBOT masks (per batch)",
}


def profile(cfg: Config, source, batch: int, n_samples: int) -> None:
    totals: dict[str, float] = collections.defaultdict(float)
    counts: dict[str, int] = collections.defaultdict(int)
    originals = {}

    def timed(fn, label):
        @functools.wraps(fn)
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                totals[label] += time.perf_counter() - t0
                counts[label] += 1

        return wrapper

    for (module, name), label in PIECES.items():
        if hasattr(module, name):
            originals[(module, name)] = getattr(module, name)
            setattr(module, name, timed(getattr(module, name), label))
    try:
        n_batches = max(1, n_samples // batch)
        ds = build(cfg, source, batch, 0, threads=1)  # one reading thread: the pieces add up to the wall time
        it = iter(ds)
        next(it)  # warm-up
        totals.clear()
        counts.clear()
        t0 = time.perf_counter()
        for _ in range(n_batches):
            next(it)
        wall = time.perf_counter() - t0
    finally:
        for (module, name), fn in originals.items():
            setattr(module, name, fn)
    images = n_batches * batch
    print(
        f"  profile over {images} images ({n_batches} batches, one process, one reading thread): "
        f"{wall / images * 1e3:.2f} ms per image"
    )
    accounted = 0.0
    for label, t in sorted(totals.items(), key=lambda kv: -kv[1]):
        accounted += t
        print(f"    {label:28} {t / images * 1e3:7.3f} ms/image  {t / wall:6.1%}  ({counts[label]} calls)")
    print(
        f"    {'rest (RNG, stacking, grain)':28} {(wall - accounted) / images * 1e3:7.3f} ms/image  "
        f"{(wall - accounted) / wall:6.1%}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="tiny_cpu")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeat)")
    parser.add_argument("--sources", nargs="+", choices=("synthetic", "jpeg"), default=["synthetic", "jpeg"])
    parser.add_argument("--workers", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--batches", type=int, default=8, help="timed batches per case (after the read-ahead)")
    parser.add_argument("--batch", type=int, help="images per batch (default: train.batch_size_per_gpu)")
    parser.add_argument("--synthetic-size", type=int, help="synthetic image side (default: the config's)")
    parser.add_argument("--jpeg-size", type=int, nargs=2, default=(500, 375), metavar=("W", "H"))
    parser.add_argument("--jpeg-count", type=int, default=256)
    parser.add_argument(
        "--warm-synthetic",
        action="store_true",
        help="render every synthetic item once before timing (the steady state after the first epoch, "
        "when the source keeps its renders; worker processes start with an empty cache of their own)",
    )
    parser.add_argument("--profile", action="store_true", help="time the pieces of a sample (one process)")
    parser.add_argument("--profile-samples", type=int, default=64)
    args = parser.parse_args(argv)

    cfg = load_config(args.recipe, args.set)
    batch = args.batch or cfg.train.batch_size_per_gpu
    c = cfg.crops
    print(common.machine_line())
    print(f"date: {common.now()}; load average before: {common.load_average()}")
    print(
        f"recipe {args.recipe}; overrides {args.set or 'none'}; batch {batch}; crops 2×{c.global_crops_size} + "
        f"{c.local_crops_number}×{c.local_crops_size}; patch {cfg.student.patch_size}"
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_pipeline_") as tmp:
        for kind in args.sources:
            if kind == "synthetic":
                size = args.synthetic_size or cfg.data.synthetic_image_size or 64
                source = make_source("synthetic", None, split="train", num_samples=4096, image_size=size, seed=0)
                what = f"synthetic {size}×{size}"
                if args.warm_synthetic:
                    t0 = time.perf_counter()
                    for i in range(len(source)):
                        source[i]
                    cached = getattr(source, "_cache", None)
                    state = f"{len(cached)} of {len(source)} kept" if cached is not None else "this source keeps none"
                    print(f"rendered the {len(source)} synthetic items in {time.perf_counter() - t0:.1f} s ({state})")
                    what += ", renders warm" if cached else ""
            else:
                w, h = args.jpeg_size
                t0 = time.perf_counter()
                write_jpegs(Path(tmp) / "jpeg", args.jpeg_count, w, h)
                kb = sum(p.stat().st_size for p in (Path(tmp) / "jpeg").rglob("*.jpg")) / args.jpeg_count / 1024
                print(f"wrote {args.jpeg_count} JPEGs {w}×{h} ({kb:.0f} KiB each) in {time.perf_counter() - t0:.1f} s")
                source = make_source("folder", Path(tmp) / "jpeg", split="train")
                what = f"JPEG {w}×{h}"
            if args.profile:
                print(f"{what}:")
                # A pickled copy (as a worker gets: without the renders kept so far), so that the
                # profile does not warm the source the throughput runs read.
                profiled = source if args.warm_synthetic else pickle.loads(pickle.dumps(source))
                profile(cfg, profiled, batch, args.profile_samples)
            for workers in args.workers:
                r = throughput(cfg, source, batch, workers, args.batches)
                print(
                    f"{what}, {workers} workers: {r['ips']:.1f} images/s ({r['batch_s']:.2f} s per batch of {batch}; "
                    f"first batch {r['first_s']:.2f} s); load {common.load_average()}"
                )
                rows.append((what, workers, r))
    print(f"load average after: {common.load_average()}")
    print("\n| recipe | source | workers | images/s | s per batch | first batch s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for what, workers, r in rows:
        print(f"| {args.recipe} | {what} | {workers} | {r['ips']:.1f} | {r['batch_s']:.2f} | {r['first_s']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
