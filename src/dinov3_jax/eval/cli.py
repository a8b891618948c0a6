"""`dinov3-jax eval knn|linear|logreg`: global-feature probes of a frozen backbone (RECIPE.md §8).

Features of the train and val sources are extracted once (sharded over the available devices)
and cached on disk, keyed by model, weights, data and transform, so several probes of the same
backbone share them. Results are printed as a table and, with --out, written as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from dinov3_jax import backbone as front_door
from dinov3_jax.eval.knn import DEFAULT_KS
from dinov3_jax.eval.linear import DEFAULT_LRS

SOURCE_HELP = """\
SOURCE syntax (--train uses the source's train split, --val its test/val split):
  folder:PATH          images in class subfolders (PATH/<class>/*.jpg); when PATH has
                       train/ and val/ (or test/) subfolders, the split picks one
  filelist:FILE        a text file of 'path<TAB>label' lines
  fashion_mnist        Fashion-MNIST idx files of the Debian package dataset-fashion-mnist
  fashion_mnist:DIR    ... or from DIR
  synthetic            the built-in labelled shapes dataset (1000 images per split)
  synthetic:N          ... with N images
"""

EXAMPLES = """\
examples:
  dinov3-jax eval knn --model dinov3_vits16 --weights dinov3_vits16_pretrain_lvd1689m-08c60483.pth \\
      --train folder:/data/imagenet/train --val folder:/data/imagenet/val --out knn.json
  dinov3-jax eval linear --model dinov3_vit_tiny --train synthetic:2000 --val synthetic:500 --resolution 64
  dinov3-jax eval logreg --model dinov3_vits16 --weights w.pth --train fashion_mnist --val fashion_mnist
"""


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    kind: str
    path: str | None = None
    num_samples: int | None = None
    text: str = ""


_KINDS = {
    "folder": "folder",
    "imagefolder": "folder",
    "filelist": "filelist",
    "fashion_mnist": "fashion_mnist",
    "fashionmnist": "fashion_mnist",
    "fmnist": "fashion_mnist",
    "synthetic": "synthetic",
}


def parse_source(text: str) -> SourceSpec:
    """`folder:PATH`, `filelist:FILE`, `fashion_mnist[:DIR]` or `synthetic[:N]` (see SOURCE_HELP)."""
    head, sep, rest = text.partition(":")
    kind = _KINDS.get(head.strip().lower().replace("-", "_"))
    problem = None
    if kind is None:
        problem = f"unknown kind {head!r}"
    elif kind in ("folder", "filelist") and not rest:
        problem = f"{kind} needs a path ({kind}:PATH)"
    elif kind == "synthetic" and sep:
        if not rest.isdigit() or int(rest) < 1:
            problem = f"synthetic:N needs a positive number of images, got {rest!r}"
        else:
            return SourceSpec(kind, None, int(rest), text)
    if problem:
        raise argparse.ArgumentTypeError(
            f"bad SOURCE {text!r}: {problem}; expected folder:PATH, filelist:FILE, fashion_mnist[:DIR] or synthetic[:N]"
        )
    return SourceSpec(kind, rest or None, None, text)


def default_resolution(patch_size: int) -> int:
    """224 px (the official evaluation size) rounded to a multiple of the patch size."""
    return patch_size * max(1, round(224 / patch_size))


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dinov3_jax" / "features"


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------


def _common(parser: argparse.ArgumentParser) -> None:
    front_door.add_arguments(parser)
    parser.add_argument("--train", type=parse_source, required=True, metavar="SOURCE", help="training images")
    parser.add_argument("--val", type=parse_source, required=True, metavar="SOURCE", help="evaluation images")
    parser.add_argument(
        "--resolution", type=int, help="input size in px (default: 224 rounded to a multiple of the patch size)"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    parser.add_argument(
        "--cache-dir", type=Path, help=f"feature cache folder (default {default_cache_dir()}, or $XDG_CACHE_HOME)"
    )
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write the feature cache")
    parser.add_argument("--out", type=Path, help="write the results as JSON to this file")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random init and of the probes (default 0)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n")[0] + "\n\n" + SOURCE_HELP + "\n" + EXAMPLES
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    sub = parser.add_subparsers(dest="probe", required=True, metavar="{knn,linear,logreg}")
    kw = {"formatter_class": argparse.RawDescriptionHelpFormatter, "epilog": SOURCE_HELP}

    knn = sub.add_parser(
        "knn",
        help="weighted k-NN on L2-normalised CLS features (§8.1)",
        description="Weighted k-NN (cosine similarity, softmax(sim / T) votes of the nearest neighbours) "
        "on the final-normed CLS features; top-1 and top-5 per k.",
        **kw,
    )
    _common(knn)
    knn.add_argument(
        "--ks", type=int, nargs="+", default=list(DEFAULT_KS), help="neighbour counts (default 10 20 100 200)"
    )
    knn.add_argument("--temperature", type=float, default=0.07, help="vote temperature T (default 0.07)")

    lin = sub.add_parser(
        "linear",
        help="linear probe over a learning-rate grid (§8.2)",
        description="Linear classifiers on [CLS of the last N blocks, mean patch token], one per learning "
        "rate (scaled by batch/256), trained jointly with SGD momentum 0.9 and a cosine schedule; the best "
        "on --val is reported.",
        **kw,
    )
    _common(lin)
    lin.add_argument("--lrs", type=float, nargs="+", default=list(DEFAULT_LRS), help="learning-rate grid (official)")
    lin.add_argument("--epochs", type=int, default=10, help="training epochs over the train features (default 10)")
    lin.add_argument("--iterations", type=int, help="training iterations (overrides --epochs)")
    lin.add_argument("--probe-batch-size", type=int, default=128, help="features per SGD step (default 128)")
    lin.add_argument("--eval-every", type=int, help="validate every this many iterations (default: each epoch)")
    lin.add_argument("--n-last-blocks", type=int, default=1, help="CLS tokens of the last N blocks (default 1)")
    lin.add_argument("--no-avgpool", action="store_true", help="leave out the average-pooled patch tokens")

    lr = sub.add_parser(
        "logreg",
        help="L2-regularised logistic regression with a C sweep (§8.3)",
        description="Multinomial logistic regression (L-BFGS) on the final-normed CLS features; C is chosen "
        "on 10% of each training class, the model refitted on all of --train and evaluated on --val.",
        **kw,
    )
    _common(lr)
    lr.add_argument("--Cs", type=float, nargs="+", help="explicit C values (default: 10^linspace(-6, 5, --c-steps))")
    lr.add_argument("--c-steps", type=int, default=45, help="number of C values of the default sweep (default 45)")
    lr.add_argument("--max-iter", type=int, default=1000, help="L-BFGS iterations per fit (default 1000)")
    lr.add_argument("--l2-normalize", action="store_true", help="L2-normalise the features first")


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


def _build_source(spec: SourceSpec, split: str, resolution: int):
    from dinov3_jax.data.sources import make_source

    kw: dict[str, Any] = {}
    if spec.kind == "synthetic":
        kw["image_size"] = resolution
    return make_source(spec.kind, spec.path, split, num_samples=spec.num_samples, **kw)


def _print_table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    cells = [header] + [[f"{v:.2f}" if isinstance(v, float) else str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(title)
    for i, row in enumerate(cells):
        print("  " + "  ".join(c.rjust(w) for c, w in zip(row, widths)))
        if i == 0:
            print("  " + "  ".join("-" * w for w in widths))


def check_dropped(spec: SourceSpec, flag: str, source, skipped: dict[int, str]) -> None:
    """Reports the unreadable images a probe leaves out, per class, and refuses when a class
    loses all of its images (its accuracy would silently leave the class out)."""
    if not skipped:
        return
    labels = np.asarray(getattr(source, "labels", np.full(len(source), -1)))[: len(source)]
    names = list(source.class_names) or [str(c) for c in range(int(labels.max()) + 1)]
    name = lambda c: names[c] if 0 <= c < len(names) else "unlabelled"  # noqa: E731
    dropped = np.bincount(labels[list(skipped)] + 1, minlength=len(names) + 1)[1:]
    total = np.bincount(labels[labels >= 0], minlength=len(names))
    per_class = ", ".join(f"{name(c)} {n} of {total[c]}" for c, n in enumerate(dropped) if n)
    print(f"{flag} {spec.text}: {len(skipped)} unreadable images left out ({per_class}):", file=sys.stderr)
    for reason in list(skipped.values())[:10]:
        print(f"  {reason}", file=sys.stderr)
    if len(skipped) > 10:
        print(f"  ... and {len(skipped) - 10} more", file=sys.stderr)
    lost = [name(c) for c in range(len(total)) if total[c] and dropped[c] == total[c]]
    if lost:
        raise ValueError(
            f"{flag} {spec.text}: every image of class {', '.join(map(repr, lost))} is unreadable; the probe would "
            "leave the class out and report an accuracy over the others. Repair or remove those files."
        )


def run(args: argparse.Namespace) -> int:
    from dinov3_jax.backbone import Outputs
    from dinov3_jax.data.images import ResizeCrop
    from dinov3_jax.eval.extract import extract
    from dinov3_jax.models.registry import get_spec, stride_of

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")

    def check_resolution(stride: int) -> int:
        resolution = args.resolution or default_resolution(stride)
        if resolution < stride or resolution % stride:
            raise ValueError(f"--resolution {resolution} must be a positive multiple of the patch size {stride}")
        return resolution

    def sources_at(resolution: int):
        train_src = _build_source(args.train, "train", resolution)
        val_src = _build_source(args.val, "test", resolution)
        if not train_src.num_classes:
            raise ValueError(f"--train {args.train.text}: the images have no labels (class subfolders)")
        if train_src.class_names and val_src.class_names and list(train_src.class_names) != list(val_src.class_names):
            raise ValueError(
                f"--train {args.train.text} and --val {args.val.text} have different classes "
                f"({len(train_src.class_names)} vs {len(val_src.class_names)})"
            )
        return train_src, val_src

    # With a model name, the sources are checked before any weights are read.
    early = sources_at(check_resolution(stride_of(get_spec(args.model).config))) if args.model else None
    backbone = front_door.from_args(args, "eval", seed=args.seed)
    resolution = check_resolution(backbone.stride)
    train_src, val_src = early or sources_at(resolution)

    probe = args.probe
    # Every probe extracts the linear-probe input too, so k-NN and the linear probe share one cache.
    request = Outputs(linear_blocks=getattr(args, "n_last_blocks", 1), avgpool=not getattr(args, "no_avgpool", False))
    # §8.3: logistic regression resizes straight to the resolution (no 256/224 resize).
    transform = ResizeCrop(resolution, resolution if probe == "logreg" else resolution * 256 // 224)
    cache_dir = None if args.no_cache else (args.cache_dir or default_cache_dir())
    feats = {}
    start = time.perf_counter()
    for split, src in (("train", train_src), ("val", val_src)):
        feats[split] = extract(
            backbone,
            src,
            transform=transform,
            outputs=request,
            batch_size=args.batch_size,
            cache_dir=cache_dir,
            progress=sys.stderr.isatty(),
        )
        check_dropped(getattr(args, split), f"--{split}", src, feats[split].skipped)
    extract_s = time.perf_counter() - start
    train, val = feats["train"], feats["val"]
    if (val.labels < 0).any():
        raise ValueError(f"--val {args.val.text}: the images have no labels (class subfolders)")
    num_classes = int(max(train_src.num_classes, train.labels.max() + 1, val.labels.max() + 1))

    start = time.perf_counter()
    title = (
        f"{probe} · {backbone.description} · train {args.train.text} ({len(train)}) · val {args.val.text} ({len(val)})"
    )
    if probe == "knn":
        from dinov3_jax.eval.knn import knn_accuracy

        results: dict[str, Any] = knn_accuracy(
            train["cls"],
            train.labels,
            val["cls"],
            val.labels,
            ks=args.ks,
            temperature=args.temperature,
            num_classes=num_classes,
        )
        ks = sorted({int(k.split("@")[1]) for k in results})
        _print_table(title, ["k", "top-1", "top-5"], [[k, results[f"top1@{k}"], results[f"top5@{k}"]] for k in ks])
        dim = train["cls"].shape[1]
    elif probe == "linear":
        from dinov3_jax.eval.linear import train_linear_probe

        res = train_linear_probe(
            train["linear"],
            train.labels,
            val["linear"],
            val.labels,
            num_classes=num_classes,
            lrs=args.lrs,
            epochs=args.epochs,
            batch_size=args.probe_batch_size,
            max_iter=args.iterations,
            eval_every=args.eval_every,
            seed=args.seed,
        )
        results = res.to_dict()
        rows = [[f"{lr:g}" + (" *" if lr == res.best_lr else ""), v["top1"], v["top5"]] for lr, v in res.per_lr.items()]
        _print_table(title, ["lr", "top-1", "top-5"], rows)
        print(f"best lr {res.best_lr:g}: top-1 {res.top1:.2f}, top-5 {res.top5:.2f} ({res.iterations} iterations)")
        dim = train["linear"].shape[1]
    else:
        from dinov3_jax.eval.logreg import logistic_regression_eval

        cs = args.Cs or list(10.0 ** np.linspace(-6, 5, args.c_steps))
        res = logistic_regression_eval(
            train["cls"],
            train.labels,
            val["cls"],
            val.labels,
            Cs=cs,
            num_classes=num_classes,
            normalize=args.l2_normalize,
            max_iter=args.max_iter,
            seed=args.seed,
        )
        results = res.to_dict()
        rows = [[f"{c:.3g}" + (" *" if c == res.best_C else ""), v] for c, v in res.val_top1.items()]
        _print_table(title, ["C", "held-out top-1"], rows)
        print(f"best C {res.best_C:.3g}: test top-1 {res.top1:.2f}, top-5 {res.top5:.2f}")
        dim = train["cls"].shape[1]
    probe_s = time.perf_counter() - start

    if args.out:
        record = {
            "probe": probe,
            "model": args.model,
            "weights": str(args.weights) if args.weights else None,
            "train": args.train.text,
            "val": args.val.text,
            "resolution": resolution,
            "normalization": backbone.normalization,
            "n_train": len(train),
            "n_val": len(val),
            "num_classes": num_classes,
            "feature_dim": int(dim),
            "features_from_cache": {"train": train.from_cache, "val": val.from_cache},
            "seconds": {"features": round(extract_s, 3), "probe": round(probe_s, 3)},
            "results": results,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0
