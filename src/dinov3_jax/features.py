"""`dinov3-jax features`: batched feature extraction from image files.

Images are found under the inputs and go through the one extraction loop (`eval.extract`):
decoded in threads a bounded window ahead of the model, resized to --resolution, normalised as the
weights were trained, batched with the last batch padded, and run through one jitted function
that returns only the requested outputs. The features go to one `.safetensors` (default) or
`.npz` file with the image paths, in order, and the settings as metadata.

Memory stays bounded whatever the number of images: the rows are streamed, batch by batch, into
one `.npy` file per output in a work folder beside `--out` (`.NAME.partial/`, with a progress
record after each batch), and the output file is assembled from them in chunks, written to a
temporary name and renamed into place. A killed run leaves no partial `--out`; the same command
run again continues from the last finished batch.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import shutil
import struct
import sys
import zipfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from dinov3_jax import backbone as front_door
from dinov3_jax.data.images import Resize, check_resolution, find_images, parse_resolution
from dinov3_jax.data.sources import ImageFiles
from dinov3_jax.eval.extract import Rows, cache_key
from dinov3_jax.utils.files import atomic_write, atomic_write_text, writable_folder

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
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")


def _output_path(out: str) -> Path:
    path = Path(out).expanduser()
    if path.is_dir():
        raise ValueError(f"--out {path} is a folder; name the file to write")
    if path.suffix == "":
        return path.with_suffix(".safetensors")
    if path.suffix not in OUT_SUFFIXES:
        raise ValueError(f"--out {out}: expected a .safetensors or .npz file name")
    return path


class DiskRows(Rows):
    """The rows of an extraction streamed to one `.npy` file per column in `folder`, with
    `progress.json` rewritten (atomically) after each batch's rows are written, so that a killed
    extraction resumes at its last finished batch. `key` identifies the job (model, weights,
    images, settings): a folder left by another job is cleared."""

    def __init__(self, folder: Path, n_images: int, key: str):
        super().__init__(n_images)
        self.folder, self.key = folder, key
        self.shapes: dict[str, tuple[list[int], str]] = {}  # column → (row shape, dtype)
        self.offsets: dict[str, int] = {}
        progress = folder / "progress.json"
        saved = json.loads(progress.read_text()) if progress.is_file() else None
        if saved and saved["key"] == key:
            self.filled, self.next_index = saved["filled"], saved["next_index"]
            self.skipped = {int(i): reason for i, reason in saved["skipped"].items()}
            self.shapes = {k: (list(v[0]), v[1]) for k, v in saved["columns"].items()}
        else:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)

    def _path(self, key: str) -> Path:
        return self.folder / f"{key}.npy"

    def write(self, key: str, start: int, values: np.ndarray) -> None:
        values = np.ascontiguousarray(values)
        if key not in self.shapes:  # a sparse file of every row, filled batch by batch
            np.lib.format.open_memmap(self._path(key), "w+", values.dtype, (self.n_images, *values.shape[1:]))
            self.shapes[key] = (list(values.shape[1:]), values.dtype.str)
        if key not in self.offsets:  # where the rows start, after the .npy header
            self.offsets[key] = np.load(self._path(key), mmap_mode="r").offset
        with open(self._path(key), "r+b") as f:
            f.seek(self.offsets[key] + start * values[0:1].nbytes)
            f.write(values.tobytes())

    def commit(self) -> None:
        atomic_write_text(
            self.folder / "progress.json",
            json.dumps(
                {
                    "key": self.key,
                    "filled": self.filled,
                    "next_index": self.next_index,
                    "skipped": self.skipped,
                    "columns": self.shapes,
                }
            ),
        )

    def result(self) -> dict[str, np.ndarray]:
        """Read-only memory maps of the written rows."""
        return {k: np.load(self._path(k), mmap_mode="r")[: self.filled] for k in self.shapes}

    def read(self, key: str) -> Iterator[np.ndarray]:
        """The written rows of column `key`, some 64 MB at a time, by plain reads (no memory map,
        so the process's memory stays bounded while a large output is assembled)."""
        row_shape, dtype = self.shapes[key]
        dtype, row_size = np.dtype(dtype), math.prod(row_shape)
        if row_size == 0:  # e.g. the registers [N, 0, C] of a model without any
            yield np.empty((self.filled, *row_shape), dtype)
            return
        step = max(1, CHUNK_BYTES // (row_size * dtype.itemsize))
        with open(self._path(key), "rb") as f:
            f.seek(self.offsets.get(key) or np.load(self._path(key), mmap_mode="r").offset)
            for start in range(0, self.filled, step):
                n = min(step, self.filled - start)
                yield np.fromfile(f, dtype, n * row_size).reshape(n, *row_shape)


CHUNK_BYTES = 64 << 20
SAFETENSORS_DTYPES = {np.dtype(np.float32): "F32"}


@dataclasses.dataclass(frozen=True)
class Tensor:
    """An output tensor to stream: its shape and dtype, and its bytes in chunks."""

    shape: tuple[int, ...]
    dtype: np.dtype
    chunks: Callable[[], Iterable[np.ndarray]]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _write(path: Path, tensors: dict[str, Tensor], info: dict[str, Any]) -> None:
    """`tensors` and `info` to `path`, streamed: a safetensors file (header of shapes and offsets,
    then each tensor's bytes, the metadata as JSON strings) or an uncompressed npz (one `.npy`
    member per tensor). Written beside the target and renamed, so an interrupted run never leaves
    a truncated file."""
    with atomic_write(path) as tmp:
        if path.suffix == ".npz":
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
                for name, tensor in tensors.items():
                    with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                        descr = np.lib.format.dtype_to_descr(tensor.dtype)
                        np.lib.format.write_array_header_2_0(
                            f, {"descr": descr, "fortran_order": False, "shape": tensor.shape}
                        )
                        for chunk in tensor.chunks():
                            f.write(chunk.tobytes())
                for name, value in info.items():
                    # Lists of paths as unicode arrays (not object arrays), so np.load needs no pickle.
                    with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                        np.lib.format.write_array(
                            f, np.asarray(value, dtype=str if name in ("files", "skipped") else None)
                        )
        else:
            header: dict[str, Any] = {}
            offset = 0
            for name, tensor in tensors.items():
                end = offset + tensor.nbytes
                header[name] = {
                    "dtype": SAFETENSORS_DTYPES[tensor.dtype],
                    "shape": list(tensor.shape),
                    "data_offsets": [offset, end],
                }
                offset = end
            header["__metadata__"] = {k: v if isinstance(v, str) else json.dumps(v) for k, v in info.items()}
            blob = json.dumps(header, separators=(",", ":")).encode()
            blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
            with open(tmp, "wb") as f:
                f.write(struct.pack("<Q", len(blob)) + blob)
                for tensor in tensors.values():
                    for chunk in tensor.chunks():
                        f.write(chunk.tobytes())


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
    if out_path.exists() and not args.force:
        raise FileExistsError(f"--out {out_path} exists; pass --force to replace it")
    writable_folder(out_path.parent, "the folder of --out")
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
    request = Outputs(patch=args.patch, layers=args.layers or 0)
    job = {"backbone": backbone.identity(), "files": [str(p) for p in paths], "size": size, "outputs": str(request)}
    work = out_path.parent / f".{out_path.name}.partial"
    rows = DiskRows(work, len(paths), cache_key(job))
    if rows.next_index:
        print(f"dinov3-jax features: resuming at image {rows.next_index} of {len(paths)} ({work})", file=sys.stderr)
    result = extract(
        backbone,
        ImageFiles(paths),
        transform=Resize(size),
        outputs=request,
        batch_size=args.batch_size,
        num_threads=args.workers,
        strict=args.strict,
        rows=rows,
        progress=True,
    )
    for reason in result.skipped.values():
        print(f"dinov3-jax features: skipping {reason}", file=sys.stderr)
    # Patch maps are stored flattened, [N, h*w, D] (and [N, L, h*w, D]), as the official tokens.
    flat = lambda shape: (*shape[:-3], shape[-3] * shape[-2], shape[-1])  # noqa: E731
    tensors = {
        k: Tensor(flat(v.shape) if "patch" in k else v.shape, v.dtype, functools.partial(rows.read, k))
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
    shutil.rmtree(work)
    shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in tensors.items())
    print(f"wrote features of {len(result)} images to {out_path} ({len(result.skipped)} skipped): {shapes}")
    return 0
