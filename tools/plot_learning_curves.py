"""Image AUROC against training minutes, one line per run, from runs trained with `--eval-every`.

    .venv/bin/python tools/plot_learning_curves.py runs/mono-fast runs/poly-fast runs/cookie-fast \
        --label "elpv mono" --label "elpv poly" --label cookie --out docs/images/learning_curves.png

Each RUN_DIR's curve comes from its checkpoint.json (`metrics.curve`), or from curve.json while it trains.
A dashed line per run marks its teacher's own nearest-neighbour figure when `--reference` gives one
(`efficientad teacher-check`), in the order of the runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def read_curve(run_dir: Path) -> list[dict[str, Any]]:
    """The learning-curve points of a run: the checkpoint's when finished, else curve.json."""
    checkpoint = run_dir / "checkpoint.json"
    if checkpoint.is_file():
        metrics = json.loads(checkpoint.read_text()).get("metrics") or {}
        if metrics.get("curve"):
            return list(metrics["curve"])
    partial = run_dir / "curve.json"
    if partial.is_file():
        return list(json.loads(partial.read_text()))
    raise SystemExit(f"{run_dir}: no learning curve (train with --eval-every)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR")
    parser.add_argument("--label", action="append", default=None, help="one per run, in order")
    parser.add_argument("--reference", action="append", type=float, default=None, help="one per run")
    parser.add_argument("--title", default="EfficientAD-S on a 2-core CPU: image AUROC against training time")
    parser.add_argument("--out", type=Path, required=True, metavar="PNG")
    args = parser.parse_args(argv)
    labels = args.label or [run.name for run in args.runs]
    if len(labels) != len(args.runs) or (args.reference and len(args.reference) != len(args.runs)):
        parser.error("give one --label (and one --reference, if any) per run")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7.5, 5.5), dpi=120)
    for index, (run, label) in enumerate(zip(args.runs, labels, strict=True)):
        curve = read_curve(run)
        minutes = [point["seconds"] / 60 for point in curve]
        line = axes.plot(minutes, [point["image_auroc"] for point in curve], marker="o", label=label)[0]
        if args.reference:
            axes.axhline(args.reference[index], color=line.get_color(), linestyle="--", linewidth=1)
    axes.set_xlabel("training minutes (evaluation excluded)")
    axes.set_ylabel("image AUROC")
    axes.set_title(args.title, fontsize=10)
    axes.grid(alpha=0.3)
    # below the axes, so that no curve hides behind it
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=8)
    figure.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
