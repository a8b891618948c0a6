"""`dinov3-jax show KIND`: one PNG picture of a backbone's patch features (sizes: see `show.panels`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from dinov3_jax import backbone as front_door
from dinov3_jax.backbone import Backbone
from dinov3_jax.data.images import decode
from dinov3_jax.show.attention import attention_picture
from dinov3_jax.show.foreground import (
    ForegroundClassifier,
    folder_training_pairs,
    foreground_picture,
    synthetic_training_pairs,
    train_foreground_classifier,
)
from dinov3_jax.show.match import match_picture
from dinov3_jax.show.model import patch_features, prefix_attention, resized
from dinov3_jax.show.panels import picture_size
from dinov3_jax.show.pca import pca_picture
from dinov3_jax.show.similarity import similarity_picture

KINDS = ("pca", "similarity", "attention", "foreground", "match")
DEFAULT_RESOLUTION = "448"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Write a PNG picture of a backbone's patch features. pca: first three principal components as RGB; "
        "similarity: cosine similarity to the patch at --point X Y; attention: last-block CLS/register attention "
        "per head and averaged (ViT only); foreground: linear foreground classifier; match: dense and mutual "
        "nearest-neighbour patch matches between two images. Without --weights the model is randomly initialised."
    )
    parser.add_argument("kind", choices=KINDS, help="which picture")
    front_door.add_arguments(parser, dtype=False)
    parser.add_argument("--input", nargs="+", required=True, metavar="IMAGE", help="image (two for match)")
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument(
        "--resolution",
        default=DEFAULT_RESOLUTION,
        help=f"N: longer side N px, aspect kept (default {DEFAULT_RESOLUTION}); HxW: exact. Multiples of the patch size",
    )
    parser.add_argument("--point", nargs=2, type=int, metavar=("X", "Y"), help="similarity: pixel in the resized image")
    parser.add_argument("--foreground", action="store_true", help="pca: fit on foreground patches, background black")
    parser.add_argument("--train-images", help="foreground classifier: folder of training images")
    parser.add_argument("--train-masks", help="foreground classifier: folder of masks (same stems; > 0 = foreground)")
    parser.add_argument("--max-lines", type=int, default=60, help="match: most lines drawn per row (default 60)")
    parser.add_argument("--panel-size", type=int, help="longer side of each panel in px (default: see above)")


def _foreground_classifier(backbone: Backbone, args: argparse.Namespace) -> ForegroundClassifier:
    if bool(args.train_images) != bool(args.train_masks):
        raise ValueError("pass both --train-images and --train-masks, or neither (built-in synthetic masks)")
    if args.train_images:
        pairs = folder_training_pairs(args.train_images, args.train_masks)
        return train_foreground_classifier(backbone, pairs, args.resolution)
    return train_foreground_classifier(backbone, synthetic_training_pairs(), 224)


def make_picture(args: argparse.Namespace) -> Image.Image:
    n_inputs = 2 if args.kind == "match" else 1
    if len(args.input) != n_inputs:
        raise ValueError(f"show {args.kind} takes {n_inputs} image(s) in --input, got {len(args.input)}")
    if args.kind == "similarity" and args.point is None:
        raise ValueError("show similarity needs --point X Y (pixel coordinates in the resized image)")
    if args.panel_size is not None and args.panel_size < 1:
        raise ValueError(f"--panel-size must be positive, got {args.panel_size}")
    for path in args.input:
        if not Path(path).is_file():
            raise FileNotFoundError(f"input not found: {path}")
    backbone = front_door.from_args(args, "show")
    if args.kind == "attention" and backbone.is_convnext:
        raise ValueError(f"{backbone.description} is a ConvNeXt: it has no attention, so there are no attention maps")
    images = [decode(p) for p in args.input]
    sizes = [picture_size(im.size, args.resolution, backbone.stride) for im in images]
    image = resized(images[0], sizes[0])
    if args.kind == "attention":
        return attention_picture(image, prefix_attention(backbone, images[0], sizes[0]), args.panel_size)
    features = patch_features(backbone, images[0], sizes[0])
    if args.kind == "pca":
        keep = _foreground_classifier(backbone, args).predict_proba(features) >= 0.5 if args.foreground else None
        return pca_picture(image, features, keep, args.panel_size)
    if args.kind == "similarity":
        return similarity_picture(image, features, tuple(args.point), args.panel_size)
    if args.kind == "foreground":
        prob = _foreground_classifier(backbone, args).predict_proba(features)
        return foreground_picture(image, prob, args.panel_size)
    features2 = patch_features(backbone, images[1], sizes[1])
    return match_picture(image, features, resized(images[1], sizes[1]), features2, args.max_lines, args.panel_size)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out must be a .png file, got {out}")
    picture = make_picture(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    picture.save(out)
    print(f"wrote {out} ({picture.width}x{picture.height})")
    return 0
