"""`dinov3-jax plot RUN_DIR`: a run's curves at a glance, from its `metrics.jsonl`.

One PNG of panels: the losses; the DINO cross-entropy minus log K (below 0, the student predicts
the teacher better than chance); the entropies of the teacher's targets and of the student's
predictions; the prototypes in use; the effective rank of the CLS features (these four fall to
1 or stay flat when a run collapses, `losses.diagnostics`); k-NN top-1 over the steps; the lr.
A multi-distillation run's `student/metric` series share their metric's panel.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# (title, metric names as logged, y label); a metric appears in the first panel that names it.
PANELS = (
    ("losses", ("loss", "dino_local", "dino_global", "ibot", "koleo", "gram", "cls_local", "cls_global", "patch"), ""),
    ("DINO cross-entropy − log K", ("dino_global_minus_log_k",), "nats"),
    ("entropy", ("teacher_entropy", "student_entropy"), "nats"),
    ("prototypes in use", ("prototypes_in_use",), "of K"),
    ("effective rank of the CLS features", ("cls_effective_rank",), ""),
    ("k-NN top-1", ("top1",), "%"),
    ("learning rate", ("lr",), ""),
)


def read_metrics(path: Path) -> dict[str, tuple[list[int], list[float]]]:
    """metrics.jsonl → {metric: (steps, values)}; non-finite values (written as strings) as NaN."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = int(record.pop("step"))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}:{number}: not a metrics record ({err})") from None
        for key, value in record.items():
            steps, values = series.setdefault(key, ([], []))
            steps.append(step)
            values.append(float(value))  # "nan" / "inf" strings too
    return series


def _panel_of(key: str) -> int | None:
    """Index of the panel that shows `key` (`name/metric`, `knn/top1_...`), or None."""
    leaf = key.rsplit("/", 1)[-1]
    for i, (_, names, _) in enumerate(PANELS):
        if leaf in names or (names == ("top1",) and key.startswith("knn/") and leaf.startswith("top1")):
            return i
    return None


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Writes the curves of the run in `run_dir` to `out` (default RUN_DIR/curves.png, redrawn
    on every call so that it follows a running job)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{run_dir}: no metrics.jsonl (not a train.output_dir, or no step logged yet)")
    series = read_metrics(path)
    shown: dict[int, list[str]] = {}
    for key in sorted(series):
        panel = _panel_of(key)
        if panel is not None:
            shown.setdefault(panel, []).append(key)
    if not shown:
        raise ValueError(f"{path}: none of the metrics this plot shows ({', '.join(p[0] for p in PANELS)})")
    panels = sorted(shown)
    cols = 3 if len(panels) > 4 else 2
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        title, _, unit = PANELS[panel]
        for key in shown[panel]:
            steps, values = series[key]
            ax.plot(steps, values, label=key, marker="o" if len(steps) < 20 else None, markersize=3)
        if "log K" in title:  # chance level
            ax.axhline(0.0, color="gray", linewidth=0.8, linestyle="--")
        ax.set_title(title)
        ax.set_xlabel("step")
        if unit:
            ax.set_ylabel(unit)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    out = Path(out) if out is not None else run_dir / "curves.png"
    if out.suffix.lower() != ".png":
        raise ValueError(f"{out}: the plot is written as a .png file")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a train.output_dir (holds metrics.jsonl)")
    parser.add_argument("--out", help="PNG to write (default RUN_DIR/curves.png)")


def run(args: argparse.Namespace) -> int:
    print(f"wrote {plot_run(args.run_dir, args.out)}")
    return 0
