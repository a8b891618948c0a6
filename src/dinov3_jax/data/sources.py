"""Random-access image sources: ``len(src)``, ``src[i] -> (image, label)``, ``num_classes``, ``class_names``.

An image is a PIL RGB image or a uint8 ``[H, W, 3]`` array; the label is an ``int`` (-1 when the
source has no labels). Sources are cheap to pickle (grain copies them into its worker processes)
and raise :class:`UnreadableImage` for a file that cannot be decoded, so that the training
pipeline can skip it.
"""

from __future__ import annotations

import gzip
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image, ImageDraw

from dinov3_jax.data.images import IMAGE_EXTENSIONS, UnreadableImage, decode, is_image_file

# Where the Debian package `dataset-fashion-mnist` installs the four idx files (gzipped).
FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist", "/usr/share/dataset-fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


@runtime_checkable
class ImageSource(Protocol):
    """What the pipelines need from a data source."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[Image.Image | np.ndarray, int]: ...

    @property
    def num_classes(self) -> int: ...

    @property
    def class_names(self) -> Sequence[str]: ...


def _check_index(index: int, n: int) -> int:
    index = int(index)
    if index < 0:
        index += n
    if not 0 <= index < n:
        raise IndexError(f"index {index} out of range for a source of {n} items")
    return index


# ---------------------------------------------------------------------------------------------
# Files on disk
# ---------------------------------------------------------------------------------------------


class _NamedClasses:
    """`num_classes` / `class_names` from the `_class_names` list a source fills in."""

    _class_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self._class_names)

    @property
    def class_names(self) -> list[str]:
        return list(self._class_names)


class FolderSource(_NamedClasses):
    """All images under ``path`` (recursive, sorted). Labels come from the first-level class
    subfolders when every image sits inside one (ImageNet layout), else they are -1."""

    def __init__(self, path: str | os.PathLike):
        self.root = Path(path)
        if not self.root.is_dir():
            raise ValueError(f"image folder {self.root} does not exist or is not a directory")
        files = sorted(
            p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if is_image_file(p) and p.is_file()
        )
        if not files:
            raise ValueError(f"no images (extensions {sorted(IMAGE_EXTENSIONS)}) found under {self.root}")
        self.files = files
        if all("/" in f for f in files):
            self._class_names = sorted({f.split("/", 1)[0] for f in files})
            lookup = {c: i for i, c in enumerate(self._class_names)}
            self.labels = np.array([lookup[f.split("/", 1)[0]] for f in files], np.int32)
        else:
            self._class_names = []
            self.labels = np.full(len(files), -1, np.int32)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        index = _check_index(index, len(self))
        return decode(self.root / self.files[index]), int(self.labels[index])


class FileListSource(_NamedClasses):
    """A text file with one image path per line, optionally followed by a tab and an int label.
    Relative paths are resolved against the list file's folder; blank lines and ``#`` comments are
    ignored."""

    def __init__(self, txt: str | os.PathLike):
        self.txt = Path(txt)
        if not self.txt.is_file():
            raise ValueError(f"file list {self.txt} does not exist")
        base = self.txt.parent
        files, labels = [], []
        for lineno, raw in enumerate(self.txt.read_text().splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if "\t" in line:
                p, lab = line.rsplit("\t", 1)
                try:
                    label = int(lab)
                except ValueError as e:
                    raise ValueError(f"{self.txt}:{lineno}: label {lab!r} is not an integer") from e
            else:
                p, label = line, -1
            p = p.strip()
            files.append(str(Path(p) if os.path.isabs(p) else base / p))
            labels.append(label)
        if not files:
            raise ValueError(f"file list {self.txt} lists no images")
        self.files = files
        self.labels = np.array(labels, np.int32)
        n = int(self.labels.max()) + 1 if (self.labels >= 0).any() else 0
        self._class_names = [str(i) for i in range(n)]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        index = _check_index(index, len(self))
        return decode(self.files[index]), int(self.labels[index])


class ImageFiles(_NamedClasses):
    """Image files named one by one, unlabelled (what `dinov3-jax features` reads)."""

    def __init__(self, paths: Sequence[str | os.PathLike]):
        self.files = [str(p) for p in paths]
        self.labels = np.full(len(self.files), -1, np.int32)
        self._class_names = []

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return decode(self.files[_check_index(index, len(self))]), -1


class InMemoryImages:
    """Images already decoded (PIL images or uint8 arrays), unlabelled."""

    def __init__(self, images: Sequence[Image.Image | np.ndarray]):
        self.images = list(images)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Image.Image | np.ndarray, int]:
        return self.images[_check_index(index, len(self))], -1

    num_classes = 0
    class_names: Sequence[str] = ()


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST (idx-ubyte files)
# ---------------------------------------------------------------------------------------------


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx-ubyte file (optionally gzipped) into a uint8 array of its declared shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise UnreadableImage(path, f"{type(e).__name__}: {e}") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise UnreadableImage(path, "not an unsigned-byte idx file (bad magic)")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(data) - header != math.prod(shape):
        raise UnreadableImage(path, f"size {len(data) - header} does not match shape {shape}")
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def find_fashion_mnist() -> Path | None:
    """The folder of the Debian ``dataset-fashion-mnist`` install (or $FASHION_MNIST_DIR), if any."""
    candidates = [os.environ.get("FASHION_MNIST_DIR", ""), *FASHION_MNIST_DIRS]
    for c in candidates:
        if c and _idx_file(Path(c), "train", "images") is not None:
            return Path(c)
    return None


def _idx_file(folder: Path, split: str, kind: str) -> Path | None:
    prefix = "train" if split == "train" else "t10k"
    stem = f"{prefix}-{kind}-idx{3 if kind == 'images' else 1}-ubyte"
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


class FashionMNISTSource:
    """Fashion-MNIST from the standard idx-ubyte files (gz or not). ``path=None`` looks for the
    Debian package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``). Images are
    returned as uint8 ``[28, 28, 3]`` (grey replicated to RGB). Arrays load lazily, per process."""

    def __init__(self, path: str | os.PathLike | None = None, split: str = "train"):
        if split not in ("train", "test"):
            raise ValueError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
        if path is None:
            found = find_fashion_mnist()
            if found is None:
                raise FileNotFoundError(
                    "Fashion-MNIST not found in "
                    + ", ".join(FASHION_MNIST_DIRS)
                    + "; install it with `apt-get install dataset-fashion-mnist` or pass the folder holding the idx files"
                )
            path = found
        self.root = Path(path)
        self.split = split
        self.images_file = _idx_file(self.root, split, "images")
        self.labels_file = _idx_file(self.root, split, "labels")
        if self.images_file is None or self.labels_file is None:
            raise ValueError(f"no Fashion-MNIST {split} idx files (images and labels) in {self.root}")
        self._arrays: tuple[np.ndarray, np.ndarray] | None = None
        self._len = len(self._load()[1])
        if self._len == 0:
            raise ValueError(f"Fashion-MNIST {split} files in {self.root} hold no images")

    def _load(self) -> tuple[np.ndarray, np.ndarray]:
        if self._arrays is None:
            images, labels = read_idx(self.images_file), read_idx(self.labels_file)
            if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
                raise ValueError(f"inconsistent Fashion-MNIST files {self.images_file}, {self.labels_file}")
            self._arrays = (images, labels)
        return self._arrays

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_arrays"} | {"_arrays": None}

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        index = _check_index(index, len(self))
        images, labels = self._load()
        return np.repeat(images[index][:, :, None], 3, axis=2), int(labels[index])

    @property
    def labels(self) -> np.ndarray:
        return self._load()[1].astype(np.int32)

    @property
    def num_classes(self) -> int:
        return len(FASHION_MNIST_CLASSES)

    @property
    def class_names(self) -> list[str]:
        return list(FASHION_MNIST_CLASSES)


# ---------------------------------------------------------------------------------------------
# Synthetic shapes (procedural, labelled, with segmentation masks)
# ---------------------------------------------------------------------------------------------

SYNTHETIC_CLASSES = (
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "ring",
    "stripes",
    "checker",
    "ellipse",
    "arrow",
)
_SPLIT_IDS = {"train": 0, "val": 1, "test": 1}


def _polygon(name: str) -> np.ndarray:
    """Vertices in the unit shape frame (roughly inside the unit disc)."""
    if name == "triangle":
        a = np.deg2rad([90, 210, 330])
        return np.stack([np.cos(a), np.sin(a)], 1)
    if name == "star":
        a = np.deg2rad(90 + 36 * np.arange(10))
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        return np.stack([r * np.cos(a), r * np.sin(a)], 1)
    if name == "arrow":
        return np.array(
            [[1.0, 0.0], [0.1, 0.65], [0.1, 0.25], [-0.95, 0.25], [-0.95, -0.25], [0.1, -0.25], [0.1, -0.65]]
        )
    raise KeyError(name)


class SyntheticSource:
    """Procedurally generated labelled images of 10 shape classes (``SYNTHETIC_CLASSES``).

    An image of class c shows 3 to 5 dark shapes of kind c, each with its own size, rotation,
    position and grey level, on a light grey, blotchy, noisy background. Every crop the
    multi-crop recipe takes contains some of them, so two views of one image share the class and
    little else, while two images of a class share few pixels (k-NN on raw pixels: ~30% for 10
    classes). Earlier designs and why they were left (measured with the tiny recipe):
    one shape per image let the model cluster by per-image nuisances (size, position, background);
    a random colour per image was learned instead of shape (two crops of one image are matched
    by their colours, which carry no class); a random polarity (light on dark as well) cost ~5
    k-NN points. Item ``i`` is a pure function of ``(seed, split, i)``; labels are
    ``i % num_classes`` (balanced; the first ``num_classes`` kinds, at most 10). ``get_mask(i)``
    gives the per-pixel mask (0 background, label+1 on the shapes) for segmentation probes.

    Rendering is most of the training data path at 64 px (benchmarks/README.md, input pipeline),
    so rendered items are kept, read-only, in this process up to ``cache_bytes`` (the first items
    rendered stay; the cache is not pickled into grain worker processes, each fills its own)."""

    shapes_per_image = (3, 5)
    radius_range = (0.13, 0.19)  # as a fraction of the image side
    min_separation = 1.7  # centres at least this many (larger) radii apart

    def __init__(
        self,
        num_samples: int = 1000,
        image_size: int = 64,
        seed: int = 0,
        split: str = "train",
        num_classes: int = 10,
        cache_bytes: int = 256 << 20,
    ):
        if not 1 <= num_classes <= len(SYNTHETIC_CLASSES):
            raise ValueError(f"SyntheticSource supports 1..{len(SYNTHETIC_CLASSES)} classes, got {num_classes}")
        self._num_classes = int(num_classes)
        if num_samples <= 0:
            raise ValueError(f"SyntheticSource needs num_samples > 0, got {num_samples}")
        if image_size < 8:
            raise ValueError(f"SyntheticSource needs image_size >= 8, got {image_size}")
        if split not in _SPLIT_IDS:
            raise ValueError(f"unknown split {split!r}; use one of {sorted(_SPLIT_IDS)}")
        self.num_samples = int(num_samples)
        self.image_size = int(image_size)
        self.seed = int(seed)
        self.split = split
        self.cache_bytes = int(cache_bytes)
        self._cache: dict[int, tuple[np.ndarray, np.ndarray, int]] = {}
        self._cached_bytes = 0

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__ | {"_cache": {}, "_cached_bytes": 0}

    def __len__(self) -> int:
        return self.num_samples

    @property
    def num_classes(self) -> int:
        return self._num_classes

    @property
    def class_names(self) -> list[str]:
        return list(SYNTHETIC_CLASSES[: self._num_classes])

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        image, _, label = self.render(index)
        return image, label

    def get_mask(self, index: int) -> np.ndarray:
        """uint8 ``[H, W]``: 0 on the background, ``label + 1`` on the shapes."""
        _, mask, label = self.render(index)
        return np.where(mask, label + 1, 0).astype(np.uint8)

    def render(self, index: int) -> tuple[np.ndarray, np.ndarray, int]:
        """``(image uint8 [H, W, 3], foreground bool [H, W], label)`` for item ``index`` (both
        arrays read-only)."""
        index = _check_index(index, len(self))
        item = self._cache.get(index)
        if item is None:
            item = self._render(index)
            for array in item[:2]:
                array.flags.writeable = False
            size = item[0].nbytes + item[1].nbytes
            if self._cached_bytes + size <= self.cache_bytes:  # (threads may race past the bound by an item)
                self._cache[index] = item
                self._cached_bytes += size
        return item

    def _render(self, index: int) -> tuple[np.ndarray, np.ndarray, int]:
        label = index % self._num_classes
        rng = np.random.default_rng([self.seed, _SPLIT_IDS[self.split], index, 0x5EED])
        s = self.image_size
        image = self._background(rng, s)
        name = SYNTHETIC_CLASSES[label]
        foreground = np.zeros((s, s), bool)
        wanted = int(rng.integers(self.shapes_per_image[0], self.shapes_per_image[1] + 1))
        placed: list[tuple[float, float, float]] = []
        for _ in range(20 * wanted):  # rejection sampling of well separated centres
            if len(placed) == wanted:
                break
            radius = rng.uniform(*self.radius_range) * s
            cx, cy = rng.uniform(radius, s - radius, size=2)
            if any(np.hypot(cx - x, cy - y) < self.min_separation * max(radius, r) for x, y, r in placed):
                continue
            placed.append((cx, cy, radius))
            # Draw in the shape's bounding window only (rendering is on the data path).
            y0, x0 = max(0, int(cy - radius) - 1), max(0, int(cx - radius) - 1)
            y1, x1 = min(s, int(cy + radius) + 2), min(s, int(cx + radius) + 2)
            mask, tone = _shape_mask(name, rng, (x0, y0, x1, y1), cx, cy, radius, rng.uniform(0, 2 * np.pi))
            grey = rng.uniform(10, 70)
            fill = np.full((*mask.shape, 3), grey, np.float32)
            if tone is not None:  # two-tone classes: the shape's grey and its inverse
                fill = np.where(tone[..., None], fill, 255.0 - grey)
            fill += rng.normal(0, 8.0, size=fill.shape).astype(np.float32)
            window = image[y0:y1, x0:x1]
            window[mask] = fill[mask]
            foreground[y0:y1, x0:x1] |= mask
        return np.clip(np.rint(image), 0, 255).astype(np.uint8), foreground, label

    @staticmethod
    def _background(rng: np.random.Generator, s: int) -> np.ndarray:
        """Light grey with a smooth grey field, blotchy low-frequency texture and pixel noise."""
        corners = rng.uniform(0, 255, size=(3, 3)).astype(np.uint8)
        field = np.asarray(Image.fromarray(corners).resize((s, s), Image.BILINEAR), np.float32)
        k = max(2, s // 6)
        blotch = rng.normal(0, 25.0, size=(k, k)).astype(np.float32)
        blotch = np.asarray(Image.fromarray(blotch, mode="F").resize((s, s), Image.BICUBIC))
        grey = 185.0 + 0.3 * (field - 128.0) + blotch
        return grey[..., None] + rng.normal(0, 12.0, size=(s, s, 3)).astype(np.float32)


def _shape_mask(
    name: str,
    rng: np.random.Generator,
    window: tuple[int, int, int, int],
    cx: float,
    cy: float,
    radius: float,
    theta: float,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Boolean mask of one shape (centre, radius in pixels, rotation) over the image window
    ``(x0, y0, x1, y1)``, and for the two-tone classes (stripes, checker) which of its pixels take
    the first tone."""
    x0, y0, x1, y1 = window
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5
    dx, dy = (xx - cx) / radius, (yy - cy) / radius
    c, sn = np.cos(theta), np.sin(theta)
    u, v = c * dx + sn * dy, -sn * dx + c * dy  # pixel → shape frame (inverse rotation)
    if name in ("stripes", "checker"):
        period = rng.uniform(0.5, 0.65)
        if name == "stripes":
            tone = np.floor(u / period) % 2 == 0
        else:
            tone = (np.floor(u / period) + np.floor(v / period)) % 2 == 0
        return u**2 + v**2 <= 1.0, tone
    if name == "circle":
        return u**2 + v**2 <= 1.0, None
    if name == "ellipse":
        return u**2 + (v / 0.45) ** 2 <= 1.0, None
    if name == "ring":
        r2 = u**2 + v**2
        return (r2 <= 1.0) & (r2 >= rng.uniform(0.4, 0.55) ** 2), None
    if name == "square":
        return (np.abs(u) <= 0.75) & (np.abs(v) <= 0.75), None
    if name == "cross":
        w = rng.uniform(0.25, 0.32)
        return ((np.abs(u) <= 0.95) & (np.abs(v) <= w)) | ((np.abs(v) <= 0.95) & (np.abs(u) <= w)), None
    verts = _polygon(name) * radius  # polygon classes, drawn by PIL in window coordinates
    px = cx - x0 + c * verts[:, 0] - sn * verts[:, 1]
    py = cy - y0 + sn * verts[:, 0] + c * verts[:, 1]
    canvas = Image.new("L", (x1 - x0, y1 - y0), 0)
    ImageDraw.Draw(canvas).polygon(list(zip(px.tolist(), py.tolist())), fill=255)
    return np.asarray(canvas) > 127, None


# ---------------------------------------------------------------------------------------------
# Factory
# ---------------------------------------------------------------------------------------------


def stratified_indices(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """`n` indices of `labels` [N] (sorted), the same for a given `seed`: each class keeps its share
    of the `n` (every class at least one while `n` allows), the members drawn at random. Labels of
    -1 (no labels) are one class: a plain random draw."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    order = rng.permutation(len(labels))
    position = np.empty(len(labels))
    for c in np.unique(labels):
        members = order[labels[order] == c]
        position[members] = np.arange(len(members)) / len(members)  # each class spread over [0, 1)
    return np.sort(np.lexsort((rng.random(len(labels)), position))[:n])


class SubsetSource:
    """``n`` items of another source, the same for a given ``seed``: stratified by label when the
    source lists its labels (`stratified_indices`: a folder sorted by class keeps every class in
    its share), else drawn at random; read in source order."""

    def __init__(self, source: ImageSource, n: int, seed: int = 0):
        if n <= 0:
            raise ValueError(f"subset size must be > 0, got {n}")
        self.source = source
        self.n = min(int(n), len(source))
        all_labels = getattr(source, "labels", None)
        if all_labels is None:
            all_labels = np.full(len(source), -1, np.int32)
        self.indices = np.arange(self.n) if self.n == len(source) else stratified_indices(all_labels, self.n, seed)
        self.labels = np.asarray(all_labels)[self.indices]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        return self.source[int(self.indices[_check_index(index, self.n)])]

    def __getattr__(self, name: str):
        if name == "source":  # not yet set (unpickling)
            raise AttributeError(name)
        return getattr(self.source, name)

    @property
    def num_classes(self) -> int:
        return self.source.num_classes

    @property
    def class_names(self) -> Sequence[str]:
        return self.source.class_names


_SPLIT_DIRS = {"train": ("train",), "val": ("val", "validation", "test"), "test": ("test", "val", "validation")}


def make_source(
    kind: str,
    path: str | os.PathLike | None = None,
    split: str = "train",
    *,
    num_samples: int | None = None,
    image_size: int = 64,
    seed: int = 0,
    **kw: Any,
) -> ImageSource:
    """Build a source by name: ``folder`` (uses ``path/<split>`` when that folder exists),
    ``filelist``, ``fashion_mnist`` and ``synthetic``. ``num_samples`` sets the synthetic size and
    keeps a subset of the others (stratified by class, drawn with ``seed``: `SubsetSource`);
    ``image_size`` only affects the synthetic source."""
    kind = kind.lower().replace("-", "_")
    path = path or None
    if kind in ("folder", "imagefolder", "image_folder"):
        if path is None:
            raise ValueError("the folder source needs a path")
        root = Path(path)
        for sub in _SPLIT_DIRS.get(split, (split,)):
            if (root / sub).is_dir():
                root = root / sub
                break
        src: ImageSource = FolderSource(root, **kw)
    elif kind in ("filelist", "file_list", "list"):
        if path is None:
            raise ValueError("the filelist source needs a path")
        src = FileListSource(path, **kw)
    elif kind in ("fashion_mnist", "fashionmnist", "fmnist"):
        src = FashionMNISTSource(path, split="train" if split == "train" else "test", **kw)
    elif kind == "synthetic":
        return SyntheticSource(num_samples or 1000, image_size=image_size, seed=seed, split=split, **kw)
    else:
        raise ValueError(f"unknown source kind {kind!r}; use folder, filelist, fashion_mnist or synthetic")
    if num_samples:
        src = SubsetSource(src, num_samples, seed=seed)
    return src
