"""Quality benchmark (not a test): does Gram anchoring change dense-feature quality on CPU?

Two runs of the `tiny_cpu` recipe, same seed, same data stream, extended to `--steps`:

* `no_gram`: the recipe as it is (DINO + iBOT + KoLeo);
* `gram`: the same, plus Gram anchoring switched on part-way (`--gram-start`, default the
  middle): the Gram teacher becomes the EMA teacher before that step
  (`gram.it_load_ema_teacher`), the Gram weight is 0 before it and ramps to `--gram-weight`
  (official 2.0) over `--ramp` steps after it (`gram.loss_weight_schedule`, v2), one Gram matrix
  per image (`gram.img_level`), and the Gram teacher is refreshed once more from the EMA teacher
  at `--refresh` (default 3/4 of the run; `gram.rep_update`, `max_updates=1`). The Gram teacher
  sees the global crops themselves (no high-resolution Gram-teacher crops), so the data stream is
  the same as in `no_gram`, and before `--gram-start` the two runs differ only by rounding.

Every `--eval-every` steps the trainer exports its EMA teacher
(`eval/training_<step>/teacher_backbone.safetensors`, plus the final `teacher_backbone.safetensors`);
each export, and the initialisation, is measured on

* global k-NN top-1 (the trainer's evaluator: 2048 train / 1024 held-out built-in images at the
  32 px global-crop resolution, cosine, T = 0.07);
* the linear segmentation probe (`dinov3_jax.eval.segment`) on the built-in masks at 64 px
  (8×8 patches): binary foreground / background mIoU, and 11-class (background + 10 shape
  kinds) mIoU, `--seg-train` / `--seg-val` images;
* the drift of the patch-similarity structure: the mean squared difference between each
  validation image's patch cosine-similarity matrix (64 × 64 at 64 px) and the same matrix from
  that run's teacher at `--gram-start`. This is what the Gram loss pulls towards zero (against
  the Gram teacher, which at `--refresh` moves to a later teacher).

The `gram` run's exports before `--gram-start` are not measured again: its rows there are the
`no_gram` ones (marked `shared` in the JSON; the smoke run measured both and got identical numbers).

Prints a table and the differences (gram − no_gram), writes `<out>/gram_anchoring.json` and a
PNG of the curves (drawn with Pillow; matplotlib is not a dependency of the project).

    .venv/bin/python benchmarks/gram_anchoring.py                        # 400 steps, runs/gram_anchoring
    .venv/bin/python benchmarks/gram_anchoring.py --steps 60 --epoch-length 10 --out runs/gram_smoke

A run folder whose `result.json` exists and whose `config.yaml` matches is reused (only the
evaluations run again); a folder left with another config is refused.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from dinov3_jax.backbone import Backbone
from dinov3_jax.configs import config_to_yaml, load_config, student_vit_config
from dinov3_jax.eval import segment
from dinov3_jax.eval.knn import KnnEvaluator
from dinov3_jax.models.heads import SSLModel, head_configs
from dinov3_jax.train.main import train
from dinov3_jax.weights import load_backbone

RUNS = ("no_gram", "gram")
SEG_RESOLUTION = 64


# ---------------------------------------------------------------------------------------------
# Configs and training
# ---------------------------------------------------------------------------------------------


def run_configs(args) -> dict:
    steps, e = args.steps, args.epoch_length
    if steps % e:
        raise SystemExit(f"--steps {steps} must be a multiple of --epoch-length {e}")
    common = [
        f"train.OFFICIAL_EPOCH_LENGTH={e}",
        f"optim.epochs={steps // e}",
        f"evaluation.eval_period_iterations={args.eval_every}",
        "runtime.knn_every_steps=null",  # measured here, on the exports
        f"checkpointing.period={10 * steps}",  # only the final checkpoint
        *args.overrides,
    ]
    gram = [
        "gram.use_loss=true",
        "gram.img_level=true",
        f"gram.it_load_ema_teacher={args.gram_start}",
        f"gram.loss_weight_schedule={{start: 0, peak: 0, end: {args.gram_weight:g}, "
        f"warmup_epochs: {args.gram_start / e:g}, cosine_epochs: {args.ramp / e:g}}}",
    ]
    if args.refresh:
        gram += [
            "gram.rep_update=true",
            f"gram.it_first_update={args.refresh}",
            f"gram.update_frequency={args.refresh}",
            "gram.max_updates=1",
        ]
    else:
        gram.append("gram.rep_update=false")
    return {
        "no_gram": load_config("tiny_cpu", [*common, f"train.output_dir={Path(args.out) / 'no_gram'}"]),
        "gram": load_config("tiny_cpu", [*common, *gram, f"train.output_dir={Path(args.out) / 'gram'}"]),
    }


def train_or_reuse(name: str, cfg) -> dict:
    out = Path(cfg.train.output_dir)
    result_file, config_file = out / "result.json", out / "config.yaml"
    if result_file.is_file() and config_file.is_file() and config_file.read_text() == config_to_yaml(cfg):
        print(f"[{name}] reusing the finished run in {out}")
        return json.loads(result_file.read_text())
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} holds another or an unfinished run: delete it or pass another --out")
    print(f"[{name}] training {out}")
    result = train(cfg, progress=False)
    return {k: v for k, v in result.items() if k != "state"}


def exports(cfg) -> dict[int, Path]:
    """Step → exported teacher backbone of a finished run (the periodic exports and the final one)."""
    out = Path(cfg.train.output_dir)
    found = {int(p.parent.name.split("_")[1]): p for p in out.glob("eval/training_*/teacher_backbone.safetensors")}
    found[cfg.optim.epochs * cfg.train.OFFICIAL_EPOCH_LENGTH] = out / "teacher_backbone.safetensors"
    return dict(sorted(found.items()))


def initial_backbone(cfg):
    """The teacher backbone at step 0 (the trainer's initialisation: the student's, same seed)."""
    vit = student_vit_config(cfg).replace(drop_path_rate=0.0)
    return SSLModel(vit, *head_configs(cfg), rngs=nnx.Rngs(cfg.train.seed)).backbone


def gram_logged(cfg) -> list[tuple[int, float, float]]:
    """(step, Gram loss, total loss) as logged in metrics.jsonl."""
    rows = []
    path = Path(cfg.train.output_dir) / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        rec = json.loads(line)
        if "gram" in rec and "loss" in rec:
            rows.append((int(rec["step"]), float(rec["gram"]), float(rec["loss"])))
    return rows


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------


class InMemory:
    """A source rendered once (the k-NN images are the same at every evaluation)."""

    def __init__(self, source):
        self.items = [source[i] for i in range(len(source))]
        self.num_classes = source.num_classes

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        return self.items[index]


class DenseTask:
    """The built-in masks at 64 px: images loaded once; binary and 11-class probes on the same features."""

    def __init__(self, n_train: int, n_val: int, steps: int, lr: float):
        self.size = (SEG_RESOLUTION, SEG_RESOLUTION)
        kw = dict(image_size=SEG_RESOLUTION, seed=0)
        self.train = InMemory(segment.SyntheticMasks(n_train, split="train", **kw))
        self.val = InMemory(segment.SyntheticMasks(n_val, split="val", **kw))
        self.train_y, self.val_y = segment.masks_at(self.train, self.size), segment.masks_at(self.val, self.size)
        self.steps, self.lr = steps, lr

    def features(self, module) -> tuple[np.ndarray, np.ndarray]:
        backbone = Backbone(module)
        return tuple(segment.patch_features(backbone, src, self.size) for src in (self.train, self.val))

    def probe(self, train_f, val_f, binary: bool) -> float:
        train_y, val_y = (np.minimum(y, 1) if binary else y for y in (self.train_y, self.val_y))
        probe = segment.train_linear_segmenter(train_f, train_y, 2 if binary else 11, steps=self.steps, lr=self.lr)
        return 100 * segment.evaluate_segmenter(probe, val_f, val_y)["miou"]


def patch_grams(feats: np.ndarray) -> np.ndarray:
    """Per-image patch cosine-similarity matrices [N, P, P] of patch features [N, h, w, D]."""
    x = feats.reshape(len(feats), -1, feats.shape[-1]).astype(np.float64)
    x /= np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    return x @ x.transpose(0, 2, 1)


def measure(backbone, knn: KnnEvaluator, task: DenseTask) -> tuple[dict, np.ndarray]:
    k = knn(backbone)
    train_f, val_f = task.features(backbone)
    row = {
        "knn_top1@10": k["top1@10"],
        "knn_top1@20": k["top1@20"],
        "miou_binary": task.probe(train_f, val_f, binary=True),
        "miou_11": task.probe(train_f, val_f, binary=False),
    }
    return row, patch_grams(val_f)


# ---------------------------------------------------------------------------------------------
# The plot (Pillow)
# ---------------------------------------------------------------------------------------------


def plot(path: Path, table: dict, marks: dict[str, int], title: str) -> None:
    from PIL import Image, ImageDraw, ImageFont

    panels = [
        ("knn_top1@20", "global k-NN top-1 @20 (%)"),
        ("miou_binary", "segmentation mIoU, binary (%)"),
        ("miou_11", "segmentation mIoU, 11 classes (%)"),
        ("gram_drift", "patch-Gram drift vs teacher at Gram start"),
    ]
    colours = {"no_gram": (31, 119, 180), "gram": (214, 39, 40)}
    pw, ph, ml, mr, mt, mb = 420, 300, 62, 14, 34, 44
    img = Image.new("RGB", (pw * 2, ph * 2 + 60), "white")
    draw = ImageDraw.Draw(img)
    font, small, big = (ImageFont.load_default(size=s) for s in (13, 11, 15))
    draw.text((10, 8), title, fill="black", font=big)
    steps_all = sorted({s for run in table.values() for s in run})
    x0, x1 = min(steps_all), max(steps_all)
    for i, (key, label) in enumerate(panels):
        ox, oy = (i % 2) * pw, 60 + (i // 2) * ph
        left, right, top, bottom = ox + ml, ox + pw - mr, oy + mt, oy + ph - mb
        values = [r[key] for run in table.values() for r in run.values() if r.get(key) is not None]
        if not values:
            continue
        lo, hi = min(values), max(values)
        if key == "gram_drift":  # ≥ 0, from 0 at the Gram start
            lo, hi = 0.0, max(hi, 1e-12) * 1.1
        else:
            pad = max((hi - lo) * 0.1, 0.5)
            lo, hi = lo - pad, hi + pad

        def X(s, left=left, right=right):
            return left + (right - left) * (s - x0) / max(x1 - x0, 1)

        def Y(v, lo=lo, hi=hi, top=top, bottom=bottom):
            return bottom - (bottom - top) * (v - lo) / (hi - lo)

        draw.text((left, oy + 10), label, fill="black", font=font)
        draw.rectangle((left, top, right, bottom), outline=(120, 120, 120))
        for t in np.linspace(lo, hi, 5):
            y = Y(t)
            draw.line((left - 4, y, left, y), fill="black")
            draw.line((left + 1, y, right - 1, y), fill=(235, 235, 235))
            text = f"{t:.2g}" if key == "gram_drift" else f"{t:.1f}"
            draw.text((left - 6, y), text, fill="black", font=small, anchor="rm")
        for s in steps_all:
            draw.line((X(s), bottom, X(s), bottom + 4), fill="black")
            draw.text((X(s), bottom + 6), str(s), fill="black", font=small, anchor="ma")
        draw.text(((left + right) / 2, bottom + 22), "training step", fill="black", font=small, anchor="ma")
        for name, step in marks.items():
            if x0 < step < x1:
                for y in range(int(top), int(bottom), 8):
                    draw.line((X(step), y, X(step), min(y + 4, bottom)), fill=(150, 150, 150))
                draw.text((X(step) + 3, top + 3), name, fill=(110, 110, 110), font=small)
        for run, rows in table.items():
            pts = [(X(s), Y(r[key])) for s, r in sorted(rows.items()) if r.get(key) is not None]
            if len(pts) > 1:
                draw.line(pts, fill=colours[run], width=2)
            for x, y in pts:
                draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colours[run])
    lx = pw * 2 - 260
    for j, run in enumerate(RUNS):
        y = 14 + 18 * j
        draw.line((lx, y + 7, lx + 24, y + 7), fill=colours[run], width=3)
        draw.text(
            (lx + 30, y), {"no_gram": "no Gram", "gram": "Gram anchoring from the mark"}[run], fill="black", font=font
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


# ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="training steps of each run (the budget)")
    parser.add_argument("--epoch-length", type=int, default=100, help="steps per schedule 'epoch'")
    parser.add_argument(
        "--gram-start", type=int, help="Gram teacher = EMA teacher and Gram weight on (default: steps/2)"
    )
    parser.add_argument("--refresh", type=int, help="one refresh of the Gram teacher (default: 3/4 of steps; 0 = none)")
    parser.add_argument("--gram-weight", type=float, default=2.0, help="Gram weight after the ramp (official 2.0)")
    parser.add_argument("--ramp", type=int, help="steps of the cosine ramp of the Gram weight (default: steps/80)")
    parser.add_argument("--eval-every", type=int, help="teacher export period (default: steps/4)")
    parser.add_argument("--seg-train", type=int, default=128, help="segmentation probe training images")
    parser.add_argument("--seg-val", type=int, default=64, help="segmentation probe validation images")
    parser.add_argument("--seg-steps", type=int, default=500, help="AdamW steps of each probe")
    parser.add_argument("--seg-lr", type=float, default=1e-2)
    parser.add_argument("--out", default="runs/gram_anchoring", help="folder of the two runs and the JSON")
    parser.add_argument("--png", help="the plot (default: <out>/gram_anchoring.png)")
    parser.add_argument("--plot-only", action="store_true", help="redraw the PNG from <out>/gram_anchoring.json")
    parser.add_argument("overrides", nargs="*", help="extra key=value config overrides (both runs)")
    args = parser.parse_args()
    if args.plot_only:
        saved = json.loads((Path(args.out) / "gram_anchoring.json").read_text())
        a = saved["args"]
        table = {name: {int(k): v for k, v in rows.items()} for name, rows in saved["table"].items()}
        marks = {"Gram on": a["gram_start"]} | ({"refresh": a["refresh"]} if a["refresh"] else {})
        png = Path(args.png) if args.png else Path(args.out) / "gram_anchoring.png"
        plot(png, table, marks, saved.get("title") or f"tiny_cpu, {a['steps']} steps: no Gram vs Gram anchoring")
        print(f"wrote {png}")
        return
    s = args.steps
    args.gram_start = s // 2 if args.gram_start is None else args.gram_start
    args.refresh = (3 * s) // 4 if args.refresh is None else args.refresh
    args.ramp = max(1, s // 80) if args.ramp is None else args.ramp
    args.eval_every = max(1, s // 4) if args.eval_every is None else args.eval_every
    if not 0 < args.gram_start < s or (args.refresh and not args.gram_start < args.refresh < s):
        raise SystemExit("need 0 < --gram-start < --refresh < --steps (or --refresh 0)")
    if args.gram_start % args.eval_every:
        raise SystemExit("--gram-start must be a multiple of --eval-every (the drift is measured from that export)")

    t_start, load_start = time.perf_counter(), os.getloadavg()
    cfgs = run_configs(args)
    results = {name: train_or_reuse(name, cfg) for name, cfg in cfgs.items()}
    t_trained = time.perf_counter()

    knn = KnnEvaluator(cfgs["no_gram"])
    knn.train_source, knn.val_source = InMemory(knn.train_source), InMemory(knn.val_source)
    task = DenseTask(args.seg_train, args.seg_val, args.seg_steps, args.seg_lr)
    init_row, _ = measure(initial_backbone(cfgs["no_gram"]), knn, task)
    table: dict[str, dict[int, dict]] = {}
    for name, cfg in cfgs.items():
        rows, grams = {0: dict(init_row)}, {}
        for step, path in exports(cfg).items():
            if name == "gram" and step < args.gram_start:
                # Gram weight 0 and the same data stream: the no_gram teacher up to rounding.
                rows[step] = dict(table["no_gram"][step], shared=True)
                continue
            rows[step], grams[step] = measure(load_backbone(None, path), knn, task)
            print(f"[{name}] step {step}: " + ", ".join(f"{k} {v:.2f}" for k, v in rows[step].items()), flush=True)
        anchor = grams[args.gram_start]
        for step, g in grams.items():
            rows[step]["gram_drift"] = float(np.mean((g - anchor) ** 2)) if step >= args.gram_start else None
        for step in rows:
            rows[step].setdefault("gram_drift", None)
        table[name] = rows
    t_done = time.perf_counter()

    keys = ["knn_top1@20", "miou_binary", "miou_11", "gram_drift"]
    head = f"{'step':>5} " + "".join(f"{k + ' ' + r:>24}" for k in keys for r in ("a", "b"))
    print(f"\na = no_gram, b = gram (Gram from step {args.gram_start}, refresh at {args.refresh or '-'})")
    print(head)
    for step in sorted(table["no_gram"]):
        a, b = table["no_gram"][step], table["gram"].get(step, {})

        def cell(r, k):
            v = r.get(k)
            return f"{'-':>24}" if v is None else f"{v:24.5f}" if k == "gram_drift" else f"{v:24.2f}"

        print(f"{step:>5} " + "".join(cell(r, k) for k in keys for r in (a, b)))
    final = max(table["no_gram"])
    diff = {k: table["gram"][final][k] - table["no_gram"][final][k] for k in keys}
    ratio = {
        "gram_drift": table["gram"][final]["gram_drift"] / max(table["no_gram"][final]["gram_drift"], 1e-12),
    }
    print(f"\nat step {final}, gram - no_gram: " + ", ".join(f"{k} {v:+.4g}" for k, v in diff.items()))
    print(f"patch-Gram drift ratio gram / no_gram: {ratio['gram_drift']:.3f}")
    logged = gram_logged(cfgs["gram"])
    summary = {
        "title": f"tiny_cpu, {s} steps, seed {cfgs['no_gram'].train.seed}: no Gram vs Gram anchoring",
        "args": {k: v for k, v in vars(args).items() if k != "overrides"} | {"overrides": args.overrides},
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "jax": jax.__version__,
            "devices": f"{jax.device_count()} x {jax.devices()[0].platform}",
            "loadavg_start": load_start,
            "loadavg_end": os.getloadavg(),
        },
        "seconds": {
            "train_no_gram": results["no_gram"].get("seconds"),
            "train_gram": results["gram"].get("seconds"),
            "training_total_wall": t_trained - t_start,
            "evaluation_wall": t_done - t_trained,
        },
        "table": {name: {str(k): v for k, v in rows.items()} for name, rows in table.items()},
        "final_difference_gram_minus_no_gram": diff,
        "final_drift_ratio": ratio["gram_drift"],
        "gram_loss_logged": logged,
    }
    out_json = Path(args.out) / "gram_anchoring.json"
    out_json.write_text(json.dumps(summary, indent=2) + "\n")
    png = Path(args.png) if args.png else Path(args.out) / "gram_anchoring.png"
    marks = {"Gram on": args.gram_start} | ({"refresh": args.refresh} if args.refresh else {})
    plot(png, table, marks, summary["title"])
    print(f"wrote {out_json} and {png}; training {t_trained - t_start:.0f} s, evaluation {t_done - t_trained:.0f} s")


if __name__ == "__main__":
    main()
