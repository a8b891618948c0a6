"""`dinov3-jax features`: batched feature extraction from image files.

Images are found under the inputs, decoded and preprocessed in a thread pool (a bounded window
ahead of the model, so memory holds a few batches of pixels, never the whole set), batched with
the last batch padded (one compiled shape), and run through one jitted function that returns
only the requested outputs. The features go to one `.safetensors` (default) or `.npz` file with
the image paths, in order, and the settings as metadata.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from dinov3_jax.data.preprocess import (
    check_resolution,
    find_images,
    load_image,
    parse_resolution,
)
from dinov3_jax.models.registry import MODELS, NORMALIZATION, get_spec, model_from_filename

OUT_SUFFIXES = (".safetensors", ".npz")
# The file names go in the safetensors JSON header, which readers cap at 100 MB; keep room for the rest.
SAFETENSORS_HEADER_BUDGET = 90_000_000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Run a DINOv3 backbone over image files (resized to --resolution, normalised as in training) and "
        "write, per image: cls [N, D], registers [N, R, D], with --patch patch [N, h*w, D], with --layers "
        "layers_cls [N, L, D] (and layers_patch [N, L, h*w, D]). The image paths, in row order, are "
        "stored in the file (safetensors metadata 'files', or the npz array 'files')."
    )
    parser.add_argument("--model", help="registry name (see `dinov3-jax models`); optional when --weights states it")
    parser.add_argument(
        "--weights", help="backbone weights (official .pth, HF folder/safetensors, ours); random init if omitted"
    )
    parser.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="PATH",
        help="image files and/or folders (searched recursively for jpg/jpeg/png/bmp/gif/tif/tiff/webp)",
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
        help="also write the normalised CLS (and, with --patch, patch) outputs of the last N blocks",
    )
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    parser.add_argument(
        "--normalization",
        choices=sorted(NORMALIZATION),
        help="input mean/std preset; default: the one the model was trained with",
    )
    parser.add_argument("--dtype", choices=("fp32", "bf16"), help="compute dtype (default: fp32)")
    parser.add_argument(
        "--workers",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="threads decoding images (default: min(8, CPUs))",
    )
    parser.add_argument("--strict", action="store_true", help="stop at the first unreadable image instead of skipping")


# ---------------------------------------------------------------------------------------------
# Model, normalisation and the jitted extractor
# ---------------------------------------------------------------------------------------------


def _identify(model_name: str | None, weights: str | None, config) -> tuple[str | None, list[str]]:
    """The registry name (given, from the file name, or the only structural match) and all matches."""
    from dinov3_jax.models.config import structural_differences

    if model_name:
        return model_name, [model_name]
    if weights:
        name = model_from_filename(Path(weights).name)
        if name:
            return name, [name]
    matches = [n for n, spec in MODELS.items() if not structural_differences(spec.config, config)]
    return (matches[0] if len(matches) == 1 else None), matches


def _pick_normalization(requested: str | None, candidates: list[str]) -> str:
    if requested:
        return requested
    presets = {MODELS[n].normalization for n in candidates}
    if len(presets) == 1:
        return presets.pop()
    # Same architecture trained on different data (e.g. the two ViT-7B): the file cannot tell.
    print(
        "dinov3-jax features: warning: cannot tell which normalisation the weights were trained with; "
        "using 'lvd' (pass --normalization sat for satellite models)",
        file=sys.stderr,
    )
    return "lvd"


def _make_extractor(model, *, patch: bool, layers: int | None) -> Callable[[np.ndarray], dict[str, Any]]:
    """One jitted function of a batch returning only the requested outputs, as float32."""
    import jax.numpy as jnp
    from flax import nnx

    from dinov3_jax.inference import jit_method

    class Extractor(nnx.Module):
        # `patch` and `layers` are plain Python values, so NNX keeps them static in the graph.
        def __init__(self, backbone):
            self.backbone = backbone
            self.patch = patch
            self.layers = layers

        def __call__(self, x):
            f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
            if not self.layers:
                ff = self.backbone.forward_features(x)
                out = {"cls": ff["x_norm_clstoken"], "registers": ff["x_storage_tokens"]}
                if self.patch:
                    out["patch"] = ff["x_norm_patchtokens"]
                return {k: f32(v) for k, v in out.items()}
            # The last block's normalised output is exactly forward_features' in eval, so one pass
            # through the blocks gives both the final and the intermediate features.
            per_layer = self.backbone.get_intermediate_layers(
                x, n=self.layers, return_class_token=True, return_extra_tokens=True, norm=True
            )
            last_patch, last_cls, last_regs = per_layer[-1]
            out = {
                "cls": last_cls,
                "registers": last_regs,
                "layers_cls": jnp.stack([cls for _, cls, _ in per_layer], axis=1),
            }
            if self.patch:
                out["patch"] = last_patch
                out["layers_patch"] = jnp.stack([p for p, _, _ in per_layer], axis=1)
            return {k: f32(v) for k, v in out.items()}

    return jit_method(Extractor(model), "__call__")


# ---------------------------------------------------------------------------------------------
# Decoding ahead of the model
# ---------------------------------------------------------------------------------------------


def _ordered_prefetch(executor: Executor, fn: Callable, items: Iterable, window: int) -> Iterator:
    """`executor.map(fn, items)` with at most `window` results pending: map submits everything at
    once, which for a large folder would decode every image into memory ahead of the model."""
    items = iter(items)
    pending = deque(executor.submit(fn, item) for _, item in zip(range(window), items))
    while pending:
        future = pending.popleft()
        for item in items:
            pending.append(executor.submit(fn, item))
            break
        yield future.result()


def _try_load(path: Path, size: tuple[int, int], normalization: str) -> tuple[np.ndarray | None, str | None]:
    try:
        return load_image(path, size, normalization), None
    except Exception as err:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError, ...
        return None, f"{type(err).__name__}: {err}"


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def _output_path(out: str) -> Path:
    path = Path(out)
    if path.suffix == "":
        return path.with_suffix(".safetensors")
    if path.suffix not in OUT_SUFFIXES:
        raise ValueError(f"--out {out}: expected a .safetensors or .npz file name")
    return path


def _write(path: Path, tensors: dict[str, np.ndarray], info: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target and renamed, so an interrupted run never leaves a truncated file.
    partial = path.with_name(f".{path.stem}.partial{path.suffix}")
    try:
        if path.suffix == ".npz":
            # Lists of paths as unicode arrays (not object arrays), so np.load needs no pickle.
            extra = {
                k: np.asarray(v, dtype=str) if k in ("files", "skipped") else np.asarray(v) for k, v in info.items()
            }
            np.savez(partial, **tensors, **extra)
        else:
            from safetensors.numpy import save_file

            metadata = {k: v if isinstance(v, str) else json.dumps(v) for k, v in info.items()}
            save_file(tensors, str(partial), metadata=metadata)
            # safetensors creates its files owner-only (0600); give the usual umask-based mode instead.
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(partial, 0o666 & ~umask)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    # Cheap checks first, so a mistake is reported before a large checkpoint is read.
    if args.model is None and args.weights is None:
        raise ValueError("pass --model NAME (random weights) or --weights PATH, or both")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.workers < 1:
        raise ValueError(f"--workers must be at least 1, got {args.workers}")
    out_path = _output_path(args.out)
    size = parse_resolution(args.resolution)
    if args.model is not None:
        spec = get_spec(args.model)
        check_resolution(size, spec.config.patch_size)
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

    from dinov3_jax.weights import load_backbone

    model = load_backbone(args.model, args.weights, dtype=args.dtype)
    cfg = model.config
    grid = check_resolution(size, cfg.patch_size)
    if args.layers is not None and not 1 <= args.layers <= cfg.depth:
        raise ValueError(f"--layers must be between 1 and the depth {cfg.depth}, got {args.layers}")
    name, candidates = _identify(args.model, args.weights, cfg)
    normalization = _pick_normalization(args.normalization, candidates)
    if args.weights is None:
        print(
            f"dinov3-jax features: warning: no --weights given, so {args.model} is RANDOMLY INITIALISED; "
            "the features only exercise the pipeline",
            file=sys.stderr,
        )

    extract = _make_extractor(model, patch=args.patch, layers=args.layers)
    batch_size = min(args.batch_size, len(paths))
    h, w = size
    outputs: dict[str, np.ndarray] = {}
    written: list[str] = []
    skipped: list[str] = []

    def store(result, start: int, count: int) -> None:
        for key, value in result.items():
            value = np.asarray(value)
            if key not in outputs:
                # Sized for every file; trimmed at the end if some are skipped.
                outputs[key] = np.empty((len(paths), *value.shape[1:]), np.float32)
            outputs[key][start : start + count] = value[:count]

    progress = tqdm(total=len(paths), unit="img", file=sys.stderr, desc="features", dynamic_ncols=True)
    executor = ThreadPoolExecutor(max_workers=args.workers, thread_name_prefix="decode")
    try:
        loaded = _ordered_prefetch(
            executor, lambda p: _try_load(p, size, normalization), paths, window=2 * batch_size + args.workers
        )
        batch = np.empty((batch_size, h, w, 3), np.float32)
        fill = 0
        in_flight = None  # (outputs being computed, first row, count): read back after the next dispatch

        def dispatch(batch, fill):
            nonlocal in_flight
            if fill < batch_size:
                batch[fill:] = 0.0  # padding rows; their outputs are dropped
            result = extract(batch)  # asynchronous: decoding of the next batch overlaps it
            if in_flight is not None:
                store(*in_flight)
                progress.update(in_flight[2])
            in_flight = (result, len(written) - fill, fill)

        for path, (image, error) in zip(paths, loaded):
            if error is not None:
                if args.strict:
                    raise ValueError(f"cannot read image {path}: {error}")
                skipped.append(str(path))
                progress.write(f"skipping {path}: {error}", file=sys.stderr)
                progress.update(1)
                continue
            batch[fill] = image
            fill += 1
            written.append(str(path))
            if fill == batch_size:
                dispatch(batch, fill)
                batch = np.empty_like(batch)  # the dispatched one may still be read by the device
                fill = 0
        if fill:
            dispatch(batch, fill)
        if in_flight is not None:
            store(*in_flight)
            progress.update(in_flight[2])
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
        progress.close()

    if not written:
        raise ValueError(f"none of the {len(paths)} image files could be read")
    tensors = {k: np.ascontiguousarray(v[: len(written)]) for k, v in outputs.items()}
    info = {
        "files": written,
        "skipped": skipped,
        "model": name or f"custom ViT (width {cfg.embed_dim}, depth {cfg.depth}, patch {cfg.patch_size})",
        "weights": str(args.weights) if args.weights else "random",
        "resolution": [h, w],
        "normalization": normalization,
        "mean": list(NORMALIZATION[normalization][0]),
        "std": list(NORMALIZATION[normalization][1]),
        "grid": list(grid),
        "layers": args.layers or 0,
    }
    _write(out_path, tensors, info)
    shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in tensors.items())
    print(f"wrote features of {len(written)} images to {out_path} ({len(skipped)} skipped): {shapes}")
    return 0
