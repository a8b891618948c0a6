"""The `dinov3-jax` command line: `train`, `convert`, `features`, `eval`, `show`, `plot`, `segment`, `models`."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from dinov3_jax.utils.files import FolderInUse
from dinov3_jax.weights import FORMATS


def _convert(args: argparse.Namespace) -> int:
    from dinov3_jax.models.config import ConvNeXtConfig
    from dinov3_jax.weights import convert_file

    cfg = convert_file(args.input, args.output, to=args.to, name=args.model, expect=args.source, force=args.force)
    is_convnext = isinstance(cfg, ConvNeXtConfig)
    shape = f"ConvNeXt blocks {'-'.join(map(str, cfg.depths))}" if is_convnext else f"{cfg.depth} blocks"
    print(f"wrote {args.output} ({args.to} layout; {shape}, width {cfg.embed_dim})")
    return 0


def _train(args: argparse.Namespace) -> int:
    from dinov3_jax.configs import load_config
    from dinov3_jax.train.main import TrainingDiverged, format_result, train

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config:  # only overrides were given
        config, overrides = None, [config, *overrides]
    cfg = load_config(config, overrides)
    try:
        result = train(cfg)
    except TrainingDiverged as err:
        print(f"dinov3-jax train: stopped: {err}", file=sys.stderr)
        return 3
    if result.get("interrupted"):
        return 128 + signal.Signals[result["interrupted"]].value  # as a shell reports death by that signal
    print(format_result(result))
    return 0


def _models(args: argparse.Namespace) -> int:
    from dinov3_jax.models.config import ConvNeXtConfig
    from dinov3_jax.models.registry import MODELS

    print(f"{'name':26} {'width':>5} {'depth':>9} {'heads':>5} {'ffn':>9} {'params':>14}  norm")
    for name, spec in MODELS.items():
        c = spec.config
        params = f"{spec.n_params:,}" if spec.n_params else "-"
        if isinstance(c, ConvNeXtConfig):  # depth: blocks per stage
            depth, heads, ffn = "-".join(map(str, c.depths)), "-", "convnext"
        else:
            depth, heads, ffn = str(c.depth), str(c.num_heads), c.ffn_layer
        print(f"{name:26} {c.embed_dim:5} {depth:>9} {heads:>5} {ffn:>9} {params:>14}  {spec.normalization}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dinov3-jax", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)

    conv = sub.add_parser("convert", help="convert backbone weights between the official, HF and our layouts")
    conv.add_argument("--from", dest="source", choices=FORMATS, help="layout of IN (checked; detected if omitted)")
    conv.add_argument("--to", choices=FORMATS, required=True, help="layout to write")
    conv.add_argument("--model", help="registry name; read from the file (or its name) when omitted")
    conv.add_argument("--force", action="store_true", help="replace OUT if it exists (written atomically either way)")
    conv.add_argument("input", metavar="IN", help=".pth, .safetensors, or an HF model folder")
    conv.add_argument(
        "output", metavar="OUT", help="file to write: .safetensors (ours), .pth or .safetensors (meta); a folder for hf"
    )
    conv.set_defaults(run=_convert)

    tr = sub.add_parser(
        "train",
        help="DINOv3 self-supervised pretraining (resumes from the output folder when it holds checkpoints)",
        description="Train with a recipe (built-in name or YAML path; default: tiny_cpu) and key=value overrides, "
        "e.g. `dinov3-jax train vitl16_im1k data.path=/data/imagenet/train optim.lr=0.0005`.",
    )
    tr.add_argument("config", nargs="?", help="recipe name (tiny_cpu, vits16_im1k, vitl16_im1k) or YAML file")
    tr.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    tr.set_defaults(run=_train)

    from dinov3_jax import features

    feats = sub.add_parser("features", help="extract CLS / register / patch features from images")
    features.add_arguments(feats)
    feats.set_defaults(run=features.run)

    from dinov3_jax.eval import cli as eval_cli

    ev = sub.add_parser("eval", help="k-NN, linear-probe and logistic-regression evaluation of a backbone")
    eval_cli.add_arguments(ev)
    ev.set_defaults(run=eval_cli.run)

    from dinov3_jax.show import cli as show_cli

    show = sub.add_parser("show", help="PNG pictures of patch features: pca, similarity, attention, foreground, match")
    show_cli.add_arguments(show)
    show.set_defaults(run=show_cli.run)

    from dinov3_jax.show import curves

    plot = sub.add_parser(
        "plot", help="a PNG of a run's curves (losses, collapse diagnostics, k-NN) from metrics.jsonl"
    )
    curves.add_arguments(plot)
    plot.set_defaults(run=curves.run)

    from dinov3_jax.eval import segment

    seg = sub.add_parser("segment", help="linear segmentation probe on frozen patch features (mIoU)")
    segment.add_arguments(seg)
    seg.set_defaults(run=segment.run)

    models = sub.add_parser("models", help="list the known backbones")
    models.set_defaults(run=_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.run(args)
    except (ValueError, ImportError, FolderInUse) as err:
        print(f"dinov3-jax {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # one line naming the path, not a traceback (read-only, full, missing)
        where = f"{err.filename}: " if err.filename else ""
        print(f"dinov3-jax {args.command}: error: {where}{err.strerror or err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
