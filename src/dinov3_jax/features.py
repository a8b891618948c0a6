"""`dinov3-jax features`: batched feature extraction from image files.

Images are found under the inputs and go through the one extraction loop (`eval.extract`):
decoded in threads a bounded window ahead of the model, resized to --resolution, normalised as the
weights were trained, batched with the last batch padded, and run through one jitted function
that returns only the requested outputs. The features go to one `.safetensors` (default) or
`.npz` file with the image paths, in order, and the settings as metadata.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from dinov3_jax import backbone as front_door
from dinov3_jax.data.images import Resize, check_resolution, find_images, parse_resolution
from dinov3_jax.data.sources import ImageFiles
from dinov3_jax.utils.files import atomic_write

OUT_SUFFIXES = (".safetensors", ".npz")
# The file names go in the safetensors JSON header, which readers cap at 100 MB; keep room for the rest.
SAFETENSORS_HEADER_BUDGET = 90_000_000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Run a DINOv3 backbone over image files (resized to --resolution, normalised as in training) and "
        "write, per image: cls [N, D], registers [N, R, D], with --patch patch [N, h*w, D], with --layers "
        "layers_cls [N, L, D] (and layers_patch [N, L, h*w, D]); a ConvNeXt writes stage{i}_cls [N, D_i] (and "
        "stage{i}_patch at each stage's own stride) instead. The image paths, in row order, are "
        "stored in the file (safetensors metadata 'files', or the npz array 'files')."
    )
    front_door.add_arguments(parser)
    parser.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="PATH",
        help="image files and/or folders (searched recursively for jpg/jpeg/png/bmp/gif/tif/tiff/webp/ppm)",
    )
    parser.add_argument(
        "--resolution",
        default="224",
        help="input size: N (square) or HxW such as 448x640; a multiple of the patch size (default 224)",
    )
    parser.add_argument("--out", required=True, help="output file: .safetensors (default format) or .npz")
    parser.add_argument("--patch", action="store_true", help="also write the patch tokens [N, h*w, D]")
    parser.add_argument(
        "--layers",
        type=int,
        metavar="N",
        help="also write the normalised CLS (and, with --patch, patch) outputs of the last N blocks (ConvNeXt: stages)",
    )
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    parser.add_argument(
        "--workers",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="threads decoding images (default: min(8, CPUs))",
    )
    parser.add_argument("--strict", action="store_true", help="stop at the first unreadable image instead of skipping")


def _output_path(out: str) -> Path:
    path = Path(out)
    if path.suffix == "":
        return path.with_suffix(".safetensors")
    if path.suffix not in OUT_SUFFIXES:
        raise ValueError(f"--out {out}: expected a .safetensors or .npz file name")
    return path


def _write(path: Path, tensors: dict[str, np.ndarray], info: dict[str, Any]) -> None:
    # Written beside the target and renamed, so an interrupted run never leaves a truncated file.
    with atomic_write(path) as tmp:
        if path.suffix == ".npz":
            # Lists of paths as unicode arrays (not object arrays), so np.load needs no pickle.
            extra = {
                k: np.asarray(v, dtype=str) if k in ("files", "skipped") else np.asarray(v) for k, v in info.items()
            }
            np.savez(tmp, **tensors, **extra)
        else:
            from safetensors.numpy import save_file

            save_file(
                tensors, str(tmp), metadata={k: v if isinstance(v, str) else json.dumps(v) for k, v in info.items()}
            )


def run(args: argparse.Namespace) -> int:
    from dinov3_jax.backbone import Outputs
    from dinov3_jax.eval.extract import extract
    from dinov3_jax.models.registry import get_spec, stride_of

    # Cheap checks first, so a mistake is reported before a large checkpoint is read.
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.workers < 1:
        raise ValueError(f"--workers must be at least 1, got {args.workers}")
    out_path = _output_path(args.out)
    size = parse_resolution(args.resolution)
    if args.model is not None:
        check_resolution(size, stride_of(get_spec(args.model).config))
    paths = find_images(args.input)
    if not paths:
        raise ValueError(f"no image files found in {', '.join(args.input)}")
    if out_path.suffix == ".safetensors":
        listing = len(json.dumps([str(p) for p in paths]).encode())
        if listing > SAFETENSORS_HEADER_BUDGET:
            raise ValueError(
                f"the {len(paths)} file names ({listing / 1e6:.0f} MB) would not fit in a safetensors header "
                "(readers refuse headers over 100 MB); write --out FILE.npz instead"
            )

    backbone = front_door.from_args(args, "features")
    grid = check_resolution(size, backbone.stride)
    result = extract(
        backbone,
        ImageFiles(paths),
        transform=Resize(size),
        outputs=Outputs(patch=args.patch, layers=args.layers or 0),
        batch_size=args.batch_size,
        num_threads=args.workers,
        strict=args.strict,
        progress=True,
    )
    for reason in result.skipped.values():
        print(f"dinov3-jax features: skipping {reason}", file=sys.stderr)
    # Patch maps are stored flattened, [N, h*w, D] (and [N, L, h*w, D]), as the official tokens.
    tensors = {
        k: np.ascontiguousarray(v.reshape(*v.shape[: v.ndim - 3], -1, v.shape[-1]) if "patch" in k else v)
        for k, v in result.arrays.items()
    }
    mean, std = backbone.mean, backbone.std
    info = {
        "files": [str(paths[i]) for i in result.indices],
        "skipped": [str(paths[i]) for i in result.skipped],
        "model": backbone.description,
        "weights": str(args.weights) if args.weights else "random",
        "resolution": list(size),
        "normalization": backbone.normalization,
        "mean": list(mean),
        "std": list(std),
        "grid": list(grid),
        "layers": args.layers or 0,
    }
    _write(out_path, tensors, info)
    shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in tensors.items())
    print(f"wrote features of {len(result)} images to {out_path} ({len(result.skipped)} skipped): {shapes}")
    return 0
