"""`dinov3-jax features`: batched feature extraction from image files (placeholder being written)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True)


def run(args: argparse.Namespace) -> int:
    raise NotImplementedError("features extraction is being written")
